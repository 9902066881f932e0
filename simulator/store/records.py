"""The store's records: plain dataclasses in and out of it (no MongoDB document leaves the
store).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from simulator.conversation import Agent, ConversationSpec, Usage
from simulator.errors import LeaseLost
from simulator.experiment import Experiment
from simulator.grid import Grid
from simulator.quality import Quality
from simulator.status import BatchStatus, ConversationStatus

LEASE_SECONDS = 30.0  # a batch whose runner has not been heard of for this long is free
BEAT_SECONDS = 2.0  # heartbeats at most this far apart (and every third of the lease)


@dataclass
class ExperimentRow:
    """An experiment with what a listing shows about it."""

    experiment: Experiment
    conversations: int = 0


@dataclass
class LeaseHolder:
    """Who holds a batch's lease, as stored on the batch."""

    host: str
    pid: int
    heartbeat: datetime | None  # the server's time of its last heartbeat (UTC)
    seconds: float = LEASE_SECONDS  # silent for longer than this, the lease is free
    token: str | None = None

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host}"


@dataclass
class WorkerInfo:
    """A worker of a batch, as recorded on it (see Store.worker_lease)."""

    token: str
    host: str
    pid: int
    user: str
    heartbeat: datetime | None
    started_at: datetime | None = None
    alive: bool = False

    def __str__(self) -> str:
        return f"worker {self.token[:8]} (process {self.pid} on {self.host})"


@dataclass
class Lease:
    """This process's hold on a batch (see Store.batch_lease). Every conversation write
    of a run goes through `check()`: once the lease is lost or released, nothing more is
    written."""

    batch_id: str
    token: str
    host: str
    pid: int
    seconds: float = LEASE_SECONDS
    lost: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    taken_by: LeaseHolder | None = None  # who holds the batch now, when lost
    # False once a write's effect on the batch's running totals is uncertain (a write or
    # its $inc raised): the totals are then recounted rather than trusted after the run.
    tally_ok: bool = True
    writing: int = 0  # tallied writes in flight (see Store._tallying)
    writing_lock: threading.Lock = field(default_factory=threading.Lock)
    # A worker's lease (Store.worker_lease; see "conversation claims"): the batch is held
    # under the runner token `epoch` shared by every worker of the run, and each conversation
    # it claimed under its own `token`.
    epoch: str = ""
    worker: bool = False
    beat_at: float = field(default_factory=time.monotonic)  # its last heartbeat that landed
    conversations: set[str] = field(default_factory=set)  # claimed and not finished
    lost_conversations: set[str] = field(default_factory=set)  # taken over by another worker
    let_go: list[str] = field(default_factory=list)  # left unfinished while late: retaken first
    skew: timedelta = field(default_factory=timedelta)  # the server's clock minus ours
    pending: list[str] = field(default_factory=list)  # ids of pending conversations to try
    claiming: threading.Lock = field(default_factory=threading.Lock)
    # Why a worker of the run stopped it for all (WorkerClaims.stop_run), once known here.
    stop_reason: str | None = None

    @property
    def owner(self) -> str:
        """The runner token the batch is held under (and its running totals kept by)."""
        return self.epoch or self.token

    @property
    def held(self) -> bool:
        return not (self.lost.is_set() or self.released.is_set())

    @property
    def late(self) -> bool:
        """A worker not heard from for longer than its lease: its heartbeat has not landed
        (a stalled process, an unreachable database); others may take its conversations."""
        return self.worker and self.held and time.monotonic() - self.beat_at > self.seconds

    def check(self, conv_id: str | None = None) -> None:
        """Raise LeaseLost unless this run still holds the batch (and, for a worker, the
        conversation `conv_id`)."""
        if self.late:
            # Not heard of for longer than the lease: others may have taken its
            # conversations over. Nothing is written until a heartbeat lands again.
            raise LeaseLost(
                f"This worker of batch {self.batch_id} was not heard from for "
                f"{self.seconds:g} s, so it stopped writing; its conversations are left to "
                "the workers that took them over."
            )
        if conv_id is not None and conv_id in self.lost_conversations:
            raise LeaseLost(
                f"Conversation {conv_id} was taken over by another worker (this one was not "
                f"heard from for {self.seconds:g} s), so this worker stopped writing to it."
            )
        if self.lost.is_set():
            who = str(self.taken_by) if self.taken_by else "another process"
            raise LeaseLost(
                f"Batch {self.batch_id} was taken over by {who} (this process was not heard "
                f"from for {self.seconds:g} s), so this run stopped writing to it. Everything "
                f"it stored is kept; see `simulator status {self.batch_id}`."
            )
        if self.released.is_set():
            raise LeaseLost(f"The run of batch {self.batch_id} in this process has ended.")

    def _lose(self, taken_by: LeaseHolder | None) -> None:
        self.taken_by = taken_by
        self.lost.set()


