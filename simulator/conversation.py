"""One conversation: agents, days, turns, summaries (SPEC §3-5).

The engine is synchronous and talks to ChatModel objects; batches run many conversations
on threads (every client we use — ollama, openai, pymongo, llama.cpp — is blocking, and
threads let one bounded pool share endpoints and the database without an event loop).
Everything it does is a deterministic function of the experiment, the spec, the seed and
the model replies, so a conversation can be resumed from its stored messages.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from simulator import prompts, quality, speakers
from simulator.errors import UserError
from simulator.experiment import Experiment, ModelSpec
from simulator.llm.base import ChatMessage, ChatModel, Reply
from simulator.replies import clean_reply

RESEARCHER = "Researcher"
SELECTOR_SYSTEM = (
    "You choose who speaks next in a role-play conversation. "
    "Answer with exactly one name from the list of participants."
)
EXTRA_ATTEMPTS = 2  # re-asks after an empty reply or an invalid selection


@dataclass
class Agent:
    name: str
    role: str
    system_prompt: str


@dataclass
class Usage:
    """Token and timing figures of one call (or a sum of calls)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: float = 0.0
    retries: int = 0
    calls: int = 0

    def add(self, other: Usage | Reply) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.latency += other.latency
        self.retries += other.retries
        self.calls += other.calls if isinstance(other, Usage) else 1


@dataclass
class Message:
    day: int
    turn: int  # 1-based within the day; turn 0 is the day's starting message (not stored)
    speaker: str
    role: str
    content: str
    raw: str | None = None  # the model's reply when cleaning changed it
    empty: bool = False  # still empty after the re-asks
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None  # the provider's, for the reply kept ("length": cut off)
    flags: list[str] = field(default_factory=list)  # quality flags (simulator/quality)


@dataclass
class Summary:
    day: int
    content: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    flags: list[str] = field(default_factory=list)  # truncated, empty


@dataclass
class SelectorCall:
    day: int
    turn: int
    answer: str
    chosen: str | None  # None when the answer was invalid
    usage: Usage = field(default_factory=Usage)


@dataclass
class Fallback:
    """The auto selector failed three times; round-robin chose `chosen`."""

    day: int
    turn: int
    chosen: str


Event = Message | Summary | SelectorCall | Fallback


@dataclass
class ConversationSpec:
    """The condition of one conversation."""

    llm: ModelSpec
    messages: int  # agent messages in total (the starting message is not one)
    days: int
    agents: dict[str, int]  # agents per role, in the experiment's role order
    speaker: str  # round_robin | random | auto | manual
    seed: int
    repetition: int = 0
    factors: dict[str, str] = field(default_factory=dict)  # factor name -> level (SPEC §10)


@dataclass
class Transcript:
    """What a conversation has produced so far (complete, or stored before an interruption)."""

    messages: list[Message] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    selector_calls: list[SelectorCall] = field(default_factory=list)
    fallbacks: int = 0

    def usage(self) -> dict[str, Usage]:
        totals = {"agents": Usage(), "summarizer": Usage(), "selector": Usage()}
        for m in self.messages:
            totals["agents"].add(m.usage)
        for s in self.summaries:
            totals["summarizer"].add(s.usage)
        for c in self.selector_calls:
            totals["selector"].add(c.usage)
        return totals


@dataclass
class Models:
    """The models one conversation talks to."""

    agent: ChatModel
    summarizer: ChatModel
    selector: ChatModel


# manual selection: (agents, last speaker, day, turn, day so far) -> chosen agent name
ManualChooser = Callable[[Sequence[Agent], str | None, int, int, Sequence[Message]], str]


def messages_per_day(total: int, days: int) -> list[int]:
    """Day k gets total // days messages, the first total % days days one more."""
    validate_counts(total, days)
    base, extra = divmod(total, days)
    return [base + (1 if k < extra else 0) for k in range(days)]


def validate_counts(total: int, days: int) -> None:
    if total < 2:
        raise UserError(f"--messages must be at least 2 (got {total}).")
    if days < 1:
        raise UserError(f"--days must be at least 1 (got {days}).")
    if days > total / 2:
        raise UserError(
            f"--days {days} is more than half of --messages {total}: every day needs at least "
            f"two messages. Use --days {total // 2} or fewer, or more messages."
        )


def agent_names(roles: Sequence[str], counts: dict[str, int], seed: int) -> list[tuple[str, str]]:
    """Seeded unique names `Role_NNN`, in role order then creation order.

    Three digits while a role has at most 500 agents; more agents get a wider number (at
    most half of the numbers in use), so names stay unique and quick to draw for any count.
    """
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for role in roles:
        count = counts.get(role, 0)
        label = f"{role[:1].upper()}{role[1:]}"
        if count > 500:
            width = max(3, len(str(2 * count - 1)))
            numbers = rng.sample(range(10**width), count)
            out += [(f"{label}_{n:0{width}d}", role) for n in numbers]
            continue
        used: set[int] = set()
        for _ in range(count):
            n = rng.randrange(1000)
            while n in used:
                n = rng.randrange(1000)
            used.add(n)
            out.append((f"{label}_{n:03d}", role))
    return out


