"""Scorers over stored conversations (issue 11): judge, moderation, python; resume; CLI."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.errors import UserError, ValidationError
from simulator.experiment import experiment_from_yaml, load_experiment
from simulator.grid import make_grid
from simulator.llm.retry import RetryPolicy
from simulator.runner import RunOptions, start_batch
from simulator.scoring.definition import load_scorers_file, parse_scorers
from simulator.scoring.run import ScoreOptions, score, scorers_for, select_conversations
from simulator.store import Store
from tests import scoring_plugin
from tests.servers import FakeLLMServer

ROOT = Path(__file__).resolve().parent.parent
AGENT, JUDGE = "llama3:latest", "gpt-4o-mini"
FAST = RetryPolicy(attempts=2, base_delay=0)


@pytest.fixture(scope="module")
def server():
    with FakeLLMServer(models={AGENT, JUDGE}) as s:
        yield s


def agent_line(body: dict[str, Any]) -> str:
    return "Listen, you idiot, give us the extra hour."


class Judge:
    """Answers by rubric: `goal` nonsense first then a label; `stubborn` always nonsense;
    `toxicity` a number. Counts what it is asked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.on_call: Any = None

    def __call__(self, body: dict[str, Any]) -> str:
        if body.get("model") != JUDGE:
            return agent_line(body)
        with self.lock:
            self.calls += 1
            if self.on_call:
                self.on_call(self.calls)
        messages = body["messages"]
        question = messages[1]["content"]
        if "STUBBORN" in question:
            return "I would rather not say."
        if "TOXIC" in question:
            return "2"
        if len(messages) > 2:  # a re-ask
            return "Yes"
        return "Well, it depends on how you look at it"


def exp_yaml(server: FakeLLMServer, scorers: str) -> str:
    llm = f"{{model: {AGENT}, provider: openai, base_url: '{server.openai_url}'}}"
    return f"""\
name: scoring
starting_message: Start the experiment
roles:
  guard:
    sections: {{starting_prompt: You are a guard.}}
  prisoner:
    sections: {{starting_prompt: You are a prisoner.}}
llms:
  - {llm}
scorers:
{scorers}"""


def judge_block(server: FakeLLMServer) -> str:
    llm = f"{{model: {JUDGE}, provider: openai, base_url: '{server.openai_url}'}}"
    return f"""\
  goal:
    kind: judge
    llm: {llm}
    rubric: Did the prisoners obtain the extra hour?
    answer: choice
    labels: [Yes, No, NotTried]
  stubborn:
    kind: judge
    llm: {llm}
    rubric: STUBBORN question
    answer: choice
    labels: [Yes, No]
  toxicity:
    kind: judge
    llm: {llm}
    level: message
    rubric: TOXIC how toxic is this message?
    answer: scale
    scale: [1, 5]
  moderation:
    kind: moderation
    base_url: '{server.openai_url}'
"""


@pytest.fixture
def judged(server, db):
    """Three stored conversations of 4 messages (agents on the test server)."""
    server.reply = Judge()
    server.reset()
    store = Store.open(db, "alice")
    exp = store.insert_experiment(experiment_from_yaml(exp_yaml(server, judge_block(server)), "t"))
    grid = make_grid(
        exp, llms=None, messages=4, days=1, agents=None, speakers=["round_robin"], repetitions=3
    )
    report = start_batch(store, exp, grid, RunOptions(retry=FAST))
    assert report.status == "completed"
    server.reset()
    return store, exp, report.batch_id


def agent_calls(server: FakeLLMServer) -> int:
    return sum(1 for b in server.bodies() if b.get("model") == AGENT)


