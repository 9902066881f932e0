"""Scale figures for many workers on one batch (issue 13, item 6). Not part of the tests.

One local LLM server (tests/servers.py's FakeLLMServer in a process of its own) answers
every chat call after a fixed latency and serves at most CAP calls at once (the others wait
in its queue, as on a GPU server with CAP slots). Each scenario runs the same grid twice
against a fresh embedded database: once as one `simulator run`, once as `simulator run`
plus two `simulator work` processes on the same machine (three workers, one batch).

    python bench/workers.py            # both scenarios (about 1-2 minutes)
    python bench/workers.py --only llm # the LLM-bound one only (or: db)

Scenarios:
  llm  latency 100 ms, server cap 12, --concurrency 4 per worker: one worker keeps 4 calls
       in flight, three keep 12 (the server's cap). Expect about 3x less time at the server.
  db   latency 5 ms, cap 64, --concurrency 32, many short conversations: bound by the
       embedded database (SecantusDB, one process) that all three workers write to.

Figures: wall time from the first start to the last exit (process start-up included),
the span between the first and the last LLM call as the server saw them, calls per
second over that span, the server's peak of calls in flight, and whether every
conversation completed exactly once (calls == conversations x calls each).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run import (  # noqa: E402
    MODEL,
    SIMULATOR,
    LLMServerProcess,
    bench_environment,
    prison_scenario,
)


@dataclass
class Scenario:
    name: str
    latency: float
    cap: int
    concurrency: int
    conversations: int
    messages: int

    @property
    def calls(self) -> int:
        return self.conversations * (self.messages + 1)  # round robin, one summary (1 day)


SCENARIOS = [
    Scenario("llm", 0.1, 12, 4, 48, 6),
    Scenario("db", 0.005, 64, 32, 300, 4),
]


def run_once(s: Scenario, workers: int, server: LLMServerProcess) -> dict[str, Any]:
    from simulator.experiment import experiment_to_dict

    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    try:
        env = bench_environment(workdir, workdir / "data")
        exp = experiment_to_dict(prison_scenario())
        exp["llms"] = [
            {"model": MODEL, "provider": "openai", "base_url": f"http://127.0.0.1:{server.port}/v1"}
        ]
        path = workdir / "bench.yaml"
        path.write_text(yaml.safe_dump(exp, sort_keys=False))
        subprocess.run(
            [*SIMULATOR, "experiment", "import", str(path)], env=env, check=True,
            capture_output=True,
        )  # fmt: skip
        server.call("reset", (s.latency, s.cap))
        grid = [
            "--llm", MODEL, "--messages", str(s.messages), "--days", "1", "--agents",
            "guard=2,prisoner=2", "--speaker", "round_robin", "--repetitions",
            str(s.conversations), "--concurrency", str(s.concurrency), "--plain",
        ]  # fmt: skip
        logs = [open(workdir / f"w{i}.err", "wb") for i in range(workers)]  # noqa: SIM115
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [*SIMULATOR, "run", str(path), *grid],
                env=env, stdout=subprocess.DEVNULL, stderr=logs[0],
            )
        ]  # fmt: skip
        if workers > 1:
            batch = None
            while batch is None:
                match = re.search(r"batch ([0-9a-f]{12}):", (workdir / "w0.err").read_text())
                batch = match.group(1) if match else None
                if procs[0].poll() is not None:
                    raise SystemExit("the run ended before the others joined")
                time.sleep(0.05)
            work = ["--concurrency", str(s.concurrency), "--plain"]
            for i in range(1, workers):
                procs.append(
                    subprocess.Popen(
                        [*SIMULATOR, "work", batch, *work],
                        env=env, stdout=subprocess.DEVNULL, stderr=logs[i],
                    )
                )  # fmt: skip
        codes = [p.wait() for p in procs]
        wall = time.monotonic() - started
        for f in logs:
            f.close()
        stats = server.call("stats")
        subprocess.run([*SIMULATOR, "db", "stop"], env=env, capture_output=True)
        span = (stats["last"] or 0) - (stats["first"] or 0)
        return {
            "workers": workers,
            "exit": codes,
            "wall": wall,
            "span": span,
            "rate": stats["calls"] / span if span else 0.0,
            "peak": stats["peak_serving"],
            "calls": stats["calls"],
            "exact": stats["calls"] == s.calls,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[s.name for s in SCENARIOS])
    args = parser.parse_args()
    server = LLMServerProcess()
    try:
        print(
            f"{'scenario':8} {'workers':>7} {'wall s':>7} {'span s':>7} {'calls/s':>8} "
            f"{'peak':>5} {'calls':>6} exactly-once exit"
        )
        for s in SCENARIOS:
            if args.only and s.name != args.only:
                continue
            for workers in (1, 3):
                r = run_once(s, workers, server)
                print(
                    f"{s.name:8} {workers:>7} {r['wall']:>7.1f} {r['span']:>7.1f} "
                    f"{r['rate']:>8.1f} {r['peak']:>5} {r['calls']:>6} "
                    f"{'yes' if r['exact'] else 'NO':>12} {r['exit']}",
                    flush=True,
                )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