def build_agents(exp: Experiment, spec: ConversationSpec) -> list[Agent]:
    roles = [r.name for r in exp.roles if spec.agents.get(r.name, 0) > 0]
    # One prompt per role: every agent of a role gets the same one.
    prompt = {role: prompts.agent_prompt(exp, role, spec.agents, spec.factors) for role in roles}
    return [
        Agent(name, role, prompt[role]) for name, role in agent_names(roles, spec.agents, spec.seed)
    ]


def day_opening(starting_message: str, summaries: Sequence[Summary], day: int) -> str:
    """The day's starting message: the experiment's, then each earlier day's summary."""
    text = starting_message
    for s in sorted(summaries, key=lambda s: s.day):
        if s.day < day:
            text += f"\nDay {s.day} summary:\n{s.content}"
    return text


def agent_view(agent: Agent, opening: str, day_messages: Sequence[Message]) -> list[ChatMessage]:
    """What the model sees when `agent` speaks: alternating roles, names in the text."""
    chat: list[ChatMessage] = [{"role": "system", "content": agent.system_prompt}]
    pending: list[str] = [f"{RESEARCHER}: {opening}"]
    for m in day_messages:
        if m.speaker == agent.name:
            if pending:
                chat.append({"role": "user", "content": "\n\n".join(pending)})
                pending = []
            chat.append({"role": "assistant", "content": m.content})
        else:
            pending.append(f"{m.speaker}: {m.content}")
    if not pending:  # a lone agent speaks again: chat templates want a user turn last
        pending.append(f"{RESEARCHER}: Please continue.")
    chat.append({"role": "user", "content": "\n\n".join(pending)})
    return chat


