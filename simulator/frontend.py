"""What every command-line front end shares: the consoles, `friendly` error handling and
opening the store as configured.

cli.py and cli_results.py both import this module (and neither imports the other's
internals), so there is no import cycle between the front-end modules.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer
import typer.core

from simulator.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

    from simulator.store import Store


class _LazyConsole:
    """Becomes a rich Console at its first use, so a command that prints nothing through
    rich (`--help`) does not import rich (issue 14). After that it *is* a Console."""

    def __init__(self, **options: Any) -> None:
        self.__dict__["_lazy_options"] = options

    def _become(self) -> None:
        from rich.console import Console

        options = self.__dict__.pop("_lazy_options")
        object.__setattr__(self, "__class__", Console)
        Console.__init__(self, **options)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # only for attributes not found
        if "_lazy_options" not in self.__dict__:
            raise AttributeError(name)
        self._become()
        return getattr(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._become()
        setattr(self, name, value)


class LazyModule:
    """A module imported on its first attribute access (start-up, issue 14)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


def lazy_function(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, a function imported when first called (start-up, issue 14)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


# Piped output (files, less, grep) is read later on a wide screen: do not squeeze it to 80.
out: Console = _LazyConsole(highlight=False, width=None if sys.stdout.isatty() else 160)  # type: ignore[assignment]
err: Console = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)  # type: ignore[assignment]

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
    from simulator.store import Store

    settings = load_settings()
    db = connect(settings)
    store = Store.open(db, current_user(db, settings))
    store.on_notice = notice  # e.g. which of several experiments a shared name stood for
    return store


def notice(text: str) -> None:
    """Something the user should know that is not an error: one paragraph on stderr."""
    from rich.markup import escape

    err.print(f"[yellow]Note:[/] {escape(text)}", markup=True, highlight=False)


class HelpCommand(typer.core.TyperCommand):
    """A command whose help reads like a man page: `run [OPTIONS] EXPERIMENT`, `--llm MODEL`.

    Typer's own help writes required arguments as `{experiment}` and types as `<list[str]>`.
    Explicit metavars are used as given; otherwise the parameter's name in capitals.
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = _metavar(param)
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            names, text = record
            if param.param_type_name == "argument":
                args.append((_metavar(param), text))
            else:
                opts.append((_TYPE_LABEL.sub(f" {_metavar(param)}", names), text))
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


_TYPE_LABEL = re.compile(r" <[^>]*>(\.\.\.)?$")


def _metavar(param: Any) -> str:
    return str(param.metavar or (param.name or "value").upper())


def use_help_command(*apps: typer.Typer) -> None:
    """Give every command of these apps (registered so far) the HelpCommand help format."""
    for typer_app in apps:
        for info in typer_app.registered_commands:
            if info.cls in (None, typer.core.TyperCommand):
                info.cls = HelpCommand
