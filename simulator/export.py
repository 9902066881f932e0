"""Conversations out of the database: txt for reading, jsonl/csv for analysis, html to browse.

An export takes one experiment, one batch or one conversation. Every format names the
experiment's folder `<experiment name>-<id prefix>` under the chosen output directory:

    txt    <exp>/<model>/<conversation>.txt    the prototype's `[Day N] Speaker: ...` layout
           <exp>/prompts/<role>.txt            each role's composed prompt (tags unfilled);
           <exp>/prompts/<levels>/<role>.txt   with factors, one folder per combination of
                                               levels the exported conversations have
           <exp>/conversations.csv             which file (and prompts folder) holds which
                                               condition, with the conversation's scores
    jsonl  <exp>/<kind>-<id>.jsonl              one row per message and per summary, every
    csv    <exp>/<kind>-<id>.csv                condition as a column (see ROW_COLUMNS)
    html   <exp>/<conversation>.html           self-contained pages (no network at all)
           <exp>/index.html                    the conditions in a sortable table, linking them

Rows are streamed: a batch of thousands of conversations never sits in memory at once.
Scores (issue 11) add columns `score_<scorer>` (or one per source with `scores="all"`); which
value a column holds is decided in simulator/scoring/views.py.
"""

from __future__ import annotations

import csv
import html
import json
import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from simulator import display, prompts
from simulator.conversation import (
    EXTRA_ATTEMPTS,
    RESEARCHER,
    Message,
    SelectorCall,
    Summary,
    Transcript,
    day_opening,
)
from simulator.errors import NotFoundError, UserError
from simulator.experiment import Experiment, ModelSpec, apply_levels
from simulator.export_kinds import FORMATS, KINDS
from simulator.quality import MESSAGE_FLAGS
from simulator.scoring.views import (
    ConversationCells,
    ScoreColumns,
    cell,
    mean,
    newest_per_source,
    shown_value,
)
from simulator.store import BatchRecord, ConversationRecord, Score, Store

SAMPLING = ("temperature", "top_k", "top_p", "seed", "context_length", "max_tokens")
SUMMARIZER = "Summarizer"
MESSAGE_COLUMNS = (
    "kind", "day", "turn", "speaker", "role", "content", "raw", "empty",
    "prompt_tokens", "completion_tokens", "latency", "retries", "calls",
    # quality (simulator/quality): the provider's finish reason, the flags as one
    # comma-separated cell, and one true/false column per flag
    "finish_reason", "flags", *(f"flag_{f}" for f in MESSAGE_FLAGS),
)  # fmt: skip
# Distinct on white and readable as text; roles past the tenth get generated hues.
PALETTE = (
    "#1f77b4", "#c2185b", "#2e7d32", "#e65100", "#6a1b9a",
    "#00838f", "#8d6e63", "#ad1457", "#283593", "#558b2f",
)  # fmt: skip


@dataclass
class Selection:
    """What one export covers: an experiment, one of its batches, or one conversation."""

    kind: str  # experiment | batch | conversation
    experiment: Experiment
    conversations: list[ConversationRecord]
    batch: BatchRecord | None = None

    @property
    def id(self) -> str:
        if self.kind == "batch":
            assert self.batch is not None
            return self.batch.id
        if self.kind == "conversation":
            return self.conversations[0].id
        return self.experiment.id or ""


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    conversations: int = 0
    rows: int = 0


# --- choosing what to export ------------------------------------------------------------


