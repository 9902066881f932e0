"""Import a database written by the prototype into ours (`simulator import-legacy`).

This module is the only one that knows the prototype's documents; everything it writes goes
through Store methods. The shapes the prototype wrote (issue 9, item 23):

experiments
    _id                  ObjectId (there is no name: one is derived from the note, else the id)
    starting_message     str
    note favourite       str, bool
    creator              str
    creation_date        datetime
    llms                 [{model: "llama3:latest", temperature, top_k, top_p}]
    roles                [{name: "guard", placeholders: ["<GUARD_NUM>", ...],
                           sections: [{index, title, content, type: "Private", role}]}]
    shared_sections      [{index, title, content, type: "Shared"}]
    summarizer_sections  [{index, title, content, type: "Summarizer"}]
    placeholders         ["<AGENTS_NUM>", "<ROLES_NUM>"]
    conversation_ids     [ObjectId], in run order
conversations
    _id                       ObjectId
    n_messages                int, counting each day's starting message as a round
    days                      int
    speaker_selection_method  str (round_robin | random | auto | manual)
    starting_message          str
    llm                       {model, temperature, top_k, top_p}
    agent_combination         [["guard", 1], ["prisoner", 2]]
    creator note favourite    str, str, bool
    creation_date             datetime
    messages_ids              [ObjectId]
messages
    _id       ObjectId
    day       int, from 1
    index     int, restarting each day; 0 is the Researcher's opening
    role      str, capitalised ("Guard", "Researcher")
    speaker   str ("Guard_117", "Researcher")
    content   str; day k's opening carries the earlier days' summaries, appended as
              "\\nDay j summary:\\n <summary>" for j = 1 .. k-1

What becomes of them: section titles ("Starting prompt", "Communication rules") become section
keys (starting_prompt, communication_rules), in index order; the prototype's tags become ours
(`<GUARD_VERB_be>` -> `<GUARD_VERB_BE>`); each experiment is validated and stored as ours (one
that cannot be is reported, one line per reason, and skipped with its conversations). Its
conversations go into one completed batch (index = position in conversation_ids); their agent
messages keep day, speaker and role (lower-cased to the experiment's role), and the message
index becomes the turn. Day k's summary is recovered from a later day's opening; the last day's
was never passed on, so it is lost. Every imported experiment, batch and conversation records
its prototype `_id`, so a second run imports nothing twice (and completes an import that was
cut short). Orphans and dangling references are reported, never fatal.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pymongo
from pymongo.database import Database
from pymongo.errors import PyMongoError

from simulator import placeholders, prompts
from simulator.conversation import Agent, ConversationSpec, Message, Summary, Transcript
from simulator.errors import UserError, ValidationError
from simulator.experiment import Experiment, ModelSpec, experiment_from_dict
from simulator.grid import Grid
from simulator.store import BatchRecord, Store

log = logging.getLogger(__name__)

CHUNK = 200  # conversations read and written at a time


@dataclass
class LegacyReport:
    experiments: int = 0  # newly imported
    experiments_present: int = 0  # imported by an earlier run
    conversations: int = 0
    conversations_present: int = 0
    messages: int = 0
    summaries: int = 0  # recovered from the days' openings
    missing_last_summaries: int = 0
    incomplete: int = 0
    problems: list[str] = field(default_factory=list)  # one line each, naming the prototype id
    notes: list[str] = field(default_factory=list)  # imported, but differs from the prototype

    def lines(self) -> list[str]:
        out = [
            f"Experiments: {self.experiments} imported, {self.experiments_present} already there.",
            f"Conversations: {self.conversations} imported, {self.conversations_present} already "
            f"there; {self.messages} messages, {self.summaries} summaries recovered.",
        ]
        if self.missing_last_summaries:
            out.append(
                f"{self.missing_last_summaries} conversation(s) have no summary of their last day: "
                "the prototype only passed summaries on in the next day's starting message, so the "
                "last one was never stored."
            )
        if self.incomplete:
            out.append(
                f"{self.incomplete} conversation(s) were incomplete in the prototype's database "
                "and are stored with status `incomplete`."
            )
        out += [f"Note: {n}" for n in self.notes]
        return out + [f"Problem: {p}" for p in self.problems]


# --- connecting ------------------------------------------------------------------------------


def open_source(uri: str | None, name: str, target: Store) -> Database:
    """The prototype's database: `name` on `uri`, or on the target's server without a URI."""
    if not name:
        raise UserError("Name the prototype's database with --db NAME.")
    if uri:
        # A timeout in the URI wins; otherwise a dead server is reported in seconds, not 30.
        options: dict[str, Any] = {}
        if "serverselectiontimeoutms" not in uri.lower():
            options["serverSelectionTimeoutMS"] = 5000
        client: pymongo.MongoClient = pymongo.MongoClient(uri, **options)
        where = _redact(uri)
    else:
        client = target.server_client()
        where = "the configured server"
    try:
        client.admin.command("ping")
        names = client.list_database_names()
    except PyMongoError as e:
        raise UserError(
            f"Cannot reach the prototype's MongoDB at {where}: {_first_line(e)}. Check --uri "
            "(mongodb://user:password@host:port/ or mongodb+srv://...) and that the server runs."
        ) from None
    if name not in names:
        listed = ", ".join(n for n in names if n not in ("admin", "local", "config")) or "none"
        raise UserError(f"{where} has no database '{name}' (it has: {listed}). Check --db.")
    source = client[name]
    if target.is_own_database(source):
        raise UserError(
            f"'{name}' is the database the simulator itself uses: the prototype's data must come "
            "from another database (restore it under another name and pass that with --db)."
        )
    return source


def _redact(uri: str) -> str:
    try:
        from simulator.settings import redact_uri

        return redact_uri(uri)
    except ImportError:  # pragma: no cover - settings always ships with the package
        return re.sub(r"//[^@/]*@", "//***@", uri)


def _first_line(e: Exception) -> str:
    return str(e).split(",")[0].splitlines()[0]


# --- converting --------------------------------------------------------------------------


def _sid(value: Any) -> str:
    return str(value)


def _short(value: Any, limit: int = 40) -> str:
    """A value for a one-line problem: its type for documents and lists, else cut short."""
    if isinstance(value, dict):
        return "a document"
    if isinstance(value, list):
        return "a list"
    text = " ".join(str(value).split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _created(doc: dict) -> datetime | None:
    value = doc.get("creation_date") or doc.get("created_at")
    return value if isinstance(value, datetime) else None


def _ascii_words(text: str) -> list[str]:
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.findall(r"[A-Za-z0-9]+", plain)


def section_key(title: Any, taken: set[str]) -> str:
    """A prototype section title ("Starting prompt") as a section key here (starting_prompt)."""
    key = "_".join(_ascii_words(str(title or ""))).lower() or "section"
    if not key[0].isalpha():
        key = f"section_{key}"
    unique, n = key, 2
    while unique in taken:
        unique, n = f"{key}_{n}", n + 1
    taken.add(unique)
    return unique


def derived_name(doc: dict) -> str:
    """A name for a prototype experiment (it had none): the note's first words, else its id."""
    words = _ascii_words(str(doc.get("note") or ""))[:5]
    name = "-".join(words).lower()[:40].strip("-")
    return name or f"legacy-{_sid(doc['_id'])[:8]}"


