"""A lab's own classifiers, as a python scorer would name them (tests.scoring_plugin:...)."""

from __future__ import annotations

from typing import Any

calls: list[Any] = []


def shouting(text: str) -> float:
    """Share of capital letters (a stand-in for a real classifier)."""
    calls.append(text)
    letters = [c for c in text if c.isalpha()]
    return round(sum(c.isupper() for c in letters) / max(len(letters), 1), 3)


def picky(text: str) -> int:
    """Fails on some messages, as user code does."""
    calls.append(text)
    if "Guard" in text:
        raise ValueError("cannot rate a guard's message")
    return len(text)


def turns(conversation: list[dict[str, Any]]) -> int:
    calls.append(conversation)
    return len(conversation)