def select(
    store: Store, ref: str, kind: str | None = None, where: dict[str, str] | None = None
) -> Selection:
    """Resolve an id prefix as an experiment, a batch or a conversation (`kind` forces one),
    or an experiment's name;
    `where` keeps the conversations with those conditions (`--where`, factors included)."""
    if kind is not None and kind not in KINDS:
        raise UserError(f"--kind {kind!r}: choose experiment, batch or conversation.")
    if not re.fullmatch(r"[0-9a-fA-F]{1,24}", ref.strip()) and kind in (None, "experiment"):
        _, exp, _ = store.find_experiment_or_batch(ref)  # an experiment's name
        assert exp.id is not None
        return _select_kind(store, exp.id, "experiment", where or {})
    if not re.fullmatch(r"[0-9a-fA-F]{1,24}", ref.strip()):
        raise UserError(
            f"'{ref}' is not an id: ids are hexadecimal, e.g. 3f2a9c01b7de. Find them with "
            "`simulator experiment list`, `simulator status` or `simulator conversations EXPERIMENT`."
        )
    found: dict[str, Selection] = {}
    errors: dict[str, NotFoundError] = {}
    for k in [kind] if kind else KINDS:
        try:
            found[k] = _select_kind(store, ref, k, where or {})
        except NotFoundError as e:
            errors[k] = e
    if len(found) > 1:
        kinds = " and a ".join(found)
        raise UserError(
            f"'{ref}' starts the ids of a {kinds}: type more characters of the id, "
            f"or say which with --kind {next(iter(found))}."
        )
    if found:
        return next(iter(found.values()))
    if kind:
        raise errors[kind]
    for problem in errors.values():
        if "more than one" in str(problem):  # ambiguous within one kind: its message says so
            raise problem
    raise NotFoundError(
        f"No experiment, batch or conversation has an id starting with '{ref}'. Find them with "
        "`simulator experiment list`, `simulator status` or `simulator conversations EXPERIMENT`."
    )


def _select_kind(store: Store, ref: str, kind: str, where: dict[str, str]) -> Selection:
    if kind == "experiment":
        exp = store.get_experiment(ref)
        found = store.list_conversations(
            experiment_id=exp.id, where=where, factors=exp.factor_levels(), message_counts=False
        )
        return Selection(kind, exp, found)
    if kind == "batch":
        batch = store.get_batch(ref)
        exp = store.get_experiment(batch.experiment_id)
        found = store.list_conversations(
            batch_id=batch.id, where=where, factors=exp.factor_levels(), message_counts=False
        )
        return Selection(kind, exp, found, batch)
    record = store.get_conversation(ref)
    if where:
        raise UserError(
            f"{ref} is one conversation: --where filters the conversations of an experiment "
            "or a batch; give one of those, or leave --where out."
        )
    return Selection(kind, store.get_experiment(record.experiment_id), [record])


# --- one entry point ---------------------------------------------------------------------


