"""Exports (issue 6): read back with pandas and compared with the store column by column,
txt in the prototype's layout, and the HTML pages rendered by a real headless Chromium."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from pandas.api import types
from rich.console import Console
from typer.testing import CliRunner

from simulator import display, export, prompts
from simulator.cli import app
from simulator.experiment import ModelSpec, load_experiment
from simulator.grid import make_grid
from simulator.quality import MESSAGE_FLAGS
from simulator.runner import RunOptions, start_batch
from simulator.store import Store
from tests.scenarios import PRISON_ONE

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
# One conversation speaks from a fixed script: a reply the cleaner cuts (so `raw` is kept),
# an empty reply asked three times (stored flagged empty), then plain replies and summaries.
SCRIPT = [
    "Back to your cells.\nResearcher: the guard stops here",
    "", "", "",
    "Fine, we go.",
    "Day one: the guard refused the extra hour.",
    "Still no.", "We ask again, politely.", "We will not give up.",
    "Day two: still refused.",
]  # fmt: skip
INT_COLUMNS = (
    "conversation_index", "days", "messages", "agents_guard", "agents_prisoner", "agents_total",
    "repetition", "seed", "day", "turn", "prompt_tokens", "completion_tokens", "retries", "calls",
)  # fmt: skip
TEXT_COLUMNS = (
    "experiment_id", "experiment_name", "batch_id", "conversation_id", "creator", "llm",
    "provider", "model", "speaker_selection", "status", "kind", "speaker", "role",
)  # fmt: skip


@pytest.fixture
def batch(db):
    store = Store.open(db, "alice")
    exp = load_experiment(PRISON_ONE)  # one of the 72 scenarios
    exp.llms.append(ModelSpec("fixed", "scripted", extra={"replies": SCRIPT}))
    exp = store.insert_experiment(exp)
    grid = make_grid(
        exp, llms=["scripted", "fixed"], messages=6, days=2, agents="guard=1,prisoner=2",
        speakers=["round_robin"],
    )  # fmt: skip
    report = start_batch(store, exp, grid, RunOptions())
    assert report.status == "completed"
    return store, exp, report.batch_id


def _records(store, batch_id):
    return {r.id: r for r in store.list_conversations(batch_id=batch_id)}


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _same(actual, expected) -> bool:
    if _missing(expected) or expected == "":
        # csv cannot tell an empty string from a missing value; both read back as NaN
        return _missing(actual) or actual == ""
    if isinstance(expected, float):
        return actual == pytest.approx(expected)
    return actual == expected


def test_jsonl_and_csv_read_back_with_pandas_match_the_store(batch, tmp_path):
    store, exp, batch_id = batch
    records = _records(store, batch_id)
    for fmt in ("jsonl", "csv"):
        result = export.export(store, batch_id[:7], fmt, tmp_path, kind="batch")
        (path,) = result.files
        assert path == tmp_path / f"prison-{exp.id[:8]}" / f"batch-{batch_id}.{fmt}"
        df = pd.read_json(path, lines=True) if fmt == "jsonl" else pd.read_csv(path)
        assert list(df.columns) == export.columns(exp)

        for col in INT_COLUMNS:
            assert types.is_integer_dtype(df[col]), (fmt, col, df[col].dtype)
        for col in TEXT_COLUMNS:
            assert types.is_string_dtype(df[col]) or df[col].dtype == object, (fmt, col)
        assert types.is_float_dtype(df["latency"])
        assert types.is_bool_dtype(df["empty"])

        expected = []
        for conv_id in sorted(records, key=lambda i: records[i].index):
            rec = records[conv_id]
            t = store.load_transcript(conv_id)
            s = rec.spec
            cond = {
                "experiment_id": exp.id, "experiment_name": "prison", "batch_id": batch_id,
                "conversation_id": rec.id, "conversation_index": rec.index, "creator": "alice",
                "llm": s.llm.label, "provider": "scripted", "model": s.llm.model,
                "temperature": None, "top_k": None, "top_p": None, "llm_seed": None,
                "context_length": None, "max_tokens": None, "repeat_penalty": None,
                "days": 2, "messages": 6, "agents_guard": 1, "agents_prisoner": 2,
                "agents_total": 3, "speaker_selection": "round_robin", "repetition": 0,
                "seed": 0, "status": "completed", "usable": rec.quality.usable,
            }  # fmt: skip

            def flag_cols(item):  # quality columns (issue 10)
                return {"finish_reason": item.finish_reason, "flags": ",".join(item.flags)} | {
                    f"flag_{f}": f in item.flags for f in MESSAGE_FLAGS
                }

            for day in (1, 2):
                today = [m for m in t.messages if m.day == day]
                for m in today:
                    expected.append(cond | {
                        "kind": "message", "day": m.day, "turn": m.turn, "speaker": m.speaker,
                        "role": m.role, "content": m.content, "raw": m.raw, "empty": m.empty,
                        "prompt_tokens": m.usage.prompt_tokens,
                        "completion_tokens": m.usage.completion_tokens,
                        "latency": m.usage.latency, "retries": m.usage.retries,
                        "calls": m.usage.calls,
                    } | flag_cols(m))  # fmt: skip
                (summary,) = [x for x in t.summaries if x.day == day]
                expected.append(cond | {
                    "kind": "summary", "day": day, "turn": len(today) + 1,
                    "speaker": "Summarizer", "role": "summarizer", "content": summary.content,
                    "raw": None, "empty": False,
                    "prompt_tokens": summary.usage.prompt_tokens,
                    "completion_tokens": summary.usage.completion_tokens,
                    "latency": summary.usage.latency, "retries": summary.usage.retries,
                    "calls": summary.usage.calls,
                } | flag_cols(summary))  # fmt: skip
        assert len(df) == len(expected) == 2 * (6 + 2) == result.rows
        for i, want in enumerate(expected):
            row = df.iloc[i]
            for col in df.columns:
                assert _same(row[col], want[col]), (fmt, i, col, row[col], want[col])

        fixed = df[df["model"] == "fixed"]
        assert fixed["raw"].notna().sum() == 1  # the cut reply keeps its raw text
        assert fixed.loc[fixed["raw"].notna(), "content"].item() == "Back to your cells."
        assert fixed["empty"].sum() == 1 and fixed["calls"].max() == 3
        assert (df["kind"] == "summary").sum() == 4


def test_one_conversation_and_a_whole_experiment(batch, tmp_path):
    store, exp, batch_id = batch
    records = list(_records(store, batch_id).values())
    one = export.export(store, records[0].id, "jsonl", tmp_path)
    assert one.conversations == 1
    df = pd.read_json(one.files[0], lines=True)
    assert set(df["conversation_id"]) == {records[0].id}
    whole = export.export(store, exp.id, "csv", tmp_path, kind="experiment")
    assert whole.files[0].name == f"experiment-{exp.id}.csv"
    assert set(pd.read_csv(whole.files[0])["conversation_id"]) == {r.id for r in records}


def test_txt_in_the_prototype_layout_with_prompts(batch, tmp_path):
    store, exp, batch_id = batch
    result = export.export(store, batch_id, "txt", tmp_path)
    folder = tmp_path / f"prison-{exp.id[:8]}"
    for rec in _records(store, batch_id).values():
        path = folder / rec.spec.llm.model / f"{rec.id}.txt"
        assert path in result.files
        blocks = re.findall(r"^\[Day (\d)\] ([A-Za-z_0-9]+): ", path.read_text(), re.M)
        t = store.load_transcript(rec.id)
        want = []
        for day in (1, 2):
            want.append((str(day), "Researcher"))
            want += [(str(day), m.speaker) for m in t.messages if m.day == day]
            want.append((str(day), "Summarizer"))
        assert blocks == want
        text = path.read_text()
        day1 = next(s.content for s in t.summaries if s.day == 1)
        assert f"[Day 2] Researcher: Start the experiment\nDay 1 summary:\n{day1}" in text
    guard = exp.role("guard")
    composed = prompts.compose([*guard.sections.items(), *exp.shared_sections.items()])
    assert (folder / "prompts" / "guard.txt").read_text() == composed + "\n"
    assert (folder / "prompts" / "prisoner.txt").is_file()
    assert (folder / "prompts" / "summarizer.txt").is_file()
    listing = pd.read_csv(folder / "conversations.csv")
    assert sorted(listing["conversation_id"]) == sorted(_records(store, batch_id))
    assert all((folder / f).is_file() for f in listing["file"])
    # exporting more into the same folder adds to the listing: one conversation again does
    # not drop the others' rows (it replaced them), nor repeat its own
    one = next(iter(_records(store, batch_id)))
    export.export(store, one, "txt", tmp_path)
    again = pd.read_csv(folder / "conversations.csv")
    assert sorted(again["conversation_id"]) == sorted(_records(store, batch_id))


# --- html in a real browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = "headless Chromium is not installed (apt-get install -y chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(message + ": CI must run the HTML test")
    pytest.skip(message)


def _browser(chromium: str, tmp_path: Path, *args: str) -> str:
    profile = tmp_path / "chromium-profile"
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_html_pages_render_in_headless_chromium(batch, tmp_path, chromium):
    store, exp, batch_id = batch
    records = _records(store, batch_id)
    result = export.export(store, batch_id, "html", tmp_path)
    folder = tmp_path / f"prison-{exp.id[:8]}"
    assert {p.name for p in result.files} == {f"{i}.html" for i in records} | {"index.html"}
    rec = next(r for r in records.values() if r.spec.llm.model == "fixed")
    page = folder / f"{rec.id}.html"
    source = page.read_text()
    # self-contained: nothing is loaded from anywhere
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", source)
    assert "<link" not in source and "@import" not in source

    dom = _browser(chromium, tmp_path, "--dump-dom", page.as_uri())
    t = store.load_transcript(rec.id)
    speakers = re.findall(r'<div class="message [^"]*" data-speaker="([^"]+)"', dom)
    for day in (1, 2):
        assert f'<section class="day" id="day-{day}" data-day="{day}"><h2>Day {day}</h2>' in dom
    want = []
    for day in (1, 2):
        want += ["Researcher"] + [m.speaker for m in t.messages if m.day == day]
    assert speakers == want
    for s in t.summaries:
        assert re.search(
            rf'<aside class="summary" data-day="{s.day}"><h3>Summary of day {s.day}</h3>'
            rf'<div class="content">{re.escape(s.content)}</div></aside>',
            dom,
        )
    # each role has its colour, and every message of a role carries that role's class
    classes = dict(re.findall(r'<div class="message (role-\d+)" data-speaker="[^"]+" '
                              r'data-role="(\w+)"', dom))  # fmt: skip
    by_role = {role: cls for cls, role in classes.items()}
    assert set(by_role) == {"guard", "prisoner"} and len(set(by_role.values())) == 2
    assert f".{by_role['guard']}{{--role:#1f77b4}}" in dom
    assert "(empty reply)" in dom and "raw reply" in dom
    assert "Back to your cells." in dom and "Researcher: the guard stops here" in dom

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "html-conversation.png"
    shot.unlink(missing_ok=True)
    _browser(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri())
    assert shot.stat().st_size > 10_000

    # the index is sortable: the script sorts by the column named in the address
    index = folder / "index.html"
    dom = _browser(chromium, tmp_path, "--dump-dom", index.as_uri() + "#sort=-conversation")
    order = re.findall(r'<tr data-id="(\w+)">', dom)

    # text columns sort "naturally", as the page's localeCompare(numeric) does: 5c… < 131f…
    def natural(text: str) -> list:
        return [(0, int(part), "") if part.isdigit() else (1, 0, part)
                for part in re.split(r"(\d+)", text) if part]  # fmt: skip

    assert order == sorted(records, key=natural, reverse=True)
    assert 'data-key="conversation" data-type="text" tabindex="0" aria-sort="descending"' in dom
    for r in records.values():
        assert f'<a href="{r.id}.html">' in dom
    _browser(chromium, tmp_path, f"--screenshot={ARTIFACTS / 'html-index.png'}",
             "--window-size=1200,900", index.as_uri())  # fmt: skip


# --- the command line and the terminal view ---------------------------------------------------


def _cli():
    from simulator import cli_results

    if not any(c.name == "export" for c in app.registered_commands):
        cli_results.register(app)  # until cli.py registers the commands itself
    return CliRunner()


def test_export_command(batch, tmp_path, settings, env_for):
    store, exp, batch_id = batch
    runner = _cli()
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["export", batch_id[:8], "-f", "csv", "-f", "html", "--out", str(out)],
        env=env_for(settings),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    folder = out / f"prison-{exp.id[:8]}"
    assert len(pd.read_csv(folder / f"batch-{batch_id}.csv")) == 16
    assert (folder / "index.html").is_file()

    # by the experiment's name, as `conversations` and `report` take it
    named = runner.invoke(
        app, ["export", "prison", "-f", "csv", "--out", str(out)], env=env_for(settings)
    )
    assert named.exit_code == 0, named.output
    assert len(pd.read_csv(folder / f"experiment-{exp.id}.csv")) == 16
    unknown = runner.invoke(app, ["export", "no-such-study"], env=env_for(settings))
    assert unknown.exit_code == 1 and "No experiment" in unknown.output

    bad = runner.invoke(app, ["export", "ffffffffff", "--out", str(out)], env=env_for(settings))
    assert bad.exit_code == 1  # a UserError: message, no traceback
    assert isinstance(bad.exception, SystemExit)
    bad = runner.invoke(app, ["export", batch_id, "-f", "xls"], env=env_for(settings))
    assert bad.exit_code == 1


def test_terminal_transcript_raw_on_request_and_many_roles(batch):
    store, exp, batch_id = batch
    rec = next(r for r in _records(store, batch_id).values() if r.spec.llm.model == "fixed")
    t = store.load_transcript(rec.id)
    roles = [r.name for r in exp.roles]

    def render(**kwargs) -> str:
        return render_messages(t.messages, **kwargs)

    def render_messages(messages, **kwargs) -> str:
        console = Console(record=True, width=100, force_terminal=False)
        display.render_transcript(console, rec, messages, t.summaries, roles, **kwargs)
        return console.export_text()

    plain = render(starting_message="Start the experiment", page=None)
    assert "Day 1" in plain and "Day 2" in plain and "Summary of day 2" in plain
    assert "Researcher: Start the experiment" in plain and "(empty reply)" in plain
    assert "raw:" not in plain
    # the raw reply's second line stays under the message (at column 0 it read as a turn)
    assert "raw: Back to your cells.\n       Researcher: the guard stops here" in render(raw=True)
    # a message's later lines too: "Palace_Dreamer: ..." at column 0 read as a turn
    first = dataclasses.replace(t.messages[0], content="I agree.\nPalace_Dreamer: me too")
    shown = render_messages([first, *t.messages[1:]])
    assert f"{first.speaker}: I agree.\n  Palace_Dreamer: me too" in shown, shown
    colours = display.role_colours([f"role{i}" for i in range(20)])
    assert len(set(colours.values())) == 20
