"""What `simulator export` writes, without importing the exporters: the command's help
needs these names at start-up (issue 14), the exporters only when it runs."""

FORMATS = ("txt", "jsonl", "csv", "html")
KINDS = ("experiment", "batch", "conversation")
