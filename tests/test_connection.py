"""A connection's whole life without sockets and without a real clock.

    accepted -> [PROXY header] -> [TLS handshake] -> serving -> flushing -> [lingering] -> closed

In the manner of uvicorn's MockTransport/MockLoop and trio's autojump_clock:
`FakeLoop` is a clock that moves only when a test advances it, running every
timer due on the way at its own time, so deadlines are checked to the exact
instant and never flake; it also refuses a second timer for one connection.
`FakeTransport` records what the connection does to it, and the test says what
the socket's queues hold (`_socket_queue`, the ioctl reader, is patched to read
them). The few tests of the user's handler path need a real task, so they run
on a small real loop and check outcomes, not times.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, NamedTuple, cast

import pytest
from proxyprotocol.result import ProxyResultIPv4
from proxyprotocol.v2 import ProxyProtocolV2

from aioserver import connection as connection_module
from aioserver.connection import (
    FRESH_GRACE,
    LINGER_TIMEOUT,
    NEXT_PHASES,
    Connection,
    Ending,
    Phase,
    connection_class,
)
from aioserver.protocols import (
    BUSY_REPLY,
    DEFAULT_MAX_MESSAGE_SIZE,
    READ_CHUNK,
    EchoRule,
    ReplyRule,
    ThanksRule,
)
from aioserver.proxy import DEFAULT_PROXY_ALLOW, Network, parse_networks

THANKS = b"Thank you for your message "
# The thanks reply to b"a\n".
REPLY_A = THANKS + b"a\n"
PEER = ("127.0.0.1", 50000)
SOCKNAME = ("127.0.0.1", 1234)
V1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 1234\r\n"
V2 = ProxyProtocolV2().pack(
    ProxyResultIPv4((IPv4Address("203.0.113.7"), 40000), (IPv4Address("127.0.0.1"), 1234))
)
PROXY_PEER = ("203.0.113.7", 40000)
# What a reset sets on the socket: SO_LINGER on, with a zero timeout.
SO_LINGER_ZERO = (socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
SHARED = pytest.mark.parametrize("shared", [False, True], ids=["own-reads", "shared-buffer"])


# The fakes.


class FakeTimer:
    """A handle of FakeLoop: from call_soon, run by `run_ready`; from call_at, when due."""

    def __init__(
        self, loop: FakeLoop, when: float, callback: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        self._when = when
        self.callback = callback
        self.args = args
        self.order = next(loop.order)
        self.ran = False
        self._cancelled = False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def live(self) -> bool:
        return not self._cancelled and not self.ran

    def run(self) -> None:
        self.ran = True
        self.callback(*self.args)


class FakeLoop:
    """A loop that is not an event loop: a clock moved by `advance`, timers, and
    call_soon callbacks run by `run_ready`. Real asyncio Futures work on it: of
    their loop they use only get_debug() and call_soon()."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.order = itertools.count()
        self.timers: list[FakeTimer] = []
        self.ready: deque[FakeTimer] = deque()
        self.errors: list[dict[str, Any]] = []

    def time(self) -> float:
        return self.now

    def get_debug(self) -> bool:
        return False

    def call_soon(
        self, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> FakeTimer:
        handle = FakeTimer(self, self.now, callback, args)
        self.ready.append(handle)
        return handle

    def call_at(
        self, when: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> FakeTimer:
        # "A connection holds at most one timer", checked at every arming.
        owner = getattr(callback, "__self__", None)
        if owner is not None:
            held = [
                t.when()
                for t in self.live_timers()
                if getattr(t.callback, "__self__", None) is owner
            ]
            assert not held, f"a second timer for one {type(owner).__name__}: {held} pending"
        timer = FakeTimer(self, when, callback, args)
        self.timers.append(timer)
        return timer

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> FakeTimer:
        return self.call_at(self.now + delay, callback, *args)

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=cast(asyncio.AbstractEventLoop, self))

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def live_timers(self) -> list[FakeTimer]:
        return sorted((t for t in self.timers if t.live), key=lambda t: (t.when(), t.order))

    def timer_times(self) -> list[float]:
        """When each pending timer is due, soonest first."""
        return [t.when() for t in self.live_timers()]

    def run_ready(self) -> None:
        while self.ready:
            handle = self.ready.popleft()
            if handle.live:
                handle.run()

    def advance_to(self, target: float) -> None:
        """Move the clock to `target`, running every timer due on the way at
        its own time, in order, and what each schedules with call_soon."""
        assert target >= self.now, "the clock never goes back"
        self.run_ready()
        while (due := self.live_timers()) and due[0].when() <= target:
            timer = due[0]
            # A timer armed in the past runs now, as a real loop's does.
            self.now = max(self.now, timer.when())
            timer.run()
            self.run_ready()
        self.now = target
        self.timers = [t for t in self.timers if t.live]

    def advance(self, seconds: float) -> None:
        self.advance_to(self.now + seconds)


class FakeSocket:
    """The transport's "socket": records setsockopt; its queues are read from the
    transport (see `socket_queues`), never by ioctl."""

    def __init__(self, family: int) -> None:
        self.family = family
        self.options: list[tuple[int, int, bytes]] = []

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        self.options.append((level, option, value))

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "a fake socket has no descriptor")


ADDRESSES: dict[int, tuple[Any, Any]] = {
    socket.AF_INET: (PEER, SOCKNAME),
    socket.AF_INET6: (("::1", 50000, 0, 0), ("::1", 1234, 0, 0)),
    socket.AF_UNIX: ("", "/run/aioserver.sock"),
}


