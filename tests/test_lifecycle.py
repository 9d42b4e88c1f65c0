"""A connection's life end to end, on real loopback sockets and both loops.

    accepted -> [PROXY header] -> [TLS handshake] -> serving -> flushing -> [lingering] -> closed

Each test names the guarantee it checks in its docstring: every phase is
tracked and bounded, a connection given up on is reset (so the client can tell
replies were lost) and counted as such, idleness means no progress in either
direction, a turned-away client that sent first still reads why, a stop is
bounded whatever a handler does, PROXY headers are checked before use, and
failed TLS handshakes do not hold memory. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address
from typing import Any

import pytest
import trustme
from proxyprotocol.result import ProxyResultIPv4, ProxyResultUnix
from proxyprotocol.v2 import ProxyProtocolV2

from aioserver import Server, serve, thanks
from aioserver.server import HANDLER_STOP_MARGIN

from .helpers import PREFIX, ExceptionRecorder, close, expected_thanks, wait_until

KiB = 1024
MiB = 1024 * KiB
BUSY = b"Error: server busy\n"
# What the thanks protocol adds to each line.
REPLY_OVERHEAD = len(PREFIX)
# The client address the PROXY headers below name.
PROXIED = "203.0.113.7:40000"
V1_HEADER = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 1234\r\n"
# An access-log line: "PEER closed after S s, N bytes in, M bytes out: REASON".
ACCESS_LINE = re.compile(
    r"^(?P<peer>\S+) closed after [\d.]+ s, (?P<bytes_in>\d+) bytes in,"
    r" (?P<bytes_out>\d+) bytes out: (?P<reason>.*)$"
)


# Clients on raw sockets, so that every byte the kernel delivered is seen and a
# reset is told apart from a clean EOF.


async def connect_raw(port: int, rcvbuf: int | None = None) -> socket.socket:
    """A non-blocking client socket connected to 127.0.0.1:`port`; with `rcvbuf`,
    its SO_RCVBUF is set that small before connecting (so the window stays small)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset rather than a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Read until the server ends the connection: (every byte received, "eof" or
    "reset")."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    try:
        while data := await loop.sock_recv(sock, 64 * KiB):
            received += data
    except ConnectionResetError:
        return bytes(received), "reset"
    return bytes(received), "eof"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "aioserver.access"]


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def assert_loggable(message: str) -> None:
    """One line of printable ASCII: nothing a client sent reaches the log raw."""
    assert message.isascii(), message
    assert message.isprintable(), message


# TLS on the client side, by hand: an SSLObject over memory BIOs, so that the
# handshake's bytes can be sent exactly as a test wants them.


class MemoryTLSClient:
    """A TLS client whose records the test moves between its BIOs and a socket."""

    def __init__(self, context: ssl.SSLContext, sock: socket.socket) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")

    def client_hello(self) -> bytes:
        """The first flight: the ClientHello record(s), not sent yet."""
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        hello = self.outgoing.read()
        assert hello.startswith(b"\x16\x03"), hello[:5]  # a handshake record
        return hello

    async def _flush(self) -> None:
        if data := self.outgoing.read():
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _receive(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 64 * KiB)
        if not data:
            raise ConnectionAbortedError("EOF from the server in the middle of TLS")
        self.incoming.write(data)

    async def finish_handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._receive()
            else:
                await self._flush()
                return

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()

    async def receive_exactly(self, size: int) -> bytes:
        received = b""
        while len(received) < size:
            try:
                received += self.tls.read(size - len(received))
            except ssl.SSLWantReadError:
                await self._flush()
                await self._receive()
        return received


# 1. The TLS handshake is a tracked phase.


@pytest.fixture(scope="module")
def untrusting_client_context() -> ssl.SSLContext:
    """A client context that trusts only some other throwaway CA."""
    context = ssl.create_default_context()
    trustme.CA().configure_trust(context)
    return context


