"""Issue 13, item 1 (many workers, one batch) and item 3's budget: real `simulator run` /
`simulator work` processes sharing one SecantusDB and one local LLM server that counts
every call; conversations are claimed one at a time, a dead worker's conversation is
continued by another, a worker whose claim was taken over writes nothing more, and
`--max-tokens` stops scheduling."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from simulator.cli import app
from simulator.experiment import experiment_from_yaml
from simulator.grid import make_grid
from simulator.llm.retry import RetryPolicy
from simulator.runner import RunOptions, start_batch
from simulator.store import Store
from tests.scenarios import PRISON_ONE
from tests.servers import FakeLLMServer, write_experiment
from tests.test_kill_resume import (
    GRID,
    Cli,
    check_batch,
    deterministic_reply,
    transcripts,
    wait_until,
)


def llm_yaml(tmp_path, server: FakeLLMServer) -> str:
    return write_experiment(
        tmp_path / "workers.yaml",
        f"{{model: m1, provider: ollama, base_url: '{server.url}'}}",
        "workers",
    )


def reference(env: dict[str, str], yaml: str, db, server: FakeLLMServer) -> tuple[Any, int]:
    """The grid run uninterrupted by one process (as bob): its transcripts and LLM calls."""
    calls = server.calls
    result = CliRunner().invoke(
        app, ["run", yaml, *GRID, "--plain"], env={**env, "SIMULATOR_USER": "bob"}
    )
    assert result.exit_code == 0, result.output
    bob = Store(db, "bob")
    (batch,) = bob.list_batches(creator="bob")
    return transcripts(bob, batch.id), server.calls - calls


def claimed_by(db, batch_id: str, pid: int, status: str = "running") -> list[str]:
    return [
        d["_id"]
        for d in db.conversations.find({"batch_id": batch_id, "status": status, "claim.pid": pid})
    ]


def messages_of(db, conv_ids: list[str]) -> int:
    return db.messages.count_documents({"conversation_id": {"$in": conv_ids}})


def test_three_workers_share_a_batch_and_a_killed_ones_conversation_is_continued(
    settings, env_for, db, tmp_path
):
    server = FakeLLMServer(models={"m1:latest"}, reply=deterministic_reply)
    with server:
        yaml = llm_yaml(tmp_path, server)
        env = env_for(settings)
        # the replies do not depend on the latency: the reference is run without it
        expected, reference_calls = reference(env, yaml, db, server)
        # slow calls while the workers start and the victim is killed mid-conversation
        server.latency = 0.3
        cli = Cli(tmp_path, env)
        calls = server.calls
        first = cli.start("run", yaml, *GRID, "--concurrency", "1", "--plain")
        wait_until(
            lambda: db.batches.find_one({"creator": "alice", "prepared": True}) is not None,
            first,
            "the batch",
        )
        batch_id = db.batches.find_one({"creator": "alice"})["_id"]
        second, victim = (
            cli.start("work", batch_id, "--concurrency", "1", "--plain") for _ in "ab"
        )
        # the victim is killed in the middle of a conversation it runs
        wait_until(
            lambda: messages_of(db, claimed_by(db, batch_id, victim.pid)) >= 2,
            victim,
            "the third worker's messages",
        )
        victim.kill()
        victim.wait()
        left = claimed_by(db, batch_id, victim.pid)
        assert len(left) == 1 and 0 < messages_of(db, left) < 6  # killed mid-conversation
        # Once the second worker has a conversation of its own too, the rest may go fast.
        seconds = {"batch_id": batch_id, "claim.pid": second.pid}
        wait_until(
            lambda: db.conversations.find_one(seconds) is not None, second, "its first claim"
        )
        server.latency = 0.02
        for proc in (first, second):
            proc.wait(timeout=120)
            out, err = Cli.output(proc)
            assert proc.returncode == 0, out + err
        Cli.output(victim)
        store = Store(db, "alice")
        store.batch_progress(store.get_batch(batch_id))  # as `status` would: recounted
        # complete, no duplicate, equal to the uninterrupted run, totals exact
        check_batch(db, store, batch_id, expected)
        # every conversation was run once: the calls the uninterrupted run made, plus at
        # most the killed worker's call in flight and the one whose record it was writing
        assert reference_calls <= server.calls - calls <= reference_calls + 2
        # each worker did some; the killed one's conversation was finished by another
        finished_by = {d["claim"]["pid"] for d in db.conversations.find({"batch_id": batch_id})}
        assert {first.pid, second.pid} <= finished_by and victim.pid not in finished_by
        (taken,) = left
        assert db.conversations.find_one({"_id": taken})["claim"]["pid"] in (first.pid, second.pid)
        assert "workers" in db.batches.find_one({"_id": batch_id})
        assert db.batches.find_one({"_id": batch_id}).get("runner") is None  # released


def test_a_worker_whose_claim_was_taken_over_writes_nothing_more(settings, env_for, db, tmp_path):
    server = FakeLLMServer(models={"m1:latest"}, reply=deterministic_reply, latency=0.2)
    with server:
        yaml = llm_yaml(tmp_path, server)
        env = {**env_for(settings), "SIMULATOR_WORKER_TIMEOUT": "1.5"}
        one = ["--messages", "6", "--days", "2", "--agents", "guard=1,prisoner=2"]
        cli = Cli(tmp_path, env)
        worker = cli.start("run", yaml, *one, "--concurrency", "1", "--plain")
        wait_until(lambda: db.messages.count_documents({}) >= 2, worker, "two messages")
        batch_id = db.batches.find_one({"creator": "alice"})["_id"]
        (conv_id,) = claimed_by(db, batch_id, worker.pid)
        store = Store(db, "alice")
        # Another worker of the same run (this test) while the first is alive ...
        with store.worker_lease(batch_id, seconds=1.5, join=True) as lease:
            worker.send_signal(signal.SIGSTOP)  # ... the first stalls: no heartbeat
            try:
                deadline = time.monotonic() + 10
                record = None
                while record is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                    record = store.claim_conversation(lease)  # free once its claim is stale
                assert record is not None and record.id == conv_id
                before = {c: db[c].count_documents({}) for c in ("messages", "summaries")}
                calls = server.calls
            finally:
                worker.send_signal(signal.SIGCONT)
            # The stalled worker wakes with a call answered (or about to be): it must not
            # store it, nor anything else, while another worker holds the conversation.
            # Watched until it has tried (and logged the refusal), then one second more.
            deadline, tried = time.monotonic() + 30, None
            while tried is None or time.monotonic() < tried + 1:
                after = {c: db[c].count_documents({}) for c in ("messages", "summaries")}
                assert after == before, "the fenced worker wrote to a conversation it lost"
                if tried is None and "taken over" in logs(tmp_path):
                    tried = time.monotonic()
                assert time.monotonic() < deadline, "the stalled worker never tried to write"
                time.sleep(0.05)
            assert db.conversations.find_one({"_id": conv_id})["claim"]["token"] == lease.token
            del calls
        # This worker goes away without finishing it: the first continues it, after its
        # last stored message, once this claim is stale.
        worker.wait(timeout=60)
        out, err = Cli.output(worker)
        assert worker.returncode == 0, out + err
        doc = db.conversations.find_one({"_id": conv_id})
        assert doc["status"] == "completed" and doc["claim"]["pid"] == worker.pid
        assert db.messages.count_documents({"conversation_id": conv_id}) == 6
        assert "taken over" in logs(tmp_path)  # it did try, and was refused


def test_a_worker_stalled_past_its_lease_waits_for_its_heartbeat_and_goes_on(db, tmp_path, caplog):
    """After a stall of the whole process (SIGSTOP, a paused VM) its heartbeat is late. A
    conversation thread that wakes before the heartbeat thread stops writing to its
    conversation (another worker may have taken it over), then waits for the heartbeat to
    land instead of stopping the batch, and continues the conversation after its last stored
    message once its claim is stale. (The stall is the lease's last heartbeat set back, as a
    stopped process finds it; CI once saw the batch stop here.)"""
    store = Store.open(db, "alice")
    server = StalledOnce(store)
    options = RunOptions(retry=RetryPolicy(base_delay=0), lease_seconds=1.5, poll=0.05)
    with server.fake:
        text = Path(llm_yaml(tmp_path, server.fake)).read_text()
        exp = store.insert_experiment(experiment_from_yaml(text, "workers.yaml"))
        grid = make_grid(
            exp, llms=None, messages=6, days=2, agents="guard=1,prisoner=2",
            speakers=["round_robin"],
        )  # fmt: skip
        reference = start_batch(store, exp, grid, options)
        assert reference.status == "completed"
        reference_calls = server.fake.calls
        server.stall_at = reference_calls + 3
        with caplog.at_level("WARNING"):
            report = start_batch(store, exp, grid, options)
    assert "taken over" in caplog.text  # the stall was seen by a conversation thread first
    assert report.status == "completed", report
    assert transcripts(store, report.batch_id) == transcripts(store, reference.batch_id)
    # what was not stored when the stall was seen (the answer in flight, and the record being
    # written) was dropped and asked again: one or two calls more than uninterrupted
    assert reference_calls + 1 <= server.fake.calls - reference_calls <= reference_calls + 2


class StalledOnce:
    """A local LLM server; at call `stall_at` the runner's worker lease is found stalled."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.stall_at = 0
        self.fake = FakeLLMServer(models={"m1:latest"}, reply=self.reply)

    def reply(self, body: dict[str, Any]) -> str:
        if self.fake.calls == self.stall_at:
            (lease,) = self.store._leases.values()
            lease.beat_at -= 60  # no heartbeat landed for a minute
        return deterministic_reply(body)


