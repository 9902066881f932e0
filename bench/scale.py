"""Commands on a large experiment (issue 9, item 11): how long `status`, `conversations`,
`export --format csv` and `experiment delete` take with N stored conversations.

An embedded database is filled quickly (bulk inserts in the store's own document shapes:
N conversations of the prison experiment, 4 messages and 1 summary each, with their real
composed prompts), then each command runs whole as a subprocess of the real CLI and is timed
from start to exit, interpreter start-up included. Nothing here is a test: it prints figures.

    python bench/scale.py                      # 2,000 and 10,000 conversations
    python bench/scale.py --sizes 500          # other sizes
    python bench/scale.py --keep               # keep the work directory (database, exports)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import SIMULATOR, bench_environment, prison_scenario  # noqa: E402

MESSAGES = 4
TARGET_S = 2.0


def cli(
    env: dict[str, str], workdir: Path, *args: str
) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    done = subprocess.run(
        [*SIMULATOR, *args],
        env=env,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return time.monotonic() - started, done


def fill(env: dict[str, str], n: int) -> tuple[str, str, float]:
    """N completed conversations x 4 messages + 1 summary; (experiment id, batch id, seconds)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        from simulator.conversation import build_agents
        from simulator.database import connect
        from simulator.grid import make_grid
        from simulator.prompts import summarizer_prompt
        from simulator.settings import load_settings
        from simulator.store import Store, now

        started = time.monotonic()
        db = connect(load_settings())
        store = Store.open(db, "bench")
        exp = store.insert_experiment(prison_scenario())
        grid = make_grid(
            exp, llms=["scripted"], messages=MESSAGES, days=1, agents="guard=2,prisoner=2",
            speakers=["round_robin"], repetitions=n,
        )  # fmt: skip
        batch = store.create_batch(exp, grid)
        store.prepare_conversations(
            batch,
            exp,
            (
                (i, spec, build_agents(exp, spec), summarizer_prompt(exp, spec.agents))
                for i, spec in grid.expand()
            ),
        )
        conv = db["conversations"]
        conv.update_many(
            {"batch_id": batch.id},
            {"$set": {"status": "completed", "started_at": now(), "finished_at": now()}},
        )
        db["batches"].update_one(
            {"_id": batch.id}, {"$set": {"status": "completed", "finished_at": now()}}
        )
        usage = {"prompt_tokens": 500, "completion_tokens": 40, "latency": 0.01, "retries": 0,
                 "calls": 1}  # fmt: skip
        text = "I hear you, but the rules are the rules. " * 8
        messages: list[dict[str, Any]] = []
        summaries: list[dict[str, Any]] = []
        for doc in conv.find({"batch_id": batch.id}, {"agents.name": 1, "agents.role": 1}):
            agents = doc["agents"]
            for turn in range(1, MESSAGES + 1):
                a = agents[(turn - 1) % len(agents)]
                messages.append(
                    {"conversation_id": doc["_id"], "batch_id": batch.id,
                     "experiment_id": exp.id, "day": 1, "turn": turn, "speaker": a["name"],
                     "role": a["role"], "content": text, "raw": None, "empty": False,
                     "usage": usage, "created_at": now()}
                )  # fmt: skip
            summaries.append(
                {"conversation_id": doc["_id"], "batch_id": batch.id, "experiment_id": exp.id,
                 "day": 1, "content": "The day in brief. " * 10, "usage": usage,
                 "created_at": now()}
            )  # fmt: skip
            if len(messages) >= 4000:
                db["messages"].insert_many(messages, ordered=False)
                db["summaries"].insert_many(summaries, ordered=False)
                messages, summaries = [], []
        if messages:
            db["messages"].insert_many(messages, ordered=False)
            db["summaries"].insert_many(summaries, ordered=False)
        db.client.close()
        assert exp.id is not None
        return exp.id, batch.id, time.monotonic() - started
    finally:
        os.environ.clear()
        os.environ.update(saved)


def measure(workdir: Path, n: int) -> dict[str, Any]:
    data_dir = workdir / f"data-{n}"
    env = bench_environment(workdir, data_dir)
    exp_id, batch_id, fill_s = fill(env, n)
    print(f"{n} conversations stored in {fill_s:.1f} s (experiment {exp_id}, batch {batch_id})")
    rows: dict[str, Any] = {"n": n}
    commands = {
        # Filled in bulk, the batch has no running totals yet: the first `status` recounts
        # them (as for a batch imported from the prototype) and stores them, as a run that
        # ended leaves them; the commands after it read them.
        "status (recount)": ["status", batch_id],
        "status": ["status"],
        "status BATCH": ["status", batch_id],
        "conversations EXP": ["conversations", exp_id],
        "export csv": ["export", exp_id, "--format", "csv", "--out", str(workdir / f"out-{n}")],
        "experiment delete": ["experiment", "delete", exp_id, "--yes"],
    }
    for name, args in commands.items():
        seconds, done = cli(env, workdir, *args)
        ok = done.returncode == 0
        rows[name] = seconds
        print(
            f"  {name:<20} {seconds:7.2f} s"
            + (
                "" if ok else f"  FAILED ({done.returncode}): {(done.stderr or done.stdout)[-400:]}"
            ),
            flush=True,
        )
    rows.update(floor(env, n))
    cli(env, workdir, "db", "stop")
    return rows


def floor(env: dict[str, str], n: int) -> dict[str, float]:
    """What the embedded server alone needs for the same work, through pymongo with no
    simulator code in between: reading every record an export reads, and deleting them (a
    second experiment of the same size, filled like the first). The commands above cannot
    be faster than these."""
    _exp_id, batch_id, _ = fill(env, n)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        from simulator.database import connect
        from simulator.settings import load_settings

        db = connect(load_settings())
        out: dict[str, float] = {}
        started = time.monotonic()
        for name in ("conversations", "messages", "summaries"):
            for _doc in db[name].find({"batch_id": batch_id}):
                pass
        out["floor: read"] = time.monotonic() - started
        started = time.monotonic()
        for name in ("messages", "summaries", "selector_calls", "conversations"):
            db[name].delete_many({"batch_id": batch_id})
        out["floor: delete"] = time.monotonic() - started
        db.client.close()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    for name, seconds in out.items():
        print(f"  {name:<20} {seconds:7.2f} s (pymongo alone)", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,10000", help="conversation counts")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="simulator-scale-"))
    print(f"work directory {workdir} · {os.cpu_count()} CPUs · load {os.getloadavg()[0]:.2f}")
    results = []
    try:
        for n in sizes:
            results.append(measure(workdir, n))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    names = [k for k in results[0] if k != "n"] if results else []
    print()
    print("| conversations | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for r in results:
        cells = [f"{r[k]:.2f} s" + ("" if r[k] < TARGET_S else " (!)") for k in names]
        print(f"| {r['n']:,} | " + " | ".join(cells) + " |")
    print(f"\nTarget: every command under {TARGET_S:.0f} s at 10,000 conversations.")
    slow = [
        r
        for r in results
        if r["n"] >= 10000 and any(r[k] >= TARGET_S for k in names if not k.startswith("floor"))
    ]
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
