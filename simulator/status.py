"""Statuses of batches and conversations (stored as their plain string values).

Both are `str` enums, so a status compares equal to its string (`status == "completed"`)
and is stored as that string; `str()` and f-strings give the value on every Python we
support (3.10's `str, Enum` would otherwise print `BatchStatus.COMPLETED`).
"""

from __future__ import annotations

from enum import Enum


class _Status(str, Enum):
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class BatchStatus(_Status):
    PREPARING = "preparing"  # its conversations are being created
    READY = "ready"  # created, not started yet
    RUNNING = "running"  # a runner holds its lease (see BatchRecord.runner_alive)
    INTERRUPTED = "interrupted"  # stopped by Ctrl-C / kill, or its runner died
    COMPLETED = "completed"
    COMPLETED_WITH_FAILURES = "completed_with_failures"
    STOPPED = "stopped"  # too many failures, or a record it could not store

    @property
    def finished(self) -> bool:
        """A run ended with this status (the batch is not being worked on)."""
        return self in _ENDED


_ENDED = {
    BatchStatus.INTERRUPTED,
    BatchStatus.COMPLETED,
    BatchStatus.COMPLETED_WITH_FAILURES,
    BatchStatus.STOPPED,
}


class ConversationStatus(_Status):
    PENDING = "pending"
    RUNNING = "running"
    INTERRUPTED = "interrupted"
    FAILED = "failed"
    COMPLETED = "completed"
    INCOMPLETE = "incomplete"  # imported from the prototype unfinished; never continued


UNFINISHED = (
    ConversationStatus.PENDING,
    ConversationStatus.RUNNING,
    ConversationStatus.INTERRUPTED,
    ConversationStatus.FAILED,
)