def _sections(items: Any, where: str, problems: list[str]) -> dict[str, str]:
    """[{index, title, content, ...}] in index order -> {key: content}."""
    if not isinstance(items, list):
        if items not in (None, ""):
            problems.append(f"{where}: expected a list of sections, got {_short(items)}; ignored")
        return {}
    good = [s for s in items if isinstance(s, dict)]
    if len(good) < len(items):
        problems.append(f"{where}: {len(items) - len(good)} entry(ies) are not sections; ignored")
    good.sort(key=lambda s: _int(s.get("index"), 1 << 30))
    taken: set[str] = set()
    out: dict[str, str] = {}
    for s in good:
        content = str(s.get("content") or "").strip()
        key = section_key(s.get("title"), taken)
        if content:
            out[key] = content
    return out


def _placeholders(items: Any) -> set[str]:
    return {str(p) for p in items} if isinstance(items, list) else set()


# A closed tag as the prototype wrote them: `<GUARD_NUM>`, `<GUARD_VERB_be>`, `<AGENTS_NUM>`.
_PROTO_TAG = re.compile(r"<([A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*)>")


@dataclass
class TagMapping:
    """What became of the prototype's tags in one experiment's texts."""

    undeclared: set[str] = field(default_factory=set)  # valid here, plain text there
    verbs: set[str] = field(default_factory=set)  # verb tags: agreement differs
    literal: set[str] = field(default_factory=set)  # kept as text
    unmapped: set[str] = field(default_factory=set)  # cannot be written here


