"""The only module that knows MongoDB document shapes (SPEC §8-9).

Everything goes in and out as dataclasses; callers never see a dict from Mongo.
Writes are idempotent where a retry or a resume could repeat them: a message is unique by
(conversation, day, turn), a summary by (conversation, day), a conversation by (batch,
index), so repeating a write can neither lose nor duplicate anything.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pymongo
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from simulator.conversation import (
    EXTRA_ATTEMPTS,
    Agent,
    ConversationSpec,
    Message,
    SelectorCall,
    Summary,
    Transcript,
    Usage,
)
from simulator.errors import NotFoundError, PermissionDenied, StorageError, UserError
from simulator.experiment import Experiment, ModelSpec, experiment_from_dict, experiment_to_dict
from simulator.grid import Grid

UNFINISHED = ("pending", "running", "interrupted", "failed")
LEASE_SECONDS = 30  # a batch whose runner has not been heard of for this long is free


def new_id() -> str:
    """12 random hex digits: short to type, and any few leading digits make a usable prefix.

    Never one that reads as a number (`123456789012`, `12e456789012`): pandas and
    spreadsheets would turn it into one in an export.
    """
    while True:
        candidate = secrets.token_hex(6)
        try:
            float(candidate)
        except ValueError:
            return candidate


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@dataclass
class ExperimentRow:
    """An experiment with what a listing shows about it."""

    experiment: Experiment
    conversations: int = 0


@dataclass
class BatchRecord:
    id: str
    experiment_id: str
    grid: Grid
    total: int
    status: str  # preparing | ready | running | interrupted | completed | stopped
    creator: str
    created_at: datetime
    prepared: bool = False
    finished_at: datetime | None = None
    error: str | None = None
    elapsed: float = 0.0  # seconds spent running, summed over every run and resume


@dataclass
class ConversationRecord:
    id: str
    experiment_id: str
    batch_id: str | None
    index: int
    spec: ConversationSpec
    agents: list[Agent]
    summarizer_prompt: str
    status: str
    creator: str
    created_at: datetime
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    usage: dict[str, Usage] = field(default_factory=dict)
    fallbacks: int = 0
    favourited_by: list[str] = field(default_factory=list)  # who starred it (each for themselves)
    note: str = ""
    message_count: int = 0


def _model_to_doc(spec: ModelSpec) -> dict[str, Any]:
    doc = dataclasses.asdict(spec)
    doc["label"] = spec.label
    doc["sampling"] = spec.sampling()
    return doc


def _model_from_doc(doc: dict[str, Any]) -> ModelSpec:
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    return ModelSpec(**{k: v for k, v in doc.items() if k in fields})


def _usage_doc(u: Usage) -> dict[str, Any]:
    return dataclasses.asdict(u)


def _usage(doc: dict[str, Any] | None) -> Usage:
    doc = doc or {}
    return Usage(**{f.name: doc.get(f.name, 0) for f in dataclasses.fields(Usage)})


class Store:
    """Experiments, batches, conversations and messages in one MongoDB database.

    `user` is the current user: creator of what it inserts, and the only one allowed to
    change or delete what it created.
    """

    def __init__(self, db: Database, user: str):
        self.db = db
        self.user = user
        self.experiments = db["experiments"]
        self.batches = db["batches"]
        self.conversations = db["conversations"]
        self.messages = db["messages"]
        self.summaries = db["summaries"]
        self.selector_calls = db["selector_calls"]

    @classmethod
    def open(cls, db: Database, user: str) -> Store:
        """A Store with its indexes in place."""
        store = cls(db, user)
        store.ensure_indexes()
        return store

    def ensure_indexes(self) -> None:
        try:
            self.messages.create_index(
                [("conversation_id", 1), ("day", 1), ("turn", 1)], unique=True
            )
            self.summaries.create_index([("conversation_id", 1), ("day", 1)], unique=True)
            self.selector_calls.create_index(
                [("conversation_id", 1), ("day", 1), ("turn", 1), ("attempt", 1)], unique=True
            )
            for coll in (self.messages, self.summaries, self.selector_calls):
                coll.create_index([("batch_id", 1)])
            self.conversations.create_index([("batch_id", 1), ("index", 1)], unique=True)
            self.conversations.create_index([("experiment_id", 1), ("created_at", 1)])
            self.conversations.create_index([("batch_id", 1), ("status", 1)])
            self.batches.create_index([("experiment_id", 1)])
        except PyMongoError as e:
            raise StorageError(f"Could not prepare the database: {e}") from e

    # --- ids ------------------------------------------------------------------------------

    def _resolve(self, collection: pymongo.collection.Collection, ref: str, what: str) -> dict:
        ref = ref.strip()
        if not re.fullmatch(r"[0-9a-fA-F]{1,24}", ref):
            raise NotFoundError(
                f"'{ref}' is not a valid {what} id: ids are hexadecimal, e.g. 3f2a9c01b7de "
                f"(list them with `simulator {_LISTING[what]}`)."
            )
        docs = list(collection.find({"_id": {"$regex": f"^{ref.lower()}"}}).limit(3))
        if not docs:
            raise NotFoundError(
                f"No {what} has an id starting with '{ref}'. "
                f"List them with `simulator {_LISTING[what]}`."
            )
        if len(docs) > 1:
            ids = ", ".join(d["_id"] for d in docs)
            raise NotFoundError(
                f"'{ref}' matches more than one {what} ({ids}{', ...' if len(docs) > 2 else ''}): "
                "type more characters of the id."
            )
        return docs[0]

    def _check_owner(self, doc: dict, what: str, action: str) -> None:
        if doc.get("creator") != self.user:
            raise PermissionDenied(refusal(doc.get("creator"), what, doc["_id"], action, self.user))

    def _star(self, collection: pymongo.collection.Collection, doc: dict, favourite: bool) -> None:
        """Add or remove the current user's star; anyone may, it changes nothing of anyone else's.

        A document from before per-person favourites has a boolean `favourite`: it becomes its
        creator's star first (only if no list exists yet, so a concurrent star is not lost).
        """
        if "favourited_by" not in doc:
            collection.update_one(
                {"_id": doc["_id"], "favourited_by": {"$exists": False}},
                {"$set": {"favourited_by": favourited_by(doc)}, "$unset": {"favourite": ""}},
            )
        change = "$addToSet" if favourite else "$pull"
        collection.update_one({"_id": doc["_id"]}, {change: {"favourited_by": self.user}})

    # --- experiments ----------------------------------------------------------------------

    def insert_experiment(self, exp: Experiment, *, parent_id: str | None = None) -> Experiment:
        doc = {
            "_id": new_id(),
            "name": exp.name,
            "note": exp.note,
            "favourited_by": [self.user] if exp.favourite else [],
            "creator": self.user,
            "created_at": now(),
            "parent_id": parent_id,
            "definition": _definition(exp),
        }
        self.experiments.insert_one(doc)
        return self._experiment(doc)

    def get_experiment(self, ref: str) -> Experiment:
        return self._experiment(self._resolve(self.experiments, ref, "experiment"))

    def find_identical(self, exp: Experiment) -> Experiment | None:
        """The current user's experiment with exactly this definition, if one is stored."""
        doc = self.experiments.find_one(
            {"creator": self.user, "name": exp.name, "definition": _definition(exp)},
            sort=[("created_at", -1)],
        )
        return self._experiment(doc) if doc else None

    def list_experiments(self, *, mine: bool = False, search: str = "") -> list[ExperimentRow]:
        """The current user's favourites first, then newest first."""
        query: dict[str, Any] = {"creator": self.user} if mine else {}
        if search:
            pattern = {"$regex": re.escape(search), "$options": "i"}
            query["$or"] = [{"name": pattern}, {"note": pattern}, {"creator": pattern}]
        docs = list(self.experiments.find(query))
        docs.sort(key=lambda d: d["created_at"], reverse=True)
        docs.sort(key=lambda d: self.user not in favourited_by(d))
        counts = {
            row["_id"]: row["n"]
            for row in self.conversations.aggregate(
                [
                    {"$match": {"experiment_id": {"$in": [d["_id"] for d in docs]}}},
                    {"$group": {"_id": "$experiment_id", "n": {"$sum": 1}}},
                ]
            )
        }
        return [ExperimentRow(self._experiment(d), counts.get(d["_id"], 0)) for d in docs]

    def set_note(self, ref: str, note: str) -> Experiment:
        return self._update_experiment(ref, {"note": note}, "change the note of")

    def set_favourite(self, ref: str, favourite: bool) -> Experiment:
        """Star (or unstar) an experiment for the current user; anyone's experiment."""
        doc = self._resolve(self.experiments, ref, "experiment")
        self._star(self.experiments, doc, favourite)
        return self._experiment(self.experiments.find_one({"_id": doc["_id"]}) or doc)

    def _update_experiment(self, ref: str, changes: dict, action: str) -> Experiment:
        doc = self._resolve(self.experiments, ref, "experiment")
        self._check_owner(doc, "experiment", action)
        self.experiments.update_one({"_id": doc["_id"]}, {"$set": changes})
        return self._experiment({**doc, **changes})

    def delete_experiment(self, ref: str) -> dict[str, int]:
        """Delete an experiment with its batches, conversations and messages (creator only)."""
        doc = self._resolve(self.experiments, ref, "experiment")
        self._check_owner(doc, "experiment", "delete")
        conv_ids = [c["_id"] for c in self.conversations.find({"experiment_id": doc["_id"]}, {})]
        counts = self._delete_conversation_data(conv_ids)
        counts["batches"] = self.batches.delete_many({"experiment_id": doc["_id"]}).deleted_count
        self.experiments.delete_one({"_id": doc["_id"]})
        counts["experiments"] = 1
        return counts

    def _delete_conversation_data(self, conv_ids: list[str]) -> dict[str, int]:
        # Children first: an interrupted delete leaves a conversation without some messages
        # rather than messages without a conversation.
        query = {"conversation_id": {"$in": conv_ids}}
        return {
            "messages": self.messages.delete_many(query).deleted_count,
            "summaries": self.summaries.delete_many(query).deleted_count,
            "selector_calls": self.selector_calls.delete_many(query).deleted_count,
            "conversations": self.conversations.delete_many(
                {"_id": {"$in": conv_ids}}
            ).deleted_count,
        }

    def _experiment(self, doc: dict) -> Experiment:
        exp = experiment_from_dict(dict(doc["definition"]), source=f"experiment {doc['_id']}")
        exp.id = doc["_id"]
        exp.note = doc.get("note", "")
        exp.favourite = self.user in favourited_by(doc)
        exp.creator = doc.get("creator")
        exp.created_at = doc.get("created_at")
        exp.parent_id = doc.get("parent_id")
        return exp

    # --- batches --------------------------------------------------------------------------

    def create_batch(self, exp: Experiment, grid: Grid) -> BatchRecord:
        assert exp.id is not None
        doc = {
            "_id": new_id(),
            "experiment_id": exp.id,
            "grid": _grid_doc(grid),
            "total": grid.size(),
            "status": "preparing",
            "prepared": False,
            "creator": self.user,
            "created_at": now(),
        }
        self.batches.insert_one(doc)
        return _batch(doc)

    def get_batch(self, ref: str) -> BatchRecord:
        return _batch(self._resolve(self.batches, ref, "batch"))

    def latest_batch(self) -> BatchRecord | None:
        doc = self.batches.find_one({"creator": self.user}, sort=[("created_at", -1)])
        return _batch(doc) if doc else None

    def list_batches(self, experiment_id: str | None = None) -> list[BatchRecord]:
        query = {"experiment_id": experiment_id} if experiment_id else {}
        return [_batch(d) for d in self.batches.find(query).sort("created_at", -1)]

    @contextmanager
    def batch_lease(self, batch_id: str) -> Iterator[None]:
        """Hold the batch for this process while it runs, so that a second `resume` cannot
        run the same conversations at the same time (their turns would interleave).

        The lease is this host and pid with a heartbeat. A lease is free when its heartbeat
        is older than LEASE_SECONDS, or when its process on this host is gone (after a
        `kill -9`, resume may start at once).
        """
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._claim(batch_id, me)
        mine = {"_id": batch_id, "runner.host": me["host"], "runner.pid": me["pid"]}
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(LEASE_SECONDS / 3):
                try:
                    self.batches.update_one(mine, {"$set": {"runner.heartbeat": now()}})
                except PyMongoError:
                    pass  # the batch's own writes report a lost database

        heart = threading.Thread(target=beat, name="batch-lease", daemon=True)
        heart.start()
        try:
            yield
        finally:
            stop.set()
            try:
                self.batches.update_one(mine, {"$unset": {"runner": ""}})
            except PyMongoError:
                pass  # unreleased, it expires; a dead pid on this host frees it at once

    def _claim(self, batch_id: str, me: dict[str, Any]) -> None:
        doc = self.batches.find_one({"_id": batch_id}, {"runner": 1}) or {}
        held = doc.get("runner")
        if held and not _lease_free(held, me):
            raise _busy(batch_id, held)
        claimed = self.batches.update_one(
            {"_id": batch_id, "runner": held}, {"$set": {"runner": {**me, "heartbeat": now()}}}
        )
        if claimed.matched_count == 0:  # another process claimed it in between
            raise _busy(batch_id, (self.batches.find_one({"_id": batch_id}) or {}).get("runner"))

    def set_batch_status(
        self, batch_id: str, status: str, error: str | None = None, *, elapsed: float = 0.0
    ) -> None:
        """Set the status; `elapsed` (seconds of this run) adds to the batch's running time."""
        changes: dict[str, Any] = {"status": status, "error": error}
        if status in ("completed", "completed_with_failures", "stopped", "interrupted"):
            changes["finished_at"] = now()
        update: dict[str, Any] = {"$set": changes}
        if elapsed:
            update["$inc"] = {"elapsed": elapsed}
        self.batches.update_one({"_id": batch_id}, update)

    def prepare_conversations(
        self,
        batch: BatchRecord,
        exp: Experiment,
        items: Iterable[tuple[int, ConversationSpec, list[Agent], str]],
        chunk: int = 500,
    ) -> None:
        """Create the batch's conversations as `pending`, in chunks (the grid is streamed).

        Safe to repeat after an interruption: conversations that exist are left alone.
        """
        buffer: list[dict] = []
        for index, spec, agents, summarizer_prompt in items:
            buffer.append(
                self._conversation_doc(batch, exp, index, spec, agents, summarizer_prompt)
            )
            if len(buffer) >= chunk:
                self._insert_ignoring_duplicates(buffer)
                buffer = []
        if buffer:
            self._insert_ignoring_duplicates(buffer)
        self.batches.update_one({"_id": batch.id}, {"$set": {"prepared": True, "status": "ready"}})

    def _insert_ignoring_duplicates(self, docs: list[dict]) -> None:
        try:
            self.conversations.insert_many(docs, ordered=False)
        except BulkWriteError as e:
            if any(err.get("code") != 11000 for err in e.details.get("writeErrors", [])):
                raise

    def _conversation_doc(
        self,
        batch: BatchRecord,
        exp: Experiment,
        index: int,
        spec: ConversationSpec,
        agents: list[Agent],
        summarizer_prompt: str,
    ) -> dict:
        return {
            "_id": new_id(),
            "experiment_id": exp.id,
            "batch_id": batch.id,
            "index": index,
            "llm": _model_to_doc(spec.llm),
            "messages": spec.messages,
            "days": spec.days,
            "agents_per_role": dict(spec.agents),
            "speaker_selection": spec.speaker,
            "repetition": spec.repetition,
            "seed": spec.seed,
            "agents": [dataclasses.asdict(a) for a in agents],
            "summarizer_prompt": summarizer_prompt,
            "status": "pending",
            "error": None,
            "creator": self.user,
            "created_at": now(),
            "started_at": None,
            "finished_at": None,
            "usage": {},
            "fallbacks": 0,
            "favourited_by": [],
            "note": "",
        }

    def unfinished_conversations(
        self, batch_id: str, page: int = 100
    ) -> Iterator[ConversationRecord]:
        """Streams the batch's conversations that still need work, in grid order.

        Fetched a page at a time by index rather than through one cursor: a batch consumes
        them over hours, and a server drops a cursor left idle for ten minutes.
        """
        last = -1
        while True:
            query = {
                "batch_id": batch_id,
                "status": {"$in": list(UNFINISHED)},
                "index": {"$gt": last},
            }
            docs = list(self.conversations.find(query).sort("index", 1).limit(page))
            for doc in docs:
                yield _conversation(doc)
            if len(docs) < page:
                return
            last = docs[-1]["index"]

    def count_unfinished(self, batch_id: str) -> int:
        return self.conversations.count_documents(
            {"batch_id": batch_id, "status": {"$in": list(UNFINISHED)}}
        )

    def batch_counts(self, batch_id: str) -> dict[str, int]:
        rows = self.conversations.aggregate(
            [{"$match": {"batch_id": batch_id}}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        )
        return {r["_id"]: r["n"] for r in rows}

    def batch_totals(self, batch_id: str) -> dict[str, Any]:
        """Messages, tokens, retries and failures of a batch (for status and summaries)."""
        # Matched on the batch id every record carries: matching a list of the batch's
        # conversation ids instead takes seconds on the embedded server for 1,000 of them.
        totals: dict[str, Any] = {
            "messages": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "retries": 0,
            "calls": 0,
        }
        for coll in (self.messages, self.summaries, self.selector_calls):
            for row in coll.aggregate(
                [
                    {"$match": {"batch_id": batch_id}},
                    {
                        "$group": {
                            "_id": None,
                            "n": {"$sum": 1},
                            "prompt_tokens": {"$sum": "$usage.prompt_tokens"},
                            "completion_tokens": {"$sum": "$usage.completion_tokens"},
                            "retries": {"$sum": "$usage.retries"},
                            "calls": {"$sum": "$usage.calls"},
                        }
                    },
                ]
            ):
                if coll is self.messages:
                    totals["messages"] = row["n"]
                for k in ("prompt_tokens", "completion_tokens", "retries", "calls"):
                    totals[k] += row[k]
        # Retries of calls that failed for good are kept on their conversation (no message holds them).
        for row in self.conversations.aggregate(
            [
                {"$match": {"batch_id": batch_id}},
                {"$group": {"_id": None, "retries": {"$sum": "$failed_call_retries"}}},
            ]
        ):
            totals["retries"] += row["retries"] or 0
        totals["failures"] = self.batch_failures(batch_id)
        return totals

    def batch_failures(self, batch_id: str) -> list[tuple[str, str]]:
        """(conversation id, error) of the batch's failed conversations."""
        return [
            (d["_id"], d.get("error") or "")
            for d in self.conversations.find(
                {"batch_id": batch_id, "status": "failed"}, {"error": 1}
            )
        ]

    # --- conversations --------------------------------------------------------------------

    def get_conversation(self, ref: str) -> ConversationRecord:
        doc = self._resolve(self.conversations, ref, "conversation")
        record = _conversation(doc)
        record.message_count = self.messages.count_documents({"conversation_id": record.id})
        return record

    def list_conversations(
        self, *, experiment_id: str | None = None, batch_id: str | None = None, limit: int = 0
    ) -> list[ConversationRecord]:
        """Conversations in creation order, with their stored message counts (0: no limit)."""
        query: dict[str, Any] = {}
        if experiment_id:
            query["experiment_id"] = experiment_id
        if batch_id:
            query["batch_id"] = batch_id
        cursor = self.conversations.find(query).sort([("created_at", 1), ("index", 1)])
        docs = list(cursor.limit(limit))
        counts = {
            r["_id"]: r["n"]
            for r in self.messages.aggregate(
                [
                    {"$match": {"conversation_id": {"$in": [d["_id"] for d in docs]}}},
                    {"$group": {"_id": "$conversation_id", "n": {"$sum": 1}}},
                ]
            )
        }
        out = []
        for d in docs:
            rec = _conversation(d)
            rec.message_count = counts.get(rec.id, 0)
            out.append(rec)
        return out

    def mark_running(self, conv_id: str) -> None:
        self.conversations.update_one(
            {"_id": conv_id},
            {"$set": {"status": "running", "error": None, "started_at": now()}},
        )

    def finish_conversation(
        self,
        conv_id: str,
        status: str,
        transcript: Transcript | None,
        error: str | None = None,
        *,
        failed_call_retries: int = 0,
    ) -> None:
        """`failed_call_retries`: retries of the call that failed the conversation (counted
        in the batch's retries, as no stored message carries them)."""
        changes: dict[str, Any] = {"status": status, "error": error, "finished_at": now()}
        if transcript is not None:
            changes["usage"] = {k: _usage_doc(u) for k, u in transcript.usage().items()}
            changes["fallbacks"] = transcript.fallbacks
        update: dict[str, Any] = {"$set": changes}
        if failed_call_retries:
            update["$inc"] = {"failed_call_retries": failed_call_retries}
        self.conversations.update_one({"_id": conv_id}, update)

    def mark_interrupted(self, batch_id: str) -> int:
        """Running conversations of a stopped batch become `interrupted` (resume picks them up)."""
        return self.conversations.update_many(
            {"batch_id": batch_id, "status": "running"}, {"$set": {"status": "interrupted"}}
        ).modified_count

    def set_conversation_favourite(self, ref: str, favourite: bool) -> None:
        """Star (or unstar) a conversation for the current user; anyone's conversation."""
        doc = self._resolve(self.conversations, ref, "conversation")
        self._star(self.conversations, doc, favourite)

    def delete_conversation(self, ref: str) -> dict[str, int]:
        doc = self._resolve(self.conversations, ref, "conversation")
        self._check_owner(doc, "conversation", "delete")
        return self._delete_conversation_data([doc["_id"]])

    # --- messages, summaries, selector calls ----------------------------------------------

    def insert_message(self, conv_id: str, m: Message, batch_id: str | None = None) -> None:
        self._insert_once(
            self.messages,
            {
                "conversation_id": conv_id,
                "batch_id": batch_id,
                "day": m.day,
                "turn": m.turn,
                "speaker": m.speaker,
                "role": m.role,
                "content": m.content,
                "raw": m.raw,
                "empty": m.empty,
                "usage": _usage_doc(m.usage),
                "created_at": now(),
            },
        )

    def insert_summary(self, conv_id: str, s: Summary, batch_id: str | None = None) -> None:
        self._insert_once(
            self.summaries,
            {
                "conversation_id": conv_id,
                "batch_id": batch_id,
                "day": s.day,
                "content": s.content,
                "usage": _usage_doc(s.usage),
                "created_at": now(),
            },
        )

    def insert_selector_call(
        self, conv_id: str, c: SelectorCall, attempt: int, batch_id: str | None = None
    ) -> None:
        self._insert_once(
            self.selector_calls,
            {
                "conversation_id": conv_id,
                "batch_id": batch_id,
                "day": c.day,
                "turn": c.turn,
                "attempt": attempt,
                "answer": c.answer,
                "chosen": c.chosen,
                "usage": _usage_doc(c.usage),
                "created_at": now(),
            },
        )

    def _insert_once(self, collection: pymongo.collection.Collection, doc: dict) -> None:
        # A duplicate key means this exact record is already stored (a retried write whose
        # first attempt did land): nothing to do, and nothing duplicated.
        try:
            collection.insert_one(doc)
        except DuplicateKeyError:
            pass

    def load_transcript(self, conv_id: str, *, discard_partial: bool = False) -> Transcript:
        """Everything stored for a conversation, in order.

        With `discard_partial`, selector calls made for a turn whose message was never
        stored (the process died in between) are deleted first: that turn is redone whole.
        """
        query = {"conversation_id": conv_id}
        t = Transcript()
        for d in self.messages.find(query).sort([("day", 1), ("turn", 1)]):
            t.messages.append(
                Message(
                    day=d["day"],
                    turn=d["turn"],
                    speaker=d["speaker"],
                    role=d["role"],
                    content=d["content"],
                    raw=d.get("raw"),
                    empty=bool(d.get("empty")),
                    usage=_usage(d.get("usage")),
                )
            )
        for d in self.summaries.find(query).sort("day", 1):
            t.summaries.append(Summary(d["day"], d["content"], _usage(d.get("usage"))))
        spoken = {(m.day, m.turn) for m in t.messages}
        for d in self.selector_calls.find(query).sort([("day", 1), ("turn", 1), ("attempt", 1)]):
            if discard_partial and (d["day"], d["turn"]) not in spoken:
                self.selector_calls.delete_one({"_id": d["_id"]})
                continue
            t.selector_calls.append(
                SelectorCall(
                    d["day"], d["turn"], d["answer"], d.get("chosen"), _usage(d.get("usage"))
                )
            )
        t.fallbacks = count_fallbacks(t.selector_calls)
        return t

    # --- exports (issue 6): bookkeeping of `import-legacy` ---------------------------------

    _IMPORTABLE = ("experiments", "batches", "conversations")

    def imported(self, kind: str) -> dict[str, str]:
        """{prototype id: our id} of the experiments, batches or conversations imported so far."""
        assert kind in self._IMPORTABLE
        docs = self.db[kind].find({"legacy_id": {"$exists": True}}, {"legacy_id": 1})
        return {d["legacy_id"]: d["_id"] for d in docs}

    def mark_imported(
        self,
        kind: str,
        our_id: str,
        legacy_id: str,
        *,
        created_at: datetime | None = None,
        total: int | None = None,
        note: str = "",
    ) -> None:
        """Record the prototype id an imported record came from, its original date and note."""
        assert kind in self._IMPORTABLE
        changes: dict[str, Any] = {"legacy_id": legacy_id}
        if isinstance(created_at, datetime):
            changes["created_at"] = created_at
        if total is not None:
            changes["total"] = total
        if note:
            changes["note"] = note
        self.db[kind].update_one({"_id": our_id}, {"$set": changes})


def _lease_free(held: dict[str, Any], me: dict[str, Any]) -> bool:
    if held.get("host") == me["host"]:
        if held.get("pid") == me["pid"]:
            return True
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True  # killed or crashed: nobody runs the batch any more
        except (PermissionError, ValueError, KeyError, TypeError):
            pass
    beat = held.get("heartbeat")
    if not isinstance(beat, datetime):
        return True
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=timezone.utc)
    return now() - beat > timedelta(seconds=LEASE_SECONDS)