@pytest.mark.asyncio
async def test_tls_handshake_not_finished_is_closed_at_the_handshake_timeout_not_asyncios_60_s(
    server_tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    loop_errors: ExceptionRecorder,
) -> None:
    """Guarantee: the TLS handshake is bounded by handshake_timeout = min(10 s,
    idle_timeout), not asyncio's 60 s. With idle_timeout=1, a client that sends
    nothing and one that sends half its ClientHello are both closed after
    between 0.9 and 3 s, each with an access-log line saying why."""
    caplog.set_level(logging.INFO, logger="aioserver")
    async with serve(thanks, port=0, ssl=server_tls_context, idle_timeout=1) as server:
        assert server.port is not None
        assert server.handshake_timeout == 1
        started = time.monotonic()
        silent = await connect_raw(server.port)
        half = await connect_raw(server.port)
        try:
            hello = MemoryTLSClient(client_tls_context, half).client_hello()
            await asyncio.get_running_loop().sock_sendall(half, hello[: len(hello) // 2])

            async def closed_after(sock: socket.socket) -> tuple[float, bytes, str]:
                received, ending = await read_to_end(sock)
                return time.monotonic() - started, received, ending

            results = await asyncio.wait_for(
                asyncio.gather(closed_after(silent), closed_after(half)), 10
            )
        finally:
            silent.close()
            half.close()
        await wait_until(lambda: server.stats.active == 0, what="both connections gone")
    print(f"handshake timeout 1 s: closed after {[round(r[0], 3) for r in results]} s")
    for elapsed, received, _ending in results:
        assert received == b""  # not one byte of a ServerHello
        assert 0.9 <= elapsed < 3.0, elapsed
    lines = access_lines(caplog)
    assert len(lines) == 2, lines
    assert all(line.endswith(": no TLS handshake within 1 s") for line in lines), lines
    assert loop_errors.contexts == []


@pytest.mark.asyncio
async def test_tls_handshakes_in_progress_count_toward_max_connections(
    server_tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
    loop_errors: ExceptionRecorder,
) -> None:
    """Guarantee: a connection in its TLS handshake counts toward max_connections.
    With max_connections=2, two stalled handshakes hold both places
    (stats.active == 2): a third TLS client, raw or real, is turned away without
    one byte of TLS, and once the stalled ones leave a TLS client is served."""
    async with serve(
        thanks, port=0, ssl=server_tls_context, max_connections=2, idle_timeout=30
    ) as server:
        assert server.port is not None
        stalled = [await connect_raw(server.port) for _ in range(2)]
        try:
            await wait_until(lambda: server.stats.active == 2, what="two stalled handshakes")
            # A raw third client sends a whole ClientHello: no ServerHello comes back.
            third = await connect_raw(server.port)
            try:
                hello = MemoryTLSClient(client_tls_context, third).client_hello()
                with contextlib.suppress(ConnectionError):
                    await asyncio.get_running_loop().sock_sendall(third, hello)
                received, ending = await asyncio.wait_for(read_to_end(third), 5)
            finally:
                third.close()
            assert received == b""
            assert ending in ("eof", "reset")
            # A real TLS client fails its handshake.
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", server.port, ssl=client_tls_context), 5
                )
            assert server.stats.active == 2
            assert server.stats.rejected == 2
            assert server.stats.total == 2
        finally:
            for sock in stalled:
                sock.close()
        await wait_until(lambda: server.stats.active == 0, what="the stalled handshakes gone")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client_tls_context
        )
        writer.write(b"now there is room\n")
        assert await reader.readline() == PREFIX + b"now there is room\n"
        await close(writer)
    assert loop_errors.contexts == []


@pytest.mark.asyncio
@pytest.mark.parametrize("client", ["garbage", "untrusting"])
async def test_a_failed_tls_handshake_leaves_one_access_log_line_and_no_loop_error(
    client: str,
    server_tls_context: ssl.SSLContext,
    untrusting_client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    loop_errors: ExceptionRecorder,
) -> None:
    """Guarantee: a failed TLS handshake (garbage bytes, or a client that does
    not trust the server's CA and aborts) leaves exactly one access-log line
    saying "TLS handshake failed", and nothing reaches the loop's exception
    handler."""
    caplog.set_level(logging.INFO, logger="aioserver")
    async with serve(thanks, port=0, ssl=server_tls_context, idle_timeout=30) as server:
        assert server.port is not None
        if client == "garbage":
            sock = await connect_raw(server.port)
            try:
                garbage = b"\x16\x03\x01\x00\x40" + bytes(range(0x40))  # not a ClientHello
                await asyncio.get_running_loop().sock_sendall(sock, garbage)
                _alert, ending = await asyncio.wait_for(read_to_end(sock), 5)
            finally:
                sock.close()
            assert ending in ("eof", "reset")
        else:
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.wait_for(
                    asyncio.open_connection(
                        "127.0.0.1", server.port, ssl=untrusting_client_context
                    ),
                    5,
                )
        await wait_until(lambda: server.stats.active == 0, what="the connection gone")
        assert server.stats.total == 1
    lines = access_lines(caplog)
    assert len(lines) == 1, lines
    assert "TLS handshake failed" in lines[0], lines
    assert_loggable(lines[0])
    assert loop_errors.contexts == []


