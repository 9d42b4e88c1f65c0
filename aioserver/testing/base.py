"""What both test servers share: options, state, records and the read-only API.

`TestServerBase` holds a test server's handler, faults and options, its state
("new" -> "starting" -> "serving" <-> "refusing" -> "stopped"), its address and its
recording. It answers the read-only API (where it is, what it saw) alike for every
server, checks the waits' arguments, words the errors, and has the coroutines that
change the state on the server's loop: `_start_serving`, `_stop_serving`,
`_refuse_connections` and `_accept_connections`. A subclass says on which loop they
run and how its public methods reach them: `TestServer` awaits them on the loop of
the code that uses it, `ThreadedTestServer` runs them on its own loop in a thread
and blocks until they are done.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl as ssl_module
from typing import Any, ClassVar, TypedDict

from ..protocols import DEFAULT_MAX_MESSAGE_SIZE, Handler, echo
from ..server import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS
from .faults import Faults, _serve_with_faults
from .listener import _Listener
from .recording import ConnectionRecord, _Recording

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


def _check_wait(n: int, timeout: float) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, not {n!r}")
    if timeout < 0:
        raise ValueError(f"timeout must not be negative, not {timeout!r}")


def _handler_name(handler: Handler) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


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
        handler: Handler = echo,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        shutdown_timeout: float = TEST_SHUTDOWN_TIMEOUT,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
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
        self._listener = _Listener(self._serve_connection, host, port, self._options)
        self._host = host
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # -> starting -> serving <-> refusing -> stopped
        self._recording = _Recording()
        self._stop_done: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}" if self._port is not None else self._host
        return f"<{self._kind} {_handler_name(self.handler)} {where} {self._state}>"

    # What it runs.

    @property
    def handler(self) -> Handler:
        """The handler for connections accepted from now on (settable at run time)."""
        return self._handler

    @handler.setter
    def handler(self, handler: Handler) -> None:
        self._handler = handler

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

    async def _accept_connections(self) -> None:
        """Listen again on the same port; harmless when already serving."""
        if self._state == "serving":
            return
        self._require("refusing", "accept_connections")
        await self._listener.listen_again(self._host, self.port)
        self._state = "serving"

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The handler every aioserver.Server of this test server runs: it records the
        # connection, applies the faults, and calls the user's handler.
        await _serve_with_faults(
            self.handler,
            self.faults,
            self._recording,
            self._options["max_message_size"],
            reader,
            writer,
        )

    # Errors.

    def _require(self, state: str, what: str) -> None:
        if self._state != state:
            raise RuntimeError(f"{what}: {self!r} is not {state}")
