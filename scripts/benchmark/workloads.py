"""The workloads of a throughput run. Each owns how it runs, its main figure, the
columns of its table, its progress line and how its figures read; nothing else in
the bench looks at a workload's key to decide these.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .common import HOST, Result, Settings
from .procs import holding, load, reap, running_server, vm_rss, wait_exit
from .servers import Server

RSS_WARMUP_CLIENTS = 100  # connected once before the RSS baseline: one-time costs out
RSS_SETTLE_S = 0.2  # lets a server finish work it does after the last reply
STOP_LIMIT_S = 3.0  # (g) gives up waiting after this; the target is under 1 s

Row = dict[str, Any]  # one server's summary in one workload (analysis.summarize)


def fmt(value: float | None, digits: int = 0, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:,.{digits}f}"


def per_request_us(row: Row, key: str) -> str:
    """A per-request CPU time of the server in microseconds; "-" where unknown
    (a run older than the field, or a server whose CPU time cannot be read)."""
    value = row.get(key)
    return "-" if value is None or value < 0 else f"{value:.2f}"


@dataclass(frozen=True)
class Column:
    header: str
    width: int
    show: Callable[[Row], str]


RATIO = Column("ratio", 7, lambda row: fmt(row.get("ratio"), 2))
THROUGHPUT_COLUMNS = (
    Column("req/s", 10, lambda row: fmt(row["rps"])),
    Column("MB/s", 9, lambda row: fmt(row["mbps"], 1)),
    Column("p50 ms", 8, lambda row: fmt(row["p50_us"], 2, 1000)),
    Column("p99 ms", 8, lambda row: fmt(row["p99_us"], 2, 1000)),
    Column("srv CPU", 8, lambda row: f"{row['server_cpu']:.0%}"),
    Column("load CPU", 9, lambda row: f"{row['loadgen_cpu']:.0%}"),
    # The server's CPU time per request, user space and kernel (utime and stime).
    Column("srv user us", 12, lambda row: per_request_us(row, "server_user_us")),
    Column("srv sys us", 11, lambda row: per_request_us(row, "server_sys_us")),
    RATIO,
)


@dataclass(frozen=True)
class Workload:
    key: str
    name: str
    protocol: str
    metric: str  # the figure the chart, the ratio and the targets use
    reference: str  # a server name, "a" for the same server in (a), "" for no ratio
    title: str  # {active} and {clients} stand for the counts of this run
    unit: str  # the chart's axis
    higher_is_better: bool = True
    chart_scale: float = 1.0  # the metric is divided by this on the chart
    columns: tuple[Column, ...] = field(default=THROUGHPUT_COLUMNS)

    @property
    def lifetime(self) -> str:
        """Workloads with the same lifetime are measured in one server lifetime."""
        return self.key

    def run(self, settings: Settings, server: Server) -> Result:
        raise NotImplementedError

    def progress(self, result: Result) -> str:
        return (
            f"{result['rps']:>9,.0f} req/s {result['mbps']:>8.1f} MB/s"
            f"  p99 {result['p99_us'] / 1e3:.2f} ms"
            f"  CPU: server {result['server_cpu']:.0%}, load {result['loadgen_cpu']:.0%}"
        )

    def show(self, value: float) -> str:
        """A value of the main figure, as a target line prints it."""
        return f"{value:,.0f}"

    @property
    def figure(self) -> str:
        """The main figure's name, for a target on its value."""
        return self.metric

    def ratio_to(self) -> str:
        return "the same server in (a)" if self.reference == "a" else self.reference


def rr_options(settings: Settings, size: int) -> dict[str, float | int]:
    return {
        "size": size,
        "conns": settings.active,
        "duration": settings.duration,
        "warmup": settings.warmup,
    }


@dataclass(frozen=True)
class RequestReply(Workload):
    """Request-reply of `size`-byte lines on the active connections, after `idle`
    more connect and stay idle (all the clients but the active ones)."""

    size: int = 1024
    many_idle: bool = False
    mode: str = "rr"  # the load generator's mode; "connect": a connection per request

    def run(self, settings: Settings, server: Server) -> Result:
        options = rr_options(settings, self.size)
        if self.many_idle:
            options["idle"] = max(settings.clients - settings.active, 0)
        with running_server(settings.build, server, settings.server_cpu) as running:
            return load(settings, self.mode, running, **options)


