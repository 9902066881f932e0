"""The questionary questions of the interactive menus: the only module that imports questionary.

Questions asks on one terminal (or a test's pipe input) and turns Ctrl-C, Esc and the end of
the input into Cancelled; required and comma_list check and split its text answers;
manual_chooser asks who speaks next. Choice and Separator are re-exported
so the other modules need not import questionary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import questionary
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, merge_key_bindings
from prompt_toolkit.output import Output
from questionary import Choice, Separator
from rich.console import Console

from simulator.conversation import Agent, ManualChooser, Message

__all__ = [
    "Cancelled",
    "Choice",
    "Questions",
    "Separator",
    "comma_list",
    "manual_chooser",
    "required",
]


class Cancelled(Exception):
    """Ctrl-C or Esc at a question (or the input ended): go back, save nothing."""


def _bind_escape(question: questionary.Question) -> questionary.Question:
    """Make Esc leave the question the way Ctrl-C does (questionary only binds Ctrl-C)."""
    bindings = KeyBindings()

    @bindings.add("escape", eager=True)
    def _leave(event: Any) -> None:
        event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    app = question.application
    app.key_bindings = merge_key_bindings([app.key_bindings or KeyBindings(), bindings])
    return question


class Questions:
    """questionary questions on one terminal (or test pipe); Ctrl-C / Esc raise Cancelled."""

    def __init__(
        self,
        *,
        input: Input | None = None,
        output: Output | None = None,
        console: Console | None = None,
    ):
        self.input = input
        self.output = output
        self.console = console or Console(highlight=False)

    def _io(self) -> dict[str, Any]:
        return {"input": self.input, "output": self.output}

    def ask(self, question: questionary.Question) -> Any:
        _bind_escape(question)
        try:
            answer = question.unsafe_ask()
        except (KeyboardInterrupt, EOFError):
            raise Cancelled from None
        if answer is None:
            raise Cancelled
        return answer

    def select(
        self,
        message: str,
        choices: Sequence[str | Choice | Separator],
        *,
        default: Any = None,
        search: bool = False,
    ) -> Any:
        return self.ask(
            questionary.select(
                message,
                list(choices),
                default=default,
                use_search_filter=search,
                use_jk_keys=not search,
                instruction="(arrows, Enter; type to search; Esc: back)" if search else None,
                **self._io(),
            )
        )

    def checkbox(
        self,
        message: str,
        choices: Sequence[str | Choice],
        *,
        at_least_one: str | None = None,
        validate: Callable[[list[Any]], bool | str] | None = None,
    ) -> list[Any]:
        def check(selected: list[Any]) -> bool | str:
            if at_least_one and not selected:
                return at_least_one
            return validate(selected) if validate else True

        return list(
            self.ask(
                questionary.checkbox(
                    message,
                    list(choices),
                    validate=check,
                    instruction="(Space toggles, Enter confirms)",
                    **self._io(),
                )
            )
        )

    def confirm(self, message: str, default: bool = False) -> bool:
        return bool(self.ask(questionary.confirm(message, default=default, **self._io())))

    def text(
        self,
        message: str,
        default: str = "",
        *,
        validate: Callable[[str], bool | str] | None = None,
        instruction: str | None = None,
    ) -> str:
        question = questionary.text(
            message,
            default=default,
            validate=validate,
            instruction=instruction,
            **self._io(),
        )
        return str(self.ask(question)).strip()

    def integer(self, message: str, default: int, minimum: int, maximum: int | None = None) -> int:
        def check(text: str) -> bool | str:
            return _number_problem(text.strip(), minimum, maximum, True, blank_ok=False) or True

        return int(self.text(message, str(default), validate=check))

    def optional_number(
        self, message: str, minimum: float, maximum: float | None, *, integer: bool = False
    ) -> float | int | None:
        """A number in range, or None when left blank."""

        def check(text: str) -> bool | str:
            return _number_problem(text.strip(), minimum, maximum, integer, blank_ok=True) or True

        text = self.text(message, validate=check, instruction="(blank: not set)")
        if not text:
            return None
        return int(text) if integer else float(text)

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, highlight=False, markup=False)

    def error(self, text: str) -> None:
        self.say(text, style="red")


def required(message: str) -> Callable[[str], bool | str]:
    """A text question's check: anything but blank, else this message."""
    return lambda text: bool(text.strip()) or message


def comma_list(text: str) -> list[str]:
    """The items of a comma- (or semicolon-) separated answer, blanks dropped."""
    return [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]


def _number_problem(
    text: str, minimum: float, maximum: float | None, integer: bool, *, blank_ok: bool
) -> str | None:
    if not text:
        return None if blank_ok else "Type a number."
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        return "Type a whole number." if integer else "Type a number, e.g. 0.7."
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" to {maximum:g}" if maximum is not None else " or more"
        return f"Allowed: {minimum:g}{upper}."
    return None


def manual_chooser(*, input: Input | None = None, output: Output | None = None) -> ManualChooser:
    """Ask the user at the terminal who speaks next (speaker selection `manual`)."""

    def choose(
        agents: Sequence[Agent], last: str | None, day: int, turn: int, today: Sequence[Message]
    ) -> str:
        if today:
            print(f"\n{today[-1].speaker}: {today[-1].content}")
        choices = [a.name for a in agents if a.name != last]
        answer = questionary.select(
            f"Day {day}, message {turn}: who speaks next?", choices, input=input, output=output
        ).ask()
        if answer is None:
            raise KeyboardInterrupt
        return str(answer)

    return choose
