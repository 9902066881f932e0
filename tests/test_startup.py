"""The fixed cost of a command (issue 14), checked by counting, never by timing: the modules
a command imports, the index commands a Store sends, the preflight requests an endpoint
receives, the queries after a batch's last conversation. Speed is measured in
bench/startup.py."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient, monitoring

from simulator.errors import ProviderUnavailable
from simulator.experiment import ModelSpec, load_experiment
from simulator.grid import make_grid
from simulator.llm import registry
from simulator.llm.retry import RetryPolicy
from simulator.runner import RunOptions, start_batch
from simulator.store import INDEXES, IndexSpec, Store
from tests.servers import FakeLLMServer, write_experiment

# What no command needs before it runs (each is imported by the commands that use it).
HEAVY = ("openai", "ollama", "httpx", "pandas", "matplotlib", "questionary", "prompt_toolkit")
# What `--help` does not need: the database client, the console library, inflection.
NOT_FOR_HELP = (*HEAVY, "pymongo", "bson", "rich", "inflect", "pydantic", "yaml")


def modules_after(args: list[str], env: dict[str, str] | None = None) -> set[str]:
    """Top-level packages loaded by a fresh interpreter that ran `simulator ARGS`."""
    code = (
        "import sys, json\nfrom simulator.cli import app\n"
        f"try:\n    app({args!r}, prog_name='simulator')\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_help_imports_only_the_command_line() -> None:
    loaded = modules_after(["--help"])
    assert not loaded & set(NOT_FOR_HELP), sorted(loaded & set(NOT_FOR_HELP))
    assert "typer" in loaded  # the check sees what is imported
    # A command's own help: typer (0.2x) parses its options with pydantic, nothing more.
    loaded = modules_after(["run", "--help"])
    unwanted = set(NOT_FOR_HELP) - {"pydantic"}
    assert not loaded & unwanted, sorted(loaded & unwanted)


def test_listing_imports_no_llm_client(settings, env_for) -> None:
    import os

    env = {**os.environ, **env_for(settings)}
    loaded = modules_after(["experiment", "list"], env) | modules_after(["status"], env)
    assert not loaded & {*HEAVY, "inflect"}, sorted(loaded & {*HEAVY, "inflect"})
    assert {"pymongo", "rich"} <= loaded


# --- indexes: once per database ---------------------------------------------------------------


class Commands(monitoring.CommandListener):
    """Every command a client sends, in order: (name, collection or None)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self.lock:
            self.seen.append((event.command_name, event.command.get(event.command_name)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def count(self, name: str, start: int = 0) -> int:
        with self.lock:
            return sum(1 for n, _ in self.seen[start:] if n == name)


@pytest.fixture
def watched(mongo_server: str, db) -> Iterator[tuple[Any, Commands]]:
    """The test's database through a client whose commands are recorded."""
    listener = Commands()
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server, event_listeners=[listener])
    yield client[db.name], listener
    client.close()


class NextVersionStore(Store):
    """A later version of the store that needs one more index."""

    def indexes(self) -> tuple[IndexSpec, ...]:
        return (*INDEXES, ("messages", (("speaker", 1),), False))


def test_indexes_are_created_once_per_database(watched, db) -> None:
    database, commands = watched
    Store.open(database, "alice")
    first = commands.count("createIndexes")
    assert first == len(INDEXES)
    Store.open(database, "alice")
    Store.open(database, "bob")
    assert commands.count("createIndexes") == first  # recorded: not asked for again

    NextVersionStore.open(database, "alice")  # a newer version adds its index, only that one
    assert commands.count("createIndexes") == first + 1
    assert "speaker_1" in db.messages.index_information()
    NextVersionStore.open(database, "alice")
    Store.open(database, "alice")  # the older version does not undo or redo anything
    assert commands.count("createIndexes") == first + 1
    unique = db.messages.index_information()["conversation_id_1_day_1_turn_1"]
    assert unique.get("unique") is True


def test_two_processes_opening_a_new_database_at_once(mongo_server: str, db) -> None:
    """Both prepare the database; neither fails; every index exists and is recorded."""
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_store() -> None:
        with MongoClient(mongo_server) as client:
            start.wait()
            try:
                Store.open(client[db.name], "alice")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    recorded = db.meta.find_one({"_id": "indexes"})["created"]
    assert len(recorded) == len(set(recorded)) == len(INDEXES)
    assert len(db.scores.index_information()) == 4  # _id and the three score indexes


# --- preflight: each endpoint once, all at once ------------------------------------------------


def test_preflight_asks_each_endpoint_once() -> None:
    with FakeLLMServer(models={"llama3:latest", "mistral:latest", "bench"}) as server:
        specs = [
            ModelSpec("bench", "openai", base_url=server.openai_url, temperature=0.1),
            ModelSpec("bench", "openai", base_url=server.openai_url, temperature=0.9),
            ModelSpec("other", "openai", base_url=server.openai_url),
            ModelSpec("llama3", "ollama", base_url=server.url, temperature=0.2),
            ModelSpec("llama3", "ollama", base_url=server.url, temperature=0.7),
            ModelSpec("mistral", "ollama", base_url=server.url),
        ]
        registry.preflight(specs)
        paths = [r["path"] for r in server.requests]
    assert paths.count("/v1/models") == 1
    assert paths.count("/api/tags") == 1
    assert "/api/pull" not in paths  # every model is there


def test_preflight_checks_endpoints_in_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two endpoints that never answer: both are asked before the first one times out."""
    monkeypatch.setattr(registry, "PREFLIGHT_TIMEOUT", 3.0)
    silent = [socket.socket(), socket.socket()]
    held: list[socket.socket] = []  # accepted connections, never answered
    try:
        for s in silent:
            s.bind(("127.0.0.1", 0))
            s.listen(8)
        urls = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in silent]
        specs = [
            ModelSpec("m", "openai", base_url=f"{urls[0]}/v1"),
            ModelSpec("m", "ollama", base_url=urls[1]),
        ]
        failure: list[BaseException] = []

        def check() -> None:
            try:
                registry.preflight(specs)
            except BaseException as e:  # noqa: BLE001 - checked below
                failure.append(e)

        worker = threading.Thread(target=check)
        worker.start()
        asked: set[int] = set()
        deadline = time.monotonic() + 2.0  # well before the first check gives up (3 s)
        while len(asked) < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select(silent, [], [], 0.05)
            for s in ready:
                held.append(s.accept()[0])
                asked.add(silent.index(s))
        assert asked == {0, 1}, "the second endpoint was only asked after the first one"
        worker.join(10)
        assert failure and isinstance(failure[0], ProviderUnavailable)
        assert str(failure[0]).startswith("2 LLMs cannot be used yet")  # both named
    finally:
        for s in silent + held:
            s.close()


# --- the closing summary: from the runner's counts -------------------------------------------


def test_closing_summary_makes_no_queries(watched, tmp_path: Path) -> None:
    database, commands = watched
    store = Store.open(database, "alice")
    with FakeLLMServer(models={"bench"}, fail_rate=0.04, fail_statuses=[500], seed=3) as server:
        path = write_experiment(
            tmp_path / "e.yaml",
            f"{{model: bench, provider: openai, base_url: {server.openai_url}}}",
        )
        exp = store.insert_experiment(load_experiment(path))
        grid = make_grid(
            exp, llms=None, messages=4, days=2, agents=None, speakers=["round_robin"], repetitions=8
        )
        finished: list[int] = []

        def on_progress(event: Any) -> None:
            if event.kind == "conversation_finished":
                with commands.lock:
                    finished.append(len(commands.seen))

        options = RunOptions(
            concurrency=4,
            max_failures="8",
            retry=RetryPolicy(attempts=1, base_delay=0, max_delay=0),
            on_progress=on_progress,
        )
        report = start_batch(store, exp, grid, options)
    after = commands.seen[max(finished) :]
    queries = [(n, c) for n, c in after if n in ("find", "aggregate", "count", "getMore")]
    # What is left after the last conversation is the workers' coordination (is another
    # worker still on the batch, is a claim left over: a few queries whatever the batch's
    # size), never the summary's counting: no record is read and no conversation counted.
    assert not [q for q in queries if q[1] in ("messages", "summaries", "selector_calls")]
    assert not [q for q in queries if q[0] == "count"], queries
    assert report.totals is not None  # the runner's own counts, not the store's

    # ... and they are the figures the store counts.
    assert report.counts.get("failed", 0) > 0 and report.counts.get("completed", 0) > 0
    assert report.counts == store.batch_counts(report.batch_id)
    assert sorted(report.failures) == sorted(store.batch_failures(report.batch_id))
    assert report.unusable == store.count_unusable(report.batch_id)
    counted = store.batch_totals(report.batch_id)
    assert report.totals is not None
    assert report.totals.failures and sorted(report.totals.failures) == sorted(counted.failures)
    report.totals.failures = counted.failures = []
    assert report.totals == counted


# --- leaving: the process ends as soon as the command is done, and nothing is cut off ----------


def test_a_command_leaves_with_its_output_log_and_status(settings, env_for, db, tmp_path) -> None:
    import os

    from simulator.importing import import_experiment

    env = {**os.environ, **env_for(settings)}
    store = Store.open(db, "alice")
    names = [f"listed-{i:02d}" for i in range(60)]  # longer than any buffer a hasty exit drops
    for i, name in enumerate(names):
        import_experiment(
            store,
            Path(write_experiment(tmp_path / f"e{i}.yaml", "{provider: scripted, model: s}", name)),
        )
    done = subprocess.run(
        [sys.executable, "-m", "simulator", "experiment", "list"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in names)
    log = Path(settings.log_dir) / "simulator.log"
    assert log.read_text().count("connecting to") == 1  # the command's log line is flushed
    done = subprocess.run(
        [sys.executable, "-m", "simulator", "show", "0123456789ab"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Error:" in done.stderr and "Traceback" not in done.stderr


def test_leaving_waits_for_a_thread_still_working(tmp_path: Path) -> None:
    """A non-daemon thread (work not finished) is waited for; the status is kept either way."""
    marker = tmp_path / "written"
    code = (
        "import threading, time, pathlib\nfrom simulator.cli import leave\n"
        f"def work():\n    time.sleep(0.5)\n    pathlib.Path({str(marker)!r}).write_text('done')\n"
        "threading.Thread(target=work).start()\nleave(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert marker.read_text() == "done"
