"""The progress display estimates from LLM calls, not only conversations (issue 9, item 21):
one long conversation with a slow model showed "0/1 · ETA -:--:-- · 0.0 msg/s" for 12
minutes although 7 of its 8 messages were done."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from simulator.display import ProgressView, eta_seconds, rate_text
from simulator.experiment import load_experiment
from simulator.grid import make_grid
from simulator.runner import ProgressEvent, RunOptions, resume_batch, start_batch
from simulator.store import Store
from tests.scenarios import PRISON_ONE

PRISON = PRISON_ONE  # one of the 72 scenarios: these tests are not about factors


@pytest.mark.parametrize(
    ("elapsed", "done", "left", "expected"),
    [
        (720.0, 7, 3, 720 / 7 * 3),  # the review's case: 7 of 8 messages + 2 summaries
        (10.0, 1, 0, 0.0),
        (10.0, 12, -2, 0.0),  # re-asks can make more calls than planned
        (10.0, 0, 10, None),  # nothing finished yet: no estimate
        (0.0, 3, 10, None),
    ],
)
def test_eta_from_calls(elapsed, done, left, expected):
    assert eta_seconds(elapsed, done, left) == expected


def test_rate_keeps_its_digits():
    assert rate_text(7, 720.0) == "0.0097"  # not "0.0"
    assert rate_text(3, 2.0) == "1.5"
    assert rate_text(250, 2.0) == "125"


def slow_conversation(view: ProgressView) -> None:
    """One conversation of 8 messages over 2 days: 10 calls planned, 7 messages made."""
    view(ProgressEvent("started", "b1", total=1, remaining=1, calls_total=10))
    view(ProgressEvent("conversation_started", "b1", "c1"))
    for _ in range(4):
        view(ProgressEvent("message", "b1", "c1", prompt_tokens=10, completion_tokens=5))
    view(ProgressEvent("summary", "b1", "c1"))
    for _ in range(3):
        view(ProgressEvent("message", "b1", "c1", prompt_tokens=10, completion_tokens=5))


def test_plain_and_live_views_count_calls_of_an_unfinished_conversation():
    view = ProgressView(Console(file=io.StringIO(), width=200), live=False)
    slow_conversation(view)
    stats = view.stats()
    assert "calls 8/10" in stats and "ETA ?" not in stats

    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    with ProgressView(console) as live:
        slow_conversation(live)
        live._live.refresh()  # type: ignore[union-attr]
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "8/10" in text and "0/1 conversations" in text
    assert re.search(r"ETA \d", text), text


def test_a_resumed_conversation_does_not_count_what_it_had_stored():
    view = ProgressView(Console(file=io.StringIO()), live=False)
    view(ProgressEvent("started", "b1", total=1, remaining=1, calls_total=10))
    view(ProgressEvent("conversation_started", "b1", "c1", calls_done=7))
    view(ProgressEvent("message", "b1", "c1"))
    assert "calls 1/3" in view.stats()


def test_the_runner_reports_the_calls_it_plans(db, settings):
    store = Store.open(db, "alice")
    exp = store.insert_experiment(load_experiment(PRISON))
    grid = make_grid(
        exp, llms=["scripted"], messages=4, days=2, agents="guard=1,prisoner=2",
        speakers=["round_robin", "auto"], repetitions=2,
    )  # fmt: skip
    events: list[ProgressEvent] = []
    report = start_batch(store, exp, grid, RunOptions(on_progress=events.append))
    started = [e for e in events if e.kind == "started"]
    calls = [e for e in events if e.kind in ("message", "summary", "selector")]
    assert started[0].calls_total == grid.llm_calls() > 0
    assert len(calls) >= started[0].calls_total  # re-asks of the selector come on top
    assert report.status == "completed"


def test_a_resumed_conversation_reports_the_calls_it_had_stored(db, settings):
    store = Store.open(db, "alice")
    exp = store.insert_experiment(load_experiment(PRISON))
    grid = make_grid(
        exp, llms=["scripted"], messages=4, days=2, agents=None, speakers=["round_robin"]
    )  # 2 messages a day
    options = RunOptions(concurrency=1)
    made: list[str] = []

    def stop_after_day_one(event: ProgressEvent) -> None:
        if event.kind in ("message", "summary"):
            made.append(event.kind)
        if event.kind == "summary":
            options.stop.set()  # message, message, summary of day 1 are stored

    options.on_progress = stop_after_day_one
    report = start_batch(store, exp, grid, options)
    assert report.status != "completed" and made == ["message", "message", "summary"]
    events: list[ProgressEvent] = []
    resumed = resume_batch(store, report.batch_id, RunOptions(on_progress=events.append))
    assert resumed.status == "completed"
    (started,) = [e for e in events if e.kind == "started"]
    (restarted,) = [e for e in events if e.kind == "conversation_started"]
    assert started.calls_total == grid.llm_calls() == 6
    assert restarted.calls_done == 3
    assert len([e for e in events if e.kind in ("message", "summary")]) == 3
