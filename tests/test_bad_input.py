"""Bad input through the real CLI: a short message with the fix, exit code 1, no traceback,
nothing written."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from servers import FakeLLMServer
from typer.testing import CliRunner

from simulator.cli import app
from simulator.store import Store
from tests.scenarios import PRISON_ONE

PRISON = Path(__file__).resolve().parent.parent / "experiments" / "prison.yaml"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def invoke(env: dict, *args: str):
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.output


def variant(tmp_path: Path, old: str, new: str) -> Path:
    text = PRISON.read_text()
    assert old in text
    path = tmp_path / "broken.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("starting_message: Start the experiment", "starting_message: [Start", "line 20"),
        ("note: Guards", "notes: Guards", "did you mean `note`"),
        ("<GUARD_VERB_BE> <GUARD_NUM>", "<GUARD_VERB_BE> <GUARD_NUMBER>", "<GUARD_NUM>"),
        ("  prisoner:\n", "  prison inmate:\n", "rename it, e.g. to `prisoninmate`"),
        ("provider: ollama", "provider: olama", "ollama, openai"),
    ],
    ids=["yaml-syntax", "unknown-key", "unknown-placeholder", "role-with-space", "provider"],
)
def test_broken_experiment_files(tmp_path, settings, env_for, db, old, new, expected):
    path = variant(tmp_path, old, new)
    output = invoke(env_for(settings), "run", str(path), "--llm", "scripted")
    assert "broken.yaml" in output and expected in output
    assert Store(db, "alice").list_experiments() == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["--messages", "1"], "at least 2"), (["--messages", "6", "--days", "4"], "more than half")],
)
def test_bad_counts(settings, env_for, db, args, expected):
    output = invoke(env_for(settings), "run", str(PRISON), "--llm", "scripted", *args)
    assert expected in output
    assert Store(db, "alice").list_batches() == []


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--concurrency", "0"], "--concurrency must be at least 1 (got 0)"),
        (["--max-failures", "150%"], "a fraction cannot exceed 1"),
        (["--max-failures", "-1"], "cannot be negative"),
        (["--max-failures", "many"], "give a count"),
        (["--max-tokens", "-5"], "--max-tokens must be at least 1 (got -5)"),
        (["--max-cost", "-1"], "--max-cost must be a positive amount"),
    ],
)
def test_bad_run_options_are_refused_before_the_grid_dry_run_or_not(
    settings, env_for, db, args, expected, dry_run
):
    """A dry run checks every option the run would (it said all was well, then the run
    refused); both refuse before showing the grid, and store nothing."""
    grid = ["--llm", "scripted", "--messages", "2", "--days", "1"]
    dry = ["--dry-run"] if dry_run else []
    output = invoke(env_for(settings), "run", str(PRISON), *grid, *args, *dry)
    assert expected in output and "Grid" not in output, output
    assert Store(db, "alice").list_batches() == []


def test_one_of_a_kind_is_said_in_the_singular(settings, env_for, db):
    """1 conversation, 1 day, 1 summary; 2 prisoners (inflected, not "2 prisoner")."""
    grid = ["--llm", "scripted", "--messages", "2", "--days", "1", "--agents", "guard=1,prisoner=2"]
    result = CliRunner().invoke(
        app, ["run", str(PRISON_ONE), *grid, "--plain"], env=env_for(settings)
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "1 conversation, at least 3 LLM calls." in out and ": 1 conversation to run" in out
    assert " · 1 day · 1 guard, 2 prisoners · " in out and "2 messages, 1 summary" in out
    assert "completed — 1 completed of 1 conversation\n" in out


def test_ollama_not_running(settings, env_for, db, monkeypatch):
    env = {**env_for(settings), "OLLAMA_HOST": f"http://127.0.0.1:{closed_port()}"}
    output = invoke(env, "run", str(PRISON), "--llm", "llama3", "--messages", "4", "--days", "1")
    assert "Ollama" in output and "ollama serve" in output
    assert Store(db, "alice").list_batches() == []  # refused before the batch was created


def test_ollama_model_that_does_not_exist(settings, env_for, db):
    with FakeLLMServer(models=["other:latest"], unpullable={"llama3:latest"}) as server:
        env = {**env_for(settings), "OLLAMA_HOST": server.url}
        output = invoke(
            env, "run", str(PRISON), "--llm", "llama3", "--messages", "4", "--days", "1"
        )
    assert "llama3" in output and "pull" in output
    assert Store(db, "alice").list_batches() == []


def test_unreachable_mongodb_uri_shows_host_not_password(tmp_path):
    port = closed_port()
    env = {
        "MONGODB_URI": f"mongodb://bob:s3cret-pw@127.0.0.1:{port}/",
        "SIMULATOR_DB_TIMEOUT_MS": "300",
    }
    output = invoke(env, "experiment", "list")
    assert f"127.0.0.1:{port}" in output and "MONGODB_URI" in output
    assert "s3cret-pw" not in output


def test_resuming_with_nothing_to_resume(settings, env_for):
    output = invoke(env_for(settings), "resume")
    assert "simulator run" in output
