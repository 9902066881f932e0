"""What a batch will use before it runs (`run --dry-run`, issue 13): LLM calls, prompt and
completion tokens per LLM and, with prices set (simulator/pricing.py), the cost.

The prompts are those a conversation sends (simulator/conversation.py): system prompts, day
openings that carry every earlier day's summary, the day so far, summary and
speaker-selection requests, all growing as the day goes on. They are counted in closed
form, so a dry run takes the same time for 10 messages as for 10**15: each text the
experiment composes (system prompts, starting message, templates) is composed once per
condition and measured, and the series over turns and days is summed arithmetically, with
every reply of its expected length. Who speaks when: round robin (and manual, and two
agents alternating) exactly; `auto` as a stand-in selector that names the first listed
agent other than the last speaker; `random` by its expected values (each agent equally
often, never twice in a row). A reply's expected length is, per LLM and per kind of call
(agent, summarizer, selector):
  1. the average of earlier conversations of the same experiment with that LLM, if any;
  2. else its `max_tokens` (an upper bound: most replies stop earlier);
  3. else what the scripted model answers on average (scripted LLMs), or DEFAULT_REPLY_TOKENS.
Tokens are counted as the scripted model counts them (words) for scripted LLMs, and as
characters / 4 plus 4 per message (the usual rule of thumb for BPE tokenizers) otherwise;
a message whose length varies with the turn is rounded up by 3/8 of a token, the average
of rounding up at each message. Re-asks after empty or invalid replies and retries come on
top. Grids of more than MAX_CONDITIONS conditions per LLM are sampled.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from simulator import prompts
from simulator.conversation import RESEARCHER, SELECTOR_SYSTEM, Summary, day_opening
from simulator.experiment import Experiment, ModelSpec
from simulator.grid import Grid
from simulator.pricing import FORMAT, Price, price_for

DEFAULT_REPLY_TOKENS = 200  # a reply's tokens when nothing better is known
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4  # tokens a chat template adds per message (role markers)
MAX_CONDITIONS = 400  # conditions counted per LLM; larger grids are sampled
KINDS = ("agents", "summarizer", "selector")
ROUNDING = Fraction(3, 8)  # average tokens added by rounding a message's characters / 4 up
Number = int | Fraction  # exact: ints while nothing divides (Fractions are slow)
_CONTINUE = f"{RESEARCHER}: Please continue."  # what a lone agent is told (agent_view)


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


@dataclass(frozen=True)
class _Measure:
    """How one LLM's tokens are counted: words (scripted), or characters / 4 plus an
    overhead per message. `units` are words or characters, which add up as texts are joined."""

    words: bool
    overhead: int

    @classmethod
    def of(cls, spec: ModelSpec) -> _Measure:
        scripted = spec.provider == "scripted"
        return cls(words=scripted, overhead=0 if scripted else MESSAGE_OVERHEAD)

    def units(self, text: str) -> int:
        return len(text.split()) if self.words else len(text)

    def fixed(self, text: str) -> int:
        """Tokens of a message whose text is known (count_tokens)."""
        return len(text.split()) if self.words else math.ceil(len(text) / CHARS_PER_TOKEN)

    def tokens(self, units: Number, messages: Number) -> Number:
        """Tokens of `messages` messages of `units` units in all, each rounded up on average."""
        if self.words:
            return units
        return Fraction(units) / CHARS_PER_TOKEN + ROUNDING * messages

    def reply(self, length: int) -> int:
        """Units of a reply of `length` tokens (_reply_text)."""
        return length if self.words else CHARS_PER_TOKEN * length - 1

    def labels(self, count: Number, name_chars: Number) -> Number:
        """Units of `count` `Name: ` labels whose names have `name_chars` characters in all."""
        return count if self.words else name_chars + 2 * count

    @property
    def sep(self) -> int:
        """Units of the blank line between two messages of a transcript."""
        return 0 if self.words else 2


@dataclass(frozen=True)
class _Linear:
    """Units of a filled template as a function of its fields' units: composed once with
    one-character values, once more per field to count where the field occurs."""

    base: int  # units with every field empty
    times: dict[str, int]  # field -> occurrences

    @classmethod
    def measure(cls, compose: Callable[..., str], m: _Measure, fields: list[str]) -> _Linear:
        sample = {f: "x" for f in fields}
        text = compose(**sample)
        times = {f: len(compose(**{**sample, f: "xx"})) - len(text) for f in fields}
        # "x" is one word and one character: what it added is what its fields occur
        return cls(m.units(text) - sum(times.values()), times)


@dataclass
class _Day:
    """Sums over the turns of one day of `n` messages that the prompts grow by (names in
    characters). Exact for a fixed order of speakers, expected values for `random`."""

    n: int
    turns: dict[str, Number]  # role -> messages its agents write
    own: Number  # sum over turns of the speaker's own earlier messages that day
    earlier_names: Number  # sum over turns of the names of every earlier message's speaker
    own_names: Number  # the same, the speaker's own messages only
    names: Number  # the names of the day's speakers, one per message
    last_names: Number  # the names of the last speaker at turns 2..n

    @property
    def pairs(self) -> int:
        """Sum over turns of the earlier messages that day."""
        return self.n * (self.n - 1) // 2


@dataclass(frozen=True)
class _Agents:
    """The agents of a condition by role, in speaking order: (role, count, name length)."""

    roles: list[tuple[str, int, int]]

    @property
    def count(self) -> int:
        return sum(c for _, c, _ in self.roles)

    def name_length(self, role: str) -> int:
        return next(n for r, _, n in self.roles if r == role)

    def first(self, k: int) -> _Agents:
        """The first `k` agents in order."""
        out, left = [], k
        for role, count, length in self.roles:
            if left > 0:
                out.append((role, min(count, left), length))
                left -= min(count, left)
        return _Agents(out)


def _reply_text(length: int) -> str:
    """A reply of `length` tokens by either count: "tok" is one word and four characters."""
    return " ".join(["tok"] * length)


def agent_name_length(role: str, count: int) -> int:
    """The length of an agent's name, `Role_NNN` (conversation.agent_names)."""
    width = 3 if count <= 500 else max(3, len(str(2 * count - 1)))
    return len(role) + 1 + width


