"""The report's figures (matplotlib, no pyplot: no global state, no display needed).

Every figure has a title, axis labels with units and its n; roles keep the colours of the
transcript pages (export.role_colours). Each is written as PNG and SVG."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Colours for answers and conditions (not roles): colour-blind safe (Okabe-Ito).
LABEL_COLOURS = (
    "#0072B2",
    "#D55E00",
    "#999999",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#F0E442",
    "#000000",
)


def new(
    width: float = 7.5, height: float = 4.0, cols: int = 1, rows: int = 1, share: bool = False
) -> Figure:
    import matplotlib

    matplotlib.rcParams["svg.hashsalt"] = "simulator-report"  # the same SVG for the same data
    matplotlib.rcParams["font.size"] = 9
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    fig.subplots(rows, cols, squeeze=False, sharex=share, sharey=share)
    return fig


def wrapped(title: str, width: int = 72) -> str:
    """A title in lines that fit the figure's width."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title


def render(fig: Figure) -> tuple[bytes, bytes]:
    """The figure as PNG and SVG bytes."""
    import warnings

    png, svg = io.BytesIO(), io.BytesIO()
    with warnings.catch_warnings():
        # many long condition labels: matplotlib warns on the terminal that it could not
        # lay the axes out, and draws the figure anyway
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(png, format="png", dpi=120, metadata={"Software": None})
        fig.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    return png.getvalue(), svg.getvalue()


def shares(
    title: str,
    conditions: Sequence[str],
    labels: Sequence[str],
    percent: Sequence[Sequence[float]],  # per condition, per label
    ns: Sequence[int],
    what: str,
) -> Figure:
    """Horizontal stacked bars: each condition's answers as shares of its conversations."""
    fig = new(7.5, 1.4 + 0.45 * len(conditions))
    ax = fig.axes[0]
    names = [f"{c} (n={n})" for c, n in zip(conditions, ns, strict=True)]
    left = [0.0] * len(conditions)
    for j, label in enumerate(labels):
        widths = [row[j] for row in percent]
        ax.barh(names, widths, left=left, label=label, color=LABEL_COLOURS[j % len(LABEL_COLOURS)])
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_xlabel(f"share of {what} (%)")
    ax.set_ylabel("condition")
    ax.legend(title="answer", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(wrapped(f"{title} (n={sum(ns)})"))
    return fig


def proportions(
    title: str,
    conditions: Sequence[str],
    panels: Sequence[tuple[str, Sequence[float], Sequence[float], Sequence[float], Sequence[int]]],
) -> Figure:
    """Side-by-side panels of proportions (in %) with their 95% intervals, per condition."""
    fig = new(7.5, 1.4 + 0.4 * len(conditions), cols=len(panels))
    for ax, (name, p, low, high, ns) in zip(fig.axes, panels, strict=True):
        y = list(range(len(conditions)))
        for i in y:
            if math.isnan(p[i]):
                continue
            below, above = max(0.0, p[i] - low[i]), max(0.0, high[i] - p[i])  # rounding
            ax.errorbar(
                [100 * p[i]],
                [i],
                xerr=[[100 * below], [100 * above]],
                fmt="o",
                color=LABEL_COLOURS[0],
                capsize=3,
            )
        ax.set_yticks(y, [f"{c} (n={n})" for c, n in zip(conditions, ns, strict=True)])
        ax.set_ylim(len(conditions) - 0.5, -0.5)
        ax.set_xlim(-3, 103)
        ax.set_xlabel(f"{name} (%, Wilson 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    fig.axes[0].set_ylabel("condition")
    for ax in fig.axes[1:]:
        ax.tick_params(labelleft=False)
    fig.suptitle(wrapped(title))
    return fig


def means(
    title: str,
    conditions: Sequence[str],
    series: Sequence[tuple[str, str, Sequence[float], Sequence[float], Sequence[float]]],
    ylabel: str,
    n: int,
) -> Figure:
    """Means with 95% intervals per condition, one series (role) per colour."""
    fig = new(7.5, 4.0)
    ax = fig.axes[0]
    width = 0.7 / max(len(series), 1)
    for k, (name, colour, mean, low, high) in enumerate(series):
        xs = [i - 0.35 + width * (k + 0.5) for i in range(len(conditions))]
        for x, m, lo, hi in zip(xs, mean, low, high, strict=True):
            if math.isnan(m):
                continue
            err = [[0.0], [0.0]] if math.isnan(lo) else [[max(0.0, m - lo)], [max(0.0, hi - m)]]
            ax.errorbar([x], [m], yerr=err, fmt="o", color=colour, capsize=3)
        ax.plot([], [], "o", color=colour, label=name)
    ax.set_xticks(range(len(conditions)), conditions, rotation=20, ha="right")
    ax.set_xlabel("condition")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1 or series and series[0][0]:
        ax.legend(title="role", frameon=False)
    ax.set_title(wrapped(f"{title} (n={n})"))
    return fig


def curves(
    title: str,
    panels: Sequence[
        tuple[str, Sequence[tuple[str, str, list[int], list[float], list[float], list[float]]]]
    ],
    ylabel: str,
    n: int,
) -> Figure:
    """Mean per message position by role, with ±1.96·SE bands; one panel per condition."""
    cols = 2 if len(panels) in (2, 4) else min(3, len(panels)) or 1
    rows = max(1, math.ceil(len(panels) / cols))
    fig = new(7.5, 1.2 + 2.2 * rows, cols=cols, rows=rows, share=True)
    axes = fig.axes
    for ax, (condition, lines) in zip(axes, panels, strict=False):
        for role, colour, x, mean, low, high in lines:
            ax.plot(x, mean, color=colour, label=role, marker=".")
            ok = [i for i, v in enumerate(low) if not math.isnan(v)]
            if ok:
                ax.fill_between(
                    [x[i] for i in ok],
                    [low[i] for i in ok],
                    [high[i] for i in ok],
                    color=colour,
                    alpha=0.2,
                    linewidth=0,
                )
        ax.set_title(condition, fontsize=8)
        ax.grid(alpha=0.3)
    fig.supxlabel("message position in the conversation (turn)")
    fig.supylabel(ylabel)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, title="role", loc="outside right upper", frameon=False)
    fig.suptitle(wrapped(f"{title} (n={n} messages; bands: mean ± 1.96·SE)"))
    return fig