class FakeTransport:
    """A socket transport as asyncio's selector loop behaves, minus the socket.

    `buffer` is what sits in our write buffer (a client that does not read
    keeps it full), `unacked` what the kernel sent without acknowledgement
    (TIOCOUTQ) and `unread` what it received that was not read yet (FIONREAD);
    None is "unknown". The test sets them. close() loses the transport once the
    buffer is empty; abort() at once; either way connection_lost comes through
    the loop's call_soon, as from a real transport.
    """

    def __init__(self, loop: Any, *, family: int = socket.AF_INET) -> None:
        self.loop = loop
        self.socket = FakeSocket(family)
        peer, sockname = ADDRESSES[family]
        self.extra: dict[str, Any] = {"peername": peer, "sockname": sockname, "socket": self.socket}
        self.protocol: Any = None
        self.writes: list[bytes] = []
        self.buffer = 0
        self.unacked: int | None = 0
        self.unread: int | None = 0
        self.eof_allowed = True
        self.reading = True
        self.closing = self.eof = self.aborted = self.lost = False
        self.lost_with: BaseException | None = None
        self._losing = False
        self.limits: dict[str, int] = {}

    @property
    def written(self) -> bytes:
        return b"".join(self.writes)

    def queue(self, request: str) -> int | None:
        return {"TIOCOUTQ": self.unacked, "FIONREAD": self.unread}[request]

    # The transport's methods.

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not self.lost:
            self.writes.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self) -> None:
        if not self.closing:
            self.eof = True

    def can_write_eof(self) -> bool:
        return self.eof_allowed

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.reading = False
        if not self.buffer:
            self._lose_soon()

    def abort(self) -> None:
        self.closing = self.aborted = True
        self.reading = False
        self.buffer = 0
        self._lose_soon()

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.closing:
            self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return self.buffer

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits["write_high"] = high or 0

    def set_read_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits["read_high"] = high or 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    # What the client and the kernel do.

    def take(self, nbytes: int | None = None) -> None:
        """The client takes `nbytes` (default: all) of our write buffer."""
        self.buffer -= self.buffer if nbytes is None else nbytes
        if self.closing and not self.buffer:
            self._lose_soon()

    def client_eof(self) -> None:
        """The client's FIN arrives: the protocol says whether to stay open."""
        if not self.protocol.eof_received():
            self.close()

    def lose(self, exc: BaseException | None = None) -> None:
        """The transport is gone: connection_lost, once."""
        if self.lost:
            return
        self.lost = self.closing = True
        self.lost_with = exc
        self.protocol.connection_lost(exc)

    def _lose_soon(self) -> None:
        if not self._losing:
            self._losing = True
            self.loop.call_soon(self.lose)


@dataclass
class FakeWriter:
    """What start_server hands the server: a connection reads only its transport."""

    transport: FakeTransport


class Forgotten(NamedTuple):
    """A connection as the server saw it when told the connection was over."""

    connection: Connection
    reason: str
    bytes_in: int
    bytes_out: int
    time: float


@dataclass
class FakeServer:
    """The Server attributes a connection reads, and a `forget` that records."""

    loop: Any
    handler: Any = None
    ssl: Any = None
    proxy_protocol: bool = False
    proxy_trusted: tuple[Network, ...] | None = field(
        default_factory=lambda: parse_networks(DEFAULT_PROXY_ALLOW)
    )
    handshake_timeout: float = 10.0
    tls_protocol: Any = None
    shutdown_timeout: float = 5.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    read_buffer: memoryview = field(default_factory=lambda: memoryview(bytearray(READ_CHUNK)))
    logs_peers: bool = False
    checks_clients: bool = False
    logs_client_certs: bool = False
    metrics: Any = None
    forgotten: list[Forgotten] = field(default_factory=list)

    def tls_context(self, connection: Connection) -> Any:
        return self.ssl

    def forget(self, connection: Connection) -> None:
        self.forgotten.append(
            Forgotten(
                connection,
                connection.reason,
                connection.bytes_in,
                connection.bytes_out,
                self.loop.time(),
            )
        )


@dataclass
class Setup:
    loop: FakeLoop
    server: FakeServer
    transport: FakeTransport
    conn: Connection

    def feed(self, data: bytes) -> None:
        """Bytes from the client, as the loop hands them over: into the shared
        buffer for a buffered protocol, else to data_received."""
        conn = self.conn
        if isinstance(conn, asyncio.BufferedProtocol):
            buffer = memoryview(conn.get_buffer(len(data)))
            buffer[: len(data)] = data
            conn.buffer_updated(len(data))
        else:
            conn.data_received(data)

    @property
    def forgotten(self) -> Forgotten:
        """The one record of the connection's end."""
        assert len(self.server.forgotten) == 1, self.server.forgotten
        return self.server.forgotten[0]


def connect(
    answers: str = "rule",
    *,
    shared: bool = False,
    family: int = socket.AF_INET,
    start: float = 0.0,
    begin: bool = True,
    kind: type[Connection] | None = None,
    **options: Any,
) -> Setup:
    """A connection as Server._accept makes it, on a fake loop, server and
    transport; `options` are FakeServer's. `kind` Connection makes the one
    Server._turn_away makes (no rule, not begun)."""
    loop = FakeLoop(start)
    server = FakeServer(loop, **options)
    transport = FakeTransport(loop, family=family)
    rule: ReplyRule | None = None
    if kind is None:
        kind = connection_class(answers, shared)
        rule = EchoRule() if answers == "echo" else ThanksRule(server.max_message_size)
    writer = cast(asyncio.StreamWriter, FakeWriter(transport))
    conn = kind(cast(Any, server), writer, rule)
    if begin:
        conn.begin()
    return Setup(loop, server, transport, conn)


@pytest.fixture(autouse=True)
def socket_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket queue lengths (TIOCOUTQ, FIONREAD) are the fake transport's."""

    def queue(transport: Any, request: str) -> int | None:
        return cast(FakeTransport, transport).queue(request)

    monkeypatch.setattr(connection_module, "_socket_queue", queue)


def test_fake_loop_refuses_a_second_timer_for_one_connection() -> None:
    setup = connect()
    setup.loop.call_at(1.0, setup.conn._tick)
    with pytest.raises(AssertionError, match="a second timer"):
        setup.loop.call_at(2.0, setup.conn._tick)


# 1. Phases.


