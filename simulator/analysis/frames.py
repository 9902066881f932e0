"""Dataframes of stored conversations for notebooks and the report (issue 12, item 1).

    conversations_df  one row per conversation: every condition, status, quality, totals and
                      one column per conversation-level score and source (`<scorer>@<source>`)
    messages_df       one row per message: its conversation's conditions, speaker, role, day,
                      turn, position, flags and one column per message-level score and source
    scores_df         one row per stored score (long format), with its conversation's conditions

Everything is read in a fixed number of queries (Store.analysis_* ), whatever the number of
conversations. Of a scorer with several versions (its rubric was edited), the wide columns
hold the version its current definition has, else the version with the most scores;
scores_df keeps every version (`current` says which one the wide columns hold).
pandas is imported inside the functions: `import simulator.cli` does not pay for it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from simulator.errors import MissingExtra, UserError
from simulator.quality import MESSAGE_FLAGS, SUMMARY_FLAGS

if TYPE_CHECKING:
    import pandas as pd

    from simulator.conversation import Message
    from simulator.experiment import Experiment
    from simulator.scoring.definition import Scorer
    from simulator.settings import Settings
    from simulator.store import ConversationRecord, Score, Store

DISTRIBUTION = "llm-interaction-simulator"
USAGE_COLUMNS = ("prompt_tokens", "completion_tokens", "calls", "retries", "latency")


def require(*modules: str) -> None:
    """A clear error when the `analysis` extra is not installed."""
    import importlib

    for name in modules or ("pandas", "pyarrow", "statsmodels", "matplotlib"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingExtra(
                f"The analysis tools need {name}, which is not installed: install the analysis "
                f"extra with `pip install '{DISTRIBUTION}[analysis]'` (or `make install`)."
            ) from None


def score_column(scorer: str, source: str, category: str = "") -> str:
    """The wide column of one scorer and source (`toxicity@judge:ollama/llama3`), and of one
    moderation category (`moderation@moderation:omni-moderation-latest:harassment`)."""
    return f"{scorer}@{source}" + (f":{category}" if category else "")


@dataclass
class AnalysisData:
    """One experiment's (or batch's) conversations, messages and scores, read once."""

    store: Store
    experiment: Experiment
    batch_id: str | None
    records: list[ConversationRecord]
    scorers: dict[str, Scorer]  # the experiment's current definitions, by name
    scores: list[Score]  # every score of the selected conversations, every version
    versions: dict[str, str]  # scorer name -> the version the wide columns hold
    _messages: list[tuple[ConversationRecord, list[Message]]] | None = field(default=None)

    def messages(self) -> list[tuple[ConversationRecord, list[Message]]]:
        if self._messages is None:
            self._messages = list(self.store.analysis_messages(self.records))
        return self._messages

    def current_scores(self) -> list[Score]:
        """The scores of each scorer's chosen version."""
        return [s for s in self.scores if self.versions.get(s.scorer) == s.version]

    def level(self, scorer: str) -> str:
        """conversation | message, from the definition or the scores themselves."""
        if scorer in self.scorers:
            return self.scorers[scorer].level
        return (
            "message"
            if any(s.message for s in self.scores if s.scorer == scorer)
            else ("conversation")
        )


def open_store(source: Store | Settings) -> Store:
    """A Store as given, or one opened with these settings."""
    from simulator.settings import Settings
    from simulator.store import Store

    if isinstance(source, Store):
        return source
    if isinstance(source, Settings):
        from simulator.database import connect, current_user

        db = connect(source)
        return Store.open(db, current_user(db, source))
    raise UserError(
        f"Expected a Store or Settings, got {type(source).__name__}: pass "
        "simulator.settings.load_settings() or a Store."
    )


def load(
    source: Store | Settings,
    experiment: str,
    where: dict[str, str] | list[str] | None = None,
    extra: list[Scorer] | None = None,
) -> AnalysisData:
    """Read an experiment (id, prefix or name) or one batch of it; `where` as `--where`;
    `extra`: scorer definitions that add to, or replace by name, the experiment's (as
    `--scorers FILE`: the wide columns then hold the versions they define)."""
    from simulator.store import parse_where

    store = open_store(source)
    filters = parse_where(where) if isinstance(where, list) else dict(where or {})
    _, exp, batch_id = store.find_experiment_or_batch(experiment)
    records = store.list_conversations(
        experiment_id=None if batch_id else exp.id,
        batch_id=batch_id,
        where=filters,
        factors=exp.factor_levels(),
    )
    return from_records(store, exp, batch_id, records, extra)


