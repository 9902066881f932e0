"""MongoDB documents to and from the store's records: ids, times, and one converter per shape."""

from __future__ import annotations

import dataclasses
import secrets
from datetime import datetime, timezone
from typing import Any

from simulator.conversation import Agent, ConversationSpec, Message, Summary, Usage
from simulator.experiment import Experiment, ModelSpec, experiment_to_dict
from simulator.grid import Grid
from simulator.quality import Quality
from simulator.status import BatchStatus, ConversationStatus
from simulator.store.records import (
    LEASE_SECONDS,
    AnnotationSheet,
    BatchRecord,
    BatchTally,
    BatchTotals,
    ConversationRecord,
    LeaseHolder,
    Score,
)


def new_id() -> str:
    """12 random hex digits: short to type, and any few leading digits make a usable prefix.

    Never one that reads as a number (`123456789012`, `12e456789012`): pandas and
    spreadsheets would turn it into one in an export.
    """
    while True:
        candidate = secrets.token_hex(6)
        try:
            float(candidate)
        except ValueError:
            return candidate


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 conversation', '2 conversations', '1,204 messages' ('1 retry', '3 retries')."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {nouns or noun + 's'}"


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _model_to_doc(spec: ModelSpec) -> dict[str, Any]:
    doc = dataclasses.asdict(spec)
    doc["label"] = spec.label
    doc["sampling"] = spec.sampling()
    return doc


def _model_from_doc(doc: dict[str, Any]) -> ModelSpec:
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    return ModelSpec(**{k: v for k, v in doc.items() if k in fields})


def _usage_doc(u: Usage) -> dict[str, Any]:
    return dataclasses.asdict(u)


def _usage(doc: dict[str, Any] | None) -> Usage:
    doc = doc or {}
    return Usage(**{f.name: doc.get(f.name, 0) for f in dataclasses.fields(Usage)})


def _definition(exp: Experiment) -> dict:
    d = experiment_to_dict(exp)
    for key in ("note", "favourite"):
        d.pop(key, None)  # kept top level: they change without changing the definition
    return d


def _grid_doc(grid: Grid) -> dict:
    return {
        "llms": [_model_to_doc(m) for m in grid.llms],
        "messages": grid.messages,
        "days": grid.days,
        "agents": dict(grid.agents),
        "speakers": list(grid.speakers),
        "every_day": grid.every_day,
        "every_combination": grid.every_combination,
        "repetitions": grid.repetitions,
        "seed": grid.seed,
        # a list, so the factors' order survives any server
        "factors": [{"name": n, "levels": list(levels)} for n, levels in grid.factors.items()],
    }


def _batch(doc: dict) -> BatchRecord:
    g = doc["grid"]
    grid = Grid(
        llms=[_model_from_doc(m) for m in g["llms"]],
        messages=g["messages"],
        days=g["days"],
        agents=dict(g["agents"]),
        speakers=list(g["speakers"]),
        every_day=g["every_day"],
        every_combination=g["every_combination"],
        repetitions=g["repetitions"],
        seed=g["seed"],
        factors={f["name"]: list(f["levels"]) for f in g.get("factors", [])},
    )
    return BatchRecord(
        id=doc["_id"],
        experiment_id=doc["experiment_id"],
        grid=grid,
        total=doc["total"],
        status=BatchStatus(doc["status"]),
        creator=doc["creator"],
        created_at=doc["created_at"],
        prepared=bool(doc.get("prepared")),
        finished_at=doc.get("finished_at"),
        error=doc.get("error"),
        elapsed=float(doc.get("elapsed") or 0.0),
        holder=_holder(doc.get("runner")),
        tally=_tally(doc.get("tally")),
        workers=_workers(doc.get("workers")) if "workers" in doc else None,
    )


def _workers(doc: Any) -> list[LeaseHolder]:
    held = (_holder(w) for w in (doc.values() if isinstance(doc, dict) else ()))
    return [h for h in held if h is not None]


def _holder(doc: Any) -> LeaseHolder | None:
    if not isinstance(doc, dict):
        return None
    beat = doc.get("heartbeat")
    return LeaseHolder(
        host=str(doc.get("host", "")),
        pid=int(doc.get("pid") or 0),
        heartbeat=_utc(beat) if isinstance(beat, datetime) else None,
        seconds=float(doc.get("seconds") or LEASE_SECONDS),
        token=doc.get("token"),
    )


TALLY_RELEASED = "released"
TALLY_CHECKED = "checked:"
_TALLY_USAGE = ("prompt_tokens", "completion_tokens", "retries", "calls")


