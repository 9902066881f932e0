"""Providers against a local fake server, through the real ollama and openai clients (SPEC §6-7)."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator

import pytest
from servers import FakeLLMServer, count_tokens, echo_reply, write_experiment

import simulator.llm.openai as openai_provider
from simulator.errors import (
    ModelNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderUnavailable,
    RetryAfterTooLong,
    UserError,
    ValidationError,
)
from simulator.experiment import ModelSpec
from simulator.llm.base import ChatMessage
from simulator.llm.ollama import OllamaModel, resolve_host
from simulator.llm.openai import OpenAIModel, unsupported_parameters
from simulator.llm.registry import (
    DEFAULT_CONCURRENCY,
    ModelPool,
    create_model,
    endpoint_key,
    preflight,
)
from simulator.llm.retry import RetryingModel, RetryPolicy, parse_retry_after

NO_WAIT = RetryPolicy(attempts=3, base_delay=0)

# What a model sees when Guard_117 speaks (SPEC §3): system, then alternating turns with
# the speaker's name inside the text.
MESSAGES: list[ChatMessage] = [
    {"role": "system", "content": "You are a guard."},
    {"role": "user", "content": "Researcher: Start"},
    {"role": "assistant", "content": "Guard_117: Line up."},
    {"role": "user", "content": "Prisoner_221: No.\nPrisoner_305: Why?"},
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OLLAMA_HOST", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    # The top_k warning is once per process; each test starts from a fresh process state.
    monkeypatch.setattr(openai_provider, "_warned", set())


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ollama_spec(server: FakeLLMServer, model: str = "llama3", **kw: object) -> ModelSpec:
    return ModelSpec(model, provider="ollama", base_url=server.url, **kw)  # type: ignore[arg-type]


def openai_spec(server: FakeLLMServer, model: str = "gpt-4o-mini", **kw: object) -> ModelSpec:
    return ModelSpec(model, provider="openai", base_url=server.openai_url, **kw)  # type: ignore[arg-type]


# -- what arrives at the server ---------------------------------------------------


def test_ollama_sends_model_messages_and_every_option(server: FakeLLMServer) -> None:
    spec = ollama_spec(
        server,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        seed=7,
        context_length=4096,
        max_tokens=64,
        extra={"repeat_penalty": 1.2},
    )
    reply = OllamaModel(spec).chat(MESSAGES, stop=["Prisoner_221:"])

    body = server.bodies("/api/chat")[-1]
    assert body["model"] == "llama3:latest"
    assert body["stream"] is False
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in body["messages"]] == [m["content"] for m in MESSAGES]
    assert body["options"] == {
        "temperature": 0.7,
        "top_k": 40,
        "top_p": 0.9,
        "seed": 7,
        "num_ctx": 4096,
        "num_predict": 64,
        "repeat_penalty": 1.2,
        "stop": ["Prisoner_221:"],
    }
    assert reply.text == echo_reply(body) == "I hear you: Prisoner_305: Why?"
    assert reply.prompt_tokens == sum(count_tokens(m["content"]) for m in MESSAGES)
    assert reply.completion_tokens == count_tokens(reply.text)
    assert reply.latency > 0


def test_ollama_sends_only_the_options_that_are_set(server: FakeLLMServer) -> None:
    OllamaModel(ollama_spec(server, temperature=0.0)).chat(MESSAGES)
    OllamaModel(ollama_spec(server, temperature=0.0)).chat(MESSAGES)  # on every request
    assert [b["options"] for b in server.bodies("/api/chat")] == [{"temperature": 0.0}] * 2


def test_openai_sends_sampling_but_not_top_k(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    spec = openai_spec(
        server,
        temperature=0.5,
        top_k=40,
        top_p=0.8,
        seed=3,
        max_tokens=32,
        extra={"repeat_penalty": 1.3},
    )
    model = OpenAIModel(spec)
    with caplog.at_level(logging.INFO, logger="simulator.llm.openai"):
        reply = model.chat(MESSAGES, stop=["Researcher:"])
        model.chat(MESSAGES)

    body = server.bodies("/v1/chat/completions")[0]
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"] == MESSAGES
    assert {k: body[k] for k in ("temperature", "top_p", "seed", "max_tokens", "stop")} == {
        "temperature": 0.5,
        "top_p": 0.8,
        "seed": 3,
        "max_tokens": 32,
        "stop": ["Researcher:"],
    }
    assert body["repeat_penalty"] == 1.3  # extra_body, for llama.cpp / vLLM servers
    assert "top_k" not in body
    assert server.bodies("/v1/chat/completions")[1]["temperature"] == 0.5
    warnings = [r.getMessage() for r in caplog.records if "top_k" in r.getMessage()]
    assert len(warnings) == 1 and "not sent" in warnings[0]
    assert unsupported_parameters(spec) == ["top_k"]
    assert reply.prompt_tokens == sum(count_tokens(m["content"]) for m in MESSAGES)
    assert reply.completion_tokens == count_tokens(reply.text) > 0


def test_openai_gets_at_most_four_stop_sequences(server: FakeLLMServer) -> None:
    stops = [f"\nAgent_{i:03d}:" for i in range(6)]
    OpenAIModel(openai_spec(server)).chat(MESSAGES, stop=stops)
    assert server.bodies("/v1/chat/completions")[0]["stop"] == stops[:4]


def test_openai_itself_gets_no_extra_body() -> None:
    spec = ModelSpec("gpt-4o", extra={"repeat_penalty": 1.3}, context_length=8000)
    assert "extra_body" not in OpenAIModel(spec).request(MESSAGES)
    assert unsupported_parameters(spec) == ["context_length", "repeat_penalty"]


def test_openai_without_key_says_to_set_it() -> None:
    model = OpenAIModel(ModelSpec("gpt-4o-mini"))
    with pytest.raises(ProviderAuthError, match=r"OPENAI_API_KEY.*\.env"):
        model.chat(MESSAGES)


def test_openai_rejected_key_is_not_echoed(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.api_key = "right-key"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-secret")
    with pytest.raises(ProviderAuthError) as info:
        OpenAIModel(openai_spec(server)).chat(MESSAGES)
    assert "OPENAI_API_KEY" in str(info.value) and "sk-wrong-secret" not in str(info.value)
    assert info.value.retryable is False

    monkeypatch.setenv("OPENAI_API_KEY", "right-key")
    assert OpenAIModel(openai_spec(server)).chat(MESSAGES).text


def test_openai_missing_model(server: FakeLLMServer) -> None:
    with pytest.raises(ModelNotFound, match="no-such-model"):
        OpenAIModel(openai_spec(server, "no-such-model")).chat(MESSAGES)


# -- retries -----------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_429_retry_after_is_honoured(server: FakeLLMServer, provider: str) -> None:
    server.retry_after = 2
    server.fail_next(429)
    spec = ollama_spec(server) if provider == "ollama" else openai_spec(server)
    sleeps: list[float] = []
    seen: list[tuple[float | None, int, float]] = []
    model = RetryingModel(
        create_model(spec),
        RetryPolicy(attempts=3, base_delay=0.01, jitter=0),
        sleep=sleeps.append,
        on_retry=lambda err, attempt, delay: seen.append((err.retry_after, attempt, delay)),
    )
    reply = model.chat(MESSAGES)
    assert reply.retries == 1 and reply.text
    assert seen == [(2.0, 1, 2.0)]
    assert sleeps == [2.0]
    assert server.calls == 2


@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_5xx_past_the_attempt_limit_raises_with_retries(
    server: FakeLLMServer, provider: str
) -> None:
    server.fail_next(500, 503, 500, 500)
    spec = ollama_spec(server) if provider == "ollama" else openai_spec(server)
    sleeps: list[float] = []
    with pytest.raises(ProviderError) as info:
        RetryingModel(create_model(spec), NO_WAIT, sleep=sleeps.append).chat(MESSAGES)
    assert info.value.retryable and info.value.retries == 2  # type: ignore[attr-defined]
    assert server.calls == 3 and sleeps == []  # base_delay=0 never sleeps


@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_missing_model_is_not_retried(server: FakeLLMServer, provider: str) -> None:
    spec = ollama_spec(server, "absent") if provider == "ollama" else openai_spec(server, "absent")
    with pytest.raises(ModelNotFound) as info:
        RetryingModel(create_model(spec), NO_WAIT).chat(MESSAGES)
    assert info.value.retries == 0 and server.calls == 1  # type: ignore[attr-defined]
    assert "absent" in str(info.value)


@pytest.mark.parametrize("provider", ["ollama", "openai"])
@pytest.mark.parametrize("down_mode", ["close", "503"])
def test_server_down_then_back_is_retried(
    server: FakeLLMServer, provider: str, down_mode: str
) -> None:
    server.down, server.down_mode = True, down_mode
    spec = ollama_spec(server) if provider == "ollama" else openai_spec(server)

    def back_up(error: ProviderError, attempt: int, delay: float) -> None:
        assert error.retryable
        server.down = False

    reply = RetryingModel(create_model(spec), NO_WAIT, on_retry=back_up).chat(MESSAGES)
    assert reply.retries == 1 and reply.text


def test_random_faults_are_all_absorbed_by_retries() -> None:
    with FakeLLMServer(fail_rate=0.4, seed=1) as fake:
        model = RetryingModel(
            create_model(ollama_spec(fake)), RetryPolicy(attempts=10, base_delay=0)
        )
        retries = sum(model.chat(MESSAGES).retries for _ in range(20))
    assert retries == fake.calls - 20 > 0


@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_retry_after_over_the_cap_is_not_waited(server: FakeLLMServer, provider: str) -> None:
    server.retry_after = 3600
    server.fail_next(429)
    spec = ollama_spec(server) if provider == "ollama" else openai_spec(server)
    sleeps: list[float] = []
    model = RetryingModel(create_model(spec), RetryPolicy(max_delay=30), sleep=sleeps.append)
    with pytest.raises(RetryAfterTooLong) as info:
        model.chat(MESSAGES)
    assert sleeps == [] and server.calls == 1
    assert not info.value.retryable and info.value.retries == 0  # type: ignore[attr-defined]
    assert "asked to wait 3600 s" in str(info.value)


def test_request_timeout_reaches_the_clients_and_the_llms_own_wins(server: FakeLLMServer) -> None:
    pool = ModelPool(RetryPolicy(timeout=7))
    assert pool.get(ollama_spec(server)).inner.timeout == 7  # type: ignore[attr-defined]
    own = openai_spec(server, extra={"timeout": 300})
    assert pool.get(own).inner.timeout == 300  # type: ignore[attr-defined]
    assert pool.get(openai_spec(server)).inner._client().timeout == 7  # type: ignore[attr-defined]


def test_retry_policy_backoff() -> None:
    policy = RetryPolicy(base_delay=1, max_delay=4, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [1, 2, 4, 4, 4]
    assert policy.delay(1, retry_after=10) == 10  # a server's Retry-After wins when longer
    assert RetryPolicy(base_delay=0).delay(3, retry_after=10) == 0
    jittered = [RetryPolicy(base_delay=1, jitter=0.5).delay(1) for _ in range(50)]
    assert all(0.5 <= d <= 1.5 for d in jittered) and len(set(jittered)) > 1


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# -- Ollama model management -------------------------------------------------------


def test_ollama_not_running() -> None:
    model = OllamaModel(ModelSpec("llama3", base_url=f"127.0.0.1:{closed_port()}"))
    with pytest.raises(ProviderUnavailable) as info:
        model.check()
    message = str(info.value)
    # its own base_url is used, not OLLAMA_HOST: the message points at the former
    assert model.host in message and "ollama serve" in message and "base_url" in message
    assert "OLLAMA_HOST" not in message
    with pytest.raises(ProviderUnavailable) as info:
        model.chat(MESSAGES)
    assert info.value.retryable


def test_ollama_not_running_at_ollama_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{closed_port()}")
    with pytest.raises(ProviderUnavailable) as info:
        OllamaModel(ModelSpec("llama3")).check()
    assert "ollama serve" in str(info.value) and "set OLLAMA_HOST" in str(info.value)


def test_ollama_host_from_environment(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{server.port}")
    model = OllamaModel(ModelSpec("llama3"))
    assert model.host == server.url and model.endpoint == f"ollama:{server.url}"
    assert model.chat(MESSAGES).text


def test_resolve_host() -> None:
    assert resolve_host(None) == "http://127.0.0.1:11434"
    assert resolve_host("0.0.0.0") == "http://127.0.0.1:11434"
    assert resolve_host("gpu-box:8080/") == "http://gpu-box:8080"
    assert resolve_host("https://ollama.example.org") == "https://ollama.example.org:443"


def test_ollama_check_and_list(server: FakeLLMServer) -> None:
    assert OllamaModel(ollama_spec(server)).list_models() == sorted(server.installed)
    OllamaModel(ollama_spec(server)).check()
    with pytest.raises(ModelNotFound, match=r"ollama pull mistral:latest"):
        OllamaModel(ollama_spec(server, "mistral")).check()


def test_preflight_pulls_missing_model_with_progress(server: FakeLLMServer) -> None:
    progress: list[tuple[str, int, int, str]] = []
    preflight([ollama_spec(server, "mistral"), ollama_spec(server)], lambda *a: progress.append(a))
    assert server.bodies("/api/pull") == [
        {"model": "mistral:latest", "insecure": False, "stream": True}
    ]
    assert "mistral:latest" in server.installed
    assert ("ollama/mistral:latest", 300, 300, "pulling abababababab") in progress
    assert progress[-1][3] == "success"


def test_run_shows_the_pull_of_a_missing_model(tmp_path, settings, env_for) -> None:
    """`simulator run` pulls a missing Ollama model before the batch and shows it (plain: a
    line per step of the pull), then runs the batch on it."""
    from typer.testing import CliRunner

    from simulator.cli import app

    with FakeLLMServer(models=set()) as fake:
        yaml = write_experiment(
            tmp_path / "pull.yaml", f"{{model: mistral, provider: ollama, base_url: '{fake.url}'}}"
        )
        args = ["run", yaml, "--messages", "2", "--days", "1", "--plain"]
        result = CliRunner().invoke(app, args, env=env_for(settings))
        pulls, chats = fake.bodies("/api/pull"), fake.calls
    assert result.exit_code == 0, result.output
    assert [p["model"] for p in pulls] == ["mistral:latest"] and chats >= 2
    shown = [
        line for line in result.output.splitlines() if line.startswith("ollama/mistral:latest:")
    ]
    assert shown[0] == "ollama/mistral:latest: pulling manifest", result.output
    assert shown[-1] == "ollama/mistral:latest: success" and len(shown) == 7, result.output


def test_preflight_stops_on_unpullable_model(server: FakeLLMServer) -> None:
    server.unpullable.add("nonsense:latest")
    with pytest.raises(ModelNotFound, match=r"nonsense:latest.*file does not exist"):
        preflight([ollama_spec(server, "nonsense")])


def test_preflight_openai(server: FakeLLMServer) -> None:
    warnings = preflight([openai_spec(server, top_k=5)])
    assert len(warnings) == 1 and "top_k" in warnings[0]
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(ProviderUnavailable, match=url):
        preflight([ModelSpec("gpt-4o-mini", base_url=url)])
    with pytest.raises(ProviderAuthError):
        preflight([ModelSpec("gpt-4o-mini")])


def test_run_says_once_what_it_cannot_send(server, tmp_path, settings, env_for) -> None:
    """top_k on an OpenAI-compatible endpoint: one warning in `run`'s output (it was three:
    the check's log line, its warning, and the provider's at the first call)."""
    from typer.testing import CliRunner

    from simulator.cli import app

    yaml = write_experiment(
        tmp_path / "top_k.yaml",
        f"{{model: gpt-4o-mini, provider: openai, top_k: 5, base_url: '{server.openai_url}'}}",
    )
    env = {**env_for(settings), "OPENAI_API_KEY": "sk-test"}
    args = ["run", yaml, "--messages", "2", "--days", "1", "--plain"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert result.output.count("top_k cannot") + result.output.count("top_k not") == 1
    assert "Warning: openai/gpt-4o-mini: top_k cannot be sent" in result.output


def test_preflight_names_every_llm_that_cannot_be_used(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run --llm all` with Ollama down and no OpenAI key: both problems in one error (it
    named the first only; fixing it then revealed the next); a usable LLM is not named."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    down = ModelSpec("llama3", base_url=f"127.0.0.1:{closed_port()}")
    with pytest.raises(UserError) as info:
        preflight([down, ollama_spec(server), ModelSpec("gpt-4o-mini")])
    message = str(info.value)
    assert message.startswith("2 LLMs cannot be used yet:\n"), message
    lines = message.splitlines()[1:]
    assert len(lines) == 2 and lines[0].startswith("- ollama/llama3:latest: Cannot reach Ollama")
    assert lines[1].startswith("- openai/gpt-4o-mini: ") and "OPENAI_API_KEY" in lines[1]


def test_preflight_llamacpp_missing_file(tmp_path: object) -> None:
    spec = ModelSpec("local", provider="llamacpp", extra={"path": f"{tmp_path}/none.gguf"})
    with pytest.raises(UserError):  # not installed here, or the file is missing
        preflight([spec])


# -- registry and concurrency ------------------------------------------------------


def test_create_model_and_endpoint_keys(server: FakeLLMServer) -> None:
    assert isinstance(create_model(ModelSpec("llama3")), OllamaModel)
    assert isinstance(create_model(ModelSpec("gpt-4o")), OpenAIModel)
    assert endpoint_key(ModelSpec("llama3")) == "ollama:http://127.0.0.1:11434"
    assert endpoint_key(ModelSpec("gpt-4o")) == "openai:https://api.openai.com/v1"
    assert endpoint_key(openai_spec(server)) == f"openai:{server.openai_url}"
    assert (
        endpoint_key(ModelSpec("x", provider="llamacpp", extra={"path": "/m.gguf"}))
        == "llamacpp:/m.gguf"
    )
    assert endpoint_key(ModelSpec("x", provider="scripted")) == "scripted"
    assert create_model(ModelSpec("x", provider="scripted")).chat(MESSAGES).text
    assert create_model(ollama_spec(server)).endpoint == endpoint_key(ollama_spec(server))
    assert DEFAULT_CONCURRENCY == {"ollama": 4, "openai": 16, "llamacpp": 1, "scripted": 32}
    with pytest.raises(ValidationError, match="ollama, openai, scripted, llamacpp"):
        create_model(ModelSpec("x", provider="bard"))


def test_pool_reuses_models_and_shares_endpoint_limit(server: FakeLLMServer) -> None:
    pool = ModelPool(NO_WAIT)
    a = pool.get(ollama_spec(server, temperature=0.1))
    assert pool.get(ollama_spec(server, temperature=0.1)) is a
    b = pool.get(ollama_spec(server, temperature=0.9))  # own sampling, same endpoint
    assert b is not a and b.limiter is a.limiter
    assert pool.limit(ollama_spec(server)) == 4
    assert pool.get(openai_spec(server)).limiter is not a.limiter


def run_threads(n: int, target: object) -> None:
    threads = [threading.Thread(target=target) for _ in range(n)]  # type: ignore[arg-type]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_limiter_bounds_requests_in_flight(server: FakeLLMServer) -> None:
    server.latency = 0.1
    model = ModelPool(NO_WAIT, concurrency=2).get(ollama_spec(server))
    run_threads(6, lambda: model.chat(MESSAGES))
    assert server.calls == 6 and server.peak_in_flight == 2


def test_without_limiter_requests_overlap(server: FakeLLMServer) -> None:
    """Shows the server's in-flight counter does see concurrency (so the test above means something)."""
    server.latency = 0.1
    model = create_model(ollama_spec(server))
    run_threads(6, lambda: model.chat(MESSAGES))
    assert server.peak_in_flight > 2


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_preflight_gives_up_quickly_on_an_endpoint_that_never_answers(
    provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import simulator.llm.registry as registry

    monkeypatch.setattr(registry, "PREFLIGHT_TIMEOUT", 0.5)
    with socket.socket() as silent:  # accepts connections (backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        spec = (
            ModelSpec("m", "openai", base_url=f"{url}/v1")
            if provider == "openai"
            else ModelSpec("m", "ollama", base_url=url)
        )
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable) as info:
            registry.preflight([spec])
        assert time.monotonic() - started < 10
    assert spec.label in str(info.value) or url in str(info.value)
