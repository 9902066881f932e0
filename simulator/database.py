"""Connect to MongoDB: MONGODB_URI, or the embedded SecantusDB server, started once and shared."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import ConfigurationError, ConnectionFailure, OperationFailure, PyMongoError

from simulator.errors import StorageError
from simulator.settings import Settings, redact_uri, scrub_password, uri_hosts, uri_user

log = logging.getLogger(__name__)

APP_NAME = "llm-simulator"
_uri = "mongodb://127.0.0.1:{}/".format  # the embedded server's URI for a port
_AUTH_FAILED, _UNAUTHORIZED = 18, 13
# Every client `connect` made in this process, for close_clients (a command's fast exit).
_clients: weakref.WeakSet[MongoClient[dict[str, Any]]] = weakref.WeakSet()


def connect(settings: Settings) -> Database[dict[str, Any]]:
    """The configured database, checked with a ping; problems become a StorageError."""
    if settings.mongodb_uri:
        uri = settings.mongodb_uri
        unreachable = (
            f"Cannot reach MongoDB at {uri_hosts(uri)}: check MONGODB_URI in .env, "
            "or unset it to use the embedded database."
        )
    else:
        server = EmbeddedServer(settings.data_dir, port=settings.embedded_port)
        uri = server.ensure_running()
        unreachable = f"The embedded database at {uri} stopped answering: see {server.log_file}."
    log.info("connecting to %s (database %s)", redact_uri(uri), settings.mongodb_db)
    try:
        # Retryable writes stay as MONGODB_URI says (pymongo's default: on). The embedded
        # SecantusDB keeps a table of every retryable write (up to 10,000, for 30 minutes)
        # and scans it on each write: past a few thousand messages an insert costs 12-14 ms
        # instead of under 1 ms, so they are off for it. Our writes are idempotent by their
        # unique keys, so a retried one cannot duplicate.
        embedded: dict[str, Any] = {} if settings.mongodb_uri else {"retryWrites": False}
        client: MongoClient[dict[str, Any]] = MongoClient(
            uri, serverSelectionTimeoutMS=settings.db_timeout_ms, appname=APP_NAME, **embedded
        )
    except (ConfigurationError, ValueError) as e:  # bad URI, unknown option, SRV lookup
        # pymongo's message can quote the URI: scrub it, and drop the chained original.
        raise StorageError(
            f"MONGODB_URI ({redact_uri(uri)}) is not usable: {scrub_password(str(e), uri)}. "
            "Expected mongodb://user:password@host:port/ or mongodb+srv://user:password@cluster/."
        ) from None
    db = client[settings.mongodb_db]
    try:
        client.admin.command("ping")
        # A server with authentication answers ping to anyone; listing collections is
        # the cheapest command that tells whether we may actually use the database.
        db.command("listCollections", nameOnly=True, authorizedCollections=True)
    except PyMongoError as e:
        client.close()
        raise StorageError(_explain(e, uri, settings.mongodb_db, unreachable)) from None
    _clients.add(client)
    return db


def close_clients() -> None:
    """Close every client `connect` opened: the server is told the sessions ended and the
    connections close now, rather than when the interpreter tears down."""
    for client in list(_clients):
        client.close()


def _explain(e: PyMongoError, uri: str, db_name: str, unreachable: str) -> str:
    host, user = uri_hosts(uri), uri_user(uri)
    if isinstance(e, ConnectionFailure):
        return unreachable
    code = e.code if isinstance(e, OperationFailure) else None
    where = "in MONGODB_URI (or DB_USER/DB_PASSWORD)"
    if code == _AUTH_FAILED or "authentication failed" in str(e).lower():
        return (
            f"MongoDB at {host} refused the credentials for user {user}: check the user name "
            f"and password {where}."
        )
    if code == _UNAUTHORIZED and not user:
        return f"MongoDB at {host} requires authentication: put a user name and password {where}."
    if code == _UNAUTHORIZED:
        return (
            f"MongoDB user {user} may not use database {db_name} at {host}: grant it the "
            "readWrite role there, or choose another database with MONGODB_DB."
        )
    return f"MongoDB at {host} failed: {scrub_password(str(e), uri)}"


def current_user(db: Database[Any], settings: Settings) -> str:
    """The authenticated MongoDB user when the server uses authentication, else settings.user."""
    try:
        status = db.command("connectionStatus")
    except OperationFailure:
        return settings.user
    users = status.get("authInfo", {}).get("authenticatedUsers") or []
    return str(users[0]["user"]) if users else settings.user


# --- the embedded server -------------------------------------------------------------------

# Servers this process started, by pid: lets us reap them (os.kill(pid, 0) succeeds on a
# zombie child) and keeps their Popen objects from being collected while they run.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _pid_alive(pid: int) -> bool:
    if pid in _children:
        return _children[pid].poll() is None
    try:
        os.kill(pid, 0)
    except OSError:  # no such process, or another user's: not our server either way
        return False
    # A zombie keeps its pid; with no reaping init (containers) it may stay one for good.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in "ZX"
    return True


def _is_server_for(pid: int, storage_dir: Path) -> bool:
    """Whether `pid` is a secantusd serving `storage_dir` (pids are reused, e.g. after a boot)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        try:  # no /proc: macOS
            cmdline = subprocess.check_output(["ps", "-o", "command=", "-p", str(pid)], text=True)
        except (OSError, subprocess.SubprocessError):
            return True  # cannot tell: trust the state file
    return "secantus" in cmdline and str(storage_dir) in cmdline


