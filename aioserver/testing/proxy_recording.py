"""What a `FaultProxy` saw: a record per proxied connection, and how it ended.

`_ProxyRecording` is a test server's `_Recording` (recording.py) whose
connections are `_ProxyLive`: the bytes each way, before and after the faults,
written on the proxy's loop and read from any thread as `ProxyRecord`
snapshots; its waits ("connections", "closed") are a test server's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import cast

from .recording import _Recording


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


def _carried(record: ProxyRecord) -> tuple[tuple[str, bytes], ...]:
    """A proxied connection in a transcript: what it carried each way."""
    return (
        ("from the client", record.from_client),
        ("to the service", record.to_service),
        ("from the service", record.from_service),
        ("to the client", record.to_client),
    )
