"""Killing a batch anywhere, stopping it, losing the database — and resuming (issue 4).

These start the real `simulator` command as a subprocess; the scripted model (with a
latency, so that a batch lasts long enough to be hit mid-way) makes every run
reproducible, so a resumed batch must equal an uninterrupted one exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from typer.testing import CliRunner

from simulator.cli import app
from simulator.conversation import SELECTOR_SYSTEM
from simulator.store import Store
from tests.isolation import isolate
from tests.servers import FakeLLMServer, echo_reply, write_experiment
from tests.test_tally import kept, recount

# 6 conversations (3 round-robin, 3 auto-selected) x 6 messages over 2 days: 48 messages and
# summaries, plus the selector calls of the auto ones.
GRID = [
    "--messages", "6", "--days", "2", "--agents", "guard=1,prisoner=2", "--speaker",
    "round_robin", "--speaker", "auto", "--repetitions", "3", "--seed", "11",
]  # fmt: skip
ROWS = 6 * (6 + 2)


def simulator_command() -> list[str]:
    script = Path(sys.executable).with_name("simulator")
    return [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "simulator.cli"]


def experiment_file(tmp_path: Path, latency: float) -> str:
    llm = f"{{model: scripted, provider: scripted, latency: {latency}}}"
    return write_experiment(tmp_path / f"experiment-{latency}.yaml", llm, "kill-resume")


class Cli:
    """`simulator ...` subprocesses with their output in files (no pipe to fill up)."""

    def __init__(self, tmp_path: Path, env: dict[str, str]):
        self.tmp_path = tmp_path
        self.env = {**os.environ, **env}
        self.runs = 0

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        self.runs += 1
        out = open(self.tmp_path / f"run{self.runs}.out", "wb")  # noqa: SIM115 (closed in output)
        err = open(self.tmp_path / f"run{self.runs}.err", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [*simulator_command(), *args],
            stdout=out,
            stderr=err,
            env=self.env,
            # Ctrl-C must work even when this test runs with SIGINT ignored (e.g. under `&`).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        proc.files = (out, err)  # type: ignore[attr-defined]
        return proc

    @staticmethod
    def output(proc: subprocess.Popen[bytes]) -> tuple[str, str]:
        out, err = proc.files  # type: ignore[attr-defined]
        out.close()
        err.close()
        return Path(out.name).read_text(), Path(err.name).read_text()


def wait_until(
    condition: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = Cli.output(proc)
            pytest.fail(f"the batch ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.004)


def transcripts(store: Store, batch_id: str) -> dict[int, Any]:
    """{index: (messages, summaries, selector calls)} of a batch, everything compared."""
    out = {}
    for rec in store.list_conversations(batch_id=batch_id):
        t = store.load_transcript(rec.id)
        out[rec.index] = (
            [(m.day, m.turn, m.speaker, m.role, m.content, m.raw, m.empty) for m in t.messages],
            [(s.day, s.content) for s in t.summaries],
            [(c.day, c.turn, c.answer, c.chosen) for c in t.selector_calls],
        )
    return out


def check_batch(db, store: Store, batch_id: str, expected: dict[int, Any]) -> None:
    """Complete, exactly M messages and D summaries each, no duplicates, no orphans, and equal
    to the uninterrupted run."""
    records = store.list_conversations(batch_id=batch_id)
    assert sorted(r.index for r in records) == list(range(6))  # one conversation per grid cell
    assert {r.status for r in records} == {"completed"}
    assert store.get_batch(batch_id).status == "completed"
    ids = {r.id for r in records}
    for rec in records:
        t = store.load_transcript(rec.id)
        assert [(m.day, m.turn) for m in t.messages] == [
            (1, 1),
            (1, 2),
            (1, 3),
            (2, 1),
            (2, 2),
            (2, 3),
        ]
        assert [s.day for s in t.summaries] == [1, 2]
        assert rec.usage["agents"].calls >= 6 and rec.usage["summarizer"].calls == 2
    mine = {"conversation_id": {"$in": list(ids)}}
    assert db.messages.count_documents(mine) == 6 * 6
    assert db.summaries.count_documents(mine) == 6 * 2
    # orphans: anything stored for a conversation that does not exist
    all_ids = {c["_id"] for c in db.conversations.find({}, {"_id": 1})}
    for coll in ("messages", "summaries", "selector_calls"):
        owners = set(db[coll].distinct("conversation_id"))
        assert owners <= all_ids, f"orphan {coll}: {owners - all_ids}"
    assert transcripts(store, batch_id) == expected
    # the running totals `status` shows stayed exact through the kills and resumes
    assert kept(db, batch_id) == recount(db, batch_id)


@pytest.fixture(scope="module")
def expected(mongo_server, mongo_client, tmp_path_factory) -> Iterator[dict[int, Any]]:
    """The grid run uninterrupted (in-process, as bob, without latency), once for the tests
    that compare with it, in a database of its own."""
    tmp_path = tmp_path_factory.mktemp("reference")
    database = mongo_client[f"test_{uuid.uuid4().hex[:12]}"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolate(monkeypatch, tmp_path)
        env = {"MONGODB_URI": mongo_server, "MONGODB_DB": database.name, "SIMULATOR_USER": "bob"}
        result = CliRunner().invoke(
            app, ["run", experiment_file(tmp_path, 0), *GRID, "--plain"], env=env
        )
    assert result.exit_code == 0, result.output
    store = Store(database, "bob")
    (batch,) = store.list_batches()
    yield transcripts(store, batch.id)
    mongo_client.drop_database(database.name)


class GatedLLM:
    """A local Ollama-compatible server that holds every call once the batch has stored
    `target` rows (messages + summaries), until the next gate is set.

    This makes the kill points deterministic: a batch held at the gate cannot finish
    before it is killed, however slow the machine (with a fixed model latency and a
    sleep, the kill at 43 of 48 rows once came after the batch had finished).

    The gate sees only rows that have landed, and the runner writes behind the model
    (`_Writes`: a record's write goes on while the conversation's next call is made). So a
    call can pass the gate with the previous record's write still in flight, and each
    conversation thread can add two rows after its last call that passed: that write and
    the passed call's own record. Its next call is held. At the last call that passed, at
    most `target - 1` rows had landed, so a run with T threads stops at
    `target + 2 * T - 1` rows at most (see `extra_rows`).
    """

    def __init__(self, rows: Callable[[], int]):
        self.rows = rows
        self.lock = threading.Lock()
        self.target: int | None = None  # None: no gate
        self.held = threading.Event()  # a call is being held
        self.release = threading.Event()
        self.server = FakeLLMServer(models={"m1:latest"}, reply=self.reply)

    def reply(self, body: dict[str, Any]) -> str:
        with self.lock:
            target, release, held = self.target, self.release, self.held
        if target is not None and self.rows() >= target:
            held.set()
            release.wait(60)
        return deterministic_reply(body)

    def gate(self, target: int | None) -> None:
        """Let the calls held so far go (their process is dead) and hold at `target`."""
        with self.lock:
            self.release.set()
            self.release, self.held, self.target = threading.Event(), threading.Event(), target


def extra_rows(threads: int) -> int:
    """Rows a held batch can have stored past the gate's target (see GatedLLM)."""
    return 2 * threads - 1


