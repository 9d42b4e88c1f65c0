"""The listening side of a test server: an `aioserver.Server` that can go down and
come back on the same port.

`refuse()` stops the listening server but keeps its port, with a placeholder per
listening socket (bound, never listening, so a connect is refused and the port
stays taken); `blackhole()` does the same with placeholders that listen, with a
backlog of 0 filled by a connection of ours that nobody accepts, so that a new
connect hangs (Linux drops a SYN to a full accept queue: the client stays in
SYN-SENT and retries); `listen_again()` starts a new `aioserver.Server` on that
port.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

from ..connection import Connection
from ..protocols import Handler
from ..server import Server

TLSChooser = Callable[[Connection], ssl.SSLContext]


class _Server(Server):
    """An `aioserver.Server` whose TLS context `choose` picks per connection."""

    def __init__(self, serve: Handler, choose: TLSChooser, **options: Any) -> None:
        super().__init__(serve, **options)
        self._choose = choose

    def tls_context(self, connection: Connection) -> ssl.SSLContext:
        return self._choose(connection)


class _Listener:
    """The `aioserver.Server` a test server listens with, and its placeholders.

    `serve` is the connection handler of every Server it makes, `choose` picks
    each connection's TLS context; `options` are the Server's keyword options
    (`reuse_port` on, so that a placeholder can share the port). Every method
    runs on the server's loop.
    """

    def __init__(
        self, serve: Handler, choose: TLSChooser, host: str, port: int, options: dict[str, Any]
    ) -> None:
        self._serve = serve
        self._choose = choose
        self._options = options
        self.server: Server = _Server(serve, choose, host=host, port=port, **options)
        self._placeholders: list[socket.socket] = []
        self._fillers: list[socket.socket] = []

    async def start(self) -> tuple[str, int]:
        """Bind and listen; return the bound (host, port). OSError if taken."""
        await self.server.start()
        sockname = self.server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def stop(self) -> None:
        """Stop the listening server, and release the port if a placeholder held it."""
        try:
            await self.server.stop()
        finally:
            self.close_placeholders()

    async def refuse(self) -> None:
        """Stop the listening server, keeping its port with placeholders."""
        try:
            for sock in self.server.sockets:
                self._placeholders.append(_placeholder(sock))
        finally:
            await self.server.stop()

    async def blackhole(self) -> None:
        """Stop the listening server, keeping its port with placeholders that listen
        with a full backlog: new connects hang instead of being refused."""
        await self.refuse()
        for sock in self._placeholders:
            sock.listen(0)
            self._fillers.append(_filler(sock))

    async def listen_again(self, host: str, port: int) -> None:
        """After `refuse()`: listen with a new Server on `port`. OSError if taken."""
        server = _Server(self._serve, self._choose, host=host, port=port, **self._options)
        await server.start()
        self.server = server
        self.close_placeholders()

    def close_placeholders(self) -> None:
        for sock in self._fillers + self._placeholders:
            sock.close()
        self._fillers.clear()
        self._placeholders.clear()


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


# Loopback connects complete at once; this bounds the one that fills a backlog.
FILLER_CONNECT_TIMEOUT = 1.0


def _filler(listener: socket.socket) -> socket.socket:
    """A connection to `listener` (listening with backlog 0) that fills its accept queue."""
    sock = socket.socket(listener.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(FILLER_CONNECT_TIMEOUT)
        sock.connect(listener.getsockname()[:2])
    except BaseException:
        sock.close()
        raise
    return sock
