"""A batch's life across processes and users (issue 9, items 2-5 and the mutation review):
who may resume, live vs dead batches, the lease and its fencing, oversized records, and
resume making exactly the calls still missing.

In-process through the library (start_batch / resume_batch) against the real store and a
local LLM server (tests/servers.py); everything is counted at the server or in the store.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from simulator.cli import app
from simulator.errors import LeaseLost, PermissionDenied, RecordTooLarge
from simulator.experiment import Experiment, experiment_from_dict, load_experiment
from simulator.grid import make_grid
from simulator.runner import (
    BatchReport,
    ProgressEvent,
    RunOptions,
    _prepare,
    resume_batch,
    start_batch,
)
from simulator.status import BatchStatus, ConversationStatus
from simulator.store import Store
from tests.servers import FakeLLMServer, echo_reply, write_experiment

BIG = "x" * 17 * 2**20  # 17 MB: over MongoDB's 16 MB limit for one document (one word: the
# quality flags, which scan every word of a message, take seconds over 3.5 million of them)


def experiment(store: Store, tmp_path: Path, llm: str) -> Experiment:
    exp = load_experiment(write_experiment(tmp_path / "exp.yaml", llm, "lifecycle"))
    return store.insert_experiment(exp)


def openai_llm(server: FakeLLMServer, **extra: Any) -> str:
    more = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"{{model: m1, provider: openai, base_url: '{server.openai_url}'{more}}}"


def grid(exp: Experiment, *, messages: int = 4, days: int = 2, repetitions: int = 3, **kw: Any):
    return make_grid(
        exp,
        llms=None,
        messages=messages,
        days=days,
        agents=kw.pop("agents", None),
        speakers=kw.pop("speakers", ["round_robin"]),
        repetitions=repetitions,
        seed=kw.pop("seed", 3),
    )


def options(**kw: Any) -> RunOptions:
    return RunOptions(concurrency=kw.pop("concurrency", 1), **kw)


def rows(db, batch_id: str) -> int:
    """Everything a run writes for a batch's conversations."""
    return sum(
        db[c].count_documents({"batch_id": batch_id})
        for c in ("messages", "summaries", "selector_calls")
    )


