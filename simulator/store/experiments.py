"""Experiments: storing, finding, listing, changing and deleting them."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from simulator.errors import NotFoundError, PermissionDenied
from simulator.experiment import Experiment, experiment_from_dict
from simulator.store.batches import Batches
from simulator.store.conversations import Conversations
from simulator.store.documents import _batch_size, _definition, favourited_by, new_id, now, plural
from simulator.store.records import Deleted, DeletePlan, ExperimentRow


class Experiments(Batches, Conversations):
    """Experiments, and the legacy import's bookkeeping."""

    def insert_experiment(self, exp: Experiment, *, parent_id: str | None = None) -> Experiment:
        doc = {
            "_id": new_id(),
            "name": exp.name,
            "note": exp.note,
            "favourited_by": [self.user] if exp.favourite else [],
            "creator": self.user,
            "created_at": now(),
            "parent_id": parent_id,
            "definition": _definition(exp),
        }
        self._experiments.insert_one(doc)
        return self._experiment(doc)

    def get_experiment(self, ref: str) -> Experiment:
        return self._experiment(self._resolve(self._experiments, ref, "experiment"))

    def find_experiment_or_batch(self, ref: str) -> tuple[str, Experiment, str | None]:
        """What `ref` names: an experiment (id prefix or name) or a batch (id prefix).

        Returns (kind, experiment, batch id or None). A name several experiments share
        prefers the current user's newest; an id prefix and a name both matching is refused.
        """
        ref = ref.strip()
        found: list[tuple[str, Experiment, str | None]] = []
        problems: list[NotFoundError] = []
        for what in ("experiment", "batch"):
            try:
                if what == "experiment":
                    found.append((what, self.get_experiment(ref), None))
                else:
                    b = self.get_batch(ref)
                    found.append((what, self.get_experiment(b.experiment_id), b.id))
            except NotFoundError as e:
                problems.append(e)
        named = list(
            self._experiments.find({"name": ref}, {"creator": 1, "created_at": 1}).limit(50)
        )
        if named:
            named.sort(key=lambda d: (d.get("creator") == self.user, d["created_at"]), reverse=True)
            found.append(("name", self.get_experiment(named[0]["_id"]), None))
        kinds_found = [k for k, _, _ in found]
        if kinds_found == ["experiment", "name"] and found[0][1].id == found[1][1].id:
            found.pop()  # its id starts with its own name
        if len(found) > 1:
            meanings = {
                "experiment": lambda e, b: f"experiment {e.id}",
                "batch": lambda e, b: f"batch {b}",
                "name": lambda e, b: f"experiment {e.id} (named '{ref}')",
            }
            kinds = " or ".join(meanings[k](e, b) for k, e, b in found)
            raise NotFoundError(
                f"'{ref}' could mean {kinds}: give more characters of the id you mean."
            )
        if found:
            return found[0]
        for problem in problems:
            if "more than one" in str(problem):
                raise problem
        raise NotFoundError(
            f"No experiment (by id or name) or batch (by id) matches '{ref}'. List them with "
            "`simulator experiment list` and `simulator status --all`."
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
        doc = self._resolve(self._experiments, ref, "experiment")
        self._star(self._experiments, doc, favourite)
        return self._experiment(self._experiments.find_one({"_id": doc["_id"]}) or doc)

    def _update_experiment(self, ref: str, changes: dict, action: str) -> Experiment:
        doc = self._resolve(self._experiments, ref, "experiment")
        self._check_owner(doc, "experiment", action)
        self._experiments.update_one({"_id": doc["_id"]}, {"$set": changes})
        return self._experiment({**doc, **changes})

    def delete_plan(self, ref: str) -> DeletePlan:
        """Check that the current user may delete an experiment, and count what goes with it.

        Refused (PermissionDenied) unless the user created the experiment and every batch and
        conversation in it: deleting never removes what someone else created.
        """
        doc = self._resolve(self._experiments, ref, "experiment")
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
