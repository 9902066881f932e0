"""The nouns of an experiment as plain dataclasses, plus YAML load / validate / dump."""

from __future__ import annotations

import difflib
import gc
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import yaml

from simulator.errors import UserError, ValidationError
from simulator.placeholders import (
    ESCAPE_HINT,
    RESERVED_ROLE_NAMES,
    explain,
    find_invalid,
    valid_tags,
)

PROVIDERS = ("ollama", "openai", "scripted", "llamacpp")
SPEAKER_METHODS = ("round_robin", "random", "auto", "manual")
ROLE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_OPENAI_PREFIXES = ("gpt-", "o1", "o3", "o4", "chatgpt-")


def infer_provider(model: str) -> str:
    """SPEC §6: gpt-/o1/o3/o4/chatgpt- names are OpenAI, everything else Ollama."""
    return "openai" if model.startswith(_OPENAI_PREFIXES) else "ollama"


@dataclass
class ModelSpec:
    """One LLM an experiment may use, with its sampling parameters."""

    model: str
    provider: str = ""  # filled by infer_provider when empty
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    context_length: int | None = None
    max_tokens: int | None = None
    # Endpoint override (Ollama host, OpenAI-compatible base URL), or a list of them: servers
    # behind the same model, over which calls are spread.
    base_url: str | list[str] | None = None
    # provider-specific settings: scripted `replies`/`rule`, llamacpp `path`, `repeat_penalty` ...
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.provider:
            self.provider = infer_provider(self.model)
        if self.provider == "ollama" and ":" not in self.model:
            self.model = f"{self.model}:latest"

    @property
    def label(self) -> str:
        """Short unique name: `provider/model`."""
        return f"{self.provider}/{self.model}"

    def base_urls(self) -> list[str | None]:
        """Each endpoint this LLM is called at (None: the provider's default)."""
        if isinstance(self.base_url, list):
            return list(self.base_url) or [None]
        return [self.base_url]

    @property
    def url(self) -> str | None:
        """The base URL of an LLM with one endpoint (the first of a list)."""
        return self.base_urls()[0]

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters that are set (stored with every conversation)."""
        keys = ("temperature", "top_k", "top_p", "seed", "context_length", "max_tokens")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if "repeat_penalty" in self.extra:
            out["repeat_penalty"] = self.extra["repeat_penalty"]
        return out

    def matches(self, name: str) -> bool:
        """True when `name` designates this LLM (model, model without tag, or label)."""
        bare = self.model[: -len(":latest")] if self.model.endswith(":latest") else self.model
        return name in (self.model, bare, self.label, f"{self.provider}/{bare}")


@dataclass
class Role:
    name: str  # a single word: letters and digits
    description: str = ""  # what the auto speaker selector is told about the role
    sections: dict[str, str] = field(default_factory=dict)  # title -> content, in order


@dataclass
class Summarizer:
    sections: dict[str, str] = field(default_factory=dict)
    llm: ModelSpec | None = None  # None: the conversation's LLM


@dataclass
class Factor:
    """A named set of levels (SPEC §10). A level maps section addresses (`guard.personality`,
    `shared.risks`, `summarizer.format`, `starting_message`) to their text, or to None to
    leave the section out."""

    name: str
    levels: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def addresses(self) -> list[str]:
        """The sections this factor sets, in the order its levels first name them."""
        return list(dict.fromkeys(a for level in self.levels.values() for a in level))


@dataclass
class Experiment:
    name: str
    starting_message: str
    llms: list[ModelSpec]
    roles: list[Role]
    shared_sections: dict[str, str] = field(default_factory=dict)
    summarizer: Summarizer = field(default_factory=Summarizer)
    factors: list[Factor] = field(default_factory=list)
    selector_llm: ModelSpec | None = None  # None: the conversation's LLM
    # scorer name -> definition as written (issue 11; checked by simulator.scoring.definition)
    scorers: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    favourite: bool = False
    # set by the store
    id: str | None = None
    creator: str | None = None
    created_at: datetime | None = None
    parent_id: str | None = None

    def role(self, name: str) -> Role:
        for r in self.roles:
            if r.name.lower() == name.lower():
                return r
        raise KeyError(name)

    def find_llm(self, name: str) -> ModelSpec | None:
        for spec in self.llms:
            if spec.matches(name):
                return spec
        return None

    def factor(self, name: str) -> Factor:
        for f in self.factors:
            if f.name == name:
                return f
        raise KeyError(name)

    def factor_levels(self) -> dict[str, list[str]]:
        """Each factor's name with its level names, in declared order."""
        return {f.name: list(f.levels) for f in self.factors}


