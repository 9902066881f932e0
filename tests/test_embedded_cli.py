"""The embedded database through real `simulator` processes: a batch and a listing at once,
`db stop`, and the next command starting it again with the data intact."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.scenarios import PRISON_ONE
from tests.servers import FakeLLMServer, echo_reply

ROOT = Path(__file__).resolve().parent.parent
SIMULATOR = str(Path(sys.executable).with_name("simulator"))

pytestmark = pytest.mark.slow


def simulator(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SIMULATOR, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_batch_and_listing_share_the_embedded_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGODB", "DB_"))}
    env |= {"SIMULATOR_DATA_DIR": str(tmp_path / "data"), "SIMULATOR_USER": "carol"}
    # The batch's model calls are held until the listing has run: the two overlap however
    # slow the machine, and the batch then finishes at once.
    listed_now = threading.Event()

    def reply(body: dict) -> str:
        listed_now.wait(60)
        return echo_reply(body)

    server = FakeLLMServer(models={"m1:latest"}, reply=reply)
    gated = tmp_path / "gated.yaml"
    gated.write_text(
        PRISON_ONE.read_text().replace(
            "{model: scripted, provider: scripted}",
            f"{{model: m1, provider: ollama, base_url: '{server.start().url}'}}",
        )
    )
    try:
        batch = subprocess.Popen(
            [SIMULATOR, "run", str(gated), "--llm", "m1", "--messages", "30", "--days", "2", "--concurrency", "1",
             "--repetitions", "3", "--plain"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        # While the batch runs, a second process lists what is there.
        deadline = time.monotonic() + 60
        listed = None
        while time.monotonic() < deadline and batch.poll() is None:
            listed = simulator(env, "experiment", "list")
            if listed.returncode == 0 and "prison" in listed.stdout:
                break
            time.sleep(0.2)
        assert batch.poll() is None, "the batch finished before the listing could overlap it"
        assert listed is not None and listed.returncode == 0, listed and listed.stderr
        assert "prison" in listed.stdout and "carol" in listed.stdout
        listed_now.set()
        output, _ = batch.communicate(timeout=120)
        assert batch.returncode == 0, output
        assert "3 completed of 3" in output

        status = simulator(env, "db", "status")
        assert "running" in status.stdout
        stopped = simulator(env, "db", "stop")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert "stopped" in simulator(env, "db", "status").stdout
        # the next command starts the server again, and the data is still there
        after = simulator(env, "status")
        assert after.returncode == 0, after.stderr
        assert "3 completed of 3" in after.stdout
        assert "running" in simulator(env, "db", "status").stdout
    finally:
        listed_now.set()
        server.stop()
        simulator(env, "db", "stop")


def running(pid: int) -> bool:
    """Alive and not a zombie (the killed server is our child until reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_acknowledged_writes_survive_a_sigkill_of_the_embedded_server(tmp_path):
    import json
    import signal

    from pymongo import MongoClient

    from simulator.database import EmbeddedServer

    server = EmbeddedServer(tmp_path / "data")
    try:
        client = MongoClient(server.ensure_running())
        for i in range(300):
            client.t.m.insert_one({"i": i})
        pid = json.loads((tmp_path / "data" / "server.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and running(pid):
            time.sleep(0.05)
        client = MongoClient(server.ensure_running())
        assert client.t.m.count_documents({}) == 300
    finally:
        server.stop()
