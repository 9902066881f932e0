"""Conditions to compare: `--by` names resolved to columns, their levels in order, and one
`condition` label per conversation ("risks=yes · llm=ollama/llama3")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from simulator.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from simulator.analysis.frames import AnalysisData

ENDED = ("completed", "incomplete")
UNFINISHED = ("pending", "running", "interrupted")
ALIASES = {"speaker": "speaker_selection", "agents": "agents_total", "rep": "repetition"}


def condition_columns(data: AnalysisData, frame: pd.DataFrame) -> list[str]:
    """Columns `--by` may name: every factor, and the built-in conditions."""
    from simulator.analysis.frames import _conditions_names

    skip = {
        "experiment_id",
        "experiment_name",
        "conversation_id",
        "conversation_index",
        "creator",
        "status",
        "usable",
    }
    return [c for c in _conditions_names(data.experiment) if c not in skip and c in frame]


def resolve_by(data: AnalysisData, frame: pd.DataFrame, by: list[str] | None) -> list[str]:
    """The columns to compare: those named, else every factor and LLM that varies."""
    allowed = condition_columns(data, frame)
    if not by:
        varying = [c for c in allowed if c.startswith("factor_") and frame[c].nunique() > 1]
        if "llm" in frame and frame["llm"].nunique() > 1:
            varying.append("llm")
        return varying
    chosen = []
    for name in by:
        key = ALIASES.get(name.strip(), name.strip())
        column = next((c for c in (key, f"factor_{key}") if c in allowed), None)
        if column is None:
            factors = [c[len("factor_") :] for c in allowed if c.startswith("factor_")]
            others = [c for c in allowed if not c.startswith("factor_")]
            raise UserError(
                f"--by {name}: not a factor or condition of experiment "
                f"{data.experiment.name}. Compare by a factor ({', '.join(factors) or 'none'}) "
                f"or a condition ({', '.join(others)})."
            )
        if column not in chosen:
            chosen.append(column)
    return chosen


def _is_na(value: Any) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _sort_key(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def levels(data: AnalysisData, column: str, values: Any) -> list[str]:
    """The levels of a condition in order: a factor's as declared, others sorted."""
    present = {str(v) for v in values if not _is_na(v)}
    order: list[str] = []
    if column.startswith("factor_"):
        order = data.experiment.factor_levels().get(column[len("factor_") :], [])
    ordered = [level for level in order if level in present]
    return ordered + sorted(present - set(ordered), key=_sort_key)


def short(column: str) -> str:
    return column[len("factor_") :] if column.startswith("factor_") else column


def add_condition(data: AnalysisData, frame: pd.DataFrame, by: list[str]) -> list[str]:
    """A `condition` column ("risks=yes · llm=x"), ordered; returns the conditions in order."""
    import itertools

    import pandas as pd

    if not by:
        frame["condition"] = pd.Categorical(["all conversations"] * len(frame))
        return ["all conversations"]
    per = [levels(data, c, frame[c]) for c in by]
    names = [
        " · ".join(f"{short(c)}={v}" for c, v in zip(by, combo, strict=True))
        for combo in itertools.product(*per)
    ]
    labels = [
        " · ".join(f"{short(c)}={'' if _is_na(row[c]) else row[c]}" for c in by)
        for _, row in frame[by].iterrows()
    ]
    names += sorted(set(labels) - set(names))
    frame["condition"] = pd.Categorical(labels, categories=names)
    return [n for n in names if n in set(labels)]
