"""Providers by name, one adaptive in-flight limit per endpoint (an LLM may have several),
and the checks run before a batch."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from simulator.errors import (
    ModelNotFound,
    ProviderError,
    ProviderUnavailable,
    UserError,
    ValidationError,
)
from simulator.experiment import PROVIDERS, ModelSpec
from simulator.llm.base import ChatModel
from simulator.llm.retry import EndpointLimit, OnRetry, RetryingModel, RetryPolicy

log = logging.getLogger(__name__)

# Requests in flight per endpoint: a local Ollama serialises generation anyway (a few
# parallel slots), hosted APIs take more, an in-process llama.cpp model exactly one.
DEFAULT_CONCURRENCY = {"ollama": 4, "openai": 16, "llamacpp": 1, "scripted": 32}

PreflightProgress = Callable[[str, int, int, str], None]  # (model label, completed, total, status)


def _check_provider(spec: ModelSpec) -> None:
    if spec.provider not in PROVIDERS:
        raise ValidationError(
            f"Unknown LLM provider {spec.provider!r} for {spec.model}: use one of {', '.join(PROVIDERS)}"
        )


def split_endpoints(spec: ModelSpec) -> list[ModelSpec]:
    """One spec per endpoint of `spec` (an LLM with a list of base URLs has several)."""
    urls = spec.base_urls()
    if len(urls) == 1:
        return [spec]
    return [dataclasses.replace(spec, base_url=url) for url in urls]


def create_model(spec: ModelSpec, timeout: float | None = None) -> ChatModel:
    """A new provider instance for `spec`, which has one endpoint (see split_endpoints).
    No I/O: clients connect on first use.

    `timeout`: seconds one HTTP request may take (the LLM's own `timeout:` wins). llama.cpp
    runs in this process and cannot be interrupted, so it has none.
    """
    _check_provider(spec)
    assert len(spec.base_urls()) == 1, "one endpoint per provider instance (split_endpoints)"
    if spec.provider == "ollama":
        from simulator.llm.ollama import OllamaModel

        return OllamaModel(spec, timeout=spec.extra.get("timeout") or timeout)
    if spec.provider == "openai":
        from simulator.llm.openai import OpenAIModel

        return OpenAIModel(spec, timeout=spec.extra.get("timeout") or timeout)
    if spec.provider == "llamacpp":
        from simulator.llm.llamacpp import LlamaCppModel

        return LlamaCppModel(spec)
    from simulator.llm.scripted import ScriptedModel

    return ScriptedModel(spec)


def endpoint_key(spec: ModelSpec) -> str:
    """Which server(s) a spec talks to, e.g. "ollama:http://127.0.0.1:11434" (comma-separated
    when it lists several base URLs)."""
    _check_provider(spec)
    singles = split_endpoints(spec)
    if len(singles) > 1:
        return ",".join(endpoint_key(s) for s in singles)
    if spec.provider == "ollama":
        from simulator.llm.ollama import resolve_host

        return f"ollama:{resolve_host(spec.url)}"
    if spec.provider == "openai":
        from simulator.llm.openai import resolve_base_url

        return f"openai:{resolve_base_url(spec.url)[0]}"
    if spec.provider == "llamacpp":
        from simulator.llm.llamacpp import resolve_path

        return f"llamacpp:{resolve_path(spec) or spec.extra.get('path') or 'smollm2'}"
    return "scripted"


def _instance_key(spec: ModelSpec) -> str:
    # The label alone is not enough: two experiments may use one model with different
    # sampling parameters, and each must keep its own.
    return json.dumps(asdict(spec), sort_keys=True, default=str)


# Seconds an endpoint gets to answer the checks before a batch: a listing answers at once
# when the server is up (pulling a missing Ollama model has the request timeout).
PREFLIGHT_TIMEOUT = 5.0


class ModelPool:
    """Hands out retrying models that share one adaptive in-flight limit per endpoint."""

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        concurrency: int | None = None,
        *,
        on_retry: OnRetry | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.policy = policy or RetryPolicy()
        self.concurrency = concurrency
        self.on_retry = on_retry
        self.sleep = sleep
        self._limiters: dict[str, EndpointLimit] = {}
        self._models: dict[str, RetryingModel] = {}
        self._lock = threading.Lock()
        # One condition for every endpoint: a call spread over several waits for any of them.
        self._cond = threading.Condition()

    def ceiling(self, spec: ModelSpec) -> int:
        """Requests allowed in flight at once on each endpoint of `spec` (--concurrency)."""
        return self.concurrency or DEFAULT_CONCURRENCY[spec.provider]

    def limit(self, spec: ModelSpec) -> int:
        """Requests allowed in flight at once over all the endpoints of `spec`."""
        return self.ceiling(spec) * len(spec.base_urls())

    def limiters(self, spec: ModelSpec) -> list[EndpointLimit]:
        """The limit of each endpoint of `spec`, shared with every model on that endpoint."""
        out = []
        for single in split_endpoints(spec):
            key = endpoint_key(single)
            with self._lock:
                if key not in self._limiters:
                    self._limiters[key] = EndpointLimit(
                        key, self.ceiling(single), self.policy.start_concurrency, self._cond
                    )
                out.append(self._limiters[key])
        return out

    def limiter(self, spec: ModelSpec) -> EndpointLimit:
        """The limit of the (first) endpoint of `spec`."""
        return self.limiters(spec)[0]

    def endpoint_limits(self) -> list[EndpointLimit]:
        """Every endpoint used so far, with its current limit and history."""
        with self._lock:
            return list(self._limiters.values())

    def get(self, spec: ModelSpec) -> RetryingModel:
        """The shared retrying model for `spec` (created on first request)."""
        limiters = self.limiters(spec)
        key = _instance_key(spec)
        with self._lock:
            if key not in self._models:
                self._models[key] = RetryingModel(
                    [create_model(s, timeout=self.policy.timeout) for s in split_endpoints(spec)],
                    self.policy,
                    limiters,
                    sleep=self.sleep,
                    on_retry=self.on_retry,
                )
            return self._models[key]


def preflight(
    specs: Iterable[ModelSpec], pull_progress: PreflightProgress | None = None
) -> list[str]:
    """Make sure every LLM can be used before a batch starts; return warnings to show.

    One check per endpoint, all endpoints at once, each with PREFLIGHT_TIMEOUT (issue 14):
    Ollama: reachable (one listing), missing models pulled (ModelNotFound when a pull
    fails). OpenAI: key present, endpoint reachable (one listing), models listed. llama.cpp:
    package importable and file present. Raises ProviderUnavailable / ModelNotFound /
    ProviderAuthError / UserError for an LLM that cannot be used; a UserError listing them
    all when several cannot.
    """
    endpoints: dict[str, list[ModelSpec]] = {}
    seen: set[str] = set()
    for spec in (single for s in specs for single in split_endpoints(s)):
        key = _instance_key(spec)
        if key in seen:
            continue
        seen.add(key)
        # Specs of one endpoint share its check; an OpenAI one per key (api_key_env) too.
        where = endpoint_key(spec)
        if spec.provider == "openai":
            where += f" {spec.extra.get('api_key_env') or ''}"
        endpoints.setdefault(where, []).append(spec)
    groups = list(endpoints.values())
    if len(groups) <= 1:
        outcomes = [_check_endpoint(group, pull_progress) for group in groups]
    else:
        with ThreadPoolExecutor(len(groups), thread_name_prefix="preflight") as pool:
            outcomes = list(pool.map(lambda g: _check_endpoint(g, pull_progress), groups))
    warnings: list[str] = []
    failed: list[tuple[ModelSpec, UserError]] = []
    for outcome in outcomes:
        if isinstance(outcome, _Failed):
            spec, e = outcome.spec, outcome.error
            if not isinstance(e, UserError):
                # A timeout or a 5xx while checking: say so before the batch, not as a
                # traceback.
                e = ProviderUnavailable(
                    f"{spec.label} is not usable yet: {e}. Check that its server is up and "
                    "answering, then run the command again."
                )
            failed.append((spec, e))
        else:
            warnings += outcome
    if len(failed) == 1:
        raise failed[0][1] from None
    if failed:  # every problem at once: fixing one must not only reveal the next
        problems = "\n".join(f"- {spec.label}: {e}" for spec, e in failed)
        message = f"{len(failed)} LLMs cannot be used yet:\n{problems}"
        # one kind (e.g. every endpoint down) keeps its kind; a mixture is a plain UserError
        same = len({type(e) for _, e in failed}) == 1
        raise (failed[0][1].reworded(message) if same else UserError(message)) from None
    return warnings


@dataclass
class _Failed:
    spec: ModelSpec
    error: ProviderError


def _check_endpoint(
    specs: list[ModelSpec], pull_progress: PreflightProgress | None
) -> list[str] | _Failed:
    """The preflight of the LLMs of one endpoint: warnings, or the first failure."""
    warnings: list[str] = []
    spec = specs[0]
    try:
        if spec.provider == "ollama":
            from simulator.llm.ollama import OllamaModel

            # A short timeout: a host that never answers must not hold the batch for the
            # 600 s a single generation may take.
            listed = OllamaModel(spec, timeout=PREFLIGHT_TIMEOUT).list_models()
            installed = {n if ":" in n else f"{n}:latest" for n in listed}
            for spec in specs:
                model = create_model(spec)
                assert isinstance(model, OllamaModel)
                if model.name in installed:
                    continue
                progress = None
                if pull_progress is not None:

                    def progress(done: int, total: int, status: str, _l: str = spec.label) -> None:
                        pull_progress(_l, done, total, status)

                model.ensure_model(progress)
        elif spec.provider == "openai":
            from simulator.llm.openai import OpenAIModel, unsupported_parameters

            probe = OpenAIModel(spec, timeout=PREFLIGHT_TIMEOUT)
            try:
                names: list[str] | None = probe.list_models()
            except ModelNotFound:
                names = (
                    None  # some compatible servers have no /models route; the chat call will tell
                )
            for spec in specs:
                if names is not None and spec.model not in names:
                    if (urlsplit(probe.base_url).hostname or "").endswith("api.openai.com"):
                        raise ModelNotFound(f"OpenAI has no model {spec.model}: check the name")
                    # Single-model servers (llama.cpp) answer under any name, so only mention it.
                    log.warning(
                        "%s does not list %s (it lists %s)", probe.base_url, spec.model, names[:10]
                    )
                missing = unsupported_parameters(spec)
                if missing:
                    warnings.append(
                        f"{spec.label}: {', '.join(missing)} cannot be sent to an OpenAI-compatible "
                        "endpoint and will not be applied"
                    )
        elif spec.provider == "llamacpp":
            from simulator.llm.llamacpp import LlamaCppModel

            for spec in specs:
                model = create_model(spec)
                assert isinstance(model, LlamaCppModel)
                model.check()
    except ProviderError as e:
        return _Failed(spec, e)
    return warnings
