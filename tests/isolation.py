"""The environment every test runs in (conftest's `isolated_env`), for fixtures of a wider
scope too: nothing from the developer's shell or .env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Every variable load_settings() (or a client library) reads.
ISOLATED_VARS = (
    "MONGODB_URI",
    "MONGODB_DB",
    "DB_USER",
    "DB_PASSWORD",
    "DB_CLUSTER_URL",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OLLAMA_HOST",
    "SIMULATOR_DATA_DIR",
    "SIMULATOR_ENV_FILE",
    "SIMULATOR_USER",
    "SIMULATOR_LOG_DIR",
    "SIMULATOR_DB_PORT",
    "SIMULATOR_DB_TIMEOUT_MS",
    "SIMULATOR_PROMPTS_DIR",
    "SIMULATOR_CONCURRENCY",
)


def isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MONGODB_URI, keys or .env from the developer's shell; data and logs in tmp_path."""
    names = set(ISOLATED_VARS) | {k for k in os.environ if k.startswith("SIMULATOR_")}
    for name in names:
        # setenv first so monkeypatch records the original state: delenv alone records
        # nothing for an absent variable, and a value the code under test exports
        # (load_settings exports OPENAI_API_KEY from .env) would leak into later tests.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    data_dir = tmp_path / "simulator-data"
    monkeypatch.setenv("SIMULATOR_DATA_DIR", str(data_dir))
    monkeypatch.setenv("SIMULATOR_ENV_FILE", str(tmp_path / "no-such.env"))
    monkeypatch.setenv("SIMULATOR_LOG_DIR", str(tmp_path / "logs"))
