"""Experiments: storing, finding, listing, changing and deleting them."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from simulator.errors import NotFoundError, PermissionDenied
from simulator.experiment import Experiment, experiment_from_dict
from simulator.store.batches import Batches
from simulator.store.conversations import Conversations
from simulator.store.documents import _batch_size, _definition, favourited_by, new_id, plural
from simulator.store.records import Deleted, DeletePlan, ExperimentRow

_NAMED_LIMIT = 50  # experiments of one name looked at (the notices list a few)
_LIST_EXPERIMENTS = "List them with `simulator experiment list`."


@dataclass(frozen=True)
class ExperimentName:
    """One of the experiments a name names: what tells them apart."""

    id: str
    name: str
    creator: str | None
    created_at: datetime | None


@dataclass
class _Match:
    """The experiment a reference resolved to."""

    doc: dict
    by_name: bool = False
    others: int = 0  # more experiments of that name
    notice: str | None = None  # to tell the user: which of several was taken


@dataclass
class _Miss:
    """A reference that names no experiment, or several (`ambiguous`)."""

    message: str
    ambiguous: bool = False


class Experiments(Batches, Conversations):
    """Experiments, and the legacy import's bookkeeping."""

    # Told the notices of references (which of several experiments a shared name stood
    # for); the command line prints them on stderr. None: nobody is told.
    on_notice: Callable[[str], None] | None = None

    def insert_experiment(self, exp: Experiment, *, parent_id: str | None = None) -> Experiment:
        doc = {
            "_id": new_id(),
            "name": exp.name,
            "note": exp.note,
            "favourited_by": [self.user] if exp.favourite else [],
            "creator": self.user,
            # to the millisecond (what MongoDB keeps): "newest" of one name must be decided
            # between experiments made in the same second, as `run FILE --new` does
            "created_at": _now_ms(),
            "parent_id": parent_id,
            "definition": _definition(exp),
        }
        self._experiments.insert_one(doc)
        return self._experiment(doc)

    def get_experiment(self, ref: str) -> Experiment:
        """The experiment `ref` names: its id, a unique id prefix, or its name (see
        `_experiment_doc` for the rules every command shares)."""
        return self._experiment(self._experiment_doc(ref))

    def experiments_named(self, name: str) -> list[ExperimentName]:
        """The experiments called exactly `name` (anyone's): the one the name stands for
        first (the current user's newest, else the newest), then the current user's, newest
        first, then everyone else's."""
        docs = list(
            self._experiments.find(
                {"name": name}, {"name": 1, "creator": 1, "created_at": 1}
            ).limit(_NAMED_LIMIT)
        )
        docs.sort(key=lambda d: (d.get("creator") == self.user, _when(d), d["_id"]), reverse=True)
        return [
            ExperimentName(d["_id"], str(d.get("name")), d.get("creator"), d.get("created_at"))
            for d in docs
        ]

    def shared_name_notice(self, name: str, exp_id: str | None = None) -> str | None:
        """What to tell the user who stored experiment `exp_id` (None: is about to store one)
        called `name` when that name also names other experiments (anyone's): which ones,
        and which one the name stands for."""
        named = self.experiments_named(name)
        others = [n for n in named if n.id != exp_id]
        if not others:
            return None
        if exp_id is None:
            return (
                f"'{name}' already names {_listing(others, self.user)}. Saved under this "
                f"name, the new one is what commands given '{name}' use (yours, newest), "
                "and they say so; the others are then reached by id."
            )
        chosen = named[0]
        means = "now means this one" if chosen.id == exp_id else "still means"
        return (
            f"'{name}' also names {_listing(others, self.user)}. Commands given the name "
            f"{means}, {_short(chosen.id)} ({_whose(chosen, self.user, named)}), and say so; "
            "give an id to choose another."
        )

    def _experiment_doc(self, ref: str, *, action: str | None = None) -> dict:
        """The stored experiment `ref` names, by the rules every command shares:

        - a whole id is that experiment;
        - a name is the experiment of that name; a name several experiments share stands for
          the current user's newest of them (else the newest), and a notice says which one was
          taken and lists the others (once per name and Store, through `on_notice`);
        - otherwise a unique id prefix;
        - a name that also starts the id of another experiment (a hexadecimal name such as
          `cafe`) is refused, listing both: neither reading silently wins.

        `action` ("delete"): an irreversible change, refused for a name several experiments
        share (the id is asked for instead).
        """
        match = self._match_experiment(ref)
        if isinstance(match, _Miss):
            raise NotFoundError(f"{match.message} {_LIST_EXPERIMENTS}")
        if match.others and action:
            raise NotFoundError(
                f"'{ref.strip()}' names {match.others + 1} experiments: "
                f"{_listing(self.experiments_named(ref.strip()), self.user, word=False)}. "
                f"Give the id of the one to {action}."
            )
        return self._told(match)

    def _told(self, match: _Match) -> dict:
        """The matched document, after telling its notice (once per Store)."""
        if match.notice and match.notice not in self._notices_given:
            self._notices_given.add(match.notice)
            if self.on_notice is not None:
                self.on_notice(match.notice)
        return match.doc

    def _match_experiment(self, ref: str) -> _Match | _Miss:
        ref = ref.strip()
        if not ref:
            return _Miss("No experiment given: give its id, a unique id prefix or its name.")
        hexadecimal = bool(re.fullmatch(r"[0-9a-fA-F]{1,24}", ref))
        by_id: list[dict] = []
        if hexadecimal:
            # A range rather than a regex: it walks the _id index from the prefix on. Ids are
            # lowercase hexadecimal, and "g" sorts after every hex digit.
            prefix = ref.lower()
            by_id = list(
                self._experiments.find({"_id": {"$gte": prefix, "$lt": prefix + "g"}})
                .sort("_id", 1)
                .limit(3)
            )
            whole = next((d for d in by_id if d["_id"] == prefix), None)
            if whole is not None:
                return _Match(whole)
        named = self.experiments_named(ref)
        if named and any(d["_id"] != named[0].id for d in by_id):
            ids = ", ".join(
                f"{d['_id']} ('{d.get('name')}', {_who(d.get('creator'), self.user)})"
                for d in by_id[:2]
            )
            return _Miss(
                # "more than one": what export.select looks for to pass a message on
                f"'{ref}' could mean more than one experiment: it is the name of "
                f"{_listing(named, self.user)} and "
                f"starts the id of {ids}{', ...' if len(by_id) > 2 else ''}. Give the whole id "
                "of the experiment you mean.",
                ambiguous=True,
            )
        if named:
            chosen, others = named[0], named[1:]
            doc = self._experiments.find_one({"_id": chosen.id})
            if doc is None:  # deleted meanwhile: look again
                return self._match_experiment(ref)
            notice = None
            if others:
                notice = (
                    f"'{ref}' names {len(named)} experiments; using {_short(chosen.id)} "
                    f"({_whose(chosen, self.user, named)}); the others: "
                    f"{_listing(others, self.user, word=False)} — give an id to choose."
                )
            return _Match(doc, by_name=True, others=len(others), notice=notice)
        if len(by_id) == 1:
            return _Match(by_id[0])
        if by_id:
            ids = ", ".join(d["_id"] for d in by_id[:2])
            return _Miss(
                f"'{ref}' matches more than one experiment ({ids}"
                f"{', ...' if len(by_id) > 2 else ''}): type more characters of the id.",
                ambiguous=True,
            )
        similar = self._experiments.find_one(
            {"name": {"$regex": f"^{re.escape(ref)}$", "$options": "i"}}, {"name": 1}
        )
        hint = f" (names are case-sensitive: did you mean '{similar['name']}'?)" if similar else ""
        if hexadecimal:
            return _Miss(f"No experiment is named '{ref}'{hint} or has an id starting with it.")
        return _Miss(
            f"No experiment is named '{ref}'{hint}, and it is not an id: ids are hexadecimal, "
            "e.g. 3f2a9c01b7de."
        )

    def find_experiment_or_batch(self, ref: str) -> tuple[str, Experiment, str | None]:
        """What `ref` names: an experiment (as `get_experiment`) or a batch (id or prefix).

        Returns (kind, experiment, batch id or None). An experiment and a batch both
        matching is refused.
        """
        ref = ref.strip()
        match = self._match_experiment(ref)
        batch = None
        batch_problem: NotFoundError | None = None
        try:
            batch = self.get_batch(ref)
        except NotFoundError as e:
            batch_problem = e
        if isinstance(match, _Match):
            if batch is not None:
                named = f" (named '{ref}')" if match.by_name else ""
                raise NotFoundError(
                    f"'{ref}' could mean experiment {match.doc['_id']}{named} or batch "
                    f"{batch.id}: give more characters of the id you mean."
                )
            return "experiment", self._experiment(self._told(match)), None
        if batch is not None:
            return "batch", self.get_experiment(batch.experiment_id), batch.id
        if match.ambiguous:
            raise NotFoundError(match.message)
        if batch_problem is not None and "more than one" in str(batch_problem):
            raise batch_problem
        either = " No batch has an id starting with it either." if batch_problem else ""
        raise NotFoundError(
            f"{match.message}{either} List them with `simulator experiment list` and "
            "`simulator status --all`."
        )

    def find_identical(self, exp: Experiment) -> Experiment | None:
        """The current user's experiment with exactly this definition, if one is stored."""
        doc = self._experiments.find_one(
            {"creator": self.user, "name": exp.name, "definition": _definition(exp)},
            sort=[("created_at", -1)],
        )
        return self._experiment(doc) if doc else None

    def list_experiments(self, *, mine: bool = False, search: str = "") -> list[ExperimentRow]:
        """The current user's favourites first, then newest first."""
        query: dict[str, Any] = {"creator": self.user} if mine else {}
        if search:
            pattern = {"$regex": re.escape(search), "$options": "i"}
            query["$or"] = [{"name": pattern}, {"note": pattern}, {"creator": pattern}]
        docs = list(self._experiments.find(query))
        docs.sort(key=lambda d: d["created_at"], reverse=True)
        docs.sort(key=lambda d: self.user not in favourited_by(d))
        counts = {
            row["_id"]: row["n"]
            for row in self._conversations.aggregate(
                [
                    {"$match": {"experiment_id": {"$in": [d["_id"] for d in docs]}}},
                    {"$group": {"_id": "$experiment_id", "n": {"$sum": 1}}},
                ]
            )
        }
        return [ExperimentRow(self._experiment(d), counts.get(d["_id"], 0)) for d in docs]

    def set_note(self, ref: str, note: str) -> Experiment:
        return self._update_experiment(ref, {"note": note}, "change the note of")

    def set_favourite(self, ref: str, favourite: bool) -> Experiment:
        """Star (or unstar) an experiment for the current user; anyone's experiment."""
        doc = self._experiment_doc(ref)
        self._star(self._experiments, doc, favourite)
        return self._experiment(self._experiments.find_one({"_id": doc["_id"]}) or doc)

    def _update_experiment(self, ref: str, changes: dict, action: str) -> Experiment:
        doc = self._experiment_doc(ref)
        self._check_owner(doc, "experiment", action)
        self._experiments.update_one({"_id": doc["_id"]}, {"$set": changes})
        return self._experiment({**doc, **changes})

    def delete_plan(self, ref: str) -> DeletePlan:
        """Check that the current user may delete an experiment, and count what goes with it.

        Refused (PermissionDenied) unless the user created the experiment and every batch and
        conversation in it: deleting never removes what someone else created.
        """
        doc = self._experiment_doc(ref, action="delete")
        self._check_owner(doc, "experiment", "delete")
        others: dict[str, int] = {}
        batches = list(
            self._batches.find(
                {"experiment_id": doc["_id"]},
                {"creator": 1, "legacy_id": 1, "total": 1, "tally.counts": 1},
            )
        )
        # A run's conversations are its batch creator's; only imported batches and
        # conversations without a batch can hold someone else's: those are counted one by one.
        mixed: list[dict[str, Any]] = [{"batch_id": None, "experiment_id": doc["_id"]}]
        mixed += [{"batch_id": b["_id"]} for b in batches if "legacy_id" in b]
        for match in mixed:
            for row in self._conversations.aggregate(
                [
                    {"$match": {**match, "creator": {"$ne": self.user}}},
                    {"$group": {"_id": "$creator", "n": {"$sum": 1}}},
                ]
            ):
                others[str(row["_id"])] = others.get(str(row["_id"]), 0) + row["n"]
        for b in batches:
            if b.get("creator") != self.user:
                who = str(b.get("creator"))
                others[who] = others.get(who, 0) + (0 if "legacy_id" in b else _batch_size(b))
        if others:
            whose = ", ".join(
                f"{who} ({plural(n, 'conversation')})" if n else f"{who} (a batch)"
                for who, n in sorted(others.items(), key=lambda kv: (-kv[1], kv[0]))
            )
            raise PermissionDenied(
                f"Experiment {doc['_id']} ('{doc.get('name')}') also holds what others created: "
                f"{whose}. Deleting it would delete their work, so it is refused. Ask them to "
                "delete their conversations first, or keep the experiment (mark it with "
                "`simulator experiment note`)."
            )
        loose = self._conversations.count_documents({"batch_id": None, "experiment_id": doc["_id"]})
        return DeletePlan(
            experiment=self._experiment(doc),
            batches=len(batches),
            conversations=loose + sum(_batch_size(b) for b in batches),
        )

    def delete_experiment(
        self, ref: str, on_progress: Callable[[int, int], None] | None = None
    ) -> Deleted:
        """Delete an experiment with its batches, conversations and messages.

        Only when the current user created it and everything in it (see delete_plan).
        `on_progress(conversations deleted, conversations in all)` is called as it goes.
        Deleted batch by batch, and only what the current user created, so a batch another
        user adds meanwhile survives (and then so does the experiment).
        """
        plan = self.delete_plan(ref)
        exp_id = plan.experiment.id
        total, done = plan.conversations, 0
        deleted = Deleted()
        report = on_progress or (lambda done, total: None)
        report(0, total)
        mine = {"experiment_id": exp_id, "creator": self.user}
        for batch in list(self._batches.find(mine, {"_id": 1})):
            # Records carry their batch id: one delete per collection, no list of ids.
            self._delete_records(deleted, {"batch_id": batch["_id"]})
            n = self._conversations.delete_many(
                {"batch_id": batch["_id"], "creator": self.user}
            ).deleted_count
            deleted.conversations += n
            deleted.batches += self._batches.delete_one({"_id": batch["_id"]}).deleted_count
            done += n
            report(min(done, total), total)
        # Conversations without a batch (older imports): their ids, a page at a time.
        while True:
            page = [
                d["_id"]
                for d in self._conversations.find({**mine, "batch_id": None}, {"_id": 1}).limit(500)
            ]
            if not page:
                break
            self._delete_conversation_data(page, deleted)
            done += len(page)
            report(min(done, total), total)
        if self._conversations.count_documents(
            {"experiment_id": exp_id}, limit=1
        ) or self._batches.count_documents({"experiment_id": exp_id}, limit=1):
            # Someone else started a batch on it while it was being deleted: theirs stays.
            self.delete_plan(exp_id or ref)  # names them
        deleted.experiments = self._experiments.delete_one({"_id": exp_id}).deleted_count
        # its annotation sheets: an answer imported later would have no conversation to join
        self._annotation_sheets.delete_many({"experiment_id": exp_id})
        return deleted

    def _experiment(self, doc: dict) -> Experiment:
        exp = experiment_from_dict(dict(doc["definition"]), source=f"experiment {doc['_id']}")
        exp.id = doc["_id"]
        exp.note = doc.get("note", "")
        exp.favourite = self.user in favourited_by(doc)
        exp.creator = doc.get("creator")
        exp.created_at = doc.get("created_at")
        exp.parent_id = doc.get("parent_id")
        return exp

    # --- exports (issue 6): bookkeeping of `import-legacy` ---------------------------------

    _IMPORTABLE = ("experiments", "batches", "conversations")

    def imported(self, kind: str) -> dict[str, str]:
        """{prototype id: our id} of the experiments, batches or conversations imported so far."""
        assert kind in self._IMPORTABLE
        docs = self._db[kind].find({"legacy_id": {"$exists": True}}, {"legacy_id": 1})
        return {d["legacy_id"]: d["_id"] for d in docs}

    def mark_imported(
        self,
        kind: str,
        our_id: str,
        legacy_id: str,
        *,
        created_at: datetime | None = None,
        total: int | None = None,
        note: str = "",
    ) -> None:
        """Record the prototype id an imported record came from, its original date and note."""
        assert kind in self._IMPORTABLE
        changes: dict[str, Any] = {"legacy_id": legacy_id}
        if isinstance(created_at, datetime):
            changes["created_at"] = created_at
        if total is not None:
            changes["total"] = total
        if note:
            changes["note"] = note
        self._db[kind].update_one({"_id": our_id}, {"$set": changes})


