"""Terminal rendering with rich: transcripts, tables, batch progress. No logic lives here."""

from __future__ import annotations

import colorsys
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from simulator.conversation import EXTRA_ATTEMPTS, Message, SelectorCall, Summary
from simulator.grid import Grid
from simulator.placeholders import plural_noun
from simulator.runner import BatchReport, ProgressEvent
from simulator.scoring.views import newest_per_source, shown_value, source_kind
from simulator.store import (
    BatchRecord,
    BatchTotals,
    ConversationRecord,
    ExperimentRow,
    Score,
    Store,
    plural,
)

ROLE_COLOURS = [
    "cyan",
    "magenta",
    "green",
    "yellow",
    "blue",
    "red",
    "bright_cyan",
    "bright_magenta",
]


def role_colours(
    roles: Iterable[str], palette: Sequence[str] = ROLE_COLOURS, lightness: float = 0.6
) -> dict[str, str]:
    """A stable colour per role, in the experiment's role order: the palette, then evenly
    spread hues (golden-ratio steps), so any number of roles stay apart."""
    out = {}
    for i, role in enumerate(roles):
        if i < len(palette):
            out[role] = palette[i]
        else:
            r, g, b = colorsys.hls_to_rgb((i * 0.618034) % 1.0, lightness, 0.7)
            out[role] = f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"
    return out


def conditions_text(rec: ConversationRecord) -> str:
    spec = rec.spec
    agents = ", ".join(f"{n} {r if n == 1 else plural_noun(r)}" for r, n in spec.agents.items())
    sampling = ", ".join(f"{k}={v}" for k, v in spec.llm.sampling().items())
    text = (
        f"{spec.llm.label}{f' ({sampling})' if sampling else ''} · {spec.messages} messages · "
        f"{plural(spec.days, 'day')} · {agents} · {spec.speaker} · repetition {spec.repetition} · "
        f"seed {spec.seed} · {rec.status}"
    )
    if spec.factors:
        text += "\nfactors: " + ", ".join(f"{k}={v}" for k, v in spec.factors.items())
    return text


def transcript_parts(
    rec: ConversationRecord,
    messages: Sequence[Message],
    summaries: Sequence[Summary],
    roles: Sequence[str],
    *,
    raw: bool = False,
    starting_message: str | None = None,
    selector_calls: Sequence[SelectorCall] | None = None,
    scores: Sequence[Score] | None = None,
) -> list[RenderableType]:
    """What `render_transcript` prints, piece by piece."""
    roles = list(roles) + sorted({m.role for m in messages} - set(roles))
    colours = role_colours(roles)
    parts: list[RenderableType] = [
        Text(f"Conversation {rec.id}", style="bold"),
        Text(conditions_text(rec), style="dim"),
    ]
    if rec.agents:
        agents = Text("Agents: ", style="dim")
        for i, a in enumerate(rec.agents):
            agents.append((", " if i else "") + a.name, style=colours.get(a.role, "white"))
        parts.append(agents)
    if rec.error:
        parts.append(Text(f"Error: {rec.error}", style="red"))
    if rec.quality is not None:
        parts.append(
            Text(f"Quality: {rec.quality.line()}", style="green" if rec.quality.usable else "red")
        )
    shown = newest_per_source(scores or ())
    parts += scores_block(shown)
    by_message: dict[str, list[Score]] = {}
    for score in shown:
        if score.message:
            by_message.setdefault(score.message, []).append(score)
    calls: dict[tuple[int, int], list[SelectorCall]] = {}
    for c in selector_calls or ():
        calls.setdefault((c.day, c.turn), []).append(c)
    by_day = {s.day: s for s in summaries}
    for day in range(1, rec.spec.days + 1):
        today = [m for m in messages if m.day == day]
        if not today and day not in by_day and day > 1:
            break  # the conversation has not got this far
        parts.append(Rule(f"Day {day}"))
        if starting_message is not None:
            earlier = " (and the summaries of the days before)" if day > 1 else ""
            parts.append(Text(f"Researcher: {starting_message}{earlier}", style="dim"))
        for m in today:
            parts += selector_lines(calls.get((m.day, m.turn), []), m.speaker)
            label = Text(f"{m.speaker}: ", style=f"bold {colours.get(m.role, 'white')}")
            # later lines of a message indented under it: at column 0 a line such as
            # "Someone: ..." would read as a turn of its own
            content = m.content.replace("\n", "\n  ")
            body = Text("(empty reply)", style="dim italic") if m.empty else Text(content)
            parts.append(label + body + flags_text(m.flags, m.finish_reason))
            if f"{m.day}:{m.turn}" in by_message:
                parts.append(message_scores_text(by_message[f"{m.day}:{m.turn}"]))
            if raw and m.raw is not None:
                # every line under the message, so no line of it reads as a turn
                parts.append(Text("  raw: " + m.raw.replace("\n", "\n       "), style="dim"))
        if day in by_day:
            s = by_day[day]
            title = f"Summary of day {day}" + (f" [{', '.join(s.flags)}]" if s.flags else "")
            parts.append(Panel(s.content, title=escape(title), border_style="dim"))
    return parts


