"""The `simulator` command: parse options, call the library, render the result.

Every command runs the same library functions the interactive menus use. A UserError
becomes a one-paragraph message on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from simulator import cli_report, cli_results, cli_scoring
from simulator.errors import UserError
from simulator.frontend import (
    LazyModule,
    defer_settings_error,
    err,
    friendly,
    lazy_function,
    notice,
    open_store,
    out,
    print_error,
    use_help_command,
)

# Start-up (issue 14): `simulator --help` only needs typer. What a command needs (pymongo,
# rich, inflect, the runner, the LLM clients) is imported when the command runs, so every
# invocation does not pay for every other command's imports.
if TYPE_CHECKING:
    from simulator import display, prompts
    from simulator.experiment import Experiment, load_experiment, save_experiment
    from simulator.grid import make_grid
    from simulator.importing import ImportResult, check_experiment_file, import_experiment
    from simulator.llm.cache import ResponseCache
    from simulator.runner import (
        BatchReport,
        RunOptions,
        options_from_settings,
        resume_batch,
        start_batch,
    )
    from simulator.store import Store, duplicate_experiment
else:
    display, prompts = LazyModule("simulator.display"), LazyModule("simulator.prompts")
    load_experiment = lazy_function("simulator.experiment", "load_experiment")
    save_experiment = lazy_function("simulator.experiment", "save_experiment")
    make_grid = lazy_function("simulator.grid", "make_grid")
    check_experiment_file = lazy_function("simulator.importing", "check_experiment_file")
    import_experiment = lazy_function("simulator.importing", "import_experiment")
    options_from_settings = lazy_function("simulator.runner", "options_from_settings")
    resume_batch = lazy_function("simulator.runner", "resume_batch")
    start_batch = lazy_function("simulator.runner", "start_batch")
    duplicate_experiment = lazy_function("simulator.store", "duplicate_experiment")
    ResponseCache = lazy_function("simulator.llm.cache", "ResponseCache")

# At exit the interpreter's last garbage collections walk every object the imports made:
# for a command that loaded pymongo and rich, 0.3 s of CPU (issue 14). Freezing them first
# skips that; the process is ending and the system takes its memory back anyway. Exit
# handlers run last-registered first: pymongo's (closing clients) before this one, logging's
# (flushing files) after it; neither depends on the collector.
atexit.register(gc.freeze)

app = typer.Typer(
    help="Run grids of multi-agent LLM role-play conversations and keep every result in MongoDB.\n\n"
    "Run `simulator` with no command for the interactive menus.",
    add_completion=False,
    rich_markup_mode=None,
)
experiment_app = typer.Typer(
    help="Import, list, show, export, duplicate, note, favourite and delete experiments. "
    "To change one, export it, edit the YAML and `duplicate EXPERIMENT --from-file FILE`."
)
db_app = typer.Typer(help="The embedded local database server (used when MONGODB_URI is unset).")
app.add_typer(experiment_app, name="experiment")
app.add_typer(db_app, name="db")
cli_results.register(app)
cli_scoring.register(app)  # score, annotate, agreement (issue 11)
cli_report.register(app)  # report (issue 12)

log = logging.getLogger("simulator")


def command_line() -> None:
    """The `simulator` command (the console script and `python -m simulator`)."""
    try:
        app(prog_name="simulator")
        code: int | str | None = 0
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):  # sys.exit("message"): printed, exit status 1
        print(code, file=sys.stderr)
        code = 1
    leave(code or 0)


def leave(status: int) -> None:
    """End the process now that the command is done (issue 14).

    The interpreter's own teardown waits up to half a second for pymongo's monitor threads
    (they look for the stop flag every 0.5 s) and walks every imported object. What a clean
    exit would still do is done here first: output flushed, database clients closed (the
    server hears the sessions end), log files closed. While a non-daemon thread still runs,
    the process exits the ordinary way, which waits for it.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing more to write
            pass
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
        sys.exit(status)
    if "simulator.database" in sys.modules:
        sys.modules["simulator.database"].close_clients()
    logging.shutdown()
    os._exit(status)


