"""The report's statistics, each from a well-kept library: Wilson intervals and t intervals
(statsmodels), logistic, fractional logistic and OLS regressions with HC0-robust standard
errors (statsmodels formulas). Pure functions over numbers and dataframes; nothing here
reads the database."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval ("1.96")

LOGIT, FRACTIONAL_LOGIT, OLS = "logit", "fractional logit", "ols"  # the models `fit` fits
ODDS_RATIO_MODELS = (LOGIT, FRACTIONAL_LOGIT)  # their estimates are odds ratios


def wilson(count: int, n: int) -> tuple[float, float]:
    """The Wilson 95% interval of count/n (NaN, NaN when n is 0)."""
    if n <= 0:
        return math.nan, math.nan
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(count, n, alpha=0.05, method="wilson")
    return float(low), float(high)


@dataclass
class Mean:
    n: int
    mean: float
    sd: float  # sample standard deviation (ddof 1); NaN below 2 values
    se: float
    ci_low: float  # the t-based 95% interval of the mean; NaN below 2 values
    ci_high: float


def mean_ci(values: Sequence[float]) -> Mean:
    """Mean, SD, SE and the t-based 95% confidence interval of the mean."""
    import numpy as np

    x = np.asarray([float(v) for v in values], dtype=float)
    n = len(x)
    if n == 0:
        return Mean(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Mean(1, mean, math.nan, math.nan, math.nan, math.nan)
    from statsmodels.stats.weightstats import DescrStatsW

    sd = float(x.std(ddof=1))
    se = sd / math.sqrt(n)
    if se == 0:
        return Mean(n, mean, sd, se, mean, mean)
    low, high = DescrStatsW(x).tconfint_mean(alpha=0.05)
    return Mean(n, mean, sd, se, float(low), float(high))


def band(values: Sequence[float]) -> tuple[int, float, float, float, float]:
    """n, mean, SE and the mean ± 1.96·SE band (the temporal curves)."""
    m = mean_ci(values)
    if m.n < 2:
        return m.n, m.mean, math.nan, math.nan, math.nan
    return m.n, m.mean, m.se, m.mean - Z95 * m.se, m.mean + Z95 * m.se


@dataclass
class Fit:
    """One regression: its terms' estimates, or why it could not be fitted."""

    outcome: str
    model: str  # logit | fractional logit | ols
    formula: str
    n: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    problem: str = ""


def fit(data: pd.DataFrame, outcome: str, predictors: list[str], model: str) -> Fit:
    """Logistic (odds ratios), fractional logistic (odds ratios) or OLS (coefficients) of
    `y` on categorical predictors, with HC0-robust 95% intervals. `data` holds `y` and the
    predictors (pandas Categoricals: the first category is the reference level).

    The fractional logit is Papke and Wooldridge's (1996) estimator for a proportion in
    [0, 1] (a share of messages flagged): a GLM of the binomial family with the logit link,
    a quasi-likelihood whose HC0 sandwich errors hold whatever the share's distribution."""
    import numpy as np
    import statsmodels.formula.api as smf

    rhs = " + ".join(f"C({p})" for p in predictors) or "1"
    formula = f"y ~ {rhs}"
    result = Fit(outcome, model, formula, len(data))
    if len(data) == 0:
        result.problem = "no conversation has this outcome"
        return result
    if data["y"].nunique() < 2:
        only = f"{float(data['y'].iloc[0]):g}"
        result.problem = f"not fitted: all {len(data)} conversations have the outcome {only}"
        return result
    if model == FRACTIONAL_LOGIT and not data["y"].between(0, 1).all():
        result.problem = "not fitted: a fractional logit needs shares from 0 to 1"
        return result
    try:
        with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
            warnings.simplefilter("always")
            if model == LOGIT:
                fitted = smf.logit(formula, data).fit(disp=0, cov_type="HC0")
            elif model == FRACTIONAL_LOGIT:
                import statsmodels.api as sm

                family = sm.families.Binomial(link=sm.families.links.Logit())
                fitted = smf.glm(formula, data, family=family).fit(cov_type="HC0")
            else:
                fitted = smf.ols(formula, data).fit(cov_type="HC0")
    except Exception as exc:  # statsmodels' errors have no common base: say it, go on
        result.problem = f"could not be fitted ({type(exc).__name__}: {exc})"
        return result
    notes = sorted(
        {str(w.message).splitlines()[0] for w in caught if "separation" in str(w.message).lower()}
    )
    if notes:
        result.problem = "perfect or quasi-perfect separation: the estimates are not reliable"
    params, ci, pvalues = fitted.params, fitted.conf_int(alpha=0.05), fitted.pvalues
    for term in params.index:
        estimate, low, high = float(params[term]), float(ci.loc[term, 0]), float(ci.loc[term, 1])
        if model in ODDS_RATIO_MODELS:
            estimate, low, high = (_exp(v) for v in (estimate, low, high))
        result.rows.append(
            {
                "term": term,
                "estimate": estimate,
                "ci_low": low,
                "ci_high": high,
                "p_value": float(pvalues[term]),
            }
        )
    return result


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf
