"""What `run` and `experiment import` are given: a directory, an edited YAML file, someone
else's experiment; and how `run` ends (issue 9, items 14, 16, 18, 22)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.store import Store
from tests.scenarios import PRISON_ONE

ROOT = Path(__file__).resolve().parent.parent
PRISON = PRISON_ONE  # one of the 72 scenarios: these tests are not about factors
SIMULATOR = str(Path(sys.executable).with_name("simulator"))
SMALL = ("--llm", "scripted", "--messages", "4", "--days", "1", "--plain")


@pytest.fixture
def cli(settings, env_for):
    def invoke(*args: str, user: str = "alice", code: int = 0, input: str | None = None):
        env = {**env_for(settings), "SIMULATOR_USER": user}
        result = CliRunner().invoke(app, list(args), env=env, input=input)
        assert result.exit_code == code, result.output + repr(result.exception)
        assert "Traceback" not in result.output
        return result

    return invoke


def test_run_a_directory_says_it_is_one_and_what_to_give(cli, db, tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "prison.yaml").write_text(PRISON.read_text())
    for args in (("run", str(folder), *SMALL), ("experiment", "import", str(folder))):
        output = cli(*args, code=1).output
        assert "is a directory" in output and "not a valid" not in output
        assert "prison.yaml" in output and "experiment id" in output
    assert Store(db, "alice").list_experiments() == []


def edited(tmp_path: Path) -> Path:
    path = tmp_path / "prison.yaml"
    text = PRISON.read_text()
    assert "keep order in the prison" in text
    path.write_text(text.replace("keep order in the prison", "keep strict order in the prison"))
    return path


def test_an_edited_yaml_is_not_silently_a_second_experiment(cli, db, tmp_path):
    path = tmp_path / "prison.yaml"
    path.write_text(PRISON.read_text())
    cli("run", str(path), *SMALL)
    store = Store(db, "alice")
    (first,) = [r.experiment for r in store.list_experiments()]
    path = edited(tmp_path)

    refused = cli("run", str(path), *SMALL, code=1).output
    assert "prison.yaml changed since" in refused and first.id[:8] in refused
    assert f"simulator run {first.id[:8]}" in refused and "--new" in refused
    assert len(store.list_experiments()) == 1 and len(store.list_batches()) == 1
    refused = cli("experiment", "import", str(path), code=1).output
    assert "changed since" in refused
    assert len(store.list_experiments()) == 1

    # --new: a second experiment of the same name, linked to the first, and said so
    ran = cli("run", str(path), *SMALL, "--new").output
    assert "created a new experiment" in ran and f"simulator run {first.id[:8]}" in ran
    rows = [r.experiment for r in store.list_experiments()]
    (second,) = [e for e in rows if e.id != first.id]
    assert second.name == first.name and second.parent_id == first.id
    assert len(store.list_batches()) == 2
    # the edited file is that experiment now: reused without a word, no third copy
    again = cli("run", str(path), *SMALL).output
    assert "changed since" not in again and "created a new experiment" not in again
    assert len(store.list_experiments()) == 2
    # someone else's experiment of that name is not the user's study: bob imports freely
    cli("experiment", "import", str(path), user="bob")
    assert len(store.list_experiments()) == 3


def test_changes_to_someone_elses_experiment_are_refused_before_any_question(cli, db):
    cli("experiment", "import", str(PRISON), user="bob")
    store = Store(db, "bob")
    exp = store.list_experiments()[0].experiment
    for args in (("experiment", "note", exp.id[:8], "mine now"),):
        # input is offered: a refusal that asks first would consume it and print a prompt
        result = cli(*args, user="alice", code=1, input="y\ny\n")
        assert "Only bob" in result.output
        assert "?" not in result.output.split("Only bob")[0] and "[y/N]" not in result.output
    assert store.get_experiment(exp.id).note == exp.note


def read_until_exit(proc: subprocess.Popen[bytes], master: int, timeout: float) -> bytes:
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        chunk = b""
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process and its terminal are gone
                chunk = b""
            output += chunk
        if proc.poll() is not None and not chunk:
            return output
    proc.kill()
    raise AssertionError(f"run did not end (waiting in a pager?):\n{output.decode()[-2000:]}")


def test_a_one_conversation_run_on_a_terminal_never_opens_a_pager(settings, env_for, tmp_path):
    marker = tmp_path / "pager-was-opened"
    pager = tmp_path / "pager.sh"
    pager.write_text(f"#!/bin/sh\ntouch {marker}\ncat > /dev/null\n")
    pager.chmod(0o755)
    env = {
        **os.environ,
        **env_for(settings),
        "PAGER": str(pager),
        "MANPAGER": str(pager),
        "LINES": "12",
        "COLUMNS": "100",
        "TERM": "xterm",
    }
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [SIMULATOR, "run", str(PRISON), *SMALL[:-1], "--messages", "10", "--days", "2"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=tmp_path,
        )
        os.close(slave)
        output = read_until_exit(proc, master, timeout=60).decode(errors="replace")
    finally:
        os.close(master)
    assert proc.returncode == 0, output[-2000:]
    assert "Summary of day 2" in output  # the conversation is printed ...
    assert not marker.exists()  # ... and not paged
