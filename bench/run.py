"""Benchmark of batch execution through the real CLI (issue 4, item 5). Run it with `make bench`.

A fake LLM server (tests/servers.py: the Ollama and OpenAI APIs, a fixed latency per call)
runs in a process of its own; every grid runs as `simulator run ... --plain` in a subprocess
against a fresh embedded database, so the runner's CPU time and memory are its own. Figures
come from the outside: LLM calls and requests in flight as the server counted them, CPU time
from /proc, peak RSS from the kernel's accounting of the finished process.

    python bench/run.py            # everything (about 6 minutes)
    python bench/run.py --quick    # without run (a) at concurrency 1 (about 2.5 minutes less)
    python bench/run.py --only b   # only some runs: a, b, c, d or run names such as a-c16-openai
    python bench/run.py --only d --tree /work/main --load 2
        # run (d), many short conversations, with this checkout and another one (before/after)
        # in alternation, while two busy loops compete for the CPUs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
MODEL = "bench"  # the model name both APIs answer to ("bench:latest" for Ollama)
# `python -m simulator`: what the console script runs, from whichever checkout is on
# PYTHONPATH (a script installed by one checkout may name a function another lacks).
SIMULATOR = [sys.executable, "-m", "simulator"]
AGENTS = "guard=2,prisoner=2"
DAYS = 1

# Targets from issue 4.
EFFICIENCY_TARGET = 0.9
# Target from issue 9, item 12: many short conversations as efficient as few long ones.
SHORT_EFFICIENCY_TARGET = 0.8
OVERHEAD_TARGET_MS = 3.0
RSS_TARGET_MB = 300.0


def prison_scenario() -> Any:
    """The shipped prison experiment reduced to its first scenario (the first level of every
    factor, no factors, no scorers): its real prompts, one grid cell per condition."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from dataclasses import replace

    from simulator.experiment import apply_levels, load_experiment

    exp = load_experiment(ROOT / "experiments" / "prison.yaml")
    first = {name: levels[0] for name, levels in exp.factor_levels().items()}
    return replace(apply_levels(exp, first), factors=[], scorers={})


@dataclass
class RunSpec:
    name: str
    group: str  # a | b | c (the runs of the issue)
    provider: str  # openai | ollama
    conversations: int
    messages: int
    latency: float  # seconds the fake server waits before answering each chat call
    concurrency: int
    tree: str = ""  # another checkout to run the CLI from (PYTHONPATH); "" is this one

    @property
    def calls_per_conversation(self) -> int:
        """Round robin, no re-asks: one call per message and one summary per day."""
        return self.messages + DAYS

    def ideal(self, calls: int) -> float:
        """Seconds the LLM server alone needs: the critical path of calls x latency.

        A conversation is a chain of L calls, each waiting for the one before; at most C
        calls are in flight. So no schedule is shorter than L rounds, nor than calls / C
        rounds, of `latency` each. With C dividing the conversations, as in run (a), this is
        ceil(conversations / C) x L x latency.
        """
        rounds = max(self.calls_per_conversation, math.ceil(calls / self.concurrency))
        return rounds * self.latency


def plan(quick: bool) -> list[RunSpec]:
    runs = [
        RunSpec(f"a-c{c}-openai", "a", "openai", 64, 10, 0.2, c)
        for c in (1, 4, 16, 32)
        if not (quick and c == 1)
    ]
    runs.append(RunSpec("a-c16-ollama", "a", "ollama", 64, 10, 0.2, 16))
    runs += [RunSpec(f"b-c{c}-openai", "b", "openai", 64, 10, 0.0, c) for c in (1, 16)]
    runs.append(RunSpec("c-c32-openai", "c", "openai", 1000, 4, 0.02, 32))
    # Issue 9, item 12: 2,000 short conversations (4 messages, 1 day) at 10 ms per call.
    runs.append(RunSpec("d-c32-openai", "d", "openai", 400 if quick else 2000, 4, 0.01, 32))
    return runs