def _speaking_order(agents: _Agents, day_n: int, period: _Agents) -> _Day:
    """Agents of `period` speak in turn, each once per round (round robin, two agents
    alternating, the stand-in `auto` selector)."""
    p = period.count
    q, rem = divmod(day_n, p)
    turns: dict[str, Number] = {r: 0 for r, _, _ in agents.roles}
    own = earlier = own_names = names = 0
    start = 0
    last_role = ""
    for role, count, length in period.roles:
        stop = start + count
        if start <= (day_n - 1) % p < stop:
            last_role = role
        # positions [start, rem) speak q + 1 times a day, [rem, stop) q times
        for lo, hi, k in ((start, min(stop, rem), q + 1), (max(start, rem), stop, q)):
            if hi <= lo or k == 0:
                continue
            c = hi - lo
            positions = (lo + hi - 1) * c // 2
            pairs = c * k * (k - 1) // 2
            turns[role] += c * k
            own += pairs
            own_names += length * pairs
            # position i speaks at turns i + 1 + j * p: n - turn messages come after each
            earlier += length * (k * (c * (day_n - 1) - positions) - p * pairs)
            names += length * c * k
        start = stop
    last = names - period.name_length(last_role)
    return _Day(day_n, turns, own, earlier, own_names, names, last)


def _random_order(agents: _Agents, day_n: int) -> _Day:
    """Expected sums when each turn goes to an agent other than the last, at random (three
    or more agents): every turn is any agent with probability 1/N, and a speaker also spoke
    k turns earlier with probability 1/N + (N - 1)/N * r**k, r = -1/(N - 1)."""
    n_agents = agents.count
    n = day_n
    # (1 - r**n) / (1 - r), to 2**-30 (an exact power would carry (N - 1)**n as its
    # denominator through every sum after it); |r| <= 1/2, so r**n vanishes quickly
    r = -1 / (n_agents - 1)
    geometric = (1 - (r**n if n <= 64 else 0.0)) / (1 - r)
    own = Fraction(n * (n - 1), 2 * n_agents) - Fraction(n_agents - 1, n_agents**2) * (
        n - Fraction(round(geometric * 2**30), 2**30)
    )
    mean_name = Fraction(sum(c * length for _, c, length in agents.roles), n_agents)
    turns: dict[str, Number] = {role: Fraction(n * c, n_agents) for role, c, _ in agents.roles}
    pairs = n * (n - 1) // 2
    return _Day(
        n, turns, own, mean_name * pairs, mean_name * own, mean_name * n, mean_name * (n - 1)
    )


def _digits_upto(x: int) -> int:
    """Digits written to number 1..x."""
    total, k = 0, 1
    while 10 ** (k - 1) <= x:
        total += k * (min(10**k - 1, x) - 10 ** (k - 1) + 1)
        k += 1
    return total


