"""The server: listen, serve each client in its own task, enforce limits, stop.

Every connection is opened by `asyncio.start_server`, whose callback puts a
`_Connection` between the transport and the protocol and returns the coroutine
that owns the connection until it ends. Tracking, limits, counting, logging and
closing live here, once, for every handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import socket
import ssl as ssl_module
import stat
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, cast

from .protocols import (
    DEFAULT_MAX_MESSAGE_SIZE,
    READ_CHUNK,
    EchoRule,
    Handler,
    MessageTooLong,
    ReplyRule,
    busy_reply,
    rule_for,
)
from .proxy import ProxyHeaderError, split_header

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_HOST",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PORT",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "Server",
    "Stats",
    "format_address",
    "serve",
]

logger = logging.getLogger("aioserver")
access_logger = logging.getLogger("aioserver.access")

# Loopback: a service is never exposed to the network unless asked to be.
DEFAULT_HOST = "127.0.0.1"
# The fixed port of the C++ design this project grows from.
DEFAULT_PORT = 1234
# As uvicorn: enough for a burst of thousands of connects; the kernel caps it at
# net.core.somaxconn anyway.
DEFAULT_BACKLOG = 2048
# About 10 KiB of kernel and server memory each at worst, so 100 MiB in all, and
# well above what one process on one core serves with low latency.
DEFAULT_MAX_CONNECTIONS = 10_000
# Five minutes: far longer than any pause of a live client, short enough that
# abandoned connections do not pile up.
DEFAULT_IDLE_TIMEOUT = 300.0
# Time for busy clients to get the replies already owed to them at a stop; well
# inside the 90 s a service manager such as systemd waits before killing.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
# Idle connections are looked for this many times per idle_timeout (and at least
# once a second), so one is closed at most 10% late.
IDLE_SWEEPS_PER_TIMEOUT = 10
# ...but not more often than this, whatever the timeout: each sweep visits every
# connection.
MIN_SWEEP_INTERVAL = 0.01
# A burst of clients turned away (one warning as it starts, one line summing it
# up) ends after this long without one: longer than the 1 s asyncio's loop waits
# to accept again when out of descriptors, so that pause does not split a burst.
TURN_AWAY_BURST_GAP = 2.0
# At a stop or after an oversize line, a client still sending gets this long of
# silence to notice the server's EOF before the socket is closed: closing with its
# data unread makes the kernel reset the connection, which destroys the replies
# still on their way. nginx's lingering close, with a shorter wait since every
# stop may wait for it.
LINGER_TIMEOUT = 0.5
# What asyncio's selector loop tells its exception handler when accept() fails
# for want of descriptors or memory; it then stops accepting for a second.
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"


@dataclass(frozen=True)
class Stats:
    """Counters of a server since it started."""

    active: int
    """Connections open now."""
    total: int
    """Connections accepted (not counting the ones turned away)."""
    rejected: int
    """Connections turned away: `max_connections` were open, or (on asyncio's own
    loop) the process was out of file descriptors."""
    bytes_in: int
    bytes_out: int


def format_address(sockname: Any) -> str:
    """A bound address as people write it: 127.0.0.1:80, [::1]:80 or unix:/path."""
    if isinstance(sockname, str | bytes):
        path = os.fsdecode(sockname)
        return f"unix:{path}"
    host, port = sockname[0], sockname[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class _Connection(asyncio.Protocol):
    """Sits between one transport and the protocol that serves it.

    It counts bytes, keeps reading no faster than the client takes replies, and
    notes activity for the idle sweep. The subclasses say who answers: a reply
    rule straight from `data_received` (the built-in protocols), or the user's
    handler through the stream protocol that `start_server` made.
    """

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "closed",
        "inner",
        "loop",
        "lost",
        "peer",
        "proxy_header",
        "proxy_peer",
        "quiet",
        "reason",
        "rule",
        "server",
        "started",
        "task",
        "transport",
    )

    def __init__(
        self,
        server: Server,
        transport: asyncio.Transport,
        inner: asyncio.Protocol,
        rule: ReplyRule | None,
    ) -> None:
        self.server = server
        self.loop = server._loop
        self.transport = transport
        self.inner = inner
        self.rule = rule
        # Fetched now only when it will be logged: memory per connection counts.
        self.peer = _peername(transport) if access_logger.isEnabledFor(logging.INFO) else None
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = self.loop.time()
        # Idle sweeps since the last sign of life; cheaper to reset than a clock read.
        self.quiet = 0
        self.reason = ""
        self.lost = False
        # With the PROXY protocol on: resolved True once the header is read, False
        # when it was bad; the client's address it named (None for LOCAL).
        self.proxy_header: asyncio.Future[bool] | None = None
        self.proxy_peer: Any = None
        self.task: asyncio.Task[None] | None = None
        self.closed: asyncio.Future[None] = self.loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is not None and not self.reason:
            self.reason = _describe(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    def end(self, last: bytes, reason: str) -> None:
        """Send `last`, then close once everything written is flushed."""
        if last:
            self.bytes_out += len(last)
            self.transport.write(last)
        self.reason = self.reason or reason
        self.transport.close()

    def linger(self, last: bytes = b"") -> None:
        """Send `last`, then half-close once everything written is flushed and
        drop what the client still sends until it closes too (see `_Lingering`).
        Close at once when there is nothing to wait for: the transport cannot
        half-close (TLS), or the client never sent, or it has been quiet a while
        with every reply taken."""
        transport = self.transport
        if last:
            self.bytes_out += len(last)
            transport.write(last)
        if transport.is_closing() or isinstance(transport.get_protocol(), _Lingering):
            return
        # Quiet for a whole sweep interval, with every byte sent to it taken.
        idle = self.quiet > 1 and not transport.get_write_buffer_size()
        idle = idle and not _unacknowledged(transport)
        # Or, right now, nothing of ours in flight and nothing of the client's
        # unread: a reset could then destroy no reply, so there is nothing to
        # wait for. At a stop this is almost every client.
        settled = (
            not transport.get_write_buffer_size()
            and _socket_queue(transport, "TIOCOUTQ") == 0
            and _socket_queue(transport, "FIONREAD") == 0
        )
        if idle or settled or not self.bytes_in or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.set_protocol(_Lingering(self))
        transport.resume_reading()

    def cancel(self, reason: str) -> None:
        """End the connection through its task, as a stop or a timeout does."""
        self.reason = self.reason or reason
        if self.task is not None:
            self.task.cancel()
        elif not self.transport.is_closing():
            self.transport.close()

    def describe_peer(self) -> str:
        peer = self.proxy_peer or self.peer or _peername(self.transport)
        return format_address(peer) if peer else "client"


class _RuleConnection(_Connection):
    """Answers with a reply rule, from the transport's own callbacks."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.quiet = 0
        self.bytes_in += len(data)
        try:
            reply = self.rule.feed(data)  # type: ignore[union-attr]
        except MessageTooLong as error:
            self.reason = self.reason or f"message longer than {error.limit} bytes"
            self.linger(error.reply)
            return
        if reply:
            self.bytes_out += len(reply)
            self.transport.write(reply)

    def eof_received(self) -> bool | None:
        self.end(self.rule.finish(), "closed by client")  # type: ignore[union-attr]
        return None

    def pause_writing(self) -> None:
        if not self.transport.is_closing():
            # The client is not taking replies: stop taking its requests.
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.quiet = 0
        if not self.transport.is_closing():
            self.transport.resume_reading()


