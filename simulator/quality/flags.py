"""Per-message flags (SPEC §11): pure functions of a reply's text and its context."""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterable

from simulator.replies import label_pattern, other_labels, other_patterns

TRUNCATED = "truncated"  # the provider stopped at the token limit
EMPTY = "empty"  # nothing left after cleaning and the re-asks
ROLE_BREAK = "role_break"  # still speaks as someone else after cleaning
REPEATED = "repeated"  # the same text as an earlier message of the conversation
LEAKED_PROMPT = "leaked_prompt"  # reproduces a heading or sentence of its own system prompt

MESSAGE_FLAGS = (TRUNCATED, EMPTY, ROLE_BREAK, REPEATED, LEAKED_PROMPT)
SUMMARY_FLAGS = (TRUNCATED, EMPTY)

# Finish reasons meaning "hit the token limit": OpenAI, Ollama and llama.cpp say "length";
# some OpenAI-compatible servers (Anthropic-style gateways) say "max_tokens".
LENGTH_REASONS = frozenset({"length", "max_tokens"})
# A sentence of the system prompt counts as leaked only when it is this long: short ones
# ("Be brief.") are said naturally.
MIN_LEAKED_WORDS = 6

# Where a label starts a turn inside a reply: a line start, or after a sentence's end.
_TURN_START = r"(?:^|(?<=[.!?\"'”’)\]])[ \t]+)"


@functools.lru_cache(maxsize=256)
def _role_break_re(labels: tuple[str, ...], speaker: str) -> re.Pattern[str]:
    pattern = label_pattern(labels, other_patterns(speaker))
    return re.compile(_TURN_START + pattern, re.IGNORECASE | re.MULTILINE)


def truncated(finish_reason: str | None) -> bool:
    """Whether the provider says it stopped at the token limit."""
    return (finish_reason or "").lower() in LENGTH_REASONS


def speaks_as_other(
    text: str, speaker: str, other_names: Iterable[str], role_names: Iterable[str]
) -> bool:
    """Whether `text` (already cleaned) still holds a turn labelled as someone other than
    `speaker`: another agent (or an invented `Name_NN`), a role, the researcher or
    summarizer, or a generic `You:` / `User:` label, at a line start or after the end of a
    sentence."""
    labels = other_labels(other_names, role_names)
    return bool(_role_break_re(tuple(labels), speaker).search(text))


def normalized(text: str) -> str:
    """Lower-case words separated by single spaces: what `repeated` and `leaked_prompt`
    compare (so spacing, case and punctuation do not hide a copy)."""
    return " ".join(re.findall(r"[^\W_]+(?:['’][^\W_]+)*", text.lower()))


@functools.lru_cache(maxsize=64)
def _prompt_parts(system_prompt: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(headings, long sentences) of a system prompt, normalized (computed once per prompt)."""
    headings = tuple(
        h
        for h in (
            normalized(m) for m in re.findall(r"(?m)^[ \t]*#{1,6}[ \t]+(.+?)[ \t]*$", system_prompt)
        )
        if h
    )
    body = re.sub(r"(?m)^[ \t]*#{1,6}[ \t]+.*$", "\n", system_prompt)
    sentences = []
    for chunk in re.split(r"(?<=[.!?])\s+|\n+", body):
        words = normalized(chunk)
        if len(words.split()) >= MIN_LEAKED_WORDS:
            sentences.append(words)
    return headings, tuple(sentences)


def leaks_prompt(text: str, system_prompt: str) -> bool:
    """Whether `text` reproduces a heading (`## Goal`, as a markdown heading line) or a
    whole sentence (of MIN_LEAKED_WORDS words or more) of `system_prompt`."""
    if not text or not system_prompt:
        return False
    headings, sentences = _prompt_parts(system_prompt)
    for line in re.findall(r"(?m)^[ \t>*_]*#{1,6}[ \t]*(.+?)[ \t]*$", text):
        if normalized(line) in headings:
            return True
    words = f" {normalized(text)} "
    return any(f" {s} " in words for s in sentences)


def message_flags(
    content: str,
    *,
    speaker: str,
    finish_reason: str | None,
    system_prompt: str,
    other_names: Iterable[str],
    role_names: Iterable[str],
    seen: Collection[str] = (),
) -> list[str]:
    """The flags of one agent message, in MESSAGE_FLAGS order.

    `content` is the cleaned reply; `seen` the `normalized()` contents of the
    conversation's earlier messages (every day, not only this one).
    """
    flags = summary_flags(content, finish_reason)  # truncated, empty
    if EMPTY in flags:
        return flags
    if speaks_as_other(content, speaker, other_names, role_names):
        flags.append(ROLE_BREAK)
    mine = normalized(content)
    if mine and mine in seen:
        flags.append(REPEATED)
    if leaks_prompt(content, system_prompt):
        flags.append(LEAKED_PROMPT)
    return flags


def summary_flags(content: str, finish_reason: str | None) -> list[str]:
    """The flags of one summary: truncated and empty."""
    flags = []
    if truncated(finish_reason):
        flags.append(TRUNCATED)
    if not content.strip():
        flags.append(EMPTY)
    return flags