def from_records(
    store: Store,
    exp: Experiment,
    batch_id: str | None,
    records: list[ConversationRecord],
    extra: list[Scorer] | None = None,
) -> AnalysisData:
    """The scores and scorers of these conversations (one query for the scores)."""
    from simulator.scoring.run import scorers_for

    wanted = {r.id for r in records}
    scores = [
        s for s in store.analysis_scores(exp.id or "", batch_id) if s.conversation_id in wanted
    ]
    try:
        scorers = {s.name: s for s in scorers_for(exp, extra or [])}
    except UserError:  # a stored definition that no longer parses: go by the scores alone
        scorers = {}
    counts: dict[str, Counter[str]] = {}
    for s in scores:
        counts.setdefault(s.scorer, Counter())[s.version] += 1
    versions: dict[str, str] = {}
    for name, seen in counts.items():
        current = scorers[name].version if name in scorers else ""
        versions[name] = current if current in seen else seen.most_common(1)[0][0]
    return AnalysisData(store, exp, batch_id, records, scorers, scores, versions)


# --- the tables ------------------------------------------------------------------------------


def conditions_row(exp: Experiment, rec: ConversationRecord) -> dict[str, Any]:
    """The condition columns of a conversation, as the csv/jsonl export names them."""
    from simulator.export import conditions

    row = conditions(exp, rec)
    row["status"] = str(rec.status.value)
    return row


def conversation_row(exp: Experiment, rec: ConversationRecord) -> dict[str, Any]:
    row = conditions_row(exp, rec)
    row["error"] = rec.error
    row["messages_stored"] = rec.message_count
    q = rec.quality
    row["summaries_stored"] = q.summaries if q else None
    for flag in MESSAGE_FLAGS:
        row[f"flag_{flag}"] = q.flags.get(flag, 0) if q else None
    for flag in SUMMARY_FLAGS:
        row[f"summary_flag_{flag}"] = q.summary_flags.get(flag, 0) if q else None
    row["selector_calls"] = q.selector_calls if q else None
    row["invalid_selections"] = q.invalid_selections if q else None
    row["fallbacks"] = q.fallbacks if q else rec.fallbacks
    row["unusable_reasons"] = "; ".join(q.reasons) if q else None
    for key in USAGE_COLUMNS:
        total = sum(getattr(u, key) for u in rec.usage.values())
        row[key] = float(total) if key == "latency" else int(total)
    return row


def conversations_frame(data: AnalysisData) -> pd.DataFrame:
    import pandas as pd

    exp = data.experiment
    rows = {rec.id: conversation_row(exp, rec) for rec in data.records}
    columns = list(next(iter(rows.values()))) if rows else _conversation_columns(exp)
    for s in data.current_scores():
        if s.message or data.level(s.scorer) != "conversation" or s.conversation_id not in rows:
            continue
        column = score_column(s.scorer, s.source)
        if column not in columns:
            columns.append(column)
        rows[s.conversation_id][column] = s.value if s.valid else None
    return _tidy(pd.DataFrame(list(rows.values()), columns=columns))


def _conversation_columns(exp: Experiment) -> list[str]:
    """The columns of an empty conversations table (no conversation to take them from)."""
    names = _conditions_names(exp)
    names += ["error", "messages_stored", "summaries_stored"]
    names += [f"flag_{f}" for f in MESSAGE_FLAGS] + [f"summary_flag_{f}" for f in SUMMARY_FLAGS]
    names += ["selector_calls", "invalid_selections", "fallbacks", "unusable_reasons"]
    return names + list(USAGE_COLUMNS)


def _message_only() -> set[str]:
    from simulator.export import MESSAGE_COLUMNS

    return set(MESSAGE_COLUMNS)


MESSAGE_FIELDS = (
    "position",
    "day",
    "turn",
    "speaker",
    "role",
    "content",
    "empty",
    "finish_reason",
    "flags",
    *(f"flag_{f}" for f in MESSAGE_FLAGS),
    *USAGE_COLUMNS,
)


def messages_frame(data: AnalysisData) -> pd.DataFrame:
    import pandas as pd

    exp = data.experiment
    by_item: dict[tuple[str, str], dict[str, Any]] = {}
    score_columns: list[str] = []
    for s in data.current_scores():
        if not s.message:
            continue
        column = score_column(s.scorer, s.source)
        values = by_item.setdefault((s.conversation_id, s.message), {})
        values[column] = s.value if s.valid else None
        categories = (s.detail or {}).get("category_scores")
        names = [column]
        if isinstance(categories, dict):
            for category, value in categories.items():
                values[score_column(s.scorer, s.source, category)] = value
                names.append(score_column(s.scorer, s.source, category))
        score_columns += [n for n in names if n not in score_columns]
    rows = []
    for rec, messages in data.messages():
        base = conditions_row(exp, rec)
        for position, m in enumerate(messages, start=1):
            row = dict(base)
            row.update(
                position=position,
                day=m.day,
                turn=m.turn,
                speaker=m.speaker,
                role=m.role,
                content=m.content,
                empty=m.empty,
                finish_reason=m.finish_reason,
                flags=",".join(m.flags),
            )
            for flag in MESSAGE_FLAGS:
                row[f"flag_{flag}"] = flag in m.flags
            for key in USAGE_COLUMNS:
                row[key] = getattr(m.usage, key)
            row.update(by_item.get((rec.id, f"{m.day}:{m.turn}"), {}))
            rows.append(row)
    columns = _conditions_names(exp) + list(MESSAGE_FIELDS) + score_columns
    return _tidy(pd.DataFrame(rows, columns=columns))


