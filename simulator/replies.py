"""Cleaning model output: models prefix their own name and run on as other speakers (SPEC §5).

A speaker label, as small models write them: `Guard_117:`, `**Guard_117:**`, `[Guard_117]:`,
`The Prisoner_911:`, `Guard_117 (to the prisoners):`, and the bracketed tags `[Guard_117]`
and `(the researcher)` with no colon. `label_pattern` builds the one regular expression for
all of them; cleaning uses it at line starts, and the quality flags (simulator/quality) use
it to find what cleaning left.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

# Labels a chat model writes for the two sides of a chat, not for anyone in the conversation.
GENERIC_LABELS = ("You", "User", "Assistant", "Human", "System")
# The generic label a model uses for itself: stripped at the start of a reply like its name.
GENERIC_SELF = ("Assistant", "I")
# Other things a model writes as a speaker label (regexes): any name shaped like an agent's
# (`Gun_1:`, `Prisoner_2014:`, `Palace_Dreamer:` — invented participants), and the
# researcher's own `Day 1 summary:` lines from the day's opening, which a model copies as
# if it spoke them.
NAME_SHAPED = r"[A-Z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+"
DAY_SUMMARY = r"Day\s+\d+\s+summary"

_OPEN = r"[\*_\[\(#>\s]*"  # markdown emphasis, brackets, heading or quote marks before a label
_CLOSE = r"[\*_\]\)\s]*"
_ARTICLE = r"(?:the\s+)?"  # "The Prisoner_911: ..."
_ASIDE = r"(?:[ \t]*\([^()\n]{0,40}\))?"  # "Guard_117 (to the prisoners): ..."


def _alternatives(names: Iterable[str]) -> str:
    escaped = sorted({re.escape(n) for n in names if n}, key=len, reverse=True)
    return "(?:" + "|".join(escaped) + ")"


def label_pattern(names: Iterable[str], patterns: Iterable[str] = ()) -> str:
    """A regex (no anchors, no flags) for a speaker label naming one of `names` (or
    matching one of the regexes `patterns`)."""
    alternatives = _alternatives(names)
    if patterns:
        alternatives = "(?:" + "|".join([alternatives, *patterns]) + ")"
    who = rf"{_ARTICLE}{alternatives}(?![A-Za-z0-9])"
    colon = rf"{_OPEN}{who}{_ASIDE}{_CLOSE}:"
    tag = rf"[\*_ \t]*[\[\(][ \t]*{who}[ \t]*[\]\)](?:{_CLOSE}:)?"
    return rf"(?:{tag}|{colon})"


@functools.lru_cache(maxsize=256)
def _patterns(
    speaker: str, role: str, others: tuple[str, ...]
) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The speaker's own leading label, and the labels of everyone else (compiled once per
    speaker: a batch cleans thousands of replies from the same few agents)."""
    own_names = [speaker, role, role.capitalize(), *GENERIC_SELF]
    own = re.compile(rf"^{label_pattern(own_names)}[\*_\s]*", re.IGNORECASE)
    cut = re.compile(
        rf"^{label_pattern(others, other_patterns(speaker))}", re.IGNORECASE | re.MULTILINE
    )
    return own, cut


def other_patterns(speaker: str) -> tuple[str, ...]:
    """Label regexes meaning someone other than `speaker` speaks, beyond the known names."""
    return (rf"(?!{re.escape(speaker)}(?![A-Za-z0-9])){NAME_SHAPED}", DAY_SUMMARY)


def other_labels(other_names: Iterable[str], role_names: Iterable[str]) -> tuple[str, ...]:
    """Labels that mean someone else speaks: the other agents, every role, the researcher,
    the summarizer and the generic chat labels."""
    return (
        *other_names,
        *(r.capitalize() for r in role_names),
        "Researcher",
        "Summarizer",
        *GENERIC_LABELS,
    )


def clean_reply(
    raw: str,
    speaker: str,
    role: str,
    other_names: Iterable[str],
    role_names: Iterable[str],
) -> str:
    """Return the reply as it should be stored.

    Trim; drop leading labels naming the speaker itself (`Guard_117:`, `Guard:`,
    `**Guard_117:**`, `The Guard_117:`, `[Guard_117]`, `Assistant:`); cut at the first
    line that starts with anyone else's label (another agent, any role, Researcher,
    Summarizer, or a generic `You:` / `User:` / `Human:`; bracketed tags such as
    `(the researcher)` too); trim again.
    """
    own, cut = _patterns(speaker, role, other_labels(other_names, role_names))
    text = raw.strip()
    # A model sometimes repeats its label ("Guard_117: Guard_117: ..."): strip them all.
    while True:
        stripped = own.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped.strip()
    match = cut.search(text)
    if match:
        text = text[: match.start()]
    return text.strip()
