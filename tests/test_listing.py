"""Listings at scale and their filters (issue 9, items 11 and 19): a fixed number of queries
whatever the number of conversations, no `$in` over every id, no prompts loaded; `status`
for everyone's batches with experiment names and plurals; `conversations` by experiment id,
name or batch id, filtered with --where."""

from __future__ import annotations

import pytest

from simulator import export
from simulator.errors import NotFoundError, UserError
from simulator.experiment import load_experiment
from simulator.store import Store, conversation_filter
from tests.scenarios import PRISON_ONE
from tests.test_data_safety import _longest_in, cli_for, fill, run_batch, watched  # noqa: F401

PRISON = PRISON_ONE  # one of the 72 scenarios: these tests are not about factors


def _queries(commands) -> list[dict]:
    return commands.named("find", "aggregate", "count")


def test_listing_many_conversations_takes_a_fixed_number_of_queries(watched, db):  # noqa: F811 (fixtures)
    store, commands = watched("alice")
    exp = store.insert_experiment(load_experiment(PRISON))
    batch_id = fill(db, store, exp.id, 240)
    commands.seen.clear()
    records = store.list_conversations(experiment_id=exp.id)
    assert len(records) == 240 and all(r.message_count == 2 for r in records)
    assert [r.index for r in records] == list(range(240))
    assert len(_queries(commands)) <= 2, [b for b in _queries(commands)]
    assert max(_longest_in(b) for b in _queries(commands)) <= 1
    # the listing does not load the prompts
    (find,) = commands.named("find")
    assert find["projection"] == {"agents.system_prompt": 0, "summarizer_prompt": 0}
    assert records[0].agents and records[0].agents[0].system_prompt == ""
    assert (
        store.list_conversations(batch_id=batch_id, limit=1, prompts=True)[0]
        .agents[0]
        .system_prompt.startswith("You are")
    )


def test_export_reads_transcripts_a_chunk_at_a_time(watched, db, tmp_path):  # noqa: F811 (fixtures)
    store, commands = watched("alice")
    exp = store.insert_experiment(load_experiment(PRISON))
    fill(db, store, exp.id, 120)
    commands.seen.clear()
    result = export.export(store, exp.id, "csv", tmp_path)
    assert result.rows == 240
    # three queries (messages, summaries, selector calls) per 50 conversations, not per one
    assert len(_queries(commands)) <= 3 * 3 + 6, len(_queries(commands))
    assert max(_longest_in(b) for b in _queries(commands)) <= 50


def test_status_all_names_and_plurals(cli_for, db):  # noqa: F811 (fixtures)
    alice = Store.open(db, "alice")
    exp = alice.insert_experiment(load_experiment(PRISON))
    mine = run_batch(db, "alice", exp.id, repetitions=1)
    bobs = run_batch(db, "bob", exp.id, repetitions=2)
    own = cli_for("alice", "status", "--mine")
    assert own.exit_code == 0, own.output
    assert mine in own.output and bobs not in own.output
    assert "prison" in own.output and exp.id[:8] in own.output
    assert "of 1 conversation ·" in own.output and "1 conversations" not in own.output
    everyone = cli_for("alice", "status", "--all")
    assert mine in everyone.output and bobs in everyone.output
    assert "of 2 conversations" in everyone.output


