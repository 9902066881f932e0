"""Scores and annotation from the experiment menu: score the conversations, export an
annotation sheet, import one, see agreement.

Each answer becomes the call `simulator score`, `annotate export|import` and `agreement` make
(simulator.scoring.run.score, annotation.export_sheet / import_sheet, agreement.agreement_for),
with the same settings (concurrency, retries), so there is no second code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from simulator import display
from simulator.errors import UserError
from simulator.experiment import Experiment
from simulator.interactive.questions import Choice, Questions, required
from simulator.store import Store

if TYPE_CHECKING:
    from simulator.scoring.definition import Scorer


class ScoresMenu:
    """The "Scores and annotation" menu of one experiment."""

    def __init__(self, store: Store, q: Questions, exp: Experiment):
        self.store, self.q, self.exp = store, q, exp
        self.scorers_file: Path | None = None  # asked for when the experiment has no scorers

    def scorers(self) -> list[Scorer]:
        """The experiment's scorers (and a scorers file's, once one was given)."""
        from simulator.scoring.definition import load_scorers_file
        from simulator.scoring.run import scorers_for

        extra = load_scorers_file(self.scorers_file) if self.scorers_file else []
        found = scorers_for(self.exp, extra)
        if found:
            return found

        def exists(text: str) -> bool | str:
            return Path(text.strip()).is_file() or "No such file: give a YAML file's path."

        answer = self.q.text(
            "The experiment defines no scorers: a YAML file with `scorers:`",
            "experiments/prison-scorers.yaml",
            validate=exists,
        )
        self.scorers_file = Path(answer)
        return scorers_for(self.exp, load_scorers_file(self.scorers_file))

    def choose_scorer(self, message: str, *, judges_only: bool = False) -> str:
        scorers = [s for s in self.scorers() if s.kind == "judge" or not judges_only]
        if not scorers:
            raise UserError(
                "No judge scorer to annotate: people answer judge scorers (choice, scale, turn "
                "or text); add one under `scorers:`."
            )
        return str(self.q.select(message, [Choice(_scorer_title(s), s.name) for s in scorers]))

    def score(self) -> None:
        """Like `simulator score EXPERIMENT --scorer ...`: only what has no score is scored."""
        from rich.progress import Progress

        from simulator.runner import retry_policy
        from simulator.scoring.definition import choose
        from simulator.scoring.run import ScoreOptions, ScoreProgress, score, select_conversations
        from simulator.settings import load_settings

        scorers = self.scorers()
        names = self.q.checkbox(
            "Score with",
            [Choice(_scorer_title(s), s.name, checked=True) for s in scorers],
            at_least_one="Tick at least one scorer (Space).",
        )
        chosen = choose(scorers, names)
        _, records = select_conversations(self.store, self.exp.id or "")
        if not records:
            raise UserError("No ended conversations to score: perform some first.")
        settings = load_settings()
        with Progress(console=self.q.console, transient=True) as progress:
            task = progress.add_task("Scoring", total=None)

            def on_progress(event: ScoreProgress) -> None:
                if event.kind == "started":
                    progress.update(task, total=event.total)
                elif event.kind in ("scored", "invalid"):
                    progress.update(task, completed=event.done)

            options = ScoreOptions(
                concurrency=settings.concurrency,
                retry=retry_policy(settings),
                on_progress=on_progress,
                pull_progress=display.PullView(progress.console, live=False),
            )
            report = score(self.store, self.exp, records, chosen, options)
        for line, problem in display.score_report_lines(report, [s.name for s in chosen]):
            if problem:
                self.q.error(line)
            else:
                self.q.say(line)

    def export_sheet(self) -> None:
        """Like `simulator annotate export EXPERIMENT --scorer --annotator --out`."""
        from simulator.scoring.annotation import export_sheet

        scorer = self.choose_scorer("Annotate which scorer?", judges_only=True)
        annotator = self.q.text("Annotator", validate=required("Type the annotator's name."))

        def sheet_file(text: str) -> bool | str:
            ok = Path(text.strip()).suffix.lower() in (".xlsx", ".csv")
            return ok or "Give a .xlsx or a .csv file."

        out = self.q.text(
            "Write the sheet to",
            f"annotation/{self.exp.name}-{scorer}-{annotator}.xlsx",
            validate=sheet_file,
        )
        if Path(out).exists() and not self.q.confirm(
            f"{out} exists (it may hold an annotator's answers). Overwrite it?", default=False
        ):
            return
        sample = self.q.optional_number("Only a random sample of N items", 1, None, integer=True)
        blind = self.q.confirm("Blind (hide every condition, shuffle the rows)?", default=False)
        result = export_sheet(
            self.store,
            self.exp.id or "",
            scorer,
            annotator,
            Path(out),
            sample=int(sample) if sample is not None else None,
            blind=blind,
            scorers_file=self.scorers_file,
            overwrite=True,  # asked above
        )
        self.q.say(f"Wrote {result.rows} rows to {result.path} (sheet {result.sheet_id}).")

    def import_sheet(self) -> None:
        """Like `simulator annotate import FILE --annotator NAME` (all rows valid, or none)."""
        from simulator.scoring.annotation import import_sheet

        def exists(text: str) -> bool | str:
            return Path(text.strip()).is_file() or "No such file."

        path = self.q.text("The filled-in sheet (.xlsx or .csv)", validate=exists)
        annotator = self.q.text("Annotator", validate=required("Type the annotator's name."))
        result = import_sheet(self.store, Path(path), annotator)
        self.q.say(
            f"Imported {result.answers} answers of {annotator} for {result.scorer} "
            f"({result.blank} rows left blank)."
        )

    def agreement(self) -> None:
        """Like `simulator agreement EXPERIMENT --scorer NAME [--confusion]`."""
        from simulator.scoring.agreement import agreement_for, render

        scorer = self.choose_scorer("Agreement on which scorer?")
        confusion = self.q.confirm("Confusion matrices too?", default=False)
        result = agreement_for(
            self.store, self.exp.id or "", scorer, scorers_file=self.scorers_file
        )
        self.q.say(render(result, confusion=confusion))


def _scorer_title(s: Scorer) -> str:
    return f"{s.name} ({s.kind}, per {s.level})"
