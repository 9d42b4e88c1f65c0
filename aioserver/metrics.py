"""Prometheus metrics: `--metrics HOST:PORT` (the `metrics` extra installs
prometheus_client).

Two parts:

- `ServerMetrics`, the counters one serving process updates. A `Server` given
  one (its `metrics` option) updates it only where it counts already: at accept,
  in `forget` as a connection ends, in `count_turned_away`, and on a failed TLS
  handshake. With no metrics the cost is one attribute check at each.
- `MetricsExporter`, the HTTP listener that serves them (prometheus_client's
  `start_http_server`: a thread of its own, off the event loop). Alone, it
  serves the one process's registry. With workers, it switches prometheus_client
  to its multiprocess mode before the supervisor forks (PROMETHEUS_MULTIPROC_DIR
  names a fresh temporary directory), each worker writes its values to files
  there, the supervisor serves their sum through a `MultiProcessCollector`,
  marks each worker that exits as dead (its live gauge leaves the sum) and
  removes the directory at the end.

Label values are small fixed sets: `TURNED_AWAY_REASONS` and `CLOSED_REASONS`
(`closed_reason` maps a connection's free-text reason to one).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from typing import TYPE_CHECKING, Any

from .sockets import DEFAULT_HOST, MAX_PORT, format_address

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "CLOSED_REASONS",
    "DURATION_BUCKETS",
    "MULTIPROC_ENV",
    "TURNED_AWAY_REASONS",
    "MetricsExporter",
    "MetricsUnavailableError",
    "ServerMetrics",
    "closed_reason",
    "parse_metrics_address",
]

logger = logging.getLogger("aioserver")

# prometheus_client's multiprocess mode is on while this names a directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Why clients were turned away: over --max-connections, over
# --max-connections-per-client, refused by --allow/--deny, out of descriptors.
TURNED_AWAY_REASONS = ("max_connections", "per_client", "denied", "out_of_fds")
# Why connections closed, from their free-text reasons (see `closed_reason`).
CLOSED_REASONS = (
    "client_closed",
    "handler_returned",
    "idle",
    "reset",
    "stopped",
    "tls_failed",
    "error",
    "other",
)
# Connections live from milliseconds (connect per request) to hours.
DURATION_BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, float("inf"))

# The first words of each reason aioserver/connection.py gives, and its label.
# The first reason given is the one that counts ("server stopped, then reset:
# ..." is a stop). Any other non-empty reason is an error: socket errors
# ("ECONNABORTED: ..."), bad PROXY headers, lines over the size limit.
_REASON_PREFIXES = (
    ("closed by client", "client_closed"),
    ("handler returned", "handler_returned"),
    ("idle for ", "idle"),
    ("reset by client", "reset"),
    ("client went away", "reset"),
    ("server stopped", "stopped"),
    ("stop cancelled", "stopped"),
    ("cancelled", "stopped"),
    ("TLS handshake failed", "tls_failed"),
    ("no TLS handshake", "tls_failed"),
    ("closed during the TLS handshake", "tls_failed"),
)


def closed_reason(reason: str) -> str:
    """The label of CLOSED_REASONS for a connection's free-text reason."""
    if not reason:
        return "other"
    for prefix, label in _REASON_PREFIXES:
        if reason.startswith(prefix):
            return label
    return "error"


class MetricsUnavailableError(RuntimeError):
    """prometheus_client is not installed."""


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise MetricsUnavailableError(
            "--metrics needs prometheus_client: pip install 'aioserver-tcp[metrics]'"
        ) from None
    return prometheus_client


def parse_metrics_address(text: str) -> tuple[str, int]:
    """(host, port) from HOST:PORT, [IPv6]:PORT, :PORT or PORT (the host then
    loopback); ValueError with what was expected otherwise."""
    text = text.strip()
    expected = f"expected HOST:PORT, :PORT or PORT, not {text!r}"
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host or not rest.startswith(":"):
            raise ValueError(expected)
        port = rest[1:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"put an IPv6 address in brackets, as [::1]:9100, not {text!r}")
    else:
        host, port = "", text
    if not port.isdecimal() or not port.isascii() or any(c.isspace() for c in host):
        raise ValueError(expected)
    number = int(port)
    if number > MAX_PORT:
        raise ValueError(f"expected a port from 0 to {MAX_PORT}, not {number}")
    return host or DEFAULT_HOST, number


