"""Deleting never removes what someone else created (issue 9, item 1), is refused before any
question, reports progress, and deletes batch by batch rather than through a list of ids."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
from pymongo import MongoClient, monitoring
from typer.testing import CliRunner

from simulator.cli import app
from simulator.conversation import Message
from simulator.errors import PermissionDenied
from simulator.experiment import load_experiment
from simulator.grid import make_grid
from simulator.runner import RunOptions, _prepare, start_batch
from simulator.store import Store, now
from tests.scenarios import PRISON_ONE

PRISON = PRISON_ONE  # one of the 72 scenarios: these tests are not about factors


class Commands(monitoring.CommandListener):
    """Every command the client sends, with its body."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.seen.append((event.command_name, dict(event.command)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def named(self, *names: str) -> list[dict[str, Any]]:
        return [body for name, body in self.seen if name in names]


@pytest.fixture
def watched(mongo_server, db):
    """(a Store for `user` whose every command is recorded, the recorder)."""
    listener = Commands()
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server, event_listeners=[listener])
    stores = []

    def open_as(user: str) -> tuple[Store, Commands]:
        store = Store.open(client[db.name], user)
        stores.append(store)
        listener.seen.clear()
        return store, listener

    yield open_as
    client.close()


def run_batch(db, user: str, exp_id: str, repetitions: int = 2) -> str:
    store = Store.open(db, user)
    exp = store.get_experiment(exp_id)
    grid = make_grid(
        exp, llms=["scripted"], messages=2, days=1, agents=None, speakers=["round_robin"],
        repetitions=repetitions,
    )  # fmt: skip
    report = start_batch(store, exp, grid, RunOptions())
    assert report.status == "completed"
    return report.batch_id


def fill(db, store: Store, exp_id: str, n: int) -> str:
    """A batch of n conversations with 2 messages each, written in bulk (fast)."""
    exp = store.get_experiment(exp_id)
    grid = make_grid(
        exp, llms=["scripted"], messages=2, days=1, agents=None, speakers=["round_robin"],
        repetitions=n,
    )  # fmt: skip
    batch = store.create_batch(exp, grid)
    _prepare(store, batch, exp)
    docs = [
        {"conversation_id": c["_id"], "batch_id": batch.id, "day": 1, "turn": t,
         "speaker": "Guard_001", "role": "guard", "content": "x", "raw": None, "empty": False,
         "usage": {}, "created_at": now()}
        for c in db.conversations.find({"batch_id": batch.id}, {"_id": 1})
        for t in (1, 2)
    ]  # fmt: skip
    db.messages.insert_many(docs)
    return batch.id


def counts(db) -> dict[str, int]:
    return {
        name: db[name].count_documents({})
        for name in ("experiments", "batches", "conversations", "messages", "summaries")
    }


def test_deleting_an_experiment_with_someone_elses_conversations_is_refused(db):
    alice = Store.open(db, "alice")
    exp = alice.insert_experiment(load_experiment(PRISON))
    run_batch(db, "alice", exp.id)
    run_batch(db, "bob", exp.id, repetitions=3)
    before = counts(db)
    with pytest.raises(PermissionDenied) as refused:
        alice.delete_experiment(exp.id)
    message = str(refused.value)
    assert "bob (3 conversations)" in message and "refused" in message
    assert counts(db) == before  # nothing at all was deleted, alice's own batch included
    with pytest.raises(PermissionDenied):
        alice.delete_plan(exp.id)

    # once bob's conversations are gone, alice may delete it all
    bob = Store.open(db, "bob")
    for rec in bob.list_conversations(experiment_id=exp.id, where={"creator": "bob"}):
        bob.delete_conversation(rec.id)
    db.batches.delete_many({"creator": "bob"})
    seen: list[tuple[int, int]] = []
    deleted = alice.delete_experiment(exp.id, on_progress=lambda d, t: seen.append((d, t)))
    assert (deleted.experiments, deleted.batches, deleted.conversations) == (1, 1, 2)
    assert deleted.messages == 4
    assert seen[0] == (0, 2) and seen[-1] == (2, 2)
    assert counts(db) == dict.fromkeys(before, 0)


def test_cli_refuses_before_asking_for_confirmation(cli_for, db):
    alice = Store.open(db, "alice")
    exp = alice.insert_experiment(load_experiment(PRISON))
    run_batch(db, "bob", exp.id)
    before = counts(db)
    for args in (("experiment", "delete", exp.id), ("experiment", "delete", exp.id, "--yes")):
        result = cli_for("alice", *args)
        assert result.exit_code == 1
        assert "bob (2 conversations)" in result.output
        assert "--yes" not in result.output  # refused first, not asked to confirm
        assert "Traceback" not in result.output
    assert counts(db) == before


