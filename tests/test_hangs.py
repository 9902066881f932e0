"""Calls that would hang a batch (issue 9, items 7-8) and what a request carries (stop
sequences). In-process through the CLI against FakeLLMServer; counted at the server."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from simulator.cli import app
from simulator.display import ProgressView
from simulator.runner import ProgressEvent
from simulator.store import Store
from tests.servers import FakeLLMServer, write_experiment

ONE = ["--messages", "2", "--days", "1", "--agents", "guard=1,prisoner=1", "--plain"]


@pytest.fixture
def cli(settings, env_for):
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None):
        return runner.invoke(app, list(args), env={**env_for(settings), **(env or {})})

    return invoke


def llm(server: FakeLLMServer, provider: str) -> str:
    if provider == "openai":
        return f"{{model: m1, provider: openai, base_url: '{server.openai_url}'}}"
    return f"{{model: m1, provider: ollama, base_url: '{server.url}'}}"


def failures(db) -> list[str]:
    return [r.error or "" for r in Store.open(db, "alice").list_conversations()]


@pytest.mark.timeout(30)  # before the fix the batch sleeps an hour: fail, do not hang
@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_retry_after_an_hour_fails_the_call_at_once(cli, db, tmp_path, provider):
    with FakeLLMServer(models={"m1", "m1:latest"}, retry_after=3600) as server:
        server.fail_next(429)
        path = write_experiment(tmp_path / "x.yaml", llm(server, provider))
        started = time.monotonic()
        result = cli("run", path, *ONE)
        elapsed = time.monotonic() - started
        assert server.calls == 1  # asked once, told to wait an hour: not asked again
    assert elapsed < 10, elapsed
    (error,) = failures(db)
    assert "asked to wait 3600 s" in error and "SIMULATOR_RETRY_MAX_DELAY (30 s)" in error
    assert "raise SIMULATOR_RETRY_MAX_DELAY" in error
    assert result.exit_code in (0, 1) and "Traceback" not in result.output


def test_retry_after_within_the_cap_is_waited_and_shown(cli, db, tmp_path):
    with FakeLLMServer(models={"m1"}, retry_after=1) as server:
        server.fail_next(429)
        path = write_experiment(tmp_path / "x.yaml", llm(server, "openai"))
        result = cli("run", path, *ONE, env={"SIMULATOR_RETRY_MAX_DELAY": "5"})
        assert result.exit_code == 0, result.output
        assert server.calls == 2 + 1 + 1  # two messages and a summary, one retry
    assert "retrying in 1 s (the OpenAI-compatible endpoint at" in result.output
    assert "answered 429" in result.output


@pytest.mark.timeout(30)
@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_server_that_never_answers_fails_after_attempts_times_timeout(cli, db, tmp_path, provider):
    env = {
        "SIMULATOR_REQUEST_TIMEOUT": "0.4",
        "SIMULATOR_RETRY_ATTEMPTS": "3",
        "SIMULATOR_RETRY_BASE_DELAY": "0",
    }
    with FakeLLMServer(models={"m1", "m1:latest"}) as server:
        server.hang = True
        path = write_experiment(tmp_path / "x.yaml", llm(server, provider))
        started = time.monotonic()
        result = cli("run", path, *ONE, env=env)
        elapsed = time.monotonic() - started
        assert server.calls == 3  # one call, three attempts, each cut at 0.4 s
    assert 3 * 0.4 <= elapsed < 10, elapsed
    (error,) = failures(db)
    assert "did not answer within 0.4 s" in error and "SIMULATOR_REQUEST_TIMEOUT" in error
    assert "Traceback" not in result.output


def test_live_display_shows_a_waiting_retry():
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    with ProgressView(console) as view:
        view(ProgressEvent("started", "b1", total=1, remaining=1))
        view(ProgressEvent("retry", "b1", error="answered 429 from X", delay=12))
        rendered = view._waiting_text()
    assert rendered.startswith(" · retrying in 1") and "(answered 429 from X)" in rendered


@pytest.mark.parametrize(("provider", "agents"), [("ollama", 3), ("openai", 3), ("openai", 6)])
def test_agent_calls_carry_the_other_speakers_labels_as_stop(cli, db, tmp_path, provider, agents):
    with FakeLLMServer(models={"m1", "m1:latest"}) as server:
        path = write_experiment(tmp_path / "x.yaml", llm(server, provider))
        counts = f"guard=1,prisoner={agents - 1}"
        grid = ["--messages", "6", "--days", "1", "--agents", counts, "--speaker", "round_robin"]
        result = cli("run", path, *grid, "--plain")
        assert result.exit_code == 0, result.output
        bodies = server.bodies()
    store = Store.open(db, "alice")
    (rec,) = store.list_conversations()
    names = [a.name for a in rec.agents]
    speakers = [m.speaker for m in store.load_transcript(rec.id).messages]
    stops = [b.get("stop") if provider == "openai" else b["options"].get("stop") for b in bodies]
    agent_stops = stops[: len(speakers)]  # the agent calls, then the summary (no stop)
    assert stops[len(speakers) :] == [None]
    for speaker, stop in zip(speakers, agent_stops):
        others = ["\nResearcher:"] + [f"\n{n}:" for n in names if n != speaker]
        if provider == "openai":
            assert stop == others[:4]  # OpenAI refuses more than four
        else:
            assert stop == others
