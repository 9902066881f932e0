"""Batch execution (SPEC §7): conversations on a bounded set of threads, every event stored
as it happens, failures counted against a threshold, clean stops, and resume.

Threads rather than asyncio: every client we use (ollama, openai, pymongo, llama.cpp) is
blocking. A batch runs as many conversation threads as its endpoints allow requests in
flight; inside a conversation the turns are sequential, so they stay in order. The
conversations are streamed from the store a page at a time and a finished one is dropped,
so memory does not grow with the batch.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

from pymongo.errors import ConnectionFailure, DocumentTooLarge, OperationFailure, PyMongoError

from simulator import prompts
from simulator.conversation import (
    Conversation,
    ConversationSpec,
    Event,
    Fallback,
    ManualChooser,
    Message,
    Models,
    SelectorCall,
    Summary,
    Transcript,
    build_agents,
)
from simulator.errors import (
    DatabaseLost,
    Interrupted,
    LeaseLost,
    PermissionDenied,
    ProviderError,
    RecordTooLarge,
    SimulatorError,
    StorageError,
    UserError,
)
from simulator.experiment import Experiment, ModelSpec
from simulator.grid import Grid
from simulator.llm.base import ChatModel
from simulator.llm.cache import ResponseCache, conversation_scope
from simulator.llm.registry import ModelPool, endpoint_key, preflight
from simulator.llm.retry import RetryPolicy
from simulator.quality import Quality, UsableRule, assess
from simulator.settings import Settings
from simulator.status import BatchStatus, ConversationStatus
from simulator.store import LEASE_SECONDS, BatchRecord, ConversationRecord, Lease, Store

log = logging.getLogger(__name__)

THREAD_PREFIX = "conversation"  # the runner's threads are conversation-0, conversation-1 ...


@dataclass
class ProgressEvent:
    """What the runner reports; the CLI renders these.

    kind: started | conversation_started | message | summary | selector | retry |
    conversation_finished | stopping | finished. Events come from the conversation threads.
    """

    kind: str
    batch_id: str
    conversation_id: str | None = None
    status: str | None = None
    error: str | None = None  # conversation_finished: why it failed; retry: what failed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0  # message/summary/selector: failed attempts before the call succeeded
    total: int = 0  # started: conversations in the batch
    remaining: int = 0  # started: conversations this run will work on
    delay: float = 0.0  # retry: seconds until the next attempt
    calls_total: int = 0  # started: LLM calls planned for those conversations (for the ETA)
    calls_done: int = 0  # conversation_started: calls a resumed conversation already stored


@dataclass
class BatchReport:
    batch_id: str
    status: BatchStatus  # completed | completed_with_failures | stopped | interrupted
    total: int
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    elapsed: float = 0.0  # seconds of this run
    reason: str | None = None
    abandoned: int = 0  # conversation threads still waiting for a call when the run gave up
    note: str | None = None  # something the user should be told (e.g. a batch marked completed)
    unusable: int = 0  # completed conversations the quality rule judged not usable


@dataclass
class RunOptions:
    concurrency: int | None = None  # requests in flight per endpoint (None: provider default)
    max_failures: str | None = None  # "5" (count), "0.2" or "20%" (fraction of the batch)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    manual: ManualChooser | None = None
    on_progress: Callable[[ProgressEvent], None] | None = None
    pull_progress: Callable[[str, int, int, str], None] | None = None
    on_warning: Callable[[str], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    grace: float = 5.0  # seconds calls in flight get to finish once the batch stops
    # A runner silent for this long loses the batch to another process (heartbeat every third).
    lease_seconds: float = LEASE_SECONDS
    templates: prompts.Templates | None = None  # None: the shipped ones
    usable_rule: UsableRule = field(default_factory=UsableRule)  # SIMULATOR_USABLE_MAX_*
    cache: ResponseCache | None = None  # --cache: reuse stored LLM responses (issue 13)


def retry_policy(settings: Settings) -> RetryPolicy:
    """The retry settings of every LLM call (batches and scoring alike)."""
    return RetryPolicy(
        attempts=settings.retry_attempts,
        base_delay=settings.retry_base_delay,
        max_delay=settings.retry_max_delay,
        timeout=settings.request_timeout,
        start_concurrency=settings.concurrency_start,
    )


def options_from_settings(
    settings: Settings,
    *,
    concurrency: int | None = None,
    max_failures: str | None = None,
    manual: ManualChooser | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> RunOptions:
    """The options every front end (CLI and menus) runs a batch with: the flags given, then
    SIMULATOR_CONCURRENCY and the SIMULATOR_RETRY_* settings. With a manual speaker
    chooser, one conversation at a time (the user picks every speaker)."""
    if concurrency is not None and concurrency < 1:
        raise UserError(f"--concurrency must be at least 1 (got {concurrency}).")
    if concurrency is None:
        concurrency = settings.concurrency
    if manual is not None:
        concurrency = 1
    return RunOptions(
        concurrency=concurrency,
        max_failures=max_failures,
        retry=retry_policy(settings),
        manual=manual,
        on_warning=on_warning,
        templates=prompts.Templates.load(settings.prompts_dir),  # read once per batch
        usable_rule=settings.usable_rule(),
    )


def failure_threshold(max_failures: str | None, total: int) -> int:
    """Failures allowed before the batch stops (default: 10% of the batch, at least 1).

    A whole number is a count; a number below 1 (or up to 1 with a decimal point, or with
    a % sign) a fraction of the batch.
    """
    text = (max_failures or "0.1").strip()
    number = text[:-1] if text.endswith("%") else text
    hint = "give a count (e.g. 5) or a fraction of the batch (e.g. 0.2 or 20%)"
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"--max-failures {text!r}: {hint}.")
    if value < 0:
        raise UserError(f"--max-failures {text!r} cannot be negative: {hint}.")
    if text.endswith("%"):
        value /= 100
    elif value.is_integer() and "." not in number:
        return int(value)
    if value > 1:
        raise UserError(f"--max-failures {text!r}: a fraction cannot exceed 1 (100%); {hint}.")
    return max(1, math.ceil(value * total)) if value > 0 else 0


def model_specs(exp: Experiment, grid: Grid) -> list[ModelSpec]:
    """Every distinct LLM a batch will call (conversation, summarizer and selector models)."""
    specs = list(grid.llms)
    for extra in (exp.summarizer.llm, exp.selector_llm):
        if extra is not None:
            specs.append(extra)
    return list({s.label: s for s in specs}.values())


def start_batch(store: Store, exp: Experiment, grid: Grid, options: RunOptions) -> BatchReport:
    """Create a batch for `grid` and run it to the end (or until it stops)."""
    _refuse_manual_without_chooser(grid.speakers, options)
    failure_threshold(options.max_failures, grid.size())  # a bad value fails before any write
    templates = options.templates or prompts.shipped_templates()  # fails before any write
    _preflight(exp, grid, options)  # an unreachable endpoint fails before any write
    with _storage_errors(None):
        batch = store.create_batch(exp, grid)
    return _run(store, batch, exp, options, templates)


def resume_batch(store: Store, ref: str, options: RunOptions) -> BatchReport:
    """Continue an interrupted batch after the last stored message of each conversation.

    Only the batch's creator may resume it. A batch whose conversations are all completed
    but which was never marked finished (killed just before) is marked completed.
    """
    with _storage_errors(None):
        batch = store.get_batch(ref)
        exp = store.get_experiment(batch.experiment_id)
    if batch.creator != store.user:
        raise PermissionDenied(
            f"Batch {batch.id} belongs to {batch.creator}: only {batch.creator} can resume it "
            f"(you are {store.user}). To run the same grid yourself, copy the experiment with "
            f"`simulator experiment duplicate {batch.experiment_id[:8]}` and start your own "
            "batch of the copy with `simulator run NEW_ID ...`."
        )
    with _storage_errors(None):
        finished = batch.prepared and store.count_unfinished(batch.id) == 0
    if finished:
        return _mark_finished(store, batch, exp, options)
    _refuse_manual_without_chooser(batch.grid.speakers, options)
    failure_threshold(options.max_failures, batch.total)
    templates = options.templates or prompts.shipped_templates()
    _preflight(exp, batch.grid, options)
    return _run(store, batch, exp, options, templates)


def _mark_finished(
    store: Store, batch: BatchRecord, exp: Experiment, options: RunOptions
) -> BatchReport:
    if batch.status == BatchStatus.COMPLETED:
        raise UserError(
            f"Batch {batch.id} is already finished: all {batch.total} conversations are "
            f"completed. See them with `simulator conversations {batch.experiment_id[:8]}`, "
            "or start a new batch with `simulator run`."
        )
    with (
        _storage_errors(batch.id),
        store.batch_lease(batch.id, seconds=options.lease_seconds) as lease,
    ):
        store.set_batch_status(batch.id, BatchStatus.COMPLETED, lease=lease)
        counts = store.batch_counts(batch.id)
    return BatchReport(
        batch_id=batch.id,
        status=BatchStatus.COMPLETED,
        total=batch.total,
        counts=counts,
        note=(
            f"All {batch.total} conversations of batch {batch.id} were already stored, but its "
            "run stopped before it could mark the batch finished: it is now marked completed. "
            "Nothing was run again."
        ),
    )


def _refuse_manual_without_chooser(speakers: list[str], options: RunOptions) -> None:
    if "manual" in speakers and options.manual is None:
        raise UserError(
            "Speaker selection 'manual' needs you at a terminal to pick each speaker. "
            "Run it from an interactive terminal, or choose --speaker round_robin/random/auto."
        )


def _preflight(exp: Experiment, grid: Grid, options: RunOptions) -> None:
    for warning in preflight(model_specs(exp, grid), pull_progress=options.pull_progress):
        log.warning(warning)
        if options.on_warning:
            options.on_warning(warning)


def _prepare(store: Store, batch: BatchRecord, exp: Experiment) -> None:
    def items() -> Iterator[tuple[int, ConversationSpec, list, str]]:
        for index, spec in batch.grid.expand():
            summarizer = prompts.summarizer_prompt(exp, spec.agents, spec.factors)
            yield index, spec, build_agents(exp, spec), summarizer

    store.prepare_conversations(batch, exp, items())


def _storage_error(batch_id: str | None, error: BaseException) -> DatabaseLost:
    if isinstance(error, StorageError):
        why = str(error)
    elif isinstance(error, ConnectionFailure):  # pymongo's text runs on with its topology
        why = str(error).split(" (configured timeouts")[0].split(", Timeout:")[0][:200]
    else:
        why = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    if batch_id is None:
        return DatabaseLost(f"The database stopped answering ({why}). Nothing was started.")
    return DatabaseLost(
        f"The database stopped answering during batch {batch_id} ({why}), so the batch "
        "stopped. Everything stored so far is safe: when the database is back, continue with "
        f"`simulator resume {batch_id}`."
    )


@contextmanager
def _storage_errors(batch_id: str | None) -> Iterator[None]:
    """pymongo's errors become one StorageError that says how to continue."""
    try:
        yield
    except PyMongoError as e:
        raise _storage_error(batch_id, e) from None


