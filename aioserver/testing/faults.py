"""The faults a test server injects, and how they are applied to a connection.

`Faults` holds the switches. Each accepted connection is served through a `_Link`
between its streams and the handler: the handler gets a `_RecordingReader` and a
`_FaultyWriter`, so that every byte read is recorded and every byte written goes
through the delay, bandwidth, slicer, close_after and half_close_after faults, a
close through slow_close, and a read under the reset fault resets the connection.
`_serve_with_faults` runs one connection so: it decides by the aim (`Aim`) whether
the faults apply to it, and applies the faults that act before the handler runs
(stall, close_after 0, half_close_after 0) or after it (slow_close).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import math
import random
import socket
import ssl as ssl_module
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Generic, TypeVar, cast, overload

from ..protocols import Handler, rule_for, serve_rule
from .recording import Ending, _Live, _Recording

# SO_LINGER on, with a zero timeout: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)
# The bandwidth fault sends in pieces of this fraction of a second's worth.
PACES_PER_SECOND = 50
# How often a stalled connection's socket is looked at for the client's close.
STALL_POLL = 0.02
# Linux TCP states (tcp_states.h), as TCP_INFO's first byte gives them.
_TCP_CLOSE = 7
_TCP_CLOSE_WAIT = 8


class Aim:
    """Which connections the faults apply to; decided once per connection, at accept.

    Make one with `Aim.all()` (every connection: the default), `Aim.first(n)`
    (the first n), `Aim.nth(k)` (only the k-th, counting from 1) or
    `Aim.probability(p, seed=None)` (each with probability p; with a seed the
    pattern is the same on every run). Connections are counted from when the aim
    was set on a `Faults` (or the `Faults` was made): setting `faults.connections`
    again starts the count over, so `server.faults.connections = Aim.first(1)` in
    the middle of a test means "the next connection".
    """

    __slots__ = ("_kind", "_n", "_p", "_seed")

    def __init__(self, kind: str = "all", n: int = 0, p: float = 1.0, seed: int | None = None):
        self._kind = kind
        self._n = n
        self._p = p
        self._seed = seed

    @classmethod
    def all(cls) -> Aim:
        """Every connection (the default)."""
        return cls()

    @classmethod
    def first(cls, n: int) -> Aim:
        """The first `n` connections, then none: `first(1)` fails once, then behaves."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"first(n) takes an integer >= 0, not {n!r}")
        return cls("first", n=n)

    @classmethod
    def nth(cls, k: int) -> Aim:
        """Only the k-th connection, counting from 1."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"nth(k) takes an integer >= 1, not {k!r}")
        return cls("nth", n=k)

    @classmethod
    def probability(cls, p: float, *, seed: int | None = None) -> Aim:
        """Each connection with probability `p` (0 to 1); a seed makes it repeatable."""
        if not isinstance(p, int | float) or not 0 <= p <= 1:
            raise ValueError(f"probability(p) takes a number from 0 to 1, not {p!r}")
        return cls("probability", p=float(p), seed=seed)

    def hits(self, count: int) -> bool:
        """Whether the connection numbered `count` (from 0, since the aim was set) is hit."""
        if self._kind == "first":
            return count < self._n
        if self._kind == "nth":
            return count == self._n - 1
        if self._kind == "probability":
            if self._seed is None:
                return random.random() < self._p
            return random.Random(f"{self._seed}/{count}").random() < self._p
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Aim):
            return NotImplemented
        return (self._kind, self._n, self._p, self._seed) == (
            other._kind,
            other._n,
            other._p,
            other._seed,
        )

    def __hash__(self) -> int:
        return hash((self._kind, self._n, self._p, self._seed))

    def __repr__(self) -> str:
        if self._kind == "first":
            return f"Aim.first({self._n})"
        if self._kind == "nth":
            return f"Aim.nth({self._n})"
        if self._kind == "probability":
            return f"Aim.probability({self._p!r}, seed={self._seed!r})"
        return "Aim.all()"


def _check_seconds(name: str, value: float) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


def _check_count(name: str, value: int | None, *, least: int = 0) -> int | None:
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or value < least
    ):
        raise ValueError(f"{name} must be None or an integer >= {least}, not {value!r}")
    return value


_V = TypeVar("_V")


class _Setting(Generic[_V]):
    """One switch of a `_Switches`: `check(name, value)` validates each value set,
    kept in the slot "_<name>"."""

    def __init__(self, check: Callable[[str, Any], _V]) -> None:
        self._check = check
        self._name = self._slot = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name, self._slot = name, f"_{name}"

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Setting[_V]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _V: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> _V | _Setting[_V]:
        if obj is None:
            return self
        return cast(_V, getattr(obj, self._slot))

    def __set__(self, obj: object, value: _V) -> None:
        setattr(obj, self._slot, self._check(self._name, value))


def _seconds() -> _Setting[float]:
    """A switch of seconds >= 0."""
    return _Setting(_check_seconds)


def _count(*, least: int = 0) -> _Setting[int | None]:
    """A switch of None or an integer >= least."""
    return _Setting(functools.partial(_check_count, least=least))


class _Switches:
    """Switches aimed at connections by an `Aim`: what `Faults` and `ProxyFaults` share.

    `_off` names the switches, in the order repr shows them, with their "off"
    values; a subclass's `__init__` sets `connections` after the switches.
    """

    __slots__ = ("_connections", "_lock", "_seen")
    _off: ClassVar[dict[str, object]] = {}

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @property
    def connections(self) -> Aim:
        """Which connections the faults apply to; setting it starts the count over."""
        return self._connections

    @connections.setter
    def connections(self, aim: Aim) -> None:
        if not isinstance(aim, Aim):
            raise ValueError(f"connections must be an Aim, not {aim!r}")
        with self._lock:
            self._connections = aim
            self._seen = 0

    def _aim_next(self) -> bool:
        """At an accept: whether the faults apply to this new connection."""
        with self._lock:
            count, self._seen = self._seen, self._seen + 1
            return self._connections.hits(count)

    def _on(self) -> tuple[str, ...]:
        """The names of the faults switched on now."""
        return tuple(name for name, off in self._off.items() if getattr(self, name) != off)

    def clear(self) -> None:
        """Switch every fault off, and aim at all connections again."""
        for name, off in self._off.items():
            setattr(self, name, off)
        self.connections = Aim.all()


class Faults(_Switches):
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
      fill the kernel buffers and block. Stays so for the connection's life. The
      server still notices (on Linux, by polling the socket's TCP state) when the
      client resets, or closes and its FIN arrives (it does once what the client
      sent fits in the server's receive buffer): the connection then ends as
      CLIENT_RESET or CLIENT_CLOSED, with nothing received.
    - bandwidth: bytes per second at most for what the server sends (paced in
      pieces of 1/50 s worth), None: unlimited.
    - slice_size, slice_delay: each write is split into pieces of at most
      slice_size bytes, sent slice_delay seconds apart (None: not split).
    - half_close_after: once this many bytes have been sent, the server sends EOF
      (shutdown of its sending side) and drops later writes, but goes on reading
      and recording. 0: EOF at once. On TLS connections, which cannot half-close,
      the connection is closed instead.
    - slow_close: seconds the server waits before it closes a connection, after
      the handler closed or returned: the client gets its replies, then EOF that
      much later.
    - fail_tls: on a server with `ssl`, the TLS handshake fails: the server
      answers the client's hello with a handshake_failure alert and closes, and
      the handler never runs. The connection is recorded, with nothing received,
      as ended TLS_FAILED when its handshake begins. No effect without `ssl`.

    `connections` (an `Aim`, by default `Aim.all()`) says which connections the
    faults apply to, decided once per connection at accept; a connection missed
    gets no fault at all, and `ConnectionRecord.faults` names the faults that were
    on for a connection hit. Refusing connections, or having connects hang, are
    methods of the server: `refuse_connections()`, `blackhole_connections()`.
    """

    __slots__ = (
        "_bandwidth",
        "_close_after",
        "_delay",
        "_half_close_after",
        "_slice_delay",
        "_slice_size",
        "_slow_close",
        "fail_tls",
        "reset",
        "stall",
    )
    # The switches, each checked when set (kept in the slots above).
    delay = _seconds()
    close_after = _count()
    bandwidth = _count(least=1)
    slice_size = _count(least=1)
    slice_delay = _seconds()
    half_close_after = _count()
    slow_close = _seconds()
    # The faults, by name, in the order repr shows them, with their "off" values.
    _off: ClassVar[dict[str, object]] = {
        "delay": 0.0,
        "close_after": None,
        "reset": False,
        "stall": False,
        "bandwidth": None,
        "slice_size": None,
        "slice_delay": 0.0,
        "half_close_after": None,
        "slow_close": 0.0,
        "fail_tls": False,
    }

    def __init__(
        self,
        *,
        delay: float = 0.0,
        close_after: int | None = None,
        reset: bool = False,
        stall: bool = False,
        bandwidth: int | None = None,
        slice_size: int | None = None,
        slice_delay: float = 0.0,
        half_close_after: int | None = None,
        slow_close: float = 0.0,
        fail_tls: bool = False,
        connections: Aim | None = None,
    ) -> None:
        super().__init__()
        self.delay = delay
        self.close_after = close_after
        self.reset = reset
        self.stall = stall
        self.bandwidth = bandwidth
        self.slice_size = slice_size
        self.slice_delay = slice_delay
        self.half_close_after = half_close_after
        self.slow_close = slow_close
        self.fail_tls = fail_tls
        self.connections = connections if connections is not None else Aim.all()

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in list(self._off)[:4])
        extra = "".join(
            f", {name}={getattr(self, name)!r}"
            for name, off in list(self._off.items())[4:]
            if getattr(self, name) != off
        )
        aim = "" if self.connections == Aim.all() else f", connections={self.connections!r}"
        return f"Faults({shown}{extra}{aim})"