def short_source(source: str) -> str:
    """`python:pkg.mod:fn` -> `python`, `moderation:model` -> `moderation`; judges and
    humans keep their model or name (two of them can score the same message)."""
    kind = source_kind(source)
    return kind if kind in ("python", "moderation") else source


def scores_block(scores: Sequence[Score]) -> list[RenderableType]:
    """The conversation's scores by source: its own values, and how many messages each
    per-message scorer scored (those values are shown beside each message)."""
    if not scores:
        return []
    own: dict[str, list[str]] = {}
    per_message: dict[str, dict[str, int]] = {}
    for s in scores:
        if s.message:
            counts = per_message.setdefault(s.source, {})
            counts[s.scorer] = counts.get(s.scorer, 0) + 1
        else:
            own.setdefault(s.source, []).append(f"{s.scorer}={shown_value(s)}")
    lines = Text("Scores", style="bold")
    for source in sorted(set(own) | set(per_message)):
        items = list(own.get(source, []))
        items += [
            f"{name}: {plural(n, 'message')}" for name, n in per_message.get(source, {}).items()
        ]
        lines.append(f"\n  {source}: ", style="dim")
        lines.append(" · ".join(items))
    return [lines]


def message_scores_text(scores: Sequence[Score]) -> Text:
    """One dim line under a message: `  scores: toxicity=2 (judge:gpt-4o-mini) · ...`."""
    items = " · ".join(f"{s.scorer}={shown_value(s)} ({short_source(s.source)})" for s in scores)
    return Text(f"  scores: {items}", style="dim cyan")


def score_report_lines(
    report: Any, names: Sequence[str], again: str = "Score again"
) -> list[tuple[str, bool]]:
    """What a scoring run did (`simulator score` and the menus): (line, is a problem)."""
    lines = [
        (
            f"Scored {plural(report.scored, 'item')} with {', '.join(names)} "
            f"({report.already:,} already scored, {report.invalid:,} invalid answers, "
            f"{report.failed:,} failed, {plural(report.calls, 'call')}).",
            False,
        )
    ]
    lines += [(f"  {item}: {error}", True) for item, error in report.errors[:20]]
    if len(report.errors) > 20:
        lines.append((f"  ... and {len(report.errors) - 20} more (see the log file)", True))
    if report.reason or report.interrupted or report.missing:
        why = report.reason or ("interrupted" if report.interrupted else "some items failed")
        lines.append(
            (
                f"Not finished ({why}): {report.missing:,} items still have no score. "
                f"{again} to score only those.",
                True,
            )
        )
    return lines


def flags_text(flags: Sequence[str], finish_reason: str | None = None) -> Text:
    """` [truncated, repeated]` after a message (nothing when it has no flags)."""
    if not flags:
        return Text("")
    return Text(f"  [{', '.join(flags)}]", style="bold yellow")


def selector_lines(calls: Sequence[SelectorCall], spoke: str) -> list[RenderableType]:
    """One dim line per selector call of a turn: the answer, what it chose, a fallback."""
    lines: list[RenderableType] = []
    for i, c in enumerate(calls, 1):
        answer = " ".join(c.answer.split())
        answer = answer if len(answer) <= 100 else answer[:99] + "…"
        verdict = f"chose {c.chosen}" if c.chosen else "invalid"
        lines.append(Text(f"  selector {i}: {answer!r} → {verdict}", style="dim"))
    if len(calls) == 1 + EXTRA_ATTEMPTS and all(c.chosen is None for c in calls):
        lines.append(Text(f"  selector fell back to round robin → {spoke}", style="yellow"))
    return lines


