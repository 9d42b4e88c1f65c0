"""What both test servers share: options, state, records and the read-only API.

`TestServerBase` holds a test server's handler, faults and options, its state
("new" -> "starting" -> "serving" <-> "refusing" or "blackholing" -> "stopped"),
its address and its recording. It answers the read-only API (where it is, what it
saw) alike for every server, checks the waits' arguments, words the errors, and has
the coroutines that change the state on the server's loop: `_start_serving`,
`_stop_serving`, `_refuse_connections`, `_blackhole_connections` and
`_accept_connections`. A subclass says on which loop they
run and how its public methods reach them: `TestServer` awaits them on the loop of
the code that uses it, `ThreadedTestServer` runs them on its own loop in a thread
and blocks until they are done.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import ssl as ssl_module
import traceback
from typing import Any, ClassVar, TypedDict, cast

from ..connection import Connection
from ..protocols import DEFAULT_MAX_MESSAGE_SIZE, READ_CHUNK, Handler, echo
from ..server import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS
from .expectations import (
    Expectation,
    Matcher,
    Unexpected,
    UnexpectedMessage,
    _Book,
    _check_delimiter,
    _check_unexpected,
    _Framer,
    _TooLong,
)
from .faults import Faults, _FaultyWriter, _peer, _serve_with_faults, aimed
from .listener import _Listener
from .recording import ConnectionRecord, Ending, _Recording, _transcript

# Five seconds: loopback traffic needs milliseconds, and a wait that can never
# succeed fails with its own message well inside a per-test timeout.
DEFAULT_WAIT_TIMEOUT = 5.0
# One second: a test client takes its last replies at once or never will, so a
# stop never holds a test back longer than this.
TEST_SHUTDOWN_TIMEOUT = 1.0


class ServerOptions(TypedDict, total=False):
    """The keyword options of `TestServer`, for factories that pass them on."""

    host: str
    port: int
    faults: Faults | None
    max_connections: int
    idle_timeout: float | None
    max_message_size: int
    shutdown_timeout: float
    ssl: ssl_module.SSLContext | None
    delimiter: bytes | None
    unexpected: Unexpected
    expectations: bool


def _check_wait(n: int, timeout: float) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, not {n!r}")
    if timeout < 0:
        raise ValueError(f"timeout must not be negative, not {timeout!r}")


def _handler_name(handler: Handler | None) -> str:
    if handler is None:
        return "expectations"
    return getattr(handler, "__qualname__", None) or repr(handler)


# How many characters of a handler error's traceback check() shows.
TRACEBACK_CHARS = 4000


class TestServerBase:
    """A recording, fault-injecting TCP server: what TestServer and ThreadedTestServer share.

    The options are TestServer's (see there). Not used directly: a subclass runs
    the server on a loop and gives it its public methods.
    """

    __test__ = False  # a helper, not a test class, though pytest would collect the name
    _kind: ClassVar[str] = "TestServerBase"
    """The class name that repr and error messages show (kept by subclasses)."""

    def __init__(
        self,
        handler: Handler | None = echo,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        shutdown_timeout: float = TEST_SHUTDOWN_TIMEOUT,
        ssl: ssl_module.SSLContext | None = None,
        delimiter: bytes | None = b"\n",
        unexpected: Unexpected = None,
        expectations: bool = False,
    ) -> None:
        _check_delimiter(delimiter)
        _check_unexpected(unexpected)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"host must be an IP address such as 127.0.0.1, not {host!r}"
            ) from None
        self._handler = handler
        self._faults = faults if faults is not None else Faults()
        self._options: dict[str, Any] = {
            "max_connections": max_connections,
            "idle_timeout": idle_timeout,
            "max_message_size": max_message_size,
            "shutdown_timeout": shutdown_timeout,
            "ssl": ssl,
            "reuse_port": True,  # lets a placeholder hold the port while refusing
        }
        self._listener = _Listener(
            self._serve_connection, self._choose_tls, host, port, self._options
        )
        # On a TLS server, the faults' aim is decided before the handshake; the
        # decision waits here for the handler, by the connection's socket.
        self._aimed: dict[int, Faults] = {}
        self._host = host
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # -> starting -> serving <-> refusing/blackholing -> stopped
        self._recording = _Recording(delimiter)
        self._delimiter = delimiter
        self._unexpected = unexpected
        self._expectations_on = expectations
        self._book = _Book()
        self._stop_done: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}" if self._port is not None else self._host
        return f"<{self._kind} {_handler_name(self.handler)} {where} {self._state}>"

    # What it runs.

    @property
    def handler(self) -> Handler | None:
        """The handler for connections accepted from now on (settable at run time).

        None: the server answers by its expectations (see `expect`).
        """
        return self._handler

    @handler.setter
    def handler(self, handler: Handler | None) -> None:
        self._handler = handler

    @property
    def delimiter(self) -> bytes | None:
        """What ends a message (None: each chunk as it arrives is a message)."""
        return self._delimiter

    # Expectations.

    @property
    def expects(self) -> bool:
        """True when new connections are answered by the expectations, not the handler:
        the handler is None, the server was made with `expectations=True`, or it
        has an expectation."""
        return self._handler is None or self._expectations_on or bool(self._book)

    def expect(self, match: Matcher, *, ordered: bool = False, once: bool = False) -> Expectation:
        """Expect a message; say what to answer with the returned `Expectation`.

        `match` is exact bytes, a compiled bytes pattern (`re.fullmatch`) or a
        predicate, applied to the message without its delimiter. Permanent by
        default (any number of matches, none required); `once=True`: used up
        after one match, and `check()` fails if it never matched; `ordered=True`:
        one-shot too, and the ordered expectations must be met in the order
        declared. A message is offered to the next ordered expectation, then to
        the one-shot ones, then to the permanent ones (each in declaration order).

        From now on new connections are served by the expectations instead of
        the handler. Callable from any thread, at any time.
        """
        return self._book.add(match, ordered=ordered, once=once)

    @property
    def expectations(self) -> list[Expectation]:
        """Every expectation declared, in order."""
        with self._book.lock:
            return list(self._book.expectations)

    @property
    def unexpected_messages(self) -> list[UnexpectedMessage]:
        """Every message no expectation took, in arrival order."""
        with self._book.lock:
            return list(self._book.unexpected)

    def clear_expectations(self) -> None:
        """Forget every expectation and unexpected message (handler errors stay)."""
        self._book.clear()

    def check(self) -> None:
        """Raise AssertionError naming everything that went wrong so far.

        That is: every unexpected message, every one-shot or ordered expectation
        not met, and every exception a handler (or a matcher or reply function)
        raised; followed by the transcript of the connections involved (bounded).
        Returns None when all is well. The pytest fixtures call it after the test.
        """
        unexpected, unmet = self._book.problems()
        records = self.connections
        failed = [r for r in records if r.error is not None]
        problems: list[str] = []
        involved: set[int] = set()
        for item in unexpected:
            reason = f" ({item.reason})" if item.reason else ""
            problems.append(
                f"unexpected message {item.message!r} on connection #{item.connection}{reason}"
            )
            involved.add(item.connection)
        for expectation in unmet:
            kind = "ordered" if expectation.ordered else "one-shot"
            problems.append(f"{kind} expectation {expectation!r} was never met")
        for record in failed:
            error = cast(BaseException, record.error)
            text = "".join(traceback.format_exception(error)).rstrip()
            if len(text) > TRACEBACK_CHARS:
                text = "..." + text[-TRACEBACK_CHARS:]
            problems.append(
                f"handler error on connection #{record.index}: {error!r}\n"
                + "\n".join("    " + line for line in text.splitlines())
            )
            involved.add(record.index)
        if not problems:
            return
        message = [f"{self!r}: {len(problems)} problem(s)"]
        message += [f"- {problem}" for problem in problems]
        shown = [r for r in records if r.index in involved]
        if shown:
            message.append("transcript of the connections involved:")
            message.append(_transcript(shown))
        raise AssertionError("\n".join(message))

    def transcript(self) -> str:
        """What each connection received and sent: 2 KiB each way, the last 20."""
        return f"{self!r}, {len(self.connections)} connection(s):\n" + _transcript(self.connections)

    @property
    def faults(self) -> Faults:
        """The faults applied from now on: switch them on and off at run time."""
        return self._faults

    # Where it is.

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port; it stays the same while refusing and after accept_connections.

        Raises RuntimeError before start.
        """
        if self._port is None:
            raise RuntimeError(f"{self!r} has no port yet: start it first")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port), as socket.create_connection and open_connection take them."""
        return self.host, self.port

    @property
    def is_serving(self) -> bool:
        """True while accepting: started, not refusing, not stopped."""
        return self._state == "serving"

    @property
    def is_refusing(self) -> bool:
        return self._state == "refusing"

    @property
    def is_blackholing(self) -> bool:
        """True after `blackhole_connections()`, until `accept_connections()`."""
        return self._state == "blackholing"

    # What it saw.

    @property
    def connections(self) -> list[ConnectionRecord]:
        """A record of every connection accepted so far, in accept order."""
        return self._recording.connections()

    @property
    def messages(self) -> list[bytes]:
        """Every message (line) received so far on any connection, in arrival order."""
        return self._recording.messages()

    # The waits, for the subclasses' public ones: `what` is "connections",
    # "messages" or "closed" (connections that ended).

    async def _wait(self, what: str, n: int, seconds: float) -> None:
        """Wait on the server's loop until at least `n` of `what` were recorded."""
        _check_wait(n, seconds)
        await self._recording.wait(what, n, seconds)

    def _wait_blocking(self, what: str, n: int, timeout: float) -> None:
        """Block this thread (not the server's) until at least `n` of `what` were recorded."""
        _check_wait(n, timeout)
        self._recording.wait_blocking(what, n, timeout)

    # Life, on the server's loop.

    async def _start_serving(self) -> None:
        """Bind and start accepting on the running loop. OSError when the address is taken."""
        if self._state != "new":
            raise RuntimeError(f"{self!r}: a {self._kind} starts once")
        self._loop = asyncio.get_running_loop()
        self._state = "starting"
        try:
            self._host, self._port = await self._listener.start()
        except BaseException:
            self._state = "stopped"
            raise
        self._state = "serving"

    async def _stop_serving(self) -> None:
        """Stop as `aioserver.Server.stop()` does; a second call waits for the first."""
        if self._stop_done is not None:
            await asyncio.shield(self._stop_done)
            return
        self._stop_done = asyncio.get_running_loop().create_future()
        self._state = "stopped"
        try:
            await self._listener.stop()
        finally:
            self._stop_done.set_result(None)

    async def _refuse_connections(self) -> None:
        """Stop listening, keeping the port; harmless when already refusing."""
        if self._state == "refusing":
            return
        self._require("serving", "refuse_connections")
        self._state = "refusing"
        await self._listener.refuse()

    async def _blackhole_connections(self) -> None:
        """Stop accepting, keeping the port with a full backlog; harmless when already so."""
        if self._state == "blackholing":
            return
        self._require("serving", "blackhole_connections")
        self._state = "blackholing"
        await self._listener.blackhole()

    async def _accept_connections(self) -> None:
        """Listen again on the same port; harmless when already serving."""
        if self._state == "serving":
            return
        if self._state != "blackholing":
            self._require("refusing", "accept_connections")
        await self._listener.listen_again(self._host, self.port)
        self._state = "serving"

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The handler every aioserver.Server of this test server runs: it records the
        # connection, applies the faults, and calls the user's handler (or answers
        # by the expectations).
        handler = self._serve_expected if self.expects else self.handler
        assert handler is not None
        active = None
        if self._options["ssl"] is not None:
            active = self._aimed.pop(writer.get_extra_info("socket").fileno(), None)
        await _serve_with_faults(
            handler,
            self.faults,
            self._recording,
            self._options["max_message_size"],
            reader,
            writer,
            active,
        )

    def _choose_tls(self, connection: Connection) -> ssl_module.SSLContext:
        # Before a connection's TLS handshake: aim the faults at it; under fail_tls,
        # record it as failed and hand it a context that fails the handshake.
        active = aimed(self.faults)
        transport = connection.raw
        if active.fail_tls:
            live = self._recording.open(_peer(transport), active._on())
            self._recording.end(live, Ending.TLS_FAILED, None)
            # The loop's TLS layer closes a failed handshake without sending its
            # alert, so the alert is written here, ahead of it.
            transport.write(_HANDSHAKE_FAILURE_ALERT)
            return _failing_tls_context()
        self._aimed[transport.get_extra_info("socket").fileno()] = active
        return cast(ssl_module.SSLContext, self._options["ssl"])

    async def _serve_expected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Frame the messages, answer each by the expectations; at EOF answer the
        # last fragment and close. The writer is the link's, with its faults.
        link = cast(_FaultyWriter, writer)._link
        index = link.live.index
        framer = _Framer(self._delimiter, self._options["max_message_size"])
        try:
            while data := await reader.read(READ_CHUNK):
                try:
                    messages = framer.feed(data)
                except _TooLong as error:
                    with self._book.lock:
                        self._book.unexpected.append(
                            UnexpectedMessage(index, error.head, str(error))
                        )
                    return
                for message in messages:
                    if not await self._answer(message, index, writer):
                        return
            last = framer.finish()
            if last is not None:
                await self._answer(last, index, writer)
        finally:
            if not link.dead:
                writer.close()
                await writer.wait_closed()

    async def _answer(self, message: bytes, index: int, writer: asyncio.StreamWriter) -> bool:
        """Answer one message; False when the connection is to end."""
        action = self._book.take(message, index)
        if action is None:
            unexpected = self._unexpected
            if unexpected == "close":
                return False
            if isinstance(unexpected, bytes):
                writer.write(unexpected)
                await writer.drain()
            return True
        if action.delay:
            await asyncio.sleep(action.delay)
        if action.kind == "close":
            return False
        if action.kind == "reset":
            cast(_FaultyWriter, writer)._link.reset()
            return False
        if action.data:
            writer.write(action.data)
            await writer.drain()
        return True

    # Errors.

    def _require(self, state: str, what: str) -> None:
        if self._state != state:
            raise RuntimeError(f"{what}: {self!r} is not {state}")


# A TLS record (type 21: alert, version 3.3, 2 bytes): fatal (2), handshake_failure (40).
_HANDSHAKE_FAILURE_ALERT = bytes([21, 3, 3, 0, 2, 2, 40])


@functools.cache
def _failing_tls_context() -> ssl_module.SSLContext:
    """A server context whose every handshake fails with a handshake_failure alert."""
    context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
    context.sni_callback = lambda *_: ssl_module.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
    return context