def test_judge_stores_one_score_per_conversation_reasks_and_counts_invalid(db, server, judged):
    store, exp, batch_id = judged
    _, records = select_conversations(store, batch_id)
    scorers = [s for s in scorers_for(exp) if s.name in ("goal", "stubborn")]
    report = score(store, exp, records, scorers, ScoreOptions(retry=FAST))
    # goal: nonsense, then a label (2 calls each); stubborn: 3 asks each, then invalid
    assert (report.scored, report.invalid, report.failed) == (3, 3, 0)
    assert report.calls == 3 * 2 + 3 * 3 == server.calls
    assert agent_calls(server) == 0  # no agent or summarizer call while scoring
    goal = store.list_scores(experiment_id=exp.id, scorer="goal")
    assert sorted(s.conversation_id for s in goal) == sorted(r.id for r in records)
    assert {(s.value, s.valid, s.attempts, s.source) for s in goal} == {
        ("Yes", True, 2, f"judge:openai/{JUDGE}")
    }
    assert goal[0].raw == "Yes" and goal[0].usage.calls == 2
    stored = db["scores"].find_one({"scorer": "goal"})
    assert "Did the prisoners obtain the extra hour?" in stored["prompt"]
    assert "[Turn 4]" in stored["prompt"]
    stubborn = store.list_scores(scorer="stubborn")
    assert {(s.value, s.valid, s.attempts) for s in stubborn} == {(None, False, 3)}
    assert stubborn[0].raw == "I would rather not say."
    assert "not one of the labels" in stubborn[0].detail["problem"]

    server.reset()
    again = score(store, exp, records, scorers, ScoreOptions(retry=FAST))
    assert server.calls == 0 and again.calls == 0  # nothing missing, nothing asked
    assert (again.items, again.already) == (0, 6)
    assert db["scores"].count_documents({}) == 6


def test_stopping_mid_scoring_then_resuming_scores_every_item_once(db, server, judged):
    store, exp, batch_id = judged
    _, records = select_conversations(store, batch_id)
    scorers = [s for s in scorers_for(exp) if s.name == "toxicity"]  # 12 messages
    options = ScoreOptions(retry=FAST, concurrency=2)
    server.reply.on_call = lambda n: n == 5 and options.stop.set()  # as Ctrl-C does
    first = score(store, exp, records, scorers, options)
    assert first.interrupted
    stored_first = db["scores"].count_documents({})
    assert 5 <= stored_first < 12  # calls in flight were finished and stored
    server.reply.on_call = None
    second = score(store, exp, records, scorers, ScoreOptions(retry=FAST))
    assert second.already == stored_first and second.scored == 12 - stored_first
    assert server.reply.calls == 12  # every item asked exactly once over both runs
    keys = [(s.conversation_id, s.message) for s in store.list_scores(scorer="toxicity")]
    assert len(keys) == len(set(keys)) == 12
    assert {s.value for s in store.list_scores(scorer="toxicity")} == {2}
    assert agent_calls(server) == 0


def test_moderation_scores_every_message_with_every_category(server, judged):
    store, exp, batch_id = judged
    _, records = select_conversations(store, batch_id)
    scorers = [s for s in scorers_for(exp) if s.name == "moderation"]
    report = score(store, exp, records, scorers, ScoreOptions(retry=FAST))
    assert report.scored == 12 == len(server.bodies("/v1/moderations"))
    assert agent_calls(server) == 0
    scores = store.list_scores(scorer="moderation")
    assert {s.source for s in scores} == {"moderation:omni-moderation-latest"}
    one = scores[0]
    assert one.value is True and one.role in ("guard", "prisoner")
    assert one.detail["category_scores"]["harassment"] == pytest.approx(0.91)
    assert one.detail["categories"]["harassment"] is True
    assert one.detail["categories"]["violence"] is False
    assert len(one.detail["category_scores"]) == 8


def test_python_scorers_per_message_and_per_conversation_errors_per_item(
    db, server, judged, tmp_path, settings, env_for
):
    store, exp, batch_id = judged
    _, records = select_conversations(store, batch_id)
    path = tmp_path / "lab.yaml"
    path.write_text(
        "scorers:\n"
        "  shouting: {kind: python, level: message, function: 'tests.scoring_plugin:shouting'}\n"
        "  picky: {kind: python, level: message, roles: [prisoner],"
        " function: 'tests.scoring_plugin:picky'}\n"
        "  length: {kind: python, function: 'tests.scoring_plugin:turns'}\n"
    )
    scorers = load_scorers_file(path)
    scoring_plugin.calls.clear()
    report = score(store, exp, records, scorers, ScoreOptions(retry=FAST))
    assert server.calls == 0
    assert len(store.list_scores(scorer="shouting")) == 12
    assert {s.value for s in store.list_scores(scorer="length")} == {4}
    picky = store.list_scores(scorer="picky")
    assert {s.role for s in picky} == {"prisoner"} and len(picky) == 6  # only prisoners
    assert report.failed == 0 and report.errors == []

    # a function failing on some items: each a failed item (counted, as a failed call is),
    # the others stored
    db["messages"].update_many(
        {"conversation_id": records[0].id, "role": "prisoner"}, {"$set": {"content": "Guard!"}}
    )
    db["scores"].delete_many({"scorer": "picky"})
    picky_only = [s for s in scorers if s.name == "picky"]
    report = score(store, exp, records, picky_only, ScoreOptions(max_failures="2"))
    assert len(report.errors) == 2 and "cannot rate a guard's message" in report.errors[0][1]
    assert report.failed == 2 and not report.reason and not report.interrupted
    assert len(store.list_scores(scorer="picky")) == 4
    # past --max-failures (default 10% of 6 items: 1) scoring stops, as for a judge
    db["scores"].delete_many({"scorer": "picky"})
    report = score(store, exp, records, picky_only, ScoreOptions(concurrency=1))
    assert report.failed == 2 and "more than --max-failures allows (1)" in report.reason
    # `simulator score`: "2 failed", each error once, and a failing exit status for scripts
    db["scores"].delete_many({"scorer": "picky"})
    args = ["score", batch_id, "--scorers", str(path), "--scorer", "picky", "--max-failures", "2"]
    result = CliRunner().invoke(app, args, env=env_for(settings))
    assert result.exit_code == 1, result.output
    assert "0 invalid answers, 2 failed," in result.output
    assert result.output.count("cannot rate a guard's message") == 2, result.output


