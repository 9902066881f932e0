"""The model and agreement sections of the report: one regression per outcome
(statsmodels formulas, HC0-robust intervals): a logit for yes/no outcomes, a fractional
logit for shares in [0, 1], OLS for other numbers; agreement between the sources of a
scorer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from simulator.analysis import stats
from simulator.analysis.conditions import ENDED, levels
from simulator.analysis.frames import AnalysisData
from simulator.analysis.outcomes import Outcome, _name, attempt_labels, measures
from simulator.analysis.page import Section, Table

if TYPE_CHECKING:
    import pandas as pd

    from simulator.store import Score


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
            return [
                (f"{o.scorer}: attempt", stats.LOGIT, attempted),
                (f"{o.scorer}: {success} | attempt", stats.LOGIT, won),
            ]
        if o.definition is not None and o.definition.answer == "turn":
            return []  # ordinal thirds: the distribution table says it
        first = o.labels[0]
        return [
            (
                f"{o.scorer}: {first}",
                stats.LOGIT,
                {c: float(v == first) for c, v in answers.items()},
            )
        ]
    if o.kind == "numeric":
        measure, values, _ = measures(o)[0]
        per: dict[str, list[float]] = {}
        for (conv, _msg), v in values.items():
            per.setdefault(conv, []).append(v)
        mean = {c: sum(v) / len(v) for c, v in per.items()}
        what = measure if o.level == "conversation" else f"{measure}, conversation mean"
        model = stats.FRACTIONAL_LOGIT if is_share(o, values.values()) else stats.OLS
        return [(what, model, mean)]
    return []


def is_share(o: Outcome, values: Iterable[float]) -> bool:
    """Whether an outcome is a proportion in [0, 1], for a fractional logit rather than
    OLS: a moderation verdict (its conversation mean is the share of messages flagged), a
    judge's turn as a fraction or a scale within 0-1, and a python function's numbers when
    every one is from 0 to 1 (booleans, shares, probabilities)."""
    d = o.definition
    if d is not None and d.kind == "moderation":
        return True
    if d is not None and d.kind == "judge":
        if d.answer == "turn":
            return d.report == "fraction"
        return d.answer == "scale" and d.scale is not None and 0 <= d.scale[0] <= d.scale[1] <= 1
    return all(0 <= v <= 1 for v in values)


def models_section(
    data: AnalysisData,
    frame: pd.DataFrame,
    analysed_frame: pd.DataFrame,
    found: list[Outcome],
    predictors: list[str],
    usable_only: bool,
) -> Section:
    import pandas as pd

    section = Section("models", "Regressions")
    section.paragraphs.append(
        "One model per outcome over the compared conditions (and the LLM when it varies): "
        "logistic regression for yes/no outcomes (odds ratios); a fractional logit for shares "
        "from 0 to 1, such as the share of a conversation's messages flagged (Papke and "
        "Wooldridge: a binomial GLM with the logit link; odds ratios); OLS for other numeric "
        "outcomes (coefficients). 95% intervals from HC0-robust standard errors (statsmodels). "
        "The column `model` says which one each outcome got. The first level of each "
        "condition is the reference."
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
            summary.append(
                {
                    "outcome": outcome,
                    "source": o.source,
                    "model": model,
                    "formula": result.formula,
                    "n": result.n,
                    "excluded": "; ".join(excluded),
                    "problem": result.problem,
                }
            )
            for row in result.rows:
                coefficients.append(
                    {
                        "outcome": outcome,
                        "source": o.source,
                        "model": model,
                        "term": row["term"],
                        "estimate": row["estimate"],
                        "ci_low": row["ci_low"],
                        "ci_high": row["ci_high"],
                        "p_value": row["p_value"],
                        "n": result.n,
                    }
                )
    if not summary:
        section.notices.append(
            "No outcome to model: no conversation-level choice or numeric "
            "scores among the analysed conversations."
        )
        return section
    section.items.append(
        Table(
            "models",
            "Models: n, exclusions",
            pd.DataFrame(summary),
            "estimate: odds ratio (logit, fractional logit) or coefficient (ols).",
        )
    )
    section.items.append(
        Table("regressions", "Estimates with HC0-robust 95% CIs", pd.DataFrame(coefficients))
    )
    return section


# --- agreement ------------------------------------------------------------------------------


def agreement_section(data: AnalysisData, analysed: set[str], names: list[str] | None) -> Section:
    import pandas as pd

    from simulator.scoring.agreement import compute, other_versions

    section = Section("agreement", "Agreement between sources")
    by_scorer: dict[str, list[Score]] = {}
    for s in data.current_scores():
        if s.conversation_id in analysed and (not names or s.scorer in names):
            by_scorer.setdefault(s.scorer, []).append(s)
    hints = []
    for scorer, scores in by_scorer.items():
        definition = data.scorers.get(scorer)
        if definition and definition.answer == "text" and definition.kind == "judge":
            continue
        if len({s.source for s in scores}) < 2:
            analysed_scores = [s for s in data.scores if s.conversation_id in analysed]
            hint = other_versions(analysed_scores, scorer, data.versions[scorer])
            if hint:
                hints.append(f"{scorer} (version {data.versions[scorer]}) has one source. {hint}")
            continue
        result = compute(scores, ordinal=bool(definition and definition.ordinal), scorer=definition)
        rows: list[dict[str, Any]] = [
            {
                "source_a": p.a,
                "source_b": p.b,
                "items": p.items,
                "percent_agreement": p.percent,
                "kappa": p.kappa,
                "alpha": None,
            }
            for p in result.pairs
        ]
        rows.append(
            {
                "source_a": "all sources",
                "source_b": "",
                "items": result.items,
                "percent_agreement": None,
                "kappa": None,
                "alpha": result.alpha,
            }
        )
        kind = (
            "linearly weighted kappa, ordinal alpha"
            if result.ordinal
            else "Cohen's kappa, nominal alpha"
        )
        section.items.append(
            Table(
                _name("agreement", scorer),
                f"{scorer} (version {result.version})",
                pd.DataFrame(rows),
                f"{kind}; items scored by both.",
            )
        )
    if not section.items and not hints:
        section.paragraphs.append(
            "No scorer has two sources yet: add a second one, e.g. a human annotation sheet "
            "(`simulator annotate export` / `annotate import`)."
        )
    section.paragraphs += hints
    return section
