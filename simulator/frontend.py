"""What every command-line front end shares: the consoles, `friendly` error handling and
opening the store as configured.

cli.py and cli_results.py both import this module (and neither imports the other's
internals), so there is no import cycle between the front-end modules.
"""

from __future__ import annotations

import contextvars
import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from simulator.errors import UserError
from simulator.store import Store

# Piped output (files, less, grep) is read later on a wide screen: do not squeeze it to 80.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])
# An invalid setting found by the app callback, raised when the command starts: after
# click has handled `COMMAND --help`, which must work in a broken setup.
_settings_error: contextvars.ContextVar[UserError | None] = contextvars.ContextVar(
    "settings_error", default=None
)


def defer_settings_error(error: UserError | None) -> None:
    """Set (or, with None, clear) the settings error the next command raises first."""
    _settings_error.set(error)


def print_error(error: UserError) -> None:
    """One paragraph on stderr: `Error: what was wrong and how to fix it`."""
    err.print(f"[bold red]Error:[/] {error}", markup=True, highlight=False)


def friendly(fn: F) -> F:
    """Turn a UserError into a short message and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            pending = _settings_error.get()
            if pending is not None:
                raise pending
            return fn(*args, **kwargs)
        except UserError as e:
            print_error(e)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def open_store() -> Store:
    """Connect as configured (flag > env > .env > defaults) and identify the user."""
    from simulator.database import connect, current_user
    from simulator.settings import load_settings

    settings = load_settings()
    db = connect(settings)
    return Store.open(db, current_user(db, settings))
