"""The server: what is server-wide. Listening sockets, the registry of
connections, limits, the idle sweep, and the stop.

Every connection is accepted by `asyncio.start_server`, whose callback makes
the `Connection` that owns its whole life (aioserver/connection.py) and returns
the coroutine start_server runs for it. The server only registers connections,
sweeps them for idleness and asks them to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import ssl as ssl_module
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, cast

from .connection import (
    Connection,
    Ending,
    Phase,
    _peername,
    connection_class,
    describe_subject,
    tls_protocol_for,
)
from .logs import LogSite
from .metrics import ServerMetrics
from .overload import AcceptGuard, TurnedAway, free_fds
from .protocols import (
    DEFAULT_MAX_MESSAGE_SIZE,
    READ_CHUNK,
    EchoRule,
    Handler,
    ThanksRule,
    busy_reply,
    rule_for,
)
from .proxy import DEFAULT_PROXY_ALLOW, Network, is_trusted, parse_networks
from .sockets import (
    DEFAULT_BACKLOG,
    DEFAULT_HOST,
    DEFAULT_PORT,
    MAX_BACKLOG,
    bind_sockets_async,
    format_address,
)

__all__ = [
    "ACCESS_FIELDS",
    "ACCESS_FORMAT",
    "DEFAULT_BACKLOG",
    "DEFAULT_HOST",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PORT",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "MAX_CONNECTIONS_LIMIT",
    "MAX_MESSAGE_SIZE_LIMIT",
    "MAX_SECONDS",
    "Server",
    "Stats",
    "format_address",
    "serve",
]

logger = logging.getLogger("aioserver")
access_logger = logging.getLogger("aioserver.access")
# One access-log line per connection closed; its arguments are also the
# record's fields of these names (as extra= would set them), for structured logs.
ACCESS_FORMAT = "%s closed after %.3f s, %d bytes in, %d bytes out: %s"
ACCESS_FIELDS = ("peer", "duration", "bytes_in", "bytes_out", "reason")
# The line of a connection whose client presented a certificate (mutual TLS).
ACCESS_CERT_FORMAT = ACCESS_FORMAT + ", client certificate %s"
ACCESS_CERT_FIELDS = (*ACCESS_FIELDS, "client_cert")

# Well above what one process on one core serves with low latency. Each
# connection may make the server hold its write buffer's high-water mark plus
# the replies to one read, and the kernel its socket buffers: README's "Limits
# and guarantees" gives the figures measured.
DEFAULT_MAX_CONNECTIONS = 10_000
# Linux's default fs.nr_open: no process can hold more descriptors than this.
MAX_CONNECTIONS_LIMIT = 1_048_576
# A line is held whole in memory until it is answered.
MAX_MESSAGE_SIZE_LIMIT = 1 << 30
# About 11.6 days: a longer timeout means never (the idle timeout takes None).
MAX_SECONDS = 1_000_000.0
# Five minutes: far longer than any pause of a live client, short enough that
# abandoned connections do not pile up.
DEFAULT_IDLE_TIMEOUT = 300.0
# Time for busy clients to get the replies already owed to them at a stop; well
# inside the 90 s a service manager such as systemd waits before killing.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
# The PROXY header and the TLS handshake together, from the accept (and never
# longer than idle_timeout): a real handshake takes a few round trips, while
# asyncio's own 60 s would let unfinished handshakes hold descriptors six times
# as long.
HANDSHAKE_TIMEOUT = 10.0
# A handler that ignores its cancellation at a stop is abandoned this long after
# shutdown_timeout, when its connection has been reset already.
HANDLER_STOP_MARGIN = 1.0
# Idle connections are looked for this many times per idle_timeout (and at least
# once a second), so one is closed at most 10% late.
IDLE_SWEEPS_PER_TIMEOUT = 10
# ...but not more often than this, whatever the timeout: each sweep visits every
# connection.
MIN_SWEEP_INTERVAL = 0.01
# With idle_timeout off, a client that takes none of the replies owed to it
# after its EOF is still reset after this long without progress.
FLUSH_TIMEOUT = DEFAULT_IDLE_TIMEOUT
# Clients told "server busy" and waited for (see Connection.turn_away) at once
# at most; past that they are just closed, so a flood cannot hold descriptors.
MAX_TURNING_AWAY = 1024


@dataclass(frozen=True)
class Stats:
    """Counters of a server since it started."""

    active: int
    """Connections open now."""
    total: int
    """Connections accepted (not counting the ones turned away)."""
    rejected: int
    """Connections turned away: `max_connections` were open, (on asyncio's own
    loop) the process was out of file descriptors, `allow`/`deny` refused the
    client, or it had `max_connections_per_client` open already."""
    bytes_in: int
    bytes_out: int


class Server:
    """A TCP (or Unix socket) server that serves each client with one task.

    `handler` is a coroutine function with the `asyncio.start_server` signature
    `async (reader, writer) -> None`, such as `aioserver.echo` or
    `aioserver.thanks`. All options are keyword-only:

    - host: one address or several (IPv6 included); default 127.0.0.1.
    - port: default 1234; 0 lets the kernel pick, and `.port` tells which.
    - unix: a Unix socket path to listen on instead of host and port. A stale
      socket file left by a dead server is replaced; any other file is an error.
    - backlog, reuse_port: as for `asyncio.start_server`.
    - ssl: a server TLS context. Connections are accepted in clear and upgraded
      inside their tracked life: an unfinished handshake counts toward
      max_connections and is reset after HANDSHAKE_TIMEOUT (or idle_timeout,
      if shorter); a failed one leaves one access-log line with the reason.
      For mutual TLS, give a context with `verify_mode` CERT_REQUIRED (or
      CERT_OPTIONAL) and the CAs loaded: a client without a valid certificate
      fails its handshake, the handler finds the certificate in
      `writer.get_extra_info("peercert")`, and the access-log line names its
      subject (", client certificate CN=..."; field client_cert).
    - max_connections: a client over this is turned away at once (the thanks
      protocol first tells it "Error: server busy", which reaches it even if it
      had sent first); the others carry on. Out of file descriptors, new
      clients are closed at once too, on both loops; either way one warning is
      logged per burst.
    - idle_timeout: seconds a client may go without progress in either
      direction (sending, or taking some of its replies) before it is closed,
      or reset if replies were still owed to it; None for never.
    - max_message_size: the longest line the thanks protocol accepts, and the
      stream reader limit a user's handler gets.
    - shutdown_timeout: at a stop, how long a client is given to take the
      replies already owed to it before its connection is reset.
    - proxy_protocol: every connection must start with a PROXY protocol v1 or
      v2 header (as HAProxy's send-proxy sends), before TLS if both are on;
      the client it names is the peer in logs and in the handler's
      `writer.get_extra_info("peername")`, and the handler gets only the bytes
      after it. A connection without a valid header, or whose header names a
      non-IP client, is closed with one warning.
    - proxy_allow: with proxy_protocol, the addresses (CIDRs; "*" for any)
      allowed to send a header; a header from elsewhere closes the connection
      with one warning. Default: loopback only.
    - allow, deny: who may connect, as CIDRs or addresses ("*" for any), by
      client address: the socket's, or with proxy_protocol the client its
      PROXY header names (checked once the header is read; a header naming no
      client, such as a balancer's health check, is the balancer's own, let in
      by proxy_allow). A client in `deny` is refused, as is one outside
      `allow` when `allow` is given: deny wins. Default: everyone. Clients of a
      Unix socket have no address and are not checked.
    - max_connections_per_client: a client address with this many connections
      open has further ones turned away (None, the default: no limit).
      A client refused by allow/deny is just closed; one over its limit is
      treated as one over max_connections. Either way it counts in
      `stats.rejected`, and one warning is logged per burst of each.
    - sockets: listening sockets bound already (as a supervisor hands its
      worker processes) to serve on instead of host, port and unix.
    - access_log: log one line per connection closed, at INFO on the
      "aioserver.access" logger, with peer, duration (seconds), bytes_in,
      bytes_out and reason also set on the record, as extra= sets them
      (default True). Whether that logger is enabled for INFO, and which
      handlers it reaches, is looked at once, at start (see
      `aioserver.logs.LogSite`). The call is made on the event loop: with the
      handlers behind the queue of `aioserver.logs.setup_logging`, as the
      command has them, it never waits on a slow sink.
    - metrics: an `aioserver.metrics.ServerMetrics` to update (connections
      accepted, open, turned away and closed by reason, bytes, durations, TLS
      handshake failures), as `--metrics` serves them; default None: none.

    Stopping is cancellation: cancelling `serve_forever()`, leaving `serve()`
    and calling `stop()` all take the same path (see `stop`).
    """

    def __init__(
        self,
        handler: Handler,
        *,
        host: str | Sequence[str] | None = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        unix: str | os.PathLike[str] | None = None,
        backlog: int = DEFAULT_BACKLOG,
        reuse_port: bool = False,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        ssl: ssl_module.SSLContext | None = None,
        proxy_protocol: bool = False,
        proxy_allow: Sequence[str] = DEFAULT_PROXY_ALLOW,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        max_connections_per_client: int | None = None,
        sockets: Sequence[socket.socket] = (),
        access_log: bool = True,
        metrics: ServerMetrics | None = None,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be a coroutine function, not {handler!r}")
        _check_range("port", port, 0, 65535)
        _check_range("backlog", backlog, 1, MAX_BACKLOG)
        _check_range("max_connections", max_connections, 1, MAX_CONNECTIONS_LIMIT)
        _check_range("max_message_size", max_message_size, 1, MAX_MESSAGE_SIZE_LIMIT)
        if idle_timeout is not None and not 0 < idle_timeout <= MAX_SECONDS:
            raise ValueError(
                f"idle_timeout must be positive and at most {MAX_SECONDS:g} s,"
                " or None for no timeout"
            )
        if not 0 <= shutdown_timeout <= MAX_SECONDS:
            raise ValueError(f"shutdown_timeout must be between 0 and {MAX_SECONDS:g} s")
        if max_connections_per_client is not None:
            _check_range(
                "max_connections_per_client", max_connections_per_client, 1, MAX_CONNECTIONS_LIMIT
            )
        if isinstance(proxy_allow, str):
            proxy_allow = [proxy_allow]
        allow = [allow] if isinstance(allow, str) else list(allow)
        deny = [deny] if isinstance(deny, str) else list(deny)
        self.handler = handler
        self.hosts = [host] if isinstance(host, str) or host is None else list(host)
        self.requested_port = port
        self.unix = os.fspath(unix) if unix is not None else None
        self.backlog = backlog
        self.reuse_port = reuse_port
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_message_size = max_message_size
        self.shutdown_timeout = shutdown_timeout
        self.ssl = ssl
        self.proxy_protocol = proxy_protocol
        self.proxy_trusted = parse_networks(proxy_allow)
        # Access control. None: every client (no allow given, or "*"); for
        # deny, None denies every client and () none.
        self.allow: tuple[Network, ...] | None = parse_networks(allow) if allow else None
        self.deny: tuple[Network, ...] | None = parse_networks(deny)
        self.max_connections_per_client = max_connections_per_client
        # Whether clients are checked at all: a connection read this once,
        # at accept or (with proxy_protocol) once its header is read.
        self.checks_clients = bool(allow or deny) or max_connections_per_client is not None
        self._checks_at_accept = self.checks_clients and not proxy_protocol
        # Connections open per client address, and each counted connection's address.
        self._per_client: dict[str, int] = {}
        self._client_of: dict[Connection, str] = {}
        # With mutual TLS and the access log: the subject of each client's certificate.
        self.logs_client_certs = False
        self._client_certs: dict[Connection, str] = {}
        self.listen_sockets = list(sockets)
        self.access_log = access_log
        self.metrics = metrics
        # What every connection reads (see aioserver/connection.py).
        self.handshake_timeout = min(HANDSHAKE_TIMEOUT, idle_timeout or math.inf)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.tls_protocol: Any = None
        self.logs_peers = False
        self._access_log: LogSite | None = None
        self._access_log_cert: LogSite | None = None
        # Set at start on asyncio's own loop (see SharedBufferReads).
        self.read_buffer = memoryview(b"")
        # The class of every connection: set at start, once the loop is known;
        # and echo's rule, which keeps no state, for every connection.
        self._connection_class: type[Connection] = Connection
        self._shared_rule: EchoRule | None = None
        self.stopping = False
        # The registry: connections admitted, and those being turned away.
        self._connections: set[Connection] = set()
        self._turning_away: set[Connection] = set()
        self._servers: list[asyncio.Server] = []
        self._total = self._rejected = self._closed_in = self._closed_out = 0
        self._turned_away = TurnedAway()
        # Clients refused by allow/deny, and over max_connections_per_client:
        # a burst of their own each.
        self._denied = TurnedAway()
        self._over_client_limit = TurnedAway()
        self._accept_guard: AcceptGuard | None = None
        # Connections the descriptors free at start allow (None where unknown).
        self._fd_room: int | None = None
        self._all_ended = asyncio.Event()
        self._stopped = asyncio.Event()
        self._idle_sweep: asyncio.TimerHandle | None = None
        self._sweep_interval = 1.0
        self._sweeps_to_idle: int | None = None
        self._sweeps_to_flush = 0

    # Public surface.

    @property
    def sockets(self) -> list[socket.socket]:
        """Every listening socket: the ones given, or those bound at start; none
        after a stop."""
        if self.stopping:
            return []
        if not self._servers:
            return list(self.listen_sockets)
        return [sock for server in self._servers for sock in server.sockets]

    @property
    def addresses(self) -> list[str]:
        """Every bound address, formatted as `format_address` does."""
        return [format_address(sock.getsockname()) for sock in self.sockets]

    @property
    def port(self) -> int | None:
        """The first bound TCP port (the real one when port=0), None on a Unix socket."""
        for sock in self.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return int(sock.getsockname()[1])
        return None

    def tls_context(self, connection: Connection) -> ssl_module.SSLContext:
        """The TLS context of `connection`'s handshake: `ssl`, for every connection.
        A subclass may choose per connection (the test server's fail_tls fault does)."""
        assert self.ssl is not None
        return self.ssl

    @property
    def stats(self) -> Stats:
        """Counters; `bytes_out` counts what was handed to the kernel."""
        live = self._connections
        return Stats(
            active=len(live),
            total=self._total,
            rejected=self._rejected,
            bytes_in=self._closed_in + sum(c.bytes_in for c in live),
            bytes_out=self._closed_out + sum(c.sent() for c in live),
        )

    def is_serving(self) -> bool:
        """True from a successful start until a stop begins."""
        return bool(self._servers) and not self.stopping

    async def start(self) -> None:
        """Bind and start accepting. On failure (e.g. address in use) raise OSError."""
        if self._servers or self.stopping:
            raise RuntimeError("a Server starts once")
        self.loop = asyncio.get_running_loop()
        if isinstance(self.loop, asyncio.SelectorEventLoop):
            self.read_buffer = memoryview(bytearray(READ_CHUNK))
        # Who answers decides the class of every connection.
        rule = rule_for(self.handler, self.max_message_size)
        if rule is None:
            answers = "handler"
        elif isinstance(rule, EchoRule):
            answers = "echo"
        else:
            answers = "thanks" if isinstance(rule, ThanksRule) else "rule"
        self._connection_class = connection_class(answers, bool(self.read_buffer))
        self._shared_rule = rule if isinstance(rule, EchoRule) else None
        # TLS is a phase of each connection (see Connection.begin), not the listener's.
        options: dict[str, Any] = {"limit": self.max_message_size, "backlog": self.backlog}
        bound = []
        sockets = self.listen_sockets
        try:
            if not sockets:
                sockets = bound = await bind_sockets_async(
                    host=self.hosts,
                    port=self.requested_port,
                    unix=self.unix,
                    backlog=self.backlog,
                    reuse_port=self.reuse_port,
                )
            for sock in sockets:
                if sock.family == socket.AF_UNIX:
                    server = await asyncio.start_unix_server(self._accept, sock=sock, **options)
                else:
                    server = await asyncio.start_server(self._accept, sock=sock, **options)
                self._servers.append(server)
        except BaseException:
            for server in self._servers:
                server.close()
            self._servers.clear()
            for sock in bound:
                sock.close()
            raise
        for address in self.addresses:
            logger.info("Listening on %s", address)
        if self.ssl is not None:
            self.tls_protocol = tls_protocol_for(self.loop)
        self.logs_peers = self.access_log and access_logger.isEnabledFor(logging.INFO)
        if self.logs_peers:
            # Made here, on the loop's thread, once: see LogSite.
            self._access_log = LogSite(
                access_logger, logging.INFO, ACCESS_FORMAT, ACCESS_FIELDS, "forget"
            )
            if self.ssl is not None and self.ssl.verify_mode != ssl_module.CERT_NONE:
                self.logs_client_certs = True
                self._access_log_cert = LogSite(
                    access_logger, logging.INFO, ACCESS_CERT_FORMAT, ACCESS_CERT_FIELDS, "forget"
                )
        if isinstance(self.loop, asyncio.SelectorEventLoop):
            self._accept_guard = AcceptGuard(self)
        self._fd_room = free_fds()
        interval = min(
            max((self.idle_timeout or FLUSH_TIMEOUT) / IDLE_SWEEPS_PER_TIMEOUT, MIN_SWEEP_INTERVAL),
            1.0,
        )
        self._sweep_interval = interval
        if self.idle_timeout is not None:
            self._sweeps_to_idle = math.ceil(self.idle_timeout / interval)
        self._sweeps_to_flush = math.ceil((self.idle_timeout or FLUSH_TIMEOUT) / interval)
        self._schedule_idle_sweep()

    async def serve_forever(self) -> None:
        """Start if needed, then serve until cancelled or stopped.

        Cancelling the task running this stops the server (as `stop()` does)
        before the cancellation propagates.
        """
        if not self._servers:
            await self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop: close the listeners and end every connection, within
        shutdown_timeout (plus HANDLER_STOP_MARGIN for a stubborn handler).

        Each user's handler is cancelled at its current await; each connection
        then sends what was written to it, half-closes, and waits for a client
        still sending to close too (or fall silent for LINGER_TIMEOUT). What is
        not done by shutdown_timeout is reset. A handler still running
        HANDLER_STOP_MARGIN later (it swallowed the cancellation, or sleeps in
        its cleanup) is abandoned with a warning naming it. A client accepted
        less than FRESH_GRACE before the stop that has not sent yet, and a
        handler whose client was active lately, get FRESH_GRACE more, so that
        a request on its way is answered. A stop with only idle clients
        returns at once. Calling it again, or while it runs, just waits for the
        first call. Cancelling a stop resets every connection at once and
        re-raises the cancellation.
        """
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        began = self.loop.time() if self.loop is not None else 0.0
        if self._idle_sweep is not None:
            self._idle_sweep.cancel()
        for server in self._servers:
            server.close()
        handlers = {
            c.task: c for c in self._connections if c.rule is None and c.task and not c.task.done()
        }
        for connection in [*self._connections, *self._turning_away]:
            connection.shutdown()
        try:
            await self._wait_for_connections()
            if handlers:
                await self._wait_for_handlers(handlers, began)
            # uvloop closes listening handles one loop iteration after close(),
            # and a client accepted just before is served (see _accept).
            await asyncio.sleep(0)
            await self._wait_for_connections()
        except asyncio.CancelledError:
            for connection in [*self._connections, *self._turning_away]:
                connection.end(Ending.RESET, "stop cancelled")
            raise
        finally:
            if self.unix is not None and self._servers:
                with contextlib.suppress(OSError):
                    os.unlink(self.unix)
            if self._accept_guard is not None:
                self._accept_guard.remove()
            for burst in (self._turned_away, self._denied, self._over_client_limit):
                burst.end(final=True)
            self._servers.clear()
            self._stopped.set()
            logger.info("Stopped")

    async def _wait_for_connections(self) -> None:
        while self._connections or self._turning_away:
            self._all_ended.clear()
            await self._all_ended.wait()

    async def _wait_for_handlers(
        self, handlers: dict[asyncio.Task[None], Connection], began: float
    ) -> None:
        limit = began + self.shutdown_timeout + HANDLER_STOP_MARGIN - self.loop.time()
        _done, pending = await asyncio.wait(handlers, timeout=max(limit, 0))
        for task in pending:
            logger.warning(
                "Abandoned handler %s for %s: still running %.1f s after the stop began",
                getattr(self.handler, "__qualname__", repr(self.handler)),
                handlers[task].describe_peer(),
                self.loop.time() - began,
            )

    # Idleness: one timer for the whole server rather than one per connection,
    # which would cost about 500 bytes each. Each sweep counts one more quiet
    # interval for every serving or flushing connection, and activity resets the
    # count, so a client is ended between idle_timeout and idle_timeout + one
    # interval after its last sign of life. A connection quiet for a whole
    # interval that has replies out is asked whether the client took any.

    def _schedule_idle_sweep(self) -> None:
        self._idle_sweep = self.loop.call_later(self._sweep_interval, self._sweep_idle)

    def _sweep_idle(self) -> None:
        serving_limit = self._sweeps_to_idle
        flushing_limit = self._sweeps_to_flush
        serving, flushing = Phase.SERVING, Phase.FLUSHING
        for connection in list(self._connections):
            phase = connection.phase
            if phase is serving:
                limit = serving_limit
            elif phase is flushing:
                limit = flushing_limit
            else:
                continue
            quiet = connection.quiet = connection.quiet + 1
            if limit is not None and quiet > limit:
                connection.idle_check(limit * self._sweep_interval)
            elif quiet > 1 and connection.bytes_out != connection.taken:
                connection.progress_check()
        self._schedule_idle_sweep()

    # One connection.

    def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Coroutine[Any, Any, None] | None:
        # Called by start_server's protocol inside connection_made, before any data
        # arrives, so the connection sees every byte from the first.
        if self.stopping and self._stopped.is_set():
            writer.transport.abort()
            return None
        if len(self._connections) >= self.max_connections:
            self._turn_away(writer, f"max_connections={self.max_connections} reached")
            return None
        rule = self._shared_rule or rule_for(self.handler, self.max_message_size)
        connection = self._connection_class(self, writer, rule, reader if rule is None else None)
        if self._checks_at_accept:
            transport = connection.raw
            refusal = self._admit(connection, _peername(transport), transport)
            if refusal is not None:
                self._turn_away(writer, *refusal)
                return None
        self._connections.add(connection)
        self._total += 1
        if self.metrics is not None:
            self.metrics.accepted()
        connection.begin()
        if self.stopping:
            # Accepted by the loop just before the listener closed: served for
            # FRESH_GRACE, as any client that connected just as the stop began.
            connection.shutdown()
        if len(self._connections) == self._fd_room:
            # The next client finds no descriptor: the loop closes it unseen
            # (uvloop) or the accept guard turns it away (asyncio).
            self._turned_away.add(
                self.loop, 0, f"out of file descriptors at {self._fd_room} connections"
            )
        return connection.run()

    def forget(self, connection: Connection) -> None:
        """Called by a connection once its transport is gone."""
        if connection not in self._connections:
            self._turning_away.discard(connection)
        else:
            self._connections.discard(connection)
            self._closed_in += connection.bytes_in
            self._closed_out += connection.bytes_out
            if self.metrics is not None:
                self.metrics.closed(
                    connection.reason,
                    self.loop.time() - connection.started,
                    connection.bytes_in,
                    connection.bytes_out,
                )
            if self._client_of:
                self._uncount(connection)
            if self._access_log is not None:
                line = (
                    connection.describe_peer(),
                    self.loop.time() - connection.started,
                    connection.bytes_in,
                    connection.bytes_out,
                    connection.reason or "closed",
                )
                subject = self._client_certs.pop(connection, None) if self._client_certs else None
                if subject is None:
                    self._access_log.log(line)
                else:
                    cast(LogSite, self._access_log_cert).log((*line, subject))
        if self.stopping and not self._connections and not self._turning_away:
            self._all_ended.set()

    def count_turned_away(
        self,
        count: int,
        reason: str,
        burst: TurnedAway | None = None,
        kind: str = "max_connections",
    ) -> None:
        """Count clients turned away, in the burst's log lines too (by default
        the burst of clients over max_connections or out of descriptors).
        `kind` is the metrics' label when no burst is given: max_connections or
        out_of_fds (see aioserver.metrics.TURNED_AWAY_REASONS)."""
        self._rejected += count
        if self.metrics is not None:
            if burst is self._denied:
                kind = "denied"
            elif burst is self._over_client_limit:
                kind = "per_client"
            self.metrics.turned_away(kind, count)
        (burst or self._turned_away).add(self.loop, count, reason)

    def _busy_line(self, tell: bool) -> bytes:
        # Nothing in clear on a TLS port; and past MAX_TURNING_AWAY, no waiting.
        if not tell or self.ssl is not None or len(self._turning_away) >= MAX_TURNING_AWAY:
            return b""
        return busy_reply(self.handler)

    def _turn_away(
        self,
        writer: asyncio.StreamWriter,
        reason: str,
        tell: bool = True,
        burst: TurnedAway | None = None,
    ) -> None:
        self.count_turned_away(1, reason, burst)
        busy = self._busy_line(tell)
        connection = Connection(self, writer, None)
        if busy:
            self._turning_away.add(connection)
        connection.turn_away(reason, busy)

    # Access control: allow, deny and max_connections_per_client.

    def admit_proxied(self, connection: Connection, peer: Any) -> bool:
        """Called by a connection whose PROXY header named its client `peer`:
        count it under that client, or turn it away (False) as `_accept` does."""
        refusal = self._admit(connection, peer, connection.raw)
        if refusal is None:
            return True
        reason, tell, burst = refusal
        # Registered at accept: now one turned away instead.
        self._connections.discard(connection)
        self._total -= 1
        if self.metrics is not None:
            self.metrics.unaccepted()
        self.count_turned_away(1, reason, burst)
        busy = self._busy_line(tell)
        if busy:
            self._turning_away.add(connection)
        connection.turn_away(reason, busy)
        return False

    def _admit(
        self, connection: Connection, peer: Any, transport: asyncio.BaseTransport
    ) -> tuple[str, bool, TurnedAway] | None:
        """None, with `connection` counted under its client, if the client at
        `peer` may connect; else why not, whether to tell it, and its burst."""
        if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
            if not isinstance(transport.get_extra_info("sockname"), tuple):
                return None  # a Unix socket's client: no address to check
            return "client address unknown", False, self._denied
        deny = self.deny
        allow = self.allow
        host = peer[0].partition("%")[0]
        if (deny is None or (deny and is_trusted(peer, deny))) or (
            allow is not None and not is_trusted(peer, allow)
        ):
            return f"client {host} refused by allow/deny", False, self._denied
        limit = self.max_connections_per_client
        if limit is not None:
            count = self._per_client.get(host, 0)
            if count >= limit:
                reason = f"max_connections_per_client={limit} reached by {host}"
                return reason, True, self._over_client_limit
            self._per_client[host] = count + 1
            self._client_of[connection] = host
        return None

    def _uncount(self, connection: Connection) -> None:
        host = self._client_of.pop(connection, None)
        if host is not None:
            left = self._per_client[host] - 1
            if left:
                self._per_client[host] = left
            else:
                del self._per_client[host]

    def note_client_cert(self, connection: Connection) -> None:
        """Called by a connection once its TLS handshake is done, with
        `logs_client_certs` on: keep its client certificate's subject for
        the access log."""
        subject = describe_subject(connection.transport.get_extra_info("peercert"))
        if subject is not None:
            self._client_certs[connection] = subject


def _check_range(name: str, value: int, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be an integer {bound}, not {value!r}")


@contextlib.asynccontextmanager
async def serve(
    handler: Handler,
    *,
    host: str | Sequence[str] | None = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    **options: Any,
) -> AsyncIterator[Server]:
    """Start a Server for the block, and stop it when the block is left.

    The server is already accepting when the block starts: `server.port` is
    the real port even with port=0. Leaving the block, normally, by an
    exception or by cancellation, runs `stop()`.
    """
    server = Server(handler, host=host, port=port, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