def _listening(port: int) -> bool:
    # One connection also wakes a stopping secantusd's accept() thread, which closing the
    # listening socket does not on Linux (it would wait 2 s for that thread).
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _answers(uri: str, ms: int) -> bool:
    timeouts: dict[str, Any] = {"serverSelectionTimeoutMS": ms, "connectTimeoutMS": ms}
    with MongoClient(uri, directConnection=True, **timeouts) as client:
        try:
            client.admin.command("ping")
        except PyMongoError:
            return False
    return True


@dataclass
class EmbeddedServer:
    """A SecantusDB server on `data_dir`, a detached process shared by every command.

    Layout: db/ (WiredTiger files), server.json (pid, port, started_at), server.log,
    server.lock, secantusd.toml.
    """

    data_dir: Path
    port: int = 0  # 0: any free port
    start_timeout: float = 20.0
    ping_timeout_ms: int = 2000

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().absolute()  # pids outlive a chdir
        self.storage_dir, self.log_file = self.data_dir / "db", self.data_dir / "server.log"
        self.state_file = self.data_dir / "server.json"

    def ensure_running(self) -> str:
        """The URI of the running server; starts one if there is none."""
        with self._lock():
            state = self._read_state()
            if state and self._alive(state["pid"]):
                if _answers(_uri(state["port"]), self.ping_timeout_ms):
                    return _uri(state["port"])
                raise StorageError(
                    f"The embedded database server (pid {state['pid']}) is running but does not "
                    f"answer on port {state['port']}: see {self.log_file}. Stop it (`simulator "
                    f"db stop` or `kill {state['pid']}`) and try again."
                )
            self.state_file.unlink(missing_ok=True)
            return self._start()

    def status(self) -> dict[str, Any]:
        """running, pid, port, uri, data_dir, log_file, size_bytes."""
        state = self._read_state() or {}
        files = self.data_dir.rglob("*") if self.data_dir.is_dir() else ()
        return {
            "running": bool(state)
            and self._alive(state["pid"])
            and _answers(_uri(state["port"]), self.ping_timeout_ms),
            "pid": state.get("pid"),
            "port": state.get("port"),
            "uri": _uri(state["port"]) if state else None,
            "data_dir": str(self.data_dir),
            "log_file": str(self.log_file),
            "size_bytes": sum(p.stat().st_size for p in files if p.is_file()),
        }

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM, then SIGKILL after `timeout` seconds; whether a server was running."""
        if not self.state_file.exists():
            return False
        with self._lock():
            state = self._read_state()
            self.state_file.unlink(missing_ok=True)
            if not state or not self._alive(state["pid"]):
                return False
            pid, port, sent, killed = state["pid"], state["port"], 0.0, False
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline + 5:
                with contextlib.suppress(ProcessLookupError):
                    if time.monotonic() > deadline:
                        killed = True
                        os.kill(pid, signal.SIGKILL)
                    elif _listening(port) and time.monotonic() - sent > 0.25:
                        # CPython runs signal handlers in the main thread only; a SIGTERM the
                        # kernel gives another thread leaves secantusd's main thread asleep in
                        # Event.wait(). So repeat it until the server starts closing its port.
                        os.kill(pid, signal.SIGTERM)  # secantusd then closes WiredTiger cleanly
                        sent = time.monotonic()
                time.sleep(0.05)
            _children.pop(pid, None)
            if killed:
                log.warning("embedded server %d ignored SIGTERM for %.0f s: killed", pid, timeout)
            return True

    def _alive(self, pid: int) -> bool:
        return _pid_alive(pid) and _is_server_for(pid, self.storage_dir)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive across processes, so two commands starting at once share one server."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "server.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            yield

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_file.read_text())
            return {**state, "pid": int(state["pid"]), "port": int(state["port"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or torn: no server

    def _start(self) -> str:
        with socket.socket() as probe:  # a free port; the server binds it a moment later
            probe.bind(("127.0.0.1", 0))
            port = self.port or int(probe.getsockname()[1])
        config = self.data_dir / "secantusd.toml"
        if not config.exists():  # passing one stops secantusd looking for ./secantusd.toml etc.
            config.write_text("# Options for the embedded server; flags given by simulator win.\n")
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        # The console script beside our Python (not shutil.which(): maybe another version), else
        # `-m secantus` (not `-m secantus.cli`: it has no main guard and would exit silently).
        script = Path(sys.executable).with_name("secantusd-py")
        exe = [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "secantus"]
        cmd = [*exe, "--config", str(config), "--storage-path", str(self.storage_dir)]
        cmd += f"--host 127.0.0.1 --port {port} --log-level WARNING".split()
        # Without it, a server killed with SIGKILL (or a machine losing power) forgets writes
        # it had acknowledged: 41 of 300 inserts in a test here. It doubles the cost of an
        # insert (about 1 -> 2 ms), which batches can afford; losing stored messages they cannot.
        cmd.append("--sync-on-commit")
        with open(self.log_file, "ab", buffering=0) as out:  # unbuffered: shared with the child
            out.write(f"--- {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {' '.join(cmd)}\n".encode())
            offset = out.tell()
            # A session of its own keeps the server out of the terminal's process group: Ctrl-C
            # on a batch must not stop the server that another terminal is using.
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=self.data_dir,
                start_new_session=True,
            )
        _children[proc.pid] = proc
        log.info("started the embedded server, pid %d, port %d", proc.pid, port)
        deadline = time.monotonic() + self.start_timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers(_uri(port), 250):
                now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                tmp = self.state_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"pid": proc.pid, "port": port, "started_at": now}))
                tmp.replace(self.state_file)  # atomic: readers never see half a file
                return _uri(port)
            time.sleep(0.05)
        proc.kill()  # a no-op when it has exited
        proc.wait()
        _children.pop(proc.pid, None)
        with open(self.log_file, "rb") as f:
            f.seek(offset)
            output = f.read().decode(errors="replace").strip()
        if "resource busy" in output.lower():  # WiredTiger's lock: one server per directory
            raise StorageError(
                f"Another process holds the embedded database in {self.storage_dir}: probably an "
                f"earlier server whose {self.state_file.name} was lost. Find it with "
                "`pgrep -af secantusd` and stop it."
            )
        why = output.splitlines()[-1][:200] if output else f"no answer in {self.start_timeout} s"
        raise StorageError(f"The embedded database did not start ({why}): see {self.log_file}.")
