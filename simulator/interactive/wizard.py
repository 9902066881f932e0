"""The create / duplicate-and-update wizard of the interactive menus.

It fills an Experiment dataclass step by step — the same value the YAML builds — then
checks it with validate_experiment and saves it with Store.insert_experiment or
duplicate_experiment. Nothing is written before the final "Save?"; Ctrl-C or Esc raises
Cancelled from any question, which the menus turn into "nothing was saved".
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from rich.panel import Panel
from rich.text import Text

from simulator import display
from simulator.errors import ProviderError, ValidationError
from simulator.experiment import (
    PROVIDERS,
    ROLE_NAME_RE,
    Experiment,
    ModelSpec,
    Role,
    Summarizer,
    save_experiment,
    validate_experiment,
)
from simulator.interactive.questions import (
    Cancelled,
    Choice,
    Questions,
    comma_list,
    required,
)
from simulator.interactive.sections import (
    agent_layout,
    apply_layout,
    ask_agent_titles,
    ask_factor,
    ask_slot,
    ask_titles,
    fill_in,
    section_slots,
    show_placeholder_help,
)
from simulator.llm.registry import preflight
from simulator.placeholders import RESERVED_ROLE_NAMES
from simulator.prompts import agent_prompt, summarizer_prompt
from simulator.store import Store, duplicate_experiment

EXAMPLE_STARTING_MESSAGE = "Start the experiment"
EXAMPLE_AGENT_SECTIONS = [
    "starting_prompt",
    "goal",
    "personality",
    "communication_rules",
    "environment",
]
EXAMPLE_SUMMARIZER_SECTIONS = ["starting_prompt", "format"]
CHANGES = [
    ("starting", "Starting message"),
    ("llms", "LLMs"),
    ("roles", "Roles"),
    ("titles", "Section titles"),
    ("contents", "Section contents"),
    ("summarizer", "Summarizer"),
    ("factors", "Factors (add one)"),
]


def create_experiment(store: Store, q: Questions, experiments_dir: Path) -> Experiment | None:
    """Ask for a whole experiment, show its prompts, save it when confirmed."""
    q.say("New experiment (Ctrl-C or Esc at any question: back, nothing saved)", style="bold")
    name = q.text("Name of the experiment", validate=required("Give the experiment a name."))
    warn_shared_name(store, q, name)
    starting = q.text(
        "Starting message (the researcher's first message)",
        EXAMPLE_STARTING_MESSAGE,
        validate=required("Write the starting message."),
    )
    llms = ask_llms(q, [])
    private, shared = ask_agent_titles(q, EXAMPLE_AGENT_SECTIONS, [])
    roles = ask_roles(q, [])
    summarizer_titles = ask_titles(
        q, "Section titles of the summarizer's prompt", EXAMPLE_SUMMARIZER_SECTIONS
    )
    exp = Experiment(
        name=name,
        starting_message=starting,
        llms=llms,
        roles=[Role(r.name, r.description, dict.fromkeys(private, "")) for r in roles],
        shared_sections=dict.fromkeys(shared, ""),
        summarizer=Summarizer(sections=dict.fromkeys(summarizer_titles, "")),
    )
    fill_in(q, exp)
    ask_factors(q, exp)
    exp.favourite = q.confirm("Mark it as a favourite?", default=False)
    exp.note = q.text("Note (optional)")
    return review_and_save(store, q, exp, experiments_dir)


def duplicate_and_update(
    store: Store, q: Questions, original: Experiment, experiments_dir: Path
) -> Experiment | None:
    """Copy an experiment (anyone's) as the current user's, changing the chosen parts."""
    q.say(
        f"Duplicating '{original.name}' by {original.creator}: the copy is yours and links to "
        "it; the original does not change.",
        style="bold",
    )
    parts = q.checkbox(
        "What do you want to change? (nothing ticked: an exact copy)",
        [Choice(label, key) for key, label in CHANGES],
    )
    exp = copy.deepcopy(original)
    exp.favourite = False
    exp.name = q.text("Name of the copy", original.name, validate=required("Name the copy."))
    warn_shared_name(store, q, exp.name)
    if "starting" in parts:
        exp.starting_message = q.text(
            "Starting message", exp.starting_message, validate=required("Write it.")
        )
    if "llms" in parts:
        exp.llms = ask_llms(q, exp.llms)
    if "roles" in parts:
        private, _ = agent_layout(exp)
        old = {r.name.lower(): r for r in exp.roles}
        roles = []
        for asked in ask_roles(q, exp.roles):  # a kept role keeps its sections
            before = old.get(asked.name.lower())
            sections = dict(before.sections) if before else dict.fromkeys(private, "")
            roles.append(Role(asked.name, asked.description, sections))
        exp.roles = roles
    if "titles" in parts:
        private, shared = ask_agent_titles(q, *agent_layout(exp))
        apply_layout(exp, private, shared)
    if "contents" in parts:
        slots = section_slots(exp)
        chosen = q.checkbox(
            "Which sections do you want to rewrite?",
            [Choice(s.label, i) for i, s in enumerate(slots)],
            at_least_one="Tick at least one section (Space), or press Esc to go back.",
        )
        show_placeholder_help(q, exp)
        for i in chosen:
            ask_slot(q, exp, slots[i])
    if "summarizer" in parts:
        old_sections = exp.summarizer.sections
        titles = ask_titles(q, "Section titles of the summarizer's prompt", list(old_sections))
        exp.summarizer.sections = {t: old_sections.get(t, "") for t in titles}
        for slot in section_slots(exp, only_summarizer=True):
            ask_slot(q, exp, slot)
    fill_in(q, exp)
    if "factors" in parts:
        exp.factors.append(ask_factor(q, exp))
        ask_factors(q, exp)
    return review_and_save(store, q, exp, experiments_dir, parent=original)


# --- steps -------------------------------------------------------------------------------


def warn_shared_name(store: Store, q: Questions, name: str) -> None:
    """Say which experiments already have this name (Esc goes back to choose another)."""
    warning = store.shared_name_notice(name.strip())
    if warning:
        q.say(f"Note: {warning} (Esc: back, to start again with another name.)", style="yellow")


def ask_factors(q: Questions, exp: Experiment) -> None:
    """Add factors while the user wants more (a copy keeps the original's factors)."""
    question = "Add a factor (a section that varies between conversations, e.g. a personality)?"
    while q.confirm(question if not exp.factors else "Add another factor?", default=False):
        exp.factors.append(ask_factor(q, exp))


def ask_llms(q: Questions, current: list[ModelSpec]) -> list[ModelSpec]:
    """Keep some of the current LLMs, then add new ones (at least one in the end)."""
    llms: list[ModelSpec] = []
    if current:
        keep = q.checkbox(
            "LLMs to keep", [Choice(llm_title(s), i, checked=True) for i, s in enumerate(current)]
        )
        llms = [current[i] for i in keep]
    while not llms or q.confirm("Add another LLM?" if llms else "Add an LLM?", default=False):
        spec = ask_llm(q, llms)
        if spec is not None:
            llms.append(spec)
    return llms


def ask_llm(q: Questions, others: list[ModelSpec]) -> ModelSpec | None:
    """One LLM: its name (provider inferred), optional sampling, a pull offer for Ollama."""
    text = q.text(
        "Model name",
        validate=required("Type a model name, e.g. llama3."),
        instruction="(e.g. llama3, gpt-4o-mini, scripted; provider/model to choose the "
        f"provider: {', '.join(PROVIDERS)})",
    )
    spec = parse_model(text)
    if any(s.label == spec.label for s in others):
        q.error(f"{spec.label} is already in the list.")
        return None
    q.say(f"  → {spec.label}")
    if q.confirm("Set temperature, top_k or top_p?", default=False):
        spec.temperature = q.optional_number("temperature (0 to 2)", 0, 2)
        top_k = q.optional_number("top_k (a whole number, at least 1)", 1, None, integer=True)
        spec.top_k = int(top_k) if top_k is not None else None
        spec.top_p = q.optional_number("top_p (0 to 1)", 0, 1)
    if spec.provider == "ollama" and not offer_pull(q, spec):
        return None
    return spec


def parse_model(text: str) -> ModelSpec:
    """`llama3`, `gpt-4o-mini` (provider inferred), `openai/llama3`, `scripted`."""
    head, sep, rest = text.strip().partition("/")
    if sep and head in PROVIDERS and rest:
        return ModelSpec(rest, head)
    if text.strip() == "scripted":
        return ModelSpec("scripted", "scripted")
    return ModelSpec(text.strip())


def llm_title(spec: Any) -> str:
    """An LLM's label with its sampling settings, as the lists of LLMs show it."""
    sampling = ", ".join(f"{k}={v}" for k, v in spec.sampling().items())
    return spec.label + (f" ({sampling})" if sampling else "")


def offer_pull(q: Questions, spec: ModelSpec) -> bool:
    """Pull a model Ollama does not have, with a progress bar. False: drop the LLM."""
    from simulator.llm.ollama import OllamaModel

    model = OllamaModel(spec)
    try:
        if model.has_model():
            return True
    except ProviderError as e:
        q.say(
            f"{e}. The model is checked, and pulled if missing, before each batch.", style="yellow"
        )
        return True
    if not q.confirm(
        f"{spec.model} is not on the Ollama server at {model.host}. Pull it now?", default=True
    ):
        q.say("It will be pulled before the first batch that uses it.")
        return True
    try:
        with display.PullView(q.console) as pulls:
            preflight([spec], pull_progress=pulls)  # what a batch runs first: pulls when missing
    except ProviderError as e:
        q.error(str(e))
        return q.confirm(f"Keep {spec.label} in the experiment anyway?", default=False)
    q.say(f"Pulled {spec.model}.")
    return True


def ask_roles(q: Questions, current: list[Role]) -> list[Role]:
    """Role names (in speaking order) and their descriptions; sections are left to the caller."""
    answer = q.text(
        "Role names",
        ", ".join(r.name for r in current),
        validate=lambda text: _roles_problem(text) or True,
        instruction="(comma-separated single words, in speaking order, e.g. guard, prisoner)",
    )
    old = {r.name.lower(): r for r in current}
    roles = []
    for name in comma_list(answer):
        before = old.get(name.lower())
        description = q.text(
            f"Description of the role {name} (told to the auto speaker selector; optional)",
            before.description if before else "",
        )
        roles.append(Role(name, description))
    return roles


def _roles_problem(text: str) -> str | None:
    names = comma_list(text)
    if not names:
        return "Name at least one role, e.g. guard, prisoner."
    seen: set[str] = set()
    for name in names:
        if not ROLE_NAME_RE.match(name):
            return (
                f"'{name}': a role name is one word of letters and digits, starting with a "
                "letter (it makes tags like <GUARD_NUM>)."
            )
        if name.upper() in RESERVED_ROLE_NAMES:
            return f"'{name}' is reserved for <{name.upper()}_NUM>; choose another name."
        if name.lower() in seen:
            return f"'{name}' is named twice."
        seen.add(name.lower())
    return None


# --- saving ------------------------------------------------------------------------------


def review_and_save(
    store: Store,
    q: Questions,
    exp: Experiment,
    experiments_dir: Path,
    parent: Experiment | None = None,
) -> Experiment | None:
    """Validate, show the composed prompts, save when confirmed, optionally write YAML."""
    try:
        validate_experiment(exp, "the copy" if parent else "the new experiment")
    except ValidationError as e:
        q.error(str(e))
        q.say("Nothing saved.")
        return None
    counts = {r.name: 1 for r in exp.roles}
    first = {f.name: next(iter(f.levels)) for f in exp.factors}  # one scenario as an example
    scenario = f", {', '.join(f'{k}={v}' for k, v in first.items())}" if first else ""
    for role in exp.roles:
        q.console.print(
            Panel(
                Text(agent_prompt(exp, role.name, counts, first)),
                title=f"System prompt of a {role.name} (one agent per role{scenario})",
            )
        )
    q.console.print(
        Panel(
            Text(summarizer_prompt(exp, counts, first) or "(no sections)"),
            title="Summarizer prompt",
        )
    )
    if not q.confirm("Save this experiment?", default=True):
        q.say("Not saved.")
        return None
    if parent is not None:
        saved = duplicate_experiment(store, parent.id or "", exp)
        q.say(f"Saved '{saved.name}' as {saved.id} (yours, duplicated from {parent.id}).")
    else:
        saved = store.insert_experiment(exp)
        q.say(f"Saved '{saved.name}' as {saved.id}.")
    try:
        if q.confirm(f"Also write it as YAML to {experiments_dir}/?", default=False):
            write_yaml(q, saved, experiments_dir)
    except Cancelled:
        q.say("The experiment is saved; no YAML file written.")
    return saved


def write_yaml(
    q: Questions,
    exp: Experiment,
    experiments_dir: Path,
    *,
    message: str = "File",
    declined: str = "No YAML file written.",
) -> None:
    """Ask for the file (default: experiments_dir/NAME.yaml) and write the definition there."""
    path = Path(q.text(message, str(experiments_dir / f"{_file_stem(exp.name)}.yaml")))
    if path.exists() and not q.confirm(f"{path} exists. Overwrite it?", default=False):
        q.say(declined)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    save_experiment(exp, path)
    q.say(f"Wrote {path}.")


def _file_stem(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in name.strip()).strip("_")
    return stem or "experiment"
