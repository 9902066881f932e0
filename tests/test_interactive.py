"""The interactive menus, driven through the real questionary by keystrokes on a
prompt_toolkit pipe input (as questionary's own tests do), against a real SecantusDB server;
results are checked through the store."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.cells import cell_len
from rich.console import Console
from servers import FakeLLMServer

from simulator import display
from simulator.errors import PermissionDenied
from simulator.experiment import Experiment, ModelSpec, experiment_to_dict, load_experiment
from simulator.grid import make_grid
from simulator.interactive.menus import Menus
from simulator.interactive.questions import Questions, Separator
from simulator.runner import RunOptions, start_batch
from simulator.store import Store
from tests.scenarios import PRISON_ONE

PRISON = PRISON_ONE  # one of the 72 scenarios: these tests are not about factors

DOWN = "\x1b[B"
UP = "\x1b[A"
ENTER = "\r"
SPACE = " "
ESC = "\x1b"
CTRL_C = "\x03"
CLEAR = "\x15"  # Ctrl-U: delete the default text before the cursor


def down(n: int) -> str:
    return DOWN * n


def typed(text: str) -> str:
    """Replace whatever default a text question shows, then confirm."""
    return CLEAR + text + ENTER


# main menu: Create, Select, Exit
CREATE = ENTER
SELECT_FIRST = DOWN + ENTER + ENTER  # "Select an experiment", then the first row
EXIT = down(2) + ENTER
# experiment menu: run, duplicate, note, favourite, export, browse, delete, back
BACK = UP + ENTER  # the menus wrap around: Up from the first entry is "Back"


def drive(store: Store, keys: str, tmp_path: Path) -> str:
    """Run the menus on these keystrokes; return what they printed.

    The pipe is closed after the keys, so a script that runs short ends in EOF (treated
    like Esc) instead of hanging.
    """
    return drive_asked(store, keys, tmp_path)[0]


@dataclass
class Asked:
    kind: str  # select | confirm | text
    message: str
    entries: list[tuple[str, str | None]]  # a select's entries: title, why disabled


class RecordedQuestions(Questions):
    """The real questions (questionary on the pipe), remembering each one asked: prompt_toolkit
    draws nothing of a question answered by keys already typed, so a test reads it here."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.asked: list[Asked] = []

    def select(self, message: str, choices: Any, **kwargs: Any) -> Any:
        entries = [(str(c.title), c.disabled) for c in choices if not isinstance(c, Separator)]
        self.asked.append(Asked("select", message, entries))
        return super().select(message, choices, **kwargs)

    def confirm(self, message: str, default: bool = False) -> bool:
        self.asked.append(Asked("confirm", message, []))
        return super().confirm(message, default)

    def text(self, message: str, default: str = "", **kwargs: Any) -> str:
        self.asked.append(Asked("text", message, []))
        return super().text(message, default, **kwargs)


def drive_asked(
    store: Store, keys: str, tmp_path: Path, *, width: int = 200
) -> tuple[str, list[Asked]]:
    """Like drive, on a console `width` columns wide; also returns every question asked."""
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None)
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        pipe.close()
        q = RecordedQuestions(input=pipe, output=DummyOutput(), console=console)
        Menus(store, q, tmp_path / "experiments").main()
    return out.getvalue(), q.asked


def older(exp: Experiment, db: Any) -> Experiment:
    """The experiment, as if created an hour earlier (ids are stored to the second)."""
    exp.created_at = (exp.created_at or datetime.now()) - timedelta(hours=1)
    db["experiments"].update_one({"_id": exp.id}, {"$set": {"created_at": exp.created_at}})
    return exp


def run_one_conversation(store: Store, exp: Experiment) -> str:
    """A one-conversation batch on the scripted model, as `store`'s user; its id."""
    grid = make_grid(
        exp, llms=["scripted"], messages=2, days=1, agents="guard=1,prisoner=1",
        speakers=["round_robin"],
    )  # fmt: skip
    report = start_batch(store, exp, grid, RunOptions())
    assert report.status == "completed"
    (record,) = store.list_conversations(batch_id=report.batch_id)
    return record.id


@pytest.fixture
def alice(db) -> Store:
    return Store.open(db, "alice")


