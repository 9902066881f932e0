"""Human annotation round trip: a sheet out (xlsx with a drop-down of the allowed answers,
or csv), the filled-in sheet back in as `human:<annotator>` scores.

A sheet's rows carry opaque item ids (`<sheet id>-<n>`); which conversation or message an
id means is kept in the database, so a blind sheet reveals nothing. An import checks every
row first and stores nothing unless all are valid; importing again replaces that
annotator's answers.
"""

from __future__ import annotations

import csv
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.errors import SheetRejected, UserError
from simulator.scoring import judge
from simulator.scoring.definition import Scorer, choose, load_scorers_file, parse_scorer
from simulator.scoring.run import scorers_for, select_conversations
from simulator.store import AnnotationSheet, Score, Store, new_id

SHEET_NAME = "annotate"
ABOUT_NAME = "about"
ITEM_ID = "item_id"
TRANSCRIPT = "transcript"
ANNOTATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


@dataclass
class ExportedSheet:
    path: Path
    sheet_id: str
    rows: int


@dataclass
class ImportedSheet:
    scorer: str
    answers: int
    blank: int


@dataclass
class _Row:
    item_id: str
    cells: dict[str, Any]
    transcript: str
    allowed: list[str]


def _check_annotator(name: str) -> str:
    name = name.strip()
    if not ANNOTATOR_RE.match(name):
        raise UserError(
            f"--annotator {name!r}: use a short name of letters, digits, '.', '_' or '-' "
            "(e.g. anna or rater2); it becomes the score source human:NAME"
        )
    return name


def export_sheet(
    store: Store,
    ref: str,
    scorer_name: str,
    annotator: str,
    out: Path,
    *,
    sample: int | None = None,
    seed: int = 0,
    blind: bool = False,
    scorers_file: Path | None = None,
    overwrite: bool = False,
) -> ExportedSheet:
    """Write the sheet for `scorer_name` over the experiment's (or batch's) conversations;
    an existing file (perhaps an annotator's filled-in sheet) only with `overwrite`."""
    annotator = _check_annotator(annotator)
    if out.exists() and not overwrite:
        raise UserError(
            f"{out} exists (it may hold an annotator's answers); nothing written. Give "
            "another --out, or add --force to replace it."
        )
    suffix = out.suffix.lower()
    if suffix not in (".xlsx", ".csv"):
        raise UserError(f"--out {out}: write a .xlsx or a .csv file")
    if sample is not None and sample < 1:
        raise UserError(f"--sample {sample}: give the number of items to draw, at least 1")
    exp, records = select_conversations(store, ref)
    extra = load_scorers_file(scorers_file) if scorers_file else []
    scorer = choose(scorers_for(exp, extra), [scorer_name])[0]
    if scorer.kind != "judge":
        raise UserError(
            f"scorer {scorer.name} is a {scorer.kind} scorer: people annotate judge scorers "
            "(answers of a declared form: choice, scale, turn or text)"
        )
    if not records:
        raise UserError("No ended conversations there to annotate (see `simulator conversations`).")
    sheet_id = new_id()
    entries: list[tuple[Any, ...]] = []
    for record, transcript in store.transcripts(records):
        messages = [m for m in transcript.messages if not m.empty]
        conditions = {
            "conversation_id": record.id,
            "llm": record.spec.llm.label,
            "agents": ", ".join(f"{k}={v}" for k, v in record.spec.agents.items()),
            "speaker_selection": record.spec.speaker,
            "repetition": record.spec.repetition,
        }
        if scorer.level == "conversation":
            entries.append((record, len(messages), "", "", judge.numbered(messages), conditions))
            continue
        roles = {r.lower() for r in scorer.roles}
        for m in messages:
            if roles and m.role.lower() not in roles:
                continue
            text = f"{m.speaker} ({m.role}): {m.content.strip()}"
            cond = conditions | {"day": m.day, "turn": m.turn}
            entries.append((record, len(messages), f"{m.day}:{m.turn}", m.role, text, cond))
    rng = random.Random(seed)
    if sample is not None and sample < len(entries):
        entries = rng.sample(entries, sample)
    if blind:
        rng.shuffle(entries)
    rows: list[_Row] = []
    items: dict[str, tuple[str, str, int, str | None, str]] = {}
    for n, (record, turns, key, role, text, cond) in enumerate(entries, start=1):
        item_id = f"{sheet_id}-{n:04d}"
        items[item_id] = (record.id, key, turns, record.batch_id, role)
        rows.append(_Row(item_id, {} if blind else cond, text, scorer.allowed(turns)))
    store.insert_sheet(
        AnnotationSheet(
            id=sheet_id,
            experiment_id=exp.id or "",
            scorer=scorer.name,
            version=scorer.version,
            annotator=annotator,
            definition=scorer.definition,
            items=items,
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if suffix == ".csv":
            _write_csv(out, scorer, rows)
        else:
            _write_xlsx(out, scorer, rows, sheet_id, annotator)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write the sheet ({e.strerror})") from None
    return ExportedSheet(out, sheet_id, len(rows))


def _columns(scorer: Scorer, rows: list[_Row]) -> list[str]:
    conditions = list(rows[0].cells) if rows else []
    return [ITEM_ID, *conditions, TRANSCRIPT, scorer.name]


def _write_csv(out: Path, scorer: Scorer, rows: list[_Row]) -> None:
    columns = _columns(scorer, rows)
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.item_id, *row.cells.values(), row.transcript, ""])


