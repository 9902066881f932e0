"""The prompt sections in the wizard: their titles, which are shared, and their text.

A section's text is asked until its placeholders are valid for the experiment's roles; an
invalid one is explained on the spot and the text is kept for correcting.
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.experiment import (
    FACTOR_NAME_RE,
    LEVEL_NAME_RE,
    RESERVED_FACTOR_NAMES,
    SECTION_TITLE_RE,
    STARTING_MESSAGE,
    Experiment,
    Factor,
    parse_address,
)
from simulator.interactive.questions import Choice, Questions, comma_list, required
from simulator.placeholders import explain, find_invalid, role_tag_value, valid_tags


@dataclass
class Slot:
    """One prompt section to write: where it lives and how to call it."""

    label: str
    sections: dict[str, str]
    title: str


def ask_titles(q: Questions, message: str, default: list[str]) -> list[str]:
    answer = q.text(
        message,
        ", ".join(default),
        validate=lambda text: _titles_problem(text) or True,
        instruction="(comma-separated, in order; starting_prompt comes first, without a header)",
    )
    return parse_titles(answer)


def ask_agent_titles(
    q: Questions, private: list[str], shared: list[str]
) -> tuple[list[str], list[str]]:
    """Section titles of the agents' prompts, then which of them every role shares."""
    titles = ask_titles(q, "Section titles of the agents' prompts", [*private, *shared])
    chosen = q.checkbox(
        "Which of them are shared by every role? (written once)",
        [Choice(t, t, checked=t in shared) for t in titles],
        validate=lambda sel: (
            len(sel) < len(titles)
            or "Leave at least one section private: every role needs one of its own."
        ),
    )
    return [t for t in titles if t not in chosen], [t for t in titles if t in chosen]


def section_slots(exp: Experiment, *, only_summarizer: bool = False) -> list[Slot]:
    """Every section: shared ones once, then each role's own, then the summarizer's."""
    slots = (
        []
        if only_summarizer
        else [
            Slot(f"shared by every role · {t}", exp.shared_sections, t) for t in exp.shared_sections
        ]
    )
    if not only_summarizer:
        slots += [Slot(f"{r.name} · {t}", r.sections, t) for r in exp.roles for t in r.sections]
    slots += [
        Slot(f"summarizer · {t}", exp.summarizer.sections, t) for t in exp.summarizer.sections
    ]
    return slots


def fill_in(q: Questions, exp: Experiment) -> None:
    """Ask every section still empty or holding an invalid tag (and a bad starting message)."""
    names = [r.name for r in exp.roles]
    todo = [s for s in section_slots(exp) if _needs_asking(s.sections[s.title], names)]
    bad_start = bool(find_invalid(exp.starting_message, names))
    if not todo and not bad_start:
        return
    show_placeholder_help(q, exp)
    if bad_start:
        exp.starting_message = ask_content(q, exp, "starting message", exp.starting_message)
    for slot in todo:
        ask_slot(q, exp, slot)


def ask_slot(q: Questions, exp: Experiment, slot: Slot) -> None:
    """Ask one section's text (its current text as the default) and store it in place."""
    slot.sections[slot.title] = ask_content(q, exp, slot.label, slot.sections[slot.title])


def ask_content(q: Questions, exp: Experiment, label: str, default: str) -> str:
    """The text of one section; an invalid placeholder is explained and asked again."""
    names = [r.name for r in exp.roles]
    text = default
    while True:
        text = q.text(f"{label}:", text, validate=required("Write the section's text."))
        bad = find_invalid(text, names)
        if not bad:
            return text
        for tag in bad:
            q.error(explain(tag, names))
        q.error(f"Valid placeholders: {', '.join(valid_tags(names))}")
        q.say("Correct it (your text is kept):")


def show_placeholder_help(q: Questions, exp: Experiment) -> None:
    names = [r.name for r in exp.roles]
    role = names[0] if names else "guard"
    tag = role.upper()
    rows = [
        (f"<{tag}_{kind}>", role_tag_value(role, kind, 1), role_tag_value(role, kind, 3))
        for kind in ("NUM", "NOUN", "POSS", "PRON", "POSSPRON", "VERB_BE", "VERB_MAKE")
    ]
    lines = [
        "Placeholders are filled per conversation from its agent counts (one agent / several):",
        *(f"  {t:<20} {one} / {many}" for t, one, many in rows),
        f"  {f'<{tag}_VERB_...>':<20} any verb in its base form",
        f"  {'<AGENTS_NUM>':<20} agents in the conversation",
        f"  {'<ROLES_NUM>':<20} roles in the conversation",
        f"Valid in this experiment: {', '.join(valid_tags(names))}",
    ]
    q.say("\n".join(lines), style="cyan")