@pytest.fixture
def bob(db) -> Store:
    return Store.open(db, "bob")


@pytest.fixture
def prison():
    return load_experiment(PRISON)


def test_create_the_prison_experiment_from_scratch(alice, prison, tmp_path, monkeypatch):
    roles = {r.name: r for r in prison.roles}
    sections = [*prison.shared_sections.items()]
    sections += [(t, text) for r in prison.roles for t, text in r.sections.items()]
    sections += [*prison.summarizer.sections.items()]
    titles = [*roles["guard"].sections, *prison.shared_sections]
    environment = prison.shared_sections["environment"]
    assert "<GUARD_NUM>" in environment
    misspelt = environment.replace("<GUARD_NUM>", "<GAURD_NUM>")

    keys = CREATE + typed("prison") + ENTER  # name; starting message: the example default
    keys += typed("scripted") + "n" + "y"  # no sampling; add another LLM
    keys += typed("gpt-4o-mini") + "y" + typed("3") + typed("0.7") + ENTER + ENTER
    keys += "y" + typed("llama3") + "y" + typed("0.7") + typed("40") + typed("0.9")
    keys += "y"  # pull llama3 from the (fake) Ollama server
    keys += "n"  # no more LLMs
    keys += typed(", ".join(titles))
    keys += down(3) + (SPACE + DOWN) * 3 + SPACE + ENTER  # the last four are shared
    keys += typed("guard, prisoner")
    keys += typed(roles["guard"].description) + typed(roles["prisoner"].description)
    keys += ENTER  # summarizer titles: the default starting_prompt, format
    first, *rest = sections
    keys += typed(misspelt) + typed(first[1])  # re-asked on the spot, then corrected
    keys += "".join(typed(text) for _, text in rest)
    keys += "n" + "n" + typed(prison.note)  # no factor; not a favourite; note
    keys += ENTER + "y" + ENTER  # save; write YAML to the default file
    keys += BACK + EXIT  # the new experiment's menu, then the main menu

    with FakeLLMServer(models={"smollm2"}) as ollama:
        monkeypatch.setenv("OLLAMA_HOST", ollama.url)
        out = drive(alice, keys, tmp_path)
        assert "llama3:latest" in ollama.installed
        assert ollama.bodies("/api/pull")

    assert "<GAURD_NUM>: unknown placeholder; did you mean <GUARD_NUM>?" in out
    assert "System prompt of a guard" in out and "Summarizer prompt" in out
    (row,) = alice.list_experiments()
    saved = row.experiment
    assert saved.creator == "alice"
    assert [s.label for s in saved.llms] == [
        "scripted/scripted",
        "openai/gpt-4o-mini",
        "ollama/llama3:latest",
    ]
    assert saved.llms[1].temperature == 0.7 and saved.llms[1].top_k is None
    assert (saved.llms[2].temperature, saved.llms[2].top_k, saved.llms[2].top_p) == (0.7, 40, 0.9)
    expected, got = experiment_to_dict(prison), experiment_to_dict(saved)
    expected.pop("llms"), got.pop("llms")
    expected.pop("scorers")  # the wizard writes no scorers (added to the YAML by hand)
    assert got == expected
    written = load_experiment(tmp_path / "experiments" / "prison.yaml")
    assert experiment_to_dict(written) == experiment_to_dict(saved)