__all__ = ["app", "err", "friendly", "open_store", "out", "command_line", "leave"]


def _configure_logging(verbose: bool, log_dir: Path) -> None:
    """A log file in SIMULATOR_LOG_DIR and, with --verbose, the console (once a process)."""
    root = logging.getLogger("simulator")
    if root.handlers:
        return
    root.setLevel(logging.DEBUG)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(log_dir / "simulator.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        root.addHandler(handler)
    except OSError:
        pass  # an unwritable log folder must not stop the work
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(console)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("llm-interaction-simulator")
        except PackageNotFoundError:  # running from a source tree that was never installed
            from simulator import __version__ as number
        out.print(f"simulator {number}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details to the console."),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="Show the version and exit.",
    ),
) -> None:
    # Settings are checked before any command runs, so an invalid one is one paragraph on
    # every command. The error is raised when the command starts (see `friendly`), not
    # here: `COMMAND --help` must still work, it is how one finds out what to fix.
    from simulator.settings import load_settings

    defer_settings_error(None)
    try:
        settings = load_settings()
    except UserError as e:
        if ctx.invoked_subcommand is None:
            print_error(e)
            raise typer.Exit(1) from None
        defer_settings_error(e)
        return
    _configure_logging(verbose, Path(settings.log_dir))
    if ctx.invoked_subcommand is None:
        _interactive()


@friendly
def _interactive() -> None:
    from simulator import interactive

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError(
            "The interactive menus need a terminal. Without one, use the commands: "
            "`simulator experiment import FILE`, `simulator run EXPERIMENT ...`, "
            "`simulator resume`, `simulator status`, `simulator show CONVERSATION` "
            "(see `simulator --help`)."
        )
    interactive.main_menu(open_store())


# --- experiments -------------------------------------------------------------------------

EXPERIMENT_ARGUMENT = typer.Argument(
    ..., metavar="EXPERIMENT", help="Experiment id, unique id prefix or name."
)

NEW_OPTION = typer.Option(
    False,
    "--new",
    help="The file was edited since you imported it: store it as a new experiment "
    "of the same name (linked to the old one) instead of refusing.",
)


def experiment_ref(store: Store, ref: str, *, as_new: bool = False) -> Experiment:
    """An experiment given as a YAML file (imported on the way; a path that exists is a
    file), or as an id, a unique id prefix or a name (Store.get_experiment)."""
    from simulator.errors import NotFoundError

    path = Path(ref)
    check_experiment_file(path)
    if path.is_file():
        result = import_experiment(store, path, as_new=as_new)
        for line in (result.notice(), shared_name(store, result)):
            if line:
                notice(line)
        return result.experiment
    try:
        return store.get_experiment(ref)
    except NotFoundError as e:
        if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
            raise UserError(
                f"{ref}: no such file, nor an experiment of that name. Give a YAML file, or an "
                "experiment's id or name (list them with `simulator experiment list`)."
            ) from None
        raise e from None


def shared_name(store: Store, result: ImportResult) -> str | None:
    """The warning for an import that created an experiment whose name others have."""
    return (
        store.shared_name_notice(result.experiment.name, result.experiment.id)
        if result.created
        else None
    )


@experiment_app.command("import")
@friendly
def experiment_import(
    file: Path = typer.Argument(..., metavar="FILE", help="An experiment YAML file."),
    as_new: bool = NEW_OPTION,
) -> None:
    """Import an experiment from YAML (validated first; an unchanged file is imported once)."""
    store = open_store()
    result = import_experiment(store, file, as_new=as_new)
    exp = result.experiment
    verb = "Imported" if result.created else "Already imported"
    out.print(f"{verb} experiment '{exp.name}' as {exp.id}")
    told = result.notice()
    if told:
        out.print(told, markup=False)
    warning = shared_name(store, result)
    if warning:
        notice(warning)


@experiment_app.command("list")
@friendly
def experiment_list(
    mine: bool = typer.Option(False, "--mine", help="Only experiments you created."),
    search: str = typer.Option(
        "", "--search", "-s", metavar="TEXT", help="Filter by name, note or creator."
    ),
) -> None:
    """List experiments, favourites first."""
    rows = open_store().list_experiments(mine=mine, search=search)
    if not rows:
        out.print("No experiments yet: import one with `simulator experiment import FILE`.")
        return
    out.print(display.experiments_table(rows))