def export(
    store: Store,
    ref: str,
    fmt: str,
    out_dir: str | Path,
    *,
    kind: str | None = None,
    scores: str = "one",
) -> ExportResult:
    """Export an experiment, batch or conversation (by id prefix) in one format.
    `scores`: one column per scorer ("one"), per scorer and source ("all"), or none."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    return export_selection(store, select(store, ref, kind), fmt, Path(out_dir), scores)


def export_selection(
    store: Store, sel: Selection, fmt: str, out_dir: Path, scores: str = "one"
) -> ExportResult:
    folder = out_dir / experiment_folder(sel.experiment)
    score_columns = ScoreColumns.for_experiment(store, sel.experiment, scores)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if fmt == "txt":
            return export_txt(store, sel, folder, score_columns)
        if fmt == "html":
            return export_html(store, sel, folder)
        path = folder / f"{sel.kind}-{sel.id}.{fmt}"
        rows = export_rows(store, sel, score_columns)
        count = (
            write_jsonl(rows, path)
            if fmt == "jsonl"
            else write_csv(rows, path, columns(sel.experiment) + score_columns.names)
        )
        return ExportResult([path], len(sel.conversations), count)
    except OSError as e:
        raise UserError(f"Cannot write the export into {out_dir}: {e.strerror or e}.") from None


def safe_name(text: str) -> str:
    """A file-name-safe version of `text` (letters, digits, `.`, `-`, `_`)."""
    return re.sub(r"[^\w.-]+", "_", text).strip("._") or "_"


def experiment_folder(exp: Experiment) -> str:
    return f"{safe_name(exp.name)}-{(exp.id or '')[:8]}"


# --- rows: jsonl and csv -----------------------------------------------------------------


def columns(exp: Experiment) -> list[str]:
    """Every column of a jsonl/csv export, in order: the conditions, then the message."""
    return [
        "experiment_id", "experiment_name", "batch_id", "conversation_id", "conversation_index",
        "creator", "llm", "provider", "model",
        *("llm_seed" if k == "seed" else k for k in SAMPLING), "repeat_penalty",
        "days", "messages", *(f"agents_{r.name}" for r in exp.roles), "agents_total",
        "speaker_selection", "repetition", "seed", "status", "usable",
        *(f"factor_{f.name}" for f in exp.factors),
        *MESSAGE_COLUMNS,
    ]  # fmt: skip


def llm_condition(exp: Experiment, llm: ModelSpec) -> str:
    """The `llm` condition: its label, with its sampling when the experiment lists the same
    model more than once (two temperatures of one model are two conditions, not one)."""
    if sum(1 for other in exp.llms if other.label == llm.label) < 2:
        return llm.label
    sampling = ", ".join(f"{k}={v}" for k, v in llm.sampling().items())
    return f"{llm.label} ({sampling})" if sampling else llm.label


def conditions(exp: Experiment, rec: ConversationRecord) -> dict[str, Any]:
    """The condition columns of one conversation."""
    spec = rec.spec
    row: dict[str, Any] = {
        "experiment_id": exp.id,
        "experiment_name": exp.name,
        "batch_id": rec.batch_id,
        "conversation_id": rec.id,
        "conversation_index": rec.index,
        "creator": rec.creator,
        "llm": llm_condition(exp, spec.llm),
        "provider": spec.llm.provider,
        "model": spec.llm.model,
    }
    for key in SAMPLING:
        row["llm_seed" if key == "seed" else key] = getattr(spec.llm, key)
    row["repeat_penalty"] = spec.llm.extra.get("repeat_penalty")
    row["days"] = spec.days
    row["messages"] = spec.messages
    for role in exp.roles:
        row[f"agents_{role.name}"] = spec.agents.get(role.name, 0)
    row["agents_total"] = sum(spec.agents.values())
    row["speaker_selection"] = spec.speaker
    row["repetition"] = spec.repetition
    row["seed"] = spec.seed
    row["status"] = rec.status
    row["usable"] = rec.quality.usable if rec.quality is not None else None
    for factor in exp.factors:
        row[f"factor_{factor.name}"] = spec.factors.get(factor.name)
    return row


def transcript_rows(
    exp: Experiment, rec: ConversationRecord, t: Transcript, scores: ConversationCells | None = None
) -> Iterator[dict]:
    """One row per message, then after each day's messages one row for its summary;
    `scores`: the conversation's score cells, added after the message columns."""
    base = conditions(exp, rec)
    summaries = {s.day: s for s in t.summaries}
    days = sorted({m.day for m in t.messages} | set(summaries))
    for day in days:
        today = [m for m in t.messages if m.day == day]
        for m in today:
            yield base | _message_fields("message", m.day, m.turn, m.speaker, m.role, m.content,
                                         m.raw, m.empty, m.usage) | _flag_fields(m) | (
                scores.message(f"{m.day}:{m.turn}") if scores else {})  # fmt: skip
        if day in summaries:
            s = summaries[day]
            # After the day's last turn, so sorting by (day, turn) keeps the reading order.
            turn = max((m.turn for m in today), default=0) + 1
            yield base | _message_fields("summary", day, turn, SUMMARIZER, "summarizer",
                                         s.content, None, not s.content, s.usage
                                         ) | _flag_fields(s) | (
                scores.message(None) if scores else {})  # fmt: skip


def _message_fields(
    kind: str, day: int, turn: int, speaker: str, role: str, content: str,
    raw: str | None, empty: bool, usage: Any,
) -> dict[str, Any]:  # fmt: skip
    return {
        "kind": kind,
        "day": day,
        "turn": turn,
        "speaker": speaker,
        "role": role,
        "content": content,
        "raw": raw,
        "empty": empty,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "latency": float(usage.latency),
        "retries": usage.retries,
        "calls": usage.calls,
    }


def _flag_fields(item: Message | Summary) -> dict[str, Any]:
    return {
        "finish_reason": item.finish_reason,
        "flags": ",".join(item.flags),
        **{f"flag_{f}": f in item.flags for f in MESSAGE_FLAGS},
    }


