"""Test servers for integration tests: recorded connections and injected faults.

`TestServer` runs on the event loop of the code that starts it (an async test, an
async fixture); `ThreadedTestServer` runs the same server on its own loop in a
background thread, for synchronous tests and clients that are not asyncio. Both
bind port 0 and are accepting when handed over, so `server.port` is real and no
test sleeps or races for a port.

Every connection is recorded (`ConnectionRecord`: peer, bytes received, bytes sent,
messages, how it ended), and helpers wait for a number of connections, messages or
closed connections with a timeout. `Faults` switches delays, truncation, resets and
stalls on and off while the server runs; `refuse_connections()` takes the server
down while keeping its port, and `accept_connections()` brings it back.

Stopping goes through `aioserver.Server.stop()`: the listening socket closes, every
connection task is cancelled and awaited, every socket is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import ipaddress
import math
import socket
import ssl as ssl_module
import struct
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypedDict, TypeVar, Unpack, cast

from .loops import loop_factory
from .protocols import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Handler,
    echo,
    rule_for,
    serve_rule,
    thanks,
)
from .server import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, Server

__all__ = [
    "DEFAULT_WAIT_TIMEOUT",
    "TEST_SHUTDOWN_TIMEOUT",
    "ConnectionRecord",
    "Ending",
    "Faults",
    "ServerOptions",
    "TestServer",
    "ThreadedTestServer",
    "WrongLoopError",
    "echo",
    "thanks",
]

# Five seconds: loopback traffic needs milliseconds, and a wait that can never
# succeed fails with its own message well inside a per-test timeout.
DEFAULT_WAIT_TIMEOUT = 5.0
# One second: a test client takes its last replies at once or never will, so a
# stop never holds a test back longer than this.
TEST_SHUTDOWN_TIMEOUT = 1.0

# SO_LINGER on, with a zero timeout: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)

_T = TypeVar("_T")


class WrongLoopError(RuntimeError):
    """A TestServer was used from an event loop other than the one it runs on."""


class Ending(enum.Enum):
    """How a recorded connection ended."""

    CLIENT_CLOSED = "client closed"
    """The client's EOF reached the handler, and the handler finished."""
    CLIENT_RESET = "client reset"
    """The client reset the connection or went away mid-reply."""
    SERVER_CLOSED = "server closed"
    """The handler returned without having read EOF from the client."""
    SERVER_STOPPED = "server stopped"
    """Cancelled by the server: a stop, `refuse_connections()` or the idle timeout."""
    HANDLER_FAILED = "handler failed"
    """The handler raised; `ConnectionRecord.error` holds the exception."""
    CLOSED_BY_FAULT = "closed by the close_after fault"
    RESET_BY_FAULT = "reset by the reset fault"


@dataclass(frozen=True)
class ConnectionRecord:
    """What one connection did, as of the moment the record was taken.

    Records are snapshots: take `server.connections` again to see later bytes.
    """

    index: int
    """Accept order on this server, from 0."""
    peer: tuple[str, int]
    """The client's address and port."""
    received: bytes
    """Every byte the handler has read from the client (the built-in protocols
    read everything as it arrives)."""
    sent: bytes
    """Every byte sent to the client (after the delay and close_after faults)."""
    messages: list[bytes]
    """`received` as the thanks protocol splits it: each line with its b"\\n", and a
    last fragment without one once the client has closed."""
    ended: Ending | None
    """None while the connection is open."""
    error: BaseException | None = None
    """The exception that ended the handler, for Ending.HANDLER_FAILED."""

    @property
    def is_open(self) -> bool:
        return self.ended is None


