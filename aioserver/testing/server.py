"""`TestServer`: the test server on the event loop of the code that starts it."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import ClassVar, Self

from ..server import Server
from .base import DEFAULT_WAIT_TIMEOUT, TestServerBase
from .faults import Faults
from .recording import ConnectionRecord


class WrongLoopError(RuntimeError):
    """A TestServer was used from an event loop other than the one it runs on."""


class TestServer(TestServerBase):
    """A recording, fault-injecting TCP server on the running event loop.

    `handler` has the `asyncio.start_server` signature; the default is
    `aioserver.echo`, and `aioserver.thanks` is the other built-in. Use it as
    `async with TestServer(handler) as server:`; it is accepting when the block
    starts, on an ephemeral port of `host` (an IP address, 127.0.0.1 by default):
    `server.port` and `server.address` say where.

    With `handler` None (or `expectations=True`, or once `expect()` was called)
    new connections are answered by the expectations instead: what each receives
    is split into messages by `delimiter` (b"\\n" by default; None: each chunk as it
    arrives), each message is offered to the expectations (see `expect`), and one
    that none takes is recorded and answered by `unexpected`: nothing (None, the
    default), fixed bytes, or "close". At EOF the last fragment without a
    delimiter is a message too, then the server closes. `check()` raises
    AssertionError on unexpected messages, unmet one-shot or ordered
    expectations, and handler errors. `delimiter` also splits `messages`.

    Options are those of `aioserver.Server`, with these differences: `faults` (a
    `Faults`, shared and switchable at run time; `server.faults`); a
    `shutdown_timeout` of TEST_SHUTDOWN_TIMEOUT; at `max_connections` a client is
    closed at once, without the thanks protocol's busy line; and the port is bound
    with SO_REUSEPORT (so the server can hold it while refusing), which means a
    fixed `port` that another SO_REUSEPORT socket of the same user holds is shared
    rather than an error. With `ssl`, the records hold the decrypted bytes.

    The server lives on the loop that started it and serves only while that loop
    runs. Using it from another running loop (a test on a narrower loop scope than
    the fixture that made it) raises WrongLoopError at once instead of hanging.

    Leaving the block (or `stop()`) closes the listening socket, cancels every
    connection's handler at its current await, drops delayed replies, closes every
    socket and leaves no task behind; calling it again is harmless. The records
    stay readable after the stop.
    """

    __test__ = False  # a helper, not a test class, though pytest would collect the name
    _kind: ClassVar[str] = "TestServer"

    # What it runs: `server.faults` may also be replaced, for new connections.

    @property
    def faults(self) -> Faults:
        """The faults applied from now on: switch them on and off at run time."""
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._faults = faults

    # Where it is.

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the server runs on (None before start)."""
        return self._loop

    @property
    def server(self) -> Server:
        """The `aioserver.Server` listening now (a new one after accept_connections)."""
        return self._listener.server

    @property
    def port(self) -> int:
        """The bound port; it stays the same while refusing and after accept_connections.

        Raises WrongLoopError from a loop other than the server's, and RuntimeError
        before start.
        """
        self._check_loop("port")
        return super().port

    # The waits take a timeout rather than leaving it to asyncio.timeout around
    # them: the default makes a wait that can never succeed fail with a message
    # saying what did arrive.

    async def wait_for_connections(
        self,
        n: int,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,  # noqa: ASYNC109
    ) -> list[ConnectionRecord]:
        """Wait until at least `n` connections were accepted; return every record.

        Raises TimeoutError after `timeout` seconds, saying how many arrived.
        """
        self._check_loop("wait_for_connections")
        await self._wait("connections", n, timeout)
        return self.connections

    async def wait_for_messages(
        self,
        n: int,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,  # noqa: ASYNC109
    ) -> list[bytes]:
        """Wait until at least `n` messages were received in all; return them all.

        Raises TimeoutError after `timeout` seconds, saying how many arrived.
        """
        self._check_loop("wait_for_messages")
        await self._wait("messages", n, timeout)
        return self.messages

    async def wait_for_closed(
        self,
        n: int,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,  # noqa: ASYNC109
    ) -> list[ConnectionRecord]:
        """Wait until at least `n` connections have ended; return every record.

        Raises TimeoutError after `timeout` seconds, saying how many ended.
        """
        self._check_loop("wait_for_closed")
        await self._wait("closed", n, timeout)
        return self.connections

    # Life.

    async def start(self) -> Self:
        """Bind and start accepting. Raises OSError when the address is taken."""
        await self._start_serving()
        return self

    async def stop(self) -> None:
        """Stop as `aioserver.Server.stop()` does; harmless when already stopped.

        Every connection ends (Ending.SERVER_STOPPED unless it ended already),
        the port is released, and no task or socket of the server is left.
        """
        self._check_loop("stop")
        await self._stop_serving()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def refuse_connections(self) -> None:
        """Go down as a stopped server does, but keep the port for coming back.

        The listening socket closes (a new connect gets ECONNREFUSED) and every
        open connection ends as at a stop; a socket bound without listening holds
        the port meanwhile. Harmless when already refusing.
        """
        self._check_loop("refuse_connections")
        await self._refuse_connections()

    async def blackhole_connections(self) -> None:
        """Go down as `refuse_connections()` does, but make new connects hang.

        The port is held by a socket that listens with a backlog of 0, filled by
        one connection of the server's own that is never accepted: Linux drops
        the SYN of every further connect, so the client stays in SYN-SENT,
        retrying, until its connect timeout (or until `accept_connections()`,
        when its next retry, about 1 s later, gets through). Open connections
        end as at a stop. Harmless when already so.
        """
        self._check_loop("blackhole_connections")
        await self._blackhole_connections()

    async def accept_connections(self) -> None:
        """Listen again on the same port after `refuse_connections()` or
        `blackhole_connections()`.

        The records go on from where they were. Harmless when already serving.
        Raises OSError if the port cannot be bound again.
        """
        self._check_loop("accept_connections")
        await self._accept_connections()

    # Internals.

    def _check_loop(self, what: str) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return  # synchronous code may read the address
        if running is not loop:
            raise WrongLoopError(_wrong_loop_message(self, what))


def _wrong_loop_message(server: TestServer, what: str) -> str:
    return (
        f"{what}: {server!r} runs on the event loop it was started on, and serves "
        "only while that loop runs, but it is used from a different running loop. "
        "This happens when a fixture with a wider loop scope (for example "
        "loop_scope='module') made the server and a test on another loop uses it. "
        "Run the test on the fixture's loop, e.g. "
        "@pytest.mark.asyncio(loop_scope='module'), or use a ThreadedTestServer "
        "(the threaded_* fixtures), which any loop or thread can use."
    )
