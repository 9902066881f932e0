"""Batch execution (SPEC §7): conversations on a bounded set of threads, every event stored
as it happens, failures counted against a threshold, clean stops, and resume.

Threads rather than asyncio: every client we use (ollama, openai, pymongo, llama.cpp) is
blocking. A batch runs as many conversation threads as its endpoints allow requests in
flight; inside a conversation the turns are sequential, so they stay in order. The
conversations are streamed from the store a page at a time and a finished one is dropped,
so memory does not grow with the batch.
"""

from __future__ import annotations

import dataclasses
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

from simulator import pricing, prompts
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
from simulator.pricing import Price
from simulator.quality import Quality, UsableRule, assess
from simulator.settings import Settings
from simulator.status import BatchStatus, ConversationStatus
from simulator.store import (
    LEASE_SECONDS,
    BatchRecord,
    BatchTotals,
    ConversationRecord,
    Lease,
    Store,
    plural,
)

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
    usable: bool | None = None  # conversation_finished (completed): the quality verdict


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
    # Messages, calls, tokens and retries of the batch, when the runner counted them all
    # itself (a batch it started); None: ask the store (Store.batch_totals).
    totals: BatchTotals | None = None


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
    # Many workers, one batch (issue 13): `join` works alongside the batch's live workers
    # (`simulator work`); without it a live run refuses (`resume`).
    join: bool = False
    poll: float = 0.5  # seconds between looks for work while others' conversations run
    budget: Budget | None = None  # --max-tokens / --max-cost
    cache: ResponseCache | None = None  # --cache: reuse stored LLM responses (issue 13)


