"""Issue 9, item 11: `status` reads a batch's running totals from the batch document instead
of counting every conversation and message, and those totals stay exact through crashes,
kills, resumes and repeated writes (checked against a recount of the stored records)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import pytest
from pymongo import MongoClient, monitoring
from typer.testing import CliRunner

from simulator.cli import app
from simulator.conversation import Message, Usage
from simulator.llm import scripted
from simulator.store import Store
from tests.scenarios import PRISON_ONE

PRISON = str(PRISON_ONE)
GRID = ["--llm", "scripted", "--messages", "6", "--days", "2", "--repetitions", "3", "--plain"]


def recount(db, batch_id: str) -> dict[str, Any]:
    """What the stored records say, counted one by one (the test's own view)."""
    counts = {
        r["_id"]: r["n"]
        for r in db.conversations.aggregate(
            [{"$match": {"batch_id": batch_id}}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        )
    }
    totals = {"prompt_tokens": 0, "completion_tokens": 0, "retries": 0, "calls": 0}
    for coll in ("messages", "summaries", "selector_calls"):
        for d in db[coll].find({"batch_id": batch_id}, {"usage": 1}):
            for k in totals:
                totals[k] += d["usage"][k]
    for d in db.conversations.find({"batch_id": batch_id}, {"failed_call_retries": 1}):
        totals["retries"] += d.get("failed_call_retries", 0)
    return {"counts": counts, "messages": db.messages.count_documents({"batch_id": batch_id}),
            **totals}  # fmt: skip


def kept(db, batch_id: str) -> dict[str, Any]:
    """The totals kept on the batch document."""
    t = db.batches.find_one({"_id": batch_id})["tally"]
    return {
        "counts": {k: v for k, v in t["counts"].items() if v},
        **{k: t[k] for k in ("messages", "prompt_tokens", "completion_tokens", "retries", "calls")},
    }


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        coll = event.command.get(event.command_name)
        self.seen.append((event.command_name, coll if isinstance(coll, str) else ""))

    def succeeded(self, event: Any) -> None:
        pass

    def failed(self, event: Any) -> None:
        pass


def test_totals_stay_exact_through_a_crash_a_kill_and_resumes(settings, env_for, db, monkeypatch):
    env = env_for(settings)
    cli = CliRunner()
    scripted.reset_call_counter()
    monkeypatch.setenv(scripted.CRASH_ENV, "9")
    with pytest.raises(scripted.InjectedCrash):
        cli.invoke(app, ["run", PRISON, *GRID], env=env, catch_exceptions=False)
    monkeypatch.delenv(scripted.CRASH_ENV)
    batch_id = db.batches.find_one()["_id"]
    assert db.batches.find_one({"_id": batch_id})["tally"]["owner"] == "released"
    assert kept(db, batch_id) == recount(db, batch_id)
    assert recount(db, batch_id)["messages"] > 0

    # A kill: the runner's process is gone, and the count of its last message never landed.
    db.batches.update_one(
        {"_id": batch_id},
        {
            "$set": {
                "status": "running",
                "runner": {"host": socket.gethostname(), "pid": dead_pid(), "token": "dead1"},
                "tally.owner": "dead1",
            },
            "$inc": {"tally.messages": -1, "tally.calls": -1},
        },
    )
    result = cli.invoke(app, ["status", batch_id], env=env)
    exact = recount(db, batch_id)
    assert f"{exact['messages']} messages" in result.output  # recounted, not the kept figure
    assert kept(db, batch_id) == exact  # ... and stored again for the next `status`
    assert db.batches.find_one({"_id": batch_id})["tally"]["owner"] == "checked:dead1"

    # Killed again before its counts landed, then resumed without a `status` in between.
    db.batches.update_one(
        {"_id": batch_id},
        {"$set": {"tally.owner": "dead1", "runner.token": "dead1"}, "$inc": {"tally.messages": 5}},
    )
    result = cli.invoke(app, ["resume", batch_id, "--plain"], env=env)
    assert result.exit_code == 0, result.output
    final = recount(db, batch_id)
    assert final["counts"] == {"completed": 3}
    assert final["messages"] == 3 * 6
    assert kept(db, batch_id) == final
    assert db.batches.find_one({"_id": batch_id})["tally"]["owner"] == "released"


def test_status_reads_the_kept_totals_without_touching_the_records(settings, env_for, db):
    env = env_for(settings)
    result = CliRunner().invoke(app, ["run", PRISON, *GRID], env=env)
    assert result.exit_code == 0, result.output
    listener = Commands()
    client: MongoClient = MongoClient(settings.mongodb_uri, event_listeners=[listener])
    try:
        store = Store(client[db.name], "alice")
        (batch,) = store.list_batches()
        listener.seen.clear()
        progress = store.batch_progress(batch)
        touched = [c for c in listener.seen if c[1] in ("messages", "summaries", "selector_calls")]
        assert touched == []  # no record of the batch was read to count it
        assert not [c for c in listener.seen if c[1] == "conversations"]
        exact = recount(db, batch.id)
        assert progress.counts == exact["counts"]
        assert progress.totals.messages == exact["messages"] == 3 * 6
        assert progress.totals.calls == exact["calls"]
    finally:
        client.close()


def test_a_repeated_write_counts_once_and_a_foreign_write_is_recounted(settings, env_for, db):
    env = env_for(settings)
    result = CliRunner().invoke(app, ["run", PRISON, *GRID], env=env)
    assert result.exit_code == 0, result.output
    store = Store(db, "alice")
    (batch,) = store.list_batches()
    conv = db.conversations.find_one({"batch_id": batch.id})
    extra = Message(day=3, turn=1, speaker="X", role="guard", content="hi",
                    usage=Usage(prompt_tokens=7, completion_tokens=3, calls=1))  # fmt: skip
    with store.batch_lease(batch.id) as lease:
        store.insert_message(conv["_id"], extra, batch.id, lease)
        store.insert_message(conv["_id"], extra, batch.id, lease)  # a retried write
    assert kept(db, batch.id) == recount(db, batch.id)
    assert kept(db, batch.id)["messages"] == 3 * 6 + 1
    # Written without the batch's lease (another program): the kept totals are dropped, and
    # the next `status` recounts them.
    extra.turn = 2
    Store(db, "bob").insert_message(conv["_id"], extra, batch.id)
    assert "tally" not in db.batches.find_one({"_id": batch.id})
    progress = store.batch_progress(store.get_batch(batch.id))
    assert progress.totals.messages == 3 * 6 + 2
    assert kept(db, batch.id) == recount(db, batch.id)
    assert os.environ.get(scripted.CRASH_ENV) is None
