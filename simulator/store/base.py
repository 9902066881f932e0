"""What every part of the store shares: the database, its collections, the current user,
ids and ownership.
"""

from __future__ import annotations

import re
from typing import Any

import pymongo
from pymongo.database import Database

from simulator.errors import NotFoundError, PermissionDenied
from simulator.store.documents import favourited_by
from simulator.store.indexes import INDEXES, IndexSpec, create_missing
from simulator.store.records import Lease


class StoreBase:
    """The database, its collections and the current user (see Store)."""

    def __init__(self, db: Database, user: str):
        self._db = db
        self.user = user
        self._experiments = db["experiments"]
        self._batches = db["batches"]
        self._conversations = db["conversations"]
        self._messages = db["messages"]
        self._summaries = db["summaries"]
        self._selector_calls = db["selector_calls"]
        self._scores = db["scores"]
        self._annotation_sheets = db["annotation_sheets"]
        self._leases: dict[str, Lease] = {}  # batches this Store runs now, by id
        self._notices_given: set[str] = set()  # said once per Store (Experiments._told)

    def server_client(self) -> pymongo.MongoClient:
        """The client of the store's server, to read another database on it (import-legacy)."""
        return self._db.client

    def is_own_database(self, other: Database) -> bool:
        """Whether `other` is the very database this store writes to."""
        return other.name == self._db.name and other.client.address == self._db.client.address

    def indexes(self) -> tuple[IndexSpec, ...]:
        """The indexes this version of the store needs (see INDEXES)."""
        return INDEXES

    def ensure_indexes(self) -> None:
        """Create the indexes this version needs, once per database (issue 14; see
        indexes.create_missing)."""
        create_missing(self._db, self.indexes())

    # --- ids ------------------------------------------------------------------------------

    def _resolve(
        self,
        collection: pymongo.collection.Collection,
        ref: str,
        what: str,
        projection: dict[str, Any] | None = None,
    ) -> dict:
        ref = ref.strip()
        if not re.fullmatch(r"[0-9a-fA-F]{1,24}", ref):
            raise NotFoundError(
                f"'{ref}' is not a valid {what} id: ids are hexadecimal, e.g. 3f2a9c01b7de "
                f"(list them with `simulator {_LISTING[what]}`)."
            )
        # A range rather than a regex: it walks the _id index from the prefix on. Ids are
        # lowercase hexadecimal, and "g" sorts after every hex digit.
        prefix = ref.lower()
        docs = list(
            collection.find({"_id": {"$gte": prefix, "$lt": prefix + "g"}}, projection)
            .sort("_id", 1)
            .limit(3)
        )
        if not docs:
            raise NotFoundError(
                f"No {what} has an id starting with '{ref}'. "
                f"List them with `simulator {_LISTING[what]}`."
            )
        if len(docs) > 1:
            ids = ", ".join(d["_id"] for d in docs)
            raise NotFoundError(
                f"'{ref}' matches more than one {what} ({ids}{', ...' if len(docs) > 2 else ''}): "
                "type more characters of the id."
            )
        return docs[0]

    def _check_owner(self, doc: dict, what: str, action: str) -> None:
        if doc.get("creator") != self.user:
            raise PermissionDenied(refusal(doc.get("creator"), what, doc["_id"], action, self.user))

    def _star(self, collection: pymongo.collection.Collection, doc: dict, favourite: bool) -> None:
        """Add or remove the current user's star; anyone may, it changes nothing of anyone else's.

        A document from before per-person favourites has a boolean `favourite`: it becomes its
        creator's star first (only if no list exists yet, so a concurrent star is not lost).
        """
        if "favourited_by" not in doc:
            collection.update_one(
                {"_id": doc["_id"], "favourited_by": {"$exists": False}},
                {"$set": {"favourited_by": favourited_by(doc)}, "$unset": {"favourite": ""}},
            )
        change = "$addToSet" if favourite else "$pull"
        collection.update_one({"_id": doc["_id"]}, {change: {"favourited_by": self.user}})


_LISTING = {
    "experiment": "experiment list",
    "batch": "status",
    "conversation": "conversations EXPERIMENT",
}


def refusal(creator: str | None, what: str, ref: str, action: str, user: str) -> str:
    """Why the current user may not change or delete someone else's experiment/conversation."""
    text = f"Only {creator}, who created {what} {ref}, can {action} it; you are {user}."
    if what == "experiment" and action != "delete":
        text += " Duplicate it (`simulator experiment duplicate`) to make your own copy."
    return text
