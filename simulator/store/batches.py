"""Batches: creating and reading them, preparing their conversations, and the lease a run
holds on its batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from pymongo.errors import BulkWriteError, PyMongoError

from simulator.conversation import Agent, ConversationSpec
from simulator.errors import NotFoundError, UserError
from simulator.experiment import Experiment
from simulator.grid import Grid
from simulator.status import UNFINISHED, BatchStatus, ConversationStatus
from simulator.store.documents import (
    TALLY_RELEASED,
    _batch,
    _conversation,
    _grid_doc,
    _holder,
    _model_to_doc,
    _tally_doc,
    _utc,
    new_id,
    now,
)
from simulator.store.records import (
    BEAT_SECONDS,
    LEASE_SECONDS,
    BatchRecord,
    BatchTally,
    ConversationRecord,
    Lease,
    LeaseHolder,
)
from simulator.store.tallies import Tallies, _tally_trusted


class Batches(Tallies):
    """Batches, their conversations' preparation, and the batch lease."""

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
            # No conversation yet: its totals are exact (empty), so the first run that
            # claims it has nothing to recount (Store._claim).
            "tally": _tally_doc(BatchTally(), TALLY_RELEASED),
        }
        self._batches.insert_one(doc)
        return _batch(doc)

    def get_batch(self, ref: str) -> BatchRecord:
        batch = _batch(self._resolve(self._batches, ref, "batch"))
        self.fill_liveness([batch])
        return batch

    def latest_batch(self, *, unfinished: bool = False) -> BatchRecord | None:
        """The caller's newest batch (`unfinished`: the newest not completed)."""
        query: dict[str, Any] = {"creator": self.user}
        if unfinished:
            query["status"] = {"$ne": BatchStatus.COMPLETED.value}
        doc = self._batches.find_one(query, sort=[("created_at", -1)])
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
                    doc = self._batches.find_one({"_id": lease.batch_id}, {"runner": 1})
                    lease._lose(_holder((doc or {}).get("runner")))
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

    def _with_server_time(self, batch_id: str, *fields: str) -> tuple[dict, datetime] | None:
        """The batch's `fields` and the server's clock, read together (None: no such batch)."""
        rows = list(
            self._batches.aggregate(
                [
                    {"$match": {"_id": batch_id}},
                    {"$project": {**dict.fromkeys(fields, 1), "now": "$$NOW"}},
                ]
            )
        )
        return (rows[0], _utc(rows[0]["now"])) if rows else None

    def _claim(self, lease: Lease, *, free: bool = False) -> None:
        """Take the batch if its lease is free: a compare-and-swap on the runner read,
        judged by the server's clock."""
        read = self._with_server_time(lease.batch_id, "runner", "tally.owner")
        if read is None:
            raise NotFoundError(f"Batch {lease.batch_id} does not exist any more.")
        doc, server_now = read
        held = doc.get("runner")
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
        owner = (doc.get("tally") or {}).get("owner")
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


def _busy(batch_id: str, held: LeaseHolder | None, *, joinable: bool = False) -> UserError:
    """`joinable`: the run has live workers, so `simulator work` would join it."""
    who = str(held) if held else "another process"
    join = f" To help it instead, add a worker: `simulator work {batch_id}`." if joinable else ""
    return UserError(
        f"Batch {batch_id} is being run right now by {who}. Wait for it to finish, or stop it "
        f"(Ctrl-C there, or kill it), then run `simulator resume {batch_id}` again.{join}"
    )