class Faults:
    """The faults a test server injects; change them at any time, from any thread.

    Each setting is read when it applies, so a change takes effect from the next
    event on, for connections already open too unless said otherwise:

    - delay: seconds that every chunk the handler writes waits before it is sent
      (order kept). Replies still waiting at a stop are dropped.
    - close_after: once this many bytes have been sent on a connection, the server
      closes it (FIN): the client reads exactly those bytes, then EOF, and later
      writes by the handler are dropped. 0 closes each new connection at once.
      (As with any server that closes, a client that goes on sending gets a reset.)
    - reset: as soon as the handler reads data, the connection is reset (RST, by
      SO_LINGER 0 and abort); the client sees ECONNRESET and the handler's read
      raises ConnectionResetError. The data read is recorded.
    - stall: new connections are accepted and then never read, so a client's sends
      fill the kernel buffers and block. Stays so for the connection's life.

    Refusing connections is a method of the server: `refuse_connections()`.
    """

    __slots__ = ("_close_after", "_delay", "reset", "stall")

    def __init__(
        self,
        *,
        delay: float = 0.0,
        close_after: int | None = None,
        reset: bool = False,
        stall: bool = False,
    ) -> None:
        self.delay = delay
        self.close_after = close_after
        self.reset = reset
        self.stall = stall

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, value: float) -> None:
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {value!r}")
        self._delay = float(value)

    @property
    def close_after(self) -> int | None:
        return self._close_after

    @close_after.setter
    def close_after(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"close_after must be None or an integer >= 0, not {value!r}")
        self._close_after = value

    def clear(self) -> None:
        """Switch every fault off."""
        self.delay = 0.0
        self.close_after = None
        self.reset = self.stall = False

    def __repr__(self) -> str:
        return (
            f"Faults(delay={self.delay!r}, close_after={self.close_after!r}, "
            f"reset={self.reset!r}, stall={self.stall!r})"
        )


class ServerOptions(TypedDict, total=False):
    """The keyword options of `TestServer`, for factories that pass them on."""

    host: str
    port: int
    faults: Faults | None
    max_connections: int
    idle_timeout: float | None
    max_message_size: int
    shutdown_timeout: float
    ssl: ssl_module.SSLContext | None


# Recording. It is written on the server's loop and read from any thread.


class _Live:
    """The mutable record of one connection; only `_Recording` touches it."""

    __slots__ = ("ended", "error", "fragment", "index", "messages", "peer", "received", "sent")

    def __init__(self, index: int, peer: tuple[str, int]) -> None:
        self.index = index
        self.peer = peer
        self.received = bytearray()
        self.sent = bytearray()
        self.fragment = bytearray()
        self.messages: list[bytes] = []
        self.ended: Ending | None = None
        self.error: BaseException | None = None

    def snapshot(self) -> ConnectionRecord:
        return ConnectionRecord(
            index=self.index,
            peer=self.peer,
            received=bytes(self.received),
            sent=bytes(self.sent),
            messages=list(self.messages),
            ended=self.ended,
            error=self.error,
        )


