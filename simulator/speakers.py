"""Speaker selection: who talks next (SPEC §4). Pure functions; the auto selector's LLM
call lives in conversation.py, which uses `parse_selection` here."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Protocol


class Named(Protocol):
    name: str


def round_robin(agents: Sequence[Named], last: str | None) -> int:
    """Agents in order, cycling; a day starts (last=None) with the first agent."""
    if last is None:
        return 0
    names = [a.name for a in agents]
    return (names.index(last) + 1) % len(agents)


def random_choice(agents: Sequence[Named], last: str | None, rng: random.Random) -> int:
    """Uniform among agents other than the last speaker."""
    candidates = [i for i, a in enumerate(agents) if a.name != last or len(agents) == 1]
    return rng.choice(candidates)


def forced_choice(agents: Sequence[Named], last: str | None) -> int | None:
    """The choice when there is none to make: one agent, or two agents alternating."""
    if len(agents) == 1:
        return 0
    if len(agents) == 2:
        return 1 if agents[0].name == last else 0
    return None


# What may stand around the name in a valid answer: a lead-in ("The answer is:", "Next
# speaker:", "I choose"), an article or the role ("the prisoner Prisoner_136"), then a
# bracketed note or a clause after a comma or dash ("Guard_243 (guard)", "Guard_243 - he
# was addressed"). Anything else ("Prisoner_394 is not the one to answer", "You should not
# choose Guard_243") only mentions a name: not a choice.
_LEAD_IN = (
    r"(?:(?:the\s+|my\s+)?(?:final\s+)?(?:answer|choice|selection|next\s+speaker|speaker|next)"
    r"(?:\s+(?:is|should\s+be|will\s+be))?\s*[:=\-\u2013\u2014]?\s*"
    r"|i\s+(?:would\s+|will\s+)?(?:choose|pick|select)\s*:?\s*)?"
)
_TAIL = r"(?:[ \t]*\([^()\n]*\))?(?:[ \t]*[,;:\-\u2013\u2014][^\n]*)?[ \t]*[.!]?"


def _answer_line(answer: str) -> str:
    """The answer's first non-empty line without markdown emphasis or quotes."""
    for line in answer.splitlines():
        line = re.sub(r"\*\*|__|`", "", line).strip(" \t\"'\u201c\u201d\u2018\u2019")
        if line:
            return line
    return ""


def parse_selection(answer: str, agents: Sequence[Named], last: str | None) -> int | None:
    """The agent the answer names as its answer, unless it is the last speaker.

    The name must be the answer (its first line, maybe after a lead-in such as "The
    answer is:"), not merely inside it: "The Prisoner_394 is not the one to answer" chooses
    nobody.
    """
    by_name = {a.name.lower(): i for i, a in enumerate(agents)}
    names = "|".join(re.escape(a.name) for a in sorted(agents, key=lambda a: -len(a.name)))
    roles = "|".join(
        sorted({re.escape(a.name.rsplit("_", 1)[0]) for a in agents}, key=len, reverse=True)
    )
    pattern = rf"{_LEAD_IN}(?:the\s+)?(?:(?:{roles})s?\s+)?(?P<name>{names})(?![A-Za-z0-9_]){_TAIL}"
    m = re.fullmatch(pattern, _answer_line(answer), re.IGNORECASE)
    if m is None:
        return None
    chosen = by_name[m.group("name").lower()]
    if agents[chosen].name == last:
        return None
    return chosen
