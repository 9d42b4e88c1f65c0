"""What both test servers share: options, handler, faults, expectations, records.

`TestServerBase` is a `_ListeningBase` (lifecycle.py: the state, the listener,
the address, the recording and the coroutines that change the state) that holds
a test server's handler, faults, options and expectations, serves each
connection with them, and checks what went wrong (`check()`). A mixin says on
which loop the server runs and how its public methods reach it: `TestServer` is
`_InLoop` (awaited on the loop of the code that uses it), `ThreadedTestServer` is
`_Threaded` (on its own loop in a thread, blocking until done).
"""

from __future__ import annotations

import asyncio
import functools
import ssl as ssl_module
import traceback
from collections.abc import Sequence
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
from .lifecycle import TEST_SHUTDOWN_TIMEOUT, _ListeningBase
from .recording import ConnectionRecord, Ending, _Recording, _served, _transcript


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


def _handler_name(handler: Handler | None) -> str:
    if handler is None:
        return "expectations"
    return getattr(handler, "__qualname__", None) or repr(handler)


# How many characters of a handler error's traceback check() shows.
TRACEBACK_CHARS = 4000


class TestServerBase(_ListeningBase[ConnectionRecord]):
    """A recording, fault-injecting TCP server: what TestServer and ThreadedTestServer share.

    The options are TestServer's (see there). Not used directly: a subclass runs
    the server on a loop and gives it its public methods.
    """

    __test__ = False  # a helper, not a test class, though pytest would collect the name
    _kind: ClassVar[str] = "TestServerBase"

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
        options: dict[str, Any] = {
            "max_connections": max_connections,
            "idle_timeout": idle_timeout,
            "max_message_size": max_message_size,
            "shutdown_timeout": shutdown_timeout,
            "ssl": ssl,
            "reuse_port": True,  # lets a placeholder hold the port while refusing
        }
        super().__init__(
            self._serve_connection, self._choose_tls, host, port, options, _Recording(delimiter)
        )
        self._handler = handler
        self._faults = faults if faults is not None else Faults()
        # On a TLS server, the faults' aim is decided before the handshake; the
        # decision waits here for the handler, by the connection's socket.
        self._aimed: dict[int, Faults] = {}
        self._delimiter = delimiter
        self._unexpected = unexpected
        self._expectations_on = expectations
        self._book = _Book()

    def _describe(self) -> str:
        return f"{_handler_name(self.handler)} {self._where()}"

    def _records(self) -> list[ConnectionRecord]:
        return self._recording.connections()

    def _transcribe(self, records: Sequence[ConnectionRecord]) -> str:
        return _transcript(records, _served, error_label="handler error")

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

    @property
    def faults(self) -> Faults:
        """The faults applied from now on: switch them on and off at run time."""
        return self._faults

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
            message.append(self._transcribe(shown))
        raise AssertionError("\n".join(message))

    # What it saw.

    @property
    def messages(self) -> list[bytes]:
        """Every message (line) received so far on any connection, in arrival order."""
        return self._recording.messages()

    # Serving a connection, on the server's loop.

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


# A TLS record (type 21: alert, version 3.3, 2 bytes): fatal (2), handshake_failure (40).
_HANDSHAKE_FAILURE_ALERT = bytes([21, 3, 3, 0, 2, 2, 40])


@functools.cache
def _failing_tls_context() -> ssl_module.SSLContext:
    """A server context whose every handshake fails with a handshake_failure alert."""
    context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
    context.sni_callback = lambda *_: ssl_module.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
    return context