def test_cli_delete_of_ones_own_experiment(cli_for, db):
    alice = Store.open(db, "alice")
    exp = alice.insert_experiment(load_experiment(PRISON))
    run_batch(db, "alice", exp.id, repetitions=1)
    asked = cli_for("alice", "experiment", "delete", exp.id)
    assert asked.exit_code == 1 and "add --yes to delete" in asked.output
    assert "1 conversation" in asked.output and "1 conversations" not in asked.output
    assert counts(db)["conversations"] == 1
    done = cli_for("alice", "experiment", "delete", exp.id, "--yes")
    assert done.exit_code == 0 and "1 conversation," in done.output
    assert counts(db) == dict.fromkeys(counts(db), 0)


def test_a_batch_started_by_someone_else_during_the_delete_survives(db):
    alice = Store.open(db, "alice")
    exp = alice.insert_experiment(load_experiment(PRISON))
    fill(db, alice, exp.id, 3)
    bob = Store.open(db, "bob")

    def progress(done: int, total: int) -> None:
        if done == 0:  # bob starts a batch after alice's check
            fill(db, bob, exp.id, 2)

    with pytest.raises(PermissionDenied, match="bob"):
        alice.delete_experiment(exp.id, on_progress=progress)
    left = bob.list_conversations(experiment_id=exp.id)
    assert len(left) == 2 and {r.creator for r in left} == {"bob"}
    assert all(r.message_count == 2 for r in left)
    assert bob.get_experiment(exp.id).id == exp.id  # the experiment stays while they use it


def test_delete_goes_batch_by_batch_without_a_list_of_every_id(watched, db):
    store, commands = watched("alice")
    exp = store.insert_experiment(load_experiment(PRISON))
    for _ in range(2):
        fill(db, store, exp.id, 150)
    # a conversation without a batch (older imports)
    legacy = db.conversations.find_one({"index": 0})
    assert legacy is not None
    legacy.update(_id="0123456789ab", batch_id=None)
    db.conversations.insert_one(legacy)
    store.insert_message("0123456789ab", Message(1, 1, "Guard_001", "guard", "old"), None)
    commands.seen.clear()
    seen: list[tuple[int, int]] = []
    deleted = store.delete_experiment(exp.id, on_progress=lambda d, t: seen.append((d, t)))
    assert deleted.conversations == 301 and deleted.messages == 601
    assert seen[-1] == (301, 301) and len(seen) >= 3  # progress after each batch
    deletes = commands.named("delete")
    # per batch: messages, summaries, selector calls, scores, conversations, the batch; then
    # the one conversation without a batch (5), the experiment and its annotation sheets:
    # not one per conversation
    assert len(deletes) <= 2 * 6 + 5 + 2, len(deletes)
    longest_in = max(_longest_in(body) for body in commands.named("delete", "find", "aggregate"))
    assert longest_in <= 1, f"a $in over {longest_in} ids"
    assert counts(db) == dict.fromkeys(counts(db), 0)


def _longest_in(body: Any) -> int:
    """The longest `$in` list anywhere in a command."""
    if isinstance(body, dict):
        own = len(body["$in"]) if isinstance(body.get("$in"), list) else 0
        return max([own, *(_longest_in(v) for v in body.values())])
    if isinstance(body, list):
        return max([0, *(_longest_in(v) for v in body)])
    return 0


def test_conversation_delete_refusal_says_what_applies(db):
    alice = Store.open(db, "alice")
    exp = alice.insert_experiment(load_experiment(PRISON))
    run_batch(db, "alice", exp.id, repetitions=1)
    (rec,) = alice.list_conversations(experiment_id=exp.id)
    with pytest.raises(PermissionDenied) as refused:
        Store.open(db, "bob").delete_conversation(rec.id)
    assert "Only alice" in str(refused.value) and "duplicate" not in str(refused.value)
    assert alice.get_conversation(rec.id).message_count == 2


@pytest.fixture
def cli_for(settings, env_for):
    runner = CliRunner()

    def invoke(user: str, *args: str):
        return runner.invoke(app, list(args), env={**env_for(settings), "SIMULATOR_USER": user})

    return invoke


def test_dead_batch_is_reported_as_not_running(cli_for, db):
    alice = Store.open(db, "alice")
    exp = alice.insert_experiment(load_experiment(PRISON))
    batch_id = run_batch(db, "alice", exp.id, repetitions=1)
    # as a runner killed mid-run leaves it: status running, its lease held by a dead process
    dead = {"host": socket.gethostname(), "pid": _dead_pid(), "heartbeat": now()}
    db.batches.update_one({"_id": batch_id}, {"$set": {"status": "running", "runner": dead}})
    db.conversations.update_many({"batch_id": batch_id}, {"$set": {"status": "running"}})
    assert alice.get_batch(batch_id).runner_alive is False
    shown = cli_for("alice", "status", batch_id)
    assert shown.exit_code == 0, shown.output
    assert "stopped unexpectedly" in shown.output and f"simulator resume {batch_id}" in shown.output
    # a live one (this process holds the lease) is running, with no resume hint
    alive = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": now()}
    db.batches.update_one({"_id": batch_id}, {"$set": {"runner": alive}})
    shown = cli_for("alice", "status", batch_id)
    assert "stopped unexpectedly" not in shown.output and "resume" not in shown.output


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