class ServerMetrics:
    """The metrics of one serving process, registered in `registry` (None: in
    none, as a worker's are in multiprocess mode, where the supervisor reads
    them from the files prometheus_client writes)."""

    __slots__ = (
        "_accepted",
        "_active",
        "_bytes_in",
        "_bytes_out",
        "_closed",
        "_duration",
        "_tls_failures",
        "_turned_away",
    )

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        client = _prometheus()
        self._active = client.Gauge(
            "aioserver_connections_active",
            "Connections open now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._accepted = client.Counter(
            "aioserver_connections_accepted",
            "Connections accepted (not counting the ones turned away at accept).",
            registry=registry,
        )
        turned_away = client.Counter(
            "aioserver_connections_turned_away",
            "Connections turned away, by reason.",
            ["reason"],
            registry=registry,
        )
        closed = client.Counter(
            "aioserver_connections_closed",
            "Connections closed, by reason.",
            ["reason"],
            registry=registry,
        )
        # Every label value from the start, at 0: a rate() needs the series before the event.
        self._turned_away = {reason: turned_away.labels(reason) for reason in TURNED_AWAY_REASONS}
        self._closed = {reason: closed.labels(reason) for reason in CLOSED_REASONS}
        self._bytes_in = client.Counter(
            "aioserver_received_bytes",
            "Bytes received from clients, counted as each connection closes.",
            registry=registry,
        )
        self._bytes_out = client.Counter(
            "aioserver_sent_bytes",
            "Bytes sent to clients, counted as each connection closes.",
            registry=registry,
        )
        self._duration = client.Histogram(
            "aioserver_connection_duration_seconds",
            "How long connections were open, from accept to close.",
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self._tls_failures = client.Counter(
            "aioserver_tls_handshake_failures",
            "TLS handshakes that failed, timed out or were closed by the client.",
            registry=registry,
        )

    def accepted(self) -> None:
        self._accepted.inc()
        self._active.inc()

    def unaccepted(self) -> None:
        """An accepted connection turned away once its PROXY header named the
        client: no longer open (it stays counted as accepted, and now as turned away)."""
        self._active.dec()

    def closed(self, reason: str, duration: float, bytes_in: int, bytes_out: int) -> None:
        self._active.dec()
        self._closed[closed_reason(reason)].inc()
        self._duration.observe(duration)
        if bytes_in:
            self._bytes_in.inc(bytes_in)
        if bytes_out:
            self._bytes_out.inc(bytes_out)

    def turned_away(self, reason: str, count: int = 1) -> None:
        if count:
            self._turned_away[reason].inc(count)

    def tls_failed(self) -> None:
        self._tls_failures.inc()


class MetricsExporter:
    """The HTTP listener of `--metrics` (GET /metrics), for one serving process
    or, with `workers` above 1, for a supervisor and its forked workers.

    `start()` binds (OSError if it cannot) and logs the address; `recorder()`
    gives the serving process its `ServerMetrics`: call it in the one process
    that serves, or in each worker once forked (where it also closes the
    listener the worker inherited). The supervisor calls `worker_exited(pid)`
    for each worker it reaps. `close()` stops the listener and, in multiprocess
    mode, removes the directory and puts the environment back.
    """

    def __init__(self, host: str, port: int, *, workers: int = 1) -> None:
        self.host = host
        self.port = port
        self.workers = workers
        self.directory: str | None = None
        self._httpd: Any = None
        self._thread: threading.Thread | None = None
        self._owner = os.getpid()
        self._recorder: ServerMetrics | None = None
        self._previous_env: str | None = None
        self._previous_value_class: Any = None

    @property
    def multiprocess(self) -> bool:
        return self.workers > 1

    @property
    def address(self) -> str:
        """The address served, as HOST:PORT (the real port with port 0)."""
        if self._httpd is None:
            return format_address((self.host, self.port))
        return format_address(self._httpd.server_address)

    def start(self) -> None:
        client = _prometheus()
        from prometheus_client import values

        registry = client.CollectorRegistry()
        if self.multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            self.directory = tempfile.mkdtemp(prefix="aioserver-metrics-")
            self._previous_env = os.environ.get(MULTIPROC_ENV)
            os.environ[MULTIPROC_ENV] = self.directory
            # The mode is chosen when prometheus_client is imported: choose again.
            self._previous_value_class = values.ValueClass
            values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
            MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        else:
            self._recorder = ServerMetrics(registry)
        try:
            self._httpd, self._thread = client.start_http_server(
                self.port, addr=self.host, registry=registry
            )
        except BaseException:
            self.close()
            raise
        logger.info("Serving metrics on http://%s/metrics", self.address)

    def recorder(self) -> ServerMetrics:
        """The metrics this process updates as it serves."""
        if self._recorder is None:
            if os.getpid() == self._owner:
                raise RuntimeError("with workers, each worker makes its own recorder")
            # A forked worker: the supervisor's listener is not ours to hold open.
            if self._httpd is not None:
                with contextlib.suppress(OSError):
                    self._httpd.socket.close()
                self._httpd = None
            self._recorder = ServerMetrics(None)
        return self._recorder

    def worker_exited(self, pid: int) -> None:
        """A worker is gone: its live gauges leave the sum."""
        if self.directory is not None:
            from prometheus_client import multiprocess

            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Stop serving; in multiprocess mode, remove the directory and put back
        the environment. Does nothing in a forked worker."""
        if os.getpid() != self._owner:
            return
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.directory is not None:
            from prometheus_client import values

            if self._previous_env is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = self._previous_env
            values.ValueClass = self._previous_value_class
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