@SHARED
@pytest.mark.parametrize(
    ("answers", "reply"),
    [("rule", THANKS + b"hi\n"), ("thanks", THANKS + b"hi\n"), ("echo", b"hi\n")],
)
def test_plain_connection_goes_from_accepted_to_serving(
    answers: str, reply: bytes, shared: bool
) -> None:
    setup = connect(answers, shared=shared, begin=False)
    conn = setup.conn
    assert conn.phase is Phase.ACCEPTED
    conn.begin()
    assert conn.phase is Phase.SERVING
    assert setup.transport.get_protocol() is conn
    assert setup.loop.timer_times() == []
    setup.feed(b"hi\n")
    assert setup.transport.written == reply
    assert (conn.bytes_in, conn.bytes_out) == (3, len(reply))


@SHARED
@pytest.mark.parametrize(
    ("limit", "reads"),
    [
        (100, [b"hi\n", b"there\r\n"]),
        (100, [b"a\nb\n", b"\n\n"]),
        (100, [b"h", b"i\n", b"next\n"]),
        (100, [b"a\nb", b"c\n", b"d"]),
        (9, [b"12345678\n", b"123456789\n", b"x\n"]),
        (9, [b"1234", b"56789\n"]),
        (10_000, [b"x" * 5_000 + b"\n", b"y\n"]),
    ],
)
def test_thanks_connection_answers_as_the_rule_does(
    limit: int, reads: list[bytes], shared: bool
) -> None:
    # ThanksConnection answers a read of one whole line itself, and hands the
    # rest to RuleConnection's path: the client sees no difference.
    outcomes = []
    for answers in ("thanks", "rule"):
        setup = connect(answers, shared=shared, max_message_size=limit)
        for data in reads:
            if setup.conn.phase is Phase.SERVING:
                setup.feed(data)
        setup.conn.eof_received()
        conn = setup.conn
        outcomes.append(
            (setup.transport.written, conn.bytes_in, conn.bytes_out, conn.phase, conn.reason)
        )
    assert outcomes[0] == outcomes[1]


@SHARED
@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
def test_proxy_header_split_across_reads_then_the_rest_is_served(
    header: bytes, shared: bool
) -> None:
    setup = connect(shared=shared, proxy_protocol=True)
    conn, transport = setup.conn, setup.transport
    assert conn.phase is Phase.PROXY
    assert setup.loop.timer_times() == [10.0]  # the handshake deadline

    setup.feed(header[:10])
    assert conn.phase is Phase.PROXY
    assert transport.writes == []

    setup.feed(header[10:] + b"hello\nwor")
    assert conn.phase is Phase.SERVING
    assert setup.loop.timer_times() == []
    assert transport.written == THANKS + b"hello\n"
    assert conn.proxy_peer == PROXY_PEER
    assert conn.describe_peer() == "203.0.113.7:40000"

    setup.feed(b"ld\n")
    assert transport.written == THANKS + b"hello\n" + THANKS + b"world\n"
    assert conn.bytes_in == len(header) + len(b"hello\nworld\n")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", "no PROXY protocol header"),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            "PROXY v1 header not one line of ASCII text ending in CRLF:"
            " PROXY TCP4 1.2.3.4 5.6.7.8 1 2\\x0a",
        ),
    ],
    ids=["not-a-header", "no-crlf"],
)
def test_bad_proxy_header_closes_with_a_warning(
    data: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    setup = connect(proxy_protocol=True)
    conn, transport = setup.conn, setup.transport
    with caplog.at_level(logging.WARNING, logger="aioserver"):
        setup.feed(data)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"Closed 127.0.0.1:50000: {why}")
    ]
    assert transport.closing
    assert not transport.aborted
    assert transport.writes == []
    assert conn.phase is Phase.PROXY  # until the transport is lost
    setup.loop.run_ready()
    assert conn.phase is Phase.CLOSED
    assert setup.loop.timer_times() == []
    assert setup.forgotten == Forgotten(conn, why, len(data), 0, 0.0)


def test_proxy_header_from_an_untrusted_source_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    setup = connect(proxy_protocol=True, proxy_trusted=parse_networks(["10.0.0.0/8"]))
    conn, transport = setup.conn, setup.transport
    with caplog.at_level(logging.WARNING, logger="aioserver"):
        setup.feed(V1 + b"hello\n")
    why = "PROXY header from 127.0.0.1:50000, not a trusted balancer"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"Closed 127.0.0.1:50000: {why}")
    ]
    assert conn.proxy_peer is None
    assert transport.writes == []  # the bytes after the header are not served
    assert transport.closing
    setup.loop.run_ready()
    assert conn.phase is Phase.CLOSED
    assert setup.forgotten == Forgotten(conn, why, len(V1) + 6, 0, 0.0)


def test_no_proxy_header_within_handshake_timeout_closes_at_exactly_that_time() -> None:
    setup = connect(proxy_protocol=True, start=100.0)
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    loop.advance(1.0)
    setup.feed(V1[:20])  # a partial header does not move the deadline
    loop.advance_to(109.5)
    assert conn.phase is Phase.PROXY
    assert not transport.closing
    assert loop.timer_times() == [110.0]
    loop.advance(0.5)
    assert conn.phase is Phase.CLOSED
    assert not transport.aborted
    assert setup.forgotten == Forgotten(conn, "no PROXY header within 10 s", 20, 0, 110.0)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (Phase.LINGERING, Phase.SERVING),
        (Phase.FLUSHING, Phase.SERVING),
        (Phase.CLOSED, Phase.FLUSHING),
        (Phase.SERVING, Phase.PROXY),
        (Phase.TLS, Phase.PROXY),
        (Phase.ACCEPTED, Phase.LINGERING),
    ],
    ids=lambda phase: phase.name,
)
def test_next_phases_forbids_going_back_or_skipping(before: Phase, after: Phase) -> None:
    conn = connect().conn
    conn.phase = before
    with pytest.raises(
        AssertionError, match=f"^connection cannot go from {before.name} to {after.name}$"
    ):
        conn._to(after)
    assert conn.phase is before


def test_next_phases_only_move_forward() -> None:
    assert set(NEXT_PHASES) == set(Phase)
    for phase, following in NEXT_PHASES.items():
        assert all(next_phase > phase for next_phase in following), phase.name
    assert NEXT_PHASES[Phase.CLOSED] == frozenset()


