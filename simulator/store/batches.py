"""The only module that knows MongoDB document shapes (SPEC §8-9).

Everything goes in and out as dataclasses; callers never see a dict from Mongo.
Writes are idempotent where a retry or a resume could repeat them: a message is unique by
(conversation, day, turn), a summary by (conversation, day), a conversation by (batch,
index), so repeating a write can neither lose nor duplicate anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import random
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pymongo
from pymongo.database import Database
from pymongo.errors import (
    BulkWriteError,
    DocumentTooLarge,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

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
from simulator.errors import (
    LeaseLost,
    NotFoundError,
    PermissionDenied,
    RecordTooLarge,
    StorageError,
    UserError,
)
from simulator.estimate import ReplyLengths
from simulator.experiment import Experiment, ModelSpec, experiment_from_dict, experiment_to_dict
from simulator.grid import Grid
from simulator.quality import Quality
from simulator.status import UNFINISHED, BatchStatus, ConversationStatus

LEASE_SECONDS = 30.0  # a batch whose runner has not been heard of for this long is free
BEAT_SECONDS = 2.0  # heartbeats at most this far apart (and every third of the lease)
MAX_RECORD_MB = 16  # MongoDB's limit for one document
_TOO_LARGE_CODES = {10334, 17419, 17420}  # BSONObjectTooLarge and friends (server side)


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


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 conversation', '2 conversations', '1,204 messages' ('1 retry', '3 retries')."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {nouns or noun + 's'}"


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@dataclass
class ExperimentRow:
    """An experiment with what a listing shows about it."""

    experiment: Experiment
    conversations: int = 0


@dataclass
class LeaseHolder:
    """Who holds a batch's lease, as stored on the batch."""

    host: str
    pid: int
    heartbeat: datetime | None  # the server's time of its last heartbeat (UTC)
    seconds: float = LEASE_SECONDS  # silent for longer than this, the lease is free
    token: str | None = None

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host}"


@dataclass
class WorkerInfo:
    """A worker of a batch, as recorded on it (see Store.worker_lease)."""

    token: str
    host: str
    pid: int
    user: str
    heartbeat: datetime | None
    started_at: datetime | None = None
    alive: bool = False

    def __str__(self) -> str:
        return f"worker {self.token[:8]} (process {self.pid} on {self.host})"


@dataclass
class Lease:
    """This process's hold on a batch (see Store.batch_lease). Every conversation write
    of a run goes through `check()`: once the lease is lost or released, nothing more is
    written."""

    batch_id: str
    token: str
    host: str
    pid: int
    seconds: float = LEASE_SECONDS
    lost: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    taken_by: LeaseHolder | None = None  # who holds the batch now, when lost
    # False once a write's effect on the batch's running totals is uncertain (a write or
    # its $inc raised): the totals are then recounted rather than trusted after the run.
    tally_ok: bool = True
    writing: int = 0  # tallied writes in flight (see Store._tallying)
    writing_lock: threading.Lock = field(default_factory=threading.Lock)
    # A worker's lease (Store.worker_lease; see "conversation claims"): the batch is held
    # under the runner token `epoch` shared by every worker of the run, and each conversation
    # it claimed under its own `token`.
    epoch: str = ""
    worker: bool = False
    beat_at: float = field(default_factory=time.monotonic)  # its last heartbeat that landed
    conversations: set[str] = field(default_factory=set)  # claimed and not finished
    lost_conversations: set[str] = field(default_factory=set)  # taken over by another worker
    skew: timedelta = field(default_factory=timedelta)  # the server's clock minus ours
    pending: list[str] = field(default_factory=list)  # ids of pending conversations to try
    claiming: threading.Lock = field(default_factory=threading.Lock)

    @property
    def owner(self) -> str:
        """The runner token the batch is held under (and its running totals kept by)."""
        return self.epoch or self.token

    @property
    def held(self) -> bool:
        return not (self.lost.is_set() or self.released.is_set())

    def check(self, conv_id: str | None = None) -> None:
        """Raise LeaseLost unless this run still holds the batch (and, for a worker, the
        conversation `conv_id`)."""
        if self.worker and self.held and time.monotonic() - self.beat_at > self.seconds:
            # Not heard of for longer than the lease: others may have taken its
            # conversations over. Nothing is written until a heartbeat lands again.
            raise LeaseLost(
                f"This worker of batch {self.batch_id} was not heard from for "
                f"{self.seconds:g} s, so it stopped writing; its conversations are left to "
                "the workers that took them over."
            )
        if conv_id is not None and conv_id in self.lost_conversations:
            raise LeaseLost(
                f"Conversation {conv_id} was taken over by another worker (this one was not "
                f"heard from for {self.seconds:g} s), so this worker stopped writing to it."
            )
        if self.lost.is_set():
            who = str(self.taken_by) if self.taken_by else "another process"
            raise LeaseLost(
                f"Batch {self.batch_id} was taken over by {who} (this process was not heard "
                f"from for {self.seconds:g} s), so this run stopped writing to it. Everything "
                f"it stored is kept; see `simulator status {self.batch_id}`."
            )
        if self.released.is_set():
            raise LeaseLost(f"The run of batch {self.batch_id} in this process has ended.")

    def _lose(self, doc: dict | None) -> None:
        self.taken_by = _holder((doc or {}).get("runner"))
        self.lost.set()


@dataclass
class BatchRecord:
    id: str
    experiment_id: str
    grid: Grid
    total: int
    status: BatchStatus
    creator: str
    created_at: datetime
    prepared: bool = False
    finished_at: datetime | None = None
    error: str | None = None
    elapsed: float = 0.0  # seconds spent running, summed over every run and resume
    # The runner holding the batch's lease, if any, and whether it is alive: True when
    # its heartbeat is fresh by the server's clock (and, on this host, its process
    # exists); False when a runner is recorded but dead or silent; None when no runner is
    # recorded. Filled by get_batch / latest_batch / Store.fill_liveness.
    holder: LeaseHolder | None = None
    runner_alive: bool | None = None
    tally: BatchTally | None = None  # the running totals stored on the batch (see Store.progress)
    # The workers recorded on the batch (Store.worker_lease), None for a run before workers.
    workers: list[LeaseHolder] | None = None

    @property
    def stopped_unexpectedly(self) -> bool:
        """Stored as preparing/ready/running, but no live runner works on it: its process
        was killed or crashed. `simulator resume` continues it."""
        unended = self.status in (BatchStatus.PREPARING, BatchStatus.READY, BatchStatus.RUNNING)
        return unended and self.runner_alive is not True

    @property
    def shown_status(self) -> BatchStatus:
        """The status to show: `running` only while a live runner holds the lease."""
        return BatchStatus.INTERRUPTED if self.stopped_unexpectedly else self.status


@dataclass
class BatchTotals:
    """Messages, tokens, retries and failures of a batch (for status and summaries)."""

    messages: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    calls: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class BatchTally:
    """Conversations by status and the totals of a batch, as kept on the batch document.

    `owner` says when they can be trusted: `released` (the last run ended cleanly), a
    runner's lease token (that run keeps them up to date), `checked:<token>` (recounted after
    that runner died). Anything else, or none, means they are recounted.
    """

    counts: dict[str, int] = field(default_factory=dict)
    totals: BatchTotals = field(default_factory=BatchTotals)
    owner: str = ""


@dataclass
class Deleted:
    """What a delete removed."""

    experiments: int = 0
    batches: int = 0
    conversations: int = 0
    messages: int = 0
    summaries: int = 0
    selector_calls: int = 0


@dataclass
class DeletePlan:
    """An experiment the current user may delete, with what deleting it removes."""

    experiment: Experiment
    batches: int
    conversations: int


