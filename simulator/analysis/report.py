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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulator.analysis import figures, stats
from simulator.analysis.frames import (
    AnalysisData,
    conversations_frame,
    load,
    number,
    require,
    score_column,
)
from simulator.analysis.page import Chart, Section, Table, page
from simulator.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from simulator.scoring.definition import Scorer
    from simulator.settings import Settings
    from simulator.store import Score, Store

ENDED = ("completed", "incomplete")
UNFINISHED = ("pending", "running", "interrupted")
NOT_TRIED = re.compile(r"^not[\s_-]*(tried|attempted)$", re.IGNORECASE)
ALIASES = {"speaker": "speaker_selection", "agents": "agents_total", "rep": "repetition"}


@dataclass
class ReportResult:
    html: Path
    tables: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    conversations: int = 0
    analysed: int = 0
    scores: int = 0
    notices: list[str] = field(default_factory=list)  # what the page says plainly


# --- conditions ---------------------------------------------------------------------------


def condition_columns(data: AnalysisData, frame: pd.DataFrame) -> list[str]:
    """Columns `--by` may name: every factor, and the built-in conditions."""
    from simulator.analysis.frames import _conditions_names

    skip = {"experiment_id", "experiment_name", "conversation_id", "conversation_index",
            "creator", "status", "usable"}  # fmt: skip
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
    names = [" · ".join(f"{short(c)}={v}" for c, v in zip(by, combo, strict=True))
             for combo in itertools.product(*per)]  # fmt: skip
    labels = [
        " · ".join(f"{short(c)}={'' if _is_na(row[c]) else row[c]}" for c in by)
        for _, row in frame[by].iterrows()
    ]
    names += sorted(set(labels) - set(names))
    frame["condition"] = pd.Categorical(labels, categories=names)
    return [n for n in names if n in set(labels)]


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


@dataclass
class Outcome:
    """One scorer and source over the analysed conversations."""

    scorer: str
    source: str
    kind: str  # choice | numeric
    level: str  # conversation | message
    labels: list[str]  # choice: the answers in order
    scores: list[Score]  # valid scores of the analysed conversations
    invalid: int  # invalid answers among the analysed conversations
    definition: Scorer | None


def kind_of(definition: Scorer | None, scores: list[Score]) -> str | None:
    """choice | numeric, or None for free text."""
    if definition is not None and definition.kind == "judge":
        if definition.answer == "choice" or (
            definition.answer == "turn" and definition.report == "thirds"
        ):
            return "choice"
        if definition.answer == "text":
            return None
        return "numeric"  # scale, turn numbers, fractions
    if definition is not None and definition.kind == "moderation":
        return "numeric"
    values = [s.value for s in scores if s.valid and s.value is not None]
    if values and all(number(v) is not None for v in values):
        return "numeric"
    if values and all(isinstance(v, str) for v in values) and len(set(values)) <= 12:
        return "choice"
    return None


def outcomes(data: AnalysisData, analysed: set[str], names: list[str] | None) -> list[Outcome]:
    from simulator.scoring.agreement import categories_of

    scores = [s for s in data.current_scores() if s.conversation_id in analysed]
    found: dict[tuple[str, str], list[Score]] = {}
    for s in scores:
        if names and s.scorer not in names:
            continue
        found.setdefault((s.scorer, s.source), []).append(s)
    order = list(data.scorers) + sorted({n for n, _ in found} - set(data.scorers))
    result = []
    for scorer, source in sorted(found, key=lambda k: (order.index(k[0]), k[1])):
        chosen = found[(scorer, source)]
        definition = data.scorers.get(scorer)
        kind = kind_of(definition, chosen)
        if kind is None:
            continue
        valid = [s for s in chosen if s.valid and s.value is not None]
        labels = categories_of(valid, definition) if kind == "choice" else []
        if kind == "choice" and definition is not None and definition.answer == "choice":
            labels = list(definition.labels) + [v for v in labels if v not in definition.labels]
        result.append(Outcome(scorer, source, kind, data.level(scorer), labels, valid,
                              len(chosen) - len(valid), definition))  # fmt: skip
    return result


def _name(*parts: str) -> str:
    """A file name: letters, digits and underscores (`means_toxicity_judge_scripted`)."""
    return re.sub(r"[^a-z0-9]+", "_", "_".join(p for p in parts if p).lower()).strip("_")


