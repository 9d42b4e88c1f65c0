"""`FaultProxy`: a TCP proxy in front of any service, with faults in either direction.

A test puts the proxy between its client and a real service (its Redis, its
PostgreSQL, a server of its own) and points the client at `proxy.address`. Each
connection accepted is forwarded to the service over a connection of its own;
what flows is recorded and goes through the faults of its direction:
`proxy.upstream` (a `ProxyFaults`) for client -> service, `proxy.downstream` for
service -> client, Toxiproxy's names for the two streams. The faults are
Toxiproxy's toxics (latency with jitter, bandwidth, slicer, timeout, limit_data,
reset_peer, slow_close), each switchable while the proxy runs and aimed at
connections by an `Aim`; `refuse_connections()`, `blackhole_connections()` and
`accept_connections()` take the whole proxy down and up as Toxiproxy's "enabled"
switch does (refused), or with connects that hang.

`FaultProxy` runs on the event loop of the code that starts it;
`ThreadedFaultProxy` runs the same proxy on its own loop in a thread, for
synchronous tests and clients that are not asyncio.

How a direction is carried: its source is read as data comes, each chunk is
recorded and handed to a `_Link` (faults.py), the same code that paces a test
server's replies (delay, bandwidth, slicing, close after a number of bytes), fed
by `_Pacing`, which reads the direction's `ProxyFaults` in the link's terms. The
faults that drop data (timeout, reset_peer) act before the link; an EOF goes
through the link after the data before it, slow_close later.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import math
import random
import ssl
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self, TypedDict, TypeVar, Unpack, cast

from ..connection import Connection
from ..loops import loop_factory
from ..protocols import READ_CHUNK
from ..server import DEFAULT_MAX_CONNECTIONS
from .base import DEFAULT_WAIT_TIMEOUT, TEST_SHUTDOWN_TIMEOUT, _check_wait
from .faults import Aim, Faults, _check_count, _check_seconds, _Link, _peer
from .listener import _Listener
from .recording import (
    TRANSCRIPT_BYTES,
    TRANSCRIPT_CONNECTIONS,
    _bounded,
    _Live,
    _Recording,
)
from .server import WrongLoopError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "FaultProxy",
    "ProxyEnding",
    "ProxyFaults",
    "ProxyOptions",
    "ProxyRecord",
    "ThreadedFaultProxy",
]

_T = TypeVar("_T")

# Five seconds for the proxy's own connect to the service: a loopback connect
# takes a millisecond, and a service that does not answer in this time fails
# the connection (recorded as UPSTREAM_FAILED) well inside a test's timeout.
DEFAULT_CONNECT_TIMEOUT = 5.0
# Bytes a direction may hold back (latency, bandwidth, slicer) before the proxy
# stops reading its source until they are sent: the source is then slowed by TCP.
HIGH_WATER = 256 * 1024


# The faults of one direction.

# The faults, by name, in the order repr shows them, with their "off" values.
_OFF: dict[str, object] = {
    "latency": 0.0,
    "jitter": 0.0,
    "bandwidth": None,
    "slice_size": None,
    "slice_variation": 0,
    "slice_delay": 0.0,
    "timeout": None,
    "limit_data": None,
    "reset_peer": None,
    "slow_close": 0.0,
}


def _check_optional_seconds(name: str, value: float | None) -> float | None:
    return None if value is None else _check_seconds(name, value)


class ProxyFaults:
    """The faults of one direction of a `FaultProxy`; change them at any time, from any thread.

    `proxy.upstream` carries client -> service, `proxy.downstream` service ->
    client. Times are in seconds and sizes in bytes (Toxiproxy's are in
    milliseconds and KB). Each setting is read when data arrives, so a change
    applies from the next chunk on, to connections already open too:

    - latency, jitter: every chunk waits latency +/- jitter (drawn uniformly per
      chunk, never below 0) before it is passed on; order is kept.
    - bandwidth: bytes per second at most (paced in pieces of 1/50 s worth);
      None: unlimited.
    - slice_size, slice_variation, slice_delay: each chunk is passed on in pieces
      of slice_size bytes (+/- slice_variation, drawn per piece), slice_delay
      apart; slice_size None: not split.
    - timeout: data is dropped, and the connection is closed (both sides) this
      many seconds later; 0: dropped and never closed, a hung connection. Counted
      from the accept when on then, else from the first chunk dropped. An EOF is
      dropped too; switched off before it fires, data flows again.
    - limit_data: once this many bytes were passed on in this direction (from
      the connection's start), the connection is closed (both sides): the
      receiver gets exactly those bytes, then EOF. 0: closed at the first data.
    - reset_peer: when data arrives it is dropped, and this many seconds later
      (0: at once) both sides are reset (RST); None: off.
    - slow_close: seconds between the source's EOF and the EOF passed on.

    `connections` (an `Aim`, by default `Aim.all()`) says which connections
    these faults apply to, decided once per connection at its accept and
    counted from when it was set; a connection missed gets none of this
    direction's faults. The record of a connection names the faults that were
    on for it (`ProxyRecord.upstream_faults`, `downstream_faults`).
    """

    __slots__ = (
        "_bandwidth",
        "_connections",
        "_jitter",
        "_latency",
        "_limit_data",
        "_lock",
        "_reset_peer",
        "_seen",
        "_slice_delay",
        "_slice_size",
        "_slice_variation",
        "_slow_close",
        "_timeout",
    )

    def __init__(
        self,
        *,
        latency: float = 0.0,
        jitter: float = 0.0,
        bandwidth: int | None = None,
        slice_size: int | None = None,
        slice_variation: int = 0,
        slice_delay: float = 0.0,
        timeout: float | None = None,
        limit_data: int | None = None,
        reset_peer: float | None = None,
        slow_close: float = 0.0,
        connections: Aim | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.latency = latency
        self.jitter = jitter
        self.bandwidth = bandwidth
        self.slice_size = slice_size
        self.slice_variation = slice_variation
        self.slice_delay = slice_delay
        self.timeout = timeout
        self.limit_data = limit_data
        self.reset_peer = reset_peer
        self.slow_close = slow_close
        self.connections = connections if connections is not None else Aim.all()

    @property
    def latency(self) -> float:
        return self._latency

    @latency.setter
    def latency(self, value: float) -> None:
        self._latency = _check_seconds("latency", value)

    @property
    def jitter(self) -> float:
        return self._jitter

    @jitter.setter
    def jitter(self, value: float) -> None:
        self._jitter = _check_seconds("jitter", value)

    @property
    def bandwidth(self) -> int | None:
        return self._bandwidth

    @bandwidth.setter
    def bandwidth(self, value: int | None) -> None:
        self._bandwidth = _check_count("bandwidth", value, least=1)

    @property
    def slice_size(self) -> int | None:
        return self._slice_size

    @slice_size.setter
    def slice_size(self, value: int | None) -> None:
        self._slice_size = _check_count("slice_size", value, least=1)

    @property
    def slice_variation(self) -> int:
        return self._slice_variation

    @slice_variation.setter
    def slice_variation(self, value: int) -> None:
        if value is None:
            raise ValueError("slice_variation must be an integer >= 0, not None")
        self._slice_variation = cast(int, _check_count("slice_variation", value))

    @property
    def slice_delay(self) -> float:
        return self._slice_delay

    @slice_delay.setter
    def slice_delay(self, value: float) -> None:
        self._slice_delay = _check_seconds("slice_delay", value)

    @property
    def timeout(self) -> float | None:
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = _check_optional_seconds("timeout", value)

    @property
    def limit_data(self) -> int | None:
        return self._limit_data

    @limit_data.setter
    def limit_data(self, value: int | None) -> None:
        self._limit_data = _check_count("limit_data", value)

    @property
    def reset_peer(self) -> float | None:
        return self._reset_peer

    @reset_peer.setter
    def reset_peer(self, value: float | None) -> None:
        self._reset_peer = _check_optional_seconds("reset_peer", value)

    @property
    def slow_close(self) -> float:
        return self._slow_close

    @slow_close.setter
    def slow_close(self, value: float) -> None:
        self._slow_close = _check_seconds("slow_close", value)

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
        """At an accept: whether these faults apply to the new connection."""
        with self._lock:
            count, self._seen = self._seen, self._seen + 1
            return self._connections.hits(count)

    def _on(self) -> tuple[str, ...]:
        """The names of the faults switched on now."""
        return tuple(name for name, off in _OFF.items() if getattr(self, name) != off)

    def clear(self) -> None:
        """Switch every fault off, and aim at all connections again."""
        for name, off in _OFF.items():
            setattr(self, name, off)
        self.connections = Aim.all()

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name, off in _OFF.items()
            if getattr(self, name) != off
        )
        aim = "" if self.connections == Aim.all() else f"connections={self.connections!r}"
        return f"ProxyFaults({', '.join(part for part in (shown, aim) if part)})"


# What a direction that the aim missed gets: no fault at all.
_NO_FAULTS = ProxyFaults()
# A test server's faults, all off: what `_Pacing` answers for a fault it does not map.
_LINK_OFF = Faults()


class _Pacing:
    """One direction's `ProxyFaults` as a `_Link` reads its `Faults`.

    latency +/- jitter is the link's delay (drawn at each read, so per chunk),
    limit_data its close_after; slow_close is applied by `_Direction` to the EOF
    (the link's own slow_close acts on closing, which a proxy does not do); any
    other fault a link asks for reads as off.
    """

    def __init__(self, faults: ProxyFaults) -> None:
        self._faults = faults

    @property
    def delay(self) -> float:
        faults = self._faults
        if faults.jitter <= 0:
            return faults.latency
        return max(0.0, faults.latency + random.uniform(-faults.jitter, faults.jitter))

    @property
    def bandwidth(self) -> int | None:
        return self._faults.bandwidth

    @property
    def slice_size(self) -> int | None:
        # With a variation, `_Direction.carry` cuts the pieces, each at most this.
        size = self._faults.slice_size
        return None if size is None else size + self._faults.slice_variation

    @property
    def slice_delay(self) -> float:
        return self._faults.slice_delay

    @property
    def close_after(self) -> int | None:
        return self._faults.limit_data

    def __getattr__(self, name: str) -> Any:
        return getattr(_LINK_OFF, name)


def _vary(data: bytes, size: int, variation: int) -> list[bytes]:
    """`data` cut into pieces of size +/- variation bytes (at least 1 each)."""
    pieces = []
    start = 0
    while start < len(data):
        step = max(1, size + random.randint(-variation, variation))
        pieces.append(data[start : start + step])
        start += step
    return pieces


# What the proxy saw.


class ProxyEnding(enum.Enum):
    """How a proxied connection ended."""

    CLIENT_CLOSED = "client closed"
    """Both sides closed, the client first."""
    SERVICE_CLOSED = "service closed"
    """Both sides closed, the service first."""
    CLIENT_RESET = "client reset"
    """The client reset its connection (or went away); the service's was reset too."""
    SERVICE_RESET = "service reset"
    """The service reset its connection (or went away); the client's was reset too."""
    UPSTREAM_FAILED = "upstream connect failed"
    """The connect to the service failed or timed out (`ProxyRecord.error` says
    why); the client's connection was closed."""
    CLOSED_BY_FAULT = "closed by a fault"
    """limit_data or timeout closed both sides."""
    RESET_BY_FAULT = "reset by the reset_peer fault"
    """reset_peer reset both sides."""
    PROXY_STOPPED = "proxy stopped"
    """Ended by `stop()`, `refuse_connections()` or `blackhole_connections()`."""
    PROXY_FAILED = "proxy failed"
    """The proxy itself raised (`ProxyRecord.error`): a bug to report."""


@dataclass(frozen=True)
class ProxyRecord:
    """What one proxied connection carried, as of the moment the record was taken.

    Records are snapshots: take `proxy.connections` again to see later bytes.
    """

    index: int
    """Accept order on this proxy, from 0."""
    peer: tuple[str, int]
    """The client's address and port."""
    from_client: bytes
    """Every byte the client sent to the proxy."""
    to_service: bytes
    """Every byte passed on to the service (after the upstream faults)."""
    from_service: bytes
    """Every byte the service sent."""
    to_client: bytes
    """Every byte passed on to the client (after the downstream faults)."""
    ended: ProxyEnding | None
    """None while the connection is open."""
    error: BaseException | None = None
    """Why the connect to the service failed (UPSTREAM_FAILED), or what reset a
    side (CLIENT_RESET, SERVICE_RESET), or what the proxy raised (PROXY_FAILED)."""
    upstream_faults: tuple[str, ...] = ()
    """The upstream faults on at the accept, when the upstream aim hit this connection."""
    downstream_faults: tuple[str, ...] = ()
    """The downstream faults on at the accept, when the downstream aim hit it."""

    @property
    def is_open(self) -> bool:
        return self.ended is None


class _ProxyLive:
    """The mutable record of one proxied connection; only `_ProxyRecording` writes it."""

    __slots__ = (
        "downstream_faults",
        "ended",
        "error",
        "from_client",
        "from_service",
        "index",
        "peer",
        "to_client",
        "to_service",
        "upstream_faults",
    )

    def __init__(
        self, index: int, peer: tuple[str, int], upstream: tuple[str, ...], down: tuple[str, ...]
    ) -> None:
        self.index = index
        self.peer = peer
        self.upstream_faults = upstream
        self.downstream_faults = down
        self.from_client = bytearray()
        self.to_service = bytearray()
        self.from_service = bytearray()
        self.to_client = bytearray()
        self.ended: ProxyEnding | None = None
        self.error: BaseException | None = None

    def snapshot(self) -> ProxyRecord:
        return ProxyRecord(
            index=self.index,
            peer=self.peer,
            from_client=bytes(self.from_client),
            to_service=bytes(self.to_service),
            from_service=bytes(self.from_service),
            to_client=bytes(self.to_client),
            ended=self.ended,
            error=self.error,
            upstream_faults=self.upstream_faults,
            downstream_faults=self.downstream_faults,
        )


class _ProxyRecording(_Recording):
    """Every connection of one proxy; the waits ("connections", "closed") are a
    test server's."""

    def __init__(self) -> None:
        super().__init__(None)
        self._proxied: list[_ProxyLive] = []

    def open_proxied(
        self, peer: tuple[str, int], upstream: tuple[str, ...], downstream: tuple[str, ...]
    ) -> _ProxyLive:
        with self._condition:
            live = _ProxyLive(len(self._proxied), peer, upstream, downstream)
            self._proxied.append(live)
            self._changed()
        return live

    def add(self, live: _ProxyLive, field: str, data: bytes) -> None:
        with self._condition:
            cast(bytearray, getattr(live, field)).extend(data)

    def finish(self, live: _ProxyLive, ending: ProxyEnding, error: BaseException | None) -> None:
        with self._condition:
            live.ended = ending
            live.error = error
            self._closed += 1
            self._changed()

    def records(self) -> list[ProxyRecord]:
        with self._condition:
            return [live.snapshot() for live in self._proxied]

    def count(self, what: str) -> int:
        if what == "connections":
            return len(self._proxied)
        return super().count(what)


class _Tap:
    """Stands in for the recording of a direction's `_Link`: what it sends is
    recorded in `field` ("to_service" or "to_client")."""

    def __init__(self, recording: _ProxyRecording, field: str) -> None:
        self._recording = recording
        self._field = field

    def sent(self, live: _ProxyLive, data: bytes) -> None:
        self._recording.add(live, self._field, data)


class _ProxyLink(_Link):
    """A `_Link` carrying one direction to its destination's writer; its close by
    limit_data closes the whole proxied connection."""

    def __init__(
        self,
        proxied: _Proxied,
        faults: ProxyFaults,
        field: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        super().__init__(
            cast(_Recording, _Tap(proxied.recording, field)),
            cast(_Live, proxied.live),
            cast(Faults, _Pacing(faults)),
            reader,
            writer,
            READ_CHUNK,
        )
        self.proxied = proxied

    def close_by_fault(self) -> None:
        super().close_by_fault()
        self.proxied.finish(ProxyEnding.CLOSED_BY_FAULT)


# One proxied connection.


class _Direction:
    """One direction of a proxied connection: reads its source, passes data on
    through its link, applies the faults that drop data."""

    def __init__(
        self,
        proxied: _Proxied,
        source: str,
        faults: ProxyFaults,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proxied = proxied
        self.source = source  # "client" or "service"
        self.destination = "service" if source == "client" else "client"
        self.faults = faults
        self.reader = reader
        self.received = f"from_{source}"
        self.link = _ProxyLink(proxied, faults, f"to_{self.destination}", reader, writer)
        self.timer: asyncio.TimerHandle | None = None
        self.done = False  # the source's EOF was passed on (or dropped)

    async def pump(self) -> None:
        proxied = self.proxied
        while True:
            try:
                data = await self.reader.read(READ_CHUNK)
            except OSError as error:  # reset, or gone
                proxied.lost(self.source, error)
                return
            if not data:
                break
            self.carry(data)
            try:
                await self.pace()
            except OSError as error:
                proxied.lost(self.destination, error)
                return
        if proxied.ending is not None:
            return
        proxied.first_eof = proxied.first_eof or self.source
        if not self.dropping():
            slow_close = self.faults.slow_close
            if slow_close > 0:
                self.link.queue(None, slow_close)
            else:
                self.link.write_eof()
            await self.link.flushed()
        self.done = True
        proxied.check_done()

    def carry(self, data: bytes) -> None:
        proxied = self.proxied
        proxied.recording.add(proxied.live, self.received, data)
        if proxied.ending is not None or self.dropping():
            return
        faults, link = self.faults, self.link
        size, variation = faults.slice_size, faults.slice_variation
        if size is not None and variation > 0:
            for piece in _vary(data, size, variation):
                link.write(piece)
        else:
            link.write(data)

    def dropping(self) -> bool:
        """Whether reset_peer or timeout drops what arrives now (arming them)."""
        faults = self.faults
        reset_peer, timeout = faults.reset_peer, faults.timeout
        if reset_peer is not None:
            if reset_peer <= 0:
                self.proxied.reset_by_fault()
            elif self.timer is None:
                self.timer = self.link.loop.call_later(reset_peer, self.proxied.reset_by_fault)
            return True
        if timeout is not None:
            self.arm_timeout(timeout)
            return True
        if self.timer is not None:  # the timeout was switched off: data flows again
            self.timer.cancel()
            self.timer = None
        return False

    def arm_timeout(self, timeout: float) -> None:
        if timeout > 0 and self.timer is None:
            self.timer = self.link.loop.call_later(timeout, self.timed_out)

    def timed_out(self) -> None:
        self.timer = None
        if self.faults.timeout is not None:
            self.proxied.finish(ProxyEnding.CLOSED_BY_FAULT)

    async def pace(self) -> None:
        """Wait while too much is held back, or the destination is not taking it."""
        link = self.link
        if link.outbox and sum(len(data or b"") for _, data in link.outbox) > HIGH_WATER:
            await link.flushed()
        if not link.dead:
            await link.inner_writer.drain()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.link.discard()


class _Proxied:
    """One client's connection, carried to the service over a connection of its own."""

    def __init__(
        self,
        recording: _ProxyRecording,
        live: _ProxyLive,
        upstream: ProxyFaults,
        downstream: ProxyFaults,
    ) -> None:
        self.recording = recording
        self.live = live
        self.upstream_faults = upstream
        self.downstream_faults = downstream
        self.ending: ProxyEnding | None = None
        self.error: BaseException | None = None
        self.first_eof: str | None = None
        self.finished = asyncio.Event()
        self.directions: list[_Direction] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def run(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        address: tuple[str, int],
        connect_timeout: float,
    ) -> None:
        self.writers.append(client_writer)
        try:
            try:
                async with asyncio.timeout(connect_timeout):
                    service_reader, service_writer = await asyncio.open_connection(*address)
            except TimeoutError:
                raise TimeoutError(
                    f"connect to {address[0]}:{address[1]} timed out after {connect_timeout:g} s"
                ) from None
        except OSError as error:  # refused, unreachable, timed out, a name not found
            self.finish(ProxyEnding.UPSTREAM_FAILED, error)
            self.recording.finish(self.live, ProxyEnding.UPSTREAM_FAILED, error)
            return
        except asyncio.CancelledError:
            self.finish(ProxyEnding.PROXY_STOPPED)
            self.recording.finish(self.live, ProxyEnding.PROXY_STOPPED, None)
            raise
        self.writers.append(service_writer)
        upstream = _Direction(self, "client", self.upstream_faults, client_reader, service_writer)
        downstream = _Direction(
            self, "service", self.downstream_faults, service_reader, client_writer
        )
        self.directions = [upstream, downstream]
        for direction in self.directions:
            if direction.faults.timeout is not None:
                direction.arm_timeout(direction.faults.timeout)
        loop = asyncio.get_running_loop()
        pumps = [loop.create_task(direction.pump()) for direction in self.directions]
        try:
            await self.finished.wait()
        finally:
            self.finish(ProxyEnding.PROXY_STOPPED)  # when cancelled: stopping
            for task in pumps:
                task.cancel()
            await asyncio.wait(pumps)
            failed = [t.exception() for t in pumps if not t.cancelled() and t.exception()]
            if failed:
                self.ending, self.error = ProxyEnding.PROXY_FAILED, failed[0]
            with contextlib.suppress(Exception):
                await service_writer.wait_closed()
            ending = cast(ProxyEnding, self.ending)
            self.recording.finish(self.live, ending, self.error)
        if failed:
            raise cast(BaseException, failed[0])  # aioserver.Server logs it

    # The ways to end, each closing (or resetting) both sides once.

    def check_done(self) -> None:
        """After an EOF was passed on: both sides closed, the connection ends."""
        if all(direction.done for direction in self.directions):
            first = self.first_eof
            self.finish(
                ProxyEnding.CLIENT_CLOSED if first == "client" else ProxyEnding.SERVICE_CLOSED
            )

    def lost(self, side: str, error: BaseException) -> None:
        """A side reset (or failed): reset the other side."""
        ending = ProxyEnding.CLIENT_RESET if side == "client" else ProxyEnding.SERVICE_RESET
        self.finish(ending, error, reset="service" if side == "client" else "client")

    def reset_by_fault(self) -> None:
        self.finish(ProxyEnding.RESET_BY_FAULT, reset="both")

    def finish(
        self, ending: ProxyEnding, error: BaseException | None = None, reset: str = ""
    ) -> None:
        """End: drop what is held back, close both sides (or reset `reset`:
        "client", "service" or "both"). Only the first call counts."""
        if self.ending is not None:
            return
        self.ending, self.error = ending, error
        for direction in self.directions:
            direction.stop()
        for direction in self.directions:
            link = direction.link
            if reset in ("both", direction.destination) and not link.inner_writer.is_closing():
                link.reset()  # SO_LINGER 0 and abort: an RST
        for writer in self.writers:
            writer.close()
        self.finished.set()


# The proxy.


class ProxyOptions(TypedDict, total=False):
    """The keyword options of `FaultProxy`, for factories that pass them on."""

    upstream: ProxyFaults | None
    downstream: ProxyFaults | None
    host: str
    port: int
    connect_timeout: float
    max_connections: int
    shutdown_timeout: float


def _parse_address(address: tuple[str, int] | str) -> tuple[str, int]:
    if isinstance(address, str):
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"the service's address must be 'host:port', not {address!r}")
        return host.strip("[]"), int(port)
    if (
        isinstance(address, tuple | list)
        and len(address) >= 2
        and isinstance(address[0], str)
        and isinstance(address[1], int)
    ):
        return address[0], address[1]
    raise ValueError(f"the service's address must be (host, port) or 'host:port', not {address!r}")


def _no_tls(connection: Connection) -> ssl.SSLContext:
    # The listener's TLS chooser, never called: a proxy listens without TLS and
    # carries a TLS session's bytes as they are.
    raise RuntimeError("a FaultProxy listens without TLS")


class _FaultProxyBase:
    """What FaultProxy and ThreadedFaultProxy share: options, faults, state,
    records, and the coroutines that change the state on the proxy's loop.

    State: "new" -> "starting" -> "serving" <-> "refusing" or "blackholing" -> "stopped".
    """

    _kind: ClassVar[str] = "FaultProxy"

    def __init__(
        self,
        upstream_address: tuple[str, int] | str,
        *,
        upstream: ProxyFaults | None = None,
        downstream: ProxyFaults | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        shutdown_timeout: float = TEST_SHUTDOWN_TIMEOUT,
    ) -> None:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"host must be an IP address such as 127.0.0.1, not {host!r}"
            ) from None
        if (
            not isinstance(connect_timeout, int | float)
            or not math.isfinite(connect_timeout)
            or connect_timeout <= 0
        ):
            raise ValueError(
                f"connect_timeout must be a number of seconds > 0, not {connect_timeout!r}"
            )
        self._upstream_address = _parse_address(upstream_address)
        self._upstream = upstream if upstream is not None else ProxyFaults()
        self._downstream = downstream if downstream is not None else ProxyFaults()
        self._connect_timeout = float(connect_timeout)
        self._options: dict[str, Any] = {
            "max_connections": max_connections,
            "idle_timeout": None,  # a connection lives as long as its two ends want
            "shutdown_timeout": shutdown_timeout,
            "reuse_port": True,  # lets a placeholder hold the port while refusing
        }
        self._listener = _Listener(self._proxy_connection, _no_tls, host, port, self._options)
        self._host = host
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"
        self._recording = _ProxyRecording()
        self._stop_done: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}" if self._port is not None else self._host
        service = "{}:{}".format(*self._upstream_address)
        return f"<{self._kind} {where} -> {service} {self._state}>"

    # The faults, switchable at run time (and replaceable, for new connections).

    @property
    def upstream(self) -> ProxyFaults:
        """The faults on what the client sends to the service."""
        return self._upstream

    @upstream.setter
    def upstream(self, faults: ProxyFaults) -> None:
        self._upstream = faults

    @property
    def downstream(self) -> ProxyFaults:
        """The faults on what the service sends to the client."""
        return self._downstream

    @downstream.setter
    def downstream(self, faults: ProxyFaults) -> None:
        self._downstream = faults

    # Where it is.

    @property
    def upstream_address(self) -> tuple[str, int]:
        """The service's (host, port), where each connection is forwarded."""
        return self._upstream_address

    @property
    def connect_timeout(self) -> float:
        """Seconds the proxy's connect to the service may take before it fails."""
        return self._connect_timeout

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port; it stays the same while refusing and after accept_connections.

        Raises RuntimeError before start.
        """
        if self._port is None:
            raise RuntimeError(f"{self!r} has no port yet: start it first")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to point the client at."""
        return self.host, self.port

    @property
    def is_serving(self) -> bool:
        """True while accepting: started, not refusing, not stopped."""
        return self._state == "serving"

    @property
    def is_refusing(self) -> bool:
        return self._state == "refusing"

    @property
    def is_blackholing(self) -> bool:
        return self._state == "blackholing"

    # What it saw.

    @property
    def connections(self) -> list[ProxyRecord]:
        """A record of every connection accepted so far, in accept order."""
        return self._recording.records()

    def transcript(self) -> str:
        """What each connection carried each way: 2 KiB each, the last 20 connections."""
        records = self.connections
        lines = [f"{self!r}, {len(records)} connection(s):"]
        if not records:
            lines.append("no connections")
        elif len(records) > TRANSCRIPT_CONNECTIONS:
            lines.append(f"({len(records) - TRANSCRIPT_CONNECTIONS} earlier connections left out)")
            records = records[-TRANSCRIPT_CONNECTIONS:]
        for record in records:
            host, port = record.peer
            ended = "open" if record.ended is None else record.ended.value
            lines.append(f"connection #{record.index} from {host}:{port}, {ended}:")
            for label, data in (
                ("from the client", record.from_client),
                ("to the service", record.to_service),
                ("from the service", record.from_service),
                ("to the client", record.to_client),
            ):
                lines.append(f"  {label} {len(data)} bytes: {_bounded(data, TRANSCRIPT_BYTES)}")
            if record.error is not None:
                lines.append(f"  error: {record.error!r}")
        return "\n".join(lines)

    # Life, on the proxy's loop.

    async def _start_serving(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"{self!r}: a {self._kind} starts once")
        self._loop = asyncio.get_running_loop()
        self._state = "starting"
        try:
            self._host, self._port = await self._listener.start()
        except BaseException:
            self._state = "stopped"
            raise
        self._state = "serving"

    async def _stop_serving(self) -> None:
        if self._stop_done is not None:
            await asyncio.shield(self._stop_done)
            return
        self._stop_done = asyncio.get_running_loop().create_future()
        self._state = "stopped"
        try:
            await self._listener.stop()
        finally:
            self._stop_done.set_result(None)

    async def _refuse_connections(self) -> None:
        if self._state == "refusing":
            return
        self._require("serving", "refuse_connections")
        self._state = "refusing"
        await self._listener.refuse()

    async def _blackhole_connections(self) -> None:
        if self._state == "blackholing":
            return
        self._require("serving", "blackhole_connections")
        self._state = "blackholing"
        await self._listener.blackhole()

    async def _accept_connections(self) -> None:
        if self._state == "serving":
            return
        if self._state != "blackholing":
            self._require("refusing", "accept_connections")
        await self._listener.listen_again(self._host, self.port)
        self._state = "serving"

    def _require(self, state: str, what: str) -> None:
        if self._state != state:
            raise RuntimeError(f"{what}: {self!r} is not {state}")

    async def _proxy_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The handler of every aioserver.Server of this proxy: aim, record, forward.
        upstream = self._upstream if self._upstream._aim_next() else _NO_FAULTS
        downstream = self._downstream if self._downstream._aim_next() else _NO_FAULTS
        live = self._recording.open_proxied(_peer(writer), upstream._on(), downstream._on())
        proxied = _Proxied(self._recording, live, upstream, downstream)
        await proxied.run(reader, writer, self._upstream_address, self._connect_timeout)


class FaultProxy(_FaultProxyBase):
    """A TCP proxy to `upstream_address` on the running event loop, with faults.

    `upstream_address` is the service's (host, port) or "host:port". Use it as
    `async with FaultProxy(service_address) as proxy:` and point the client at
    `proxy.address` (127.0.0.1 and an ephemeral port by default; `host` and
    `port` choose). Each connection accepted is forwarded to the service over a
    new connection, made within `connect_timeout` seconds (DEFAULT_CONNECT_TIMEOUT)
    or the client's connection is closed and recorded as UPSTREAM_FAILED with
    the reason. EOFs are passed on each way (a half-close stays one), a reset on
    one side resets the other, and once both sides closed the connection ends.

    `proxy.upstream` and `proxy.downstream` (`ProxyFaults`, also options) hold the
    faults of each direction, switchable at any time; `refuse_connections()`,
    `blackhole_connections()` and `accept_connections()` take the proxy down
    (refused, or connects that hang) and up again on the same port.
    `proxy.connections` lists a `ProxyRecord` per connection: the bytes each
    way, before and after the faults, and how it ended.

    The proxy lives on the loop that started it; using it from another running
    loop raises WrongLoopError. Leaving the block (or `stop()`) closes the
    listening socket and every connection on both sides, and leaves no task
    behind; calling it again is harmless. The records stay readable.
    """

    _kind: ClassVar[str] = "FaultProxy"

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the proxy runs on (None before start)."""
        return self._loop

    @property
    def port(self) -> int:
        """The bound port; it stays the same while refusing and after accept_connections.

        Raises WrongLoopError from a loop other than the proxy's, and RuntimeError
        before start.
        """
        self._check_loop("port")
        return super().port

    async def wait_for_connections(
        self,
        n: int,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,  # noqa: ASYNC109
    ) -> list[ProxyRecord]:
        """Wait until at least `n` connections were accepted; return every record.

        Raises TimeoutError after `timeout` seconds, saying how many arrived.
        """
        self._check_loop("wait_for_connections")
        _check_wait(n, timeout)
        await self._recording.wait("connections", n, timeout)
        return self.connections

    async def wait_for_closed(
        self,
        n: int,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,  # noqa: ASYNC109
    ) -> list[ProxyRecord]:
        """Wait until at least `n` connections have ended; return every record.

        Raises TimeoutError after `timeout` seconds, saying how many ended.
        """
        self._check_loop("wait_for_closed")
        _check_wait(n, timeout)
        await self._recording.wait("closed", n, timeout)
        return self.connections

    async def start(self) -> Self:
        """Bind and start accepting. Raises OSError when the address is taken."""
        await self._start_serving()
        return self

    async def stop(self) -> None:
        """Close the listening socket and every connection (ProxyEnding.PROXY_STOPPED
        unless it ended already); harmless when already stopped."""
        self._check_loop("stop")
        await self._stop_serving()

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
        """Go down, keeping the port: new connects are refused (Toxiproxy's disabled
        proxy), and open connections end as at a stop. Harmless when already so."""
        self._check_loop("refuse_connections")
        await self._refuse_connections()

    async def blackhole_connections(self) -> None:
        """Go down as `refuse_connections()` does, but new connects hang (in
        SYN-SENT, until the client's connect timeout or `accept_connections()`),
        as TestServer.blackhole_connections() does. Harmless when already so."""
        self._check_loop("blackhole_connections")
        await self._blackhole_connections()

    async def accept_connections(self) -> None:
        """Listen again on the same port; harmless when already serving."""
        self._check_loop("accept_connections")
        await self._accept_connections()

    def _check_loop(self, what: str) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return  # synchronous code may read the address
        if running is not loop:
            raise WrongLoopError(
                f"{what}: {self!r} runs on the event loop it was started on, and forwards "
                "only while that loop runs, but it is used from a different running loop "
                "(a fixture with a wider loop scope made it?). Run the test on the "
                "proxy's loop, or use a ThreadedFaultProxy, which any loop or thread can use."
            )


class ThreadedFaultProxy(_FaultProxyBase):
    """A `FaultProxy` on its own event loop in a background thread.

    For synchronous tests and clients that are not asyncio (and usable from any
    async test, whatever its loop). The interface is FaultProxy's, with blocking
    methods where FaultProxy's are async; the faults are set from any thread.
    `loop` picks the thread's event loop ("auto", "asyncio" or "uvloop").

    `with ThreadedFaultProxy(service_address) as proxy:` returns once the proxy
    accepts, or re-raises what made it fail to start. Leaving the block (or
    `stop()`) stops the proxy on its loop, closes the loop and joins the thread.
    """

    _kind: ClassVar[str] = "ThreadedFaultProxy"

    def __init__(
        self,
        upstream_address: tuple[str, int] | str,
        *,
        loop: str = "auto",
        **options: Unpack[ProxyOptions],
    ) -> None:
        self._factory = loop_factory(loop)
        super().__init__(upstream_address, **options)
        self._thread: threading.Thread | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The proxy thread's loop while it runs."""
        return self._loop

    def wait_for_connections(
        self, n: int, *, timeout: float = DEFAULT_WAIT_TIMEOUT
    ) -> list[ProxyRecord]:
        """Block until at least `n` connections were accepted; return every record."""
        self._check_thread("wait_for_connections")
        _check_wait(n, timeout)
        self._recording.wait_blocking("connections", n, timeout)
        return self.connections

    def wait_for_closed(
        self, n: int, *, timeout: float = DEFAULT_WAIT_TIMEOUT
    ) -> list[ProxyRecord]:
        """Block until at least `n` connections have ended; return every record."""
        self._check_thread("wait_for_closed")
        _check_wait(n, timeout)
        self._recording.wait_blocking("closed", n, timeout)
        return self.connections

    def refuse_connections(self) -> None:
        """As FaultProxy.refuse_connections(), blocking until done."""
        self._call("refuse_connections", self._refuse_connections)

    def blackhole_connections(self) -> None:
        """As FaultProxy.blackhole_connections(), blocking until done."""
        self._call("blackhole_connections", self._blackhole_connections)

    def accept_connections(self) -> None:
        """As FaultProxy.accept_connections(), blocking until done."""
        self._call("accept_connections", self._accept_connections)

    def start(self) -> Self:
        """Start the thread and return once the proxy accepts (or raise why not)."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r}: a ThreadedFaultProxy starts once")
        self._thread = threading.Thread(target=self._run, name="aioserver-fault-proxy", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            error, self._error = self._error, None
            raise error
        return self

    def stop(self) -> None:
        """Stop the proxy on its loop, close the loop, join the thread; harmless
        when already stopped. Re-raises what went wrong in the thread."""
        thread = self._thread
        if thread is None:
            return
        self._check_thread("stop")
        loop, stop_requested = self._loop, self._stop_requested
        if thread.is_alive() and loop is not None and stop_requested is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed already
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
        self._stop_requested = asyncio.Event()
        await self._start_serving()
        try:
            self._ready.set()
            await self._stop_requested.wait()
        finally:
            await self._stop_serving()

    def _check_thread(self, what: str) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                f"{what}: called from {self!r}'s own thread, where it would block the "
                "loop it waits on"
            )

    def _call(self, what: str, method: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        self._check_thread(what)
        loop = self._loop
        if loop is None or not (self.is_serving or self.is_refusing or self.is_blackholing):
            raise RuntimeError(f"{what}: {self!r} is not running")
        return asyncio.run_coroutine_threadsafe(method(), loop).result()