def deterministic_reply(body: dict[str, Any]) -> str:
    """A reply that depends on the request only; the speaker selector gets a valid name."""
    messages = body.get("messages") or [{}]
    text = json.dumps(messages, sort_keys=True)
    digest = hashlib.sha256(text.encode()).digest()
    if messages[0].get("content") == SELECTOR_SYSTEM:
        names = sorted(set(re.findall(r"\b[A-Z][a-z]+_\d{3}\b", str(messages[-1]["content"]))))
        if names:
            return names[digest[0] % len(names)]
    return f"Point {digest[1] % 7}: {echo_reply(body)[:60]}"


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(settings, env_for, db, tmp_path):
    def stored_rows() -> int:
        return db.messages.count_documents({}) + db.summaries.count_documents({})

    base = [0]
    gated = GatedLLM(lambda: stored_rows() - base[0])
    with gated.server as server:
        yaml = write_experiment(
            tmp_path / "gated.yaml",
            # Ollama's client: it imports in half the time of OpenAI's (11 processes start)
            f"{{model: m1, provider: ollama, base_url: '{server.url}'}}",
            "kill-resume",
        )
        # the same grid uninterrupted (in-process, as bob): what every resumed run must equal
        bob = {**env_for(settings), "SIMULATOR_USER": "bob"}
        result = CliRunner().invoke(app, ["run", yaml, *GRID, "--plain"], env=bob)
        assert result.exit_code == 0, result.output
        bob_store = Store(db, "bob")
        (ref,) = bob_store.list_batches()
        expected = transcripts(bob_store, ref.id)
        base[0] = stored_rows()

        cli = Cli(tmp_path, env_for(settings))
        store = Store(db, "alice")

        def batch_id() -> str | None:
            doc = db.batches.find_one({"creator": "alice"})
            return doc["_id"] if doc else None

        rng = random.Random(5)
        # Kill points spread over the whole batch: as soon as the batch exists (preparing),
        # then once ever more messages and summaries are stored, each after a random few
        # milliseconds, so kills also land between the writes of one turn or conversation.
        kills = [0, 3, 7, 12, 17, 22, 27, 32, 37, 43]
        args = ["run", yaml, *GRID, "--concurrency", "2", "--plain"]
        for stored in kills:
            gated.gate(stored)
            proc = cli.start(*args)
            if stored == 0:
                wait_until(lambda: batch_id() is not None, proc, "the batch")
            else:
                wait_until(gated.held.is_set, proc, f"{stored} rows")
            time.sleep(rng.uniform(0, 0.015))
            proc.kill()
            proc.wait()
            Cli.output(proc)
            assert proc.returncode == -signal.SIGKILL, "the batch finished before it was killed"
            # --concurrency 2 on one endpoint: two conversation threads. More threads, or a
            # row written without a call passing the gate, can go past this bound.
            assert stored <= stored_rows() - base[0] <= stored + extra_rows(2)
            args = ["resume", str(batch_id()), "--concurrency", "2", "--plain"]
        gated.gate(None)
        assert 0 < stored_rows() - base[0] < ROWS
        final = cli.start(*args)
        final.wait(timeout=60)
        out, err = Cli.output(final)
        assert final.returncode == 0, out + err
        check_batch(db, store, str(batch_id()), expected)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_cleanly_prints_the_resume_command_and_resume_completes(
    settings, env_for, db, tmp_path, expected, sig
):
    cli = Cli(tmp_path, env_for(settings))
    store = Store(db, "alice")
    base = db.messages.count_documents({})
    proc = cli.start("run", experiment_file(tmp_path, 0.02), *GRID, "--concurrency", "2", "--plain")
    wait_until(lambda: db.messages.count_documents({}) - base >= 8, proc, "8 messages")
    proc.send_signal(sig)
    sent = time.monotonic()
    proc.wait(timeout=20)
    stopped_after = time.monotonic() - sent
    out, err = Cli.output(proc)
    assert proc.returncode == 130, out + err
    assert stopped_after < 5  # calls in flight (20 ms) finish; nothing else is waited for
    (batch,) = [b for b in store.list_batches() if b.creator == "alice"]
    assert f"Continue with:  simulator resume {batch.id}" in out
    assert "Stopping" in err and "Traceback" not in err
    assert batch.status == "interrupted"
    counts = store.batch_counts(batch.id)
    assert "running" not in counts and counts.get("completed", 0) < 6
    assert counts.get("interrupted", 0) >= 1  # the conversations in flight, marked
    result = CliRunner().invoke(
        app, ["resume", batch.id, "--plain"], env={**env_for(settings), "SIMULATOR_USER": "alice"}
    )
    assert result.exit_code == 0, result.output
    check_batch(db, store, batch.id, expected)