def choice_items(o: Outcome, frame: pd.DataFrame, conditions: list[str]) -> list[Table | Chart]:
    """Answers per condition (counts, %, Wilson 95%), a stacked-bar figure."""
    import pandas as pd

    condition_of = dict(zip(frame["conversation_id"], frame["condition"].astype(str), strict=True))
    unit = "conversations" if o.level == "conversation" else "messages"
    counts: dict[str, dict[str, int]] = {c: {label: 0 for label in o.labels} for c in conditions}
    for s in o.scores:
        counts[condition_of[s.conversation_id]][str(s.value)] += 1
    rows = []
    for c in conditions:
        n = sum(counts[c].values())
        for label in o.labels:
            low, high = stats.wilson(counts[c][label], n)
            rows.append({"condition": c, "answer": label, "count": counts[c][label], "n": n,
                         "percent": 100 * counts[c][label] / n if n else math.nan,
                         "ci_low": 100 * low, "ci_high": 100 * high})  # fmt: skip
    table = pd.DataFrame(rows)
    name = _name("choice", o.scorer, o.source)
    title = f"{o.scorer} by {o.source}: answers per condition"
    note = f"Share of {unit} with a valid answer (%, Wilson 95% CI); {o.invalid} invalid answers left out."
    shown = [c for c in conditions if sum(counts[c].values())]
    items: list[Table | Chart] = [Table(name, title, table, note)]
    if shown:
        percent = [[100 * counts[c][label] / sum(counts[c].values()) for label in o.labels]
                   for c in shown]  # fmt: skip
        ns = [sum(counts[c].values()) for c in shown]
        fig = figures.shares(title, shown, o.labels, percent, ns, unit)
        items.append(_chart(name, title, fig, sum(ns)))
    return items


def attempt_labels(o: Outcome) -> tuple[str, str] | None:
    """(not tried, success) labels of a persuasion-style answer, if it is one."""
    not_tried = next((label for label in o.labels if NOT_TRIED.match(label)), None)
    if o.kind != "choice" or not_tried is None:
        return None
    rest = [label for label in o.labels if label != not_tried]
    success = next((label for label in rest if label.lower() == "yes"), rest[0] if rest else None)
    return (not_tried, success) if success else None


def attempt_items(
    o: Outcome, labels: tuple[str, str], frame: pd.DataFrame, conditions: list[str]
) -> list[Table | Chart]:
    import pandas as pd

    not_tried, success = labels
    condition_of = dict(zip(frame["conversation_id"], frame["condition"].astype(str), strict=True))
    rows = []
    for c in conditions:
        values = [str(s.value) for s in o.scores if condition_of[s.conversation_id] == c]
        n = len(values)
        attempts = sum(v != not_tried for v in values)
        successes = sum(v == success for v in values)
        a_low, a_high = stats.wilson(attempts, n)
        s_low, s_high = stats.wilson(successes, attempts)
        rows.append({
            "condition": c, "n": n, "attempts": attempts,
            "p_attempt": attempts / n if n else math.nan, "p_attempt_low": a_low,
            "p_attempt_high": a_high, "successes": successes,
            "p_success_given_attempt": successes / attempts if attempts else math.nan,
            "p_success_low": s_low, "p_success_high": s_high,
        })  # fmt: skip
    table = pd.DataFrame(rows)
    name = _name("attempt", o.scorer, o.source)
    title = f"{o.scorer} by {o.source}: P(attempt) and P({success} | attempt)"
    note = (f"attempt: any answer but {not_tried}; success: {success}. Wilson 95% intervals. "
            f"{o.invalid} invalid answers left out.")  # fmt: skip
    shown = table[table["n"] > 0]
    items: list[Table | Chart] = [Table(name, title, table, note)]
    if len(shown):
        cs = list(shown["condition"])
        fig = figures.proportions(title, cs, [
            ("P(attempt)", list(shown["p_attempt"]), list(shown["p_attempt_low"]),
             list(shown["p_attempt_high"]), list(shown["n"])),
            (f"P({success} | attempt)", list(shown["p_success_given_attempt"]),
             list(shown["p_success_low"]), list(shown["p_success_high"]),
             list(shown["attempts"])),
        ])  # fmt: skip
        items.append(_chart(name, title, fig, int(shown["n"].sum())))
    return items


