"""`run`: the blocking entry point that picks the loop and serves until stopped."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from typing import Any

from .loops import loop_factory
from .protocols import Handler
from .server import Server

__all__ = ["STOP_SIGNALS", "run"]

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
    accepts. In the main thread, the first SIGINT or SIGTERM stops the server
    gracefully (as `Server.stop()` does) and a second one during that stop aborts
    the remaining connections at once. Errors from binding (OSError) propagate.
    """
    factory = loop_factory(loop)
    server = Server(handler, **options)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve_until_signalled(server, on_start))


async def _serve_until_signalled(
    server: Server, on_start: Callable[[Server], object] | None
) -> None:
    await server.start()
    if on_start is not None:
        on_start(server)
    serving = asyncio.create_task(server.serve_forever())
    if threading.current_thread() is not threading.main_thread():
        await serving
        return
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        # Each signal cancels the serving task: the first starts a graceful stop,
        # a second cancels that stop, which aborts what is left.
        loop.add_signal_handler(signum, serving.cancel)
    try:
        await serving
    except asyncio.CancelledError:
        if not serving.cancelled():
            raise  # cancelled from outside, not by a signal
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