def _run(
    store: Store,
    batch: BatchRecord,
    exp: Experiment,
    options: RunOptions,
    templates: prompts.Templates,
) -> BatchReport:
    run = _BatchRun(store, batch, exp, options, templates)
    with (
        _storage_errors(batch.id),
        store.batch_lease(batch.id, seconds=options.lease_seconds, on_lost=run.lease_lost) as lease,
    ):
        run.lease = lease
        return run.run()


class _BatchRun:
    """One run of a batch: a feeder (the calling thread) and the conversation threads."""

    def __init__(
        self,
        store: Store,
        batch: BatchRecord,
        exp: Experiment,
        options: RunOptions,
        templates: prompts.Templates,
    ):
        self.store = store
        self.batch = batch
        self.exp = exp
        self.options = options
        self.templates = templates
        self.lease: Lease | None = None  # set once the batch is claimed
        self.lease_error: LeaseLost | None = None
        self.stop = options.stop
        self.notify = options.on_progress or (lambda event: None)
        self.lock = threading.Lock()
        self.failures = 0
        self.threshold = 0
        self.reason: str | None = None
        self.interrupted = False
        self.storage_error: BaseException | None = None
        self.crash: BaseException | None = None  # a BaseException from a thread: re-raised
        self.todo: queue.Queue[ConversationRecord] = queue.Queue()
        self.fed = threading.Event()
        self.threads: list[threading.Thread] = []
        self.writer: _RecordWriter | None = None  # the records of every conversation thread
        self.pool = ModelPool(
            concurrency=options.concurrency,
            policy=options.retry,
            on_retry=self._on_retry,
            sleep=self._sleep,
        )
        if options.manual is not None:
            self.options = _with_manual_lock(options)

    def run(self) -> BatchReport:
        started = time.perf_counter()
        batch, store = self.batch, self.store
        abandoned = 0
        assert self.lease is not None
        try:
            if not batch.prepared:
                self._prepare()
            store.set_batch_status(batch.id, BatchStatus.RUNNING, lease=self.lease)
            self.threshold = failure_threshold(self.options.max_failures, batch.total)
            remaining = store.count_unfinished(batch.id)
            # Planned calls of the conversations left (exact for a new batch); a resumed
            # conversation reports what it had already stored when it starts.
            calls = batch.grid.llm_calls() * remaining // max(batch.total, 1)
            self.notify(
                ProgressEvent(
                    "started", batch.id, total=batch.total, remaining=remaining, calls_total=calls
                )
            )
            specs = {endpoint_key(s): s for s in model_specs(self.exp, batch.grid)}
            workers = max(1, sum(self.pool.limit(s) for s in specs.values()))
            self.todo = queue.Queue(maxsize=workers)  # a small buffer: the rest stays in the store
            self.writer = _RecordWriter(store, self.lease)
            self.threads = [
                threading.Thread(target=self._worker, name=f"{THREAD_PREFIX}-{i}", daemon=True)
                for i in range(min(workers, remaining))
            ]
            for thread in self.threads:
                thread.start()
            self._feed()
            abandoned = self._join()
        except KeyboardInterrupt:
            abandoned = self._interrupted()
        except LeaseLost as e:
            self._lease_failed(e)
            abandoned = self._join()
        except (PyMongoError, StorageError) as e:
            self._storage_failed(e)
            abandoned = self._join()
        except BaseException:
            self.stop.set()
            self._join()
            raise
        if self.writer is not None and not abandoned:
            self.writer.close()  # every conversation flushed its records: nothing waits
        if self.crash is not None:
            raise self.crash
        if self.lease_error is not None or self.lease.lost.is_set():
            # Another process runs the batch now: its status and conversations are its own.
            try:
                self.lease.check()
            except LeaseLost as e:
                raise e from None
            assert self.lease_error is not None
            raise self.lease_error
        if self.storage_error is not None:
            error = _storage_error(batch.id, self.storage_error)
            error.abandoned = abandoned
            raise error
        try:
            return self._report(started, abandoned)
        except KeyboardInterrupt:  # a second Ctrl-C while the report is written
            self.interrupted = True
            return self._report(started, abandoned)

    def _prepare(self) -> None:
        """Create the conversations; one too large to store stops the batch with the cause."""
        try:
            _prepare(self.store, self.batch, self.exp)
        except (DocumentTooLarge, OperationFailure) as e:
            if isinstance(e, OperationFailure) and "too large" not in str(e).lower():
                raise
            error = (
                f"The conversations of batch {self.batch.id} cannot be stored: each holds its "
                "agents' composed prompts, and together they exceed MongoDB's limit of 16 MB "
                f"for one record ({str(e).splitlines()[0][:120]}). Shorten the experiment's "
                "sections (or use fewer agents), then start a new batch with `simulator run`."
            )
            self.store.set_batch_status(self.batch.id, BatchStatus.STOPPED, error, lease=self.lease)
            raise RecordTooLarge(error) from None

    def lease_lost(self) -> None:
        """The heartbeat found another process holding the batch: stop at once."""
        self.stop.set()
        self.notify(ProgressEvent("stopping", self.batch.id, error="the batch was taken over"))

    def _lease_failed(self, error: LeaseLost) -> None:
        with self.lock:
            self.lease_error = self.lease_error or error
        self.stop.set()

    # --- the feeder and the conversation threads ----------------------------------------

    def _feed(self) -> None:
        try:
            for record in self.store.unfinished_conversations(self.batch.id):
                while True:
                    if self.stop.is_set():
                        return
                    try:
                        self.todo.put(record, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        finally:
            self.fed.set()

    def _worker(self) -> None:
        assert self.writer is not None
        while not self.stop.is_set():
            try:
                record = self.todo.get(timeout=0.1)
            except queue.Empty:
                if self.fed.is_set():
                    return
                continue
            self._work(record, _Writes(self.writer))

    def _work(self, record: ConversationRecord, writes: _Writes) -> None:
        assert self.lease is not None
        try:
            _run_one(
                self.store,
                record,
                self.exp,
                self.pool,
                self.options,
                self.notify,
                self.batch.id,
                writes,
                self.lease,
                self.templates,
            )
        except Interrupted:
            pass
        except LeaseLost as e:
            self._lease_failed(e)
        except (StorageError, PyMongoError) as e:
            self._storage_failed(e)
        except Exception as e:  # the conversation failed (and is stored as failed)
            with self.lock:
                self.failures += 1
                stopping = self.failures > self.threshold and not self.stop.is_set()
                if stopping:
                    self.reason = (
                        f"{self.failures} conversations failed, more than --max-failures allows "
                        f"({self.threshold}); last error: {e}"
                    )
                    self.stop.set()
            if stopping:
                self.notify(ProgressEvent("stopping", self.batch.id, error=self.reason))
        except KeyboardInterrupt:  # the manual speaker question was cancelled
            with self.lock:
                self.interrupted = True
            self.stop.set()
        except BaseException as e:  # e.g. an injected crash: the whole run dies with it
            with self.lock:
                self.crash = self.crash or e
            self.stop.set()

    def _storage_failed(self, error: BaseException) -> None:
        with self.lock:
            self.storage_error = self.storage_error or error
        self.stop.set()

    def _join(self) -> int:
        """Wait for the threads; once the batch is stopping, `grace` seconds at most.

        Returns how many are still running (abandoned: their calls never end in time).
        """
        deadline: float | None = None
        for thread in self.threads:
            while thread.is_alive():
                if deadline is None and self.stop.is_set():
                    deadline = time.monotonic() + self.options.grace
                if deadline is not None and time.monotonic() >= deadline:
                    return sum(t.is_alive() for t in self.threads)
                thread.join(0.05)
        return 0

    def _interrupted(self) -> int:
        """Ctrl-C: no new work; calls in flight get `grace` seconds; a second Ctrl-C quits now."""
        self.interrupted = True
        self.stop.set()
        try:
            if any(t.is_alive() for t in self.threads):
                self.notify(ProgressEvent("stopping", self.batch.id, status="interrupted"))
            return self._join()
        except KeyboardInterrupt:
            return sum(t.is_alive() for t in self.threads)

    # --- hooks given to the models -------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        """Backoff between retries, cut short when the batch stops."""
        if self.stop.wait(seconds):
            raise Interrupted()

    def _on_retry(self, error: ProviderError, attempt: int, delay: float) -> None:
        self.notify(ProgressEvent("retry", self.batch.id, error=str(error), delay=delay))

    # --- the end ---------------------------------------------------------------------------

    def _report(self, started: float, abandoned: int) -> BatchReport:
        batch, store, lease = self.batch, self.store, self.lease
        # conversations still running: resume continues them
        store.mark_interrupted(batch.id, lease)
        counts = store.batch_counts(batch.id)
        unfinished = sum(n for s, n in counts.items() if s != ConversationStatus.COMPLETED)
        reason = self.reason
        if self.interrupted or (self.stop.is_set() and not reason):
            # Ctrl-C, kill, or a front end setting options.stop
            status, reason = BatchStatus.INTERRUPTED, "interrupted"
        elif reason:
            status = BatchStatus.STOPPED
        elif unfinished:
            status = BatchStatus.COMPLETED_WITH_FAILURES
        else:
            status = BatchStatus.COMPLETED
        elapsed = time.perf_counter() - started
        # the running time is added by the lease (heartbeats and release), not here
        store.set_batch_status(batch.id, status, reason, lease=lease)
        report = BatchReport(
            batch_id=batch.id,
            status=status,
            total=batch.total,
            counts=counts,
            failures=store.batch_failures(batch.id),
            elapsed=elapsed,
            reason=reason,
            abandoned=abandoned,
            unusable=store.count_unusable(batch.id),
        )
        self.notify(ProgressEvent("finished", batch.id, status=status, total=batch.total))
        return report


def _with_manual_lock(options: RunOptions) -> RunOptions:
    """One speaker question at a time, whatever the number of conversation threads."""
    from dataclasses import replace

    choose = options.manual
    assert choose is not None
    lock = threading.Lock()

    def manual(*args: object) -> str:
        with lock:
            return choose(*args)  # type: ignore[arg-type]

    return replace(options, manual=manual)


class _RecordWriter:
    """One thread that stores the records of every conversation of a run, in bulk: all the
    records waiting when it comes round go in one `insert_many` per collection
    (Store.insert_records). A batch of short conversations is bound by the database's cost
    per write, and one bulk insert of 32 records costs the server a quarter of 32 single
    ones; with one writer per conversation thread, 32 round trips queued at the server."""

    MAX_RECORDS = 256  # per round trip

    def __init__(self, store: Store, lease: Lease):
        self.store = store
        self.lease = lease
        self.queue: queue.SimpleQueue[tuple[tuple, Future[None]] | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="record-writer", daemon=True)
        self.thread.start()

    def submit(self, record: tuple) -> Future[None]:
        future: Future[None] = Future()
        with self.lock:
            if self.closed:
                raise LeaseLost(f"The run of batch {self.lease.batch_id} has ended.")
            self.queue.put((record, future))
        return future

    def close(self) -> None:
        """Store what is waiting, then end the thread (records submitted later fail)."""
        with self.lock:
            self.closed = True
            self.queue.put(None)
        self.thread.join()

    def _loop(self) -> None:
        closing = False
        while not closing:
            item = self.queue.get()
            waiting: list[tuple[tuple, Future[None]]] = []
            while item is not None:
                waiting.append(item)
                if len(waiting) >= self.MAX_RECORDS:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            closing = item is None
            if waiting:
                self._store(waiting)

    def _store(self, waiting: list[tuple[tuple, Future[None]]]) -> None:
        try:
            outcome = self.store.insert_records([r for r, _ in waiting], self.lease)
        except BaseException as e:  # the database or the lease: every record fails with it
            for _, future in waiting:
                future.set_exception(e)
            return
        for (_, future), error in zip(waiting, outcome, strict=True):
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


class _Writes:
    """A conversation's records, stored in order with one write in flight: the write starts
    the moment the record exists, and the next LLM call goes ahead meanwhile (one call at a
    time, this takes the database round trip off the critical path). A failed write
    surfaces at the conversation's next record, or at its end."""

    def __init__(self, writer: _RecordWriter):
        self.writer = writer
        self.pending: Future[None] | None = None

    def submit(self, record: tuple) -> None:
        self.flush()
        self.pending = self.writer.submit(record)

    def flush(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


def _run_one(
    store: Store,
    record: ConversationRecord,
    exp: Experiment,
    pool: ModelPool,
    options: RunOptions,
    notify: Callable[[ProgressEvent], None],
    batch_id: str,
    writes: _Writes,
    lease: Lease,
    templates: prompts.Templates,
) -> None:
    if options.stop.is_set():
        raise Interrupted()
    if not store.mark_running(record.id, lease):
        return  # another run has completed it since this one read it
    resuming = record.status != ConversationStatus.PENDING
    done = store.load_transcript(record.id, discard_partial=True) if resuming else None
    stored = len(done.messages) + len(done.summaries) + len(done.selector_calls) if done else 0
    notify(ProgressEvent("conversation_started", batch_id, record.id, calls_done=stored))
    llm = record.spec.llm
    cache, scope = options.cache, conversation_scope(record.spec)

    def model(spec: ModelSpec) -> ChatModel:  # --cache: answered from stored responses first
        return cache.wrap(pool.get(spec), spec, scope) if cache else pool.get(spec)

    models = Models(
        agent=model(llm),
        summarizer=model(exp.summarizer.llm or llm),
        selector=model(exp.selector_llm or llm),
    )
    attempts: dict[tuple[int, int], int] = {}
    if done:
        for c in done.selector_calls:
            attempts[(c.day, c.turn)] = attempts.get((c.day, c.turn), 0) + 1

    def on_event(event: Event) -> None:
        # Stored at once, in order (see _Writes); a kill loses at most the record being
        # written, which resume then makes again.
        if isinstance(event, Message):
            writes.submit((record.id, event, None, record.batch_id))
            kind = "message"
        elif isinstance(event, Summary):
            writes.submit((record.id, event, None, record.batch_id))
            kind = "summary"
        elif isinstance(event, SelectorCall):
            key = (event.day, event.turn)
            attempt = attempts.get(key, 0)
            writes.submit((record.id, event, attempt, record.batch_id))
            attempts[key] = attempt + 1
            kind = "selector"
        else:
            assert isinstance(event, Fallback)
            return
        usage = event.usage
        notify(
            ProgressEvent(
                kind,
                batch_id,
                record.id,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                retries=usage.retries,
            )
        )
        if options.stop.is_set():
            raise Interrupted()

    conversation = Conversation(
        exp,
        record.spec,
        models,
        agents=record.agents,
        on_event=on_event,
        manual=options.manual,
        summarizer_prompt=record.summarizer_prompt,  # as stored: resume does not recompose it
        templates=templates,
    )
    try:
        transcript = conversation.run(done)
        writes.flush()
    except Interrupted:
        writes.flush()
        store.finish_conversation(record.id, ConversationStatus.INTERRUPTED, None, lease=lease)
        notify(ProgressEvent("conversation_finished", batch_id, record.id, status="interrupted"))
        raise
    except (StorageError, PyMongoError, KeyboardInterrupt):
        raise  # the batch stops; the conversation is continued by resume
    except Exception as e:
        if isinstance(e, SimulatorError):
            error = str(e)
            log.info("conversation %s failed: %s", record.id, error)
        else:  # a bug: keep its traceback in the log
            error = f"{type(e).__name__}: {e}"
            log.exception("conversation %s failed unexpectedly", record.id)
        writes.flush()
        store.finish_conversation(
            record.id,
            ConversationStatus.FAILED,
            None,
            error=error,
            failed_call_retries=int(getattr(e, "retries", 0) or 0),
            lease=lease,
        )
        notify(ProgressEvent("conversation_finished", batch_id, record.id, "failed", error))
        raise
    store.finish_conversation(
        record.id,
        ConversationStatus.COMPLETED,
        transcript,
        lease=lease,
        quality=transcript_quality(transcript, options.usable_rule),
    )
    notify(ProgressEvent("conversation_finished", batch_id, record.id, status="completed"))


def transcript_quality(t: Transcript, rule: UsableRule) -> Quality:
    """The flag counts, selector figures and `usable` verdict of a finished conversation."""
    return assess(
        [m.flags for m in t.messages],
        [s.flags for s in t.summaries],
        selector_calls=len(t.selector_calls),
        invalid_selections=sum(1 for c in t.selector_calls if c.chosen is None),
        fallbacks=t.fallbacks,
        rule=rule,
    )