@dataclass
class Budget:
    """Stop scheduling new conversations once the batch has used this much (its stored
    usage, every worker's); the conversations in flight finish."""

    max_tokens: int | None = None
    max_cost: float | None = None
    prices: dict[str, Price] = field(default_factory=dict)  # by model (see pricing.py)

    def reached(self, store: Store, batch: BatchRecord, exp: Experiment) -> str | None:
        """Why the budget is spent, or None."""
        if self.max_tokens is not None:
            used = store.batch_tokens(batch.id)
            if used >= self.max_tokens:
                return f"--max-tokens {self.max_tokens:,} reached ({used:,} tokens used)"
        if self.max_cost is not None:
            cost = pricing.batch_cost(store, batch.id, exp, self.prices)
            if cost >= self.max_cost:
                return f"--max-cost {self.max_cost:g} reached (cost so far {cost:.4f})"
        return None


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
    max_tokens: int | None = None,
    max_cost: float | None = None,
) -> RunOptions:
    """The options every front end (CLI and menus) runs a batch with: the flags given, then
    SIMULATOR_CONCURRENCY and the SIMULATOR_RETRY_* settings. With a manual speaker
    chooser, one conversation at a time (the user picks every speaker)."""
    if concurrency is not None and concurrency < 1:
        raise UserError(f"--concurrency must be at least 1 (got {concurrency}).")
    failure_threshold(max_failures, 1)  # its form, checked before anything is shown or written
    if concurrency is None:
        concurrency = settings.concurrency
    if manual is not None:
        concurrency = 1
    budget = None
    if max_tokens is not None or max_cost is not None:
        if max_tokens is not None and max_tokens < 1:
            raise UserError(f"--max-tokens must be at least 1 (got {max_tokens}).")
        if max_cost is not None and not (math.isfinite(max_cost) and max_cost > 0):
            raise UserError(f"--max-cost must be a positive amount (got {max_cost}).")
        budget = Budget(max_tokens, max_cost, pricing.parse_prices(settings.prices))
    return RunOptions(
        budget=budget,
        lease_seconds=settings.worker_timeout,
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
    _check_budget(exp, grid, options)
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
    _check_creator(store, batch, "resume")
    return _continue(store, batch, exp, options)


def work_batch(store: Store, ref: str, options: RunOptions) -> BatchReport:
    """Join a batch as one more worker (any number, on any machines sharing the database):
    claim its conversations one at a time until none is left. On a batch nobody runs, this
    is `resume`. Only the batch's creator's workers may work on it, as only they may resume
    it (its conversations are theirs)."""
    from dataclasses import replace

    with _storage_errors(None):
        batch = store.get_batch(ref)
        exp = store.get_experiment(batch.experiment_id)
    _check_creator(store, batch, "work on")
    with _storage_errors(None):
        unfinished = store.count_unfinished(batch.id) if batch.prepared else 1
    if unfinished == 0 and batch.status == BatchStatus.COMPLETED:
        return BatchReport(
            batch_id=batch.id,
            status=BatchStatus.COMPLETED,
            total=batch.total,
            counts={ConversationStatus.COMPLETED.value: batch.total},
            note=f"Batch {batch.id} is finished: nothing left for this worker.",
        )
    return _continue(store, batch, exp, replace(options, join=True))


def _check_creator(store: Store, batch: BatchRecord, action: str) -> None:
    if batch.creator != store.user:
        raise PermissionDenied(
            f"Batch {batch.id} belongs to {batch.creator}: only {batch.creator} can {action} it "
            f"(you are {store.user}). To run the same grid yourself, copy the experiment with "
            f"`simulator experiment duplicate {batch.experiment_id[:8]}` and start your own "
            "batch of the copy with `simulator run NEW_ID ...`."
        )


def _continue(
    store: Store, batch: BatchRecord, exp: Experiment, options: RunOptions
) -> BatchReport:
    with _storage_errors(None):
        finished = batch.prepared and store.count_unfinished(batch.id) == 0
    if finished:
        return _mark_finished(store, batch, exp, options)
    _refuse_manual_without_chooser(batch.grid.speakers, options)
    _check_budget(exp, batch.grid, options)
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


def _check_budget(exp: Experiment, grid: Grid, options: RunOptions) -> None:
    if options.budget is not None and options.budget.max_cost is not None:
        pricing.require_prices(model_specs(exp, grid), options.budget.prices)


def _refuse_manual_without_chooser(speakers: list[str], options: RunOptions) -> None:
    if "manual" in speakers and options.manual is None:
        raise UserError(
            "Speaker selection 'manual' needs you at a terminal to pick each speaker. "
            "Run it from an interactive terminal, or choose --speaker round_robin/random/auto."
        )


def _preflight(exp: Experiment, grid: Grid, options: RunOptions) -> None:
    for warning in preflight(model_specs(exp, grid), pull_progress=options.pull_progress):
        if options.on_warning:
            log.info(warning)  # the log file keeps it; the front end shows it, once
            options.on_warning(warning)
        else:
            log.warning(warning)


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
        store.worker_lease(
            batch.id,
            seconds=options.lease_seconds,
            join=options.join,
            on_lost=run.lease_lost,
            on_last=run.final_status,
            on_stopped=run.stopped_elsewhere,
        ) as lease,
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
        self.lock = threading.Lock()
        self.outcome = _Outcome()  # the closing summary, counted as the run goes (issue 14)
        self.notify = self.outcome.observer(options.on_progress)
        self.threshold = 0  # failures of the run (all its workers) allowed
        self.reason: str | None = None
        self.interrupted = False
        self.storage_error: BaseException | None = None
        self.crash: BaseException | None = None  # a BaseException from a thread: re-raised
        self.no_more = threading.Event()  # the budget is spent: claim nothing more
        self.budget_reason: str | None = None
        self.dead: set[str] = set()  # tokens of workers found dead (their claims are free)
        self.waiter: int | None = None  # the thread that waits for work (see _claim)
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
        # A batch prepared by this run starts from nothing: what the run counts is the
        # whole batch, and the closing summary needs no query (issue 14).
        self.outcome.complete = not batch.prepared
        try:
            if not batch.prepared and self.lease.owner == self.lease.token:
                self._prepare()  # the worker that began the run prepares it; others wait
                batch.prepared = True
            self.threshold = failure_threshold(self.options.max_failures, batch.total)
            stopped = store.start_running(self.lease)
            if stopped is not None:  # joined a run that another worker has stopped since
                self.stopped_elsewhere(stopped)
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
            self.writer = _RecordWriter(store, self.lease, self.outcome.stored)
            self.threads = [
                threading.Thread(target=self._worker, name=f"{THREAD_PREFIX}-{i}", daemon=True)
                for i in range(min(workers, max(remaining, 1)))
            ]
            for thread in self.threads:
                thread.start()
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
            assert self.lease is not None
            self.store.stop_run(self.lease, error)  # workers waiting for it stop too
            raise RecordTooLarge(error) from None

    def lease_lost(self) -> None:
        """The heartbeat found another process holding the batch: stop at once."""
        self.stop.set()
        self.notify(ProgressEvent("stopping", self.batch.id, error="the batch was taken over"))

    def stopped_elsewhere(self, reason: str) -> None:
        """Another worker stopped the run for all (e.g. more of its conversations failed
        than --max-failures allows): claim nothing more, as if this worker had stopped it."""
        with self.lock:
            first = self.reason is None and not self.stop.is_set()
            if first:
                self.reason = reason
            self.stop.set()
        if first:
            self.notify(ProgressEvent("stopping", self.batch.id, error=reason))

    def _lease_failed(self, error: LeaseLost) -> None:
        with self.lock:
            self.lease_error = self.lease_error or error
        self.stop.set()

    # --- the feeder and the conversation threads ----------------------------------------

    def _worker(self) -> None:
        """A conversation thread: claim a conversation, run it, and again, until none is left."""
        assert self.writer is not None and self.lease is not None
        try:
            while not self.stop.is_set():
                record = self._claim()
                if record is None:
                    return
                try:
                    self._work(record, _Writes(self.writer))
                finally:
                    self.store.release_claim(self.lease, record.id)
        except (StorageError, PyMongoError) as e:
            self._storage_failed(e)
        except LeaseLost as e:
            self._lease_failed(e)

    def _claim(self) -> ConversationRecord | None:
        """The next conversation this worker runs, or None when there is none left: none
        pending, and none running under another worker (which may die: then its
        conversation is claimed and continued here)."""
        assert self.lease is not None
        late_since: float | None = None
        while not self.stop.is_set():
            if self._budget_spent():
                return None
            if self.lease.late:
                # After a stall, a conversation thread may wake before the heartbeat thread:
                # wait for a heartbeat to land (one lease at most; if none does, the
                # database is gone and the claim below says so).
                late_since = late_since or time.monotonic()
                if time.monotonic() - late_since < self.lease.seconds:
                    if self.stop.wait(min(self.options.poll, self.lease.seconds / 10)):
                        return None
                    continue
            record = self.store.claim_conversation(self.lease, dead=self.dead)
            if record is not None:
                return record
            if self._prepared() and self.store.claimed_by_others(self.lease) == 0:
                return None
            with self.lock:  # one thread waits for others' conversations; the rest end
                if self.waiter not in (None, threading.get_ident()):
                    return None
                self.waiter = threading.get_ident()
            self.dead |= self.store.reap_workers(self.lease)
            if self.stop.wait(self.options.poll):
                return None
        return None

    def _prepared(self) -> bool:
        if not self.batch.prepared:
            self.batch.prepared = self.store.get_batch(self.batch.id).prepared
        return self.batch.prepared

    def _budget_spent(self) -> bool:
        """Whether the batch's budget is used up (looked at twice a second at most)."""
        budget = self.options.budget
        if self.no_more.is_set():
            return True
        if budget is None:
            return False
        with self.lock:
            # tokens: one read of the batch's running totals; cost: a sum over its records,
            # so at most twice a second
            # before every claim: a budget is a promise (tokens: one read of the batch's
            # running totals; cost: a sum over its records by model)
            reason = budget.reached(self.store, self.batch, self.exp)
            if reason is None:
                return False
            first = self.budget_reason is None
            self.budget_reason = reason
            self.no_more.set()
        if first:
            self.notify(ProgressEvent("stopping", self.batch.id, error=reason))
        return True

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
            assert self.lease is not None
            if self.lease.held:
                # The conversation was taken over, or this worker was not heard from for too
                # long (then, unless another took it since, it claims it again at once).
                log.warning("conversation %s was taken over by another worker: %s", record.id, e)
                self.store.release_claim(self.lease, record.id, unfinished=True)
                return
            self._lease_failed(e)
        except (StorageError, PyMongoError) as e:
            self._storage_failed(e)
        except Exception as e:  # the conversation failed (and is stored as failed)
            self._failed(e)
        except KeyboardInterrupt:  # the manual speaker question was cancelled
            with self.lock:
                self.interrupted = True
            self.stop.set()
        except BaseException as e:  # e.g. an injected crash: the whole run dies with it
            with self.lock:
                self.crash = self.crash or e
            self.stop.set()

    def _failed(self, error: Exception) -> None:
        """A conversation failed: once more conversations of the run failed than
        --max-failures allows, counted over all its workers (in the store, so only when
        one fails), the run stops, for every worker."""
        assert self.lease is not None
        failed = self.store.failed_in_run(self.lease)
        with self.lock:
            stopping = failed > self.threshold and not self.stop.is_set()
            if stopping:
                self.reason = (
                    f"{failed} conversations failed, more than --max-failures allows "
                    f"({self.threshold}); last error: {error}"
                )
                self.stop.set()
        if stopping:
            assert self.reason is not None
            # the reason of a worker that stopped the run first, if one did: one for all
            reason = self.store.stop_run(self.lease, self.reason)
            with self.lock:
                self.reason = reason
            self.notify(ProgressEvent("stopping", self.batch.id, error=reason))

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

    def final_status(self, counts: dict[str, int] | None = None) -> tuple[BatchStatus, str | None]:
        """The batch's status when this worker is the last to leave it (from `counts`, the
        conversations by status, when the run counted them itself)."""
        if counts is None:
            counts = self.store.batch_counts(self.batch.id)
        reason = self.reason or self.budget_reason
        waiting = sum(
            counts.get(s.value, 0)
            for s in (
                ConversationStatus.PENDING,
                ConversationStatus.RUNNING,
                ConversationStatus.INTERRUPTED,
            )
        )
        unfinished = sum(n for s, n in counts.items() if s != ConversationStatus.COMPLETED)
        if self.interrupted or (self.stop.is_set() and not reason):
            # Ctrl-C, kill, or a front end setting options.stop
            return BatchStatus.INTERRUPTED, "interrupted"
        if self.budget_reason and not self.reason and not waiting:
            # the budget was reached with every conversation started: none was left out
            reason = None
        if reason:
            if self.budget_reason and not self.reason:
                reason = (
                    f"{reason}; the conversations in flight were finished. Continue with "
                    f"`simulator resume {self.batch.id}` and a larger budget (or none)."
                )
            return BatchStatus.STOPPED, reason
        if waiting:
            return BatchStatus.INTERRUPTED, "interrupted"
        if unfinished:
            return BatchStatus.COMPLETED_WITH_FAILURES, None
        return BatchStatus.COMPLETED, None

    def _report(self, started: float, abandoned: int) -> BatchReport:
        batch, store, lease = self.batch, self.store, self.lease
        assert lease is not None
        # conversations still running: resume continues them
        outcome = self.outcome
        outcome.interrupted += store.mark_interrupted(batch.id, lease)
        others = store.other_workers(lease)
        if self.reason is None and not self.interrupted:
            # stopped by another worker since this one's last heartbeat (read after the
            # others: one that stopped the run did so before it left)
            stopped = store.run_stopped(lease)
            if stopped is not None:
                with self.lock:
                    self.reason = stopped
        # The run's own counts are the batch's when it started the batch, ran every
        # conversation of it from the start, alone, and every write landed (issue 14);
        # otherwise the store counts.
        exact = (
            outcome.complete
            and not outcome.write_failed
            and not abandoned
            and not others
            and outcome.ended() == batch.total
        )
        counts = outcome.counts(batch.total) if exact else store.batch_counts(batch.id)
        status, reason = self.final_status(counts)
        note = None
        if others:  # the last worker to leave sets the batch's status
            still = f"{plural(others, 'other worker')} {'is' if others == 1 else 'are'}"
            if status in (BatchStatus.COMPLETED, BatchStatus.COMPLETED_WITH_FAILURES):
                note = (
                    f"Every conversation of batch {batch.id} has ended; {still} still leaving, "
                    f"and the last to leave marks it {status.value.replace('_', ' ')}."
                )
            else:
                note = (
                    f"This worker stopped; {still} still working on batch {batch.id} "
                    f"(`simulator watch {batch.id}`)."
                )
            ended = status == BatchStatus.INTERRUPTED or reason
            shown = status if ended else BatchStatus.RUNNING
        else:
            # the running time is added by the lease (heartbeats and release), not here
            store.set_batch_status(batch.id, status, reason, lease=lease)
            shown = status
        elapsed = time.perf_counter() - started
        report = BatchReport(
            batch_id=batch.id,
            status=shown,
            total=batch.total,
            counts=counts,
            failures=list(outcome.failures) if exact else store.batch_failures(batch.id),
            elapsed=elapsed,
            reason=reason,
            abandoned=abandoned,
            unusable=outcome.unusable if exact else store.count_unusable(batch.id),
            totals=outcome.totals(exact),
            note=note,
        )
        self.notify(ProgressEvent("finished", batch.id, status=shown, total=batch.total))
        return report


class _Outcome:
    """What a run did, counted as it happens: the closing summary of a batch the run
    started, without counting the database again (issue 14). Conversations by how they
    finished (from the runner's events); messages, calls, tokens and retries of the
    records the record writer stored (the same records Store.batch_totals sums)."""

    def __init__(self) -> None:
        self.complete = False  # the run started the batch: its counts are the batch's
        self.write_failed = False  # a record's write failed: its fate is the store's to tell
        self.finished: dict[str, int] = {}
        self.failures: list[tuple[str, str]] = []
        self.unusable = 0
        self.interrupted = 0  # found still running when the run ended (mark_interrupted)
        self.sums = BatchTotals()
        self.lock = threading.Lock()

    def observer(
        self, forward: Callable[[ProgressEvent], None] | None
    ) -> Callable[[ProgressEvent], None]:
        """`forward` (the front end's progress callback), counting what it passes on."""

        def notify(event: ProgressEvent) -> None:
            if event.kind == "conversation_started" and event.calls_done:
                self.complete = False  # records stored before this run (another worker's)
            if event.kind == "conversation_finished" and event.status:
                with self.lock:
                    self.finished[event.status] = self.finished.get(event.status, 0) + 1
                    if event.status == ConversationStatus.FAILED:
                        assert event.conversation_id is not None
                        self.failures.append((event.conversation_id, event.error or ""))
                        self.sums.retries += event.retries  # of the call that failed for good
                    elif event.usable is False:
                        self.unusable += 1
            if forward is not None:
                forward(event)

        return notify

    def stored(self, records: list[tuple], failed: bool) -> None:
        with self.lock:
            self.write_failed = self.write_failed or failed
            for record in records:
                event = record[1]
                usage = event.usage
                if isinstance(event, Message):
                    self.sums.messages += 1
                self.sums.prompt_tokens += usage.prompt_tokens
                self.sums.completion_tokens += usage.completion_tokens
                self.sums.retries += usage.retries
                self.sums.calls += usage.calls

    def ended(self) -> int:
        """Conversations this run finished or left interrupted."""
        with self.lock:
            return sum(self.finished.values()) + self.interrupted

    def counts(self, total: int) -> dict[str, int]:
        """Conversations by status once the run is over (those never started: pending)."""
        with self.lock:
            counts = dict(self.finished)
        if self.interrupted:
            counts["interrupted"] = counts.get("interrupted", 0) + self.interrupted
        pending = total - sum(counts.values())
        if pending:
            counts["pending"] = pending
        return {k: n for k, n in counts.items() if n}

    def totals(self, exact: bool) -> BatchTotals | None:
        if not exact:
            return None
        with self.lock:
            return dataclasses.replace(self.sums, failures=list(self.failures))


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

    def __init__(
        self,
        store: Store,
        lease: Lease,
        on_stored: Callable[[list[tuple], bool], None] = lambda records, failed: None,
    ):
        self.store = store
        self.lease = lease
        self.on_stored = on_stored  # each round trip: the records stored, whether any failed
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
            self.on_stored([], True)
            for _, future in waiting:
                future.set_exception(e)
            return
        stored = [r for (r, _), error in zip(waiting, outcome) if error is None]
        self.on_stored(stored, len(stored) < len(waiting))
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
    if not lease.worker and not store.mark_running(record.id, lease):
        return  # another run has completed it since this one read it (a claim is running)
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
        notify(
            ProgressEvent(
                "conversation_finished", batch_id, record.id, "failed", error,
                retries=int(getattr(e, "retries", 0) or 0),
            )
        )  # fmt: skip
        raise
    quality = transcript_quality(transcript, options.usable_rule)
    store.finish_conversation(
        record.id, ConversationStatus.COMPLETED, transcript, lease=lease, quality=quality
    )
    notify(
        ProgressEvent(
            "conversation_finished", batch_id, record.id, "completed", usable=quality.usable
        )
    )


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
