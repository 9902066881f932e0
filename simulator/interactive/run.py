"""Perform new conversations from the experiment menu.

The answers build the same grid the flags of `simulator run` build (make_grid), and the batch
runs through the same start_batch, drawn with the same progress view, and ends with the same
summary (display.closing_text: the runner's own counts of the batch it started).
"""

from __future__ import annotations

from simulator import display
from simulator.experiment import SPEAKER_METHODS, Experiment
from simulator.grid import make_grid
from simulator.interactive.questions import Choice, Questions, manual_chooser
from simulator.interactive.wizard import llm_title
from simulator.runner import options_from_settings, start_batch
from simulator.settings import load_settings
from simulator.store import Store, plural


def run_conversations(store: Store, q: Questions, exp: Experiment) -> None:
    """Ask for the grid of conditions, show it, run the batch with progress when confirmed."""
    repetitions = q.integer("Repetitions per setting", 1, minimum=1)
    choices = [
        Choice(llm_title(spec), spec.label, checked=i == 0) for i, spec in enumerate(exp.llms)
    ]
    if not any(spec.provider == "scripted" for spec in exp.llms):
        choices.append(Choice("scripted (offline dry run)", "scripted"))
    llms = q.checkbox("LLMs", choices, at_least_one="Choose at least one LLM.")
    messages = q.integer("Total messages per conversation (agent messages)", 10, minimum=2)
    days = q.integer(f"Days (1 to {messages // 2})", min(2, messages // 2), 1, messages // 2)
    every_day = days > 1 and q.confirm(f"Try every day count from 1 to {days}?")
    agents = {
        role.name: q.integer(f"Maximum agents of role {role.name}", 1, minimum=1)
        for role in exp.roles
    }
    every_combination = any(n > 1 for n in agents.values()) and q.confirm(
        "Try each combination (1 to the maximum for every role)?"
    )
    speakers = q.checkbox(
        "Speaker selection method(s)",
        [Choice(m, m, checked=m == "round_robin") for m in SPEAKER_METHODS],
        at_least_one="Choose at least one method.",
    )
    factors = {
        f.name: q.checkbox(
            f"Levels of the factor {f.name}",
            [Choice(level, level, checked=True) for level in f.levels],
            at_least_one=f"Choose at least one level of {f.name}.",
        )
        for f in exp.factors
    }
    grid = make_grid(
        exp,
        llms=llms,
        messages=messages,
        days=days,
        agents=agents,
        speakers=speakers,
        every_day=every_day,
        every_combination=every_combination,
        repetitions=repetitions,
        factors=factors,
    )
    q.console.print(display.grid_table(grid))
    if not q.confirm(
        f"{plural(grid.size(), 'conversation')}, at least {grid.llm_calls():,} LLM calls. Start?",
        default=True,
    ):
        q.say("Not started.")
        return
    manual = "manual" in grid.speakers
    options = options_from_settings(
        load_settings(),
        manual=manual_chooser(input=q.input, output=q.output) if manual else None,
        on_warning=lambda w: q.say(f"Warning: {w}", style="yellow"),
    )
    # the live display and the manual speaker question cannot share the screen
    with display.batch_views(q.console, live=False if manual else None) as (pulls, progress):
        options.pull_progress, options.on_progress = pulls, progress
        report = start_batch(store, exp, grid, options)
    q.console.print(display.closing_text(store, report))  # as `run` prints it
    if report.status != "completed":
        q.say(
            f"Continue the unfinished conversations with:  simulator resume {report.batch_id}",
            style="yellow",
        )