# 2. The PROXY header, then TLS, over one connection.


@pytest.mark.asyncio
@pytest.mark.parametrize("segments", ["header-then-tls", "header-and-hello-in-one-segment"])
async def test_proxy_header_then_tls_on_the_same_socket(
    segments: str,
    server_tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    loop_errors: ExceptionRecorder,
) -> None:
    """Guarantee: with proxy_protocol and ssl both on, the PROXY v1 header comes
    in clear text and the TLS handshake follows on the same socket, whether the
    header arrives alone or in one segment with the ClientHello: the reply comes
    over TLS and the access log names the header's client, 203.0.113.7:40000."""
    caplog.set_level(logging.INFO, logger="aioserver")
    loop = asyncio.get_running_loop()
    async with serve(thanks, port=0, proxy_protocol=True, ssl=server_tls_context) as server:
        assert server.port is not None
        sock = await connect_raw(server.port)
        try:
            if segments == "header-then-tls":
                await loop.sock_sendall(sock, V1_HEADER)
                reader, writer = await asyncio.open_connection(
                    sock=sock, ssl=client_tls_context, server_hostname="127.0.0.1"
                )
                assert writer.get_extra_info("ssl_object") is not None
                writer.write(b"hello over TLS\n")
                assert await reader.readline() == PREFIX + b"hello over TLS\n"
                await close(writer)
            else:
                client = MemoryTLSClient(client_tls_context, sock)
                await loop.sock_sendall(sock, V1_HEADER + client.client_hello())
                await client.finish_handshake()
                await client.send(b"hello over TLS\n")
                reply = PREFIX + b"hello over TLS\n"
                assert await client.receive_exactly(len(reply)) == reply
        finally:
            sock.close()
        await wait_until(lambda: server.stats.active == 0, what="the connection gone")
    lines = access_lines(caplog)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{PROXIED} closed after "), lines
    assert server.stats.bytes_out == len(PREFIX + b"hello over TLS\n")
    assert loop_errors.contexts == []