def _digits_upto_sum(x: int) -> int:
    """Sum of _digits_upto(y) for y in 0..x: digits of j counted x - j + 1 times."""
    total, k = 0, 1
    while 10 ** (k - 1) <= x:
        lo, hi = 10 ** (k - 1), min(10**k - 1, x)
        c = hi - lo + 1
        total += k * (c * (x + 1) - (lo + hi) * c // 2)
        k += 1
    return total


def _span(lo: int, hi: int) -> int:
    """Sum of d - 1 for days lo..hi."""
    return (lo - 1 + hi - 1) * (hi - lo + 1) // 2


@dataclass
class _Condition:
    """What one condition's conversation sends, composed once and measured."""

    agents: _Agents
    system: dict[str, str]  # role -> system prompt
    summarizer: str
    starting: str
    # role -> (an agent as the speaker-selection request lists it, agents of the role)
    listed: dict[str, tuple[tuple[str, str, str], int]]


class _Counter:
    """Counts one condition's calls and tokens per kind, in closed form."""

    def __init__(
        self,
        cond: _Condition,
        measures: dict[str, _Measure],
        lengths: dict[str, int],
        templates: prompts.Templates,
    ):
        self.cond, self.measures, self.templates = cond, measures, templates
        self.length, self.summary_length = lengths["agents"], lengths["summarizer"]

    # --- the day's opening: the starting message, then each earlier day's summary -----------

    def openings(self, m: _Measure, lo: int, hi: int, stripped: bool = False) -> int:
        """Units of the openings of days lo..hi (`stripped`: as the selector's transcript has
        them)."""
        start = self.cond.starting
        days = hi - lo + 1
        # what each earlier day adds: "\nDay 1 summary:\n" and the summary (the day's number
        # one word or one digit here, its digits below)
        summary = Summary(1, _reply_text(self.summary_length))
        per_day = m.units(day_opening(start, [summary], 2)) - m.units(start)
        total = days * m.units(start) + per_day * _span(lo, hi)
        if not m.words:
            total += _digits_upto_sum(hi - 1) - _digits_upto_sum(max(lo - 2, 0)) - _span(lo, hi)
            if stripped:
                later = start + "\nDay"
                lead = len(later) - len(later.lstrip())
                total -= lead * (days - (1 if lo == 1 else 0))
                if lo == 1:
                    total -= len(start) - len(start.strip())
        return total

    # --- one kind of call over days lo..hi, each of `day.n` messages ------------------------

    def agents(self, day: _Day, lo: int, hi: int) -> tuple[Number, Number]:
        m, n, days = self.measures["agents"], day.n, hi - lo + 1
        research = m.units(f"{RESEARCHER}: ")
        system = sum(day.turns[r] * m.fixed(text) for r, text in self.cond.system.items())
        if self.cond.agents.count == 1:
            # system, the opening, every earlier reply, and "Please continue." after the first
            user = m.tokens(days * n * research + n * self.openings(m, lo, hi), days * n)
            per_day = (
                system
                + 2 * n * m.overhead
                + (self.length + m.overhead) * day.pairs
                + (n - 1) * (m.fixed(_CONTINUE) + m.overhead)
            )
            return days * per_day + user, days * n * self.length
        # Speakers never follow themselves: the system prompt, a user message before each
        # own earlier reply and one last, holding the opening and the others' messages.
        others = day.pairs - day.own
        units = (
            n * research
            + others * m.reply(self.length)
            + m.labels(others, day.earlier_names - day.own_names)
            + m.sep * (others - day.own)
        )
        user = m.tokens(days * units + n * self.openings(m, lo, hi), days * (n + day.own))
        per_day = system + m.overhead * (2 * n + 2 * day.own) + self.length * day.own
        return days * per_day + user, days * n * self.length

    def summarizer(self, day: _Day, lo: int, hi: int) -> tuple[Number, Number]:
        m, n, days = self.measures["summarizer"], day.n, hi - lo + 1
        request = self._summary_request
        transcript = n * m.reply(self.length) + m.labels(n, day.names) + m.sep * (n - 1)
        units = days * (request.base + request.times["transcript"] * transcript)
        # the day's number: one word, or its digits
        numbers = days if m.words else _digits_upto(hi) - _digits_upto(lo - 1)
        units += request.times["day"] * numbers
        prompt = days * (m.fixed(self.cond.summarizer) + 2 * m.overhead) + m.tokens(units, days)
        return prompt, days * self.summary_length

    def selector(self, day: _Day, lo: int, hi: int) -> tuple[Number, Number]:
        m, n, days = self.measures["selector"], day.n, hi - lo + 1
        # Every turn's transcript: the opening, then each earlier message.
        transcripts = (
            n * m.units(f"{RESEARCHER}: ")
            + day.pairs * (m.sep + m.reply(self.length))
            + m.labels(day.pairs, day.earlier_names)
        )
        units: Number = 0
        for first, calls in ((True, 1), (False, n - 1)):  # the first turn has no last speaker
            r = self._selection_requests[first]
            last = calls if m.words else day.last_names
            units += calls * r.base + r.times["last_speaker"] * last
        units *= days
        times = self._selection_requests[False].times["transcript"]
        units += times * (days * transcripts + n * self.openings(m, lo, hi, stripped=True))
        prompt = days * n * (m.fixed(SELECTOR_SYSTEM) + 2 * m.overhead) + m.tokens(units, days * n)
        # the stand-in selector answers with a name
        answers = sum(
            (day.turns[r] * m.fixed("x" * self.cond.agents.name_length(r)) for r in day.turns),
            0,
        )
        return prompt, days * answers

    @functools.cached_property
    def _summary_request(self) -> _Linear:
        return _Linear.measure(
            lambda day, transcript: prompts.summary_request(day, transcript, self.templates),
            self.measures["summarizer"],
            ["day", "transcript"],
        )

    @functools.cached_property
    def _selection_requests(self) -> dict[bool, _Linear]:
        """The speaker-selection request of a first turn (True) and of later ones, as a
        function of its transcript and last speaker, with every agent listed."""
        m, listed = self.measures["selector"], self.cond.listed
        one_each = [line for line, _ in listed.values()]

        def request(agents: list[tuple[str, str, str]], transcript: str, last: str | None) -> str:
            return prompts.selector_request(agents, transcript, last, self.templates)

        # listing the agents beyond the first of each role: what one more line adds, each
        extra = 0
        for line, count in listed.values():
            if count > 1:
                more = m.units(request([*one_each, line], "x", "x"))
                extra += (count - 1) * (more - m.units(request(one_each, "x", "x")))
        out = {}
        for first in (True, False):
            r = _Linear.measure(
                lambda transcript, last_speaker, first=first: request(
                    one_each, transcript, None if first else last_speaker
                ),
                m,
                ["transcript", "last_speaker"],
            )
            out[first] = dataclasses.replace(r, base=r.base + extra)
        return out


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


def _compose(exp: Experiment, levels: dict[str, str], counts: dict[str, int]) -> _Condition:
    """The texts a condition's conversations share (conversation.build_agents, Conversation)."""
    roles = [r for r in exp.roles if counts.get(r.name, 0) > 0]
    lengths = {r.name: agent_name_length(r.name, counts[r.name]) for r in roles}
    listed = {}
    for r in roles:
        label = f"{r.name[:1].upper()}{r.name[1:]}"
        name = f"{label}_{'0' * (lengths[r.name] - len(label) - 1)}"
        listed[r.name] = ((name, r.name, r.description or r.name), counts[r.name])
    return _Condition(
        agents=_Agents([(r.name, counts[r.name], lengths[r.name]) for r in roles]),
        system={r.name: prompts.agent_prompt(exp, r.name, counts, levels) for r in roles},
        summarizer=prompts.summarizer_prompt(exp, counts, levels),
        starting=prompts.starting_message(exp, counts, levels),
        listed=listed,
    )


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
    composed: dict[tuple[object, ...], _Condition] = {}
    counters: dict[tuple[object, ...], _Counter] = {}
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
        measures = {k: _Measure.of(spec) for k, spec in roles.items()}
        replies = {k: max(1, round(v)) for k, v in lengths.items()}
        for levels, days, counts, speaker in conditions:
            key = (tuple(levels.items()), tuple(counts.items()))
            if key not in composed:
                composed[key] = _compose(exp, levels, counts)
            cond = composed[key]
            if (key, llm.label) not in counters:
                counters[key, llm.label] = _Counter(cond, measures, replies, templates)
            counter = counters[key, llm.label]
            agents = cond.agents
            if agents.count <= 2 or speaker == "round_robin":
                period: _Agents | None = agents
            elif speaker == "auto":
                period = agents.first(2)  # the stand-in selector alternates the first two
            else:
                period = None
            asks = speaker == "auto" and agents.count > 2
            base, extra = divmod(grid.messages, days)
            for lo, hi, n in ((1, extra, base + 1), (extra + 1, days, base)):
                if hi < lo:
                    continue
                if agents.count == 1 or period is None:
                    day = (
                        _speaking_order(agents, n, agents)
                        if agents.count == 1
                        else (_random_order(agents, n))
                    )
                else:
                    day = _speaking_order(agents, n, period)
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