def measures(o: Outcome) -> list[tuple[str, dict[tuple[str, str], float], dict[tuple[str, str], str]]]:
    """(measure name, value per item, role per item): the score itself (a moderation
    verdict as 0/1), then each moderation category score."""
    main: dict[tuple[str, str], float] = {}
    roles: dict[tuple[str, str], str] = {}
    categories: dict[str, dict[tuple[str, str], float]] = {}
    for s in o.scores:
        item = (s.conversation_id, s.message)
        roles[item] = s.role
        value = number(s.value)
        if value is not None:
            main[item] = value
        for category, v in ((s.detail or {}).get("category_scores") or {}).items():
            if number(v) is not None:
                categories.setdefault(category, {})[item] = float(v)
    out = [(o.scorer if o.definition is None or o.definition.kind != "moderation"
            else f"{o.scorer} (flagged)", main, roles)]  # fmt: skip
    out += [(f"{o.scorer}:{c}", values, roles) for c, values in sorted(categories.items())]
    return out


def _unit(o: Outcome, measure: str) -> str:
    d = o.definition
    if d is not None and d.kind == "judge" and d.answer == "scale" and d.scale:
        return f"{measure} (scale {d.scale[0]}-{d.scale[1]})"
    if d is not None and d.kind == "moderation":
        return f"{measure} (share 0-1)" if "flagged" in measure else f"{measure} (score 0-1)"
    return f"{measure} (score)"


def numeric_items(
    o: Outcome, frame: pd.DataFrame, conditions: list[str], colours: dict[str, str],
    positions: dict[tuple[str, str], int],
) -> list[Table | Chart]:  # fmt: skip
    import pandas as pd

    condition_of = dict(zip(frame["conversation_id"], frame["condition"].astype(str), strict=True))
    charts: list[Chart] = []
    rows, curve_rows = [], []
    all_measures = measures(o)
    for k, (measure, values, roles) in enumerate(all_measures):
        role_names = [r for r in colours if any(roles.get(i) == r for i in values)]
        role_names += sorted({roles[i] for i in values} - set(role_names))
        if o.level == "conversation":
            role_names = [""]
        series = []
        for role in role_names:
            means, lows, highs = [], [], []
            for c in conditions:
                xs = [v for i, v in values.items()
                      if condition_of[i[0]] == c and (not role or roles.get(i) == role)]  # fmt: skip
                m = stats.mean_ci(xs)
                rows.append({"measure": measure, "condition": c, "role": role or "all",
                             "n": m.n, "mean": m.mean, "sd": m.sd, "ci_low": m.ci_low,
                             "ci_high": m.ci_high})  # fmt: skip
                means.append(m.mean)
                lows.append(m.ci_low)
                highs.append(m.ci_high)
            series.append((role, colours.get(role, figures.LABEL_COLOURS[0]), means, lows, highs))
        if k == 0 and values:
            title = f"{measure} by {o.source}: mean per condition" + (
                " and role" if o.level == "message" else "")
            fig = figures.means(title, conditions, series, f"mean {_unit(o, measure)}, 95% CI",
                                len(values))  # fmt: skip
            charts.append(_chart(_name("means", o.scorer, o.source), title, fig, len(values)))
        if o.level == "message" and values:
            panels = []
            for c in conditions:
                lines = []
                for role in role_names:
                    by_position: dict[int, list[float]] = {}
                    for i, v in values.items():
                        if condition_of[i[0]] == c and roles.get(i) == role and i in positions:
                            by_position.setdefault(positions[i], []).append(v)
                    x, mean, low, high = [], [], [], []
                    for p in sorted(by_position):
                        n, m, se, lo, hi = stats.band(by_position[p])
                        curve_rows.append({"measure": measure, "condition": c, "role": role,
                                           "position": p, "n": n, "mean": m, "se": se,
                                           "band_low": lo, "band_high": hi})  # fmt: skip
                        x.append(p)
                        mean.append(m)
                        low.append(lo)
                        high.append(hi)
                    if x:
                        lines.append((role, colours.get(role, "#555555"), x, mean, low, high))
                if lines:
                    panels.append((c, lines))
            if k == 0 and panels:
                title = f"{measure} by {o.source} over the conversation"
                fig = figures.curves(title, panels[:12], f"mean {_unit(o, measure)}",
                                     len(values))  # fmt: skip
                charts.append(_chart(_name("turns", o.scorer, o.source), title, fig, len(values)))
    name = _name("means", o.scorer, o.source)
    note = (f"Mean, SD and t-based 95% CI per condition{' and role' if o.level == 'message' else ''}"
            f"; {o.invalid} invalid answers left out.")  # fmt: skip
    items: list[Table | Chart] = [
        Table(name, f"{o.scorer} by {o.source}: means", pd.DataFrame(rows), note), *charts[:1]
    ]
    if curve_rows:
        items.append(Table(_name("turns", o.scorer, o.source),
                              f"{o.scorer} by {o.source}: mean per message position and role",
                              pd.DataFrame(curve_rows),
                              "Bands: mean ± 1.96·SE (SE = SD/√n) per position."))  # fmt: skip
    return items + charts[1:]