def export_rows(store: Store, sel: Selection, scores: ScoreColumns | str = "one") -> Iterator[dict]:
    """Every row of a jsonl/csv export: the columns of `columns()`, then the score columns."""
    if isinstance(scores, str):
        scores = ScoreColumns.for_experiment(store, sel.experiment, scores)
    # Transcripts are read a chunk of conversations at a time, not one query per conversation.
    for rec, t, found in scored_transcripts(store, sel.conversations, bool(scores.columns)):
        yield from transcript_rows(sel.experiment, rec, t, scores.cells(found))


def scored_transcripts(
    store: Store, records: list[ConversationRecord], with_scores: bool = True, chunk: int = 50
) -> Iterator[tuple[ConversationRecord, Transcript, list[Score]]]:
    """Each record with its transcript and its scores: one scores query per `chunk`
    transcripts, in whatever order the store yields them."""
    pending: list[tuple[ConversationRecord, Transcript]] = []

    def flush() -> Iterator[tuple[ConversationRecord, Transcript, list[Score]]]:
        found = store.scores_of(r.id for r, _ in pending) if with_scores else {}
        for rec, t in pending:
            yield rec, t, found.get(rec.id, [])
        pending.clear()

    for pair in store.transcripts(records):
        pending.append(pair)
        if len(pending) >= chunk:
            yield from flush()
    yield from flush()


def write_jsonl(rows: Iterable[dict], path: Path) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def write_csv(rows: Iterable[dict], path: Path, fieldnames: list[str]) -> int:
    n = 0
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
            n += 1
    return n


# --- txt: the prototype's layout ---------------------------------------------------------


def transcript_text(exp: Experiment, rec: ConversationRecord, t: Transcript) -> str:
    """`[Day N] Speaker: text` blocks: each day's starting message, the agents, the summary."""
    start = prompts.starting_message(exp, rec.spec.agents, rec.spec.factors)
    summaries = {s.day: s for s in t.summaries}
    blocks: list[str] = []
    for day in range(1, rec.spec.days + 1):
        today = [m for m in t.messages if m.day == day]
        if not today and day not in summaries:
            break  # the conversation stopped before this day
        blocks.append(f"[Day {day}] {RESEARCHER}: {day_opening(start, t.summaries, day)}")
        blocks += [f"[Day {day}] {m.speaker}: {m.content}" for m in today]
        if day in summaries:
            blocks.append(f"[Day {day}] {SUMMARIZER}: {summaries[day].content}")
    return "\n\n".join(blocks) + "\n"


def prompts_folder(exp: Experiment, levels: dict[str, str]) -> str:
    """Where txt puts the prompts of a conversation with these factor levels (relative)."""
    if not exp.factors:
        return "prompts"
    combo = "__".join(f"{f.name}-{levels.get(f.name, '')}" for f in exp.factors)
    return f"prompts/{safe_name(combo)}"


def write_prompts(exp: Experiment, levels: dict[str, str], folder: Path) -> list[Path]:
    """Each role's composed prompt and the summarizer's (tags unfilled) under these levels."""
    exp = apply_levels(exp, levels)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for role in exp.roles:
        text = prompts.compose([*role.sections.items(), *exp.shared_sections.items()])
        files.append(_write(folder / f"{safe_name(role.name)}.txt", text + "\n"))
    if exp.summarizer.sections:
        text = prompts.compose(list(exp.summarizer.sections.items()))
        files.append(_write(folder / "summarizer.txt", text + "\n"))
    return files


def export_txt(
    store: Store, sel: Selection, folder: Path, scores: ScoreColumns | None = None
) -> ExportResult:
    result = ExportResult(conversations=len(sel.conversations))
    exp = sel.experiment
    scores = scores or ScoreColumns([])
    written: set[str] = set()  # prompt folders, one per combination of factor levels
    listing = []
    for rec, t, found in scored_transcripts(store, sel.conversations, bool(scores.columns)):
        where = prompts_folder(exp, rec.spec.factors)
        if where not in written:
            written.add(where)
            result.files += write_prompts(exp, rec.spec.factors, folder / where)
        path = folder / safe_name(rec.spec.llm.model) / f"{rec.id}.txt"
        path.parent.mkdir(exist_ok=True)
        result.files.append(_write(path, transcript_text(exp, rec, t)))
        listing.append(
            {"file": str(path.relative_to(folder)), "prompts": where}
            | conditions(exp, rec)
            | scores.cells(found).conversation()
        )
    if listing:
        # Annotators get the bare transcripts; this joins their files back to the conditions.
        # Exporting batch after batch into one folder adds up: rows of files still there
        # from an earlier export are kept (as the html index does).
        index = folder / "conversations.csv"
        fields = list(listing[0])
        new = {row["file"] for row in listing}
        if index.is_file():
            with index.open(encoding="utf-8", newline="") as f:
                earlier = [
                    row
                    for row in csv.DictReader(f)
                    if row.get("file") not in new and (folder / str(row.get("file"))).is_file()
                ]
            fields = list(dict.fromkeys([*fields, *(k for row in earlier for k in row)]))
            listing = earlier + listing
        write_csv(listing, index, fields)
        result.files.append(index)
    return result


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- html --------------------------------------------------------------------------------


