"""`ThreadedTestServer`: the test server on its own event loop in a background thread."""

from __future__ import annotations

from typing import ClassVar, Unpack

from ..protocols import Handler, echo
from .base import ServerOptions, TestServerBase
from .in_thread import _Threaded
from .lifecycle import DEFAULT_WAIT_TIMEOUT
from .recording import ConnectionRecord


class ThreadedTestServer(_Threaded[ConnectionRecord], TestServerBase):
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
    _thread_name: ClassVar[str] = "aioserver-test-server"
    _own_thread_hint: ClassVar[str] = "; a handler should use the TestServer methods"

    def __init__(
        self,
        handler: Handler | None = echo,
        *,
        loop: str = "auto",
        **options: Unpack[ServerOptions],
    ) -> None:
        self._prepare_thread(loop)
        super().__init__(handler, **options)

    # Where it is, and what it saw: as TestServer (the read-only API is the
    # base's); the other blocking methods and the thread are `_Threaded`'s.

    def wait_for_messages(self, n: int, *, timeout: float = DEFAULT_WAIT_TIMEOUT) -> list[bytes]:
        """Block until at least `n` messages were received in all; return them all."""
        self._check_thread("wait_for_messages")
        self._wait_blocking("messages", n, timeout)
        return self.messages