def test_a_new_rubric_is_a_new_version_and_old_scores_stay(server, judged, tmp_path):
    store, exp, batch_id = judged
    _, records = select_conversations(store, batch_id)
    goal = next(s for s in scorers_for(exp) if s.name == "goal")
    score(store, exp, records, [goal], ScoreOptions(retry=FAST))
    edited = parse_scorers({"goal": goal.definition | {"rubric": "Rephrased question?"}}, "t")[0]
    assert edited.version != goal.version
    score(store, exp, records, [edited], ScoreOptions(retry=FAST))
    versions = [s.version for s in store.list_scores(scorer="goal")]
    assert sorted(versions) == sorted([goal.version] * 3 + [edited.version] * 3)


def test_the_failure_threshold_stops_scoring_and_nothing_failed_is_stored(db, server, judged):
    store, exp, batch_id = judged
    _, records = select_conversations(store, batch_id)
    scorers = [s for s in scorers_for(exp) if s.name == "toxicity"]
    server.fail_next(*[500] * 100)
    report = score(
        store, exp, records, scorers,
        ScoreOptions(retry=RetryPolicy(attempts=1, base_delay=0), max_failures="2", concurrency=1),
    )  # fmt: skip
    server.reset()
    assert report.failed == 3 and "more than --max-failures allows (2)" in report.reason
    assert db["scores"].count_documents({}) == 0


def test_scorer_definitions_are_checked(server):
    bad = {
        "a": {"kind": "judge", "rubric": "?", "answer": "choice", "labels": ["Yes"]},
        "b": {"kind": "judge", "answer": "scale", "scale": [5, 1], "rubric": "?"},
        "c": {"kind": "python", "function": "nomodule"},
        "d": {"kind": "oracle"},
        "e": {"kind": "judge", "rubric": "?", "labels": ["Yes", "No"], "rubrik": "typo"},
        "f": {"kind": "moderation", "level": "conversation"},
    }
    for name, definition in bad.items():
        with pytest.raises(ValidationError) as info:
            parse_scorers({name: definition}, "x.yaml")
        assert f"x.yaml: scorers.{name}" in str(info.value)
    with pytest.raises(ValidationError, match="did you mean `rubric`"):
        parse_scorers({"e": bad["e"]}, "x.yaml")
    text = exp_yaml(server, "  g: {kind: judge, rubric: '?', answer: turn, report: halves}\n")
    exp = experiment_from_yaml(text, "x.yaml")
    with pytest.raises(ValidationError, match="scorers.g.report"):
        scorers_for(exp)
    with pytest.raises(ValidationError, match="scorers.h: expected a mapping with `kind:`"):
        experiment_from_yaml(exp_yaml(server, "  h: 3\n"), "x.yaml")


def test_prison_scorers_file_loads_and_scores_stay_with_the_experiment(db):
    scorers = load_scorers_file(ROOT / "experiments" / "prison-scorers.yaml")
    assert [s.name for s in scorers] == ["goal_achieved", "turn_goal_achieved", "toxicity",
                                          "moderation"]  # fmt: skip
    goal = scorers[0]
    assert goal.labels == ["Yes", "No", "NotTried"] and goal.level == "conversation"
    assert scorers[1].answer == "turn" and scorers[1].report == "thirds"
    assert scorers[2].level == "message" and scorers[2].answer == "scale"
    assert scorers[3].kind == "moderation"
    exp = load_experiment(ROOT / "experiments" / "prison.yaml")
    exp.scorers = {s.name: s.definition for s in scorers}
    store = Store.open(db, "alice")
    stored = store.get_experiment(store.insert_experiment(exp).id or "")
    assert [s.version for s in scorers_for(stored)] == [s.version for s in scorers]


