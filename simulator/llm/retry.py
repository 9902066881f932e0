"""Retries with exponential backoff and jitter, and the per-endpoint in-flight bound.

Providers only classify failures (ProviderError.retryable / retry_after); this wrapper is
the one place that waits and tries again, so no client library retries on its own.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from simulator.errors import ProviderError, RetryAfterTooLong
from simulator.llm.base import ChatMessage, ChatModel, Reply

log = logging.getLogger(__name__)

OnRetry = Callable[[ProviderError, int, float], None]


DEFAULT_REQUEST_TIMEOUT = 120.0  # seconds one attempt may take (SIMULATOR_REQUEST_TIMEOUT)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to call. ``base_delay=0`` never sleeps (tests).

    A call takes at most ``attempts`` x ``timeout`` plus the waits between attempts. A server
    asking (Retry-After) to wait longer than ``max_delay`` fails the call at once: waiting
    an hour silently is worse than a failed conversation that `resume` continues later.
    """

    attempts: int = 5  # total attempts, the first one included
    base_delay: float = 0.5  # seconds before the first retry; doubles each time
    max_delay: float = 30.0  # cap on one wait, a server's Retry-After included
    jitter: float = 0.5  # +/- fraction of the backoff, so concurrent callers spread out
    timeout: float = DEFAULT_REQUEST_TIMEOUT  # seconds one attempt may take (HTTP providers)

    def delay(
        self, failed: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait after the ``failed``-th failed attempt (1-based)."""
        if self.base_delay <= 0:
            return 0.0
        backoff = min(self.max_delay, self.base_delay * 2 ** (failed - 1))
        if self.jitter:
            backoff *= 1 + self.jitter * (2 * (rng or random).random() - 1)
        return max(retry_after or 0.0, backoff, 0.0)


def parse_retry_after(value: str | None) -> float | None:
    """A Retry-After (or retry-after-ms style) header value in seconds: delta-seconds or HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class RetryingModel:
    """A ChatModel that bounds requests in flight per endpoint and retries retryable failures."""

    def __init__(
        self,
        inner: ChatModel,
        policy: RetryPolicy | None = None,
        limiter: threading.Semaphore | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: OnRetry | None = None,
    ):
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self.limiter = limiter
        self.sleep = sleep
        self.on_retry = on_retry
        self.name = inner.name
        self.endpoint = inner.endpoint
        self._rng = random.Random()

    def chat(self, messages: list[ChatMessage], *, stop: list[str] | None = None) -> Reply:
        attempts = max(1, self.policy.attempts)
        for attempt in range(1, attempts + 1):
            try:
                # The limiter is held only while a request is in flight, never while backing
                # off, so one struggling conversation does not starve the others.
                if self.limiter is not None:
                    with self.limiter:
                        reply = self.inner.chat(messages, stop=stop)
                else:
                    reply = self.inner.chat(messages, stop=stop)
            except ProviderError as exc:
                exc.retries = attempt - 1  # type: ignore[attr-defined]
                if not exc.retryable or attempt == attempts:
                    raise
                if exc.retry_after is not None and exc.retry_after > self.policy.max_delay:
                    too_long = RetryAfterTooLong(exc, self.policy.max_delay)
                    too_long.retries = attempt - 1  # type: ignore[attr-defined]
                    raise too_long from exc
                delay = self.policy.delay(attempt, exc.retry_after, self._rng)
                # info, not warning: the progress display counts retries, and a console
                # line per retry would scroll a struggling batch off the screen.
                log.info(
                    "%s: attempt %d/%d failed (%s); retrying in %.2fs",
                    self.name,
                    attempt,
                    attempts,
                    exc,
                    delay,
                )
                if self.on_retry is not None:
                    self.on_retry(exc, attempt, delay)
                if delay > 0:
                    self.sleep(delay)
                continue
            reply.retries = attempt - 1
            return reply
        raise AssertionError("unreachable")  # the loop always returns or raises