def test_conversations_by_name_batch_and_where(cli_for, db):  # noqa: F811 (fixtures)
    alice = Store.open(db, "alice")
    exp = alice.insert_experiment(load_experiment(PRISON))
    first = run_batch(db, "alice", exp.id, repetitions=2)
    second = run_batch(db, "alice", exp.id, repetitions=1)
    by_batch = {r.id: r.batch_id for r in alice.list_conversations(experiment_id=exp.id)}

    def listed(*args: str) -> set[str]:
        result = cli_for("alice", "conversations", *args)
        assert result.exit_code == 0, result.output
        return {i for i in by_batch if i[:8] in result.output}

    assert listed(exp.id[:6]) == set(by_batch)
    assert listed("prison") == set(by_batch)
    assert listed(second) == {i for i, b in by_batch.items() if b == second}
    assert listed(first[:7]) == {i for i, b in by_batch.items() if b == first}
    assert listed("prison", "--where", "status=completed", "-w", "agents_guard=1") == set(by_batch)
    assert listed("prison", "--where", "status=failed") == set()
    assert listed("prison", "--where", "llm=scripted", "--where", "days=1") == set(by_batch)
    assert listed("prison", "--where", "days=2") == set()
    assert len(listed("prison", "--limit", "1")) == 1
    bad = cli_for("alice", "conversations", "prison", "--where", "colour=red")
    assert bad.exit_code == 1 and "agents_<role>" in bad.output and "speaker" in bad.output
    assert "Traceback" not in bad.output
    missing = cli_for("alice", "conversations", "no-such-name")
    assert missing.exit_code == 1 and "No experiment" in missing.output


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"days": "two"}, "whole number"),
        ({"status": "done"}, "a status is one of"),
    ],
)
def test_where_is_validated(where, message):
    with pytest.raises(UserError, match=message):
        conversation_filter(where)


def test_where_on_the_library(db):
    store = Store.open(db, "alice")
    exp = store.insert_experiment(load_experiment(PRISON))
    run_batch(db, "alice", exp.id, repetitions=2)
    assert len(store.list_conversations(experiment_id=exp.id, where={"repetition": "1"})) == 1
    assert len(store.list_conversations(experiment_id=exp.id, where={"creator": "bob"})) == 0
    assert len(store.list_conversations(experiment_id=exp.id, where={"speaker": "random"})) == 0
    # the export's column names work as keys too (speaker_selection, factor_<name>)
    for key in ("speaker", "speaker_selection"):
        listed = store.list_conversations(experiment_id=exp.id, where={key: "round_robin"})
        assert len(listed) == 2


def test_an_ambiguous_reference_is_refused(db):
    store = Store.open(db, "alice")
    exp = store.insert_experiment(load_experiment(PRISON))
    other = load_experiment(PRISON)
    other.name = exp.id[:4]  # a name that is also a prefix of an id
    store.insert_experiment(other)
    with pytest.raises(NotFoundError, match="could mean"):
        store.find_experiment_or_batch(exp.id[:4])
    assert store.find_experiment_or_batch(exp.id)[1].id == exp.id


def test_a_limited_listing_reads_a_page_not_the_experiment(watched, db):  # noqa: F811 (fixtures)
    """`conversations EXP` (50 by default) costs a page of documents, not the experiment's
    thousands: every query is bounded by a range of grid indexes or a short list of ids."""
    store, commands = watched("alice")
    exp = store.insert_experiment(load_experiment(PRISON))
    first = fill(db, store, exp.id, 300)
    second = fill(db, store, exp.id, 300)
    commands.seen.clear()
    records = store.list_conversations(experiment_id=exp.id, limit=51)
    assert [(r.batch_id, r.index) for r in records] == [(first, i) for i in range(51)]
    assert all(r.message_count == 2 for r in records)
    for body in commands.named("find", "aggregate", "count"):
        coll = body.get("find") or body.get("aggregate") or body.get("count")
        if coll == "conversations":
            query = body["filter"]
            assert query.get("batch_id") is None or "index" in query, query
            if "index" in query:
                assert query["index"]["$lt"] - query["index"]["$gte"] <= 200, query
        elif coll == "messages":
            assert _longest_in(body) <= 50 and "batch_id" not in str(body["pipeline"]), body
    # a page that runs over into the next batch, and a filter checked page by page
    records = store.list_conversations(experiment_id=exp.id, limit=320)
    assert [(r.batch_id, r.index) for r in records][299:301] == [(first, 299), (second, 0)]
    db.conversations.update_one({"batch_id": second, "index": 7}, {"$set": {"status": "failed"}})
    failed = store.list_conversations(experiment_id=exp.id, where={"status": "failed"}, limit=5)
    assert [(r.batch_id, r.index) for r in failed] == [(second, 7)]
