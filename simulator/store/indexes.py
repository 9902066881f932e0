"""The indexes the store needs, and creating those a database lacks (issue 14)."""

from __future__ import annotations

from collections.abc import Iterable

from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from simulator.errors import StorageError

SCORE_KEY = ("conversation_id", "message", "scorer", "version", "source")


# (collection, keys, unique): every index the store needs. Add new ones here; databases
# made by an earlier version get them at the next Store.open (see ensure_indexes).
IndexSpec = tuple[str, tuple[tuple[str, int], ...], bool]


INDEXES: tuple[IndexSpec, ...] = (
    # a message is unique by (conversation, day, turn)
    ("messages", (("conversation_id", 1), ("day", 1), ("turn", 1)), True),
    ("summaries", (("conversation_id", 1), ("day", 1)), True),
    (
        "selector_calls",
        (("conversation_id", 1), ("day", 1), ("turn", 1), ("attempt", 1)),
        True,
    ),
    ("messages", (("batch_id", 1),), False),
    ("summaries", (("batch_id", 1),), False),
    ("selector_calls", (("batch_id", 1),), False),
    ("conversations", (("batch_id", 1), ("index", 1)), True),
    # listings sort an experiment's or a batch's conversations by (created_at, index)
    ("conversations", (("experiment_id", 1), ("created_at", 1), ("index", 1)), False),
    ("conversations", (("batch_id", 1), ("created_at", 1), ("index", 1)), False),
    ("conversations", (("batch_id", 1), ("status", 1)), False),
    ("batches", (("experiment_id", 1),), False),
    ("batches", (("creator", 1), ("created_at", -1)), False),
    ("batches", (("created_at", -1),), False),
    ("experiments", (("creator", 1), ("name", 1)), False),
    ("scores", tuple((k, 1) for k in SCORE_KEY), True),
    ("scores", (("experiment_id", 1), ("scorer", 1)), False),
    ("scores", (("conversation_id", 1),), False),
)


def _index_name(spec: IndexSpec) -> str:
    """How an index is recorded in `meta`: collection, keys and uniqueness."""
    collection, keys, unique = spec
    name = "_".join(f"{k}_{d}" for k, d in keys)
    return f"{collection}.{name}{' unique' if unique else ''}"


def create_missing(db: Database, specs: Iterable[IndexSpec]) -> None:
    """Create the indexes of `specs` the database lacks, once per database.

    The names of the indexes created so far are recorded in `meta` ({_id: "indexes"}):
    a command whose indexes are all recorded makes one query instead of a round trip
    per index. A version that adds an index finds it missing from the record and
    creates it. Creating an index that exists is a no-op and the record only grows
    ($addToSet), so two processes starting at once are safe.
    """
    wanted = {_index_name(spec): spec for spec in specs}
    try:
        meta = db["meta"]
        record = meta.find_one({"_id": "indexes"}, {"created": 1}) or {}
        missing = [name for name in wanted if name not in set(record.get("created", ()))]
        if not missing:
            return
        for name in missing:
            collection, keys, unique = wanted[name]
            db[collection].create_index(list(keys), unique=unique)
        meta.update_one(
            {"_id": "indexes"}, {"$addToSet": {"created": {"$each": missing}}}, upsert=True
        )
    except DuplicateKeyError:  # two first upserts at once: the other one recorded them
        pass
    except PyMongoError as e:
        raise StorageError(f"Could not prepare the database: {e}") from e