def test_run_a_small_grid_on_the_scripted_model(alice, prison, tmp_path):
    exp = alice.insert_experiment(prison)
    assert [s.label for s in exp.llms][3] == "scripted/scripted"
    keys = SELECT_FIRST + ENTER  # Perform new conversations
    keys += typed("2")  # repetitions
    keys += SPACE + down(3) + SPACE + ENTER  # LLMs: untick the first, tick scripted
    keys += typed("4")  # messages
    keys += ENTER + "y"  # days: the default 2, and try every day count
    keys += ENTER + typed("2") + "n"  # guard 1, prisoner 2, exactly
    keys += DOWN + SPACE + ENTER  # speakers: round_robin (default) and random
    keys += ENTER  # start
    keys += down(5) + ENTER + ENTER + ENTER  # browse, first conversation, view
    keys += ESC + ESC + ESC + ESC + ESC  # back out of every menu, and exit

    out = drive(alice, keys, tmp_path)

    assert "8 conversations" in out
    records = alice.list_conversations(experiment_id=exp.id)
    assert len(records) == 8
    assert {r.status for r in records} == {"completed"}
    # repetition r runs with seed + r (the base seed is 0)
    conditions = sorted((r.spec.days, r.spec.speaker, r.spec.seed) for r in records)
    assert conditions == sorted(
        (d, s, rep) for d in (1, 2) for s in ("round_robin", "random") for rep in (0, 1)
    )
    for r in records:
        assert r.spec.llm.label == "scripted/scripted"
        assert r.spec.messages == 4 and r.message_count == 4
        assert r.spec.agents == {"guard": 1, "prisoner": 2}
        assert r.creator == "alice"
    assert f"Conversation {records[0].id}" in out  # the transcript was shown
    assert "Day 1" in out


def test_duplicate_another_users_experiment_changing_one_section(alice, bob, prison, tmp_path):
    original = bob.insert_experiment(prison)
    keys = SELECT_FIRST + DOWN + ENTER  # Duplicate and update
    keys += down(4) + SPACE + ENTER  # change: section contents
    keys += typed("prison-gentle")  # name of the copy
    # sections: the four shared ones, guard starting_prompt, guard goal, guard personality, ...
    keys += down(6) + SPACE + ENTER
    keys += typed("You are gentle and patient, and you like to say yes.")
    keys += ENTER + "n"  # save; no YAML
    keys += BACK + ESC + EXIT

    out = drive(alice, keys, tmp_path)

    assert "duplicated from" in out
    copy = next(r.experiment for r in alice.list_experiments() if r.experiment.id != original.id)
    assert (copy.creator, copy.parent_id, copy.name) == ("alice", original.id, "prison-gentle")
    assert copy.role("guard").sections["personality"].startswith("You are gentle and patient")
    expected = experiment_to_dict(prison)
    expected["name"] = "prison-gentle"
    expected["roles"]["guard"]["sections"]["personality"] = copy.role("guard").sections[
        "personality"
    ]
    assert experiment_to_dict(copy) == expected
    assert experiment_to_dict(bob.get_experiment(original.id)) == experiment_to_dict(prison)


def test_a_non_creator_is_not_offered_what_only_the_creator_may_do(
    alice, bob, prison, tmp_path, db
):
    """Item 16: Delete and Change note are shown disabled with the reason, never asked about
    then refused; the conversation's Delete too. Starring is anyone's (item 17)."""
    exp = bob.insert_experiment(prison)
    conv_id = run_one_conversation(bob, exp)
    messages = db["messages"].count_documents({})
    # the experiment menu, top to bottom and round to the top again: Down skips disabled
    # entries, so 8 Downs go Duplicate, favourite, Export, Browse, Scores, Report, Back, Perform
    keys = SELECT_FIRST + down(8)
    keys += down(2) + ENTER  # the third entry one can choose: Add to my favourites
    keys += down(4) + ENTER + ENTER  # Browse conversations (1), the conversation
    keys += DOWN + ENTER  # Add to my favourites (Delete is disabled)
    keys += down(2) + ENTER  # View, favourite, (Delete skipped), Back
    keys += ESC + ESC + ESC + EXIT

    out, asked = drive_asked(alice, keys, tmp_path)

    disabled = {(t, why) for a in asked for t, why in a.entries if why}
    assert disabled == {
        ("Change the note", "only its creator, bob, can"),
        ("Delete the experiment", "only its creator, bob, can"),
        ("Delete the conversation", "only its creator, bob, can"),
    }
    # nothing asked about what is refused, nothing refused after asking: menus only
    assert [a.message for a in asked if a.kind != "select"] == []
    assert "Refused" not in out
    # alice's own stars; bob's experiment, conversation and messages untouched
    assert db["experiments"].find_one({"_id": exp.id})["favourited_by"] == ["alice"]
    assert db["conversations"].find_one({"_id": conv_id})["favourited_by"] == ["alice"]
    assert db["messages"].count_documents({}) == messages
    assert bob.get_experiment(exp.id or "").note == prison.note
    assert not bob.get_experiment(exp.id or "").favourite


