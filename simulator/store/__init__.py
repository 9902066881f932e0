"""The only package that knows MongoDB document shapes (SPEC §8-9).

Everything goes in and out as dataclasses; callers never see a dict from Mongo.
Writes are idempotent where a retry or a resume could repeat them: a message is unique by
(conversation, day, turn), a summary by (conversation, day), a conversation by (batch,
index), so repeating a write can neither lose nor duplicate anything.

`Store` is assembled from one part per theme (each module holds one): experiments,
batches and their lease, conversation claims of workers, conversations, transcripts
(messages, summaries, selector calls), the running totals of batches, scores and analysis
reads, the response cache. The records they return are in `records`, the conversion of
documents in `documents`.
"""

from __future__ import annotations

from pymongo.database import Database

from simulator.experiment import Experiment
from simulator.store.base import refusal
from simulator.store.claims import WorkerClaims
from simulator.store.documents import (
    TALLY_CHECKED,
    TALLY_RELEASED,
    favourited_by,
    new_id,
    now,
    plural,
)
from simulator.store.experiments import Experiments
from simulator.store.filters import CONVERSATION_FILTERS, STATUSES, conversation_filter, parse_where
from simulator.store.indexes import INDEXES, SCORE_KEY, IndexSpec
from simulator.store.records import (
    BEAT_SECONDS,
    LEASE_SECONDS,
    AnnotationSheet,
    BatchRecord,
    BatchTally,
    BatchTotals,
    CachedResponse,
    ConversationRecord,
    Deleted,
    DeletePlan,
    ExperimentRow,
    Lease,
    LeaseHolder,
    Score,
    ScoreSeries,
    WorkerInfo,
)
from simulator.store.response_cache import ResponseCache
from simulator.store.scores import Scores
from simulator.store.transcripts import MAX_RECORD_MB, Transcripts, count_fallbacks

__all__ = [
    "BEAT_SECONDS",
    "CONVERSATION_FILTERS",
    "INDEXES",
    "LEASE_SECONDS",
    "MAX_RECORD_MB",
    "SCORE_KEY",
    "STATUSES",
    "TALLY_CHECKED",
    "TALLY_RELEASED",
    "AnnotationSheet",
    "BatchRecord",
    "BatchTally",
    "BatchTotals",
    "CachedResponse",
    "ConversationRecord",
    "DeletePlan",
    "Deleted",
    "ExperimentRow",
    "IndexSpec",
    "Lease",
    "LeaseHolder",
    "Score",
    "ScoreSeries",
    "Store",
    "WorkerInfo",
    "conversation_filter",
    "count_fallbacks",
    "duplicate_experiment",
    "favourited_by",
    "new_id",
    "now",
    "parse_where",
    "plural",
    "refusal",
]


class Store(Experiments, WorkerClaims, Transcripts, Scores, ResponseCache):
    """Experiments, batches, conversations and messages in one MongoDB database.

    `user` is the current user: creator of what it inserts, and the only one allowed to
    change or delete what it created.
    """

    def as_user(self, user: str) -> Store:
        """The same database, with `user` as the creator of what it inserts (an importer
        keeps the creators of the records it copies)."""
        return Store(self._db, user)

    @classmethod
    def open(cls, db: Database, user: str) -> Store:
        """A Store with its indexes in place."""
        store = cls(db, user)
        store.ensure_indexes()
        return store


def duplicate_experiment(store: Store, ref: str, edited: Experiment | None = None) -> Experiment:
    """Copy an experiment (anyone's) as the current user's, with a parent link.

    `edited` holds the changed definition when the copy is edited; the original is
    never touched.
    """
    original = store.get_experiment(ref)
    return store.insert_experiment(edited or original, parent_id=original.id)