def role_colours(roles: Iterable[str]) -> dict[str, str]:
    """A CSS colour per role, in role order: the palette, then evenly spread darker hues."""
    return display.role_colours(roles, PALETTE, lightness=0.38)


def _asset(name: str) -> str:
    return resources.files("simulator").joinpath("data").joinpath(name).read_text(encoding="utf-8")


def _page(title: str, body: str, script: str = "") -> str:
    return string.Template(_asset("page.html")).substitute(
        title=html.escape(title), style=_asset("viewer.css"), body=body, script=script
    )


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def conversation_html(
    exp: Experiment, rec: ConversationRecord, t: Transcript, scores: list[Score] | None = None
) -> str:
    """One self-contained page: conditions, scores, agents, days, summaries, role colours."""
    roles = [r.name for r in exp.roles]
    roles += sorted({m.role for m in t.messages} - set(roles))
    colours = role_colours(roles)
    css_class = {role: f"role-{i}" for i, role in enumerate(roles)}
    style = "".join(f".{css_class[r]}{{--role:{c}}}" for r, c in colours.items())
    cond = conditions(exp, rec)
    parts = [
        f"<style>{style}</style>",
        '<nav><a href="index.html">&larr; all conversations of this experiment</a></nav>',
        f"<h1>{_e(exp.name)} <small>conversation {_e(rec.id)}</small></h1>",
        _conditions_table(cond),
    ]
    if rec.error:
        parts.append(f'<p class="error">Error: {_e(rec.error)}</p>')
    if rec.quality is not None:
        verdict = "usable" if rec.quality.usable else "unusable"
        parts.append(f'<p class="quality {verdict}">Quality: {_e(rec.quality.line())}</p>')
    shown = newest_per_source(scores or [])
    by_message: dict[str, list[Score]] = {}
    for score in shown:
        by_message.setdefault(score.message, []).append(score)
    if shown:
        parts.append(_scores_html(shown))
    calls: dict[tuple[int, int], list[SelectorCall]] = {}
    for c in t.selector_calls:
        calls.setdefault((c.day, c.turn), []).append(c)
    agents = "".join(
        f'<li class="agent {css_class.get(a.role, "")}" data-role="{_e(a.role)}">'
        f'<span class="speaker">{_e(a.name)}</span> <span class="role">{_e(a.role)}</span></li>'
        for a in rec.agents
    )
    parts.append(f'<h2>Agents</h2><ul class="agents">{agents}</ul>')
    start = prompts.starting_message(exp, rec.spec.agents, rec.spec.factors)
    summaries = {s.day: s for s in t.summaries}
    for day in range(1, rec.spec.days + 1):
        today = [m for m in t.messages if m.day == day]
        if not today and day not in summaries:
            break
        parts.append(f'<section class="day" id="day-{day}" data-day="{day}"><h2>Day {day}</h2>')
        parts.append(_message_html(RESEARCHER, "researcher", "researcher", start, None, False))
        if day > 1:  # what the agents were given, without repeating the summaries above
            earlier = (
                "the summary of day 1" if day == 2 else f"the summaries of days 1 to {day - 1}"
            )
            parts.append(f'<p class="hint">followed by {earlier}</p>')
        for m in today:
            if (m.day, m.turn) in calls:
                parts.append(_selector_html(calls[(m.day, m.turn)], m.speaker))
            parts.append(_message_html(m.speaker, m.role, css_class.get(m.role, ""), m.content,
                                       m.raw, m.empty, m,
                                       by_message.get(f"{m.day}:{m.turn}")))  # fmt: skip
        if day in summaries:
            parts.append(_summary_html(summaries[day]))
        parts.append("</section>")
    return _page(f"{exp.name} · {rec.id}", "\n".join(parts))


