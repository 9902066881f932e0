"""import-legacy: a database in the prototype's real shapes (tests/legacy_fixture.py),
imported through the CLI, checked through the store, imported again without duplicates."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pytest
from bson import ObjectId
from typer.testing import CliRunner

from simulator import legacy, placeholders, prompts
from simulator.cli import app
from simulator.store import Store
from tests import legacy_fixture as fx


@pytest.fixture
def prototype(mongo_client):
    """A second database on the shared test server, written the way the prototype wrote it."""
    source = mongo_client[f"proto_{uuid.uuid4().hex[:10]}"]
    ids = fx.build(source)
    yield source, ids
    mongo_client.drop_database(source.name)


def _rows(db) -> dict[str, int]:
    """Documents in every collection the import writes to."""
    names = ("experiments", "batches", "conversations", "messages", "summaries")
    return {name: db[name].count_documents({}) for name in names}


def _import(runner, env, mongo_server, source):
    result = runner.invoke(
        app, ["import-legacy", "--uri", mongo_server, "--db", source.name], env=env
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_import_of_the_prototypes_database(prototype, settings, env_for, mongo_server, db):
    source, ids = prototype
    runner, env = CliRunner(), env_for(settings)
    output = _import(runner, env, mongo_server, source)
    rows = _rows(db)
    assert rows == {"experiments": 2, "batches": 2, "conversations": 4, "messages": 16,
                    "summaries": 3}  # fmt: skip
    assert rows["messages"] == ids.messages
    assert "Experiments: 2 imported" in output and "Conversations: 4 imported" in output

    again = _import(runner, env, mongo_server, source)
    assert _rows(db) == rows  # nothing imported twice
    assert "Experiments: 0 imported, 2 already there" in again
    assert "Conversations: 0 imported, 4 already there" in again

    store = Store(db, "alice")
    imported = store.imported("experiments")
    assert set(imported) == {ids.prison, ids.negotiation}
    prison = store.get_experiment(imported[ids.prison])
    assert prison.name == "guards-and-prisoners-risk-scenario"  # the note's first words
    assert (prison.note, prison.favourite, prison.creator) == (fx.PRISON_NOTE, False, "marco")
    assert Store(db, "marco").get_experiment(prison.id or "").favourite  # the creator's star
    assert prison.created_at == datetime(2024, 5, 1, 9, 30)
    assert prison.starting_message == fx.START
    assert [r.name for r in prison.roles] == ["guard", "prisoner"]
    # human titles become keys, in index order; tags as this tool writes them
    assert prison.role("guard").sections == {
        "starting_prompt": fx.GUARD_START.replace("<GUARD_VERB_be>", "<GUARD_VERB_BE>"),
        "goal": "Keep order without violence.",
    }
    assert list(prison.role("prisoner").sections) == ["starting_prompt", "goal"]
    assert prison.shared_sections == {"communication_rules": fx.RULES,
                                      "research_oversight": "A researcher watches."}  # fmt: skip
    assert list(prison.shared_sections) == ["communication_rules", "research_oversight"]
    assert list(prison.summarizer.sections) == ["starting_prompt", "format"]
    assert [(s.label, s.temperature, s.top_k, s.top_p) for s in prison.llms] == [
        ("ollama/llama3:latest", 0.7, 40, 0.9),
        ("ollama/gemma:2b", 0.5, 20, 0.8),
    ]
    negotiation = store.get_experiment(imported[ids.negotiation])
    assert negotiation.name == f"legacy-{ids.negotiation[:8]}"  # no note: named by its id
    assert negotiation.creator == "giulia"

    convs = store.imported("conversations")
    assert set(convs) == set(ids.conversations.values())
    (batch,) = store.list_batches(prison.id)
    assert (batch.status, batch.total, batch.creator) == ("completed", 3, "marco")

    c1 = store.get_conversation(convs[ids.conversations["c1"]])
    assert (c1.batch_id, c1.index, c1.status) == (batch.id, 0, "completed")
    assert (c1.creator, c1.created_at) == ("marco", datetime(2024, 5, 2, 10, 0))
    assert (c1.favourited_by, c1.note) == (["marco"], "calm one")
    assert (c1.spec.llm.label, c1.spec.llm.temperature, c1.spec.days) == (
        "ollama/llama3:latest", 0.7, 2)  # fmt: skip
    assert c1.spec.messages == 4  # n_messages=6 over 2 days: each day's opening took a round
    assert c1.spec.agents == {"guard": 1, "prisoner": 1} and c1.spec.speaker == "round_robin"
    assert [(a.name, a.role) for a in c1.agents] == [("Guard_117", "guard"),
                                                     ("Prisoner_221", "prisoner")]  # fmt: skip
    assert c1.agents[0].system_prompt.startswith(
        "You are a guard in a simulated prison. There is 1 guard and 1 prisoner."
        "\n\n## Goal\n\nKeep order without violence."
    )
    assert "## Communication rules\n\nAnswer in at most 2 sentences. There are 2 roles." in (
        c1.agents[0].system_prompt
    )
    t = store.load_transcript(c1.id)
    assert [(m.day, m.turn, m.speaker, m.role, m.content) for m in t.messages] == [
        (1, 1, "Guard_117", "guard", "Back to your cells."),
        (1, 2, "Prisoner_221", "prisoner", "One more hour, please."),
        (2, 1, "Guard_117", "guard", "Still no."),
        (2, 2, "Prisoner_221", "prisoner", "Then we wait."),
    ]
    # day 1's summary came from day 2's opening; the last day's was never stored
    assert [(s.day, s.content) for s in t.summaries] == [(1, fx.SUMMARIES["c1"][0])]

    c2 = store.get_conversation(convs[ids.conversations["c2"]])
    assert (c2.index, c2.creator, c2.spec.speaker) == (1, "giulia", "random")
    assert (c2.spec.llm.label, c2.spec.llm.top_k) == ("ollama/gemma:2b", 20)
    assert c2.spec.agents == {"guard": 1, "prisoner": 2} and c2.spec.messages == 6
    assert [a.name for a in c2.agents] == ["Guard_005", "Prisoner_310", "Prisoner_042"]
    assert "There is 1 guard and 2 prisoners." in c2.agents[0].system_prompt
    t = store.load_transcript(c2.id)
    assert [(m.day, m.turn, m.speaker) for m in t.messages][3:] == [
        (2, 1, "Prisoner_042"), (2, 2, "Guard_005"), (2, 3, "Prisoner_310")]  # fmt: skip
    assert [s.content for s in t.summaries] == [fx.SUMMARIES["c2"][0]]

    c3 = store.get_conversation(convs[ids.conversations["c3"]])
    assert c3.status == "incomplete" and "2 agent message(s) of 3" in (c3.error or "")

    n1 = store.get_conversation(convs[ids.conversations["n1"]])
    assert n1.experiment_id == negotiation.id and n1.spec.agents == {"buyer": 1, "seller": 1}
    assert len(store.load_transcript(n1.id).messages) == 4

    problems = [line for line in output.splitlines() if line.startswith("Problem:")]
    text = "\n".join(problems)
    for what in (ids.ghost, ids.missing_message, ids.orphan_conversation, ids.orphan_message):
        assert what in text, what
    assert len(problems) == 4  # one line per problem, nothing else
    assert "Note:" in output and "<GUARD_VERB_BE>" in output  # verb agreement differs


def test_the_problem_report_is_one_readable_line_per_problem(prototype, db):
    """A role without a usable name, an untitled section, a bad LLM: named, never dumped."""
    source, _ = prototype
    role = {"name": {"first": "guard"}, "sections": [], "placeholders": []}
    bad = {
        "_id": ObjectId(), "starting_message": fx.START, "note": "broken", "favourite": False,
        "creator": "marco", "creation_date": datetime(2024, 7, 1),
        "llms": [{**fx.LLAMA, "temperature": 7.5}],
        "roles": [role, {"name": "prison guard", "sections": [
            fx.section(0, "Starting prompt", "x " * 500, "Private", "prison guard")],
            "placeholders": []}],
        "shared_sections": [fx.section(0, "", "Untitled but kept.", "Shared")],
        "summarizer_sections": "not a list", "placeholders": [], "conversation_ids": [],
    }  # fmt: skip
    source.experiments.insert_one(bad)
    report = legacy.import_legacy(Store.open(db, "alice"), source)
    lines = [p for p in report.problems if str(bad["_id"]) in p]
    assert len(lines) >= 4
    for line in lines:
        assert "\n" not in line and len(line) < 300, line
        assert "{" not in line and "x x x x" not in line, line  # no document, no content
    text = "\n".join(lines)
    assert "roles[0] has no name (got a document)" in text
    assert "prison guard" in text and "temperature" in text and "summarizer_sections" in text
    assert f"experiment {bad['_id']} is not valid here; skipped" in text
    assert report.experiments == 2  # the others still came in


def test_literal_angle_text_is_kept_or_reported(prototype, db):
    """`<END>` was plain text for the prototype (it replaced only declared tags)."""
    source, _ = prototype
    doc = {
        "_id": ObjectId(), "starting_message": fx.START, "note": "literal", "favourite": False,
        "creator": "marco", "creation_date": datetime(2024, 7, 1), "llms": [fx.LLAMA],
        "roles": [{"name": "guard", "placeholders": ["<GUARD_NUM>"], "sections": [
            fx.section(0, "Starting prompt", "End with <END>. <GUARD_NUM> here.", "Private",
                       "guard")]}],
        "shared_sections": [], "summarizer_sections": [], "placeholders": [],
        "conversation_ids": [],
    }  # fmt: skip
    source.experiments.insert_one(doc)
    store = Store.open(db, "alice")
    report = legacy.import_legacy(store, source)
    where = f"experiment {doc['_id']}"
    if hasattr(placeholders, "escape"):  # item 15's escape: kept as literal text
        exp = store.get_experiment(store.imported("experiments")[str(doc["_id"])])
        assert prompts.agent_prompt(exp, "guard", {"guard": 1}) == "End with <END>. 1 here."
        assert any(where in n and "<END>" in n for n in report.notes)
    else:  # without one the experiment cannot be stored as written: said in one line
        assert report.experiments == 2 and str(doc["_id"]) not in store.imported("experiments")
        (line,) = [p for p in report.problems if where in p and "<END>" in p]
        assert "cannot be written here" in line and "GUARD_NUM" not in line


@pytest.mark.parametrize(
    ("title", "key"),
    [
        ("Starting prompt", "starting_prompt"),
        ("Communication rules", "communication_rules"),
        ("  Rules: do's & don'ts ", "rules_do_s_don_ts"),
        ("Obiettivo è chiaro", "obiettivo_e_chiaro"),
        ("2nd phase", "section_2nd_phase"),
        ("", "section"),
        (None, "section"),
    ],
)
def test_section_titles_become_keys(title, key):
    assert legacy.section_key(title, set()) == key


def test_repeated_titles_stay_apart():
    taken: set[str] = set()
    assert [legacy.section_key("Goal", taken) for _ in range(3)] == ["goal", "goal_2", "goal_3"]


@pytest.mark.parametrize(
    ("text", "declared", "expected", "undeclared"),
    [
        ("There <GUARD_VERB_be> <GUARD_NUM>", {"<GUARD_VERB_be>", "<GUARD_NUM>"},
         "There <GUARD_VERB_BE> <GUARD_NUM>", set()),
        ("<AGENTS_NUM> agents", {"<AGENTS_NUM>"}, "<AGENTS_NUM> agents", set()),
        ("<GUARD_PRON> speaks", set(), "<GUARD_PRON> speaks", {"<GUARD_PRON>"}),
        ("a <b>bold</b> a < b", set(), "a <b>bold</b> a < b", set()),
    ],
)  # fmt: skip
def test_prototype_tags_are_written_as_this_tools(text, declared, expected, undeclared):
    mapping = legacy.TagMapping()
    assert legacy.map_tags(text, ["guard"], declared, mapping) == expected
    assert mapping.undeclared == undeclared and not mapping.unmapped


def test_openings_give_back_the_summaries():
    opening = f"{fx.START}\nDay 1 summary:\n First.\nDay 2 summary:\n Second,\non two lines."
    assert legacy.split_opening(opening) == (fx.START, {1: "First.", 2: "Second,\non two lines."})
    assert legacy.split_opening(f"{fx.START}\nDay 1 summary: Same line.")[1] == {1: "Same line."}


def test_expected_messages_count_each_opening_as_a_round():
    assert [legacy.expected_messages(n, d) for n, d in [(6, 2), (8, 2), (20, 1), (7, 2)]] == [
        4, 6, 19, 4]  # fmt: skip
    assert legacy.expected_messages(None, 2) == 0


def test_an_interrupted_import_is_completed_by_the_next_run(prototype, db, monkeypatch):
    source, ids = prototype
    store = Store.open(db, "alice")
    real = Store.finish_conversation
    calls: list[Any] = []

    def crash_on_second(self, conv_id, *args, **kwargs):
        calls.append(conv_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, conv_id, *args, **kwargs)

    monkeypatch.setattr(Store, "finish_conversation", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        legacy.import_legacy(store, source)
    monkeypatch.setattr(Store, "finish_conversation", real)
    report = legacy.import_legacy(store, source)
    assert (report.experiments, report.experiments_present) == (1, 1)
    assert (report.conversations, report.conversations_present) == (3, 1)
    assert _rows(db) == {"experiments": 2, "batches": 2, "conversations": 4, "messages": 16,
                         "summaries": 3}  # fmt: skip


def test_import_legacy_refuses_wrong_sources(prototype, settings, env_for, mongo_server, db):
    source, _ = prototype
    runner = CliRunner()
    env = env_for(settings)
    # the simulator's own database is never a source; an unknown one is named
    for name in (db.name, "no_such_db"):
        result = runner.invoke(app, ["import-legacy", "--uri", mongo_server, "--db", name], env=env)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
        assert name in result.output
    closed = runner.invoke(
        app, ["import-legacy", "--uri", "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=300",
              "--db", source.name], env=env,
    )  # fmt: skip
    assert closed.exit_code == 1 and "Cannot reach" in closed.output
    assert _rows(db)["experiments"] == 0
