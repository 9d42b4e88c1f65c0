"""`TestServer`: the test server on the event loop of the code that starts it."""

from __future__ import annotations

from typing import ClassVar

from ..server import Server
from .base import TestServerBase
from .faults import Faults
from .in_loop import _InLoop
from .lifecycle import DEFAULT_WAIT_TIMEOUT
from .recording import ConnectionRecord


class TestServer(_InLoop[ConnectionRecord], TestServerBase):
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
    _threaded_form: ClassVar[str] = "a ThreadedTestServer (the threaded_* fixtures)"

    # What it runs: `server.faults` may also be replaced, for new connections.

    @property
    def faults(self) -> Faults:
        """The faults applied from now on: switch them on and off at run time."""
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._faults = faults

    # Where it is: as `_InLoop` (loop, port, address), and the Server listening.

    @property
    def server(self) -> Server:
        """The `aioserver.Server` listening now (a new one after accept_connections)."""
        return self._listener.server

    # The waits: wait_for_connections and wait_for_closed are `_InLoop`'s.

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
