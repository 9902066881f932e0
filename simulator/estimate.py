"""What a batch will use before it runs (`run --dry-run`, issue 13): LLM calls, prompt and
completion tokens per LLM and, with prices set (simulator/pricing.py), the cost.

Each condition of the grid (one per repetition group) is played through the real
Conversation with a stand-in model that answers with replies of the expected length, so the
prompts are the composed ones — system prompts, day openings with summaries, speaker
selection requests — and grow as the day goes on, exactly as in the batch. A reply's
expected length is, per LLM and per kind of call (agent, summarizer, selector):
  1. the average of earlier conversations of the same experiment with that LLM, if any;
  2. else its `max_tokens` (an upper bound: most replies stop earlier);
  3. else what the scripted model answers on average (scripted LLMs), or DEFAULT_REPLY_TOKENS.
Tokens are counted as the scripted model counts them (words) for scripted LLMs, and as
characters / 4 plus 4 per message (the usual rule of thumb for BPE tokenizers) otherwise.
Re-asks after empty or invalid replies and retries come on top.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from simulator import prompts
from simulator.conversation import SELECTOR_SYSTEM, Conversation, ConversationSpec, Models
from simulator.experiment import Experiment, ModelSpec
from simulator.grid import Grid
from simulator.llm.base import ChatMessage, Reply
from simulator.pricing import FORMAT, Price, price_for

DEFAULT_REPLY_TOKENS = 200  # a reply's tokens when nothing better is known
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4  # tokens a chat template adds per message (role markers)
MAX_CONDITIONS = 400  # conditions played through per LLM; larger grids are sampled
KINDS = ("agents", "summarizer", "selector")
_NAME = re.compile(r"\b[A-Z][A-Za-z0-9]*_\d{3,}\b")
_SPEAKER = re.compile(r"^([A-Z][A-Za-z0-9]*_\d{3,}):", re.M)


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
        self.by_label: dict[str, LLMEstimate] = {}

    def add(self, label: str, prompt: int, completion: int, weight: float) -> None:
        e = self.by_label.setdefault(label, LLMEstimate(label))
        e.calls += round(weight)
        e.prompt_tokens += round(prompt * weight)
        e.completion_tokens += round(completion * weight)


class _StandIn:
    """A ChatModel answering with replies of the expected length, counting what it is sent."""

    endpoint = "estimate"

    def __init__(self, spec: ModelSpec, kind: str, length: float, tally: _Tally):
        self.spec, self.kind, self.tally = spec, kind, tally
        self.name = spec.model
        self.count = count_tokens(spec)
        self.overhead = 0 if spec.provider == "scripted" else MESSAGE_OVERHEAD
        self.length = max(1, round(length))
        self.weight = 1.0

    def chat(self, messages: list[ChatMessage], *, stop: list[str] | None = None) -> Reply:
        prompt = sum(self.count(m["content"]) + self.overhead for m in messages)
        if messages and messages[0]["content"] == SELECTOR_SYSTEM:
            text = _selection(messages[-1]["content"])
        else:
            # "tok " is one word and four characters: `length` tokens by either count.
            text = " ".join(["tok"] * self.length)
        completion = self.count(text)
        self.tally.add(self.spec.label, prompt, completion, self.weight)
        return Reply(text=text, prompt_tokens=prompt, completion_tokens=completion)


def _selection(request: str) -> str:
    """A valid answer to a speaker-selection request: a listed agent other than the last."""
    spoken = _SPEAKER.findall(request)
    last = spoken[-1] if spoken else None
    names = [n for n in dict.fromkeys(_NAME.findall(request)) if n != last]
    return names[0] if names else "nobody"


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
    levels = list(grid.level_combinations())
    days = grid.day_counts()
    combos = grid.agent_combinations()
    speakers = ["round_robin" if s == "manual" else s for s in grid.speakers]
    per_llm = len(levels) * len(days) * len(combos) * len(speakers)
    for llm in grid.llms:
        roles = {
            "agents": llm,
            "summarizer": exp.summarizer.llm or llm,
            "selector": exp.selector_llm or llm,
        }
        known = history.get(llm.label)
        lengths = {k: reply_tokens(spec, k, known) for k, spec in roles.items()}
        models = {k: _StandIn(spec, k, lengths[k], tally) for k, spec in roles.items()}
        if known is not None and known.per_call:
            basis.append(f"{llm.label}: {known.conversations:,} earlier conversations")
        else:
            source = "max_tokens" if llm.max_tokens else "a typical reply"
            basis.append(f"{llm.label}: {source} ({lengths['agents']:.0f} tokens)")
        if per_llm <= MAX_CONDITIONS:
            conditions = [
                (lv, d, a, s) for lv in levels for d in days for a in combos for s in speakers
            ]
        else:
            rng = random.Random(grid.seed)
            conditions = [
                (rng.choice(levels), rng.choice(days), rng.choice(combos), rng.choice(speakers))
                for _ in range(MAX_CONDITIONS)
            ]
        weight = grid.repetitions * per_llm / len(conditions)
        for m in models.values():
            m.weight = weight
        for level, d, agents, speaker in conditions:
            spec = ConversationSpec(llm, grid.messages, d, agents, speaker, grid.seed, 0, level)
            Conversation(
                exp,
                spec,
                Models(
                    agent=models["agents"],
                    summarizer=models["summarizer"],
                    selector=models["selector"],
                ),
                templates=templates,
            ).run()
    out = []
    for e in tally.by_label.values():
        called = _spec_of(e.label, grid, exp)
        price = None
        if called is not None:  # the scripted model runs here, for free
            price = Price(0, 0) if called.provider == "scripted" else price_for(called, prices)
        cost = price.cost(e.prompt_tokens, e.completion_tokens) if price is not None else None
        out.append(dataclasses.replace(e, cost=cost))
    return Estimate(conversations=grid.size(), llms=out, basis=basis)


def _spec_of(label: str, grid: Grid, exp: Experiment) -> ModelSpec | None:
    for spec in [*grid.llms, exp.summarizer.llm, exp.selector_llm]:
        if spec is not None and spec.label == label:
            return spec
    return None
