"""Ollama through the official `ollama` client: chat, list, pull, and a reachability check."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import ollama

from simulator.errors import ModelNotFound, ProviderError, ProviderUnavailable
from simulator.experiment import ModelSpec
from simulator.llm.base import ChatMessage, Reply
from simulator.llm.retry import DEFAULT_REQUEST_TIMEOUT, OVERLOAD_STATUSES, parse_retry_after

DEFAULT_HOST = "http://127.0.0.1:11434"

PullProgress = Callable[[int, int, str], None]  # (completed bytes, total bytes, status)


def resolve_host(base_url: str | None = None) -> str:
    """The Ollama base URL: explicit value, else $OLLAMA_HOST, else the local default.

    Follows Ollama's own conventions: a bare host gets http:// and port 11434, and the
    listen-everywhere address 0.0.0.0 (often set for `ollama serve`) means this machine.
    """
    raw = (base_url or os.environ.get("OLLAMA_HOST") or "").strip().rstrip("/")
    if not raw:
        return DEFAULT_HOST
    had_scheme = "://" in raw
    parts = urlsplit(raw if had_scheme else f"http://{raw}")
    scheme = parts.scheme or "http"
    host = parts.hostname or "127.0.0.1"
    if host == "0.0.0.0":
        host = "127.0.0.1"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = parts.port or (11434 if not had_scheme else (443 if scheme == "https" else 80))
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


class OllamaModel:
    """One model on one Ollama server. No I/O until the first call."""

    def __init__(self, spec: ModelSpec, host: str | None = None, timeout: float | None = None):
        self.spec = spec
        self.name = spec.model
        self.host = resolve_host(host or spec.url)
        self.endpoint = f"ollama:{self.host}"
        self.timeout = float(timeout or spec.extra.get("timeout") or DEFAULT_REQUEST_TIMEOUT)
        self._client_obj: ollama.Client | None = None
        self._client_lock = threading.Lock()
        # ResponseError keeps only status and body; an httpx response hook keeps the
        # Retry-After header, per thread because concurrent calls share one client.
        self._last = threading.local()

    # -- plumbing -------------------------------------------------------------

    def _client(self) -> ollama.Client:
        with self._client_lock:
            if self._client_obj is None:
                # The ollama client never retries by itself (httpx transports default to
                # retries=0), so RetryingModel is the only place that retries.
                self._client_obj = ollama.Client(
                    host=self.host,
                    timeout=self.timeout,
                    event_hooks={"response": [self._remember_headers]},
                )
            return self._client_obj

    def _remember_headers(self, response: httpx.Response) -> None:
        self._last.retry_after = (
            response.headers.get("retry-after") if response.status_code >= 400 else None
        )

    def _unreachable(self) -> ProviderUnavailable:
        if self.spec.url:  # the experiment's (or scorer's) own base_url: OLLAMA_HOST is not used
            how = f"start `ollama serve` there, or correct the base_url given for {self.name}"
        else:
            how = "start it with `ollama serve` or set OLLAMA_HOST"
        return ProviderUnavailable(f"Cannot reach Ollama at {self.host}: {how}")

    def _missing(self) -> ModelNotFound:
        return ModelNotFound(
            f"Ollama at {self.host} does not have the model {self.name}: run "
            f"`ollama pull {self.name}` (or let `simulator` pull it before the batch starts)"
        )

    def _error(self, exc: Exception) -> ProviderError:
        """Classify a client failure so the retry wrapper knows what to do."""
        if isinstance(exc, ollama.ResponseError):
            status = exc.status_code
            if status == 404 and "not found" in str(exc.error).lower():
                return self._missing()
            if status == 429 or status >= 500:
                retry_after = parse_retry_after(getattr(self._last, "retry_after", None))
                return ProviderError(
                    f"Ollama at {self.host} answered {status} for {self.name}: {exc.error}",
                    retryable=True,
                    retry_after=retry_after,
                    overloaded=status in OVERLOAD_STATUSES,
                )
            return ProviderError(
                f"Ollama at {self.host} refused the request for {self.name}: {exc}"
            )
        if isinstance(exc, ConnectionError):  # the client's translation of httpx.ConnectError
            return self._unreachable()
        if isinstance(exc, httpx.TimeoutException):
            return ProviderError(
                f"Ollama at {self.host} did not answer within {self.timeout:g} s (raise "
                "SIMULATOR_REQUEST_TIMEOUT, or the LLM's `timeout:`, for slow models)",
                retryable=True,
                overloaded=True,
            )
        if isinstance(exc, httpx.HTTPError):  # dropped connection, protocol error ...
            return ProviderError(
                f"Connection to Ollama at {self.host} failed: {exc}", retryable=True
            )
        return ProviderError(f"Unexpected answer from Ollama at {self.host}: {exc}", retryable=True)

    def options(self, stop: list[str] | None = None) -> dict[str, Any]:
        """The sampling options sent with every request (only those that are set)."""
        s = self.spec
        candidates = {
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "seed": s.seed,
            "num_ctx": s.context_length,
            "num_predict": s.max_tokens,
            "repeat_penalty": s.extra.get("repeat_penalty"),
            "stop": list(stop) if stop else None,
        }
        return {k: v for k, v in candidates.items() if v is not None}

    # -- ChatModel ------------------------------------------------------------

    def chat(self, messages: list[ChatMessage], *, stop: list[str] | None = None) -> Reply:
        self._last.retry_after = None
        start = time.perf_counter()
        try:
            response = self._client().chat(
                model=self.name,
                messages=[dict(m) for m in messages],
                options=self.options(stop),
                stream=False,
            )
        except (ollama.ResponseError, ConnectionError, httpx.HTTPError, ValueError) as exc:
            raise self._error(exc) from exc
        return Reply(
            text=response.message.content or "",
            prompt_tokens=response.prompt_eval_count or 0,
            completion_tokens=response.eval_count or 0,
            latency=time.perf_counter() - start,
            finish_reason=response.done_reason or None,
        )

    # -- model management -----------------------------------------------------

    def list_models(self) -> list[str]:
        """Names of the models installed on the server (e.g. "llama3:latest")."""
        try:
            listing = self._client().list()
        except (ollama.ResponseError, ConnectionError, httpx.HTTPError, ValueError) as exc:
            raise self._error(exc) from exc
        return [m.model for m in listing.models if m.model]

    def has_model(self) -> bool:
        installed = set()
        for name in self.list_models():
            installed.add(name if ":" in name else f"{name}:latest")
        return self.name in installed

    def check(self) -> None:
        """Raise ProviderUnavailable when Ollama is not running, ModelNotFound when the model is missing."""
        if not self.has_model():
            raise self._missing()

    def pull(self, progress: PullProgress | None = None) -> None:
        """Download the model, streaming progress; ModelNotFound when it cannot be pulled."""
        try:
            for part in self._client().pull(self.name, stream=True):
                if progress is not None:
                    progress(part.completed or 0, part.total or 0, part.status or "")
        except ollama.ResponseError as exc:
            # Ollama reports a bad name as 500 or as an error line in the stream (status -1);
            # only overload / gateway answers are worth trying again later.
            if exc.status_code in (429, 502, 503, 504):
                raise self._error(exc) from exc
            raise ModelNotFound(
                f"Could not pull {self.name} into Ollama at {self.host}: {exc.error}. "
                "Check the name at https://ollama.com/library"
            ) from exc
        except (ConnectionError, httpx.HTTPError, ValueError) as exc:
            raise self._error(exc) from exc

    def ensure_model(self, progress: PullProgress | None = None) -> None:
        """Check the server is up and pull the model when it is missing."""
        if self.has_model():
            return
        self.pull(progress)
        if not self.has_model():
            raise ModelNotFound(
                f"Ollama at {self.host} reported pulling {self.name} but does not list it; "
                f"try `ollama pull {self.name}` by hand"
            )
