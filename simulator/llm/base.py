"""The provider interface: a ChatModel takes chat messages and returns a Reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass
class Reply:
    """One completed LLM call."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: float = 0.0  # seconds, wall time of the successful attempt
    retries: int = 0  # failed attempts before this one (filled in by the retry wrapper)
    # Why the model stopped, as the provider says it ("stop", "length", ...; None: not
    # reported). "length" means it hit max_tokens and the text is cut off.
    finish_reason: str | None = None
    cached: bool = False  # answered from the response cache (--cache), no LLM call made


class ChatModel(Protocol):
    """What every provider implements. Implementations do no I/O in __init__."""

    name: str  # the model name as the provider knows it (e.g. "llama3:latest")
    endpoint: str  # a key identifying the server, used to bound concurrency per endpoint

    def chat(self, messages: list[ChatMessage], *, stop: list[str] | None = None) -> Reply:
        """Run one chat completion. Raise ProviderError (retryable or not) on failure."""
        ...
