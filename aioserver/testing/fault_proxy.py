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

The proxy is a `_ListeningBase` (lifecycle.py) whose listener hands each
connection to a `_Proxied` (proxied.py), which carries it through the faults
of its `ProxyFaults` (proxy_faults.py) and records it (proxy_recording.py).
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Sequence
from typing import Any, ClassVar, TypedDict, Unpack

from ..connection import Connection
from ..server import DEFAULT_MAX_CONNECTIONS
from .faults import _peer
from .in_loop import _InLoop
from .in_thread import _Threaded
from .lifecycle import TEST_SHUTDOWN_TIMEOUT, _ListeningBase
from .proxied import _Proxied
from .proxy_faults import _NO_FAULTS, ProxyFaults
from .proxy_recording import ProxyRecord, _carried, _ProxyRecording
from .recording import _transcript

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "FaultProxy",
    "ProxyOptions",
    "ThreadedFaultProxy",
]

# Five seconds for the proxy's own connect to the service: a loopback connect
# takes a millisecond, and a service that does not answer in this time fails
# the connection (recorded as UPSTREAM_FAILED) well inside a test's timeout.
DEFAULT_CONNECT_TIMEOUT = 5.0


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


class _FaultProxyBase(_ListeningBase[ProxyRecord]):
    """What FaultProxy and ThreadedFaultProxy share: the service's address, the
    faults of each direction, and the handler that proxies each connection (the
    state, the listener and the records are `_ListeningBase`'s)."""

    _kind: ClassVar[str] = "FaultProxy"
    _recording: _ProxyRecording

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
        options: dict[str, Any] = {
            "max_connections": max_connections,
            "idle_timeout": None,  # a connection lives as long as its two ends want
            "shutdown_timeout": shutdown_timeout,
            "reuse_port": True,  # lets a placeholder hold the port while refusing
        }
        super().__init__(self._proxy_connection, _no_tls, host, port, options, _ProxyRecording())
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

    def _describe(self) -> str:
        return "{} -> {}:{}".format(self._where(), *self._upstream_address)

    def _records(self) -> list[ProxyRecord]:
        return self._recording.records()

    def _transcribe(self, records: Sequence[ProxyRecord]) -> str:
        return _transcript(records, _carried)

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

    # Where it forwards to.

    @property
    def upstream_address(self) -> tuple[str, int]:
        """The service's (host, port), where each connection is forwarded."""
        return self._upstream_address

    @property
    def connect_timeout(self) -> float:
        """Seconds the proxy's connect to the service may take before it fails."""
        return self._connect_timeout

    # Proxying a connection, on the proxy's loop.

    async def _proxy_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The handler of every aioserver.Server of this proxy: aim, record, forward.
        upstream = self._upstream if self._upstream._aim_next() else _NO_FAULTS
        downstream = self._downstream if self._downstream._aim_next() else _NO_FAULTS
        live = self._recording.open_proxied(_peer(writer), upstream._on(), downstream._on())
        proxied = _Proxied(self._recording, live, upstream, downstream)
        await proxied.run(reader, writer, self._upstream_address, self._connect_timeout)


class FaultProxy(_InLoop[ProxyRecord], _FaultProxyBase):
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
    _threaded_form: ClassVar[str] = "a ThreadedFaultProxy (threaded_fault_proxy_factory)"


class ThreadedFaultProxy(_Threaded[ProxyRecord], _FaultProxyBase):
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
    _thread_name: ClassVar[str] = "aioserver-fault-proxy"

    def __init__(
        self,
        upstream_address: tuple[str, int] | str,
        *,
        loop: str = "auto",
        **options: Unpack[ProxyOptions],
    ) -> None:
        self._prepare_thread(loop)
        super().__init__(upstream_address, **options)
