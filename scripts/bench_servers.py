"""The Python servers that scripts/bench measures aioserver against.

Each is the code a Python user would write first for the job, nothing tuned:

    start-server-echo  asyncio.start_server with a read / write / drain loop
    protocol-echo      an asyncio.Protocol whose data_received writes the data back
    threading-echo     socketserver.ThreadingTCPServer, a thread per client
    threading-thanks   the same, answering "Thank you for your message <line>"

Usage: python bench_servers.py NAME [--loop asyncio|uvloop] [--host H] [--port P]
Each prints "Listening on HOST:PORT" (the port actually bound) once accepting, and
stops on SIGINT (Ctrl-C), the way such a script is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import socketserver
from collections.abc import Callable, Coroutine
from typing import Any, cast

READ_SIZE = 64 * 1024  # the same read size as every server in the bench
BACKLOG = 100  # asyncio.start_server's default, so no server is refused for its backlog


def ready(host: str, port: int) -> None:
    print(f"Listening on {host}:{port}", flush=True)


async def handle_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def serve_start_server_echo(host: str, port: int) -> None:
    server = await asyncio.start_server(handle_echo, host, port, backlog=BACKLOG)
    ready(host, server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


class EchoProtocol(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    # Stop reading while the client is not reading its replies, so memory stays bounded.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


async def serve_protocol_echo(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port, backlog=BACKLOG)
    ready(host, server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(READ_SIZE):
            self.request.sendall(data)


class ThanksHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            if not line.endswith(b"\n"):
                line += b"\n"
            self.wfile.write(b"Thank you for your message " + line)


class ThreadingServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True  # Ctrl-C must not wait for every idle client to leave
    request_queue_size = BACKLOG

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        # asyncio sets TCP_NODELAY on every connection; setting it here too means
        # Nagle's algorithm is not what the bench compares.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, address


def serve_threading(handler: type[socketserver.BaseRequestHandler], host: str, port: int) -> None:
    with ThreadingServer((host, port), handler) as server:
        ready(host, server.server_address[1])
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


def run_async(main: Coroutine[Any, Any, None], loop: str) -> None:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "name", choices=["start-server-echo", "protocol-echo", "threading-echo", "threading-thanks"]
    )
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    # A shell that starts us in the background may have set SIGINT to be ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.name == "start-server-echo":
        run_async(serve_start_server_echo(args.host, args.port), args.loop)
    elif args.name == "protocol-echo":
        run_async(serve_protocol_echo(args.host, args.port), args.loop)
    elif args.name == "threading-echo":
        serve_threading(EchoHandler, args.host, args.port)
    else:
        serve_threading(ThanksHandler, args.host, args.port)


if __name__ == "__main__":
    main()
