"""The menu tree of `simulator` with no command: experiments, one experiment, its conversations.

Every answer becomes the same library call the flags and YAML make (Store methods, export;
creating and running go through wizard.py and run.py), so there is no second code path.
Ctrl-C or Esc at any question goes back to the previous menu and saves nothing. What only
the creator may do (change the note, delete) is shown to everyone else disabled, with the
reason, before any question is asked; starring is for everyone (each person has their own
favourites).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from rich.console import Console
from rich.text import Text

from simulator import display
from simulator.errors import NotFoundError, PermissionDenied, UserError
from simulator.experiment import Experiment
from simulator.interactive.questions import Cancelled, Choice, Questions, Separator, comma_list
from simulator.interactive.run import run_conversations
from simulator.interactive.scoring import ScoresMenu
from simulator.interactive.wizard import create_experiment, duplicate_and_update, write_yaml
from simulator.store import (
    ConversationRecord,
    ExperimentRow,
    Store,
    conversation_filter,
    parse_where,
    plural,
)

_BACK = "__back__"
_FILTER = "__filter__"
_TOGGLE = "__toggle__"


def main_menu(
    store: Store,
    *,
    input: Input | None = None,
    output: Output | None = None,
    console: Console | None = None,
    experiments_dir: Path | str = "experiments",
) -> None:
    """Create an experiment, select one (and everything below it), or exit."""
    Menus(
        store, Questions(input=input, output=output, console=console), Path(experiments_dir)
    ).main()


# questionary draws " » " (or three spaces) before each entry; one column more is left free
# so that a row never touches the edge, where some terminals wrap.
_POINTER = 4
_GAP = "  "


def experiment_titles(rows: Sequence[ExperimentRow], width: int) -> list[str]:
    """The rows of the experiment list, in columns that fit `width` terminal columns.

    Always the star, the id's first 8 characters, the name and the number of conversations;
    other columns while they fit; the note is cut last (display.experiment_columns).
    """
    cells = [display.experiment_cells(r) for r in rows]
    for c in cells:
        c["conv."] += " conv."
    widths = display.experiment_columns(cells, width - _POINTER, len(_GAP))
    return [
        _GAP.join(
            _fit(c[col], w, right=col == "conv.", pad=col != "note") for col, w in widths.items()
        ).rstrip()
        for c in cells
    ]


def conversation_title(rec: ConversationRecord, user: str, width: int = 0) -> str:
    """One row of the conversation list: its condition and status (cut to `width`, if any)."""
    s = rec.spec
    agents = ",".join(f"{r}={n}" for r, n in s.agents.items())
    status = rec.status + (f": {_cut(rec.error, 40)}" if rec.error else "")
    title = (
        f"{'⭐' if user in rec.favourited_by else '  '} {rec.id[:8]}  {s.llm.label} · "
        f"{rec.message_count}/{s.messages} msgs · {s.days} day(s) · {agents} · {s.speaker} · "
        f"rep {s.repetition} · {status}"
    )
    return _fit(title, width - _POINTER, pad=False) if width else title


def _fit(text: str, width: int, *, right: bool = False, pad: bool = True) -> str:
    """`text` in exactly `width` terminal cells (cut with … when longer; padded unless not)."""
    cut = Text(" ".join(text.split()))
    cut.truncate(max(width, 1), overflow="ellipsis")
    if not pad:
        return cut.plain
    space = " " * max(width - cut.cell_len, 0)
    return space + cut.plain if right else cut.plain + space


def _cut(text: str, width: int) -> str:
    return _fit(text, width, pad=False)


def _favourite_choice(favourite: bool) -> Choice:
    return Choice("Remove from my favourites" if favourite else "Add to my favourites", "favourite")


def _creator_only(
    title: str, value: str, creator: str | None, user: str, others: str = ""
) -> Choice:
    """An entry only the creator may choose; for anyone else it is shown disabled, saying why
    (before any question is asked). `others`: why not even the creator (others' work in it)."""
    if creator != user:
        return Choice(title, value, disabled=f"only its creator, {creator}, can")
    if others:
        return Choice(title, value, disabled=others)
    return Choice(title, value)


def _others_work(conversations: Sequence[ConversationRecord], user: str) -> str:
    """Whose conversations (not the user's) an experiment holds: it cannot be deleted then."""
    counts: dict[str, int] = {}
    for c in conversations:
        if c.creator != user:
            counts[c.creator] = counts.get(c.creator, 0) + 1
    if not counts:
        return ""
    whose = ", ".join(f"{n} by {creator}" for creator, n in sorted(counts.items()))
    return f"it holds conversations of others ({whose})"


class Menus:
    """The menu tree over one store. Each action either completes or saves nothing."""

    def __init__(self, store: Store, q: Questions, experiments_dir: Path):
        self.store = store
        self.q = q
        self.console = q.console
        self.experiments_dir = experiments_dir
        self.mine = False

    def guarded(self, action: Callable[..., Any], *args: Any) -> Any:
        """Run one action: Ctrl-C / Esc and refusals become a message, then back to the menu."""
        try:
            return action(*args)
        except (Cancelled, KeyboardInterrupt):
            self.q.say("Cancelled: nothing was saved.", style="yellow")
        except PermissionDenied as e:
            self.q.error(f"Refused: {e}")
        except UserError as e:
            self.q.error(str(e))
        return None

    def menu(
        self, message: str, choices: Sequence[Choice | Separator], *, search: bool = False
    ) -> Any:
        """The chosen value, or None for Back, Ctrl-C or Esc (leave this menu)."""
        try:
            choice = self.q.select(message, choices, search=search)
        except Cancelled:
            return None
        return None if choice == _BACK else choice

    # main menu and the experiment list

    def main(self) -> None:
        while True:
            count = len(self.store.list_experiments())
            choice = self.menu(
                "What do you want to do?",
                [
                    Choice("Create a new experiment", "create"),
                    Choice(f"Select an experiment ({count})", "select"),
                    Choice("Exit", _BACK),
                ],
            )
            if choice is None:
                return
            if choice == "create":
                created = self.guarded(create_experiment, self.store, self.q, self.experiments_dir)
                if created is not None:
                    self.experiment_menu(created.id)
            else:
                self.pick_experiment()

    def pick_experiment(self) -> None:
        while True:
            rows = self.store.list_experiments(mine=self.mine)
            whose = "yours" if self.mine else "everyone's"
            if not rows:
                self.q.say(
                    f"No experiments ({whose}) yet: create one, or import a YAML file "
                    "with `simulator experiment import FILE`."
                )
            titles = experiment_titles(rows, self.console.width)
            choices: list[Choice | Separator] = [
                Choice(title, r.experiment.id) for title, r in zip(titles, rows, strict=True)
            ]
            toggle = "Show everyone's experiments" if self.mine else "Show only mine"
            choices += [Separator(), Choice(toggle, _TOGGLE), Choice("Back", _BACK)]
            choice = self.menu(f"Experiments ({whose})", choices, search=True)
            if choice is None:
                return
            if choice == _TOGGLE:
                self.mine = not self.mine
                continue
            self.experiment_menu(choice)

    # one experiment

    def experiment_menu(self, exp_id: str) -> None:
        while True:
            try:
                exp = self.store.get_experiment(exp_id)
            except NotFoundError:
                return
            conversations = self.store.list_conversations(experiment_id=exp.id)
            self.show_header(exp, len(conversations))
            user = self.store.user
            choice = self.menu(
                f"Experiment '{exp.name}'",
                [
                    Choice("Perform new conversations", "run"),
                    Choice("Duplicate and update", "duplicate"),
                    _creator_only("Change the note", "note", exp.creator, user),
                    _favourite_choice(exp.favourite),
                    Choice("Export to files", "export"),
                    Choice(f"Browse conversations ({len(conversations)})", "browse"),
                    _creator_only(
                        "Delete the experiment",
                        "delete",
                        exp.creator,
                        user,
                        _others_work(conversations, user),
                    ),
                    Choice("Scores and annotation", "scores"),  # issue 11
                    Choice("Report: tables and figures", "report"),
                    Choice("Back", _BACK),
                ],
            )
            if choice is None:
                return
            if choice == "run":
                self.guarded(run_conversations, self.store, self.q, exp)
            elif choice == "duplicate":
                copy = self.guarded(
                    duplicate_and_update, self.store, self.q, exp, self.experiments_dir
                )
                if copy is not None:
                    exp_id = copy.id  # carry on with the copy
            elif choice == "note":
                self.guarded(self.change_note, exp)
            elif choice == "favourite":
                self.guarded(self.store.set_favourite, exp.id or "", not exp.favourite)
            elif choice == "export":
                self.guarded(self.export, exp)
            elif choice == "report":
                from simulator.interactive.report import ask_report

                self.guarded(ask_report, self.store, self.q, exp)
            elif choice == "browse":
                self.browse(exp)
            elif choice == "scores":
                self.scores(exp)
            elif choice == "delete" and self.guarded(self.delete, exp, len(conversations)):
                return

    def scores(self, exp: Experiment) -> None:
        """Score, export or import an annotation sheet, see agreement (interactive/scoring)."""
        actions = ScoresMenu(self.store, self.q, exp)
        while True:
            choice = self.menu(
                f"Scores and annotation of '{exp.name}'",
                [
                    Choice("Score the conversations (choose scorers)", "score"),
                    Choice("Export an annotation sheet", "export_sheet"),
                    Choice("Import an annotation sheet", "import_sheet"),
                    Choice("See agreement between sources", "agreement"),
                    Choice("Back", _BACK),
                ],
            )
            if choice is None:
                return
            self.guarded(getattr(actions, choice))

    def show_header(self, exp: Experiment, conversations: int) -> None:
        created = exp.created_at.strftime("%Y-%m-%d %H:%M") if exp.created_at else "?"
        parent = f" · duplicated from {exp.parent_id}" if exp.parent_id else ""
        star = "⭐ " if exp.favourite else ""
        self.q.say(
            f"\n{star}{exp.name}  ({exp.id} · by {exp.creator} · {created}{parent})", style="bold"
        )
        self.q.say(
            f"roles: {', '.join(r.name for r in exp.roles)} · LLMs: "
            f"{', '.join(s.label for s in exp.llms)} · {plural(conversations, 'conversation')}"
            + (f"\nnote: {exp.note}" if exp.note else "")
        )

    def change_note(self, exp: Experiment) -> None:
        note = self.q.text("Note", exp.note)
        self.store.set_note(exp.id or "", note)
        self.q.say("Note saved.")

    def export(self, exp: Experiment) -> None:
        """The definition as YAML and/or the conversations (same calls as `simulator export`)."""
        from simulator.export import FORMATS, export

        what = self.q.checkbox(
            "Export what?",
            [Choice("the experiment's definition (YAML)", "yaml", checked=True)]
            + [Choice(f"its conversations as {fmt}", fmt) for fmt in FORMATS],
            at_least_one="Tick at least one (Space).",
        )
        if "yaml" in what:
            write_yaml(
                self.q,
                exp,
                self.experiments_dir,
                message="Write the definition to",
                declined="Definition not written.",
            )
        formats = [f for f in what if f != "yaml"]
        if formats:
            out_dir = Path(self.q.text("Folder for the conversations", "exports"))
            for fmt in formats:
                result = export(self.store, exp.id or "", fmt, out_dir, kind="experiment")
                self.q.say(
                    f"{fmt}: {plural(result.conversations, 'conversation')}, "
                    f"{len(result.files)} files in {out_dir}."
                )

    def delete(self, exp: Experiment, conversations: int) -> bool:
        if not self.q.confirm(
            f"Delete experiment '{exp.name}' ({exp.id}) with its "
            f"{plural(conversations, 'conversation')} "
            "and their messages?",
            default=False,
        ):
            return False
        counts = self.store.delete_experiment(exp.id or "")
        self.q.say(
            f"Deleted {exp.id}: {plural(counts.conversations, 'conversation')}, "
            f"{plural(counts.messages, 'message')}."
        )
        return True

    # conversations

    def browse(self, exp: Experiment) -> None:
        where: dict[str, str] = {}  # the condition filter, as `--where` takes it
        while True:
            records = self.store.list_conversations(
                experiment_id=exp.id, where=where, factors=exp.factor_levels()
            )
            if not records and where:
                self.q.say(f"No conversations with {_where_text(where)}; showing all.")
                where = {}
                continue
            if not records:
                self.q.say("No conversations yet: choose 'Perform new conversations'.")
                return
            user, width = self.store.user, self.console.width
            choices: list[Choice | Separator] = [
                Choice(conversation_title(r, user, width), r.id) for r in records
            ]
            now = f" (now: {_where_text(where)})" if where else ""
            choices += [Separator(), Choice(f"Filter by condition{now}", _FILTER)]
            choices += [Choice("Back", _BACK)]
            choice = self.menu(f"Conversations of '{exp.name}'", choices, search=True)
            if choice is None:
                return
            if choice == _FILTER:
                answer = self.guarded(self.ask_filter, exp, where)
                where = where if answer is None else answer  # Esc keeps the filter
                continue
            self.conversation_menu(choice, exp)

    def ask_filter(self, exp: Experiment, current: dict[str, str]) -> dict[str, str]:
        """Conditions as KEY=VALUE pairs, checked by the same filter `--where` uses."""
        factors = exp.factor_levels()
        keys = "llm, days, messages, speaker, status, repetition, creator, agents_ROLE"
        keys += "".join(f", {n} ({'/'.join(levels)})" for n, levels in factors.items())

        def problem(text: str) -> bool | str:
            try:
                conversation_filter(parse_where(comma_list(text)), factors)
            except UserError as e:
                return str(e)
            return True

        answer = self.q.text(
            "Condition (KEY=VALUE, comma-separated; empty: every conversation)",
            ", ".join(f"{k}={v}" for k, v in current.items()),
            validate=problem,
            instruction=f"(keys: {keys})",
        )
        return parse_where(comma_list(answer))

    def conversation_menu(self, conv_id: str, exp: Experiment) -> None:
        while True:
            try:
                rec = self.store.get_conversation(conv_id)
            except NotFoundError:
                return
            user = self.store.user
            starred = user in rec.favourited_by
            choice = self.menu(
                f"Conversation {rec.id}",
                [
                    Choice("View the transcript", "view"),
                    _favourite_choice(starred),
                    _creator_only("Delete the conversation", "delete", rec.creator, user),
                    Choice("Back", _BACK),
                ],
            )
            if choice is None:
                return
            if choice == "view":
                self.view(rec, exp)
            elif choice == "favourite":
                self.guarded(self.store.set_conversation_favourite, rec.id, not starred)
            elif choice == "delete" and self.guarded(self.delete_conversation, rec):
                return

    def view(self, rec: ConversationRecord, exp: Experiment) -> None:
        t = self.store.load_transcript(rec.id)
        roles = [r.name for r in exp.roles]
        scores = self.store.list_scores(conversation_id=rec.id)
        if self.console.is_terminal:
            with _less_keeps_colours(), self.console.pager(styles=True):
                display.render_transcript(
                    self.console, rec, t.messages, t.summaries, roles, scores=scores
                )
        else:
            display.render_transcript(
                self.console, rec, t.messages, t.summaries, roles, scores=scores
            )

    def delete_conversation(self, rec: ConversationRecord) -> bool:
        if not self.q.confirm(
            f"Delete conversation {rec.id} and its {rec.message_count} messages?", default=False
        ):
            return False
        counts = self.store.delete_conversation(rec.id)
        self.q.say(f"Deleted {rec.id}: {counts.messages} messages.")
        return True


@contextlib.contextmanager
def _less_keeps_colours() -> Iterator[None]:
    """`less` shows colour codes as text unless told -R (quit at once if it fits: -F)."""
    before = os.environ.get("LESS")
    if before is None:
        os.environ["LESS"] = "-RFX"
    elif "R" not in before:
        os.environ["LESS"] = f"{before} -R"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LESS", None)
        else:
            os.environ["LESS"] = before


def _where_text(where: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in where.items())
