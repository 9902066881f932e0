"""Import an experiment YAML file into the store, saying what happened (used by `run FILE`,
`experiment import` and any other front end that takes a file).

An unchanged file reuses the experiment it made before. An edited file whose name the user
already has is refused unless asked for a new experiment, so one study is never split
across experiments without a word (issue 9, item 18).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from simulator.errors import DefinitionChanged, NotAFile
from simulator.experiment import Experiment, load_experiment
from simulator.store import Store

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class ImportResult:
    """What importing a file did."""

    experiment: Experiment  # the experiment to use: reused or created
    created: bool  # False: an identical definition was already stored and is reused
    previous: Experiment | None = None  # created beside this older one of the same name
    source: str = ""

    def notice(self) -> str | None:
        """A line for the user when the import created a second experiment of one name."""
        if self.previous is None:
            return None
        old = self.previous
        return (
            f"{self.source} changed since experiment {short(old.id)} ('{old.name}', imported "
            f"{old.created_at:%Y-%m-%d %H:%M}): created a new experiment "
            f"{short(self.experiment.id)} (recorded as derived from {short(old.id)}). "
            f"To run the stored one, use `simulator run {short(old.id)}`."
        )


def short(experiment_id: str | None) -> str:
    return (experiment_id or "")[:8]


def check_experiment_file(path: Path) -> None:
    """Refuse a directory (or anything else that is not a file) with what to give instead."""
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in YAML_SUFFIXES)[:5]
        inside = f" (it holds {', '.join(found)})" if found else ""
        raise NotAFile(
            f"{path} is a directory{inside}: give one experiment YAML file, "
            f"e.g. {path / (found[0] if found else 'prison.yaml')}, or an experiment id "
            "(list them with `simulator experiment list`)."
        )
    if path.exists() and not path.is_file():
        raise NotAFile(f"{path} is not a regular file: give an experiment YAML file or id.")


def import_experiment(store: Store, path: Path, *, as_new: bool = False) -> ImportResult:
    """Import `path` as the current user's experiment.

    An identical definition the user already stored is reused. A changed definition under a
    name the user already has raises DefinitionChanged, unless `as_new`: then a new
    experiment is created, linked to the newest old one (its parent), and the result says so.
    """
    path = Path(path)
    check_experiment_file(path)
    exp = load_experiment(path)
    existing = store.find_identical(exp)
    if existing is not None:
        return ImportResult(existing, created=False, source=path.name)
    previous = _latest_named(store, exp.name)
    if previous is not None and not as_new:
        old = short(previous.id)
        raise DefinitionChanged(
            f"{path.name} changed since you imported it as experiment {old} ('{exp.name}', "
            f"{previous.created_at:%Y-%m-%d %H:%M}); storing it would split the study across "
            f"two experiments named '{exp.name}'. To run the stored definition, use "
            f"`simulator run {old}`. To store the edited file as a new experiment (linked to "
            f"{old}), add --new. To give the edited copy its own name: "
            f"`simulator experiment duplicate {old} --from-file {path} --name NEW_NAME`."
        )
    created = store.insert_experiment(exp, parent_id=previous.id if previous else None)
    return ImportResult(created, created=True, previous=previous, source=path.name)


def _latest_named(store: Store, name: str) -> Experiment | None:
    """The current user's newest experiment called exactly `name`."""
    rows = [
        row.experiment
        for row in store.list_experiments(mine=True, search=name)
        if row.experiment.name == name
    ]
    rows.sort(key=lambda e: e.created_at.timestamp() if e.created_at else 0.0, reverse=True)
    return rows[0] if rows else None
