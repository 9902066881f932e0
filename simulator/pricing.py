"""Prices of LLM calls, for `--max-cost` (and cost estimates).

No price is shipped as fact: the user sets them, per model, in USD (or any currency) per
1M tokens, prompt/completion, in the setting SIMULATOR_PRICES (environment or .env):

    SIMULATOR_PRICES="gpt-4o-mini=0.15/0.60; llama3.1:8b=0/0; openai/gpt-4o=2.5/10"

A model is looked up by its label (`provider/model`, as the experiment's `llm` entry shows
it), then by its model name alone. A model with no price makes `--max-cost` refuse to start
(a budget that cannot be computed would never stop anything).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from simulator.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from simulator.experiment import Experiment


@dataclass(frozen=True)
class Price:
    """Price per 1M tokens."""

    prompt: float
    completion: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1_000_000


FORMAT = "MODEL=PROMPT/COMPLETION per 1M tokens, separated by ';' (e.g. gpt-4o-mini=0.15/0.60)"


def parse_prices(text: str | None) -> dict[str, Price]:
    """SIMULATOR_PRICES: {model label or name: Price}."""
    prices: dict[str, Price] = {}
    for item in (text or "").replace("\n", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        name, sep, values = item.rpartition("=")
        prompt, slash, completion = values.partition("/")
        try:
            price = Price(float(prompt), float(completion))
        except ValueError:
            price = None
        if not sep or not name.strip() or not slash or price is None:
            raise UserError(f"SIMULATOR_PRICES: cannot read {item!r}; write {FORMAT}.")
        if not all(math.isfinite(v) and v >= 0 for v in (price.prompt, price.completion)):
            raise UserError(f"SIMULATOR_PRICES: {item!r} needs two prices of 0 or more.")
        prices[name.strip()] = price
    return prices


class _Usage(Protocol):
    """What batch_cost reads: Store.batch_usage_by_model (a protocol, so that the store may
    import from modules that price things without a cycle)."""

    def batch_usage_by_model(
        self, batch_id: str, exp: Experiment
    ) -> Iterable[tuple[str, str, int, int]]: ...


class _Model(Protocol):
    model: str

    @property
    def label(self) -> str: ...


def price_for(model: _Model | str, prices: dict[str, Price]) -> Price | None:
    """The price of a model: by its label (provider/model), else by its model name."""
    if isinstance(model, str):
        return prices.get(model) or prices.get(model.split("/", 1)[-1])
    return prices.get(model.label) or prices.get(model.model)


def require_prices(models: Sequence[_Model], prices: dict[str, Price]) -> None:
    """Refuse a budget in money when a model the batch calls has no price."""
    missing = [m.label for m in models if price_for(m, prices) is None]
    if missing:
        raise UserError(
            f"--max-cost needs the price of {', '.join(missing)}: set SIMULATOR_PRICES "
            f"(in the environment or .env) as {FORMAT}."
        )


def batch_cost(store: _Usage, batch_id: str, exp: Experiment, prices: dict[str, Price]) -> float:
    """The cost of what a batch has stored so far, from the usage of its records."""
    total = 0.0
    for _kind, label, prompt_tokens, completion_tokens in store.batch_usage_by_model(batch_id, exp):
        price = price_for(label, prices)
        if price is not None:
            total += price.cost(prompt_tokens, completion_tokens)
    return total
