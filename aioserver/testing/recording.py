"""What a test server saw: a record per connection, and the waits on them.

The recording is written on the server's loop and read from any thread: a lock
(a `threading.Condition`) guards it, blocking waits wait on that condition, and
waits on the loop are futures resolved when the recording changes.
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


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
    """Closed by close_after (or by half_close_after on TLS, which cannot half-close)."""
    RESET_BY_FAULT = "reset by the reset fault"
    TLS_FAILED = "TLS handshake failed by the fail_tls fault"


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
    """`received` split by the server's delimiter (b"\\n" by default, as the thanks
    protocol splits it): each message with its delimiter, and a last fragment
    without one once the client has closed. With the delimiter None, each chunk
    as it was read."""
    ended: Ending | None
    """None while the connection is open."""
    error: BaseException | None = None
    """The exception that ended the handler, for Ending.HANDLER_FAILED."""
    faults: tuple[str, ...] = ()
    """The faults that applied to this connection: those switched on at its accept
    when the aim (`Faults.connections`) hit it (e.g. ("reset",)); () when none did."""

    @property
    def is_open(self) -> bool:
        return self.ended is None


class _Live:
    """The mutable record of one connection; only `_Recording` touches it."""

    __slots__ = (
        "ended",
        "error",
        "faults",
        "fragment",
        "index",
        "messages",
        "peer",
        "received",
        "sent",
    )

    def __init__(self, index: int, peer: tuple[str, int], faults: tuple[str, ...] = ()) -> None:
        self.index = index
        self.faults = faults
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
            faults=self.faults,
        )


class _Recording:
    """Every connection of one test server, and the waits on them.

    The waits take `what` ("connections", "messages" or "closed") and expect
    arguments the server has checked (`lifecycle._check_wait`).
    """

    def __init__(self, delimiter: bytes | None = b"\n") -> None:
        self._delimiter = delimiter
        self._condition = threading.Condition()
        self._connections: list[_Live] = []
        self._messages: list[bytes] = []
        self._closed = 0
        self._async_waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    # Writes, on the server's loop.

    def open(self, peer: tuple[str, int], faults: tuple[str, ...] = ()) -> _Live:
        with self._condition:
            live = _Live(len(self._connections), peer, faults)
            self._connections.append(live)
            self._changed()
        return live

    def received(self, live: _Live, data: bytes) -> None:
        with self._condition:
            live.received += data
            delimiter = self._delimiter
            if delimiter is None:
                live.messages.append(data)
                self._messages.append(data)
                self._changed()
                return
            live.fragment += data
            end = live.fragment.rfind(delimiter)
            if end >= 0:
                end += len(delimiter)
                complete = bytes(live.fragment[:end])
                del live.fragment[:end]
                messages = [part + delimiter for part in complete.split(delimiter)[:-1]]
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
        with self._condition:
            if not self._condition.wait_for(lambda: self.count(what) >= n, timeout):
                raise TimeoutError(self._timeout_message(what, n, timeout))

    def _timeout_message(self, what: str, n: int, timeout: float) -> str:
        seen = {"connections": "accepted", "messages": "received", "closed": "closed"}[what]
        noun = "closed connections" if what == "closed" else what
        with self._condition:
            count = self.count(what)
        return f"waited {timeout:g} s for {n} {noun}, but {count} {seen}"


# Transcripts: what connections received and sent, bounded, for failure reports.

TRANSCRIPT_BYTES = 2048
"""At most this many bytes each way per connection in a transcript (the first ones)."""
TRANSCRIPT_CONNECTIONS = 20
"""At most this many connections in a transcript (the last ones)."""


def _bounded(data: bytes, limit: int) -> str:
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r} ... and {len(data) - limit} more bytes"


class _Transcribed(Protocol):
    """What a transcript reads of a record (`ConnectionRecord`, `ProxyRecord`)."""

    @property
    def index(self) -> int: ...
    @property
    def peer(self) -> tuple[str, int]: ...
    @property
    def ended(self) -> enum.Enum | None: ...
    @property
    def error(self) -> BaseException | None: ...


_R = TypeVar("_R", bound=_Transcribed)


def _transcript(
    records: Sequence[_R],
    flows: Callable[[_R], Iterable[tuple[str, bytes]]],
    *,
    error_label: str = "error",
    max_bytes: int = TRANSCRIPT_BYTES,
    max_connections: int = TRANSCRIPT_CONNECTIONS,
) -> str:
    """Per connection: peer, how it ended, its `flows` (label, bytes), each bounded,
    and its error."""
    if not records:
        return "no connections"
    lines = []
    if len(records) > max_connections:
        lines.append(f"({len(records) - max_connections} earlier connections left out)")
        records = records[-max_connections:]
    for record in records:
        host, port = record.peer
        ended = "open" if record.ended is None else record.ended.value
        lines.append(f"connection #{record.index} from {host}:{port}, {ended}:")
        for label, data in flows(record):
            lines.append(f"  {label} {len(data)} bytes: {_bounded(data, max_bytes)}")
        if record.error is not None:
            lines.append(f"  {error_label}: {record.error!r}")
    return "\n".join(lines)


def _served(record: ConnectionRecord) -> tuple[tuple[str, bytes], ...]:
    """A test server's connection in a transcript: what it received and sent."""
    return (("received", record.received), ("sent", record.sent))
