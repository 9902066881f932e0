"""`run --dry-run` estimates (issue 13 item 3): calls, prompt and completion tokens of a batch
before it runs, and its cost with prices set; compared with what scripted batches then use.

Stated tolerance: for the scripted model, within 10% of the tokens the batch then uses (the
estimate leaves out re-asks after invalid speaker selections, which add a few percent).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.errors import UserError
from simulator.estimate import estimate
from simulator.experiment import ModelSpec, load_experiment
from simulator.grid import make_grid
from simulator.llm.retry import RetryPolicy
from simulator.pricing import Price, parse_prices, price_for
from simulator.runner import RunOptions, start_batch
from simulator.store import Store
from tests.scenarios import PRISON_ONE

TOLERANCE = 0.10


def run(store: Store, exp, grid):
    report = start_batch(store, exp, grid, RunOptions(retry=RetryPolicy(base_delay=0)))
    assert report.status == "completed"
    return store.batch_totals(report.batch_id)


def close(estimated: int, actual: int) -> bool:
    return abs(estimated - actual) <= TOLERANCE * actual


@pytest.fixture
def store(db) -> Store:
    return Store.open(db, "alice")


def test_estimate_of_a_new_experiment_is_within_tolerance(store) -> None:
    exp = store.insert_experiment(load_experiment(PRISON_ONE))
    grid = make_grid(
        exp,
        llms=["scripted"],
        messages=8,
        days=2,
        agents="guard=1,prisoner=2",
        speakers=["round_robin", "auto"],
        repetitions=3,
    )
    est = estimate(exp, grid, store.reply_lengths(exp.id))  # no earlier batch
    used = run(store, exp, grid)
    assert est.conversations == 6 and est.calls == grid.llm_calls()
    assert close(est.prompt_tokens, used.prompt_tokens), (est.prompt_tokens, used.prompt_tokens)
    assert close(est.completion_tokens, used.completion_tokens), (
        est.completion_tokens,
        used.completion_tokens,
    )
    assert est.cost == 0  # the scripted model is free


def test_earlier_batches_of_the_experiment_give_the_reply_lengths(store) -> None:
    """max_tokens is only an upper bound (the scripted model says ~14 words whatever it is):
    once a batch has run, its replies' average length is used instead."""
    exp = load_experiment(PRISON_ONE)
    exp = store.insert_experiment(
        replace(exp, llms=[ModelSpec("scripted", "scripted", max_tokens=60)])
    )
    grid = dict(llms=["scripted"], agents="guard=1,prisoner=2", speakers=["random", "auto"])
    first = make_grid(exp, messages=8, days=2, repetitions=2, **grid)
    guess = estimate(exp, first, store.reply_lengths(exp.id))
    used = run(store, exp, first)
    assert guess.completion_tokens > 3 * used.completion_tokens  # max_tokens: far too many
    second = make_grid(exp, messages=12, days=3, repetitions=2, seed=7, **grid)
    history = store.reply_lengths(exp.id)
    assert history["scripted/scripted"].conversations == 4
    est = estimate(exp, second, history)
    assert "4 earlier conversations" in est.lines()[2]
    used = run(store, exp, second)
    assert close(est.prompt_tokens, used.prompt_tokens), (est.prompt_tokens, used.prompt_tokens)
    assert close(est.completion_tokens, used.completion_tokens), (
        est.completion_tokens,
        used.completion_tokens,
    )


def test_dry_run_prints_the_estimate_and_cost_with_a_price_set(store, settings, env_for) -> None:
    exp = load_experiment(PRISON_ONE)
    exp = store.insert_experiment(replace(exp, llms=[ModelSpec("gpt-4o-mini", max_tokens=100)]))
    env = {**env_for(settings), "SIMULATOR_PRICES": "gpt-4o-mini=0.15/0.60"}
    args = [
        "run",
        exp.id or "",
        "--dry-run",
        "--messages",
        "6",
        "--days",
        "2",
        "--repetitions",
        "5",
    ]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    grid = make_grid(
        exp, llms=None, messages=6, days=2, agents=None, speakers=["round_robin"], repetitions=5
    )
    est = estimate(exp, grid)
    assert est.completion_tokens == 5 * 8 * 100  # max_tokens per call: 6 messages, 2 summaries
    cost = (est.prompt_tokens * 0.15 + est.completion_tokens * 0.60) / 1e6
    assert f"{est.prompt_tokens:,} prompt tokens" in result.output
    assert f"${cost:,.2f}" in result.output
    assert store.list_batches() == []  # nothing ran
    result = CliRunner().invoke(app, args, env=env_for(settings))
    assert "For the cost of openai/gpt-4o-mini, set SIMULATOR_PRICES" in result.output


def test_price_settings() -> None:
    prices = parse_prices("llama3:latest=0/0.5; openai/gpt-4o=2.5/10")
    assert price_for("llama3:latest", prices) == Price(0, 0.5)
    assert price_for(ModelSpec("gpt-4o"), prices) == Price(2.5, 10)  # by its label
    assert price_for("gpt-4o-mini", prices) is None
    with pytest.raises(UserError, match="SIMULATOR_PRICES: cannot read 'gpt-4o=cheap'"):
        parse_prices("gpt-4o=cheap")
