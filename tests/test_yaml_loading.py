"""Reading users' YAML: libyaml's parser when PyYAML has it, the pure-Python one otherwise, the
same guarantees from both (duplicate keys refused, errors naming the file and line)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulator import experiment
from simulator.errors import ValidationError
from simulator.experiment import (
    YAML_LOADER,
    UniqueKeyLoader,
    experiment_from_yaml,
    load_experiment,
    load_yaml,
)
from simulator.scoring.definition import load_scorers_file

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
LIBYAML = yaml.__with_libyaml__
needs_libyaml = pytest.mark.skipif(not LIBYAML, reason="PyYAML was built without libyaml")

LOADERS = [
    pytest.param(UniqueKeyLoader, id="pure-python"),
    pytest.param(getattr(experiment, "CUniqueKeyLoader", None), id="libyaml", marks=needs_libyaml),
]

# (id, text, the line and column named, what else the message says)
DUPLICATES = [
    ("role", "name: a\nroles:\n  guard: {}\n  guard: {}\n", "line 4, column 3", "'guard'"),
    (
        "nested section",
        "roles:\n  guard:\n    sections:\n      goal: a\n      rules: b\n      goal: c\n",
        "line 6, column 7",
        "'goal'",
    ),
    (
        "flow mapping",
        "llms:\n  - {model: a, provider: x, model: b}\n",
        "line 2, column 29",
        "'model'",
    ),
    (
        "factor level",
        "factors:\n  risks:\n    'yes': {shared.risks: a}\n    \"yes\": {shared.risks: b}\n",
        "line 4, column 5",
        "'yes'",
    ),
    (
        "top level, far apart",
        "name: a\nnote: x\nfavourite: true\nstarting_message: s\nname: b\n",
        "line 5, column 1",
        "'name'",
    ),
]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    ("text", "where", "key"), [d[1:] for d in DUPLICATES], ids=[d[0] for d in DUPLICATES]
)
def test_a_duplicate_key_is_refused_by_both_loaders(
    loader: Any, text: str, where: str, key: str
) -> None:
    with pytest.raises(ValidationError) as info:
        load_yaml(text, "dup.yaml", loader)
    assert str(info.value) == (
        f"dup.yaml: {where}: duplicate key {key} (a key may appear once in a mapping); "
        "remove or rename one"
    )


@pytest.mark.parametrize("loader", LOADERS)
def test_the_same_key_in_different_mappings_is_not_a_duplicate(loader: Any) -> None:
    text = "roles:\n  guard: {sections: {goal: a}}\n  prisoner: {sections: {goal: b}}\n"
    data = load_yaml(text, "ok.yaml", loader)
    assert data == {
        "roles": {"guard": {"sections": {"goal": "a"}}, "prisoner": {"sections": {"goal": "b"}}}
    }


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
@needs_libyaml
def test_both_loaders_read_the_shipped_files_alike(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    by_c = load_yaml(text, path.name)
    assert by_c == load_yaml(text, path.name, UniqueKeyLoader)
    assert isinstance(by_c, dict) and by_c  # read, not empty


# (id, text, the start of the message after the file name, a part naming the mistake)
SYNTAX = [
    (
        "indentation",
        "name: mini\nstarting_message: Start\n  llms: oops\n",
        "line 3, column 7: YAML syntax error",
        "mapping values",
    ),
    (
        "unclosed list",
        "name: a\nllms: [a, b\nroles: {}\n",
        "line 3, column 6: YAML syntax error",
        "','",
    ),
    (
        "tab",
        "name: a\nroles:\n\tguard: {}\n",
        "line 3, column 1: YAML syntax error",
        "(a tab: YAML indents with spaces only)",
    ),
    (
        "control character",
        "name: a\nnote: b\nstarting_message: x\x07y\n",
        "line 3: YAML syntax error",
        "#x0007 is not allowed",
    ),
    (
        "unknown tag",
        "name: !!python/object:os.system x\n",
        "line 1, column 7: YAML syntax error",
        "could not determine a constructor",
    ),
]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    ("text", "start", "part"), [s[1:] for s in SYNTAX], ids=[s[0] for s in SYNTAX]
)
def test_syntax_errors_name_the_file_and_line_with_both_loaders(
    loader: Any, text: str, start: str, part: str
) -> None:
    with pytest.raises(ValidationError) as info:
        load_yaml(text, "bad.yaml", loader)
    message = str(info.value)
    assert message.startswith(f"bad.yaml: {start}: ")
    assert part in message and "\n" not in message and "Traceback" not in message


@needs_libyaml
def test_the_loader_in_use_is_libyaml_when_pyyaml_has_it() -> None:
    assert YAML_LOADER is experiment.CUniqueKeyLoader
    assert issubclass(YAML_LOADER, yaml.CSafeLoader)
    assert not issubclass(YAML_LOADER, yaml.SafeLoader)


def _from_text(text: str, tmp_path: Path) -> None:
    experiment_from_yaml(text, "bad.yaml")


def _from_file(text: str, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(text, encoding="utf-8")
    load_experiment(tmp_path / "bad.yaml")


def _scorers_file(text: str, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(text, encoding="utf-8")
    load_scorers_file(tmp_path / "bad.yaml")


READERS = [_from_text, _from_file, _scorers_file]


@needs_libyaml
@pytest.mark.parametrize("read", READERS, ids=lambda f: f.__name__.strip("_"))
def test_experiments_and_scorers_files_are_parsed_by_libyaml(
    read: Callable[[str, Path], None], tmp_path: Path
) -> None:
    """The wording of a syntax error tells which parser read the file: libyaml and PyYAML's
    pure-Python scanner describe this mistake differently."""
    text = "scorers:\n  a: {kind: python}\n    b: 1\n"
    problems = {}
    for name, loader in (("c", yaml.CSafeLoader), ("pure", yaml.SafeLoader)):
        with pytest.raises(yaml.MarkedYAMLError) as parsed:
            yaml.load(text, Loader=loader)
        problems[name] = parsed.value.problem
    assert problems["c"] != problems["pure"]
    with pytest.raises(ValidationError) as info:
        read(text, tmp_path)
    message = str(info.value)
    assert message.startswith(
        ("bad.yaml: line 3, column", f"{tmp_path / 'bad.yaml'}: line 3, column")
    )
    assert f"error: {problems['c']};" in message


def test_a_scorers_file_with_a_duplicate_scorer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(
        "scorers:\n"
        "  length: {kind: python, function: 'tests.scoring_plugin:turns'}\n"
        "  length: {kind: python, function: 'tests.scoring_plugin:shouting'}\n",
        encoding="utf-8",
    )
    with pytest.raises(ValidationError) as info:
        load_scorers_file(path)
    assert str(info.value).startswith(f"{path}: line 3, column 3: duplicate key 'length'")


@pytest.mark.parametrize("text", ["name: a\nroles: {}\n", "name: a\nname: b\n", "a: [b\n"])
def test_the_garbage_collector_is_left_as_it_was(text: str) -> None:
    """load_yaml pauses it while parsing: after a good or a bad file it is on again, and a
    caller that had turned it off finds it off."""
    states = []
    for was_on in (True, False):
        if was_on:
            gc.enable()
        else:
            gc.disable()
        try:
            try:
                load_yaml(text, "gc.yaml")
            except ValidationError:
                pass
            states.append(gc.isenabled())
        finally:
            gc.enable()
    assert states == [True, False]