class FakeTLS:
    """The loop's TLS protocol, as far as the connection uses it: records how
    it was made and the bytes it was handed through a small buffer."""

    def __init__(
        self,
        loop: Any,
        app_protocol: Connection,
        sslcontext: Any,
        waiter: asyncio.Future[None],
        *,
        server_side: bool,
        ssl_handshake_timeout: float,
    ) -> None:
        self.app = app_protocol
        self.context = sslcontext
        self.waiter = waiter
        self.server_side = server_side
        self.timeout = ssl_handshake_timeout
        self.raw: Any = None
        self.received = b""
        self._buffer = bytearray(4)  # small: the bytes are copied in pieces

    def connection_made(self, transport: Any) -> None:
        self.raw = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.received += bytes(self._buffer[:nbytes])


def test_proxy_header_then_tls_handshake_gets_what_is_left_of_the_shared_deadline() -> None:
    context = object()
    setup = connect(proxy_protocol=True, ssl=context, tls_protocol=FakeTLS)
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    loop.advance(2.5)
    setup.feed(V1 + b"\x16\x03\x01hello")
    tls = transport.get_protocol()
    assert isinstance(tls, FakeTLS)
    assert conn.phase is Phase.TLS
    assert (tls.app, tls.context, tls.server_side, tls.timeout) == (conn, context, True, 7.5)
    assert tls.raw is transport
    assert tls.received == b"\x16\x03\x01hello"
    assert loop.timer_times() == []  # the TLS layer has the deadline now
    assert conn.proxy_peer == PROXY_PEER

    # The handshake completes: the TLS layer makes the connection with its transport.
    tls_transport = FakeTransport(loop)
    conn.connection_made(cast(asyncio.BaseTransport, tls_transport))
    tls.waiter.set_result(None)
    loop.run_ready()
    assert conn.phase is Phase.SERVING
    conn.data_received(b"hi\n")
    assert tls_transport.written == THANKS + b"hi\n"
    assert transport.writes == []
    assert loop.errors == []


@pytest.mark.parametrize(
    ("outcome", "why"),
    [
        (
            ConnectionAbortedError(
                "SSL handshake is taking longer than 10.0 seconds: aborting the connection"
            ),
            "no TLS handshake within 10 s",
        ),
        (ConnectionResetError(), "TLS handshake failed: reset by client"),
        (None, "closed during the TLS handshake"),
    ],
    ids=["timeout", "reset", "closed"],
)
def test_tls_handshake_that_does_not_complete_ends_the_connection(
    outcome: BaseException | None, why: str
) -> None:
    setup = connect(ssl=object(), tls_protocol=FakeTLS)
    conn, loop = setup.conn, setup.loop
    tls = setup.transport.get_protocol()
    assert isinstance(tls, FakeTLS)
    assert conn.phase is Phase.TLS
    assert tls.timeout == 10.0
    assert loop.timer_times() == []
    loop.advance(3.0)
    if outcome is None:
        tls.waiter.set_result(None)
    else:
        tls.waiter.set_exception(outcome)
    loop.run_ready()
    assert conn.phase is Phase.CLOSED
    assert setup.forgotten == Forgotten(conn, why, 0, 0, 3.0)
    assert loop.errors == []  # the waiter's exception was retrieved


def test_run_waits_through_the_phases_and_ends_normally(monkeypatch: pytest.MonkeyPatch) -> None:
    # Driven by hand on the fake loop: no running loop, so no current task (a
    # reply rule's connection needs none).
    monkeypatch.setattr(asyncio, "current_task", lambda loop=None: None)
    setup = connect(proxy_protocol=True)
    conn = setup.conn
    run: Coroutine[Any, Any, None] = conn.run()

    waiting: asyncio.Future[None] = run.send(None)
    assert waiting is conn.wake
    assert not waiting.done()
    setup.feed(V1)
    assert waiting.done()

    waiting = run.send(None)
    assert waiting is conn.wake
    assert not waiting.done()
    conn.end(Ending.CLOSE, "done")
    assert not waiting.done()  # flushing is not the end
    setup.loop.run_ready()
    assert conn.phase is Phase.CLOSED
    assert waiting.done()

    with pytest.raises(StopIteration):
        run.send(None)
    assert conn.wake is None


# 2. Endings.


def test_close_flushes_then_closes_and_the_first_reason_wins() -> None:
    setup = connect()
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    setup.feed(b"a\n")
    transport.buffer = 10  # the client has not taken all of the reply yet
    conn.end(Ending.CLOSE, "first")
    assert conn.phase is Phase.FLUSHING
    assert transport.closing
    assert not transport.eof
    assert not transport.aborted
    conn.end(Ending.CLOSE, "second")
    assert conn.reason == "first"
    loop.run_ready()
    assert conn.phase is Phase.FLUSHING  # still sending what is owed
    transport.take()
    loop.run_ready()
    assert conn.phase is Phase.CLOSED
    assert transport.socket.options == []
    assert setup.forgotten == Forgotten(conn, "first", 2, len(REPLY_A), 0.0)


@pytest.mark.parametrize(
    ("family", "options"),
    [
        (socket.AF_INET, [SO_LINGER_ZERO]),
        (socket.AF_INET6, [SO_LINGER_ZERO]),
        (socket.AF_UNIX, []),
    ],
    ids=["tcp4", "tcp6", "unix"],
)
def test_reset_sets_a_zero_linger_aborts_and_uncounts_what_was_never_sent(
    family: int, options: list[tuple[int, int, bytes]]
) -> None:
    setup = connect(family=family)
    conn, transport = setup.conn, setup.transport
    setup.feed(b"a\n")
    transport.buffer = 12
    conn.end(Ending.RESET, "bye")
    assert transport.aborted
    assert transport.socket.options == options
    assert conn.bytes_out == len(REPLY_A) - 12
    setup.loop.run_ready()
    assert conn.phase is Phase.CLOSED
    assert setup.forgotten == Forgotten(conn, "bye", 2, len(REPLY_A) - 12, 0.0)