def _busy(batch_id: str, held: dict[str, Any] | None) -> UserError:
    who = f"process {held.get('pid')} on {held.get('host')}" if held else "another process"
    return UserError(
        f"Batch {batch_id} is being run right now by {who}. Wait for it to finish, or stop it "
        f"(Ctrl-C there, or kill it), then run `simulator resume {batch_id}` again."
    )


def count_fallbacks(calls: list[SelectorCall]) -> int:
    """Turns where every selector attempt was invalid, so round-robin chose."""
    by_turn: dict[tuple[int, int], list[SelectorCall]] = {}
    for c in calls:
        by_turn.setdefault((c.day, c.turn), []).append(c)
    return sum(
        1
        for attempts in by_turn.values()
        if len(attempts) == 1 + EXTRA_ATTEMPTS and all(a.chosen is None for a in attempts)
    )


_LISTING = {
    "experiment": "experiment list",
    "batch": "status",
    "conversation": "conversations EXPERIMENT",
}


def favourited_by(doc: dict) -> list[str]:
    """Who starred an experiment or conversation. Before stars were per person a document had
    one boolean `favourite`, set by its creator (the only one allowed): it is the creator's."""
    if "favourited_by" in doc:
        return list(doc["favourited_by"] or [])
    return [doc["creator"]] if doc.get("favourite") and doc.get("creator") else []


