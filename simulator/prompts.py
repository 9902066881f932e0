"""Compose agent and summarizer prompts from sections (SPEC §1) and fill the templates.

The summary and speaker-selection templates ship inside the package
(`simulator/data/prompts/`); SIMULATOR_PROMPTS_DIR points at a folder of one's own. They are
read once per batch (`Templates.load`), not per call.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from simulator.errors import UserError
from simulator.experiment import Experiment, apply_levels
from simulator.placeholders import fill

STARTING_PROMPT = "starting_prompt"
SUMMARY_TEMPLATE = "summary.txt"
SELECTOR_TEMPLATE = "speaker_selection.txt"
_FIELD_RE = re.compile(r"\{(\w+)\}")


def section_title(key: str) -> str:
    """`communication_rules` -> `Communication rules`."""
    title = key.replace("_", " ")
    return title[:1].upper() + title[1:]


def compose(sections: list[tuple[str, str]]) -> str:
    """`starting_prompt` first without a header, then `## Title` sections, blank-line separated."""
    start = [content.strip() for key, content in sections if key == STARTING_PROMPT]
    rest = [
        f"## {section_title(key)}\n\n{content.strip()}"
        for key, content in sections
        if key != STARTING_PROMPT and content.strip()
    ]
    return "\n\n".join([s for s in start if s] + rest)


def agent_prompt(
    exp: Experiment, role_name: str, counts: dict[str, int], levels: dict[str, str] | None = None
) -> str:
    """System prompt of an agent: its role's sections, then the shared ones, tags filled.
    `levels` (factor name -> level) set or leave out the sections their factors own."""
    exp = apply_levels(exp, levels or {})
    role = exp.role(role_name)
    sections = [*role.sections.items(), *exp.shared_sections.items()]
    return fill(compose(sections), counts)


def summarizer_prompt(
    exp: Experiment, counts: dict[str, int], levels: dict[str, str] | None = None
) -> str:
    """System prompt of the summarizer, composed from its own sections, tags filled."""
    exp = apply_levels(exp, levels or {})
    return fill(compose(list(exp.summarizer.sections.items())), counts)


def starting_message(
    exp: Experiment, counts: dict[str, int], levels: dict[str, str] | None = None
) -> str:
    """The experiment's starting message (or its factor level's) with its tags filled."""
    return fill(apply_levels(exp, levels or {}).starting_message, counts)


def format_transcript(lines: list[tuple[str, str]]) -> str:
    """`Speaker: content` lines separated by blank lines."""
    return "\n\n".join(f"{speaker}: {content.strip()}" for speaker, content in lines)


@dataclass(frozen=True)
class Templates:
    """The summary and speaker-selection templates, read once and shared by a batch."""

    summary: str
    selector: str
    source: str  # where they were read from, for messages

    @classmethod
    def load(cls, directory: Path | None = None) -> Templates:
        """Read them from `directory` (SIMULATOR_PROMPTS_DIR), else the shipped ones."""
        if directory is None:
            return shipped_templates()
        return cls(
            summary=_read(Path(directory) / SUMMARY_TEMPLATE),
            selector=_read(Path(directory) / SELECTOR_TEMPLATE),
            source=str(directory),
        )


@functools.cache
def shipped_templates() -> Templates:
    """The templates inside the package (package data, so a wheel install has them)."""
    folder = resources.files("simulator") / "data" / "prompts"
    try:
        return Templates(
            summary=(folder / SUMMARY_TEMPLATE).read_text(encoding="utf-8"),
            selector=(folder / SELECTOR_TEMPLATE).read_text(encoding="utf-8"),
            source=str(folder),
        )
    except OSError as exc:
        raise UserError(
            f"{folder}: the prompt templates shipped with the simulator are missing "
            f"({exc.strerror}): reinstall it, or point SIMULATOR_PROMPTS_DIR at a folder with "
            f"{SUMMARY_TEMPLATE} and {SELECTOR_TEMPLATE}"
        ) from None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(
            f"{path}: cannot read the prompt template ({exc.strerror}); "
            "restore it or point SIMULATOR_PROMPTS_DIR at a folder that has it"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: the prompt template is not UTF-8 text; re-save it") from None


def summary_request(day: int, transcript: str, templates: Templates | None = None) -> str:
    """The user message asking the summarizer to summarize one day."""
    template = (templates or shipped_templates()).summary
    return render(template, day=str(day), transcript=transcript).strip()


def selector_request(
    agents: list[tuple[str, str, str]],
    transcript: str,
    last_speaker: str | None,
    templates: Templates | None = None,
) -> str:
    """The message asking the selector model for the next speaker.

    `agents` holds (name, role, role description). Without a last speaker, the template
    lines that mention `{last_speaker}` are left out.
    """
    template = (templates or shipped_templates()).selector
    if last_speaker is None:
        template = "".join(
            line for line in template.splitlines(keepends=True) if "{last_speaker}" not in line
        )
    listing = "\n".join(
        f"{name} ({role}): {description.strip()}" if description.strip() else f"{name} ({role})"
        for name, role, description in agents
    )
    filled = render(
        template, agents=listing, transcript=transcript, last_speaker=last_speaker or ""
    )
    return filled.strip()


def render(template: str, **values: str) -> str:
    """Fill `{field}`s in one pass, so braces inside the values are left alone.

    Unknown fields stay as written (unlike str.format, which would raise).
    """
    return _FIELD_RE.sub(lambda m: values.get(m.group(1), m.group(0)), template)
