"""Shared fixtures: one real SecantusDB server per session, a fresh database per test,
and an environment that cannot see the developer's own configuration."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database
from secantus import SecantusDBServer

from simulator.database import EmbeddedServer
from simulator.settings import Settings, load_settings
from tests.isolation import isolate


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No MONGODB_URI, keys or .env from the developer's shell; data and logs in tmp_path."""
    isolate(monkeypatch, tmp_path)
    yield
    # An embedded server started by the test (in data_dir or a data dir of its own under
    # tmp_path, by a subprocess too) would outlive the suite: stop it.
    for state in tmp_path.rglob("server.json"):
        EmbeddedServer(state.parent).stop(timeout=5.0)


def _stop(server: SecantusDBServer) -> None:
    # SecantusDBServer.stop() waits 2 s for its accept() thread, which closing the listening
    # socket does not wake on Linux; one connection does.
    address = server.address  # gone once stop() has closed the socket

    def poke() -> None:
        with contextlib.suppress(OSError):
            socket.create_connection(address, timeout=0.5).close()

    threading.Timer(0.1, poke).start()
    server.stop()


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URI of one in-process SecantusDB server shared by the whole session."""
    storage = tmp_path_factory.mktemp("secantus")
    server = SecantusDBServer(host="127.0.0.1", port=0, storage_path=str(storage))
    server.start()
    # Without retryable writes, as the embedded server is used: SecantusDB scans a table of
    # every retryable write on each write, which made the suite's later tests ever slower.
    yield f"{server.uri.rstrip('/')}/?retryWrites=false"
    _stop(server)


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a server requiring SCRAM authentication; user "bob", password "right-pw"."""
    storage = str(tmp_path_factory.mktemp("secantus-auth"))
    # As with `secantusd-py --auth`: create the user without authentication, then restart.
    plain = SecantusDBServer(host="127.0.0.1", port=0, storage_path=storage)
    plain.start()
    with MongoClient[dict[str, Any]](plain.uri) as client:
        client.admin.command("createUser", "bob", pwd="right-pw", roles=["root"])
    _stop(plain)
    server = SecantusDBServer(host="127.0.0.1", port=0, storage_path=storage, require_auth=True)
    server.start()
    yield "{}:{}".format(*server.address)
    _stop(server)


@pytest.fixture(scope="session")
def mongo_client(mongo_server: str) -> Iterator[MongoClient[dict[str, Any]]]:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_server, serverSelectionTimeoutMS=5000)
    yield client
    client.close()


@pytest.fixture
def db(mongo_client: MongoClient[dict[str, Any]]) -> Iterator[Database[dict[str, Any]]]:
    """A database of its own for this test, dropped afterwards."""
    database = mongo_client[f"test_{uuid.uuid4().hex[:12]}"]
    yield database
    mongo_client.drop_database(database.name)


@pytest.fixture
def settings(isolated_env: None, mongo_server: str, db: Database[Any]) -> Settings:
    """Settings pointing at the session server and this test's database, as user alice."""
    return load_settings(mongodb_uri=mongo_server, mongodb_db=db.name, user="alice")


@pytest.fixture
def env_for() -> Callable[[Settings], dict[str, str]]:
    """env_for(settings): variables that make the CLI (CliRunner or a subprocess) use them.

    Data dir, logs and .env are included so a subprocess given only these stays isolated too.
    """

    def env(settings: Settings) -> dict[str, str]:
        values = {
            "MONGODB_DB": settings.mongodb_db,
            "SIMULATOR_USER": settings.user,
            "SIMULATOR_DATA_DIR": str(settings.data_dir),
            "SIMULATOR_LOG_DIR": str(settings.log_dir),
            "SIMULATOR_ENV_FILE": os.environ.get(
                "SIMULATOR_ENV_FILE", str(settings.data_dir / "no-such.env")
            ),
        }
        if settings.mongodb_uri:
            values["MONGODB_URI"] = settings.mongodb_uri
        return values

    return env
