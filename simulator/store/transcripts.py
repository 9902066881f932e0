"""Messages, summaries and selector calls: each stored exactly once, and read back as
transcripts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pymongo
from pymongo.errors import BulkWriteError, DocumentTooLarge, DuplicateKeyError, OperationFailure

from simulator.conversation import EXTRA_ATTEMPTS, Message, SelectorCall, Summary, Transcript
from simulator.errors import LeaseLost, RecordTooLarge
from simulator.store.claims import _fence
from simulator.store.documents import _message, _summary, _usage, _usage_doc, now
from simulator.store.records import ConversationRecord, Lease
from simulator.store.tallies import Tallies, _usage_inc

MAX_RECORD_MB = 16  # MongoDB's limit for one document
_TOO_LARGE_CODES = {10334, 17419, 17420}  # BSONObjectTooLarge and friends (server side)


class Transcripts(Tallies):
    """The records of conversations: messages, summaries, selector calls."""

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
            refused = _fence([r[0] for r in records], lease, outcome)
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


def _too_large(conv_id: str, what: str, doc: dict) -> RecordTooLarge:
    text = doc.get("content") or doc.get("answer") or ""
    size = len(str(text).encode("utf-8")) + len(str(doc.get("raw") or "").encode("utf-8"))
    return RecordTooLarge(
        f"Conversation {conv_id} failed: its {what} is {size / 2**20:.1f} MB, over "
        f"MongoDB's limit of {MAX_RECORD_MB} MB for one record, so it cannot be stored. The "
        "model's reply ran away: lower max_tokens for this LLM (or fix what makes it "
        "repeat itself), then `simulator resume` continues the conversation."
    )