def _chart(name: str, title: str, fig: Any, n: int) -> Chart:
    png, svg = figures.render(fig)
    return Chart(name, title, png, svg, n)


# --- regressions ----------------------------------------------------------------------------


def model_frame(
    data: AnalysisData, frame: pd.DataFrame, values: dict[str, float], predictors: list[str]
) -> pd.DataFrame:
    """y and the predictors (Categoricals, first level the reference) of the conversations
    that have a value; predictors that do not vary there are dropped."""
    import pandas as pd

    rows = frame[frame["conversation_id"].isin(list(values))]
    model = pd.DataFrame({"y": [values[c] for c in rows["conversation_id"]]})
    for p in predictors:
        order = levels(data, p, rows[p])
        model[p] = pd.Categorical([str(v) for v in rows[p]], categories=order)
    return model


def regression_outcomes(o: Outcome) -> list[tuple[str, str, dict[str, float]]]:
    """(outcome name, model, value per conversation) of one conversation-level outcome."""
    if o.kind == "choice" and o.level == "conversation":
        answers = {s.conversation_id: str(s.value) for s in o.scores}
        labels = attempt_labels(o)
        if labels:
            not_tried, success = labels
            attempted = {c: float(v != not_tried) for c, v in answers.items()}
            won = {c: float(v == success) for c, v in answers.items() if v != not_tried}
            return [(f"{o.scorer}: attempt", "logit", attempted),
                    (f"{o.scorer}: {success} | attempt", "logit", won)]  # fmt: skip
        if o.definition is not None and o.definition.answer == "turn":
            return []  # ordinal thirds: the distribution table says it
        first = o.labels[0]
        return [(f"{o.scorer}: {first}", "logit",
                 {c: float(v == first) for c, v in answers.items()})]  # fmt: skip
    if o.kind == "numeric":
        measure, values, _ = measures(o)[0]
        per: dict[str, list[float]] = {}
        for (conv, _msg), v in values.items():
            per.setdefault(conv, []).append(v)
        mean = {c: sum(v) / len(v) for c, v in per.items()}
        what = measure if o.level == "conversation" else f"{measure}, conversation mean"
        return [(what, "ols", mean)]
    return []


def models_section(
    data: AnalysisData, frame: pd.DataFrame, analysed_frame: pd.DataFrame,
    found: list[Outcome], predictors: list[str], usable_only: bool,
) -> Section:  # fmt: skip
    import pandas as pd

    section = Section("models", "Regressions")
    section.paragraphs.append(
        "One model per outcome over the compared conditions (and the LLM when it varies): "
        "logistic regression for yes/no outcomes (odds ratios), OLS for numeric ones "
        "(coefficients); 95% intervals from HC0-robust standard errors (statsmodels). The first "
        "level of each condition is the reference."
    )
    status = frame["status"].astype(str)
    not_ended = int((~status.isin(ENDED)).sum())
    unusable = int((status.isin(ENDED) & (frame["usable"] != True)).sum()) if usable_only else 0  # noqa: E712
    summary, coefficients = [], []
    for o in found:
        for outcome, model, values in regression_outcomes(o):
            mf = model_frame(data, analysed_frame, values, predictors)
            varying = [p for p in predictors if mf[p].nunique() > 1]
            for p in varying:
                mf[p] = mf[p].cat.remove_unused_categories()
            result = stats.fit(mf, outcome, varying, model)
            no_value = len(analysed_frame) - len(values)
            excluded = [f"{not_ended} not completed"]
            if usable_only:
                excluded.append(f"{unusable} not usable")
            if "| attempt" in outcome:
                excluded.append(f"{sum(1 for s in o.scores) - len(values)} not attempted")
                no_value = len(analysed_frame) - len(o.scores)
            excluded.append(f"{no_value} without a valid score ({o.invalid} invalid)")
            summary.append({"outcome": outcome, "source": o.source, "model": model,
                            "formula": result.formula, "n": result.n,
                            "excluded": "; ".join(excluded), "problem": result.problem})  # fmt: skip
            for row in result.rows:
                coefficients.append({"outcome": outcome, "source": o.source, "model": model,
                                     "term": row["term"],
                                     "estimate": row["estimate"], "ci_low": row["ci_low"],
                                     "ci_high": row["ci_high"], "p_value": row["p_value"],
                                     "n": result.n})  # fmt: skip
    if not summary:
        section.notices.append("No outcome to model: no conversation-level choice or numeric "
                               "scores among the analysed conversations.")  # fmt: skip
        return section
    section.items.append(Table("models", "Models: n, exclusions", pd.DataFrame(summary),
                               "estimate: odds ratio (logit) or coefficient (ols)."))  # fmt: skip
    section.items.append(Table("regressions", "Estimates with HC0-robust 95% CIs",
                               pd.DataFrame(coefficients)))  # fmt: skip
    return section


