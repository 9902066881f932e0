"""What a batch will use before it runs (`run --dry-run`, issue 13): LLM calls, prompt and
completion tokens per LLM and, with prices set (simulator/pricing.py), the cost.

The prompts are those a conversation sends (simulator/conversation.py): system prompts, day
openings that carry every earlier day's summary, the day so far, summary and
speaker-selection requests, all growing as the day goes on. They are counted in closed form
(simulator/prompt_sums.py), so a dry run takes as long for 10 messages as for 10**15: each
text a condition shares is composed once and measured, and the series over turns and days
is summed arithmetically, with every reply of its expected length. Who speaks when: round
robin (and manual, and two agents alternating) exactly; `auto` as a stand-in selector that
names the first listed agent other than the last speaker; `random` by its expected values
(each agent equally often, never twice in a row). A reply's expected length is, per LLM and
per kind of call (agent, summarizer, selector):
  1. the average of earlier conversations of the same experiment with that LLM, if any;
  2. else its `max_tokens` (an upper bound: most replies stop earlier);
  3. else what the scripted model answers on average (scripted LLMs), or DEFAULT_REPLY_TOKENS.
Tokens are counted as the scripted model counts them (words) for scripted LLMs, and as
characters / 4 plus 4 per message (the usual rule of thumb for BPE tokenizers) otherwise;
a message whose length varies with the turn is rounded up by 3/8 of a token, the average
of rounding up each message. Re-asks after empty or invalid replies and retries come on
top. Grids of more than MAX_CONDITIONS conditions per LLM are sampled.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from simulator import prompts
from simulator.experiment import Experiment, ModelSpec
from simulator.grid import Grid
from simulator.pricing import FORMAT, Price, price_for
from simulator.prompt_sums import (
    CHARS_PER_TOKEN,
    Agents,
    ConditionCounter,
    ConditionTexts,
    Measure,
    Number,
    compose_condition,
    random_order,
    speaking_order,
)

DEFAULT_REPLY_TOKENS = 200  # a reply's tokens when nothing better is known
MAX_CONDITIONS = 400  # conditions counted per LLM; larger grids are sampled
KINDS = ("agents", "summarizer", "selector")


@dataclass
class ReplyLengths:
    """Average completion tokens per call of earlier conversations with one LLM, by kind."""

    conversations: int = 0
    per_call: dict[str, float] = field(default_factory=dict)  # kind -> tokens per call


@dataclass
class LLMEstimate:
    label: str  # the LLM called (agents, summarizer or selector)
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None  # USD; None without a price for the model


@dataclass
class Estimate:
    conversations: int
    llms: list[LLMEstimate]
    basis: list[str]  # how each LLM's reply length was chosen, for the user

    @property
    def calls(self) -> int:
        return sum(e.calls for e in self.llms)

    @property
    def prompt_tokens(self) -> int:
        return sum(e.prompt_tokens for e in self.llms)

    @property
    def completion_tokens(self) -> int:
        return sum(e.completion_tokens for e in self.llms)

    @property
    def cost(self) -> float | None:
        """USD for the LLMs that have a price (None when none has)."""
        known = [e.cost for e in self.llms if e.cost is not None]
        return sum(known) if known else None

    @property
    def unpriced(self) -> list[str]:
        return [e.label for e in self.llms if e.cost is None]

    def lines(self) -> list[str]:
        """What `run --dry-run` prints."""
        out = [
            f"Estimate: {self.calls:,} LLM calls, {self.prompt_tokens:,} prompt tokens, "
            f"{self.completion_tokens:,} completion tokens"
            + (f", ${self.cost:,.2f}" if self.cost is not None else "")
            + " (re-asks and retries come on top)."
        ]
        for e in self.llms:
            cost = f", ${e.cost:,.2f}" if e.cost is not None else ", no price set"
            out.append(
                f"  {e.label}: {e.calls:,} calls, {e.prompt_tokens:,} prompt + "
                f"{e.completion_tokens:,} completion tokens{cost}"
            )
        out += [f"  reply lengths from {b}" for b in self.basis]
        if self.unpriced:
            out.append(
                f"  For the cost of {', '.join(self.unpriced)}, set SIMULATOR_PRICES (in the "
                f"environment or .env) as {FORMAT}."
            )
        return out


def count_tokens(spec: ModelSpec) -> Callable[[str], int]:
    """How tokens of `spec`'s text are counted for the estimate."""
    if spec.provider == "scripted":
        return lambda text: len(text.split())
    return lambda text: math.ceil(len(text) / CHARS_PER_TOKEN)


def reply_tokens(spec: ModelSpec, kind: str, history: ReplyLengths | None) -> float:
    """The expected completion tokens of one call of `kind` (see the module's docstring)."""
    if history is not None and kind in history.per_call:
        return history.per_call[kind]
    if kind == "selector":
        return 1.0  # one name
    if spec.max_tokens:
        return float(spec.max_tokens)
    if spec.provider == "scripted":
        from simulator.llm.scripted import typical_reply_words

        return typical_reply_words(spec)
    return float(DEFAULT_REPLY_TOKENS)


class _Tally:
    def __init__(self) -> None:
        self.by_label: dict[str, list[Number]] = {}  # label -> [calls, prompt, completion]

    def add(self, label: str, calls: Number, prompt: Number, completion: Number) -> None:
        totals: list[Number] = self.by_label.setdefault(label, [0, 0, 0])
        for i, value in enumerate((calls, prompt, completion)):
            totals[i] += value


Condition = tuple[dict[str, str], int, dict[str, int], str]  # levels, days, agents, speaker