def with_trees(runs: list[RunSpec], trees: list[str]) -> list[RunSpec]:
    """Every run once per checkout, alternating, so both see the same machine load."""
    if not trees:
        return runs
    out = []
    for spec in runs:
        out.append(spec)
        for tree in trees:
            name = f"{spec.name}@{Path(tree).name}"
            out.append(RunSpec(**{**asdict(spec), "name": name, "tree": tree}))
    return out


class BusyLoops:
    """`n` processes spinning on a CPU each: the load of other people on a shared machine."""

    def __init__(self, n: int):
        self.procs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)
        ]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


# --- the fake LLM server, in a process of its own --------------------------------------------


def serve(conn: Connection) -> None:
    """Child process: run FakeLLMServer and answer commands from the parent over `conn`.
    `reset` takes the latency per call, or (latency, cap): at most `cap` calls in service at
    once, the others waiting in its queue (a GPU server with `cap` slots)."""
    sys.path.insert(0, str(ROOT))
    from tests.servers import FakeLLMServer

    class TimedServer(FakeLLMServer):
        """Also remembers when the first chat call arrived and the last one was answered,
        and the peak of calls in service under its cap."""

        first: float | None = None
        last: float | None = None
        slots: threading.Semaphore | None = None
        serving = 0
        peak_serving = 0

        def _enter_chat(self) -> int | None:
            if self.slots is not None:
                self.slots.acquire()
            with self._lock:
                if self.first is None:
                    # CLOCK_MONOTONIC is system-wide on Linux: comparable with the parent's.
                    self.first = time.monotonic()
                self.serving += 1
                self.peak_serving = max(self.peak_serving, self.serving)
            return super()._enter_chat()

        def _leave_chat(self) -> None:
            super()._leave_chat()
            with self._lock:
                self.last = time.monotonic()
                self.serving -= 1
            if self.slots is not None:
                self.slots.release()

    server = TimedServer(models={MODEL, f"{MODEL}:latest"})
    server.start()
    conn.send(server.port)
    while True:
        command, arg = conn.recv()
        if command == "reset":
            latency, cap = arg if isinstance(arg, tuple) else (arg, None)
            server.reset()
            server.latency = latency
            server.slots = threading.Semaphore(cap) if cap else None
            server.first = server.last = None
            server.serving = server.peak_serving = 0
            conn.send(None)
        elif command == "stats":
            with server._lock:
                conn.send(
                    {
                        "calls": server.calls,
                        "peak_in_flight": server.peak_in_flight,
                        "peak_serving": server.peak_serving,
                        "first": server.first,
                        "last": server.last,
                    }
                )
        else:
            server.stop()
            conn.send(None)
            return


class LLMServerProcess:
    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")  # a clean interpreter, nothing inherited
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child,), daemon=True)
        self.process.start()
        self.port: int = self.conn.recv()

    def call(self, command: str, arg: Any = None) -> Any:
        self.conn.send((command, arg))
        return self.conn.recv()

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.call("stop")
            except (OSError, EOFError):
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


# --- measuring a process from the outside -----------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


MACHINE = 0  # the pseudo-pid of the whole machine for cpu_seconds()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process (Linux /proc), None when unavailable.

    For MACHINE: the CPU time all processes used (every CPU's busy time, summed).
    """
    try:
        if pid == MACHINE:
            # cpu  user nice system idle iowait irq softirq steal ...
            ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
            return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (OSError, ValueError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class CPUSampler:
    """Samples the CPU time of a few processes every `interval` seconds, on a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02):
        self.pids = pids
        self.interval = interval
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CPUSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            for name, pid in self.pids.items():
                value = cpu_seconds(pid)
                if value is not None:
                    self.samples[name].append((time.monotonic(), value))
            if self._stop.wait(self.interval):
                return

    def between(
        self, name: str, start: float, end: float, final: float | None = None
    ) -> float | None:
        """CPU seconds `name` used from `start` to `end` (`final`: its total, if it has exited)."""
        samples = self.samples[name]
        before = [cpu for t, cpu in samples if t <= start]
        after = [cpu for t, cpu in samples if t >= end]
        if not before:
            return None
        if after:
            return after[0] - before[-1]
        return None if final is None else final - before[-1]


# --- one run ----------------------------------------------------------------------------------


