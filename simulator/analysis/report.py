"""`simulator report`: an experiment's results tables and figures in one folder (issue 12).

    DIR/report.html        one self-contained page (no network): every table and figure
    DIR/tables/*.csv       each table, full precision
    DIR/figures/*.png|svg  each figure

Sections: the design (planned, completed, usable per condition; failure and unusable rates per
condition and LLM), the answers of choice scorers per condition, P(attempt) and
P(success | attempt) with Wilson 95% intervals for a label set with a "not tried" label, means
with 95% intervals of numeric scores per condition and role and their course over the
conversation, one regression per outcome, and agreement between sources.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from simulator.analysis.conditions import (
    ENDED,
    UNFINISHED,
    add_condition,
    levels,
    resolve_by,
    short,
)
from simulator.analysis.frames import AnalysisData, conversations_frame, load, require
from simulator.analysis.models import agreement_section, models_section
from simulator.analysis.outcomes import (
    attempt_items,
    attempt_labels,
    choice_items,
    numeric_items,
    outcomes,
)
from simulator.analysis.page import Section, Table, page
from simulator.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from simulator.scoring.definition import Scorer
    from simulator.settings import Settings
    from simulator.store import Store


@dataclass
class ReportResult:
    html: Path
    tables: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    conversations: int = 0
    analysed: int = 0
    scores: int = 0
    notices: list[str] = field(default_factory=list)  # what the page says plainly


# --- sections -----------------------------------------------------------------------------


def rates(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """planned, completed, failed, unfinished, usable, unusable and the rates per group."""
    import pandas as pd

    rows = []
    groups = frame.groupby(keys, observed=True, sort=True, dropna=False) if keys else [((), frame)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        status = g["status"].astype(str)
        planned = len(g)
        completed = int(status.isin(ENDED).sum())
        failed = int((status == "failed").sum())
        usable = int((g["usable"] == True).sum())  # noqa: E712 (a nullable boolean)
        unusable = int(((g["usable"] == False) & status.isin(ENDED)).sum())  # noqa: E712
        row = dict(zip(keys, key, strict=True))
        row.update(
            planned=planned,
            completed=completed,
            failed=failed,
            unfinished=int(status.isin(UNFINISHED).sum()),
            usable=usable,
            unusable=unusable,
            failure_rate=failed / planned if planned else math.nan,
            unusable_rate=unusable / completed if completed else math.nan,
        )
        rows.append(row)
    return pd.DataFrame(rows)


def design_section(frame: pd.DataFrame, by: list[str], usable_only: bool) -> Section:
    section = Section("design", "Design: planned, completed and usable conversations")
    if frame.empty:
        section.notices.append(
            "This experiment has no conversations (with these conditions) yet: run some with "
            "`simulator run EXPERIMENT`."
        )
        return section
    section.paragraphs.append(
        "Planned: every conversation of the selected batches; completed: ended (imported "
        "incomplete ones included); usable: completed and passing the quality rule "
        "(SIMULATOR_USABLE_MAX_*). Failure rate = failed / planned; unusable rate = "
        "unusable / completed."
    )
    keys = ["condition"]
    design = rates(frame, keys)
    section.items.append(Table("design", "Conversations per condition", design))
    by_llm = rates(frame, ["llm"])
    section.items.append(Table("design_by_llm", "Failure and unusable rates per LLM", by_llm))
    if len(by) > 1:
        for column in by:
            marginal = rates(frame, [column]).rename(columns={column: short(column)})
            section.items.append(
                Table(f"design_by_{short(column)}", f"Rates per {short(column)}", marginal)
            )
    usable = int((frame["usable"] == True).sum())  # noqa: E712
    if usable == 0:
        section.notices.append(
            f"None of the {len(frame)} conversations is usable"
            + (": the score analyses below have nothing to analyse." if usable_only else ".")
            + " See `unusable_reasons` with `simulator conversations EXPERIMENT --where "
            "usable=false` or in conversations.csv."
        )
    return section


# --- the report ------------------------------------------------------------------------------


def write_report(
    source: Store | Settings,
    experiment: str,
    out_dir: str | Path,
    *,
    by: list[str] | None = None,
    scorers: list[str] | None = None,
    usable_only: bool = False,
    where: dict[str, str] | list[str] | None = None,
    extra_scorers: list[Scorer] | None = None,
) -> ReportResult:
    """Write the report of an experiment (id, prefix or name) or one batch into `out_dir`;
    `extra_scorers` (a scorers file's) add to, or replace by name, the experiment's."""
    from simulator.export import role_colours

    require()
    import pandas as pd

    data = load(source, experiment, where, extra_scorers)
    exp = data.experiment
    if not data.records:  # an empty page would pass for a report of nothing happening
        what = f"Batch {data.batch_id}" if data.batch_id else f"Experiment {exp.id} ('{exp.name}')"
        filters = [f"{k}={v}" for k, v in where.items()] if isinstance(where, dict) else where
        with_filters = f" with {', '.join(filters)}" if filters else ""
        raise UserError(
            f"{what} has no conversations{with_filters}: nothing to report, no report "
            f"written. Run some with `simulator run {(exp.id or '')[:8]}`; see what it has with "
            f"`simulator conversations {(data.batch_id or exp.id or '')[:8]}`."
        )
    frame = conversations_frame(data)
    columns = resolve_by(data, frame, by)
    known = set(data.scorers) | {s.scorer for s in data.scores}
    for name in scorers or []:
        if name not in known:
            raise UserError(
                f"--scorer {name}: experiment {exp.name} has no scorer or scores of that name "
                f"(it has: {', '.join(sorted(known)) or 'none'})."
            )
    conditions = add_condition(data, frame, columns)
    for column in columns:  # tables list a condition's levels in order (a factor's as declared)
        order = levels(data, column, frame[column])
        frame[column] = pd.Categorical(
            [None if pd.isna(v) else str(v) for v in frame[column]], categories=order
        )
    status = frame["status"].astype(str)
    mask = status.isin(ENDED)
    if usable_only:
        mask &= frame["usable"] == True  # noqa: E712
    analysed_frame = frame[mask.fillna(False).astype(bool)]
    analysed = set(analysed_frame["conversation_id"])
    sections = [design_section(frame, columns, usable_only)]
    found = outcomes(data, analysed, scorers)
    notices = list(sections[0].notices)
    scores_section = Section("outcomes", "Outcomes")
    if not data.scores or (
        scorers and not found and not any(s.scorer in scorers for s in data.scores)
    ):
        scores_section.notices.append(
            f"No scores are stored for these conversations: score them with `simulator score "
            f"{(exp.id or '')[:8]}` or import an annotation sheet (`simulator annotate import`)."
        )
    elif not analysed:
        what = "usable " if usable_only else "completed "
        scores_section.notices.append(
            f"No {what}conversations to analyse: there are no outcomes to report."
        )
    elif not found:
        scores_section.notices.append(
            "The analysed conversations have no choice or numeric "
            "scores (free-text answers are not summarised)."
        )
    notices += scores_section.notices
    sections.append(scores_section)
    roles = [r.name for r in exp.roles]
    colours = role_colours(roles + sorted({s.role for s in data.scores if s.role} - set(roles)))
    positions: dict[tuple[str, str], int] = {}
    if any(o.kind == "numeric" and o.level == "message" for o in found):
        for rec, messages in data.messages():
            for p, m in enumerate(messages, start=1):
                positions[(rec.id, f"{m.day}:{m.turn}")] = p
    cond_in_set = [c for c in conditions if c in set(analysed_frame["condition"].astype(str))]
    for o in found:
        if o.kind == "choice":
            scores_section.items += choice_items(o, analysed_frame, cond_in_set)
            labels = attempt_labels(o)
            if labels and o.level == "conversation":
                scores_section.items += attempt_items(o, labels, analysed_frame, cond_in_set)
        else:
            scores_section.items += numeric_items(
                o, analysed_frame, cond_in_set, colours, positions
            )
    if found:
        predictors = list(columns)
        if "llm" not in predictors and frame["llm"].nunique() > 1:
            predictors.append("llm")
        sections.append(models_section(data, frame, analysed_frame, found, predictors, usable_only))
        sections.append(agreement_section(data, analysed, scorers))
    return _write(
        data, frame, analysed_frame, columns, usable_only, sections, notices, Path(out_dir)
    )


def _write(
    data: AnalysisData,
    frame: pd.DataFrame,
    analysed_frame: pd.DataFrame,
    columns: list[str],
    usable_only: bool,
    sections: list[Section],
    notices: list[str],
    out: Path,
) -> ReportResult:
    exp = data.experiment
    result = ReportResult(out / "report.html", notices=notices)
    result.conversations = len(frame)
    result.analysed = len(analysed_frame)
    result.scores = len(data.scores)
    try:
        (out / "tables").mkdir(parents=True, exist_ok=True)
        (out / "figures").mkdir(exist_ok=True)
        for section in sections:
            for item in section.items:
                if isinstance(item, Table):
                    path = out / "tables" / f"{item.name}.csv"
                    item.frame.to_csv(path, index=False)
                    result.tables.append(path)
                else:
                    for ext, content in (("png", item.png), ("svg", item.svg)):
                        path = out / "figures" / f"{item.name}.{ext}"
                        path.write_bytes(content)
                        result.figures.append(path)
        what = f"batch {data.batch_id}" if data.batch_id else f"experiment {exp.id}"
        compared = ", ".join(short(c) for c in columns) or "nothing (all conversations together)"
        summary = [
            f"{what} · {len(frame)} conversations, {result.analysed} analysed "
            f"({'usable' if usable_only else 'completed'} ones) · {result.scores} scores",
            f"Compared by: {compared}",
            "Tables: tables/*.csv · figures: figures/*.png and *.svg",
        ]
        text = page(f"Report: {exp.name}", what, summary, sections)
        result.html.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"Cannot write the report into {out}: {e.strerror or e}.") from None
    return result


__all__ = ["ReportResult", "write_report"]