def _conditions_table(cond: dict[str, Any]) -> str:
    items = "".join(
        f'<div data-key="{_e(k)}"><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>'
        for k, v in cond.items()
        if v is not None
    )
    return f'<dl class="conditions">{items}</dl>'


def _message_html(
    speaker: str, role: str, css: str, content: str, raw: str | None, empty: bool,
    m: Message | None = None, scores: list[Score] | None = None,
) -> str:  # fmt: skip
    text = '<span class="empty">(empty reply)</span>' if empty else _e(content)
    turn = f' data-turn="{m.turn}"' if m else ""
    extra = ""
    if raw is not None:
        extra = f'<details class="raw"><summary>raw reply</summary><pre>{_e(raw)}</pre></details>'
    flags = _flags_html(m.flags) if m else ""
    if m and m.flags:
        css += " flagged"
        turn += f' data-flags="{_e(",".join(m.flags))}"'
    return (
        f'<div class="message {css}" data-speaker="{_e(speaker)}" data-role="{_e(role)}"{turn}>'
        f'<div class="speaker">{_e(speaker)}{flags}</div><div class="content">{text}</div>'
        f"{_message_scores_html(scores or [])}{extra}</div>"
    )


def _score_title(score: Score) -> str:
    when = f"{score.created_at:%Y-%m-%d %H:%M}" if score.created_at else ""
    return f"{score.source} · version {score.version[:8]} · {when}".strip(" ·")