@dataclass(frozen=True)
class HeldClients(Workload):
    """(f) RSS per idle connection and (g) time to stop, from one server lifetime,
    since connecting 10,000 clients is the slow part: the clients connect, VmRSS is
    read, then the server gets its stop signal with every client still connected,
    and the time until the process exits counts."""

    @property
    def lifetime(self) -> str:
        return "held-clients"

    def run(self, settings: Settings, server: Server) -> Result:
        with running_server(settings.build, server, settings.server_cpu) as running:
            with holding(settings, running, min(RSS_WARMUP_CLIENTS, settings.clients)):
                pass
            time.sleep(RSS_SETTLE_S)
            before = vm_rss(running.pid)
            with holding(settings, running, settings.clients) as held:
                time.sleep(RSS_SETTLE_S)
                after = vm_rss(running.pid)
                start = time.perf_counter()
                running.proc.send_signal(server.stop_signal)
                exited = wait_exit(running.proc, STOP_LIMIT_S)
                stop_s = time.perf_counter() - start
                if not exited:
                    reap(running.proc)  # SIGKILL: how long it would take is not measured
            return {
                "address": f"{HOST}:{running.port}",
                "clients": settings.clients,
                "connect_s": held["connect_s"],
                "rss_before": before,
                "rss_after": after,
                "rss_per_conn": (after - before) / settings.clients,
                "signal": server.stop_signal.name,
                "stop_s": stop_s if exited else STOP_LIMIT_S,
                "timed_out": not exited,
                "exit_code": running.proc.returncode,
                "closed_by_server": held.get("closed_by_server"),
            }

    def progress(self, result: Result) -> str:
        stop = f"{'>' if result['timed_out'] else ''}{result['stop_s'] * 1000:.0f} ms"
        return f"{result['rss_per_conn'] / 1024:.2f} KiB per connection, stop {stop}"


def _mib(key: str) -> Callable[[Row], str]:
    return lambda row: f"{fmt(row[key], 1, 2**20)} MiB"


@dataclass(frozen=True)
class IdleRss(HeldClients):
    columns: tuple[Column, ...] = (
        Column("RSS before", 12, _mib("rss_before")),
        Column("RSS after", 12, _mib("rss_after")),
        Column("per conn", 12, lambda row: f"{fmt(row['rss_per_conn'], 2, 1024)} KiB"),
        RATIO,
    )

    def show(self, value: float) -> str:
        return f"{value / 1024:.2f} KiB"

    @property
    def figure(self) -> str:
        return "RSS per idle connection"


def _stop(row: Row) -> str:
    return f"{'>' if row.get('timed_out') else ''}{row['stop_s'] * 1000:,.0f} ms"


@dataclass(frozen=True)
class StopTime(HeldClients):
    columns: tuple[Column, ...] = (
        Column("stop", 10, _stop),
        Column("signal", 9, lambda row: str(row.get("signal", "-"))),
        Column("exit", 6, lambda row: fmt(row.get("exit_code"))),
        Column("closed", 9, lambda row: fmt(row.get("closed_by_server"))),
    )

    def show(self, value: float) -> str:
        return f"{value * 1000:,.0f} ms"

    @property
    def figure(self) -> str:
        return "stop time"


WORKLOADS: tuple[Workload, ...] = (
    RequestReply(
        key="a",
        name="echo-1k",
        protocol="echo",
        metric="rps",
        reference="c-epoll-echo",
        title="echo, 1 KiB request-reply, {active} connections",
        unit="requests/s",
        size=1024,
    ),
    RequestReply(
        key="b",
        name="echo-64k",
        protocol="echo",
        metric="mbps",
        reference="c-epoll-echo",
        title="echo, 64 KiB request-reply, {active} connections",
        unit="MB/s",
        size=64 * 1024,
    ),
    RequestReply(
        key="c",
        name="thanks-64",
        protocol="thanks",
        metric="rps",
        reference="c-thread-thanks",
        title="thanks, 64-byte lines, request-reply, {active} connections",
        unit="requests/s",
        size=64,
    ),
    RequestReply(
        key="d",
        name="many-clients",
        protocol="echo",
        metric="rps",
        reference="a",
        title="as (a), with {clients} connected clients of which {active} are active",
        unit="requests/s",
        size=1024,
        many_idle=True,
    ),
    RequestReply(
        key="e",
        name="connect-per-request",
        protocol="echo",
        metric="rps",
        reference="c-epoll-echo",
        title="echo, a new connection per 64-byte request, {active} at a time",
        unit="requests/s",
        size=64,
        mode="connect",
    ),
    IdleRss(
        key="f",
        name="idle-rss",
        protocol="echo",
        metric="rss_per_conn",
        reference="start-server-echo-uvloop",
        title="server RSS per idle connection, {clients} connected clients",
        unit="KiB",
        higher_is_better=False,
        chart_scale=1024.0,
    ),
    StopTime(
        key="g",
        name="stop-time",
        protocol="echo",
        metric="stop_s",
        reference="",
        title="time from the stop signal to exit, {clients} connected clients",
        unit="ms",
        higher_is_better=False,
        chart_scale=0.001,
    ),
)


def by_key(key: str) -> Workload:
    return next(w for w in WORKLOADS if w.key == key)
