"""How long `simulator run --dry-run` takes as --messages grows (an outside review: it composed
every turn's prompt, 323 s at 16,000 messages and no answer at 10**8).

    python bench/dry_run.py                      # this checkout
    python bench/dry_run.py --tree /work/main    # and another checkout (before/after)
    python bench/dry_run.py --sizes 10,1000 --timeout 60

Each figure is the whole `simulator run experiments/prison.yaml --llm scripted --dry-run`
process (one scenario of the prison study, one day, round robin), wall seconds, median of
--repeat runs; a run that passes --timeout is stopped and shown as `>T`. No database is
touched (a dry run of a YAML file needs none).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = [10, 1000, 100_000, 10**12]
SCENARIO = ["risks=yes", "guard_personality=good", "oversight=yes", "goal=yard_time"]
SCENARIO += ["prisoner_personality=bad"]


def dry_run(tree: Path, messages: int, timeout: float) -> float | None:
    """Wall seconds of one dry run with `tree`'s code, None past the timeout."""
    cmd = [sys.executable, "-m", "simulator.cli", "run", str(ROOT / "experiments/prison.yaml")]
    cmd += ["--llm", "scripted", "--messages", str(messages), "--days", "1", "--dry-run"]
    for factor in SCENARIO:
        cmd += ["--factor", factor]
    # `-m` puts the working directory first on sys.path: the tree's code, not the installed one
    env = {**os.environ, "PYTHONPATH": str(tree), "SIMULATOR_ENV_FILE": os.devnull}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="--messages values")
    parser.add_argument("--tree", type=Path, help="another checkout to compare with")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120, help="seconds per run")
    args = parser.parse_args()
    trees = {"this": ROOT} | ({"other": args.tree.resolve()} if args.tree else {})
    print(f"{'--messages':>20} " + " ".join(f"{name:>10}" for name in trees))
    for size in (int(s) for s in args.sizes.split(",")):
        cells = []
        for tree in trees.values():
            times = []
            for _ in range(args.repeat):
                seconds = dry_run(tree, size, args.timeout)
                if seconds is None:
                    break
                times.append(seconds)
            if len(times) < args.repeat:
                cells.append(f">{args.timeout:.0f}")
            else:
                cells.append(f"{statistics.median(times):.2f}")
        print(f"{size:>20,} " + " ".join(f"{c:>10}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