@dataclass
class BatchRecord:
    id: str
    experiment_id: str
    grid: Grid
    total: int
    status: BatchStatus
    creator: str
    created_at: datetime
    prepared: bool = False
    finished_at: datetime | None = None
    error: str | None = None
    elapsed: float = 0.0  # seconds spent running, summed over every run and resume
    # The runner holding the batch's lease, if any, and whether it is alive: True when
    # its heartbeat is fresh by the server's clock (and, on this host, its process
    # exists); False when a runner is recorded but dead or silent; None when no runner is
    # recorded. Filled by get_batch / latest_batch / Store.fill_liveness.
    holder: LeaseHolder | None = None
    runner_alive: bool | None = None
    tally: BatchTally | None = None  # the running totals stored on the batch (see Store.progress)
    # The workers recorded on the batch (Store.worker_lease), None for a run before workers.
    workers: list[LeaseHolder] | None = None

    @property
    def stopped_unexpectedly(self) -> bool:
        """Stored as preparing/ready/running, but no live runner works on it: its process
        was killed or crashed. `simulator resume` continues it."""
        unended = self.status in (BatchStatus.PREPARING, BatchStatus.READY, BatchStatus.RUNNING)
        return unended and self.runner_alive is not True

    @property
    def shown_status(self) -> BatchStatus:
        """The status to show: `running` only while a live runner holds the lease."""
        return BatchStatus.INTERRUPTED if self.stopped_unexpectedly else self.status


@dataclass
class BatchTotals:
    """Messages, tokens, retries and failures of a batch (for status and summaries)."""

    messages: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    calls: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class BatchTally:
    """Conversations by status and the totals of a batch, as kept on the batch document.

    `owner` says when they can be trusted: `released` (the last run ended cleanly), a
    runner's lease token (that run keeps them up to date), `checked:<token>` (recounted after
    that runner died). Anything else, or none, means they are recounted.
    """

    counts: dict[str, int] = field(default_factory=dict)
    totals: BatchTotals = field(default_factory=BatchTotals)
    owner: str = ""


@dataclass
class Deleted:
    """What a delete removed."""

    experiments: int = 0
    batches: int = 0
    conversations: int = 0
    messages: int = 0
    summaries: int = 0
    selector_calls: int = 0


@dataclass
class DeletePlan:
    """An experiment the current user may delete, with what deleting it removes."""

    experiment: Experiment
    batches: int
    conversations: int


@dataclass
class ConversationRecord:
    id: str
    experiment_id: str
    batch_id: str | None
    index: int
    spec: ConversationSpec
    agents: list[Agent]
    summarizer_prompt: str
    status: ConversationStatus
    creator: str
    created_at: datetime
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    usage: dict[str, Usage] = field(default_factory=dict)
    fallbacks: int = 0
    favourited_by: list[str] = field(default_factory=list)  # who starred it (each for themselves)
    note: str = ""
    message_count: int = 0
    # Flag counts, selector figures and the `usable` verdict, set when it completed
    # (None before, and for conversations stored before quality flags existed).
    quality: Quality | None = None


@dataclass
class CachedResponse:
    """One LLM response kept by the response cache (simulator/llm/cache.py)."""

    key: str
    model: str  # the LLM's label, e.g. "openai/gpt-4o-mini" (to see what the cache holds)
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: float = 0.0  # of the call that made it
    finish_reason: str | None = None


@dataclass
class Score:
    """One outcome of one conversation (message "") or one of its messages ("day:turn")."""

    conversation_id: str
    message: str
    scorer: str
    version: str
    source: str  # judge:<model> | moderation:<model> | python:<function> | human:<name>
    value: Any  # a label, a number, a text; None when the answer was invalid
    valid: bool = True
    raw: str | None = None  # the answer as given (the judge's last reply, a cell)
    prompt: str | None = None  # what the judge was asked (left out of listings)
    detail: dict[str, Any] = field(default_factory=dict)  # moderation categories, turn ...
    attempts: int = 1
    usage: Usage = field(default_factory=Usage)
    experiment_id: str = ""
    batch_id: str | None = None
    role: str = ""  # the role of the scored message
    creator: str = ""
    created_at: datetime | None = None


@dataclass
class ScoreSeries:
    """The scores of one scorer version from one source in an experiment (export columns)."""

    scorer: str
    version: str
    source: str
    count: int
    latest: datetime | None  # when the newest of them was stored
    per_message: bool


@dataclass
class AnnotationSheet:
    """An exported annotation sheet: which item id means which conversation or message."""

    id: str
    experiment_id: str
    scorer: str
    version: str
    annotator: str
    definition: dict[str, Any]  # the scorer as exported, to check answers on import
    # item id -> (conversation, message, turns of the conversation, batch, message role)
    items: dict[str, tuple[str, str, int, str | None, str]]
    creator: str = ""
    created_at: datetime | None = None