def test_score_command_scores_a_batch_then_has_nothing_left(server, judged, settings, env_for):
    store, exp, batch_id = judged
    runner = CliRunner()
    result = runner.invoke(app, ["score", batch_id, "--scorer", "goal"], env=env_for(settings))
    assert result.exit_code == 0, result.output
    assert "Scored 3 items with goal" in result.output
    assert len(store.list_scores(scorer="goal")) == 3 and agent_calls(server) == 0
    server.reset()
    result = runner.invoke(app, ["score", exp.name, "--scorer", "goal"], env=env_for(settings))
    assert result.exit_code == 0, result.output
    assert "Scored 0 items" in result.output and "3 already scored" in result.output
    assert server.calls == 0
    result = runner.invoke(app, ["score", batch_id, "--scorer", "nope"], env=env_for(settings))
    assert result.exit_code == 1 and "--scorer nope: no such scorer" in result.output


def test_scoring_a_conversation_imported_from_the_prototype(server, db, mongo_client, tmp_path):
    import uuid

    from simulator.legacy import import_legacy
    from tests import legacy_fixture as fx

    source = mongo_client[f"proto_{uuid.uuid4().hex[:10]}"]
    try:
        fx.build(source)
        store = Store.open(db, "alice")
        import_legacy(store, source)
    finally:
        mongo_client.drop_database(source.name)
    server.reply, server.calls = Judge(), 0
    server.reset()
    conv = db["conversations"].find_one({"status": "completed"})
    path = tmp_path / "scorers.yaml"
    path.write_text("scorers:\n" + judge_block(server))
    exp, records = select_conversations(store, conv["_id"])
    assert [r.id for r in records] == [conv["_id"]]
    scorers = [s for s in load_scorers_file(path) if s.name in ("goal", "moderation")]
    report = score(store, exp, records, scorers, ScoreOptions(retry=FAST))
    messages = db["messages"].count_documents({"conversation_id": conv["_id"]})
    assert report.scored == 1 + messages and report.failed == 0
    assert len(store.list_scores(conversation_id=conv["_id"], scorer="goal")) == 1


def test_run_with_score_scores_the_new_batch(db, settings, env_for, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: scored\nstarting_message: Start\nllms: [{model: scripted, provider: scripted}]\n"
        "roles:\n  guard: {sections: {starting_prompt: You are a guard.}}\n"
        "  prisoner: {sections: {starting_prompt: You are a prisoner.}}\n"
        "scorers:\n  length: {kind: python, function: 'tests.scoring_plugin:turns'}\n"
        "  shouting: {kind: python, level: message, roles: [guard],"
        " function: 'tests.scoring_plugin:shouting'}\n"
    )
    result = CliRunner().invoke(
        app,
        ["run", str(path), "--messages", "4", "--days", "1", "--repetitions", "2", "--score"],
        env=env_for(settings),
    )
    assert result.exit_code == 0, result.output
    store = Store(db, "alice")
    assert {s.value for s in store.list_scores(scorer="length")} == {4}
    assert len(store.list_scores(scorer="length")) == 2
    assert len(store.list_scores(scorer="shouting")) == 4  # 2 guard messages x 2
    assert "Scored 6 items with length, shouting" in result.output


def test_the_unique_index_makes_score_writes_idempotent(db):
    from pymongo.errors import DuplicateKeyError

    from simulator.store import Score

    store = Store.open(db, "alice")
    one = Score("c1", "1:2", "toxicity", "v1", "judge:x", 3, experiment_id="e")
    assert store.insert_score(one) is True
    assert store.insert_score(Score("c1", "1:2", "toxicity", "v1", "judge:x", 5)) is False
    assert [s.value for s in store.list_scores()] == [3]  # the first write stays
    with pytest.raises(DuplicateKeyError):  # even a write around the store is refused
        db["scores"].insert_one(
            {
                "conversation_id": "c1",
                "message": "1:2",
                "scorer": "toxicity",
                "version": "v1",
                "source": "judge:x",
            }  # fmt: skip
        )