def _tally_doc(tally: BatchTally, owner: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"owner": owner, "counts": dict(tally.counts)}
    doc["messages"] = tally.totals.messages
    for k in _TALLY_USAGE:
        doc[k] = getattr(tally.totals, k)
    return doc


def _tally(doc: Any) -> BatchTally | None:
    if not isinstance(doc, dict) or not doc.get("owner"):
        return None
    totals = BatchTotals(messages=int(doc.get("messages") or 0))
    for k in _TALLY_USAGE:
        setattr(totals, k, int(doc.get(k) or 0))
    counts = {str(k): int(v) for k, v in (doc.get("counts") or {}).items() if v}
    return BatchTally(counts, totals, str(doc["owner"]))


def _batch_size(doc: dict) -> int:
    """Conversations a batch holds: as its kept totals count them, else its grid's size."""
    counts = (doc.get("tally") or {}).get("counts")
    return sum(counts.values()) if counts else int(doc.get("total") or 0)


def favourited_by(doc: dict) -> list[str]:
    """Who starred an experiment or conversation. Before stars were per person a document had
    one boolean `favourite`, set by its creator (the only one allowed): it is the creator's."""
    if "favourited_by" in doc:
        return list(doc["favourited_by"] or [])
    return [doc["creator"]] if doc.get("favourite") and doc.get("creator") else []


def _conversation(doc: dict) -> ConversationRecord:
    spec = ConversationSpec(
        llm=_model_from_doc(doc["llm"]),
        messages=doc["messages"],
        days=doc["days"],
        agents=dict(doc["agents_per_role"]),
        speaker=doc["speaker_selection"],
        seed=doc["seed"],
        repetition=doc.get("repetition", 0),
        factors=dict(doc.get("factors") or {}),
    )
    return ConversationRecord(
        id=doc["_id"],
        experiment_id=doc["experiment_id"],
        batch_id=doc.get("batch_id"),
        index=doc.get("index", 0),
        spec=spec,
        agents=[
            Agent(a["name"], a["role"], a.get("system_prompt", "")) for a in doc.get("agents", [])
        ],
        summarizer_prompt=doc.get("summarizer_prompt", ""),
        status=ConversationStatus(doc["status"]),
        creator=doc.get("creator", ""),
        created_at=doc["created_at"],
        error=doc.get("error"),
        started_at=doc.get("started_at"),
        finished_at=doc.get("finished_at"),
        usage={k: _usage(v) for k, v in (doc.get("usage") or {}).items()},
        fallbacks=doc.get("fallbacks", 0),
        favourited_by=favourited_by(doc),
        note=doc.get("note", ""),
        quality=_quality(doc.get("quality")),
    )


def _quality(doc: Any) -> Quality | None:
    if not isinstance(doc, dict):
        return None
    names = {f.name for f in dataclasses.fields(Quality)}
    return Quality(**{k: v for k, v in doc.items() if k in names})


def _message(d: dict) -> Message:
    return Message(
        day=d["day"],
        turn=d["turn"],
        speaker=d["speaker"],
        role=d["role"],
        content=d["content"],
        raw=d.get("raw"),
        empty=bool(d.get("empty")),
        usage=_usage(d.get("usage")),
        finish_reason=d.get("finish_reason"),
        # Messages stored before flags existed: only `empty` is known.
        flags=list(d["flags"]) if "flags" in d else (["empty"] if d.get("empty") else []),
    )


def _summary(d: dict) -> Summary:
    return Summary(
        d["day"],
        d["content"],
        _usage(d.get("usage")),
        finish_reason=d.get("finish_reason"),
        flags=list(d["flags"]) if "flags" in d else ([] if d["content"] else ["empty"]),
    )


def _score_doc(score: Score, user: str) -> dict[str, Any]:
    doc = dataclasses.asdict(score)
    doc["usage"] = _usage_doc(score.usage)
    doc["creator"] = score.creator or user
    doc["created_at"] = score.created_at or now()
    return doc


def _score(doc: dict) -> Score:
    names = {f.name for f in dataclasses.fields(Score)}
    values = {k: v for k, v in doc.items() if k in names}
    values["usage"] = _usage(doc.get("usage"))
    return Score(**values)


def _sheet(doc: dict) -> AnnotationSheet:
    return AnnotationSheet(
        id=doc["_id"],
        experiment_id=doc["experiment_id"],
        scorer=doc["scorer"],
        version=doc["version"],
        annotator=doc["annotator"],
        definition=doc.get("definition") or {},
        items={k: (v[0], v[1], int(v[2]), v[3], v[4]) for k, v in doc["items"].items()},
        creator=doc.get("creator", ""),
        created_at=doc.get("created_at"),
    )