def test_database_going_away_stops_the_batch_and_resume_continues_after_restart(
    settings, env_for, tmp_path, expected
):
    # The embedded server (no MONGODB_URI), stopped mid-batch; `resume` restarts it on the
    # same data directory.
    env = {k: v for k, v in env_for(settings).items() if k != "MONGODB_URI"}
    env["SIMULATOR_DB_TIMEOUT_MS"] = "1000"
    cli = Cli(tmp_path, env)
    state_file = Path(settings.data_dir) / "server.json"
    proc = cli.start("run", experiment_file(tmp_path, 0.01), *GRID, "--concurrency", "2", "--plain")
    clients: dict[int, MongoClient[dict[str, Any]]] = {}  # by port

    def embedded_db() -> Any:
        state = json.loads(state_file.read_text())
        port = state["port"]
        if port not in clients:
            clients[port] = MongoClient(
                f"mongodb://127.0.0.1:{port}/", directConnection=True, serverSelectionTimeoutMS=5000
            )
        return clients[port][settings.mongodb_db], state["pid"]

    def stored() -> int:
        if not state_file.exists():
            return 0
        return embedded_db()[0].messages.count_documents({})

    wait_until(lambda: stored() >= 10, proc, "10 messages")
    # Stopped, not killed: SecantusDB (like mongod with j:false) may lose its last
    # acknowledged writes to SIGKILL, and this test is about the runner, not the server.
    _, pid = embedded_db()
    clients.pop(json.loads(state_file.read_text())["port"]).close()  # closing later would hang
    os.kill(pid, signal.SIGTERM)
    gone = time.monotonic()
    proc.wait(timeout=30)
    out, err = Cli.output(proc)
    assert proc.returncode == 1, out + err
    assert time.monotonic() - gone < 15
    assert "The database stopped answering during batch" in err, err
    assert "Traceback" not in err
    batch_id = err.split("simulator resume ")[1].split("`")[0]

    resumed = cli.start("resume", batch_id, "--plain")
    resumed.wait(timeout=60)
    out, err = Cli.output(resumed)
    assert resumed.returncode == 0, out + err
    db, _ = embedded_db()
    check_batch(db, Store(db, "alice"), batch_id, expected)
    for client in clients.values():
        client.close()