# --- YAML form (SPEC §1) ---------------------------------------------------------------

TOP_KEYS: tuple[str, ...] = ("name", "note", "favourite", "starting_message", "llms", "roles")
TOP_KEYS += ("shared_sections", "summarizer", "selector_llm", "factors", "scorers")
REQUIRED_KEYS = ("name", "starting_message", "llms", "roles")
ROLE_KEYS = ("description", "sections")
SUMMARIZER_KEYS = ("sections", "llm")
LLM_FIELDS: tuple[str, ...] = ("model", "provider", "temperature", "top_k", "top_p", "seed")
LLM_FIELDS += ("context_length", "max_tokens", "base_url")
SECTION_TITLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_YAML_HINT = (
    "check the indentation, and quote text that contains ': ' or ' #' or starts with a symbol"
)
_SAMPLING_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2"),
    ("top_p", lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    ("top_k", lambda v: _is_int(v) and v >= 1, "a whole number of at least 1"),
    ("seed", lambda v: _is_int(v), "a whole number"),
    ("context_length", lambda v: _is_int(v) and v > 0, "a positive whole number of tokens"),
    ("max_tokens", lambda v: _is_int(v) and v > 0, "a positive whole number of tokens"),
    (
        "base_url",
        lambda v: _is_url(v) or (isinstance(v, list) and v != [] and all(map(_is_url, v))),
        "a URL, e.g. http://localhost:11434, or a list of URLs of servers with the same model, "
        "e.g. [http://gpu1:8000/v1, http://gpu2:8000/v1]",
    ),
)


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment YAML file."""
    if Path(path).is_dir():
        raise UserError(
            f"{path} is a folder, not an experiment file: give the path of a .yaml file "
            "(e.g. experiments/prison.yaml)"
        )
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the experiment file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}): an "
            "experiment file is YAML text saved as UTF-8; re-save it with that encoding"
        ) from None
    return experiment_from_yaml(text, str(path))


def experiment_from_yaml(text: str, source: str) -> Experiment:
    """Parse and validate YAML text; `source` names it in error messages."""
    return experiment_from_dict(load_yaml(text, source), source)


def load_yaml(
    text: str, source: str, loader: type[yaml.SafeLoader | yaml.CSafeLoader] | None = None
) -> Any:
    """Parse YAML text a user wrote (an experiment, a scorers file) with `YAML_LOADER`.

    A key repeated in one mapping is refused; every error is a ValidationError naming `source`
    and, where the parser knows it, the line and column.
    """
    try:
        return _parse(text, loader or YAML_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        if isinstance(exc, _DuplicateKey):
            raise ValidationError(f"{source}: {where}{exc.problem}; remove or rename one") from None
        problem = exc.problem or exc.context
        if mark and _char_at(text, mark.line, mark.column) == "\t":
            # libyaml does not say which character it found, and a tab is the usual one
            problem = f"{problem} (a tab: YAML indents with spaces only)"
        raise ValidationError(
            f"{source}: {where}YAML syntax error: {problem}; {_YAML_HINT}"
        ) from None
    except yaml.reader.ReaderError as exc:
        # `position` counts characters in one loader and UTF-8 bytes in the other: find the
        # character instead (the first one the reader refuses is its first occurrence)
        if isinstance(exc.character, int) and chr(exc.character) in text:
            line = text.count("\n", 0, text.index(chr(exc.character))) + 1
            raise ValidationError(
                f"{source}: line {line}: YAML syntax error: the control character "
                f"#x{exc.character:04x} is not allowed in YAML text; delete it"
            ) from None
        raise ValidationError(f"{source}: YAML syntax error: {exc}; {_YAML_HINT}") from None
    except yaml.YAMLError as exc:
        raise ValidationError(f"{source}: YAML syntax error: {exc}; {_YAML_HINT}") from None


def _parse(text: str, loader: type[yaml.SafeLoader | yaml.CSafeLoader]) -> Any:
    """yaml.load with the cyclic garbage collector paused.

    Parsing creates a node, then an object, per scalar and mapping; the collector, triggered
    by allocation counts, scans them all again and again as they pile up, so the parse time
    grew with the square of the size (a 4 MB file of thousands of factor levels: 2.6 s, 0.9 s
    paused), and found nothing to free: all of it is in use. It runs as usual once we return.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return yaml.load(text, Loader=loader)
    finally:
        if enabled:
            gc.enable()