def _conditions(grid: Grid) -> tuple[list[Condition], int]:
    """The conditions counted per LLM (all, or MAX_CONDITIONS drawn at random) and how many
    the grid has per LLM. Drawn by index, so a grid of any size is never listed."""
    names = list(grid.factors)
    n_levels, n_combos = grid.level_count(), grid.combination_count()
    n_days = grid.days if grid.every_day else 1
    speakers = ["round_robin" if s == "manual" else s for s in grid.speakers]
    per_llm = n_levels * n_days * n_combos * len(speakers)
    if per_llm <= MAX_CONDITIONS:
        product = itertools.product(
            grid.level_combinations(), grid.day_counts(), grid.agent_combinations(), speakers
        )
        return list(product), per_llm
    roles = list(grid.agents)

    def nth(sizes: list[int], index: int) -> list[int]:  # itertools.product's order
        out = []
        for size in reversed(sizes):
            index, i = divmod(index, size)
            out.append(i)
        return out[::-1]

    rng = random.Random(grid.seed)
    drawn = []
    for _ in range(MAX_CONDITIONS):
        # the same draws as rng.choice over the listed dimensions would make
        at = nth([len(grid.factors[n]) for n in names], rng.randrange(n_levels))
        levels = {n: grid.factors[n][i] for n, i in zip(names, at)}
        day = 1 + rng.randrange(n_days)  # a list of one value still draws, as rng.choice
        days = day if grid.every_day else grid.days
        if grid.every_combination:
            at = nth([grid.agents[r] for r in roles], rng.randrange(n_combos))
            agents = {r: 1 + i for r, i in zip(roles, at)}
        else:
            agents = dict(grid.agents)
            rng.randrange(1)
        drawn.append((levels, days, agents, speakers[rng.randrange(len(speakers))]))
    return drawn, per_llm


def estimate(
    exp: Experiment,
    grid: Grid,
    history: dict[str, ReplyLengths] | None = None,
    templates: prompts.Templates | None = None,
    prices: dict[str, Price] | None = None,
) -> Estimate:
    """Calls, tokens and cost of running `grid` (see the module's docstring). `history`:
    reply lengths of earlier conversations by LLM label (Store.reply_lengths)."""
    history = history or {}
    prices = prices or {}
    templates = templates or prompts.shipped_templates()
    tally = _Tally()
    basis = []
    conditions, per_llm = _conditions(grid)
    # every condition stands for its repetitions, or a share of the conditions not drawn
    weight: Number = Fraction(grid.repetitions * per_llm, len(conditions))
    if weight.denominator == 1:
        weight = grid.repetitions * per_llm // len(conditions)
    # by factor levels and agent counts: days and the speaker method change no text
    composed: dict[tuple[object, ...], ConditionTexts] = {}
    counters: dict[tuple[object, ...], ConditionCounter] = {}
    for llm in grid.llms:
        roles = {
            "agents": llm,
            "summarizer": exp.summarizer.llm or llm,
            "selector": exp.selector_llm or llm,
        }
        known = history.get(llm.label)
        lengths = {k: reply_tokens(spec, k, known) for k, spec in roles.items()}
        if known is not None and known.per_call:
            basis.append(f"{llm.label}: {known.conversations:,} earlier conversations")
        else:
            source = "max_tokens" if llm.max_tokens else "a typical reply"
            basis.append(f"{llm.label}: {source} ({lengths['agents']:.0f} tokens)")
        measures = {k: Measure.of(spec) for k, spec in roles.items()}
        replies = {k: max(1, round(v)) for k, v in lengths.items()}
        for levels, days, counts, speaker in conditions:
            key = (tuple(levels.items()), tuple(counts.items()))
            if key not in composed:
                composed[key] = compose_condition(exp, levels, counts)
            cond = composed[key]
            if (key, llm.label) not in counters:
                counters[key, llm.label] = ConditionCounter(cond, measures, replies, templates)
            counter = counters[key, llm.label]
            agents = cond.agents
            if agents.count <= 2 or speaker == "round_robin":
                period: Agents | None = agents
            elif speaker == "auto":
                period = agents.first(2)  # the stand-in selector alternates the first two
            else:
                period = None
            asks = speaker == "auto" and agents.count > 2
            base, extra = divmod(grid.messages, days)
            for lo, hi, n in ((1, extra, base + 1), (extra + 1, days, base)):
                if hi < lo:
                    continue
                if period is None:
                    day = random_order(agents, n)
                else:
                    day = speaking_order(agents, n, period)
                n_days = hi - lo + 1
                kinds = [("selector", n_days * n)] if asks else []
                kinds += [("agents", n_days * n), ("summarizer", n_days)]
                for kind, count in kinds:
                    prompt, completion = getattr(counter, kind)(day, lo, hi)
                    tally.add(
                        roles[kind].label, weight * count, weight * prompt, weight * completion
                    )
    out = []
    for label, (calls, prompt, completion) in tally.by_label.items():
        e = LLMEstimate(label, round(calls), round(prompt), round(completion))
        called = _spec_of(label, grid, exp)
        price = None
        if called is not None:  # the scripted model runs here, for free
            price = Price(0, 0) if called.provider == "scripted" else price_for(called, prices)
        e.cost = price.cost(e.prompt_tokens, e.completion_tokens) if price is not None else None
        out.append(e)
    return Estimate(conversations=grid.size(), llms=out, basis=basis)


def _spec_of(label: str, grid: Grid, exp: Experiment) -> ModelSpec | None:
    for spec in [*grid.llms, exp.summarizer.llm, exp.selector_llm]:
        if spec is not None and spec.label == label:
            return spec
    return None
