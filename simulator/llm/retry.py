"""Retries with exponential backoff and jitter, requests spread over an LLM's endpoints, and
the adaptive per-endpoint in-flight bound.

Providers only classify failures (ProviderError.retryable / retry_after / overloaded); this
wrapper is the one place that waits and tries again, so no client library retries on its
own, and the one place that decides how many calls each endpoint gets at once.
"""

from __future__ import annotations

import email.utils
import enum
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from simulator.errors import ProviderError, RetryAfterTooLong
from simulator.llm.base import ChatMessage, ChatModel, Reply

log = logging.getLogger(__name__)

OnRetry = Callable[[ProviderError, int, float], None]


DEFAULT_REQUEST_TIMEOUT = 120.0  # seconds one attempt may take (SIMULATOR_REQUEST_TIMEOUT)
DEFAULT_START_CONCURRENCY = 4  # calls in flight per endpoint at first (SIMULATOR_CONCURRENCY_START)
OVERLOAD_STATUSES = (429, 503, 504)  # answers that mean "fewer calls at once, please"
HISTORY_LIMIT = 20_000  # changes of an endpoint's in-flight count kept (bench/adaptive.py)


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
    # Calls in flight per endpoint at first; the limit then adapts (EndpointLimit), never
    # above --concurrency.
    start_concurrency: int = DEFAULT_START_CONCURRENCY

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


class EndpointLimit:
    """Requests in flight on one endpoint, under a ceiling that adapts (SPEC §7, issue 13).

    It starts at `start`, grows while calls succeed (by one per success until the first
    overload, then by one per window of successful calls, and four times slower near the
    level that last overloaded), and shrinks to three quarters of the calls then in flight
    on an overload (429, 503, a timeout) — at most once per window of calls, so a burst of
    refusals counts as one. It never exceeds `maximum` (--concurrency) nor falls below 1.
    Endpoints of one pool share one condition, so a call spread over several endpoints
    waits for a free slot on any of them.
    """

    BACKOFF = 0.75

    def __init__(
        self,
        key: str,
        maximum: int,
        start: int | None = None,
        cond: threading.Condition | None = None,
    ):
        self.key = key
        self.maximum = max(1, maximum)
        self.limit = float(min(self.maximum, max(1, start or self.maximum)))
        self.in_flight = 0
        self.overloads = 0  # calls refused for overload (counted, for reports and figures)
        self._cond = cond or threading.Condition()
        self._started = 0  # calls begun on this endpoint so far (a call's ticket)
        self._cut_at = 0  # tickets up to this one began before the last cut
        self._overloaded_at: float | None = None  # the limit at the last overload
        # (time, calls in flight, limit) after every change: the figure of bench/adaptive.py
        self.history: deque[tuple[float, int, float]] = deque(maxlen=HISTORY_LIMIT)

    @property
    def current(self) -> int:
        """Calls allowed in flight now."""
        return max(1, min(self.maximum, int(self.limit)))

    def has_room(self) -> bool:
        return self.in_flight < self.current

    def take(self) -> int:
        """Count one more call in flight (the shared condition held); returns its ticket."""
        self.in_flight += 1
        self._started += 1
        self._note()
        return self._started

    def give_back(self, ticket: int, outcome: Outcome) -> None:
        """A call ended: adapt the limit to how it ended and wake the callers waiting."""
        with self._cond:
            saturated = self.in_flight >= self.current
            self.in_flight -= 1
            if outcome is Outcome.OK and saturated and self.limit < self.maximum:
                last = self._overloaded_at
                # Slow start (the limit doubles every window) until the first overload; then
                # one more per window, four times slower within one of the level that failed.
                step = (
                    1.0 if last is None else 1.0 / self.limit / (4 if self.limit >= last - 1 else 1)
                )
                self.limit = min(float(self.maximum), self.limit + step)
            elif outcome is Outcome.OVERLOAD:
                self.overloads += 1
                if ticket > self._cut_at:
                    self._overloaded_at = min(self.limit, self.in_flight + 1.0)
                    self.limit = max(1.0, self._overloaded_at * self.BACKOFF)
                    self._cut_at = self._started
                    log.info(
                        "%s overloaded: now at most %d calls in flight", self.key, self.current
                    )
            self._note()
            self._cond.notify_all()

    def _note(self) -> None:
        self.history.append((time.monotonic(), self.in_flight, self.limit))