def refusal(creator: str | None, what: str, ref: str, action: str, user: str) -> str:
    """Why the current user may not change or delete someone else's experiment/conversation."""
    text = f"Only {creator}, who created {what} {ref}, can {action} it; you are {user}."
    if what == "experiment" and action != "delete":
        text += " Duplicate it (`simulator experiment duplicate`) to make your own copy."
    return text


def _definition(exp: Experiment) -> dict:
    d = experiment_to_dict(exp)
    for key in ("note", "favourite"):
        d.pop(key, None)  # kept top level: they change without changing the definition
    return d


def _grid_doc(grid: Grid) -> dict:
    return {
        "llms": [_model_to_doc(m) for m in grid.llms],
        "messages": grid.messages,
        "days": grid.days,
        "agents": dict(grid.agents),
        "speakers": list(grid.speakers),
        "every_day": grid.every_day,
        "every_combination": grid.every_combination,
        "repetitions": grid.repetitions,
        "seed": grid.seed,
    }


def _batch(doc: dict) -> BatchRecord:
    g = doc["grid"]
    grid = Grid(
        llms=[_model_from_doc(m) for m in g["llms"]],
        messages=g["messages"],
        days=g["days"],
        agents=dict(g["agents"]),
        speakers=list(g["speakers"]),
        every_day=g["every_day"],
        every_combination=g["every_combination"],
        repetitions=g["repetitions"],
        seed=g["seed"],
    )
    return BatchRecord(
        id=doc["_id"],
        experiment_id=doc["experiment_id"],
        grid=grid,
        total=doc["total"],
        status=doc["status"],
        creator=doc["creator"],
        created_at=doc["created_at"],
        prepared=bool(doc.get("prepared")),
        finished_at=doc.get("finished_at"),
        error=doc.get("error"),
        elapsed=float(doc.get("elapsed") or 0.0),
    )


