"""The fixed cost of every `simulator` command (issue 14): a profile per phase and a start-up
table of whole-process wall times.

    python bench/startup.py                      # this checkout: profile, then the table
    python bench/startup.py --tree /work/main    # and another checkout (before/after),
                                                 # alternated so both see the same load
    python bench/startup.py --load 1             # a second pass with 1 busy loop running
    python bench/startup.py --repeat 7 --only table

Everything runs as the real command in a subprocess, against the embedded database (started
once, outside the figures, with the experiments imported) and a fake LLM server in a process
of its own (bench/run.py's, from tests/servers.py) answering every chat call after a fixed
latency. Figures are medians of `--repeat` runs.

The table (whole process, from fork to exit):
  help     `simulator --help`
  list     `simulator experiment list`
  status   `simulator status`
  one      a 1-conversation scripted batch (`run ... --llm scripted`, 10 messages, 2 days)
  grid16   16 conversations x 10 messages x 2 days, 4 agents, round robin, concurrency 16,
           200 ms per call (OpenAI API). Each conversation is a chain of 12 calls (10
           messages, 2 summaries), so no schedule beats 12 x 200 ms = 2.4 s: the chain limit.
           Reported beside it: span (first call arrived -> last answered, server clock) and
           wall / chain limit (target <= 1.25).

The profile (one process doing what `simulator run` does for grid16, timed per phase with
the library's own functions): interpreter start, imports (and, from `python -X importtime`,
which packages they are), settings, the MongoDB connection, ensure_indexes, the LLM
preflight, creating the batch, preparing its conversations, thread start-up until the first
call, the calls, the closing summary, and shutdown (last line of the script -> process gone).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import run as bench_run  # noqa: E402  (bench/run.py: the fake server, the environment)

RESULTS = ROOT / "bench" / "results" / "startup.json"
LATENCY = 0.2
CHAIN = 12  # calls per conversation of grid16: 10 messages + 2 summaries
CHAIN_LIMIT = CHAIN * LATENCY
TARGETS = {"help": 0.3, "list": 0.6, "status": 0.6, "one": 1.0}
GRID_TARGET = 1.25  # wall / chain limit
HEAVY = ("openai", "ollama", "httpx", "pymongo", "bson", "rich", "inflect", "pydantic", "yaml")
HEAVY += ("questionary", "prompt_toolkit", "pandas", "matplotlib", "typer", "click")


def commands(bench: bench_run.Bench) -> dict[str, list[str]]:
    exp = str(bench.experiments["openai"])
    grid = ["--messages", "10", "--days", "2", "--speaker", "round_robin", "--plain"]
    return {
        "help": ["--help"],
        "list": ["experiment", "list"],
        "status": ["status"],
        "one": ["run", exp, "--llm", "scripted", *grid],
        "grid16": [
            "run", exp, *grid, "--agents", bench_run.AGENTS, "--repetitions", "16",
            "--concurrency", "16",
        ],
    }  # fmt: skip


def timed(bench: bench_run.Bench, tree: str, args: list[str]) -> dict[str, Any]:
    """One command as a subprocess: whole-process wall, and the server's span of chat calls."""
    bench.server.call("reset", LATENCY)
    env = {**bench.env, "PYTHONPATH": tree}
    started = time.monotonic()
    done = subprocess.run(
        [*bench.simulator, *args],
        env=env,
        cwd=bench.workdir,  # not a checkout: `python -m` would put its cwd first on the path
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    ended = time.monotonic()
    if done.returncode != 0:
        raise SystemExit(f"`simulator {' '.join(args)}` failed:\n{done.stdout}{done.stderr}")
    stats = bench.server.call("stats")
    first, last = stats["first"], stats["last"]
    result: dict[str, Any] = {"wall": ended - started, "calls": stats["calls"]}
    if first is not None and last is not None:
        result.update(span=last - first, before=first - started, after=ended - last)
    return result


def table(bench: bench_run.Bench, trees: list[str], repeat: int) -> dict[str, Any]:
    """name -> tree -> medians; every command runs under each tree in turn, `repeat` times."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, args in commands(bench).items():
        for _ in range(repeat):
            for tree in trees:
                runs.setdefault(name, {}).setdefault(tree, []).append(timed(bench, tree, args))
    out: dict[str, Any] = {}
    for name, by_tree in runs.items():
        for tree, results in by_tree.items():
            keys = {k for r in results for k in r}
            out.setdefault(name, {})[tree] = {
                k: statistics.median(r[k] for r in results if k in r) for k in sorted(keys)
            }
    return out


# --- the profile: one process, phase by phase ------------------------------------------------

PROFILE = r"""
import json, sys, time
marks = [("start", time.monotonic())]
def lap(name):
    marks.append((name, time.monotonic()))
import simulator.cli
lap("imports: simulator.cli (what --help needs)")
from simulator.settings import load_settings
settings = load_settings()
lap("settings")
from simulator import database, store as st
lap("imports: database, store (pymongo)")
db = database.connect(settings)
user = database.current_user(db, settings)
lap("connect to MongoDB (embedded server found, ping)")
store = st.Store(db, user)
store.ensure_indexes()
lap("ensure_indexes")
from simulator import display, runner, importing, grid as grids
lap("imports: runner, display (rich)")
exp = importing.import_experiment(store, sys.argv[1]).experiment
grid = grids.make_grid(exp, llms=[exp.llms[0].model], messages=10, days=2, agents=sys.argv[2],
                       speakers=["round_robin"], repetitions=16, seed=0)
options = runner.options_from_settings(settings, concurrency=16)
lap("experiment, grid, options")
runner._preflight(exp, grid, options)
lap("LLM preflight (imports openai)")
spare = store.create_batch(exp, grid)
lap("create the batch")
with store.batch_lease(spare.id) as lease:
    runner._prepare(store, spare, exp)  # a spare batch: measured alone, never run
lap("prepare conversation documents")
batch = store.create_batch(exp, grid)
templates = options.templates
lap("-")
report = runner._run(store, batch, exp, options, templates)  # prepares it, as `run` does
lap("run (threads, calls, runner's closing summary)")
totals = getattr(report, "totals", None)
if totals is None:
    totals = store.batch_totals(batch.id)
lap("closing summary: totals the CLI prints")
store.batch_counts(batch.id); store.batch_failures(batch.id); store.count_unusable(batch.id)
store.batch_totals(batch.id)
lap("(for comparison: the summary's queries, done anyway)")
print(json.dumps({"marks": marks, "status": str(report.status)}))
sys.stdout.flush()
if hasattr(simulator.cli, "leave"):  # as the command ends (a checkout before it: by falling off)
    simulator.cli.leave(0)
"""


def profile(bench: bench_run.Bench, tree: str) -> dict[str, Any]:
    """Phase times of one process doing what `simulator run` does for grid16."""
    bench.server.call("reset", LATENCY)
    env = {**bench.env, "PYTHONPATH": tree}
    python = [bench_run.sys.executable]
    started = time.monotonic()
    done = subprocess.run(
        [*python, "-c", PROFILE, str(bench.experiments["openai"]), bench_run.AGENTS],
        env=env,
        cwd=bench.workdir,
        capture_output=True,
        text=True,
    )
    ended = time.monotonic()
    if done.returncode != 0:
        raise SystemExit(f"profile failed:\n{done.stdout}{done.stderr}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    stats = bench.server.call("stats")
    marks = data["marks"]
    phases: list[tuple[str, float]] = [("interpreter start", marks[0][1] - started)]
    for (_, t0), (name, t1) in zip(marks, marks[1:]):
        if name == "-":
            continue
        if name.startswith("run ") and stats["first"] is not None:
            phases.append(
                ("  run: until the first call (prepare again, lease, threads)", stats["first"] - t0)
            )
            phases.append(("  run: the calls (span)", stats["last"] - stats["first"]))
            phases.append(
                ("  run: after the last call (runner's summary, join)", t1 - stats["last"])
            )
            continue
        phases.append((name, t1 - t0))
    phases.append(("shutdown (last line -> process gone)", ended - marks[-1][1]))
    phases.append(("whole process", ended - started))
    return {"phases": phases, "status": data["status"]}


def import_costs(bench: bench_run.Bench, tree: str) -> dict[str, float]:
    """Seconds `import simulator.cli` spends per top-level package (python -X importtime)."""
    env = {**bench.env, "PYTHONPATH": tree}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import simulator.cli"],
        env=env,
        cwd=bench.workdir,
        capture_output=True,
        text=True,
    )
    costs: dict[str, float] = {}
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            package = m.group(4).split(".")[0]
            costs[package] = costs.get(package, 0.0) + int(m.group(1)) / 1e6  # self times
    return dict(sorted(costs.items(), key=lambda kv: -kv[1]))


def loaded_modules(bench: bench_run.Bench, tree: str, args: list[str]) -> list[str]:
    """The heavy packages a command imports (runs it in-process, then looks)."""
    code = (
        "import sys\nfrom simulator.cli import app\n"
        f"try:\n    app({args!r}, prog_name='simulator')\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    env = {**bench.env, "PYTHONPATH": tree}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=bench.workdir, capture_output=True, text=True
    )
    return eval(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else []


# --- report ---------------------------------------------------------------------------------


def label(tree: str) -> str:
    return "this" if Path(tree).resolve() == ROOT else Path(tree).name


def print_profile(profiles: dict[str, dict[str, Any]]) -> None:
    trees = list(profiles)
    print(
        f"\nProfile of one `run` of grid16 (seconds){'':10}"
        + "".join(f"{label(t):>10}" for t in trees)
    )
    names = [n for n, _ in profiles[trees[0]]["phases"]]
    for name in names:
        row = "".join(f"{dict(profiles[t]['phases']).get(name, float('nan')):10.3f}" for t in trees)
        print(f"  {name:<58}{row}")


def print_table(passes: dict[str, dict[str, Any]], trees: list[str]) -> None:
    for pass_name, rows in passes.items():
        print(f"\nStart-up table, {pass_name} (median seconds, whole process)")
        head = "".join(f"{label(t) + ' wall':>12}" for t in trees)
        print(f"  {'command':<8}{head}{'span':>8}{'wall/chain':>12}{'target':>8}")
        for name, by_tree in rows.items():
            walls = "".join(f"{by_tree[t]['wall']:12.3f}" for t in trees)
            first = by_tree[trees[0]]
            span = f"{first['span']:8.2f}" if "span" in first else f"{'':8}"
            if name == "grid16":
                ratio = f"{first['wall'] / CHAIN_LIMIT:12.2f}"
                target = f"{'<=' + str(GRID_TARGET):>8}"
            else:
                ratio, target = f"{'':12}", f"{'<=' + str(TARGETS[name]):>8}"
            print(f"  {name:<8}{walls}{span}{ratio}{target}")
    if len(passes) == 2:
        quiet, loaded = passes.values()
        print("\nLoaded / quiet wall, and between checkouts (same pass):")
        for name in quiet:
            parts = [
                f"{label(t)} {loaded[name][t]['wall'] / quiet[name][t]['wall']:.2f}x" for t in trees
            ]
            if len(trees) == 2:
                a, b = trees
                for pass_name, rows in passes.items():
                    parts.append(
                        f"{label(a)}/{label(b)} {pass_name} {rows[name][a]['wall'] / rows[name][b]['wall']:.2f}"
                    )
            print(f"  {name:<8}" + " · ".join(parts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], help="another checkout too")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--load", type=int, default=1, help="busy loops in the second pass (0: none)"
    )
    parser.add_argument("--only", choices=("profile", "table"), default=None)
    args = parser.parse_args()
    trees = [str(ROOT), *args.tree]
    results: dict[str, Any] = {"trees": trees, "load_before": os.getloadavg()}
    server = bench_run.LLMServerProcess()
    with tempfile.TemporaryDirectory(prefix="simulator-startup-") as tmp:
        workdir = Path(tmp)
        bench = bench_run.Bench(workdir, server)
        bench.start_database(workdir / "data")
        for tree in trees:  # bytecode, as an installed package has it (see bench_environment)
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", f"{tree}/simulator"],
                env=bench.env,
                stdout=subprocess.DEVNULL,
                check=True,
            )
        try:
            if args.only != "table":
                results["imports"] = {t: import_costs(bench, t) for t in trees}
                results["modules_after_help"] = {
                    t: loaded_modules(bench, t, ["--help"]) for t in trees
                }
                results["profile"] = {t: profile(bench, t) for t in trees}
                for t in trees:
                    top = list(results["imports"][t].items())[:10]
                    print(
                        f"\nImports of simulator.cli ({label(t)}), self time by package: "
                        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in top)
                    )
                    print(
                        f"  heavy packages after `--help` ({label(t)}): {results['modules_after_help'][t]}"
                    )
                print_profile(results["profile"])
            if args.only != "profile":
                passes = {"quiet": table(bench, trees, args.repeat)}
                if args.load:
                    loops = bench_run.BusyLoops(args.load)
                    try:
                        passes[f"{args.load} busy loop(s)"] = table(bench, trees, args.repeat)
                    finally:
                        loops.stop()
                results["table"] = passes
                print_table(passes, trees)
        finally:
            bench.stop_database()
            server.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nWrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
