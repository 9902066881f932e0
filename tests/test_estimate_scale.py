"""`run --dry-run` at any size (an outside review: it composed every turn's prompt, so its
time grew with the square of --messages and 10**8 messages never returned).

The estimate now sums the turns and days in closed form. What it must equal: the prompts a
conversation really sends, played here with the scripted model answering replies of the
expected length and counted call by call (words, as the scripted model counts them, exactly;
characters / 4 with the estimate's rounding rule, exactly). And what it may compose: the
same texts whatever --messages, --days and --repetitions are.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from typing import Any

import pytest
from typer.testing import CliRunner

import simulator.estimate
from simulator import prompts
from simulator.cli import app
from simulator.conversation import (
    RESEARCHER,
    Conversation,
    ConversationSpec,
    Models,
    build_agents,
    messages_per_day,
)
from simulator.estimate import Estimate, estimate
from simulator.experiment import Experiment, ModelSpec, load_experiment
from simulator.grid import INT64_MAX, Grid, make_grid
from simulator.llm.scripted import ScriptedModel
from tests.scenarios import PRISON_ONE

LENGTH = 5  # words of every reply
REPLY = " ".join(["tok"] * LENGTH)
CONTINUE = f"{RESEARCHER}: Please continue."


def experiment(llm: ModelSpec) -> Experiment:
    return replace(load_experiment(PRISON_ONE), llms=[llm])


WORDS = ModelSpec("scripted", "scripted", extra={"replies": [REPLY]})  # replies of LENGTH
CHARS = ModelSpec("gpt-4o-mini", max_tokens=LENGTH)  # characters / 4, replies of max_tokens


def scripted(replies: list[str]) -> ScriptedModel:
    return ScriptedModel(ModelSpec("scripted", "scripted", extra={"replies": replies}))


def played(exp: Experiment, spec: ConversationSpec) -> list[ScriptedModel]:
    """Run one conversation with every reply LENGTH words long; for `auto`, the selector
    names the first listed agent other than the last speaker (the estimate's stand-in)."""
    agents = build_agents(exp, spec)
    per_day = messages_per_day(spec.messages, spec.days)
    choices = []
    if spec.speaker == "auto" and len(agents) > 2:
        choices = [agents[t % 2].name for n in per_day for t in range(n)]
    models = [scripted([REPLY] * spec.messages), scripted([REPLY] * spec.days), scripted(choices)]
    Conversation(exp, spec, Models(*models), agents=agents).run()
    return models


def sent(models: list[ScriptedModel], words: bool) -> Fraction:
    """Prompt tokens of every call the models received, counted one message at a time."""
    total = Fraction(0)
    for model in models:
        assert len(model.history) < 1000  # the scripted model keeps its latest 1000 requests
        for request in model.history:
            for m in request:
                text = m["content"]
                if words:
                    total += len(text.split())
                elif m["role"] != "user" or text == CONTINUE:  # known texts: rounded up
                    total += math.ceil(len(text) / 4) + 4
                else:  # a text that grows with the turn: rounded up by 3/8 on average
                    total += Fraction(len(text), 4) + Fraction(3, 8) + 4
    return total


def reference(exp: Experiment, grid: Grid, words: bool) -> int:
    return round(sum(sent(played(exp, spec), words) for _, spec in grid.expand()))


def answered(exp: Experiment, grid: Grid, words: bool) -> int:
    """Completion tokens of every reply (a selector's: a name)."""
    total = 0
    for _, spec in grid.expand():
        for model in played(exp, spec):
            replies = model.spec.extra["replies"][: len(model.history)]
            total += sum(len(r.split()) if words else math.ceil(len(r) / 4) for r in replies)
    return total


GRIDS = [
    dict(messages=7, days=1, agents="guard=1,prisoner=1", speakers=["round_robin"]),
    dict(messages=23, days=4, agents="guard=1,prisoner=2", speakers=["round_robin", "auto"]),
    dict(messages=40, days=12, agents="guard=2,prisoner=3", speakers=["auto", "round_robin"]),
    dict(messages=25, days=5, agents="guard=2,prisoner=1", speakers=["auto"], every_day=True),
]


@pytest.mark.parametrize("llm", [WORDS, CHARS], ids=["words", "characters"])
@pytest.mark.parametrize("shape", GRIDS, ids=lambda g: f"{g['messages']}x{g['days']}")
def test_the_estimate_is_what_the_conversations_send(llm: ModelSpec, shape: dict) -> None:
    exp = experiment(llm)
    grid = make_grid(exp, llms=None, **shape)
    est = estimate(exp, grid)
    assert est.calls == grid.llm_calls()
    assert est.prompt_tokens == reference(exp, grid, words=llm is WORDS)
    assert est.completion_tokens == answered(exp, grid, words=llm is WORDS)


@pytest.mark.parametrize("llm", [WORDS, CHARS], ids=["words", "characters"])
def test_one_agent_alone(llm: ModelSpec) -> None:
    """A lone agent is told "Please continue." after its first message of the day."""
    base = experiment(llm)
    exp = replace(base, roles=[base.roles[0]])
    grid = make_grid(exp, llms=None, messages=9, days=3, agents=None, speakers=["round_robin"])
    assert estimate(exp, grid).prompt_tokens == reference(exp, grid, words=llm is WORDS)


def test_random_speakers_are_counted_by_their_expected_values() -> None:
    exp = experiment(WORDS)
    grid = make_grid(
        exp,
        llms=None,
        messages=30,
        days=2,
        agents="guard=2,prisoner=2",
        speakers=["random"],
        repetitions=8,
    )
    est = estimate(exp, grid).prompt_tokens
    played_ = reference(exp, grid, words=True)
    assert abs(est - played_) <= 0.01 * played_, (est, played_)


def test_agent_names_have_the_length_the_estimate_counts() -> None:
    from simulator.conversation import agent_names
    from simulator.prompt_sums import agent_name_length

    for count in (1, 500, 501, 4999, 5000, 10_000):
        names = agent_names(["guard"], {"guard": count}, seed=3)
        assert {len(n) for n, _ in names} == {agent_name_length("guard", count)}


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn()'s result, or a test failure when it takes longer than `seconds` (it may hang)."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    assert result, "failed (see the thread's exception above)"
    return result[0]


