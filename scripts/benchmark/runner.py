"""A throughput run: the machine checked, the C programs built, the plan of rounds
made and carried out, each run measured and retried when another program disturbed
it, and the report assembled."""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.metadata
import os
import platform
import resource
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .analysis import Runs, check_targets, summarize
from .common import HOST, ROOT, SCRIPTS, BenchError, Result, Settings, eprint
from .procs import kill_children
from .servers import C_SOURCES, Server
from .workloads import Workload

FILE_LIMIT_SLACK = 64  # descriptors a process needs besides its client sockets
# A run was disturbed when another program took more than this share of the server's or
# the load generator's CPU during its window (the load generator waiting that long for
# its CPU counts too); it is repeated once, for at most a tenth of the runs.
DISTURBED_SHARE = 0.15
RETRIES_PER_RUN = 1
RETRY_SHARE = 0.1


@dataclass
class Step:
    """One server lifetime: one run, for one or more workloads of the same lifetime."""

    rnd: int
    workloads: list[Workload]
    server: Server


def rotate(items: list[Server], by: int) -> list[Server]:
    """Each round starts with a different server, so none is always first or last."""
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


def make_plan(rounds: int, workloads: list[Workload], servers: list[Server]) -> list[Step]:
    """Every round runs every workload on every server, each round in another order."""
    plan: list[Step] = []
    steps: dict[tuple[int, str, str], Step] = {}
    for rnd in range(rounds):
        for workload in workloads:
            eligible = [
                s for s in servers if s.protocol == workload.protocol and s.runs_in(workload.key)
            ]
            for server in rotate(eligible, rnd):
                key = (rnd, server.name, workload.lifetime)
                if key in steps:  # (f) and (g) come from one run
                    steps[key].workloads.append(workload)
                else:
                    steps[key] = Step(rnd, [workload], server)
                    plan.append(steps[key])
    return plan


def measure(settings: Settings, step: Step, failed_build: dict[str, str]) -> dict[str, Any]:
    """Runs one step; a failure becomes an error message, never an exception.

    A run during which another program used the server's or the load generator's CPU
    is run once more, within a budget; the first attempt stays in the record but does
    not count: medians absorb some noise, not a busy machine's every burst.
    """
    binary = Path(step.server.argv[0]).name
    if binary in failed_build:
        return {"ok": False, "error": failed_build[binary], "seconds": 0.0}
    started = time.monotonic()
    discarded: list[Result] = []
    while True:
        try:
            result = step.workloads[0].run(settings, step.server)
        except Exception as exc:  # one failed run must not lose the others' results
            error = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
            error = " | ".join(line.strip() for line in error.splitlines() if line.strip())
            return {"ok": False, "error": error, "seconds": round(time.monotonic() - started, 2)}
        disturbed = (result.get("other_cpu") or 0) > DISTURBED_SHARE or (
            result.get("loadgen_wait", 0) > DISTURBED_SHARE
        )
        if not disturbed or len(discarded) >= RETRIES_PER_RUN or settings.retry_budget < 1:
            break
        settings.retry_budget -= 1
        discarded.append(result)
    return {
        "ok": True,
        "result": result,
        "disturbed": disturbed,
        "discarded": discarded,
        "seconds": round(time.monotonic() - started, 2),
    }


def progress_line(index: int, total: int, started: float, step: Step, run: dict[str, Any]) -> str:
    elapsed = time.monotonic() - started
    left = elapsed / index * (total - index)
    keys = "".join(w.key for w in step.workloads)
    head = f"[{index:>3}/{total} {elapsed:>4.0f}s, ~{left:>3.0f}s left] round {step.rnd + 1}"
    head += f" ({keys}) {step.server.name:<30}"
    if not run["ok"]:
        return f"{head} FAILED: {run['error'][:200]}"
    if run["discarded"]:
        head += f" (run again: {len(run['discarded'])} disturbed)"
    return f"{head} {step.workloads[0].progress(run['result'])}"


# ------------------------------------------------------------------------ preparation


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for package in ("uvloop", "gevent", "twisted", "trio"):
        versions[package] = None
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
    }