def _char_at(text: str, line: int, column: int) -> str:
    """The character at a 0-based line and column of `text` ("" past its end)."""
    lines = text.split("\n", line + 1)
    return lines[line][column : column + 1] if line < len(lines) else ""


def experiment_from_dict(data: Any, source: str) -> Experiment:
    """Build an Experiment from its YAML form (SPEC §1) and validate it."""
    if not isinstance(data, dict):
        keys = ", ".join(REQUIRED_KEYS)
        _fail(source, "", f"expected a mapping with the keys {keys} ..., got {_kind(data)}")
    _mapping(data, "", source, TOP_KEYS)
    factors = _factors(data.get("factors"), source)
    from_factor = {a for f in factors for a in f.addresses()}
    for key in REQUIRED_KEYS:
        if key in from_factor:
            continue  # a factor sets it in every conversation
        if data.get(key) in (None, "", [], {}):
            near = difflib.get_close_matches(key, sorted(from_factor), n=1, cutoff=0.8)
            hint = f" (the factors set `{near[0]}`: did you mean `{key}`?)" if near else ""
            _fail(source, key, f"missing; every experiment needs {', '.join(REQUIRED_KEYS)}{hint}")
    if not isinstance(data["llms"], list):
        _fail(source, "llms", f"expected a list of LLMs, got {_kind(data['llms'])}")
    roles = _mapping(data["roles"], "roles", source)
    summarizer = _mapping(data.get("summarizer") or {}, "summarizer", source, SUMMARIZER_KEYS)
    exp = Experiment(
        name=_text(data, "name", "", source),
        note=_text(data, "note", "", source),
        favourite=_flag(data, "favourite", source),
        starting_message=_text(data, "starting_message", "", source),
        llms=[_llm(item, f"llms[{i}]", source) for i, item in enumerate(data["llms"])],
        roles=[_role(name, value, source) for name, value in roles.items()],
        shared_sections=_sections(data.get("shared_sections"), "shared_sections", source),
        summarizer=Summarizer(
            sections=_sections(summarizer.get("sections"), "summarizer.sections", source),
            llm=_optional_llm(summarizer.get("llm"), "summarizer.llm", source),
        ),
        selector_llm=_optional_llm(data.get("selector_llm"), "selector_llm", source),
        factors=factors,
        scorers=_scorers(data.get("scorers"), source),
    )
    validate_experiment(exp, source)
    return exp