def test_reset_after_close_still_resets() -> None:
    setup = connect()
    conn, transport = setup.conn, setup.transport
    setup.feed(b"a\n")
    transport.buffer = len(REPLY_A)  # the client takes nothing
    conn.end(Ending.CLOSE, "closed by client")
    conn.end(Ending.RESET, "gave up")
    assert transport.aborted
    assert transport.socket.options == [SO_LINGER_ZERO]
    setup.loop.run_ready()
    assert setup.forgotten == Forgotten(conn, "closed by client, then reset: gave up", 2, 0, 0.0)


@pytest.mark.parametrize(
    ("buffer", "unacked", "unread"),
    [(0, len(REPLY_A), 0), (0, 0, 7), (5, 0, 0), (0, None, 0)],
    ids=["not-acknowledged", "unread", "buffered", "queues-unknown"],
)
def test_linger_half_closes_while_anything_is_in_flight(
    buffer: int, unacked: int | None, unread: int | None
) -> None:
    setup = connect(start=1.0)
    conn, transport = setup.conn, setup.transport
    setup.feed(b"a\n")
    transport.buffer, transport.unacked, transport.unread = buffer, unacked, unread
    transport.pause_reading()  # paused for backpressure, say
    conn.end(Ending.LINGER, "done")
    assert conn.phase is Phase.LINGERING
    assert transport.eof
    assert not transport.closing
    assert transport.reading  # what the client still sends is read, and dropped
    assert conn.deadline == 6.0  # now + shutdown_timeout
    assert setup.loop.timer_times() == [1.0 + LINGER_TIMEOUT]


@pytest.mark.parametrize(
    ("received", "unacked", "can_write_eof"),
    [(True, 0, True), (False, 5, True), (True, len(REPLY_A), False)],
    ids=["settled", "nothing-received", "cannot-half-close"],
)
def test_linger_closes_at_once_when_there_is_nothing_to_wait_for(
    received: bool, unacked: int, can_write_eof: bool
) -> None:
    setup = connect()
    conn, transport = setup.conn, setup.transport
    if received:
        setup.feed(b"a\n")
    conn.quiet = 1  # a sweep interval passed without a sign of life
    transport.unacked = unacked
    transport.eof_allowed = can_write_eof
    conn.end(Ending.LINGER, "done")
    assert conn.phase is Phase.FLUSHING
    assert transport.closing
    assert not transport.eof
    assert setup.loop.timer_times() == []
    setup.loop.run_ready()
    assert conn.phase is Phase.CLOSED
    assert setup.forgotten.reason == "done"


@pytest.mark.parametrize(("acknowledged_at", "closed_at"), [(0.25, 0.5), (1.25, 1.5)])
def test_lingering_closes_after_LINGER_TIMEOUT_of_silence_once_all_is_acknowledged(
    acknowledged_at: float, closed_at: float
) -> None:
    setup = connect()
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    setup.feed(b"a\n")
    transport.unacked = len(REPLY_A)
    conn.end(Ending.LINGER, "done")
    loop.advance_to(acknowledged_at)
    assert conn.phase is Phase.LINGERING
    transport.unacked = 0
    loop.advance_to(3.0)
    assert not transport.aborted
    assert setup.forgotten == Forgotten(conn, "done", 2, len(REPLY_A), closed_at)