def test_the_creator_deletes_with_confirmation(alice, prison, tmp_path):
    alice.insert_experiment(prison)
    keys = SELECT_FIRST + down(6) + ENTER + "n"  # declined: nothing happens
    keys += down(6) + ENTER + "y"  # confirmed: back to the list
    keys += ESC + EXIT
    drive(alice, keys, tmp_path)
    assert alice.list_experiments() == []


@pytest.mark.parametrize("key", [CTRL_C, ESC], ids=["ctrl-c", "esc"])
def test_cancelling_in_the_middle_of_creating_saves_nothing(alice, tmp_path, key):
    keys = CREATE + typed("prison") + ENTER + typed("scripted") + "n" + "n"
    keys += ENTER + ENTER  # the example section titles, none shared
    keys += typed("guard, prisoner") + ENTER + ENTER + ENTER  # roles, no descriptions
    keys += typed("You are a guard.")  # the first section's content
    keys += key  # in the middle of the next one
    keys += EXIT  # back at the main menu

    out = drive(alice, keys, tmp_path)

    assert "Cancelled: nothing was saved." in out
    assert alice.list_experiments() == []
    assert not (tmp_path / "experiments").exists()


def test_export_the_definition_and_the_conversations(alice, prison, tmp_path):
    exp = alice.insert_experiment(prison)
    keys = SELECT_FIRST + down(4) + ENTER  # Export to files
    keys += down(2) + SPACE + ENTER  # the YAML (ticked) and jsonl
    keys += typed(str(tmp_path / "prison-copy.yaml")) + typed(str(tmp_path / "exports"))
    keys += BACK + ESC + EXIT
    out = drive(alice, keys, tmp_path)
    exported = load_experiment(tmp_path / "prison-copy.yaml")
    assert experiment_to_dict(exported) == experiment_to_dict(exp)
    assert list((tmp_path / "exports").rglob("*.jsonl")), out


def test_without_a_terminal_the_menus_name_the_commands(tmp_path):
    simulator = Path(sys.executable).with_name("simulator")
    result = subprocess.run(
        [str(simulator)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "SIMULATOR_DATA_DIR": str(tmp_path / "data")},
        timeout=60,
    )
    assert result.returncode == 1
    assert "need a terminal" in result.stderr
    assert "simulator run EXPERIMENT" in result.stderr


def test_the_list_filters_to_mine_and_searches(alice, bob, prison, tmp_path):
    prison.name = "alices-study"
    alice.insert_experiment(prison)
    prison.name = "bobs-study"
    bob.insert_experiment(prison)  # newer, so first in the list of everyone's
    keys = DOWN + ENTER + UP + UP + ENTER  # the list; "Show only mine" (Up wraps past Back)
    keys += ENTER + BACK  # the first row of mine
    keys += UP + UP + ENTER  # "Show everyone's" again
    keys += "bobs" + ENTER + BACK  # type to search
    keys += ESC + EXIT
    out = drive(alice, keys, tmp_path)
    headers = [line.split()[0] for line in out.splitlines() if "· by " in line]
    assert headers == ["alices-study", "bobs-study"]