@pytest.mark.asyncio
@pytest.mark.parametrize("segments", ["header-alone", "header-and-hello-in-one-segment"])
async def test_proxy_then_tls_bytes_in_do_not_depend_on_how_the_header_was_segmented(
    segments: str,
    server_tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Guarantee (found writing the test above): the counts are the same whatever
    the segmentation. A TLS connection counts what it serves in clear (never the
    handshake's records), and a PROXY header counts once; so the same client
    (the v1 header, a handshake, one 15-byte line) is 45 + 15 bytes in, both in
    stats.bytes_in and the access log, whether the header arrived alone (the
    server read it before the ClientHello was sent) or in one segment with the
    ClientHello."""
    caplog.set_level(logging.INFO, logger="aioserver")
    loop = asyncio.get_running_loop()
    line = b"hello over TLS\n"
    async with serve(thanks, port=0, proxy_protocol=True, ssl=server_tls_context) as server:
        assert server.port is not None
        sock = await connect_raw(server.port)
        try:
            client = MemoryTLSClient(client_tls_context, sock)
            hello = client.client_hello()
            if segments == "header-alone":
                await loop.sock_sendall(sock, V1_HEADER)
                await wait_until(
                    lambda: server.stats.bytes_in == len(V1_HEADER), what="the header read"
                )
                await loop.sock_sendall(sock, hello)
            else:
                await loop.sock_sendall(sock, V1_HEADER + hello)
            await client.finish_handshake()
            await client.send(line)
            reply = PREFIX + line
            assert await client.receive_exactly(len(reply)) == reply
        finally:
            sock.close()
        await wait_until(lambda: server.stats.active == 0, what="the connection gone")
    lines = access_lines(caplog)
    assert len(lines) == 1, lines
    found = ACCESS_LINE.match(lines[0])
    assert found is not None, lines
    print(f"PROXY + TLS, {segments}: {found['bytes_in']} bytes in")
    assert (server.stats.bytes_in, int(found["bytes_in"])) == (len(V1_HEADER) + len(line),) * 2
    assert (server.stats.bytes_out, int(found["bytes_out"])) == (len(reply),) * 2


# 3. Giving up on a client that owes replies resets it, and counts only what
# the kernel took.

# Each line the floods below send: 16 bytes, answered with 16 + 27.
LINE_SIZE = 16


def flood_line(number: int) -> bytes:
    return b"%015d\n" % number


def replies_written(bytes_in: int) -> int:
    """What the thanks protocol wrote for `bytes_in` bytes of the flood's lines:
    one reply per complete line received."""
    return bytes_in // LINE_SIZE * (LINE_SIZE + REPLY_OVERHEAD)


async def flood_without_reading(server: Server) -> socket.socket:
    """A client with a small receive buffer sends lines and never reads: return
    its socket once the server holds replies in its own buffer (it wrote more
    than the kernel took) and the client has stopped sending."""
    assert server.port is not None
    loop = asyncio.get_running_loop()
    sock = await connect_raw(server.port, rcvbuf=32 * KiB)
    payload = b"".join(flood_line(i) for i in range(8 * MiB // LINE_SIZE))
    sender = asyncio.create_task(loop.sock_sendall(sock, payload))
    try:

        def replies_held() -> bool:
            stats = server.stats
            return replies_written(stats.bytes_in) > stats.bytes_out

        await wait_until(replies_held, what="replies held in the server's buffer")
    finally:
        # Stop sending before any reset: a send that met the reset would take
        # the socket's error, and a read after it would see a plain EOF.
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    return sock


def assert_reset_counts_only_what_the_kernel_took(
    server: Server, written: int, received: bytes, caplog: pytest.LogCaptureFixture
) -> str:
    """After a reset: stats.bytes_out is below what was written (the replies
    still in the server's buffer were never sent), at least what the client
    received, and the access-log line says the same figures; return its reason."""
    stats = server.stats
    assert stats.active == 0
    assert stats.bytes_out < written, (stats.bytes_out, written)
    assert len(received) <= stats.bytes_out
    expected = b"".join(
        PREFIX + flood_line(i) for i in range(len(received) // (LINE_SIZE + REPLY_OVERHEAD) + 1)
    )
    assert received == expected[: len(received)]
    lines = access_lines(caplog)
    assert len(lines) == 1, lines
    found = ACCESS_LINE.match(lines[0])
    assert found is not None, lines
    assert int(found["bytes_out"]) == stats.bytes_out
    assert int(found["bytes_in"]) == stats.bytes_in
    return found["reason"]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_stop_resets_a_client_not_taking_its_replies_at_shutdown_timeout(
    caplog: pytest.LogCaptureFixture, loop_errors: ExceptionRecorder
) -> None:
    """Guarantee: giving up resets. A thanks client that sent many lines and
    never reads is reset (not closed cleanly after partial data) when a stop's
    shutdown_timeout (0.5 s) is up: reading afterwards ends in
    ConnectionResetError. stats.bytes_out and the access log's "bytes out"
    count only what the kernel took, less than what was written."""
    caplog.set_level(logging.INFO, logger="aioserver")
    async with serve(thanks, port=0, shutdown_timeout=0.5, idle_timeout=None) as server:
        sock = await flood_without_reading(server)
        try:
            # Synchronous from the snapshot to the stop's first await: no read between.
            written = replies_written(server.stats.bytes_in)
            started = time.monotonic()
            await server.stop()
            elapsed = time.monotonic() - started
            # Reading until the end meets the reset: ConnectionResetError, not EOF.
            received, ending = await asyncio.wait_for(read_to_end(sock), 10)
        finally:
            sock.close()
    print(
        f"stop: {elapsed:.3f} s; written {written}, stats.bytes_out {server.stats.bytes_out},"
        f" client received {len(received)}"
    )
    assert 0.45 <= elapsed < 1.5, elapsed
    assert ending == "reset", f"a clean EOF after {len(received)} bytes"
    reason = assert_reset_counts_only_what_the_kernel_took(server, written, received, caplog)
    assert reason.startswith("server stopped, then reset: "), reason
    assert loop_errors.contexts == []


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_forced_stop_resets_a_client_not_taking_its_replies_at_once(
    caplog: pytest.LogCaptureFixture, loop_errors: ExceptionRecorder
) -> None:
    """Guarantee: giving up resets. Cancelling a stop (what a second SIGINT or
    SIGTERM does) resets a thanks client that sent many lines and never reads at
    once, well before shutdown_timeout (30 s): its read ends in
    ConnectionResetError, and the counts are only what the kernel took."""
    caplog.set_level(logging.INFO, logger="aioserver")
    server = Server(thanks, port=0, shutdown_timeout=30, idle_timeout=None)
    await server.start()
    sock = await flood_without_reading(server)
    try:
        written = replies_written(server.stats.bytes_in)
        started = time.monotonic()
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.2)
        assert not stopping.done()
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        received, ending = await asyncio.wait_for(read_to_end(sock), 10)
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    await wait_until(lambda: server.stats.active == 0, 5, "the reset connection gone")
    assert elapsed < 5, elapsed
    assert ending == "reset", f"a clean EOF after {len(received)} bytes"
    reason = assert_reset_counts_only_what_the_kernel_took(server, written, received, caplog)
    assert reason == "server stopped, then reset: stop cancelled", reason
    assert loop_errors.contexts == []


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_idle_timeout_resets_a_client_that_owes_replies(
    caplog: pytest.LogCaptureFixture, loop_errors: ExceptionRecorder
) -> None:
    """Guarantee: giving up resets. A thanks client that sent many lines and
    never reads, with idle_timeout=1 and no stop, is reset about 1 s after the
    server last made progress: its read ends in ConnectionResetError, and
    stats.bytes_out and the access log count only what the kernel took."""
    caplog.set_level(logging.INFO, logger="aioserver")
    async with serve(thanks, port=0, idle_timeout=1) as server:
        sock = await flood_without_reading(server)
        try:
            started = time.monotonic()
            await wait_until(lambda: server.stats.active == 0, 10, "the idle client gone")
            elapsed = time.monotonic() - started
            # Nothing is read while a connection is reset: this is what it answered.
            written = replies_written(server.stats.bytes_in)
            # Reading until the end meets the reset: ConnectionResetError, not EOF.
            received, ending = await asyncio.wait_for(read_to_end(sock), 10)
        finally:
            sock.close()
    print(
        f"idle reset after {elapsed:.3f} s; written {written},"
        f" stats.bytes_out {server.stats.bytes_out}, client received {len(received)}"
    )
    assert 0.9 <= elapsed < 3.0, elapsed
    assert ending == "reset", f"a clean EOF after {len(received)} bytes"
    reason = assert_reset_counts_only_what_the_kernel_took(server, written, received, caplog)
    assert re.fullmatch(r"idle for 1 s with \d+ bytes not taken", reason), reason
    assert loop_errors.contexts == []


# 4. Idle means no progress in either direction.


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_slow_reader_that_sends_nothing_for_many_seconds_is_not_idle(
    caplog: pytest.LogCaptureFixture, loop_errors: ExceptionRecorder
) -> None:
    """Guarantee: idle means no progress either way. With idle_timeout=1, a
    thanks client sends 2 MiB of lines at once, half-closes, then only reads,
    32 KiB every 0.25 s through a 32 KiB receive buffer, for about 16 s: it
    gets every reply byte exactly, then a clean EOF, and is never closed as
    idle."""
    caplog.set_level(logging.INFO, logger="aioserver")
    loop = asyncio.get_running_loop()
    # 2 MiB of 1 KiB lines, each numbered.
    payload = b"".join(b"%06d " % i + b"x" * 1016 + b"\n" for i in range(2048))
    assert len(payload) == 2 * MiB
    expected = expected_thanks(payload)
    async with serve(thanks, port=0, idle_timeout=1) as server:
        assert server.port is not None
        sock = await connect_raw(server.port, rcvbuf=32 * KiB)
        try:

            async def send() -> None:
                await loop.sock_sendall(sock, payload)
                sock.shutdown(socket.SHUT_WR)

            sender = asyncio.create_task(send())
            received = bytearray()
            started = time.monotonic()
            ending = ""
            while not ending:
                want = len(received) + 32 * KiB
                while len(received) < want:
                    data = await loop.sock_recv(sock, want - len(received))
                    if not data:
                        ending = "eof"
                        break
                    received += data
                await asyncio.sleep(0.25)
            elapsed = time.monotonic() - started
            await sender
        finally:
            sock.close()
        await wait_until(lambda: server.stats.active == 0, what="the connection gone")
    print(f"slow reader: {len(received)} bytes in {elapsed:.1f} s, then EOF")
    assert ending == "eof"
    assert len(received) == len(expected)
    assert received == expected
    assert elapsed > 5  # many idle_timeouts long
    lines = access_lines(caplog)
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        f"{len(payload)} bytes in, {len(expected)} bytes out: closed by client"
    )
    assert loop_errors.contexts == []


# 5. A client turned away after sending its line still reads why.


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_busy_client_that_sent_first_reads_the_busy_line_then_eof_50_times(
    loop_errors: ExceptionRecorder,
) -> None:
    """Guarantee: a client turned away by max_connections is told
    "Error: server busy" even if it sent a line first: with max_connections=1
    and one client held, 50 clients in a row each send "hello", pause 0.2 s
    (the line is at the server), then read exactly the busy line and a clean
    EOF, never a reset. The held client is served throughout."""
    async with serve(thanks, port=0, max_connections=1) as server:
        assert server.port is not None
        held_reader, held_writer = await asyncio.open_connection("127.0.0.1", server.port)
        held_writer.write(b"held\n")
        assert await held_reader.readline() == PREFIX + b"held\n"
        for attempt in range(50):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(b"hello\n")
                await writer.drain()
                await asyncio.sleep(0.2)
                assert await reader.read() == BUSY, f"attempt {attempt}"
                assert reader.at_eof()
            finally:
                await close(writer)
        assert server.stats.rejected == 50
        held_writer.write(b"still held\n")
        assert await held_reader.readline() == PREFIX + b"still held\n"
        await close(held_writer)
        assert server.stats.total == 1
    assert loop_errors.contexts == []


# 6. A half-closed client that never reads its last replies.


async def answers_at_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads to the client's EOF, then writes 8 MiB of replies and returns
    without waiting for them: its connection is left flushing them."""
    await reader.read()
    writer.write(b"x" * 8 * MiB)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("handler", [thanks, answers_at_eof], ids=["thanks", "answers-at-eof"])
async def test_a_half_closed_client_that_never_reads_is_reset_within_3_s(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    caplog: pytest.LogCaptureFixture,
    loop_errors: ExceptionRecorder,
) -> None:
    """Guarantee: a client that half-closes without reading its last replies
    cannot hold its connection: with idle_timeout=1, a client sends 4 MiB of
    lines, shuts down its write side and never reads; the server resets it 1
    to 3 s later (stats.active drops to 0) and the client's read ends in
    ConnectionResetError. With the thanks protocol the server stops reading
    before the EOF (its replies fill every buffer); the handler answering at
    the EOF leaves its connection flushing, which is bounded the same way."""
    caplog.set_level(logging.INFO, logger="aioserver")
    loop = asyncio.get_running_loop()
    payload = b"".join(flood_line(i) for i in range(4 * MiB // LINE_SIZE))
    async with serve(handler, port=0, idle_timeout=1) as server:
        assert server.port is not None
        sock = await connect_raw(server.port, rcvbuf=32 * KiB)
        try:
            await asyncio.wait_for(loop.sock_sendall(sock, payload), 10)
            sock.shutdown(socket.SHUT_WR)
            started = time.monotonic()
            await wait_until(lambda: server.stats.active == 0, 10, "the client gone")
            elapsed = time.monotonic() - started
            _, ending = await asyncio.wait_for(read_to_end(sock), 10)
        finally:
            sock.close()
    lines = access_lines(caplog)
    print(f"half-closed client ({handler.__qualname__}) reset after {elapsed:.3f} s: {lines}")
    assert 0.9 <= elapsed < 3.0, elapsed
    assert ending == "reset"
    assert len(lines) == 1, lines
    assert loop_errors.contexts == []


# 7. A stop is bounded whatever the handler does.

# The handler tasks the stubborn handlers below ran in, for the test to end them.
STUBBORN_TASKS: list[asyncio.Task[Any]] = []


async def swallows_its_cancellation(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Catches the stop's cancellation and sleeps 30 s."""
    STUBBORN_TASKS.append(asyncio.current_task())  # type: ignore[arg-type]
    writer.write(b"ready\n")
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    await asyncio.sleep(30)


async def sleeps_in_its_cleanup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Lets the cancellation through, after a cleanup that sleeps 30 s."""
    STUBBORN_TASKS.append(asyncio.current_task())  # type: ignore[arg-type]
    writer.write(b"ready\n")
    try:
        await asyncio.sleep(3600)
    finally:
        await asyncio.sleep(30)


@pytest.mark.asyncio
@pytest.mark.parametrize("handler", [swallows_its_cancellation, sleeps_in_its_cleanup])
async def test_a_stop_is_bounded_whatever_the_handler_does(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    caplog: pytest.LogCaptureFixture,
    loop_errors: ExceptionRecorder,
) -> None:
    """Guarantee: a stop returns within shutdown_timeout + HANDLER_STOP_MARGIN
    (0.5 + 1.0 s, with 0.5 s to spare) even when the handler swallows its
    cancellation or sleeps in its cleanup, with one warning per connection
    "Abandoned handler <qualname> for ..." naming the handler."""
    caplog.set_level(logging.INFO, logger="aioserver")
    STUBBORN_TASKS.clear()
    tasks_before = asyncio.all_tasks()
    server = Server(handler, port=0, shutdown_timeout=0.5)
    await server.start()
    assert server.port is not None
    clients = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    try:
        for reader, _ in clients:
            assert await reader.readline() == b"ready\n"
        assert len(STUBBORN_TASKS) == 2
        started = time.monotonic()
        await asyncio.wait_for(server.stop(), 10)
        elapsed = time.monotonic() - started
        assert server.stats.active == 0
    finally:
        for _, writer in clients:
            await close(writer)
        # The abandoned handlers run on: end them, so no task outlives the test.
        for task in STUBBORN_TASKS:
            task.cancel()
        if STUBBORN_TASKS:
            _, still_running = await asyncio.wait(STUBBORN_TASKS, timeout=5)
            assert not still_running
        STUBBORN_TASKS.clear()
    print(f"stop with {handler.__qualname__}: {elapsed:.3f} s")
    assert elapsed < 0.5 + HANDLER_STOP_MARGIN + 0.5, elapsed
    warnings = warnings_logged(caplog)
    assert len(warnings) == 2, warnings
    for warning in warnings:
        assert warning.startswith(f"Abandoned handler {handler.__qualname__} for 127.0.0.1:"), (
            warning
        )
    assert asyncio.all_tasks() == tasks_before
    assert loop_errors.contexts == []


# 8. PROXY headers are checked before use, end to end.


def v2_unix_header() -> bytes:
    """A valid PROXY v2 header naming a Unix-socket client."""
    result = ProxyResultUnix("/run/client.sock", "/run/haproxy.sock", protocol=socket.SOCK_STREAM)
    return bytes(ProxyProtocolV2().pack(result))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("header", "proxy_allow", "why"),
    [
        (v2_unix_header(), None, "names a Unix-socket client"),
        (
            b"PROXY TCP4 203.0.113.7\x1b[2J\x00 127.0.0.1 40000 1234\r\n",
            None,
            "not one line of ASCII text",
        ),
        (V1_HEADER, ["10.0.0.0/8"], "PROXY header from 127.0.0.1:"),
    ],
    ids=["v2-unix-family-on-tcp", "v1-control-characters", "source-not-in-proxy-allow"],
)
async def test_an_unacceptable_proxy_header_closes_with_one_printable_warning(
    header: bytes,
    proxy_allow: list[str] | None,
    why: str,
    caplog: pytest.LogCaptureFixture,
    loop_errors: ExceptionRecorder,
) -> None:
    """Guarantee: a PROXY header is checked before use. A v2 header naming a
    Unix-socket client on a TCP port, a v1 header with control characters,
    and a header from a source outside proxy_allow each close the connection
    unserved with exactly one warning, in printable ASCII."""
    caplog.set_level(logging.INFO, logger="aioserver")
    options: dict[str, Any] = {} if proxy_allow is None else {"proxy_allow": proxy_allow}
    async with serve(thanks, port=0, proxy_protocol=True, **options) as server:
        assert server.port is not None
        sock = await connect_raw(server.port)
        try:
            await asyncio.get_running_loop().sock_sendall(sock, header + b"hello\n")
            received, ending = await asyncio.wait_for(read_to_end(sock), 5)
        finally:
            sock.close()
        await wait_until(lambda: server.stats.active == 0, what="the connection gone")
    assert received == b""
    assert ending == "eof"
    warnings = warnings_logged(caplog)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("Closed 127.0.0.1:"), warnings
    assert why in warnings[0], warnings
    assert_loggable(warnings[0])
    assert "\x1b" not in caplog.text
    assert loop_errors.contexts == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (V1_HEADER, ("203.0.113.7", 40000)),
        (b"PROXY TCP6 2001:db8::7 ::1 40000 1234\r\n", ("2001:db8::7", 40000, 0, 0)),
        (
            bytes(
                ProxyProtocolV2().pack(
                    ProxyResultIPv4(
                        (IPv4Address("203.0.113.7"), 40000), (IPv4Address("127.0.0.1"), 1234)
                    )
                )
            ),
            ("203.0.113.7", 40000),
        ),
        (b"PROXY UNKNOWN\r\n", None),
    ],
    ids=["v1-ipv4", "v1-ipv6", "v2-ipv4", "v1-unknown"],
)
async def test_the_handler_sees_the_proxied_peer_as_a_socket_module_tuple(
    header: bytes, expected: tuple[Any, ...] | None, loop_errors: ExceptionRecorder
) -> None:
    """Guarantee: behind a PROXY header, writer.get_extra_info("peername") in a
    handler is the client it names, as the socket module gives addresses: a
    2-tuple for IPv4, a 4-tuple for IPv6; for an UNKNOWN header, the real peer."""
    seen: list[Any] = []

    async def whoami(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername"))
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    async with serve(whoami, port=0, proxy_protocol=True) as server:
        assert server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(header + b"payload\n")
        assert await reader.read() == b"payload\n"
        if expected is None:
            expected = writer.get_extra_info("sockname")
        await close(writer)
    assert len(seen) == 1
    assert type(seen[0]) is tuple
    assert seen[0] == expected
    assert loop_errors.contexts == []


# 9. Failed TLS handshakes do not hold memory.


def resident_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_2000_aborted_tls_handshakes_leave_the_resident_memory_under_50_mib_higher(
    server_tls_context: ssl.SSLContext,
    client_tls_context: ssl.SSLContext,
    loop_errors: ExceptionRecorder,
) -> None:
    """Guarantee: a failed TLS handshake's buffers are freed at once, not left
    to the cyclic collector. 2,000 clients connect to a TLS port, send half a
    ClientHello or ClientHello-like garbage, and reset; the server (in this
    process) then has grown its resident memory by under 50 MiB, without
    gc.collect() (a 256 KiB buffer each held would be about 500 MiB)."""
    total = 2000
    # One ClientHello for all: its first half, and the same length of garbage
    # behind a handshake record's header.
    with socket.socket() as unsent:
        hello = MemoryTLSClient(client_tls_context, unsent).client_hello()
    half_hello = hello[: len(hello) // 2]
    garbage = hello[:5] + bytes(range(256)) * (len(hello) // 256) + b"\xff" * (len(hello) % 256)
    garbage = garbage[: len(hello)]

    async with serve(thanks, port=0, ssl=server_tls_context) as server:
        assert server.port is not None
        port = server.port

        async def abort_handshakes(first: int, count: int) -> None:
            """`count` clients, 100 at a time: connect, send, reset."""
            loop = asyncio.get_running_loop()

            async def one(index: int) -> None:
                sock = await connect_raw(port)
                try:
                    await loop.sock_sendall(sock, half_hello if index % 2 else garbage)
                finally:
                    reset(sock)

            for start in range(first, first + count, 100):
                await asyncio.gather(*(one(i) for i in range(start, start + 100)))
            await wait_until(
                lambda: server.stats.total == first + count and server.stats.active == 0,
                30,
                f"{first + count} connections accepted and gone",
            )
            for _ in range(5):
                await asyncio.sleep(0)

        # A first round warms up what a handshake allocates once.
        await abort_handshakes(0, 200)
        before = resident_bytes()
        started = time.monotonic()
        await abort_handshakes(200, total)
        elapsed = time.monotonic() - started
        after = resident_bytes()
        # Sharper than the RSS figure, which the automatic collector keeps low
        # even when every failed handshake is left in a cycle: no TLS protocol
        # of a failed handshake is still alive (gc.get_objects does not collect).
        tls_class = server.tls_protocol
        alive = sum(1 for thing in gc.get_objects() if type(thing) is tls_class)
    growth = after - before
    print(
        f"{total} aborted TLS handshakes in {elapsed:.1f} s:"
        f" RSS {before / MiB:.1f} -> {after / MiB:.1f} MiB, growth {growth / MiB:.2f} MiB;"
        f" TLS protocols still alive: {alive}"
    )
    assert growth < 50 * MiB
    assert alive == 0
    assert loop_errors.contexts == []