def _conversation(doc: dict) -> ConversationRecord:
    spec = ConversationSpec(
        llm=_model_from_doc(doc["llm"]),
        messages=doc["messages"],
        days=doc["days"],
        agents=dict(doc["agents_per_role"]),
        speaker=doc["speaker_selection"],
        seed=doc["seed"],
        repetition=doc.get("repetition", 0),
    )
    return ConversationRecord(
        id=doc["_id"],
        experiment_id=doc["experiment_id"],
        batch_id=doc.get("batch_id"),
        index=doc.get("index", 0),
        spec=spec,
        agents=[Agent(**a) for a in doc.get("agents", [])],
        summarizer_prompt=doc.get("summarizer_prompt", ""),
        status=doc["status"],
        creator=doc.get("creator", ""),
        created_at=doc["created_at"],
        error=doc.get("error"),
        started_at=doc.get("started_at"),
        finished_at=doc.get("finished_at"),
        usage={k: _usage(v) for k, v in (doc.get("usage") or {}).items()},
        fallbacks=doc.get("fallbacks", 0),
        favourited_by=favourited_by(doc),
        note=doc.get("note", ""),
    )


def duplicate_experiment(store: Store, ref: str, edited: Experiment | None = None) -> Experiment:
    """Copy an experiment (anyone's) as the current user's, with a parent link.

    `edited` holds the changed definition when the copy is edited; the original is
    never touched.
    """
    original = store.get_experiment(ref)
    return store.insert_experiment(edited or original, parent_id=original.id)
