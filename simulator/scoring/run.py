"""Running scorers over stored conversations: bounded concurrency per endpoint, retries
(the provider layer's RetryingModel), progress events, Ctrl-C and resume, and a failure
threshold. Nothing here talks to an agent or summarizer model: only judges, moderation
endpoints and the user's python functions are called.

Resume is free: an item (conversation or message) that has a score of this scorer version
and source is skipped, so running `score` again only scores what is missing.
"""

from __future__ import annotations

import importlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from simulator.conversation import Message, Usage
from simulator.errors import Interrupted, ProviderAuthError, ProviderError, UserError
from simulator.experiment import Experiment, ModelSpec
from simulator.llm.base import ChatMessage, ChatModel, Reply
from simulator.llm.cache import ResponseCache
from simulator.llm.registry import ModelPool, endpoint_key, preflight
from simulator.llm.retry import RetryingModel, RetryPolicy
from simulator.runner import failure_threshold
from simulator.scoring import judge
from simulator.scoring.definition import Scorer
from simulator.status import ConversationStatus
from simulator.store import ConversationRecord, Score, Store, conversation_filter

log = logging.getLogger(__name__)

SCORED_STATUSES = (ConversationStatus.COMPLETED.value, ConversationStatus.INCOMPLETE.value)


@dataclass
class ScoreProgress:
    """One event: `kind` is started | scored | invalid | failed | retry | stopping | warning
    (a judge LLM's preflight warning, in `error`)."""

    kind: str
    total: int = 0
    done: int = 0
    item: str = ""
    error: str = ""


@dataclass
class ScoreOptions:
    concurrency: int | None = None  # requests in flight per endpoint (None: provider default)
    max_failures: str | None = None  # as for batches: a count or a fraction of the items
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    stop: threading.Event = field(default_factory=threading.Event)
    grace: float = 5.0  # seconds calls in flight get once scoring stops
    on_progress: Callable[[ScoreProgress], None] | None = None
    cache: ResponseCache | None = None  # --cache: reuse stored judge responses (issue 13)
    pull_progress: Callable[[str, int, int, str], None] | None = None  # judge models pulled


@dataclass
class ScoreReport:
    items: int = 0  # items this run set out to score
    already: int = 0  # items that had a score already
    scored: int = 0  # valid scores stored
    invalid: int = 0  # judge answers still invalid after the re-asks (stored, counted)
    failed: int = 0  # items whose calls failed (not stored: the next run tries again)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (item, error), python too
    interrupted: bool = False
    reason: str = ""  # why scoring stopped early
    calls: int = 0  # judge / moderation calls made, re-asks included

    @property
    def missing(self) -> int:
        return self.items - self.scored - self.invalid


@dataclass
class Item:
    """One thing to score: a conversation, or one of its messages."""

    record: ConversationRecord
    messages: list[Message]
    scorer: Scorer
    source: str
    message: Message | None = None

    @property
    def key(self) -> str:
        return "" if self.message is None else f"{self.message.day}:{self.message.turn}"

    def label(self) -> str:
        where = f" message {self.key}" if self.key else ""
        return f"{self.scorer.name} on conversation {self.record.id}{where}"


# --- what to score ----------------------------------------------------------------------


def select_conversations(
    store: Store, ref: str, where: dict[str, str] | None = None
) -> tuple[Experiment, list[ConversationRecord]]:
    """The experiment and conversations `ref` names: an experiment (id or name), a batch or
    one conversation. By default only ended conversations (completed, or imported
    incomplete); `--where status=...` chooses otherwise."""
    from simulator import export

    query_where = dict(where or {})
    ref = ref.strip()
    try:
        selection = export.select(store, ref)
        exp, batch_id = selection.experiment, selection.batch.id if selection.batch else None
        single = selection.conversations[0] if selection.kind == "conversation" else None
    except UserError:
        if ref.strip() and all(c in "0123456789abcdefABCDEF" for c in ref):
            raise
        _, exp, batch_id = store.find_experiment_or_batch(ref)
        single = None
    factors = exp.factor_levels()
    conversation_filter(query_where, factors)  # a bad --where fails before any read
    if single is not None:
        return exp, [single]
    records = store.list_conversations(
        experiment_id=None if batch_id else exp.id,
        batch_id=batch_id,
        where=query_where,
        factors=factors,
    )
    if "status" not in query_where:
        records = [r for r in records if r.status.value in SCORED_STATUSES]
    return exp, records