@dataclass
class ConversationRecord:
    id: str
    experiment_id: str
    batch_id: str | None
    index: int
    spec: ConversationSpec
    agents: list[Agent]
    summarizer_prompt: str
    status: ConversationStatus
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
    # Flag counts, selector figures and the `usable` verdict, set when it completed
    # (None before, and for conversations stored before quality flags existed).
    quality: Quality | None = None


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
        self._db = db
        self.user = user
        self._experiments = db["experiments"]
        self._batches = db["batches"]
        self._conversations = db["conversations"]
        self._messages = db["messages"]
        self._summaries = db["summaries"]
        self._selector_calls = db["selector_calls"]
        self._scores = db["scores"]
        self._annotation_sheets = db["annotation_sheets"]
        self._leases: dict[str, Lease] = {}  # batches this Store runs now, by id

    def as_user(self, user: str) -> Store:
        """The same database, with `user` as the creator of what it inserts (an importer
        keeps the creators of the records it copies)."""
        return Store(self._db, user)

    def server_client(self) -> pymongo.MongoClient:
        """The client of the store's server, to read another database on it (import-legacy)."""
        return self._db.client

    def is_own_database(self, other: Database) -> bool:
        """Whether `other` is the very database this store writes to."""
        return other.name == self._db.name and other.client.address == self._db.client.address

    @classmethod
    def open(cls, db: Database, user: str) -> Store:
        """A Store with its indexes in place."""
        store = cls(db, user)
        store.ensure_indexes()
        return store

    def indexes(self) -> tuple[IndexSpec, ...]:
        """The indexes this version of the store needs (see INDEXES)."""
        return INDEXES

    def ensure_indexes(self) -> None:
        """Create the indexes this version needs, once per database (issue 14).

        The names of the indexes created so far are recorded in `meta` ({_id: "indexes"}):
        a command whose indexes are all recorded makes one query instead of a round trip
        per index. A version that adds an index finds it missing from the record and
        creates it. Creating an index that exists is a no-op and the record only grows
        ($addToSet), so two processes starting at once are safe.
        """
        wanted = {_index_name(spec): spec for spec in self.indexes()}
        try:
            meta = self._db["meta"]
            record = meta.find_one({"_id": "indexes"}, {"created": 1}) or {}
            missing = [name for name in wanted if name not in set(record.get("created", ()))]
            if not missing:
                return
            for name in missing:
                collection, keys, unique = wanted[name]
                self._db[collection].create_index(list(keys), unique=unique)
            meta.update_one(
                {"_id": "indexes"}, {"$addToSet": {"created": {"$each": missing}}}, upsert=True
            )
        except DuplicateKeyError:  # two first upserts at once: the other one recorded them
            pass
        except PyMongoError as e:
            raise StorageError(f"Could not prepare the database: {e}") from e

    # --- ids ------------------------------------------------------------------------------

    def _resolve(
        self,
        collection: pymongo.collection.Collection,
        ref: str,
        what: str,
        projection: dict[str, Any] | None = None,
    ) -> dict:
        ref = ref.strip()
        if not re.fullmatch(r"[0-9a-fA-F]{1,24}", ref):
            raise NotFoundError(
                f"'{ref}' is not a valid {what} id: ids are hexadecimal, e.g. 3f2a9c01b7de "
                f"(list them with `simulator {_LISTING[what]}`)."
            )
        # A range rather than a regex: it walks the _id index from the prefix on. Ids are
        # lowercase hexadecimal, and "g" sorts after every hex digit.
        prefix = ref.lower()
        docs = list(
            collection.find({"_id": {"$gte": prefix, "$lt": prefix + "g"}}, projection)
            .sort("_id", 1)
            .limit(3)
        )
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
        self._experiments.insert_one(doc)
        return self._experiment(doc)

    def get_experiment(self, ref: str) -> Experiment:
        return self._experiment(self._resolve(self._experiments, ref, "experiment"))

    def find_experiment_or_batch(self, ref: str) -> tuple[str, Experiment, str | None]:
        """What `ref` names: an experiment (id prefix or name) or a batch (id prefix).

        Returns (kind, experiment, batch id or None). A name several experiments share
        prefers the current user's newest; an id prefix and a name both matching is refused.
        """
        ref = ref.strip()
        found: list[tuple[str, Experiment, str | None]] = []
        problems: list[NotFoundError] = []
        for what in ("experiment", "batch"):
            try:
                if what == "experiment":
                    found.append((what, self.get_experiment(ref), None))
                else:
                    b = self.get_batch(ref)
                    found.append((what, self.get_experiment(b.experiment_id), b.id))
            except NotFoundError as e:
                problems.append(e)
        named = list(
            self._experiments.find({"name": ref}, {"creator": 1, "created_at": 1}).limit(50)
        )
        if named:
            named.sort(key=lambda d: (d.get("creator") == self.user, d["created_at"]), reverse=True)
            found.append(("name", self.get_experiment(named[0]["_id"]), None))
        kinds_found = [k for k, _, _ in found]
        if kinds_found == ["experiment", "name"] and found[0][1].id == found[1][1].id:
            found.pop()  # its id starts with its own name
        if len(found) > 1:
            meanings = {
                "experiment": lambda e, b: f"experiment {e.id}",
                "batch": lambda e, b: f"batch {b}",
                "name": lambda e, b: f"experiment {e.id} (named '{ref}')",
            }
            kinds = " or ".join(meanings[k](e, b) for k, e, b in found)
            raise NotFoundError(
                f"'{ref}' could mean {kinds}: give more characters of the id you mean."
            )
        if found:
            return found[0]
        for problem in problems:
            if "more than one" in str(problem):
                raise problem
        raise NotFoundError(
            f"No experiment (by id or name) or batch (by id) matches '{ref}'. List them with "
            "`simulator experiment list` and `simulator status --all`."
        )

    def find_identical(self, exp: Experiment) -> Experiment | None:
        """The current user's experiment with exactly this definition, if one is stored."""
        doc = self._experiments.find_one(
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
        docs = list(self._experiments.find(query))
        docs.sort(key=lambda d: d["created_at"], reverse=True)
        docs.sort(key=lambda d: self.user not in favourited_by(d))
        counts = {
            row["_id"]: row["n"]
            for row in self._conversations.aggregate(
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
        doc = self._resolve(self._experiments, ref, "experiment")
        self._star(self._experiments, doc, favourite)
        return self._experiment(self._experiments.find_one({"_id": doc["_id"]}) or doc)

    def _update_experiment(self, ref: str, changes: dict, action: str) -> Experiment:
        doc = self._resolve(self._experiments, ref, "experiment")
        self._check_owner(doc, "experiment", action)
        self._experiments.update_one({"_id": doc["_id"]}, {"$set": changes})
        return self._experiment({**doc, **changes})

    def delete_plan(self, ref: str) -> DeletePlan:
        """Check that the current user may delete an experiment, and count what goes with it.

        Refused (PermissionDenied) unless the user created the experiment and every batch and
        conversation in it: deleting never removes what someone else created.
        """
        doc = self._resolve(self._experiments, ref, "experiment")
        self._check_owner(doc, "experiment", "delete")
        others: dict[str, int] = {}
        batches = list(
            self._batches.find(
                {"experiment_id": doc["_id"]},
                {"creator": 1, "legacy_id": 1, "total": 1, "tally.counts": 1},
            )
        )
        # A run's conversations are its batch creator's; only imported batches and
        # conversations without a batch can hold someone else's: those are counted one by one.
        mixed: list[dict[str, Any]] = [{"batch_id": None, "experiment_id": doc["_id"]}]
        mixed += [{"batch_id": b["_id"]} for b in batches if "legacy_id" in b]
        for match in mixed:
            for row in self._conversations.aggregate(
                [
                    {"$match": {**match, "creator": {"$ne": self.user}}},
                    {"$group": {"_id": "$creator", "n": {"$sum": 1}}},
                ]
            ):
                others[str(row["_id"])] = others.get(str(row["_id"]), 0) + row["n"]
        for b in batches:
            if b.get("creator") != self.user:
                who = str(b.get("creator"))
                others[who] = others.get(who, 0) + (0 if "legacy_id" in b else _batch_size(b))
        if others:
            whose = ", ".join(
                f"{who} ({plural(n, 'conversation')})" if n else f"{who} (a batch)"
                for who, n in sorted(others.items(), key=lambda kv: (-kv[1], kv[0]))
            )
            raise PermissionDenied(
                f"Experiment {doc['_id']} ('{doc.get('name')}') also holds what others created: "
                f"{whose}. Deleting it would delete their work, so it is refused. Ask them to "
                "delete their conversations first, or keep the experiment (mark it with "
                "`simulator experiment note`)."
            )
        loose = self._conversations.count_documents({"batch_id": None, "experiment_id": doc["_id"]})
        return DeletePlan(
            experiment=self._experiment(doc),
            batches=len(batches),
            conversations=loose + sum(_batch_size(b) for b in batches),
        )

    def delete_experiment(
        self, ref: str, on_progress: Callable[[int, int], None] | None = None
    ) -> Deleted:
        """Delete an experiment with its batches, conversations and messages.

        Only when the current user created it and everything in it (see delete_plan).
        `on_progress(conversations deleted, conversations in all)` is called as it goes.
        Deleted batch by batch, and only what the current user created, so a batch another
        user adds meanwhile survives (and then so does the experiment).
        """
        plan = self.delete_plan(ref)
        exp_id = plan.experiment.id
        total, done = plan.conversations, 0
        deleted = Deleted()
        report = on_progress or (lambda done, total: None)
        report(0, total)
        mine = {"experiment_id": exp_id, "creator": self.user}
        for batch in list(self._batches.find(mine, {"_id": 1})):
            # Records carry their batch id: one delete per collection, no list of ids.
            self._delete_records(deleted, {"batch_id": batch["_id"]})
            n = self._conversations.delete_many(
                {"batch_id": batch["_id"], "creator": self.user}
            ).deleted_count
            deleted.conversations += n
            deleted.batches += self._batches.delete_one({"_id": batch["_id"]}).deleted_count
            done += n
            report(min(done, total), total)
        # Conversations without a batch (older imports): their ids, a page at a time.
        while True:
            page = [
                d["_id"]
                for d in self._conversations.find({**mine, "batch_id": None}, {"_id": 1}).limit(500)
            ]
            if not page:
                break
            self._delete_conversation_data(page, deleted)
            done += len(page)
            report(min(done, total), total)
        if self._conversations.count_documents(
            {"experiment_id": exp_id}, limit=1
        ) or self._batches.count_documents({"experiment_id": exp_id}, limit=1):
            # Someone else started a batch on it while it was being deleted: theirs stays.
            self.delete_plan(exp_id or ref)  # names them
        deleted.experiments = self._experiments.delete_one({"_id": exp_id}).deleted_count
        return deleted

    def _delete_records(self, deleted: Deleted, query: dict[str, Any]) -> None:
        # Children first: an interrupted delete leaves a conversation without some messages
        # rather than messages without a conversation.
        deleted.messages += self._messages.delete_many(query).deleted_count
        deleted.summaries += self._summaries.delete_many(query).deleted_count
        deleted.selector_calls += self._selector_calls.delete_many(query).deleted_count
        self._scores.delete_many(query)  # a conversation's scores go with it (issue 11)

    def _delete_conversation_data(self, conv_ids: list[str], deleted: Deleted) -> None:
        self._delete_records(deleted, {"conversation_id": {"$in": conv_ids}})
        deleted.conversations += self._conversations.delete_many(
            {"_id": {"$in": conv_ids}}
        ).deleted_count

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
        self._batches.insert_one(doc)
        return _batch(doc)

    def get_batch(self, ref: str) -> BatchRecord:
        batch = _batch(self._resolve(self._batches, ref, "batch"))
        self.fill_liveness([batch])
        return batch

    def latest_batch(self) -> BatchRecord | None:
        doc = self._batches.find_one({"creator": self.user}, sort=[("created_at", -1)])
        if not doc:
            return None
        batch = _batch(doc)
        self.fill_liveness([batch])
        return batch

    def list_batches(
        self, experiment_id: str | None = None, *, creator: str | None = None, limit: int = 0
    ) -> list[BatchRecord]:
        """Batches, newest first: of one experiment, of one creator, or all (0: no limit)."""
        query: dict[str, Any] = {}
        if experiment_id:
            query["experiment_id"] = experiment_id
        if creator:
            query["creator"] = creator
        cursor = self._batches.find(query).sort("created_at", -1).limit(limit)
        batches = [_batch(d) for d in cursor]
        self.fill_liveness(batches)
        return batches

    def experiment_names(self, ids: Iterable[str]) -> dict[str, str]:
        """{experiment id: name} of the given experiments (those that exist)."""
        wanted = sorted(set(ids))
        docs = self._experiments.find({"_id": {"$in": wanted}}, {"name": 1})
        return {d["_id"]: d.get("name") or "" for d in docs}

    def server_time(self) -> datetime:
        """The database server's clock (UTC): leases are judged by it, never by ours, so
        runners on hosts whose clocks disagree still agree on who holds a batch."""
        return _utc(self._db.command("hello")["localTime"])

    def fill_liveness(self, batches: list[BatchRecord]) -> None:
        """Set `runner_alive` of batches read without it (one server-clock read for all)."""
        held = [b for b in batches if b.holder is not None]
        for b in batches:
            b.runner_alive = None
        if not held:
            return
        server_now = self.server_time()
        me = {"host": socket.gethostname(), "pid": -1}
        for b in held:
            assert b.holder is not None
            if b.workers and b.holder.token:  # a run of workers: any of them
                b.runner_alive = any(not _lease_free(w, me, server_now) for w in b.workers)
            else:
                b.runner_alive = not _lease_free(b.holder, me, server_now)

    def batch_liveness(self, ref: str) -> bool | None:
        """Whether a live runner holds the batch now (None: no runner recorded)."""
        return self.get_batch(ref).runner_alive

    @contextmanager
    def _heartbeats(
        self,
        lease: Lease,
        beat_once: Callable[[float], bool],
        counted: list[float],
        on_lost: Callable[[], None] | None,
        name: str,
        lock: threading.Lock | None = None,
    ) -> Iterator[None]:
        """A thread calling `beat_once(seconds since the last counted beat)` every third of
        the lease (at most BEAT_SECONDS apart: the running time a kill loses stays small),
        while the block runs. `counted[0]` is up to when the running time has been added.
        When a beat finds the lease gone (False), the lease is lost: every write through it
        is refused from then on, and `on_lost` is called (the runner stops). On the way out
        the thread stops and abandoned conversation threads write nothing more."""
        stop = threading.Event()
        guard = lock if lock is not None else contextlib.nullcontext()

        def beat() -> None:
            while not stop.wait(min(lease.seconds / 3, BEAT_SECONDS)):
                with guard:
                    t = time.monotonic()
                    try:
                        held = beat_once(t - counted[0])
                    except PyMongoError:
                        continue  # the batch's own writes report a lost database
                    counted[0] = t
                if not held:
                    lease._lose(self._batches.find_one({"_id": lease.batch_id}, {"runner": 1}))
                    if on_lost is not None:
                        on_lost()
                    return

        heart = threading.Thread(target=beat, name=name, daemon=True)
        heart.start()
        try:
            yield
        finally:
            stop.set()
            lease.released.set()  # abandoned conversation threads write nothing from now on
            heart.join(5)
            self._leases.pop(lease.batch_id, None)
            with lease.writing_lock:
                if lease.writing:  # a write still in flight may land uncounted
                    lease.tally_ok = False

    @contextmanager
    def batch_lease(
        self,
        batch_id: str,
        *,
        seconds: float = LEASE_SECONDS,
        on_lost: Callable[[], None] | None = None,
    ) -> Iterator[Lease]:
        """Hold the batch for this process while it runs, so that a second `resume` cannot
        run the same conversations at the same time (their turns would interleave).

        The lease is a random token with this host and pid and a heartbeat in the server's
        time, refreshed every `seconds`/3 (at most BEAT_SECONDS apart). A lease is free when its heartbeat is older than
        its `seconds` by the server's clock, or when its process on this host is gone
        (after a `kill -9`, resume may start at once). The heartbeat also adds the time
        since the last beat to the batch's `elapsed`, so a killed batch shows how long it
        ran. When a heartbeat finds the token gone (another process took the batch over),
        the lease is lost: every write through it is refused from then on, and `on_lost`
        is called (the runner stops).
        """
        lease = Lease(
            batch_id=batch_id,
            token=new_id(),
            host=socket.gethostname(),
            pid=os.getpid(),
            seconds=seconds,
        )
        self._claim(lease)
        self._leases[batch_id] = lease
        mine = {"_id": batch_id, "runner.token": lease.token}
        lock = threading.Lock()  # the last heartbeat and the release never both add `elapsed`

        def beat_once(elapsed: float) -> bool:
            update = {"$currentDate": {"runner.heartbeat": True}, "$inc": {"elapsed": elapsed}}
            return self._batches.update_one(mine, update).matched_count > 0

        counted = [time.monotonic()]  # up to when `elapsed` has been added
        try:
            with self._heartbeats(lease, beat_once, counted, on_lost, "batch-lease", lock):
                yield lease
        finally:
            with lock:
                try:
                    release: dict[str, Any] = {
                        "$unset": {"runner": ""},
                        "$inc": {"elapsed": time.monotonic() - counted[0]},
                    }
                    # The totals stay trusted only when every write of this run added to them.
                    done = (
                        lease.tally_ok
                        and self._batches.update_one(
                            {**mine, "tally.owner": lease.token},
                            {**release, "$set": {"tally.owner": TALLY_RELEASED}},
                        ).matched_count
                    )
                    if not done:
                        self._batches.update_one(mine, release)
                except PyMongoError:
                    pass  # unreleased, it expires; a dead pid on this host frees it at once

    def _claim(self, lease: Lease, *, free: bool = False) -> None:
        """Take the batch if its lease is free: a compare-and-swap on the runner read,
        judged by the server's clock."""
        rows = list(
            self._batches.aggregate(
                [
                    {"$match": {"_id": lease.batch_id}},
                    {"$project": {"runner": 1, "tally.owner": 1, "now": "$$NOW"}},
                ]
            )
        )
        if not rows:
            raise NotFoundError(f"Batch {lease.batch_id} does not exist any more.")
        held = rows[0].get("runner")
        server_now = _utc(rows[0]["now"])
        me = {"host": lease.host, "pid": lease.pid}
        holder = _holder(held)
        # `free`: the caller judged the run gone by its workers (Store.worker_lease)
        if holder is not None and not free and not _lease_free(holder, me, server_now):
            raise _busy(lease.batch_id, holder)
        runner = {
            "host": lease.host,
            "pid": lease.pid,
            "token": lease.token,
            "seconds": lease.seconds,
            "heartbeat": server_now,
        }
        owner = (rows[0].get("tally") or {}).get("owner")
        # Totals exact as the last run left them carry over; otherwise they are recounted
        # (the previous runner was killed between a write and its count, or none are kept).
        kept = owner is not None and _tally_trusted(owner, holder, alive=False)
        query: dict[str, Any] = {"_id": lease.batch_id, "runner": held}
        claim: dict[str, Any] = {"runner": runner}
        if kept:
            query["tally.owner"] = owner
            claim["tally.owner"] = lease.token
        claimed = self._batches.update_one(query, {"$set": claim})
        if claimed.matched_count == 0:  # another process claimed it in between
            doc = self._batches.find_one({"_id": lease.batch_id}, {"runner": 1}) or {}
            raise _busy(lease.batch_id, _holder(doc.get("runner")))
        if not kept:
            tally = self._recount(lease.batch_id)
            self._batches.update_one(
                {"_id": lease.batch_id, "runner.token": lease.token},
                {"$set": {"tally": _tally_doc(tally, lease.token)}},
            )

    def set_batch_status(
        self,
        batch_id: str,
        status: str,
        error: str | None = None,
        *,
        elapsed: float = 0.0,
        lease: Lease | None = None,
    ) -> bool:
        """Set the status; `elapsed` (seconds) adds to the batch's running time (a run
        holding a lease has its time added by the lease instead). With `lease`, only
        while the lease is held. Returns whether the batch was updated."""
        status = BatchStatus(status)
        changes: dict[str, Any] = {"status": status.value, "error": error}
        if status.finished:
            changes["finished_at"] = now()
        update: dict[str, Any] = {"$set": changes}
        if elapsed:
            update["$inc"] = {"elapsed": elapsed}
        query: dict[str, Any] = {"_id": batch_id}
        if lease is not None:
            lease.check()
            query["runner.token"] = lease.owner
        return self._batches.update_one(query, update).matched_count == 1

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
                self._insert_counted(batch.id, buffer)
                buffer = []
        if buffer:
            self._insert_counted(batch.id, buffer)
        self._batches.update_one({"_id": batch.id}, {"$set": {"prepared": True, "status": "ready"}})

    def _insert_counted(self, batch_id: str, docs: list[dict]) -> None:
        with self._tallying(batch_id, None) as held:
            n = self._insert_ignoring_duplicates(docs)
            if held is not None:
                self._tally_add(held, {f"counts.{ConversationStatus.PENDING.value}": n})

    def _insert_ignoring_duplicates(self, docs: list[dict]) -> int:
        """Insert what is not stored yet; returns how many were inserted."""
        try:
            return len(self._conversations.insert_many(docs, ordered=False).inserted_ids)
        except BulkWriteError as e:
            if any(err.get("code") != 11000 for err in e.details.get("writeErrors", [])):
                raise
            return int(e.details.get("nInserted", 0))

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
            "factors": dict(spec.factors),  # factor name -> level, beside the composed prompts
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
            docs = list(self._conversations.find(query).sort("index", 1).limit(page))
            for doc in docs:
                yield _conversation(doc)
            if len(docs) < page:
                return
            last = docs[-1]["index"]

    def count_unfinished(self, batch_id: str) -> int:
        return self._conversations.count_documents(
            {"batch_id": batch_id, "status": {"$in": list(UNFINISHED)}}
        )

    def batch_counts(self, batch_id: str) -> dict[str, int]:
        rows = self._conversations.aggregate(
            [{"$match": {"batch_id": batch_id}}, {"$group": {"_id": "$status", "n": {"$sum": 1}}}]
        )
        return {r["_id"]: r["n"] for r in rows}

    def count_unusable(self, batch_id: str) -> int:
        """Completed conversations of the batch whose quality verdict is `usable: false`."""
        return self._conversations.count_documents({"batch_id": batch_id, "usable": False})

    def batch_totals(self, batch_id: str) -> BatchTotals:
        """Messages, tokens, retries and failures of a batch (for status and summaries)."""
        # Matched on the batch id every record carries: matching a list of the batch's
        # conversation ids instead takes seconds on the embedded server for 1,000 of them.
        totals = BatchTotals()
        for coll in (self._messages, self._summaries, self._selector_calls):
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
                if coll is self._messages:
                    totals.messages = row["n"]
                totals.prompt_tokens += row["prompt_tokens"]
                totals.completion_tokens += row["completion_tokens"]
                totals.retries += row["retries"]
                totals.calls += row["calls"]
        # Retries of calls that failed for good are kept on their conversation (no message holds them).
        for row in self._conversations.aggregate(
            [
                {"$match": {"batch_id": batch_id, "failed_call_retries": {"$gt": 0}}},
                {"$group": {"_id": None, "retries": {"$sum": "$failed_call_retries"}}},
            ]
        ):
            totals.retries += row["retries"] or 0
        totals.failures = self.batch_failures(batch_id)
        return totals

    def batch_failures(self, batch_id: str) -> list[tuple[str, str]]:
        """(conversation id, error) of the batch's failed conversations."""
        return [
            (d["_id"], d.get("error") or "")
            for d in self._conversations.find(
                {"batch_id": batch_id, "status": "failed"}, {"error": 1}
            )
        ]

    # --- running totals of a batch ----------------------------------------------------------
    # `status` shows them from the batch document instead of counting every conversation and
    # message. Every write of a run adds to them ($inc) while its lease holds them; a write
    # made without the batch's lease marks them stale; a run killed between a write and its
    # count leaves them untrusted. Untrusted totals are recounted (and stored again).

    def batch_progress(self, batch: BatchRecord) -> BatchTally:
        """Conversations by status and the totals of a batch (failures included)."""
        t = batch.tally
        holder = batch.holder
        if t is not None and _tally_trusted(t.owner, holder, alive=batch.runner_alive is True):
            tally = BatchTally(dict(t.counts), dataclasses.replace(t.totals), t.owner)
            tally.totals.failures = self.batch_failures(batch.id) if t.counts.get("failed") else []
            return tally
        tally = self._recount(batch.id)
        tally.totals.failures = self.batch_failures(batch.id)
        query: dict[str, Any] | None = None
        if holder is None and batch.status.finished:
            query = {"_id": batch.id, "runner": {"$exists": False}}
            tally.owner = TALLY_RELEASED
        elif holder is not None and batch.runner_alive is False and holder.token:
            query = {"_id": batch.id, "runner.token": holder.token}
            tally.owner = f"{TALLY_CHECKED}{holder.token}"
        if query is not None:
            query["tally.owner"] = t.owner if t is not None else {"$exists": False}
            self._batches.update_one(query, {"$set": {"tally": _tally_doc(tally, tally.owner)}})
        return tally

    def _recount(self, batch_id: str) -> BatchTally:
        counts = self.batch_counts(batch_id)
        totals = self.batch_totals(batch_id)
        totals.failures = []
        return BatchTally(counts, totals)

    def _batch_of(self, conv_id: str, lease: Lease | None) -> str | None:
        if lease is not None:
            return lease.batch_id
        doc = self._conversations.find_one({"_id": conv_id}, {"batch_id": 1})
        return doc.get("batch_id") if doc else None

    @contextmanager
    def _tallying(self, batch_id: str | None, lease: Lease | None) -> Iterator[Lease | None]:
        """Around a write that changes a batch's totals: yields the lease whose totals it
        adds to, or None (the totals are marked stale first). A write that fails, or is
        still in flight when the run ends, leaves the totals to be recounted."""
        if not batch_id:
            yield None
            return
        held = lease if lease is not None else self._leases.get(batch_id)
        if held is None or held.batch_id != batch_id:
            self._tally_stale(batch_id)
            yield None
            return
        with held.writing_lock:
            held.writing += 1
        try:
            yield held
        except LeaseLost:
            raise  # refused before anything was written
        except BaseException:
            held.tally_ok = False
            raise
        finally:
            with held.writing_lock:
                held.writing -= 1

    def _tally_add(self, lease: Lease, inc: dict[str, int]) -> None:
        changes = {f"tally.{k}": v for k, v in inc.items() if v}
        if changes:
            self._batches.update_one(
                {"_id": lease.batch_id, "tally.owner": lease.owner}, {"$inc": changes}
            )

    def _tally_stale(self, batch_id: str) -> None:
        self._batches.update_one(
            {"_id": batch_id, "tally": {"$exists": True}}, {"$unset": {"tally": ""}}
        )

    # === conversation claims (issue 13: many workers, one batch) ============================
    # Any number of worker processes, on any machines, run one batch together. Each joins
    # the batch (`worker_lease`): the batch's `runner` holds the run's token (the epoch, the
    # owner of the running totals), `workers.<token>` each worker's host, pid and heartbeat.
    # A worker claims one conversation at a time (`claim_conversation`, a find_one_and_update
    # that stamps `claim`: its token, host, pid, epoch and a server-time heartbeat); its
    # heartbeat refreshes the claims it holds. A conversation is claimable when pending or
    # interrupted, failed in an earlier run, or running under a worker that is gone: a claim
    # from an earlier run, a claim whose heartbeat is older than the lease's seconds, or one
    # of a worker known dead (its pid gone on this host). A worker that loses a claim writes
    # nothing more to that conversation (fencing: `Lease.check(conv_id)`, `_fence`).

    @contextmanager
    def worker_lease(
        self,
        batch_id: str,
        *,
        seconds: float = LEASE_SECONDS,
        join: bool = True,
        on_lost: Callable[[], None] | None = None,
        on_last: Callable[[], tuple[BatchStatus, str | None] | None] | None = None,
    ) -> Iterator[Lease]:
        """Work on a batch as one of its workers. `join`: work alongside live workers
        (else a live run of the batch refuses, as `resume` always did). `on_last`: the
        status to set when this worker leaves last and the batch is still `running`."""
        lease = Lease(
            batch_id=batch_id,
            token=new_id(),
            host=socket.gethostname(),
            pid=os.getpid(),
            seconds=seconds,
            worker=True,
        )
        self._join(lease, join=join)
        self._leases[batch_id] = lease
        counted = [time.monotonic()]
        try:
            with self._heartbeats(
                lease, lambda elapsed: self._beat(lease, elapsed), counted, on_lost, "worker-lease"
            ):
                yield lease
        finally:
            try:
                self._leave(lease, time.monotonic() - counted[0], on_last)
            except PyMongoError:
                pass  # unreleased, its heartbeat goes stale and others take over

    def _join(self, lease: Lease, *, join: bool) -> None:
        for _ in range(20):
            rows = list(
                self._batches.aggregate(
                    [
                        {"$match": {"_id": lease.batch_id}},
                        {"$project": {"runner": 1, "workers": 1, "now": "$$NOW"}},
                    ]
                )
            )
            if not rows:
                raise NotFoundError(f"Batch {lease.batch_id} does not exist any more.")
            doc = rows[0]
            server_now = _utc(doc["now"])
            lease.skew = server_now - datetime.now(timezone.utc)
            me = {"host": lease.host, "pid": lease.pid}
            holder = _holder(doc.get("runner"))
            live = _live_workers(doc.get("workers"), me, server_now)
            if holder is not None and holder.token and doc.get("workers"):
                alive = bool(live)  # a run of workers: alive while one of them is
            else:
                alive = holder is not None and not _lease_free(holder, me, server_now)
            if alive:
                assert holder is not None
                if not join or not live or not holder.token:
                    raise _busy(lease.batch_id, live[0] if live else holder)
                set_ = {f"workers.{lease.token}.{k}": v for k, v in self._worker_doc(lease).items()}
                set_[f"workers.{lease.token}.heartbeat"] = server_now
                joined = self._batches.update_one(
                    {"_id": lease.batch_id, "runner.token": holder.token}, {"$set": set_}
                )
                if joined.matched_count:
                    lease.epoch = holder.token
                    return
                continue  # the run ended in between: start one
            try:
                self._claim(lease, free=True)
            except UserError:
                if join:
                    continue  # another worker started the run in between: join it
                raise
            lease.epoch = lease.token
            worker = {**self._worker_doc(lease), "heartbeat": server_now}
            self._batches.update_one(
                {"_id": lease.batch_id, "runner.token": lease.token},
                {"$set": {"workers": {lease.token: worker}}},
            )
            return
        raise _busy(lease.batch_id, None)

    def _worker_doc(self, lease: Lease) -> dict[str, Any]:
        return {
            "host": lease.host,
            "pid": lease.pid,
            "user": self.user,
            "seconds": lease.seconds,
            "started_at": now(),
        }

    def _beat(self, lease: Lease, elapsed: float) -> bool:
        """One heartbeat: the batch's and this worker's, then its claims'. False when the
        run was taken over or this worker was given up for dead (it then writes nothing)."""
        sent = time.monotonic()
        update: dict[str, Any] = {
            "$currentDate": {"runner.heartbeat": True, f"workers.{lease.token}.heartbeat": True}
        }
        if lease.token == lease.owner:  # the run's time is counted by the worker that began it
            update["$inc"] = {"elapsed": elapsed}
        mine = {
            "_id": lease.batch_id,
            "runner.token": lease.owner,
            f"workers.{lease.token}": {"$exists": True},
        }
        if self._batches.update_one(mine, update).matched_count == 0:
            return False
        held = set(lease.conversations)
        if held:
            claims = {"_id": {"$in": sorted(held)}, "claim.token": lease.token}
            beat = self._conversations.update_many(
                claims, {"$currentDate": {"claim.heartbeat": True}}
            )
            if beat.matched_count < len(held):
                still = {d["_id"] for d in self._conversations.find(claims, {"_id": 1})}
                lease.lost_conversations |= held - still
                lease.conversations -= held - still
        lease.beat_at = sent
        return True

    def claim_conversation(
        self, lease: Lease, *, dead: Iterable[str] = ()
    ) -> ConversationRecord | None:
        """Claim a conversation of the batch that needs work, or None when none does.

        Pending ones first, from a page of their ids (in grid order, shuffled so that
        workers rarely reach for the same one), each taken by its id if still pending;
        then those left by a worker that is gone, or failed in an earlier run.
        """
        lease.check()
        waiting = [ConversationStatus.PENDING.value, ConversationStatus.INTERRUPTED.value]
        while True:
            with lease.claiming:
                if not lease.pending:
                    page = self._conversations.find(
                        {"batch_id": lease.batch_id, "status": {"$in": waiting}}, {"_id": 1}
                    )
                    lease.pending = [d["_id"] for d in page.sort("index", 1).limit(64)]
                    random.shuffle(lease.pending)
                    if not lease.pending:
                        break
                conv_id = lease.pending.pop()
            record = self._take(lease, {"_id": conv_id, "status": {"$in": waiting}})
            if record is not None:
                return record
        epoch = lease.owner
        running = ConversationStatus.RUNNING.value
        stale = datetime.now(timezone.utc) + lease.skew - timedelta(seconds=lease.seconds)
        ways: list[dict[str, Any]] = [
            {"status": {"$in": waiting}},
            {"status": ConversationStatus.FAILED.value, "claim.epoch": {"$ne": epoch}},
            {"status": running, "claim.epoch": {"$ne": epoch}},
            {"status": running, "claim.heartbeat": {"$lt": stale}},
        ]
        if dead:
            ways.append({"status": running, "claim.token": {"$in": sorted(dead)}})
        return self._take(lease, {"batch_id": lease.batch_id, "$or": ways}, sort=True)

    def _take(
        self, lease: Lease, query: dict[str, Any], *, sort: bool = False
    ) -> ConversationRecord | None:
        epoch = lease.owner
        running = ConversationStatus.RUNNING.value
        claim = {
            "token": lease.token,
            "epoch": epoch,
            "host": lease.host,
            "pid": lease.pid,
            "user": self.user,
        }
        update = {
            "$set": {
                "status": running,
                "error": None,
                "started_at": now(),
                "lease": lease.token,
                **{f"claim.{k}": v for k, v in claim.items()},
            },
            "$currentDate": {"claim.heartbeat": True},
        }
        with self._tallying(lease.batch_id, lease) as held:
            before = self._conversations.find_one_and_update(
                query, update, sort=[("index", 1)] if sort else None
            )
            if before is not None and held is not None:
                self._tally_add(held, _moved(before.get("status"), running))
        if before is None:
            return None
        lease.conversations.add(before["_id"])
        lease.lost_conversations.discard(before["_id"])  # claimed again
        if before.get("status") == running and (before.get("claim") or {}).get("epoch") == epoch:
            # taken from a worker of this run that stopped answering: it may have died
            # between a write and its count
            self._tally_stale(lease.batch_id)
        return _conversation(before)

    def release_claim(self, lease: Lease, conv_id: str) -> None:
        """This worker is done with the conversation (its status says how it ended)."""
        lease.conversations.discard(conv_id)

    def _fence(
        self, conv_ids: list[str], lease: Lease, outcome: list[BaseException | None]
    ) -> set[int]:
        """Positions of records whose conversation this worker no longer holds: refused.

        No read of the database: a claim can only be taken over once its heartbeat is
        older than the lease's seconds, and a worker whose own last heartbeat is that old
        writes nothing (Lease.check); a claim found taken by a heartbeat is in
        `lost_conversations`."""
        refused = set()
        for i, conv_id in enumerate(conv_ids):
            try:
                lease.check(conv_id)
            except LeaseLost as e:
                refused.add(i)
                outcome[i] = e
        return refused

    def reap_workers(self, lease: Lease) -> set[str]:
        """Tokens of the batch's workers that are gone (dead pid on this host, or silent for
        longer than their lease), removed from the batch; the totals, which one of them
        may have left between a write and its count, are recounted."""
        rows = list(
            self._batches.aggregate(
                [
                    {"$match": {"_id": lease.batch_id}},
                    {"$project": {"workers": 1, "now": "$$NOW"}},
                ]
            )
        )
        if not rows:
            return set()
        server_now = _utc(rows[0]["now"])
        me = {"host": lease.host, "pid": lease.pid}
        dead = set()
        for token, w in (rows[0].get("workers") or {}).items():
            holder = _holder(w)
            if token != lease.token and holder is not None and _lease_free(holder, me, server_now):
                dead.add(token)
        if dead:
            self._batches.update_one(
                {"_id": lease.batch_id, "runner.token": lease.owner},
                {"$unset": {f"workers.{t}": "" for t in dead}},
            )
            self._tally_stale(lease.batch_id)
        return dead

    def claimed_by_others(self, lease: Lease) -> int:
        """Conversations of the batch running under another worker's claim."""
        return self._conversations.count_documents(
            {
                "batch_id": lease.batch_id,
                "status": ConversationStatus.RUNNING.value,
                "claim.token": {"$ne": lease.token},
            }
        )

    def other_workers(self, lease: Lease) -> int:
        """Live workers of the batch other than this one."""
        self.reap_workers(lease)
        doc = self._batches.find_one({"_id": lease.batch_id}, {"workers": 1}) or {}
        return len([t for t in (doc.get("workers") or {}) if t != lease.token])

    def _leave(
        self,
        lease: Lease,
        elapsed: float,
        on_last: Callable[[], tuple[BatchStatus, str | None] | None] | None,
    ) -> None:
        dead = self.reap_workers(lease)
        update: dict[str, Any] = {"$unset": {f"workers.{lease.token}": ""}}
        if lease.token == lease.owner:
            update["$inc"] = {"elapsed": elapsed}
        doc = self._batches.find_one_and_update(
            {"_id": lease.batch_id, "runner.token": lease.owner},
            update,
            {"workers": 1, "status": 1},
            return_document=pymongo.ReturnDocument.AFTER,
        )
        if doc is None:
            return  # the run was taken over: nothing of it is this worker's to end
        if not lease.tally_ok or dead:
            self._tally_stale(lease.batch_id)
        if doc.get("workers"):
            return  # others still work on it: the last one ends the run
        mine = {"_id": lease.batch_id, "runner.token": lease.owner, "workers": {}}
        if doc.get("status") == BatchStatus.RUNNING.value and on_last is not None:
            final = on_last()
            if final is not None:
                status, reason = final
                changes: dict[str, Any] = {"status": status.value, "error": reason}
                if status.finished:
                    changes["finished_at"] = now()
                self._batches.update_one(
                    {**mine, "status": BatchStatus.RUNNING.value}, {"$set": changes}
                )
        release: dict[str, Any] = {"$unset": {"runner": ""}}
        done = (
            lease.tally_ok
            and self._batches.update_one(
                {**mine, "tally.owner": lease.owner},
                {**release, "$set": {"tally.owner": TALLY_RELEASED}},
            ).matched_count
        )
        if not done:
            self._batches.update_one(mine, release)

    def batch_workers(self, batch: BatchRecord) -> list[WorkerInfo]:
        """The workers recorded on a batch, each with whether it is alive now."""
        doc = self._batches.find_one({"_id": batch.id}, {"workers": 1}) or {}
        workers = doc.get("workers") or {}
        if not workers:
            return []
        server_now = self.server_time()
        me = {"host": socket.gethostname(), "pid": -1}
        out = []
        for token, w in workers.items():
            holder = _holder(w)
            assert holder is not None
            out.append(
                WorkerInfo(
                    token=token,
                    host=holder.host,
                    pid=holder.pid,
                    user=str(w.get("user") or ""),
                    heartbeat=holder.heartbeat,
                    started_at=w.get("started_at"),
                    alive=not _lease_free(holder, me, server_now),
                )
            )
        return out

    def batch_tokens(self, batch_id: str) -> int:
        """Prompt and completion tokens the batch has used (for --max-tokens): from its
        running totals when kept, else counted."""
        doc = self._batches.find_one({"_id": batch_id}, {"tally": 1}) or {}
        tally = _tally(doc.get("tally"))
        totals = tally.totals if tally is not None else self.batch_totals(batch_id)
        return totals.prompt_tokens + totals.completion_tokens

    def batch_usage_by_model(
        self, batch_id: str, exp: Experiment
    ) -> list[tuple[str, str, int, int]]:
        """(kind, model label, prompt tokens, completion tokens) of the batch's stored
        records, by the model that made them (for --max-cost)."""
        labels = {
            d["_id"]: (d.get("llm") or {}).get("label", "")
            for d in self._conversations.find({"batch_id": batch_id}, {"llm.label": 1})
        }
        summarizer = exp.summarizer.llm.label if exp.summarizer.llm else None
        selector = exp.selector_llm.label if exp.selector_llm else None
        out: dict[tuple[str, str], list[int]] = {}
        for kind, coll, fixed in (
            ("message", self._messages, None),
            ("summary", self._summaries, summarizer),
            ("selector", self._selector_calls, selector),
        ):
            for row in coll.aggregate(
                [
                    {"$match": {"batch_id": batch_id}},
                    {
                        "$group": {
                            "_id": "$conversation_id",
                            "p": {"$sum": "$usage.prompt_tokens"},
                            "c": {"$sum": "$usage.completion_tokens"},
                        }
                    },
                ]
            ):
                label = fixed or labels.get(row["_id"], "")
                sums = out.setdefault((kind, label), [0, 0])
                sums[0] += int(row["p"] or 0)
                sums[1] += int(row["c"] or 0)
        return [(k, label, p, c) for (k, label), (p, c) in out.items()]

    # === end of conversation claims =========================================================

    # --- conversations --------------------------------------------------------------------

    def get_conversation(self, ref: str) -> ConversationRecord:
        doc = self._resolve(self._conversations, ref, "conversation")
        record = _conversation(doc)
        record.message_count = self._messages.count_documents({"conversation_id": record.id})
        return record

    def list_conversations(
        self,
        *,
        experiment_id: str | None = None,
        batch_id: str | None = None,
        where: dict[str, str] | None = None,
        limit: int = 0,
        prompts: bool = False,
        message_counts: bool = True,
        factors: dict[str, list[str]] | None = None,
    ) -> list[ConversationRecord]:
        """Conversations in creation order, with their stored message counts (0: no limit;
        `message_counts=False` leaves them 0, which saves reading every message).

        `where` filters by condition (see CONVERSATION_FILTERS), e.g. {"llm": "llama3",
        "agents_guard": "2", "status": "failed"}. Without `prompts` the records leave out the
        composed prompts (agents' system prompts and the summarizer's): a listing does not
        need them, and they are most of a conversation's size. `factors` (the experiment's
        factor levels) lets `where` name factors too.
        """
        conditions = conversation_filter(where or {}, factors)
        projection = None if prompts else {"agents.system_prompt": 0, "summarizer_prompt": 0}
        if limit:
            docs = list(
                itertools.islice(
                    self._conversation_pages(experiment_id, batch_id, conditions, projection),
                    limit,
                )
            )
        else:
            query: dict[str, Any] = dict(conditions)
            if experiment_id:
                query["experiment_id"] = experiment_id
            if batch_id:
                query["batch_id"] = batch_id
            # Sorted here: the embedded server sorts thousands of documents slowly.
            docs = list(self._conversations.find(query, projection))
            docs.sort(key=lambda d: (d["created_at"], d.get("index", 0)))
        counts = self._message_counts(docs) if message_counts else {}
        out = []
        for d in docs:
            rec = _conversation(d)
            rec.message_count = counts.get(rec.id, 0)
            out.append(rec)
        return out

    def _conversation_pages(
        self,
        experiment_id: str | None,
        batch_id: str | None,
        conditions: dict[str, Any],
        projection: dict[str, Any] | None,
        page: int = 200,
    ) -> Iterator[dict]:
        """Conversations in creation order, read a range of grid indexes at a time: the
        first few cost a few documents, not the experiment's thousands (the embedded server
        reads every document a query's index range holds, whatever the limit). Conditions
        are checked here, so that the (batch, index) range is what the server looks up."""
        if batch_id:
            batches = [batch_id]
        else:
            # Conversations without a batch (older imports) come first: they are older.
            loose = self._conversations.find(
                {"batch_id": None, "experiment_id": experiment_id, **conditions}, projection
            )
            yield from sorted(loose, key=lambda d: (d["created_at"], d.get("index", 0)))
            batches = [
                b["_id"]
                for b in self._batches.find(
                    {"experiment_id": experiment_id}, {"created_at": 1}
                ).sort("created_at", 1)
            ]
        for b in batches:
            start = 0
            while True:
                docs = list(
                    self._conversations.find(
                        {"batch_id": b, "index": {"$gte": start, "$lt": start + page}}, projection
                    ).sort("index", 1)
                )
                if experiment_id:
                    docs = [d for d in docs if d.get("experiment_id") == experiment_id]
                yield from (d for d in docs if _matches(d, conditions))
                if not docs and not self._conversations.count_documents(
                    {"batch_id": b, "index": {"$gte": start}}, limit=1
                ):
                    break
                start += page

    def _message_counts(self, docs: list[dict]) -> dict[str, int]:
        """Stored messages per conversation, for these conversation documents.

        Up to 200 conversations: matched by id. More: counted over their whole batches, matched by
        the batch id every message carries (a list of thousands of ids is slow to match).
        """
        if not docs:
            return {}
        wanted = {d["_id"] for d in docs}
        batch_ids = {d.get("batch_id") for d in docs}
        groups: list[dict[str, Any]]
        if len(docs) <= 200 or None in batch_ids:
            # In lists of 50: the embedded server matches a list in time growing with its square.
            ids = sorted(wanted)
            groups = [{"conversation_id": {"$in": ids[i : i + 50]}} for i in range(0, len(ids), 50)]
        else:
            groups = [{"batch_id": b} for b in sorted(str(b) for b in batch_ids)]
        counts: dict[str, int] = {}
        for match in groups:
            for r in self._messages.aggregate(
                [{"$match": match}, {"$group": {"_id": "$conversation_id", "n": {"$sum": 1}}}]
            ):
                if r["_id"] in wanted:
                    counts[r["_id"]] = r["n"]
        return counts

    def transcripts(
        self, records: Iterable[ConversationRecord], chunk: int = 50
    ) -> Iterator[tuple[ConversationRecord, Transcript]]:
        """Each record with its stored transcript, a batch at a time.

        Many conversations of one batch (more than `chunk`) are read whole, four queries for
        the batch, sorted by conversation so that one conversation at a time is in memory;
        they come in the order of their ids. Others come in the records' order, three
        queries per `chunk` conversations. (SecantusDB matches a `$in` list in time growing
        with its square: 50 ids take 30 ms, 1,000 take 6 s.)"""
        records = list(records)
        by_batch: dict[str | None, list[ConversationRecord]] = {}
        for rec in records:
            by_batch.setdefault(rec.batch_id, []).append(rec)
        whole = {b for b, recs in by_batch.items() if b is not None and len(recs) > chunk}
        for b in whole:
            yield from self._batch_transcripts(b, {r.id: r for r in by_batch[b]})
        batch: list[ConversationRecord] = []
        for rec in (r for r in records if r.batch_id not in whole):
            batch.append(rec)
            if len(batch) >= chunk:
                yield from self._transcripts(batch)
                batch = []
        if batch:
            yield from self._transcripts(batch)

    def _batch_transcripts(
        self, batch_id: str, wanted: dict[str, ConversationRecord]
    ) -> Iterator[tuple[ConversationRecord, Transcript]]:
        """Three queries for the whole batch, unsorted: the embedded server sorts 40,000
        records in about twice the time it takes to read them, so they are grouped here (one
        batch's records in memory at a time; an export of several batches reads one after
        the other)."""
        query = {"batch_id": batch_id}
        skip = {"_id": 0, "batch_id": 0, "created_at": 0}
        found: dict[str, Transcript] = {conv_id: Transcript() for conv_id in wanted}
        for d in self._messages.find(query, skip):
            if (t := found.get(d["conversation_id"])) is not None:
                t.messages.append(_message(d))
        for d in self._summaries.find(query, skip):
            if (t := found.get(d["conversation_id"])) is not None:
                t.summaries.append(Summary(d["day"], d["content"], _usage(d.get("usage"))))
        calls = [d for d in self._selector_calls.find(query, skip) if d["conversation_id"] in found]
        calls.sort(key=lambda d: (d["day"], d["turn"], d.get("attempt", 0)))
        for d in calls:
            found[d["conversation_id"]].selector_calls.append(
                SelectorCall(
                    d["day"], d["turn"], d["answer"], d.get("chosen"), _usage(d.get("usage"))
                )
            )
        for conv_id in sorted(wanted):
            t = found.pop(conv_id)
            t.messages.sort(key=lambda m: (m.day, m.turn))
            t.summaries.sort(key=lambda s: s.day)
            t.fallbacks = count_fallbacks(t.selector_calls)
            yield wanted[conv_id], t

    def _transcripts(
        self, records: list[ConversationRecord]
    ) -> Iterator[tuple[ConversationRecord, Transcript]]:
        query = {"conversation_id": {"$in": [r.id for r in records]}}
        found: dict[str, Transcript] = {r.id: Transcript() for r in records}
        for d in self._messages.find(query, {"_id": 0, "batch_id": 0, "created_at": 0}):
            found[d["conversation_id"]].messages.append(_message(d))
        for d in self._summaries.find(query, {"_id": 0, "batch_id": 0, "created_at": 0}):
            found[d["conversation_id"]].summaries.append(_summary(d))
        calls = list(self._selector_calls.find(query, {"_id": 0, "batch_id": 0, "created_at": 0}))
        calls.sort(key=lambda d: (d["day"], d["turn"], d.get("attempt", 0)))
        for d in calls:
            found[d["conversation_id"]].selector_calls.append(
                SelectorCall(
                    d["day"], d["turn"], d["answer"], d.get("chosen"), _usage(d.get("usage"))
                )
            )
        for rec in records:
            t = found[rec.id]
            t.messages.sort(key=lambda m: (m.day, m.turn))
            t.summaries.sort(key=lambda s: s.day)
            t.fallbacks = count_fallbacks(t.selector_calls)
            yield rec, t

    def mark_running(self, conv_id: str, lease: Lease | None = None) -> bool:
        """Start (or continue) a conversation. With `lease`, only an unfinished one, and it
        is stamped with the lease's token: from then on only this run may finish it.
        Returns False when there is nothing to do (another run completed it)."""
        query: dict[str, Any] = {"_id": conv_id}
        changes: dict[str, Any] = {
            "status": ConversationStatus.RUNNING.value,
            "error": None,
            "started_at": now(),
        }
        if lease is not None:
            lease.check(conv_id)
            query["status"] = {"$in": [s.value for s in UNFINISHED]}
            changes["lease"] = lease.token
        with self._tallying(self._batch_of(conv_id, lease), lease) as held:
            before = self._conversations.find_one_and_update(
                query, {"$set": changes}, {"status": 1}
            )
            if before is not None and held is not None:
                self._tally_add(held, _moved(before.get("status"), ConversationStatus.RUNNING))
        return before is not None

    def finish_conversation(
        self,
        conv_id: str,
        status: str,
        transcript: Transcript | None,
        error: str | None = None,
        *,
        failed_call_retries: int = 0,
        lease: Lease | None = None,
        quality: Quality | None = None,
    ) -> bool:
        """`failed_call_retries`: retries of the call that failed the conversation (counted
        in the batch's retries, as no stored message carries them).

        With `lease`, only while the lease is held and only a conversation this run is
        running (a late write can never overwrite what another run has since done).
        Returns whether the conversation was updated."""
        status = ConversationStatus(status)
        changes: dict[str, Any] = {"status": status.value, "error": error, "finished_at": now()}
        if transcript is not None:
            changes["usage"] = {k: _usage_doc(u) for k, u in transcript.usage().items()}
            changes["fallbacks"] = transcript.fallbacks
        if quality is not None:
            # `usable` also at the top level: what `--where usable=...` filters on.
            changes["quality"] = dataclasses.asdict(quality)
            changes["usable"] = quality.usable
        update: dict[str, Any] = {"$set": changes}
        if failed_call_retries:
            update["$inc"] = {"failed_call_retries": failed_call_retries}
        query: dict[str, Any] = {"_id": conv_id}
        if lease is not None:
            lease.check(conv_id)
            query.update(status=ConversationStatus.RUNNING.value, lease=lease.token)
        with self._tallying(self._batch_of(conv_id, lease), lease) as held:
            before = self._conversations.find_one_and_update(query, update, {"status": 1})
            if before is not None and held is not None:
                inc = _moved(before.get("status"), status)
                inc["retries"] = failed_call_retries
                self._tally_add(held, inc)
        return before is not None

    def mark_interrupted(self, batch_id: str, lease: Lease | None = None) -> int:
        """Running conversations of a stopped batch become `interrupted` (resume picks them
        up); with `lease`, only those this run was running."""
        query: dict[str, Any] = {"batch_id": batch_id, "status": ConversationStatus.RUNNING.value}
        if lease is not None:
            lease.check()
            query["lease"] = lease.token
        with self._tallying(batch_id, lease) as held:
            n = self._conversations.update_many(
                query, {"$set": {"status": ConversationStatus.INTERRUPTED.value}}
            ).modified_count
            if held is not None:
                self._tally_add(
                    held, _moved(ConversationStatus.RUNNING, ConversationStatus.INTERRUPTED, n)
                )
        return n

    def set_conversation_favourite(self, ref: str, favourite: bool) -> None:
        """Star (or unstar) a conversation for the current user; anyone's conversation."""
        doc = self._resolve(self._conversations, ref, "conversation")
        self._star(self._conversations, doc, favourite)

    def delete_conversation(self, ref: str) -> Deleted:
        doc = self._resolve(self._conversations, ref, "conversation", {"creator": 1, "batch_id": 1})
        if doc.get("creator") != self.user:
            raise PermissionDenied(
                f"Only {doc.get('creator')!s}, who created conversation {doc['_id']}, can "
                f"delete it; you are {self.user}. Ask them to delete it if it should go."
            )
        deleted = Deleted()
        if doc.get("batch_id"):
            self._tally_stale(doc["batch_id"])  # recounted when next shown
        self._delete_conversation_data([doc["_id"]], deleted)
        return deleted

    # --- messages, summaries, selector calls ----------------------------------------------

    def insert_message(
        self, conv_id: str, m: Message, batch_id: str | None = None, lease: Lease | None = None
    ) -> None:
        self._insert_once(*self._record(conv_id, m, None, batch_id), lease=lease)

    def insert_summary(
        self, conv_id: str, s: Summary, batch_id: str | None = None, lease: Lease | None = None
    ) -> None:
        self._insert_once(*self._record(conv_id, s, None, batch_id), lease=lease)

    def insert_selector_call(
        self,
        conv_id: str,
        c: SelectorCall,
        attempt: int,
        batch_id: str | None = None,
        lease: Lease | None = None,
    ) -> None:
        self._insert_once(*self._record(conv_id, c, attempt, batch_id), lease=lease)

    def insert_records(
        self,
        records: list[tuple[str, Message | Summary | SelectorCall, int | None, str | None]],
        lease: Lease | None = None,
    ) -> list[BaseException | None]:
        """Store records of many conversations, each exactly once, in one round trip per
        collection: (conversation id, message / summary / selector call, the selector
        call's attempt or None, batch id). Returns, per record, None when it is stored or
        the error `insert_message` & co. would have raised for it alone.

        What a batch of short conversations spends its time on is the database's cost per
        write: one `insert_many` of 32 records costs SecantusDB a quarter of the CPU of 32
        `insert_one`s. A record whose bulk insert failed otherwise than by a duplicate key
        (too large, a server error) is retried alone, so its error is the same as ever.
        """
        if lease is not None:
            lease.check()
        outcome: list[BaseException | None] = [None] * len(records)
        refused: set[int] = set()
        if lease is not None and lease.worker:  # fencing: only conversations still claimed
            refused = self._fence([r[0] for r in records], lease, outcome)
        built = [self._record(c, event, attempt, b) for c, event, attempt, b in records]
        groups: dict[tuple[str | None, str], list[int]] = {}
        for i, (collection, doc, *_rest) in enumerate(built):
            if i in refused:
                continue
            groups.setdefault((doc["batch_id"], collection.name), []).append(i)
        for (batch_id, _name), positions in groups.items():
            with self._tallying(batch_id, lease) as held:
                stored = self._insert_many(built, positions, outcome)
                if held is None:
                    continue
                if stored is None:  # unknown which landed: the totals are recounted
                    held.tally_ok = False
                    continue
                inc: dict[str, int] = {}
                for i in stored:
                    collection, doc, *_rest = built[i]
                    for k, v in _usage_inc(doc.get("usage")).items():
                        inc[k] = inc.get(k, 0) + v
                    if collection is self._messages:
                        inc["messages"] = inc.get("messages", 0) + 1
                self._tally_add(held, inc)
        return outcome

    def _insert_many(
        self, built: list[tuple], positions: list[int], outcome: list[BaseException | None]
    ) -> list[int] | None:
        """Insert the records at `positions` (one collection) in one round trip; returns
        the positions this insert stored, or None when that is unknown (the failed ones
        were retried alone, each counting itself)."""
        collection = built[positions[0]][0]
        docs = [built[i][1] for i in positions]
        retry: list[int] = []
        failed: set[int] = set()
        unknown = False
        try:
            collection.insert_many(docs, ordered=False)
        except BulkWriteError as e:
            for err in e.details.get("writeErrors", []):
                i = positions[err["index"]]
                failed.add(i)
                if err.get("code") == 11000:
                    outcome[i] = self._duplicate(*built[i])
                else:
                    retry.append(i)
        except (DocumentTooLarge, OperationFailure):
            retry = positions  # nothing or part stored: each alone, duplicates accepted
            unknown = True
        for i in retry:
            try:
                self._insert_once(*built[i], lease=None)
            except (LeaseLost, RecordTooLarge, OperationFailure) as e:
                outcome[i] = e
        if unknown:
            return None
        return [i for i in positions if i not in failed]

    def _record(
        self,
        conv_id: str,
        event: Message | Summary | SelectorCall,
        attempt: int | None,
        batch_id: str | None,
    ) -> tuple[pymongo.collection.Collection, dict, tuple[str, ...], tuple[str, ...], str]:
        """The collection, document, unique key, identity fields and name of one record."""
        doc: dict[str, Any] = {"conversation_id": conv_id, "batch_id": batch_id}
        if isinstance(event, Message):
            m = event
            doc.update(
                day=m.day,
                turn=m.turn,
                speaker=m.speaker,
                role=m.role,
                content=m.content,
                raw=m.raw,
                empty=m.empty,
                usage=_usage_doc(m.usage),
                finish_reason=m.finish_reason,
                flags=list(m.flags),
                created_at=now(),
            )
            what = f"message {m.turn} of day {m.day}"
            return self._messages, doc, ("day", "turn"), ("speaker", "content", "raw"), what
        if isinstance(event, Summary):
            doc.update(
                day=event.day,
                content=event.content,
                usage=_usage_doc(event.usage),
                finish_reason=event.finish_reason,
                flags=list(event.flags),
                created_at=now(),
            )
            return self._summaries, doc, ("day",), ("content",), f"summary of day {event.day}"
        c = event
        assert attempt is not None
        doc.update(
            day=c.day,
            turn=c.turn,
            attempt=attempt,
            answer=c.answer,
            chosen=c.chosen,
            usage=_usage_doc(c.usage),
            created_at=now(),
        )
        what = f"speaker selection {attempt + 1} for message {c.turn} of day {c.day}"
        return self._selector_calls, doc, ("day", "turn", "attempt"), ("answer", "chosen"), what

    def _insert_once(
        self,
        collection: pymongo.collection.Collection,
        doc: dict,
        key: tuple[str, ...],
        same: tuple[str, ...],
        what: str,
        *,
        lease: Lease | None,
    ) -> None:
        """Store one record of a conversation, exactly once.

        A duplicate key is accepted only when the stored record is this very record (a
        retried write whose first attempt did land). A different record in its place
        means another run wrote this turn: that is never swallowed (it would hide a run
        regenerating what is stored, or two runs writing one conversation).
        """
        with self._tallying(doc.get("batch_id"), lease) as held:
            if lease is not None:
                lease.check()
            if not self._insert_record(collection, doc, key=key, same=same, what=what):
                return  # a retried write whose first attempt landed: counted then, or recounted
            if held is not None:
                inc = _usage_inc(doc.get("usage"))
                if collection is self._messages:
                    inc["messages"] = 1
                self._tally_add(held, inc)

    def _insert_record(
        self,
        collection: pymongo.collection.Collection,
        doc: dict,
        *,
        key: tuple[str, ...],
        same: tuple[str, ...],
        what: str,
    ) -> bool:
        """Insert; False when this very record is stored already (no error)."""
        conv_id = doc["conversation_id"]
        try:
            collection.insert_one(doc)
        except DuplicateKeyError:
            error = self._duplicate(collection, doc, key, same, what)
            if error is not None:
                raise error from None
            return False
        except DocumentTooLarge:
            raise _too_large(conv_id, what, doc) from None
        except OperationFailure as e:
            if e.code in _TOO_LARGE_CODES or "too large" in str(e).lower():
                raise _too_large(conv_id, what, doc) from None
            raise
        return True

    def _duplicate(
        self,
        collection: pymongo.collection.Collection,
        doc: dict,
        key: tuple[str, ...],
        same: tuple[str, ...],
        what: str,
    ) -> LeaseLost | None:
        """A record with this key is stored already: None when it is this very record (a
        retried write whose first attempt did land), else the error to stop with."""
        conv_id = doc["conversation_id"]
        stored = collection.find_one({"conversation_id": conv_id, **{k: doc[k] for k in key}})
        if stored is not None and all(stored.get(f) == doc.get(f) for f in same):
            return None
        return LeaseLost(
            f"Conversation {conv_id} already has a different {what} stored (another run "
            f"wrote it), so this run stopped writing to it. Nothing stored was changed; "
            f"see it with `simulator show {conv_id}`."
        )

    def load_transcript(self, conv_id: str, *, discard_partial: bool = False) -> Transcript:
        """Everything stored for a conversation, in order.

        With `discard_partial`, selector calls made for a turn whose message was never
        stored (the process died in between) are deleted first: that turn is redone whole.
        """
        query = {"conversation_id": conv_id}
        t = Transcript()
        for d in self._messages.find(query).sort([("day", 1), ("turn", 1)]):
            t.messages.append(_message(d))
        for d in self._summaries.find(query).sort("day", 1):
            t.summaries.append(_summary(d))
        spoken = {(m.day, m.turn) for m in t.messages}
        for d in self._selector_calls.find(query).sort([("day", 1), ("turn", 1), ("attempt", 1)]):
            if discard_partial and (d["day"], d["turn"]) not in spoken:
                with self._tallying(d.get("batch_id"), None) as held:
                    gone = self._selector_calls.delete_one({"_id": d["_id"]}).deleted_count
                    if gone and held is not None:
                        self._tally_add(held, _usage_inc(d.get("usage"), -1))
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
        docs = self._db[kind].find({"legacy_id": {"$exists": True}}, {"legacy_id": 1})
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
        self._db[kind].update_one({"_id": our_id}, {"$set": changes})

    # --- scores (issue 11): outcomes of stored conversations, annotation sheets --------------
    # One document per (conversation, message, scorer, version, source); message is "" for a
    # conversation-level score. Machine scores are written once ($setOnInsert): a repeated
    # write changes nothing. A human's answers replace that human's earlier ones.

    def insert_score(self, score: Score) -> bool:
        """Store a machine score unless that item already has one; True when written."""
        doc = _score_doc(score, self.user)
        key = {k: doc[k] for k in SCORE_KEY}
        try:
            result = self._scores.update_one(key, {"$setOnInsert": doc}, upsert=True)
        except DuplicateKeyError:  # another process wrote the same item in between
            return False
        return result.upserted_id is not None

    def replace_scores(self, scores: list[Score]) -> int:
        """Store human answers, each replacing the same source's earlier answer for its item."""
        ops = []
        for score in scores:
            doc = _score_doc(score, self.user)
            key = {k: doc[k] for k in SCORE_KEY}
            doc["_id"] = new_id()
            ops.append(
                pymongo.ReplaceOne(key, {k: v for k, v in doc.items() if k != "_id"}, upsert=True)
            )
        if ops:
            self._scores.bulk_write(ops, ordered=True)
        return len(ops)

    def scored_items(
        self, scorer: str, version: str, source: str, conversation_ids: list[str]
    ) -> set[tuple[str, str]]:
        """(conversation, message) already scored by this scorer version and source."""
        found: set[tuple[str, str]] = set()
        for start in range(0, len(conversation_ids), 50):  # short $in lists (see transcripts)
            chunk = conversation_ids[start : start + 50]
            query = {"scorer": scorer, "version": version, "source": source,
                     "conversation_id": {"$in": chunk}}  # fmt: skip
            for d in self._scores.find(query, {"conversation_id": 1, "message": 1}):
                found.add((d["conversation_id"], d.get("message") or ""))
        return found

    def list_scores(
        self,
        *,
        experiment_id: str | None = None,
        conversation_id: str | None = None,
        scorer: str | None = None,
        version: str | None = None,
        source: str | None = None,
    ) -> list[Score]:
        """Stored scores, by conversation, message, scorer and source."""
        query: dict[str, Any] = {}
        for key, value in (("experiment_id", experiment_id), ("conversation_id", conversation_id),
                           ("scorer", scorer), ("version", version), ("source", source)):  # fmt: skip
            if value is not None:
                query[key] = value
        docs = self._scores.find(query, {"prompt": 0})
        return [_score(d) for d in docs.sort([("conversation_id", 1), ("message", 1),
                                              ("scorer", 1), ("source", 1)])]  # fmt: skip

    def scores_of(self, conversation_ids: Iterable[str]) -> dict[str, list[Score]]:
        """The scores of these conversations, by conversation id, in lists of 50 ids per query
        (see transcripts); prompts and raw answers left out (views show values)."""
        ids = list(dict.fromkeys(conversation_ids))
        found: dict[str, list[Score]] = {conv_id: [] for conv_id in ids}
        for start in range(0, len(ids), 50):
            query = {"conversation_id": {"$in": ids[start : start + 50]}}
            for d in self._scores.find(query, {"prompt": 0, "raw": 0}):
                found[d["conversation_id"]].append(_score(d))
        for scores in found.values():
            scores.sort(key=lambda s: (s.message, s.scorer, s.source))
        return found

    def score_series(self, experiment_id: str) -> list[ScoreSeries]:
        """Which (scorer, version, source) an experiment's scores come in: one query."""
        group = {
            "_id": {"scorer": "$scorer", "version": "$version", "source": "$source"},
            "n": {"$sum": 1},
            "latest": {"$max": "$created_at"},
            "message": {"$max": "$message"},  # "" only for conversation-level scores
        }
        rows = self._scores.aggregate([{"$match": {"experiment_id": experiment_id}},
                                       {"$group": group}])  # fmt: skip
        series = [
            ScoreSeries(
                r["_id"]["scorer"],
                r["_id"]["version"],
                r["_id"]["source"],
                r["n"],
                r.get("latest"),
                bool(r.get("message")),
            )  # fmt: skip
            for r in rows
        ]
        return sorted(series, key=lambda s: (s.scorer, s.source, s.version))

    def insert_sheet(self, sheet: AnnotationSheet) -> AnnotationSheet:
        doc = dataclasses.asdict(sheet)
        doc["_id"] = doc.pop("id")
        doc["items"] = {k: list(v) for k, v in sheet.items.items()}
        doc["creator"] = self.user
        doc["created_at"] = now()
        self._annotation_sheets.insert_one(doc)
        return _sheet(doc)

    def get_sheet(self, sheet_id: str) -> AnnotationSheet | None:
        doc = self._annotation_sheets.find_one({"_id": sheet_id})
        return _sheet(doc) if doc else None

    # --- analysis (issue 12): bulk reads for the dataframes and the report -------------------
    # A fixed number of queries whatever the number of conversations: messages are read per
    # batch (or 50 ids at a time for a few loose ones), scores per experiment.

    def analysis_messages(
        self, records: list[ConversationRecord]
    ) -> Iterator[tuple[ConversationRecord, list[Message]]]:
        """Each record with its stored messages in (day, turn) order, messages only."""
        by_batch: dict[str | None, list[ConversationRecord]] = {}
        for rec in records:
            by_batch.setdefault(rec.batch_id, []).append(rec)
        skip = {"_id": 0, "batch_id": 0, "created_at": 0, "raw": 0}
        for batch_id, recs in by_batch.items():
            found: dict[str, list[Message]] = {r.id: [] for r in recs}
            if batch_id is not None and len(recs) > 50:
                queries: list[dict[str, Any]] = [{"batch_id": batch_id}]
            else:
                ids = [r.id for r in recs]
                queries = [{"conversation_id": {"$in": ids[i : i + 50]}}
                           for i in range(0, len(ids), 50)]  # fmt: skip
            for query in queries:
                for d in self._messages.find(query, skip):
                    if (kept := found.get(d["conversation_id"])) is not None:
                        kept.append(_message(d))
            for rec in recs:
                messages = found[rec.id]
                messages.sort(key=lambda m: (m.day, m.turn))
                yield rec, messages

    def analysis_scores(self, experiment_id: str, batch_id: str | None = None) -> list[Score]:
        """Every score of an experiment (or one batch of it), without the judge's prompt and
        raw answer, unsorted (one query)."""
        query: dict[str, Any] = {"experiment_id": experiment_id}
        if batch_id is not None:
            query["batch_id"] = batch_id
        return [_score(d) for d in self._scores.find(query, {"prompt": 0, "raw": 0})]

    # --- response cache (issue 13): LLM responses reused with --cache ---------------------
    # One document per call key (simulator/llm/cache.py: model, base URL, messages, sampling,
    # the caller's scope with its seed and repetition): unique by key, written once; a second
    # writer of the same key (another worker) changes nothing.

    @property
    def _response_cache(self) -> pymongo.collection.Collection:
        return self._db["response_cache"]

    def prepare_response_cache(self) -> None:
        """Create the cache's unique index (once per run that uses the cache)."""
        try:
            self._response_cache.create_index([("key", 1)], unique=True)
        except PyMongoError as e:
            raise StorageError(f"Could not prepare the response cache: {e}") from e

    def cached_response(self, key: str) -> CachedResponse | None:
        """The stored response for a call key, if any."""
        doc = self._response_cache.find_one({"key": key})
        if doc is None:
            return None
        return CachedResponse(
            key=doc["key"],
            model=doc.get("model") or "",
            text=doc.get("text") or "",
            prompt_tokens=int(doc.get("prompt_tokens") or 0),
            completion_tokens=int(doc.get("completion_tokens") or 0),
            latency=float(doc.get("latency") or 0.0),
            finish_reason=doc.get("finish_reason"),
        )

    def cache_response(self, response: CachedResponse) -> bool:
        """Store a response unless its key has one already; True when written."""
        doc = dataclasses.asdict(response) | {"created_at": now(), "creator": self.user}
        try:
            result = self._response_cache.update_one(
                {"key": response.key}, {"$setOnInsert": doc}, upsert=True
            )
        except DuplicateKeyError:  # another process stored the same key in between
            return False
        return result.upserted_id is not None

    def count_cached_responses(self) -> int:
        """Responses the cache holds."""
        return self._response_cache.count_documents({})

    # --- usage history (issue 13): what earlier conversations used, for `run --dry-run` ------

    def reply_lengths(self, experiment_id: str, limit: int = 500) -> dict[str, ReplyLengths]:
        """Average completion tokens per call of the experiment's latest completed
        conversations (at most `limit`), by LLM label and kind of call."""
        sums: dict[str, dict[str, list[int]]] = {}
        counts: dict[str, int] = {}
        cursor = (
            self._conversations.find(
                {"experiment_id": experiment_id, "status": ConversationStatus.COMPLETED.value},
                {"llm.label": 1, "usage": 1},
            )
            .sort("created_at", -1)
            .limit(limit)
        )
        for doc in cursor:
            label = str((doc.get("llm") or {}).get("label") or "")
            counts[label] = counts.get(label, 0) + 1
            for kind, usage in (doc.get("usage") or {}).items():
                pair = sums.setdefault(label, {}).setdefault(kind, [0, 0])
                pair[0] += int((usage or {}).get("completion_tokens") or 0)
                pair[1] += int((usage or {}).get("calls") or 0)
        return {
            label: ReplyLengths(
                conversations=counts[label],
                per_call={k: tokens / calls for k, (tokens, calls) in kinds.items() if calls},
            )
            for label, kinds in sums.items()
        }


TALLY_RELEASED = "released"
TALLY_CHECKED = "checked:"
_TALLY_USAGE = ("prompt_tokens", "completion_tokens", "retries", "calls")


def _tally_trusted(owner: str, holder: LeaseHolder | None, *, alive: bool) -> bool:
    """Whether totals kept by `owner` are exact, given who holds the batch now."""
    if holder is None:
        return owner == TALLY_RELEASED
    if alive:
        return owner == holder.token
    return owner == f"{TALLY_CHECKED}{holder.token}"


def _tally_doc(tally: BatchTally, owner: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"owner": owner, "counts": dict(tally.counts)}
    doc["messages"] = tally.totals.messages
    for k in _TALLY_USAGE:
        doc[k] = getattr(tally.totals, k)
    return doc


def _tally(doc: Any) -> BatchTally | None:
    if not isinstance(doc, dict) or not doc.get("owner"):
        return None
    totals = BatchTotals(messages=int(doc.get("messages") or 0))
    for k in _TALLY_USAGE:
        setattr(totals, k, int(doc.get(k) or 0))
    counts = {str(k): int(v) for k, v in (doc.get("counts") or {}).items() if v}
    return BatchTally(counts, totals, str(doc["owner"]))


def _usage_inc(usage: Any, sign: int = 1) -> dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    return {k: sign * int(usage.get(k) or 0) for k in _TALLY_USAGE}


def _moved(before: Any, after: Any, n: int = 1) -> dict[str, int]:
    """Counts change when `n` conversations go from status `before` to `after`."""
    before, after = str(before), str(after)
    return {} if before == after else {f"counts.{before}": -n, f"counts.{after}": n}


def _batch_size(doc: dict) -> int:
    """Conversations a batch holds: as its kept totals count them, else its grid's size."""
    counts = (doc.get("tally") or {}).get("counts")
    return sum(counts.values()) if counts else int(doc.get("total") or 0)


@dataclass
class CachedResponse:
    """One LLM response kept by the response cache (simulator/llm/cache.py)."""

    key: str
    model: str  # the LLM's label, e.g. "openai/gpt-4o-mini" (to see what the cache holds)
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: float = 0.0  # of the call that made it
    finish_reason: str | None = None


SCORE_KEY = ("conversation_id", "message", "scorer", "version", "source")

# (collection, keys, unique): every index the store needs. Add new ones here; databases
# made by an earlier version get them at the next Store.open (see ensure_indexes).
IndexSpec = tuple[str, tuple[tuple[str, int], ...], bool]
INDEXES: tuple[IndexSpec, ...] = (
    # a message is unique by (conversation, day, turn)
    ("messages", (("conversation_id", 1), ("day", 1), ("turn", 1)), True),
    ("summaries", (("conversation_id", 1), ("day", 1)), True),
    (
        "selector_calls",
        (("conversation_id", 1), ("day", 1), ("turn", 1), ("attempt", 1)),
        True,
    ),
    ("messages", (("batch_id", 1),), False),
    ("summaries", (("batch_id", 1),), False),
    ("selector_calls", (("batch_id", 1),), False),
    ("conversations", (("batch_id", 1), ("index", 1)), True),
    # listings sort an experiment's or a batch's conversations by (created_at, index)
    ("conversations", (("experiment_id", 1), ("created_at", 1), ("index", 1)), False),
    ("conversations", (("batch_id", 1), ("created_at", 1), ("index", 1)), False),
    ("conversations", (("batch_id", 1), ("status", 1)), False),
    ("batches", (("experiment_id", 1),), False),
    ("batches", (("creator", 1), ("created_at", -1)), False),
    ("batches", (("created_at", -1),), False),
    ("experiments", (("creator", 1), ("name", 1)), False),
    ("scores", tuple((k, 1) for k in SCORE_KEY), True),
    ("scores", (("experiment_id", 1), ("scorer", 1)), False),
    ("scores", (("conversation_id", 1),), False),
)


def _index_name(spec: IndexSpec) -> str:
    """How an index is recorded in `meta`: collection, keys and uniqueness."""
    collection, keys, unique = spec
    name = "_".join(f"{k}_{d}" for k, d in keys)
    return f"{collection}.{name}{' unique' if unique else ''}"


@dataclass
class Score:
    """One outcome of one conversation (message "") or one of its messages ("day:turn")."""

    conversation_id: str
    message: str
    scorer: str
    version: str
    source: str  # judge:<model> | moderation:<model> | python:<function> | human:<name>
    value: Any  # a label, a number, a text; None when the answer was invalid
    valid: bool = True
    raw: str | None = None  # the answer as given (the judge's last reply, a cell)
    prompt: str | None = None  # what the judge was asked (left out of listings)
    detail: dict[str, Any] = field(default_factory=dict)  # moderation categories, turn ...
    attempts: int = 1
    usage: Usage = field(default_factory=Usage)
    experiment_id: str = ""
    batch_id: str | None = None
    role: str = ""  # the role of the scored message
    creator: str = ""
    created_at: datetime | None = None


@dataclass
class ScoreSeries:
    """The scores of one scorer version from one source in an experiment (export columns)."""

    scorer: str
    version: str
    source: str
    count: int
    latest: datetime | None  # when the newest of them was stored
    per_message: bool


@dataclass
class AnnotationSheet:
    """An exported annotation sheet: which item id means which conversation or message."""

    id: str
    experiment_id: str
    scorer: str
    version: str
    annotator: str
    definition: dict[str, Any]  # the scorer as exported, to check answers on import
    # item id -> (conversation, message, turns of the conversation, batch, message role)
    items: dict[str, tuple[str, str, int, str | None, str]]
    creator: str = ""
    created_at: datetime | None = None


def _score_doc(score: Score, user: str) -> dict[str, Any]:
    doc = dataclasses.asdict(score)
    doc["usage"] = _usage_doc(score.usage)
    doc["creator"] = score.creator or user
    doc["created_at"] = score.created_at or now()
    return doc


def _score(doc: dict) -> Score:
    names = {f.name for f in dataclasses.fields(Score)}
    values = {k: v for k, v in doc.items() if k in names}
    values["usage"] = _usage(doc.get("usage"))
    return Score(**values)


def _sheet(doc: dict) -> AnnotationSheet:
    return AnnotationSheet(
        id=doc["_id"],
        experiment_id=doc["experiment_id"],
        scorer=doc["scorer"],
        version=doc["version"],
        annotator=doc["annotator"],
        definition=doc.get("definition") or {},
        items={k: (v[0], v[1], int(v[2]), v[3], v[4]) for k, v in doc["items"].items()},
        creator=doc.get("creator", ""),
        created_at=doc.get("created_at"),
    )


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _too_large(conv_id: str, what: str, doc: dict) -> RecordTooLarge:
    text = doc.get("content") or doc.get("answer") or ""
    size = len(str(text).encode("utf-8")) + len(str(doc.get("raw") or "").encode("utf-8"))
    return RecordTooLarge(
        f"Conversation {conv_id} failed: its {what} is {size / 2**20:.1f} MB, over "
        f"MongoDB's limit of {MAX_RECORD_MB} MB for one record, so it cannot be stored. The "
        "model's reply ran away: lower max_tokens for this LLM (or fix what makes it "
        "repeat itself), then `simulator resume` continues the conversation."
    )


def _holder(doc: Any) -> LeaseHolder | None:
    if not isinstance(doc, dict):
        return None
    beat = doc.get("heartbeat")
    return LeaseHolder(
        host=str(doc.get("host", "")),
        pid=int(doc.get("pid") or 0),
        heartbeat=_utc(beat) if isinstance(beat, datetime) else None,
        seconds=float(doc.get("seconds") or LEASE_SECONDS),
        token=doc.get("token"),
    )


def _lease_free(held: LeaseHolder, me: dict[str, Any], server_now: datetime) -> bool:
    """Whether `held` no longer holds its batch, judged by the server's clock `server_now`
    (and, for a runner on this host, by whether its process exists)."""
    if held.host == me["host"]:
        if held.pid == me["pid"]:
            return True
        try:
            os.kill(held.pid, 0)
        except ProcessLookupError:
            return True  # killed or crashed: nobody runs the batch any more
        except (PermissionError, ValueError, OverflowError):
            pass
    if held.heartbeat is None:
        return True
    return server_now - held.heartbeat > timedelta(seconds=held.seconds)


def _live_workers(workers: Any, me: dict[str, Any], server_now: datetime) -> list[LeaseHolder]:
    """The workers recorded on a batch that are alive, judged by the server's clock."""
    live = []
    for w in (workers or {}).values() if isinstance(workers, dict) else ():
        holder = _holder(w)
        if holder is not None and not _lease_free(holder, me, server_now):
            live.append(holder)
    return live


def _busy(batch_id: str, held: LeaseHolder | None) -> UserError:
    who = str(held) if held else "another process"
    return UserError(
        f"Batch {batch_id} is being run right now by {who}. Wait for it to finish, or stop it "
        f"(Ctrl-C there, or kill it), then run `simulator resume {batch_id}` again."
    )


def _message(d: dict) -> Message:
    return Message(
        day=d["day"],
        turn=d["turn"],
        speaker=d["speaker"],
        role=d["role"],
        content=d["content"],
        raw=d.get("raw"),
        empty=bool(d.get("empty")),
        usage=_usage(d.get("usage")),
        finish_reason=d.get("finish_reason"),
        # Messages stored before flags existed: only `empty` is known.
        flags=list(d["flags"]) if "flags" in d else (["empty"] if d.get("empty") else []),
    )


def _summary(d: dict) -> Summary:
    return Summary(
        d["day"],
        d["content"],
        _usage(d.get("usage")),
        finish_reason=d.get("finish_reason"),
        flags=list(d["flags"]) if "flags" in d else ([] if d["content"] else ["empty"]),
    )


# --where KEY=VALUE on conversations: key -> (document field, type). `agents_<role>` too.
CONVERSATION_FILTERS: dict[str, tuple[str, type]] = {
    "llm": ("llm", str),
    "days": ("days", int),
    "messages": ("messages", int),
    "speaker": ("speaker_selection", str),
    "status": ("status", str),
    "repetition": ("repetition", int),
    "creator": ("creator", str),
    "usable": ("usable", bool),
}
STATUSES = ("pending", "running", "interrupted", "failed", "completed")


def conversation_filter(
    where: dict[str, str], factors: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """A MongoDB query for `--where` conditions; a clear UserError for a bad key or value.

    `factors` (name -> levels, from the experiment) lets NAME or factor_NAME filter by a
    factor's level; the built-in conditions come first."""
    query: dict[str, Any] = {}
    factors = factors or {}
    for key, value in where.items():
        key, value = key.strip(), str(value).strip()
        kind: type
        factor = key[len("factor_") :] if key.startswith("factor_") else key
        if key.startswith("agents_") and re.fullmatch(r"agents_[A-Za-z0-9]+", key):
            field, kind = f"agents_per_role.{key[len('agents_') :]}", int
        elif key in CONVERSATION_FILTERS:
            field, kind = CONVERSATION_FILTERS[key]
        elif factor in factors:
            if value not in factors[factor]:
                raise UserError(
                    f"--where {key}={value}: factor '{factor}' has no level '{value}'; its "
                    f"levels: {', '.join(factors[factor])}."
                )
            query[f"factors.{factor}"] = value
            continue
        else:
            valid = ", ".join(
                [*CONVERSATION_FILTERS, "agents_<role> (e.g. agents_guard)", *factors]
            )
            raise UserError(f"--where {key}=...: unknown key '{key}'. Filter by one of: {valid}.")
        if kind is bool:
            if value.lower() not in ("true", "false", "yes", "no"):
                raise UserError(f"--where {key}={value}: {key} is true or false, e.g. {key}=false.")
            # Only completed conversations have a verdict: usable=false never lists a
            # pending or failed one (filter those with status=...).
            query[field] = value.lower() in ("true", "yes")
        elif kind is int:
            if not re.fullmatch(r"-?\d+", value):
                raise UserError(f"--where {key}={value}: {key} is a whole number, e.g. {key}=2.")
            query[field] = int(value)
        elif key == "llm":
            # the label (provider/model), the model, or an Ollama model without its tag
            query["$or"] = [
                {"llm.label": value},
                {"llm.model": value},
                {"llm.model": f"{value}:latest"},
            ]
        elif key == "status" and value not in STATUSES:
            raise UserError(f"--where status={value}: a status is one of {', '.join(STATUSES)}.")
        else:
            query[field] = value
    return query


def _matches(doc: dict, query: dict[str, Any]) -> bool:
    """Whether a document meets a conversation_filter query (equalities and one `$or`)."""
    for key, wanted in query.items():
        if key == "$or":
            if not any(_matches(doc, q) for q in wanted):
                return False
            continue
        value: Any = doc
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value != wanted:
            return False
    return True


def parse_where(items: Iterable[str]) -> dict[str, str]:
    """`--where KEY=VALUE` options (repeatable) as a dict; a clear error for a malformed one."""
    where: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(
                f"--where {item!r}: write KEY=VALUE, e.g. --where status=failed or "
                "--where agents_guard=2."
            )
        where[key.strip()] = value.strip()
    return where


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
        # a list, so the factors' order survives any server
        "factors": [{"name": n, "levels": list(levels)} for n, levels in grid.factors.items()],
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
        factors={f["name"]: list(f["levels"]) for f in g.get("factors", [])},
    )
    return BatchRecord(
        id=doc["_id"],
        experiment_id=doc["experiment_id"],
        grid=grid,
        total=doc["total"],
        status=BatchStatus(doc["status"]),
        creator=doc["creator"],
        created_at=doc["created_at"],
        prepared=bool(doc.get("prepared")),
        finished_at=doc.get("finished_at"),
        error=doc.get("error"),
        elapsed=float(doc.get("elapsed") or 0.0),
        holder=_holder(doc.get("runner")),
        tally=_tally(doc.get("tally")),
        workers=_workers(doc.get("workers")) if "workers" in doc else None,
    )


def _workers(doc: Any) -> list[LeaseHolder]:
    held = (_holder(w) for w in (doc.values() if isinstance(doc, dict) else ()))
    return [h for h in held if h is not None]


def _conversation(doc: dict) -> ConversationRecord:
    spec = ConversationSpec(
        llm=_model_from_doc(doc["llm"]),
        messages=doc["messages"],
        days=doc["days"],
        agents=dict(doc["agents_per_role"]),
        speaker=doc["speaker_selection"],
        seed=doc["seed"],
        repetition=doc.get("repetition", 0),
        factors=dict(doc.get("factors") or {}),
    )
    return ConversationRecord(
        id=doc["_id"],
        experiment_id=doc["experiment_id"],
        batch_id=doc.get("batch_id"),
        index=doc.get("index", 0),
        spec=spec,
        agents=[
            Agent(a["name"], a["role"], a.get("system_prompt", "")) for a in doc.get("agents", [])
        ],
        summarizer_prompt=doc.get("summarizer_prompt", ""),
        status=ConversationStatus(doc["status"]),
        creator=doc.get("creator", ""),
        created_at=doc["created_at"],
        error=doc.get("error"),
        started_at=doc.get("started_at"),
        finished_at=doc.get("finished_at"),
        usage={k: _usage(v) for k, v in (doc.get("usage") or {}).items()},
        fallbacks=doc.get("fallbacks", 0),
        favourited_by=favourited_by(doc),
        note=doc.get("note", ""),
        quality=_quality(doc.get("quality")),
    )


def _quality(doc: Any) -> Quality | None:
    if not isinstance(doc, dict):
        return None
    names = {f.name for f in dataclasses.fields(Quality)}
    return Quality(**{k: v for k, v in doc.items() if k in names})


def duplicate_experiment(store: Store, ref: str, edited: Experiment | None = None) -> Experiment:
    """Copy an experiment (anyone's) as the current user's, with a parent link.

    `edited` holds the changed definition when the copy is edited; the original is
    never touched.
    """
    original = store.get_experiment(ref)
    return store.insert_experiment(edited or original, parent_id=original.id)