def logs(tmp_path) -> str:
    return "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))


def test_max_tokens_stops_scheduling_and_resume_finishes(settings, env_for, db):
    env = env_for(settings)
    cli = CliRunner()
    grid = ["--llm", "scripted", "--messages", "4", "--days", "1", "--repetitions", "6"]
    result = cli.invoke(
        app, ["run", str(PRISON_ONE), *grid, "--concurrency", "1", "--max-tokens", "1", "--plain"],
        env=env,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "--max-tokens 1 reached" in result.output
    store = Store(db, "alice")
    (batch,) = store.list_batches()
    counts = store.batch_counts(batch.id)
    # the conversation in flight finished; no other was started
    assert counts == {"completed": 1, "pending": 5}, counts
    assert batch.status == "stopped"
    assert db.messages.count_documents({"batch_id": batch.id}) == 4
    result = cli.invoke(app, ["resume", batch.id, "--plain"], env=env)
    assert result.exit_code == 0, result.output
    assert store.batch_counts(batch.id) == {"completed": 6}
    assert db.messages.count_documents({"batch_id": batch.id}) == 6 * 4  # none redone


def test_a_budget_reached_by_the_last_conversations_completes_the_batch(settings, env_for, db):
    """The budget is reached once every conversation has started: nothing was left out, so
    the batch is completed (it was `stopped` with "continue with simulator resume")."""
    grid = ["--llm", "scripted", "--messages", "4", "--days", "1", "--max-tokens", "1"]
    result = CliRunner().invoke(
        app, ["run", str(PRISON_ONE), *grid, "--plain"], env=env_for(settings)
    )
    assert result.exit_code == 0, result.output
    assert "--max-tokens 1 reached" in result.output  # said when it was reached
    assert "simulator resume" not in result.output
    (batch,) = Store(db, "alice").list_batches()
    assert batch.status == "completed" and batch.error is None


def test_max_cost_needs_a_price_for_every_model(settings, env_for, db):
    env = env_for(settings)
    args = ["run", str(PRISON_ONE), "--llm", "scripted", "--messages", "2", "--days", "1"]
    result = CliRunner().invoke(app, [*args, "--max-cost", "0.01", "--plain"], env=env)
    assert result.exit_code == 1 and "SIMULATOR_PRICES" in result.output
    assert db.batches.count_documents({}) == 0  # refused before anything was stored
    priced = {**env, "SIMULATOR_PRICES": "scripted=1000000/1000000"}  # 1 per token
    result = CliRunner().invoke(
        app, [*args, "--repetitions", "3", "--concurrency", "1", "--max-cost", "1", "--plain"],
        env=priced,
    )  # fmt: skip
    assert result.exit_code == 1 and "--max-cost 1 reached" in result.output, result.output
    assert Store(db, "alice").batch_counts(db.batches.find_one()["_id"]) == {
        "completed": 1,
        "pending": 2,
    }


# --- --max-failures counts every worker's failures; a stop reaches every worker ----------

TWELVE = ["--messages", "6", "--days", "2", "--agents", "guard=1,prisoner=2",
          "--speaker", "round_robin", "--repetitions", "12", "--seed", "5"]  # fmt: skip


class Gated:
    """A local LLM server whose chat calls wait at `gate` (until both workers have claimed
    a conversation), so that both work on the batch when the failures begin."""

    def __init__(self, latency: float = 0.0) -> None:
        self.gate = threading.Event()
        self.fake = FakeLLMServer(models={"m1:latest"}, reply=self.reply, latency=latency)

    def reply(self, body: dict[str, Any]) -> str:
        self.gate.wait(60)
        return deterministic_reply(body)

    def __enter__(self) -> FakeLLMServer:
        return self.fake.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.gate.set()  # a test that failed before opening it does not wait for its calls
        self.fake.__exit__(*exc)


def two_workers_on_one_batch(
    db, cli: Cli, yaml: str, *flags: str
) -> tuple[str, subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """A `simulator run` and a `simulator work` of its batch, each in the middle of its
    first conversation (its first call waiting at the server's gate)."""
    first = cli.start("run", yaml, *TWELVE, "--concurrency", "1", *flags, "--plain")
    wait_until(
        lambda: db.batches.find_one({"creator": "alice", "prepared": True}) is not None,
        first,
        "the batch",
    )
    batch_id = db.batches.find_one({"creator": "alice"})["_id"]
    second = cli.start("work", batch_id, "--concurrency", "1", *flags, "--plain")
    for proc in (first, second):
        wait_until(lambda p=proc: claimed_by(db, batch_id, p.pid), proc, "a claim of each")
    return batch_id, first, second


def ended(*procs: subprocess.Popen[bytes]) -> list[str]:
    """Each process's exit code checked (1: the batch stopped) and its output."""
    outputs = []
    for proc in procs:
        proc.wait(timeout=120)
        out, err = Cli.output(proc)
        assert proc.returncode == 1, out + err
        assert "Traceback" not in out + err
        outputs.append(out + err)
    return outputs


def test_max_failures_counts_the_failures_of_every_worker(settings, env_for, db, tmp_path):
    """Every call fails once both workers work: the batch stops at the failure past the
    limit, whichever worker had it. Counted per worker, each would stop only at its own
    third failure (six in all); here at most the limit plus the one in flight of each."""
    server = Gated()
    with server:
        yaml = llm_yaml(tmp_path, server.fake)
        env = {**env_for(settings), "SIMULATOR_RETRY_ATTEMPTS": "1"}
        cli = Cli(tmp_path, env)
        batch_id, first, second = two_workers_on_one_batch(db, cli, yaml, "--max-failures", "2")
        server.fake.fail_statuses = [500]
        server.fake.fail_rate = 1.0  # the calls after the ones waiting at the gate
        server.gate.set()
        outputs = ended(first, second)
    counts = Store(db, "alice").batch_counts(batch_id)
    in_flight = 2  # one conversation at a time in each worker
    assert 3 <= counts["failed"] <= 2 + in_flight, counts
    assert counts.get("pending", 0) >= 12 - 2 - 2 - in_flight, counts  # no more were claimed
    assert "running" not in counts
    batch = db.batches.find_one({"_id": batch_id})
    assert batch["status"] == "stopped" and "more than --max-failures allows (2)" in batch["error"]
    why = batch["error"].split(";")[0]  # "N conversations failed, more than ..."
    for output in outputs:  # each worker says why the batch stopped: one reason for all
        assert f"Stopped: {why}" in output, output


def test_a_worker_that_stops_the_batch_stops_the_others(settings, env_for, db, tmp_path):
    """Three calls fail, then every call succeeds (slowly): the worker whose failure passes
    the limit of 2 stops the batch, and the other, whose conversations all go well, stops
    with it at its next heartbeat, rather than running the rest of the batch; each reports
    why, and the batch is `stopped` with the reason."""
    server = Gated(latency=0.2)
    with server:
        yaml = llm_yaml(tmp_path, server.fake)
        env = {**env_for(settings), "SIMULATOR_RETRY_ATTEMPTS": "1"}
        cli = Cli(tmp_path, env)
        batch_id, first, second = two_workers_on_one_batch(db, cli, yaml, "--max-failures", "2")
        server.fake.fail_next(500, 500, 500)
        server.gate.set()
        outputs = ended(first, second)
    counts = Store(db, "alice").batch_counts(batch_id)
    assert counts["failed"] == 3, counts
    # The batch stopped: conversations were left for `resume` (the other worker would take
    # 1.6 s of calls for each; it stopped within a heartbeat, 2 s).
    assert counts.get("pending", 0) >= 3, counts
    assert "running" not in counts
    batch = db.batches.find_one({"_id": batch_id})
    assert batch["status"] == "stopped", batch["status"]
    assert batch["error"].startswith("3 conversations failed, more than --max-failures allows (2)")
    for output in outputs:
        assert "Stopped: 3 conversations failed, more than --max-failures allows (2)" in output
        assert f"simulator resume {batch_id}" in output


def worker_of(db, batch_id: str, proc: subprocess.Popen[bytes]) -> dict[str, Any] | None:
    workers = db.batches.find_one({"_id": batch_id}, {"workers": 1}).get("workers") or {}
    return next((w for w in workers.values() if w["pid"] == proc.pid), None)


def test_the_batch_time_counts_while_any_worker_works(settings, env_for, db, tmp_path):
    """`ran N s` is the wall time during which at least one worker of the run worked: the
    worker that began the run is killed, the one that joined runs on alone, and the time
    keeps counting until it leaves; while both ran, it counted once, not twice."""
    server = Gated(latency=0.15)
    with server:
        yaml = llm_yaml(tmp_path, server.fake)
        cli = Cli(tmp_path, env_for(settings))
        first = cli.start("run", yaml, *TWELVE, "--concurrency", "1", "--plain")
        wait_until(lambda: db.batches.find_one() is not None, first, "the batch")
        created = time.monotonic()  # the run began after this (within a few round trips)
        batch_id = db.batches.find_one({"creator": "alice"})["_id"]
        second = cli.start("work", batch_id, "--concurrency", "1", "--plain")
        for proc in (first, second):  # each waits at the gate in its first conversation
            wait_until(lambda p=proc: claimed_by(db, batch_id, p.pid), proc, "a claim of each")
        server.gate.set()
        wait_until(
            lambda: messages_of(db, claimed_by(db, batch_id, second.pid)) >= 2,
            second,
            "the second worker's messages",
        )
        time.sleep(2.0)  # side by side a while; then killed just after a heartbeat, which
        # counted their common time (and left next to nothing of it uncounted)
        beat = worker_of(db, batch_id, first)["heartbeat"]
        wait_until(
            lambda: worker_of(db, batch_id, first)["heartbeat"] > beat,
            first,
            "a heartbeat",
        )
        first.kill()
        first.wait()
        Cli.output(first)
        # left for the second worker alone: conversations of 8 calls of 0.15 s each
        assert db.conversations.count_documents({"batch_id": batch_id, "status": "pending"}) >= 3
        present = time.monotonic()
        while worker_of(db, batch_id, second) is not None:
            present = time.monotonic()  # the second worker had not left
            time.sleep(0.02)
        left = time.monotonic()
        second.wait(timeout=60)
        out, err = Cli.output(second)
        assert second.returncode == 0, out + err
    batch = Store(db, "alice").get_batch(batch_id)
    assert batch.status == "completed"
    # Counted from the run's start until the second worker left (the first worker's own
    # time stopped at the kill, 3 conversations of at least 1.2 s each earlier) ...
    assert batch.elapsed >= present - created - 1.0, (batch.elapsed, present - created)
    # ... and never more than the wall time it all took (both workers' time added up
    # would be more: they ran side by side for two seconds and more)
    assert batch.elapsed <= left - created + 0.5, (batch.elapsed, left - created)


def test_a_worker_joining_a_stopped_run_claims_nothing(settings, env_for, db, tmp_path):
    """A run stopped by one of its workers (here this test's, by hand) stops the others at
    their next heartbeat, and a worker that joins it while it winds down (a late task of a
    job array) stops at once, saying why, instead of setting the batch running again."""
    server = FakeLLMServer(models={"m1:latest"}, reply=deterministic_reply, latency=0.1)
    with server:
        yaml = llm_yaml(tmp_path, server)
        cli = Cli(tmp_path, env_for(settings))
        first = cli.start("run", yaml, *TWELVE, "--concurrency", "1", "--plain")
        wait_until(lambda: db.messages.count_documents({}) >= 1, first, "a message")
        batch_id = db.batches.find_one({"creator": "alice"})["_id"]
        store = Store(db, "alice")
        with store.worker_lease(batch_id, join=True) as lease:
            assert store.stop_run(lease, "stopped by hand") == "stopped by hand"
            (stopped,) = ended(first)
            late = cli.start("work", batch_id, "--plain")
            (joined,) = ended(late)
            assert worker_of(db, batch_id, late) is None  # it has left; this test's has not
        for output in (stopped, joined):
            assert "Stopped: stopped by hand" in output, output
    assert db.conversations.count_documents({"claim.pid": late.pid}) == 0
    counts = store.batch_counts(batch_id)
    assert counts.get("pending", 0) >= 1 and "running" not in counts, counts
    batch = db.batches.find_one({"_id": batch_id})
    assert (batch["status"], batch["error"]) == ("stopped", "stopped by hand")
    assert batch.get("runner") is None  # the last worker to leave released it
