"""Grid arithmetic and agent names (issue 9, items 9 and 10): any size is counted without
expanding it, out-of-range numbers are refused with a clear error, and any number of agents
gets unique names quickly."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from simulator.conversation import agent_names, build_agents
from simulator.errors import UserError
from simulator.experiment import load_experiment
from simulator.grid import INT64_MAX, make_grid
from simulator.runner import RunOptions, start_batch
from simulator.store import Store
from tests.scenarios import PRISON_ONE

ROOT = Path(__file__).resolve().parent.parent
PRISON = PRISON_ONE  # one of the 72 scenarios: these tests are not about factors


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn()'s result, or a test failure when it takes longer than `seconds` (it may loop)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if errors:
        raise errors[0]
    return result[0]


# --- item 9: names for any number of agents -----------------------------------------------


def test_1001_agents_of_a_role_get_unique_names_at_once():
    names = within(5, lambda: agent_names(["guard"], {"guard": 1001}, seed=3))
    assert len(names) == 1001
    assert len({n for n, _ in names}) == 1001
    assert all(n.startswith("Guard_") and n[6:].isdigit() for n, _ in names)
    assert names == agent_names(["guard"], {"guard": 1001}, seed=3)  # still seeded
    # up to 500 agents the names keep their three digits (and stay what they were)
    small = agent_names(["guard"], {"guard": 500}, seed=3)
    assert all(len(n) == len("Guard_123") for n, _ in small)


def test_a_batch_with_1001_agents_of_a_role_completes(db):
    store = Store.open(db, "alice")
    exp = store.insert_experiment(load_experiment(PRISON))
    grid = make_grid(
        exp, llms=["scripted"], messages=2, days=1, agents="guard=1001", speakers=["round_robin"]
    )
    report = within(60, lambda: start_batch(store, exp, grid, RunOptions()))
    assert report.status == "completed"
    (rec,) = store.list_conversations(batch_id=report.batch_id)
    assert len(rec.agents) == 1002 and len({a.name for a in rec.agents}) == 1002


def test_agents_of_a_role_share_one_prompt():
    exp = load_experiment(PRISON)
    grid = make_grid(
        exp, llms=["scripted"], messages=2, days=1, agents="guard=3", speakers=["round_robin"]
    )
    _, spec = next(grid.expand())
    agents = build_agents(exp, spec)
    guards = [a for a in agents if a.role == "guard"]
    assert len(guards) == 3 and len({a.system_prompt for a in guards}) == 1


# --- item 10: counted, not expanded; ranges checked ---------------------------------------


def expanded_calls(grid) -> int:
    """The LLM calls of a grid counted by expanding it (the definition)."""
    total = 0
    for _, spec in grid.expand():
        total += spec.messages + spec.days
        if spec.speaker == "auto" and sum(spec.agents.values()) > 2:
            total += spec.messages
    return total


@pytest.mark.parametrize(
    ("agents", "every_day", "every_combination", "speakers"),
    [
        ("guard=1,prisoner=1", False, False, ["auto"]),
        ("guard=1,prisoner=2", True, False, ["round_robin", "auto"]),
        ("guard=2,prisoner=3", True, True, ["auto", "random"]),
        ("guard=1,prisoner=1", False, True, ["auto"]),
        ("guard=3,prisoner=1", False, True, ["round_robin"]),
    ],
)
def test_grid_size_and_calls_are_the_expansion_counted(
    agents, every_day, every_combination, speakers
):
    exp = load_experiment(PRISON)
    grid = make_grid(
        exp, llms=["scripted", "llama3"], messages=6, days=3, agents=agents, speakers=speakers,
        every_day=every_day, every_combination=every_combination, repetitions=2,
    )  # fmt: skip
    assert grid.size() == sum(1 for _ in grid.expand())
    assert grid.llm_calls() == expanded_calls(grid)


def test_one_role_grids_count_small_combinations_right():
    exp = load_experiment(PRISON)
    exp.roles = exp.roles[:1]
    for n in (1, 2, 4):
        grid = make_grid(
            exp, llms=["scripted"], messages=4, days=1, agents=f"guard={n}", speakers=["auto"],
            every_combination=True,
        )  # fmt: skip
        assert grid.llm_calls() == expanded_calls(grid)


def test_the_grid_table_gives_ranges_not_every_combination():
    """--agents guard=3000,prisoner=3000 --every-combination --every-day: the table said every
    one of the 9,000,000 combinations (and every day count); it gives the ranges."""
    from rich.console import Console

    from simulator import display

    exp = load_experiment(PRISON)
    grid = make_grid(
        exp, llms=["scripted"], messages=40, days=20, agents="guard=3000,prisoner=3000",
        speakers=["round_robin"], every_combination=True, every_day=True,
    )  # fmt: skip
    console = Console(record=True, width=200)
    console.print(display.grid_table(grid))
    text = console.export_text()
    assert "guard 1..3000 × prisoner 1..3000 (9,000,000 combinations)" in text
    assert "1..20 (each)" in text and "prisoner=2;" not in text


def test_a_billion_repetitions_are_counted_at_once():
    exp = load_experiment(PRISON)

    def plan() -> tuple[int, int]:
        grid = make_grid(
            exp, llms=["scripted"], messages=10, days=2, agents="guard=1,prisoner=2",
            speakers=["round_robin", "auto"], repetitions=10**9,
        )  # fmt: skip
        return grid.size(), grid.llm_calls()

    size, calls = within(5, plan)
    assert size == 2 * 10**9
    assert calls == 10**9 * ((10 + 2) + (10 + 2 + 10))


def test_dry_run_of_a_billion_repetitions_returns_at_once():
    cmd = [sys.executable, "-m", "simulator.cli", "run", str(PRISON), "--llm", "scripted"]
    done = subprocess.run(
        [*cmd, "--repetitions", "1000000000", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "1,000,000,000 conversations, at least 12,000,000,000 LLM calls" in done.stdout


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"messages": 2**63}, "--messages must be at most"),
        ({"messages": 2**64 + 5, "days": 1}, "--messages must be at most"),
        ({"days": 2**63}, "--days must be at most"),
        ({"seed": 2**63}, "--seed must be at most"),
        ({"seed": -1}, "--seed must be at least 0"),
        ({"repetitions": 2**63}, "--repetitions must be at most"),
        ({"repetitions": -3}, "--repetitions must be at least 1"),
        ({"seed": INT64_MAX, "repetitions": 2}, "seed + r"),
        ({"agents": "guard=10001"}, "at most 10,000 agents per role"),
        ({"repetitions": 2**62, "speakers": ["auto", "random", "round_robin"]}, "fewer"),
    ],
)
def test_out_of_range_numbers_are_a_clear_error(changes, expected):
    exp = load_experiment(PRISON)
    values: dict[str, Any] = dict(
        llms=["scripted"], messages=4, days=1, agents="guard=1,prisoner=1",
        speakers=["round_robin"], repetitions=1, seed=0,
    )  # fmt: skip
    values.update(changes)
    with pytest.raises(UserError, match=expected.replace("+", r"\+")):
        make_grid(exp, **values)


def test_huge_seed_on_the_command_line_is_a_clear_error():
    done = subprocess.run(
        [sys.executable, "-m", "simulator.cli", "run", str(PRISON), "--llm", "scripted",
         "--seed", str(2**63), "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "--seed must be at most 9,223,372,036,854,775,807" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_expanded_calls_helper_matches_a_hand_count():
    exp = load_experiment(PRISON)
    grid = make_grid(
        exp, llms=["scripted"], messages=6, days=2, agents="guard=1,prisoner=2",
        speakers=["auto"], every_day=True,
    )  # fmt: skip
    # days 1 and 2: (6 + 1 + 6) + (6 + 2 + 6)
    assert expanded_calls(grid) == 27
    assert list(itertools.islice(grid.expand(), 3))[-1][0] == 1