def agent_layout(exp: Experiment) -> tuple[list[str], list[str]]:
    """(private section titles in order, shared section titles)."""
    private: list[str] = []
    for role in exp.roles:
        private += [t for t in role.sections if t not in private]
    return private, list(exp.shared_sections)


def apply_layout(exp: Experiment, private: list[str], shared: list[str]) -> None:
    """Re-shape the sections; a section moved between private and shared keeps its text."""
    old_shared = dict(exp.shared_sections)
    old_private = {
        t: next((r.sections[t] for r in exp.roles if r.sections.get(t)), "")
        for role in exp.roles
        for t in role.sections
    }
    for role in exp.roles:
        role.sections = {t: role.sections.get(t) or old_shared.get(t, "") for t in private}
    exp.shared_sections = {t: old_shared.get(t) or old_private.get(t, "") for t in shared}


def parse_titles(text: str) -> list[str]:
    """`goal, communication rules` → ["goal", "communication_rules"]."""
    return ["_".join(p.split()) for p in comma_list(text)]


def _titles_problem(text: str) -> str | None:
    titles = parse_titles(text)
    if not titles:
        return "Give at least one section title, e.g. starting_prompt, goal."
    for title in titles:
        if not SECTION_TITLE_RE.match(title):
            return (
                f"'{title}': a title is letters, digits and underscores, starting with a "
                "letter (e.g. communication_rules)."
            )
    if len(set(titles)) < len(titles):
        return "Each title may appear once."
    return None


def _needs_asking(text: str, names: list[str]) -> bool:
    return not text.strip() or bool(find_invalid(text, names))


# --- factors -----------------------------------------------------------------------------


def ask_factor(q: Questions, exp: Experiment) -> Factor:
    """One factor: its name, the section it varies, its levels and each level's text (an
    empty text leaves the section out in that level, e.g. a "blank" personality)."""
    name = q.text(
        "Factor name",
        validate=lambda text: _factor_name_problem(text.strip(), exp) or True,
        instruction="(lower-case word, e.g. guard_personality; it becomes the column factor_NAME)",
    ).strip()
    address = q.text(
        "Section it sets",
        validate=lambda text: _address_problem(text.strip(), exp) or True,
        instruction="(shared.TITLE, summarizer.TITLE or ROLE.TITLE, e.g. guard.personality; "
        "a section the experiment does not already have)",
    ).strip()
    answer = q.text(
        "Levels",
        validate=lambda text: _levels_problem(text) or True,
        instruction="(comma-separated, e.g. good, bad, blank)",
    )
    levels: dict[str, dict[str, str | None]] = {}
    for level in comma_list(answer):
        text = _ask_level_text(q, exp, f"{name} = {level} · {address}")
        levels[level] = {address: text or None}
    return Factor(name, levels)


def _ask_level_text(q: Questions, exp: Experiment, label: str) -> str:
    names = [r.name for r in exp.roles]
    text = ""
    while True:
        text = q.text(f"{label}:", text, instruction="(empty: leave the section out)").strip()
        bad = find_invalid(text, names)
        if not bad:
            return text
        for tag in bad:
            q.error(explain(tag, names))
        q.error(f"Valid placeholders: {', '.join(valid_tags(names))}")
        q.say("Correct it (your text is kept):")


def _factor_name_problem(name: str, exp: Experiment) -> str | None:
    if not FACTOR_NAME_RE.match(name):
        return "A factor name is lower-case letters, digits and underscores, e.g. risks."
    if name in RESERVED_FACTOR_NAMES or name.startswith("agents_"):
        return f"'{name}' is a built-in condition; choose another name."
    if any(f.name == name for f in exp.factors):
        return f"The experiment already has a factor '{name}'."
    return None


def _address_problem(address: str, exp: Experiment) -> str | None:
    names = [r.name for r in exp.roles]
    if address == STARTING_MESSAGE:
        return "The wizard varies prompt sections; vary the starting message in the YAML."
    try:
        group, title = parse_address(address, names)
    except ValueError as e:
        return str(e)
    base = (
        exp.shared_sections
        if group == "shared"
        else exp.summarizer.sections
        if group == "summarizer"
        else exp.role(group).sections
    )
    if title in base:
        return f"'{address}' is already a section of the experiment; name a new one."
    if group not in ("shared", "summarizer") and title in exp.shared_sections:
        return f"'{title}' is a shared section; the agent would get it twice."
    if any(address in f.addresses() for f in exp.factors):
        return f"Another factor already sets '{address}'."
    return None


def _levels_problem(text: str) -> str | None:
    levels = comma_list(text)
    if not levels:
        return "Give at least one level, e.g. good, bad, blank."
    for level in levels:
        if not LEVEL_NAME_RE.match(level):
            return f"'{level}': a level name is letters, digits, '_', '-' or '.'."
    if len(set(levels)) < len(levels):
        return "Each level may appear once."
    return None
