"""The response cache (issue 13 item 4): `--cache` reuses stored LLM responses, counted at
the server; repetitions never share a response; judges can use it too."""

from __future__ import annotations

import itertools
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.experiment import ModelSpec, experiment_from_yaml
from simulator.grid import make_grid
from simulator.llm.cache import ResponseCache
from simulator.llm.registry import ModelPool
from simulator.llm.retry import RetryPolicy
from simulator.runner import RunOptions, start_batch
from simulator.scoring.run import ScoreOptions, score, scorers_for, select_conversations
from simulator.store import Store
from tests.servers import FakeLLMServer, write_experiment
from tests.test_scoring import JUDGE, Judge, exp_yaml, judge_block

GRID = "--messages 4 --days 2 --repetitions 2 --agents guard=1,prisoner=2 --speaker auto --plain"


class Unique:
    """Every answer different: a reused response shows as a repeated text."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> str:
        with self.lock:
            n = next(self.counter)
        last = body["messages"][-1]["content"]
        if "Who should speak next" in last:  # the speaker selector
            return re.findall(r"\b[A-Z][a-z]+_\d{3}\b", last)[n % 3]
        return f"Reply number {n}."


@pytest.fixture
def cli(settings, env_for):
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), env=env_for(settings))

    return invoke


def contents(store: Store, batch_id: str) -> dict[tuple[int, int], list[str]]:
    """{(repetition, index): message and summary texts in order} of a batch."""
    out = {}
    for rec in store.list_conversations(batch_id=batch_id):
        t = store.load_transcript(rec.id)
        texts = [m.content for m in t.messages] + [s.content for s in t.summaries]
        out[(rec.spec.repetition, rec.index)] = texts
    return out


def test_a_second_identical_run_with_cache_makes_no_llm_call(cli, db, tmp_path: Path) -> None:
    with FakeLLMServer(models={"m1"}, reply=Unique()) as server:
        yaml = write_experiment(
            tmp_path / "exp.yaml",
            f"{{model: m1, provider: openai, base_url: '{server.openai_url}'}}",
        )
        first = cli("run", yaml, *GRID.split(), "--cache")
        assert first.exit_code == 0, first.output
        made = server.calls
        server.reset()
        second = cli("run", yaml, *GRID.split(), "--cache")
        assert second.exit_code == 0, second.output
        assert server.calls == 0  # every response came from the cache
        without = cli("run", yaml, *GRID.split())  # the cache is opt-in
        assert without.exit_code == 0, without.output
        assert server.calls >= 2 * (4 + 2)  # every message and summary called again
    assert f"Response cache: 0 hits (no LLM call), {made} misses" in first.output
    assert f"Response cache: {made} hits (no LLM call), 0 misses" in second.output
    store = Store.open(db, "alice")
    assert store.count_cached_responses() == made
    old, new = (re.search(r"Batch ([0-9a-f]{12})", r.output).group(1) for r in (first, second))
    assert old != new
    assert contents(store, new) == contents(store, old)
    # The reused responses carry the tokens of the calls that made them.
    assert store.batch_totals(new).completion_tokens == store.batch_totals(old).completion_tokens


def test_two_repetitions_never_share_a_response(cli, db, tmp_path: Path) -> None:
    """A lone agent: every repetition sends the very same requests (no other agent's name in
    them). Without the repetition and seed in the key, they would all get the first one's."""
    with FakeLLMServer(models={"m1"}, reply=Unique()) as server:
        yaml = tmp_path / "lone.yaml"
        yaml.write_text(
            "name: lone\nstarting_message: Start the experiment\n"
            "roles: {guard: {sections: {starting_prompt: You are a guard.}}}\n"
            f"llms:\n  - {{model: m1, provider: openai, base_url: '{server.openai_url}'}}\n"
        )
        grid = [
            "--messages",
            "4",
            "--days",
            "1",
            "--repetitions",
            "3",
            "--concurrency",
            "1",
            "--plain",
        ]
        result = cli("run", str(yaml), *grid, "--cache")
        assert result.exit_code == 0, result.output
        calls = server.calls
    store = Store.open(db, "alice")
    (batch,) = store.list_batches()
    texts = [t for texts in contents(store, batch.id).values() for t in texts]
    assert len(texts) == 3 * 5 == calls
    assert len(set(texts)) == len(texts)  # every message its own response