def map_tags(text: str, roles: list[str], declared: set[str], mapping: TagMapping) -> str:
    """The prototype's tags in `text` written the way this tool reads them.

    The prototype replaced exactly the tags it declared (in the role's or the experiment's
    `placeholders`, verbs in any case); any other `<...>` reached the model as written.
    """
    escape = getattr(placeholders, "escape", None)  # item 15: literal `<...>` text
    counts = dict.fromkeys(roles, 2)

    def replace(m: re.Match[str]) -> str:
        tag, body = m.group(0), m.group(1)
        parts = body.split("_")
        ours = "_".join(p.upper() for p in parts)
        if placeholders.fill(f"<{ours}>", counts) != f"<{ours}>":  # a tag of this tool
            if tag not in declared:
                mapping.undeclared.add(f"<{ours}>")
            if len(parts) >= 3 and parts[1].upper() == "VERB":
                mapping.verbs.add(f"<{ours}>")
            return f"<{ours}>"
        if not placeholders.find_invalid(tag, roles):
            return tag  # not read as a tag here either (`<b>`)
        if escape is not None:
            mapping.literal.add(tag)
            return str(escape(tag))
        mapping.unmapped.add(tag)
        return tag

    return _PROTO_TAG.sub(replace, text)


def _llm_dict(value: Any) -> dict[str, Any] | None:
    """{model, temperature, top_k, top_p} (or a bare model name) in the YAML form."""
    if isinstance(value, str) and value.strip():
        return {"model": value.strip()}
    if not isinstance(value, dict) or not isinstance(value.get("model"), str):
        return None
    out: dict[str, Any] = {"model": value["model"].strip()}
    for key in ("temperature", "top_k", "top_p"):
        if value.get(key) is not None:
            out[key] = value[key]
    return out


def _llm_key(value: dict[str, Any]) -> tuple:
    spec = ModelSpec(str(value["model"]).lower())
    return (spec.label, value.get("temperature"), value.get("top_k"), value.get("top_p"))


