"""A deterministic offline model: dry runs with no LLM installed, and every test above the
provider layer.

From YAML: `{model: scripted, provider: scripted}` plus optional keys
  replies: [...]   a fixed script, used in order; running out is an error
  rule: babble     (default) sentences chosen by a hash of the seed and the whole request
  rule: echo       repeats the last line it was given
  latency: 0.05    seconds to wait per call (demos, interruption tests)
The same request and seed always give the same reply, so a resumed conversation continues
exactly as an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time

from simulator.errors import ScriptExhausted, UserError
from simulator.experiment import ModelSpec
from simulator.llm.base import ChatMessage, Reply

_SENTENCES = [
    "I hear what you are saying.",
    "Let us keep this calm and orderly.",
    "That is not how things work here.",
    "We could discuss this after the headcount.",
    "I want a fair hearing for everyone.",
    "The rules exist for a reason.",
    "Maybe there is room for a small change.",
    "I will think about it.",
    "Nobody is asking for anything unreasonable.",
    "Time in the yard matters to all of us.",
    "Let me be clear about what I expect.",
    "I do not see why that should change today.",
]
_NAME_RE = re.compile(r"\b[A-Z][A-Za-z0-9]*_\d{3}\b")
CRASH_ENV = "SIMULATOR_SCRIPTED_CRASH_AFTER"
HISTORY_LIMIT = 1000  # requests kept in `history`; older ones are dropped


class InjectedCrash(BaseException):
    """Raised after N calls when SIMULATOR_SCRIPTED_CRASH_AFTER=N: simulates the process
    dying mid-batch (a BaseException, so nothing on the way up treats it as a normal error)."""


_calls_lock = threading.Lock()
_calls = 0


def reset_call_counter() -> None:
    """Restart the count that SIMULATOR_SCRIPTED_CRASH_AFTER is compared with."""
    global _calls
    with _calls_lock:
        _calls = 0


def _count_call() -> None:
    global _calls
    limit = os.environ.get(CRASH_ENV)
    with _calls_lock:
        _calls += 1
        if limit and _calls > int(limit):
            raise InjectedCrash(f"injected crash after {limit} calls")


class ScriptedModel:
    """A ChatModel that never leaves the process."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.name = spec.model
        self.endpoint = "scripted"
        self.rule = str(spec.extra.get("rule", "babble"))
        if self.rule not in ("babble", "echo"):
            raise UserError(
                f"Scripted model rule '{self.rule}' is unknown: use `rule: babble` or `rule: echo`."
            )
        self._replies = [str(r) for r in spec.extra.get("replies", [])] or None
        self._next = 0
        self._lock = threading.Lock()
        self.latency = float(spec.extra.get("latency", 0))
        self.history: list[list[ChatMessage]] = []  # the latest requests, for tests

    def chat(self, messages: list[ChatMessage], *, stop: list[str] | None = None) -> Reply:
        started = time.perf_counter()
        _count_call()
        if self.latency:
            time.sleep(self.latency)
        with self._lock:
            if len(self.history) >= HISTORY_LIMIT:  # one instance serves a whole batch
                del self.history[: HISTORY_LIMIT // 2]
            self.history.append(messages)
            if self._replies is not None:
                if self._next >= len(self._replies):
                    raise ScriptExhausted(
                        f"The scripted model '{self.name}' ran out of replies after "
                        f"{len(self._replies)}: add more under `replies:` or use `rule: babble`."
                    )
                text = self._replies[self._next]
                self._next += 1
            else:
                text = self._generate(messages)
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return Reply(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(text.split()),
            latency=time.perf_counter() - started,
            finish_reason="stop",
        )

    def _generate(self, messages: list[ChatMessage]) -> str:
        last = messages[-1]["content"] if messages else ""
        if self.rule == "echo":
            return last.strip().splitlines()[-1] if last.strip() else "..."
        digest = hashlib.sha256(
            json.dumps([self.spec.seed or 0, messages], sort_keys=True).encode()
        ).digest()
        from simulator.conversation import SELECTOR_SYSTEM  # late: conversation imports llm

        if messages and messages[0]["content"] == SELECTOR_SYSTEM:
            names = list(dict.fromkeys(_NAME_RE.findall(last)))
            if names:
                return names[digest[0] % len(names)]
        from simulator.scoring.judge import SYSTEM as JUDGE_SYSTEM

        if messages and messages[0]["content"] == JUDGE_SYSTEM:  # a dry run of a judge scorer
            answers = _judge_answers(last)
            if answers:
                return answers[digest[0] % len(answers)]
        count = 1 + digest[1] % 3
        return " ".join(_SENTENCES[b % len(_SENTENCES)] for b in digest[2 : 2 + count])


def _judge_answers(question: str) -> list[str]:
    """The answers a judge's instructions allow (scoring/judge.py `instructions`), so that a
    scorer can be dry-run offline: labels, the numbers of a scale, turns or none."""
    if m := re.search(r"one of these labels and nothing else: (.+)\.\s*$", question):
        return [label.strip() for label in m.group(1).split(",")]
    if m := re.search(r"whole number from (-?\d+) to (-?\d+)", question):
        return [str(v) for v in range(int(m.group(1)), int(m.group(2)) + 1)]
    if m := re.search(r"number of the turn \(1 to (\d+)\)", question):
        return ["none", *(str(t) for t in range(1, int(m.group(1)) + 1))]
    return []


def typical_reply_words(spec: ModelSpec) -> float:
    """The average length in words (its tokens) of this scripted model's replies: of its
    `replies:`, else of a babble reply (one to three sentences, two on average)."""
    replies = [str(r) for r in spec.extra.get("replies", [])]
    if replies:
        return sum(len(r.split()) for r in replies) / len(replies)
    return 2 * sum(len(s.split()) for s in _SENTENCES) / len(_SENTENCES)
