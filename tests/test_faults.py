"""aioserver.testing faults: aimed at some connections, and the network-like ones.

Real sockets on 127.0.0.1; the in-loop tests run on both loops (see conftest).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from collections.abc import Callable

import pytest

from aioserver import echo
from aioserver.testing import Aim, Ending, Faults, TestServer, ThreadedTestServer

from .helpers import LOOPS, close, sends, talk

# Timers may fire a hair early by the clock the client reads (uvloop keeps
# milliseconds): a measured wait must be at least the fault's minus this.
TIMER_SLACK = 0.01


async def fetch(address: tuple[str, int]) -> bytes:
    """Connect, send nothing, and return everything received until EOF."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        return await reader.read()
    finally:
        await close(writer)


HELLO = sends(b"hello")


# Aimed at some connections.


@pytest.mark.asyncio
async def test_reset_the_first_connection_then_behave() -> None:
    async with TestServer(echo, faults=Faults(reset=True, connections=Aim.first(1))) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"first")
        with pytest.raises(ConnectionResetError):
            await reader.read()
        await close(writer)
        assert await talk(server.address, b"second") == b"second"
        assert await talk(server.address, b"third") == b"third"
        records = await server.wait_for_closed(3)
    assert [(r.received, r.sent, r.ended, r.faults) for r in records] == [
        (b"first", b"", Ending.RESET_BY_FAULT, ("reset",)),
        (b"second", b"second", Ending.CLIENT_CLOSED, ()),
        (b"third", b"third", Ending.CLIENT_CLOSED, ()),
    ]


@pytest.mark.asyncio
async def test_nth_hits_only_that_connection_counting_from_one() -> None:
    async with TestServer(HELLO, faults=Faults(close_after=2, connections=Aim.nth(2))) as server:
        replies = [await fetch(server.address) for _ in range(3)]
        records = await server.wait_for_closed(3)
    assert replies == [b"hello", b"he", b"hello"]
    assert [(r.sent, r.ended, r.faults) for r in records] == [
        (b"hello", Ending.SERVER_CLOSED, ()),
        (b"he", Ending.CLOSED_BY_FAULT, ("close_after",)),
        (b"hello", Ending.SERVER_CLOSED, ()),
    ]


async def closed_pattern(aim: Aim, count: int) -> list[bool]:
    """Which of `count` connections a close_after fault aimed by `aim` cut short."""
    async with TestServer(HELLO, faults=Faults(close_after=2, connections=aim)) as server:
        replies = [await fetch(server.address) for _ in range(count)]
        records = await server.wait_for_closed(count)
    assert set(replies) <= {b"he", b"hello"}
    pattern = [reply == b"he" for reply in replies]
    assert pattern == [record.faults == ("close_after",) for record in records]
    return pattern


@pytest.mark.asyncio
async def test_probability_with_a_seed_gives_the_same_pattern_twice() -> None:
    first = await closed_pattern(Aim.probability(0.5, seed=7), 16)
    second = await closed_pattern(Aim.probability(0.5, seed=7), 16)
    assert first == second
    assert 0 < sum(first) < 16  # a mix, and the same one every run
    assert first == [Aim.probability(0.5, seed=7).hits(i) for i in range(16)]
    assert await closed_pattern(Aim.probability(0), 4) == [False] * 4
    assert await closed_pattern(Aim.probability(1), 4) == [True] * 4


@pytest.mark.asyncio
async def test_setting_the_aim_at_run_time_counts_from_then() -> None:
    async with TestServer(HELLO) as server:
        assert await fetch(server.address) == b"hello"
        server.faults.close_after = 2
        server.faults.connections = Aim.first(1)  # the next connection only
        assert await fetch(server.address) == b"he"
        assert await fetch(server.address) == b"hello"
        server.faults.connections = Aim.first(1)  # again: the count starts over
        assert await fetch(server.address) == b"he"
        server.faults.clear()
        assert await fetch(server.address) == b"hello"


def test_threaded_server_fails_once_then_behaves() -> None:
    for loop in LOOPS:
        faults = Faults(close_after=2, connections=Aim.first(1))
        with ThreadedTestServer(HELLO, loop=loop, faults=faults) as server:
            for expected in (b"he", b"hello"):
                with socket.create_connection(server.address, timeout=5) as sock:
                    assert recv_all(sock) == expected
            records = server.wait_for_closed(2)
        assert [r.faults for r in records] == [("close_after",), ()]


# A failed TLS handshake.