def test_a_reask_in_the_same_conversation_gets_its_own_response(db) -> None:
    """The same request twice in one scope (a re-ask after an empty reply) is two keys: the
    second ask is not answered with the first (empty) response."""
    answers = iter(["", "Now I speak.", "", "Now I speak."])
    with FakeLLMServer(models={"m1"}, reply=lambda body: next(answers)) as server:
        spec = ModelSpec("m1", "openai", base_url=server.openai_url)
        cache = ResponseCache(Store.open(db, "alice"))
        pool = ModelPool(RetryPolicy(base_delay=0))
        scope = {"seed": 0, "repetition": 0}
        messages = [{"role": "user", "content": "Researcher: go"}]
        model = cache.wrap(pool.get(spec), spec, scope)
        assert [model.chat(messages).text for _ in range(2)] == ["", "Now I speak."]
        again = cache.wrap(pool.get(spec), spec, scope)  # a re-run of the same scope
        assert [again.chat(messages).text for _ in range(2)] == ["", "Now I speak."]
        other = cache.wrap(pool.get(spec), spec, {"seed": 1, "repetition": 1})
        assert other.chat(messages).text == ""  # answers[2]: its own call
        assert server.calls == 3 and (cache.hits, cache.misses) == (2, 3)


def test_judge_calls_use_the_cache(db) -> None:
    judge = Judge()
    with FakeLLMServer(models={"llama3:latest", JUDGE}, reply=judge) as server:
        store = Store.open(db, "alice")
        exp = store.insert_experiment(
            experiment_from_yaml(exp_yaml(server, judge_block(server)), "t")
        )
        grid = make_grid(exp, llms=None, messages=4, days=1, agents=None, speakers=["round_robin"])
        report = start_batch(store, exp, grid, RunOptions(retry=RetryPolicy(base_delay=0)))
        assert report.status == "completed"
        _, records = select_conversations(store, report.batch_id)
        scorers = [s for s in scorers_for(exp) if s.name == "goal"]
        options = ScoreOptions(retry=RetryPolicy(base_delay=0), cache=ResponseCache(store))
        first = score(store, exp, records, scorers, options)
        asked = judge.calls
        assert first.scored == 1 and asked == 2  # nonsense, then a label on the re-ask
        db["scores"].delete_many({})  # the same transcripts judged again
        options = ScoreOptions(retry=RetryPolicy(base_delay=0), cache=ResponseCache(store))
        again = score(store, exp, records, scorers, options)
        assert again.scored == 1 and judge.calls == asked  # no judge call: both from the cache
        assert (options.cache.hits, options.cache.misses) == (2, 0)
        assert store.list_scores(scorer="goal")[0].value == "Yes"


def test_identical_requests_in_flight_at_once_share_one_call(db) -> None:
    """N conversations asking the same thing at the same moment: one call at the server, the
    others wait for its response (counted as hits). When that call fails (after its retries),
    every waiter gets its error: no waiter starts the retries again."""
    from simulator.errors import ProviderError

    n = 6
    with FakeLLMServer(models={"m1"}, reply=Unique(), latency=0.5) as server:
        spec = ModelSpec("m1", "openai", base_url=server.openai_url)
        cache = ResponseCache(Store.open(db, "alice"))
        pool = ModelPool(RetryPolicy(attempts=2, base_delay=0), 2 * n)
        scope = {"seed": 0, "repetition": 0}

        def ask_all(content: str) -> list[Any]:
            start = threading.Barrier(n)
            out: list[Any] = [None] * n

            def ask(i: int) -> None:
                model = cache.wrap(pool.get(spec), spec, scope)  # one per conversation
                start.wait()
                try:
                    out[i] = model.chat([{"role": "user", "content": content}]).text
                except ProviderError as e:
                    out[i] = e

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            return out

        texts = ask_all("Researcher: go")
        assert server.calls == 1  # counted at the server
        assert texts == ["Reply number 1."] * n
        assert (cache.hits, cache.misses) == (n - 1, 1)

        server.reset()
        server.fail_next(500, 500)  # the one call and its one retry
        errors = ask_all("Researcher: again")
        assert server.calls == 2  # not 2 per waiter
        assert all(isinstance(e, ProviderError) for e in errors)
        assert len({str(e) for e in errors}) == 1
        assert ask_all("Researcher: again") == ["Reply number 2."] * n  # nothing kept of it
        assert server.calls == 3
