"""Parse time of a large experiment YAML: PyYAML's pure-Python loader vs the one in use.

    python bench/yaml_parse.py                 # a ~5 MB experiment, 3 runs per loader
    python bench/yaml_parse.py --mb 10 --repeat 5

The file is experiments/prison.yaml grown the way a lab's files grow: every section's text
repeated into long multi-paragraph prompts, and extra factors with many levels (each level
setting a long shared section). It is written by the project's own `save_experiment`, in a
temporary directory, so it has the block and folded scalars of an exported experiment.

Figures (seconds, the median of --repeat runs, the two loaders alternated so both see the same
machine load):
  parse     `load_yaml(text, source, loader)`: YAML text -> Python data, duplicate keys
            checked; the pure-Python `UniqueKeyLoader` (what experiment_from_yaml used before)
            and `YAML_LOADER` (libyaml's parser when PyYAML has it, which is the point)
  whole     `experiment_from_yaml` with the loader in use: parse, build, validate (placeholders
            in every section), i.e. what `simulator run FILE` pays before anything starts
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from simulator.experiment import (  # noqa: E402
    YAML_LOADER,
    UniqueKeyLoader,
    experiment_from_dict,
    experiment_from_yaml,
    experiment_to_dict,
    load_experiment,
    load_yaml,
    save_experiment,
)

PRISON = ROOT / "experiments" / "prison.yaml"


def grow(data: Any, repeat: int) -> Any:
    """Every longer text (sections, factor levels, rubrics) repeated `repeat` times, in
    paragraphs of three copies with lines wrapped at 90 characters, as people write `|` blocks."""
    if isinstance(data, dict):
        return {k: grow(v, repeat) for k, v in data.items()}
    if isinstance(data, str) and len(data) > 60:
        paragraph = textwrap.fill(" ".join([data] * 3), 90)
        return "\n\n".join([paragraph] * max(1, repeat // 3))
    return data


def large_experiment(target_bytes: int, folder: Path) -> Path:
    """prison.yaml grown to about `target_bytes`, written with save_experiment."""
    base = experiment_to_dict(load_experiment(PRISON))
    path = folder / "large.yaml"
    repeat, levels = 6, 10
    while True:
        data = {k: grow(v, repeat) if k in SECTION_KEYS else v for k, v in base.items()}
        setting = base["shared_sections"]["environment"]
        for f in range(1, 6):
            data["factors"][f"extra{f}"] = {
                f"level{n}": {f"shared.extra{f}": grow(f"Level {n}. {setting}", repeat)}
                for n in range(1, levels + 1)
            }
        save_experiment(experiment_from_dict(data, "large"), path)
        size = path.stat().st_size
        if size >= target_bytes:
            return path
        scale = target_bytes / size
        repeat, levels = int(repeat * scale**0.5) + 1, int(levels * scale**0.5) + 1


SECTION_KEYS = ("roles", "shared_sections", "summarizer", "factors", "scorers")


def timed(call: Any, into: list[float]) -> Any:
    start = time.perf_counter()
    result = call()
    into.append(time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=5.0, help="size of the YAML file (MB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per loader (median)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = large_experiment(int(args.mb * 1_000_000), Path(tmp))
        text = path.read_text(encoding="utf-8")
    data = load_yaml(text, "large.yaml")
    sections = sum(
        len(level) for factor in data.get("factors", {}).values() for level in factor.values()
    )
    print(f"PyYAML {yaml.__version__}, built with libyaml: {yaml.__with_libyaml__}")
    print(
        f"file: {len(text.encode()) / 1e6:.1f} MB, {text.count(chr(10))} lines, "
        f"{len(data['factors'])} factors, {sections} factor sections"
    )
    print(f"loader in use: {YAML_LOADER.__name__} (bases: {YAML_LOADER.__bases__[1].__name__})")

    pure: list[float] = []
    used: list[float] = []
    whole: list[float] = []
    for _ in range(args.repeat):
        by_pure = timed(lambda: load_yaml(text, "large.yaml", UniqueKeyLoader), pure)
        by_used = timed(lambda: load_yaml(text, "large.yaml"), used)
        timed(lambda: experiment_from_yaml(text, "large.yaml"), whole)
        assert by_pure == by_used, "the two loaders read the file differently"

    p, u, w = (statistics.median(x) for x in (pure, used, whole))
    print(f"parse, pure-Python UniqueKeyLoader : {p:7.3f} s   (runs: {_runs(pure)})")
    print(f"parse, {YAML_LOADER.__name__:<27} : {u:7.3f} s   (runs: {_runs(used)})")
    print(f"ratio pure / in use                : {p / u:7.1f} x")
    print(f"experiment_from_yaml (parse+check) : {w:7.3f} s   (runs: {_runs(whole)})")


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


if __name__ == "__main__":
    main()
