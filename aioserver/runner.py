"""`run`: the blocking entry point that picks the loop and serves until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from .loops import loop_factory
from .protocols import Handler
from .server import Server
from .sockets import bind_sockets
from .workers import supervise

__all__ = ["STOP_SIGNALS", "run"]

logger = logging.getLogger("aioserver")

# The options that say what to listen on: with workers, the supervisor binds.
BIND_OPTIONS = ("host", "port", "unix", "backlog", "reuse_port")
# A service manager stops with SIGTERM, a person with Ctrl-C (SIGINT).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run(
    handler: Handler,
    *,
    loop: str = "auto",
    on_start: Callable[[Server], object] | None = None,
    workers: int = 1,
    **options: Any,
) -> None:
    """Serve `handler` on a new event loop until stopped, then return.

    `loop` is "auto" (uvloop when it imports), "asyncio" or "uvloop"; the other
    options are those of `Server`. `on_start(server)` is called once the server
    accepts. Errors from binding (OSError) propagate.

    In the main thread, SIGINT and SIGTERM are handled from before `on_start`
    is called until `run` returns. The first stops the server gracefully, by
    cancelling `serve_forever()` (replies owed are flushed within
    shutdown_timeout); a second one during that stop cancels the stop, which
    aborts the connections left at once. Either way `run` then returns normally.
    Outside the main thread no signal is handled and it serves until the process
    ends.

    With `workers` above 1, this process binds the sockets, calls `on_start`
    with a Server describing them, and supervises that many forked worker
    processes serving them (see `aioserver.workers.supervise`); it returns once
    a SIGINT or SIGTERM has stopped them all.
    """
    if workers != 1:
        _supervise(handler, loop, on_start, workers, options)
        return
    factory = loop_factory(loop)
    server = Server(handler, **options)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve_until_signalled(server, on_start))


def _supervise(
    handler: Handler,
    loop: str,
    on_start: Callable[[Server], object] | None,
    workers: int,
    options: dict[str, Any],
) -> None:
    if workers < 1:
        raise ValueError("workers must be at least 1")
    loop_factory(loop)  # an unknown or missing loop fails here, once
    bind = {name: options.pop(name) for name in BIND_OPTIONS if name in options}
    sockets = bind_sockets(**bind)
    try:
        described = Server(handler, sockets=sockets, **options)
        if on_start is not None:
            on_start(described)
        supervise(
            workers,
            sockets,
            lambda inherited: run(handler, loop=loop, sockets=inherited, **options),
        )
    finally:
        if bind.get("unix") is not None:
            with contextlib.suppress(OSError):
                os.unlink(bind["unix"])


async def _serve_until_signalled(
    server: Server, on_start: Callable[[Server], object] | None
) -> None:
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    handled = STOP_SIGNALS if threading.current_thread() is threading.main_thread() else ()
    for signum in handled:
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    try:
        await server.start()
        if on_start is not None:
            on_start(server)
        serving = asyncio.create_task(server.serve_forever())
        first = await _next_signal(signals, serving)
        if first is not None:
            logger.info("%s received: stopping (send it again to stop at once)", first.name)
            serving.cancel()
            # The cancellation reaches serve_forever before this task runs again
            # (call_soon order), so a second one lands inside stop() and aborts.
            second = await _next_signal(signals, serving)
            if second is not None:
                logger.warning("%s received again: closing every connection now", second.name)
                serving.cancel()
                await asyncio.wait({serving})
        if not serving.cancelled():
            serving.result()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


async def _next_signal(
    signals: asyncio.Queue[signal.Signals], serving: asyncio.Task[None]
) -> signal.Signals | None:
    """The next stop signal, or None if `serving` ends first."""
    getter = asyncio.create_task(signals.get())
    try:
        await asyncio.wait({getter, serving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    return getter.result() if getter.done() else None
