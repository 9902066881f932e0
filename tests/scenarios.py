"""The shipped prison experiment reduced to one of its 72 scenarios (the first level of every
factor, factors removed), for the tests about something other than factors: their grids stay
the size they count on, while the text is still the shipped one."""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from simulator.experiment import apply_levels, load_experiment, save_experiment

SHIPPED_PRISON = Path(__file__).resolve().parent.parent / "experiments" / "prison.yaml"


def one_scenario(path: Path = SHIPPED_PRISON) -> Path:
    """A YAML file (written once per process) holding `path`'s first scenario, no factors."""
    exp = load_experiment(path)
    first = {name: levels[0] for name, levels in exp.factor_levels().items()}
    flat = replace(apply_levels(exp, first), factors=[])
    folder = Path(tempfile.gettempdir()) / f"simulator-tests-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    out = folder / path.name
    save_experiment(flat, out)
    return out


PRISON_ONE = one_scenario()
