"""The --instructions mode: user-space instructions per request and per connection,
counted by valgrind's callgrind in every thread of the server.

Each (workload, server) pair runs the server twice under callgrind, once for N
exchanges and once for 2N, from a client in this process (its own cost is not
counted); the difference of the two totals over N is the cost of one exchange, since
start-up and stop are the same in both. Unlike requests/s these counts do not depend
on how busy the machine is, so they repeat from run to run.
"""

from __future__ import annotations

import concurrent.futures
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .analysis import check_count_targets, per_unit
from .common import HOST, BenchError, eprint
from .procs import running_server, wait_exit
from .servers import Server, by_name
from .workloads import fmt

THANKS_PREFIX = b"Thank you for your message "
READY_TIMEOUT_S = 180.0  # start-up under callgrind is some 50 times slower
STOP_TIMEOUT_S = 120.0  # so is the stop, and callgrind writes its file at exit
RESIGNAL_S = 10.0  # the stop signal is sent again after this long
CLIENT_TIMEOUT_S = 30.0  # one reply that takes longer than this fails the run
# N in --smoke: the mode runs end to end in seconds; N exchanges cost about a
# million instructions, well above the few hundred thousand a lifetime varies by.
SMOKE_EXCHANGES = 200
# The environment variables by which coverage.py measures subprocesses.
UNCOUNTED = ("COVERAGE_", "COV_CORE_")


