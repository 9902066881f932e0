"""The commands about outcomes: score, annotate export/import, agreement (issue 11).

`register(app)` adds them to the main typer app; like cli_results.py, this module shares
only simulator.frontend with cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from simulator.errors import UserError
from simulator.frontend import err, friendly, lazy_function, open_store, out, use_help_command

if TYPE_CHECKING:
    from simulator.experiment import Experiment
    from simulator.store import ConversationRecord, Store, parse_where, plural
else:  # imported when a command runs: start-up, issue 14
    parse_where = lazy_function("simulator.store", "parse_where")
    plural = lazy_function("simulator.store", "plural")

annotate_app = typer.Typer(
    help="Human annotation: export a sheet for an annotator, import their answers."
)


def register(app: typer.Typer) -> None:
    app.command("score")(score_command)
    app.command("agreement")(agreement_command)
    app.add_typer(annotate_app, name="annotate")
    annotate_app.command("export")(annotate_export_command)
    annotate_app.command("import")(annotate_import_command)
    use_help_command(annotate_app)


SCORERS_FILE_OPTION = typer.Option(
    None,
    "--scorers",
    metavar="FILE",
    help="A YAML file with `scorers:` (adds to, or replaces by name, the experiment's).",
)


def score_command(
    ref: str = typer.Argument(
        ..., metavar="REF", help="Experiment (id or name), batch or conversation id."
    ),
    scorer: list[str] | None = typer.Option(
        None, "--scorer", metavar="NAME", help="Only this scorer (repeatable; default: all)."
    ),
    where: list[str] | None = typer.Option(
        None,
        "--where",
        metavar="KEY=VALUE",
        help="Only conversations matching, e.g. llm=llama3, agents_guard=2 (repeatable).",
    ),
    scorers_file: Path | None = SCORERS_FILE_OPTION,
    concurrency: int | None = typer.Option(
        None, "--concurrency", "-c", metavar="N", help="Requests in flight per endpoint."
    ),
    max_failures: str | None = typer.Option(
        None,
        "--max-failures",
        metavar="N|FRACTION",
        help="Stop after this many failed items (count, or fraction like 0.2; default 10%).",
    ),
    cache: bool = typer.Option(
        False, "--cache", help="Reuse stored judge responses for identical calls; store new ones."
    ),
) -> None:
    """Score stored conversations; only items without a score are scored (resume = rerun)."""
    friendly(check_concurrency)(concurrency)  # before connecting or resolving REF
    friendly(score_ref)(
        ref, scorer, where or [], scorers_file, concurrency, max_failures, cache=cache
    )


def score_ref(
    ref: str,
    names: list[str] | None,
    where: list[str],
    scorers_file: Path | None,
    concurrency: int | None,
    max_failures: str | None,
    *,
    cache: bool = False,
) -> None:
    from simulator.scoring.run import select_conversations

    store = open_store()
    exp, records = select_conversations(store, ref, parse_where(where))
    run_scorers(store, exp, records, names, scorers_file, concurrency, max_failures, cache=cache)


def check_concurrency(concurrency: int | None) -> None:
    if concurrency is not None and concurrency < 1:
        raise UserError(
            f"--concurrency must be at least 1 (got {concurrency}): it is how many requests "
            "are in flight per endpoint; leave it out to use SIMULATOR_CONCURRENCY."
        )


def run_scorers(
    store: Store,
    exp: Experiment,
    records: list[ConversationRecord],
    names: list[str] | None,
    scorers_file: Path | None,
    concurrency: int | None = None,
    max_failures: str | None = None,
    *,
    cache: bool = False,
) -> None:
    """Score and print the report (shared by `score` and `run --score`)."""
    from rich.markup import escape
    from rich.progress import Progress

    from simulator.llm.cache import ResponseCache
    from simulator.runner import retry_policy
    from simulator.scoring.definition import choose, load_scorers_file
    from simulator.scoring.run import ScoreOptions, ScoreProgress, score, scorers_for
    from simulator.settings import load_settings

    check_concurrency(concurrency)
    extra = load_scorers_file(scorers_file) if scorers_file else []
    scorers = choose(scorers_for(exp, extra), names)
    if not scorers:
        raise UserError(
            f"Experiment {exp.id} has no scorers: add `scorers:` to its YAML, or give a file "
            "with --scorers FILE (e.g. experiments/prison-scorers.yaml)."
        )
    if not records:
        raise UserError("No ended conversations to score there (see `simulator conversations`).")
    settings = load_settings()
    from simulator import display

    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("Scoring", total=None)

        def on_progress(event: ScoreProgress) -> None:
            if event.kind == "started":
                progress.update(task, total=event.total)
            elif event.kind in ("scored", "invalid"):
                progress.update(task, completed=event.done)
            elif event.kind == "warning":
                progress.console.print(f"[yellow]Warning:[/] {escape(event.error)}", markup=True)
            elif event.kind == "stopping":
                progress.console.print("Stopping: calls in flight finish, nothing new starts.")

        options = ScoreOptions(
            concurrency=concurrency or settings.concurrency,
            max_failures=max_failures,
            retry=retry_policy(settings),
            on_progress=on_progress,
            cache=ResponseCache(store) if cache else None,
            pull_progress=display.PullView(progress.console, live=False),  # lines above the bar
        )
        report = score(store, exp, records, scorers, options)
    again = "Run the same `simulator score` command again"

    for line, problem in display.score_report_lines(report, [s.name for s in scorers], again):
        (err if problem else out).print(line, markup=False)
    if options.cache is not None:
        out.print(options.cache.summary(), highlight=False)
    if report.reason or report.interrupted or report.failed:
        raise typer.Exit(1)  # a script can tell "some items have no score" from "all scored"


def annotate_export_command(
    ref: str = typer.Argument(..., metavar="EXPERIMENT", help="Experiment id or name."),
    scorer: str = typer.Option(..., "--scorer", metavar="NAME", help="The scorer to annotate."),
    annotator: str = typer.Option(..., "--annotator", metavar="NAME", help="Who annotates."),
    out_file: Path = typer.Option(
        ..., "--out", "-o", metavar="FILE", help="The sheet to write: .xlsx or .csv."
    ),
    sample: int | None = typer.Option(
        None, "--sample", metavar="N", help="Only N items, drawn at random."
    ),
    seed: int = typer.Option(0, "--seed", metavar="S", help="Seed of the sample and shuffle."),
    blind: bool = typer.Option(
        False, "--blind", help="Hide every condition (LLM, agents, ...) and shuffle the rows."
    ),
    scorers_file: Path | None = SCORERS_FILE_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists."),
) -> None:
    """Write an annotation sheet: one row per item, an opaque item id, an empty answer column."""
    friendly(_annotate_export)(
        ref, scorer, annotator, out_file, sample, seed, blind, scorers_file, force
    )


def _annotate_export(
    ref: str,
    scorer: str,
    annotator: str,
    out_file: Path,
    sample: int | None,
    seed: int,
    blind: bool,
    scorers_file: Path | None,
    force: bool,
) -> None:
    from simulator.scoring.annotation import export_sheet

    store = open_store()
    result = export_sheet(
        store,
        ref,
        scorer,
        annotator,
        out_file,
        sample=sample,
        seed=seed,
        blind=blind,
        scorers_file=scorers_file,
        overwrite=force,
    )
    out.print(f"Wrote {plural(result.rows, 'row')} to {result.path} (sheet {result.sheet_id}).")


def annotate_import_command(
    file: Path = typer.Argument(..., metavar="FILE", help="A filled-in sheet (.xlsx or .csv)."),
    annotator: str = typer.Option(..., "--annotator", metavar="NAME", help="Who annotated."),
) -> None:
    """Import an annotator's answers as human:NAME scores (all rows valid, or nothing)."""
    friendly(_annotate_import)(file, annotator)


def _annotate_import(file: Path, annotator: str) -> None:
    from simulator.scoring.annotation import import_sheet

    store = open_store()
    result = import_sheet(store, file, annotator)
    out.print(
        f"Imported {plural(result.answers, 'answer')} of {annotator} for {result.scorer} "
        f"({result.blank:,} rows left blank)."
    )


def agreement_command(
    ref: str = typer.Argument(..., metavar="EXPERIMENT", help="Experiment id or name."),
    scorer: str = typer.Option(..., "--scorer", metavar="NAME", help="The scorer to compare."),
    confusion: bool = typer.Option(False, "--confusion", help="Print confusion matrices too."),
    scorers_file: Path | None = SCORERS_FILE_OPTION,
) -> None:
    """Agreement between every pair of sources: items in common, %, Cohen's kappa, alpha."""
    friendly(_agreement)(ref, scorer, confusion, scorers_file)


def _agreement(ref: str, scorer: str, confusion: bool, scorers_file: Path | None) -> None:
    from simulator.scoring.agreement import agreement_for, render

    store = open_store()
    result = agreement_for(store, ref, scorer, scorers_file=scorers_file)
    out.print(render(result, confusion=confusion))
