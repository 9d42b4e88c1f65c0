"""`_InLoop`: the public methods of a test helper on the event loop that starts it.

`TestServer` and `FaultProxy` are `_InLoop`: their methods are coroutines awaited
on the loop of the code that uses them, and using them from another running loop
raises `WrongLoopError` at once instead of hanging.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, ClassVar, Self

from .lifecycle import _R, DEFAULT_WAIT_TIMEOUT, _ListeningBase


class WrongLoopError(RuntimeError):
    """A TestServer (or FaultProxy) was used from an event loop other than the one it runs on."""


class _InLoop(_ListeningBase[_R]):
    """A `_ListeningBase` whose public methods run on the loop that started it."""

    _threaded_form: ClassVar[str] = "a threaded one"
    """What WrongLoopError advises instead, e.g. "a ThreadedTestServer (...)"."""

    @property
    def port(self) -> int:
        """The bound port; it stays the same while refusing and after accept_connections.

        Raises WrongLoopError from a loop other than its own, and RuntimeError
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
    ) -> list[_R]:
        """Wait until at least `n` connections were accepted; return every record.

        Raises TimeoutError after `timeout` seconds, saying how many arrived.
        """
        self._check_loop("wait_for_connections")
        await self._wait("connections", n, timeout)
        return self.connections

    async def wait_for_closed(
        self,
        n: int,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,  # noqa: ASYNC109
    ) -> list[_R]:
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

        The listening socket closes, every connection ends (Ending.SERVER_STOPPED
        on a test server, ProxyEnding.PROXY_STOPPED on a proxy, unless it ended
        already), the port is released, and no task or socket of it is left.
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

        The listening socket closes (a new connect gets ECONNREFUSED, as with
        Toxiproxy's disabled proxy) and every open connection ends as at a stop;
        a socket bound without listening holds the port meanwhile. Harmless when
        already refusing.
        """
        self._check_loop("refuse_connections")
        await self._refuse_connections()

    async def blackhole_connections(self) -> None:
        """Go down as `refuse_connections()` does, but make new connects hang.

        The port is held by a socket that listens with a backlog of 0, filled by
        one connection of its own that is never accepted: Linux drops the SYN of
        every further connect, so the client stays in SYN-SENT, retrying, until
        its connect timeout (or until `accept_connections()`, when its next
        retry, about 1 s later, gets through). Open connections end as at a
        stop. Harmless when already so.
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


def _wrong_loop_message(helper: _InLoop[Any], what: str) -> str:
    return (
        f"{what}: {helper!r} runs on the event loop it was started on, and serves "
        "only while that loop runs, but it is used from a different running loop. "
        "This happens when a fixture with a wider loop scope (for example "
        "loop_scope='module') made it and a test on another loop uses it. "
        "Run the test on the fixture's loop, e.g. "
        f"@pytest.mark.asyncio(loop_scope='module'), or use {helper._threaded_form}, "
        "which any loop or thread can use."
    )
