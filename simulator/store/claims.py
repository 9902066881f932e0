"""Conversation claims (issue 13: many workers, one batch).

Any number of worker processes, on any machines, run one batch together. Each joins
the batch (`worker_lease`): the batch's `runner` holds the run's token (the epoch, the
owner of the running totals), `workers.<token>` each worker's host, pid and heartbeat.
A worker claims one conversation at a time (`claim_conversation`, a find_one_and_update
that stamps `claim`: its token, host, pid, epoch and a server-time heartbeat); its
heartbeat refreshes the claims it holds. A conversation is claimable when pending or
interrupted, failed in an earlier run, or running under a worker that is gone: a claim
from an earlier run, a claim whose heartbeat is older than the lease's seconds, or one
of a worker known dead (its pid gone on this host). A worker that loses a claim writes
nothing more to that conversation (fencing: `Lease.check(conv_id)`, `_fence`).

A worker may stop the run for all (`stop_run`, e.g. more conversations of the run failed
than --max-failures allows): the reason is kept on the run (`runner.stop`), and every
other worker reads it with its next heartbeat and stops too. The batch's `elapsed` grows
by the wall time during which at least one worker of the run was working: every worker's
heartbeat adds the part of its own time since its last heartbeat that no worker has added
yet (`_run_time`, judged by the server's clock), so time is neither lost when the worker
that began the run leaves early nor counted twice by workers running side by side.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pymongo
from pymongo.errors import PyMongoError

from simulator.errors import LeaseLost, NotFoundError, UserError
from simulator.status import BatchStatus, ConversationStatus
from simulator.store.batches import Batches, _busy, _lease_free, _live_workers
from simulator.store.documents import TALLY_RELEASED, _conversation, _holder, new_id, now
from simulator.store.records import (
    LEASE_SECONDS,
    BatchRecord,
    ConversationRecord,
    Lease,
    WorkerInfo,
)
from simulator.store.tallies import _moved


class WorkerClaims(Batches):
    """A batch run by workers, each claiming one conversation at a time."""

    @contextmanager
    def worker_lease(
        self,
        batch_id: str,
        *,
        seconds: float = LEASE_SECONDS,
        join: bool = True,
        on_lost: Callable[[], None] | None = None,
        on_last: Callable[[], tuple[BatchStatus, str | None] | None] | None = None,
        on_stopped: Callable[[str], None] | None = None,
    ) -> Iterator[Lease]:
        """Work on a batch as one of its workers. `join`: work alongside live workers
        (else a live run of the batch refuses, as `resume` always did). `on_last`: the
        status to set when this worker leaves last and the batch is still `running`.
        `on_stopped(reason)`: called (once) when a heartbeat finds that another worker
        stopped the run (`stop_run`)."""
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
                lease,
                lambda elapsed: self._beat(lease, elapsed, on_stopped),
                counted,
                on_lost,
                "worker-lease",
            ):
                yield lease
        finally:
            try:
                self._leave(lease, time.monotonic() - counted[0], on_last)
            except PyMongoError:
                pass  # unreleased, its heartbeat goes stale and others take over

    def _join(self, lease: Lease, *, join: bool) -> None:
        for _ in range(20):
            read = self._with_server_time(lease.batch_id, "runner", "workers")
            if read is None:
                raise NotFoundError(f"Batch {lease.batch_id} does not exist any more.")
            doc, server_now = read
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
                    joinable = bool(live and holder.token)
                    raise _busy(lease.batch_id, live[0] if live else holder, joinable=joinable)
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

    def _beat(
        self, lease: Lease, elapsed: float, on_stopped: Callable[[str], None] | None = None
    ) -> bool:
        """One heartbeat: the batch's and this worker's (with the run's time, see
        `_run_time`), then its claims'. False when the run was taken over or this worker
        was given up for dead (it then writes nothing). Reads whether the run was stopped."""
        sent = time.monotonic()
        beat = {
            "runner.heartbeat": "$$NOW",
            f"workers.{lease.token}.heartbeat": "$$NOW",
            **_run_time(elapsed),
        }
        mine = {
            "_id": lease.batch_id,
            "runner.token": lease.owner,
            f"workers.{lease.token}": {"$exists": True},
        }
        doc = self._batches.find_one_and_update(mine, [{"$set": beat}], {"runner.stop": 1})
        if doc is None:
            return False
        held = set(lease.conversations)
        if held:
            claims = {"_id": {"$in": sorted(held)}, "claim.token": lease.token}
            beaten = self._conversations.update_many(
                claims, {"$currentDate": {"claim.heartbeat": True}}
            )
            if beaten.matched_count < len(held):
                still = {d["_id"] for d in self._conversations.find(claims, {"_id": 1})}
                lease.lost_conversations |= held - still
                lease.conversations -= held - still
        lease.beat_at = sent
        stop = (doc.get("runner") or {}).get("stop")
        if stop and lease.stop_reason is None:
            lease.stop_reason = str(stop)
            if on_stopped is not None:
                on_stopped(lease.stop_reason)
        return True

    def failed_in_run(self, lease: Lease) -> int:
        """Conversations of the batch that failed in this run, by any of its workers (a
        conversation failed in an earlier run is claimed again, and so counted anew)."""
        return self._conversations.count_documents(
            {
                "batch_id": lease.batch_id,
                "status": ConversationStatus.FAILED.value,
                "claim.epoch": lease.owner,
            }
        )

    def stop_run(self, lease: Lease, reason: str) -> str:
        """Stop this run of the batch for all its workers: the batch is `stopped` with
        `reason` at once, and each other worker stops at its next heartbeat (its calls in
        flight get their grace, as with Ctrl-C). Returns the reason the run stopped for:
        this one, or that of a worker that stopped it first."""
        stopped = self._batches.update_one(
            {
                "_id": lease.batch_id,
                "runner.token": lease.owner,
                f"workers.{lease.token}": {"$exists": True},
                "runner.stop": {"$exists": False},
            },
            {
                "$set": {
                    "runner.stop": reason,
                    "status": BatchStatus.STOPPED.value,
                    "error": reason,
                    "finished_at": now(),
                }
            },
        )
        if stopped.matched_count:
            lease.stop_reason = reason
        return self.run_stopped(lease) or reason

    def run_stopped(self, lease: Lease) -> str | None:
        """Why a worker stopped this run of the batch (`stop_run`), or None."""
        if lease.stop_reason is None:
            doc = self._batches.find_one(
                {"_id": lease.batch_id, "runner.token": lease.owner}, {"runner.stop": 1}
            )
            stop = ((doc or {}).get("runner") or {}).get("stop")
            lease.stop_reason = str(stop) if stop else None
        return lease.stop_reason

    def start_running(self, lease: Lease) -> str | None:
        """Mark the batch `running` for this run, unless a worker of the run has stopped
        it already; returns the reason it was stopped then (None: running)."""
        lease.check()
        running = self._batches.update_one(
            {"_id": lease.batch_id, "runner.token": lease.owner, "runner.stop": {"$exists": False}},
            {"$set": {"status": BatchStatus.RUNNING.value, "error": None}},
        )
        return None if running.matched_count else self.run_stopped(lease)

    def claim_conversation(
        self, lease: Lease, *, dead: Iterable[str] = ()
    ) -> ConversationRecord | None:
        """Claim a conversation of the batch that needs work, or None when none does.

        Pending ones first, from a page of their ids (in grid order, shuffled so that
        workers rarely reach for the same one), each taken by its id if still pending;
        then those left by a worker that is gone, or failed in an earlier run.
        """
        lease.check()
        running = ConversationStatus.RUNNING.value
        while True:  # first those it let go while late, if no other worker took them since
            with lease.claiming:
                if not lease.let_go:
                    break
                conv_id = lease.let_go.pop()
            mine = {"_id": conv_id, "status": running, "claim.token": lease.token}
            record = self._take(lease, mine)
            if record is not None:
                return record
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

    def release_claim(self, lease: Lease, conv_id: str, *, unfinished: bool = False) -> None:
        """This worker is done with the conversation (its status says how it ended).
        `unfinished`: it stopped writing to it, taken over or not heard from for too long;
        in the latter case the claim is still its own, and it is claimed again first."""
        lease.conversations.discard(conv_id)
        if unfinished:
            with lease.claiming:
                lease.let_go.append(conv_id)

    def reap_workers(self, lease: Lease) -> set[str]:
        """Tokens of the batch's workers that are gone (dead pid on this host, or silent for
        longer than their lease), removed from the batch; the totals, which one of them
        may have left between a write and its count, are recounted."""
        read = self._with_server_time(lease.batch_id, "workers")
        if read is None:
            return set()
        doc, server_now = read
        me = {"host": lease.host, "pid": lease.pid}
        dead = set()
        for token, w in (doc.get("workers") or {}).items():
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
        update: list[dict[str, Any]] = [
            {"$set": _run_time(elapsed)},
            {"$unset": f"workers.{lease.token}"},
        ]
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


def _run_time(elapsed: float) -> dict[str, Any]:
    """The fields of a pipeline update that add to the batch's `elapsed` the part of a
    worker's last `elapsed` seconds that no worker of the run has added yet: at most the
    time since the run's time was last added (`runner.counted`, the server's clock in ms),
    which then becomes now. Workers side by side add their common time once; the time of
    one that left or was killed keeps being added by those still working."""
    now_ms = {"$toLong": "$$NOW"}
    since = {"$divide": [{"$subtract": [now_ms, {"$ifNull": ["$runner.counted", 0]}]}, 1000]}
    added = {"$max": [0, {"$min": [max(0.0, elapsed), since]}]}
    return {
        "elapsed": {"$add": [{"$ifNull": ["$elapsed", 0]}, added]},
        "runner.counted": now_ms,
    }


def _fence(conv_ids: list[str], lease: Lease, outcome: list[BaseException | None]) -> set[int]:
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
