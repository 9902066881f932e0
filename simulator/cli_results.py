"""The commands that look at results and at the setup: export, import-legacy, doctor.

`register(app)` adds them to the main typer app. What the commands share with cli.py
(consoles, error handling, the store) comes from simulator.frontend, so this module does
not import simulator.cli.
"""

from __future__ import annotations

from pathlib import Path

import typer

from simulator.errors import UserError
from simulator.export_kinds import FORMATS, KINDS
from simulator.frontend import friendly, open_store, out

# parquet: the analysis tables (conversations, messages, scores) as parquet and csv (issue 12)
EXPORT_FORMATS = (*FORMATS, "parquet")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("import-legacy")(import_legacy_command)
    app.command("doctor")(doctor_command)


def export_command(
    ref: str = typer.Argument(
        ..., metavar="REF", help="Experiment, batch or conversation id (or unique prefix)."
    ),
    fmt: list[str] = typer.Option(
        ["txt"],
        "--format",
        "-f",
        metavar="FORMAT",
        help=f"{' | '.join(EXPORT_FORMATS)} (repeatable; parquet: the analysis tables).",
    ),
    out_dir: Path = typer.Option(
        Path("exports"), "--out", "-o", metavar="DIR", help="Folder to write into."
    ),
    kind: str | None = typer.Option(
        None,
        "--kind",
        metavar="KIND",
        help=f"Say what REF is when a prefix fits several: {', '.join(KINDS)}.",
    ),
    where: list[str] | None = typer.Option(
        None,
        "--where",
        "-w",
        metavar="KEY=VALUE",
        help="Only conversations with this condition (repeatable), as in "
        "`simulator conversations`: e.g. --where status=completed or --where risks=yes.",
    ),
    scores: str = typer.Option(
        "one",
        "--scores",
        metavar="one|all|none",
        help="Score columns: one per scorer (a human answer first, then a judge's ...), "
        "all (one per scorer and source, e.g. score_goal__human_ann), or none.",
    ),
) -> None:
    """Export conversations: txt to read, jsonl/csv (one row per message) for pandas, html."""
    friendly(_export)(ref, fmt, out_dir, kind, where or [], scores)


def _export(
    ref: str,
    formats: list[str],
    out_dir: Path,
    kind: str | None,
    where: list[str],
    scores: str = "one",
) -> None:
    from simulator import export
    from simulator.scoring.views import SCORE_MODES
    from simulator.store import parse_where

    for f in formats:
        if f not in EXPORT_FORMATS:
            raise UserError(f"--format {f!r}: choose one of {', '.join(EXPORT_FORMATS)}.")
    if scores not in SCORE_MODES:
        raise UserError(f"--scores {scores!r}: choose one of {', '.join(SCORE_MODES)}.")
    filters = parse_where(where)
    store = open_store()
    selection = export.select(store, ref, kind, filters)
    if filters and not selection.conversations:
        raise UserError(
            f"The {selection.kind} {selection.id} has no conversations with "
            f"{', '.join(where)}: list its conditions with `simulator conversations "
            f"{selection.id[:8]}`."
        )
    if not selection.conversations:
        raise UserError(
            f"The {selection.kind} {selection.id} has no conversations yet: run some with "
            f"`simulator run {(selection.experiment.id or '')[:8]}`."
        )
    for f in dict.fromkeys(formats):
        if f == "parquet":
            from simulator.analysis.tables import export_tables

            result = export_tables(store, selection, out_dir)
        else:
            result = export.export_selection(store, selection, f, out_dir, scores)
        folder = out_dir / export.experiment_folder(selection.experiment)
        what = f"{result.rows} rows" if f in ("jsonl", "csv") else f"{len(result.files)} files"
        out.print(f"{f}: {result.conversations} conversation(s), {what} in {folder}")
        if f == "html":
            out.print(f"      open {folder / 'index.html'}")


def import_legacy_command(
    db_name: str = typer.Option(..., "--db", metavar="NAME", help="The prototype's database name."),
    uri: str | None = typer.Option(
        None,
        "--uri",
        metavar="URI",
        help="The prototype's MongoDB URI (default: the server configured here).",
    ),
) -> None:
    """Import the prototype's experiments, conversations and messages (safe to repeat)."""
    friendly(_import_legacy)(db_name, uri)


def _import_legacy(db_name: str, uri: str | None) -> None:
    from simulator.legacy import import_legacy, open_source

    store = open_store()
    source = open_source(uri, db_name, store)
    report = import_legacy(store, source)
    for line in report.lines():
        out.print(line, markup=False)


def doctor_command() -> None:
    """Check the setup: MongoDB, the embedded server, Ollama, OpenAI, the local model, disk."""
    friendly(_doctor)()


def _doctor() -> None:
    from simulator.doctor import checks_table, run_checks
    from simulator.settings import load_settings

    checks = run_checks(load_settings())
    out.print(checks_table(checks))
    if any(c.verdict == "fail" for c in checks):
        raise typer.Exit(1)