@dataclass
class Result:
    spec: RunSpec
    ok: bool
    exit_code: int
    wall: float  # the runner process, from start to exit
    calls: int  # chat calls counted by the server
    expected_calls: int
    peak_in_flight: int
    span: float | None  # first chat call arrived -> last one answered (server's clock)
    startup: float | None  # process start -> first chat call
    tail: float | None  # last chat call answered -> process exit
    ideal: float
    runner_cpu: float  # whole process, startup included
    runner_cpu_span: float | None  # during `span` only
    db_cpu_span: float | None
    llm_cpu_span: float | None
    machine_cpu_span: float | None  # every process on the machine, ours included
    peak_rss_mb: float
    load_before: float
    batch: str | None = None
    status: str | None = None
    cli_calls: int | None = None
    log: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def other_cpus(self) -> float | None:
        """CPUs that processes other than the benchmark's kept busy during the span, on average."""
        parts = (self.machine_cpu_span, self.runner_cpu_span, self.db_cpu_span, self.llm_cpu_span)
        if not self.span or any(p is None for p in parts):
            return None
        machine, runner, db, llm = parts
        return max(0.0, (machine - runner - db - llm) / self.span)  # type: ignore[operator]

    @property
    def efficiency(self) -> float | None:
        return self.ideal / self.span if self.ok and self.span and self.ideal else None

    @property
    def efficiency_wall(self) -> float | None:
        return self.ideal / self.wall if self.ok and self.ideal else None

    def per_call_ms(self, seconds: float | None) -> float | None:
        return None if seconds is None or not self.calls else seconds / self.calls * 1000

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = asdict(self.spec)
        d.update(
            efficiency=self.efficiency,
            efficiency_wall=self.efficiency_wall,
            ms_per_call_span=self.per_call_ms(self.span),
            ms_per_call_wall=self.per_call_ms(self.wall),
            runner_cpu_ms_per_call=self.per_call_ms(self.runner_cpu_span),
            db_cpu_ms_per_call=self.per_call_ms(self.db_cpu_span),
            llm_cpu_ms_per_call=self.per_call_ms(self.llm_cpu_span),
            other_cpus=self.other_cpus,
        )
        return d


