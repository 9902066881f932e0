"""`simulator export --format parquet`: the three analysis tables of an export's selection,
as parquet (pyarrow) and as csv, beside the other export formats (issue 12)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from simulator.analysis.frames import (
    conversations_frame,
    from_records,
    messages_frame,
    require,
    scores_frame,
)

if TYPE_CHECKING:
    from simulator.export import ExportResult, Selection
    from simulator.store import Store

TABLES = ("conversations", "messages", "scores")


def export_tables(store: Store, sel: Selection, out_dir: Path) -> ExportResult:
    """<kind>-<id>-conversations|messages|scores.parquet and .csv in the export's folder of
    the experiment under `out_dir` (where the other formats write)."""
    from simulator.errors import UserError
    from simulator.export import experiment_folder

    require("pandas", "pyarrow")
    folder = out_dir / experiment_folder(sel.experiment)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return write_tables(store, sel, folder)
    except OSError as e:
        raise UserError(f"Cannot write the export into {out_dir}: {e.strerror or e}.") from None


def write_tables(store: Store, sel: Selection, folder: Path) -> ExportResult:
    """The three tables in `folder`."""
    from simulator.export import ExportResult

    batch_id = sel.batch.id if sel.batch is not None else None
    data = from_records(store, sel.experiment, batch_id, sel.conversations)
    for rec, messages in data.messages():  # the selection was listed without its counts
        rec.message_count = len(messages)
    frames = {
        "conversations": conversations_frame(data),
        "messages": messages_frame(data),
        "scores": scores_frame(data),
    }
    result = ExportResult(conversations=len(sel.conversations), rows=len(frames["messages"]))
    for name in TABLES:
        stem = folder / f"{sel.kind}-{sel.id}-{name}"
        frames[name].to_parquet(stem.with_suffix(".parquet"), index=False)
        frames[name].to_csv(stem.with_suffix(".csv"), index=False)
        result.files += [stem.with_suffix(".parquet"), stem.with_suffix(".csv")]
    return result