def validate_experiment(exp: Experiment, source: str) -> None:
    """Check values, names and placeholders; raise one ValidationError listing every problem."""
    problems: list[str] = []
    if not exp.name.strip():
        problems.append("name: is empty; give the experiment a name")
    if not exp.starting_message.strip() and not _factor_sets(exp, STARTING_MESSAGE):
        problems.append("starting_message: is empty; write the researcher's first message")
    if not exp.llms:
        problems.append("llms: is empty; list at least one LLM, e.g. {model: llama3}")
    specs: list[tuple[str, ModelSpec | None]] = [(f"llms[{i}]", s) for i, s in enumerate(exp.llms)]
    specs += [("summarizer.llm", exp.summarizer.llm), ("selector_llm", exp.selector_llm)]
    for path, spec in specs:
        problems += _llm_problems(spec, path) if spec else []
    problems += _role_problems(exp)
    names = [r.name for r in exp.roles]
    # with a misnamed role every tag check would be noise; they run once the names are fixed
    check_tags = all(isinstance(n, str) and ROLE_NAME_RE.match(n) for n in names)
    bad_tags = False
    for path, title, text in [("starting_message", "", exp.starting_message), *_all_sections(exp)]:
        if title and not text.strip():
            problems.append(f"{path}: the section is empty; write its text or remove it")
        if title and not SECTION_TITLE_RE.match(title):
            problems.append(
                f"{path}: a section title is letters, digits and underscores, starting with a "
                "letter (e.g. communication_rules)"
            )
        for tag in find_invalid(text, names) if check_tags else []:
            problems.append(f"{path}: {explain(tag, names)}")
            bad_tags = True
    factor_problems, factor_tags = _factor_problems(exp, names if check_tags else None)
    problems += factor_problems
    bad_tags = bad_tags or factor_tags
    if problems:
        lines = [f"{source}: {p}" for p in problems]
        if bad_tags:
            lines.append(
                f"Placeholders valid in this experiment: {', '.join(valid_tags(names))}; "
                f"{ESCAPE_HINT}"
            )
        raise ValidationError("\n".join(lines))


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """The YAML form of an experiment (None / empty optional values left out)."""
    out: dict[str, Any] = {"name": exp.name, "note": exp.note, "favourite": exp.favourite}
    out["starting_message"] = exp.starting_message
    out["llms"] = [llm_to_dict(spec) for spec in exp.llms]
    out["roles"] = {
        r.name: {"description": r.description, "sections": dict(r.sections)} for r in exp.roles
    }
    for role in out["roles"].values():
        _drop_empty(role)
    out["shared_sections"] = dict(exp.shared_sections)
    out["summarizer"] = _drop_empty(
        {"sections": dict(exp.summarizer.sections), "llm": llm_to_dict(exp.summarizer.llm)}
    )
    out["selector_llm"] = llm_to_dict(exp.selector_llm)
    out["factors"] = {
        f.name: {level: dict(sections) for level, sections in f.levels.items()} for f in exp.factors
    }
    out["scorers"] = dict(exp.scorers)
    return _drop_empty(out)


def llm_to_dict(spec: ModelSpec | None) -> dict[str, Any] | None:
    """YAML form of one LLM: the fields that are set, then the provider-specific extras."""
    if spec is None:
        return None
    model = spec.model
    if spec.provider == "ollama" and model.endswith(":latest"):
        model = model[: -len(":latest")]  # ModelSpec adds it back on load
    out = {"model": model, "provider": spec.provider}
    out |= {k: getattr(spec, k) for k in LLM_FIELDS[2:] if getattr(spec, k) is not None}
    return out | spec.extra


def dump_experiment(exp: Experiment) -> str:
    """The experiment as YAML text; LLMs with plain values are written one per line."""
    data = experiment_to_dict(exp)
    data["llms"] = [_Flow(d) for d in data["llms"]]
    for parent, key in ((data.get("summarizer", {}), "llm"), (data, "selector_llm")):
        if key in parent:
            parent[key] = _Flow(parent[key])
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def save_experiment(exp: Experiment, path: str | Path) -> None:
    """Write the experiment as YAML to `path`."""
    Path(path).write_text(dump_experiment(exp), encoding="utf-8")


# --- helpers ---------------------------------------------------------------------------


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyConstructor(yaml.constructor.SafeConstructor):
    """Refuses a key repeated in one mapping (PyYAML keeps the last silently).

    The constructor is Python in both loaders below, so this one check serves both.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                problem = f"duplicate key {key!r} (a key may appear once in a mapping)"
                raise _DuplicateKey(None, None, problem, key_node.start_mark)
            if isinstance(key, Hashable):  # the base class reports unhashable keys
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class UniqueKeyLoader(_UniqueKeyConstructor, yaml.SafeLoader):
    """PyYAML's pure-Python safe loader, duplicate keys refused."""


YAML_LOADER: type[yaml.SafeLoader | yaml.CSafeLoader] = UniqueKeyLoader
if yaml.__with_libyaml__:

    class CUniqueKeyLoader(_UniqueKeyConstructor, yaml.CSafeLoader):
        """libyaml's parser (C, 10-20x faster on large files), duplicate keys refused."""

    # the same documents and errors, the messages worded by libyaml
    YAML_LOADER = CUniqueKeyLoader


