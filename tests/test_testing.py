"""aioserver.testing: the in-loop and threaded test servers, recording and faults."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from aioserver import echo, thanks
from aioserver.testing import (
    DEFAULT_WAIT_TIMEOUT,
    ConnectionRecord,
    Ending,
    Faults,
    TestServer,
    ThreadedTestServer,
    WrongLoopError,
)

from .helpers import LOOPS, PREFIX, close, needs_ipv6, open_fds, talk

# Long enough to stand far above loopback latency, short enough to keep tests quick.
DELAY = 0.25
# Timers may fire a hair early by the clock the client reads (uvloop keeps
# milliseconds): the measured delay must still be at least DELAY minus this.
TIMER_SLACK = 0.01
# More than any loopback send and receive buffers together; a send that has not
# blocked by then never will.
MAX_UNBLOCKED_SEND = 64 * 1024 * 1024


def only_task_left() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


# The in-loop server.


@pytest.mark.asyncio
async def test_accepts_on_an_ephemeral_port_when_handed_over() -> None:
    async with TestServer() as server:
        assert server.is_serving
        assert server.host == "127.0.0.1"
        assert server.port > 0
        assert server.address == ("127.0.0.1", server.port)
        assert server.server.port == server.port
        assert server.loop is asyncio.get_running_loop()
        assert await talk(server.address, b"ping\x00\xff") == b"ping\x00\xff"
        address = server.address
    assert not server.is_serving
    assert only_task_left()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*address)


@pytest.mark.asyncio
async def test_records_peer_bytes_messages_and_ending() -> None:
    async with TestServer(thanks) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        sockname = writer.get_extra_info("sockname")
        writer.write(b"hello\r\nwor")
        writer.write(b"ld\nlast")
        writer.write_eof()
        replies = await reader.read()
        await close(writer)
        (record,) = await server.wait_for_closed(1)
    assert replies == PREFIX + b"hello\r\n" + PREFIX + b"world\n" + PREFIX + b"last\n"
    assert record == ConnectionRecord(
        index=0,
        peer=(sockname[0], sockname[1]),
        received=b"hello\r\nworld\nlast",
        sent=replies,
        messages=[b"hello\r\n", b"world\n", b"last"],
        ended=Ending.CLIENT_CLOSED,
    )
    assert not record.is_open
    assert server.messages == [b"hello\r\n", b"world\n", b"last"]


@pytest.mark.asyncio
async def test_recording_shows_exactly_what_each_of_20_concurrent_clients_sent() -> None:
    clients = 20

    async def client(number: int) -> tuple[tuple[str, int], bytes, bytes]:
        reader, writer = await asyncio.open_connection(*server.address)
        sockname = writer.get_extra_info("sockname")
        sent = b""
        for line in range(5):
            chunk = f"client {number} line {line}\n".encode()
            writer.write(chunk)
            sent += chunk
            await writer.drain()
        writer.write_eof()
        replies = await reader.read()
        await close(writer)
        return (sockname[0], sockname[1]), sent, replies

    async with TestServer(thanks) as server:
        results = await asyncio.gather(*(client(number) for number in range(clients)))
        records = await server.wait_for_closed(clients)
        messages = server.messages

    assert len(records) == clients
    by_peer = {record.peer: record for record in records}
    assert len(by_peer) == clients
    for peer, sent, replies in results:
        record = by_peer[peer]
        lines = sent.splitlines(keepends=True)
        assert record.received == sent
        assert record.messages == lines
        assert record.sent == replies == b"".join(PREFIX + x for x in lines)
        assert record.ended is Ending.CLIENT_CLOSED
    assert sorted(messages) == sorted(
        line for _, sent, _ in results for line in sent.splitlines(True)
    )
    assert [record.index for record in records] == list(range(clients))


@pytest.mark.asyncio
async def test_waits_return_at_the_count_and_time_out_with_what_arrived() -> None:
    async with TestServer(thanks) as server:
        assert await server.wait_for_connections(0) == []
        with pytest.raises(TimeoutError, match=r"waited 0.01 s for 1 connections, but 0 accepted"):
            await server.wait_for_connections(1, timeout=0.01)
        reader, writer = await asyncio.open_connection(*server.address)
        (record,) = await server.wait_for_connections(1)
        assert record.is_open
        writer.write(b"one\ntwo\n")
        assert await server.wait_for_messages(2) == [b"one\n", b"two\n"]
        with pytest.raises(TimeoutError, match=r"for 3 messages, but 2 received"):
            await server.wait_for_messages(3, timeout=0.01)
        with pytest.raises(TimeoutError, match=r"for 1 closed connections, but 0 closed"):
            await server.wait_for_closed(1, timeout=0.01)
        await close(writer)
        assert (await reader.read()).startswith(PREFIX + b"one\n")
        (record,) = await server.wait_for_closed(1)
        assert record.ended is Ending.CLIENT_CLOSED


def test_waits_time_out_after_5_s_by_default() -> None:
    assert DEFAULT_WAIT_TIMEOUT == 5.0


@pytest.mark.parametrize("wait", ["wait_for_connections", "wait_for_messages", "wait_for_closed"])
@pytest.mark.parametrize(
    ("n", "timeout", "match"),
    [(-1, 1.0, "n must be"), (1, -1.0, "timeout must not be negative")],
    ids=["negative-n", "negative-timeout"],
)
@pytest.mark.asyncio
async def test_waits_refuse_bad_arguments(wait: str, n: int, timeout: float, match: str) -> None:
    async with TestServer() as server:
        with pytest.raises(ValueError, match=match):
            await getattr(server, wait)(n, timeout=timeout)


@pytest.mark.asyncio
async def test_stop_ends_open_connections_and_leaves_nothing_behind() -> None:
    server = TestServer(faults=Faults(delay=30))
    async with server:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"owed a reply in 30 s\n")
        await server.wait_for_messages(1)
        started = time.monotonic()
    assert time.monotonic() - started < 1.0  # delayed replies are dropped, not awaited
    assert only_task_left()
    assert await reader.read() == b""
    await close(writer)
    (record,) = server.connections
    assert record.received == b"owed a reply in 30 s\n"
    assert record.sent == b""
    assert record.ended is Ending.SERVER_STOPPED
    await server.stop()  # again: harmless


@pytest.mark.asyncio
async def test_handler_failure_is_recorded() -> None:
    failure = ValueError("broken handler")

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3)
        raise failure

    async with TestServer(broken) as server:
        assert await talk(server.address, b"abc") == b""
        (record,) = await server.wait_for_closed(1)
    assert record.ended is Ending.HANDLER_FAILED
    assert record.error is failure
    assert record.received == b"abc"


@pytest.mark.asyncio
async def test_custom_handler_is_switchable_and_sees_a_stream_api() -> None:
    async def greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert isinstance(reader, asyncio.StreamReader)
        assert isinstance(writer, asyncio.StreamWriter)
        assert writer.can_write_eof()
        assert writer.get_extra_info("peername") is not None
        writer.writelines([b"hello ", b"there\n"])
        name = await reader.readuntil(b";")
        size = int(await reader.readexactly(1))
        body = await reader.readexactly(size)
        writer.write(b"got " + name + body + b"\n")
        async for line in reader:
            writer.write(line.upper())
        assert reader.at_eof()
        assert reader.exception() is None
        writer.write_eof()
        await writer.drain()
        assert not writer.is_closing()

    async def short_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b";")

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye\n")

    async with TestServer(echo) as server:
        assert await talk(server.address, b"echo") == b"echo"
        server.handler = greeter
        assert await talk(server.address, b"bob;3abcx\ny") == b"hello there\ngot bob;abc\nX\nY"
        server.handler = short_reader
        assert await talk(server.address, b"no separator") == b""
        server.handler = hang_up
        reader, writer = await asyncio.open_connection(*server.address)
        assert await reader.read() == b"bye\n"
        await close(writer)
        records = await server.wait_for_closed(4)
    assert [record.ended for record in records] == [
        Ending.CLIENT_CLOSED,
        Ending.CLIENT_CLOSED,
        Ending.CLIENT_CLOSED,  # readuntil met EOF mid-message
        Ending.SERVER_CLOSED,  # the handler returned first
    ]
    assert records[1].received == b"bob;3abcx\ny"
    assert records[1].messages == [b"bob;3abcx\n", b"y"]
    assert records[2].received == b"no separator"


@pytest.mark.asyncio
async def test_client_reset_is_recorded() -> None:
    async with TestServer(thanks) as server:
        sock = socket.create_connection(server.address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.sendall(b"one\n")
        await server.wait_for_messages(1)
        sock.close()  # with SO_LINGER 0: RST
        (record,) = await server.wait_for_closed(1)
    assert record.ended is Ending.CLIENT_RESET
    assert record.received == b"one\n"


# Faults, each seen by a real client.


@pytest.mark.asyncio
async def test_delay_fault_is_measured_by_the_client_and_switches_off() -> None:
    async with TestServer(thanks, faults=Faults(delay=DELAY)) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        started = time.monotonic()
        writer.write(b"slow\n")
        assert await reader.readline() == PREFIX + b"slow\n"
        delayed = time.monotonic() - started

        server.faults.delay = 0
        started = time.monotonic()
        writer.write(b"fast\n")
        assert await reader.readline() == PREFIX + b"fast\n"
        prompt = time.monotonic() - started
        await close(writer)
    assert delayed >= DELAY - TIMER_SLACK
    assert prompt < DELAY


@pytest.mark.asyncio
async def test_delay_keeps_order_and_needs_no_drain_from_the_handler() -> None:
    faults = Faults(delay=DELAY)

    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"first ")  # due after DELAY
        faults.delay = 0
        writer.write(b"second ")  # not before the first
        writer.write_eof()  # after both
        await reader.read()
        writer.close()
        await writer.wait_closed()

    async with TestServer(chatty, faults=faults) as server:
        started = time.monotonic()
        assert await talk(server.address, b"") == b"first second "
        assert time.monotonic() - started >= DELAY - TIMER_SLACK
        (record,) = await server.wait_for_closed(1)
    assert record.sent == b"first second "
    assert record.ended is Ending.CLIENT_CLOSED


@pytest.mark.asyncio
async def test_close_after_fault_gives_eof_after_exactly_n_bytes() -> None:
    async with TestServer(echo, faults=Faults(close_after=5)) as server:
        assert await talk(server.address, b"hello world") == b"hello"
        server.faults.close_after = 0
        assert await talk(server.address, b"") == b""  # closed at once
        server.faults.clear()
        assert await talk(server.address, b"whole") == b"whole"
        records = await server.wait_for_closed(3)
    assert [(r.sent, r.ended) for r in records] == [
        (b"hello", Ending.CLOSED_BY_FAULT),
        (b"", Ending.CLOSED_BY_FAULT),
        (b"whole", Ending.CLIENT_CLOSED),
    ]
    assert records[0].received == b"hello world"


@pytest.mark.asyncio
async def test_close_after_with_delayed_replies_cuts_at_n_bytes() -> None:
    async with TestServer(thanks, faults=Faults(delay=0.01, close_after=30)) as server:
        assert await talk(server.address, b"a\nb\n") == PREFIX + b"a\nT"
        (record,) = await server.wait_for_closed(1)
    assert record.ended is Ending.CLOSED_BY_FAULT


@pytest.mark.asyncio
async def test_reset_fault_gives_the_client_econnreset() -> None:
    async with TestServer(echo, faults=Faults(reset=True)) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"x")
        with pytest.raises(ConnectionResetError):
            await reader.read()
        await close(writer)
        (record,) = await server.wait_for_closed(1)
    assert record.received == b"x"
    assert record.sent == b""
    assert record.ended is Ending.RESET_BY_FAULT


@pytest.mark.asyncio
async def test_stall_fault_blocks_the_clients_send() -> None:
    async with TestServer(echo, faults=Faults(stall=True)) as server:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, server.address)
            await server.wait_for_connections(1)
            sent = send_until_blocked(sock)
            with pytest.raises(BlockingIOError):  # the send buffer is full
                sock.send(b"x")
            assert sent > 0
            (record,) = server.connections
            assert record.received == b""
            assert record.is_open

            server.faults.stall = False  # new connections only
            assert await talk(server.address, b"flows") == b"flows"
            assert server.connections[0].is_open
        finally:
            sock.close()
    first, second = server.connections
    assert first.ended is Ending.SERVER_STOPPED
    assert second.ended is Ending.CLIENT_CLOSED


@pytest.mark.asyncio
async def test_refuse_and_accept_again_on_the_same_port() -> None:
    async with TestServer(thanks) as server:
        address = server.address
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"before\n")
        assert await reader.readline() == PREFIX + b"before\n"

        await server.refuse_connections()
        await server.refuse_connections()  # again: harmless
        assert server.is_refusing
        assert not server.is_serving
        assert server.address == address
        assert await reader.read() == b""  # down: open connections end too
        await close(writer)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*address)

        await server.accept_connections()
        await server.accept_connections()  # again: harmless
        assert server.is_serving
        assert server.server.port == address[1]
        assert await talk(address, b"after\n") == PREFIX + b"after\n"
        records = await server.wait_for_closed(2)
    assert [(r.index, r.messages, r.ended) for r in records] == [
        (0, [b"before\n"], Ending.SERVER_STOPPED),
        (1, [b"after\n"], Ending.CLIENT_CLOSED),
    ]


@pytest.mark.asyncio
async def test_stop_while_refusing_releases_the_port() -> None:
    server = TestServer()
    async with server:
        await server.refuse_connections()
        port = server.port
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))  # nothing holds the port any more
    finally:
        probe.close()


@needs_ipv6
@pytest.mark.asyncio
async def test_ipv6_loopback() -> None:
    server = TestServer(host="::1")
    async with server:
        assert server.address == ("::1", server.port)
        assert await talk(server.address, b"six") == b"six"
        await server.refuse_connections()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*server.address)
        await server.accept_connections()
        assert await talk(server.address, b"again") == b"again"


@pytest.mark.asyncio
async def test_tls_records_the_plaintext(
    server_tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    async with TestServer(thanks, ssl=server_tls_context) as server:
        reader, writer = await asyncio.open_connection(
            *server.address, ssl=client_tls_context, server_hostname="127.0.0.1"
        )
        writer.write(b"secret\n")
        assert await reader.readline() == PREFIX + b"secret\n"
        await close(writer)
        (record,) = await server.wait_for_closed(1)
    assert record.received == b"secret\n"
    assert record.sent == PREFIX + b"secret\n"


# Misuse.


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(
            lambda: TestServer(host="localhost"), "host must be an IP address", id="host-name"
        ),
        pytest.param(lambda: TestServer(max_connections=0), "max_connections", id="max-conn-0"),
        pytest.param(lambda: Faults(delay=-1), "delay must be", id="delay-negative"),
        pytest.param(lambda: Faults(delay=float("inf")), "delay must be", id="delay-inf"),
        pytest.param(lambda: Faults(close_after=-1), "close_after must be", id="close-after-neg"),
        pytest.param(lambda: ThreadedTestServer(loop="trio"), "unknown loop", id="loop-trio"),
    ],
)
def test_options_are_checked(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_faults_repr_and_clear() -> None:
    faults = Faults(delay=1, close_after=2, reset=True, stall=True)
    assert repr(faults) == "Faults(delay=1.0, close_after=2, reset=True, stall=True)"
    faults.clear()
    assert repr(faults) == "Faults(delay=0.0, close_after=None, reset=False, stall=False)"


@pytest.mark.asyncio
async def test_lifecycle_misuse_is_an_error() -> None:
    server = TestServer()
    assert repr(server) == "<TestServer echo 127.0.0.1 new>"
    with pytest.raises(RuntimeError, match="no port yet"):
        server.port  # noqa: B018
    with pytest.raises(RuntimeError, match="is not serving"):
        await server.refuse_connections()
    async with server:
        assert repr(server) == f"<TestServer echo 127.0.0.1:{server.port} serving>"
        with pytest.raises(RuntimeError, match="starts once"):
            await server.start()
    with pytest.raises(RuntimeError, match="is not refusing"):
        await server.accept_connections()
    assert server.connections == []


@pytest.mark.asyncio
async def test_a_taken_port_fails_the_start() -> None:
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = TestServer(port=holder.getsockname()[1])
        with pytest.raises(OSError, match=r"(?i)address already in use"):
            await taken.start()
        assert not taken.is_serving
    finally:
        holder.close()


def test_use_from_another_loop_is_a_clear_error() -> None:
    server = TestServer()
    home = asyncio.new_event_loop()
    try:
        home.run_until_complete(server.start())
        assert server.port > 0  # synchronous code may read the address

        async def elsewhere() -> None:
            with pytest.raises(WrongLoopError, match="used from a different running loop"):
                server.port  # noqa: B018
            with pytest.raises(WrongLoopError, match="loop_scope='module'"):
                await server.wait_for_connections(1)
            with pytest.raises(WrongLoopError):
                await server.stop()

        asyncio.run(elsewhere())
        home.run_until_complete(server.stop())
    finally:
        home.close()


# The threaded server.


@pytest.fixture(params=LOOPS)
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_threaded_server_serves_plain_sockets(loop_name: str) -> None:
    threads = threading.active_count()
    with ThreadedTestServer(thanks, loop=loop_name) as server:
        assert threading.active_count() == threads + 1
        assert server.is_serving
        assert server.loop is not None
        assert repr(server).startswith("<ThreadedTestServer thanks 127.0.0.1:")
        with socket.create_connection(server.address) as sock:
            sock.sendall(b"one\ntwo")
            sock.shutdown(socket.SHUT_WR)
            replies = recv_all(sock)
        assert replies == PREFIX + b"one\n" + PREFIX + b"two\n"
        assert server.wait_for_messages(2) == [b"one\n", b"two"]
        (record,) = server.wait_for_closed(1)
        assert server.wait_for_connections(1) == [record]
        assert record.sent == replies
        assert record.ended is Ending.CLIENT_CLOSED
        with pytest.raises(TimeoutError, match="for 2 connections, but 1 accepted"):
            server.wait_for_connections(2, timeout=0.01)
    assert threading.active_count() == threads
    assert server.loop is None
    assert not server.is_serving
    assert server.connections == [record]
    server.stop()  # again: harmless


def test_threaded_server_faults_and_refusal(loop_name: str) -> None:
    with ThreadedTestServer(echo, loop=loop_name) as server:
        server.faults.delay = DELAY
        with socket.create_connection(server.address) as sock:
            started = time.monotonic()
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"
            assert time.monotonic() - started >= DELAY - TIMER_SLACK
        server.faults.clear()

        server.faults.reset = True
        with socket.create_connection(server.address) as sock:
            sock.sendall(b"x")
            with pytest.raises(ConnectionResetError):
                recv_all(sock)
        server.faults.clear()

        server.refuse_connections()
        assert server.is_refusing
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(server.address).close()
        server.accept_connections()
        with socket.create_connection(server.address) as sock:
            sock.sendall(b"back")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"back"
        server.handler = thanks
        assert server.handler is thanks
        records = server.wait_for_closed(3)
    assert [r.ended for r in records] == [
        Ending.CLIENT_CLOSED,
        Ending.RESET_BY_FAULT,
        Ending.CLIENT_CLOSED,
    ]


def test_threaded_server_start_failure_is_raised_and_leaves_no_thread() -> None:
    threads = threading.active_count()
    with ThreadedTestServer() as first:
        unstarted = ThreadedTestServer()
        with pytest.raises(RuntimeError, match="no port yet"):
            unstarted.port  # noqa: B018
        holder = socket.socket()
        try:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            taken = ThreadedTestServer(port=holder.getsockname()[1])
            with pytest.raises(OSError, match=r"(?i)address already in use"):
                taken.start()
        finally:
            holder.close()
        with pytest.raises(RuntimeError, match="starts once"):
            first.start()
        with pytest.raises(RuntimeError, match="is not running"):
            unstarted.refuse_connections()
    assert threading.active_count() == threads


def test_threaded_blocking_calls_from_the_server_thread_are_refused() -> None:
    server = ThreadedTestServer()

    async def impatient(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.wait_for_connections(1)

    server.handler = impatient
    with server:
        with socket.create_connection(server.address) as sock:
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b""
        (record,) = server.wait_for_closed(1)
    assert record.ended is Ending.HANDLER_FAILED
    assert isinstance(record.error, RuntimeError)
    assert "own thread" in str(record.error)


@pytest.mark.asyncio
async def test_threaded_server_serves_an_asyncio_client_on_any_loop() -> None:
    with ThreadedTestServer(echo) as server:
        assert await talk(server.address, b"cross-thread") == b"cross-thread"


# No leaks.


@pytest.mark.robustness
@pytest.mark.asyncio
async def test_200_in_loop_servers_leave_no_fd_or_task_behind() -> None:
    async def cycle(number: int) -> None:
        async with TestServer(thanks if number % 2 else echo) as server:
            if number % 10 == 0:
                await talk(server.address, b"x\n")
                await server.refuse_connections()

    # libuv opens /dev/null once per loop, at its first listen, as a spare fd for
    # EMFILE: a resource of the loop, not of a server.
    await cycle(0)
    fds, threads = open_fds(), threading.active_count()
    for number in range(200):
        await cycle(number)
    assert only_task_left()
    assert (open_fds(), threading.active_count()) == (fds, threads)


@pytest.mark.robustness
def test_200_threaded_servers_leave_no_fd_or_thread_behind(loop_name: str) -> None:
    fds, threads = open_fds(), threading.active_count()
    for number in range(200):
        with ThreadedTestServer(loop=loop_name) as server:
            if number % 10 == 0:
                with socket.create_connection(server.address) as sock:
                    sock.sendall(b"x")
                    assert recv_exactly(sock, 1) == b"x"
    assert (open_fds(), threading.active_count()) == (fds, threads)


# Plain socket helpers for the threaded tests.


def recv_all(sock: socket.socket) -> bytes:
    return b"".join(iter_recv(sock))


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def send_until_blocked(sock: socket.socket) -> int:
    """Send on a non-blocking socket until the kernel takes no more; return the count."""
    chunk = b"x" * 65536
    sent = 0
    while sent < MAX_UNBLOCKED_SEND:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            return sent
    raise AssertionError(f"sent {sent} bytes without blocking")


def iter_recv(sock: socket.socket) -> Iterator[bytes]:
    while chunk := sock.recv(65536):
        yield chunk
