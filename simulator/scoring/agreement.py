"""Agreement between the sources that scored the same items: percent agreement and Cohen's
kappa per pair (statsmodels; linearly weighted for ordered answers), Krippendorff's alpha
over all sources (the `krippendorff` package), confusion matrices."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from simulator.errors import UserError
from simulator.scoring.definition import THIRDS, Scorer, load_scorers_file
from simulator.store import Score, Store


@dataclass
class PairAgreement:
    a: str
    b: str
    items: int
    percent: float | None  # 0-100
    kappa: float | None
    confusion: list[list[int]] = field(default_factory=list)  # rows: a, columns: b


@dataclass
class Agreement:
    scorer: str
    version: str
    categories: list[str]
    ordinal: bool
    sources: list[str]
    items: int  # items scored by at least two sources
    pairs: list[PairAgreement]
    alpha: float | None


def _key(value: Any) -> str:
    return str(value)


def categories_of(scores: list[Score], scorer: Scorer | None) -> list[str]:
    """Every answer seen, in the scorer's order (labels, scale, thirds) or sorted."""
    seen = {_key(s.value) for s in scores}
    if scorer is not None and scorer.answer == "choice":
        order = [label for label in scorer.labels if label in seen]
    elif scorer is not None and scorer.answer == "scale" and scorer.scale:
        order = [str(v) for v in range(scorer.scale[0], scorer.scale[1] + 1) if str(v) in seen]
    elif scorer is not None and scorer.answer == "turn" and scorer.report == "thirds":
        order = [t for t in THIRDS if t in seen]
    else:
        order = []
    rest = sorted(seen - set(order), key=lambda v: (_number(v) is None, _number(v) or 0, v))
    return order + rest


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def compute(
    scores: list[Score], *, ordinal: bool = False, scorer: Scorer | None = None
) -> Agreement:
    """Agreement of the valid scores given (one scorer version), by source pair."""
    valid = [s for s in scores if s.valid and s.value is not None]
    by_source: dict[str, dict[tuple[str, str], str]] = {}
    for s in valid:
        by_source.setdefault(s.source, {})[(s.conversation_id, s.message)] = _key(s.value)
    sources = sorted(by_source)
    categories = categories_of(valid, scorer)
    index = {c: i for i, c in enumerate(categories)}
    pairs = []
    for a, b in combinations(sources, 2):
        common = sorted(set(by_source[a]) & set(by_source[b]))
        table = [[0] * len(categories) for _ in categories]
        for item in common:
            table[index[by_source[a][item]]][index[by_source[b][item]]] += 1
        same = sum(table[i][i] for i in range(len(categories)))
        pairs.append(
            PairAgreement(
                a,
                b,
                len(common),
                100.0 * same / len(common) if common else None,
                _kappa(table, ordinal) if common else None,
                table,
            )
        )
    counts = Counter(item for answers in by_source.values() for item in answers)
    shared = sorted(item for item, n in counts.items() if n >= 2)
    return Agreement(
        scorer=scores[0].scorer if scores else "",
        version=scores[0].version if scores else "",
        categories=categories,
        ordinal=ordinal,
        sources=sources,
        items=len(shared),
        pairs=pairs,
        alpha=_alpha(by_source, sources, shared, index, ordinal),
    )


def _kappa(table: list[list[int]], ordinal: bool) -> float | None:
    import numpy as np
    from statsmodels.stats.inter_rater import cohens_kappa

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            result = cohens_kappa(np.array(table), wt="linear" if ordinal else None)
        except (ValueError, ZeroDivisionError):
            return None
    value = float(result.kappa)
    return value if math.isfinite(value) else None