def render_transcript(
    console: Console,
    rec: ConversationRecord,
    messages: Sequence[Message],
    summaries: Sequence[Summary],
    roles: Sequence[str],
    *,
    raw: bool = False,
    starting_message: str | None = None,
    page: bool | None = False,
    selector_calls: Sequence[SelectorCall] | None = None,
    scores: Sequence[Score] | None = None,
) -> None:
    """Print a conversation: conditions, scores, day headers, speakers coloured by role,
    summaries.

    `raw` adds the model's reply where cleaning changed it. `page=None` pages through
    $PAGER (less) when the console and stdin are a terminal and the transcript is taller
    than the screen; `page=False` never pages.
    """
    parts = transcript_parts(
        rec,
        messages,
        summaries,
        roles,
        raw=raw,
        starting_message=starting_message,
        selector_calls=selector_calls,
        scores=scores,
    )
    if page is None:
        # Only with someone at a terminal to press `q`: a pager on a pipe or with no
        # keyboard (stdin redirected) would block for ever.
        page = (
            console.is_terminal
            and sys.stdin.isatty()
            and _height(console, parts) > console.size.height
        )
    if not page:
        for part in parts:
            console.print(part)
        return
    # less shows colours only with -R; -F quits at once when it all fits, -X keeps it on screen.
    os.environ.setdefault("LESS", "-FRX")
    with console.pager(styles=True):
        for part in parts:
            console.print(part)


def _height(console: Console, parts: Sequence[RenderableType]) -> int:
    options = console.options
    return sum(len(console.render_lines(p, options, pad=False)) for p in parts)


EXPERIMENT_COLUMNS = ("star", "id", "name", "creator", "created", "roles", "LLMs", "conv.", "note")
_CAPS = {"name": 24, "creator": 12, "roles": 22, "LLMs": 28}
_NAME_MIN, _NOTE_MIN, _NOTE_SHORTEST = 12, 20, 8
# after the id, the name's first 12 characters, the count and the note's first 20: these,
# each while it fits
_OPTIONAL = ("creator", "created", "LLMs", "roles")


def experiment_cells(row: ExperimentRow) -> dict[str, str]:
    """What the experiment lists (`experiment list` and the menus) show of one experiment."""
    e = row.experiment
    return {
        "star": "⭐" if e.favourite else "",
        "id": (e.id or "")[:8],
        "name": e.name,
        "creator": e.creator or "",
        "created": e.created_at.strftime("%Y-%m-%d %H:%M") if e.created_at else "",
        "roles": ", ".join(r.name for r in e.roles),
        "LLMs": ", ".join(s.model.removesuffix(":latest") for s in e.llms),
        "conv.": str(row.conversations),
        "note": " ".join(e.note.split()),
    }


def experiment_columns(
    cells: Sequence[dict[str, str]], width: int, gap: int, *, headers: bool = False
) -> dict[str, int]:
    """The columns of an experiment list that fit in `width` cells, `gap` cells apart, and
    their widths (in display order).

    Always the star, the id prefix, the name (its first 12 characters) and the number of
    conversations; then the note's first 20 characters (at least 8); then creator, date, LLMs, roles
    while each fits; what is left widens the name, then the note: the note is cut last.
    """

    def natural(col: str) -> int:
        longest = max((cell_len(c[col]) for c in cells), default=0)
        if headers and col != "star":
            longest = max(longest, cell_len(col))
        return min(longest, _CAPS.get(col, longest))

    chosen = {"star": 2, "id": 8, "name": min(natural("name"), _NAME_MIN), "conv.": 0}
    chosen["conv."] = natural("conv.")
    used = sum(chosen.values()) + gap * (len(chosen) - 1)
    room = min(natural("note"), _NOTE_MIN, width - used - gap)
    if any(c["note"] for c in cells) and room >= _NOTE_SHORTEST:
        chosen["note"] = room
        used += gap + room
    for col in _OPTIONAL:
        if natural(col) and used + gap + natural(col) <= width:
            chosen[col] = natural(col)
            used += gap + natural(col)
    for col in ("name", "note"):
        if col in chosen:
            grow = max(min(width - used, natural(col) - chosen[col]), 0)
            chosen[col] += grow
            used += grow
    return {col: chosen[col] for col in EXPERIMENT_COLUMNS if col in chosen}


