"""`python -m simulator`: the same as the `simulator` command."""

from simulator.cli import command_line

command_line()
