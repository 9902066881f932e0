"""One verdict per conversation: `usable`, by a written rule whose thresholds are settings.

The rule: a completed conversation is usable when every one of these holds
  empty replies (messages and summaries)      <= SIMULATOR_USABLE_MAX_EMPTY      (default 0)
  truncated replies (messages and summaries)  <= SIMULATOR_USABLE_MAX_TRUNCATED  (default 10%)
  selector fallbacks to round robin           <= SIMULATOR_USABLE_MAX_FALLBACKS  (default 1)
  messages with role_break                    <= SIMULATOR_USABLE_MAX_ROLE_BREAKS (default 0)
  messages with repeated                      <= SIMULATOR_USABLE_MAX_REPEATED   (default 0)
  messages with leaked_prompt                 <= SIMULATOR_USABLE_MAX_LEAKED     (default 0)
A threshold is a count (`2`) or a share (`10%`, or `0.1`): of the replies (messages and
summaries) for empty and truncated, of the agent messages for the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from simulator.errors import UserError


@dataclass(frozen=True)
class Limit:
    """At most `count` items, or at most `share` (0..1) of them."""

    count: int | None = None
    share: float | None = None

    def allows(self, n: int, of: int) -> bool:
        if self.count is not None:
            return n <= self.count
        assert self.share is not None
        return n <= self.share * of + 1e-9

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        return f"{(self.share or 0) * 100:g}%"


def parse_limit(text: str, what: str = "the threshold") -> Limit:
    """`2` (a count), `10%` or `0.1` (a share); a UserError saying how to write it."""
    raw = str(text).strip()
    hint = f"{what} is a count (e.g. 2) or a share (e.g. 10% or 0.1), got {raw!r}"
    number = raw[:-1].strip() if raw.endswith("%") else raw
    try:
        value = float(number)
    except ValueError:
        raise UserError(f"{hint}.") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{hint}: it cannot be negative.")
    if raw.endswith("%"):
        if value > 100:
            raise UserError(f"{hint}: a share cannot exceed 100%.")
        return Limit(share=value / 100)
    if "." not in number and value.is_integer():
        return Limit(count=int(value))
    if value > 1:
        raise UserError(f"{hint}: a share written as a fraction cannot exceed 1.")
    return Limit(share=value)


@dataclass(frozen=True)
class UsableRule:
    """The thresholds of the `usable` verdict (settings SIMULATOR_USABLE_MAX_*)."""

    max_empty: Limit = Limit(count=0)
    max_truncated: Limit = Limit(share=0.1)
    max_fallbacks: Limit = Limit(count=1)
    max_role_breaks: Limit = Limit(count=0)
    max_repeated: Limit = Limit(count=0)
    max_leaked: Limit = Limit(count=0)


@dataclass
class Quality:
    """A conversation's flag counts, selector figures and verdict (stored on it)."""

    messages: int = 0
    summaries: int = 0
    flags: dict[str, int] = field(default_factory=dict)  # messages carrying each flag
    summary_flags: dict[str, int] = field(default_factory=dict)  # summaries carrying each
    selector_calls: int = 0
    invalid_selections: int = 0  # selector answers that named no valid agent
    fallbacks: int = 0  # turns round robin decided after three invalid answers
    usable: bool = True
    reasons: list[str] = field(default_factory=list)  # why not usable, one line per rule broken

    def line(self) -> str:
        """One line: the verdict, the counts that are not zero, the selector figures."""
        counts = [
            f"{n} {flag}"
            for flag in ("truncated", "empty", "role_break", "repeated", "leaked_prompt")
            if (n := self.flags.get(flag, 0) + self.summary_flags.get(flag, 0))
        ]
        text = "usable" if self.usable else "NOT usable"
        messages = f"{self.messages} message{'' if self.messages == 1 else 's'}"
        summaries = f"{self.summaries} summar{'y' if self.summaries == 1 else 'ies'}"
        text += f" · {messages}, {summaries}"
        text += " · " + (", ".join(counts) if counts else "no flags")
        if self.selector_calls:
            text += (
                f" · selector: {self.selector_calls} calls, {self.invalid_selections} invalid, "
                f"{self.fallbacks} fallbacks"
            )
        if self.reasons:
            text += f" ({'; '.join(self.reasons)})"
        return text


def _count(flag_lists: Iterable[Sequence[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for flags in flag_lists:
        for flag in flags:
            counts[flag] = counts.get(flag, 0) + 1
    return counts


def assess(
    message_flags: Sequence[Sequence[str]],
    summary_flags: Sequence[Sequence[str]],
    *,
    selector_calls: int,
    invalid_selections: int,
    fallbacks: int,
    rule: UsableRule,
) -> Quality:
    """Count the flags and apply the rule."""
    q = Quality(
        messages=len(message_flags),
        summaries=len(summary_flags),
        flags=_count(message_flags),
        summary_flags=_count(summary_flags),
        selector_calls=selector_calls,
        invalid_selections=invalid_selections,
        fallbacks=fallbacks,
    )
    replies = q.messages + q.summaries
    checks = [
        ("empty", "replies", q.flags.get("empty", 0) + q.summary_flags.get("empty", 0),
         replies, rule.max_empty),
        ("truncated", "replies",
         q.flags.get("truncated", 0) + q.summary_flags.get("truncated", 0), replies,
         rule.max_truncated),
        ("fallbacks", "messages", fallbacks, q.messages, rule.max_fallbacks),
        ("role_break", "messages", q.flags.get("role_break", 0), q.messages,
         rule.max_role_breaks),
        ("repeated", "messages", q.flags.get("repeated", 0), q.messages, rule.max_repeated),
        ("leaked_prompt", "messages", q.flags.get("leaked_prompt", 0), q.messages,
         rule.max_leaked),
    ]  # fmt: skip
    for name, of_what, n, of, limit in checks:
        if not limit.allows(n, of):
            q.reasons.append(f"{n} {name} of {of} {of_what}, at most {limit} allowed")
    q.usable = not q.reasons
    return q