class ExperimentsTable:
    """The `experiment list` table, laid out for the width it is printed in: it always shows
    the id and the number of conversations, and drops or cuts other columns to fit."""

    def __init__(self, rows: Sequence[ExperimentRow]):
        self.cells = [experiment_cells(r) for r in rows]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # a column takes its width plus 3 (padding on both sides and a border), +1 border
        widths = experiment_columns(self.cells, options.max_width - 4, 3, headers=True)
        table = Table()
        for col, width in widths.items():
            table.add_column(
                "" if col == "star" else col,
                width=width,
                no_wrap=True,
                overflow="ellipsis",
                justify="right" if col == "conv." else "left",
            )
        for cells in self.cells:
            table.add_row(*(cells[col] for col in widths))
        yield table


def experiments_table(rows: Sequence[ExperimentRow]) -> ExperimentsTable:
    return ExperimentsTable(rows)


def conversations_table(records: Sequence[ConversationRecord]) -> Table:
    table = Table()
    factors = list(dict.fromkeys(k for r in records for k in r.spec.factors))
    # More than two factors do not fit a terminal as columns: one "levels" column, its
    # order named in the caption (e.g. yes/no/escape/bad/good).
    joined = len(factors) > 2
    level_columns = ["levels"] if joined else factors
    if joined:
        table.caption = "levels: " + "/".join(factors)
    for col in ("id", "batch", "LLM", "msgs", "days", "agents", "speaker", "rep"):
        table.add_column(col, no_wrap=True)
    for col in level_columns:
        table.add_column(col, overflow="fold")
    table.add_column("status", min_width=9)
    table.add_column("usable", min_width=6)  # the quality verdict, once completed
    for r in records:
        s = r.spec
        levels = [s.factors.get(f, "") for f in factors]
        table.add_row(
            r.id[:8],
            (r.batch_id or "")[:8],
            s.llm.label,
            f"{r.message_count}/{s.messages}",
            str(s.days),
            ",".join(f"{k}={v}" for k, v in s.agents.items()),
            s.speaker,
            str(s.repetition),
            *(["/".join(levels)] if joined else levels),
            r.status + (f": {r.error[:40]}" if r.error else ""),
            "" if r.quality is None else ("yes" if r.quality.usable else "[red]no[/]"),
        )
    return table


def batch_running(batch: BatchRecord) -> bool:
    """Is a process working on the batch right now (its lease is held and fresh)?"""
    return batch.runner_alive is True and not batch.stopped_unexpectedly


def batch_status_text(
    batch: BatchRecord, experiment_name: str | None, counts: dict[str, int], totals: BatchTotals
) -> str:
    """One line (rich markup) about a batch for `simulator status`."""
    b = batch
    state = b.status.replace("_", " ")
    if b.stopped_unexpectedly:
        state = f"stopped unexpectedly (was {state}; its process is gone)"
    done = ", ".join(f"{n:,} {s}" for s, n in sorted(counts.items())) or "none stored"
    name = escape(experiment_name) if experiment_name is not None else "(deleted experiment)"
    return (
        f"[bold]{b.id}[/] {name} ({b.experiment_id[:8]}) · {state} · {done} of "
        f"{plural(b.total, 'conversation')} · {plural(totals.messages, 'message')} · "
        f"{plural(totals.calls, 'LLM call')} · "
        f"{totals.prompt_tokens:,}/{totals.completion_tokens:,} tokens in/out · "
        f"{plural(totals.retries, 'retry', 'retries')} · ran {duration_text(b.elapsed)} · "
        f"by {escape(b.creator)} {b.created_at:%Y-%m-%d %H:%M}"
    )