def _alpha(
    by_source: dict[str, dict[tuple[str, str], str]],
    sources: list[str],
    items: list[tuple[str, str]],
    index: dict[str, int],
    ordinal: bool,
) -> float | None:
    import krippendorff
    import numpy as np

    if len(sources) < 2 or not items:
        return None
    data = np.full((len(sources), len(items)), np.nan)
    for i, source in enumerate(sources):
        for j, item in enumerate(items):
            if item in by_source[source]:
                data[i, j] = index[by_source[source][item]]
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            value = krippendorff.alpha(
                reliability_data=data, level_of_measurement="ordinal" if ordinal else "nominal"
            )
    except (ValueError, ZeroDivisionError):  # e.g. every answer the same
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def other_versions(scores: list[Score], scorer: str, besides: str) -> str:
    """A sentence naming the versions of `scorer` other than `besides` that two sources or
    more scored (a judge and an annotator of an earlier definition, say), or ""."""
    sources: dict[str, set[str]] = {}
    for s in scores:
        if s.scorer == scorer and s.version != besides and s.valid:
            sources.setdefault(s.version, set()).add(s.source)
    found = [
        f"version {v}: {', '.join(sorted(x))}" for v, x in sorted(sources.items()) if len(x) > 1
    ]
    if not found:
        return ""
    return (
        f"Other versions of {scorer} have two sources ({'; '.join(found)}): give the "
        "definition they were scored with (--scorers FILE) to use one of them."
    )


def agreement_for(
    store: Store, ref: str, scorer_name: str, *, scorers_file: Path | None = None
) -> Agreement:
    """Agreement on one scorer of an experiment: the version its current definition has
    (from the experiment or `scorers_file`), else the version with the most scores."""
    from simulator.scoring.run import scorers_for

    _, exp, _ = store.find_experiment_or_batch(ref)
    extra = load_scorers_file(scorers_file) if scorers_file else []
    scorer = next((s for s in scorers_for(exp, extra) if s.name == scorer_name), None)
    scores = store.list_scores(experiment_id=exp.id, scorer=scorer_name)
    if not scores:
        raise UserError(
            f"No scores of {scorer_name} in experiment {exp.id}: run `simulator score "
            f"{(exp.id or '')[:8]} --scorer {scorer_name}` or import an annotation sheet first."
        )
    versions = Counter(s.version for s in scores)
    version = scorer.version if scorer and scorer.version in versions else None
    if version is None:
        version = versions.most_common(1)[0][0]
        scorer = None  # the definition given is not the one these scores were made with
    if scorer is not None and scorer.answer == "text":
        raise UserError(f"{scorer_name} answers free text: agreement needs labels or numbers.")
    chosen = [s for s in scores if s.version == version]
    result = compute(chosen, ordinal=bool(scorer and scorer.ordinal), scorer=scorer)
    if len(result.sources) < 2:
        others = other_versions(scores, scorer_name, version)
        raise UserError(
            f"Only {', '.join(result.sources) or 'no source'} scored {scorer_name} "
            f"(version {version}): agreement needs two sources, e.g. a judge and a human "
            "annotation sheet (`simulator annotate export`)." + (f" {others}" if others else "")
        )
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: Agreement, *, confusion: bool = False) -> str:
    """Plain text: one line per pair, alpha, and the confusion matrices on request."""
    kind = "weighted (linear) kappa" if result.ordinal else "Cohen's kappa"
    width = max([len(s) for s in result.sources] + [8])
    lines = [
        f"Agreement on {result.scorer} (version {result.version}): {len(result.sources)} "
        f"sources, {result.items} items scored by two or more",
        "",
        f"{'source':<{width}}  {'source':<{width}}  {'items':>6}  {'agree':>7}  {kind}",
    ]
    for p in result.pairs:
        lines.append(
            f"{p.a:<{width}}  {p.b:<{width}}  {p.items:>6}  {_fmt(p.percent, '6.1f') + '%':>7}"
            f"  {_fmt(p.kappa, '.3f')}"
        )
    level = "ordinal" if result.ordinal else "nominal"
    lines += ["", f"Krippendorff's alpha ({level}), all sources: {_fmt(result.alpha, '.3f')}"]
    if confusion:
        cats = result.categories
        cw = max([len(c) for c in cats] + [5])
        for p in result.pairs:
            lines += ["", f"{p.a} (rows) x {p.b} (columns)"]
            lines.append(" " * cw + "  " + "  ".join(f"{c:>{cw}}" for c in cats))
            for c, row in zip(cats, p.confusion, strict=True):
                lines.append(f"{c:>{cw}}  " + "  ".join(f"{n:>{cw}}" for n in row))
    return "\n".join(lines)
