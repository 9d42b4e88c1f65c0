"""`ThreadedTestServer`: the test server on its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar, Unpack

from ..loops import loop_factory
from ..protocols import Handler, echo
from .base import DEFAULT_WAIT_TIMEOUT, ServerOptions, TestServerBase
from .recording import ConnectionRecord

_T = TypeVar("_T")


class ThreadedTestServer(TestServerBase):
    """A `TestServer` on its own event loop in a background thread.

    For synchronous tests and clients that are not asyncio (and usable from any
    async test, whatever its loop). The interface is TestServer's, with blocking
    methods where TestServer's are async. `loop` picks the thread's event loop
    ("auto", "asyncio" or "uvloop"); the other options are TestServer's.

    `with ThreadedTestServer(handler) as server:` returns once the server accepts,
    or re-raises what made it fail to start (OSError for an address in use).
    Leaving the block (or `stop()`) stops the server on its loop as TestServer
    does, closes the loop and joins the thread: no thread, task or socket is left.
    The blocking methods raise RuntimeError when called from the server's own
    thread (a handler), where they would block the loop they wait on.
    """

    __test__ = False  # a helper, not a test class, though pytest would collect the name
    _kind: ClassVar[str] = "ThreadedTestServer"

    def __init__(
        self,
        handler: Handler | None = echo,
        *,
        loop: str = "auto",
        **options: Unpack[ServerOptions],
    ) -> None:
        self._factory = loop_factory(loop)
        super().__init__(handler, **options)
        self._thread: threading.Thread | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # Where it is, and what it saw: as TestServer (the read-only API is the base's).

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server thread's loop while it runs."""
        return self._loop

    def wait_for_connections(
        self, n: int, *, timeout: float = DEFAULT_WAIT_TIMEOUT
    ) -> list[ConnectionRecord]:
        """Block until at least `n` connections were accepted; return every record.

        Raises TimeoutError after `timeout` seconds, saying how many arrived.
        """
        self._check_thread("wait_for_connections")
        self._wait_blocking("connections", n, timeout)
        return self.connections

    def wait_for_messages(self, n: int, *, timeout: float = DEFAULT_WAIT_TIMEOUT) -> list[bytes]:
        """Block until at least `n` messages were received in all; return them all."""
        self._check_thread("wait_for_messages")
        self._wait_blocking("messages", n, timeout)
        return self.messages

    def wait_for_closed(
        self, n: int, *, timeout: float = DEFAULT_WAIT_TIMEOUT
    ) -> list[ConnectionRecord]:
        """Block until at least `n` connections have ended; return every record."""
        self._check_thread("wait_for_closed")
        self._wait_blocking("closed", n, timeout)
        return self.connections

    def refuse_connections(self) -> None:
        """As TestServer.refuse_connections(), blocking until done."""
        self._call("refuse_connections", self._refuse_connections)

    def blackhole_connections(self) -> None:
        """As TestServer.blackhole_connections(), blocking until done."""
        self._call("blackhole_connections", self._blackhole_connections)

    def accept_connections(self) -> None:
        """As TestServer.accept_connections(), blocking until done."""
        self._call("accept_connections", self._accept_connections)

    # Life.

    def start(self) -> Self:
        """Start the thread and return once the server accepts (or raise why not)."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r}: a ThreadedTestServer starts once")
        self._thread = threading.Thread(target=self._run, name="aioserver-test-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            error, self._error = self._error, None
            raise error
        return self

    def stop(self) -> None:
        """Stop the server on its loop, close the loop, join the thread.

        Harmless when already stopped; re-raises what went wrong in the thread.
        """
        thread = self._thread
        if thread is None:
            return
        self._check_thread("stop")
        loop, stop_requested = self._loop, self._stop_requested
        if thread.is_alive() and loop is not None and stop_requested is not None:
            # RuntimeError: the loop already closed, the thread is on its way out.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_requested.set)
        thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # The thread.

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=self._factory) as runner:
                runner.run(self._main())
        except BaseException as exc:  # reported by start() or stop()
            self._error = exc
        finally:
            self._loop = None
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        await self._start_serving()
        try:
            self._ready.set()
            await self._stop_requested.wait()
        finally:
            await self._stop_serving()

    def _check_thread(self, what: str) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                f"{what}: called from {self!r}'s own thread, where it would block the "
                "loop it waits on; a handler should use the TestServer methods"
            )

    def _call(self, what: str, method: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        self._check_thread(what)
        loop = self._loop
        if loop is None or not (self.is_serving or self.is_refusing or self.is_blackholing):
            raise RuntimeError(f"{what}: {self!r} is not running")
        return asyncio.run_coroutine_threadsafe(method(), loop).result()