def _now_ms() -> datetime:
    t = datetime.now(timezone.utc)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def _when(doc: dict) -> float:
    created = doc.get("created_at")
    return created.timestamp() if isinstance(created, datetime) else 0.0


def _short(experiment_id: str) -> str:
    return experiment_id[:8]


def _who(creator: str | None, user: str) -> str:
    return "yours" if creator == user else str(creator)


def _whose(chosen: ExperimentName, user: str, named: list[ExperimentName]) -> str:
    """Why a name stands for `chosen`: `yours, newest`, `yours`, `bob's, newest`."""
    if chosen.creator == user:
        mine = sum(n.creator == user for n in named)
        return "yours, newest" if mine > 1 else "yours"
    return f"{chosen.creator}'s, newest" if len(named) > 1 else f"{chosen.creator}'s"


def _listing(items: list[ExperimentName], user: str, *, word: bool = True) -> str:
    """`experiments 64976f50 (rev, 2026-11-30 14:02), f6bbe152 (yours, ...)`: a few of them."""
    shown = [
        f"{_short(n.id)} ({_who(n.creator, user)}"
        + (f", {n.created_at:%Y-%m-%d %H:%M})" if n.created_at else ")")
        for n in items[:5]
    ]
    more = f" and {len(items) - 5} more" if len(items) > 5 else ""
    head = ("experiment " if len(items) == 1 else "experiments ") if word else ""
    return head + ", ".join(shown) + more
