"""`_Threaded`: a test helper run on its own event loop in a background thread.

`ThreadedTestServer` and `ThreadedFaultProxy` are `_Threaded`: `start()` runs the
helper's loop in a thread and returns once it accepts, the other methods block
the calling thread while the coroutine they stand for runs on that loop, and
`stop()` stops it there, closes the loop and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

from ..loops import loop_factory
from .lifecycle import _R, DEFAULT_WAIT_TIMEOUT, _ListeningBase

_T = TypeVar("_T")


class _Threaded(_ListeningBase[_R]):
    """A `_ListeningBase` on its own loop in a thread, with blocking methods.

    A subclass calls `_prepare_thread(loop)` in its `__init__`; `loop` picks the
    thread's event loop ("auto", "asyncio" or "uvloop"). The blocking methods
    raise RuntimeError when called from the helper's own thread (a handler),
    where they would block the loop they wait on.
    """

    _thread_name: ClassVar[str] = "aioserver-test-helper"
    _own_thread_hint: ClassVar[str] = ""
    """Added to the error of a blocking method called from the helper's own thread."""

    _factory: Callable[[], asyncio.AbstractEventLoop]
    _thread: threading.Thread | None
    _stop_requested: asyncio.Event | None
    _ready: threading.Event
    _error: BaseException | None

    def _prepare_thread(self, loop: str) -> None:
        self._factory = loop_factory(loop)
        self._thread = None
        self._stop_requested = None
        self._ready = threading.Event()
        self._error = None

    # The waits.

    def wait_for_connections(self, n: int, *, timeout: float = DEFAULT_WAIT_TIMEOUT) -> list[_R]:
        """Block until at least `n` connections were accepted; return every record.

        Raises TimeoutError after `timeout` seconds, saying how many arrived.
        """
        self._check_thread("wait_for_connections")
        self._wait_blocking("connections", n, timeout)
        return self.connections

    def wait_for_closed(self, n: int, *, timeout: float = DEFAULT_WAIT_TIMEOUT) -> list[_R]:
        """Block until at least `n` connections have ended; return every record."""
        self._check_thread("wait_for_closed")
        self._wait_blocking("closed", n, timeout)
        return self.connections

    # Down and up, as the in-loop form's (TestServer's, FaultProxy's).

    def refuse_connections(self) -> None:
        """As TestServer.refuse_connections() (FaultProxy's), blocking until done."""
        self._call("refuse_connections", self._refuse_connections)

    def blackhole_connections(self) -> None:
        """As TestServer.blackhole_connections() (FaultProxy's), blocking until done."""
        self._call("blackhole_connections", self._blackhole_connections)

    def accept_connections(self) -> None:
        """As TestServer.accept_connections() (FaultProxy's), blocking until done."""
        self._call("accept_connections", self._accept_connections)

    # Life.

    def start(self) -> Self:
        """Start the thread and return once it accepts (or raise why not)."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r}: a {self._kind} starts once")
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            error, self._error = self._error, None
            raise error
        return self

    def stop(self) -> None:
        """Stop it on its loop, close the loop, join the thread.

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
                f"loop it waits on{self._own_thread_hint}"
            )

    def _call(self, what: str, method: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        self._check_thread(what)
        loop = self._loop
        if loop is None or not (self.is_serving or self.is_refusing or self.is_blackholing):
            raise RuntimeError(f"{what}: {self!r} is not running")
        return asyncio.run_coroutine_threadsafe(method(), loop).result()
