"""Scores where people look (issue 11 item 7): `show`, the HTML page, the exports' score
columns; and the score command's own checks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from simulator import export
from simulator.cli import app
from simulator.experiment import experiment_from_yaml
from simulator.grid import make_grid
from simulator.runner import RunOptions, start_batch
from simulator.scoring.run import ScoreOptions, score, scorers_for
from simulator.store import Score, Store

EXP = """\
name: scoreviews
starting_message: Start
llms: [{model: scripted, provider: scripted}]
roles:
  guard: {sections: {starting_prompt: You are a guard.}}
  prisoner: {sections: {starting_prompt: You are a prisoner.}}
scorers:
  length: {kind: python, function: 'tests.scoring_plugin:turns'}
  shouting: {kind: python, level: message, roles: [guard], function: 'tests.scoring_plugin:shouting'}
"""


@pytest.fixture
def scored(db):
    """Two scored conversations of 4 messages: `length` per conversation (python), `shouting`
    per guard message (python)."""
    store = Store.open(db, "alice")
    exp = store.insert_experiment(experiment_from_yaml(EXP, "t"))
    grid = make_grid(
        exp, llms=None, messages=4, days=1, agents=None, speakers=["round_robin"], repetitions=2
    )
    report = start_batch(store, exp, grid, RunOptions())
    assert report.status == "completed"
    records = store.list_conversations(batch_id=report.batch_id)
    result = score(store, exp, records, scorers_for(exp), ScoreOptions())
    assert result.scored == 2 + 4
    return store, exp, report.batch_id, records


def human(store: Store, exp, conv_id: str, value: Any, annotator: str = "ann") -> None:
    """An annotator's answer for `length`, as `annotate import` stores it."""
    version = next(s.version for s in scorers_for(exp) if s.name == "length")
    store.replace_scores(
        [
            Score(
                conv_id,
                "",
                "length",
                version,
                f"human:{annotator}",
                value,
                raw=str(value),
                experiment_id=exp.id,
            )
        ]  # fmt: skip
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- item 3: the score command's own checks ------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-2"])
def test_score_refuses_a_concurrency_below_one_before_anything_else(
    scored, settings, env_for, value
):
    store, exp, batch_id, _ = scored
    before = len(store.list_scores())
    runner = CliRunner()
    for ref in (batch_id, "fedcba987654"):  # a batch, and an id nothing has: same refusal
        result = runner.invoke(app, ["score", ref, "--concurrency", value], env=env_for(settings))
        assert result.exit_code == 1, result.output
        assert f"--concurrency must be at least 1 (got {value})" in result.output
        assert "Traceback" not in result.output
    assert len(store.list_scores()) == before


# --- item 7: show, the HTML page, the exports ---------------------------------------------


def test_show_prints_scores_by_source_and_beside_each_message(scored, settings, env_for):
    store, exp, _, records = scored
    rec = records[0]
    human(store, exp, rec.id, 9)
    result = CliRunner().invoke(app, ["show", rec.id], env=env_for(settings))
    assert result.exit_code == 0, result.output
    out = result.output
    block = out[out.index("Scores") : out.index("Day 1")]
    assert "human:ann: length=9" in block
    assert "python:tests.scoring_plugin:turns: length=4" in block
    assert "python:tests.scoring_plugin:shouting: shouting: 2 messages" in block
    t = store.load_transcript(rec.id)
    lines = out[out.index("Day 1") :].splitlines()
    beside = [i for i, line in enumerate(lines) if line.strip().startswith("scores:")]
    guard_lines = [i for i, line in enumerate(lines) if line.startswith("Guard_")]
    assert len(beside) == 2 == len([m for m in t.messages if m.role == "guard"])
    assert [i - 1 for i in beside] == guard_lines  # each right under a guard's message
    assert all("shouting=" in lines[i] and "(python)" in lines[i] for i in beside)


def test_the_html_page_has_a_scores_table_and_marks_each_scored_message(scored, tmp_path):
    store, exp, batch_id, records = scored
    human(store, exp, records[0].id, 9)
    export.export(store, batch_id, "html", tmp_path)
    folder = tmp_path / export.experiment_folder(exp)
    page = (folder / f"{records[0].id}.html").read_text()
    table = re.search(r'<table class="scores">.*?</table>', page, re.S)
    assert table, page
    rows = re.findall(r'<tr data-scorer="([^"]+)" data-source="([^"]+)" data-level="(\w+)"',
                      table.group(0))  # fmt: skip
    assert sorted(rows) == [
        ("length", "human:ann", "conversation"),
        ("length", "python:tests.scoring_plugin:turns", "conversation"),
        ("shouting", "python:tests.scoring_plugin:shouting", "message"),
    ]
    # each message's block, up to the next one: which carry a score list, with which values
    blocks = re.split(r'(?=<div class="message )', page)[1:]
    marked = [
        (re.search(r'data-role="(\w+)"', b).group(1), re.findall(r"shouting <b>([^<]+)</b>", b))
        for b in blocks
        if '<ul class="scores">' in b
    ]
    stored = sorted(s.value for s in store.list_scores(conversation_id=records[0].id,
                                                      scorer="shouting"))  # fmt: skip
    assert [role for role, _ in marked] == ["guard", "guard"]
    assert sorted(float(v) for _, (v,) in marked) == stored
    assert len(blocks) == 1 + 4  # the researcher's starting message and four agents
    bare = export.conversation_html(exp, records[1], store.load_transcript(records[1].id))
    assert '<table class="scores">' not in bare and '<ul class="scores">' not in bare


def test_exports_have_one_score_column_per_scorer_human_first(scored, tmp_path):
    store, exp, batch_id, records = scored
    human(store, exp, records[0].id, 9)
    result = export.export(store, batch_id, "jsonl", tmp_path)
    rows = read_rows(result.files[0])
    assert len(rows) == 2 * (4 + 1)  # 4 messages and a summary per conversation
    score_cols = [k for k in rows[0] if k.startswith("score_")]
    assert score_cols == ["score_length", "score_shouting"]
    by_conv = {r.id: [row for row in rows if row["conversation_id"] == r.id] for r in records}
    assert {row["score_length"] for row in by_conv[records[0].id]} == {9}  # human wins
    assert {row["score_length"] for row in by_conv[records[1].id]} == {4}  # the function
    stored = {(s.conversation_id, s.message): s.value
              for s in store.list_scores(scorer="shouting")}  # fmt: skip
    for row in rows:
        key = (row["conversation_id"], f"{row['day']}:{row['turn']}")
        if row["kind"] == "message" and row["role"] == "guard":
            assert row["score_shouting"] == stored[key]
        else:
            assert row["score_shouting"] is None
    csv_file = export.export(store, batch_id, "csv", tmp_path).files[0]
    df = pd.read_csv(csv_file)
    assert [c for c in df.columns if c.startswith("score_")] == score_cols
    assert df["score_shouting"].notna().sum() == len(stored) == 4


def test_scores_all_gives_a_column_per_scorer_and_source(scored, tmp_path, settings, env_for):
    store, exp, batch_id, records = scored
    human(store, exp, records[0].id, 9)
    human(store, exp, records[1].id, 7, annotator="bea")
    result = CliRunner().invoke(
        app,
        ["export", batch_id, "-f", "csv", "-o", str(tmp_path), "--scores", "all"],
        env=env_for(settings),
    )
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / export.experiment_folder(exp)).glob("*.csv")
    df = pd.read_csv(path)
    assert [c for c in df.columns if c.startswith("score_")] == [
        "score_length__human_ann",
        "score_length__human_bea",
        "score_length__python_tests_scoring_plugin_turns",
        "score_shouting__python_tests_scoring_plugin_shouting",
    ]
    first = df[df["conversation_id"] == records[0].id]
    assert set(first["score_length__human_ann"]) == {9}
    assert first["score_length__human_bea"].isna().all()
    assert set(first["score_length__python_tests_scoring_plugin_turns"]) == {4}
    result = CliRunner().invoke(
        app, ["export", batch_id, "-f", "csv", "-o", str(tmp_path), "--scores", "some"],
        env=env_for(settings),
    )  # fmt: skip
    assert result.exit_code == 1 and "--scores 'some': choose one of" in result.output


