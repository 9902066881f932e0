"""Parse time of a large experiment YAML: PyYAML's pure-Python loader vs the one in use.

    python bench/yaml_parse.py                 # a ~5 MB experiment, 3 runs per loader
    python bench/yaml_parse.py --mb 10 --repeat 5
    python bench/yaml_parse.py --shape levels --mb 2   # thousands of short factor levels

The file is experiments/prison.yaml grown the way a lab's files grow, written by the
project's own `save_experiment` (so with the block and folded scalars of an exported
experiment) in a temporary directory:
  sections  (default) every section's text repeated into long multi-paragraph prompts, and
            extra factors with a few dozen levels, each setting a long shared section
  levels    the prompts as they are, and thousands of factor levels, each setting two
            one-sentence sections: many small nodes, where libyaml helps less (its parser is
            C, but the resolver, which types each plain scalar, and the constructor are Python)

Figures (seconds, the median of --repeat runs, the ways alternated so all see the same load):
  before    `yaml.load(text, Loader=UniqueKeyLoader)`: PyYAML's pure-Python loader with the
            duplicate-key check, as experiment_from_yaml parsed before
  alone     `yaml.load(text, Loader=YAML_LOADER)`: libyaml's parser when PyYAML has it
  now       `load_yaml(text, source)`: the same, with the garbage collector paused meanwhile
            (what experiment_from_yaml and the scorers files use)
  whole     `experiment_from_yaml`: parse, build, validate (placeholders in every section),
            i.e. what `simulator run FILE` pays before anything starts
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


def large_experiment(target_bytes: int, folder: Path, shape: str) -> Path:
    """prison.yaml grown to about `target_bytes`, written with save_experiment.

    `sections`: long prompts and a few dozen levels; `levels`: the prompts as they are and
    thousands of factor levels, each setting two one-sentence sections (many small mappings).
    """
    base = experiment_to_dict(load_experiment(PRISON))
    setting = base["shared_sections"]["environment"]
    path = folder / "large.yaml"
    repeat, levels = (6, 10) if shape == "sections" else (0, 100)
    while True:
        data = {k: grow(v, repeat) if k in SECTION_KEYS else v for k, v in base.items()}
        for f in range(1, 6):
            data["factors"][f"extra{f}"] = {
                f"level{n}": (
                    {f"shared.extra{f}": grow(f"Level {n}. {setting}", repeat)}
                    if shape == "sections"
                    else {
                        f"shared.extra{f}": f"Rule {n} of {f}: the <GUARD_NOUN> keep the keys.",
                        f"guard.rule{f}": f"Under rule {n}, you may refuse any request.",
                    }
                )
                for n in range(1, levels + 1)
            }
        save_experiment(experiment_from_dict(data, "large"), path)
        size = path.stat().st_size
        if size >= target_bytes:
            return path
        scale = target_bytes / size
        if shape == "sections":
            repeat, levels = int(repeat * scale**0.5) + 1, int(levels * scale**0.5) + 1
        else:
            levels = int(levels * scale) + 1


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
    parser.add_argument(
        "--shape",
        choices=["sections", "levels"],
        default="sections",
        help="long sections (default), or thousands of short factor levels",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = large_experiment(int(args.mb * 1_000_000), Path(tmp), args.shape)
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

    before: list[float] = []
    c_only: list[float] = []
    now: list[float] = []
    whole: list[float] = []
    for _ in range(args.repeat):
        by_pure = timed(lambda: yaml.load(text, Loader=UniqueKeyLoader), before)
        timed(lambda: yaml.load(text, Loader=YAML_LOADER), c_only)
        by_now = timed(lambda: load_yaml(text, "large.yaml"), now)
        timed(lambda: experiment_from_yaml(text, "large.yaml"), whole)
        assert by_pure == by_now, "the two loaders read the file differently"

    b, n = statistics.median(before), statistics.median(now)
    rows = [
        ("before: pure-Python loader", _median(before)),
        (f"alone: {YAML_LOADER.__name__}", _median(c_only)),
        ("now: load_yaml (GC paused)", _median(now)),
        ("ratio before / now", f"{b / n:7.1f} x"),
        ("whole: experiment_from_yaml", _median(whole)),
    ]
    for label, figure in rows:
        print(f"{label:<30} {figure}")


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):7.3f} s   (runs: {_runs(values)})"


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


if __name__ == "__main__":
    main()
