"""The servers of the Python frameworks a user would pick instead of aioserver.

Each is written as the framework's own documentation shows it, nothing tuned:

    gevent-echo, gevent-thanks    gevent.server.StreamServer, a greenlet per client
    twisted-echo                  a twisted Protocol whose dataReceived writes the data back
    twisted-thanks                a twisted LineOnlyReceiver answering each line
    trio-echo, trio-thanks        trio.serve_tcp, a task per client

Usage: python bench_peers.py NAME [--host H] [--port P]
Each prints "Listening on HOST:PORT" (the port actually bound) once accepting, and
stops on SIGINT (Ctrl-C), the way such a script is stopped. The framework is imported
only by the server that uses it, so the others run without it.

As in scripts/bench_servers.py, every server reads up to 64 KiB at a time, listens
with a backlog of 100 and sets TCP_NODELAY on each connection (trio does it itself).
The thanks servers answer "Thank you for your message <line>" to each line ending in
LF, as aioserver's thanks protocol does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import signal
import socket
import sys
from typing import Any

READ_SIZE = 64 * 1024  # the same read size as every server in the bench
BACKLOG = 100  # asyncio.start_server's default, as for every server in the bench
THANKS_PREFIX = b"Thank you for your message "


def ready(host: str, port: int) -> None:
    print(f"Listening on {host}:{port}", flush=True)


# ------------------------------------------------------------------------------ gevent


def gevent_echo(sock: Any, address: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := sock.recv(READ_SIZE):
        sock.sendall(data)


def gevent_thanks(sock: Any, address: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # gevent's own echo example reads lines through makefile().
    lines = sock.makefile(mode="rb", buffering=READ_SIZE)
    for line in lines:
        if not line.endswith(b"\n"):
            line += b"\n"
        sock.sendall(THANKS_PREFIX + line)
    lines.close()


def serve_gevent(handle: Any, host: str, port: int) -> None:
    from gevent.server import StreamServer

    server = StreamServer((host, port), handle, backlog=BACKLOG)
    server.start()
    ready(host, server.server_port)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


# ----------------------------------------------------------------------------- Twisted


def serve_twisted(kind: str, host: str, port: int) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.basic import LineOnlyReceiver

    class Echo(Protocol):
        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[union-attr]

    class Thanks(LineOnlyReceiver):
        delimiter = b"\n"
        MAX_LENGTH = READ_SIZE

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]

        def lineReceived(self, line: bytes) -> None:
            self.sendLine(THANKS_PREFIX + line)  # sendLine adds the delimiter

    factory = Factory.forProtocol(Echo if kind == "echo" else Thanks)
    listening = reactor.listenTCP(port, factory, backlog=BACKLOG, interface=host)  # type: ignore[attr-defined]
    ready(host, listening.getHost().port)
    reactor.run()  # type: ignore[attr-defined]  # stops on SIGINT by itself


# -------------------------------------------------------------------------------- trio


async def trio_echo(stream: Any) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
    except Exception:  # as trio's tutorial does: one client's error must not end the server
        pass


async def trio_thanks(stream: Any) -> None:
    # trio has no line reader: the buffer and split that its documentation suggests.
    try:
        pending = b""
        async for data in stream:
            *lines, pending = (pending + data).split(b"\n")
            if lines:
                await stream.send_all(b"".join([THANKS_PREFIX + line + b"\n" for line in lines]))
        if pending:
            await stream.send_all(THANKS_PREFIX + pending + b"\n")
    except Exception:
        pass


def serve_trio(handler: Any, host: str, port: int) -> None:
    import trio

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, handler, port, host=host, backlog=BACKLOG)
            listeners = await nursery.start(serve)
            ready(host, listeners[0].socket.getsockname()[1])

    try:
        trio.run(main)
    except* KeyboardInterrupt:  # trio raises it inside an exception group
        pass


# -------------------------------------------------------------------------------- main

SERVERS = {
    "gevent-echo": functools.partial(serve_gevent, gevent_echo),
    "gevent-thanks": functools.partial(serve_gevent, gevent_thanks),
    "twisted-echo": functools.partial(serve_twisted, "echo"),
    "twisted-thanks": functools.partial(serve_twisted, "thanks"),
    "trio-echo": functools.partial(serve_trio, trio_echo),
    "trio-thanks": functools.partial(serve_trio, trio_thanks),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("name", choices=sorted(SERVERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    # A shell that starts us in the background may have set SIGINT to be ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    SERVERS[args.name](args.host, args.port)
    sys.exit(0)


if __name__ == "__main__":
    main()