@experiment_app.command("show")
@friendly
def experiment_show(ref: str = EXPERIMENT_ARGUMENT) -> None:
    """Show an experiment's definition as YAML, with who made it."""
    from simulator.experiment import dump_experiment

    exp = open_store().get_experiment(ref)
    out.print(
        f"# id {exp.id} · creator {exp.creator} · created {exp.created_at:%Y-%m-%d %H:%M}"
        + (f" · duplicated from {exp.parent_id}" if exp.parent_id else "")
    )
    out.print(dump_experiment(exp), markup=False)


@experiment_app.command("export")
@friendly
def experiment_export(
    ref: str = EXPERIMENT_ARGUMENT,
    out_file: Path | None = typer.Option(
        None, "--out", "-o", metavar="FILE", help="Write to this file."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it exists."),
) -> None:
    """Write an experiment's definition as YAML (to stdout, or a file with --out)."""
    from simulator.experiment import dump_experiment

    if out_file is not None and out_file.exists() and not force:
        raise UserError(
            f"{out_file} exists (perhaps your edited copy); nothing written. Give another "
            "--out, or add --force to replace it."
        )
    exp = open_store().get_experiment(ref)
    if out_file is None:
        sys.stdout.write(dump_experiment(exp))
    else:
        save_experiment(exp, out_file)
        out.print(f"Wrote {out_file}")


@experiment_app.command("duplicate")
@friendly
def experiment_duplicate(
    ref: str = typer.Argument(
        ..., metavar="EXPERIMENT", help="Experiment id, unique id prefix or name (anyone's)."
    ),
    name: str | None = typer.Option(None, "--name", metavar="NAME", help="Name of the copy."),
    from_file: Path | None = typer.Option(
        None, "--from-file", metavar="FILE", help="Use this edited YAML as the copy's definition."
    ),
) -> None:
    """Copy an experiment as your own (with a link to the original), optionally edited."""
    store = open_store()
    original = store.get_experiment(ref)
    edited = load_experiment(from_file) if from_file else original
    if name:
        edited.name = name
    copy = duplicate_experiment(store, original.id or ref, edited)
    out.print(f"Duplicated {copy.parent_id} as {copy.id} ('{copy.name}', owned by {copy.creator})")
    warning = store.shared_name_notice(copy.name, copy.id)
    if warning:
        notice(warning)


@experiment_app.command("note")
@friendly
def experiment_note(
    ref: str = EXPERIMENT_ARGUMENT,
    note: str = typer.Argument(..., metavar="NOTE", help="The new note."),
) -> None:
    """Change an experiment's note (creator only)."""
    exp = open_store().set_note(ref, note)
    out.print(f"Note of {exp.id} set.")


@experiment_app.command("favourite")
@friendly
def experiment_favourite(
    ref: str = EXPERIMENT_ARGUMENT,
    off: bool = typer.Option(False, "--off", help="Remove the star."),
) -> None:
    """Star an experiment as a favourite (--off removes the star)."""
    exp = open_store().set_favourite(ref, not off)
    out.print(f"{exp.id} is {'no longer ' if off else ''}a favourite.")


@experiment_app.command("delete")
@friendly
def experiment_delete(
    ref: str = typer.Argument(
        ..., metavar="EXPERIMENT", help="Experiment id, unique id prefix or name."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete an experiment with all its conversations (creator only; refused while it holds
    anyone else's conversations)."""
    from simulator.store import plural

    store = open_store()
    plan = store.delete_plan(ref)  # a refusal comes before any question
    exp = plan.experiment
    what = (
        f"experiment '{exp.name}' ({exp.id}) and its {plural(plan.conversations, 'conversation')}"
    )
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"Deleting needs confirmation: add --yes to delete {what}.")
        typer.confirm(f"Delete {what}?", abort=True)
    with display.DeleteProgress(err, plan.conversations) as progress:
        deleted = store.delete_experiment(exp.id or ref, on_progress=progress)
    out.print(
        f"Deleted {exp.id}: {plural(deleted.conversations, 'conversation')}, "
        f"{plural(deleted.messages, 'message')}."
    )


# --- batches ------------------------------------------------------------------------------


def run_options(
    concurrency: int | None,
    max_failures: str | None,
    plain: bool,
    *,
    manual: bool = False,
    max_tokens: int | None = None,
    max_cost: float | None = None,
) -> RunOptions:
    """Options of `run`, `resume` and `work`. `manual`: the grid has manual speaker selection."""
    from simulator.settings import load_settings

    chooser = None
    if manual and sys.stdin.isatty():  # questionary (0.06 s of imports) only when asked
        from simulator.interactive import manual_chooser

        chooser = manual_chooser()
    return options_from_settings(
        load_settings(),
        concurrency=concurrency,
        max_failures=max_failures,
        manual=chooser,
        on_warning=lambda w: err.print(f"[yellow]Warning:[/] {w}", markup=True),
        max_tokens=max_tokens,
        max_cost=max_cost,
    )


def execute(
    store: Store, fn: Callable[[RunOptions], BatchReport], options: RunOptions, plain: bool
) -> BatchReport:
    """Run a batch with the progress display and print what happened.

    `kill` (SIGTERM) stops a batch like Ctrl-C. Console log lines go through rich, so they
    appear above the live display instead of breaking it.
    """
    import signal
    import threading

    from simulator.errors import StorageError

    class CurrentStderr:  # whatever sys.stderr is now: rich swaps it while the display is live
        def write(self, text: str) -> int:
            return sys.stderr.write(text)

        def flush(self) -> None:
            sys.stderr.flush()

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    handlers = [h for h in log.handlers if type(h) is logging.StreamHandler]
    streams = [h.stream for h in handlers]
    for handler in handlers:
        handler.stream = CurrentStderr()  # not setStream(): it flushes the old one
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if on_main else None
    try:
        with display.batch_views(err, live=False if plain else None) as (pulls, progress):
            options.pull_progress, options.on_progress = pulls, progress
            report = fn(options)
    except KeyboardInterrupt:
        err.print("Interrupted before the batch started.", highlight=False)
        raise typer.Exit(130) from None
    except StorageError as e:
        err.print(f"[bold red]Error:[/] {e}", markup=True, highlight=False)
        sys.stdout.flush()
        sys.stderr.flush()
        if getattr(e, "abandoned", 0):
            os._exit(1)  # threads stuck on the database or on a call: do not wait for them
        raise typer.Exit(1) from None
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        for handler, stream in zip(handlers, streams):
            handler.stream = stream
    out.print(display.closing_text(store, report))
    return report


def finish(store: Store, report: BatchReport) -> None:
    """Say where results are; exit non-zero when the batch did not complete."""
    if report.note:
        out.print(report.note)
    if report.status == "running":  # a worker done while other workers go on (issue 13)
        return
    if report.status == "interrupted":
        out.print(f"Interrupted. Continue with:  simulator resume {report.batch_id}")
        sys.stdout.flush()
        sys.stderr.flush()
        if report.abandoned:
            # Calls still in flight are abandoned: resume redoes whatever they did not store.
            os._exit(130)
        raise typer.Exit(130)
    records = store.list_conversations(batch_id=report.batch_id, limit=2)
    if len(records) == 1 and records[0].status == "completed":
        # Printed, never paged: a pager would block the end of `run` until `q` is pressed.
        show_conversation(store, records[0].id, raw=False, page=False)
    if report.status != "completed":
        out.print(
            f"Continue the unfinished conversations with:  simulator resume {report.batch_id}"
        )
    if records:
        exp_id = records[0].experiment_id
        out.print(
            f"Results are in the database. List them: simulator conversations {exp_id[:8]} · "
            f"read one: simulator show {records[0].id[:8]} · status: simulator status {report.batch_id}"
        )
    if report.status != "completed":
        raise typer.Exit(1)


# Options shared by `run` and `resume`.
CONCURRENCY_OPTION = typer.Option(
    None, "--concurrency", "-c", metavar="N", help="Requests in flight per LLM endpoint."
)
MAX_FAILURES_OPTION = typer.Option(
    None,
    "--max-failures",
    metavar="N|FRACTION",
    help="Stop after more failed conversations than this count "
    "(e.g. 5) or fraction (e.g. 0.2 or 20%; default 0.1).",
)
PLAIN_OPTION = typer.Option(False, "--plain", help="One line per event, no live display.")
MAX_TOKENS_OPTION = typer.Option(
    None,
    "--max-tokens",
    metavar="N",
    help="Stop starting conversations once the batch has used N tokens (prompt + completion, "
    "all workers); those in flight finish and the batch stays resumable.",
)
MAX_COST_OPTION = typer.Option(
    None,
    "--max-cost",
    metavar="AMOUNT",
    help="Like --max-tokens, for the cost by the prices in SIMULATOR_PRICES "
    "(MODEL=PROMPT/COMPLETION per 1M tokens; ...).",
)
CACHE_OPTION = typer.Option(
    False,
    "--cache",
    help="Reuse stored LLM responses for identical calls (same model, URL, messages, "
    "sampling, seed and repetition) and store new ones.",
)


@app.command()
@friendly
def run(
    experiment: str = typer.Argument(
        ...,
        metavar="EXPERIMENT",
        help="An experiment YAML file, or an experiment's id, unique id prefix or name.",
    ),
    llm: list[str] | None = typer.Option(
        None,
        "--llm",
        metavar="MODEL",
        help="LLM(s) from the experiment (repeatable; default: its first LLM; "
        "`all` for every one; `scripted` for an offline dry run).",
    ),
    messages: int = typer.Option(
        10, "--messages", "-m", metavar="N", help="Agent messages per conversation."
    ),
    days: int = typer.Option(
        2, "--days", "-d", metavar="N", help="Days (each ends with a summary)."
    ),
    every_day: bool = typer.Option(False, "--every-day", help="Try every day count 1..--days."),
    agents: str | None = typer.Option(
        None,
        "--agents",
        "-a",
        metavar="ROLE=N,...",
        help="Agents per role, e.g. guard=1,prisoner=2 (default 1 each).",
    ),
    every_combination: bool = typer.Option(
        False, "--every-combination", help="Try every agent combination up to --agents."
    ),
    speaker: list[str] | None = typer.Option(
        None,
        "--speaker",
        "-s",
        metavar="METHOD",
        help="round_robin | random | auto | manual (repeatable).",
    ),
    repetitions: int = typer.Option(
        1, "--repetitions", "-r", metavar="N", help="Conversations per setting."
    ),
    seed: int = typer.Option(
        0, "--seed", metavar="N", help="Base seed (repetition r uses seed + r)."
    ),
    factor: list[str] | None = typer.Option(
        None,
        "--factor",
        metavar="NAME=LEVEL[,LEVEL]",
        help="Run only these levels of a factor (repeatable; default: every level of every "
        "factor), e.g. --factor guard_personality=good,bad.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the grid and call count only."),
    concurrency: int | None = CONCURRENCY_OPTION,
    max_failures: str | None = MAX_FAILURES_OPTION,
    max_tokens: int | None = MAX_TOKENS_OPTION,
    max_cost: float | None = MAX_COST_OPTION,
    plain: bool = PLAIN_OPTION,
    as_new: bool = NEW_OPTION,
    score: bool = typer.Option(
        False, "--score", help="Then score the batch with the experiment's scorers."
    ),
    cache: bool = CACHE_OPTION,
) -> None:
    """Run a batch: every combination of the grid options, each stored as it happens."""
    check_experiment_file(Path(experiment))  # a directory is refused before connecting
    # A dry run of a YAML file touches no database; anything else needs the store.
    store = None if dry_run and Path(experiment).is_file() else open_store()
    exp = experiment_ref(store, experiment, as_new=as_new) if store else load_experiment(experiment)
    names = None if llm and "all" in llm else (llm or [exp.llms[0].model])
    grid = make_grid(
        exp,
        llms=names,
        messages=messages,
        days=days,
        agents=agents,
        speakers=speaker or ["round_robin"],
        every_day=every_day,
        every_combination=every_combination,
        repetitions=repetitions,
        seed=seed,
        factors=factor,
    )
    # every option is checked before the grid is shown, for a dry run too
    manual = "manual" in grid.speakers
    options = run_options(
        concurrency, max_failures, plain, manual=manual and not dry_run,
        max_tokens=max_tokens, max_cost=max_cost,
    )  # fmt: skip
    out.print(display.grid_table(grid))
    from simulator.store import plural

    out.print(f"{plural(grid.size(), 'conversation')}, at least {grid.llm_calls():,} LLM calls.")
    if dry_run:
        from simulator.estimate import estimate
        from simulator.pricing import parse_prices
        from simulator.settings import load_settings

        history = store.reply_lengths(exp.id) if store is not None and exp.id else None
        prices = parse_prices(load_settings().prices)
        try:
            lines = estimate(exp, grid, history, prices=prices).lines()
        except KeyboardInterrupt:
            err.print("Interrupted.", highlight=False)
            raise typer.Exit(130) from None
        for line in lines:
            out.print(line, markup=False, highlight=False)
        return
    assert store is not None
    options.cache = ResponseCache(store) if cache else None
    report = execute(store, lambda o: start_batch(store, exp, grid, o), options, plain or manual)
    if options.cache is not None:
        out.print(options.cache.summary(), highlight=False)
    finish(store, report)
    if score:  # issue 11: only a completed batch gets here
        cli_scoring.score_ref(
            report.batch_id, None, [], None, concurrency, max_failures, cache=cache
        )


@app.command()
@friendly
def resume(
    batch: str | None = typer.Argument(
        None, help="Batch id or prefix (default: your latest unfinished batch)."
    ),
    concurrency: int | None = CONCURRENCY_OPTION,
    max_failures: str | None = MAX_FAILURES_OPTION,
    max_tokens: int | None = MAX_TOKENS_OPTION,
    max_cost: float | None = MAX_COST_OPTION,
    plain: bool = PLAIN_OPTION,
    cache: bool = CACHE_OPTION,
) -> None:
    """Continue an interrupted batch after the last stored message of each conversation."""
    store = open_store()
    if batch is None:
        latest = store.latest_batch(unfinished=True)
        if latest is None:
            raise UserError(
                "You have no unfinished batch to resume (see `simulator status`): start one "
                "with `simulator run`."
            )
        batch = latest.id
    manual = "manual" in store.get_batch(batch).grid.speakers
    options = run_options(
        concurrency, max_failures, plain, manual=manual, max_tokens=max_tokens, max_cost=max_cost
    )
    options.cache = ResponseCache(store) if cache else None
    report = execute(store, lambda o: resume_batch(store, batch, o), options, plain or manual)
    if options.cache is not None:
        out.print(options.cache.summary(), highlight=False)
    finish(store, report)


@app.command()
@friendly
def work(
    batch: str = typer.Argument(..., help="Batch id or prefix."),
    concurrency: int | None = CONCURRENCY_OPTION,
    max_failures: str | None = MAX_FAILURES_OPTION,
    max_tokens: int | None = MAX_TOKENS_OPTION,
    max_cost: float | None = MAX_COST_OPTION,
    plain: bool = PLAIN_OPTION,
) -> None:
    """Join a batch as one more worker: start as many as you like, on any machines that
    share the database (e.g. a Slurm job array); each claims conversations until none is
    left. A worker that dies leaves its conversation to the others (after
    SIMULATOR_WORKER_TIMEOUT seconds, at once on the same machine)."""
    from simulator.runner import work_batch

    store = open_store()
    options = run_options(
        concurrency, max_failures, plain, max_tokens=max_tokens, max_cost=max_cost
    )
    report = execute(store, lambda o: work_batch(store, batch, o), options, plain)
    finish(store, report)


@app.command()
@friendly
def watch(
    batch: str | None = typer.Argument(
        None, help="Batch id or prefix (default: the newest batch in the database)."
    ),
    interval: float = typer.Option(
        2.0, "--interval", metavar="SECONDS", help="Time between looks."
    ),
    once: bool = typer.Option(False, "--once", help="Look once and exit."),
) -> None:
    """Follow a batch run by anyone, from any terminal: done/total, messages, tokens, rate,
    ETA, failures, and its live workers with their hosts. Ends when nobody works on it."""
    import time

    from simulator.workers.watch import describe, look

    if not interval > 0:
        raise UserError(f"--interval must be a positive number of seconds (got {interval}).")
    store = open_store()
    if batch is None:
        newest = store.list_batches(limit=1)
        if not newest:
            raise UserError(
                "There is no batch in the database yet: start one with `simulator run`."
            )
        batch = newest[0].id
    first = None
    last_line = None
    try:
        while True:
            now = look(store, batch)
            first = first or now
            line = describe(now, first if now is not first else None)
            if line != last_line:
                out.print(line, markup=False, highlight=False, soft_wrap=True)
                sys.stdout.flush()
                last_line = line
            if once or now.over:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
@friendly
def status(
    batch: str | None = typer.Argument(
        None, help="Batch id or prefix (default: every batch in the database)."
    ),
    mine: bool = typer.Option(False, "--mine", help="Only your batches."),
    all_batches: bool = typer.Option(
        False, "--all", hidden=True, help="Everyone's batches (the default)."
    ),
    limit: int = typer.Option(20, "--limit", "-n", help="Show at most this many batches."),
) -> None:
    """Show batches, live or dead: conversations by status, tokens, time, live workers,
    failures with their reasons."""
    store = open_store()
    if batch:
        batches = [store.get_batch(batch)]
    else:
        creator = store.user if mine and not all_batches else None
        batches = store.list_batches(creator=creator, limit=max(limit, 1))
    if not batches:
        hint = " (without `--mine`, everyone's are shown)" if mine else ""
        out.print(f"No batches yet{hint}: start one with `simulator run`.")
        return
    names = store.experiment_names(b.experiment_id for b in batches)
    for b in batches:
        progress = store.batch_progress(b)  # kept on the batch: no counting of every record
        counts, totals = progress.counts, progress.totals
        out.print(display.batch_status_text(b, names.get(b.experiment_id), counts, totals))
        out.print(f"    {_liveness(store, b)}", markup=False, highlight=False)
        if b.error and b.status != "interrupted":
            out.print(f"    stopped: {b.error}", markup=False)
        for line in display.failures_text(totals.failures):
            out.print(f"  {line}", markup=False)
        if unusable := store.count_unusable(b.id):
            out.print(
                f"    {display.plural(unusable, 'completed conversation')} not usable by the quality "
                f"rule: simulator conversations {b.id} --where usable=false",
                markup=False,
            )
        unfinished = b.status != "completed" and counts.get("completed", 0) < b.total
        if unfinished and not display.batch_running(b):  # a live one is being worked on
            out.print(f"    continue with:  simulator resume {b.id}", markup=False)


def _liveness(store: Store, b: object) -> str:
    """`live` with its workers and hosts, or `dead` (its workers are gone), or `idle`."""
    from simulator.store import BatchRecord

    assert isinstance(b, BatchRecord)
    if display.batch_running(b):
        workers = [w for w in store.batch_workers(b) if w.alive] if b.workers else []
        if not workers:
            return f"live: {b.holder}"
        hosts = sorted({w.host for w in workers})
        return f"live: {display.plural(len(workers), 'worker')} on {', '.join(hosts)}"
    if b.stopped_unexpectedly:
        return "dead: no worker is alive (`simulator resume` or `simulator work` continues it)"
    return "idle: nobody works on it"


@app.command()
@friendly
def conversations(
    ref: str = typer.Argument(..., help="Experiment id, prefix or name; or a batch id or prefix."),
    where: list[str] | None = typer.Option(
        None,
        "--where",
        "-w",
        metavar="KEY=VALUE",
        help="Only conversations with this condition (repeatable): llm, days, messages, "
        "speaker, status, repetition, creator, usable (true/false), agents_ROLE (e.g. "
        "agents_guard), or a factor's NAME (e.g. --where guard_personality=bad); "
        "e.g. --where status=failed.",
    ),
    limit: int = typer.Option(50, "--limit", "-n", help="Show at most this many (0: all)."),
) -> None:
    """List the conversations of an experiment or a batch, with their conditions and status."""
    from simulator.store import parse_where, plural

    store = open_store()
    filters = parse_where(where or [])
    _, exp, batch_id = store.find_experiment_or_batch(ref)
    if limit < 0:
        raise UserError(f"--limit must be 0 (all) or more (got {limit}).")
    records = store.list_conversations(
        experiment_id=None if batch_id else exp.id,
        batch_id=batch_id,
        where=filters,
        limit=limit + 1 if limit else 0,  # one more tells whether there are more
        factors=exp.factor_levels(),
    )
    more = bool(limit) and len(records) > limit
    records = records[:limit] if limit else records
    source = f"Batch {batch_id}" if batch_id else f"Experiment {exp.id} ('{exp.name}')"
    if not records:
        if filters:
            out.print(f"{source} has no conversations with {', '.join(where or [])}.")
        else:
            out.print(f"{source} has no conversations yet: `simulator run {(exp.id or '')[:8]}`.")
        return
    out.print(display.conversations_table(records))
    shown = plural(len(records), "conversation")
    if more:
        shown = f"The first {shown} (--limit 0 shows all, --where narrows them down)"
    out.print(f"{shown} · {source}", markup=False)


def show_conversation(
    store: Store, ref: str, *, raw: bool, page: bool | None = None, selector: bool = False
) -> None:
    """Print a conversation; `page=None` pages a long one only when stdin and stdout are a
    terminal (someone is there to press `q`). `selector`: each speaker selector call too."""
    record = store.get_conversation(ref)
    exp = store.get_experiment(record.experiment_id)
    t = store.load_transcript(record.id)
    display.render_transcript(
        out,
        record,
        t.messages,
        t.summaries,
        [r.name for r in exp.roles],
        raw=raw,
        starting_message=prompts.starting_message(exp, record.spec.agents, record.spec.factors),
        page=page,
        selector_calls=t.selector_calls if selector else None,
        scores=store.list_scores(conversation_id=record.id),  # issue 11: by source
    )


@app.command()
@friendly
def show(
    conversation: str = typer.Argument(
        ..., metavar="CONVERSATION", help="Conversation id or prefix."
    ),
    raw: bool = typer.Option(
        False, "--raw", help="Also show raw replies where cleaning changed them."
    ),
    selector: bool = typer.Option(
        False,
        "--selector",
        help="Also show each speaker selector call: its answer, whom it chose, fallbacks.",
    ),
) -> None:
    """Print one conversation: conditions, quality, days, speakers coloured by role, flags,
    summaries."""
    show_conversation(open_store(), conversation, raw=raw, selector=selector)


# --- the embedded database ----------------------------------------------------------------


@db_app.command("status")
@friendly
def db_status() -> None:
    """Is the embedded server running? Where is its data?"""
    from simulator.database import EmbeddedServer
    from simulator.settings import load_settings

    settings = load_settings()
    if settings.mongodb_uri:
        from simulator.settings import redact_uri

        out.print(
            f"MONGODB_URI is set ({redact_uri(settings.mongodb_uri)}): the embedded "
            "server is not used."
        )
    s = EmbeddedServer(settings.data_dir).status()
    state = f"running (pid {s['pid']}, {s['uri']})" if s["running"] else "stopped"
    out.print(
        f"Embedded server: {state}\nData directory: {s['data_dir']} "
        f"({s['size_bytes'] / 1e6:.1f} MB)"
    )


@db_app.command("stop")
@friendly
def db_stop() -> None:
    """Stop the embedded server (the next command starts it again)."""
    from simulator.database import EmbeddedServer
    from simulator.settings import load_settings

    was_running = EmbeddedServer(load_settings().data_dir).stop()
    out.print("Embedded server stopped." if was_running else "Embedded server was not running.")


use_help_command(app, experiment_app, db_app)  # after every command is registered

if __name__ == "__main__":
    app()