def plan(
    store: Store, exp: Experiment, records: list[ConversationRecord], scorers: list[Scorer]
) -> tuple[list[Item], int]:
    """The items still missing a score, and how many already have one."""
    sources = {s.name: s.source(exp) for s in scorers}
    ids = [r.id for r in records]
    done = {s.name: store.scored_items(s.name, s.version, sources[s.name], ids) for s in scorers}
    items: list[Item] = []
    already = 0
    for record, transcript in store.transcripts(records):
        messages = [m for m in transcript.messages if not m.empty]
        for scorer in scorers:
            if scorer.level == "conversation":
                candidates = [Item(record, messages, scorer, sources[scorer.name])]
            else:
                roles = {r.lower() for r in scorer.roles}
                candidates = [
                    Item(record, messages, scorer, sources[scorer.name], m)
                    for m in messages
                    if not roles or m.role.lower() in roles
                ]
            for item in candidates:
                if (record.id, item.key) in done[scorer.name]:
                    already += 1
                else:
                    items.append(item)
    return items, already


# --- the callers --------------------------------------------------------------------------


class ModerationModel:
    """An OpenAI-compatible /v1/moderations endpoint behind the ChatModel interface, so the
    provider layer's one retry and concurrency wrapper serves it too. `chat` moderates the
    last message and answers the result as JSON text."""

    def __init__(self, spec: ModelSpec, timeout: float | None = None):
        from simulator.llm.openai import OpenAIModel

        self.client = OpenAIModel(spec, timeout=timeout)  # its client, key and error mapping
        self.name = spec.model
        self.endpoint = self.client.endpoint

    def chat(self, messages: list[ChatMessage], *, stop: list[str] | None = None) -> Reply:
        import openai

        text = messages[-1]["content"]
        start = time.perf_counter()
        try:
            result = self.client._client().moderations.create(model=self.name, input=text)
        except openai.OpenAIError as exc:
            raise self.client._error(exc) from exc
        if not result.results:
            raise ProviderError(f"{self.client.base_url} returned no moderation result")
        first = result.results[0]
        answer = {
            "flagged": bool(first.flagged),
            "categories": _plain(first.categories),
            "category_scores": _plain(first.category_scores),
        }
        return Reply(text=json.dumps(answer), latency=time.perf_counter() - start)


def _plain(obj: Any) -> dict[str, Any]:
    data = obj.model_dump(by_alias=True) if hasattr(obj, "model_dump") else dict(obj)
    return {str(k): v for k, v in data.items() if v is not None}


def moderation_spec(scorer: Scorer) -> ModelSpec:
    return ModelSpec(
        model=scorer.model,
        provider="openai",
        base_url=scorer.base_url,
        extra={"api_key_env": scorer.api_key_env},
    )


