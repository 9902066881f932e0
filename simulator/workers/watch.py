"""`simulator watch`: the live progress of a batch run by anyone, read from the database.

Each look is one read of the batch document (its running totals, its workers) plus, when
the totals are not trusted, a recount; rates and the ETA come from two looks apart in time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from simulator.status import BatchStatus, ConversationStatus
from simulator.store import BatchRecord, Store, WorkerInfo


@dataclass
class Snapshot:
    """One look at a batch."""

    batch: BatchRecord
    counts: dict[str, int]
    messages: int
    prompt_tokens: int
    completion_tokens: int
    failures: int
    workers: list[WorkerInfo] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.counts.get(ConversationStatus.COMPLETED.value, 0)

    @property
    def finished(self) -> int:
        """Conversations that ended (completed or failed)."""
        return self.done + self.failures

    @property
    def live(self) -> bool:
        return self.batch.runner_alive is True and not self.batch.stopped_unexpectedly

    @property
    def over(self) -> bool:
        """Nobody works on the batch any more and its last run ended."""
        return not self.live and self.batch.shown_status != BatchStatus.RUNNING


def look(store: Store, ref: str) -> Snapshot:
    batch = store.get_batch(ref)
    progress = store.batch_progress(batch)
    t = progress.totals
    return Snapshot(
        batch=batch,
        counts=dict(progress.counts),
        messages=t.messages,
        prompt_tokens=t.prompt_tokens,
        completion_tokens=t.completion_tokens,
        failures=progress.counts.get(ConversationStatus.FAILED.value, 0),
        workers=store.batch_workers(batch) if batch.workers else [],
    )


def describe(now: Snapshot, first: Snapshot | None) -> str:
    """One line: done/total, messages, tokens, rate, ETA, failures, workers and hosts."""
    b = now.batch
    parts = [
        f"{b.id} {b.shown_status.value.replace('_', ' ')}",
        f"{now.done:,}/{b.total:,} done",
        f"{now.messages:,} messages",
        f"{now.prompt_tokens:,}/{now.completion_tokens:,} tokens in/out",
    ]
    if first is not None and now.at - first.at > 0:
        minutes = (now.at - first.at) / 60
        rate = (now.finished - first.finished) / minutes
        tokens = (
            now.prompt_tokens
            + now.completion_tokens
            - first.prompt_tokens
            - first.completion_tokens
        ) / (minutes * 60)
        parts.append(f"{rate:,.1f} conversations/min, {tokens:,.0f} tokens/s")
        left = b.total - now.finished
        if rate > 0 and left > 0 and now.live:
            parts.append(f"ETA {_duration(left / rate * 60)}")
    parts.append(f"{now.failures:,} failed")
    alive = [w for w in now.workers if w.alive]
    if alive:
        hosts: dict[str, int] = {}
        for w in alive:
            hosts[w.host] = hosts.get(w.host, 0) + 1
        where = ", ".join(f"{h} ×{n}" if n > 1 else h for h, n in sorted(hosts.items()))
        parts.append(f"{len(alive)} worker{'s' if len(alive) != 1 else ''} on {where}")
    else:
        parts.append("no live worker")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