class _EchoConnection(_RuleConnection):
    """Echo's rule is the identity: the same, without the call."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.quiet = 0
        size = len(data)
        self.bytes_in += size
        self.bytes_out += size
        self.transport.write(data)


class _HandlerConnection(_Connection):
    """Forwards every event to the stream protocol the user's handler reads from."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.quiet = 0
        self.bytes_in += len(data)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.quiet = 0
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)
        super().connection_lost(exc)


class _SharedBufferReads(_Connection, asyncio.BufferedProtocol):
    """Reads into one buffer the whole server shares, for asyncio's own loop.

    Given a plain Protocol, that loop reads each chunk into a new 256 KiB bytes
    object, and such a large allocation can cost malloc a fresh mapping per read:
    with 10,000 clients connected it was a third of the throughput. Each read is
    handed on at once, so one buffer serves every connection. (uvloop reads into
    a buffer of its own and needs none of this.)
    """

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server._read_buffer[:nbytes].tobytes())


class _BufferedRuleConnection(_SharedBufferReads, _RuleConnection):
    __slots__ = ()


class _BufferedEchoConnection(_SharedBufferReads, _EchoConnection):
    __slots__ = ()


class _BufferedHandlerConnection(_SharedBufferReads, _HandlerConnection):
    __slots__ = ()


