"""The faults a test server injects, and how they are applied to a connection.

`Faults` holds the switches. Each accepted connection is served through a `_Link`
between its streams and the handler: the handler gets a `_RecordingReader` and a
`_FaultyWriter`, so that every byte read is recorded and every byte written goes
through the delay and close_after faults, and a read under the reset fault resets
the connection. `_serve_with_faults` runs one connection so, and applies the faults
that act before the handler runs (stall, close_after 0).
"""

from __future__ import annotations

import asyncio
import errno
import math
import socket
import ssl as ssl_module
import struct
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

from ..protocols import Handler, rule_for, serve_rule
from .recording import Ending, _Live, _Recording

# SO_LINGER on, with a zero timeout: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


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


async def _serve_with_faults(
    handler: Handler,
    faults: Faults,
    recording: _Recording,
    max_message_size: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Serve one accepted connection with `handler`: record it, apply `faults`."""
    live = recording.open(_peer(writer))
    link = _Link(recording, live, faults, reader, writer, max_message_size)
    ending = Ending.SERVER_CLOSED
    error: BaseException | None = None
    try:
        if faults.stall:
            cast(asyncio.Transport, writer.transport).pause_reading()
            await link.loop.create_future()  # until the server stops
        elif faults.close_after == 0:
            link.close_by_fault()
        else:
            rule = rule_for(handler, max_message_size)
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
        recording.end(live, link.fault or ending, error)
