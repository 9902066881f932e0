"""`--where KEY=VALUE` conditions on conversations, as MongoDB queries."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from simulator.errors import UserError

# --where KEY=VALUE on conversations: key -> (document field, type). `agents_<role>` too.
CONVERSATION_FILTERS: dict[str, tuple[str, type]] = {
    "llm": ("llm", str),
    "days": ("days", int),
    "messages": ("messages", int),
    "speaker": ("speaker_selection", str),
    "speaker_selection": ("speaker_selection", str),  # as the export's column is named
    "status": ("status", str),
    "repetition": ("repetition", int),
    "creator": ("creator", str),
    "usable": ("usable", bool),
}
STATUSES = ("pending", "running", "interrupted", "failed", "completed")


def conversation_filter(
    where: dict[str, str], factors: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """A MongoDB query for `--where` conditions; a clear UserError for a bad key or value.

    `factors` (name -> levels, from the experiment) lets NAME or factor_NAME filter by a
    factor's level; the built-in conditions come first."""
    query: dict[str, Any] = {}
    factors = factors or {}
    for key, value in where.items():
        key, value = key.strip(), str(value).strip()
        kind: type
        factor = key[len("factor_") :] if key.startswith("factor_") else key
        if key.startswith("agents_") and re.fullmatch(r"agents_[A-Za-z0-9]+", key):
            field, kind = f"agents_per_role.{key[len('agents_') :]}", int
        elif key in CONVERSATION_FILTERS:
            field, kind = CONVERSATION_FILTERS[key]
        elif factor in factors:
            if value not in factors[factor]:
                raise UserError(
                    f"--where {key}={value}: factor '{factor}' has no level '{value}'; its "
                    f"levels: {', '.join(factors[factor])}."
                )
            query[f"factors.{factor}"] = value
            continue
        else:
            valid = ", ".join(
                [*CONVERSATION_FILTERS, "agents_<role> (e.g. agents_guard)", *factors]
            )
            raise UserError(f"--where {key}=...: unknown key '{key}'. Filter by one of: {valid}.")
        if kind is bool:
            if value.lower() not in ("true", "false", "yes", "no"):
                raise UserError(f"--where {key}={value}: {key} is true or false, e.g. {key}=false.")
            # Only completed conversations have a verdict: usable=false never lists a
            # pending or failed one (filter those with status=...).
            query[field] = value.lower() in ("true", "yes")
        elif kind is int:
            if not re.fullmatch(r"-?\d+", value):
                raise UserError(f"--where {key}={value}: {key} is a whole number, e.g. {key}=2.")
            query[field] = int(value)
        elif key == "llm":
            # the label (provider/model), the model, or an Ollama model without its tag
            query["$or"] = [
                {"llm.label": value},
                {"llm.model": value},
                {"llm.model": f"{value}:latest"},
            ]
        elif key == "status" and value not in STATUSES:
            raise UserError(f"--where status={value}: a status is one of {', '.join(STATUSES)}.")
        else:
            query[field] = value
    return query


def _matches(doc: dict, query: dict[str, Any]) -> bool:
    """Whether a document meets a conversation_filter query (equalities and one `$or`)."""
    for key, wanted in query.items():
        if key == "$or":
            if not any(_matches(doc, q) for q in wanted):
                return False
            continue
        value: Any = doc
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value != wanted:
            return False
    return True


def parse_where(items: Iterable[str]) -> dict[str, str]:
    """`--where KEY=VALUE` options (repeatable) as a dict; a clear error for a malformed one."""
    where: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(
                f"--where {item!r}: write KEY=VALUE, e.g. --where status=failed or "
                "--where agents_guard=2."
            )
        where[key.strip()] = value.strip()
    return where