class DeleteProgress:
    """A progress bar for a long delete (a terminal only, and only past a few hundred)."""

    def __init__(self, console: Console, total: int):
        self.console = console
        self.show = console.is_terminal and total >= 500
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> DeleteProgress:
        if self.show:
            self._progress = Progress(
                TextColumn("Deleting"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("conversations"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task("delete", total=total)
        self._progress.update(self._task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def duration_text(seconds: float) -> str:
    """3.2 s, 4 min 05 s, 2 h 03 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def failures_text(failures: Sequence[tuple[str, str]], *, reasons: int = 5) -> list[str]:
    """Failed conversations grouped by reason, the most common first, with example ids."""
    by_reason: dict[str, list[str]] = {}
    for conv_id, error in failures:
        by_reason.setdefault(error or "(no error recorded)", []).append(conv_id)
    groups = sorted(by_reason.items(), key=lambda item: -len(item[1]))
    lines = []
    for error, ids in groups[:reasons]:
        examples = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        lines.append(f"  {len(ids)} failed ({examples}): {error}")
    if len(groups) > reasons:
        rest = sum(len(ids) for _, ids in groups[reasons:])
        lines.append(f"  {rest} more failed for {len(groups) - reasons} other reasons")
    return lines


def closing_text(store: Store, report: BatchReport) -> str:
    """What `run` and the menus print when a batch run ends: the runner's own counts when it
    kept them all (a batch it started, issue 14), else the store's."""
    totals = report.totals if report.totals is not None else store.batch_totals(report.batch_id)
    return report_text(report, totals)


def report_text(report: BatchReport, totals: BatchTotals) -> str:
    """The summary printed when a batch run ends: counts, tokens, time, failures with reasons."""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(report.counts.items()))
    lines = [
        f"Batch {report.batch_id}: {report.status.replace('_', ' ')} — {counts} of "
        f"{plural(report.total, 'conversation')}",
        f"{plural(totals.messages, 'message')}, {plural(totals.calls, 'LLM call')}, "
        f"{totals.prompt_tokens} tokens in / {totals.completion_tokens} out, "
        f"{plural(totals.retries, 'retry', 'retries')}; this run took "
        f"{duration_text(report.elapsed)}",
    ]
    if report.unusable:
        lines.append(
            f"{plural(report.unusable, 'completed conversation')} not usable by the quality "
            f"rule: list them with `simulator conversations {report.batch_id} --where usable=false`"
        )
    if report.reason and report.reason != "interrupted":
        lines.append(f"Stopped: {report.reason}")
    lines += failures_text(report.failures)
    return "\n".join(lines)


def eta_seconds(elapsed: float, calls_done: int, calls_left: int) -> float | None:
    """Seconds until the batch ends at the rate of LLM calls so far; None before the first
    call has finished. Counting calls, not conversations, gives an estimate from the first
    reply on, even for one long conversation with a slow model."""
    if calls_done <= 0 or elapsed <= 0:
        return None
    return elapsed / calls_done * max(0, calls_left)


def rate_text(count: int, elapsed: float) -> str:
    """Messages per second with the digits that matter: 12, 3.4, 0.0097."""
    rate = count / max(elapsed, 1e-9)
    if rate >= 10:
        return f"{rate:.0f}"
    if rate >= 1:
        return f"{rate:.1f}"
    return f"{rate:.2g}"


class PullView:
    """Ollama pulls before a batch or scoring: called with (model label, bytes done, bytes
    total, status). Live: a download bar per model, started on the first report (most
    commands pull nothing) and stopped by `close()` (rich draws one live display at a time).
    Plain: a line when a model's status changes, and one per tenth of a download."""

    def __init__(self, console: Console, *, live: bool | None = None):
        self.console = console
        self.live = console.is_terminal if live is None else live
        self.lock = threading.Lock()
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._said: dict[str, tuple[str, int]] = {}  # label: (status, tenth) last printed

    def __enter__(self) -> PullView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self.lock:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None

    def __call__(self, label: str, done: int, total: int, status: str) -> None:
        with self.lock:
            if self.live:
                self._draw(label, done, total, status)
                return
            tenth = done * 10 // total if total else 0
            if self._said.get(label) != (status, tenth):
                self._said[label] = (status, tenth)
                share = f" {tenth * 10}%" if total else ""
                self.console.print(f"{label}: {status}{share}", markup=False, highlight=False)

    def _draw(self, label: str, done: int, total: int, status: str) -> None:
        from rich.progress import DownloadColumn, TransferSpeedColumn

        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=self.console,
            )
            self._progress.start()
            self._tasks = {}
        if label not in self._tasks:
            self._tasks[label] = self._progress.add_task(label, total=None)
        description = f"{label} {status}".strip()
        if total:  # a layer's download; steps without a size keep the last layer's bar
            self._progress.update(
                self._tasks[label], description=description, completed=done, total=total
            )
        else:
            self._progress.update(self._tasks[label], description=description)


@contextlib.contextmanager
def batch_views(
    console: Console, *, live: bool | None = None
) -> Iterator[tuple[PullView, Callable[[ProgressEvent], None]]]:
    """What a batch shows, in every front end: its Ollama pulls, then its progress (the
    pulls' display closes at the batch's first event)."""
    with PullView(console, live=live) as pulls, ProgressView(console, live=live) as view:

        def progress(event: ProgressEvent) -> None:
            pulls.close()  # pulls are over once the batch reports
            view(event)

        yield pulls, progress


class ProgressView:
    """Renders runner events: a live display on a terminal, one line per event otherwise.

    Live: a bar of LLM calls done/planned with conversations done/total, elapsed time and
    ETA, and a line of conversations running, messages, tokens in/out, failures, retries and
    rate; failures are printed above it as they happen. Plain: one line per finished
    conversation with the same figures, and a line when the batch starts and when it is
    stopping.
    """

    def __init__(self, console: Console, *, live: bool | None = None):
        self.console = console
        self.live = console.is_terminal if live is None else live
        self.lock = threading.Lock()
        self.total = self.done = self.failed = self.running = self.messages = 0
        self.tokens_in = self.tokens_out = self.retries = 0
        self.waiting: tuple[float, str] | None = None  # (monotonic end, why) of a retry wait
        self.calls_planned = self.calls_done = 0  # LLM calls of this run: planned, made
        self.started = time.monotonic()
        self._progress: Progress | None = None
        self._live: Live | None = None
        self._task: Any = None

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __call__(self, event: ProgressEvent) -> None:
        with self.lock:
            self._handle(event)

    def _handle(self, e: ProgressEvent) -> None:
        if e.kind == "started":
            self.total = e.remaining
            self.calls_planned = e.calls_total
            self.started = time.monotonic()
            earlier = e.total - e.remaining
            done = f" ({earlier} already done)" if earlier else ""
            if self.live:
                self._start_live()
            else:
                calls = f", {e.calls_total} LLM calls" if e.calls_total else ""
                to_run = plural(e.remaining, "conversation")
                self._line(f"batch {e.batch_id}: {to_run} to run{calls}{done}")
        elif e.kind in ("message", "summary", "selector"):
            self.messages += e.kind == "message"
            self.calls_done += 1
            self.tokens_in += e.prompt_tokens
            self.tokens_out += e.completion_tokens
        elif e.kind == "retry":
            # Counted as they happen (Reply.retries would only tell once the call succeeds).
            self.retries += 1
            if e.delay >= 1:  # a wait worth showing: the batch may look stuck meanwhile
                why = (e.error or "").splitlines()[0][:120] if e.error else "a failed call"
                self.waiting = (time.monotonic() + e.delay, why)
                if not self.live:
                    self._line(f"retrying in {e.delay:.0f} s ({why})")
        elif e.kind == "conversation_started":
            self.running += 1
            # A resumed conversation does not redo what it had stored.
            self.calls_planned = max(self.calls_done, self.calls_planned - e.calls_done)
        elif e.kind == "conversation_finished":
            self.running = max(0, self.running - 1)
            if e.status in ("completed", "failed"):
                self.done += 1
            self.failed += e.status == "failed"
            detail = f": {e.error}" if e.error else ""
            if not self.live:
                self._line(
                    f"[{self.done}/{self.total}] conversation {e.conversation_id} {e.status}"
                    f"{detail} · {self.stats()}"
                )
            elif e.status == "failed":
                self._line(f"conversation {e.conversation_id} failed{detail}")
        elif e.kind == "stopping" and e.status == "interrupted":
            self._line(
                "Stopping: no new conversations; calls in flight get a few seconds to finish "
                "(press Ctrl-C again to stop at once)."
            )
        elif e.kind == "stopping":
            self._line(f"Stopping: {e.error}. Waiting for the calls in flight.")
        if self._progress is not None:
            total, completed = self._bar()
            self._progress.update(self._task, total=total, completed=completed)

    def _bar(self) -> tuple[int, int]:
        """(total, completed) of the bar: LLM calls when they are known, else conversations."""
        if self.calls_planned:
            return max(self.calls_planned, self.calls_done), self.calls_done
        return self.total, self.done

    def eta(self) -> str:
        """Time left as text, from calls made and planned (conversations when unknown)."""
        elapsed = time.monotonic() - self.started
        if self.calls_planned:
            seconds = eta_seconds(elapsed, self.calls_done, self.calls_planned - self.calls_done)
        else:
            seconds = eta_seconds(elapsed, self.done, self.total - self.done)
        return "?" if seconds is None else duration_text(seconds)

    def stats(self) -> str:
        """Running totals: messages, tokens, failures, retries, calls, rate and ETA."""
        elapsed = time.monotonic() - self.started
        calls = f"calls {self.calls_done}/{self.calls_planned} · " if self.calls_planned else ""
        return (
            f"messages {self.messages} · tokens in {self.tokens_in} / out {self.tokens_out} · "
            f"failures {self.failed} · retries {self.retries} · {calls}"
            f"{rate_text(self.messages, elapsed)} msg/s · ETA {self.eta()}"
        )

    def _waiting_text(self) -> str:
        if self.waiting is None:
            return ""
        left = self.waiting[0] - time.monotonic()
        return f" · retrying in {left:.0f} s ({self.waiting[1]})" if left > 0 else ""

    def _line(self, text: str) -> None:
        # Printed above the live display when there is one.
        self.console.print(text, markup=False, highlight=False)

    def _start_live(self) -> None:
        what = "LLM calls" if self.calls_planned else "conversations"
        self._progress = Progress(
            TextColumn(what),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[conversations]}"),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
        )
        total, completed = self._bar()
        self._task = self._progress.add_task(
            "batch", total=total, completed=completed, conversations="", eta="?"
        )
        # Rendered by the refresh thread (4 per second): events only update counters.
        self._live = Live(
            console=self.console, refresh_per_second=4, get_renderable=self._renderable
        )
        self._live.start()

    def _renderable(self) -> Group:
        elapsed = time.monotonic() - self.started
        assert self._progress is not None
        conversations = f"· {self.done}/{self.total} conversations ·" if self.calls_planned else "·"
        self._progress.update(self._task, conversations=conversations, eta=self.eta())
        stats = Text(
            f"{self.running} running · messages {self.messages} · tokens in {self.tokens_in} / "
            f"out {self.tokens_out} · failures {self.failed} · retries {self.retries} · "
            f"{rate_text(self.messages, elapsed)} msg/s{self._waiting_text()}",
            style="dim",
        )
        return Group(self._progress, stats)


def grid_table(grid: Grid) -> Table:
    """The dimensions of a batch's grid, one row each."""
    table = Table(title="Grid")
    table.add_column("dimension")
    table.add_column("values")
    table.add_row("LLMs", ", ".join(s.label for s in grid.llms))
    # ranges, not lists: an --every-day or --every-combination grid may be huge
    table.add_row(
        "days", f"1..{grid.days} (each)" if grid.every_day and grid.days > 1 else str(grid.days)
    )
    agents = ",".join(f"{r}={n}" for r, n in grid.agents.items())
    if grid.every_combination:
        ranges = " × ".join(f"{r} 1..{n}" for r, n in grid.agents.items())
        agents = f"{ranges} ({plural(grid.combination_count(), 'combination')})"
    table.add_row("agents", agents)
    table.add_row("speaker selection", ", ".join(grid.speakers))
    for name, levels in grid.factors.items():
        table.add_row(f"factor {name}", ", ".join(levels))
    table.add_row("repetitions", str(grid.repetitions))
    table.add_row("messages per conversation", str(grid.messages))
    return table