def commit() -> str | None:
    """The checkout's commit, "+" when the work tree has changes; None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+" if status.stdout.strip() else "")


def busy_fraction(seconds: float = 0.5) -> float | None:
    """How busy the machine is before we start: other work there skews the results."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # total and idle + iowait jiffies

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def build_c(build: Path, cc: str) -> dict[str, str]:
    """Compiles each C source newer than its binary; returns {binary: error} of failures."""
    build.mkdir(parents=True, exist_ok=True)
    failed = {}
    for name in C_SOURCES:
        source, binary = SCRIPTS / f"{name}.c", build / name
        if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
            continue
        cmd = [cc, "-O2", "-pthread", "-o", str(binary), str(source)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            failed[name] = f"{' '.join(cmd)} failed: {proc.stderr.strip()[-300:]}"
    return failed


def raise_file_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (the children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        new = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pick_cpus(pin: bool) -> tuple[int | None, int | None, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin:
        return None, None, "not pinned (--no-pin)"
    if not shutil.which("taskset"):
        return None, None, "not pinned: taskset is not installed"
    if len(cpus) < 2:
        return None, None, "not pinned: fewer than 2 CPUs"
    return cpus[0], cpus[1], f"server pinned to CPU {cpus[0]}, load generator to CPU {cpus[1]}"


def select_names(patterns: str | None, names: list[str]) -> list[str]:
    if not patterns:
        return names
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    unknown = [p for p in wanted if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise SystemExit(f"bench: nothing matches {', '.join(unknown)}; see --list")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in wanted)]


# ---------------------------------------------------------------------------- the run


@dataclass
class Plan:
    """What a throughput run was asked for, once the command line is read."""

    settings: Settings
    servers: list[Server]
    workloads: list[Workload]
    skipped: dict[str, str]  # server name -> why it does not run here
    notes: list[str]
    failed_build: dict[str, str]
    compiler: str | None
    smoke: bool
    argv: list[str]


def carry_out(plan: Plan) -> tuple[dict[str, Any], int]:
    """Runs the plan; returns the report and how many runs failed."""
    settings = plan.settings
    info = machine()
    eprint(
        f"bench: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"Python {info['python']}, uvloop {info['uvloop']}"
    )
    for text in [*plan.notes, *(f"{name} {why}" for name, why in plan.skipped.items())]:
        eprint(f"bench: {text}")
    busy = busy_fraction()
    if busy is not None and busy > 0.15:
        plan.notes.append(f"the machine was {busy:.0%} busy before the run: expect noise")
        eprint(f"bench: {plan.notes[-1]}")

    runnable = [s for s in plan.servers if s.name not in plan.skipped]
    steps = make_plan(settings.rounds, plan.workloads, runnable)
    # A smoke run's windows are too short to judge, and its figures do not matter.
    settings.retry_budget = 0 if plan.smoke else int(len(steps) * RETRY_SHARE)
    runs: Runs = {}
    started_at, started = time.time(), time.monotonic()
    try:
        for index, step in enumerate(steps, 1):
            run = measure(settings, step, plan.failed_build)
            for workload in step.workloads:
                record = {"round": step.rnd + 1, "workload": workload.key}
                runs[(workload.key, step.server.name, step.rnd)] = {
                    **record,
                    "server": step.server.name,
                    **run,
                }
            eprint(progress_line(index, len(steps), started, step, run))
    finally:
        kill_children()

    counts = {"active": settings.active, "clients": f"{settings.clients:,}"}
    servers, workloads = plan.servers, plan.workloads
    report: dict[str, Any] = {
        "meta": {
            "command": shlex.join(["scripts/bench", *plan.argv]),
            "machine": info,
            "host": HOST,
            "rounds": settings.rounds,
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "active_connections": settings.active,
            "clients": settings.clients,
            "smoke": plan.smoke,
            "compiler": plan.compiler,
            "commit": commit(),
            "busy_before": busy,
            "notes": plan.notes,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
            "elapsed_s": round(time.monotonic() - started, 1),
        },
        "servers": [
            {
                "name": s.name,
                "protocol": s.protocol,
                "what": s.what,
                "family": s.family,
                "command": shlex.join(s.argv),
                "stop_signal": s.stop_signal.name,
                "skipped": plan.skipped.get(s.name),
            }
            for s in servers
        ],
        "workloads": [
            {
                "key": w.key,
                "name": w.name,
                "title": w.title.format(**counts),
                "protocol": w.protocol,
                "metric": w.metric,
                "reference": w.reference,
                "servers": [
                    s.name for s in servers if s.protocol == w.protocol and s.runs_in(w.key)
                ],
            }
            for w in workloads
        ],
        "runs": list(runs.values()),
        "results": summarize(runs, settings.rounds, [s.name for s in servers], workloads),
    }
    for workload in workloads:  # a skipped server still gets its row, saying why
        for server in servers:
            if (
                server.name in plan.skipped
                and server.protocol == workload.protocol
                and server.runs_in(workload.key)
            ):
                rows = report["results"].setdefault(workload.key, {})
                rows[server.name] = {"skipped": plan.skipped[server.name]}
    report["targets"] = check_targets(runs, settings.rounds)
    failed = sum(not r["ok"] for r in runs.values())
    return report, failed


def load_generator(build: Path, cc: str | None, failed_build: dict[str, str]) -> tuple[str, ...]:
    """The C load generator's command; SystemExit when it cannot be had."""
    if not cc:
        raise SystemExit(
            "bench: a throughput run needs a C compiler ($CC, gcc, cc or clang) for its"
            " load generator, scripts/bench_load.c; --instructions runs without one"
        )
    if "bench_load" in failed_build:
        raise SystemExit(f"bench: {failed_build['bench_load']}")
    return (str(build / "bench_load"),)
