"""The analysis dataframes (issue 12, item 1): columns and dtypes against the store for a
factorial scripted batch, a fixed number of queries whatever the number of conversations,
parquet round trips (and `export --format parquet`), empty cases, lazy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from pymongo import MongoClient, monitoring
from typer.testing import CliRunner

from simulator.analysis import conversations_df, messages_df, scores_df
from simulator.analysis.frames import require, score_column
from simulator.cli import app
from simulator.errors import MissingExtra
from simulator.experiment import experiment_from_yaml
from simulator.grid import make_grid
from simulator.runner import RunOptions, start_batch
from simulator.scoring.run import ScoreOptions, score, scorers_for
from simulator.store import Store

FACTORIAL = """\
name: factorial
starting_message: Start
llms:
  - {model: scripted, provider: scripted, temperature: 0.5}
roles:
  guard: {sections: {starting_prompt: You are a guard.}}
  prisoner: {sections: {starting_prompt: You are a prisoner.}}
factors:
  risks:
    "yes": {shared.risks: RISKS}
    "no": {shared.risks: null}
  goal:
    yard: {prisoner.goal: YARD}
    escape: {prisoner.goal: ESCAPE}
scorers:
  length: {kind: python, function: 'tests.scoring_plugin:turns'}
  shouting: {kind: python, level: message, roles: [guard], function: 'tests.scoring_plugin:shouting'}