class _Flow(dict):
    """A mapping dumped in flow style (`{model: x, provider: y}`) when its values are plain."""


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)  # indent list items under their key


def _represent_flow(dumper: yaml.SafeDumper, value: _Flow) -> yaml.Node:
    plain = all(isinstance(v, (str, int, float)) and "\n" not in str(v) for v in value.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=plain)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # prompts stay readable: multi-line text as a block, long text folded at the line width
    style = "|" if "\n" in value else ">" if len(value) > 80 else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(_Flow, _represent_flow)
_Dumper.add_representer(str, _represent_str)


def _drop_empty(data: dict[str, Any]) -> dict[str, Any]:
    for key in [k for k, v in data.items() if v is None or v is False or v in ("", {}, [])]:
        del data[key]
    return data


def _fail(source: str, path: str, problem: str) -> NoReturn:
    raise ValidationError(f"{source}: {path}: {problem}" if path else f"{source}: {problem}")


def _kind(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return "nothing" if value is None else repr(value)


def _mapping(value: Any, path: str, source: str, allowed: tuple[str, ...] = ()) -> dict[str, Any]:
    """`value` as a mapping with text keys, from `allowed` when given."""
    if not isinstance(value, dict):
        _fail(source, path, f"expected a mapping (key: value lines), got {_kind(value)}")
    for key in value:
        where = _join(path, str(key))
        if not isinstance(key, str):
            _fail(source, where, "keys are words of letters, digits and underscores; quote it")
        if allowed and key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            _fail(source, where, f"unknown key; {hint}allowed keys: {', '.join(allowed)}")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _text(data: dict[str, Any], key: str, path: str, source: str) -> str:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        _fail(source, _join(path, key), f"expected text, got {_kind(value)}; put it in quotes")
    return value or ""


def _flag(data: dict[str, Any], key: str, source: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        _fail(source, key, f"expected true or false, got {_kind(value)}")
    return value


def _sections(value: Any, path: str, source: str) -> dict[str, str]:
    sections = _mapping(value if value is not None else {}, path, source)
    for title, content in sections.items():
        if content is None:
            _fail(source, _join(path, title), "the section is empty; write its text or remove it")
        if not isinstance(content, str):
            _fail(source, _join(path, title), f"expected the section text, got {_kind(content)}")
    return dict(sections)


def _role(name: str, value: Any, source: str) -> Role:
    path = f"roles.{name}"
    data = _mapping(value if value is not None else {}, path, source, ROLE_KEYS)
    sections = _sections(data.get("sections"), f"{path}.sections", source)
    return Role(name=name, description=_text(data, "description", path, source), sections=sections)


def _llm(value: Any, path: str, source: str) -> ModelSpec:
    """One LLM: a mapping, or just a model name. Unknown keys become provider extras."""
    if isinstance(value, str) and value:
        return ModelSpec(model=value)
    data = _mapping(value, path, source)
    if not isinstance(data.get("model"), str) or not data["model"]:
        _fail(source, f"{path}.model", "missing; name the model, e.g. {model: llama3}")
    extra = {k: v for k, v in data.items() if k not in LLM_FIELDS}
    for key in extra:
        close = difflib.get_close_matches(key, LLM_FIELDS, n=1, cutoff=0.8)
        if close:  # most likely a typo, not a provider setting
            known = ", ".join(LLM_FIELDS)
            hint = f"did you mean `{close[0]}`? (known keys: {known}; others go to the provider)"
            _fail(source, f"{path}.{key}", f"unknown key; {hint}")
    fields = {k: v for k, v in data.items() if k in LLM_FIELDS}
    return ModelSpec(**(fields | {"provider": data.get("provider") or ""}), extra=extra)


def _scorers(value: Any, source: str) -> dict[str, Any]:
    """The `scorers:` mapping, kept as written: name -> a mapping with a `kind`. Its full
    check is simulator.scoring.definition's, when scores are made (issue 11)."""
    scorers = _mapping(value if value is not None else {}, "scorers", source)
    for name, definition in scorers.items():
        if not isinstance(definition, dict) or "kind" not in definition:
            _fail(
                source,
                f"scorers.{name}",
                "expected a mapping with `kind:` (judge, moderation or python)",
            )
    return dict(scorers)


def _optional_llm(value: Any, path: str, source: str) -> ModelSpec | None:
    return None if value is None else _llm(value, path, source)


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _llm_problems(spec: ModelSpec, path: str) -> list[str]:
    problems = []
    if spec.provider not in PROVIDERS:
        allowed = ", ".join(PROVIDERS)
        problems.append(
            f"{path}.provider: unknown provider {spec.provider!r}; use one of: {allowed}"
        )
    for key, ok, allowed in _SAMPLING_RULES:
        value = getattr(spec, key)
        if value is not None and not ok(value):
            problems.append(f"{path}.{key}: {value!r} is not allowed; use {allowed} ({spec.label})")
    if isinstance(spec.base_url, list) and len(set(spec.base_url)) < len(spec.base_url):
        twice = next(u for u in spec.base_url if spec.base_url.count(u) > 1)
        problems.append(f"{path}.base_url: lists {twice} twice; give each server once")
    timeout = spec.extra.get("timeout")
    if timeout is not None and not (_is_number(timeout) and timeout > 0):
        problems.append(
            f"{path}.timeout: {timeout!r} is not allowed; use the seconds one request may "
            f"take, e.g. 300 (overrides SIMULATOR_REQUEST_TIMEOUT for {spec.label})"
        )
    return problems


def _role_problems(exp: Experiment) -> list[str]:
    problems = []
    if not exp.roles:
        problems.append("roles: is empty; define at least one role, e.g. guard: {sections: ...}")
    seen: dict[str, str] = {}
    for role in exp.roles:
        path, name = f"roles.{role.name}", str(role.name)
        if not ROLE_NAME_RE.match(name):
            word = re.sub(r"[^A-Za-z0-9]", "", name).lower() or "guard"
            problems.append(
                f"{path}: a role name is one word of letters and digits, starting with a letter "
                f"(it makes tags like <{word.upper()}_NUM> and agent names like "
                f"{word.capitalize()}_117); rename it, e.g. to `{word}`"
            )
        elif name.upper() in RESERVED_ROLE_NAMES:
            problems.append(
                f"{path}: `{name}` is reserved for <{name.upper()}_NUM>; rename the role"
            )
        if name.lower() in seen:
            problems.append(f"{path}: same name as role `{seen[name.lower()]}` (case is ignored)")
        seen.setdefault(name.lower(), name)
        if not role.sections:
            problems.append(f"{path}.sections: missing; a role needs at least one section")
        for title in role.sections:
            if title in exp.shared_sections:
                problems.append(
                    f"{path}.sections.{title}: also a shared section, so the agent would get it "
                    "twice; rename or remove one"
                )
    return problems


def _all_sections(exp: Experiment) -> list[tuple[str, str, str]]:
    """(key path, title, content) of every prompt section."""
    groups = [(f"roles.{r.name}.sections", r.sections) for r in exp.roles]
    groups += [("shared_sections", exp.shared_sections)]
    groups += [("summarizer.sections", exp.summarizer.sections)]
    return [(f"{p}.{title}", title, text) for p, group in groups for title, text in group.items()]


# --- factors (SPEC §10) ------------------------------------------------------------------

STARTING_MESSAGE = "starting_message"
SHARED, SUMMARIZER = "shared", "summarizer"
FACTOR_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
LEVEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# `--where` keys of the built-in conditions: a factor with one of these names could not be
# told apart from them (nor from agents_<role>).
RESERVED_FACTOR_NAMES = (
    "llm", "days", "messages", "speaker", "status", "repetition", "creator", "seed", "usable",
    "batch", "experiment", "index",
)  # fmt: skip
ADDRESS_FORMS = (
    "starting_message, shared.TITLE, summarizer.TITLE or ROLE.TITLE (e.g. guard.personality)"
)
_BOOL_WORDS = "yes, no, true, false, on, off"


def parse_address(address: str, role_names: list[str]) -> tuple[str, str]:
    """(`starting_message` | `shared` | `summarizer` | role name, section title) of a level
    key; raises ValueError saying what is wrong."""
    if address == STARTING_MESSAGE:
        return STARTING_MESSAGE, ""
    group, dot, title = address.partition(".")
    if not dot or not group or not title:
        raise ValueError(f"`{address}` is not a section; write {ADDRESS_FORMS}")
    if not SECTION_TITLE_RE.match(title):
        raise ValueError(
            f"`{title}`: a section title is letters, digits and underscores, starting with a "
            "letter (e.g. communication_rules)"
        )
    if group in (SHARED, SUMMARIZER):
        return group, title
    for name in role_names:
        if name.lower() == group.lower():
            return name, title
    roles = ", ".join(role_names) or "none"
    raise ValueError(
        f"`{group}` is not a role of this experiment (its roles: {roles}); write {ADDRESS_FORMS}"
    )


def apply_levels(exp: Experiment, levels: dict[str, str]) -> Experiment:
    """The experiment as one conversation sees it: each factor's level sets (or leaves out)
    its sections. Sections a factor adds come after their group's own, in factor order."""
    if not exp.factors and not levels:
        return exp
    roles = {r.name: dict(r.sections) for r in exp.roles}
    groups: dict[str, dict[str, str]] = {
        SHARED: dict(exp.shared_sections),
        SUMMARIZER: dict(exp.summarizer.sections),
        **roles,
    }
    start = exp.starting_message
    names = [r.name for r in exp.roles]
    for name, level in levels.items():
        try:
            sections = exp.factor(name).levels[level]
        except KeyError:
            known = "; ".join(f"{k}: {', '.join(v)}" for k, v in exp.factor_levels().items())
            raise UserError(
                f"Factor level {name}={level} is not in experiment '{exp.name}' (its factors: "
                f"{known or 'none'}). Choose one of those levels."
            ) from None
        for address, text in sections.items():
            group, title = parse_address(address, names)
            if group == STARTING_MESSAGE:
                start = text or ""
            elif text is None:
                groups[group].pop(title, None)
            else:
                groups[group][title] = text
    return replace(
        exp,
        starting_message=start,
        shared_sections=groups[SHARED],
        summarizer=replace(exp.summarizer, sections=groups[SUMMARIZER]),
        roles=[replace(r, sections=groups[r.name]) for r in exp.roles],
    )


def _factor_sets(exp: Experiment, address: str) -> bool:
    return any(address in f.addresses() for f in exp.factors)


def _factors(value: Any, source: str) -> list[Factor]:
    if value is None:
        return []
    factors = _mapping(value, "factors", source)
    out = []
    for name, levels_value in factors.items():
        path = f"factors.{name}"
        if levels_value is None:
            _fail(
                source, path, "has no levels; give it levels, e.g. good: {guard.personality: ...}"
            )
        if not isinstance(levels_value, dict):
            _fail(source, path, f"expected a mapping of levels, got {_kind(levels_value)}")
        levels: dict[str, dict[str, str | None]] = {}
        for level, sections in levels_value.items():
            if isinstance(level, bool):
                _fail(
                    source,
                    path,
                    f"a level is named {str(level).lower()}, which YAML reads as "
                    f"true/false ({_BOOL_WORDS}): put the level name in quotes, e.g. 'yes':",
                )
            where = f"{path}.{level}"
            if not isinstance(level, (str, int)):
                _fail(source, where, "a level name is a word; put it in quotes")
            if sections is None:
                sections = {}
            if not isinstance(sections, dict):
                _fail(
                    source,
                    where,
                    f"expected a mapping of sections to their text, got {_kind(sections)} "
                    "(e.g. guard.personality: You are kind.)",
                )
            for address, text in sections.items():
                if not isinstance(address, str):
                    _fail(source, f"{where}.{address}", f"not a section; write {ADDRESS_FORMS}")
                if text is not None and not isinstance(text, str):
                    _fail(
                        source,
                        f"{where}.{address}",
                        f"expected the section text (or null to leave it out), got {_kind(text)}",
                    )
            levels[str(level)] = dict(sections)
        out.append(Factor(name=str(name), levels=levels))
    return out


def _factor_problems(exp: Experiment, role_names: list[str] | None) -> tuple[list[str], bool]:
    """Problems of the factors, and whether one was a placeholder (to list the valid tags)."""
    problems: list[str] = []
    bad_tags = False
    names = [r.name for r in exp.roles]
    if exp.factors:
        for role in exp.roles:
            if role.name.lower() in (SHARED, SUMMARIZER):
                problems.append(
                    f"roles.{role.name}: with factors, `{role.name}.TITLE` would be ambiguous "
                    f"(`{role.name}` also names the {role.name} sections); rename the role"
                )
    owner: dict[str, str] = {}
    for factor in exp.factors:
        path = f"factors.{factor.name}"
        if not FACTOR_NAME_RE.match(factor.name):
            word = re.sub(r"[^a-z0-9_]", "_", factor.name.lower()).strip("_") or "risks"
            problems.append(
                f"{path}: a factor name is lower-case letters, digits and underscores, starting "
                f"with a letter (it becomes the column factor_{word}); rename it, e.g. to `{word}`"
            )
        elif factor.name in RESERVED_FACTOR_NAMES or factor.name.startswith("agents_"):
            problems.append(
                f"{path}: `{factor.name}` is a built-in condition (--where {factor.name}=...); "
                f"rename the factor, e.g. to `{factor.name}_level`"
            )
        if not factor.levels:
            problems.append(
                f"{path}: has no levels; give it at least one, e.g. good: {{guard.personality: ...}}"
            )
        addresses = factor.addresses()
        for address in addresses:
            try:
                group, title = parse_address(address, names)
            except ValueError as e:
                problems.append(f"{path}: {e}")
                continue
            if address in owner:
                problems.append(
                    f"{path}: sets `{address}`, which factor `{owner[address]}` sets too; a "
                    "section belongs to one factor: merge the two factors or set another section"
                )
                continue
            owner[address] = factor.name
            problems += _base_clash(exp, path, address, group, title)
        for level, sections in factor.levels.items():
            where = f"{path}.{level}"
            if not LEVEL_NAME_RE.match(level):
                problems.append(
                    f"{where}: a level name is letters, digits, `_`, `-` or `.` (no spaces or "
                    "commas: it is typed in --factor NAME=LEVEL,LEVEL); rename it"
                )
            if not sections:
                problems.append(
                    f"{where}: the level changes nothing; set a section's text (e.g. "
                    f"{addresses[0] if addresses else 'guard.personality'}: ...), or write "
                    "`SECTION: null` to leave that section out in this level"
                )
                continue
            for address in addresses:
                if address not in sections:
                    others = [lv for lv, s in factor.levels.items() if address in s]
                    problems.append(
                        f"{where}: does not say what `{address}` is (level `{others[0]}` sets "
                        f"it); give its text, or `{address}: null` to leave it out"
                    )
            for address, text in sections.items():
                if text is None:
                    if address == STARTING_MESSAGE:
                        problems.append(
                            f"{where}.{address}: the starting message cannot be left out; "
                            "write the researcher's first message"
                        )
                    continue
                if not text.strip():
                    problems.append(
                        f"{where}.{address}: the text is empty; write it, or null to leave the "
                        "section out"
                    )
                for tag in find_invalid(text, role_names) if role_names is not None else []:
                    problems.append(f"{where}.{address}: {explain(tag, role_names or [])}")
                    bad_tags = True
    return problems, bad_tags


def _base_clash(exp: Experiment, path: str, address: str, group: str, title: str) -> list[str]:
    """A factor's section must not also be written outside the factor."""
    if group == STARTING_MESSAGE:
        if exp.starting_message.strip():
            return [
                f"{path}: sets the starting message, so the top-level starting_message would "
                "never be used; remove it there (each level gives its own)"
            ]
        return []
    if group == SHARED:
        base, where = exp.shared_sections, "shared_sections"
    elif group == SUMMARIZER:
        base, where = exp.summarizer.sections, "summarizer.sections"
    else:
        base, where = exp.role(group).sections, f"roles.{group}.sections"
        if title in exp.shared_sections or _factor_sets(exp, f"{SHARED}.{title}"):
            return [
                f"{path}: sets `{address}`, but `{title}` is also a shared section, so the agent "
                "would get it twice; rename one of them"
            ]
    if title in base:
        return [
            f"{path}: sets `{address}`, so `{where}.{title}` would never be used; remove it "
            f"there (each level of `{path.split('.', 1)[1]}` gives its own text)"
        ]
    return []
