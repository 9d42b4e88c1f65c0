"""`run`: the blocking entry point that picks the loop and serves until stopped."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from .loops import loop_factory
from .protocols import Handler
from .server import Server

__all__ = ["STOP_SIGNALS", "run"]

logger = logging.getLogger("aioserver")

# A service manager stops with SIGTERM, a person with Ctrl-C (SIGINT).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run(
    handler: Handler,
    *,
    loop: str = "auto",
    on_start: Callable[[Server], object] | None = None,
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
    """
    factory = loop_factory(loop)
    server = Server(handler, **options)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve_until_signalled(server, on_start))


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
