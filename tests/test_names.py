"""Experiments referred to by name: one resolver for every command (outside review F3, F6).

An id, a unique id prefix or a name work wherever an experiment is taken; a name several
experiments share says which one it stood for; creating a second experiment of a name warns;
a hexadecimal name is never silently read as an id prefix; a report of nothing is an error.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.experiment import load_experiment, save_experiment
from simulator.store import Store
from tests.scenarios import PRISON_ONE

PRISON = str(PRISON_ONE)
ONE_CONVERSATION = (
    "--llm", "scripted", "--messages", "2", "--days", "1", "--agents", "guard=1,prisoner=1",
    "--plain",
)  # fmt: skip


@pytest.fixture
def cli(settings, env_for):
    runner = CliRunner()

    def invoke(*args: str, user: str = "alice", ok: bool = True):
        env = {**env_for(settings), "SIMULATOR_USER": user}
        result = runner.invoke(app, list(args), env=env)
        if ok:
            assert result.exit_code == 0, result.output + repr(result.exception)
        else:
            assert result.exit_code == 1, result.output + repr(result.exception)
            assert result.exception is None or isinstance(result.exception, SystemExit)
        return result

    return invoke


def named_file(tmp_path: Path, name: str, edit: str = "") -> Path:
    """PRISON under another name (`edit`: with this starting message, a changed definition)."""
    exp = load_experiment(PRISON_ONE)
    exp.name = name
    exp.starting_message = edit or exp.starting_message
    path = tmp_path / f"{re.sub(r'[^a-z0-9]', '_', name)}-{len(edit)}.yaml"
    save_experiment(exp, path)
    return path


def test_every_command_that_takes_an_experiment_takes_its_name(cli, db, tmp_path):
    alice = Store.open(db, "alice")
    cli("experiment", "import", str(named_file(tmp_path, "slowtest")))
    (row,) = alice.list_experiments()
    exp_id = row.experiment.id
    assert exp_id is not None

    cli("run", "slowtest", *ONE_CONVERSATION)  # was: 'slowtest' is not a valid experiment id
    (batch,) = alice.list_batches()
    assert batch.experiment_id == exp_id
    assert len(alice.list_conversations(experiment_id=exp_id)) == 1
    dry = cli("run", "slowtest", *ONE_CONVERSATION, "--dry-run")
    assert re.search(r"\b1 conversations?,", dry.stdout) and len(alice.list_batches()) == 1

    shown = cli("experiment", "show", "slowtest")
    assert f"# id {exp_id}" in shown.stdout
    cli("experiment", "export", "slowtest", "--out", str(tmp_path / "out.yaml"))
    assert load_experiment(tmp_path / "out.yaml").name == "slowtest"
    cli("experiment", "note", "slowtest", "a new note")
    assert alice.get_experiment(exp_id).note == "a new note"
    cli("experiment", "favourite", "slowtest")
    assert alice.get_experiment(exp_id).favourite
    cli("experiment", "duplicate", "slowtest", "--name", "copy")
    (copy,) = [r.experiment for r in alice.list_experiments() if r.experiment.name == "copy"]
    assert copy.parent_id == exp_id

    listed = cli("conversations", "slowtest")
    assert f"Experiment {exp_id} ('slowtest')" in listed.stdout
    cli("export", "slowtest", "--format", "csv", "--out", str(tmp_path / "exports"))
    assert list((tmp_path / "exports").rglob("*.csv"))

    lab = tmp_path / "lab.yaml"
    lab.write_text("scorers:\n  length: {kind: python, function: 'tests.scoring_plugin:turns'}\n")
    cli("score", "slowtest", "--scorers", str(lab), "--scorer", "length")
    assert [s.value for s in alice.list_scores(scorer="length")] == [2]
    sheet = tmp_path / "sheet.csv"
    cli("annotate", "export", "slowtest", "--scorer", "goal_achieved", "--annotator", "ann",
        "--out", str(sheet))  # fmt: skip
    assert sheet.read_text().count("\n") >= 2
    cli("report", "slowtest", "--scorers", str(lab), "--out", str(tmp_path / "report"))
    assert (tmp_path / "report" / "report.html").is_file()

    cli("experiment", "delete", "copy", "--yes")
    assert {r.experiment.name for r in alice.list_experiments()} == {"slowtest"}
    # a name that is no experiment's says so (and that ids are another way)
    missing = cli("run", "slowtst", *ONE_CONVERSATION, ok=False)
    assert "No experiment is named 'slowtst'" in missing.stderr
    assert "simulator experiment list" in missing.stderr
    typo = cli("experiment", "show", "SlowTest", ok=False)
    assert "did you mean 'slowtest'" in typo.stderr


def test_run_keeps_taking_a_yaml_file(cli, db, tmp_path):
    """A path that exists is a file, even where an experiment has that name."""
    path = named_file(tmp_path, "prison")
    alice = Store.open(db, "alice")
    cli("experiment", "import", str(named_file(tmp_path, str(path), edit="named like a file")))
    cli("run", str(path), *ONE_CONVERSATION)
    (batch,) = alice.list_batches()
    assert alice.get_experiment(batch.experiment_id).name == "prison"
    gone = cli("run", str(tmp_path / "nope.yaml"), *ONE_CONVERSATION, ok=False)
    assert "no such file, nor an experiment of that name" in gone.stderr


def test_a_shared_name_says_which_experiment_it_stood_for(cli, db, tmp_path):
    alice, bob = Store.open(db, "alice"), Store.open(db, "bob")
    first = named_file(tmp_path, "prison")
    cli("run", str(first), *ONE_CONVERSATION)
    (old,) = [r.experiment for r in alice.list_experiments()]
    assert old.id is not None

    # bob imports the same file: his own 'prison', and he is told of alice's
    imported = cli("experiment", "import", str(first), user="bob")
    assert f"'prison' also names experiment {old.id[:8]} (alice, " in imported.stderr
    (bobs,) = [r.experiment for r in bob.list_experiments(mine=True)]
    assert bobs.id is not None and bobs.id != old.id
    assert f"now means this one, {bobs.id[:8]} (yours)" in imported.stderr

    # alice stores an edited file as a new experiment of the same name
    edited = named_file(tmp_path, "prison", edit="Begin (edited)")
    renewed = cli("experiment", "import", str(edited), "--new")
    (new,) = [
        r.experiment
        for r in alice.list_experiments(mine=True)
        if r.experiment.id != old.id  # fmt: skip
    ]
    assert new.id is not None
    assert "'prison' also names experiments" in renewed.stderr
    assert old.id[:8] in renewed.stderr and bobs.id[:8] in renewed.stderr

    # every command taking the name now uses alice's newest, and says so once on stderr
    expected = (
        f"'prison' names 3 experiments; using {new.id[:8]} (yours, newest); the others: "
        f"{old.id[:8]} (yours, "
    )
    for command, ok in (
        (("conversations", "prison"), True),
        (("export", "prison", "--format", "csv", "--out", str(tmp_path / "exports")), False),
        (("experiment", "show", "prison"), True),
    ):
        result = cli(*command, ok=ok)  # export: an error, as for any empty experiment
        assert result.stderr.count("'prison' names 3 experiments") == 1, command
        assert expected in " ".join(result.stderr.split()), result.stderr
        assert f"{bobs.id[:8]} (bob, " in result.stderr
        assert "give an id to choose" in result.stderr
    assert "has no conversations yet" in cli("conversations", "prison").stdout
    assert "1 conversation" in cli("conversations", old.id).stdout  # an id chooses

    # bob's 'prison' is his own; a report of an experiment with no conversations is an error
    report = cli("report", "prison", "--out", str(tmp_path / "report"), user="bob", ok=False)
    assert f"Experiment {bobs.id} ('prison') has no conversations" in report.stderr
    assert "no report written" in report.stderr
    assert not (tmp_path / "report").exists()
    assert len(alice.list_conversations(experiment_id=old.id)) == 1  # nothing else touched

    # deleting by a shared name is refused: it asks for the id
    refused = cli("experiment", "delete", "prison", "--yes", ok=False)
    assert "Give the id of the one to delete" in refused.stderr
    assert len(alice.list_experiments()) == 3


def test_a_hexadecimal_name_is_not_silently_an_id_prefix(cli, db, tmp_path):
    alice = Store.open(db, "alice")
    cli("experiment", "import", PRISON)
    (row,) = alice.list_experiments()
    other = row.experiment
    assert other.id is not None
    clash = other.id[:4]  # a name that starts another experiment's id
    cli("experiment", "import", str(named_file(tmp_path, clash)))
    (named,) = [r.experiment for r in alice.list_experiments() if r.experiment.name == clash]
    assert named.id is not None

    for command in (("experiment", "show", clash), ("export", clash), ("conversations", clash)):
        refused = cli(*command, ok=False)
        text = " ".join(refused.stderr.split())
        assert f"it is the name of experiment {named.id[:8]}" in text, command
        assert f"starts the id of {other.id}" in text
    cli("experiment", "note", clash, "mine", ok=False)
    assert alice.get_experiment(other.id).note != "mine"
    assert alice.get_experiment(named.id).note != "mine"
    # the whole id of either is that one
    cli("experiment", "note", named.id, "mine")
    assert alice.get_experiment(named.id).note == "mine"
    # a hexadecimal name that starts no id is the name
    free = next(n for n in ("added", "decade", "facade") if not other.id.startswith(n))
    cli("experiment", "import", str(named_file(tmp_path, free)))
    shown = cli("experiment", "show", free)
    (freed,) = [r.experiment for r in alice.list_experiments() if r.experiment.name == free]
    assert f"# id {freed.id}" in shown.stdout


def test_the_create_wizard_warns_of_a_name_in_use(db, tmp_path):
    from tests.test_interactive import CREATE, ESC, drive, typed

    bob = Store.open(db, "bob")
    existing = bob.insert_experiment(load_experiment(PRISON_ONE))
    assert existing.id is not None
    alice = Store.open(db, "alice")
    out = drive(alice, CREATE + typed(existing.name) + ESC + ESC, tmp_path)
    text = " ".join(out.split())
    assert f"'{existing.name}' already names experiment {existing.id[:8]} (bob, " in text
    assert alice.list_experiments(mine=True) == []  # Esc: nothing saved
    unique = drive(alice, CREATE + typed("a new name") + ESC + ESC, tmp_path)
    assert "already names" not in unique
