"""From runs to figures: medians over rounds, same-round ratios, target verdicts, and
instructions per request from callgrind totals. Pure functions on data, so that
tests/test_bench_analysis.py checks them on fixed figures."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .common import Result
from .workloads import WORKLOADS, Workload

# (workload key, server name, round) -> {"ok": bool, "result": Result, ...}
Runs = dict[tuple[str, str, int], dict[str, Any]]


def metric_of(
    runs: Runs, workloads: Sequence[Workload], workload: str, server: str, rnd: int
) -> float | None:
    run = runs.get((workload, server, rnd))
    if not run or not run["ok"]:
        return None
    metric = next(w.metric for w in workloads if w.key == workload)
    value = run["result"].get(metric)
    return float(value) if value is not None else None


def same_round_ratios(
    runs: Runs,
    workloads: Sequence[Workload],
    rounds: int,
    top: tuple[str, str],
    bottom: tuple[str, str],
) -> list[float]:
    """top / bottom within each round: the machine's mood that round cancels out."""
    ratios = []
    for rnd in range(rounds):
        a = metric_of(runs, workloads, *top, rnd)
        b = metric_of(runs, workloads, *bottom, rnd)
        if a is not None and b:
            ratios.append(a / b)
    return ratios


def reference_of(workload: Workload, server: str) -> tuple[str, str] | None:
    if not workload.reference:
        return None
    if workload.reference == "a":
        return ("a", server)
    return (workload.key, workload.reference)


def summarize(
    runs: Runs, rounds: int, servers: Iterable[str], workloads: Sequence[Workload] = WORKLOADS
) -> dict[str, dict[str, Any]]:
    """Per workload and server: the median of every figure over the rounds, the range
    of the main one, and the median of the same-round ratios to the reference."""
    names = list(servers)
    summary: dict[str, dict[str, Any]] = {}
    for workload in workloads:
        rows = {}
        for server in names:
            done = [runs.get((workload.key, server, r)) for r in range(rounds)]
            ok: list[Result] = [run["result"] for run in done if run and run["ok"]]
            errors = [run["error"] for run in done if run and not run["ok"]]
            if not ok and not errors:
                continue
            row: dict[str, Any] = {"rounds_ok": len(ok), "errors": errors}
            for key in ok[0] if ok else []:
                values = [r.get(key) for r in ok]
                numbers: list[float] = [
                    v for v in values if isinstance(v, int | float) and not isinstance(v, bool)
                ]
                if numbers:
                    row[key] = statistics.median(numbers)
                elif isinstance(values[0], str) and len(set(values)) == 1:
                    row[key] = values[0]  # the same text every round, like the stop signal
            row["disturbed_rounds"] = sum(bool(run and run.get("disturbed")) for run in done)
            if ok:
                main = [r[workload.metric] for r in ok]
                row["range"] = [min(main), max(main)]
                row["timed_out"] = any(r.get("timed_out") for r in ok)
            ref = reference_of(workload, server)
            if ref:
                ratios = same_round_ratios(runs, workloads, rounds, (workload.key, server), ref)
                row["ratio"] = statistics.median(ratios) if ratios else None
            rows[server] = row
        if rows:
            summary[workload.key] = rows
    return summary


OPS = {
    ">=": lambda value, threshold: value >= threshold,
    "<=": lambda value, threshold: value <= threshold,
    "<": lambda value, threshold: value < threshold,
}


@dataclass(frozen=True)
class Target:
    workload: str
    server: str
    op: str  # ">=", "<=" or "<"
    threshold: float
    versus: tuple[str, str] | None = None  # (workload, server): a ratio in the same round
    note: str = ""

    def text(self, workloads: Sequence[Workload] = WORKLOADS) -> str:
        head = f"{self.note + ': ' if self.note else ''}({self.workload}) {self.server}"
        if self.versus:
            where = f" in ({self.versus[0]})" if self.versus[0] != self.workload else ""
            return f"{head} {self.op} {self.threshold:g}x {self.versus[1]}{where}"
        workload = next(w for w in workloads if w.key == self.workload)
        return f"{head} {workload.figure} {self.op} {workload.show(self.threshold)}"


