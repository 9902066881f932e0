"""The response cache (opt-in, `--cache`): every LLM response stored in MongoDB under a key
made of the model, its base URL, the messages, the sampling parameters and the caller's
scope (a conversation's condition, seed and repetition; a judge's scorer), and reused when
the same request comes again — after a crash, a re-run of a condition, or a judge asked
again over the same transcripts.

Repetitions are never collapsed: the repetition and its seed are part of the key, and so is
how many times the same request was already made in the scope (a re-ask after an empty
reply gets a response of its own, not the empty one again).

Identical requests in flight at the same moment (two conversations or judges asking the
same thing at once) share one call: the first makes it, the others wait for its response
(single-flight per key, within this process). When that call fails, the waiters get the
same error: it already went through the retry wrapper's whole policy, and N waiters each
starting that policy again would send N times the retries to an endpoint that is failing;
the caller's own handling (a failed conversation resumed, an item scored by the next run)
decides what comes next, as it would for its own call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from simulator.experiment import ModelSpec
from simulator.llm.base import ChatMessage, ChatModel, Reply
from simulator.store import CachedResponse

if TYPE_CHECKING:
    from simulator.conversation import ConversationSpec
    from simulator.store import Store

# Provider settings that change how a call is made, not what it answers.
_NOT_IN_KEY = ("timeout", "api_key_env", "latency", "price")


def conversation_scope(spec: ConversationSpec) -> dict[str, Any]:
    """What keys a conversation's calls besides the request: its condition, seed, repetition."""
    return {
        "messages": spec.messages,
        "days": spec.days,
        "agents": dict(spec.agents),
        "speaker": spec.speaker,
        "factors": dict(spec.factors),
        "seed": spec.seed,
        "repetition": spec.repetition,
    }


def request_key(
    spec: ModelSpec,
    messages: list[ChatMessage],
    stop: list[str] | None,
    scope: Mapping[str, Any],
    occurrence: int,
) -> str:
    """The cache key of one call: a SHA-256 of everything that decides its answer."""
    what = {
        "provider": spec.provider,
        "model": spec.model,
        "base_url": spec.base_url,
        "sampling": spec.sampling(),
        "extra": {k: v for k, v in sorted(spec.extra.items()) if k not in _NOT_IN_KEY},
        "messages": [[m["role"], m["content"]] for m in messages],
        "stop": list(stop or []),
        "scope": dict(scope),
        "occurrence": occurrence,
    }
    text = json.dumps(what, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache:
    """The cache of one run: hands out cached models and counts hits and misses."""

    def __init__(self, store: Store):
        self.store = store
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._flights: dict[str, Future[Reply]] = {}  # key -> the call in flight for it
        store.prepare_response_cache()

    def wrap(self, model: ChatModel, spec: ModelSpec, scope: Mapping[str, Any]) -> CachedModel:
        """`model` (calling `spec`) answering from the cache first, for one scope."""
        return CachedModel(model, spec, self, scope)

    def count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def answer(self, key: str, model: str, call: Callable[[], Reply]) -> Reply:
        """The response stored under `key`, else the one being made for it by another
        thread, else `call()`'s (stored under `key` for the next time)."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = Future()
        if not leader:
            reply = flight.result()  # raises the call's error
            self.count(hit=True)
            return dataclasses.replace(reply, latency=0.0, retries=0, cached=True)
        try:
            # Looked up once in the flight: a call that ended before it began has stored its
            # response before leaving the table of flights.
            stored = self.store.cached_response(key)
            if stored is not None:
                reply = Reply(
                    text=stored.text,
                    prompt_tokens=stored.prompt_tokens,
                    completion_tokens=stored.completion_tokens,
                    latency=0.0,
                    finish_reason=stored.finish_reason,
                    cached=True,
                )
                flight.set_result(reply)
                self.count(hit=True)
                return reply
            reply = call()
            flight.set_result(reply)  # the waiters go on while the response is stored
            self.count(hit=False)
            self.store.cache_response(
                CachedResponse(
                    key=key,
                    model=model,
                    text=reply.text,
                    prompt_tokens=reply.prompt_tokens,
                    completion_tokens=reply.completion_tokens,
                    latency=reply.latency,
                    finish_reason=reply.finish_reason,
                )
            )
            return reply
        except BaseException as e:  # Interrupted and KeyboardInterrupt too: no waiter is stranded
            if not flight.done():
                flight.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._flights[key]

    def summary(self) -> str:
        """`Response cache: 12 hits, 3 misses` (calls answered from it / made and stored)."""
        hits = f"{self.hits:,} hit" + ("" if self.hits == 1 else "s")
        misses = f"{self.misses:,} miss" + ("" if self.misses == 1 else "es")
        return f"Response cache: {hits} (no LLM call), {misses} (called and stored)."


class CachedModel:
    """A ChatModel for one scope (one conversation, one judge) that answers from the cache
    when it can, and stores every new response."""

    def __init__(
        self, inner: ChatModel, spec: ModelSpec, cache: ResponseCache, scope: Mapping[str, Any]
    ):
        self.inner = inner
        self.spec = spec
        self.cache = cache
        self.scope = dict(scope)
        self.name = inner.name
        self.endpoint = inner.endpoint
        self._seen: Counter[str] = Counter()  # requests made so far in this scope
        self._lock = threading.Lock()

    def chat(self, messages: list[ChatMessage], *, stop: list[str] | None = None) -> Reply:
        first = request_key(self.spec, messages, stop, self.scope, 0)
        with self._lock:
            occurrence = self._seen[first]
            self._seen[first] += 1
        key = (
            first
            if occurrence == 0
            else request_key(self.spec, messages, stop, self.scope, occurrence)
        )
        return self.cache.answer(key, self.spec.label, lambda: self.inner.chat(messages, stop=stop))