def _scores_html(scores: list[Score]) -> str:
    """The conversation's scores in a table by source: conversation-level ones with their
    value; message-level ones as how many messages they scored (each is beside its message)."""
    rows: list[str] = []
    per_message: dict[tuple[str, str], list[Score]] = {}
    for s in scores:
        if s.message:
            per_message.setdefault((s.source, s.scorer), []).append(s)
            continue
        css = "" if s.valid else ' class="invalid"'
        rows.append(
            f'<tr data-scorer="{_e(s.scorer)}" data-source="{_e(s.source)}" data-level='
            f'"conversation"><td>{_e(s.source)}</td><td>{_e(s.scorer)}</td>'
            f"<td{css}>{_e(shown_value(s))}</td><td>{_e(s.version[:8])}</td></tr>"
        )
    for (source, scorer), found in sorted(per_message.items()):
        average = mean(cell(s) for s in found)
        value = f"{len(found)} messages" + (f", mean {average:g}" if average is not None else "")
        rows.append(
            f'<tr data-scorer="{_e(scorer)}" data-source="{_e(source)}" data-level="message">'
            f"<td>{_e(source)}</td><td>{_e(scorer)}</td><td>{_e(value)} (per message, "
            f"below)</td><td>{_e(found[0].version[:8])}</td></tr>"
        )
    return (
        '<h2>Scores</h2><table class="scores"><thead><tr><th>source</th><th>scorer</th>'
        f"<th>value</th><th>version</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _message_scores_html(scores: list[Score]) -> str:
    if not scores:
        return ""
    items = "".join(
        f'<li class="score{"" if s.valid else " invalid"}" data-scorer="{_e(s.scorer)}" '
        f'data-source="{_e(s.source)}" title="{_e(_score_title(s))}">'
        f"{_e(s.scorer)} <b>{_e(shown_value(s))}</b> <small>{_e(s.source)}</small></li>"
        for s in scores
    )
    return f'<ul class="scores">{items}</ul>'


def _flags_html(flags: list[str]) -> str:
    return "".join(f' <span class="flag flag-{_e(f)}">{_e(f)}</span>' for f in flags)


def _selector_html(calls: list[SelectorCall], spoke: str) -> str:
    """The selector calls of one turn, folded: a click shows each answer and its outcome."""
    items = "".join(
        f"<li><q>{_e(c.answer)}</q> &rarr; "
        + (f"chose {_e(c.chosen)}" if c.chosen else '<span class="invalid">invalid</span>')
        + "</li>"
        for c in calls
    )
    fell_back = len(calls) == 1 + EXTRA_ATTEMPTS and all(c.chosen is None for c in calls)
    outcome = f"fell back to round robin: {_e(spoke)}" if fell_back else f"chose {_e(spoke)}"
    css = "selector fallback" if fell_back else "selector"
    return (
        f'<details class="{css}"><summary>speaker selection: {len(calls)} call(s), '
        f"{outcome}</summary><ol>{items}</ol></details>"
    )


def _summary_html(s: Summary) -> str:
    css = "summary flagged" if s.flags else "summary"
    return (
        f'<aside class="{css}" data-day="{s.day}"><h3>Summary of day {s.day}'
        f"{_flags_html(s.flags)}</h3>"
        f'<div class="content">{_e(s.content)}</div></aside>'
    )


INDEX_COLUMNS = (
    ("conversation", "text"), ("batch", "text"), ("LLM", "text"), ("sampling", "text"),
    ("days", "number"), ("messages", "number"), ("agents", "text"), ("speaker", "text"),
    ("repetition", "number"), ("seed", "number"), ("status", "text"), ("created", "text"),
    ("usable", "text"),
)  # fmt: skip


def index_html(exp: Experiment, records: list[ConversationRecord]) -> str:
    """The experiment's conversations with their conditions, in a table sortable by column."""
    factor_columns = [(f"factor_{f.name}", "text") for f in exp.factors]
    head = "".join(
        f'<th data-key="{name}" data-type="{kind}" tabindex="0">{name}</th>'
        for name, kind in (*INDEX_COLUMNS, *factor_columns)
    )
    body = []
    for rec in records:
        s = rec.spec
        sampling = ", ".join(f"{k}={v}" for k, v in s.llm.sampling().items())
        agents = ", ".join(f"{r}={n}" for r, n in s.agents.items())
        created = f"{rec.created_at:%Y-%m-%d %H:%M}" if rec.created_at else ""
        cells = [
            (rec.id, f'<a href="{rec.id}.html">{rec.id}</a>'),
            (rec.batch_id or "", _e(rec.batch_id or "")),
            (s.llm.label, _e(s.llm.label)),
            (sampling, _e(sampling)),
            (s.days, s.days),
            (s.messages, f"{rec.message_count}/{s.messages}"),
            (agents, _e(agents)),
            (s.speaker, _e(s.speaker)),
            (s.repetition, s.repetition),
            (s.seed, s.seed),
            (rec.status, _e(rec.status)),
            (created, created),
            _usable_cell(rec),
        ]
        for f in exp.factors:
            level = s.factors.get(f.name, "")
            cells.append((level, _e(level)))
        tds = "".join(f'<td data-value="{_e(v)}">{shown}</td>' for v, shown in cells)
        body.append(f'<tr data-id="{rec.id}">{tds}</tr>')
    about = f"{len(records)} conversation(s) · created by {exp.creator or '?'}"
    if exp.note:
        about += f" · {exp.note}"
    page = (
        f"<h1>{_e(exp.name)} <small>experiment {_e(exp.id)}</small></h1><p>{_e(about)}</p>"
        '<p class="hint">Click a column title to sort by it; click again to reverse.</p>'
        f'<table id="conversations" class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
    return _page(f"{exp.name} · conversations", page, _asset("sort.js"))


def _usable_cell(rec: ConversationRecord) -> tuple[str, str]:
    q = rec.quality
    if q is None:
        return "", ""
    if q.usable:
        return "yes", "yes"
    return "no", f'<span class="unusable" title="{_e("; ".join(q.reasons))}">no</span>'


def export_html(store: Store, sel: Selection, folder: Path) -> ExportResult:
    result = ExportResult(conversations=len(sel.conversations))
    for rec, t, scores in scored_transcripts(store, sel.conversations):
        page = conversation_html(sel.experiment, rec, t, scores)
        result.files.append(_write(folder / f"{rec.id}.html", page))
    # The index lists every page in the folder, so exporting batch after batch adds up.
    exported = [
        rec
        for rec in store.list_conversations(experiment_id=sel.experiment.id)
        if (folder / f"{rec.id}.html").is_file()
    ]
    result.files.append(_write(folder / "index.html", index_html(sel.experiment, exported)))
    return result