COMPOSERS = ["agent_prompt", "summarizer_prompt", "starting_message"]
TEMPLATES = ["summary_request", "selector_request"]


def test_a_dry_run_composes_the_same_texts_at_any_size(monkeypatch) -> None:
    """Composing is counted: per condition, one system prompt per role, the summarizer's and
    the starting message, and a fixed number of template fillings, whatever the size."""
    calls = {name: 0 for name in COMPOSERS + TEMPLATES}
    for name in calls:
        original = getattr(prompts, name)

        def counting(*args: Any, _name: str = name, _fn: Any = original, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(prompts, name, counting)
    exp = experiment(CHARS)
    composed = []
    for messages, repetitions in ((1000, 1), (10_000, 1), (10**15, 10**12), (INT64_MAX, 1)):
        grid = make_grid(
            exp,
            llms=None,
            messages=messages,
            days=10 if messages < INT64_MAX else 2**62,
            agents="guard=2,prisoner=3",
            speakers=["round_robin", "random", "auto"],
            repetitions=repetitions,
        )
        for name in calls:
            calls[name] = 0
        est: Estimate = within(60, lambda g=grid: estimate(exp, g))
        assert est.calls == grid.llm_calls()
        composed.append(dict(calls))
    assert composed[0] == {
        "agent_prompt": 2,  # guard, prisoner: the three speaker methods share them
        "summarizer_prompt": 1,
        "starting_message": 1,
        "summary_request": 3,
        # first turns and later ones (the fields: none, then each longer), then one more
        # agent of each role listed
        "selector_request": 3 + 3 + 2 * 2,
    }
    assert composed == [composed[0]] * 4


def test_a_sampled_grid_of_any_size_is_drawn_without_listing_it(monkeypatch) -> None:
    """Every agent combination up to 10,000 per role, every day count up to 10**6: counted by
    index, never listed (display.grid_table is not called here)."""
    exp = experiment(CHARS)
    grid = make_grid(
        exp,
        llms=None,
        messages=10**15,
        days=10**6,
        agents="guard=10000,prisoner=10000",
        speakers=["random", "auto"],
        every_day=True,
        every_combination=True,
    )
    est = within(60, lambda: estimate(exp, grid))
    assert est.calls == pytest.approx(grid.llm_calls(), rel=0.2)  # 400 conditions drawn


def test_dry_run_of_a_quadrillion_messages_on_the_command_line() -> None:
    cmd = [sys.executable, "-m", "simulator.cli", "run", str(PRISON_ONE), "--llm", "scripted"]
    args = ["--messages", str(10**15), "--repetitions", str(10**12), "--dry-run"]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    calls = 10**12 * (10**15 + 2)  # and a summary on each of the 2 days
    assert f"Estimate: {calls:,} LLM calls" in done.stdout


def test_ctrl_c_during_a_dry_run_says_interrupted(monkeypatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Estimate:
        raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

    monkeypatch.setattr(simulator.estimate, "estimate", interrupted)
    args = ["run", str(PRISON_ONE), "--llm", "scripted", "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130
    assert "Interrupted." in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("n", [21, 25, 30])
def test_a_sampled_grid_estimates_every_call(n: int) -> None:
    """Over 400 conditions the estimate samples them; its calls are still the grid's (they
    were 2,000 for 2,205 and 4,000 for 3,125: a weight rounded per call)."""
    exp = load_experiment(PRISON_ONE)
    grid = make_grid(
        exp, llms=["scripted"], messages=4, days=1, agents=f"guard={n},prisoner={n}",
        speakers=["round_robin"], every_combination=True,
    )  # fmt: skip
    assert grid.size() > 400
    assert estimate(exp, grid).calls == grid.llm_calls() == 5 * n * n
