"""Human annotation round trip (issue 11): export a sheet, fill it in, import it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from openpyxl import load_workbook
from typer.testing import CliRunner

from simulator.cli import app
from simulator.errors import SheetRejected
from simulator.experiment import load_experiment
from simulator.grid import make_grid
from simulator.runner import RunOptions, start_batch
from simulator.scoring.annotation import export_sheet, import_sheet
from simulator.store import Store
from tests.scenarios import PRISON_ONE

ROOT = Path(__file__).resolve().parent.parent
SCORERS = ROOT / "experiments" / "prison-scorers.yaml"


@pytest.fixture
def stored(db):
    """Four scripted prison conversations of 6 messages."""
    store = Store.open(db, "alice")
    exp = store.insert_experiment(load_experiment(PRISON_ONE))
    grid = make_grid(
        exp, llms=["scripted"], messages=6, days=1, agents="guard=1,prisoner=2",
        speakers=["round_robin"], repetitions=4,
    )  # fmt: skip
    assert start_batch(store, exp, grid, RunOptions()).status == "completed"
    return store, exp


def write_sheet(out: Path, rows: list[dict]) -> None:
    """The sheet as an annotator saves it after filling it in."""
    with out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def humans(store: Store) -> list:
    return [s for s in store.list_scores() if s.source.startswith("human:")]


def test_xlsx_round_trip_with_a_drop_down_and_reimport_replaces(db, stored, tmp_path):
    store, exp = stored
    out = tmp_path / "anna.xlsx"
    sheet = export_sheet(store, exp.id, "goal_achieved", "anna", out, scorers_file=SCORERS)
    assert sheet.rows == 4
    book = load_workbook(out)
    ws = book["annotate"]
    header = [c.value for c in ws[1]]
    assert header[0] == "item_id" and header[-2:] == ["transcript", "goal_achieved"]
    assert "llm" in header and "conversation_id" in header
    formulas = [dv.formula1 for dv in ws.data_validations.dataValidation]
    assert formulas == ['"Yes,No,NotTried"']
    cells = str(ws.data_validations.dataValidation[0].sqref)
    letter = ws.cell(row=1, column=len(header)).column_letter
    assert all(f"{letter}{r}" in cells for r in range(2, 6)), cells  # the answer column
    assert "[Turn 1]" in ws.cell(row=2, column=len(header) - 1).value
    answers = ["Yes", "no", "NotTried", None]  # case is forgiven, a blank row skipped
    for r, answer in enumerate(answers, start=2):
        ws.cell(row=r, column=len(header), value=answer)
    book.save(out)

    result = import_sheet(store, out, "anna")
    assert (result.answers, result.blank) == (3, 1)
    scores = humans(store)
    assert sorted(s.value for s in scores) == ["No", "NotTried", "Yes"]
    assert {s.source for s in scores} == {"human:anna"}
    assert {s.experiment_id for s in scores} == {exp.id}

    ws.cell(row=2, column=len(header), value="No")
    ws.cell(row=5, column=len(header), value="Yes")
    book.save(out)
    again = import_sheet(store, out, "anna")
    assert again.answers == 4
    scores = humans(store)
    assert len(scores) == 4  # replaced, never duplicated
    assert sorted(s.value for s in scores) == ["No", "No", "NotTried", "Yes"]
    assert db["scores"].count_documents({}) == 4


def test_a_sheet_with_bad_rows_is_refused_naming_them_and_nothing_is_stored(
    db, stored, tmp_path, settings, env_for
):
    store, exp = stored
    out = tmp_path / "ben.csv"
    export_sheet(store, exp.id, "goal_achieved", "ben", out, scorers_file=SCORERS)
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert list(rows[0]) == ["item_id", "conversation_id", "llm", "agents", "speaker_selection",
                             "repetition", "transcript", "goal_achieved"]  # fmt: skip
    for row, answer in zip(rows, ["Yes", "Maybe", "No", "No"], strict=True):
        row["goal_achieved"] = answer
    rows[3]["item_id"] = rows[3]["item_id"][:-4] + "9999"
    write_sheet(out, rows)
    with pytest.raises(SheetRejected) as info:
        import_sheet(store, out, "ben")
    message = str(info.value)
    assert "nothing imported; 2 row(s)" in message
    assert "row 3" in message and "'Maybe' is not an allowed answer" in message
    assert "row 5" in message and "unknown item_id" in message
    assert "row 2" not in message and "row 4" not in message
    assert db["scores"].count_documents({}) == 0

    result = CliRunner().invoke(
        app, ["annotate", "import", str(out), "--annotator", "ben"], env=env_for(settings)
    )
    assert result.exit_code == 1 and "row 3" in result.output and "Traceback" not in result.output
    assert db["scores"].count_documents({}) == 0


def test_a_row_whose_id_names_no_sheet_is_one_problem_and_the_annotator_must_match(
    db, stored, tmp_path
):
    """One item id edited into another sheet's (or no sheet's) prefix: the other rows still
    belong to the sheet, and that row is named (it refused the whole file as "no sheet");
    a sheet exported for one annotator is not stored as another's (that would replace the
    other's answers)."""
    store, exp = stored
    out = tmp_path / "cara.csv"
    export_sheet(store, exp.id, "goal_achieved", "cara", out, scorers_file=SCORERS)
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    for row in rows:
        row["goal_achieved"] = "Yes"
    rows[1]["item_id"] = "ffffffffffff-0001"
    write_sheet(out, rows)
    with pytest.raises(SheetRejected) as info:
        import_sheet(store, out, "cara")
    message = str(info.value)
    assert "nothing imported; 1 row(s)" in message
    assert "row 3 (item ffffffffffff-0001): unknown item_id" in message, message
    with pytest.raises(SheetRejected, match="exported for 'cara', not 'dan'"):
        import_sheet(store, out, "dan")
    assert db["scores"].count_documents({}) == 0