def test_an_edited_rubric_shows_its_own_version_only(scored, tmp_path):
    store, exp, batch_id, records = scored
    old = Score(records[0].id, "", "length", "0ld", "human:ann", 99, experiment_id=exp.id)
    store.replace_scores([old])
    rows = read_rows(export.export(store, batch_id, "jsonl", tmp_path).files[0])
    assert {r["score_length"] for r in rows if r["conversation_id"] == records[0].id} == {4}


def test_txt_listing_has_conversation_scores_with_message_means(scored, tmp_path):
    store, exp, batch_id, records = scored
    export.export(store, batch_id, "txt", tmp_path)
    listing = pd.read_csv(tmp_path / export.experiment_folder(exp) / "conversations.csv")
    assert len(listing) == 2
    for rec in records:
        row = listing[listing["conversation_id"] == rec.id].iloc[0]
        shouting = [s.value for s in store.list_scores(conversation_id=rec.id, scorer="shouting")]
        assert row["score_length"] == 4
        assert row["score_shouting"] == pytest.approx(sum(shouting) / len(shouting), abs=1e-4)


def test_a_conversation_without_scores_has_empty_score_cells(scored, tmp_path):
    store, exp, batch_id, records = scored
    grid = make_grid(exp, llms=None, messages=2, days=1, agents=None, speakers=["round_robin"])
    unscored = start_batch(store, exp, grid, RunOptions()).batch_id
    rows = read_rows(export.export(store, unscored, "jsonl", tmp_path).files[0])
    assert len(rows) == 2 + 1
    assert all(r["score_length"] is None and r["score_shouting"] is None for r in rows)
    none = read_rows(export.export(store, batch_id, "jsonl", tmp_path, scores="none").files[0])
    assert len(none) == 10 and not [k for k in none[0] if k.startswith("score_")]