class Conversation:
    """Runs (or continues) one conversation, reporting every event as it happens."""

    def __init__(
        self,
        exp: Experiment,
        spec: ConversationSpec,
        models: Models,
        *,
        agents: list[Agent] | None = None,
        on_event: Callable[[Event], Any] | None = None,
        manual: ManualChooser | None = None,
        summarizer_prompt: str | None = None,
        templates: prompts.Templates | None = None,
    ):
        """`summarizer_prompt`: the one stored with the conversation (a resumed
        conversation keeps the prompt it started with, even if the experiment's sections
        would compose another today); None composes it. `templates`: read once for a
        batch; None reads them now."""
        self.exp = exp
        self.templates = templates or prompts.shipped_templates()
        self.spec = spec
        self.models = models
        self.agents = agents if agents is not None else build_agents(exp, spec)
        self.on_event = on_event or (lambda event: None)
        self.manual = manual
        self.role_names = [r.name for r in exp.roles]
        self._seen: set[str] = set()  # normalized contents of the messages so far (`repeated`)
        self.summarizer_prompt = summarizer_prompt or prompts.summarizer_prompt(
            exp, spec.agents, spec.factors
        )
        self.starting_message = prompts.starting_message(exp, spec.agents, spec.factors)
        if spec.speaker == "manual" and manual is None and len(self.agents) > 2:
            raise UserError("Speaker method 'manual' needs a terminal to choose speakers.")

    def run(self, done: Transcript | None = None) -> Transcript:
        """Run to the end, continuing after whatever `done` already holds."""
        t = done or Transcript()
        # What `repeated` compares with: every earlier message, stored ones included.
        self._seen = {quality.normalized(m.content) for m in t.messages}
        summarized = {s.day for s in t.summaries}
        for day, count in enumerate(messages_per_day(self.spec.messages, self.spec.days), 1):
            if day in summarized:
                continue
            opening = day_opening(self.starting_message, t.summaries, day)
            today = sorted((m for m in t.messages if m.day == day), key=lambda m: m.turn)
            for turn in range(len(today) + 1, count + 1):
                last = today[-1].speaker if today else None
                speaker = self._select(day, turn, last, opening, today, t)
                message = self._speak(speaker, day, turn, opening, today)
                self._emit(message)
                today.append(message)
                t.messages.append(message)
            summary = self._summarize(day, today)
            self._emit(summary)
            t.summaries.append(summary)
        return t

    def _emit(self, event: Event) -> None:
        self.on_event(event)

    # --- speaking -------------------------------------------------------------------------

    def _speak(
        self, agent: Agent, day: int, turn: int, opening: str, today: list[Message]
    ) -> Message:
        view = agent_view(agent, opening, today)
        others = [a.name for a in self.agents if a.name != agent.name]
        stop = [f"\n{RESEARCHER}:"] + [f"\n{n}:" for n in others]
        usage = Usage()
        raw = ""
        content = ""
        finish_reason = None
        for _ in range(1 + EXTRA_ATTEMPTS):
            reply = self.models.agent.chat(view, stop=stop)
            usage.add(reply)
            raw, finish_reason = reply.text, reply.finish_reason
            content = clean_reply(raw, agent.name, agent.role, others, self.role_names)
            if content:
                break
        flags = quality.message_flags(
            content,
            speaker=agent.name,
            finish_reason=finish_reason,
            system_prompt=agent.system_prompt,
            other_names=others,
            role_names=self.role_names,
            seen=self._seen,
        )
        self._seen.add(quality.normalized(content))
        return Message(
            day=day,
            turn=turn,
            speaker=agent.name,
            role=agent.role,
            content=content,
            raw=raw if raw != content else None,
            empty=not content,
            usage=usage,
            finish_reason=finish_reason,
            flags=flags,
        )

    def _summarize(self, day: int, today: list[Message]) -> Summary:
        transcript = prompts.format_transcript([(m.speaker, m.content) for m in today])
        request: list[ChatMessage] = [
            {"role": "system", "content": self.summarizer_prompt},
            {"role": "user", "content": prompts.summary_request(day, transcript, self.templates)},
        ]
        usage = Usage()
        text = ""
        finish_reason = None
        for _ in range(1 + EXTRA_ATTEMPTS):
            reply = self.models.summarizer.chat(request)
            usage.add(reply)
            text, finish_reason = reply.text.strip(), reply.finish_reason
            if text:
                break
        return Summary(
            day=day,
            content=text,
            usage=usage,
            finish_reason=finish_reason,
            flags=quality.summary_flags(text, finish_reason),
        )

    # --- choosing the speaker ---------------------------------------------------------------

    def _select(
        self,
        day: int,
        turn: int,
        last: str | None,
        opening: str,
        today: list[Message],
        t: Transcript,
    ) -> Agent:
        agents = self.agents
        forced = speakers.forced_choice(agents, last)
        if forced is not None:
            return agents[forced]
        method = self.spec.speaker
        if method == "round_robin":
            return agents[speakers.round_robin(agents, last)]
        if method == "random":
            # A generator per turn keeps the choice reproducible when a conversation resumes.
            rng = random.Random(f"{self.spec.seed}/{day}/{turn}")
            return agents[speakers.random_choice(agents, last, rng)]
        if method == "auto":
            return self._auto(day, turn, last, opening, today, t)
        if method == "manual":
            assert self.manual is not None
            name = self.manual(agents, last, day, turn, today)
            for a in agents:
                if a.name == name and name != last:
                    return a
            raise UserError(f"'{name}' cannot speak now: choose another agent than {last}.")
        raise UserError(f"Unknown speaker selection method '{method}'.")

    def _auto(
        self,
        day: int,
        turn: int,
        last: str | None,
        opening: str,
        today: list[Message],
        t: Transcript,
    ) -> Agent:
        described = [
            (a.name, a.role, self.exp.role(a.role).description or a.role) for a in self.agents
        ]
        lines = [(RESEARCHER, opening)] + [(m.speaker, m.content) for m in today]
        request: list[ChatMessage] = [
            {"role": "system", "content": SELECTOR_SYSTEM},
            {
                "role": "user",
                "content": prompts.selector_request(
                    described, prompts.format_transcript(lines), last, self.templates
                ),
            },
        ]
        for _ in range(1 + EXTRA_ATTEMPTS):
            reply = self.models.selector.chat(request)
            chosen = speakers.parse_selection(reply.text, self.agents, last)
            call = SelectorCall(
                day=day,
                turn=turn,
                answer=reply.text,
                chosen=self.agents[chosen].name if chosen is not None else None,
                usage=Usage(
                    reply.prompt_tokens, reply.completion_tokens, reply.latency, reply.retries, 1
                ),
            )
            t.selector_calls.append(call)
            self._emit(call)
            if chosen is not None:
                return self.agents[chosen]
            # Re-ask with the mistake spelled out (a model given the same prompt tends to
            # repeat itself).
            valid = ", ".join(a.name for a in self.agents if a.name != last)
            request = request + [
                {"role": "assistant", "content": reply.text},
                {
                    "role": "user",
                    "content": f"That is not a valid choice. Answer with exactly one of: {valid}.",
                },
            ]
        fallback = self.agents[speakers.round_robin(self.agents, last)]
        t.fallbacks += 1
        self._emit(Fallback(day, turn, fallback.name))
        return fallback
