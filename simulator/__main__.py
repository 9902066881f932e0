"""`python -m simulator`: the same as the `simulator` command."""

from simulator.cli import app

app(prog_name="simulator")
