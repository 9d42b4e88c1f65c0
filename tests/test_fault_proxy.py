"""aioserver.testing.FaultProxy: a TCP proxy with faults each way, in front of a
test server for exact bytes, and in front of Debian's redis-server driven by
redis-py for what a real client library reports.

Real sockets on 127.0.0.1; the in-loop tests run on both loops (see conftest).
redis-server comes from Debian's package, which .ci/run installs; where it is
missing the Redis tests are skipped, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from aioserver.pytest_plugin import FaultProxyFactory, ServerFactory, ThreadedFaultProxyFactory
from aioserver.testing import (
    Aim,
    Ending,
    FaultProxy,
    Faults,
    ProxyEnding,
    ProxyFaults,
    TestServer,
    ThreadedFaultProxy,
    ThreadedTestServer,
)
from aioserver.testing.proxy_faults import _vary

from .helpers import LOOPS, close, open_fds, sends, talk, wait_until

# Timers may fire a hair early by the clock the client reads (uvloop keeps
# milliseconds): a measured wait must be at least the fault's minus this.
TIMER_SLACK = 0.01
# A read that must not complete gets this long to show it.
QUIET = 0.3
HOST = "127.0.0.1"


async def echo_once(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> tuple[bytes, float]:
    """Send `data` on an open connection, read its echo; (echo, seconds taken)."""
    began = time.monotonic()
    writer.write(data)
    reply = await reader.readexactly(len(data))
    return reply, time.monotonic() - began


async def outcome(address: tuple[str, int], data: bytes) -> bytes | str:
    """What a client sending `data` then EOF gets: the bytes, or "reset"."""
    try:
        return await talk(address, data)
    except ConnectionResetError:
        return "reset"


# Carrying.


@pytest.mark.asyncio
async def test_bytes_are_carried_exactly_each_way_and_recorded(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address)
    assert proxy.upstream_address == echo_server.address
    reader, writer = await asyncio.open_connection(*proxy.address)
    for chunk in (b"one ", b"two ", b"x" * 100_000):
        writer.write(chunk)
        assert await reader.readexactly(len(chunk)) == chunk
    writer.write_eof()  # a half-close is passed on: the echo server closes in turn
    assert await reader.read() == b""
    await close(writer)
    (record,) = await proxy.wait_for_closed(1)
    sent = b"one two " + b"x" * 100_000
    assert record.from_client == record.to_service == sent
    assert record.from_service == record.to_client == sent
    assert record.ended is ProxyEnding.CLIENT_CLOSED
    assert (record.upstream_faults, record.downstream_faults, record.error) == ((), (), None)
    (served,) = await echo_server.wait_for_closed(1)
    assert served.received == sent
    assert served.ended is Ending.CLIENT_CLOSED


@pytest.mark.asyncio
async def test_a_service_that_closes_first(
    server_factory: ServerFactory, fault_proxy_factory: FaultProxyFactory
) -> None:
    service = await server_factory(sends(b"hello"))
    proxy = await fault_proxy_factory(f"127.0.0.1:{service.port}")  # "host:port" works too
    reader, writer = await asyncio.open_connection(*proxy.address)
    assert await reader.read() == b"hello"
    await close(writer)
    (record,) = await proxy.wait_for_closed(1)
    assert (record.to_client, record.ended) == (b"hello", ProxyEnding.SERVICE_CLOSED)


@pytest.mark.asyncio
async def test_a_service_reset_reaches_the_client_as_a_reset(
    server_factory: ServerFactory, fault_proxy_factory: FaultProxyFactory
) -> None:
    service = await server_factory(faults=Faults(reset=True))
    proxy = await fault_proxy_factory(service.address)
    assert await outcome(proxy.address, b"ping") == "reset"
    (record,) = await proxy.wait_for_closed(1)
    assert record.ended is ProxyEnding.SERVICE_RESET
    assert isinstance(record.error, ConnectionResetError)
    assert (record.to_service, record.to_client) == (b"ping", b"")


@pytest.mark.asyncio
async def test_a_client_reset_resets_the_service_side(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address)
    reader, writer = await asyncio.open_connection(*proxy.address)
    assert await echo_once(reader, writer, b"hi") == (b"hi", pytest.approx(0, abs=5))
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    (record,) = await proxy.wait_for_closed(1)
    assert record.ended is ProxyEnding.CLIENT_RESET
    (served,) = await echo_server.wait_for_closed(1)
    assert served.ended is Ending.CLIENT_RESET


# Each fault, in each direction.


@pytest.mark.asyncio
async def test_latency_each_way_adds_up(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(
        echo_server.address,
        upstream=ProxyFaults(latency=0.1),
        downstream=ProxyFaults(latency=0.15),
    )
    reader, writer = await asyncio.open_connection(*proxy.address)
    reply, took = await echo_once(reader, writer, b"ping")
    assert reply == b"ping"
    assert took >= 0.25 - TIMER_SLACK
    await close(writer)
    (record,) = await proxy.wait_for_closed(1)
    assert (record.upstream_faults, record.downstream_faults) == (("latency",), ("latency",))


@pytest.mark.asyncio
async def test_jitter_varies_the_latency_but_keeps_the_order(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(
        echo_server.address, downstream=ProxyFaults(latency=0.05, jitter=0.05)
    )
    reader, writer = await asyncio.open_connection(*proxy.address)
    sent = b""
    began = time.monotonic()
    for number in range(20):
        chunk = b"%d," % number
        sent += chunk
        writer.write(chunk)
        await asyncio.sleep(0.005)
    assert await reader.readexactly(len(sent)) == sent  # in order, whatever each waited
    assert time.monotonic() - began < 5
    await close(writer)


@pytest.mark.asyncio
async def test_bandwidth_paces_one_direction(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address, downstream=ProxyFaults(bandwidth=20_000))
    reader, writer = await asyncio.open_connection(*proxy.address)
    began = time.monotonic()
    writer.write(b"b" * 10_000)
    assert await reader.readexactly(10_000) == b"b" * 10_000
    # 10,000 bytes at 20,000 B/s, in pieces of 400: the last leaves 0.48 s in.
    assert time.monotonic() - began >= 0.48 - TIMER_SLACK
    await close(writer)
    (record,) = await proxy.wait_for_closed(1)
    assert record.downstream_faults == ("bandwidth",)


@pytest.mark.asyncio
async def test_the_slicer_passes_data_on_in_pieces_apart(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(
        echo_server.address, upstream=ProxyFaults(slice_size=100, slice_delay=0.02)
    )
    reader, writer = await asyncio.open_connection(*proxy.address)
    began = time.monotonic()
    data = bytes(range(256)) * 4
    writer.write(data)
    assert await reader.readexactly(len(data)) == data
    # 11 pieces, 0.02 s apart.
    assert time.monotonic() - began >= 10 * 0.02 - TIMER_SLACK
    await close(writer)
    (served,) = await echo_server.wait_for_closed(1)
    assert served.received == data
    (record,) = proxy.connections
    assert record.upstream_faults == ("slice_size", "slice_delay")


def test_slice_variation_cuts_pieces_around_the_size() -> None:
    data = bytes(1000)
    for _ in range(20):
        pieces = _vary(data, 10, 3)
        assert b"".join(pieces) == data
        assert all(7 <= len(piece) <= 13 for piece in pieces[:-1])
    assert {len(piece) for piece in _vary(data, 10, 3)} != {10}


@pytest.mark.asyncio
async def test_slice_variation_end_to_end(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    faults = ProxyFaults(slice_size=20, slice_variation=10, slice_delay=0.005)
    proxy = await fault_proxy_factory(echo_server.address, downstream=faults)
    data = bytes(range(200))
    assert await talk(proxy.address, data) == data
    (record,) = await proxy.wait_for_closed(1)
    assert record.to_client == data


@pytest.mark.asyncio
async def test_timeout_drops_data_then_closes_both_sides(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address, upstream=ProxyFaults(timeout=0.2))
    reader, writer = await asyncio.open_connection(*proxy.address)
    began = time.monotonic()
    writer.write(b"lost")
    assert await reader.read() == b""
    assert time.monotonic() - began >= 0.2 - TIMER_SLACK
    await close(writer)
    (record,) = await proxy.wait_for_closed(1)
    assert (record.from_client, record.to_service) == (b"lost", b"")
    assert record.ended is ProxyEnding.CLOSED_BY_FAULT
    (served,) = await echo_server.wait_for_closed(1)
    assert served.received == b""


@pytest.mark.asyncio
async def test_timeout_zero_holds_the_connection_until_switched_off(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address, downstream=ProxyFaults(timeout=0))
    reader, writer = await asyncio.open_connection(*proxy.address)
    writer.write(b"dropped")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(100), QUIET)
    (record,) = proxy.connections
    assert record.is_open
    assert (record.from_service, record.to_client) == (b"dropped", b"")
    proxy.downstream.timeout = None  # data flows again; what was dropped stays lost
    assert await echo_once(reader, writer, b"flows") == (b"flows", pytest.approx(0, abs=5))
    await close(writer)


@pytest.mark.asyncio
@pytest.mark.parametrize("direction", ["upstream", "downstream"])
async def test_limit_data_passes_exactly_that_many_bytes_then_closes(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory, direction: str
) -> None:
    proxy = await fault_proxy_factory(echo_server.address, **{direction: ProxyFaults(limit_data=5)})
    reader, writer = await asyncio.open_connection(*proxy.address)
    writer.write(b"hello world")
    received = await reader.read()
    await close(writer)
    (record,) = await proxy.wait_for_closed(1)
    assert record.ended is ProxyEnding.CLOSED_BY_FAULT
    if direction == "downstream":
        assert received == b"hello"
        assert (record.from_service, record.to_client) == (b"hello world", b"hello")
    else:
        assert received in (b"", b"hello")  # the echo may or may not beat the close
        assert record.to_service == b"hello"
        (served,) = await echo_server.wait_for_closed(1)
        assert served.received == b"hello"


@pytest.mark.asyncio
async def test_reset_peer_at_once_resets_on_the_first_data(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address, downstream=ProxyFaults(reset_peer=0))
    reader, writer = await asyncio.open_connection(*proxy.address)
    writer.write(b"ping")
    with pytest.raises(ConnectionResetError):
        await reader.read()
    await close(writer)
    (record,) = await proxy.wait_for_closed(1)
    assert record.ended is ProxyEnding.RESET_BY_FAULT
    assert (record.from_service, record.to_client) == (b"ping", b"")
    (served,) = await echo_server.wait_for_closed(1)
    assert served.ended is Ending.CLIENT_RESET  # the service side was reset too


@pytest.mark.asyncio
async def test_reset_peer_after_a_delay(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address, upstream=ProxyFaults(reset_peer=0.2))
    reader, writer = await asyncio.open_connection(*proxy.address)
    began = time.monotonic()
    writer.write(b"ping")
    with pytest.raises(ConnectionResetError):
        await reader.read()
    assert time.monotonic() - began >= 0.2 - TIMER_SLACK
    await close(writer)
    (record,) = await proxy.wait_for_closed(1)
    assert (record.to_service, record.ended) == (b"", ProxyEnding.RESET_BY_FAULT)


@pytest.mark.asyncio
async def test_slow_close_delays_the_eof_not_the_data(
    server_factory: ServerFactory, fault_proxy_factory: FaultProxyFactory
) -> None:
    service = await server_factory(sends(b"bye"))
    proxy = await fault_proxy_factory(service.address, downstream=ProxyFaults(slow_close=0.5))
    reader, writer = await asyncio.open_connection(*proxy.address)
    began = time.monotonic()
    assert await reader.readexactly(3) == b"bye"
    assert time.monotonic() - began < 0.5
    assert await reader.read() == b""
    assert time.monotonic() - began >= 0.5 - TIMER_SLACK
    await close(writer)
    (record,) = await proxy.wait_for_closed(1)
    assert record.ended is ProxyEnding.SERVICE_CLOSED


# Aiming, and switching while running.


@pytest.mark.asyncio
async def test_a_fault_aimed_at_the_first_connection(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(
        echo_server.address, downstream=ProxyFaults(reset_peer=0, connections=Aim.first(1))
    )
    assert [await outcome(proxy.address, b"try") for _ in range(3)] == [
        "reset",
        b"try",
        b"try",
    ]
    records = await proxy.wait_for_closed(3)
    assert [r.downstream_faults for r in records] == [("reset_peer",), (), ()]
    assert [r.ended for r in records] == [
        ProxyEnding.RESET_BY_FAULT,
        ProxyEnding.CLIENT_CLOSED,
        ProxyEnding.CLIENT_CLOSED,
    ]


@pytest.mark.asyncio
async def test_a_fault_aimed_at_the_nth_connection_counts_from_when_it_was_set(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address)
    assert await outcome(proxy.address, b"a") == b"a"
    proxy.upstream.limit_data = 0
    proxy.upstream.connections = Aim.nth(2)  # the second from now on
    assert [await outcome(proxy.address, b"b") for _ in range(3)] == [b"b", b"", b"b"]
    records = await proxy.wait_for_closed(4)
    assert [r.upstream_faults for r in records] == [(), (), ("limit_data",), ()]
    assert records[2].ended is ProxyEnding.CLOSED_BY_FAULT


@pytest.mark.asyncio
async def test_a_fault_aimed_by_probability_with_a_seed_is_repeatable(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    aim = Aim.probability(0.5, seed=7)
    proxy = await fault_proxy_factory(
        echo_server.address, downstream=ProxyFaults(reset_peer=0, connections=aim)
    )
    expected = [aim.hits(count) for count in range(8)]
    assert sorted(set(expected)) == [False, True]  # the seed gives a mixed pattern
    got = [await outcome(proxy.address, b"?") == "reset" for _ in range(8)]
    assert got == expected
    records = await proxy.wait_for_closed(8)
    assert [bool(r.downstream_faults) for r in records] == expected


@pytest.mark.asyncio
async def test_each_direction_has_its_own_aim(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(
        echo_server.address,
        upstream=ProxyFaults(latency=0.01, connections=Aim.first(1)),
        downstream=ProxyFaults(limit_data=1, connections=Aim.nth(2)),
    )
    assert [await outcome(proxy.address, b"xy") for _ in range(2)] == [b"xy", b"x"]
    records = await proxy.wait_for_closed(2)
    assert [(r.upstream_faults, r.downstream_faults) for r in records] == [
        (("latency",), ()),
        ((), ("limit_data",)),
    ]


@pytest.mark.asyncio
async def test_faults_switch_on_an_open_connection(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address)
    reader, writer = await asyncio.open_connection(*proxy.address)
    reply, took = await echo_once(reader, writer, b"fast")
    assert reply == b"fast"
    proxy.downstream.latency = 0.2
    reply, took = await echo_once(reader, writer, b"slow")
    assert (reply, took >= 0.2 - TIMER_SLACK) == (b"slow", True)
    proxy.downstream.latency = 0
    reply, took = await echo_once(reader, writer, b"fast")
    assert (reply, took < 0.2) == (b"fast", True)
    proxy.downstream.limit_data = 14  # counted from the start: 12 passed already
    writer.write(b"truncated")
    assert await reader.read() == b"tr"
    await close(writer)
    (record,) = await proxy.wait_for_closed(1)
    assert record.to_client == b"fastslowfasttr"
    assert record.ended is ProxyEnding.CLOSED_BY_FAULT


# Down, up, and connecting to the service.


@pytest.mark.asyncio
async def test_refused_then_accepting_again_on_the_same_port(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address)
    port = proxy.port
    reader, writer = await asyncio.open_connection(*proxy.address)
    await proxy.refuse_connections()
    assert proxy.is_refusing
    assert await reader.read() == b""  # open connections end as at a stop
    await close(writer)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*proxy.address)
    await proxy.accept_connections()
    assert (proxy.is_serving, proxy.port) == (True, port)
    assert await talk(proxy.address, b"back") == b"back"
    first, second = await proxy.wait_for_closed(2)
    assert first.ended is ProxyEnding.PROXY_STOPPED
    assert second.ended is ProxyEnding.CLIENT_CLOSED


@pytest.mark.asyncio
async def test_blackholed_connects_hang_until_accepting_again(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address)
    await proxy.blackhole_connections()
    assert proxy.is_blackholing
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.open_connection(*proxy.address), QUIET)
    await proxy.accept_connections()
    assert await talk(proxy.address, b"back") == b"back"
    assert len(proxy.connections) == 1


@pytest.mark.asyncio
async def test_a_service_that_refuses_closes_the_client_and_is_recorded(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address)
    await echo_server.refuse_connections()
    assert await talk(proxy.address, b"anyone?") == b""
    (record,) = await proxy.wait_for_closed(1)
    assert record.ended is ProxyEnding.UPSTREAM_FAILED
    assert isinstance(record.error, ConnectionRefusedError)
    assert record.from_client == b""  # nothing read before the service answered


@pytest.mark.asyncio
async def test_a_connect_to_the_service_that_hangs_times_out(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address, connect_timeout=0.2)
    assert proxy.connect_timeout == 0.2
    await echo_server.blackhole_connections()
    began = time.monotonic()
    assert await talk(proxy.address, b"anyone?") == b""
    assert time.monotonic() - began >= 0.2 - TIMER_SLACK
    (record,) = await proxy.wait_for_closed(1)
    assert record.ended is ProxyEnding.UPSTREAM_FAILED
    assert isinstance(record.error, TimeoutError)
    assert "timed out after 0.2 s" in str(record.error)


# Life.


@pytest.mark.asyncio
async def test_stop_closes_every_connection_and_leaves_nothing(echo_server: TestServer) -> None:
    fds = open_fds()
    proxy = FaultProxy(echo_server.address, downstream=ProxyFaults(latency=5))
    async with proxy:
        clients = [await asyncio.open_connection(*proxy.address) for _ in range(3)]
        for _, writer in clients:
            writer.write(b"held back")
        await wait_until(
            lambda: sum(len(r.from_service) for r in proxy.connections) == 27,
            what="the echoes held back by the proxy",
        )
    assert not proxy.is_serving
    for reader, writer in clients:
        assert await reader.read() == b""  # the delayed echo was dropped
        await close(writer)
    records = proxy.connections
    assert [r.ended for r in records] == [ProxyEnding.PROXY_STOPPED] * 3
    assert all(r.to_client == b"" for r in records)
    await proxy.stop()  # again: harmless
    await echo_server.wait_for_closed(3)
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert open_fds() == fds


@pytest.mark.parametrize("loop", LOOPS)
def test_threaded_proxy_for_a_blocking_client(loop: str) -> None:
    with (
        ThreadedTestServer() as service,
        ThreadedFaultProxy(service.address, loop=loop) as proxy,
    ):
        proxy.downstream.latency = 0.1  # set from this thread
        with socket.create_connection(proxy.address, timeout=5) as sock:
            began = time.monotonic()
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
            assert time.monotonic() - began >= 0.1 - TIMER_SLACK
        (record,) = proxy.wait_for_closed(1)
        assert (record.to_client, record.ended) == (b"ping", ProxyEnding.CLIENT_CLOSED)
        proxy.refuse_connections()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=5)
        proxy.accept_connections()
        proxy.downstream.clear()
        proxy.upstream.limit_data = 2
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(b"abc")
            assert sock.recv(10) in (b"", b"ab")
        assert proxy.wait_for_closed(2)[1].to_service == b"ab"
    assert proxy.loop is None
    assert "aioserver-fault-proxy" not in {thread.name for thread in threading.enumerate()}


@pytest.mark.asyncio
async def test_a_threaded_proxy_from_an_async_test(echo_server: TestServer) -> None:
    with ThreadedFaultProxy(echo_server.address) as proxy:
        assert await talk(proxy.address, b"any loop") == b"any loop"


def test_the_threaded_fixture(
    threaded_fault_proxy_factory: ThreadedFaultProxyFactory,
) -> None:
    with ThreadedTestServer() as service:
        proxy = threaded_fault_proxy_factory(service.address, loop="asyncio")
        assert threaded_fault_proxy_factory.proxies == [proxy]
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        threaded_fault_proxy_factory.close()
        assert not proxy.is_serving


@pytest.mark.asyncio
async def test_options_are_checked(echo_server: TestServer) -> None:
    with pytest.raises(ValueError, match="host must be an IP address"):
        FaultProxy(echo_server.address, host="localhost")
    with pytest.raises(ValueError, match="connect_timeout"):
        FaultProxy(echo_server.address, connect_timeout=0)
    with pytest.raises(ValueError, match="'host:port'"):
        FaultProxy("no port")
    for name, value in [
        ("latency", -1),
        ("jitter", float("inf")),
        ("bandwidth", 0),
        ("slice_size", 0),
        ("slice_variation", -1),
        ("timeout", -1),
        ("limit_data", -1),
        ("reset_peer", "soon"),
        ("connections", 1),
    ]:
        with pytest.raises(ValueError, match=name):
            setattr(ProxyFaults(), name, value)
    faults = ProxyFaults(latency=0.1, limit_data=3, connections=Aim.first(2))
    assert repr(faults) == "ProxyFaults(latency=0.1, limit_data=3, connections=Aim.first(2))"
    faults.clear()
    assert repr(faults) == "ProxyFaults()"
    proxy = FaultProxy(echo_server.address)
    with pytest.raises(RuntimeError, match="no port yet"):
        _ = proxy.port
    async with proxy:
        assert repr(proxy) == (
            f"<FaultProxy 127.0.0.1:{proxy.port} -> 127.0.0.1:{echo_server.port} serving>"
        )
        with pytest.raises(RuntimeError, match="starts once"):
            await proxy.start()


@pytest.mark.asyncio
async def test_the_transcript_shows_each_way(
    echo_server: TestServer, fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(echo_server.address, downstream=ProxyFaults(limit_data=2))
    await talk(proxy.address, b"abc")
    await proxy.wait_for_closed(1)
    lines = proxy.transcript().splitlines()
    assert lines[1:] == [
        lines[1],
        "  from the client 3 bytes: b'abc'",
        "  to the service 3 bytes: b'abc'",
        "  from the service 3 bytes: b'abc'",
        "  to the client 2 bytes: b'ab'",
    ]
    assert lines[1].endswith(", closed by a fault:")


# In front of a real service: Debian's redis-server, driven by redis-py.

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (.ci/run installs Debian's redis-server package)",
)
REDIS_START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def redis_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A redis-server on 127.0.0.1 for this module: no persistence, killed at the end."""
    assert REDIS_SERVER is not None
    workdir: Path = tmp_path_factory.mktemp("redis")
    port = free_port()
    with (workdir / "redis.log").open("wb") as log:
        process = subprocess.Popen(
            [
                *(REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not redis_answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start: {(workdir / 'redis.log').read_text()}")
            time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        process.kill()
        process.wait(timeout=10)


def redis_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(7) == b"+PONG\r\n"
    return False


def no_retries() -> AsyncRetry:
    """redis-py retries a failed command 10 times by default; this makes the
    first failure the one the test sees."""
    return AsyncRetry(NoBackoff(), 0)


@needs_redis
@pytest.mark.asyncio
async def test_redis_sees_the_latency(
    redis_address: tuple[str, int], fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(redis_address)
    async with aredis.Redis(host=HOST, port=proxy.port, retry=no_retries()) as client:
        assert await client.ping() is True  # connected, without faults
        proxy.downstream.latency = 0.2
        began = time.monotonic()
        assert await client.set("greeting", "hello") is True
        assert await client.get("greeting") == b"hello"
        assert time.monotonic() - began >= 2 * 0.2 - TIMER_SLACK


@needs_redis
@pytest.mark.asyncio
async def test_redis_reports_a_reset_aimed_at_the_first_connection(
    redis_address: tuple[str, int], fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(
        redis_address, downstream=ProxyFaults(reset_peer=0, connections=Aim.first(1))
    )
    async with aredis.Redis(host=HOST, port=proxy.port, retry=no_retries()) as client:
        with pytest.raises(redis.exceptions.ConnectionError, match="Connection reset by peer"):
            await client.ping()
        assert await client.ping() is True  # a new connection: not aimed at
    first, second = await proxy.wait_for_closed(2)
    assert first.ended is ProxyEnding.RESET_BY_FAULT
    assert first.to_client == b""
    assert second.ended is ProxyEnding.CLIENT_CLOSED


@needs_redis
@pytest.mark.asyncio
async def test_redis_retries_through_resets(
    redis_address: tuple[str, int], fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(
        redis_address, downstream=ProxyFaults(reset_peer=0, connections=Aim.first(2))
    )
    retry = AsyncRetry(NoBackoff(), 2)  # as recent redis-py releases retry by default
    async with aredis.Redis(host=HOST, port=proxy.port, retry=retry) as client:
        assert await client.ping() is True
    records = await proxy.wait_for_closed(3)
    assert [r.ended for r in records] == [
        ProxyEnding.RESET_BY_FAULT,
        ProxyEnding.RESET_BY_FAULT,
        ProxyEnding.CLIENT_CLOSED,
    ]


@needs_redis
@pytest.mark.asyncio
async def test_redis_reports_a_truncated_reply(
    redis_address: tuple[str, int], fault_proxy_factory: FaultProxyFactory
) -> None:
    async with aredis.Redis(host=HOST, port=redis_address[1]) as direct:
        await direct.set("big", b"x" * 10_000)
    proxy = await fault_proxy_factory(redis_address, downstream=ProxyFaults(limit_data=1000))
    async with aredis.Redis(host=HOST, port=proxy.port, retry=no_retries()) as client:
        with pytest.raises(redis.exceptions.ConnectionError, match="Connection closed by server"):
            await client.get("big")
    (record,) = await proxy.wait_for_closed(1)
    assert len(record.to_client) == 1000
    assert len(record.from_service) > 10_000
    assert record.ended is ProxyEnding.CLOSED_BY_FAULT


@needs_redis
@pytest.mark.asyncio
async def test_redis_reports_a_hung_service_as_a_timeout(
    redis_address: tuple[str, int], fault_proxy_factory: FaultProxyFactory
) -> None:
    proxy = await fault_proxy_factory(redis_address)
    async with aredis.Redis(
        host=HOST, port=proxy.port, retry=no_retries(), socket_timeout=QUIET
    ) as client:
        assert await client.ping() is True
        proxy.downstream.timeout = 0  # replies dropped, connection kept
        with pytest.raises(redis.exceptions.TimeoutError, match="Timeout reading"):
            await client.ping()
    proxy.downstream.timeout = 0.1  # replies dropped, connection closed 0.1 s later
    async with aredis.Redis(
        host=HOST, port=proxy.port, retry=no_retries(), socket_timeout=5
    ) as client:
        with pytest.raises(redis.exceptions.ConnectionError, match="Connection closed by server"):
            await client.ping()
    records = await proxy.wait_for_closed(2)
    assert records[1].ended is ProxyEnding.CLOSED_BY_FAULT


@needs_redis
def test_sync_redis_through_the_threaded_proxy(
    redis_address: tuple[str, int], threaded_fault_proxy_factory: ThreadedFaultProxyFactory
) -> None:
    proxy = threaded_fault_proxy_factory(redis_address, upstream=ProxyFaults(latency=0.1))
    retry = redis.retry.Retry(NoBackoff(), 0)
    with redis.Redis(host=HOST, port=proxy.port, retry=retry, socket_timeout=5) as client:
        began = time.monotonic()
        assert client.ping() is True
        assert time.monotonic() - began >= 0.1 - TIMER_SLACK
        proxy.upstream.clear()
        proxy.downstream.reset_peer = 0
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
    (record,) = proxy.wait_for_closed(1)
    assert record.ended is ProxyEnding.RESET_BY_FAULT