# The connection class for (reply rule kind, whether reads go to a shared buffer).
_CONNECTION_KINDS: dict[tuple[str, bool], type[_Connection]] = {
    ("handler", False): _HandlerConnection,
    ("rule", False): _RuleConnection,
    ("echo", False): _EchoConnection,
    ("handler", True): _BufferedHandlerConnection,
    ("rule", True): _BufferedRuleConnection,
    ("echo", True): _BufferedEchoConnection,
}


class _Lingering(asyncio.Protocol):
    """The server has half-closed: drop what the client still sends until it
    closes too, or falls silent for LINGER_TIMEOUT with every byte sent to it
    acknowledged; abort after shutdown_timeout."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.heard = False
        loop = connection.loop
        self.deadline = loop.time() + connection.server.shutdown_timeout
        self.timer = loop.call_later(LINGER_TIMEOUT, self.check)

    def data_received(self, data: bytes) -> None:
        self.heard = True

    def eof_received(self) -> bool | None:
        return None  # both sides are done: the transport closes

    def check(self) -> None:
        connection = self.connection
        if connection.loop.time() >= self.deadline:
            connection.transport.abort()
            return
        transport = connection.transport
        if not (self.heard or transport.get_write_buffer_size() or _unacknowledged(transport)):
            transport.close()
        self.heard = False
        self.timer = connection.loop.call_later(LINGER_TIMEOUT, self.check)

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.connection.connection_lost(exc)


class _CountingWriter(asyncio.StreamWriter):
    """The writer a user's handler gets: a StreamWriter that counts what it sends."""

    def __init__(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        protocol: asyncio.BaseProtocol,
    ) -> None:
        super().__init__(connection.transport, protocol, reader, connection.loop)
        self._connection = connection

    def write(self, data: bytes | bytearray | memoryview) -> None:
        connection = self._connection
        connection.bytes_out += len(data)
        connection.quiet = 0
        super().write(data)

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # Behind a load balancer, the peer is the client its PROXY header named.
        if name == "peername" and self._connection.proxy_peer is not None:
            return self._connection.proxy_peer
        return super().get_extra_info(name, default)