def test_lingering_waits_while_the_client_keeps_sending_then_resets_at_the_deadline() -> None:
    setup = connect()
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    setup.feed(b"a\n")
    transport.unread = 100  # the client is still sending
    conn.end(Ending.LINGER, "done")
    assert conn.deadline == 5.0

    for step in range(1, 20):  # the client sends every quarter second, up to 4.75
        loop.advance_to(step * 0.25)
        assert conn.phase is Phase.LINGERING
        assert not transport.closing
        # Checked every LINGER_TIMEOUT; the last check is the deadline.
        assert loop.timer_times() == [min((step // 2 + 1) * LINGER_TIMEOUT, 5.0)]
        setup.feed(b"more\n")

    loop.advance_to(5.0)
    assert transport.aborted
    assert transport.socket.options == [SO_LINGER_ZERO]
    assert transport.written == REPLY_A  # what came while lingering was dropped
    assert setup.forgotten == Forgotten(
        conn,
        "done, then reset: client still sending, or not acknowledging, at the deadline",
        2 + 19 * 5,
        29,
        5.0,
    )


def test_lingering_closes_once_the_client_falls_silent() -> None:
    setup = connect()
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    setup.feed(b"a\n")
    transport.unread = 100
    conn.end(Ending.LINGER, "done")
    loop.advance_to(0.25)
    setup.feed(b"more\n")  # heard from before the check at 0.5
    loop.advance_to(0.75)
    setup.feed(b"more\n")  # ...and before the one at 1.0
    loop.advance_to(3.0)
    assert not transport.aborted
    assert setup.forgotten == Forgotten(conn, "done", 12, len(REPLY_A), 1.5)


def test_lingering_ends_when_the_client_closes_too() -> None:
    setup = connect()
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    setup.feed(b"a\n")
    transport.unread = 100
    conn.end(Ending.LINGER, "done")
    loop.advance(0.25)
    transport.client_eof()
    loop.run_ready()
    assert conn.phase is Phase.CLOSED
    assert loop.timer_times() == []
    assert setup.forgotten == Forgotten(conn, "done", 2, len(REPLY_A), 0.25)


# 3. The thanks rule over its limit.


@SHARED
@pytest.mark.parametrize("long", [b"x" * 20 + b"\n", b"y" * 17], ids=["line", "fragment"])
def test_thanks_line_over_the_limit_gets_the_replies_before_it_and_the_error_then_lingers(
    long: bytes, shared: bool
) -> None:
    setup = connect(shared=shared, max_message_size=16)
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    setup.feed(b"hi\n")
    transport.unacked = len(THANKS + b"hi\n")  # that reply is on its way
    setup.feed(b"ok\n" + long)
    replies = THANKS + b"hi\n" + THANKS + b"ok\n" + b"Error: message longer than 16 bytes\n"
    assert transport.written == replies
    assert conn.phase is Phase.LINGERING
    assert transport.eof
    assert conn.reason == "message longer than 16 bytes"

    setup.feed(b"more\n")  # dropped: the rule is not fed again
    assert transport.written == replies
    transport.unacked = 0
    loop.advance(3.0)
    assert setup.forgotten == Forgotten(
        conn, "message longer than 16 bytes", 3 + 3 + len(long) + 5, len(replies), 1.0
    )


# 4. Idleness.


@pytest.mark.parametrize("replied", [False, True], ids=["silent", "replies-taken"])
def test_idle_check_with_nothing_pending_closes(replied: bool) -> None:
    setup = connect()
    conn, transport = setup.conn, setup.transport
    if replied:
        setup.feed(b"a\n")
        conn.progress_check()  # the sweep saw the reply taken
    conn.idle_check(300.0)
    assert conn.phase is Phase.FLUSHING
    assert transport.closing
    assert not transport.aborted
    setup.loop.run_ready()
    assert setup.forgotten.reason == "idle for 300 s"


def test_idle_check_resets_when_bytes_are_pending_without_progress() -> None:
    setup = connect()
    conn, transport = setup.conn, setup.transport
    setup.feed(b"a\n")
    transport.buffer, transport.unacked = 10, len(REPLY_A) - 10
    conn.idle_check(300.0)
    assert transport.aborted
    assert transport.socket.options == [SO_LINGER_ZERO]
    setup.loop.run_ready()
    assert setup.forgotten == Forgotten(
        conn, f"idle for 300 s with {len(REPLY_A)} bytes not taken", 2, len(REPLY_A) - 10, 0.0
    )


def test_idle_check_lets_a_client_that_took_some_replies_go_on() -> None:
    setup = connect()
    conn, transport = setup.conn, setup.transport
    setup.feed(b"a\n")
    setup.feed(b"b\n")  # 58 bytes out
    transport.buffer, transport.unacked = 20, 20  # 18 taken
    conn.quiet = 11
    conn.idle_check(300.0)
    assert (conn.taken, conn.quiet) == (18, 0)
    assert conn.phase is Phase.SERVING
    assert not transport.closing

    transport.unacked = 10  # 10 more taken
    conn.quiet = 11
    conn.idle_check(300.0)
    assert (conn.taken, conn.quiet) == (28, 0)
    assert conn.phase is Phase.SERVING
    assert not transport.closing

    conn.quiet = 11
    conn.idle_check(300.0)  # nothing taken since
    assert transport.aborted
    assert conn.reason == "idle for 300 s with 30 bytes not taken"


def test_progress_check_notices_replies_taken() -> None:
    setup = connect()
    conn, transport = setup.conn, setup.transport
    setup.feed(b"a\n")
    transport.unacked = len(REPLY_A)
    conn.quiet = 3
    conn.progress_check()
    assert (conn.taken, conn.quiet) == (0, 3)
    transport.unacked = 9
    conn.progress_check()
    assert (conn.taken, conn.quiet) == (len(REPLY_A) - 9, 0)
    assert conn.phase is Phase.SERVING
    assert not transport.closing


# 5. Shutdown.


def test_shutdown_lingers_a_serving_rule_connection_with_the_deadline_at_now_plus_timeout() -> None:
    setup = connect()
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    loop.advance(2.0)
    setup.feed(b"a\n")
    transport.unacked = len(REPLY_A)
    conn.shutdown()
    assert conn.phase is Phase.LINGERING
    assert transport.eof
    assert conn.reason == "server stopped"
    assert conn.deadline == 7.0
    assert loop.timer_times() == [2.5]
    transport.unacked = 0
    loop.advance(1.0)
    assert setup.forgotten == Forgotten(conn, "server stopped", 2, len(REPLY_A), 2.5)


def test_shutdown_serves_a_client_accepted_just_before_until_the_fresh_grace_ends() -> None:
    """A client accepted 0.1 s before the stop that has sent nothing yet: its
    request is on its way. It is answered when it comes, and the connection is
    ended FRESH_GRACE after its accept, not at once."""
    setup = connect(start=10.0)
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    loop.advance(0.1)
    conn.shutdown()
    assert conn.phase is Phase.SERVING
    assert conn.stop_at == 10.0 + FRESH_GRACE
    assert conn.deadline == 10.1 + 5.0
    assert loop.timer_times() == [10.0 + FRESH_GRACE]
    loop.advance(0.05)
    setup.feed(b"a\n")
    assert transport.written == REPLY_A
    loop.advance_to(10.0 + FRESH_GRACE)
    # Heard from just now: it lingers, then closes after LINGER_TIMEOUT of silence.
    assert conn.phase is Phase.LINGERING
    assert transport.eof
    loop.advance(LINGER_TIMEOUT)
    assert transport.closing
    assert setup.forgotten == Forgotten(
        conn, "server stopped", 2, len(REPLY_A), 10.0 + FRESH_GRACE + LINGER_TIMEOUT
    )


def test_shutdown_ends_a_client_accepted_long_before_that_never_sent_at_once() -> None:
    setup = connect(start=10.0)
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    loop.advance(FRESH_GRACE)
    conn.shutdown()
    assert transport.closing
    loop.run_ready()
    assert setup.forgotten == Forgotten(conn, "server stopped", 0, 0, 10.0 + FRESH_GRACE)


def test_linger_waits_for_a_settled_client_heard_from_this_sweep_interval() -> None:
    """Nothing in flight either way, but the client just sent: its next line may
    be on its way, and a close would answer it with a reset."""
    setup = connect()
    conn, transport = setup.conn, setup.transport
    setup.feed(b"a\n")
    conn.end(Ending.LINGER, "done")
    assert conn.phase is Phase.LINGERING
    assert transport.eof
    assert not transport.closing


def test_shutdown_closes_a_settled_serving_connection_at_once() -> None:
    setup = connect()
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    loop.advance(2.0)
    setup.feed(b"a\n")
    conn.quiet = 1  # a sweep interval passed without a sign of life
    conn.shutdown()
    assert conn.phase is Phase.FLUSHING
    assert transport.closing
    assert not transport.eof
    assert loop.timer_times() == [7.0]  # the deadline stays armed until the transport is gone
    loop.run_ready()
    assert conn.phase is Phase.CLOSED
    assert loop.timer_times() == []
    assert setup.forgotten == Forgotten(conn, "server stopped", 2, len(REPLY_A), 2.0)


def test_shutdown_closes_a_connection_still_reading_its_proxy_header() -> None:
    setup = connect(proxy_protocol=True)
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    loop.advance(1.0)
    setup.feed(V1[:10])
    conn.shutdown()
    assert transport.closing
    assert not transport.aborted
    loop.run_ready()
    assert loop.timer_times() == []
    assert setup.forgotten == Forgotten(conn, "server stopped", 10, 0, 1.0)


def test_shutdown_resets_a_flushing_connection_whose_client_takes_nothing_at_the_deadline() -> None:
    setup = connect()
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    setup.feed(b"a\n")
    transport.buffer = 20  # the client takes none of it
    transport.client_eof()
    assert conn.phase is Phase.FLUSHING
    assert transport.closing
    loop.advance(1.0)
    conn.shutdown()
    assert loop.timer_times() == [6.0]
    loop.advance(4.5)
    assert conn.phase is Phase.FLUSHING
    assert not transport.aborted
    loop.advance(0.5)
    assert transport.aborted
    assert transport.socket.options == [SO_LINGER_ZERO]
    assert setup.forgotten == Forgotten(
        conn,
        "closed by client, then reset: replies not taken by the deadline",
        2,
        len(REPLY_A) - 20,
        6.0,
    )


def test_a_connection_holds_at_most_one_timer_through_its_life() -> None:
    setup = connect(proxy_protocol=True)
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    timeline: list[tuple[str, float, Phase, list[float]]] = []

    def note(step: str) -> None:
        timeline.append((step, loop.now, conn.phase, loop.timer_times()))

    note("accepted")
    loop.advance(1.0)
    setup.feed(V1)
    note("header")
    setup.feed(b"a\n")
    transport.unacked = len(REPLY_A)
    loop.advance(1.0)
    conn.shutdown()
    note("stop")
    loop.advance(0.25)
    setup.feed(b"b\n")
    note("client sends")
    loop.advance(0.25)
    note("checked")
    transport.unacked = 0
    loop.advance(0.5)
    note("silent")
    assert timeline == [
        ("accepted", 0.0, Phase.PROXY, [10.0]),
        ("header", 1.0, Phase.SERVING, []),
        ("stop", 2.0, Phase.LINGERING, [2.5]),
        ("client sends", 2.25, Phase.LINGERING, [2.5]),
        ("checked", 2.5, Phase.LINGERING, [3.0]),
        ("silent", 3.0, Phase.CLOSED, []),
    ]


# 5b. The PROXY header's deadline, after the header.


def test_a_proxy_client_lingering_after_the_handshake_timeout_gets_a_full_linger() -> None:
    """A line over the limit at t=30, 29 s after the PROXY header: the error
    line must get its linger, not the handshake deadline of t=10."""
    setup = connect(proxy_protocol=True, max_message_size=16)
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    loop.advance(1.0)
    setup.feed(V1)
    loop.advance_to(30.0)
    transport.unacked = 36  # the error line, on its way
    setup.feed(b"x" * 20 + b"\n")
    assert conn.phase is Phase.LINGERING
    loop.advance(0.25)
    assert not transport.aborted, f"reset at once: {conn.reason}"
    assert conn.deadline == 35.0
    assert loop.timer_times() == [30.5]


def test_shutdown_after_the_handshake_timeout_gives_a_proxy_client_the_full_timeout() -> None:
    """A client behind a balancer that has not taken its replies when the stop
    begins at t=60 has until t=65, not the handshake deadline of t=10."""
    setup = connect(proxy_protocol=True)
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    loop.advance(1.0)
    setup.feed(V1 + b"a\n")
    transport.buffer = len(REPLY_A)
    transport.client_eof()
    loop.advance_to(60.0)
    conn.shutdown()
    assert loop.timer_times() == [65.0]
    loop.advance(2.0)
    assert not transport.aborted, f"reset at once: {conn.reason}"
    transport.take()  # the client takes its replies at t=62
    loop.run_ready()
    assert setup.forgotten == Forgotten(conn, "closed by client", len(V1) + 2, 29, 62.0)


# 6. The user's handler: HandlerConnection and Connection.run, on a real loop.


async def open_handler_connection(
    handler: Any, *, proxy_protocol: bool = False
) -> tuple[Connection, FakeTransport, FakeServer]:
    """A handler's connection as start_server and Server._accept make it, on
    the running loop, with a fake transport."""
    loop = asyncio.get_running_loop()
    server = FakeServer(loop, handler=handler, proxy_protocol=proxy_protocol)
    transport = FakeTransport(loop)
    raw = cast(asyncio.Transport, transport)
    reader = asyncio.StreamReader(limit=server.max_message_size, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport.set_protocol(protocol)
    protocol.connection_made(raw)
    writer = asyncio.StreamWriter(raw, protocol, reader, loop)
    conn = connection_class("handler", False)(cast(Any, server), writer, None, reader)
    conn.begin()
    return conn, transport, server


async def replying_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    writer.write(b"got " + line)


async def failing_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    raise ValueError("boom")


async def reset_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    raise ConnectionResetError


async def exact_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(100)


async def waiting_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()


@pytest.mark.parametrize(
    ("handler", "reason", "written", "logged"),
    [
        (replying_handler, "handler returned", b"got hello\n", []),
        (
            failing_handler,
            "handler failed",
            b"",
            [("ERROR", "Handler failing_handler failed for 127.0.0.1:50000")],
        ),
        (reset_handler, "reset by client", b"", []),
        (exact_handler, "closed by client mid-message", b"", []),
    ],
    ids=["returns", "raises", "connection-error", "incomplete-read"],
)
def test_handler_outcome_ends_the_connection(
    handler: Any,
    reason: str,
    written: bytes,
    logged: list[tuple[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        conn, transport, server = await open_handler_connection(handler)
        task = asyncio.get_running_loop().create_task(conn.run())
        conn.data_received(b"hello\n")
        transport.client_eof()  # the handler's reader sees EOF; the transport stays open
        assert not transport.closing
        await task
        assert not task.cancelled()
        assert task.result() is None
        await asyncio.sleep(0)
        assert conn.phase is Phase.CLOSED
        assert transport.closing
        assert not transport.aborted
        assert transport.written == written
        assert [r[:4] for r in server.forgotten] == [(conn, reason, 6, len(written))]

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == logged
    if logged:
        exc_info = caplog.records[0].exc_info
        assert exc_info is not None
        assert exc_info[0] is ValueError


def test_handler_raising_an_ssl_error_made_in_python_ends_the_connection() -> None:
    """An SSLError made in Python (ssl.SSLError(1, "..."), or a library's) has no
    `reason` attribute, which only OpenSSL's errors carry."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise ssl.SSLError(1, "bad record from upstream")

    async def scenario() -> None:
        conn, _, server = await open_handler_connection(handler)
        task = asyncio.get_running_loop().create_task(conn.run())
        await asyncio.wait([task])
        assert not task.cancelled()
        assert task.exception() is None, repr(task.exception())
        await asyncio.sleep(0)
        assert conn.phase is Phase.CLOSED
        assert [r[:2] for r in server.forgotten] == [(conn, "TLS error: bad record from upstream")]

    asyncio.run(scenario())


def test_shutdown_cancels_a_running_handler_at_its_await_and_the_connection_lingers() -> None:
    seen: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello?\n")
        try:
            await reader.readline()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        conn, transport, server = await open_handler_connection(handler)
        task = loop.create_task(conn.run())
        conn.data_received(b"par")  # half a line: the handler waits for the rest
        await asyncio.sleep(0)
        assert transport.written == b"hello?\n"
        transport.unacked = 7  # not acknowledged: the linger check will wait
        before = loop.time()
        conn.shutdown()
        after = loop.time()
        await task
        assert seen == ["cancelled"]
        assert not task.cancelled()
        assert task.result() is None
        assert conn.phase is Phase.LINGERING
        assert transport.eof
        assert not transport.closing, "the linger was cut short"
        assert conn.reason == "server stopped"
        assert before + 5.0 <= conn.deadline <= after + 5.0
        assert conn.timer is not None

        transport.client_eof()  # the client closes too
        await asyncio.sleep(0)
        assert conn.phase is Phase.CLOSED
        assert conn.timer is None
        assert not transport.aborted
        assert [r[:4] for r in server.forgotten] == [(conn, "server stopped", 3, 7)]

    asyncio.run(scenario())


def test_idle_check_cancels_a_handler_with_nothing_owed() -> None:
    async def scenario() -> None:
        conn, transport, server = await open_handler_connection(waiting_handler)
        task = asyncio.get_running_loop().create_task(conn.run())
        await asyncio.sleep(0)
        conn.idle_check(300.0)
        await task
        assert not task.cancelled()
        assert task.result() is None
        await asyncio.sleep(0)
        assert conn.phase is Phase.CLOSED
        assert transport.closing
        assert not transport.aborted
        assert not transport.eof
        assert [r[:2] for r in server.forgotten] == [(conn, "idle for 300 s")]

    asyncio.run(scenario())


def test_run_ends_normally_when_cancelled_from_outside_and_resets() -> None:
    async def scenario() -> None:
        conn, transport, server = await open_handler_connection(waiting_handler)
        task = asyncio.get_running_loop().create_task(conn.run())
        await asyncio.sleep(0)
        task.cancel()
        await task
        assert not task.cancelled()
        assert task.result() is None
        assert transport.aborted
        assert transport.socket.options == [SO_LINGER_ZERO]
        await asyncio.sleep(0)
        assert conn.phase is Phase.CLOSED
        assert [r[:2] for r in server.forgotten] == [(conn, "cancelled")]

    asyncio.run(scenario())


def test_handler_behind_a_proxy_header_runs_once_serving_and_sees_the_client_named() -> None:
    got: dict[str, Any] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got["peer"] = writer.get_extra_info("peername")
        got["line"] = await reader.readline()

    async def scenario() -> None:
        conn, _, server = await open_handler_connection(handler, proxy_protocol=True)
        task = asyncio.get_running_loop().create_task(conn.run())
        await asyncio.sleep(0)
        assert conn.phase is Phase.PROXY
        assert not task.done()
        assert got == {}
        conn.data_received(V1 + b"hello\n")
        await task
        assert got == {"peer": PROXY_PEER, "line": b"hello\n"}
        await asyncio.sleep(0)
        assert [r[:3] for r in server.forgotten] == [(conn, "handler returned", len(V1) + 6)]

    asyncio.run(scenario())


# 7. Turning a client away.


def test_turn_away_with_a_line_writes_it_half_closes_and_lingers() -> None:
    setup = connect(kind=Connection, begin=False)  # as Server._turn_away makes it
    conn, transport, loop = setup.conn, setup.transport, setup.loop
    conn.turn_away("max_connections=1 reached", BUSY_REPLY)
    assert transport.get_protocol() is conn
    assert transport.written == BUSY_REPLY
    assert conn.phase is Phase.LINGERING
    assert transport.eof
    assert transport.reading
    assert (conn.bytes_in, conn.bytes_out) == (0, len(BUSY_REPLY))  # nothing received yet
    assert conn.deadline == 5.0
    assert loop.timer_times() == [0.5]

    loop.advance(0.25)
    setup.feed(b"hello\n")  # its request, sent before it read why: dropped
    loop.advance(2.0)
    assert transport.written == BUSY_REPLY
    assert setup.forgotten == Forgotten(conn, "max_connections=1 reached", 6, 19, 1.0)


def test_turn_away_without_a_line_just_closes() -> None:
    setup = connect(kind=Connection, begin=False)
    conn, transport = setup.conn, setup.transport
    conn.turn_away("out of file descriptors", b"")
    assert conn.phase is Phase.FLUSHING
    assert transport.closing
    assert not transport.eof
    assert transport.writes == []
    assert setup.loop.timer_times() == []
    setup.loop.run_ready()
    assert setup.forgotten == Forgotten(conn, "out of file descriptors", 0, 0, 0.0)