def test_an_experiment_nothing_scored_exports_without_score_columns(db, tmp_path):
    store = Store.open(db, "alice")
    exp = store.insert_experiment(experiment_from_yaml(EXP, "t"))
    grid = make_grid(exp, llms=None, messages=2, days=1, agents=None, speakers=["round_robin"])
    batch_id = start_batch(store, exp, grid, RunOptions()).batch_id
    path = export.export(store, batch_id, "csv", tmp_path).files[0]
    assert list(pd.read_csv(path).columns) == export.columns(exp)


# --- item 4: txt prompts per combination of factor levels ----------------------------------

FACTORIAL = """\
name: factorial
starting_message: Start
llms: [{model: scripted, provider: scripted}]
roles:
  guard: {sections: {starting_prompt: You are a guard.}}
  prisoner: {sections: {starting_prompt: You are a prisoner.}}
summarizer: {sections: {starting_prompt: You summarize.}}
factors:
  risks:
    "yes": {shared.risks: RISKS-SPELLED-OUT}
    "no": {shared.risks: null}
  goal:
    yard: {prisoner.goal: GOAL-YARD, summarizer.format: FORMAT-YARD}
    escape: {prisoner.goal: GOAL-ESCAPE, summarizer.format: FORMAT-ESCAPE}
"""


def test_txt_writes_the_prompts_of_each_combination_of_factor_levels(db, tmp_path):
    store = Store.open(db, "alice")
    exp = store.insert_experiment(experiment_from_yaml(FACTORIAL, "t"))
    grid = make_grid(
        exp, llms=None, messages=2, days=1, agents=None, speakers=["round_robin"],
        factors={"risks": ["yes", "no"], "goal": ["yard", "escape"]},
    )  # fmt: skip
    batch_id = start_batch(store, exp, grid, RunOptions()).batch_id
    export.export(store, batch_id, "txt", tmp_path)
    folder = tmp_path / export.experiment_folder(exp)
    listing = pd.read_csv(folder / "conversations.csv")
    assert len(listing) == 4 and listing["prompts"].nunique() == 4
    records = {r.id: r for r in store.list_conversations(batch_id=batch_id, prompts=True)}
    for row in listing.itertuples():
        rec = records[row.conversation_id]
        levels = rec.spec.factors
        prisoner = (folder / row.prompts / "prisoner.txt").read_text()
        summarizer = (folder / row.prompts / "summarizer.txt").read_text()
        goal = "GOAL-YARD" if levels["goal"] == "yard" else "GOAL-ESCAPE"
        assert goal in prisoner
        assert ("RISKS-SPELLED-OUT" in prisoner) == (levels["risks"] == "yes")
        assert f"FORMAT-{levels['goal'].upper()}" in summarizer
        # what the conversation's agents were given (tags filled: none here)
        stored = {a.role: a.system_prompt for a in rec.agents}
        assert stored["prisoner"] + "\n" == prisoner
    assert not (folder / "prompts" / "prisoner.txt").exists()  # no factor-blind prompts


def test_exports_read_scores_in_one_query_per_chunk_not_per_conversation(
    scored, mongo_server, db, tmp_path
):
    """Scores come with the transcripts, one `find` on scores per 50 conversations (and one
    aggregate for the columns), whatever the number of conversations."""
    from pymongo import MongoClient, monitoring

    store, exp, batch_id, records = scored
    grid = make_grid(
        exp, llms=None, messages=2, days=1, agents=None, speakers=["round_robin"], repetitions=3
    )
    more = start_batch(store, exp, grid, RunOptions()).batch_id
    score(store, exp, store.list_conversations(batch_id=more), scorers_for(exp), ScoreOptions())

    class Commands(monitoring.CommandListener):
        def __init__(self) -> None:
            self.seen: list[tuple[str, str]] = []

        def started(self, event: monitoring.CommandStartedEvent) -> None:
            self.seen.append((event.command_name, str(event.command.get(event.command_name))))

        def succeeded(self, event: Any) -> None:
            pass

        def failed(self, event: Any) -> None:
            pass

    listener = Commands()
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server, event_listeners=[listener])
    try:
        watched = Store(client[db.name], "alice")
        rows = read_rows(export.export(watched, exp.id or "", "jsonl", tmp_path).files[0])
    finally:
        client.close()
    assert len({r["conversation_id"] for r in rows}) == 5
    on_scores = [name for name, coll in listener.seen if coll == "scores"]
    assert on_scores == ["aggregate", "find"], listener.seen
