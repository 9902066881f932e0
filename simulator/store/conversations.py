"""Conversations: reading and listing them, their status as they run, stars and deletes."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

from simulator.conversation import Transcript
from simulator.errors import PermissionDenied
from simulator.estimate import ReplyLengths
from simulator.quality import Quality
from simulator.status import UNFINISHED, ConversationStatus
from simulator.store.documents import _conversation, _usage_doc, now
from simulator.store.filters import _matches, conversation_filter
from simulator.store.records import ConversationRecord, Deleted, Lease
from simulator.store.tallies import Tallies, _moved


class Conversations(Tallies):
    """Conversations: listings, status changes, stars and deletes."""

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