def _write_xlsx(out: Path, scorer: Scorer, rows: list[_Row], sheet_id: str, who: str) -> None:
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font
    from openpyxl.worksheet.datavalidation import DataValidation

    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = SHEET_NAME
    columns = _columns(scorer, rows)
    sheet.append(columns)
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    sheet.freeze_panes = "A2"
    answer_col = len(columns)
    letter = sheet.cell(row=1, column=answer_col).column_letter
    text_letter = sheet.cell(row=1, column=answer_col - 1).column_letter
    sheet.column_dimensions["A"].width = 20
    sheet.column_dimensions[text_letter].width = 100
    sheet.column_dimensions[letter].width = 16
    validations: dict[str, DataValidation] = {}
    for r, row in enumerate(rows, start=2):
        sheet.append([row.item_id, *row.cells.values(), row.transcript, None])
        sheet.cell(row=r, column=answer_col - 1).alignment = Alignment(
            wrap_text=True, vertical="top"
        )
        formula = '"' + ",".join(row.allowed) + '"'
        if row.allowed and len(formula) <= 255:  # Excel's limit for a list written inline
            if formula not in validations:
                dv = DataValidation(
                    type="list",
                    formula1=formula,
                    allow_blank=True,
                    showErrorMessage=True,
                    errorTitle="Not an allowed answer",
                    error=f"Choose one of: {', '.join(row.allowed)}",
                )
                sheet.add_data_validation(dv)
                validations[formula] = dv
            validations[formula].add(f"{letter}{r}")
    about = book.create_sheet(ABOUT_NAME)
    allowed = scorer.allowed(None) or (
        ["none", "or a turn number shown in the transcript"] if scorer.answer == "turn" else []
    )
    for line in (
        ("sheet", sheet_id),
        ("scorer", scorer.name),
        ("annotator", who),
        ("question", scorer.rubric),
        (
            "answer",
            judge.instructions(scorer, 0)
            if scorer.answer != "turn"
            else "the turn number where it happened, or none",
        ),  # fmt: skip
        ("allowed answers", ", ".join(allowed) or "free text"),
        ("how", f"write your answer in the column {scorer.name}; leave a row blank to skip it"),
    ):
        about.append(list(line))
    about.column_dimensions["A"].width = 18
    about.column_dimensions["B"].width = 100
    book.save(out)


# --- import ---------------------------------------------------------------------------------


def _read(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(spreadsheet row number, {column: cell}) of every non-empty data row."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the sheet you filled in (.xlsx or .csv)")
    if suffix == ".csv":
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:
                table = list(csv.reader(f))
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read it as UTF-8 csv ({e})") from None
    elif suffix == ".xlsx":
        from openpyxl import load_workbook

        try:
            book = load_workbook(path, read_only=True, data_only=True)
        except Exception as e:  # a damaged or mislabelled file: say so, no traceback
            raise UserError(f"{path}: not a readable .xlsx workbook ({e})") from None
        sheet = book[SHEET_NAME] if SHEET_NAME in book.sheetnames else book.worksheets[0]
        table = [list(r) for r in sheet.iter_rows(values_only=True)]
        book.close()
    else:
        raise UserError(f"{path}: an annotation sheet is a .xlsx or .csv file")
    if not table:
        raise SheetRejected(f"{path}: the file is empty; nothing imported")
    header = [str(c or "").strip() for c in table[0]]
    rows = []
    for n, values in enumerate(table[1:], start=2):
        cells = {h: v for h, v in zip(header, values, strict=False) if h}
        if any(v not in (None, "") for v in cells.values()):
            rows.append((n, cells))
    if ITEM_ID not in header:
        raise SheetRejected(
            f"{path}: no {ITEM_ID} column; import the sheet `simulator annotate export` wrote "
            "(keep its header row)"
        )
    return rows