def test_a_favourite_is_per_person(alice, bob, prison, tmp_path, db):
    """Item 17: alice stars bob's experiment for herself; bob does not see her star, and her
    favourites come first only in her list."""
    prison.name = "bobs-study"
    bobs = older(bob.insert_experiment(prison), db)
    prison.name = "alices-study"
    alices = alice.insert_experiment(prison)  # newer: first in a list without favourites
    keys = DOWN + ENTER + DOWN + ENTER  # the list; bobs-study
    keys += down(2) + ENTER  # Add to my favourites (Change the note is disabled)
    keys += BACK + ESC + EXIT

    out = drive(alice, keys, tmp_path)

    assert "Refused" not in out
    assert db["experiments"].find_one({"_id": bobs.id})["favourited_by"] == ["alice"]
    assert [r.experiment.id for r in alice.list_experiments()] == [bobs.id, alices.id]
    assert [r.experiment.id for r in bob.list_experiments()] == [alices.id, bobs.id]
    assert alice.get_experiment(bobs.id or "").favourite
    assert not bob.get_experiment(bobs.id or "").favourite
    for store, starred in ((alice, [bobs.id]), (bob, [])):
        _, asked = drive_asked(store, DOWN + ENTER + ESC + EXIT, tmp_path)
        rows = next(a.entries for a in asked if a.message.startswith("Experiments"))
        assert [t for t, _ in rows if "⭐" in t] == [
            t for t, _ in rows if any((i or "")[:8] in t for i in starred)
        ]
        assert len([t for t, _ in rows if "⭐" in t]) == len(starred)
    # the star as a YAML carries it: the favourite of whoever imports it
    assert experiment_to_dict(alice.get_experiment(bobs.id or ""))["favourite"] is True
    assert "favourite" not in experiment_to_dict(bob.get_experiment(bobs.id or ""))
    prison.favourite = True
    imported = bob.insert_experiment(prison)
    assert db["experiments"].find_one({"_id": imported.id})["favourited_by"] == ["bob"]
    # and removed again, by her, for her
    alice.set_favourite(bobs.id or "", False)
    assert db["experiments"].find_one({"_id": bobs.id})["favourited_by"] == []


def test_an_old_favourite_flag_is_the_creators_star(alice, bob, prison, db):
    """Item 17: documents from before per-person stars have one boolean `favourite` (only
    the creator could set it): it reads as the creator's star, and survives others' stars."""
    exp = older(bob.insert_experiment(prison), db)
    conv_id = run_one_conversation(bob, exp)
    old = {"$set": {"favourite": True}, "$unset": {"favourited_by": ""}}
    db["experiments"].update_one({"_id": exp.id}, old)
    db["conversations"].update_one({"_id": conv_id}, old)
    prison.name = "newer"
    newer = bob.insert_experiment(prison)

    assert bob.get_experiment(exp.id or "").favourite
    assert not alice.get_experiment(exp.id or "").favourite
    assert [r.experiment.id for r in bob.list_experiments()] == [exp.id, newer.id]
    assert [r.experiment.id for r in alice.list_experiments()] == [newer.id, exp.id]
    assert bob.get_conversation(conv_id).favourited_by == ["bob"]

    alice.set_favourite(exp.id or "", True)
    alice.set_conversation_favourite(conv_id, True)
    for collection, ref in (("experiments", exp.id), ("conversations", conv_id)):
        doc = db[collection].find_one({"_id": ref})
        assert doc["favourited_by"] == ["bob", "alice"] and "favourite" not in doc
    bob.set_conversation_favourite(conv_id, False)
    assert alice.get_conversation(conv_id).favourited_by == ["alice"]


def _negotiations(alice: Store, bob: Store, prison: Experiment) -> list[Experiment]:
    prison.name = "negotiation"
    prison.note = "Buyers and sellers haggle over a used car; the seller knows of a hidden defect"
    first = bob.insert_experiment(prison)
    run_one_conversation(bob, first)
    run_one_conversation(alice, first)
    prison.note = "Second take"
    return [first, alice.insert_experiment(prison)]


@pytest.mark.parametrize("width", [80, 200])
def test_the_experiment_list_fits_the_terminal(alice, bob, prison, tmp_path, width):
    """Item 20: every row fits; the id prefix tells the two "negotiation" rows apart; the
    conversation count is always there; the note is cut (last), not dropped."""
    first, second = _negotiations(alice, bob, prison)

    _, asked = drive_asked(alice, DOWN + ENTER + ESC + EXIT, tmp_path, width=width)

    titles = next(a.entries for a in asked if a.message.startswith("Experiments"))
    rows = {}
    for exp, count in ((first, 2), (second, 0)):
        (row,) = [title for title, _ in titles if (exp.id or "")[:8] in title]
        rows[exp.id] = row
        assert 3 + cell_len(row) < width, row  # questionary draws " » " before it
        assert "negotiation" in row and f"{count} conv." in row
    if width == 200:
        assert first.note in rows[first.id] and "bob" in rows[first.id]
    else:
        assert "Buyers and sellers haggle" in rows[first.id] and "…" in rows[first.id]
    assert "Second take" in rows[second.id]