def test_exporting_over_an_existing_sheet_is_refused_unless_forced(
    db, stored, tmp_path, settings, env_for
):
    """Re-running the export command over a filled-in sheet wiped the annotator's answers:
    the file is kept, byte for byte, unless --force."""
    store, exp = stored
    out = tmp_path / "dana.csv"
    export_sheet(store, exp.id, "goal_achieved", "dana", out, scorers_file=SCORERS)
    filled = out.read_bytes().replace(b"\r\n", b",Yes\r\n")  # hours of answers, say
    out.write_bytes(filled)
    args = ["annotate", "export", exp.id, "--scorer", "goal_achieved", "--annotator", "dana",
            "--scorers", str(SCORERS), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args, env=env_for(settings))
    assert result.exit_code == 1 and "exists" in result.output and "--force" in result.output
    assert out.read_bytes() == filled
    sheets = db["annotation_sheets"].count_documents({})
    forced = CliRunner().invoke(app, [*args, "--force"], env=env_for(settings))
    assert forced.exit_code == 0, forced.output
    assert out.read_bytes() != filled and db["annotation_sheets"].count_documents({}) == sheets + 1


def test_answers_for_deleted_conversations_are_not_stored(db, stored, tmp_path):
    """A sheet's conversation deleted since the export: its row is named, nothing stored (8
    orphan scores were stored); the experiment deleted: its sheets go with it."""
    store, exp = stored
    out = tmp_path / "eve.csv"
    export_sheet(store, exp.id, "goal_achieved", "eve", out, scorers_file=SCORERS)
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    for row in rows:
        row["goal_achieved"] = "Yes"
    write_sheet(out, rows)
    store.delete_conversation(rows[2]["conversation_id"])
    with pytest.raises(SheetRejected) as info:
        import_sheet(store, out, "eve")
    assert "row 4" in str(info.value) and "was deleted since the export" in str(info.value)
    assert "nothing imported; 1 row(s)" in str(info.value)
    assert db["scores"].count_documents({}) == 0
    store.delete_experiment(exp.id)
    assert db["annotation_sheets"].count_documents({"experiment_id": exp.id}) == 0
    with pytest.raises(SheetRejected, match="belong to no sheet"):
        import_sheet(store, out, "eve")
    assert db["scores"].count_documents({}) == 0


def test_blind_sample_hides_conditions_and_turns_are_checked(
    db, stored, tmp_path, settings, env_for
):
    store, exp = stored
    out = tmp_path / "turns.csv"
    result = CliRunner().invoke(
        app,
        ["annotate", "export", exp.id or "", "--scorer", "turn_goal_achieved", "--annotator",
         "cleo", "--sample", "3", "--seed", "7", "--blind", "--out", str(out),
         "--scorers", str(SCORERS)],
        env=env_for(settings),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 3
    assert list(rows[0]) == ["item_id", "transcript", "turn_goal_achieved"]
    for row, answer in zip(rows, ["2", "none", "7"], strict=True):
        row["turn_goal_achieved"] = answer
    write_sheet(out, rows)
    with pytest.raises(SheetRejected, match=r"row 4 .*'7' is not an allowed answer"):
        import_sheet(store, out, "cleo")
    assert db["scores"].count_documents({}) == 0
    rows[2]["turn_goal_achieved"] = "6"
    write_sheet(out, rows)
    assert import_sheet(store, out, "cleo").answers == 3
    values = sorted(str(s.value) for s in humans(store))
    assert values == ["first", "none", "third"]  # turns 2 and 6 of 6, reported in thirds


def test_only_judge_scorers_are_annotated(stored, tmp_path):
    store, exp = stored
    from simulator.errors import UserError

    with pytest.raises(UserError, match="moderation scorer"):
        export_sheet(store, exp.id, "moderation", "anna", tmp_path / "m.csv", scorers_file=SCORERS)
    with pytest.raises(UserError, match=r"\.xlsx or a \.csv"):
        export_sheet(
            store, exp.id, "goal_achieved", "anna", tmp_path / "m.ods", scorers_file=SCORERS
        )