def _answer(scorer: Scorer, cell: Any, turns: int) -> tuple[Any, dict[str, Any]] | str | None:
    """(value, detail), None for a blank cell, or the problem (a str) for an invalid one."""
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return None
    if isinstance(cell, float) and cell.is_integer():
        cell = int(cell)
    text = str(cell).strip()
    if scorer.answer == "text":
        return text, {}
    parsed = judge.parse(scorer, text, turns)
    if not parsed.valid:
        allowed = scorer.allowed(turns)
        shown = ", ".join(allowed) if len(allowed) <= 12 else f"none or 1 to {turns}"
        return f"{text!r} is not an allowed answer (allowed: {shown})"
    return parsed.value, parsed.detail


def import_sheet(store: Store, path: Path, annotator: str) -> ImportedSheet:
    """Check every row, then store all answers (replacing the annotator's earlier ones)."""
    annotator = _check_annotator(annotator)
    rows = _read(path)
    ids = [str(cells.get(ITEM_ID) or "").strip() for _, cells in rows]
    # The sheet most rows name: a row edited or pasted from another sheet is then one
    # row-level problem among the others, not a refusal of the whole file.
    sheet_ids = Counter(i.split("-", 1)[0] for i in ids if re.fullmatch(r"[0-9a-f]{12}-\d{4}", i))
    sheet: AnnotationSheet | None = None
    if sheet_ids:
        sheet = store.get_sheet(sheet_ids.most_common(1)[0][0])
    if sheet is None:
        raise SheetRejected(
            f"{path}: its item ids belong to no sheet exported by `simulator annotate export`; "
            f"nothing imported. Import the file as exported, with its {ITEM_ID} column unchanged."
        )
    if sheet.annotator and sheet.annotator != annotator:
        raise SheetRejected(
            f"{path}: this sheet was exported for {sheet.annotator!r}, not {annotator!r}; "
            f"nothing imported (importing replaces {annotator}'s earlier answers). Import it "
            f"with --annotator {sheet.annotator}, or export a sheet for {annotator}."
        )
    scorer = parse_scorer(sheet.scorer, sheet.definition, f"sheet {sheet.id}")
    problems: list[str] = []
    seen: dict[str, int] = {}
    scores: list[Score] = []
    blank = 0
    header_ok = any(scorer.name in cells for _, cells in rows) or not rows
    if not header_ok:
        raise SheetRejected(
            f"{path}: no answer column {scorer.name!r}; nothing imported. Write the answers "
            "in the column the sheet was exported with."
        )
    stored = store.existing_conversations(v[0] for v in sheet.items.values())
    for (n, cells), item_id in zip(rows, ids, strict=True):
        where = f"row {n}" + (f" (item {item_id})" if item_id else "")
        if not item_id:
            problems.append(f"{where}: no {ITEM_ID}")
            continue
        if item_id not in sheet.items:
            problems.append(f"{where}: unknown {ITEM_ID} {item_id!r}")
            continue
        if item_id in seen:
            problems.append(f"{where}: the same {ITEM_ID} as row {seen[item_id]}")
            continue
        seen[item_id] = n
        conv_id, key, turns, batch_id, role = sheet.items[item_id]
        if conv_id not in stored:
            problems.append(f"{where}: its conversation {conv_id} was deleted since the export")
            continue
        answer = _answer(scorer, cells.get(scorer.name), turns)
        if answer is None:
            blank += 1
            continue
        if isinstance(answer, str):
            problems.append(f"{where}: {answer}")
            continue
        value, detail = answer
        scores.append(
            Score(
                conversation_id=conv_id,
                message=key,
                scorer=scorer.name,
                version=sheet.version,
                source=f"human:{annotator}",
                value=value,
                raw=str(cells.get(scorer.name)).strip(),
                detail=detail,
                experiment_id=sheet.experiment_id,
                batch_id=batch_id,
                role=role,
            )
        )
    if problems:
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise SheetRejected(
            f"{path}: nothing imported; {len(problems)} row(s) to fix, then import again:\n  "
            + "\n  ".join(shown)
            + more
        )
    store.replace_scores(scores)
    return ImportedSheet(scorer.name, len(scores), blank)
