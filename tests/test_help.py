"""Help text over every command (sqlite-utils' test_docs style) and `--version` (issue 9,
item 22)."""

from __future__ import annotations

import re
from importlib.metadata import version
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from simulator.cli import app


def commands() -> list[tuple[list[str], Any]]:
    """(path of names, click command) of the app, its groups and every command in them."""
    found: list[tuple[list[str], Any]] = []

    def walk(command: Any, path: list[str]) -> None:
        found.append((path, command))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = commands()


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(p) or "simulator" for p, _ in COMMANDS]
)
def test_every_command_has_readable_help(path, command):
    assert (command.help or "").strip(), f"{path} has no help text"
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Usage: " in text
    # no Python types as metavars (`<list[str]>`, `<int>`) and no `{name}` placeholders
    assert not re.search(r"<[a-z][a-z\[\], ]*>", text), text
    assert not re.search(r"\{\w+\}", text), text
    for param in command.params:
        if param.name != "help":
            assert (getattr(param, "help", None) or "").strip(), f"{path}: {param.name} has no help"


def test_run_help_names_what_to_give():
    text = CliRunner().invoke(app, ["run", "--help"]).output
    assert "run [OPTIONS] EXPERIMENT\n" in text
    assert "--llm MODEL" in text and "--agents ROLE=N,..." in text


def test_group_help_only_promises_commands_that_exist():
    """`experiment --help` once promised `edit`, which does not exist."""
    for path, group in COMMANDS:
        if not hasattr(group, "commands") or not path:
            continue
        first = (group.help or "").split(".")[0]
        listed = re.match(r"^([A-Z][\w, -]+?) and (\w+) experiments", first)
        if listed is None:
            continue
        verbs = [v.strip().lower() for v in listed.group(1).split(",")] + [listed.group(2)]
        assert set(verbs) <= set(group.commands), (path, verbs, sorted(group.commands))


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"simulator {version('llm-interaction-simulator')}"