def load_function(scorer: Scorer) -> Callable[[Any], Any]:
    """The user's `module:function` (a clear error when it cannot be imported)."""
    module_name, _, name = scorer.function.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any failure is theirs to fix
        raise UserError(
            f"scorer {scorer.name}: cannot import {module_name} ({type(exc).__name__}: {exc}); "
            "check `function:` and that the module is on PYTHONPATH"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(
            f"scorer {scorer.name}: {module_name} has no function {name}; check `function:`"
        )
    return fn


# --- the run --------------------------------------------------------------------------------


class ScoringRun:
    def __init__(self, store: Store, exp: Experiment, scorers: list[Scorer], options: ScoreOptions):
        self.store, self.exp, self.scorers, self.options = store, exp, scorers, options
        self.stop = options.stop
        self.pool = ModelPool(
            options.retry, options.concurrency, on_retry=self._on_retry, sleep=self._sleep
        )
        self.report = ScoreReport()
        self.lock = threading.Lock()
        self.functions: dict[str, Callable[[Any], Any]] = {}
        self.python_lock: dict[str, threading.Lock] = {}  # user code: one call at a time
        self.moderators: dict[str, RetryingModel] = {}
        self.threshold = 0
        self.done = 0

    def notify(self, event: ScoreProgress) -> None:
        if self.options.on_progress is not None:
            self.options.on_progress(event)

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Interrupted()

    def _on_retry(self, error: ProviderError, attempt: int, delay: float) -> None:
        self.notify(ScoreProgress("retry", error=str(error)))

    def prepare(self) -> None:
        """Everything that can be refused before the first call."""
        for s in self.scorers:
            if s.kind == "python":
                self.functions[s.name] = load_function(s)
                self.python_lock[s.name] = threading.Lock()
            elif s.kind == "moderation":
                spec = moderation_spec(s)
                moderator = ModerationModel(spec, timeout=self.options.retry.timeout)
                try:
                    moderator.client.check_key()  # not once per item, failing each
                except ProviderAuthError as e:
                    raise ProviderAuthError(f"Scorer '{s.name}' (moderation): {e}.") from None
                self.moderators[s.name] = RetryingModel(
                    moderator,
                    self.options.retry,
                    self.pool.limiter(spec),
                    sleep=self._sleep,
                    on_retry=self._on_retry,
                )
            else:
                s.judge_llm(self.exp)  # a judge without an LLM is refused now

    def preflight(self, items: list[Item]) -> None:
        """Check the LLM of every judge with something to score, once, before the first call
        (the check a batch makes: reachable, model present or pulled, key set): a judge whose
        server is down would otherwise fail every item until the failure threshold."""
        wanted = {item.scorer.name for item in items}
        by_llm: dict[str, tuple[ModelSpec, list[str]]] = {}
        for s in self.scorers:
            if s.kind == "judge" and s.name in wanted:
                spec = s.judge_llm(self.exp)
                by_llm.setdefault(repr(spec), (spec, []))[1].append(s.name)
        if not by_llm:
            return
        groups = list(by_llm.values())

        def check(group: tuple[ModelSpec, list[str]]) -> list[str] | UserError:
            try:
                return preflight([group[0]], pull_progress=self.options.pull_progress)
            except UserError as e:
                return e

        # One check per judge LLM, at once (a check may wait PREFLIGHT_TIMEOUT), so that the
        # error names the judges of the LLM that failed.
        if len(groups) == 1:
            outcomes = [check(groups[0])]
        else:
            with ThreadPoolExecutor(len(groups), thread_name_prefix="judge-preflight") as pool:
                outcomes = list(pool.map(check, groups))
        warnings: list[str] = []
        for (spec, names), outcome in zip(groups, outcomes, strict=True):
            if isinstance(outcome, UserError):
                judges = ", ".join(repr(n) for n in names)
                message = f"Scoring did not start. Judge {judges} ({spec.label}): {outcome}"
                raise outcome.reworded(message) from None
            warnings += outcome
        for warning in warnings:
            log.info(warning)  # the log file keeps it; the front end shows the event
            self.notify(ScoreProgress("warning", error=warning))

    def workers(self, items: list[Item]) -> int:
        specs: dict[str, ModelSpec] = {}
        python = 0
        for s in self.scorers:
            if s.kind == "judge":
                spec = s.judge_llm(self.exp)
                specs[endpoint_key(spec)] = spec
            elif s.kind == "moderation":
                spec = moderation_spec(s)
                specs[endpoint_key(spec)] = spec
            else:
                python += 1
        return max(1, min(len(items), sum(self.pool.limit(s) for s in specs.values()) + python))

    def run(self, items: list[Item], already: int) -> ScoreReport:
        report = self.report
        report.items, report.already = len(items), already
        self.threshold = failure_threshold(self.options.max_failures, max(len(items), 1))
        self.prepare()
        self.preflight(items)
        self.notify(ScoreProgress("started", total=len(items)))
        if not items:
            return report
        todo: queue.Queue[Item] = queue.Queue()
        for item in items:
            todo.put(item)
        threads = [
            threading.Thread(target=self._worker, args=(todo,), name=f"score-{i}", daemon=True)
            for i in range(self.workers(items))
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.05)
        except KeyboardInterrupt:
            report.interrupted = True
            self.stop.set()
            self.notify(ScoreProgress("stopping", total=len(items)))
            deadline = time.monotonic() + self.options.grace
            try:
                for t in threads:
                    t.join(max(0.0, deadline - time.monotonic()))
            except KeyboardInterrupt:
                pass
        if self.stop.is_set() and not report.reason:
            report.interrupted = True
        return report

    def _worker(self, todo: queue.Queue[Item]) -> None:
        while not self.stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                self._score(item)
            except Interrupted:
                return  # stopping while backing off: the item stays missing
            except ProviderError as e:
                self._failed(item, str(e))
            except Exception as e:  # a bug must not leave the other threads waiting
                log.exception("scoring %s failed", item.label())
                self._failed(item, f"{type(e).__name__}: {e}")

    def _failed(self, item: Item, error: str) -> None:
        """An item left without a score (a call that failed, the user's function raised):
        counted, and scoring stops past --max-failures."""
        with self.lock:
            self.report.errors.append((item.label(), error))
            self.report.failed += 1
            if self.report.failed > self.threshold and not self.stop.is_set():
                self.report.reason = (
                    f"{self.report.failed} items failed, more than --max-failures allows "
                    f"({self.threshold}); last error: {error}"
                )
                self.stop.set()
        self.notify(ScoreProgress("failed", item=item.label(), error=error))

    def _stored(self, item: Item, score: Score) -> None:
        self.store.insert_score(score)
        with self.lock:
            if score.valid:
                self.report.scored += 1
            else:
                self.report.invalid += 1
            self.done += 1
            done = self.done
        kind = "scored" if score.valid else "invalid"
        self.notify(ScoreProgress(kind, total=self.report.items, done=done, item=item.label()))

    def _new_score(self, item: Item, **values: Any) -> Score:
        return Score(
            conversation_id=item.record.id,
            message=item.key,
            scorer=item.scorer.name,
            version=item.scorer.version,
            source=item.source,
            experiment_id=item.record.experiment_id,
            batch_id=item.record.batch_id,
            role=item.message.role if item.message else "",
            **values,
        )

    def _score(self, item: Item) -> None:
        kind = item.scorer.kind
        if kind == "judge":
            self._judge(item)
        elif kind == "moderation":
            text = item.message.content if item.message else ""
            reply = self.moderators[item.scorer.name].chat([{"role": "user", "content": text}])
            with self.lock:
                self.report.calls += 1
            result = json.loads(reply.text)
            score = self._new_score(
                item,
                value=result["flagged"],
                raw=reply.text,
                detail=result,
                usage=Usage(latency=reply.latency, retries=reply.retries, calls=1),
            )
            self._stored(item, score)
        else:
            self._python(item)

    def _judge(self, item: Item) -> None:
        scorer = item.scorer
        spec = scorer.judge_llm(self.exp)
        model: ChatModel = self.pool.get(spec)
        if self.options.cache is not None:
            model = self.options.cache.wrap(model, spec, {"judge": scorer.name})
        turns = len(item.messages)
        question = judge.prompt(scorer, item.messages, item.message)
        chat: list[ChatMessage] = [
            {"role": "system", "content": judge.SYSTEM},
            {"role": "user", "content": question},
        ]
        usage = Usage()
        parsed = judge.Parsed(valid=False)
        reply = Reply(text="")
        attempts = 0
        max_attempts = judge.EXTRA_ASKS + 1
        # An item once begun is finished (re-asks included) even if scoring stops meanwhile:
        # half an item would be asked again from the start by the next run.
        while attempts < max_attempts:
            attempts += 1
            reply = model.chat(chat)
            with self.lock:
                self.report.calls += 1
            usage.add(reply)
            parsed = judge.parse(scorer, reply.text, turns)
            if parsed.valid:
                break
            chat += [
                {"role": "assistant", "content": reply.text},
                {"role": "user", "content": judge.reask(scorer, turns, parsed.problem)},
            ]
        detail = dict(parsed.detail)
        if not parsed.valid:
            detail["problem"] = parsed.problem
        score = self._new_score(
            item,
            value=parsed.value if parsed.valid else None,
            valid=parsed.valid,
            raw=reply.text,
            prompt=question,
            detail=detail,
            attempts=attempts,
            usage=usage,
        )
        self._stored(item, score)

    def _python(self, item: Item) -> None:
        fn = self.functions[item.scorer.name]
        if item.message is not None:
            argument: Any = item.message.content
        else:
            argument = [
                {
                    "turn": n,
                    "day": m.day,
                    "speaker": m.speaker,
                    "role": m.role,
                    "content": m.content,
                }  # fmt: skip
                for n, m in enumerate(item.messages, start=1)
            ]
        start = time.perf_counter()
        try:
            with self.python_lock[item.scorer.name]:
                value = fn(argument)
            json.dumps(value)  # what cannot be stored is the function's error, not ours
        except Exception as e:  # the user's code: a failed item like a failed call
            self._failed(item, f"{type(e).__name__}: {e}")
            return
        score = self._new_score(
            item,
            value=value,
            raw=None,
            usage=Usage(latency=time.perf_counter() - start, calls=1),
        )
        self._stored(item, score)


def score(
    store: Store,
    exp: Experiment,
    records: list[ConversationRecord],
    scorers: list[Scorer],
    options: ScoreOptions | None = None,
) -> ScoreReport:
    """Score what is missing of `records` with `scorers`; stored as it goes."""
    options = options or ScoreOptions()
    items, already = plan(store, exp, records, scorers)
    return ScoringRun(store, exp, scorers, options).run(items, already)


def scorers_for(exp: Experiment, extra: list[Scorer] | None = None) -> list[Scorer]:
    """The experiment's scorers, then a scorers file's (a file's scorer wins by name)."""
    from simulator.scoring.definition import parse_scorers

    mine = parse_scorers(exp.scorers, f"experiment {exp.id}") if exp.scorers else []
    by_name = {s.name: s for s in mine}
    for s in extra or []:
        by_name[s.name] = s
    return list(by_name.values())
