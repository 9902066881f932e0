"""Closed-form sums of the prompts a conversation sends (simulator/conversation.py), for
`run --dry-run` (simulator/estimate.py): the texts a condition shares are composed once and
measured, and the series over its turns and days is summed arithmetically, so counting
10**15 messages takes as long as counting 10.

Units are words (the scripted model's tokens) or characters (4 to a token), which add up as
texts are joined. Who speaks when: a fixed order exactly (round robin, two agents
alternating, the stand-in `auto` selector naming the first listed agent other than the
last), expected values for `random`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from simulator import prompts
from simulator.conversation import RESEARCHER, SELECTOR_SYSTEM, Summary, day_opening
from simulator.experiment import Experiment, ModelSpec

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4  # tokens a chat template adds per message (role markers)
ROUNDING = Fraction(3, 8)  # average tokens added by rounding a message's characters / 4 up
Number = int | Fraction  # exact: ints while nothing divides (Fractions are slow)
_CONTINUE = f"{RESEARCHER}: Please continue."  # what a lone agent is told (agent_view)


@dataclass(frozen=True)
class Measure:
    """How one LLM's tokens are counted: words (scripted), or characters / 4 plus an
    overhead per message. `units` are words or characters, which add up as texts are joined."""

    words: bool
    overhead: int

    @classmethod
    def of(cls, spec: ModelSpec) -> Measure:
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
        """Units of a reply of `length` tokens (reply_text)."""
        return length if self.words else CHARS_PER_TOKEN * length - 1

    def labels(self, count: Number, name_chars: Number) -> Number:
        """Units of `count` `Name: ` labels whose names have `name_chars` characters in all."""
        return count if self.words else name_chars + 2 * count

    @property
    def sep(self) -> int:
        """Units of the blank line between two messages of a transcript."""
        return 0 if self.words else 2


@dataclass(frozen=True)
class TemplateUnits:
    """Units of a filled template as a function of its fields' units: composed once with
    one-character values, once more per field to count where the field occurs."""

    base: int  # units with every field empty
    times: dict[str, int]  # field -> occurrences

    @classmethod
    def measure(cls, compose: Callable[..., str], m: Measure, fields: list[str]) -> TemplateUnits:
        sample = {f: "x" for f in fields}
        text = compose(**sample)
        times = {f: len(compose(**{**sample, f: "xx"})) - len(text) for f in fields}
        # "x" is one word and one character: what it added is what its fields occur
        return cls(m.units(text) - sum(times.values()), times)


@dataclass
class DaySums:
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
class Agents:
    """The agents of a condition by role, in speaking order: (role, count, name length)."""

    roles: list[tuple[str, int, int]]

    @property
    def count(self) -> int:
        return sum(c for _, c, _ in self.roles)

    def name_length(self, role: str) -> int:
        return next(n for r, _, n in self.roles if r == role)

    def first(self, k: int) -> Agents:
        """The first `k` agents in order."""
        out, left = [], k
        for role, count, length in self.roles:
            if left > 0:
                out.append((role, min(count, left), length))
                left -= min(count, left)
        return Agents(out)


def reply_text(length: int) -> str:
    """A reply of `length` tokens by either count: "tok" is one word and four characters."""
    return " ".join(["tok"] * length)


def agent_name_length(role: str, count: int) -> int:
    """The length of an agent's name, `Role_NNN` (conversation.agent_names)."""
    width = 3 if count <= 500 else max(3, len(str(2 * count - 1)))
    return len(role) + 1 + width


def speaking_order(agents: Agents, day_n: int, period: Agents) -> DaySums:
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
    return DaySums(day_n, turns, own, earlier, own_names, names, last)


