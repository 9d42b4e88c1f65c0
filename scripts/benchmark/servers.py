"""Every server under test: its command line, its protocol, and what it needs to run.

The Python references are in scripts/bench_servers.py, the frameworks' servers in
scripts/bench_peers.py and the C servers in scripts/bench_*.c; aioserver runs as its
README gives it, with the bench's own interpreter.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from dataclasses import dataclass

from .common import HOST, SCRIPTS

AIOSERVER_MAX_CONNECTIONS = 20_000  # above MANY_CLIENTS, so no client is turned away
AIOSERVER_IDLE_TIMEOUT = 3600  # seconds; longer than any run, so idle clients stay
THROUGHPUT = ("a", "b", "c", "d", "e")  # the workload keys that measure requests/s


@dataclass(frozen=True)
class Server:
    name: str
    protocol: str  # "echo" or "thanks": the replies the load generator checks for
    what: str
    argv: tuple[str, ...]  # "{build}" stands for the build directory
    stop_signal: signal.Signals = signal.SIGTERM
    # "cc" for a C server, or the Python module it imports ("uvloop", "gevent", ...);
    # without it the row is skipped with a note.
    needs: str = ""
    # Several processes share both cores with the load generator rather than being
    # pinned to one; the load generator's CPU figure for them counts only the
    # supervisor, so it reads near 0.
    workers: int = 1
    only: tuple[str, ...] = ()  # the workload keys this row runs in; () for all
    family: str = "reference"  # "aioserver", "peer", "reference" or "c": the chart's colour

    def runs_in(self, workload_key: str) -> bool:
        return not self.only or workload_key in self.only


def unavailable(server: Server, cc: str | None) -> str | None:
    """Why `server` cannot run here, or None when it can."""
    if server.needs == "cc":
        return None if cc else "skipped: no C compiler (gcc, cc or clang) found"
    if server.needs and importlib.util.find_spec(server.needs) is None:
        return f"skipped: {server.needs} does not import in {sys.executable}"
    return None


# The aioserver command line, as its README gives it; run with this same interpreter.
AIOSERVER_COMMAND = (
    "-m aioserver --protocol {protocol} --loop {loop} --host {host} --port 0"
    " --max-connections {max_connections} --idle-timeout {idle_timeout}"
)
QUIET = ("--log-level", "warning", "--no-access-log")
ACCESS_LOG = ("--log-level", "info")  # the access log is on by default, at level info


def aioserver(protocol: str, loop: str, workers: int = 1, access_log: bool = False) -> Server:
    args = AIOSERVER_COMMAND.format(
        protocol=protocol,
        loop=loop,
        host=HOST,
        max_connections=AIOSERVER_MAX_CONNECTIONS,
        idle_timeout=AIOSERVER_IDLE_TIMEOUT,
    ).split()
    argv = (sys.executable, *args, *(ACCESS_LOG if access_log else QUIET))
    name = f"aioserver-{protocol}-{loop}"
    what = f"aioserver {protocol} on {'uvloop' if loop == 'uvloop' else 'the stdlib loop'}"
    needs = "uvloop" if loop == "uvloop" else ""
    if access_log:
        return Server(
            name=f"{name}-access-log",
            protocol=protocol,
            what=f"{what}, --log-level info with the access log",
            argv=argv,
            needs=needs,
            only=("e",),
            family="aioserver",
        )
    if workers > 1:
        return Server(
            name=f"{name}-{workers}workers",
            protocol=protocol,
            what=f"{what}, --workers {workers}, not pinned",
            argv=(*argv, "--workers", str(workers)),
            needs=needs,
            workers=workers,
            # Throughput rows only: RSS and stop time of a process tree are not
            # comparable with one process.
            only=("a", "e"),
            family="aioserver",
        )
    return Server(name, protocol, what, argv, needs=needs, family="aioserver")


def python_reference(name: str, protocol: str, what: str, loop: str = "") -> Server:
    loop_args = ("--loop", loop) if loop else ()
    return Server(
        name=f"{name}-{loop}" if loop else name,
        protocol=protocol,
        what=what,
        argv=(sys.executable, str(SCRIPTS / "bench_servers.py"), name, *loop_args, "--host", HOST),
        stop_signal=signal.SIGINT,  # these scripts stop on Ctrl-C, as users run them
        needs="uvloop" if loop == "uvloop" else "",
    )


def peer(name: str, protocol: str, what: str, module: str) -> Server:
    """A framework's server (scripts/bench_peers.py), in the throughput workloads."""
    return Server(
        name=name,
        protocol=protocol,
        what=what,
        argv=(sys.executable, str(SCRIPTS / "bench_peers.py"), name, "--host", HOST),
        stop_signal=signal.SIGINT,
        needs=module,
        only=THROUGHPUT,
        family="peer",
    )


def c_server(name: str, binary: str, protocol: str, what: str) -> Server:
    argv = (f"{{build}}/{binary}", HOST)
    return Server(name, protocol, what, argv, needs="cc", family="c")


SERVERS: tuple[Server, ...] = (
    aioserver("echo", "uvloop"),
    aioserver("echo", "asyncio"),
    aioserver("thanks", "uvloop"),
    aioserver("thanks", "asyncio"),
    aioserver("echo", "uvloop", workers=2),
    python_reference("start-server-echo", "echo", "obvious start_server echo", "uvloop"),
    python_reference("start-server-echo", "echo", "obvious start_server echo", "asyncio"),
    python_reference("protocol-echo", "echo", "asyncio.Protocol echo", "uvloop"),
    python_reference("threading-echo", "echo", "socketserver.ThreadingTCPServer echo"),
    python_reference("threading-thanks", "thanks", "socketserver.ThreadingTCPServer thanks"),
    peer("gevent-echo", "echo", "gevent StreamServer echo", "gevent"),
    peer("gevent-thanks", "thanks", "gevent StreamServer thanks (makefile lines)", "gevent"),
    peer("twisted-echo", "echo", "Twisted Protocol echo", "twisted"),
    peer("twisted-thanks", "thanks", "Twisted LineOnlyReceiver thanks", "twisted"),
    peer("trio-echo", "echo", "trio serve_tcp echo", "trio"),
    peer("trio-thanks", "thanks", "trio serve_tcp thanks", "trio"),
    c_server("c-pthread-echo", "bench_pthread_echo", "echo", "C, a pthread per client (seed 000)"),
    c_server(
        "c-thread-thanks", "bench_thread_thanks", "thanks", "C, a thread per client (seed 003)"
    ),
    c_server("c-epoll-echo", "bench_epoll_echo", "echo", "C, single-threaded epoll (the limit)"),
)
# The rows only --instructions runs: the access log's cost per connection.
INSTRUCTION_ONLY: tuple[Server, ...] = (aioserver("echo", "uvloop", access_log=True),)
C_SOURCES = ("bench_load", "bench_pthread_echo", "bench_thread_thanks", "bench_epoll_echo")


def by_name(name: str) -> Server:
    return next(s for s in (*SERVERS, *INSTRUCTION_ONLY) if s.name == name)
