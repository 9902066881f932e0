"""A batch's counts and totals: counted from its records, or kept running on the batch
document by the writes of its run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from simulator.errors import LeaseLost
from simulator.experiment import Experiment
from simulator.status import UNFINISHED
from simulator.store.base import StoreBase
from simulator.store.documents import (
    _TALLY_USAGE,
    TALLY_CHECKED,
    TALLY_RELEASED,
    _tally,
    _tally_doc,
)
from simulator.store.records import BatchRecord, BatchTally, BatchTotals, Lease, LeaseHolder


class Tallies(StoreBase):
    """Counts and totals of batches, and the running totals their writes keep."""

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


def _tally_trusted(owner: str, holder: LeaseHolder | None, *, alive: bool) -> bool:
    """Whether totals kept by `owner` are exact, given who holds the batch now."""
    if holder is None:
        return owner == TALLY_RELEASED
    if alive:
        return owner == holder.token
    return owner == f"{TALLY_CHECKED}{holder.token}"


def _usage_inc(usage: Any, sign: int = 1) -> dict[str, int]:
    usage = usage if isinstance(usage, dict) else {}
    return {k: sign * int(usage.get(k) or 0) for k in _TALLY_USAGE}


def _moved(before: Any, after: Any, n: int = 1) -> dict[str, int]:
    """Counts change when `n` conversations go from status `before` to `after`."""
    before, after = str(before), str(after)
    return {} if before == after else {f"counts.{before}": -n, f"counts.{after}": n}
