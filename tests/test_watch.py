"""Issue 13, item 5: `simulator watch` in a second process follows a batch run by the
first, from the database alone; `status` shows every batch, live or dead, `--mine` only
the user's."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

from typer.testing import CliRunner

from simulator.cli import app
from tests.servers import FakeLLMServer, write_experiment
from tests.test_kill_resume import GRID, Cli, deterministic_reply, wait_until


def test_watch_in_a_second_process_shows_the_counts_of_a_batch_run_by_the_first(
    settings, env_for, db, tmp_path
):
    # The run's model calls are held until the watch has shown the batch running, then
    # answered at once: the watch sees it at work however slow the machine.
    seen_running = threading.Event()

    def reply(body: dict) -> str:
        seen_running.wait(60)
        return deterministic_reply(body)

    with FakeLLMServer(models={"m1:latest"}, reply=reply) as server:
        yaml = write_experiment(
            tmp_path / "watch.yaml", f"{{model: m1, provider: ollama, base_url: '{server.url}'}}"
        )
        cli = Cli(tmp_path, env_for(settings))
        run = cli.start("run", yaml, *GRID, "--concurrency", "1", "--plain")
        wait_until(lambda: db.batches.find_one({"prepared": True}) is not None, run, "the batch")
        batch_id = db.batches.find_one()["_id"]
        watch = cli.start("watch", batch_id, "--interval", "0.2")
        shown_so_far = Path(watch.files[0].name)  # type: ignore[attr-defined]
        try:
            wait_until(
                lambda: f"1 worker on {socket.gethostname()}" in shown_so_far.read_text(),
                watch,
                "the watch showing the batch's worker",
            )
        finally:
            seen_running.set()
        run.wait(timeout=120)
        out, err = Cli.output(run)
        assert run.returncode == 0, out + err
        watch.wait(timeout=30)  # it ends by itself once nobody works on the batch
        shown, err = Cli.output(watch)
        assert watch.returncode == 0, shown + err
    lines = [line for line in shown.splitlines() if line.startswith(batch_id)]
    done = [int(m.group(1)) for line in lines if (m := re.search(r"(\d+)/6 done", line))]
    assert done and done[-1] == 6 and min(done) < 6  # it saw the batch progress
    assert done == sorted(done)
    live = [line for line in lines if f"1 worker on {socket.gethostname()}" in line]
    assert live, shown  # the run's worker and its host, while it ran
    assert "completed" in lines[-1] and "no live worker" in lines[-1]
    final = lines[-1]
    assert "36 messages" in final  # 6 conversations x 6 messages


def test_status_shows_every_batch_live_or_dead_and_mine_filters(settings, env_for, db):
    cli = CliRunner()
    base = [
        "run",
        str(experiment_file_path()),
        "--llm",
        "scripted",
        "--messages",
        "2",
        "--days",
        "1",
    ]
    for user in ("alice", "bob"):
        result = cli.invoke(
            app, [*base, "--plain"], env={**env_for(settings), "SIMULATOR_USER": user}
        )
        assert result.exit_code == 0, result.output
    alice_batch = db.batches.find_one({"creator": "alice"})["_id"]
    bob_batch = db.batches.find_one({"creator": "bob"})["_id"]
    # alice's batch, as a killed run leaves it: running, its worker's process gone
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    worker = {"host": socket.gethostname(), "pid": gone.pid, "heartbeat": None}
    db.batches.update_one(
        {"_id": alice_batch},
        {
            "$set": {
                "status": "running",
                "runner": {**worker, "token": "t1"},
                "workers": {"t1": worker},
            }
        },
    )
    env = env_for(settings)
    everyone = cli.invoke(app, ["status"], env=env)
    assert everyone.exit_code == 0, everyone.output
    assert alice_batch in everyone.output and bob_batch in everyone.output
    assert "dead: no worker is alive" in everyone.output
    assert "idle: nobody works on it" in everyone.output
    mine = cli.invoke(app, ["status", "--mine"], env=env)
    assert alice_batch in mine.output and bob_batch not in mine.output


def experiment_file_path():
    from tests.scenarios import PRISON_ONE

    return PRISON_ONE
