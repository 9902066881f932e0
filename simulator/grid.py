"""Expand a batch's grid — LLMs × factor levels × day counts × agent combinations × speaker
methods × repetitions — into conversation specs, lazily, in a fixed order (SPEC §7, §10)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from simulator.conversation import ConversationSpec, validate_counts
from simulator.errors import UserError
from simulator.experiment import SPEAKER_METHODS, Experiment, ModelSpec

BUILTIN_SCRIPTED = ModelSpec("scripted", "scripted")
INT64_MAX = 2**63 - 1  # the largest whole number MongoDB stores
MAX_AGENTS_PER_ROLE = 10_000


@dataclass
class Grid:
    """What a batch runs. `agents` holds exact counts, or maxima with every_combination."""

    llms: list[ModelSpec]
    messages: int
    days: int
    agents: dict[str, int]
    speakers: list[str] = field(default_factory=lambda: ["round_robin"])
    every_day: bool = False  # try every day count 1..days
    every_combination: bool = False  # try every agent combination 1..max per role
    repetitions: int = 1
    seed: int = 0
    # factor name -> the levels this batch runs, in the experiment's order
    factors: dict[str, list[str]] = field(default_factory=dict)

    def level_combinations(self) -> Iterator[dict[str, str]]:
        """Every combination of the chosen factor levels (one empty one without factors)."""
        names = list(self.factors)
        for combo in itertools.product(*(self.factors[n] for n in names)):
            yield dict(zip(names, combo))

    def level_count(self) -> int:
        """How many factor-level combinations the grid has (counted, not listed)."""
        return math.prod(len(levels) for levels in self.factors.values())

    def day_counts(self) -> list[int]:
        return list(range(1, self.days + 1)) if self.every_day else [self.days]

    def agent_combinations(self) -> list[dict[str, int]]:
        if not self.every_combination:
            return [dict(self.agents)]
        roles = list(self.agents)
        ranges = [range(1, self.agents[r] + 1) for r in roles]
        return [dict(zip(roles, combo)) for combo in itertools.product(*ranges)]

    def combination_count(self) -> int:
        """How many agent combinations the grid has (counted, not listed)."""
        return math.prod(self.agents.values()) if self.every_combination else 1

    def size(self) -> int:
        """Conversations in the grid, counted arithmetically (a billion repetitions is fine)."""
        return (
            len(self.llms)
            * self.level_count()
            * (self.days if self.every_day else 1)
            * self.combination_count()
            * len(self.speakers)
            * self.repetitions
        )

    def expand(self) -> Iterator[tuple[int, ConversationSpec]]:
        """(index, spec) in grid order; the index identifies a conversation within its batch."""
        product = itertools.product(
            self.llms,
            self.level_combinations(),
            self.day_counts(),
            self.agent_combinations(),
            self.speakers,
            range(self.repetitions),
        )
        for index, (llm, levels, days, agents, speaker, rep) in enumerate(product):
            # Repetition r shares its seed across conditions (factor levels included), so
            # conditions compare paired (same agent names, same random draws) and a rerun
            # reproduces them.
            spec = ConversationSpec(
                llm, self.messages, days, agents, speaker, self.seed + rep, rep, dict(levels)
            )
            yield index, spec

    def llm_calls(self) -> int:
        """LLM calls the batch will make at least (re-asks after empty or invalid replies
        come on top): one per message, one summary per day, one selector call per message
        for `auto` with three or more agents. Counted arithmetically, without expanding."""
        day_counts = range(1, self.days + 1) if self.every_day else [self.days]
        per_setting = (
            self.combination_count()
            * len(self.speakers)
            * sum(self.messages + d for d in day_counts)
        )
        if "auto" in self.speakers:
            per_setting += self.messages * len(day_counts) * self._crowded_combinations()
        return len(self.llms) * self.level_count() * self.repetitions * per_setting

    def _crowded_combinations(self) -> int:
        """Agent combinations with three or more agents (where `auto` asks a selector)."""
        if not self.every_combination:
            return 1 if sum(self.agents.values()) > 2 else 0
        maxima = [n for n in self.agents.values()]
        # Every role has at least one agent, so only these few combinations have two or fewer.
        small = {0: 1, 1: min(maxima[0], 2) if maxima else 0, 2: 1}.get(len(maxima), 0)
        return self.combination_count() - small


def resolve_llms(exp: Experiment, names: list[str] | None) -> list[ModelSpec]:
    """The experiment's LLMs named by `names` (all when None); `scripted` always works."""
    if not names:
        return list(exp.llms)
    out = []
    for name in names:
        spec = exp.find_llm(name)
        if spec is None and name == "scripted":
            spec = BUILTIN_SCRIPTED
        if spec is None:
            available = ", ".join(s.model for s in exp.llms) or "none"
            raise UserError(
                f"LLM '{name}' is not in experiment '{exp.name}' (it has: {available}). "
                "Pick one of those with --llm, use --llm scripted for a dry run, or add it "
                "to the experiment's `llms:` and import it again."
            )
        out.append(spec)
    return out


