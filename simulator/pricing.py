"""Prices per model, from the user's settings (none shipped as fact): USD per million tokens.

One setting per model, in the environment or `.env`:
    SIMULATOR_PRICE_<MODEL>=<prompt>,<completion>
<MODEL> is the model name in capitals with every other character than a letter or digit
as `_`: gpt-4o-mini -> SIMULATOR_PRICE_GPT_4O_MINI=0.15,0.60; an Ollama model's `:latest`
may be left out (llama3:latest -> SIMULATOR_PRICE_LLAMA3 or SIMULATOR_PRICE_LLAMA3_LATEST).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from simulator.errors import UserError

PREFIX = "SIMULATOR_PRICE_"


@dataclass(frozen=True)
class Price:
    """USD per million prompt (input) and completion (output) tokens."""

    prompt: float
    completion: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


def price_variables(model: str) -> list[str]:
    """The settings that may hold the price of `model`, the most specific first."""
    names = [model]
    if model.endswith(":latest"):
        names.append(model[: -len(":latest")])
    return [PREFIX + re.sub(r"[^A-Za-z0-9]", "_", n).upper() for n in names]


def price_for(model: str) -> Price | None:
    """The price of `model` (its name, e.g. "gpt-4o-mini"), or None when none is set."""
    from simulator.settings import read_dotenv

    dotenv: dict[str, str] | None = None
    for variable in price_variables(model):
        value = os.environ.get(variable)
        if value is None:
            dotenv = read_dotenv() if dotenv is None else dotenv
            value = dotenv.get(variable)
        if value is not None:
            return _parse(variable, value)
    return None


def _parse(variable: str, value: str) -> Price:
    parts = [p.strip() for p in value.split(",")]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 2 or not all(math.isfinite(n) and n >= 0 for n in numbers):
        raise UserError(
            f"{variable} must be two numbers, the USD price per million prompt tokens and per "
            f"million completion tokens, e.g. {variable}=0.15,0.60 (got {value!r})."
        )
    return Price(prompt=numbers[0], completion=numbers[1])
