"""Scorer definitions: the `scorers:` mapping of an experiment or of a scorers file.

    scorers:
      goal_achieved:
        kind: judge            # judge | moderation | python
        level: conversation    # conversation | message
        answer: choice         # choice | scale | turn | text
        labels: [Yes, No, NotTried]
        rubric: Did the prisoners obtain the extra hour? ...

A scorer's version is a hash of its definition: editing a rubric makes a new version, and
the scores of the old one are kept beside the new ones.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import ValidationError
from simulator.experiment import LLM_FIELDS, Experiment, ModelSpec, load_yaml

KINDS = ("judge", "moderation", "python")
LEVELS = ("conversation", "message")
ANSWERS = ("choice", "scale", "turn", "text")
TURN_REPORTS = ("turn", "thirds", "fraction")
THIRDS = ("none", "first", "second", "third")  # how a turn is reported in thirds (ordinal)
DEFAULT_MODERATION_MODEL = "omni-moderation-latest"

_COMMON = ("kind", "level", "roles", "description")
KEYS: dict[str, tuple[str, ...]] = {
    "judge": (*_COMMON, "llm", "rubric", "answer", "labels", "scale", "report"),
    "moderation": (*_COMMON, "model", "base_url", "api_key_env"),
    "python": (*_COMMON, "function"),
}


@dataclass
class Scorer:
    """One scorer as defined in YAML (plain data; nothing is called when it is built)."""

    name: str
    kind: str
    level: str = "conversation"
    roles: list[str] = field(default_factory=list)  # message level: only these roles
    description: str = ""
    # judge
    llm: ModelSpec | None = None  # None: the experiment's first LLM
    rubric: str = ""
    answer: str = "choice"
    labels: list[str] = field(default_factory=list)
    scale: tuple[int, int] | None = None
    report: str = "turn"  # turn answers: turn | thirds | fraction
    # moderation
    model: str = DEFAULT_MODERATION_MODEL
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    # python
    function: str = ""
    definition: dict[str, Any] = field(default_factory=dict)  # as written, for the version

    @property
    def version(self) -> str:
        """12 hex digits of the SHA-256 of the definition (key order does not matter)."""
        text = json.dumps(self.definition, sort_keys=True, default=str, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]

    @property
    def ordinal(self) -> bool:
        """Whether the answers are ordered (weighted kappa, ordinal alpha)."""
        return self.kind == "judge" and (
            self.answer == "scale" or (self.answer == "turn" and self.report == "thirds")
        )

    def allowed(self, turns: int | None = None) -> list[str]:
        """The answers a person may give (a sheet's drop-down); [] when free."""
        if self.kind != "judge":
            return []
        if self.answer == "choice":
            return list(self.labels)
        if self.answer == "scale" and self.scale:
            return [str(v) for v in range(self.scale[0], self.scale[1] + 1)]
        if self.answer == "turn" and turns is not None:
            return ["none", *(str(t) for t in range(1, turns + 1))]
        return []

    def judge_llm(self, exp: Experiment | None) -> ModelSpec:
        if self.llm is not None:
            return self.llm
        if exp is None or not exp.llms:
            raise ValidationError(
                f"scorer {self.name}: no `llm:` and no experiment LLM to default to; add "
                "llm: {model: ..., provider: ...} to the scorer"
            )
        return exp.llms[0]

    def source(self, exp: Experiment | None = None) -> str:
        """Who gave the scores: judge:<model>, moderation:<model>, python:<function>."""
        if self.kind == "judge":
            return f"judge:{self.judge_llm(exp).label}"
        if self.kind == "moderation":
            return f"moderation:{self.model}"
        return f"python:{self.function}"


def _fail(source: str, path: str, problem: str) -> ValidationError:
    return ValidationError(f"{source}: {path}: {problem}")


def parse_scorers(data: Any, source: str) -> list[Scorer]:
    """The `scorers:` mapping (name -> definition) as Scorers; ValidationError if invalid."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise _fail(source, "scorers", "expected a mapping of scorer names to definitions")
    return [parse_scorer(str(name), value, source) for name, value in data.items()]


def parse_scorer(name: str, data: Any, source: str) -> Scorer:
    path = f"scorers.{name}"
    if not name.replace("_", "").isalnum() or not name[:1].isalpha():
        raise _fail(source, path, "a scorer name is letters, digits and underscores, e.g. goal")
    if not isinstance(data, dict):
        raise _fail(source, path, "expected a mapping with at least `kind:`")
    kind = data.get("kind")
    if kind not in KINDS:
        raise _fail(source, f"{path}.kind", f"{kind!r}: use one of {', '.join(KINDS)}")
    for key in data:
        if key not in KEYS[kind]:
            close = difflib.get_close_matches(str(key), KEYS[kind], n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise _fail(
                source,
                f"{path}.{key}",
                f"unknown key; {hint}a {kind} scorer takes {', '.join(KEYS[kind])}",
            )
    level = data.get("level", "message" if kind == "moderation" else "conversation")
    if level not in LEVELS:
        raise _fail(source, f"{path}.level", f"{level!r}: use conversation or message")
    roles = data.get("roles") or []
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise _fail(source, f"{path}.roles", "a list of role names, e.g. [guard, prisoner]")
    if roles and level != "message":
        raise _fail(source, f"{path}.roles", "only message-level scorers choose roles")
    scorer = Scorer(
        name=name,
        kind=kind,
        level=level,
        roles=list(roles),
        description=str(data.get("description") or ""),
        definition=dict(data),
    )
    if kind == "judge":
        _judge(scorer, data, path, source)
    elif kind == "moderation":
        if level != "message":
            raise _fail(source, f"{path}.level", "moderation scores one message at a time")
        scorer.model = str(data.get("model") or DEFAULT_MODERATION_MODEL)
        scorer.base_url = data.get("base_url")
        scorer.api_key_env = str(data.get("api_key_env") or "OPENAI_API_KEY")
    else:
        function = data.get("function")
        if not isinstance(function, str) or function.count(":") != 1 or function.endswith(":"):
            raise _fail(
                source, f"{path}.function", "write module:function, e.g. mylab.toxigen:score"
            )
        scorer.function = function
    return scorer


def _judge(scorer: Scorer, data: dict[str, Any], path: str, source: str) -> None:
    rubric = data.get("rubric")
    if not isinstance(rubric, str) or not rubric.strip():
        raise _fail(source, f"{path}.rubric", "missing; write the question the judge answers")
    scorer.rubric = rubric.strip()
    answer = data.get("answer", "choice")
    if answer not in ANSWERS:
        raise _fail(source, f"{path}.answer", f"{answer!r}: use one of {', '.join(ANSWERS)}")
    scorer.answer = answer
    if "llm" in data and data["llm"] is not None:
        llm = data["llm"]
        if isinstance(llm, str):
            scorer.llm = ModelSpec(model=llm)
        elif isinstance(llm, dict) and isinstance(llm.get("model"), str):
            fields = {k: v for k, v in llm.items() if k in LLM_FIELDS}
            extra = {k: v for k, v in llm.items() if k not in LLM_FIELDS}
            scorer.llm = ModelSpec(
                **(fields | {"provider": llm.get("provider") or ""}), extra=extra
            )
        else:
            raise _fail(source, f"{path}.llm", "a model name or {model: ..., provider: ...}")
    if answer == "choice":
        labels = data.get("labels")
        if not isinstance(labels, list) or len(labels) < 2:
            raise _fail(
                source, f"{path}.labels", "a choice needs at least two labels, e.g. [Yes, No]"
            )
        # YAML 1.1 reads a bare Yes / No as true / false: they are meant as the labels.
        scorer.labels = [_label(label) for label in labels]
        if len({label.lower() for label in scorer.labels}) != len(scorer.labels):
            raise _fail(source, f"{path}.labels", "two labels differ only by case; rename one")
    elif "labels" in data:
        raise _fail(source, f"{path}.labels", "only `answer: choice` takes labels")
    if answer == "scale":
        scale = data.get("scale")
        ok = (
            isinstance(scale, list)
            and len(scale) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in scale)
            and scale[0] < scale[1]
        )
        if not ok:
            raise _fail(source, f"{path}.scale", "the lowest and highest whole number, e.g. [1, 5]")
        assert isinstance(scale, list)
        scorer.scale = (scale[0], scale[1])
    elif "scale" in data:
        raise _fail(source, f"{path}.scale", "only `answer: scale` takes a scale")
    if answer == "turn":
        report = data.get("report", "turn")
        if report not in TURN_REPORTS:
            raise _fail(source, f"{path}.report", f"{report!r}: use {', '.join(TURN_REPORTS)}")
        scorer.report = report
        if scorer.level != "conversation":
            raise _fail(source, f"{path}.level", "a turn answer is about a whole conversation")
    elif "report" in data:
        raise _fail(source, f"{path}.report", "only `answer: turn` takes report")


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return str(value)


def load_scorers_file(path: str | Path) -> list[Scorer]:
    """The `scorers:` of a YAML file: a scorers file or an experiment file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(
            f"{path}: cannot read the scorers file ({exc}); give a YAML file with `scorers:`"
        ) from None
    data = load_yaml(text, str(path))
    if not isinstance(data, dict) or not isinstance(data.get("scorers"), dict):
        raise ValidationError(
            f"{path}: no `scorers:` mapping found; a scorers file starts with `scorers:` and "
            "names each scorer under it"
        )
    return parse_scorers(data["scorers"], str(path))


def choose(scorers: list[Scorer], names: list[str] | None) -> list[Scorer]:
    """The scorers named (all when none are), in definition order; a clear error otherwise."""
    if not names:
        return scorers
    by_name = {s.name: s for s in scorers}
    for name in names:
        if name not in by_name:
            known = ", ".join(by_name) or "none are defined"
            raise ValidationError(
                f"--scorer {name}: no such scorer (defined: {known}); add it under `scorers:` "
                "in the experiment or in a file given with --scorers FILE"
            )
    return [s for s in scorers if s.name in names]