def experiment_definition(
    doc: dict, conversations: list[dict], problems: list[str]
) -> tuple[dict[str, Any], TagMapping]:
    """The YAML form (SPEC §1) of a prototype experiment, ready for validation.

    What cannot be taken over is appended to `problems`, one line each, naming the experiment.
    """
    where = f"experiment {_sid(doc['_id'])}"
    mapping = TagMapping()
    raw_roles = doc["roles"] if isinstance(doc.get("roles"), list) else []
    declared = _placeholders(doc.get("placeholders"))
    roles: dict[str, dict[str, Any]] = {}
    for i, raw in enumerate(raw_roles):
        name = raw.get("name") if isinstance(raw, dict) else raw
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}: roles[{i}] has no name (got {_short(name)}); left out")
            continue
        name = name.strip()
        sections = {}
        if isinstance(raw, dict):
            sections = _sections(raw.get("sections"), f"{where}: role {name}", problems)
            declared |= _placeholders(raw.get("placeholders"))
        roles[name] = {"sections": sections} if sections else {}
    if not roles:  # the prototype always stored them; fall back on the conversations' roles
        for conv in conversations:
            for role_name, _ in _combination(conv):
                roles.setdefault(role_name, {})
    names = list(roles)
    shared = _sections(doc.get("shared_sections"), f"{where}: shared_sections", problems)
    summarizer = _sections(
        doc.get("summarizer_sections"), f"{where}: summarizer_sections", problems
    )

    def mapped(sections: dict[str, str]) -> dict[str, str]:
        return {k: map_tags(v, names, declared, mapping) for k, v in sections.items()}

    for role in roles.values():
        if role.get("sections"):
            role["sections"] = mapped(role["sections"])
    starting = str(doc.get("starting_message") or "")
    if not starting:
        starting = next((str(c["starting_message"]) for c in conversations
                         if c.get("starting_message")), "")  # fmt: skip
    llms: dict[tuple, dict[str, Any]] = {}
    for item in [*(doc.get("llms") or []), *(c.get("llm") for c in conversations)]:
        llm = _llm_dict(item)
        if llm is not None:
            llms.setdefault(_llm_key(llm), llm)
    data: dict[str, Any] = {
        "name": derived_name(doc),
        "note": str(doc.get("note") or ""),
        "favourite": bool(doc.get("favourite")),
        "starting_message": map_tags(starting, names, declared, mapping),
        "llms": list(llms.values()),
        "roles": roles,
    }
    if shared:
        data["shared_sections"] = mapped(shared)
    if summarizer:
        data["summarizer"] = {"sections": mapped(summarizer)}
    return data, mapping


def _combination(doc: dict) -> list[tuple[str, int]]:
    """agent_combination: [["guard", 1], ["prisoner", 2]] (or a {role: count} mapping)."""
    raw = doc.get("agent_combination") or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    out = []
    for pair in pairs:
        try:
            role, count = pair
            out.append((str(role), int(count)))
        except (TypeError, ValueError):
            continue
    return out


SUMMARY_MARK = re.compile(r"\n[ \t]*Day (\d+) summary:[ \t]*\n?")