def _conditions_names(exp: Experiment) -> list[str]:
    from simulator.export import columns

    return [c for c in columns(exp) if c not in _message_only()]


SCORE_FIELDS = (
    "conversation_id",
    "message",
    "day",
    "turn",
    "role",
    "scorer",
    "version",
    "current",
    "source",
    "source_kind",
    "valid",
    "value",
    "value_number",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "calls",
    "creator",
    "created_at",
)


def scores_frame(data: AnalysisData) -> pd.DataFrame:
    import pandas as pd

    exp = data.experiment
    by_id = {rec.id: rec for rec in data.records}
    conditions: dict[str, dict[str, Any]] = {}
    rows = []
    for s in sorted(data.scores, key=lambda s: (s.conversation_id, s.message, s.scorer, s.source)):
        rec = by_id[s.conversation_id]
        if rec.id not in conditions:
            conditions[rec.id] = conditions_row(exp, rec)
        day, _, turn = s.message.partition(":")
        row = {
            "conversation_id": s.conversation_id,
            "message": s.message,
            "day": int(day) if s.message else None,
            "turn": int(turn) if s.message else None,
            "role": s.role,
            "scorer": s.scorer,
            "version": s.version,
            "current": data.versions.get(s.scorer) == s.version,
            "source": s.source,
            "source_kind": s.source.partition(":")[0],
            "valid": s.valid,
            "value": None if s.value is None else str(s.value),
            "value_number": number(s.value),
            "attempts": s.attempts,
            "prompt_tokens": s.usage.prompt_tokens,
            "completion_tokens": s.usage.completion_tokens,
            "calls": s.usage.calls,
            "creator": s.creator,
            "created_at": s.created_at,
        }
        cond = {k: v for k, v in conditions[rec.id].items() if k not in row}
        rows.append(row | cond)
    columns = list(SCORE_FIELDS) + [
        c for c in _conditions_names(exp) if c not in SCORE_FIELDS and c != "creator"
    ]
    return _tidy(pd.DataFrame(rows, columns=columns))


def number(value: Any) -> float | None:
    """A score's value as a number (booleans as 0/1), or None for a label or text."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    """One dtype per kind of column, whatever the values and the pandas version: booleans
    `boolean`, whole numbers `Int64`, other numbers `float64`, text `string` (mixed values
    become text), times UTC datetimes. A column with no value at all stays `object`."""
    import pandas as pd
    from pandas.api import types

    for name in df.columns:
        column = df[name]
        if types.is_bool_dtype(column.dtype):
            df[name] = column.astype("boolean")
            continue
        if types.is_integer_dtype(column.dtype):
            df[name] = column.astype("Int64")
            continue
        if column.dtype != object and not types.is_string_dtype(column.dtype):
            continue
        values = [v for v in column if v is not None and not (isinstance(v, float) and v != v)]
        if not values:
            continue
        if all(isinstance(v, bool) for v in values):
            df[name] = column.astype("boolean")
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            df[name] = column.astype("Int64")
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            df[name] = pd.to_numeric(column, errors="coerce").astype("float64")
        elif all(hasattr(v, "isoformat") for v in values):
            df[name] = pd.to_datetime(column, utc=True)
        else:
            df[name] = column.map(lambda v: None if v is None else str(v)).astype("string")
    return df


# --- the public functions ---------------------------------------------------------------------


def conversations_df(
    source: Store | Settings, experiment: str, where: dict[str, str] | list[str] | None = None
) -> pd.DataFrame:
    """One row per conversation of an experiment (id, prefix or name) or batch."""
    require("pandas")
    return conversations_frame(load(source, experiment, where))


def messages_df(
    source: Store | Settings, experiment: str, where: dict[str, str] | list[str] | None = None
) -> pd.DataFrame:
    """One row per stored message, with its conversation's conditions and its scores."""
    require("pandas")
    return messages_frame(load(source, experiment, where))


def scores_df(
    source: Store | Settings, experiment: str, where: dict[str, str] | list[str] | None = None
) -> pd.DataFrame:
    """One row per stored score (every scorer, version and source)."""
    require("pandas")
    return scores_frame(load(source, experiment, where))