class Bench:
    def __init__(self, workdir: Path, server: LLMServerProcess):
        self.workdir = workdir
        self.server = server
        self.env = bench_environment(workdir, workdir / "data")
        self.simulator = SIMULATOR
        self.experiments = {p: self._write_experiment(p) for p in ("openai", "ollama")}
        self.db_pid: int | None = None

    def _write_experiment(self, provider: str) -> Path:
        """The prison experiment (real prompts) with one LLM: the fake server."""
        from simulator.experiment import experiment_to_dict

        exp = experiment_to_dict(prison_scenario())
        url = f"http://127.0.0.1:{self.server.port}"
        if provider == "openai":
            llm = {"model": MODEL, "provider": "openai", "base_url": f"{url}/v1"}
        else:
            llm = {"model": f"{MODEL}:latest", "provider": "ollama", "base_url": url}
        exp["name"] = f"bench-{provider}"
        exp["llms"] = [llm]
        path = self.workdir / f"bench-{provider}.yaml"
        path.write_text(yaml.safe_dump(exp, sort_keys=False))
        return path

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.simulator, *args],
            env=self.env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_database(self, data_dir: Path) -> None:
        """A fresh embedded server on `data_dir`, with the experiments imported: not measured.

        Fresh for every run, so no run inherits what an earlier one left in the server (the
        figures would otherwise depend on which runs came before: see README).
        """
        self.env = bench_environment(self.workdir, data_dir)
        for path in self.experiments.values():
            done = self.cli("experiment", "import", str(path))
            if done.returncode != 0:
                raise SystemExit(
                    f"`simulator experiment import` failed:\n{done.stdout}{done.stderr}"
                )
        state = json.loads((data_dir / "server.json").read_text())
        self.db_pid = int(state["pid"])

    def stop_database(self) -> None:
        if self.db_pid is None:
            return
        done = self.cli("db", "stop", timeout=60)
        if done.returncode != 0:
            print(
                f"warning: `simulator db stop` failed: {done.stdout}{done.stderr}", file=sys.stderr
            )
        self.db_pid = None

    def run(self, spec: RunSpec) -> Result:
        self.server.call("reset", spec.latency)
        log_path = self.workdir / f"{spec.name}.log"
        args = [
            "run", str(self.experiments[spec.provider]),
            "--messages", str(spec.messages), "--days", str(DAYS), "--agents", AGENTS,
            "--speaker", "round_robin", "--repetitions", str(spec.conversations),
            "--seed", "0", "--concurrency", str(spec.concurrency), "--plain",
        ]  # fmt: skip
        load_before = os.getloadavg()[0]
        llm_pid = self.server.process.pid
        env = {**self.env, "PYTHONPATH": spec.tree or str(ROOT)}  # the code measured
        with open(log_path, "w") as log:
            started = time.monotonic()
            proc = subprocess.Popen(
                [*self.simulator, *args],
                env=env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            pids = {"runner": proc.pid, "llm": llm_pid or 0, "machine": MACHINE}
            if self.db_pid:
                pids["db"] = self.db_pid
            with CPUSampler(pids) as sampler:
                _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
                ended = time.monotonic()
                proc.returncode = os.waitstatus_to_exitcode(status)
        stats = self.server.call("stats")
        output = log_path.read_text(errors="replace")
        runner_cpu = usage.ru_utime + usage.ru_stime
        first, last = stats["first"], stats["last"]
        span = last - first if first is not None and last is not None else None

        def cpu(name: str, final: float | None = None) -> float | None:
            if first is None or last is None or name not in pids:
                return None
            return sampler.between(name, first, last, final)

        # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
        rss_mb = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
        expected = spec.conversations * spec.calls_per_conversation
        result = Result(
            spec=spec,
            ok=proc.returncode == 0,
            exit_code=proc.returncode,
            wall=ended - started,
            calls=stats["calls"],
            expected_calls=expected,
            peak_in_flight=stats["peak_in_flight"],
            span=span,
            startup=first - started if first is not None else None,
            tail=ended - last if last is not None else None,
            ideal=spec.ideal(max(stats["calls"], expected)),
            runner_cpu=runner_cpu,
            runner_cpu_span=cpu("runner", runner_cpu),
            db_cpu_span=cpu("db"),
            llm_cpu_span=cpu("llm"),
            machine_cpu_span=cpu("machine"),
            peak_rss_mb=rss_mb,
            load_before=load_before,
            log=str(log_path),
        )
        if m := re.search(r"Batch (\w+): (\w+)", output):
            result.batch, result.status = m.group(1), m.group(2)
        if m := re.search(r"(\d+) LLM calls", output):
            result.cli_calls = int(m.group(1))
        if not result.ok:
            result.notes.append(f"exit code {proc.returncode}; last lines:\n" + tail_of(output))
        elif result.status and result.status != "completed":
            result.ok = False
            result.notes.append(f"batch status {result.status}")
        if result.calls != expected:
            result.notes.append(f"server counted {result.calls} chat calls, expected {expected}")
        if result.cli_calls is not None and result.cli_calls != result.calls:
            result.notes.append(f"the CLI reports {result.cli_calls} LLM calls")
        return result


def bench_environment(workdir: Path, data_dir: Path) -> dict[str, str]:
    """The caller's environment without anything that points the CLI elsewhere."""
    dropped = ("MONGODB_", "DB_", "SIMULATOR_", "OPENAI_", "OLLAMA_")
    # Also PYTHONDONTWRITEBYTECODE: an installed package has its bytecode compiled (pip does
    # it at install), and a checkout gets it at its first run; set in a shell (as on the
    # machines these figures were taken on), every command would compile every module anew.
    dropped += ("PYTHONDONTWRITEBYTECODE",)
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(
        PYTHONPATH=str(ROOT),  # this checkout, whatever the venv's editable install points at
        SIMULATOR_DATA_DIR=str(data_dir),
        SIMULATOR_LOG_DIR=str(workdir / "logs"),
        SIMULATOR_ENV_FILE=str(workdir / "none.env"),  # never the developer's .env
        SIMULATOR_USER="bench",
        MONGODB_URI="",  # empty: the embedded server, whatever a .env says
        OPENAI_API_KEY="dummy",
        PYTHONUNBUFFERED="1",
    )
    return env


def tail_of(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --- report -----------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def print_results(results: list[Result]) -> None:
    header = (
        f"{'run':14} {'conv':>5} {'msgs':>4} {'lat ms':>6} {'conc':>4} {'wall s':>7} "
        f"{'span s':>7} {'calls':>6} {'peak':>4} {'ideal s':>7} {'eff':>5} {'eff*':>5} "
        f"{'ms/call':>7} {'cpu ms/call run/db/llm':>23} {'RSS MB':>6} {'other':>5}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        s = r.spec
        cpus = "/".join(
            fmt(r.per_call_ms(v), ".2f") for v in (r.runner_cpu_span, r.db_cpu_span, r.llm_cpu_span)
        )
        print(
            f"{s.name:14} {s.conversations:5d} {s.messages:4d} {s.latency * 1000:6.0f} "
            f"{s.concurrency:4d} {r.wall:7.2f} {fmt(r.span):>7} {r.calls:6d} "
            f"{r.peak_in_flight:4d} {r.ideal:7.2f} {fmt(r.efficiency):>5} "
            f"{fmt(r.efficiency_wall):>5} {fmt(r.per_call_ms(r.span)):>7} {cpus:>23} "
            f"{r.peak_rss_mb:6.0f} {fmt(r.other_cpus, '.2f'):>5}" + ("" if r.ok else "  FAILED")
        )
        for note in r.notes:
            print(f"    {s.name}: {note}")
    print(
        """
How to read it
  wall     the `simulator run` process from start to exit: interpreter and imports, database
           connection, preflight (GET /v1/models or /api/tags), preparing the grid, the batch,
           the closing summary.
  span     as seen by the LLM server: first chat request arrived -> last one answered. The
           difference wall - span is fixed per command (startup before, summary after).
  calls    chat requests the server received; peak: most requests in flight at once.
  ideal    the time the LLM server alone needs: each conversation is a chain of L calls
           (L = messages + 1 summary = 11 in runs a and b, 5 in run c) that cannot overlap,
           and at most C calls run at once, so ideal = max(L, ceil(calls / C)) x latency;
           for 64 conversations and C dividing 64 that is ceil(64 / C) x 11 x latency
           (C=1: 704 x 0.2 s = 140.8 s; C=16: 4 x 11 x 0.2 s = 8.8 s; C=32: 4.4 s).
  eff      ideal / span: how well the batch keeps the LLM server busy (the target).
  eff*     ideal / wall: the same with the fixed startup and closing cost of the command.
  ms/call  span / calls. At latency 0 this is our own overhead per call, database writes
           included (plus the fake server's own handling, shown as llm CPU).
  cpu      CPU milliseconds per call during the span: the runner process, the embedded
           database server, the fake LLM server (sharing the machine's CPUs).
  RSS      peak resident memory of the runner process (kernel accounting of the exited child).
  other    CPUs kept busy by other processes during the span, on average (the machine has
           {cpus}): they took CPU time from the benchmark, and every figure suffers.
Every run has a fresh embedded database server (started and stopped outside the figures).""".replace(
            "{cpus}", str(os.cpu_count())
        )
    )


def targets(results: list[Result]) -> list[dict[str, Any]]:
    by_name = {r.spec.name: r for r in results}
    rows: list[dict[str, Any]] = []

    def add(target: str, name: str, value: float | None, limit: float, higher: bool) -> None:
        r = by_name.get(name)
        if r is None:
            return
        passed = r.ok and value is not None and (value >= limit if higher else value <= limit)
        rows.append({"target": target, "run": name, "value": value, "limit": limit, "pass": passed})

    for name in ("a-c16-openai", "a-c32-openai", "a-c16-ollama"):
        r = by_name.get(name)
        add("efficiency >= 0.9", name, r.efficiency if r else None, EFFICIENCY_TARGET, True)
    for name in ("b-c1-openai", "b-c16-openai"):
        r = by_name.get(name)
        value = r.per_call_ms(r.span) if r else None
        add("overhead <= 3 ms/call", name, value, OVERHEAD_TARGET_MS, False)
    r = by_name.get("c-c32-openai")
    add("peak RSS <= 300 MB", "c-c32-openai", r.peak_rss_mb if r else None, RSS_TARGET_MB, False)
    r = by_name.get("d-c32-openai")
    add(
        "efficiency >= 0.8",
        "d-c32-openai",
        r.efficiency if r else None,
        SHORT_EFFICIENCY_TARGET,
        True,
    )
    return rows


def print_comparison(results: list[Result]) -> None:
    """With --tree: each run of another checkout against the same run of this one."""
    by_name = {r.spec.name: r for r in results}
    pairs = [(by_name[r.spec.name.split("@")[0]], r) for r in results if r.spec.tree]
    pairs = [(mine, other) for mine, other in pairs if mine.ok and other.ok]
    if not pairs:
        return
    print("\nThis checkout against the other (same machine, runs alternated)")
    for mine, other in pairs:
        print(
            f"  {mine.spec.name:14} vs {other.spec.tree}: wall {other.wall:.1f} -> {mine.wall:.1f} s "
            f"(x{other.wall / mine.wall:.2f} faster), efficiency {fmt(other.efficiency)} -> "
            f"{fmt(mine.efficiency)}, peak in flight {other.peak_in_flight} -> "
            f"{mine.peak_in_flight}, runner CPU {other.runner_cpu:.1f} -> {mine.runner_cpu:.1f} s"
        )


def print_targets(rows: list[dict[str, Any]]) -> None:
    print("\nTargets (issue 4)")
    for row in rows:
        verdict = "PASS" if row["pass"] else "FAIL"
        print(f"  {verdict}  {row['target']:24} {row['run']:14} measured {fmt(row['value'])}")


def git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip run (a) at concurrency 1")
    parser.add_argument("--only", default="", help="comma-separated groups or run names")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results ({RESULTS})")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        help="also run every run with the code of this other checkout (e.g. /work/main), "
        "alternating with this one, and print the ratios",
    )
    parser.add_argument(
        "--load", type=int, default=0, help="busy loops to run meanwhile (one CPU each)"
    )
    args = parser.parse_args()

    runs = plan(args.quick)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        runs = [r for r in runs if r.group in wanted or r.name in wanted]
    if not runs:
        parser.error(f"--only {args.only!r} selects no run")
    for tree in args.tree:
        if not (Path(tree) / "simulator" / "__init__.py").is_file():
            parser.error(f"--tree {tree}: no simulator package there")
    runs = with_trees(runs, [str(Path(t).resolve()) for t in args.tree])

    workdir = Path(tempfile.mkdtemp(prefix="simulator-bench-"))
    print(f"work directory {workdir} · {os.cpu_count()} CPUs · load {os.getloadavg()[0]:.2f}")
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print("warning: the machine is busy; other processes compete for the CPUs")
    server = LLMServerProcess()
    bench = Bench(workdir, server)
    loops = BusyLoops(args.load)
    if args.load:
        print(f"{args.load} busy loops compete for the CPUs (--load)")
    results: list[Result] = []
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        for spec in runs:
            bench.start_database(workdir / f"data-{spec.name}")
            print(
                f"{spec.name}: {spec.conversations} conversations x {spec.messages} messages, "
                f"latency {spec.latency * 1000:.0f} ms, concurrency {spec.concurrency} ...",
                end="",
                flush=True,
            )
            r = bench.run(spec)
            bench.stop_database()
            results.append(r)
            print(
                f" {r.wall:.1f} s, {r.calls} calls, peak {r.peak_in_flight}, "
                f"efficiency {fmt(r.efficiency)}" + ("" if r.ok else " FAILED")
            )
    finally:
        loops.stop()
        bench.stop_database()
        server.stop()

    print_results(results)
    rows = targets(results)
    print_targets(rows)
    print_comparison(results)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "started": started.isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "load": args.load,
        "runs": [r.as_dict() for r in results],
        "targets": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nResults written to {args.out}")
    if args.keep:
        print(f"Logs and database kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r.ok for r in results) and all(row["pass"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
