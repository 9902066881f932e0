"""The report as one self-contained HTML page: the transcript pages' stylesheet, tables as
HTML, figures as SVG data URIs. A Content-Security-Policy lets nothing load from anywhere
(images only from the page itself), so the page works offline and makes no request."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

MAX_ROWS = 60  # rows of a table shown on the page (the csv has them all)
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
EXTRA_CSS = """
table.report { border-collapse: collapse; font-size: .85rem; margin: .4rem 0 .3rem; }
table.report th, table.report td { border-bottom: 1px solid var(--line); padding: .2rem .5rem;
  text-align: right; vertical-align: top; }
table.report th { background: var(--bg-soft); white-space: nowrap; }
table.report td:first-child, table.report th:first-child { text-align: left; }
.table { overflow-x: auto; margin-bottom: 1rem; }
.files { font-size: .8rem; color: var(--muted); }
figure { margin: 1rem 0 1.4rem; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { font-size: .85rem; color: var(--muted); }
p.notice { background: #fff4e5; border-left: 5px solid #e65100; padding: .5rem .8rem; }
ul.summary { font-size: .92rem; }
"""


@dataclass
class Table:
    name: str  # the csv file's stem
    title: str
    frame: pd.DataFrame
    note: str = ""


@dataclass
class Chart:
    name: str  # the png/svg files' stem
    title: str
    png: bytes
    svg: bytes
    n: int
    note: str = ""


@dataclass
class Section:
    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)  # plain text
    notices: list[str] = field(default_factory=list)  # said plainly, highlighted
    items: list[Table | Chart] = field(default_factory=list)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    try:
        import pandas as pd

        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value)


def table_html(table: Table) -> str:
    frame = table.frame
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    rows = []
    shown = frame.head(MAX_ROWS)
    for record in shown.itertuples(index=False, name=None):
        rows.append("<tr>" + "".join(f"<td>{_e(_cell(v))}</td>" for v in record) + "</tr>")
    note = f"<p>{_e(table.note)}</p>" if table.note else ""
    if len(frame) > MAX_ROWS:
        note += f"<p>The first {MAX_ROWS} of {len(frame)} rows; every row is in the csv file.</p>"
    return (
        f'<div class="table" data-table="{_e(table.name)}"><h3>{_e(table.title)}</h3>{note}'
        f'<table class="report"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
        f'</table><p class="files">tables/{_e(table.name)}.csv</p></div>'
    )


def chart_html(chart: Chart) -> str:
    data = base64.b64encode(chart.svg).decode("ascii")
    note = f" {_e(chart.note)}" if chart.note else ""
    return (
        f'<figure data-figure="{_e(chart.name)}"><img alt="{_e(chart.title)}" '
        f'src="data:image/svg+xml;base64,{data}"><figcaption>{_e(chart.title)} '
        f"(n={chart.n}).{note} figures/{_e(chart.name)}.png, .svg</figcaption></figure>"
    )


def section_html(section: Section) -> str:
    parts = [f'<section id="{_e(section.id)}"><h2>{_e(section.title)}</h2>']
    parts += [f'<p class="notice">{_e(text)}</p>' for text in section.notices]
    parts += [f"<p>{_e(text)}</p>" for text in section.paragraphs]
    for item in section.items:
        parts.append(table_html(item) if isinstance(item, Table) else chart_html(item))
    parts.append("</section>")
    return "\n".join(parts)


def page(title: str, subtitle: str, summary: list[str], sections: list[Section]) -> str:
    css = (
        resources.files("simulator")
        .joinpath("data")
        .joinpath("viewer.css")
        .read_text(encoding="utf-8")
    )
    items = "".join(f"<li>{_e(line)}</li>" for line in summary)
    body = "\n".join(section_html(s) for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="generator" content="llm-interaction-simulator">\n'
        f"<title>{_e(title)}</title>\n<style>{css}{EXTRA_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{_e(title)} <small>{_e(subtitle)}</small></h1>\n"
        f'<ul class="summary">{items}</ul>\n{body}\n</main>\n</body>\n</html>\n'
    )
