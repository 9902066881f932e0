"""Batches against faulty LLM servers (issue 4): retries, failures, --max-failures, preflight.

In-process through the CLI (CliRunner) against FakeLLMServer; checked through the store.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from simulator.cli import app
from simulator.display import ProgressView, report_text
from simulator.errors import UserError
from simulator.runner import BatchReport, ProgressEvent, failure_threshold
from simulator.store import BatchTotals, Store
from tests.servers import FakeLLMServer, write_experiment


def experiment_file(tmp_path: Path, llm: str, name: str = "exp.yaml") -> str:
    """A two-role experiment whose only LLM is `llm` (a YAML flow mapping)."""
    return write_experiment(tmp_path / name, llm, "faults")


@pytest.fixture
def cli(settings, env_for):
    runner = CliRunner()

    def invoke(*args: str, user: str = "alice", env: dict[str, str] | None = None):
        full_env = {**env_for(settings), "SIMULATOR_USER": user, **(env or {})}
        return runner.invoke(app, list(args), env=full_env)

    return invoke


def stored(db, store: Store, batch_id: str) -> dict[int, tuple]:
    """{index: (messages, summaries)} of a batch, as (day, turn, speaker, content) tuples."""
    out = {}
    for rec in store.list_conversations(batch_id=batch_id):
        t = store.load_transcript(rec.id)
        out[rec.index] = (
            [(m.day, m.turn, m.speaker, m.content) for m in t.messages],
            [(s.day, s.content) for s in t.summaries],
        )
    return out


def assert_complete(db, store: Store, batch_id: str, messages: int, days: int) -> None:
    """Every conversation complete: exactly its messages and summaries, no duplicates."""
    records = store.list_conversations(batch_id=batch_id)
    assert records and all(r.status == "completed" for r in records), [r.status for r in records]
    ids = [r.id for r in records]
    for rec in records:
        t = store.load_transcript(rec.id)
        assert len(t.messages) == messages
        assert [s.day for s in t.summaries] == list(range(1, days + 1))
    for coll, key in (("messages", ["day", "turn"]), ("summaries", ["day"])):
        group = {"conversation_id": "$conversation_id", **{k: f"${k}" for k in key}}
        dupes = list(
            db[coll].aggregate(
                [
                    {"$match": {"conversation_id": {"$in": ids}}},
                    {"$group": {"_id": group, "n": {"$sum": 1}}},
                    {"$match": {"n": {"$gt": 1}}},
                ]
            )
        )
        assert dupes == []
    assert db.messages.count_documents({"conversation_id": {"$in": ids}}) == messages * len(ids)


def usage_sums(db, ids: list[str]) -> tuple[int, int]:
    """(successful calls, retries) recorded on the stored messages, summaries, selector calls."""
    calls = retries = 0
    for coll in ("messages", "summaries", "selector_calls"):
        for doc in db[coll].find({"conversation_id": {"$in": ids}}, {"usage": 1}):
            calls += doc["usage"]["calls"]
            retries += doc["usage"]["retries"]
    return calls, retries


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_flaky_server_batch_completes_and_counts_retries(cli, db, tmp_path, provider):
    # 20% of chat calls fail with 429/500/503; 429 and 503 carry Retry-After (honoured: the
    # base delay is tiny, so those retries wait the server's 10 ms).
    with FakeLLMServer(
        models={"m1", "m1:latest"}, fail_rate=0.2, retry_after=0.01, latency=0.002, seed=4
    ) as server:
        base_url = server.openai_url if provider == "openai" else server.url
        model = "m1" if provider == "openai" else "m1:latest"
        yaml = experiment_file(
            tmp_path, f"{{model: '{model}', provider: {provider}, base_url: '{base_url}'}}"
        )
        env = {"SIMULATOR_RETRY_BASE_DELAY": "0.001", "SIMULATOR_RETRY_ATTEMPTS": "12"}
        grid = "--messages 6 --days 2 --agents guard=1,prisoner=2 --speaker round_robin "
        grid += "--speaker auto --repetitions 3 --concurrency 4 --plain"
        result = cli("run", yaml, *grid.split(), env=env)
        assert result.exit_code == 0, result.output
        store = Store.open(db, "alice")
        (batch,) = store.list_batches()
        assert batch.status == "completed"
        assert_complete(db, store, batch.id, messages=6, days=2)
        ids = [r.id for r in store.list_conversations(batch_id=batch.id)]
        calls, retries = usage_sums(db, ids)
        # Every request the server saw is a stored call or a counted retry: nothing lost,
        # nothing counted twice.
        assert retries > 0
        assert server.calls == calls + retries
        assert server.peak_in_flight <= 4
        assert store.batch_totals(batch.id).retries == retries
        assert f"{retries} retries" in result.output


def test_server_down_for_a_stretch_fails_conversations_then_resume_completes(cli, db, tmp_path):
    # Policy: a call keeps failing through its retries -> its conversation is `failed`
    # (error stored), the batch goes on; `resume` continues the failed ones later.
    with FakeLLMServer(models={"m1"}, latency=0.003) as server:
        yaml = experiment_file(
            tmp_path, f"{{model: m1, provider: openai, base_url: '{server.openai_url}'}}"
        )
        grid = ["--messages", "4", "--days", "1", "--repetitions", "8", "--seed", "2", "--plain"]
        env = {"SIMULATOR_RETRY_BASE_DELAY": "0.01", "SIMULATOR_RETRY_ATTEMPTS": "3"}
        reference = cli("run", yaml, *grid, user="bob", env=env)
        assert reference.exit_code == 0, reference.output
        bob = Store.open(db, "bob")
        expected = stored(db, bob, bob.list_batches()[0].id)

        alice = Store.open(db, "alice")
        server.reset()

        def outage() -> None:
            # Down once the batch is under way, up again after two conversations failed.
            while server.calls < 6:
                time.sleep(0.002)
            server.down = True
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if db.conversations.count_documents({"status": "failed"}) >= 2:
                    break
                time.sleep(0.005)
            server.down = False

        thread = threading.Thread(target=outage)
        thread.start()
        result = cli("run", yaml, *grid, "--concurrency", "2", "--max-failures", "1.0", env=env)
        thread.join()
        assert result.exit_code == 1, result.output
        (batch,) = [b for b in alice.list_batches() if b.creator == "alice"]
        assert batch.status == "completed_with_failures"
        records = alice.list_conversations(batch_id=batch.id)
        failed = [r for r in records if r.status == "failed"]
        assert failed and len(failed) < len(records)
        assert all("Cannot reach" in (r.error or "") for r in failed)
        assert f"simulator resume {batch.id}" in result.output
        assert "failed (" in result.output  # the failures and their reason in the summary

        resumed = cli("resume", batch.id, "--plain", env=env)
        assert resumed.exit_code == 0, resumed.output
        assert alice.get_batch(batch.id).status == "completed"
        assert_complete(db, alice, batch.id, messages=4, days=1)
        assert stored(db, alice, batch.id) == expected


@pytest.mark.parametrize("max_failures", ["2", "0.2", "20%"])
def test_max_failures_stops_the_batch_with_a_clear_report(cli, db, tmp_path, max_failures):
    with FakeLLMServer(models={"m1"}, fail_rate=1.0, fail_statuses=(500,)) as server:
        yaml = experiment_file(
            tmp_path, f"{{model: m1, provider: openai, base_url: '{server.openai_url}'}}"
        )
        env = {"SIMULATOR_RETRY_BASE_DELAY": "0", "SIMULATOR_RETRY_ATTEMPTS": "2"}
        grid = [
            "--messages",
            "4",
            "--days",
            "1",
            "--repetitions",
            "10",
            "--concurrency",
            "1",
            "--plain",
        ]
        result = cli("run", yaml, *grid, "--max-failures", max_failures, env=env)
        assert result.exit_code == 1
        assert "Traceback" not in result.output
        store = Store.open(db, "alice")
        (batch,) = store.list_batches()
        assert batch.status == "stopped"
        # one conversation at a time: the third failure passes the limit of 2 and stops it
        assert store.batch_counts(batch.id) == {"failed": 3, "pending": 7}
        assert (
            "Stopped: 3 conversations failed, more than --max-failures allows (2)" in result.output
        )
        assert "answered 500" in result.output
        assert "Stopping: 3 conversations failed" in result.output  # said when it happens
        assert f"simulator resume {batch.id}" in result.output
        assert server.calls == 3 * 2  # three conversations, two attempts each, then nothing
        assert store.batch_totals(batch.id).retries == 3  # retries of failed calls count

        status = cli("status", batch.id)
        assert status.exit_code == 0
        assert "stopped" in status.output and "3 failed" in status.output
        assert "answered 500" in status.output and "3 retries" in status.output


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_unreachable_endpoint_is_reported_before_anything_starts(cli, db, tmp_path, provider):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}" + ("/v1" if provider == "openai" else "")
    yaml = experiment_file(tmp_path, f"{{model: m1, provider: {provider}, base_url: '{url}'}}")
    started = time.monotonic()
    result = cli("run", yaml, "--messages", "4", "--days", "1", "--plain")
    assert result.exit_code == 1
    assert time.monotonic() - started < 10
    assert "Cannot reach" in result.output and str(port) in result.output
    assert "Traceback" not in result.output
    store = Store.open(db, "alice")
    assert store.list_batches() == []
    assert db.conversations.count_documents({}) == 0


def test_bad_max_failures_is_refused_before_anything_is_written(cli, db, tmp_path):
    yaml = experiment_file(tmp_path, "{model: scripted, provider: scripted}")
    result = cli("run", yaml, "--messages", "4", "--days", "1", "--max-failures", "many")
    assert result.exit_code == 1 and "--max-failures 'many'" in result.output
    assert Store.open(db, "alice").list_batches() == []


def progress_events() -> list[ProgressEvent]:
    return [
        ProgressEvent("started", "b1", total=3, remaining=2),
        ProgressEvent("conversation_started", "b1", "c1"),
        ProgressEvent("conversation_started", "b1", "c2"),
        ProgressEvent("retry", "b1", error="answered 429"),
        ProgressEvent("message", "b1", "c1", prompt_tokens=30, completion_tokens=7, retries=1),
        ProgressEvent("summary", "b1", "c1", prompt_tokens=50, completion_tokens=9),
        ProgressEvent("conversation_finished", "b1", "c1", status="completed"),
        ProgressEvent("conversation_finished", "b1", "c2", "failed", "answered 500 [twice]"),
        ProgressEvent("finished", "b1", status="completed_with_failures", total=3),
    ]


def test_plain_progress_is_one_line_per_event_with_running_totals():
    console = Console(file=io.StringIO(), width=300)
    with ProgressView(console, live=False) as view:
        for event in progress_events():
            view(event)
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines[0] == "batch b1: 2 conversations to run (1 already done)"
    assert lines[1].startswith(
        "[1/2] conversation c1 completed · messages 1 · tokens in 80 / out 16"
    )
    assert "failures 0 · retries 1 ·" in lines[1] and "msg/s · ETA" in lines[1]
    assert lines[2].startswith("[2/2] conversation c2 failed: answered 500 [twice] ·")
    assert "failures 1 · retries 1" in lines[2] and len(lines) == 3


def test_live_progress_renders_counts_and_prints_failures_above():
    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    with ProgressView(console) as view:  # a terminal: live
        assert view.live
        for event in progress_events():
            view(event)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "conversation c2 failed: answered 500 [twice]" in text
    assert "2/2" in text and "ETA" in text
    assert "0 running · messages 1 · tokens in 80 / out 16 · failures 1 · retries 1" in text


def test_report_groups_failures_by_reason():
    report = BatchReport(
        "b1",
        "stopped",
        10,
        counts={"failed": 5, "completed": 2, "pending": 3},
        failures=[(f"c{i}", "answered 500" if i < 4 else "timed out") for i in range(5)],
        elapsed=75.0,
        reason="5 conversations failed, more than --max-failures allows (4)",
    )
    totals = BatchTotals(messages=9, calls=12, prompt_tokens=100, completion_tokens=20, retries=7)
    text = report_text(report, totals)
    assert "Batch b1: stopped — 2 completed, 5 failed, 3 pending of 10 conversations" in text
    assert "100 tokens in / 20 out, 7 retries; this run took 1 min 15 s" in text
    assert "Stopped: 5 conversations failed" in text
    assert "  4 failed (c0, c1, c2, ...): answered 500" in text
    assert "  1 failed (c4): timed out" in text


@pytest.mark.parametrize(
    ("value", "total", "expected"),
    [
        (None, 100, 10),  # default: 10% of the batch
        (None, 3, 1),  # ... at least one
        ("0", 50, 0),  # the first failure stops the batch
        ("5", 50, 5),
        ("0.2", 50, 10),
        ("0.25", 7, 2),
        ("20%", 50, 10),
        ("1.0", 50, 50),  # never stops
        ("100%", 50, 50),
        (" 3 ", 50, 3),
    ],
)
def test_failure_threshold(value, total, expected):
    assert failure_threshold(value, total) == expected


@pytest.mark.parametrize("value", ["-1", "2.5", "150%", "lots", "nan", ""])
def test_failure_threshold_refuses_nonsense(value):
    if value == "":
        assert failure_threshold(value, 10) == 1  # empty means the default
        return
    with pytest.raises(UserError, match="--max-failures"):
        failure_threshold(value, 10)
