"""`simulator report`: an experiment's tables and figures in one folder (issue 12).

`register(app)` adds the command to the main typer app; like cli_scoring.py, this module
shares only simulator.frontend with cli.py. pandas, statsmodels and matplotlib are imported
when the command runs, not when the CLI starts.
"""

from __future__ import annotations

from pathlib import Path

import typer

from simulator.cli_scoring import SCORERS_FILE_OPTION
from simulator.frontend import err, friendly, open_store, out


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)


def report_command(
    ref: str = typer.Argument(
        ..., metavar="EXPERIMENT", help="Experiment (id, prefix or name) or batch id."
    ),
    by: list[str] | None = typer.Option(
        None,
        "--by",
        metavar="FACTOR_OR_CONDITION",
        help="Compare by this factor or condition (llm, days, agents_guard, ...; repeatable; "
        "default: every factor and LLM that varies).",
    ),
    scorer: list[str] | None = typer.Option(
        None, "--scorer", metavar="NAME", help="Only this scorer (repeatable; default: all)."
    ),
    usable_only: bool = typer.Option(
        False, "--usable-only", help="Analyse only usable conversations (the quality rule)."
    ),
    where: list[str] | None = typer.Option(
        None,
        "--where",
        "-w",
        metavar="KEY=VALUE",
        help="Only conversations with this condition (repeatable), e.g. --where llm=llama3.",
    ),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", metavar="DIR", help="Folder for report.html, tables/ and figures/."
    ),
    scorers_file: Path | None = SCORERS_FILE_OPTION,
) -> None:
    """Write the results: design, answers, attempt/success rates, means, regressions and
    agreement as one HTML page plus csv tables and PNG/SVG figures."""
    friendly(_report)(ref, by or [], scorer or [], usable_only, where or [], out_dir, scorers_file)


def _report(
    ref: str,
    by: list[str],
    scorers: list[str],
    usable_only: bool,
    where: list[str],
    out_dir: Path,
    scorers_file: Path | None,
) -> None:
    from simulator.analysis.report import write_report
    from simulator.scoring.definition import load_scorers_file

    result = write_report(
        open_store(),
        ref,
        out_dir,
        by=by,
        scorers=scorers,
        usable_only=usable_only,
        where=where,
        extra_scorers=load_scorers_file(scorers_file) if scorers_file else None,
    )
    for notice in result.notices:
        err.print(notice, markup=False)
    out.print(
        f"Report of {result.conversations} conversations ({result.analysed} analysed, "
        f"{result.scores} scores): {len(result.tables)} tables, {len(result.figures)} figure "
        f"files.\nopen {result.html}",
        markup=False,
    )