@pytest.mark.parametrize("width", [60, 80, 200])
def test_experiment_list_table_fits_the_console(alice, bob, prison, width):
    """Item 20, `experiment list`: the id and the conversation count in every width."""
    first, second = _negotiations(alice, bob, prison)
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(
        display.experiments_table(alice.list_experiments())
    )
    lines = out.getvalue().splitlines()
    assert max(cell_len(line) for line in lines) <= width
    assert "conv." in lines[1] and "id" in lines[1]
    for exp, count in ((first, 2), (second, 0)):
        (row,) = [line for line in lines if (exp.id or "")[:8] in line]
        assert "negotiation" in row and f" {count} " in row
    if width == 200:
        assert first.note in out.getvalue()


def test_a_batch_from_the_menus_honours_the_concurrency_and_retry_settings(
    alice, prison, tmp_path, monkeypatch
):
    """The menus run batches with SIMULATOR_CONCURRENCY and SIMULATOR_RETRY_*: one
    conversation at a time, and a failed call is not retried with one attempt in all."""
    prison.llms = [ModelSpec("llama3", "ollama")]
    exp = alice.insert_experiment(prison)
    monkeypatch.setenv("SIMULATOR_CONCURRENCY", "1")
    monkeypatch.setenv("SIMULATOR_RETRY_ATTEMPTS", "1")
    keys = SELECT_FIRST + ENTER  # Perform new conversations
    keys += typed("2") + ENTER  # 2 repetitions; the LLM ticked first (llama3)
    keys += typed("2") + typed("1")  # 2 messages, 1 day
    keys += ENTER + ENTER  # guard 1, prisoner 1
    keys += ENTER + ENTER  # round_robin; start
    keys += ESC + ESC + EXIT

    with FakeLLMServer(models={"llama3:latest"}, latency=0.05) as ollama:
        monkeypatch.setenv("OLLAMA_HOST", ollama.url)
        ollama.fail_next(500)
        out = drive(alice, keys, tmp_path)
        calls, peak = ollama.calls, ollama.peak_in_flight

    records = alice.list_conversations(experiment_id=exp.id)
    assert sorted(r.status for r in records) == ["completed", "failed"], out
    assert calls == 1 + 3  # the failed call, not retried; 2 messages and a summary
    assert peak == 1  # never two conversations at once


def test_refusals_suggest_only_what_applies(alice, bob, prison, db):
    """Item 16: refusing to delete someone's conversation does not suggest `experiment
    duplicate`; refusing to change an experiment's note does (the copy is yours to edit)."""
    exp = bob.insert_experiment(prison)
    conv_id = run_one_conversation(bob, exp)
    messages = db["messages"].count_documents({"conversation_id": conv_id})

    with pytest.raises(PermissionDenied) as refused:
        alice.delete_conversation(conv_id)
    assert str(refused.value) == (
        f"Only bob, who created conversation {conv_id}, can delete it; you are alice. "
        "Ask them to delete it if it should go."
    )
    assert db["messages"].count_documents({"conversation_id": conv_id}) == messages
    with pytest.raises(PermissionDenied) as refused:
        alice.set_note(exp.id or "", "mine")
    assert "Duplicate it (`simulator experiment duplicate`)" in str(refused.value)
    assert bob.get_experiment(exp.id or "").note == prison.note


def test_the_creator_is_not_offered_delete_while_others_conversations_are_in_it(
    alice, bob, prison, tmp_path, db
):
    """Items 16 and 1: an experiment holding someone else's conversations cannot be deleted;
    the menu says so up front instead of asking for a confirmation first."""
    exp = alice.insert_experiment(prison)
    run_one_conversation(bob, exp)
    rows = {c: db[c].count_documents({}) for c in ("conversations", "messages")}
    # where Delete was: 8 Downs now land on Back (Delete is skipped, Scores and Report are
    # passed); "y"
    # would confirm
    keys = SELECT_FIRST + down(8) + ENTER + "y" + ESC + EXIT

    out, asked = drive_asked(alice, keys, tmp_path)

    menu = next(a.entries for a in asked if a.message.startswith("Experiment '"))
    assert ("Delete the experiment", "it holds conversations of others (1 by bob)") in menu
    assert [a.message for a in asked if a.kind != "select"] == []
    assert {c: db[c].count_documents({}) for c in rows} == rows
    assert alice.get_experiment(exp.id or "").id == exp.id