class Outcome(enum.Enum):
    OK = "ok"  # the endpoint answered: grow
    OVERLOAD = "overload"  # 429, 503, timeout: shrink
    DONE = "done"  # any other failure: no change


def _outcome(exc: ProviderError) -> Outcome:
    return Outcome.OVERLOAD if getattr(exc, "overloaded", False) else Outcome.DONE


class RetryingModel:
    """A ChatModel that spreads calls over an LLM's endpoints, bounds the calls in flight on
    each, and retries retryable failures (on another endpoint when there is one)."""

    def __init__(
        self,
        inner: ChatModel | Sequence[ChatModel],
        policy: RetryPolicy | None = None,
        limiter: EndpointLimit | Sequence[EndpointLimit] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: OnRetry | None = None,
    ):
        inners = [inner] if not isinstance(inner, Sequence) else list(inner)
        limits: list[EndpointLimit | None]
        if limiter is None:
            limits = [None] * len(inners)
        else:
            limits = [limiter] if isinstance(limiter, EndpointLimit) else list(limiter)
        assert inners and len(limits) == len(inners), "one limit per endpoint"
        self.inners = inners
        self.limits = limits
        self.inner = inners[0]
        self.limiter = limits[0]
        self.policy = policy or RetryPolicy()
        self.sleep = sleep
        self.on_retry = on_retry
        self.name = self.inner.name
        self.endpoint = ",".join(m.endpoint for m in inners)
        self._rng = random.Random()
        conds = {id(lim._cond): lim._cond for lim in limits if lim is not None}
        assert len(conds) <= 1, "the endpoints of one LLM share one condition (ModelPool)"
        self._cond = next(iter(conds.values()), None) or threading.Condition()
        self._turn = 0  # where the round-robin between equally loaded endpoints stands

    def _acquire(self, avoid: set[int]) -> tuple[int, int]:
        """Wait for a free slot on an endpoint; (endpoint index, ticket). The least loaded
        endpoint wins, ties in turn; one that failed this call only if no other has room."""
        n = len(self.inners)
        with self._cond:
            while True:
                free = [i for i in range(n) if (lim := self.limits[i]) is None or lim.has_room()]
                if free:
                    pick = [i for i in free if i not in avoid] or free

                    def load(i: int) -> tuple[float, int]:
                        lim = self.limits[i]
                        used = lim.in_flight / lim.current if lim is not None else 0.0
                        return used, (i - self._turn) % n

                    best = min(pick, key=load)
                    self._turn = best + 1
                    lim = self.limits[best]
                    return best, lim.take() if lim is not None else 0
                self._cond.wait()

    def _release(self, index: int, ticket: int, outcome: Outcome) -> None:
        lim = self.limits[index]
        if lim is not None:
            lim.give_back(ticket, outcome)

    def chat(self, messages: list[ChatMessage], *, stop: list[str] | None = None) -> Reply:
        attempts = max(1, self.policy.attempts)
        failed_on: set[int] = set()
        for attempt in range(1, attempts + 1):
            # A slot is held only while a request is in flight, never while backing off,
            # so one struggling conversation does not starve the others.
            index, ticket = self._acquire(failed_on)
            try:
                reply = self.inners[index].chat(messages, stop=stop)
            except ProviderError as exc:
                self._release(index, ticket, _outcome(exc))
                exc.retries = attempt - 1  # type: ignore[attr-defined]
                if not exc.retryable or attempt == attempts:
                    raise
                if exc.retry_after is not None and exc.retry_after > self.policy.max_delay:
                    too_long = RetryAfterTooLong(exc, self.policy.max_delay)
                    too_long.retries = attempt - 1  # type: ignore[attr-defined]
                    raise too_long from exc
                failed_on.add(index)
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
            except BaseException:
                self._release(index, ticket, Outcome.DONE)
                raise
            self._release(index, ticket, Outcome.OK)
            reply.retries = attempt - 1
            return reply
        raise AssertionError("unreachable")  # the loop always returns or raises