async def tls_talk(address: tuple[str, int], context: ssl.SSLContext, data: bytes) -> bytes:
    """Over TLS: send `data`, read until `data`'s length came back, close."""
    reader, writer = await asyncio.open_connection(
        *address, ssl=context, server_hostname="127.0.0.1"
    )
    try:
        writer.write(data)
        return await reader.readexactly(len(data))
    finally:
        await close(writer)


@pytest.mark.asyncio
async def test_fail_tls_fails_the_first_handshake_then_behaves(
    server_tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    faults = Faults(fail_tls=True, connections=Aim.first(1))
    async with TestServer(echo, ssl=server_tls_context, faults=faults) as server:
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            await tls_talk(server.address, client_tls_context, b"first")
        assert await tls_talk(server.address, client_tls_context, b"second") == b"second"
        records = await server.wait_for_closed(2)
    assert [(r.received, r.sent, r.ended, r.faults) for r in records] == [
        (b"", b"", Ending.TLS_FAILED, ("fail_tls",)),
        (b"second", b"second", Ending.CLIENT_CLOSED, ()),
    ]


@pytest.mark.asyncio
async def test_on_tls_the_aim_counts_each_connection_once(
    server_tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    # Decided before the handshake for fail_tls, and not again by the handler.
    faults = Faults(close_after=2, connections=Aim.nth(2))
    async with TestServer(HELLO, ssl=server_tls_context, faults=faults) as server:
        replies = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection(
                *server.address, ssl=client_tls_context, server_hostname="127.0.0.1"
            )
            replies.append(await reader.read())
            await close(writer)
        records = await server.wait_for_closed(3)
    assert replies == [b"hello", b"he", b"hello"]
    assert [r.faults for r in records] == [(), ("close_after",), ()]


def test_threaded_fail_tls_with_a_blocking_client(
    server_tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    for loop in LOOPS:
        faults = Faults(fail_tls=True)
        with ThreadedTestServer(echo, loop=loop, ssl=server_tls_context, faults=faults) as server:
            for _ in range(2):
                with (
                    socket.create_connection(server.address, timeout=5) as sock,
                    pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"),
                ):
                    client_tls_context.wrap_socket(sock, server_hostname="127.0.0.1")
            server.faults.fail_tls = False
            with (
                socket.create_connection(server.address, timeout=5) as sock,
                client_tls_context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(b"ping")
                assert tls.recv(4) == b"ping"
            records = server.wait_for_closed(3)
        assert [r.ended for r in records] == [Ending.TLS_FAILED] * 2 + [Ending.CLIENT_CLOSED]


# Faults of the network.


@pytest.mark.asyncio
async def test_bandwidth_paces_what_the_server_sends() -> None:
    data = bytes(range(256)) * 256  # 64 KiB
    faults = Faults(bandwidth=256 * 1024)
    async with TestServer(sends(data), faults=faults) as server:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(*server.address)
        received = await reader.read()
        elapsed = time.monotonic() - started
        await close(writer)
        (record,) = await server.wait_for_closed(1)
    assert received == data
    assert record.sent == data
    assert record.faults == ("bandwidth",)
    # 64 KiB at 256 KiB/s is 0.25 s, less the last piece's 1/50 s.
    assert 0.2 <= elapsed < 2.0


@pytest.mark.asyncio
async def test_slicer_splits_each_write_into_small_late_pieces() -> None:
    data = b"0123456789abcdefghijklmnopqrstuvwxyz"  # 36 bytes: 8 pieces of 5 or less
    faults = Faults(slice_size=5, slice_delay=0.05)
    async with TestServer(sends(data), faults=faults) as server:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, server.address)
            started = time.monotonic()
            pieces = []
            while chunk := await loop.sock_recv(sock, 1024):
                pieces.append(chunk)
            elapsed = time.monotonic() - started
        finally:
            sock.close()
        (record,) = await server.wait_for_closed(1)
    assert b"".join(pieces) == data
    assert max(len(piece) for piece in pieces) <= 5
    assert len(pieces) == 8  # 0.05 s apart, each read on its own
    assert elapsed >= 7 * 0.05 - TIMER_SLACK
    assert record.sent == data


@pytest.mark.asyncio
async def test_half_close_after_sends_eof_and_goes_on_reading() -> None:
    async with TestServer(echo, faults=Faults(half_close_after=5)) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"hello world\n")
        assert await reader.read() == b"hello"  # then EOF
        writer.write(b"still heard\n")
        await server.wait_for_messages(2)
        writer.write_eof()
        await close(writer)
        (record,) = await server.wait_for_closed(1)
    assert record.received == b"hello world\nstill heard\n"
    assert record.messages == [b"hello world\n", b"still heard\n"]
    assert record.sent == b"hello"
    assert record.ended is Ending.CLIENT_CLOSED
    assert record.faults == ("half_close_after",)


@pytest.mark.asyncio
async def test_half_close_after_zero_sends_eof_at_once() -> None:
    async with TestServer(echo, faults=Faults(half_close_after=0)) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        assert await reader.read() == b""
        writer.write(b"heard\n")
        writer.write_eof()
        (record,) = await server.wait_for_closed(1)
        await close(writer)
    assert (record.received, record.sent, record.ended) == (b"heard\n", b"", Ending.CLIENT_CLOSED)


@pytest.mark.asyncio
async def test_slow_close_delays_the_eof_after_the_replies() -> None:
    async with TestServer(echo, faults=Faults(slow_close=0.25)) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"bye")
        writer.write_eof()
        assert await reader.readexactly(3) == b"bye"
        replied = time.monotonic()
        assert await reader.read() == b""
        waited = time.monotonic() - replied
        await close(writer)
        (record,) = await server.wait_for_closed(1)
    assert 0.25 - TIMER_SLACK <= waited < 2.0
    assert (record.sent, record.ended, record.faults) == (
        b"bye",
        Ending.CLIENT_CLOSED,
        ("slow_close",),
    )


@pytest.mark.asyncio
async def test_stall_still_notices_the_clients_close_and_reset() -> None:
    async with TestServer(echo, faults=Faults(stall=True)) as server:
        _reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"never read\n")
        await server.wait_for_connections(1)
        await close(writer)
        (record,) = await server.wait_for_closed(1, timeout=2)
        assert (record.received, record.ended) == (b"", Ending.CLIENT_CLOSED)

        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, server.address)
        await server.wait_for_connections(2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
        records = await server.wait_for_closed(2, timeout=2)
    assert records[1].ended is Ending.CLIENT_RESET
    assert records[1].faults == ("stall",)


@pytest.mark.asyncio
async def test_blackhole_makes_connects_hang_until_accepting_again() -> None:
    async with TestServer(echo) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        await server.blackhole_connections()
        await server.blackhole_connections()  # again: harmless
        assert server.is_blackholing
        assert not server.is_serving
        assert await reader.read() == b""  # down: open connections end too
        await close(writer)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await asyncio.open_connection(*server.address)
        await server.accept_connections()
        assert server.is_serving
        assert await talk(server.address, b"back") == b"back"
        records = await server.wait_for_closed(2)
    assert [r.ended for r in records] == [Ending.SERVER_STOPPED, Ending.CLIENT_CLOSED]


def test_threaded_blackhole() -> None:
    with ThreadedTestServer(echo) as server:
        server.blackhole_connections()
        with pytest.raises(TimeoutError):
            socket.create_connection(server.address, timeout=0.3)
        server.accept_connections()
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"


# The settings.


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(lambda: Aim.first(-1), r"first\(n\)", id="first-negative"),
        pytest.param(lambda: Aim.nth(0), r"nth\(k\)", id="nth-zero"),
        pytest.param(lambda: Aim.probability(1.5), r"probability\(p\)", id="p-above-1"),
        pytest.param(lambda: Faults(bandwidth=0), "bandwidth must be", id="bandwidth-zero"),
        pytest.param(lambda: Faults(slice_size=0), "slice_size must be", id="slice-zero"),
        pytest.param(lambda: Faults(slice_delay=-1), "slice_delay must be", id="slice-delay"),
        pytest.param(lambda: Faults(half_close_after=-1), "half_close_after", id="half-close"),
        pytest.param(lambda: Faults(slow_close=float("nan")), "slow_close must", id="slow-nan"),
        pytest.param(lambda: Faults(connections=1), "connections must be an Aim", id="aim"),  # type: ignore[arg-type]
    ],
)
def test_settings_are_checked(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_repr_shows_the_faults_on_and_the_aim() -> None:
    faults = Faults(reset=True, bandwidth=1000, slow_close=1, connections=Aim.nth(3))
    assert repr(faults) == (
        "Faults(delay=0.0, close_after=None, reset=True, stall=False, "
        "bandwidth=1000, slow_close=1.0, connections=Aim.nth(3))"
    )
    faults.clear()
    assert repr(faults) == "Faults(delay=0.0, close_after=None, reset=False, stall=False)"
    assert faults.connections == Aim.all()
    assert repr(Aim.probability(0.25, seed=1)) == "Aim.probability(0.25, seed=1)"
    assert repr(Aim.first(2)) == "Aim.first(2)"


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data
