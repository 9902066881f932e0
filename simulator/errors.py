"""One error hierarchy. UserError messages say what was wrong and how to fix it."""

from __future__ import annotations


class SimulatorError(Exception):
    """Base of every error the simulator raises on purpose."""


class UserError(SimulatorError):
    """A mistake the user can fix; the CLI prints the message (no traceback) and exits 1."""

    def reworded(self, message: str) -> UserError:
        """The same kind of error with another message (a plain UserError for a kind whose
        constructor takes other arguments): callers that tell the kinds apart still can."""
        try:
            return type(self)(message)
        except TypeError:
            return UserError(message)


class ValidationError(UserError):
    """An experiment definition (YAML or values) is invalid."""


class NotFoundError(UserError):
    """An id or prefix matched nothing (or too much)."""


class PermissionDenied(UserError):
    """The current user is not allowed to change this object."""


class ProviderError(SimulatorError):
    """An LLM call failed.

    ``retryable`` marks faults worth retrying (connection errors, timeouts, 429, 5xx);
    ``retry_after`` carries a server's Retry-After in seconds when it sent one;
    ``overloaded`` marks an endpoint past its capacity (429, 503, 504, a timeout), so the
    retry wrapper lowers its in-flight limit.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        overloaded: bool = False,
    ):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.overloaded = overloaded


class ProviderUnavailable(ProviderError, UserError):
    """The LLM endpoint cannot be reached at all (e.g. Ollama not running)."""

    def __init__(self, message: str):
        ProviderError.__init__(self, message, retryable=True)


class ModelNotFound(ProviderError, UserError):
    """The endpoint is up but does not have the requested model."""

    def __init__(self, message: str):
        ProviderError.__init__(self, message, retryable=False)


class ProviderAuthError(ProviderError, UserError):
    """The endpoint has no credentials or refused them (e.g. OPENAI_API_KEY missing or wrong)."""

    def __init__(self, message: str):
        ProviderError.__init__(self, message, retryable=False)


class ScriptExhausted(ProviderError):
    """A scripted model with a fixed list of replies ran out."""


class RetryAfterTooLong(ProviderError):
    """The server asked to wait longer than SIMULATOR_RETRY_MAX_DELAY before the next try."""

    def __init__(self, cause: ProviderError, cap: float):
        wait = cause.retry_after or 0.0
        super().__init__(
            f"{cause}. The server asked to wait {wait:.0f} s before trying again, more than "
            f"SIMULATOR_RETRY_MAX_DELAY ({cap:g} s), so the call was not retried: resume the "
            "batch later, or raise SIMULATOR_RETRY_MAX_DELAY to wait that long"
        )
        self.retry_after = wait


class StorageError(UserError):
    """MongoDB is unreachable, refuses us, or went away."""


class LeaseLost(StorageError):
    """Another process took over the batch (or the run ended): this run writes nothing more."""


class RecordTooLarge(UserError):
    """A record (message, summary, conversation) is over MongoDB's 16 MB document limit."""


class DatabaseLost(StorageError):
    """The database went away during a run; `abandoned` threads were still waiting on it."""

    abandoned: int = 0


class Interrupted(SimulatorError):
    """Raised inside a conversation when its batch is stopping (never shown to the user)."""


class DefinitionChanged(UserError):
    """An edited YAML file would start a second experiment under a name the user already has."""


class NotAFile(UserError):
    """A path given as an experiment file is a directory (or not a file at all)."""


class SheetRejected(UserError):
    """An annotation sheet with invalid rows: nothing of it was imported (issue 11)."""


class MissingExtra(UserError):
    """An optional dependency (an extra such as `analysis`) is not installed (issue 12)."""