# --- agreement ------------------------------------------------------------------------------


def agreement_section(data: AnalysisData, analysed: set[str], names: list[str] | None) -> Section:
    import pandas as pd

    from simulator.scoring.agreement import compute

    section = Section("agreement", "Agreement between sources")
    by_scorer: dict[str, list[Score]] = {}
    for s in data.current_scores():
        if s.conversation_id in analysed and (not names or s.scorer in names):
            by_scorer.setdefault(s.scorer, []).append(s)
    for scorer, scores in by_scorer.items():
        definition = data.scorers.get(scorer)
        if len({s.source for s in scores}) < 2 or (definition and definition.answer == "text"
                                                   and definition.kind == "judge"):  # fmt: skip
            continue
        result = compute(scores, ordinal=bool(definition and definition.ordinal),
                         scorer=definition)  # fmt: skip
        rows: list[dict[str, Any]] = [
            {"source_a": p.a, "source_b": p.b, "items": p.items, "percent_agreement": p.percent,
             "kappa": p.kappa, "alpha": None}  # fmt: skip
            for p in result.pairs
        ]
        rows.append({"source_a": "all sources", "source_b": "", "items": result.items,
                     "percent_agreement": None, "kappa": None, "alpha": result.alpha})  # fmt: skip
        kind = "linearly weighted kappa, ordinal alpha" if result.ordinal else "Cohen's kappa, nominal alpha"
        section.items.append(Table(_name("agreement", scorer), f"{scorer} (version {result.version})",
                                   pd.DataFrame(rows), f"{kind}; items scored by both."))  # fmt: skip
    if not section.items:
        section.paragraphs.append(
            "No scorer has two sources yet: add a second one, e.g. a human annotation sheet "
            "(`simulator annotate export` / `annotate import`)."
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
) -> ReportResult:
    """Write the report of an experiment (id, prefix or name) or one batch into `out_dir`."""
    from simulator.export import role_colours

    require()
    data = load(source, experiment, where)
    exp = data.experiment
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
    if not data.scores or (scorers and not found and not any(s.scorer in scorers for s in data.scores)):
        scores_section.notices.append(
            f"No scores are stored for these conversations: score them with `simulator score "
            f"{(exp.id or '')[:8]}` or import an annotation sheet (`simulator annotate import`)."
        )
    elif not analysed:
        what = "usable " if usable_only else "completed "
        scores_section.notices.append(f"No {what}conversations to analyse: there are no outcomes "
                                      "to report.")  # fmt: skip
    elif not found:
        scores_section.notices.append("The analysed conversations have no choice or numeric "
                                      "scores (free-text answers are not summarised).")  # fmt: skip
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
            scores_section.items += numeric_items(o, analysed_frame, cond_in_set, colours, positions)
    if found:
        predictors = list(columns)
        if "llm" not in predictors and frame["llm"].nunique() > 1:
            predictors.append("llm")
        sections.append(models_section(data, frame, analysed_frame, found, predictors,
                                       usable_only))  # fmt: skip
        sections.append(agreement_section(data, analysed, scorers))
    return _write(data, frame, analysed_frame, columns, usable_only, sections, notices, Path(out_dir))


def _write(
    data: AnalysisData, frame: pd.DataFrame, analysed_frame: pd.DataFrame, columns: list[str],
    usable_only: bool, sections: list[Section], notices: list[str], out: Path,
) -> ReportResult:  # fmt: skip
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


__all__ = ["ReportResult", "score_column", "write_report"]