# --- scores and annotation (issue 11 item 6) -----------------------------------------------

SCORED_EXP = """\
name: scored
starting_message: Start
llms: [{model: scripted, provider: scripted}]
roles:
  guard: {sections: {starting_prompt: You are a guard.}}
  prisoner: {sections: {starting_prompt: You are a prisoner.}}
scorers:
  goal:
    kind: judge
    llm: {model: judge, provider: scripted, replies: ["Yes", "No"]}
    rubric: Did the prisoners obtain the extra hour?
    answer: choice
    labels: ["Yes", "No"]
  length: {kind: python, function: 'tests.scoring_plugin:turns'}
"""
# experiment menu: Scores and annotation is just above Report and Back (Up three times from
# the top)
SCORES = UP + UP + UP + ENTER
# its menu: score, export a sheet, import a sheet, agreement, back


@pytest.fixture
def two_conversations(alice):
    from simulator.experiment import experiment_from_yaml

    exp = alice.insert_experiment(experiment_from_yaml(SCORED_EXP, "t"))
    grid = make_grid(
        exp, llms=None, messages=2, days=1, agents=None, speakers=["round_robin"], repetitions=2
    )
    assert start_batch(alice, exp, grid, RunOptions()).status == "completed"
    return exp


def test_score_an_experiment_from_the_menus_choosing_scorers(
    alice, two_conversations, tmp_path, db
):
    """The menu scores with the chosen scorers only, through the library `score` uses: a
    second time it scores nothing (the same resume rule)."""
    exp = two_conversations
    keys = SELECT_FIRST + SCORES
    keys += ENTER + SPACE + ENTER  # Score: untick goal (first), keep length
    keys += ENTER + ENTER  # Score again: both ticked
    keys += ENTER + ENTER  # and again: nothing left
    keys += ESC + BACK + ESC + EXIT

    out, asked = drive_asked(alice, keys, tmp_path)

    assert "Scored 2 items with length (0 already scored" in out, out
    assert "Scored 2 items with goal, length (2 already scored" in out
    assert "Scored 0 items with goal, length (4 already scored" in out
    scores = alice.list_scores(experiment_id=exp.id)
    assert sorted((s.scorer, s.source) for s in scores) == [
        ("goal", "judge:scripted/judge"), ("goal", "judge:scripted/judge"),
        ("length", "python:tests.scoring_plugin:turns"),
        ("length", "python:tests.scoring_plugin:turns"),
    ]  # fmt: skip
    assert {s.value for s in scores if s.scorer == "goal"} == {"Yes", "No"}
    assert db["scores"].count_documents({}) == 4
    menu = next(a for a in asked if a.message.startswith("Scores and annotation"))
    assert [t for t, _ in menu.entries] == [
        "Score the conversations (choose scorers)",
        "Export an annotation sheet",
        "Import an annotation sheet",
        "See agreement between sources",
        "Back",
    ]


def test_annotation_round_trip_and_agreement_from_the_menus(alice, two_conversations, tmp_path, db):
    import csv

    sheet = tmp_path / "ann.csv"
    keys = SELECT_FIRST + SCORES
    keys += ENTER + ENTER  # score with both (the judge answers Yes, then No)
    keys += DOWN + ENTER  # Export an annotation sheet
    keys += ENTER  # the only judge scorer: goal (python ones are not offered)
    keys += typed("ann") + typed(str(sheet)) + ENTER + "n"  # no sample, not blind
    keys += ESC + BACK + ESC + EXIT
    out = drive(alice, keys, tmp_path)
    assert f"Wrote 2 rows to {sheet}" in out, out

    with sheet.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["goal"] for r in rows] == ["", ""]
    judged = {s.conversation_id: s.value for s in alice.list_scores(scorer="goal")}
    for r in rows:  # the human agrees with the judge on every item
        r["goal"] = judged[r["conversation_id"]]
    with sheet.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    keys = SELECT_FIRST + SCORES
    keys += down(2) + ENTER + typed(str(sheet)) + typed("ann")  # Import
    keys += down(3) + ENTER + ENTER + "n"  # Agreement on goal (first), no confusion matrix
    keys += ESC + BACK + ESC + EXIT
    out = drive(alice, keys, tmp_path)

    assert "Imported 2 answers of ann for goal (0 rows left blank)" in out, out
    humans = [s for s in alice.list_scores(scorer="goal") if s.source == "human:ann"]
    assert sorted((s.conversation_id, s.value) for s in humans) == sorted(judged.items())
    assert "Agreement on goal" in out
    line = next(x for x in out.splitlines() if "human:ann" in x and "judge:scripted/judge" in x)
    assert "100.0%" in line or "100%" in line, out