class _ProxyHeaderReader(asyncio.Protocol):
    """Reads the PROXY header first, then hands the transport to the connection."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.received = b""
        connection.proxy_header = connection.loop.create_future()

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        connection.bytes_in += len(data)
        self.received += data
        try:
            found = split_header(self.received)
        except ProxyHeaderError as error:
            logger.warning("Closed %s: %s", connection.describe_peer(), error)
            connection.reason = str(error)
            connection.transport.abort()
            return
        if found is None:
            return
        connection.proxy_peer, rest = found
        if connection.proxy_peer is not None:
            connection.peer = connection.proxy_peer
        connection.transport.set_protocol(connection)
        _resolve(connection.proxy_header, True)
        if rest:
            connection.bytes_in -= len(rest)  # counted again as the connection's own
            connection.data_received(rest)

    def eof_received(self) -> bool | None:
        self.connection.reason = "closed by client before its PROXY header"
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        _resolve(self.connection.proxy_header, False)
        self.connection.connection_lost(exc)


def _resolve(future: asyncio.Future[bool] | None, value: bool) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _describe(exc: BaseException) -> str:
    """One line on why a connection was lost, without a traceback."""
    if isinstance(exc, ConnectionResetError):
        return "reset by client"
    if isinstance(exc, BrokenPipeError):
        return "client went away"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "closed by client mid-message"
    if isinstance(exc, ssl_module.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


class Server:
    """A TCP (or Unix socket) server that serves each client with one task.

    `handler` is a coroutine function with the `asyncio.start_server` signature
    `async (reader, writer) -> None`, such as `aioserver.echo` or
    `aioserver.thanks`. All options are keyword-only:

    - host: one address or several (IPv6 included); default 127.0.0.1.
    - port: default 1234; 0 lets the kernel pick, and `.port` tells which.
    - unix: a Unix socket path to listen on instead of host and port. A stale
      socket file left by a dead server is replaced; any other file is an error.
    - backlog, reuse_port, ssl: passed to `asyncio.start_server`.
    - max_connections: a client over this is closed at once (the thanks
      protocol first tells it "Error: server busy"); the others carry on. Out
      of file descriptors, new clients are closed at once too, on both loops;
      either way one warning is logged per burst.
    - idle_timeout: seconds a client may neither send nor take replies before
      it is closed; None for never.
    - max_message_size: the longest line the thanks protocol accepts, and the
      stream reader limit a user's handler gets.
    - shutdown_timeout: at a stop, how long a client is given to take the
      replies already owed to it before its connection is aborted.
    - proxy_protocol: every connection must start with a PROXY protocol v1 or
      v2 header (as HAProxy's send-proxy sends); the client it names is the
      peer in logs and in the handler's `writer.get_extra_info("peername")`,
      and the handler gets only the bytes after it. A connection without a
      valid header is closed with one warning.
    - sockets: listening sockets bound already (as a supervisor hands its
      worker processes) to serve on instead of host, port and unix.

    Stopping is cancellation: cancelling `serve_forever()`, leaving `serve()`
    and calling `stop()` all close the listening sockets, cancel every
    connection task at once, flush what was written (bounded by
    shutdown_timeout) and close every connection.
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
        sockets: Sequence[socket.socket] = (),
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be a coroutine function, not {handler!r}")
        _check_range("port", port, 0, 65535)
        _check_range("backlog", backlog, 1)
        _check_range("max_connections", max_connections, 1)
        _check_range("max_message_size", max_message_size, 1)
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive, or None for no timeout")
        if shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must not be negative")
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
        self.listen_sockets = list(sockets)
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()
        self._total = self._rejected = self._closed_in = self._closed_out = 0
        self._turned_away = _TurnedAway()
        self._accept_guard: _AcceptGuard | None = None
        # Set at start on asyncio's own loop (see _SharedBufferReads).
        self._read_buffer = memoryview(b"")
        # Connections the descriptors free at start allow (None where unknown).
        self._fd_room: int | None = None
        self._stopping = False
        self._all_ended = asyncio.Event()
        self._stopped = asyncio.Event()
        self._idle_sweep: asyncio.TimerHandle | None = None
        self._sweep_interval = 1.0
        self._sweeps_to_idle = 0

    # Public surface.

    @property
    def sockets(self) -> list[socket.socket]:
        """Every listening socket: the ones given, or those bound at start; none
        after a stop."""
        if self._stopping:
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

    @property
    def stats(self) -> Stats:
        live = self._connections
        return Stats(
            active=len(live),
            total=self._total,
            rejected=self._rejected,
            bytes_in=self._closed_in + sum(c.bytes_in for c in live),
            bytes_out=self._closed_out + sum(c.bytes_out for c in live),
        )

    def is_serving(self) -> bool:
        """True from a successful start until a stop begins."""
        return bool(self._servers) and not self._stopping

    async def start(self) -> None:
        """Bind and start accepting. On failure (e.g. address in use) raise OSError."""
        if self._servers or self._stopping:
            raise RuntimeError("a Server starts once")
        self._loop = asyncio.get_running_loop()
        options: dict[str, Any] = {
            "limit": self.max_message_size,
            "backlog": self.backlog,
            "ssl": self.ssl,
        }
        try:
            if self.listen_sockets:
                for sock in self.listen_sockets:
                    if sock.family == socket.AF_UNIX:
                        server = await asyncio.start_unix_server(self._accept, sock=sock, **options)
                    else:
                        server = await asyncio.start_server(self._accept, sock=sock, **options)
                    self._servers.append(server)
            elif self.unix is not None:
                _clear_stale_socket(self.unix)
                self._servers.append(
                    await asyncio.start_unix_server(self._accept, self.unix, **options)
                )
            else:
                port = self.requested_port
                for host in self.hosts:
                    server = await asyncio.start_server(
                        self._accept, host, port, reuse_port=self.reuse_port, **options
                    )
                    self._servers.append(server)
                    # With port 0, every host shares the port the kernel gave the first.
                    port = port or server.sockets[0].getsockname()[1]
        except BaseException:
            for server in self._servers:
                server.close()
            self._servers.clear()
            raise
        for address in self.addresses:
            logger.info("Listening on %s", address)
        if isinstance(self._loop, asyncio.SelectorEventLoop):
            self._accept_guard = _AcceptGuard(self)
            self._read_buffer = memoryview(bytearray(READ_CHUNK))
        self._fd_room = _free_fds()
        if self.idle_timeout is not None:
            self._sweep_interval = min(
                max(self.idle_timeout / IDLE_SWEEPS_PER_TIMEOUT, MIN_SWEEP_INTERVAL), 1.0
            )
            self._sweeps_to_idle = math.ceil(self.idle_timeout / self._sweep_interval)
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
        """Stop: close the listeners, cancel and await every connection task.

        Each connection flushes what was written to it and half-closes; a client
        still sending gets until it closes too or falls silent (LINGER_TIMEOUT),
        and everything is bounded by shutdown_timeout, after which the connection
        is aborted. A stop with only idle clients returns at once. Calling it
        again, or while it runs, just waits for the first call. Cancelling a stop
        aborts every connection at once and re-raises the cancellation.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self._idle_sweep is not None:
            self._idle_sweep.cancel()
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.cancel("server stopped")
        try:
            if self._connections:
                await self._all_ended.wait()
            # uvloop closes listening handles one loop iteration after close().
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            for connection in list(self._connections):
                connection.transport.abort()
            raise
        finally:
            if self.unix is not None and self._servers:
                with contextlib.suppress(OSError):
                    os.unlink(self.unix)
            if self._accept_guard is not None:
                self._accept_guard.remove()
            self._turned_away.end(final=True)
            self._servers.clear()
            self._stopped.set()
            logger.info("Stopped")

    # Idleness: one timer for the whole server rather than one per connection,
    # which would cost about 500 bytes each. Each sweep counts one more quiet
    # interval for every connection, and activity resets the count, so a client
    # is closed between idle_timeout and idle_timeout + one interval after it
    # last sent or took anything.

    def _schedule_idle_sweep(self) -> None:
        self._idle_sweep = self._loop.call_later(self._sweep_interval, self._sweep_idle)

    def _sweep_idle(self) -> None:
        limit = self._sweeps_to_idle
        for connection in self._connections:
            connection.quiet += 1
            if connection.quiet > limit and not connection.reason:
                connection.cancel(f"idle for {self.idle_timeout:g} s")
        self._schedule_idle_sweep()

    # One connection.

    def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Coroutine[Any, Any, None] | None:
        # Called by start_server's protocol inside connection_made, before any data
        # arrives, so the connection sees every byte from the first.
        # uvloop's transports have the Transport methods without subclassing it.
        transport = cast(asyncio.Transport, writer.transport)
        if self._stopping:
            transport.abort()
            return None
        if len(self._connections) >= self.max_connections:
            self._reject(transport)
            return None
        rule = rule_for(self.handler, self.max_message_size)
        inner = cast(asyncio.Protocol, transport.get_protocol())
        answers = "handler" if rule is None else "echo" if isinstance(rule, EchoRule) else "rule"
        kind = _CONNECTION_KINDS[answers, bool(self._read_buffer)]
        connection = kind(self, transport, inner, rule)
        if self.proxy_protocol:
            transport.set_protocol(_ProxyHeaderReader(connection))
        else:
            transport.set_protocol(connection)
        self._connections.add(connection)
        self._total += 1
        if len(self._connections) == self._fd_room:
            # The next client finds no descriptor: the loop closes it unseen
            # (uvloop) or the accept guard turns it away (asyncio).
            self._turned_away.add(
                self._loop, 0, f"out of file descriptors at {self._fd_room} connections"
            )
        return self._serve(connection, reader, writer)

    async def _serve(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        # The task start_server made for this coroutine owns the connection. It ends
        # normally even when cancelled: a cancelled task would make 3.11's stream
        # protocol log an error, and the cancellation was ours to give.
        task = connection.task = asyncio.current_task()
        cancelled = False
        try:
            if connection.proxy_header is not None and not await connection.proxy_header:
                pass  # no valid PROXY header: closed already
            elif self._stopping:
                connection.reason = "server stopped"
            elif connection.rule is not None:
                await connection.closed
            else:
                counting = _CountingWriter(connection, reader, connection.inner)
                await self.handler(reader, counting)
                connection.reason = connection.reason or "handler returned"
        except asyncio.CancelledError:
            cancelled = True
            if task is not None:
                task.uncancel()
        except (ConnectionError, asyncio.IncompleteReadError, ssl_module.SSLError) as exc:
            connection.reason = connection.reason or _describe(exc)
        except Exception:
            logger.exception("Handler failed for %s", connection.describe_peer())
            connection.reason = "handler failed"
        finally:
            await self._close(connection, linger=cancelled)
            self._forget(connection)

    async def _close(self, connection: _Connection, *, linger: bool = False) -> None:
        transport = connection.transport
        if linger:
            # Stopped or timed out: the client may be sending still.
            connection.linger()
        elif not transport.is_closing():
            transport.close()
        if connection.lost:
            return
        if connection.closed.done():
            # Cancelled along with the task that awaited it.
            connection.closed = self._loop.create_future()
        # close() flushes what is buffered first; a client that will not take it
        # gets shutdown_timeout, then the connection is aborted.
        deadline = self._loop.call_later(self.shutdown_timeout, transport.abort)
        try:
            await connection.closed
        except asyncio.CancelledError:
            transport.abort()
        finally:
            deadline.cancel()

    def _forget(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        self._closed_in += connection.bytes_in
        self._closed_out += connection.bytes_out
        if access_logger.isEnabledFor(logging.INFO):
            access_logger.info(
                "%s closed after %.3f s, %d bytes in, %d bytes out: %s",
                connection.describe_peer(),
                self._loop.time() - connection.started,
                connection.bytes_in,
                connection.bytes_out,
                connection.reason or "closed",
            )
        if self._stopping and not self._connections:
            self._all_ended.set()

    def _reject(self, transport: asyncio.Transport) -> None:
        self._rejected += 1
        busy = busy_reply(self.handler)
        if busy:
            transport.write(busy)
        transport.close()
        self._turned_away.add(self._loop, 1, f"max_connections={self.max_connections} reached")


class _TurnedAway:
    """Clients turned away, logged once per burst: a warning as it starts, and a
    line with the count when TURN_AWAY_BURST_GAP passes without another."""

    def __init__(self) -> None:
        self.count = 0
        self.started = self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def add(self, loop: asyncio.AbstractEventLoop, count: int, reason: str) -> None:
        self.count += count
        self.last = loop.time()
        if self.timer is None:
            logger.warning("Turning clients away: %s", reason)
            self.started = self.last
            self.timer = loop.call_later(TURN_AWAY_BURST_GAP, self.end)

    def end(self, *, final: bool = False) -> None:
        if self.timer is None:
            return
        self.timer.cancel()
        if not final and self.timer.when() < self.last + TURN_AWAY_BURST_GAP:
            self.timer = asyncio.get_running_loop().call_at(
                self.last + TURN_AWAY_BURST_GAP, self.end
            )
            return
        self.timer = None
        if self.count:
            logger.info("Turned away %d client(s) in %.1f s", self.count, self.last - self.started)
        self.count = 0


class _AcceptGuard:
    """Out of file descriptors, asyncio's selector loop reports every failed
    accept to the loop's exception handler (with a traceback), leaves the clients
    waiting, and stops accepting for a second. Installed as that handler for the
    server's life, this turns those clients away at once instead, as libuv does
    for uvloop: it frees a reserve descriptor, accepts and closes every waiting
    client with it, and counts them. Everything else goes to the handler it wraps.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server._loop
        self.previous = self.loop.get_exception_handler()
        self.reserve: int | None = _open_reserve()
        # The loop's retry of a stopped server's listener fails: drop that too.
        self.retry_due = 0.0
        self.loop.set_exception_handler(self.handle)

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = context.get("message", "")
        listener = context.get("socket")
        fd = listener.fileno() if listener is not None else -1
        error = context.get("exception")
        if message == ACCEPT_OUT_OF_RESOURCES and fd in {s.fileno() for s in self.server.sockets}:
            self.retry_due = loop.time() + 1.0
            count = self.turn_away_waiting(fd)
            self.server._rejected += count
            self.server._turned_away.add(loop, count, f"cannot accept: {error}")
            return
        if self.server._stopping and isinstance(error, ValueError) and "_start_serving" in message:
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def turn_away_waiting(self, fd: int) -> int:
        if self.reserve is None:
            return 0
        os.close(self.reserve)
        listener = socket.socket(fileno=fd)
        count = 0
        try:
            for _ in range(self.server.backlog):
                try:
                    client, _address = listener.accept()
                except OSError:  # BlockingIOError once none is waiting
                    break
                client.close()
                count += 1
        finally:
            listener.detach()
            self.reserve = _open_reserve()
        return count

    def remove(self) -> None:
        if self.reserve is not None:
            os.close(self.reserve)
            self.reserve = None
        if self.loop.time() < self.retry_due:
            self.loop.call_at(self.retry_due + 0.1, self.remove)
        elif self.loop.get_exception_handler() == self.handle:
            self.loop.set_exception_handler(self.previous)


def _unacknowledged(transport: asyncio.BaseTransport) -> int:
    """Bytes sent that the peer has not acknowledged yet (Linux; 0 elsewhere). A
    reset destroys them, so a lingering connection is not closed before they go."""
    return _socket_queue(transport, "TIOCOUTQ") or 0


def _socket_queue(transport: asyncio.BaseTransport, request: str) -> int | None:
    """A socket queue's length in bytes by ioctl: TIOCOUTQ, sent but not yet
    acknowledged; FIONREAD, received but not yet read. None where unknown."""
    sock = transport.get_extra_info("socket")
    try:
        import fcntl
        import termios

        queued = fcntl.ioctl(sock.fileno(), getattr(termios, request), b"\0\0\0\0")
    except (ImportError, AttributeError, OSError, ValueError):
        return None
    return int.from_bytes(queued, sys.byteorder)


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _free_fds() -> int | None:
    """How many more descriptors this process may open, or None where unknown."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        names = os.listdir("/proc/self/fd")
    except (ImportError, OSError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    # The limit caps descriptor numbers, not their count; the listing counts the
    # descriptor it was read through.
    return soft - sum(1 for name in names if int(name) < soft) + 1


def _peername(transport: asyncio.BaseTransport) -> Any:
    """The peer's address, or None: a Unix client has none, and uvloop raises
    ValueError once the socket is closed."""
    try:
        return transport.get_extra_info("peername")
    except (OSError, ValueError):
        return None


def _check_range(name: str, value: int, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be an integer {bound}, not {value!r}")


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file no server listens on; refuse to touch anything else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # left behind by a server that died
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a server is already listening on", path)


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
