"""Experiment YAML: loading, validation messages, round-trips."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulator.errors import UserError, ValidationError
from simulator.experiment import (
    Experiment,
    ModelSpec,
    Role,
    Summarizer,
    dump_experiment,
    experiment_from_dict,
    experiment_from_yaml,
    experiment_to_dict,
    load_experiment,
    save_experiment,
    validate_experiment,
)

PRISON = Path(__file__).resolve().parent.parent / "experiments" / "prison.yaml"

BASE: dict[str, Any] = {
    "name": "mini",
    "starting_message": "Start",
    "llms": [{"model": "llama3", "provider": "ollama", "temperature": 0.5}],
    "roles": {
        "guard": {"description": "keeps order", "sections": {"starting_prompt": "You guard."}},
        "prisoner": {"sections": {"starting_prompt": "You are held.", "goal": "Get out."}},
    },
    "shared_sections": {"environment": "<GUARD_NUM> <GUARD_NOUN>."},
    "summarizer": {"sections": {"starting_prompt": "Summarize."}},
}


def test_prison_loads() -> None:
    exp = load_experiment(PRISON)
    assert exp.name == "prison"
    assert exp.starting_message == "Start the experiment"
    assert [r.name for r in exp.roles] == ["guard", "prisoner"]
    # the paper's design: what varies between scenarios is set by the factors
    assert list(exp.role("guard").sections) == ["starting_prompt", "goal"]
    assert list(exp.role("prisoner").sections) == ["starting_prompt"]
    assert list(exp.shared_sections) == ["environment", "communication_rules"]
    assert exp.factor_levels() == {
        "risks": ["yes", "no"],
        "oversight": ["yes", "no"],
        "goal": ["yard_time", "escape"],
        "guard_personality": ["good", "bad", "blank"],
        "prisoner_personality": ["good", "bad", "blank"],
    }
    for role in exp.roles:
        assert role.description
    assert [s.label for s in exp.llms] == [
        "llamacpp/smollm2",
        "ollama/llama3:latest",
        "openai/gpt-4o-mini",
        "scripted/scripted",
    ]
    assert exp.llms[0].extra == {"repeat_penalty": 1.3}
    assert exp.llms[0].sampling() == {
        "temperature": 0.7,
        "top_k": 40,
        "top_p": 0.9,
        "seed": 0,
        "max_tokens": 96,
        "repeat_penalty": 1.3,
    }
    assert list(exp.summarizer.sections) == ["starting_prompt"]  # `format` follows the goal
    for tag in ("<GUARD_NUM>", "<PRISONER_POSS>", "<PRISONER_VERB_BE>", "<AGENTS_NUM>"):
        assert tag in exp.shared_sections["environment"]


def test_prison_round_trip() -> None:
    exp = load_experiment(PRISON)
    text = dump_experiment(exp)
    again = experiment_from_yaml(text, "dumped.yaml")
    assert again == exp
    assert dump_experiment(again) == text


def test_round_trip_of_every_optional_part(tmp_path: Path) -> None:
    exp = Experiment(
        name="full",
        note="a note",
        favourite=True,
        starting_message="Hello <AGENTS_NUM>\nsecond line",
        llms=[
            ModelSpec(model="llama3:8b", base_url="http://host:11434", context_length=4096),
            ModelSpec(model="s", provider="scripted", extra={"replies": ["a", "b: c\nd"]}),
        ],
        roles=[Role(name="Guard", sections={"starting_prompt": "x " * 60, "goal": "y\n\nz\n"})],
        summarizer=Summarizer(sections={"format": "short"}, llm=ModelSpec(model="gpt-4o")),
        selector_llm=ModelSpec(model="phi3", provider="ollama", seed=-1),
    )
    validate_experiment(exp, "full.yaml")
    path = tmp_path / "full.yaml"
    save_experiment(exp, path)
    again = load_experiment(path)
    assert again == exp
    assert dump_experiment(again) == path.read_text(encoding="utf-8")


def test_dump_leaves_out_empty_values_and_latest_tag() -> None:
    exp = experiment_from_dict(copy.deepcopy(BASE), "mini.yaml")
    data = experiment_to_dict(exp)
    assert "note" not in data and "favourite" not in data and "selector_llm" not in data
    assert "description" not in data["roles"]["prisoner"]
    assert data["llms"] == [{"model": "llama3", "provider": "ollama", "temperature": 0.5}]
    assert "  - {model: llama3, provider: ollama, temperature: 0.5}\n" in dump_experiment(exp)


def test_llm_shorthand_and_inferred_provider() -> None:
    data = copy.deepcopy(BASE) | {"llms": ["gpt-4o-mini", {"model": "mistral"}]}
    data["selector_llm"] = "llama3"
    exp = experiment_from_dict(data, "mini.yaml")
    assert [s.label for s in exp.llms] == ["openai/gpt-4o-mini", "ollama/mistral:latest"]
    assert exp.selector_llm == ModelSpec(model="llama3")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing.yaml: cannot read"):
        load_experiment(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "raw",
    [
        "name: caf\u00e9\n".encode("latin-1"),  # latin-1: \xe9 alone is not UTF-8
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",  # a picture saved as .yaml
    ],
    ids=["latin-1", "binary"],
)
def test_file_that_is_not_utf8_text(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "odd.yaml"
    path.write_bytes(raw)
    with pytest.raises(UserError) as info:
        load_experiment(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not UTF-8 text")
    assert "YAML text saved as UTF-8" in message


def test_folder_given_as_experiment_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a folder, not an experiment file"):
        load_experiment(tmp_path)


def test_literal_angle_text_escaped_and_round_trips(tmp_path: Path) -> None:
    """`<<END>>` is how a section says `<END>` to the model; it survives export/import."""
    data = copy.deepcopy(BASE)
    data["roles"]["guard"]["sections"]["format"] = "Answer in <<answer_text>>, then <<END>>."
    data["starting_message"] = "Start, <<GUARD_NUM>> is literal, <GUARD_NUM> is not"
    path = tmp_path / "lit.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    exp = load_experiment(path)  # not rejected as unknown placeholders
    again = tmp_path / "again.yaml"
    save_experiment(exp, again)
    back = load_experiment(again)
    assert back == exp
    assert back.role("guard").sections["format"] == "Answer in <<answer_text>>, then <<END>>."
    from simulator.prompts import agent_prompt, starting_message

    prompt = agent_prompt(back, "guard", {"guard": 2, "prisoner": 1})
    assert "## Format\n\nAnswer in <answer_text>, then <END>." in prompt
    assert starting_message(back, {"guard": 2}) == "Start, <GUARD_NUM> is literal, 2 is not"


def test_unknown_tag_error_offers_the_escape(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["roles"]["guard"]["sections"]["format"] = "End with <END>."
    path = tmp_path / "end.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with pytest.raises(ValidationError) as info:
        load_experiment(path)
    message = str(info.value)
    assert "<END>: unknown placeholder (if it is text for the model, write <<END>>)" in message
    assert "double the brackets: <<WORD>>" in message


def test_validate_programmatic_experiment() -> None:
    exp = Experiment(
        name="x", starting_message="go", llms=[ModelSpec(model="m", top_k=0)], roles=[]
    )
    with pytest.raises(ValidationError) as info:
        validate_experiment(exp, "made in code")
    message = str(info.value)
    assert "made in code: llms[0].top_k: 0 is not allowed" in message
    assert "made in code: roles: is empty" in message


Mutation = Callable[[dict[str, Any]], Any]
DELETE = object()


def _set(path: str, value: Any) -> Mutation:
    """Mutation setting a dotted key path of the base experiment (or deleting it)."""

    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return apply


def _rename_role(old: str, new: str) -> Mutation:
    def apply(data: dict[str, Any]) -> None:
        data["roles"] = {new if k == old else k: v for k, v in data["roles"].items()}

    return apply


SYNTAX_ERROR = "name: mini\nstarting_message: Start\n  llms: oops\n"
DUPLICATE_KEY = "name: a\nroles:\n  guard: {}\n  guard: {}\n"
NOT_A_MAPPING = "- just\n- a list\n"

BAD_INPUTS: list[tuple[str, str | Mutation, list[str]]] = [
    ("syntax", SYNTAX_ERROR, ["line 3, column 7", "YAML syntax error", "indentation"]),
    ("duplicate key", DUPLICATE_KEY, ["line 4, column 3: duplicate key 'guard'", "remove or rename one"]),
    ("not a mapping", NOT_A_MAPPING, ["expected a mapping", "name, starting_message"]),
    ("unknown key", _set("nmae", "x"), ["nmae: unknown key", "did you mean `name`?", "allowed keys: name, note"]),
    ("unknown role key", _set("roles.guard.descripton", "x"), ["roles.guard.descripton", "did you mean `description`?"]),
    ("unknown summarizer key", _set("summarizer.model", "x"), ["summarizer.model: unknown key", "sections, llm"]),
    ("llm typo", _set("llms.0.temprature", 1), ["llms[0].temprature", "did you mean `temperature`?"]),
    ("missing name", _set("name", DELETE), ["name: missing", "name, starting_message, llms, roles"]),
    ("missing starting message", _set("starting_message", DELETE), ["starting_message: missing"]),
    ("empty llms", _set("llms", []), ["llms: missing"]),
    ("llms not a list", _set("llms", {"model": "x"}), ["llms: expected a list"]),
    ("missing roles", _set("roles", DELETE), ["roles: missing"]),
    ("llm without model", _set("llms.0", {"provider": "ollama"}), ["llms[0].model: missing", "{model: llama3}"]),
    ("role without sections", _set("roles.guard.sections", DELETE), ["roles.guard.sections: missing", "at least one section"]),
    ("role name with space", _rename_role("guard", "prison guard"), ["roles.prison guard:", "one word of letters and digits", "`prisonguard`"]),
    ("role name with underscore", _rename_role("guard", "head_guard"), ["roles.head_guard:", "`headguard`"]),
    ("duplicate role name", _rename_role("prisoner", "Guard"), ["roles.Guard: same name as role `guard`"]),
    ("reserved role name", _rename_role("prisoner", "agents"), ["roles.agents:", "reserved for <AGENTS_NUM>"]),
    ("unknown provider", _set("llms.0.provider", "olama"), ["llms[0].provider: unknown provider 'olama'", "ollama, openai, scripted, llamacpp"]),
    ("temperature too high", _set("llms.0.temperature", 3), ["llms[0].temperature: 3 is not allowed", "from 0 to 2"]),
    ("temperature text", _set("llms.0.temperature", "hot"), ["llms[0].temperature: 'hot'", "from 0 to 2"]),
    ("top_p too high", _set("llms.0.top_p", 1.5), ["llms[0].top_p: 1.5", "from 0 to 1"]),
    ("top_k zero", _set("llms.0.top_k", 0), ["llms[0].top_k: 0", "at least 1"]),
    ("top_k float", _set("llms.0.top_k", 2.5), ["llms[0].top_k: 2.5", "whole number"]),
    ("seed text", _set("llms.0.seed", "x"), ["llms[0].seed: 'x'", "a whole number"]),
    ("context_length negative", _set("llms.0.context_length", -1), ["llms[0].context_length: -1", "positive whole number"]),
    ("max_tokens zero", _set("llms.0.max_tokens", 0), ["llms[0].max_tokens: 0", "positive whole number"]),
    ("max_tokens bool", _set("llms.0.max_tokens", True), ["llms[0].max_tokens: True"]),
    ("timeout not a number", _set("llms.0.timeout", "long"), ["llms[0].timeout: 'long' is not allowed", "SIMULATOR_REQUEST_TIMEOUT"]),
    ("selector llm", _set("selector_llm", {"model": "x", "top_p": 2}), ["selector_llm.top_p: 2"]),
    ("favourite not bool", _set("favourite", 3), ["favourite: expected true or false"]),
    ("name a number", _set("name", 2024), ["name: expected text", "put it in quotes"]),
    ("section not text", _set("roles.guard.sections.goal", ["a"]), ["roles.guard.sections.goal: expected the section text"]),
    ("section empty", _set("roles.guard.sections.goal", None), ["roles.guard.sections.goal: the section is empty"]),
    ("section blank", _set("roles.guard.sections.goal", "  "), ["roles.guard.sections.goal: the section is empty"]),
    ("section title", _set("roles.guard.sections.communication rules", "x"), ["roles.guard.sections.communication rules:", "letters, digits and underscores"]),
    ("section also shared", _set("roles.guard.sections.environment", "x"), ["roles.guard.sections.environment: also a shared section"]),
    ("tag in role section", _set("roles.guard.sections.goal", "Watch <GAURD_NUM>"), ["roles.guard.sections.goal: <GAURD_NUM>: unknown placeholder; did you mean <GUARD_NUM>?", "Placeholders valid in this experiment: <GUARD_NUM>, <GUARD_NOUN>", "<PRISONER_VERB_...>, <AGENTS_NUM>, <ROLES_NUM>"]),
    ("lower-case tag", _set("shared_sections.environment", "<guard_num> guards"), ["shared_sections.environment: <guard_num>: tags are upper-case; write <GUARD_NUM>"]),
    ("unclosed tag", _set("summarizer.sections.starting_prompt", "<PRISONER_NOUN here"), ["summarizer.sections.starting_prompt: <PRISONER_NOUN: it is not closed"]),
    ("tag in starting message", _set("starting_message", "Hi <GUARD_VERB_>"), ["starting_message: <GUARD_VERB_>: name the verb"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "bad", "expected"), BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS]
)
def test_bad_input(tmp_path: Path, case: str, bad: str | Mutation, expected: list[str]) -> None:
    if isinstance(bad, str):
        text = bad
    else:
        data = copy.deepcopy(BASE)
        bad(data)
        text = yaml.safe_dump(data, sort_keys=False)
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValidationError) as info:
        load_experiment(path)
    message = str(info.value)
    assert f"{path}: " in message
    for part in expected:
        assert part in message


def test_every_problem_reported_at_once() -> None:
    data = copy.deepcopy(BASE)
    data["llms"][0]["temperature"] = 5
    data["roles"]["guard"]["sections"]["goal"] = "<GAURD_NUM>"
    with pytest.raises(ValidationError) as info:
        experiment_from_dict(data, "two.yaml")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("two.yaml: llms[0].temperature: 5")
    assert lines[1].startswith("two.yaml: roles.guard.sections.goal: <GAURD_NUM>")