def test_a_bad_sheet_is_refused_in_the_menus_and_nothing_is_stored(
    alice, two_conversations, tmp_path, db
):
    import csv

    from simulator.scoring.annotation import export_sheet

    exp = two_conversations
    sheet = tmp_path / "bad.csv"
    export_sheet(alice, exp.id or "", "goal", "ann", sheet)
    with sheet.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["goal"], rows[1]["goal"] = "Maybe", "Yes"  # one label outside the allowed set
    with sheet.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    keys = SELECT_FIRST + SCORES + down(2) + ENTER + typed(str(sheet)) + typed("ann")
    keys += ESC + BACK + ESC + EXIT
    out = drive(alice, keys, tmp_path)
    assert "Maybe" in out and "row 2" in out, out
    assert db["scores"].count_documents({}) == 0


def test_a_menu_run_ends_with_the_runners_own_summary(db, mongo_server, prison, tmp_path):
    """The menu prints the closing summary `run` prints, from the runner's own counts of the
    batch it started (BatchReport.totals): the store is not asked to sum the batch again.
    Counted as the aggregations of selector calls (Store.batch_totals sums them; nothing
    else in a run without a budget does): a menu run makes those the runner makes, no more."""
    from pymongo import MongoClient, monitoring

    class Aggregates(monitoring.CommandListener):
        def __init__(self) -> None:
            self.seen: list[str] = []

        def started(self, event: Any) -> None:
            if event.command_name == "aggregate" and event.database_name == db.name:
                self.seen.append(str(event.command["aggregate"]))

        def succeeded(self, event: Any) -> None:
            pass

        def failed(self, event: Any) -> None:
            pass

    listener = Aggregates()
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server, event_listeners=[listener])
    try:
        store = Store.open(client[db.name], "alice")
        exp = store.insert_experiment(prison)
        # The same batch through the library: what the runner aggregates by itself.
        grid = make_grid(
            exp, llms=["scripted"], messages=4, days=2, agents={"guard": 1, "prisoner": 1},
            speakers=["round_robin"], repetitions=2,
        )  # fmt: skip
        listener.seen.clear()
        first = start_batch(store, exp, grid, RunOptions())
        by_runner = listener.seen.count("selector_calls")

        keys = SELECT_FIRST + ENTER  # Perform new conversations
        keys += typed("2")  # repetitions
        keys += SPACE + down(3) + SPACE + ENTER  # LLMs: untick the first, tick scripted
        keys += typed("4") + ENTER + "n"  # 4 messages, 2 days, not every day count
        keys += ENTER + ENTER  # guard 1, prisoner 1
        keys += ENTER + ENTER  # round_robin; start
        keys += ESC + ESC + EXIT
        listener.seen.clear()
        out = drive(store, keys, tmp_path)
        by_menu = listener.seen.count("selector_calls")
        (batch,) = [b for b in store.list_batches() if b.id != first.batch_id]
        totals = store.batch_totals(batch.id)
    finally:
        client.close()
    assert batch.grid.size() == grid.size() == 2
    assert totals.messages == 8 and totals.calls > 8  # messages and summaries
    assert f"Batch {batch.id}: completed — 2 completed of 2 conversations" in out, out
    assert f"{totals.messages} messages, {totals.calls} LLM calls" in out
    assert by_menu == by_runner  # no recount for the summary