UV_ECHO, UV_THANKS = "aioserver-echo-uvloop", "aioserver-thanks-uvloop"
TARGETS: tuple[Target, ...] = (
    Target("a", UV_ECHO, ">=", 0.85, ("a", "c-epoll-echo")),
    Target("a", UV_ECHO, ">=", 1.5, ("a", "start-server-echo-uvloop")),
    Target("a", UV_ECHO, ">=", 1.3, ("a", "threading-echo")),
    Target("a", UV_ECHO, ">=", 2.0, ("a", "gevent-echo")),
    Target("a", UV_ECHO, ">=", 2.0, ("a", "twisted-echo")),
    Target("a", UV_ECHO, ">=", 3.0, ("a", "trio-echo")),
    Target("a", "aioserver-echo-asyncio", ">=", 1.0, ("a", "start-server-echo-asyncio")),
    Target("c", UV_THANKS, ">=", 1.2, ("c", "c-thread-thanks")),
    Target("c", UV_THANKS, ">=", 1.5, ("c", "threading-thanks")),
    Target("c", UV_THANKS, ">=", 1.5, ("c", "twisted-thanks")),
    Target("d", UV_ECHO, ">=", 0.9, ("a", UV_ECHO)),
    Target("e", UV_ECHO, ">=", 1.5, ("e", "threading-echo")),
    Target("e", UV_ECHO, ">=", 1.0, ("e", "c-pthread-echo")),
    # The start_server objects a connection must keep are the floor (docs/benchmarks.md).
    Target("f", UV_ECHO, "<=", 1.0, ("f", "start-server-echo-uvloop")),
    Target("g", UV_ECHO, "<", 1.0),
    # The load generator is not the bottleneck if it drives the fastest server faster.
    Target("a", "c-epoll-echo", ">=", 1.5, ("a", UV_ECHO), note="load generator"),
)


def check_targets(
    runs: Runs,
    rounds: int,
    targets: Sequence[Target] = TARGETS,
    workloads: Sequence[Workload] = WORKLOADS,
) -> list[dict[str, Any]]:
    checked = []
    for target in targets:
        if target.versus:
            top = (target.workload, target.server)
            values = same_round_ratios(runs, workloads, rounds, top, target.versus)
        else:
            values = [
                v
                for r in range(rounds)
                if (v := metric_of(runs, workloads, target.workload, target.server, r)) is not None
            ]
        value = statistics.median(values) if values else None
        met = None if value is None else OPS[target.op](value, target.threshold)
        checked.append(
            {
                "target": target.text(workloads),
                "value": value,
                "op": target.op,
                "threshold": target.threshold,
                "kind": "ratio" if target.versus else target.workload,
                "rounds": len(values),
                "met": met,
            }
        )
    return checked


# ----------------------------------------------------------------- instruction counts


def per_unit(total_n: int, total_2n: int, n: int) -> float:
    """Instructions per exchange from two lifetimes, one of n exchanges and one of 2n:
    their difference over n, so that start-up and stop, the same in both, cancel."""
    if n < 1:
        raise ValueError("n must be at least 1")
    return (total_2n - total_n) / n


@dataclass(frozen=True)
class CountTarget:
    """A target on instruction counts: `server` in `workload` costs at most
    `threshold` times `versus` (a workload and server)."""

    workload: str
    server: str
    threshold: float
    versus: tuple[str, str]
    note: str = ""

    def text(self) -> str:
        where = f" in ({self.versus[0]})" if self.versus[0] != self.workload else ""
        head = f"({self.workload}) {self.server}"
        return f"{head} <= {self.threshold:g}x {self.versus[1]}{where}" + (
            f" ({self.note})" if self.note else ""
        )


COUNT_TARGETS: tuple[CountTarget, ...] = (
    CountTarget("echo-1k", UV_ECHO, 1.10, ("echo-1k", "protocol-echo-uvloop")),
    CountTarget("thanks-64", UV_THANKS, 1.5, ("echo-64", UV_ECHO), "the thanks rule"),
    CountTarget("connect", UV_ECHO, 1.0, ("connect", "start-server-echo-uvloop")),
    CountTarget("connect", f"{UV_ECHO}-access-log", 1.25, ("connect", UV_ECHO), "the access log"),
)


def check_count_targets(
    counts: dict[tuple[str, str], float | None], targets: Sequence[CountTarget] = COUNT_TARGETS
) -> list[dict[str, Any]]:
    """Verdicts on instructions per unit, keyed by (workload, server)."""
    checked = []
    for target in targets:
        top = counts.get((target.workload, target.server))
        bottom = counts.get(target.versus)
        value = top / bottom if top is not None and bottom else None
        checked.append(
            {
                "target": target.text(),
                "value": value,
                "op": "<=",
                "threshold": target.threshold,
                "kind": "ratio",
                "met": None if value is None else value <= target.threshold,
            }
        )
    return checked