# What a connection that the aim missed sees: no fault at all.
_NO_FAULTS = Faults()


def aimed(faults: Faults) -> Faults:
    """For a new connection: `faults` if their aim hits it, else no faults."""
    return faults if faults._aim_next() else _NO_FAULTS


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
        self.half_closed = False
        self.fault: Ending | None = None
        # Delayed writes: (when due, data or None for write_eof), due times ascending.
        self.outbox: deque[tuple[float, bytes | None]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        # The loop time before which nothing more may be sent (bandwidth, slicer).
        self.paced_until = 0.0
        self.flush_waiters: list[asyncio.Future[None]] = []
        # slow_close: the timer that closes, and what waits for it.
        self.slow_timer: asyncio.TimerHandle | None = None
        self.slow_done: asyncio.Future[None] | None = None
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
        if self.dead or self.half_closed or not data:
            return
        faults = self.faults
        delay, bandwidth, size = faults.delay, faults.bandwidth, faults.slice_size
        now = self.loop.time()
        if (
            delay <= 0
            and bandwidth is None
            and size is None
            and not self.outbox
            and now >= self.paced_until
        ):
            self.emit(data)
            return
        due = max(now + delay, self.paced_until)
        if self.outbox:
            due = max(due, self.outbox[-1][0])
        step = size or len(data)
        if bandwidth is not None:
            step = min(step, max(1, bandwidth // PACES_PER_SECOND))
        gap = faults.slice_delay if size is not None else 0.0
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            self.outbox.append((due, piece))
            if bandwidth is not None:
                due += len(piece) / bandwidth
            due += gap
        self.paced_until = due
        if self.timer is None:
            self.arm()

    def write_eof(self) -> None:
        if self.dead or self.half_closed:
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
                if not self.half_closed:
                    self.inner_writer.write_eof()
            else:
                self.emit(data)
        if self.outbox and not self.dead:
            self.arm()
            return
        self.wake_flush_waiters()
        if self.closing and not self.dead:
            self.close_inner()

    def emit(self, data: bytes) -> None:
        if self.half_closed:
            return
        faults = self.faults
        close_after, half_close_after = faults.close_after, faults.half_close_after
        for limit in (close_after, half_close_after):
            if limit is not None:
                data = data[: max(limit - self.sent, 0)]
        if data:
            self.sent += len(data)
            self.inner_writer.write(data)
            self.recording.sent(self.live, data)
        if close_after is not None and self.sent >= close_after:
            self.close_by_fault()
        elif half_close_after is not None and self.sent >= half_close_after:
            self.half_close()

    def half_close(self) -> None:
        """The half_close_after fault: EOF to the client, later writes dropped."""
        if not self.inner_writer.can_write_eof():
            self.close_by_fault()  # TLS cannot half-close
            return
        self.half_closed = True
        self.discard()
        self.inner_writer.write_eof()

    def close(self) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            self.discard()  # stopping: replies not yet due are dropped
        self.closing = True
        if not self.outbox:
            self.close_inner()

    def close_inner(self) -> None:
        """Close the connection, after the slow_close delay if there is one."""
        task = asyncio.current_task()
        stopping = task is not None and task.cancelling()
        if self.faults.slow_close <= 0 or self.dead or stopping:
            self.inner_writer.close()
            return
        if self.slow_timer is None and self.slow_done is None:
            self.slow_done = self.loop.create_future()
            self.slow_timer = self.loop.call_later(self.faults.slow_close, self.slow_closed)

    def slow_closed(self) -> None:
        self.slow_timer = None
        self.inner_writer.close()
        if self.slow_done is not None and not self.slow_done.done():
            self.slow_done.set_result(None)

    async def close_slowly(self) -> None:
        """At the handler's end: under slow_close, close after the delay (and wait)."""
        if self.dead or self.faults.slow_close <= 0 or self.inner_writer.is_closing():
            if self.slow_done is not None:
                await self.slow_done
            return
        self.closing = True
        if not self.outbox:
            self.close_inner()
        if self.slow_done is not None:
            await self.slow_done

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

    def stop_slow_close(self) -> None:
        """At the connection's end: a slow close still pending is cancelled."""
        if self.slow_timer is not None:
            self.slow_timer.cancel()
            self.slow_timer = None
        if self.slow_done is not None and not self.slow_done.done():
            self.slow_done.cancel()

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


def _peer(writer: asyncio.StreamWriter | asyncio.BaseTransport) -> tuple[str, int]:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple | list) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return "", 0


async def _watch_stalled(writer: asyncio.StreamWriter) -> Ending:
    """Under stall: without reading, wait until the client closes or resets.

    Looks at the socket's TCP state (Linux's TCP_INFO) every STALL_POLL seconds:
    CLOSE_WAIT (the client's FIN arrived) is a close, CLOSE or a socket error a
    reset. Where TCP_INFO is missing, waits until the server stops.
    """
    loop = asyncio.get_running_loop()
    sock = writer.get_extra_info("socket")
    tcp_info = getattr(socket, "TCP_INFO", None)
    if sock is None or tcp_info is None:
        await loop.create_future()  # until the server stops
    while True:
        await asyncio.sleep(STALL_POLL)
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 8)[0]
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return Ending.CLIENT_RESET
        if error or state == _TCP_CLOSE:
            return Ending.CLIENT_RESET
        if state == _TCP_CLOSE_WAIT:
            return Ending.CLIENT_CLOSED


async def _serve_with_faults(
    handler: Handler,
    faults: Faults,
    recording: _Recording,
    max_message_size: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    active: Faults | None = None,
) -> None:
    """Serve one accepted connection with `handler`: record it, apply `faults`.

    Whether the faults apply is decided once, by `faults.connections`: here, or
    before the TLS handshake (then `active` is the decision: `faults`, or no
    faults); a connection they miss is served as if every fault were off.
    """
    if active is None:
        active = aimed(faults)
    live = recording.open(_peer(writer), active._on())
    link = _Link(recording, live, active, reader, writer, max_message_size)
    ending = Ending.SERVER_CLOSED
    error: BaseException | None = None
    try:
        if active.stall:
            cast(asyncio.Transport, writer.transport).pause_reading()
            ending = await _watch_stalled(writer)
        elif active.close_after == 0:
            link.close_by_fault()
        else:
            if active.half_close_after == 0:
                link.half_close()
            rule = rule_for(handler, max_message_size)
            if rule is not None:
                await serve_rule(rule, link.reader, link.writer)
            else:
                await handler(link.reader, link.writer)
            await link.flushed()
            await link.close_slowly()
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
        link.stop_slow_close()
        recording.end(live, link.fault or ending, error)
