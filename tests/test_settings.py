"""Settings people get wrong: one paragraph with the fix, exit 1, never a traceback, never a
secret (issue 9, items 6 and 13), and every setting reaching the code that uses it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from simulator import prompts
from simulator.cli import app
from simulator.errors import UserError
from simulator.runner import options_from_settings
from simulator.settings import _VARIABLES, load_settings, parse_dotenv

ROOT = Path(__file__).resolve().parent.parent
SIMULATOR = str(Path(sys.executable).with_name("simulator"))
SECRET = "S3cretPW"


@pytest.mark.parametrize(
    ("line", "key"),
    [
        (f"MONGODB_URI: mongodb://user:{SECRET}@127.0.0.1/", "MONGODB_URI"),
        (f"OPENAI_API_KEY sk-{SECRET}", "OPENAI_API_KEY"),
        (f"export DB_PASSWORD  {SECRET}", "DB_PASSWORD"),
        (SECRET, None),  # the rest of a value split over two lines: not named as a key
        (f"-{SECRET}=x", None),
    ],
    ids=["colon", "space", "export", "bare-word", "bad-key"],
)
def test_a_malformed_env_line_names_file_line_and_key_never_the_value(tmp_path, line, key):
    env_file = tmp_path / "settings.env"
    env_file.write_text(f"# comment\nMONGODB_DB=simulator\n\n{line}\n")
    result = CliRunner().invoke(app, ["status"], env={"SIMULATOR_ENV_FILE": str(env_file)})
    assert SECRET not in result.output + repr(result.exception)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"{env_file} line 4" in result.output and "KEY=VALUE" in result.output
    if key:
        assert f"key {key}" in result.output and f"write {key}=VALUE" in result.output
    else:
        assert "key" not in result.output.split("line 4", 1)[1].split(";")[1]


def test_an_unclosed_quote_and_a_binary_env_file_do_not_show_values(tmp_path):
    with pytest.raises(UserError) as e:
        parse_dotenv(f'A=1\nOPENAI_API_KEY="sk-{SECRET}\n', "x.env")
    assert SECRET not in str(e.value) and "x.env line 2" in str(e.value)
    env_file = tmp_path / "binary.env"
    env_file.write_bytes(b"A=1\nB=\xff\xfe" + SECRET.encode() + b"\n")
    result = CliRunner().invoke(app, ["status"], env={"SIMULATOR_ENV_FILE": str(env_file)})
    assert result.exit_code == 1 and "line 2 is not UTF-8" in result.output
    assert (
        SECRET not in result.output
        and result.exception is None
        or isinstance(result.exception, SystemExit)
    )


def leaf_commands() -> list[tuple[list[str], Any]]:
    """Every command of the app as (path of names, click command)."""
    found = []

    def walk(group: Any, path: list[str]) -> None:
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, [*path, name])
            else:
                found.append(([*path, name], command))

    walk(typer.main.get_command(app), [])
    return found


def arguments(command: Any) -> list[str]:
    """Placeholder values for the required parameters of a command."""
    args = []
    for p in command.params:
        if p.required and p.param_type_name == "argument":
            args.append("x")
        elif p.required:
            args += [p.opts[0], "x"]
    return args


BAD_SETTINGS = [
    ({"SIMULATOR_CONCURRENCY": "abc"}, "SIMULATOR_CONCURRENCY must be a whole number, got 'abc'"),
    ({"MONGODB_DB": "a.b"}, "MONGODB_DB 'a.b' (set in the environment) is not a valid"),
    ({"SIMULATOR_DB_PORT": "99999"}, "SIMULATOR_DB_PORT must be at most 65535, got 99999 (set"),
]


@pytest.mark.parametrize(("env", "expected"), BAD_SETTINGS, ids=["int", "db-name", "port"])
def test_an_invalid_setting_is_one_paragraph_on_every_command(env, expected, tmp_path):
    commands = leaf_commands()
    assert len(commands) >= 15
    for path, command in commands:
        result = CliRunner().invoke(app, [*path, *arguments(command)], env=env)
        where = " ".join(path)
        assert result.exit_code == 1, (where, result.output)
        assert isinstance(result.exception, SystemExit), (where, result.exception)
        assert result.output.startswith("Error: ") and expected in result.output, where
        assert result.output.count("\n") <= 2, (where, result.output)
    # with no command (the menus) too
    result = CliRunner().invoke(app, [], env=env)
    assert result.exit_code == 1 and expected in result.output


def test_help_works_with_an_invalid_setting():
    result = CliRunner().invoke(app, ["status", "--help"], env={"SIMULATOR_CONCURRENCY": "abc"})
    assert result.exit_code == 0 and "Usage:" in result.output


def run_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SIMULATOR, *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_invalid_settings_through_the_installed_script(tmp_path):
    env_file = tmp_path / "broken.env"
    env_file.write_text(f"MONGODB_URI: mongodb://user:{SECRET}@127.0.0.1/\n")
    cases = [
        ({"SIMULATOR_CONCURRENCY": "abc"}, ["status"], "SIMULATOR_CONCURRENCY"),
        ({"MONGODB_DB": "a.b"}, ["experiment", "list"], "MONGODB_DB"),
        ({"SIMULATOR_ENV_FILE": str(env_file)}, ["run", "x.yaml"], f"{env_file} line 1"),
    ]
    for env, args, expected in cases:
        done = run_script(env, *args)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and SECRET not in done.stderr + done.stdout
        assert done.stderr.startswith("Error: ") and expected in done.stderr
        # one paragraph: rich wraps at the terminal width, so count sentences, not lines
        assert len(re.findall(r"^Error:", done.stderr, re.M)) == 1 and done.stdout == ""


def test_prompts_dir_set_in_dotenv_reaches_the_templates(tmp_path, monkeypatch):
    folder = tmp_path / "my-prompts"
    folder.mkdir()
    (folder / prompts.SUMMARY_TEMPLATE).write_text("Summarize day {day} please:\n{transcript}")
    env_file = tmp_path / "s.env"
    env_file.write_text(f"SIMULATOR_PROMPTS_DIR={folder}\n")
    monkeypatch.setenv("SIMULATOR_ENV_FILE", str(env_file))
    (folder / prompts.SELECTOR_TEMPLATE).write_text("{agents}\n{transcript}")
    settings = load_settings()
    assert settings.prompts_dir == folder
    templates = options_from_settings(settings).templates
    assert prompts.summary_request(2, "A: hi", templates).startswith("Summarize day 2 please:")


def test_every_setting_is_in_the_env_template():
    template = (ROOT / ".env_template").read_text()
    documented = set(re.findall(r"^# ([A-Z][A-Z0-9_]+)=", template, re.M))
    variables = {variable for variable, _ in _VARIABLES.values()}
    variables |= {"DB_USER", "DB_PASSWORD", "DB_CLUSTER_URL"}
    assert variables <= documented, variables - documented
    # and nothing is documented that the code does not read
    assert documented <= variables, documented - variables
