"""The response cache (issue 13): LLM responses reused with --cache.

One document per call key (simulator/llm/cache.py: model, base URL, messages, sampling,
the caller's scope with its seed and repetition): unique by key, written once; a second
writer of the same key (another worker) changes nothing.
"""

from __future__ import annotations

import dataclasses

import pymongo
from pymongo.errors import DuplicateKeyError, PyMongoError

from simulator.errors import StorageError
from simulator.store.base import StoreBase
from simulator.store.documents import now
from simulator.store.records import CachedResponse


class ResponseCache(StoreBase):
    """LLM responses kept for reuse (simulator/llm/cache.py)."""

    @property
    def _response_cache(self) -> pymongo.collection.Collection:
        return self._db["response_cache"]

    def prepare_response_cache(self) -> None:
        """Create the cache's unique index (once per run that uses the cache)."""
        try:
            self._response_cache.create_index([("key", 1)], unique=True)
        except PyMongoError as e:
            raise StorageError(f"Could not prepare the response cache: {e}") from e

    def cached_response(self, key: str) -> CachedResponse | None:
        """The stored response for a call key, if any."""
        doc = self._response_cache.find_one({"key": key})
        if doc is None:
            return None
        return CachedResponse(
            key=doc["key"],
            model=doc.get("model") or "",
            text=doc.get("text") or "",
            prompt_tokens=int(doc.get("prompt_tokens") or 0),
            completion_tokens=int(doc.get("completion_tokens") or 0),
            latency=float(doc.get("latency") or 0.0),
            finish_reason=doc.get("finish_reason"),
        )

    def cache_response(self, response: CachedResponse) -> bool:
        """Store a response unless its key has one already; True when written."""
        doc = dataclasses.asdict(response) | {"created_at": now(), "creator": self.user}
        try:
            result = self._response_cache.update_one(
                {"key": response.key}, {"$setOnInsert": doc}, upsert=True
            )
        except DuplicateKeyError:  # another process stored the same key in between
            return False
        return result.upserted_id is not None

    def count_cached_responses(self) -> int:
        """Responses the cache holds."""
        return self._response_cache.count_documents({})
