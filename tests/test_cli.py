"""The non-interactive CLI, checked through the store (SPEC §7-9)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.store import Store
from tests.scenarios import PRISON_ONE

PRISON = str(PRISON_ONE)  # one of the 72 scenarios: these tests are not about factors


@pytest.fixture
def cli(settings, env_for):
    runner = CliRunner()

    def invoke(*args: str, user: str = "alice", ok: bool = True):
        env = {**env_for(settings), "SIMULATOR_USER": user}
        result = runner.invoke(app, list(args), env=env)
        if ok:
            assert result.exit_code == 0, result.output + repr(result.exception)
        return result

    return invoke


def store_for(db, user="alice") -> Store:
    return Store.open(db, user)


def test_import_run_small_grid_everything_stored(cli, db):
    cli("experiment", "import", PRISON)
    store = store_for(db)
    (row,) = store.list_experiments()
    exp = row.experiment
    grid = (
        "run", exp.id[:6], "--llm", "scripted", "--messages", "6", "--days", "2", "--every-day",
        "--agents", "guard=1,prisoner=2", "--speaker", "round_robin", "--speaker", "auto",
        "--repetitions", "2",
    )  # fmt: skip
    dry = cli(*grid, "--dry-run")
    m = re.search(r"(\d+) conversations, at least (\d+) LLM calls", dry.output)
    assert m, dry.output
    planned_conversations, planned_calls = int(m.group(1)), int(m.group(2))
    assert planned_conversations == 1 * 2 * 1 * 2 * 2
    assert store.list_batches() == []  # a dry run writes nothing

    cli(*grid, "--plain")
    records = store.list_conversations(experiment_id=exp.id, prompts=True)
    assert len(records) == planned_conversations
    calls = 0
    for rec in records:
        assert rec.status == "completed"
        t = store.load_transcript(rec.id)
        assert len(t.messages) == 6 and rec.message_count == 6
        assert [s.day for s in t.summaries] == list(range(1, rec.spec.days + 1))
        assert sorted((m.day, m.turn) for m in t.messages) == sorted(
            {(m.day, m.turn) for m in t.messages}
        )
        # the full condition and the exact prompts are stored with the conversation
        assert rec.spec.llm.label == "scripted/scripted"
        assert rec.spec.agents == {"guard": 1, "prisoner": 2}
        assert rec.spec.speaker in ("round_robin", "auto")
        assert len(rec.agents) == 3
        assert all(a.system_prompt.startswith("You are a") for a in rec.agents)
        assert "summar" in rec.summarizer_prompt.lower()
        usage = rec.usage
        assert usage["agents"].calls == 6 and usage["summarizer"].calls == rec.spec.days
        selected_turns = {(c.day, c.turn) for c in t.selector_calls}
        assert len(selected_turns) == (6 if rec.spec.speaker == "auto" else 0)
        # re-asks (an invalid or repeated selector answer) come on top of the planned calls
        calls += usage["agents"].calls + usage["summarizer"].calls + len(selected_turns)
    assert calls == planned_calls


def test_run_yaml_file_prints_the_conversation_and_reuses_the_experiment(cli, db):
    result = cli(
        "run",
        PRISON,
        "--llm",
        "scripted",
        "--messages",
        "10",
        "--days",
        "2",
        "--agents",
        "guard=1,prisoner=2",
        "--speaker",
        "round_robin",
        "--seed",
        "7",
        "--plain",
    )
    assert "Day 1" in result.output and "Day 2" in result.output
    assert "Summary of day 2" in result.output
    cli("run", PRISON, "--llm", "scripted", "--messages", "4", "--days", "1", "--plain")
    store = store_for(db)
    assert len(store.list_experiments()) == 1  # the same file is imported once
    assert len(store.list_batches()) == 2


def test_duplicate_colleagues_experiment_and_permissions(cli, db):
    cli("experiment", "import", PRISON, user="bob")
    bob_exp = store_for(db, "bob").list_experiments()[0].experiment
    cli("experiment", "duplicate", bob_exp.id, "--name", "prison-copy", user="alice")
    alice = store_for(db, "alice")
    rows = {r.experiment.name: r.experiment for r in alice.list_experiments()}
    copy = rows["prison-copy"]
    assert copy.creator == "alice" and copy.parent_id == bob_exp.id
    original = alice.get_experiment(bob_exp.id)
    assert original.creator == "bob" and original.name == "prison"
    assert [r.sections for r in copy.roles] == [r.sections for r in original.roles]

    for args in (
        ("experiment", "delete", bob_exp.id, "--yes"),
        ("experiment", "note", bob_exp.id, "mine now"),
    ):
        result = cli(*args, user="alice", ok=False)
        assert result.exit_code == 1
        assert "Only bob" in result.output and "Traceback" not in result.output
    unchanged = alice.get_experiment(bob_exp.id)
    assert unchanged.note == original.note
    cli("experiment", "favourite", bob_exp.id, user="alice")  # a star is per person: anyone's
    assert alice.get_experiment(bob_exp.id).favourite
    assert not store_for(db, "bob").get_experiment(bob_exp.id).favourite
    # the creator may
    cli("experiment", "note", bob_exp.id, "checked", user="bob")
    cli("experiment", "favourite", bob_exp.id, user="bob")
    assert alice.get_experiment(bob_exp.id).note == "checked"
    cli("experiment", "delete", copy.id, "--yes", user="alice")
    assert [r.experiment.id for r in alice.list_experiments()] == [bob_exp.id]


def test_export_round_trips(cli, db, tmp_path):
    cli("experiment", "import", PRISON)
    exp = store_for(db).list_experiments()[0].experiment
    out = tmp_path / "exported.yaml"
    cli("experiment", "export", exp.id[:5], "--out", str(out))
    from simulator.experiment import load_experiment

    assert load_experiment(out) == load_experiment(PRISON)
    # an existing file (an edited copy, say) is kept unless --force
    out.write_text("# my edits\n")
    refused = cli("experiment", "export", exp.id[:5], "--out", str(out), ok=False)
    assert refused.exit_code == 1 and "--force" in refused.output
    assert out.read_text() == "# my edits\n"
    cli("experiment", "export", exp.id[:5], "--out", str(out), "--force")
    assert load_experiment(out) == load_experiment(PRISON)


def _messages(store: Store, exp_id: str) -> list[tuple]:
    out = []
    for rec in store.list_conversations(experiment_id=exp_id):
        t = store.load_transcript(rec.id)
        out.append(
            (
                rec.index,
                [(m.day, m.turn, m.speaker, m.content) for m in t.messages],
                [(s.day, s.content) for s in t.summaries],
            )
        )
    return sorted(out)


def test_resume_after_injected_crash_equals_uninterrupted_run(
    cli, db, monkeypatch, settings, env_for
):
    from simulator.llm import scripted

    args = [
        "--llm",
        "scripted",
        "--messages",
        "8",
        "--days",
        "2",
        "--agents",
        "guard=1,prisoner=2",
        "--speaker",
        "random",
        "--speaker",
        "auto",
        "--repetitions",
        "2",
        "--seed",
        "3",
        "--plain",
    ]
    cli("experiment", "import", PRISON, user="bob")
    reference = store_for(db, "bob").list_experiments()[0].experiment
    cli("run", reference.id, *args, user="bob")
    expected = _messages(store_for(db, "bob"), reference.id)

    cli("experiment", "import", PRISON)
    exp = store_for(db).list_experiments(mine=True)[0].experiment
    scripted.reset_call_counter()
    monkeypatch.setenv(scripted.CRASH_ENV, "13")
    with pytest.raises(scripted.InjectedCrash):
        CliRunner().invoke(
            app,
            ["run", exp.id, *args],
            env={**env_for(settings), "SIMULATOR_USER": "alice"},
            catch_exceptions=False,
        )
    monkeypatch.delenv(scripted.CRASH_ENV)
    store = store_for(db)
    stored = sum(
        len(store.load_transcript(r.id).messages)
        for r in store.list_conversations(experiment_id=exp.id)
    )
    assert 0 < stored < 4 * 8
    cli("resume")
    assert _messages(store, exp.id) == expected
    assert all(r.status == "completed" for r in store.list_conversations(experiment_id=exp.id))
    # with nothing unfinished left, `resume` says so (a batch id of a finished one: refused)
    result = cli("resume", ok=False)
    assert result.exit_code == 1 and "no unfinished batch" in result.output
    batch = store.list_batches(exp.id)[0].id
    result = cli("resume", batch, ok=False)
    assert result.exit_code == 1 and "already finished" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--agents", "guard=0"], "at least 1"),
        (["--agents", "warden=1"], "does not have"),
        (["--days", "0"], "--days must be at least 1"),
        (["--messages", "1"], "at least 2"),
        (["--messages", "4", "--days", "3"], "more than half"),
        (["--llm", "mistral"], "not in experiment"),
        (["--speaker", "loudest"], "unknown"),
    ],
)
def test_bad_grid_flags_are_refused_and_write_nothing(cli, db, args, expected):
    cli("experiment", "import", PRISON)
    store = store_for(db)
    exp = store.list_experiments()[0].experiment
    result = cli("run", exp.id, "--llm", "scripted", *args, ok=False)
    assert result.exit_code == 1
    assert expected in result.output
    assert "Traceback" not in result.output
    assert store.list_batches() == []


def test_unknown_and_ambiguous_ids(cli, db):
    store = store_for(db)
    from simulator.experiment import load_experiment

    ids = [store.insert_experiment(load_experiment(PRISON)).id for _ in range(40)]
    result = cli("experiment", "show", "ffffffffffff", ok=False)
    assert result.exit_code == 1 and "No experiment" in result.output
    result = cli("experiment", "show", "zz", ok=False)
    assert result.exit_code == 1 and "hexadecimal" in result.output
    # with 40 ids, some one-character prefix is shared
    first = {}
    for i in ids:
        first.setdefault(i[0], []).append(i)
    shared = next(k for k, v in first.items() if len(v) > 1)
    result = cli("experiment", "show", shared, ok=False)
    assert result.exit_code == 1 and "more than one" in result.output
    cli("experiment", "show", ids[0])


def test_conversations_and_show(cli, db):
    cli("run", PRISON, "--llm", "scripted", "--messages", "4", "--days", "2", "--plain")
    store = store_for(db)
    exp = store.list_experiments()[0].experiment
    (rec,) = store.list_conversations(experiment_id=exp.id)
    listing = cli("conversations", exp.id[:6])
    assert rec.id[:8] in listing.output
    shown = cli("show", rec.id[:6])
    t = store.load_transcript(rec.id)
    for m in t.messages:
        assert m.speaker in shown.output
    status = cli("status")
    assert "1 completed" in status.output
