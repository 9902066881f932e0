"""The experiment menu's "Report" entry: which conditions to compare, usable only or not,
where to write; then the same library call as `simulator report` (issue 12)."""

from __future__ import annotations

from pathlib import Path

from simulator.experiment import Experiment
from simulator.interactive.questions import Choice, Questions
from simulator.store import Store, plural

CONDITIONS = ("llm", "days", "messages", "speaker_selection", "repetition")


def ask_report(store: Store, q: Questions, exp: Experiment) -> None:
    from simulator.analysis.report import write_report
    from simulator.export import safe_name

    # Ticked: what varies among the stored conversations (as `simulator report` without --by)
    records = store.list_conversations(experiment_id=exp.id, message_counts=False)
    levels = {f.name: {r.spec.factors.get(f.name) for r in records} for f in exp.factors}
    choices = [Choice(f"factor {f.name} ({', '.join(f.levels)})", f.name,
                      checked=len(levels[f.name]) > 1)
               for f in exp.factors]  # fmt: skip
    choices.append(Choice("LLM", "llm", checked=len({r.spec.llm.label for r in records}) > 1))
    choices += [Choice(c.replace("_", " "), c) for c in CONDITIONS[1:]]
    choices += [Choice(f"agents per role: {r.name}", f"agents_{r.name}") for r in exp.roles]
    by = q.checkbox("Compare which conditions? (none: all conversations together)", choices)
    usable_only = q.confirm("Only usable conversations (the quality rule)?", default=False)
    default = Path("reports") / f"{safe_name(exp.name)}-{(exp.id or '')[:8]}"
    out_dir = Path(q.text("Folder for the report", str(default)))
    result = write_report(store, exp.id or "", out_dir, by=by, usable_only=usable_only)
    for notice in result.notices:
        q.say(notice, style="yellow")
    q.say(
        f"Report of {plural(result.conversations, 'conversation')} ({result.analysed} analysed): "
        f"{len(result.tables)} tables, {len(result.figures)} figure files. Open {result.html}"
    )
