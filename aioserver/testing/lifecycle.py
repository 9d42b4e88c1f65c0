"""The life of a listening test helper: what a test server and a fault proxy share.

`_ListeningBase` holds a test server's or a fault proxy's state ("new" ->
"starting" -> "serving" <-> "refusing" or "blackholing" -> "stopped"), its
`_Listener`, its address and its recording. It answers the read-only API (where
it is, what it saw, the transcript) alike for both, checks the waits' arguments,
and has the coroutines that change the state on its loop: `_start_serving`,
`_stop_serving`, `_refuse_connections`, `_blackhole_connections` and
`_accept_connections`. A subclass says what each connection gets (the listener's
handler) and what a record is; a mixin says how the public methods reach those
coroutines: `_InLoop` (in_loop.py) awaits them on the loop of the code that uses
it, `_Threaded` (in_thread.py) runs them on its own loop in a thread and blocks
until they are done.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from ..protocols import Handler
from .listener import TLSChooser, _Listener
from .recording import _Recording

# Five seconds: loopback traffic needs milliseconds, and a wait that can never
# succeed fails with its own message well inside a per-test timeout.
DEFAULT_WAIT_TIMEOUT = 5.0
# One second: a test client takes its last replies at once or never will, so a
# stop never holds a test back longer than this.
TEST_SHUTDOWN_TIMEOUT = 1.0

_R = TypeVar("_R")
"""What a record of one connection is: `ConnectionRecord`, `ProxyRecord`."""


def _check_wait(n: int, timeout: float) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, not {n!r}")
    if timeout < 0:
        raise ValueError(f"timeout must not be negative, not {timeout!r}")


class _ListeningBase(Generic[_R]):
    """A listener with a life and a recording: what test servers and fault proxies share.

    `serve` handles each connection accepted, `choose` picks its TLS context;
    `options` are the keyword options of each `aioserver.Server` listening (with
    `reuse_port` on, so that a placeholder can hold the port while refusing).
    """

    _kind: ClassVar[str] = "_ListeningBase"
    """The class name that repr and error messages show (kept by subclasses)."""

    def __init__(
        self,
        serve: Handler,
        choose: TLSChooser,
        host: str,
        port: int,
        options: dict[str, Any],
        recording: _Recording,
    ) -> None:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"host must be an IP address such as 127.0.0.1, not {host!r}"
            ) from None
        self._options = options
        self._listener = _Listener(serve, choose, host, port, options)
        self._host = host
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # -> starting -> serving <-> refusing/blackholing -> stopped
        self._recording = recording
        self._stop_done: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<{self._kind} {self._describe()} {self._state}>"

    def _where(self) -> str:
        """host:port, or only the host before start."""
        return f"{self._host}:{self._port}" if self._port is not None else self._host

    # What a subclass says.

    def _describe(self) -> str:
        """What repr shows between the class name and the state."""
        return self._where()

    def _records(self) -> list[_R]:
        """A snapshot of every connection's record, in accept order."""
        raise NotImplementedError

    def _transcribe(self, records: Sequence[_R]) -> str:
        """The transcript of `records`, bounded (`recording._transcript`)."""
        raise NotImplementedError

    # Where it is.

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop it runs on (None before start, and once a threaded one's
        thread has ended)."""
        return self._loop

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
        """(host, port), as socket.create_connection and open_connection take them:
        where to point the client."""
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
    def connections(self) -> list[_R]:
        """A record of every connection accepted so far, in accept order."""
        return self._records()

    def transcript(self) -> str:
        """What each connection carried each way: 2 KiB each way, the last 20 connections."""
        records = self.connections
        return f"{self!r}, {len(records)} connection(s):\n" + self._transcribe(records)

    # The waits, for the public ones: `what` is "connections", "messages" (on a
    # test server) or "closed" (connections that ended).

    async def _wait(self, what: str, n: int, seconds: float) -> None:
        """Wait on its loop until at least `n` of `what` were recorded."""
        _check_wait(n, seconds)
        await self._recording.wait(what, n, seconds)

    def _wait_blocking(self, what: str, n: int, timeout: float) -> None:
        """Block this thread (not its loop's) until at least `n` of `what` were recorded."""
        _check_wait(n, timeout)
        self._recording.wait_blocking(what, n, timeout)

    # Life, on its loop.

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
        await self._go_down("refusing", "refuse_connections", self._listener.refuse)

    async def _blackhole_connections(self) -> None:
        """Stop accepting, keeping the port with a full backlog; harmless when already so."""
        await self._go_down("blackholing", "blackhole_connections", self._listener.blackhole)

    async def _go_down(
        self, state: str, what: str, down: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        # From serving to `state` ("refusing", "blackholing") by the listener's `down`.
        if self._state == state:
            return
        self._require("serving", what)
        self._state = state
        await down()

    async def _accept_connections(self) -> None:
        """Listen again on the same port; harmless when already serving."""
        if self._state == "serving":
            return
        if self._state != "blackholing":
            self._require("refusing", "accept_connections")
        await self._listener.listen_again(self._host, self.port)
        self._state = "serving"

    # Errors.

    def _require(self, state: str, what: str) -> None:
        if self._state != state:
            raise RuntimeError(f"{what}: {self!r} is not {state}")
