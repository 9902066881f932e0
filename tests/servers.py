"""A local HTTP server speaking the Ollama and OpenAI APIs, for provider tests and the benchmark.

    with FakeLLMServer(models={"llama3:latest"}, latency=0.05) as server:
        OllamaModel(ModelSpec("llama3", base_url=server.url)).chat(...)
        OpenAIModel(ModelSpec("llama3:latest", provider="openai", base_url=server.openai_url))
        server.bodies("/api/chat")[-1]["options"]

Loopback only (127.0.0.1, a free port). Fault injection: `fail_next(429, 500)` for exact
sequences, `fail_rate` for a seeded random share of chat calls, `down = True` to drop every
connection (or answer 503 with `down_mode="503"`), `hang = True` to take chat calls and
never answer them (they are counted; `stop()` lets them go), `cap = N` to answer 429 at once
to a chat call that arrives while N others are being worked on (a server's capacity:
`arrivals` records each call's time, the chat calls in flight with it (itself and those
being refused included), and whether it was refused).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# A reply function returns the text, or (text, finish reason) to report another reason than
# "stop" (e.g. "length": cut off at max_tokens), as OpenAI's finish_reason and Ollama's
# done_reason.
ReplyFn = Callable[[dict[str, Any]], "str | tuple[str, str]"]

CHAT_PATHS = ("/api/chat", "/v1/chat/completions")
CAP_REFUSED = -429  # _enter_chat's answer for a call over the server's `cap`
_DETAILS = {
    "format": "gguf",
    "family": "llama",
    "parameter_size": "8B",
    "quantization_level": "Q4_0",
}


def echo_reply(body: dict[str, Any]) -> str:
    """Deterministic default: the last line of the last message, quoted back."""
    messages = body.get("messages") or [{}]
    last = str(messages[-1].get("content", "")).strip().splitlines() or [""]
    return f"I hear you: {last[-1][:80]}"


def count_tokens(text: str) -> int:
    return len(text.split())


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


class FakeLLMServer:
    """Thread-safe fake of both APIs with request recording, latency and fault injection."""

    def __init__(
        self,
        *,
        models: Iterable[str] = ("llama3:latest", "smollm2", "gpt-4o-mini"),
        reply: ReplyFn = echo_reply,
        latency: float = 0.0,
        fail_rate: float = 0.0,
        fail_statuses: Iterable[int] = (429, 500, 503),
        retry_after: float | None = None,
        seed: int = 0,
        unpullable: Iterable[str] = (),
        api_key: str | None = None,
        down_mode: str = "close",
    ):
        self.installed: set[str] = set(models)
        self.unpullable: set[str] = {_tagged(n) for n in unpullable}
        self.reply = reply
        self.latency = latency
        self.fail_rate = fail_rate
        self.fail_statuses = list(fail_statuses)
        self.retry_after = retry_after  # sent as Retry-After with injected 429/503 answers
        self.api_key = api_key  # when set, /v1 routes require "Authorization: Bearer <key>"
        self.down = False
        self.down_mode = down_mode  # "close": drop the connection unanswered; "503": answer 503
        self.hang = False  # chat calls are received and counted, then never answered
        self.cap: int | None = None  # chat calls worked on at once; more are refused with 429
        self.working = 0  # chat calls admitted under `cap` whose answer is not on its way yet
        self.arrivals: list[tuple[float, int, bool]] = []  # (time, in flight with it, refused)
        self._admitted = threading.local()
        self._release = threading.Event()  # set by stop(): hanging handlers give up
        self.requests: list[dict[str, Any]] = []  # {"method", "path", "body", "headers"}
        self.calls = 0  # chat requests received (failed ones included)
        self.in_flight = 0
        self.peak_in_flight = 0
        self._failures: deque[int] = deque()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> FakeLLMServer:
        handler = type("Handler", (_Handler,), {"fake": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
        httpd.request_queue_size = 128  # benchmark bursts must not hit the default backlog of 5
        httpd.daemon_threads = True
        httpd.server_bind()
        httpd.server_activate()
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL for Ollama clients."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        """Base URL for OpenAI clients."""
        return f"{self.url}/v1"

    # -- control and inspection -----------------------------------------------

    def fail_next(self, *statuses: int) -> None:
        """The next chat calls answer these statuses, in order (before `fail_rate` applies)."""
        with self._lock:
            self._failures.extend(statuses)

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        """Recorded JSON bodies, optionally only those sent to `path` (or, with None, chat)."""
        paths = CHAT_PATHS if path is None else (path,)
        with self._lock:
            return [r["body"] for r in self.requests if r["path"] in paths]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._failures.clear()
            self.calls = self.peak_in_flight = 0
            self.arrivals.clear()

    # -- used by the handler --------------------------------------------------

    def _record(
        self, method: str, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> None:
        with self._lock:
            self.requests.append({"method": method, "path": path, "body": body, "headers": headers})

    def _enter_chat(self) -> int | None:
        """Count a chat call; return the status to fail it with, if any."""
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self._admitted.flag = False
            if self.cap is not None:
                refused = self.working >= self.cap
                # In flight with it: every chat call being handled, refused ones included.
                self.arrivals.append((time.monotonic(), self.in_flight, refused))
                if refused:
                    return CAP_REFUSED
                self.working += 1
                self._admitted.flag = True
            if self._failures:
                return self._failures.popleft()
            if self.fail_rate and self._rng.random() < self.fail_rate:
                return self._rng.choice(self.fail_statuses)
            return None

    def _answering(self) -> None:
        """The work of an admitted call is done: it no longer counts against `cap` (before
        the answer is sent, so a client that sends its next call at once is not refused)."""
        with self._lock:
            if getattr(self._admitted, "flag", False):
                self.working -= 1
                self._admitted.flag = False

    def _leave_chat(self) -> None:
        self._answering()
        with self._lock:
            self.in_flight -= 1

    def _pull_lines(self, name: str) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        if _tagged(name) in self.unpullable:
            return [*lines, {"error": "pull model manifest: file does not exist"}]
        digest = "sha256:" + "ab" * 32
        lines += [
            {"status": f"pulling {digest[7:19]}", "digest": digest, "total": 300, "completed": done}
            for done in (100, 200, 300)
        ]
        lines += [
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        with self._lock:
            self.installed.add(_tagged(name))
        return lines


class _Handler(BaseHTTPRequestHandler):
    fake: FakeLLMServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do; every answer has a length
    # One buffered write per answer (flushed by the base class) and no Nagle: otherwise
    # headers and body go out as two packets and delayed ACKs add ~40 ms to every call.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _send(
        self,
        status: int,
        payload: Any = None,
        *,
        lines: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if lines is not None:
            data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        else:
            data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header(
            "Content-Type", "application/x-ndjson" if lines is not None else "application/json"
        )
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(
        self, status: int, message: str, openai: bool, headers: dict[str, str] | None = None
    ) -> None:
        payload = (
            {"error": {"message": message, "type": "fake_error"}} if openai else {"error": message}
        )
        self._send(status, payload, headers=headers)

    def _dispatch(self, method: str) -> None:
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else {}
        path = self.path.split("?", 1)[0]
        fake._record(method, path, body, dict(self.headers))
        openai = path.startswith("/v1/")
        if fake.down:
            if fake.down_mode == "close":
                # No answer at all: the client sees a dropped connection.
                self.close_connection = True
                return
            return self._error(503, "server is down", openai)
        if (
            openai
            and fake.api_key
            and self.headers.get("Authorization") != f"Bearer {fake.api_key}"
        ):
            return self._error(401, "Incorrect API key provided", openai=True)
        route = {
            ("POST", "/api/chat"): self._chat,
            ("POST", "/v1/chat/completions"): self._chat,
            ("GET", "/api/tags"): self._tags,
            ("POST", "/api/pull"): self._pull,
            ("GET", "/api/version"): lambda _b: self._send(200, {"version": "0.6.3-fake"}),
            ("POST", "/api/show"): self._show,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/moderations"): self._moderations,
        }.get((method, path))
        if route is None:
            return self._error(404, f"no route {method} {path}", openai)
        route(body)

    def _chat(self, body: dict[str, Any]) -> None:
        fake, openai = self.fake, self.path.startswith("/v1/")
        status = fake._enter_chat()
        try:
            if status == CAP_REFUSED:
                return self._error(429, "too many requests in flight", openai)
            if fake.hang:
                fake._release.wait(60)  # the client times out long before
                self.close_connection = True
                return
            if fake.latency:
                time.sleep(fake.latency)
            fake._answering()
            if status is not None:
                headers = {}
                if fake.retry_after is not None and status in (429, 503):
                    headers["Retry-After"] = f"{fake.retry_after:g}"
                return self._error(status, f"injected failure {status}", openai, headers)
            model = str(body.get("model", ""))
            if model not in fake.installed:
                message = f'model "{model}" not found, try pulling it first'
                return self._error(404, message, openai)
            answer = fake.reply(body)
            text, reason = answer if isinstance(answer, tuple) else (answer, "stop")
            prompt = sum(count_tokens(str(m.get("content", ""))) for m in body.get("messages", []))
            completion = count_tokens(text)
            if openai:
                return self._send(
                    200,
                    {
                        "id": f"chatcmpl-{fake.calls}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": reason,
                                "message": {"role": "assistant", "content": text},
                            }
                        ],
                        "usage": {
                            "prompt_tokens": prompt,
                            "completion_tokens": completion,
                            "total_tokens": prompt + completion,
                        },
                    },
                )
            self._send(
                200,
                {
                    "model": model,
                    "created_at": "2025-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": text},
                    "done": True,
                    "done_reason": reason,
                    "prompt_eval_count": prompt,
                    "eval_count": completion,
                },
            )
        finally:
            fake._leave_chat()

    def _tags(self, _body: dict[str, Any]) -> None:
        with self.fake._lock:
            names = sorted(self.fake.installed)
        models = [
            {
                "name": n,
                "model": n,
                "modified_at": "2025-01-01T00:00:00Z",
                "size": 1000,
                "digest": "0" * 64,
                "details": _DETAILS,
            }
            for n in names
        ]
        self._send(200, {"models": models})

    def _pull(self, body: dict[str, Any]) -> None:
        lines = self.fake._pull_lines(str(body.get("model") or body.get("name") or ""))
        if body.get("stream", True):
            return self._send(200, lines=lines)
        last = lines[-1]
        self._send(500 if "error" in last else 200, last)

    def _show(self, body: dict[str, Any]) -> None:
        name = _tagged(str(body.get("model") or body.get("name") or ""))
        if name not in self.fake.installed:
            return self._error(404, f"model '{name}' not found", openai=False)
        self._send(
            200,
            {
                "modelfile": "",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": _DETAILS,
                "model_info": {},
                "capabilities": ["completion"],
            },
        )

    def _moderations(self, body: dict[str, Any]) -> None:
        """OpenAI's /v1/moderations: every category scored by `moderation_scores(text)`."""
        status = self.fake._enter_chat()  # counted (and failed on demand) like a chat call
        status = 429 if status == CAP_REFUSED else status
        try:
            if status is not None:
                return self._error(status, f"injected failure {status}", openai=True)
            texts = body.get("input")
            texts = texts if isinstance(texts, list) else [texts]
            results = []
            for text in texts:
                scores = moderation_scores(str(text))
                results.append(
                    {
                        "flagged": any(v >= 0.5 for v in scores.values()),
                        "categories": {k: v >= 0.5 for k, v in scores.items()},
                        "category_scores": scores,
                    }
                )
            model = body.get("model") or "omni-moderation-latest"
            self._send(200, {"id": f"modr-{self.fake.calls}", "model": model, "results": results})
        finally:
            self.fake._leave_chat()

    def _models(self, _body: dict[str, Any]) -> None:
        with self.fake._lock:
            names = sorted(self.fake.installed)
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names]
        self._send(200, {"object": "list", "data": data})


MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "self-harm",
    "sexual",
    "violence",
    "violence/graphic",
)


def moderation_scores(text: str) -> dict[str, float]:
    """Deterministic category scores: insults are harassment, threats violence."""
    lowered = text.lower()
    scores = dict.fromkeys(MODERATION_CATEGORIES, 0.01)
    if "idiot" in lowered or "stupid" in lowered:
        scores["harassment"] = 0.91
    if "hurt you" in lowered or "kill" in lowered:
        scores["violence"] = 0.87
        scores["harassment/threatening"] = 0.62
    return scores


_TWO_ROLES = """\
starting_message: Start the experiment
roles:
  guard:
    description: a prison guard
    sections:
      starting_prompt: You are a guard.
  prisoner:
    description: a prisoner
    sections:
      starting_prompt: You are a prisoner.
"""


def write_experiment(path: Path, llm: str, name: str = "test") -> str:
    """A minimal two-role experiment whose only LLM is `llm` (a YAML flow mapping), for
    tests that drive whole batches against these servers or the scripted model."""
    path.write_text(f"name: {name}\n{_TWO_ROLES}llms:\n  - {llm}\n")
    return str(path)
