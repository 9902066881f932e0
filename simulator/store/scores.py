"""Scores and annotation sheets (issue 11), and the bulk reads of the analysis (issue 12).

One document per (conversation, message, scorer, version, source); message is "" for a
conversation-level score. Machine scores are written once ($setOnInsert): a repeated
write changes nothing. A human's answers replace that human's earlier ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import pymongo
from pymongo.errors import DuplicateKeyError

from simulator.conversation import Message
from simulator.store.base import StoreBase
from simulator.store.documents import _message, _score, _score_doc, _sheet, new_id, now
from simulator.store.indexes import SCORE_KEY
from simulator.store.records import AnnotationSheet, ConversationRecord, Score, ScoreSeries


class Scores(StoreBase):
    """Scores, annotation sheets, and the analysis's bulk reads."""

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

    def existing_conversations(self, conv_ids: Iterable[str]) -> set[str]:
        """Those of these conversations still stored (one query)."""
        wanted = sorted(set(conv_ids))
        found = self._conversations.find({"_id": {"$in": wanted}}, {"_id": 1})
        return {d["_id"] for d in found}

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
