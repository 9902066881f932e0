"""Many short conversations (issue 9, item 12): what a batch costs the database is counted
(round trips through pymongo's command monitoring, threads), never timed."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

from pymongo import MongoClient, monitoring

from simulator.conversation import Message, SelectorCall, Summary
from simulator.errors import LeaseLost
from simulator.experiment import load_experiment
from simulator.grid import make_grid
from simulator.runner import ProgressEvent, RunOptions, start_batch
from simulator.status import BatchStatus
from simulator.store import Store
from tests.servers import write_experiment

CONCURRENCY = 16
CONVERSATIONS = 32
MESSAGES = 4  # and one summary: 5 records per conversation


class Commands(monitoring.CommandListener):
    """Every command sent to the server: its name, collection and document count."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inserts: Counter[str] = Counter()  # insert commands per collection
        self.docs: Counter[str] = Counter()  # documents inserted per collection

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert":
            collection = event.command["insert"]
            docs = len(event.command.get("documents", []))
            with self.lock:
                self.inserts[collection] += 1
                self.docs[collection] += docs

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def runner_threads() -> int:
    """Threads alive in this process, less those of the in-process server and the driver."""
    return sum(not t.name.startswith(("secantus", "pymongo")) for t in threading.enumerate())


def test_many_short_conversations_share_one_writer_and_insert_in_bulk(
    mongo_server: str, db, tmp_path: Path
) -> None:
    listener = Commands()
    client: MongoClient[dict[str, Any]] = MongoClient(
        mongo_server, event_listeners=[listener], retryWrites=False
    )
    try:
        store = Store.open(client[db.name], "alice")
        # every call waits 50 ms: the conversations go in step, as with a real server
        path = write_experiment(
            tmp_path / "short.yaml", "{model: scripted, provider: scripted, latency: 0.05}"
        )
        exp = store.insert_experiment(load_experiment(path))
        grid = make_grid(
            exp,
            llms=None,
            messages=MESSAGES,
            days=1,
            agents=None,
            speakers=["round_robin"],
            repetitions=CONVERSATIONS,
            seed=1,
        )
        before = runner_threads()
        peak = [before]

        def on_progress(event: ProgressEvent) -> None:
            peak[0] = max(peak[0], runner_threads())

        report = start_batch(
            store, exp, grid, RunOptions(concurrency=CONCURRENCY, on_progress=on_progress)
        )
    finally:
        client.close()

    assert report.status == BatchStatus.COMPLETED
    records = CONVERSATIONS * (MESSAGES + 1)
    stored = db["messages"].count_documents({}) + db["summaries"].count_documents({})
    assert stored == records
    assert listener.docs["messages"] + listener.docs["summaries"] == records  # each once
    # A thread per conversation slot, one record writer and the lease's heartbeat: not a
    # writer per conversation thread (which made 32 round trips queue at the server).
    assert peak[0] - before <= CONCURRENCY + 2
    # Records of conversations in step share round trips (one insert each made 160; how
    # many share depends on the machine's load, see the store test below for exact counts).
    round_trips = listener.inserts["messages"] + listener.inserts["summaries"]
    assert round_trips < records, listener.inserts
    # One insert for the conversations of the batch (they are prepared in bulk).
    assert listener.inserts["conversations"] == 1


def test_records_of_many_conversations_go_in_one_insert_per_collection_each_exactly_once(
    mongo_server: str, db
) -> None:
    listener = Commands()
    client: MongoClient[dict[str, Any]] = MongoClient(
        mongo_server, event_listeners=[listener], retryWrites=False
    )
    try:
        store = Store.open(client[db.name], "alice")
        records: list[tuple[str, Any, int | None, str | None]] = []
        for conv in ("c1", "c2", "c3", "c4"):
            records.append(
                (conv, Message(1, 1, "Guard_001", "guard", f"hi from {conv}"), None, "b")
            )
            records.append((conv, Summary(1, f"summary of {conv}"), None, "b"))
        records.append(("c1", SelectorCall(1, 2, "Guard_001", "Guard_001"), 0, "b"))
        assert store.insert_records(records) == [None] * len(records)
        assert dict(listener.inserts) == {"messages": 1, "summaries": 1, "selector_calls": 1}

        # a retried write whose first attempt landed is accepted; a different record in a
        # stored turn is refused for that record alone, the others are stored
        again = [
            records[0],
            ("c1", Message(1, 2, "Prisoner_001", "prisoner", "new"), None, "b"),
            ("c2", Message(1, 1, "Guard_001", "guard", "something else"), None, "b"),
        ]
        outcome = store.insert_records(again)
    finally:
        client.close()
    assert outcome[0] is None and outcome[1] is None
    assert isinstance(outcome[2], LeaseLost)
    assert listener.inserts["messages"] == 2
    assert db["messages"].count_documents({}) == 5
    assert db["messages"].find_one({"conversation_id": "c2"})["content"] == "hi from c2"
