"""What a judge LLM is asked, and strict reading of its answer.

The judge sees the transcript with numbered turns (or one message) and the rubric, and
must answer in the scorer's form. An answer that does not fit is re-asked (the reason
said) up to EXTRA_ASKS more times; after that the item is stored as invalid.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from simulator.conversation import Message
from simulator.scoring.definition import THIRDS, Scorer

EXTRA_ASKS = 2  # re-asks after an invalid answer

SYSTEM = (
    "You are a careful annotator for a research study. You read transcripts of role-play "
    "conversations between AI agents and answer one question about them, exactly in the "
    "form asked, with no explanation."
)


@dataclass
class Parsed:
    """A judge's answer read strictly: a value, or why it was refused."""

    value: Any = None
    valid: bool = True
    problem: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def numbered(messages: list[Message]) -> str:
    """The transcript as the judge and human annotators read it: one numbered turn a line."""
    lines = []
    for n, m in enumerate(messages, start=1):
        lines.append(f"[Turn {n}] (day {m.day}) {m.speaker} ({m.role}): {m.content.strip()}")
    return "\n".join(lines)


def instructions(scorer: Scorer, turns: int) -> str:
    """How the answer must be written."""
    if scorer.answer == "choice":
        labels = ", ".join(scorer.labels)
        return f"Answer with exactly one of these labels and nothing else: {labels}."
    if scorer.answer == "scale":
        low, high = scorer.scale or (0, 0)
        return f"Answer with one whole number from {low} to {high} and nothing else."
    if scorer.answer == "turn":
        return (
            f"Answer with the number of the turn (1 to {turns}) where it happened, or with "
            "the word none if it never happened; the number or none, nothing else."
        )
    return "Answer in at most three sentences."


def prompt(scorer: Scorer, messages: list[Message], message: Message | None) -> str:
    """The user message of the first ask."""
    if message is not None:
        body = f"Message ({message.speaker}, {message.role}):\n{message.content.strip()}"
    else:
        body = f"Transcript:\n{numbered(messages)}"
    return f"{body}\n\nQuestion: {scorer.rubric}\n\n{instructions(scorer, len(messages))}"


def reask(scorer: Scorer, turns: int, problem: str) -> str:
    return f"That answer cannot be used: {problem}. {instructions(scorer, turns)}"


def _clean(text: str) -> str:
    # Strict, but not fussy about wrapping a model adds around a bare answer.
    text = text.strip()
    text = re.sub(r"^(answer|label)\s*:\s*", "", text, flags=re.IGNORECASE)
    return text.strip().strip("*\"'`").strip().rstrip(".").strip()


def parse(scorer: Scorer, text: str, turns: int) -> Parsed:
    """The answer as the scorer's value, or invalid with the reason."""
    answer = _clean(text)
    if scorer.answer == "text":
        if not answer:
            return Parsed(valid=False, problem="the answer is empty")
        return Parsed(text.strip())
    if scorer.answer == "choice":
        for label in scorer.labels:
            if answer.lower() == label.lower():
                return Parsed(label)
        return Parsed(valid=False, problem=f"{_quote(text)} is not one of the labels")
    if scorer.answer == "scale":
        low, high = scorer.scale or (0, 0)
        if re.fullmatch(r"[+-]?\d+", answer) and low <= int(answer) <= high:
            return Parsed(int(answer))
        return Parsed(
            valid=False, problem=f"{_quote(text)} is not a whole number from {low} to {high}"
        )
    # turn
    if answer.lower() in ("none", "never", "0"):
        return Parsed(turn_value(scorer, None, turns), detail={"turn": None, "turns": turns})
    match = re.fullmatch(r"(?:turn\s*)?(\d+)", answer, flags=re.IGNORECASE)
    if match and 1 <= int(match.group(1)) <= turns:
        n = int(match.group(1))
        return Parsed(turn_value(scorer, n, turns), detail={"turn": n, "turns": turns})
    return Parsed(valid=False, problem=f"{_quote(text)} is not a turn from 1 to {turns} or none")


def turn_value(scorer: Scorer, turn: int | None, turns: int) -> Any:
    """A turn as the scorer reports it: the number, its third, or its fraction ("none")."""
    if turn is None:
        return "none"
    if scorer.report == "thirds":
        return THIRDS[min(3, max(1, math.ceil(3 * turn / max(turns, 1))))]
    if scorer.report == "fraction":
        return round(turn / max(turns, 1), 4)
    return turn


def _quote(text: str, limit: int = 60) -> str:
    one_line = " ".join(text.split())
    return repr(one_line if len(one_line) <= limit else one_line[:limit] + "...")