def random_order(agents: Agents, day_n: int) -> DaySums:
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
    return DaySums(
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
class ConditionTexts:
    """What one condition's conversation sends, composed once and measured."""

    agents: Agents
    system: dict[str, str]  # role -> system prompt
    summarizer: str
    starting: str
    # role -> (an agent as the speaker-selection request lists it, agents of the role)
    listed: dict[str, tuple[tuple[str, str, str], int]]


class ConditionCounter:
    """Counts one condition's calls and tokens per kind, in closed form."""

    def __init__(
        self,
        cond: ConditionTexts,
        measures: dict[str, Measure],
        lengths: dict[str, int],
        templates: prompts.Templates,
    ):
        self.cond, self.measures, self.templates = cond, measures, templates
        self.length, self.summary_length = lengths["agents"], lengths["summarizer"]

    # --- the day's opening: the starting message, then each earlier day's summary -----------

    def openings(self, m: Measure, lo: int, hi: int, stripped: bool = False) -> int:
        """Units of the openings of days lo..hi (`stripped`: as the selector's transcript has
        them)."""
        start = self.cond.starting
        days = hi - lo + 1
        # what each earlier day adds: "\nDay 1 summary:\n" and the summary (the day's number
        # one word or one digit here, its digits below)
        summary = Summary(1, reply_text(self.summary_length))
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

    def agents(self, day: DaySums, lo: int, hi: int) -> tuple[Number, Number]:
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

    def summarizer(self, day: DaySums, lo: int, hi: int) -> tuple[Number, Number]:
        m, n, days = self.measures["summarizer"], day.n, hi - lo + 1
        request = self._summary_request
        transcript = n * m.reply(self.length) + m.labels(n, day.names) + m.sep * (n - 1)
        units = days * (request.base + request.times["transcript"] * transcript)
        # the day's number: one word, or its digits
        numbers = days if m.words else _digits_upto(hi) - _digits_upto(lo - 1)
        units += request.times["day"] * numbers
        prompt = days * (m.fixed(self.cond.summarizer) + 2 * m.overhead) + m.tokens(units, days)
        return prompt, days * self.summary_length

    def selector(self, day: DaySums, lo: int, hi: int) -> tuple[Number, Number]:
        m, n, days = self.measures["selector"], day.n, hi - lo + 1
        first, later = self._selection_requests[True], self._selection_requests[False]
        # Each turn's transcript: the opening, then every earlier message of the day.
        openings = self.openings(m, lo, hi, stripped=True)
        research = m.units(f"{RESEARCHER}: ")
        earlier = day.pairs * (m.sep + m.reply(self.length)) + m.labels(
            day.pairs, day.earlier_names
        )
        units = (
            days * (first.base + (n - 1) * later.base)
            + first.times["transcript"] * (days * research + openings)
            + later.times["transcript"]
            * (days * ((n - 1) * research + earlier) + (n - 1) * openings)
            + days * later.times["last_speaker"] * (n - 1 if m.words else day.last_names)
        )
        prompt = days * n * (m.fixed(SELECTOR_SYSTEM) + 2 * m.overhead) + m.tokens(units, days * n)
        # the stand-in selector answers with a name
        answers = sum(
            (day.turns[r] * m.fixed("x" * self.cond.agents.name_length(r)) for r in day.turns),
            0,
        )
        return prompt, days * answers

    @functools.cached_property
    def _summary_request(self) -> TemplateUnits:
        return TemplateUnits.measure(
            lambda day, transcript: prompts.summary_request(day, transcript, self.templates),
            self.measures["summarizer"],
            ["day", "transcript"],
        )

    @functools.cached_property
    def _selection_requests(self) -> dict[bool, TemplateUnits]:
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
            r = TemplateUnits.measure(
                lambda transcript, last_speaker, first=first: request(
                    one_each, transcript, None if first else last_speaker
                ),
                m,
                ["transcript", "last_speaker"],
            )
            out[first] = dataclasses.replace(r, base=r.base + extra)
        return out


def compose_condition(
    exp: Experiment, levels: dict[str, str], counts: dict[str, int]
) -> ConditionTexts:
    """The texts a condition's conversations share (conversation.build_agents, Conversation)."""
    roles = [r for r in exp.roles if counts.get(r.name, 0) > 0]
    lengths = {r.name: agent_name_length(r.name, counts[r.name]) for r in roles}
    listed = {}
    for r in roles:
        label = f"{r.name[:1].upper()}{r.name[1:]}"
        name = f"{label}_{'0' * (lengths[r.name] - len(label) - 1)}"
        listed[r.name] = ((name, r.name, r.description or r.name), counts[r.name])
    return ConditionTexts(
        agents=Agents([(r.name, counts[r.name], lengths[r.name]) for r in roles]),
        system={r.name: prompts.agent_prompt(exp, r.name, counts, levels) for r in roles},
        summarizer=prompts.summarizer_prompt(exp, counts, levels),
        starting=prompts.starting_message(exp, counts, levels),
        listed=listed,
    )