def split_opening(content: str) -> tuple[str, dict[int, str]]:
    """A day's starting message -> (the experiment's starting message, {day: summary}).

    The prototype appended "\\nDay k summary:\\n <summary>" for every earlier day k.
    """
    parts = SUMMARY_MARK.split(content)
    found = {int(parts[i]): parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    return parts[0], found


@dataclass
class LegacyConversation:
    """One prototype conversation converted, ready to be written."""

    legacy_id: str
    index: int
    creator: str | None
    created_at: datetime | None
    spec: ConversationSpec
    agents: list[Agent]
    transcript: Transcript
    status: str
    error: str | None = None
    last_summary_missing: bool = False
    note: str = ""
    favourite: bool = False


def _conversation_llm(exp: Experiment, doc: dict) -> ModelSpec:
    wanted = _llm_dict(doc.get("llm"))
    if wanted is None:
        return exp.llms[0]
    key = _llm_key(wanted)
    for spec in exp.llms:
        if (spec.label, spec.temperature, spec.top_k, spec.top_p) == key:
            return spec
    return exp.find_llm(wanted["model"]) or ModelSpec(wanted["model"])


def expected_messages(n_messages: Any, days: int) -> int:
    """Agent messages the prototype meant to store: each day's starting message took a round."""
    if not isinstance(n_messages, int) or n_messages <= 0:
        return 0
    return days * max(n_messages // days - 1, 0)


def convert_conversation(
    exp: Experiment, doc: dict, index: int, messages: list[dict]
) -> LegacyConversation:
    """A prototype conversation and its message documents in our terms."""
    legacy_id = _sid(doc["_id"])
    roles = {r.name.lower(): r.name for r in exp.roles}
    counts = {roles.get(r.lower(), r): n for r, n in _combination(doc)}
    days_seen = [_int(m.get("day"), 1) for m in messages]
    days = _int(doc.get("days"), max(days_seen, default=1))
    t = Transcript()
    recovered: dict[int, str] = {}
    speakers: dict[str, str] = {}

    def order(m: dict) -> tuple[int, int]:
        return (_int(m.get("day"), 1), _int(m.get("index"), 0))

    for m in sorted(messages, key=order):
        day, turn = order(m)
        content = str(m.get("content") or "")
        role_label = str(m.get("role") or "")
        if turn == 0 or role_label.lower() == "researcher":
            recovered.update(split_opening(content)[1])
            continue
        speaker = str(m.get("speaker") or "")
        if not role_label and "_" in speaker:
            role_label = speaker.split("_")[0]  # the prototype derived role from the name
        role = roles.get(role_label.lower(), role_label.lower())
        speakers.setdefault(speaker, role)
        t.messages.append(Message(day, turn, speaker, role, content, empty=not content.strip()))
    for day in range(1, days + 1):
        if recovered.get(day):
            t.summaries.append(Summary(day, recovered[day]))
    rank = {r.name: i for i, r in enumerate(exp.roles)}
    agents = []
    for speaker, role in sorted(speakers.items(), key=lambda kv: rank.get(kv[1], len(rank))):
        try:
            prompt = prompts.agent_prompt(exp, role, counts)
        except (KeyError, UserError):
            prompt = ""  # a role the experiment does not define: nothing to compose
        agents.append(Agent(speaker, role, prompt))
    expected = expected_messages(doc.get("n_messages"), days)
    on_days = {m.day for m in t.messages}
    missing_days = [d for d in range(1, days + 1) if d not in on_days]
    status, error = "completed", None
    if missing_days or len(t.messages) < expected:
        status = "incomplete"
        error = (
            f"the prototype stored {len(t.messages)} agent message(s)"
            + (f" of {expected}" if expected else "")
            + (f", none on day(s) {', '.join(map(str, missing_days))}" if missing_days else "")
        )
    spec = ConversationSpec(
        llm=_conversation_llm(exp, doc),
        messages=max(len(t.messages), expected),
        days=days,
        agents=counts,
        speaker=str(doc.get("speaker_selection_method") or "round_robin"),
        seed=0,
    )
    return LegacyConversation(
        legacy_id=legacy_id,
        index=index,
        creator=str(doc["creator"]) if doc.get("creator") else None,
        created_at=_created(doc),
        spec=spec,
        agents=agents,
        transcript=t,
        status=status,
        error=error,
        last_summary_missing=days not in {s.day for s in t.summaries},
        note=str(doc.get("note") or ""),
        favourite=bool(doc.get("favourite")),
    )


# --- importing ---------------------------------------------------------------------------


def import_legacy(store: Store, source: Database) -> LegacyReport:
    """Import every prototype experiment (and its conversations) not imported before."""
    report = LegacyReport()
    try:
        _import(store, source, report)
    except PyMongoError as e:
        raise UserError(
            f"The import stopped on a database error: {_first_line(e)}. "
            "Run the same command again: what is imported stays, the rest follows."
        ) from None
    return report


def _import(store: Store, source: Database, report: LegacyReport) -> None:
    referenced: set[str] = set()
    seen_conversations: set[str] = set()
    experiments = store.imported("experiments")
    batches = store.imported("batches")
    names: set[str] = set()
    for doc in source["experiments"].find().sort("_id", 1):
        legacy_id = _sid(doc["_id"])
        listed = doc["conversation_ids"] if isinstance(doc.get("conversation_ids"), list) else []
        ids = [_sid(i) for i in listed]
        referenced.update(ids)
        fresh = [i for i in dict.fromkeys(ids) if i not in seen_conversations]
        for i in sorted(set(ids) & seen_conversations):
            report.problems.append(
                f"conversation {i} is listed by several experiments; imported with the first."
            )
        seen_conversations.update(ids)
        docs = {_sid(d["_id"]): d for d in source["conversations"].find({"_id": {"$in": listed}})}
        for i in fresh:
            if i not in docs:
                report.problems.append(
                    f"experiment {legacy_id} lists conversation {i}, which does not exist."
                )
        first: dict[str, int] = {}
        for index, i in enumerate(ids):
            first.setdefault(i, index)  # the position in conversation_ids: stable across runs
        convs = [(first[i], docs[i]) for i in fresh if i in docs]
        exp = _experiment(store, doc, [c for _, c in convs], experiments, names, report)
        if exp is None:
            continue
        batch = _batch(store, exp, doc, [c for _, c in convs], batches)
        _conversations(store, source, exp, batch, convs, report)
        store.set_batch_status(batch.id, "completed")
    for doc in source["conversations"].find({}, {"_id": 1}):
        if _sid(doc["_id"]) not in referenced:
            report.problems.append(
                f"conversation {_sid(doc['_id'])} belongs to no experiment (orphan); not imported."
            )
    _report_orphan_messages(source, report)


def _unique_name(store: Store, name: str, legacy_id: str, names: set[str]) -> str:
    """Two prototype experiments with the same note get told apart by their id."""
    taken = names | {r.experiment.name for r in store.list_experiments(search=name)}
    if name in taken:
        name = f"{name}-{legacy_id[:8]}"
    names.add(name)
    return name


def _experiment(
    store: Store,
    doc: dict,
    convs: list[dict],
    imported: dict[str, str],
    names: set[str],
    report: LegacyReport,
) -> Experiment | None:
    legacy_id = _sid(doc["_id"])
    if legacy_id in imported:
        report.experiments_present += 1
        return store.get_experiment(imported[legacy_id])
    where = f"experiment {legacy_id}"
    problems: list[str] = []
    data, tags = experiment_definition(doc, convs, problems)
    report.problems += problems
    data["name"] = _unique_name(store, data["name"], legacy_id, names)
    problems = []
    if tags.unmapped:
        problems.append(
            f"{where}: {', '.join(sorted(tags.unmapped))} cannot be written here: not a "
            "placeholder of this tool, and this version has no escape for literal text."
        )
    try:
        exp = experiment_from_dict(data, where)
    except ValidationError as e:
        lines = [line for line in str(e).splitlines() if line.startswith(where)]
        # the unmapped tags are explained above, once
        problems += [line for line in lines if not any(t in line for t in tags.unmapped)]
    if problems:
        report.problems += problems
        report.problems.append(
            f"{where} is not valid here; skipped with its {len(convs)} conversation(s)."
        )
        return None
    if tags.undeclared:
        report.notes.append(
            f"{where} ('{exp.name}'): {', '.join(sorted(tags.undeclared))} were not declared "
            "placeholders in the prototype (the model read them as written); here they are "
            "filled in."
        )
    if tags.verbs:
        report.notes.append(
            f"{where} ('{exp.name}'): verb tags ({', '.join(sorted(tags.verbs))}) now agree "
            "with the number of agents (one guard is, several are); the prototype reversed them."
        )
    if tags.literal:
        report.notes.append(
            f"{where} ('{exp.name}'): {', '.join(sorted(tags.literal))} are not placeholders "
            "here and are kept as literal text."
        )
    creator = str(doc.get("creator") or store.user)
    exp = store.as_user(creator).insert_experiment(exp)
    assert exp.id is not None
    store.mark_imported("experiments", exp.id, legacy_id, created_at=_created(doc))
    report.experiments += 1
    return exp


def _batch(
    store: Store, exp: Experiment, doc: dict, convs: list[dict], imported: dict[str, str]
) -> BatchRecord:
    """The one batch holding a prototype experiment's conversations (created once)."""
    legacy_id = _sid(doc["_id"])
    if legacy_id in imported:
        return store.get_batch(imported[legacy_id])
    llms: dict[str, ModelSpec] = {}
    agents: dict[str, int] = {r.name: 0 for r in exp.roles}
    days, speakers, combos = set(), [], set()
    messages = 2
    for c in convs:
        spec = _conversation_llm(exp, c)
        llms.setdefault(spec.label, spec)
        n_days = _int(c.get("days"), 1)
        days.add(n_days)
        messages = max(messages, expected_messages(c.get("n_messages"), n_days))
        method = str(c.get("speaker_selection_method") or "round_robin")
        if method not in speakers:
            speakers.append(method)
        combo = {r.lower(): n for r, n in _combination(c)}
        combos.add(tuple(sorted(combo.items())))
        for role in agents:
            agents[role] = max(agents[role], combo.get(role.lower(), 0))
    grid = Grid(
        llms=list(llms.values()) or [exp.llms[0]],
        messages=messages,
        days=max(days, default=1),
        agents=agents,
        speakers=speakers or ["round_robin"],
        every_day=len(days) > 1,
        every_combination=len(combos) > 1,
    )
    creator = exp.creator or store.user
    batch = store.as_user(creator).create_batch(exp, grid)
    # The prototype's conversations are not a full grid: the batch holds exactly them.
    store.mark_imported("batches", batch.id, legacy_id, created_at=_created(doc), total=len(convs))
    return store.get_batch(batch.id)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _conversations(
    store: Store,
    source: Database,
    exp: Experiment,
    batch: BatchRecord,
    convs: list[tuple[int, dict]],
    report: LegacyReport,
) -> None:
    existing = {r.index: r for r in store.list_conversations(batch_id=batch.id)}
    todo = []
    for index, doc in convs:
        done = existing.get(index)
        if done is not None and done.status != "pending":
            report.conversations_present += 1
        else:
            todo.append((index, doc))
    for chunk in _chunks(todo, CHUNK):
        ids = [m for _, doc in chunk for m in _message_ids(doc)]
        found = {_sid(m["_id"]): m for m in source["messages"].find({"_id": {"$in": ids}})}
        converted: list[LegacyConversation] = []
        for index, doc in chunk:
            wanted = [_sid(i) for i in _message_ids(doc)]
            dangling = [i for i in wanted if i not in found]
            if dangling:
                report.problems.append(
                    f"conversation {_sid(doc['_id'])} lists {len(dangling)} message(s) that do "
                    f"not exist (e.g. {dangling[0]})."
                )
            messages = [found[i] for i in wanted if i in found]
            converted.append(convert_conversation(exp, doc, index, messages))
        _write(store, exp, batch, converted, report)


def _message_ids(doc: dict) -> list:
    ids = doc.get("messages_ids")
    return ids if isinstance(ids, list) else []


def _write(
    store: Store,
    exp: Experiment,
    batch: BatchRecord,
    converted: list[LegacyConversation],
    report: LegacyReport,
) -> None:
    by_creator: dict[str, list[LegacyConversation]] = {}
    for c in converted:
        by_creator.setdefault(str(c.creator or exp.creator or store.user), []).append(c)
    for creator, group in by_creator.items():
        summarizer = prompts.summarizer_prompt
        store.as_user(creator).prepare_conversations(
            batch,
            exp,
            ((c.index, c.spec, c.agents, summarizer(exp, c.spec.agents)) for c in group),
        )
    ours = {r.index: r.id for r in store.list_conversations(batch_id=batch.id)}
    for c in converted:
        conv_id = ours[c.index]
        for m in c.transcript.messages:
            store.insert_message(conv_id, m, batch.id)
        for s in c.transcript.summaries:
            store.insert_summary(conv_id, s, batch.id)
        store.mark_imported(
            "conversations", conv_id, c.legacy_id, created_at=c.created_at, note=c.note
        )
        if c.favourite:
            creator = str(c.creator or exp.creator or store.user)
            store.as_user(creator).set_conversation_favourite(conv_id, True)
        store.finish_conversation(conv_id, c.status, c.transcript, c.error)
        report.conversations += 1
        report.messages += len(c.transcript.messages)
        report.summaries += len(c.transcript.summaries)
        report.missing_last_summaries += c.last_summary_missing
        report.incomplete += c.status == "incomplete"


def _report_orphan_messages(source: Database, report: LegacyReport) -> None:
    referenced: set[str] = set()
    for doc in source["conversations"].find({}, {"messages_ids": 1}):
        referenced.update(_sid(i) for i in _message_ids(doc))
    orphans = [
        _sid(d["_id"]) for d in source["messages"].find({}, {"_id": 1})
        if _sid(d["_id"]) not in referenced
    ]  # fmt: skip
    if orphans:
        report.problems.append(
            f"{len(orphans)} message(s) belong to no conversation (orphans, e.g. {orphans[0]}); "
            "not imported."
        )