"""


def run_factorial(store: Store, repetitions: int = 1) -> str:
    exp = store.insert_experiment(experiment_from_yaml(FACTORIAL, "factorial.yaml"))
    grid = make_grid(exp, llms=None, messages=4, days=2, agents={"guard": 1, "prisoner": 2},
                     speakers=["round_robin"], repetitions=repetitions)  # fmt: skip
    report = start_batch(store, exp, grid, RunOptions())
    records = store.list_conversations(batch_id=report.batch_id)
    score(store, exp, records, scorers_for(exp), ScoreOptions())
    return exp.id or ""


@pytest.fixture
def factorial(db):
    store = Store.open(db, "alice")
    return store, run_factorial(store)


def test_conversations_df_columns_and_dtypes_match_the_store(factorial):
    store, exp_id = factorial
    df = conversations_df(store, exp_id)
    records = {r.id: r for r in store.list_conversations(experiment_id=exp_id)}
    assert len(df) == len(records) == 4
    scores = {s.conversation_id: s for s in store.list_scores(scorer="length")}
    length = score_column("length", scores[next(iter(scores))].source)
    assert {
        "llm",
        "temperature",
        "days",
        "messages",
        "agents_guard",
        "agents_prisoner",
        "speaker_selection",
        "repetition",
        "seed",
        "factor_risks",
        "factor_goal",
        "status",
        "usable",
        "flag_repeated",
        "fallbacks",
        "prompt_tokens",
        "calls",
        length,
    } <= set(df)
    assert not any(c.startswith("shouting@") for c in df)  # message level: in messages_df
    dtypes = df.dtypes.astype(str).to_dict()
    assert dtypes["days"] == "Int64" and dtypes["agents_guard"] == "Int64"
    assert dtypes["factor_risks"] == "string" and dtypes["status"] == "string"
    assert dtypes["usable"] == "boolean" and dtypes["temperature"] == "float64"
    assert dtypes[length] == "Int64" and dtypes["prompt_tokens"] == "Int64"
    for _, row in df.iterrows():
        rec = records[row["conversation_id"]]
        assert row["llm"] == rec.spec.llm.label and row["days"] == rec.spec.days
        assert row["agents_prisoner"] == rec.spec.agents["prisoner"]
        assert row["factor_risks"] == rec.spec.factors["risks"]
        assert row["factor_goal"] == rec.spec.factors["goal"]
        assert row["status"] == rec.status.value and row["usable"] == rec.quality.usable
        assert row["messages_stored"] == rec.message_count == 4
        assert row["prompt_tokens"] == sum(u.prompt_tokens for u in rec.usage.values())
        assert row["calls"] == sum(u.calls for u in rec.usage.values())
        assert row[length] == scores[rec.id].value == 4
    assert {tuple(sorted(r.spec.factors.items())) for r in records.values()} == {
        tuple(sorted({"risks": r, "goal": g}.items()))
        for r in ("yes", "no")
        for g in ("yard", "escape")
    }


def test_messages_df_rows_and_scores_match_the_transcripts(factorial):
    store, exp_id = factorial
    df = messages_df(store, exp_id, where=["risks=yes"])
    records = store.list_conversations(experiment_id=exp_id, where={"factor_risks": "yes"},
                                       factors={"risks": ["yes", "no"]})  # fmt: skip
    assert set(df["conversation_id"]) == {r.id for r in records}
    shouting = {
        (s.conversation_id, s.message): s.value for s in store.list_scores(scorer="shouting")
    }
    (column,) = [c for c in df if c.startswith("shouting@")]
    dtypes = df.dtypes.astype(str).to_dict()
    assert dtypes["position"] == "Int64" and dtypes["flag_repeated"] == "boolean"
    assert dtypes["role"] == "string" and dtypes[column] == "float64"
    for rec in records:
        mine = df[df["conversation_id"] == rec.id]
        transcript = store.load_transcript(rec.id)
        assert list(mine["position"]) == list(range(1, len(transcript.messages) + 1))
        assert list(mine["speaker"]) == [m.speaker for m in transcript.messages]
        assert list(mine["turn"]) == [m.turn for m in transcript.messages]
        assert list(mine["day"]) == [m.day for m in transcript.messages]
        assert (mine["factor_risks"] == "yes").all()
        for _, row in mine.iterrows():
            key = (rec.id, f"{row['day']}:{row['turn']}")
            if row["role"] == "guard":
                assert row[column] == shouting[key]
            else:
                assert pd.isna(row[column])  # the scorer only rates guards


def test_scores_df_has_one_row_per_stored_score(factorial):
    store, exp_id = factorial
    df = scores_df(store, exp_id)
    stored = store.list_scores(experiment_id=exp_id)
    assert len(df) == len(stored) == 4 + 4 * 2  # length per conversation, shouting per guard turn
    assert set(df["scorer"]) == {"length", "shouting"} and df["current"].all()
    assert df["source_kind"].eq("python").all() and "factor_goal" in df
    assert df["value_number"].dtype == "float64"


def test_parquet_round_trips_and_export_writes_the_tables(factorial, settings, env_for, tmp_path):
    store, exp_id = factorial
    for frame in (
        conversations_df(store, exp_id),
        messages_df(store, exp_id),
        scores_df(store, exp_id),
    ):
        path = tmp_path / "t.parquet"
        frame.to_parquet(path, index=False)
        pd.testing.assert_frame_equal(pd.read_parquet(path), frame)
    result = CliRunner().invoke(
        app,
        ["export", exp_id[:8], "--format", "parquet", "--out", str(tmp_path / "x")],
        env=env_for(settings),
    )
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "x").iterdir()
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"experiment-{exp_id}-{t}.{ext}" for t in ("conversations", "messages",
                           "scores") for ext in ("csv", "parquet"))  # fmt: skip
    exported = pd.read_parquet(folder / f"experiment-{exp_id}-conversations.parquet")
    pd.testing.assert_frame_equal(exported, conversations_df(store, exp_id))
    messages = pd.read_csv(folder / f"experiment-{exp_id}-messages.csv")
    assert len(messages) == 16


class Counter(monitoring.CommandListener):
    def __init__(self) -> None:
        self.commands: list[str] = []

    def started(self, event) -> None:
        if event.command_name in ("find", "aggregate", "count", "getMore"):
            self.commands.append(event.command_name)

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


def test_the_number_of_queries_does_not_grow_with_the_conversations(db, mongo_server):
    queries = []
    for repetitions in (1, 4):
        listener = Counter()
        client = MongoClient(mongo_server, event_listeners=[listener])
        store = Store.open(client[db.name], "alice")
        exp_id = run_factorial(store, repetitions)
        listener.commands.clear()
        messages_df(store, exp_id[:10])
        conversations_df(store, exp_id[:10])
        scores_df(store, exp_id[:10])
        queries.append(len(listener.commands))
        client.close()
    assert queries[0] == queries[1], queries  # 4 and 16 conversations: the same queries


def test_empty_experiment_gives_empty_tables_with_their_columns(db):
    store = Store.open(db, "alice")
    exp = store.insert_experiment(experiment_from_yaml(FACTORIAL, "factorial.yaml"))
    conversations = conversations_df(store, exp.id or "")
    assert conversations.empty and {"llm", "factor_risks", "usable", "calls"} <= set(conversations)
    assert messages_df(store, exp.id or "").empty and "position" in messages_df(store, exp.id or "")
    assert scores_df(store, exp.id or "").empty


def test_settings_work_as_the_source(factorial, settings):
    store, exp_id = factorial
    assert len(conversations_df(settings, exp_id)) == 4


def test_a_missing_extra_says_how_to_install_it():
    with pytest.raises(MissingExtra, match=r"pip install 'llm-interaction-simulator\[analysis\]'"):
        require("no_such_module_for_the_analysis")


def test_the_cli_starts_without_loading_the_analysis_libraries():
    code = ("import sys, simulator.cli, simulator.analysis; "
            "print(sorted(m for m in ('pandas', 'matplotlib', 'statsmodels', 'pyarrow') "
            "if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_report_module_is_registered_with_help():
    result = CliRunner().invoke(app, ["report", "--help"])
    assert result.exit_code == 0
    assert "--by FACTOR_OR_CONDITION" in result.output and "--usable-only" in result.output
    assert Path(__file__).parent.joinpath("test_report.py").is_file()


def test_one_model_at_two_temperatures_is_two_llm_conditions(db):
    """Two entries of one model with different sampling were one `llm` everywhere: the
    report merged them and compared nothing. Their `llm` says the sampling."""
    two = FACTORIAL.replace(
        "  - {model: scripted, provider: scripted, temperature: 0.5}\n",
        "  - {model: scripted, provider: scripted, temperature: 0.5}\n"
        "  - {model: scripted, provider: scripted, temperature: 0.9}\n",
    )
    store = Store.open(db, "alice")
    exp = store.insert_experiment(experiment_from_yaml(two, "two.yaml"))
    grid = make_grid(exp, llms=None, messages=2, days=1, agents={"guard": 1, "prisoner": 1},
                     speakers=["round_robin"], factors=["risks=yes", "goal=yard"])  # fmt: skip
    assert len(grid.llms) == 2
    start_batch(store, exp, grid, RunOptions())
    df = conversations_df(store, exp.id or "")
    assert sorted(df["llm"]) == [
        "scripted/scripted (temperature=0.5)",
        "scripted/scripted (temperature=0.9)",
    ]
