"""The outcome sections of the report: the answers of choice scorers per condition,
P(attempt) and P(success | attempt) with Wilson intervals, means of numeric scores per
condition and role with their course over the conversation."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from simulator.analysis import figures, stats
from simulator.analysis.frames import AnalysisData, number
from simulator.analysis.page import Chart, Table

if TYPE_CHECKING:
    import pandas as pd

    from simulator.scoring.definition import Scorer
    from simulator.store import Score

NOT_TRIED = re.compile(r"^not[\s_-]*(tried|attempted)$", re.IGNORECASE)


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
        result.append(
            Outcome(
                scorer,
                source,
                kind,
                data.level(scorer),
                labels,
                valid,
                len(chosen) - len(valid),
                definition,
            )
        )
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
            rows.append(
                {
                    "condition": c,
                    "answer": label,
                    "count": counts[c][label],
                    "n": n,
                    "percent": 100 * counts[c][label] / n if n else math.nan,
                    "ci_low": 100 * low,
                    "ci_high": 100 * high,
                }
            )
    table = pd.DataFrame(rows)
    name = _name("choice", o.scorer, o.source)
    title = f"{o.scorer} by {o.source}: answers per condition"
    note = f"Share of {unit} with a valid answer (%, Wilson 95% CI); {o.invalid} invalid answers left out."
    shown = [c for c in conditions if sum(counts[c].values())]
    items: list[Table | Chart] = [Table(name, title, table, note)]
    if shown:
        percent = [
            [100 * counts[c][label] / sum(counts[c].values()) for label in o.labels] for c in shown
        ]
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
        rows.append(
            {
                "condition": c,
                "n": n,
                "attempts": attempts,
                "p_attempt": attempts / n if n else math.nan,
                "p_attempt_low": a_low,
                "p_attempt_high": a_high,
                "successes": successes,
                "p_success_given_attempt": successes / attempts if attempts else math.nan,
                "p_success_low": s_low,
                "p_success_high": s_high,
            }
        )
    table = pd.DataFrame(rows)
    name = _name("attempt", o.scorer, o.source)
    title = f"{o.scorer} by {o.source}: P(attempt) and P({success} | attempt)"
    note = (
        f"attempt: any answer but {not_tried}; success: {success}. Wilson 95% intervals. "
        f"{o.invalid} invalid answers left out."
    )
    shown = table[table["n"] > 0]
    items: list[Table | Chart] = [Table(name, title, table, note)]
    if len(shown):
        cs = list(shown["condition"])
        fig = figures.proportions(
            title,
            cs,
            [
                (
                    "P(attempt)",
                    list(shown["p_attempt"]),
                    list(shown["p_attempt_low"]),
                    list(shown["p_attempt_high"]),
                    list(shown["n"]),
                ),
                (
                    f"P({success} | attempt)",
                    list(shown["p_success_given_attempt"]),
                    list(shown["p_success_low"]),
                    list(shown["p_success_high"]),
                    list(shown["attempts"]),
                ),
            ],
        )
        items.append(_chart(name, title, fig, int(shown["n"].sum())))
    return items


def measures(
    o: Outcome,
) -> list[tuple[str, dict[tuple[str, str], float], dict[tuple[str, str], str]]]:
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
    out = [
        (
            o.scorer
            if o.definition is None or o.definition.kind != "moderation"
            else f"{o.scorer} (flagged)",
            main,
            roles,
        )
    ]
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
    o: Outcome,
    frame: pd.DataFrame,
    conditions: list[str],
    colours: dict[str, str],
    positions: dict[tuple[str, str], int],
) -> list[Table | Chart]:
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
                xs = [
                    v
                    for i, v in values.items()
                    if condition_of[i[0]] == c and (not role or roles.get(i) == role)
                ]
                m = stats.mean_ci(xs)
                rows.append(
                    {
                        "measure": measure,
                        "condition": c,
                        "role": role or "all",
                        "n": m.n,
                        "mean": m.mean,
                        "sd": m.sd,
                        "ci_low": m.ci_low,
                        "ci_high": m.ci_high,
                    }
                )
                means.append(m.mean)
                lows.append(m.ci_low)
                highs.append(m.ci_high)
            series.append((role, colours.get(role, figures.LABEL_COLOURS[0]), means, lows, highs))
        if k == 0 and values:
            title = f"{measure} by {o.source}: mean per condition" + (
                " and role" if o.level == "message" else ""
            )
            fig = figures.means(
                title, conditions, series, f"mean {_unit(o, measure)}, 95% CI", len(values)
            )
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
                        n, mid, se, lo, hi = stats.band(by_position[p])
                        curve_rows.append(
                            {
                                "measure": measure,
                                "condition": c,
                                "role": role,
                                "position": p,
                                "n": n,
                                "mean": mid,
                                "se": se,
                                "band_low": lo,
                                "band_high": hi,
                            }
                        )
                        x.append(p)
                        mean.append(mid)
                        low.append(lo)
                        high.append(hi)
                    if x:
                        lines.append((role, colours.get(role, "#555555"), x, mean, low, high))
                if lines:
                    panels.append((c, lines))
            if k == 0 and panels:
                title = f"{measure} by {o.source} over the conversation"
                fig = figures.curves(title, panels[:12], f"mean {_unit(o, measure)}", len(values))
                charts.append(_chart(_name("turns", o.scorer, o.source), title, fig, len(values)))
    name = _name("means", o.scorer, o.source)
    note = (
        f"Mean, SD and t-based 95% CI per condition{' and role' if o.level == 'message' else ''}"
        f"; {o.invalid} invalid answers left out."
    )
    items: list[Table | Chart] = [
        Table(name, f"{o.scorer} by {o.source}: means", pd.DataFrame(rows), note),
        *charts[:1],
    ]
    if curve_rows:
        items.append(
            Table(
                _name("turns", o.scorer, o.source),
                f"{o.scorer} by {o.source}: mean per message position and role",
                pd.DataFrame(curve_rows),
                "Bands: mean ± 1.96·SE (SE = SD/√n) per position.",
            )
        )
    return items + charts[1:]


def _chart(name: str, title: str, fig: Any, n: int) -> Chart:
    png, svg = figures.render(fig)
    return Chart(name, title, png, svg, n)