def test_a_moderation_scorer_without_a_key_is_refused_before_any_call(server, judged, monkeypatch):
    """Without OPENAI_API_KEY and base_url, every moderation call would fail the same way
    (one error per message until the failure threshold): refused up front instead."""
    store, exp, batch_id = judged
    _, records = select_conversations(store, batch_id)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    goal = [s for s in scorers_for(exp) if s.name == "goal"]
    bare = parse_scorers({"mod": {"kind": "moderation", "level": "message"}}, "test")
    calls_before = len(server.bodies("/v1/chat/completions"))
    with pytest.raises(UserError, match="Scorer 'mod' .moderation.: OPENAI_API_KEY is not set"):
        score(store, exp, records, goal + bare, ScoreOptions(retry=FAST))
    assert len(server.bodies("/v1/chat/completions")) == calls_before  # not even the judge
    assert store.list_scores(experiment_id=exp.id) == []


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("case", ["server-down", "model-missing"])
def test_a_judge_whose_llm_cannot_be_used_is_refused_before_any_call(
    case, db, server, judged, tmp_path, settings, env_for
):
    """A judge on an Ollama that is not running, or that lacks the model (and cannot pull
    it), would fail every item until the failure threshold: the preflight a batch makes
    refuses it once, before the first call, in `score` and in `simulator score`."""
    store, exp, batch_id = judged
    _, records = select_conversations(store, batch_id)
    with FakeLLMServer(models={"other:latest"}, unpullable={"judge-model"}) as ollama:
        url = f"http://127.0.0.1:{_closed_port()}" if case == "server-down" else ollama.url
        path = tmp_path / "judges.yaml"
        path.write_text(
            "scorers:\n  verdict:\n    kind: judge\n"
            f"    llm: {{model: judge-model, provider: ollama, base_url: '{url}'}}\n"
            "    rubric: Did they agree?\n    answer: choice\n    labels: [Yes, No]\n"
        )
        scorers = load_scorers_file(path)
        events: list[str] = []
        options = ScoreOptions(retry=FAST, on_progress=lambda e: events.append(e.kind))
        with pytest.raises(UserError) as info:
            score(store, exp, records, scorers, options)
        result = CliRunner().invoke(
            app, ["score", batch_id, "--scorers", str(path)], env=env_for(settings)
        )
        chat_calls = ollama.calls
    message = str(info.value)
    assert message.startswith("Scoring did not start. Judge 'verdict' (ollama/judge-model:latest):")
    if case == "server-down":
        assert "Cannot reach Ollama" in message and "ollama serve" in message, message
    else:
        assert "judge-model" in message and "pull" in message, message
    assert events == []  # not even "started": no item was tried
    assert chat_calls == 0 and server.calls == 0  # no scoring call anywhere
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "Error" in result.output
    assert result.output.count("Scoring did not start") == 1  # one error, not one per item
    assert "Judge 'verdict' (ollama/judge-model:latest)" in result.output
    assert "'goal'" not in result.output  # the experiment's judges passed their check
    assert store.list_scores(experiment_id=exp.id) == []
    assert db["scores"].count_documents({}) == 0


def test_a_judge_model_missing_on_ollama_is_pulled_and_the_pull_shown(
    db, judged, tmp_path, settings, env_for
):
    """`simulator score` pulls a judge's missing Ollama model before the first call, as a
    batch does, and shows it: a line per step of the pull, not one per chunk."""
    store, exp, batch_id = judged
    with FakeLLMServer(models=set(), reply=lambda body: "Yes") as ollama:
        path = tmp_path / "judges.yaml"
        path.write_text(
            "scorers:\n  verdict:\n    kind: judge\n"
            f"    llm: {{model: judge-model, provider: ollama, base_url: '{ollama.url}'}}\n"
            "    rubric: Did they agree?\n    answer: choice\n    labels: [Yes, No]\n"
        )
        result = CliRunner().invoke(
            app, ["score", batch_id, "--scorers", str(path)], env=env_for(settings)
        )
        pulls = ollama.bodies("/api/pull")
    assert result.exit_code == 0, result.output
    assert [p["model"] for p in pulls] == ["judge-model:latest"]
    shown = [line for line in result.output.splitlines() if "judge-model" in line]
    assert shown == [
        "ollama/judge-model:latest: pulling manifest",
        "ollama/judge-model:latest: pulling abababababab 30%",
        "ollama/judge-model:latest: pulling abababababab 60%",
        "ollama/judge-model:latest: pulling abababababab 100%",
        "ollama/judge-model:latest: verifying sha256 digest",
        "ollama/judge-model:latest: writing manifest",
        "ollama/judge-model:latest: success",
    ], result.output
    assert len(store.list_scores(experiment_id=exp.id, scorer="verdict")) == 3