def in_thread(fn: Callable[[], BatchReport]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["report"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def stop_after(messages: int, opts: RunOptions) -> Callable[[ProgressEvent], None]:
    seen = [0]

    def on_progress(event: ProgressEvent) -> None:
        if event.kind == "message":
            seen[0] += 1
            if seen[0] >= messages:
                opts.stop.set()

    return on_progress


# --- item 2: only the creator resumes -----------------------------------------------------


def test_only_the_batch_creator_can_resume_it(db, tmp_path, env):
    alice = Store.open(db, "alice")
    with FakeLLMServer(models={"m1"}) as server:
        exp = experiment(alice, tmp_path, openai_llm(server))
        opts = options()
        opts.on_progress = stop_after(3, opts)
        report = start_batch(alice, exp, grid(exp), opts)
        assert report.status == "interrupted"
        before, calls = rows(db, report.batch_id), server.calls

        bob = Store.open(db, "bob")
        with pytest.raises(PermissionDenied) as caught:
            resume_batch(bob, report.batch_id, options())
        message = str(caught.value)
        assert "belongs to alice" in message and "you are bob" in message
        assert "simulator experiment duplicate" in message and "simulator run" in message
        assert server.calls == calls and rows(db, report.batch_id) == before  # nothing ran
        assert alice.get_batch(report.batch_id).status == "interrupted"

        result = CliRunner().invoke(app, ["resume", report.batch_id, "--plain"], env=env("bob"))
        assert result.exit_code == 1 and "only alice can resume it" in result.output
        assert "Traceback" not in result.output
        assert server.calls == calls

        assert resume_batch(alice, report.batch_id, options()).status == "completed"


@pytest.fixture
def env(settings, env_for) -> Callable[[str], dict[str, str]]:
    """env(user): the CLI's environment for this test's database, as `user`."""
    return lambda user: {**env_for(settings), "SIMULATOR_USER": user}


# --- item 3: live or dead, finished but unmarked, real running time -----------------------


def test_a_batch_killed_after_its_last_conversation_is_marked_completed_by_resume(
    db, tmp_path, env
):
    store = Store.open(db, "alice")
    with FakeLLMServer(models={"m1"}) as server:
        exp = experiment(store, tmp_path, openai_llm(server))
        report = start_batch(store, exp, grid(exp, repetitions=2), options())
        assert report.status == "completed"
        # As after a kill between the last conversation and the batch's status: still
        # `running`, its runner (a process that no longer exists) in the lease.
        dead = _dead_pid()
        db.batches.update_one(
            {"_id": report.batch_id},
            {
                "$set": {
                    "status": "running",
                    "runner": {
                        "host": socket.gethostname(),
                        "pid": dead,
                        "token": "t",
                        "heartbeat": store.server_time(),
                    },
                },
            },
        )
        batch = store.get_batch(report.batch_id)
        assert batch.runner_alive is False and batch.stopped_unexpectedly
        assert batch.shown_status == BatchStatus.INTERRUPTED
        calls, before = server.calls, rows(db, report.batch_id)

        result = CliRunner().invoke(app, ["resume", report.batch_id, "--plain"], env=env("alice"))
        assert result.exit_code == 0, result.output
        assert "now marked completed" in result.output
        assert server.calls == calls and rows(db, report.batch_id) == before  # nothing re-run
        batch = store.get_batch(report.batch_id)
        assert batch.status == "completed" and batch.runner_alive is None
        assert batch.shown_status == "completed"
        # a second resume says it is finished
        again = CliRunner().invoke(app, ["resume", report.batch_id], env=env("alice"))
        assert again.exit_code == 1 and "already finished" in again.output


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_liveness_follows_the_lease_in_the_servers_time(db, tmp_path):
    store = Store.open(db, "alice")
    # A short lease (1 s, a heartbeat every third of it) over a run of ~2.6 s of calls: long
    # enough for several heartbeats, and a loaded machine's stalls stay under the lease.
    with FakeLLMServer(models={"m1"}, latency=0.1) as server:
        exp = experiment(store, tmp_path, openai_llm(server))
        g = grid(exp, messages=12, days=1, repetitions=2)
        opts = options(lease_seconds=1.0)
        thread, out = in_thread(lambda: start_batch(store, exp, g, opts))
        wait_for(lambda: db.batches.count_documents({}) == 1, "the batch")
        batch_id = db.batches.find_one()["_id"]
        wait_for(lambda: db.messages.count_documents({}) >= 1, "a message")
        beats = set()
        elapsed_during_run = 0.0
        while thread.is_alive():
            batch = store.get_batch(batch_id)
            if batch.status == "running":
                # held and fresh for the whole run, though the lease lasts only 1 s: the
                # heartbeat is refreshed (and adds the running time as it goes)
                assert batch.runner_alive is True and batch.shown_status == "running"
                assert batch.holder is not None and batch.holder.pid == os.getpid()
                beats.add(batch.holder.heartbeat)
                elapsed_during_run = max(elapsed_during_run, batch.elapsed)
            time.sleep(0.05)
        thread.join()
        report = out["report"]
    assert report.status == "completed"
    assert len(beats) >= 3, beats
    assert elapsed_during_run > 0.2  # a batch killed now would show how long it ran
    batch = store.get_batch(batch_id)
    assert batch.runner_alive is None and batch.holder is None  # released
    assert abs(batch.elapsed - report.elapsed) < 0.3, (batch.elapsed, report.elapsed)

    # another host's runner: alive while its heartbeat (server time) is fresh
    def hold(age_ms: int) -> None:
        db.batches.update_one(
            {"_id": batch_id},
            [
                {
                    "$set": {
                        "status": "running",
                        "runner": {
                            "host": "lab-machine-2",
                            "pid": 4242,
                            "token": "x",
                            "seconds": 30,
                            "heartbeat": {"$subtract": ["$$NOW", age_ms]},
                        },
                    }
                }
            ],
        )

    hold(5_000)
    assert store.get_batch(batch_id).runner_alive is True
    assert store.batch_liveness(batch_id) is True
    hold(60_000)
    batch = store.get_batch(batch_id)
    assert batch.runner_alive is False and batch.shown_status == "interrupted"


# --- item 4: fencing ------------------------------------------------------------------------


def test_a_runner_whose_lease_was_taken_over_stops_writing_at_once(db, tmp_path):
    store = Store.open(db, "alice")
    # Calls last 0.6 s; the heartbeat runs every 0.1 s: the takeover is noticed long before
    # the call in flight ends, so nothing more may be written after it. (A lease of 0.3 s,
    # not less: a worker not heard from for its lease stops writing by itself, and a loaded
    # machine can delay a heartbeat by more than 0.15 s.)
    with FakeLLMServer(models={"m1"}, latency=0.6) as server:
        exp = experiment(store, tmp_path, openai_llm(server))
        g = grid(exp, messages=6, days=1, repetitions=2)
        thread, out = in_thread(lambda: start_batch(store, exp, g, options(lease_seconds=0.3)))
        wait_for(lambda: db.messages.count_documents({}) >= 1, "a message", timeout=30)
        batch_id = db.batches.find_one()["_id"]
        # Another process takes the batch over (as if this one had been silent too long).
        taken = db.batches.update_one(
            {"_id": batch_id},
            {
                "$set": {
                    "runner": {
                        "host": "lab-machine-2",
                        "pid": 4242,
                        "token": "thief",
                        "seconds": 30,
                        "heartbeat": store.server_time(),
                    }
                },
            },
        )
        assert taken.modified_count == 1
        at_takeover = rows(db, batch_id)
        statuses = {c["_id"]: c["status"] for c in db.conversations.find({}, {"status": 1})}
        thread.join(30)
        assert not thread.is_alive()
    error = out.get("error")
    assert isinstance(error, LeaseLost), out
    assert "taken over by process 4242 on lab-machine-2" in str(error)
    assert rows(db, batch_id) == at_takeover  # not one write after the takeover
    # neither the conversations nor the batch were touched on the way out
    assert {c["_id"]: c["status"] for c in db.conversations.find({}, {"status": 1})} == statuses
    doc = db.batches.find_one({"_id": batch_id})
    assert doc["status"] == "running" and doc["runner"]["token"] == "thief"


def test_abandoned_threads_never_write_over_a_conversation_another_run_completed(db, tmp_path):
    store = Store.open(db, "alice")
    release = threading.Event()
    first = threading.Event()
    lock = threading.Lock()
    seen = [0]

    def reply(body: dict[str, Any]) -> str:
        with lock:
            seen[0] += 1
            n = seen[0]
        if n == 2:  # the first run's second call never ends in time
            first.set()
            release.wait(20)
        return echo_reply(body)

    with FakeLLMServer(models={"m1"}, reply=reply) as server:
        exp = experiment(store, tmp_path, openai_llm(server))
        g = grid(exp, messages=4, days=1, repetitions=1)
        opts = options(grace=0.1)
        thread, out = in_thread(lambda: start_batch(store, exp, g, opts))
        assert first.wait(20)
        opts.stop.set()  # Ctrl-C: the call in flight gets 0.1 s, then is abandoned
        thread.join(20)
        report = out["report"]
        assert report.status == "interrupted" and report.abandoned == 1
        (conv,) = store.list_conversations(batch_id=report.batch_id)
        assert conv.status == "interrupted"

        # Another run (here: a resume) completes the conversation meanwhile.
        again = resume_batch(store, report.batch_id, options())
        assert again.status == "completed"
        written = rows(db, report.batch_id)
        completed = db.conversations.find_one({"_id": conv.id})

        release.set()  # the abandoned call returns now
        wait_for(
            lambda: not any(t.name.startswith("conversation-") for t in threading.enumerate()),
            "the abandoned thread",
        )
    assert rows(db, report.batch_id) == written  # it wrote nothing
    assert db.conversations.find_one({"_id": conv.id}) == completed  # no late `interrupted`


# --- item 5: a record over 16 MB ---------------------------------------------------------


@pytest.mark.parametrize("which", ["message", "summary"])
def test_a_record_over_16_mb_fails_its_conversation_with_the_cause(db, tmp_path, which):
    # The summary case also checks that a conversation's last write is flushed (and its
    # failure seen) before the conversation is marked completed.
    store = Store.open(db, "alice")
    lock = threading.Lock()
    sent = [False]

    def reply(body: dict[str, Any]) -> str:
        is_summary = "summarize day" in str(body["messages"][-1].get("content", "")).lower()
        if is_summary == (which == "summary"):
            with lock:
                if not sent[0]:
                    sent[0] = True
                    return BIG
        return echo_reply(body)

    with FakeLLMServer(models={"m1"}, reply=reply) as server:
        exp = experiment(store, tmp_path, openai_llm(server))
        report = start_batch(store, exp, grid(exp, messages=2, days=1, repetitions=2), options())
    assert report.status == "completed_with_failures"
    batch = store.get_batch(report.batch_id)
    assert batch.status == "completed_with_failures"
    records = store.list_conversations(batch_id=report.batch_id)
    failed = [r for r in records if r.status == ConversationStatus.FAILED]
    assert len(failed) == 1 and len(records) == 2
    (bad,) = failed
    error = bad.error or ""
    assert f"Conversation {bad.id} failed" in error and "16 MB" in error, error
    assert ("summary of day 1" if which == "summary" else "message 1 of day 1") in error
    assert "database" not in error.lower()
    stored = store.load_transcript(bad.id)
    assert stored.summaries == [] if which == "summary" else stored.messages == []


def test_prompts_too_large_to_store_stop_the_batch_with_the_cause(db, tmp_path):
    store = Store.open(db, "alice")
    path = Path(write_experiment(tmp_path / "big.yaml", "{model: scripted, provider: scripted}"))
    # a 6 MB shared section: fine in the experiment, but each conversation stores the
    # composed prompt of each of its three agents (added after reading the YAML, which
    # PyYAML takes ~15 s to parse with the section in it)
    data = yaml.safe_load(path.read_text())
    data["shared_sections"] = {"environment": "walls " * (6 * 2**20 // 6)}
    exp = store.insert_experiment(experiment_from_dict(data, str(path)))
    g = grid(exp, messages=2, days=1, repetitions=1, agents="guard=1,prisoner=2")
    with pytest.raises(RecordTooLarge, match="16 MB") as caught:
        start_batch(store, exp, g, options())
    assert "Shorten the experiment's sections" in str(caught.value)
    (batch,) = store.list_batches()
    assert batch.status == "stopped" and "16 MB" in (batch.error or "")
    assert db.batches.find_one({"_id": batch.id}).get("runner") is None


# --- the mutation review --------------------------------------------------------------------


def test_resume_makes_exactly_the_calls_still_missing(db, tmp_path):
    store = Store.open(db, "alice")
    with FakeLLMServer(models={"m1"}) as server:
        exp = experiment(store, tmp_path, openai_llm(server))
        g = grid(exp, messages=6, days=2, repetitions=3, agents="guard=1,prisoner=2",
                 speakers=["round_robin", "random"])  # fmt: skip
        reference = start_batch(store, exp, g, options())
        assert reference.status == "completed"
        full = server.calls
        server.reset()

        for stop_at in (2, 9, 17):  # interrupted three times, then finished
            opts = options()
            opts.on_progress = stop_after(stop_at, opts)
            if stop_at == 2:
                report = start_batch(store, exp, g, opts)
            else:
                report = resume_batch(store, report.batch_id, opts)
            assert report.status == "interrupted"
        done = resume_batch(store, report.batch_id, options())
        assert done.status == "completed"
        # one conversation at a time, stopped right after a stored message: not one call
        # is made twice
        assert server.calls == full
    ref = {r.index: store.load_transcript(r.id) for r in store.list_conversations(batch_id=reference.batch_id)}  # fmt: skip
    got = {r.index: store.load_transcript(r.id) for r in store.list_conversations(batch_id=report.batch_id)}  # fmt: skip
    strip = lambda t: ([(m.day, m.turn, m.speaker, m.content) for m in t.messages],  # noqa: E731
                       [(s.day, s.content) for s in t.summaries])  # fmt: skip
    assert {i: strip(t) for i, t in got.items()} == {i: strip(t) for i, t in ref.items()}


def test_a_different_record_in_a_stored_turn_is_never_swallowed(db):
    from simulator.conversation import Message

    store = Store.open(db, "alice")
    store.insert_message("c1", Message(1, 1, "Guard_001", "guard", "Hello."), "b1")
    store.insert_message("c1", Message(1, 1, "Guard_001", "guard", "Hello."), "b1")  # a retry
    with pytest.raises(LeaseLost, match="already has a different message 1 of day 1"):
        store.insert_message("c1", Message(1, 1, "Guard_001", "guard", "Something else."), "b1")
    assert [m.content for m in store.load_transcript("c1").messages] == ["Hello."]


def test_more_than_a_page_of_unfinished_conversations_are_all_run(db, tmp_path):
    store = Store.open(db, "alice")
    path = write_experiment(tmp_path / "s.yaml", "{model: scripted, provider: scripted}")
    exp = store.insert_experiment(load_experiment(path))
    g = grid(exp, messages=2, days=1, repetitions=230)
    batch = store.create_batch(exp, g)
    _prepare(store, batch, exp)
    unfinished = list(store.unfinished_conversations(batch.id))
    assert [r.index for r in unfinished] == list(range(230))
    assert store.count_unfinished(batch.id) == 230


def test_the_stored_summarizer_prompt_is_the_one_used_on_resume(db, tmp_path):
    store = Store.open(db, "alice")
    with FakeLLMServer(models={"m1"}) as server:
        exp = experiment(store, tmp_path, openai_llm(server))
        opts = options()
        opts.on_progress = stop_after(1, opts)
        report = start_batch(store, exp, grid(exp, messages=2, days=1, repetitions=1), opts)
        (conv,) = store.list_conversations(batch_id=report.batch_id)
        # the prompt this conversation was started with (e.g. before the composition rules
        # changed): resume must keep it
        db.conversations.update_one(
            {"_id": conv.id}, {"$set": {"summarizer_prompt": "You summarize, as stored."}}
        )
        server.reset()
        assert resume_batch(store, report.batch_id, options()).status == "completed"
        systems = [b["messages"][0].get("content") for b in server.bodies()]
    assert "You summarize, as stored." in systems


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_agent_requests_carry_the_other_speakers_labels_as_stop_sequences(db, tmp_path, provider):
    store = Store.open(db, "alice")
    with FakeLLMServer(models={"m1", "m1:latest"}) as server:
        url = server.openai_url if provider == "openai" else server.url
        exp = experiment(store, tmp_path, f"{{model: m1, provider: {provider}, base_url: '{url}'}}")
        report = start_batch(store, exp, grid(exp, messages=2, days=1, repetitions=1), options())
        assert report.status == "completed"
        (conv,) = store.list_conversations(batch_id=report.batch_id, prompts=True)
        names = {a.name: a for a in conv.agents}
        agent_bodies = [b for b in server.bodies() if len(b["messages"]) >= 2
                        and any(b["messages"][0].get("content") == a.system_prompt for a in conv.agents)]  # fmt: skip
    assert len(agent_bodies) == 2
    for body in agent_bodies:
        stop = body["stop"] if provider == "openai" else body["options"]["stop"]
        speaker = next(
            a for a in conv.agents if a.system_prompt == body["messages"][0].get("content")
        )
        others = [f"\n{n}:" for n in names if n != speaker.name]
        assert "\nResearcher:" in stop and all(o in stop for o in others), stop
        assert f"\n{speaker.name}:" not in stop


def test_a_conversation_is_finished_only_by_the_run_that_runs_it(db):
    from simulator.store import Lease

    store = Store.open(db, "alice")
    db.conversations.insert_one({"_id": "c1", "batch_id": "b1", "status": "pending"})
    a = Lease("b1", "token-a", "host-a", 1)
    b = Lease("b1", "token-b", "host-b", 2)
    assert store.mark_running("c1", a)
    assert store.mark_running("c1", b)  # a took too long: b continues the conversation
    assert store.finish_conversation("c1", "completed", None, lease=b)
    # a's late writes change nothing
    assert not store.finish_conversation("c1", "interrupted", None, lease=a)
    assert not store.finish_conversation("c1", "failed", None, "late", lease=a)
    assert store.mark_interrupted("b1", a) == 0
    assert not store.mark_running("c1", a)  # completed: nothing left to run
    doc = db.conversations.find_one({"_id": "c1"})
    assert doc["status"] == "completed" and doc["lease"] == "token-b" and doc["error"] is None


def test_a_killed_batch_shows_how_long_it_ran_and_that_it_stopped(settings, env_for, db, tmp_path):
    import signal

    from tests.test_kill_resume import Cli

    path = write_experiment(
        tmp_path / "slow.yaml", "{model: scripted, provider: scripted, latency: 0.1}"
    )
    cli = Cli(tmp_path, env_for(settings))
    proc = cli.start("run", path, "--messages", "40", "--days", "1", "--plain")
    try:
        wait_for(lambda: db.messages.count_documents({}) >= 1, "a message", timeout=30)
        started = time.monotonic()
        batch_id = db.batches.find_one()["_id"]
        store = Store.open(db, "alice")
        assert store.get_batch(batch_id).shown_status == "running"
        wait_for(lambda: time.monotonic() - started > 2.5, "2.5 s of running")
    finally:
        proc.kill()
        proc.wait()
        Cli.output(proc)
    assert proc.returncode == -signal.SIGKILL
    batch = store.get_batch(batch_id)
    assert batch.status == "running"  # as stored: nobody could write anything else
    assert batch.runner_alive is False and batch.stopped_unexpectedly
    assert batch.shown_status == "interrupted"
    assert batch.elapsed >= 1.5, batch.elapsed  # not "ran 0.0 s"