def request(size: int) -> bytes:
    """The same request bytes as the load generator's: size - 1 letters and LF."""
    return bytes(ord("a") + (i * 7 + i // 26) % 26 for i in range(size - 1)) + b"\n"


def _exchange(sock: socket.socket, message: bytes, reply: bytes) -> None:
    sock.sendall(message)
    got = b""
    while len(got) < len(reply):
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError(f"the server closed the connection ({len(got)} bytes read)")
        got += chunk
    if got != reply:
        raise BenchError("the reply differs from the expected bytes")


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def requests_on_one_connection(port: int, n: int, message: bytes, reply: bytes) -> None:
    with _connect(port) as sock:
        for _ in range(n):
            _exchange(sock, message, reply)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the server's EOF: it has seen the client leave


def connection_per_request(port: int, n: int, message: bytes, reply: bytes) -> None:
    for _ in range(n):
        with _connect(port) as sock:
            _exchange(sock, message, reply)


@dataclass(frozen=True)
class CountWorkload:
    key: str
    title: str
    protocol: str
    size: int  # request bytes, LF included
    per: str  # "request" or "connection": what one exchange is
    exchanges: int  # N; the second lifetime makes 2N
    servers: tuple[str, ...]
    reference: tuple[str, str] | None = None  # (workload, server) of the ratio column
    client: Callable[[int, int, bytes, bytes], None] = requests_on_one_connection

    def messages(self) -> tuple[bytes, bytes]:
        message = request(self.size)
        return message, (THANKS_PREFIX + message if self.protocol == "thanks" else message)


UV_ECHO = "aioserver-echo-uvloop"
ECHO_ROWS = (
    UV_ECHO,
    "aioserver-echo-asyncio",
    "protocol-echo-uvloop",
    "start-server-echo-uvloop",
    "gevent-echo",
    "twisted-echo",
    "trio-echo",
    "c-epoll-echo",
)
COUNT_WORKLOADS: tuple[CountWorkload, ...] = (
    CountWorkload(
        "echo-1k",
        "echo, 1 KiB request-reply on one connection",
        "echo",
        1024,
        "request",
        4000,
        ECHO_ROWS,
        reference=("echo-1k", "protocol-echo-uvloop"),
    ),
    CountWorkload(
        "echo-64", "echo, 64-byte lines on one connection", "echo", 64, "request", 4000, (UV_ECHO,)
    ),
    CountWorkload(
        "thanks-64",
        "thanks, 64-byte lines on one connection",
        "thanks",
        64,
        "request",
        4000,
        ("aioserver-thanks-uvloop", "gevent-thanks", "twisted-thanks", "trio-thanks"),
        reference=("echo-64", UV_ECHO),
    ),
    CountWorkload(
        "connect",
        "a connection per request: connect, 64 bytes, read the reply, close",
        "echo",
        64,
        "connection",
        1000,
        (UV_ECHO, f"{UV_ECHO}-access-log", *ECHO_ROWS[1:]),
        reference=("connect", "start-server-echo-uvloop"),
        client=connection_per_request,
    ),
)


def valgrind_command(out_file: Path) -> tuple[str, ...]:
    return (
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=no",  # one total over every thread of the server
        f"--callgrind-out-file={out_file}",
        "--log-file=/dev/null",  # its own messages would go into the server's stderr
    )


def callgrind_total(out_file: Path) -> int:
    """The instructions counted (Ir) in a callgrind out file: its totals line."""
    for line in reversed(out_file.read_text(errors="replace").splitlines()):
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise BenchError(f"no totals line in {out_file}")


def count_once(build: Path, server: Server, workload: CountWorkload, n: int, workdir: Path) -> int:
    """Total user-space instructions of one server lifetime serving n exchanges."""
    out_file = workdir / f"callgrind.{workload.key}.{server.name}.{n}"
    # The same dict layouts in every run; and no coverage measurement (a test run
    # under pytest-cov would otherwise trace the server, and count the tracing).
    env = {key: value for key, value in os.environ.items() if not key.startswith(UNCOUNTED)}
    env["PYTHONHASHSEED"] = "0"
    message, reply = workload.messages()
    with running_server(
        build,
        server,
        None,
        prefix=valgrind_command(out_file),
        ready_timeout=READY_TIMEOUT_S,
        stop_timeout=STOP_TIMEOUT_S,
        env=env,
    ) as running:
        try:
            workload.client(running.port, n, message, reply)
        except OSError as exc:
            raise BenchError(f"client: {exc}; server log: {running.log_tail(300)}") from None
        proc = running.proc
        # The stop signal again while the server has not exited: gevent under callgrind
        # lets a SIGINT go by when it comes as a client's greenlet ends.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            proc.send_signal(server.stop_signal)
            if wait_exit(proc, RESIGNAL_S):
                break
    if proc.returncode not in (0, -server.stop_signal, 128 + server.stop_signal):
        raise BenchError(f"the server exited with code {proc.returncode} under callgrind")
    if not out_file.exists():
        raise BenchError("callgrind wrote no file: the server did not exit by itself")
    return callgrind_total(out_file)


def measure_pair(
    build: Path, server: Server, workload: CountWorkload, n: int, workdir: Path, jobs: int
) -> dict[str, Any]:
    started = time.monotonic()
    record: dict[str, Any] = {"workload": workload.key, "server": server.name, "n": n}
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(jobs, 2)) as pool:
            small = pool.submit(count_once, build, server, workload, n, workdir)
            large = pool.submit(count_once, build, server, workload, 2 * n, workdir)
            totals = [small.result(), large.result()]
    except BenchError as exc:
        record.update(ok=False, error=" | ".join(str(exc).split("\n"))[:500])
    else:
        record.update(ok=True, totals=totals, per_unit=per_unit(totals[0], totals[1], n))
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def run_counts(
    build: Path,
    workloads: list[CountWorkload],
    servers: list[str],
    skipped: dict[str, str],
    smoke: bool,
    exchanges: int | None,
    jobs: int,
) -> list[dict[str, Any]]:
    pairs = [(w, by_name(name)) for w in workloads for name in w.servers if name in servers]
    records: list[dict[str, Any]] = [
        {"workload": w.key, "server": s.name, "ok": False, "skipped": skipped[s.name]}
        for w, s in pairs
        if s.name in skipped
    ]
    todo = [(w, s) for w, s in pairs if s.name not in skipped]
    started = time.monotonic()
    # Each pair runs its two lifetimes at once; with --jobs 4 or more, pairs run together.
    with (
        tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp,
        concurrent.futures.ThreadPoolExecutor(max_workers=max(jobs // 2, 1)) as pool,
    ):
        futures = {
            pool.submit(
                measure_pair,
                build,
                server,
                workload,
                SMOKE_EXCHANGES if smoke else (exchanges or workload.exchanges),
                Path(tmp),
                jobs,
            ): (workload, server)
            for workload, server in todo
        }
        for index, future in enumerate(concurrent.futures.as_completed(futures), 1):
            record = future.result()
            records.append(record)
            workload, server = futures[future]
            shown = (
                f"{record['per_unit']:,.0f} instructions per {workload.per}"
                if record["ok"]
                else f"FAILED: {record['error'][:200]}"
            )
            eprint(
                f"[{index:>2}/{len(futures)} {time.monotonic() - started:>4.0f}s]"
                f" {workload.key:<10} {server.name:<34} {shown}"
            )
    order = {(w.key, s.name): i for i, (w, s) in enumerate(pairs)}
    records.sort(key=lambda r: order[(r["workload"], r["server"])])
    return records


def counts_of(records: list[dict[str, Any]]) -> dict[tuple[str, str], float | None]:
    return {(r["workload"], r["server"]): r.get("per_unit") for r in records}


def summarize_counts(
    records: list[dict[str, Any]], workloads: list[CountWorkload]
) -> list[dict[str, Any]]:
    """Each record with its ratio to its workload's reference, for the tables."""
    counts = counts_of(records)
    refs = {w.key: w.reference for w in workloads}
    rows = []
    for record in records:
        ref = refs.get(record["workload"])
        mine, theirs = record.get("per_unit"), counts.get(ref) if ref else None
        rows.append({**record, "ratio": mine / theirs if mine is not None and theirs else None})
    return rows


def _what(row: dict[str, Any]) -> str:
    if row.get("skipped"):
        return str(row["skipped"])
    if not row["ok"]:
        return f"FAILED: {row['error'][:100]}"
    return ""


def format_counts(report: dict[str, Any]) -> str:
    per = {w["key"]: w["per"] for w in report["workloads"]}
    refs = {w["key"]: w["reference"] for w in report["workloads"]}
    out = [
        "Instructions per request or connection (callgrind: user space, every thread;"
        " the difference of N and 2N exchanges over N)",
        f"{'workload':<11}{'server':<36}{'instructions':>14} {'per':<11}{'N':>6}{'ratio':>7}  to",
    ]
    for row in report["counts"]:
        ref = refs.get(row["workload"])
        head = f"{row['workload']:<11}{row['server']:<36}"
        if _what(row):
            out.append(f"{head}{_what(row)}")
            continue
        to = f"  {ref[1]}" + (f" in {ref[0]}" if ref[0] != row["workload"] else "") if ref else ""
        out.append(
            f"{head}{fmt(row['per_unit']):>14} {per[row['workload']]:<11}{row['n']:>6}"
            f"{fmt(row.get('ratio'), 2):>7}{to}"
        )
    out += ["", "Targets (on instruction counts)"]
    for target in report["targets"]:
        status = {True: "met", False: "NOT MET", None: "n/a"}[target["met"]]
        value = "no data" if target["value"] is None else f"{target['value']:.2f}x"
        out.append(f"  {status:<8}{target['target']:<74}{value:>10}")
    return "\n".join(out)


def markdown_counts(report: dict[str, Any], json_link: str) -> str:
    meta = report["meta"]
    per = {w["key"]: w["per"] for w in report["workloads"]}
    refs = {w["key"]: w["reference"] for w in report["workloads"]}
    commit = f", at commit {meta['commit']}" if meta.get("commit") else ""
    out = [
        f"Command: `{meta['command']}` ({meta['valgrind']}, {meta['elapsed_s'] / 60:.0f}"
        f" minutes), started {meta['started']}{commit}. Every total is in"
        f" [{Path(json_link).name}]({json_link}).",
        "",
        "| workload | server | instructions | per | N | ratio | to |",
        "| --- | --- | ---: | --- | ---: | ---: | --- |",
    ]
    for row in report["counts"]:
        ref = refs.get(row["workload"])
        if _what(row):
            out.append(f"| {row['workload']} | `{row['server']}` | {_what(row)} | | | | |")
            continue
        to = ""
        if ref and row.get("ratio") is not None:
            to = f"`{ref[1]}`" + (f" in {ref[0]}" if ref[0] != row["workload"] else "")
        out.append(
            f"| {row['workload']} | `{row['server']}` | {fmt(row['per_unit'])} |"
            f" {per[row['workload']]} | {row['n']:,} | {fmt(row.get('ratio'), 2)} | {to} |"
        )
    out += ["", "| | target (instruction counts) | value |", "| --- | --- | ---: |"]
    for target in report["targets"]:
        status = {True: "met", False: "NOT MET", None: "n/a"}[target["met"]]
        value = "no data" if target["value"] is None else f"{target['value']:.2f}x"
        out.append(f"| {status} | {target['target']} | {value} |")
    return "\n".join(out) + "\n"


def valgrind_version() -> str | None:
    if not shutil.which("valgrind"):
        return None
    proc = subprocess.run(["valgrind", "--version"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def build_report(
    records: list[dict[str, Any]],
    workloads: list[CountWorkload],
    argv: list[str],
    meta: dict[str, Any],
) -> dict[str, Any]:
    return {
        "meta": {"command": shlex.join(["scripts/bench", *argv]), **meta},
        "workloads": [
            {
                "key": w.key,
                "title": w.title,
                "protocol": w.protocol,
                "size": w.size,
                "per": w.per,
                "exchanges": w.exchanges,
                "reference": list(w.reference) if w.reference else None,
            }
            for w in workloads
        ],
        "counts": summarize_counts(records, workloads),
        "targets": check_count_targets(counts_of(records)),
    }
