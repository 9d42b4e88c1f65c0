"""The command line of scripts/bench."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import instructions, report, runner
from .common import (
    ACTIVE_CONNECTIONS,
    MANY_CLIENTS,
    ROOT,
    SMOKE_ACTIVE,
    SMOKE_CLIENTS,
    Settings,
    eprint,
)
from .procs import kill_children
from .servers import INSTRUCTION_ONLY, SERVERS, by_name, unavailable
from .workloads import WORKLOADS

DEFAULT_JSON = Path("bench-results.json")
DEFAULT_INSTRUCTIONS_JSON = Path("bench-instructions.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Side-by-side benchmark of aioserver; see docs/benchmarks.md.",
    )
    add = parser.add_argument
    add("--rounds", type=int, default=3, help="rounds; servers alternate within each (3)")
    add("--duration", type=float, default=1.0, help="measured seconds per run (1.0)")
    add("--warmup", type=float, default=0.3, help="unmeasured seconds before each (0.3)")
    add("--clients", type=int, default=MANY_CLIENTS, help="connected clients of d, f, g")
    add("--servers", help="comma-separated names or globs, e.g. 'aioserver-*,c-epoll-echo'")
    add("--workloads", help="comma-separated keys or names, e.g. a,c,stop-time")
    add(
        "--json",
        type=Path,
        help=f"results file ({DEFAULT_JSON}; {DEFAULT_INSTRUCTIONS_JSON} with --instructions)",
    )
    add("--chart", type=Path, help="PNG file (default: the JSON file's name, .png)")
    add("--no-chart", action="store_true", help="write no PNG")
    add("--no-pin", action="store_true", help="do not pin server and load generator")
    add("--build-dir", type=Path, default=ROOT / ".bench-build", help="for the C programs")
    add("--smoke", action="store_true", help="each workload for a moment with tiny counts")
    add("--list", action="store_true", help="list the servers and workloads, then exit")
    add(
        "--instructions",
        action="store_true",
        help="count user-space instructions per request and per connection under"
        " valgrind's callgrind instead of measuring throughput",
    )
    add("--exchanges", type=int, help="with --instructions: N for every workload")
    add("--jobs", type=int, default=2, help="with --instructions: servers under callgrind at once")
    add(
        "--doc",
        type=Path,
        help="also write the tables into this markdown file, between its"
        " GENERATED markers (docs/benchmarks.md)",
    )
    add(
        "--from-json",
        type=Path,
        help="measure nothing: print (and with --doc, write) the tables of this results file",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.duration, args.warmup = 1, 0.15, 0.05
        args.clients = min(args.clients, SMOKE_CLIENTS)
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0 or args.clients < 1:
        parser.error("--rounds, --duration and --clients must be positive")
    if (args.exchanges is not None and args.exchanges < 1) or args.jobs < 1:
        parser.error("--exchanges and --jobs must be positive")
    if args.json is None:
        args.json = DEFAULT_INSTRUCTIONS_JSON if args.instructions else DEFAULT_JSON
    return args


def list_all() -> None:
    for server in (*SERVERS, *INSTRUCTION_ONLY):
        print(f"{server.name:<34} {server.protocol:<7} {server.what}")
    print()
    for w in WORKLOADS:
        title = w.title.format(active=ACTIVE_CONNECTIONS, clients=f"{MANY_CLIENTS:,}")
        print(f"{w.key}  {w.name:<20} {w.protocol:<7} {title}")
    print("\nwith --instructions:")
    for c in instructions.COUNT_WORKLOADS:
        print(f"   {c.key:<20} {c.protocol:<7} {c.title}; per {c.per}, N = {c.exchanges:,}")


def write_doc(args: argparse.Namespace, section: str, text: str) -> None:
    report.update_doc(args.doc, section, text)
    print(f"doc: {args.doc} ({section})")


def throughput(args: argparse.Namespace, argv: list[str]) -> int:
    picked = runner.select_names(args.servers, [s.name for s in SERVERS])
    servers = [s for s in SERVERS if s.name in picked]
    keys = [w.key for w in WORKLOADS] + [w.name for w in WORKLOADS]
    wanted = runner.select_names(args.workloads, keys)
    workloads = [w for w in WORKLOADS if w.key in wanted or w.name in wanted]

    notes: list[str] = []
    limit = runner.raise_file_limit()
    if args.clients + runner.FILE_LIMIT_SLACK > limit:
        args.clients = max(limit - runner.FILE_LIMIT_SLACK, 1)
        notes.append(f"the file limit is {limit}: (d), (f), (g) use {args.clients:,} clients")
    server_cpu, load_cpu, pinning = runner.pick_cpus(not args.no_pin)
    notes.append(pinning)
    cc = runner.compiler()
    failed_build = runner.build_c(args.build_dir, cc) if cc else {}
    load_argv = runner.load_generator(args.build_dir, cc, failed_build)
    notes.append("load generator: bench_load (C, epoll, one thread)")
    skipped = {s.name: why for s in servers if (why := unavailable(s, cc))}
    settings = Settings(
        rounds=args.rounds,
        duration=args.duration,
        warmup=args.warmup,
        clients=args.clients,
        active=SMOKE_ACTIVE if args.smoke else ACTIVE_CONNECTIONS,
        build=args.build_dir,
        server_cpu=server_cpu,
        load_cpu=load_cpu,
        load_argv=load_argv,
    )
    plan = runner.Plan(
        settings, servers, workloads, skipped, notes, failed_build, cc, args.smoke, argv
    )
    results, failed = runner.carry_out(plan)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(report.format_tables(results))
    print(f"\n{'; '.join(notes)}")
    print(f"JSON: {args.json}")
    if not args.no_chart:
        print(report.write_chart(args.chart or args.json.with_suffix(".png"), results))
    if args.doc:
        link = report.relative_link(args.json, args.doc)
        write_doc(args, "throughput", report.markdown_tables(results, link))
    if failed:
        eprint(f"bench: {failed} run(s) failed; the table and the JSON say why")
    return 1 if failed else 0


def count_instructions(args: argparse.Namespace, argv: list[str]) -> int:
    version = instructions.valgrind_version()
    if not version:
        raise SystemExit("bench: --instructions needs valgrind (Debian: apt-get install valgrind)")
    every = [w.key for w in instructions.COUNT_WORKLOADS]
    wanted = runner.select_names(args.workloads, every)
    workloads = [w for w in instructions.COUNT_WORKLOADS if w.key in wanted]
    names = sorted({name for w in workloads for name in w.servers})
    servers = runner.select_names(args.servers, names)
    cc = runner.compiler()
    failed_build = runner.build_c(args.build_dir, cc) if cc else {}
    skipped = {}
    for name in servers:
        server = by_name(name)
        binary = server.argv[0].rsplit("/", 1)[-1]
        if why := unavailable(server, cc):
            skipped[name] = why
        elif binary in failed_build:
            skipped[name] = failed_build[binary]
    eprint(f"bench: {version}, {len(workloads)} workload(s), {len(servers)} server(s)")
    started_at, started = time.time(), time.monotonic()
    try:
        records = instructions.run_counts(
            args.build_dir, workloads, servers, skipped, args.smoke, args.exchanges, args.jobs
        )
    finally:
        kill_children()
    meta: dict[str, Any] = {
        "valgrind": version,
        "machine": runner.machine(),
        "smoke": args.smoke,
        "commit": runner.commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    results = instructions.build_report(records, workloads, argv, meta)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(instructions.format_counts(results))
    print(f"JSON: {args.json}")
    if args.doc:
        link = report.relative_link(args.json, args.doc)
        write_doc(args, "instructions", instructions.markdown_counts(results, link))
    failed = sum(not r["ok"] and not r.get("skipped") for r in records)
    if failed:
        eprint(f"bench: {failed} count(s) failed; the table and the JSON say why")
    return 1 if failed else 0


def from_json(args: argparse.Namespace) -> int:
    results = json.loads(args.from_json.read_text())
    counts = "counts" in results
    if counts:
        print(instructions.format_counts(results))
    else:
        print(report.format_tables(results))
    if args.doc:
        link = report.relative_link(args.from_json, args.doc)
        if counts:
            write_doc(args, "instructions", instructions.markdown_counts(results, link))
        else:
            write_doc(args, "throughput", report.markdown_tables(results, link))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        list_all()
        return 0
    if args.from_json:
        return from_json(args)
    if args.instructions:
        return count_instructions(args, argv)
    return throughput(args, argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that kills children


def run() -> None:
    """The launcher's entry: children are killed however the bench ends."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        kill_children()
        eprint("bench: interrupted")
        sys.exit(130)