def parse_agents(text: str, exp: Experiment) -> dict[str, int]:
    """`guard=1,prisoner=2` → counts in the experiment's role order; unnamed roles get 1."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            role = exp.role(name.strip()).name
        except KeyError:
            roles = ", ".join(r.name for r in exp.roles)
            raise UserError(
                f"--agents names role '{name.strip()}', which experiment '{exp.name}' does not "
                f"have. Its roles are: {roles}. Example: --agents "
                + ",".join(f"{r.name}=1" for r in exp.roles)
            ) from None
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise UserError(
                f"--agents {part!r}: give each role a whole number of agents of at least 1, "
                f"e.g. {role}=2."
            )
        counts[role] = int(value)
    return {r.name: counts.get(r.name, 1) for r in exp.roles}


def parse_factors(items: list[str] | None, exp: Experiment) -> dict[str, list[str]]:
    """`--factor NAME=LEVEL[,LEVEL...]` options → every factor of the experiment with the levels
    to run (all of them for a factor no option names), in the experiment's order."""
    chosen: dict[str, list[str]] = {}
    available = exp.factor_levels()
    listing = "; ".join(f"{n}={','.join(levels)}" for n, levels in available.items())
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not available:
            raise UserError(
                f"--factor {item}: experiment '{exp.name}' has no factors; leave --factor out, "
                "or add `factors:` to its YAML."
            )
        if not sep or not name or not value.strip():
            raise UserError(
                f"--factor {item!r}: write NAME=LEVEL or NAME=LEVEL,LEVEL; this experiment's "
                f"factors: {listing}."
            )
        if name not in available:
            raise UserError(
                f"--factor {item}: experiment '{exp.name}' has no factor '{name}'. Its factors "
                f"(with their levels): {listing}."
            )
        if name in chosen:
            raise UserError(
                f"--factor {name} is given twice: give it once, with its levels separated by "
                f"commas, e.g. --factor {name}={','.join(available[name][:2])}."
            )
        levels = [lv.strip() for lv in value.split(",") if lv.strip()]
        for level in levels:
            if level not in available[name]:
                raise UserError(
                    f"--factor {item}: factor '{name}' has no level '{level}'; its levels: "
                    f"{', '.join(available[name])}."
                )
        chosen[name] = [lv for lv in available[name] if lv in levels]  # the experiment's order
    return {name: chosen.get(name, levels) for name, levels in available.items()}


def make_grid(
    exp: Experiment,
    *,
    llms: list[str] | None,
    messages: int,
    days: int,
    agents: str | dict[str, int] | None,
    speakers: list[str],
    every_day: bool = False,
    every_combination: bool = False,
    repetitions: int = 1,
    seed: int = 0,
    factors: list[str] | dict[str, list[str]] | None = None,
) -> Grid:
    """Check every grid value and build the Grid (the one place flags and menus meet)."""
    _check_range("--messages", messages, 2, INT64_MAX)
    _check_range("--days", days, 1, INT64_MAX)
    validate_counts(messages, days)
    _check_range("--repetitions", repetitions, 1, INT64_MAX)
    _check_range("--seed", seed, 0, INT64_MAX)
    if seed + repetitions - 1 > INT64_MAX:
        raise UserError(
            f"--seed {seed} with --repetitions {repetitions}: repetition r uses seed + r, "
            f"which must stay at most {INT64_MAX}. Use a smaller --seed."
        )
    for s in speakers:
        if s not in SPEAKER_METHODS:
            raise UserError(
                f"Speaker selection method '{s}' is unknown: use one of "
                + ", ".join(SPEAKER_METHODS)
                + "."
            )
    if not speakers:
        raise UserError("Choose at least one speaker selection method with --speaker.")
    if isinstance(agents, str) or agents is None:
        counts = parse_agents(agents or "", exp)
    else:
        counts = parse_agents(",".join(f"{k}={v}" for k, v in agents.items()), exp)
    for role, n in counts.items():
        if n > MAX_AGENTS_PER_ROLE:
            raise UserError(
                f"--agents {role}={n}: at most {MAX_AGENTS_PER_ROLE:,} agents per role; "
                "give a smaller count."
            )
    grid = Grid(
        llms=resolve_llms(exp, llms),
        messages=messages,
        days=days,
        agents=counts,
        speakers=list(dict.fromkeys(speakers)),
        every_day=every_day,
        every_combination=every_combination,
        repetitions=repetitions,
        seed=seed,
        factors=_factor_choice(factors, exp),
    )
    if grid.size() > INT64_MAX:
        raise UserError(
            f"This grid has {grid.size():,} conversations, more than can be counted in the "
            "database: use fewer --repetitions, LLMs, speakers, combinations or --factor levels."
        )
    return grid


def _factor_choice(
    factors: list[str] | dict[str, list[str]] | None, exp: Experiment
) -> dict[str, list[str]]:
    """The levels to run: `--factor` strings, or a mapping (the menus) checked the same way."""
    if isinstance(factors, dict):
        factors = [f"{name}={','.join(levels)}" for name, levels in factors.items()]
    return parse_factors(factors, exp)


def _check_range(flag: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{flag} must be a whole number (got {value!r}).")
    if value < low:
        raise UserError(f"{flag} must be at least {low} (got {value:,}).")
    if value > high:
        raise UserError(f"{flag} must be at most {high:,} (got {value:,}).")
