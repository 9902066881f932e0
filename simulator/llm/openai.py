"""OpenAI and OpenAI-compatible servers (vLLM, LM Studio, llama.cpp, OpenRouter) via `openai`."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import openai

from simulator.errors import (
    ModelNotFound,
    ProviderAuthError,
    ProviderError,
    ProviderUnavailable,
)
from simulator.experiment import ModelSpec
from simulator.llm.base import ChatMessage, Reply
from simulator.llm.retry import DEFAULT_REQUEST_TIMEOUT, OVERLOAD_STATUSES, parse_retry_after

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Sampling settings outside the OpenAI schema that llama.cpp's server and vLLM accept in
# the request body; sent through `extra_body` to every endpoint except OpenAI's own.
EXTRA_BODY_KEYS = ("repeat_penalty", "min_p")

_warned: set[str] = set()  # model labels already warned about (once per process)
_warned_lock = threading.Lock()


def resolve_base_url(base_url: str | None = None) -> tuple[str, bool]:
    """(base URL, whether it was chosen explicitly) from the spec, $OPENAI_BASE_URL, or OpenAI."""
    explicit = base_url or os.environ.get("OPENAI_BASE_URL")
    return ((explicit or DEFAULT_BASE_URL).rstrip("/"), bool(explicit))


def _is_openai_itself(base_url: str) -> bool:
    return (urlsplit(base_url).hostname or "").endswith("api.openai.com")


def unsupported_parameters(spec: ModelSpec) -> list[str]:
    """Parameters set on `spec` that an OpenAI-compatible request cannot carry."""
    out = []
    if spec.top_k is not None:
        out.append("top_k")
    if spec.context_length is not None:  # the server's own setting (e.g. llama.cpp --n_ctx)
        out.append("context_length")
    if _is_openai_itself(resolve_base_url(spec.url)[0]):
        out += [k for k in EXTRA_BODY_KEYS if k in spec.extra]
    return out


MAX_STOP = 4


class OpenAIModel:
    """One model on one OpenAI-compatible endpoint. No I/O until the first call."""

    def __init__(self, spec: ModelSpec, timeout: float | None = None):
        self.spec = spec
        self.name = spec.model
        self.base_url, self._explicit_url = resolve_base_url(spec.url)
        self.endpoint = f"openai:{self.base_url}"
        self.timeout = float(timeout or spec.extra.get("timeout") or DEFAULT_REQUEST_TIMEOUT)
        # OpenRouter and friends need their own key; default to the usual variable.
        self.key_env = str(spec.extra.get("api_key_env") or "OPENAI_API_KEY")
        self._client_obj: openai.OpenAI | None = None
        self._client_lock = threading.Lock()

    def check_key(self) -> None:
        """Refuse now (ProviderAuthError) when a call would need a key that is not set."""
        self._api_key()

    def _api_key(self) -> str:
        key = os.environ.get(self.key_env)
        if key:
            return key
        if self._explicit_url:
            return "not-needed"  # local servers ignore the key, but the client insists on one
        raise ProviderAuthError(
            f"{self.key_env} is not set: add {self.key_env}=... to .env (or the environment) "
            "to use OpenAI, or set base_url to an OpenAI-compatible server"
        )

    def _client(self) -> openai.OpenAI:
        with self._client_lock:
            if self._client_obj is None:
                # max_retries=0: RetryingModel is the only place that retries.
                self._client_obj = openai.OpenAI(
                    base_url=self.base_url,
                    api_key=self._api_key(),
                    max_retries=0,
                    timeout=self.timeout,
                )
            return self._client_obj

    def _error(self, exc: Exception) -> ProviderError:
        """Classify a client failure so the retry wrapper knows what to do."""
        where = f"the OpenAI-compatible endpoint at {self.base_url}"
        if isinstance(exc, openai.APITimeoutError):
            return ProviderError(
                f"{where} did not answer within {self.timeout:g} s (raise "
                "SIMULATOR_REQUEST_TIMEOUT, or the LLM's `timeout:`, for slow models)",
                retryable=True,
                overloaded=True,
            )
        if isinstance(exc, openai.APIConnectionError):
            return ProviderUnavailable(f"Cannot reach {where}: {exc}. Is the server running?")
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            # The server's message may echo part of the key, so it is not repeated here.
            return ProviderAuthError(
                f"{where} rejected the API key ({exc.status_code}): check {self.key_env} in .env"
            )
        if isinstance(exc, openai.NotFoundError):
            return ModelNotFound(
                f"{where} has no model {self.name} (404): check the model name and that "
                "base_url ends with /v1"
            )
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            if status in (408, 409, 429) or status >= 500:
                headers = exc.response.headers
                retry_after = None
                if ms := parse_retry_after(headers.get("retry-after-ms")):
                    retry_after = ms / 1000
                retry_after = retry_after or parse_retry_after(headers.get("retry-after"))
                return ProviderError(
                    f"{where} answered {status} for {self.name}: {exc.message}",
                    retryable=True,
                    retry_after=retry_after,
                    overloaded=status in OVERLOAD_STATUSES,
                )
            return ProviderError(f"{where} refused the request for {self.name}: {exc.message}")
        return ProviderError(f"Unexpected answer from {where}: {exc}", retryable=True)

    def request(self, messages: list[ChatMessage], stop: list[str] | None = None) -> dict[str, Any]:
        """The keyword arguments for chat.completions.create (only parameters that are set)."""
        s = self.spec
        kwargs: dict[str, Any] = {"model": self.name, "messages": [dict(m) for m in messages]}
        for key, value in (
            ("temperature", s.temperature),
            ("top_p", s.top_p),
            ("seed", s.seed),
            ("max_tokens", s.max_tokens),
            # OpenAI takes at most 4 stop sequences and rejects the request otherwise; reply
            # cleaning catches whatever run-on the dropped ones would have stopped.
            ("stop", list(stop)[:MAX_STOP] if stop else None),
        ):
            if value is not None:
                kwargs[key] = value
        if not _is_openai_itself(self.base_url):
            extra = {k: s.extra[k] for k in EXTRA_BODY_KEYS if k in s.extra}
            if extra:
                kwargs["extra_body"] = extra
        return kwargs

    def _warn_unsupported(self) -> None:
        missing = unsupported_parameters(self.spec)
        if not missing:
            return
        with _warned_lock:
            if self.spec.label in _warned:
                return
            _warned.add(self.spec.label)
        log.info(  # the check before a batch or scoring has shown it (a log file line here)
            "%s: %s not sent: OpenAI-compatible endpoints have no such request parameter",
            self.spec.label,
            ", ".join(missing),
        )

    def chat(self, messages: list[ChatMessage], *, stop: list[str] | None = None) -> Reply:
        self._warn_unsupported()
        kwargs = self.request(messages, stop)
        start = time.perf_counter()
        body = {**kwargs, **kwargs.pop("extra_body", {})}
        try:
            # The client's documented raw request (`client.post`) rather than
            # chat.completions.create: same errors and retries off, but without the typed
            # request transform and response models, which cost ~2 ms of CPU per call.
            completion: Any = self._client().post("/chat/completions", body=body, cast_to=object)
        except openai.OpenAIError as exc:
            raise self._error(exc) from exc
        latency = time.perf_counter() - start
        choices = completion.get("choices") if isinstance(completion, dict) else None
        if not choices:
            raise ProviderError(
                f"{self.base_url} returned no choices for {self.name}", retryable=True
            )
        usage = completion.get("usage") or {}
        return Reply(
            text=(choices[0].get("message") or {}).get("content") or "",
            prompt_tokens=usage.get("prompt_tokens") or 0,
            completion_tokens=usage.get("completion_tokens") or 0,
            latency=latency,
            finish_reason=choices[0].get("finish_reason") or None,
        )

    def list_models(self) -> list[str]:
        try:
            return [m.id for m in self._client().models.list()]
        except openai.OpenAIError as exc:
            raise self._error(exc) from exc

    def check(self) -> None:
        """Cheap reachability and credentials check (GET /models) before a batch starts."""
        try:
            names = self.list_models()
        except ModelNotFound:
            return  # some compatible servers have no /models route; the chat call will tell
        if self.name in names:
            return
        if _is_openai_itself(self.base_url):
            raise ModelNotFound(f"OpenAI has no model {self.name}: check the name")
        # Single-model servers (llama.cpp) answer under any name, so only mention it.
        log.warning("%s does not list %s (it lists %s)", self.base_url, self.name, names[:10])
