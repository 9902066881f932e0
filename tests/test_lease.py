"""One process at a time runs a batch: a live runner's lease refuses a second `resume`; a
killed runner's lease (dead pid on this host) or a stale one (no heartbeat) does not."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.llm import scripted
from simulator.store import LEASE_SECONDS, Store
from tests.scenarios import PRISON_ONE

PRISON = str(PRISON_ONE)  # one of the 72 scenarios: these tests are not about factors


@pytest.fixture
def interrupted_batch(settings, env_for, db, monkeypatch):
    """A batch left unfinished by a crash, and a way to run CLI commands on it."""
    env = env_for(settings)
    runner = CliRunner()
    scripted.reset_call_counter()
    monkeypatch.setenv(scripted.CRASH_ENV, "5")
    with pytest.raises(scripted.InjectedCrash):
        runner.invoke(
            app,
            ["run", PRISON, "--llm", "scripted", "--messages", "6", "--days", "2",
             "--repetitions", "2", "--plain"],
            env=env,
            catch_exceptions=False,
        )  # fmt: skip
    monkeypatch.delenv(scripted.CRASH_ENV)
    store = Store(db, "alice")
    (batch,) = store.list_batches()
    assert db.batches.find_one({"_id": batch.id}).get("runner") is None  # released on the way out

    def cli(*args: str):
        return runner.invoke(app, list(args), env=env)

    return store, batch.id, cli


def hold(db, batch_id: str, *, host: str, pid: int, age: float = 0.0) -> None:
    beat = datetime.now(timezone.utc) - timedelta(seconds=age)
    db.batches.update_one(
        {"_id": batch_id}, {"$set": {"runner": {"host": host, "pid": pid, "heartbeat": beat}}}
    )


def messages(store: Store, batch_id: str) -> int:
    return store.batch_totals(batch_id).messages


def test_a_live_runner_refuses_a_second_resume(interrupted_batch, db):
    store, batch_id, cli = interrupted_batch
    before = messages(store, batch_id)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        hold(db, batch_id, host=socket.gethostname(), pid=sleeper.pid)
        result = cli("resume", batch_id)
        assert result.exit_code == 1, result.output
        assert f"process {sleeper.pid}" in result.output and "being run right now" in result.output
        assert "simulator work" not in result.output  # a run without workers cannot be joined
        assert "Traceback" not in result.output
        assert messages(store, batch_id) == before  # nothing ran
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same lease, its process now gone (as after kill -9): resume goes ahead at once
    result = cli("resume", batch_id)
    assert result.exit_code == 0, result.output
    assert all(r.status == "completed" for r in store.list_conversations(batch_id=batch_id))
    assert db.batches.find_one({"_id": batch_id}).get("runner") is None


def test_another_hosts_lease_holds_until_its_heartbeat_is_stale(interrupted_batch, db):
    store, batch_id, cli = interrupted_batch
    hold(db, batch_id, host="lab-machine-2", pid=4242, age=LEASE_SECONDS / 2)
    result = cli("resume", batch_id)
    assert result.exit_code == 1 and "process 4242 on lab-machine-2" in result.output
    hold(db, batch_id, host="lab-machine-2", pid=4242, age=LEASE_SECONDS * 2)
    result = cli("resume", batch_id)
    assert result.exit_code == 0, result.output
    assert all(r.status == "completed" for r in store.list_conversations(batch_id=batch_id))


def test_resume_refused_by_a_run_of_workers_says_how_to_join_it(interrupted_batch, db):
    store, batch_id, cli = interrupted_batch
    before = messages(store, batch_id)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        worker = {"host": socket.gethostname(), "pid": sleeper.pid, "seconds": 60.0}
        beat = datetime.now(timezone.utc)
        db.batches.update_one(
            {"_id": batch_id},
            {"$set": {
                "runner": {**worker, "token": "run1", "heartbeat": beat},
                "workers": {"w1": {**worker, "heartbeat": beat}},
            }},
        )  # fmt: skip
        result = cli("resume", batch_id)
        assert result.exit_code == 1, result.output
        assert "being run right now" in result.output
        assert f"simulator work {batch_id}" in result.output
        assert messages(store, batch_id) == before  # nothing ran
    finally:
        sleeper.kill()
        sleeper.wait()


def test_resume_without_an_id_takes_the_latest_unfinished_batch(interrupted_batch, db):
    """A newer batch that completed does not hide the interrupted one (it was taken, and
    refused as already finished)."""
    store, batch_id, cli = interrupted_batch
    time.sleep(1.1)  # batches are ordered by their creation time, stored to the second
    done = cli("run", PRISON, "--llm", "scripted", "--messages", "2", "--days", "1", "--plain")
    assert done.exit_code == 0, done.output
    assert store.latest_batch().id != batch_id  # the newest is the completed one
    result = cli("resume", "--plain")
    assert result.exit_code == 0, result.output
    assert f"Batch {batch_id}: completed" in result.output
    assert store.get_batch(batch_id).status == "completed"


def test_starting_a_new_batch_recounts_nothing_and_a_stale_one_is_recounted(settings, db):
    """A batch that has no conversation yet starts with exact (empty) totals: taking its
    lease counts no record (the recount would read every message, summary and selector
    call of the batch). Totals left untrusted are still recounted when it is taken."""
    from pymongo import MongoClient

    from simulator.experiment import load_experiment
    from simulator.grid import make_grid
    from simulator.runner import RunOptions, start_batch
    from tests.test_tally import Commands, kept, recount

    records = ("messages", "summaries", "selector_calls")
    listener = Commands()
    client: MongoClient = MongoClient(settings.mongodb_uri, event_listeners=[listener])
    try:
        store = Store.open(client[db.name], "alice")
        exp = store.insert_experiment(load_experiment(PRISON_ONE))
        grid = make_grid(
            exp, llms=["scripted"], messages=4, days=1, agents="guard=1,prisoner=2",
            speakers=["round_robin"], repetitions=2,
        )  # fmt: skip
        listener.seen.clear()
        report = start_batch(store, exp, grid, RunOptions())
        assert report.status == "completed"
        counted = [c for c in listener.seen if c[0] == "aggregate" and c[1] in records]
        assert counted == []  # the run wrote its records; it never counted them
        assert kept(db, report.batch_id) == recount(db, report.batch_id)  # and they are exact
        # Totals dropped (a write without the batch's lease): recounted at the next claim.
        db.batches.update_one({"_id": report.batch_id}, {"$unset": {"tally": ""}})
        listener.seen.clear()
        with store.worker_lease(report.batch_id):
            pass
        counted = [c for c in listener.seen if c[0] == "aggregate" and c[1] in records]
        assert sorted(c[1] for c in counted) == sorted(records)  # one count of each
        assert kept(db, report.batch_id) == recount(db, report.batch_id)
    finally:
        client.close()
