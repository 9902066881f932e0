"""Adaptive concurrency (issue 13, item 6): the calls in flight on one endpoint converging on
a server's capacity.

A local LLM server (tests/servers.py's FakeLLMServer, OpenAI API) works on at most CAP calls at
once, each for LATENCY seconds, and answers 429 at once to any call beyond that. THREADS
callers share one LLM through the provider layer's wrapper (ModelPool -> RetryingModel, the
code batches use) with `--concurrency` CEILING, and call it in a loop for SECONDS. The same
load then runs with the limit fixed at CEILING (what a batch did before: a number to guess).

Prints, per run: calls answered, throughput against the server's best (CAP / LATENCY), the
share of calls refused, when the limit first reached CAP - 1, and the mean and peak in flight
at the server over the second half. Writes a figure (in flight over time, with the limit):

    python bench/adaptive.py                          # cap 6, ceiling 32, 8 s per run
    python bench/adaptive.py --cap 12 --seconds 5 --out /tmp/adaptive.png
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulator.errors import ProviderError  # noqa: E402
from simulator.experiment import ModelSpec  # noqa: E402
from simulator.llm.registry import ModelPool, create_model  # noqa: E402
from simulator.llm.retry import EndpointLimit, Outcome, RetryingModel, RetryPolicy  # noqa: E402
from tests.servers import FakeLLMServer  # noqa: E402

MESSAGES = [{"role": "user", "content": "Researcher: hello"}]


class FixedLimit(EndpointLimit):
    """The limit before issue 13: a fixed number of calls in flight, whatever the server says."""

    def give_back(self, ticket: int, outcome: Outcome) -> None:
        with self._cond:
            self.in_flight -= 1
            self.overloads += outcome is Outcome.OVERLOAD
            self._note()
            self._cond.notify_all()


@dataclass
class Result:
    name: str
    answered: int
    failed: int
    seconds: float
    arrivals: list[tuple[float, int, bool]]
    history: list[tuple[float, int, float]]
    started: float


def run(name: str, cap: int, latency: float, ceiling: int, threads: int, seconds: float) -> Result:
    policy = RetryPolicy(attempts=8, base_delay=0.02, max_delay=0.5)
    with FakeLLMServer(models={"bench"}, latency=latency) as server:
        server.cap = cap
        spec = ModelSpec("bench", "openai", base_url=server.openai_url)
        if name == "adaptive":
            pool = ModelPool(policy, concurrency=ceiling)
            model = pool.get(spec)
            limit = pool.limiter(spec)
        else:
            limit = FixedLimit("fixed", ceiling, ceiling, threading.Condition())
            model = RetryingModel(create_model(spec, timeout=30), policy, limit)
        answered = failed = 0
        lock = threading.Lock()
        started = time.monotonic()
        deadline = started + seconds

        def caller() -> None:
            nonlocal answered, failed
            while time.monotonic() < deadline:
                try:
                    model.chat(MESSAGES)  # type: ignore[arg-type]
                    ok = True
                except ProviderError:
                    ok = False
                with lock:
                    answered += ok
                    failed += not ok

        workers = [threading.Thread(target=caller) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.monotonic() - started
        return Result(
            name, answered, failed, elapsed, list(server.arrivals), list(limit.history), started
        )


def report(r: Result, cap: int, latency: float) -> str:
    half = r.started + r.seconds / 2
    late = [a for a in r.arrivals if a[0] >= half]
    admitted = [n for _, n, refused in late if not refused]
    refused = sum(1 for *_, x in r.arrivals if x) / max(1, len(r.arrivals))
    reached = next((t - r.started for t, _, lim in r.history if lim >= cap - 1), None)
    converged = (
        ""
        if r.name != "adaptive"
        else (f"limit reached {cap - 1} after {'-' if reached is None else f'{reached:.2f} s'}; ")
    )
    best = cap / latency
    return (
        f"{r.name:9} answered {r.answered:5,} ({r.answered / r.seconds:6.1f}/s = "
        f"{r.answered / r.seconds / best:4.0%} of the server's {best:.0f}/s), failed {r.failed}, "
        f"refused {refused:4.0%} of {len(r.arrivals):,} requests; {converged}"
        f"second half: mean in flight at arrival {sum(admitted) / max(1, len(admitted)):.1f}, "
        f"peak {max((n for _, n, _ in late), default=0)}"
    )


def figure(results: list[Result], cap: int, ceiling: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 3.2 * len(results)), sharex=True)
    for ax, r in zip(axes, results):
        ts = [t - r.started for t, _, _ in r.history]
        ax.step(ts, [n for _, n, _ in r.history], where="post", lw=0.6, label="calls in flight")
        if r.name == "adaptive":
            ax.step(ts, [lim for *_, lim in r.history], where="post", lw=1.2, label="limit")
        refused = [(t - r.started, n) for t, n, x in r.arrivals if x]
        if refused:
            ax.plot(*zip(*refused), "x", ms=3, color="red", label="refused (429)")
        ax.axhline(cap, ls="--", color="grey", lw=0.8, label=f"server cap ({cap})")
        ax.set_ylim(0, ceiling + 2)
        ax.set_ylabel("calls")
        ax.set_title(f"{r.name}: --concurrency {ceiling}", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"figure: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap", type=int, default=6, help="calls the server works on at once")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per call")
    parser.add_argument("--ceiling", type=int, default=32, help="--concurrency")
    parser.add_argument("--threads", type=int, default=32, help="callers (conversations)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "adaptive.png")
    args = parser.parse_args()
    results = []
    for name in ("adaptive", "fixed"):
        r = run(name, args.cap, args.latency, args.ceiling, args.threads, args.seconds)
        print(report(r, args.cap, args.latency), flush=True)
        results.append(r)
    figure(results, args.cap, args.ceiling, args.out)


if __name__ == "__main__":
    main()
