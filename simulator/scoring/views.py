"""Scores where people look: `show`, the HTML page and the exports' score columns.

Which value a column holds (documented in the README):

* Scorers that have scores in the experiment get columns (the experiment's order first);
  an experiment nothing has scored exports as before.
* A scorer's column (`score_<scorer>`) holds its **current version**: the one the experiment
  defines now, or for a scorer only given in a `--scorers FILE`, the version with the newest
  score. Scores of older versions (an edited rubric) stay stored but are not shown in it.
* Of that version's sources, a **human** answer wins, then a judge, a python function, a
  moderation endpoint; between two of the same kind, the newer. An invalid answer counts only
  when no source gave a valid one (its cell is empty).
* With `--scores all` there is one column per scorer and source,
  `score_<scorer>__<source>` (e.g. `score_goal_achieved__human_ann`), each holding that
  source's current version (the defined one when it has scores of it, else its newest).
* A per-message scorer fills the rows of the messages it scored (empty on summary rows); where
  rows are conversations (txt's conversations.csv) it holds the mean over the conversation's
  messages (true/false as 1/0; empty when its values are not numbers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulator.experiment import Experiment
    from simulator.store import Score, ScoreSeries, Store

SCORE_MODES = ("one", "all", "none")
SOURCE_ORDER = ("human", "judge", "python", "moderation")
_EPOCH = datetime.min


def source_kind(source: str) -> str:
    return source.partition(":")[0]


def _rank(score: Score) -> tuple[int, int, float]:
    kind = source_kind(score.source)
    order = SOURCE_ORDER.index(kind) if kind in SOURCE_ORDER else len(SOURCE_ORDER)
    when = score.created_at.timestamp() if score.created_at else 0.0
    return (0 if score.valid else 1, order, -when)


def preferred(scores: Iterable[Score]) -> Score | None:
    """The score a one-column view shows: valid first, human > judge > python > moderation,
    then the newest."""
    return min(scores, key=_rank, default=None)


def newest_per_source(scores: Iterable[Score]) -> list[Score]:
    """Per (message, scorer, source), the newest score: what `show` and the page list."""
    newest: dict[tuple[str, str, str], Score] = {}
    for s in scores:
        key = (s.message, s.scorer, s.source)
        was = newest.get(key)
        if was is None or (s.created_at or _EPOCH) > (was.created_at or _EPOCH):
            newest[key] = s
    return sorted(newest.values(), key=lambda s: (s.message, s.source, s.scorer))


def shown_value(score: Score) -> str:
    """A score as a person reads it: `Yes`, `3`, `flagged: harassment`, `invalid`."""
    if not score.valid:
        return "invalid"
    value = score.value
    if source_kind(score.source) == "moderation" and isinstance(value, bool):
        flagged = [k for k, v in (score.detail.get("categories") or {}).items() if v is True]
        if not value:
            return "not flagged"
        return "flagged: " + ", ".join(flagged) if flagged else "flagged"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "none"
    return str(value)


def cell(score: Score | None) -> Any:
    """A score's value in an export cell (None, an empty cell, when invalid or missing)."""
    if score is None or not score.valid:
        return None
    return score.value


def mean(values: Iterable[Any]) -> float | None:
    """The mean of the numbers (true/false as 1/0); None when any value is not a number."""
    numbers: list[float] = []
    for v in values:
        if v is None:
            continue
        if not isinstance(v, (int, float)):
            return None
        numbers.append(float(v))
    return round(sum(numbers) / len(numbers), 4) if numbers else None


def column_name(scorer: str, source: str | None = None) -> str:
    name = f"score_{scorer}"
    if source is None:
        return name
    return f"{name}__{re.sub(r'[^A-Za-z0-9_]+', '_', source).strip('_')}"


@dataclass
class Column:
    name: str
    scorer: str
    version: str
    source: str | None  # None: the preferred source (one column per scorer)
    per_message: bool


@dataclass
class ConversationCells:
    """One conversation's score cells: for its own rows, each message's rows, or one row."""

    columns: list[Column]
    found: dict[tuple[str, str], Any] = field(default_factory=dict)  # (column, message) -> cell

    def message(self, key: str | None) -> dict[str, Any]:
        """The cells of a message row (`key` "day:turn") or, with None, a summary row."""
        row: dict[str, Any] = {}
        for c in self.columns:
            if c.per_message:
                row[c.name] = None if key is None else self.found.get((c.name, key))
            else:
                row[c.name] = self.found.get((c.name, ""))
        return row

    def conversation(self) -> dict[str, Any]:
        """The cells of a one-row-per-conversation table: message scores as their mean."""
        row: dict[str, Any] = {}
        for c in self.columns:
            if c.per_message:
                row[c.name] = mean(v for (name, _), v in self.found.items() if name == c.name)
            else:
                row[c.name] = self.found.get((c.name, ""))
        return row


class ScoreColumns:
    """The score columns of an export of one experiment (see the module's doc)."""

    def __init__(self, columns: list[Column]):
        self.columns = columns

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @classmethod
    def for_experiment(cls, store: Store, exp: Experiment, mode: str = "one") -> ScoreColumns:
        if mode not in SCORE_MODES:
            from simulator.errors import UserError

            raise UserError(f"--scores {mode!r}: choose one of {', '.join(SCORE_MODES)}.")
        if mode == "none":
            return cls([])
        from simulator.scoring.definition import parse_scorers

        # the experiment's own scorers (as scoring.run.scorers_for reads them)
        mine = parse_scorers(exp.scorers, f"experiment {exp.id}") if exp.scorers else []
        defined = {s.name: s for s in mine}
        series = store.score_series(exp.id or "")
        return cls(_columns(defined, series, mode))

    def cells(self, scores: Sequence[Score]) -> ConversationCells:
        """The cells of one conversation, from its scores (any versions and sources)."""
        out = ConversationCells(self.columns)
        by_key: dict[tuple[str, str], list[Score]] = {}
        wanted: dict[tuple[str, str], list[Column]] = {}
        for c in self.columns:
            wanted.setdefault((c.scorer, c.version), []).append(c)
        for s in scores:
            for c in wanted.get((s.scorer, s.version), ()):
                if c.source is None or s.source == c.source:
                    by_key.setdefault((c.name, s.message), []).append(s)
        for key, candidates in by_key.items():
            out.found[key] = cell(preferred(candidates))
        return out


def _columns(defined: dict[str, Any], series: list[ScoreSeries], mode: str) -> list[Column]:
    stored: dict[str, list[ScoreSeries]] = {}
    for s in series:
        stored.setdefault(s.scorer, []).append(s)
    # scorers with stored scores only: an export of an unscored experiment keeps its shape
    names = [*(n for n in defined if n in stored), *sorted(set(stored) - set(defined))]

    def version(name: str, found: list[ScoreSeries]) -> str:
        if name in defined and any(s.version == defined[name].version for s in found):
            return str(defined[name].version)
        return max(found, key=lambda s: s.latest or _EPOCH).version

    def per_message(name: str, found: list[ScoreSeries]) -> bool:
        if name in defined:
            return bool(defined[name].level == "message")
        return any(s.per_message for s in found)

    columns: list[Column] = []
    for name in names:
        found = stored.get(name, [])
        if mode == "one":
            v = str(defined[name].version) if name in defined else version(name, found)
            columns.append(Column(column_name(name), name, v, None, per_message(name, found)))
            continue
        for source in sorted({s.source for s in found}):
            mine = [s for s in found if s.source == source]
            columns.append(
                Column(
                    column_name(name, source),
                    name,
                    version(name, mine),
                    source,
                    per_message(name, mine),
                )
            )
    return columns
