"""Quality flags: what is wrong with a stored reply, and whether a conversation is usable.

Pure functions over text and its context (flags.py), and the rule that turns a
conversation's flags into one verdict (verdict.py). The conversation engine computes the
flags as each message is made; the runner applies the rule when a conversation finishes.
"""

from simulator.quality.flags import (
    EMPTY,
    LEAKED_PROMPT,
    MESSAGE_FLAGS,
    REPEATED,
    ROLE_BREAK,
    SUMMARY_FLAGS,
    TRUNCATED,
    leaks_prompt,
    message_flags,
    normalized,
    speaks_as_other,
    summary_flags,
    truncated,
)
from simulator.quality.verdict import Limit, Quality, UsableRule, assess, parse_limit

__all__ = [
    "EMPTY",
    "LEAKED_PROMPT",
    "MESSAGE_FLAGS",
    "REPEATED",
    "ROLE_BREAK",
    "SUMMARY_FLAGS",
    "TRUNCATED",
    "Limit",
    "Quality",
    "UsableRule",
    "assess",
    "leaks_prompt",
    "message_flags",
    "normalized",
    "parse_limit",
    "speaks_as_other",
    "summary_flags",
    "truncated",
]