class _Recording:
    """Every connection of one test server, and the waits on them."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._connections: list[_Live] = []
        self._messages: list[bytes] = []
        self._closed = 0
        self._async_waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    # Writes, on the server's loop.

    def open(self, peer: tuple[str, int]) -> _Live:
        with self._condition:
            live = _Live(len(self._connections), peer)
            self._connections.append(live)
            self._changed()
        return live

    def received(self, live: _Live, data: bytes) -> None:
        with self._condition:
            live.received += data
            live.fragment += data
            end = live.fragment.rfind(b"\n") + 1
            if end:
                complete = bytes(live.fragment[:end])
                del live.fragment[:end]
                messages = [line + b"\n" for line in complete.split(b"\n")[:-1]]
                live.messages += messages
                self._messages += messages
            self._changed()

    def eof(self, live: _Live) -> None:
        with self._condition:
            if live.fragment:
                message = bytes(live.fragment)
                live.fragment.clear()
                live.messages.append(message)
                self._messages.append(message)
                self._changed()

    def sent(self, live: _Live, data: bytes) -> None:
        with self._condition:
            live.sent += data

    def end(self, live: _Live, ending: Ending, error: BaseException | None) -> None:
        with self._condition:
            live.ended = ending
            live.error = error
            self._closed += 1
            self._changed()

    def _changed(self) -> None:
        self._condition.notify_all()
        for ready, waiter in self._async_waiters:
            if not waiter.done() and ready():
                waiter.set_result(None)

    # Reads, from any thread.

    def connections(self) -> list[ConnectionRecord]:
        with self._condition:
            return [live.snapshot() for live in self._connections]

    def messages(self) -> list[bytes]:
        with self._condition:
            return list(self._messages)

    def count(self, what: str) -> int:
        if what == "connections":
            return len(self._connections)
        if what == "messages":
            return len(self._messages)
        return self._closed

    async def wait(self, what: str, n: int, seconds: float) -> None:
        """Wait on the running loop (the server's) until `count(what) >= n`."""
        _check_wait(n, seconds)
        with self._condition:
            if self.count(what) >= n:
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (lambda: self.count(what) >= n, waiter)
            self._async_waiters.append(entry)
        try:
            async with asyncio.timeout(seconds):
                await waiter
        except TimeoutError:
            raise TimeoutError(self._timeout_message(what, n, seconds)) from None
        finally:
            with self._condition:
                self._async_waiters.remove(entry)

    def wait_blocking(self, what: str, n: int, timeout: float) -> None:
        """Block this thread until `count(what) >= n`."""
        _check_wait(n, timeout)
        with self._condition:
            if not self._condition.wait_for(lambda: self.count(what) >= n, timeout):
                raise TimeoutError(self._timeout_message(what, n, timeout))

    def _timeout_message(self, what: str, n: int, timeout: float) -> str:
        seen = {"connections": "accepted", "messages": "received", "closed": "closed"}[what]
        noun = "closed connections" if what == "closed" else what
        with self._condition:
            count = self.count(what)
        return f"waited {timeout:g} s for {n} {noun}, but {count} {seen}"


def _check_wait(n: int, timeout: float) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, not {n!r}")
    if timeout < 0:
        raise ValueError(f"timeout must not be negative, not {timeout!r}")


# One connection: the reader and writer the handler gets, and the faults.


class _Link:
    """Sits between one connection's streams and the handler: records, injects faults."""

    def __init__(
        self,
        recording: _Recording,
        live: _Live,
        faults: Faults,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limit: int,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.recording = recording
        self.live = live
        self.faults = faults
        self.inner_reader = reader
        self.inner_writer = writer
        self.sent = 0
        self.eof_seen = False
        self.closing = False
        self.dead = False
        self.fault: Ending | None = None
        # Delayed writes: (when due, data or None for write_eof), due times ascending.
        self.outbox: deque[tuple[float, bytes | None]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        self.flush_waiters: list[asyncio.Future[None]] = []
        self.reader = _RecordingReader(self, limit)
        self.writer = _FaultyWriter(self)

    # Reading.

    def got(self, data: bytes, *, eof: bool = False) -> bytes:
        if data:
            self.recording.received(self.live, data)
            if self.faults.reset and not self.dead:
                self.reset()
        if eof and not self.dead:
            self.eof_seen = True
            self.recording.eof(self.live)
        if self.fault is Ending.RESET_BY_FAULT:
            raise ConnectionResetError(errno.ECONNRESET, "reset by the reset fault")
        return data

    # Writing.

    def write(self, data: bytes) -> None:
        if self.dead or not data:
            return
        delay = self.faults.delay
        if delay <= 0 and not self.outbox:
            self.emit(data)
            return
        self.queue(data, delay)

    def write_eof(self) -> None:
        if self.dead:
            return
        if self.outbox:
            self.queue(None, 0.0)
        else:
            self.inner_writer.write_eof()

    def queue(self, data: bytes | None, delay: float) -> None:
        due = self.loop.time() + delay
        if self.outbox:
            due = max(due, self.outbox[-1][0])
        self.outbox.append((due, data))
        if self.timer is None:
            self.arm()

    def arm(self) -> None:
        self.timer_due = self.outbox[0][0]
        self.timer = self.loop.call_at(self.timer_due, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        while self.outbox and self.outbox[0][0] <= self.timer_due and not self.dead:
            _, data = self.outbox.popleft()
            if data is None:
                self.inner_writer.write_eof()
            else:
                self.emit(data)
        if self.outbox and not self.dead:
            self.arm()
            return
        self.wake_flush_waiters()
        if self.closing and not self.dead:
            self.inner_writer.close()

    def emit(self, data: bytes) -> None:
        limit = self.faults.close_after
        if limit is not None:
            data = data[: max(limit - self.sent, 0)]
        if data:
            self.sent += len(data)
            self.inner_writer.write(data)
            self.recording.sent(self.live, data)
        if limit is not None and self.sent >= limit:
            self.close_by_fault()

    def close(self) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            self.discard()  # stopping: replies not yet due are dropped
        self.closing = True
        if not self.outbox:
            self.inner_writer.close()

    async def flushed(self) -> None:
        """Return once every delayed write is sent (or dropped)."""
        if not self.outbox or self.dead:
            return
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            self.discard()
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self.flush_waiters.append(waiter)
        await waiter

    def wake_flush_waiters(self) -> None:
        for waiter in self.flush_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.flush_waiters.clear()

    def discard(self) -> None:
        """Drop what is still delayed; nothing of this link is left scheduled."""
        self.outbox.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.wake_flush_waiters()

    # Faults that end the connection.

    def close_by_fault(self) -> None:
        self.dead = True
        self.fault = self.fault or Ending.CLOSED_BY_FAULT
        self.discard()
        self.inner_writer.close()

    def reset(self) -> None:
        self.dead = True
        self.fault = self.fault or Ending.RESET_BY_FAULT
        self.discard()
        sock = self.inner_writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.inner_writer.transport.abort()


class _RecordingReader(asyncio.StreamReader):
    """The handler's reader: reads through the connection's reader, recording."""

    def __init__(self, link: _Link, limit: int) -> None:
        super().__init__(limit=limit, loop=link.loop)
        self._link = link
        self._inner = link.inner_reader

    def exception(self) -> Exception | None:
        return self._inner.exception()

    def at_eof(self) -> bool:
        return self._inner.at_eof()

    async def read(self, n: int = -1) -> bytes:
        data = await self._inner.read(n)
        return self._link.got(data, eof=not data and n != 0)

    async def readline(self) -> bytes:
        line = await self._inner.readline()
        return self._link.got(line, eof=not line.endswith(b"\n"))

    async def readexactly(self, n: int) -> bytes:
        try:
            data = await self._inner.readexactly(n)
        except asyncio.IncompleteReadError as error:
            self._link.got(error.partial, eof=True)
            raise
        return self._link.got(data)

    async def readuntil(self, separator: Any = b"\n") -> bytes:
        try:
            data = await self._inner.readuntil(separator)
        except asyncio.IncompleteReadError as error:
            self._link.got(error.partial, eof=True)
            raise
        return self._link.got(data)


class _FaultyWriter(asyncio.StreamWriter):
    """The handler's writer: writes through the connection's writer, with faults."""

    def __init__(self, link: _Link) -> None:
        inner = link.inner_writer
        super().__init__(inner.transport, inner.transport.get_protocol(), link.reader, link.loop)
        self._link = link

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._link.write(bytes(data))

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in data:
            self.write(chunk)

    def write_eof(self) -> None:
        self._link.write_eof()

    def can_write_eof(self) -> bool:
        return self._link.inner_writer.can_write_eof()

    def close(self) -> None:
        self._link.close()

    def is_closing(self) -> bool:
        return self._link.closing or self._link.dead or self._link.inner_writer.is_closing()

    async def drain(self) -> None:
        await self._link.flushed()
        if not self._link.dead:
            await self._link.inner_writer.drain()

    async def wait_closed(self) -> None:
        await self._link.flushed()
        await self._link.inner_writer.wait_closed()


def _peer(writer: asyncio.StreamWriter) -> tuple[str, int]:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple | list) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return "", 0


def _handler_name(handler: Handler) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


# The servers.


class TestServer:
    """A recording, fault-injecting TCP server on the running event loop.

    `handler` has the `asyncio.start_server` signature; the default is
    `aioserver.echo`, and `aioserver.thanks` is the other built-in. Use it as
    `async with TestServer(handler) as server:`; it is accepting when the block
    starts, on an ephemeral port of `host` (an IP address, 127.0.0.1 by default):
    `server.port` and `server.address` say where.

    Options are those of `aioserver.Server`, with these differences: `faults` (a
    `Faults`, shared and switchable at run time; `server.faults`); a
    `shutdown_timeout` of TEST_SHUTDOWN_TIMEOUT; at `max_connections` a client is
    closed at once, without the thanks protocol's busy line; and the port is bound
    with SO_REUSEPORT (so the server can hold it while refusing), which means a
    fixed `port` that another SO_REUSEPORT socket of the same user holds is shared
    rather than an error. With `ssl`, the records hold the decrypted bytes.

    The server lives on the loop that started it and serves only while that loop
    runs. Using it from another running loop (a test on a narrower loop scope than
    the fixture that made it) raises WrongLoopError at once instead of hanging.

    Leaving the block (or `stop()`) closes the listening socket, cancels every
    connection's handler at its current await, drops delayed replies, closes every
    socket and leaves no task behind; calling it again is harmless. The records
    stay readable after the stop.
    """

    __test__ = False  # a helper, not a test class, though pytest would collect the name

    def __init__(
        self,
        handler: Handler = echo,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        shutdown_timeout: float = TEST_SHUTDOWN_TIMEOUT,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"host must be an IP address such as 127.0.0.1, not {host!r}"
            ) from None
        self.handler = handler
        self.faults = faults if faults is not None else Faults()
        self._options: dict[str, Any] = {
            "max_connections": max_connections,
            "idle_timeout": idle_timeout,
            "max_message_size": max_message_size,
            "shutdown_timeout": shutdown_timeout,
            "ssl": ssl,
            "reuse_port": True,  # lets a placeholder hold the port while refusing
        }
        self._server = Server(self._serve_connection, host=host, port=port, **self._options)
        self._host = host
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # -> serving <-> refusing -> stopped
        self._placeholders: list[socket.socket] = []
        self._recording = _Recording()
        self._stop_done: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}" if self._port is not None else self._host
        return f"<TestServer {_handler_name(self.handler)} {where} {self._state}>"

    # Where it is.

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the server runs on (None before start)."""
        return self._loop

    @property
    def server(self) -> Server:
        """The `aioserver.Server` listening now (a new one after accept_connections)."""
        return self._server

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port; it stays the same while refusing and after accept_connections.

        Raises WrongLoopError from a loop other than the server's, and RuntimeError
        before start.
        """
        self._check_loop("port")
        if self._port is None:
            raise RuntimeError(f"{self!r} has no port yet: start it first")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port), as socket.create_connection and open_connection take them."""
        return self.host, self.port

    @property
    def is_serving(self) -> bool:
        """True while accepting: started, not refusing, not stopped."""
        return self._state == "serving"

    @property
    def is_refusing(self) -> bool:
        return self._state == "refusing"

    # What it saw.

    @property
    def connections(self) -> list[ConnectionRecord]:
        """A record of every connection accepted so far, in accept order."""
        return self._recording.connections()

    @property
    def messages(self) -> list[bytes]:
        """Every message (line) received so far on any connection, in arrival order."""
        return self._recording.messages()

    # The waits take a timeout rather than leaving it to asyncio.timeout around
    # them: the default makes a wait that can never succeed fail with a message
    # saying what did arrive.

    async def wait_for_connections(
        self,
        n: int,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,  # noqa: ASYNC109
    ) -> list[ConnectionRecord]:
        """Wait until at least `n` connections were accepted; return every record.

        Raises TimeoutError after `timeout` seconds, saying how many arrived.
        """
        self._check_loop("wait_for_connections")
        await self._recording.wait("connections", n, timeout)
        return self.connections

    async def wait_for_messages(
        self,
        n: int,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,  # noqa: ASYNC109
    ) -> list[bytes]:
        """Wait until at least `n` messages were received in all; return them all.

        Raises TimeoutError after `timeout` seconds, saying how many arrived.
        """
        self._check_loop("wait_for_messages")
        await self._recording.wait("messages", n, timeout)
        return self.messages

    async def wait_for_closed(
        self,
        n: int,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,  # noqa: ASYNC109
    ) -> list[ConnectionRecord]:
        """Wait until at least `n` connections have ended; return every record.

        Raises TimeoutError after `timeout` seconds, saying how many ended.
        """
        self._check_loop("wait_for_closed")
        await self._recording.wait("closed", n, timeout)
        return self.connections

    # Life.

    async def start(self) -> Self:
        """Bind and start accepting. Raises OSError when the address is taken."""
        if self._state != "new":
            raise RuntimeError(f"{self!r}: a TestServer starts once")
        self._loop = asyncio.get_running_loop()
        self._state = "starting"
        try:
            await self._server.start()
        except BaseException:
            self._state = "stopped"
            raise
        sockname = self._server.sockets[0].getsockname()
        self._host, self._port = str(sockname[0]), int(sockname[1])
        self._state = "serving"
        return self

    async def stop(self) -> None:
        """Stop as `aioserver.Server.stop()` does; harmless when already stopped.

        Every connection ends (Ending.SERVER_STOPPED unless it ended already),
        the port is released, and no task or socket of the server is left.
        """
        self._check_loop("stop")
        if self._stop_done is not None:
            await asyncio.shield(self._stop_done)
            return
        self._stop_done = asyncio.get_running_loop().create_future()
        self._state = "stopped"
        try:
            await self._server.stop()
        finally:
            self._close_placeholders()
            self._stop_done.set_result(None)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def refuse_connections(self) -> None:
        """Go down as a stopped server does, but keep the port for coming back.

        The listening socket closes (a new connect gets ECONNREFUSED) and every
        open connection ends as at a stop; a socket bound without listening holds
        the port meanwhile. Harmless when already refusing.
        """
        self._check_loop("refuse_connections")
        if self._state == "refusing":
            return
        self._require("serving", "refuse_connections")
        self._state = "refusing"
        try:
            for sock in self._server.sockets:
                self._placeholders.append(_placeholder(sock))
        finally:
            await self._server.stop()

    async def accept_connections(self) -> None:
        """Listen again on the same port after `refuse_connections()`.

        The records go on from where they were. Harmless when already serving.
        Raises OSError if the port cannot be bound again.
        """
        self._check_loop("accept_connections")
        if self._state == "serving":
            return
        self._require("refusing", "accept_connections")
        server = Server(self._serve_connection, host=self._host, port=self.port, **self._options)
        await server.start()
        self._server = server
        self._close_placeholders()
        self._state = "serving"

    # Internals.

    def _require(self, state: str, what: str) -> None:
        if self._state != state:
            raise RuntimeError(f"{what}: {self!r} is not {state}")

    def _check_loop(self, what: str) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return  # synchronous code may read the address
        if running is not loop:
            raise WrongLoopError(_wrong_loop_message(self, what))

    def _close_placeholders(self) -> None:
        for sock in self._placeholders:
            sock.close()
        self._placeholders.clear()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The handler every aioserver.Server of this test server runs: it records the
        # connection, applies the faults, and calls the user's handler.
        handler, faults = self.handler, self.faults
        live = self._recording.open(_peer(writer))
        link = _Link(
            self._recording, live, faults, reader, writer, self._options["max_message_size"]
        )
        ending = Ending.SERVER_CLOSED
        error: BaseException | None = None
        try:
            if faults.stall:
                cast(asyncio.Transport, writer.transport).pause_reading()
                await link.loop.create_future()  # until the server stops
            elif faults.close_after == 0:
                link.close_by_fault()
            else:
                rule = rule_for(handler, self._options["max_message_size"])
                if rule is not None:
                    await serve_rule(rule, link.reader, link.writer)
                else:
                    await handler(link.reader, link.writer)
                await link.flushed()
                if link.eof_seen:
                    ending = Ending.CLIENT_CLOSED
        except asyncio.CancelledError:
            ending = Ending.SERVER_STOPPED
            raise
        except (ConnectionError, ssl_module.SSLError):
            ending = Ending.CLIENT_RESET
        except asyncio.IncompleteReadError:
            ending = Ending.CLIENT_CLOSED
        except Exception as exc:
            ending, error = Ending.HANDLER_FAILED, exc
            raise  # aioserver.Server logs it
        finally:
            task = asyncio.current_task()
            if task is not None and task.cancelling() and ending is not Ending.HANDLER_FAILED:
                ending = Ending.SERVER_STOPPED
            link.discard()
            self._recording.end(live, link.fault or ending, error)


def _placeholder(listener: socket.socket) -> socket.socket:
    """A socket bound to the listener's address that never listens: it keeps the port."""
    sock = socket.socket(listener.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if listener.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(listener.getsockname())
    except BaseException:
        sock.close()
        raise
    return sock


def _wrong_loop_message(server: TestServer, what: str) -> str:
    return (
        f"{what}: {server!r} runs on the event loop it was started on, and serves "
        "only while that loop runs, but it is used from a different running loop. "
        "This happens when a fixture with a wider loop scope (for example "
        "loop_scope='module') made the server and a test on another loop uses it. "
        "Run the test on the fixture's loop, e.g. "
        "@pytest.mark.asyncio(loop_scope='module'), or use a ThreadedTestServer "
        "(the threaded_* fixtures), which any loop or thread can use."
    )


class ThreadedTestServer:
    """A `TestServer` on its own event loop in a background thread.

    For synchronous tests and clients that are not asyncio (and usable from any
    async test, whatever its loop). The interface is TestServer's, with blocking
    methods where TestServer's are async. `loop` picks the thread's event loop
    ("auto", "asyncio" or "uvloop"); the other options are TestServer's.

    `with ThreadedTestServer(handler) as server:` returns once the server accepts,
    or re-raises what made it fail to start (OSError for an address in use).
    Leaving the block (or `stop()`) stops the server on its loop as TestServer
    does, closes the loop and joins the thread: no thread, task or socket is left.
    The blocking methods raise RuntimeError when called from the server's own
    thread (a handler), where they would block the loop they wait on.
    """

    __test__ = False  # a helper, not a test class, though pytest would collect the name

    def __init__(
        self, handler: Handler = echo, *, loop: str = "auto", **options: Unpack[ServerOptions]
    ) -> None:
        self._factory = loop_factory(loop)
        self._test_server = TestServer(handler, **options)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return repr(self._test_server).replace("<TestServer", "<ThreadedTestServer", 1)

    # Where it is, and what it saw: as TestServer.

    @property
    def handler(self) -> Handler:
        """The handler for connections accepted from now on (settable at run time)."""
        return self._test_server.handler

    @handler.setter
    def handler(self, handler: Handler) -> None:
        self._test_server.handler = handler

    @property
    def faults(self) -> Faults:
        return self._test_server.faults

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server thread's loop while it runs."""
        return self._loop

    @property
    def host(self) -> str:
        return self._test_server.host

    @property
    def port(self) -> int:
        """The bound port; it stays the same while refusing. RuntimeError before start."""
        port = self._test_server._port
        if port is None:
            raise RuntimeError(f"{self!r} has no port yet: start it first")
        return port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def is_serving(self) -> bool:
        return self._test_server.is_serving

    @property
    def is_refusing(self) -> bool:
        return self._test_server.is_refusing

    @property
    def connections(self) -> list[ConnectionRecord]:
        return self._test_server.connections

    @property
    def messages(self) -> list[bytes]:
        return self._test_server.messages

    def wait_for_connections(
        self, n: int, *, timeout: float = DEFAULT_WAIT_TIMEOUT
    ) -> list[ConnectionRecord]:
        """Block until at least `n` connections were accepted; return every record.

        Raises TimeoutError after `timeout` seconds, saying how many arrived.
        """
        self._check_thread("wait_for_connections")
        self._test_server._recording.wait_blocking("connections", n, timeout)
        return self.connections

    def wait_for_messages(self, n: int, *, timeout: float = DEFAULT_WAIT_TIMEOUT) -> list[bytes]:
        """Block until at least `n` messages were received in all; return them all."""
        self._check_thread("wait_for_messages")
        self._test_server._recording.wait_blocking("messages", n, timeout)
        return self.messages

    def wait_for_closed(
        self, n: int, *, timeout: float = DEFAULT_WAIT_TIMEOUT
    ) -> list[ConnectionRecord]:
        """Block until at least `n` connections have ended; return every record."""
        self._check_thread("wait_for_closed")
        self._test_server._recording.wait_blocking("closed", n, timeout)
        return self.connections

    def refuse_connections(self) -> None:
        """As TestServer.refuse_connections(), blocking until done."""
        self._call("refuse_connections", self._test_server.refuse_connections)

    def accept_connections(self) -> None:
        """As TestServer.accept_connections(), blocking until done."""
        self._call("accept_connections", self._test_server.accept_connections)

    # Life.

    def start(self) -> Self:
        """Start the thread and return once the server accepts (or raise why not)."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r}: a ThreadedTestServer starts once")
        self._thread = threading.Thread(target=self._run, name="aioserver-test-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            error, self._error = self._error, None
            raise error
        return self

    def stop(self) -> None:
        """Stop the server on its loop, close the loop, join the thread.

        Harmless when already stopped; re-raises what went wrong in the thread.
        """
        thread = self._thread
        if thread is None:
            return
        self._check_thread("stop")
        loop, stop_requested = self._loop, self._stop_requested
        if thread.is_alive() and loop is not None and stop_requested is not None:
            # RuntimeError: the loop already closed, the thread is on its way out.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_requested.set)
        thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # The thread.

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=self._factory) as runner:
                runner.run(self._main())
        except BaseException as exc:  # reported by start() or stop()
            self._error = exc
        finally:
            self._loop = None
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        await self._test_server.start()
        try:
            self._ready.set()
            await self._stop_requested.wait()
        finally:
            await self._test_server.stop()

    def _check_thread(self, what: str) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                f"{what}: called from {self!r}'s own thread, where it would block the "
                "loop it waits on; a handler should use the TestServer methods"
            )

    def _call(self, what: str, method: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        self._check_thread(what)
        loop = self._loop
        if loop is None or self._test_server._state not in ("serving", "refusing"):
            raise RuntimeError(f"{what}: {self!r} is not running")
        return asyncio.run_coroutine_threadsafe(method(), loop).result()
