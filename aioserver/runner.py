"""`run`: the blocking entry point that picks the loop and serves until stopped.

`run` owns the process's life. In the main thread it handles the stop signals
through a `SignalInbox` (aioserver/workers.py): handlers that only record the
signal, installed before the server is announced (`on_start`) and removed only
after the event loop is closed, with the decisions taken by one loop that reads
them. With workers, that loop is the supervisor's (`aioserver.workers.supervise`);
alone, or in a worker, it is `_serve_until_stopped` on the event loop.

Asked to (`inherit`, `fds`), `run` serves sockets handed over instead of binding
(aioserver/sockets.py: `inherited_sockets`, `sockets_from_fds`); asked to
(`notify`), it tells a service manager through NOTIFY_SOCKET when it is ready
and when it stops (aioserver/notify.py). The command asks for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .loops import loop_factory
from .metrics import MetricsExporter
from .notify import Notifier
from .protocols import Handler
from .server import Server
from .sockets import bind_sockets, inherited_sockets, sockets_from_fds
from .workers import (
    QUICK_STOP_SIGNAL,
    RELOAD_SIGNAL,
    SERVER_INBOX_SIGNALS,
    SERVER_SIGNALS,
    STOP_SIGNALS,
    SUPERVISOR_SIGNALS,
    SignalInbox,
    WorkerStartError,
    supervise,
)

__all__ = ["QUICK_STOP_SIGNAL", "STOP_SIGNALS", "run"]

logger = logging.getLogger("aioserver")

# The options that say what to listen on: with workers, the supervisor binds.
BIND_OPTIONS = ("host", "port", "unix", "backlog", "reuse_port")


def run(
    handler: Handler,
    *,
    loop: str = "auto",
    on_start: Callable[[Server], object] | None = None,
    workers: int = 1,
    fds: Sequence[int] = (),
    inherit: bool = False,
    notify: bool = False,
    reload_handler: Callable[[], Handler] | None = None,
    **options: Any,
) -> int:
    """Serve `handler` on a new event loop until stopped; return the exit status.

    `loop` is "auto" (uvloop when it imports), "asyncio" or "uvloop"; the other
    options are those of `Server`. `on_start(server)` is called once the server
    accepts. Errors from binding (OSError) propagate.

    In the main thread, SIGINT, SIGTERM and SIGQUIT are handled from before the
    server binds until after its event loop is closed (and so before `on_start`
    is called); the handlers only record the signal, and the serving loop acts
    on it. SIGINT or SIGTERM stops the server gracefully (replies owed are
    flushed within shutdown_timeout); a second one, or SIGQUIT, aborts the
    connections left at once. Either way `run` then returns 0. A signal that
    comes before the server is announced stops it before it is: `on_start` is
    not called, and for SIGINT `run` raises KeyboardInterrupt, as Ctrl-C does
    before anything runs. Once a stop signal has come, SIGINT, SIGTERM and
    SIGQUIT stay ignored after `run` returns, so that a repeat cannot kill the
    process on its way out; otherwise the previous handlers are put back.
    Outside the main thread no signal is handled and it serves until the
    server is stopped from inside.

    With `workers` above 1 (main thread only), this process binds the sockets,
    calls `on_start` with a Server describing them, and supervises that many
    forked worker processes serving them (see `aioserver.workers.supervise`):
    SIGINT or SIGTERM stops every worker gracefully, a second one (or SIGQUIT)
    at once. It returns 0 once they have all stopped cleanly, 1 if any worker
    failed or was killed during the stop. SIGHUP reloads: as many fresh workers
    start, each serving `reload_handler()` (called in the worker, after the
    fork: it imports the handler anew; without it, `handler`), and once they
    all accept the old ones stop gracefully; if a fresh worker cannot start
    (`reload_handler` raised), the old ones serve on. With one process SIGHUP
    is logged and ignored: reloading needs workers.

    Sockets bound already: with `inherit`, those a service manager passed by
    socket activation (LISTEN_FDS and LISTEN_PID naming this process; the
    LISTEN_* variables are unset either way), and the descriptors in `fds`.
    If there are any, they are served (by every worker, with `workers`)
    instead of binding host, port or unix. A descriptor that is not a
    listening stream socket raises `aioserver.sockets.InheritedSocketError`.

    With `notify` and NOTIFY_SOCKET set (the variable is then unset), the
    service manager is told READY=1 with a STATUS= line once the server
    accepts (with workers: once every worker accepts), and STOPPING=1 as a stop
    begins; with workers, RELOADING=1 as a reload begins and READY=1 again
    once it ended; see aioserver/notify.py.

    The `metrics` option may be an `aioserver.metrics.MetricsExporter`
    started already (as `--metrics` makes): the serving process, or each
    worker once forked, updates its `recorder()`, and the supervisor tells it
    of each worker that exits.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    handed = _handed_over(fds, inherit)
    if handed:
        for name in BIND_OPTIONS:
            if name != "backlog":
                options.pop(name, None)
        options["sockets"] = handed
    notifier = Notifier.from_environ() if notify else None
    try:
        return _run(handler, loop, on_start, workers, options, notifier, reload_handler)
    finally:
        if notifier is not None:
            notifier.stopping()
            notifier.close()


def _handed_over(fds: Sequence[int], inherit: bool) -> list[socket.socket]:
    """The sockets handed over to serve on: socket activation's, then `fds`."""
    names = os.environ.get("LISTEN_FDNAMES", "")
    activated = (inherited_sockets() if inherit else None) or []
    try:
        given = sockets_from_fds(fd for fd in fds if fd not in {s.fileno() for s in activated})
    except BaseException:
        for sock in activated:
            sock.close()
        raise
    if activated:
        labels = names.split(":") if names else []
        described = [
            f"fd {sock.fileno()}" + (f" ({labels[i]})" if i < len(labels) else "")
            for i, sock in enumerate(activated)
        ]
        logger.info("Socket activation: serving %s", ", ".join(described))
    return activated + given


def _run(
    handler: Handler,
    loop: str,
    on_start: Callable[[Server], object] | None,
    workers: int,
    options: dict[str, Any],
    notifier: Notifier | None,
    reload_handler: Callable[[], Handler] | None = None,
) -> int:
    if notifier is not None:
        on_start = _notifying(on_start, notifier, workers)
    if threading.current_thread() is not threading.main_thread():
        if workers != 1:
            raise RuntimeError("worker processes are supervised from the main thread only")
        _serve(handler, loop, on_start, options, None, worker=False, notifier=notifier)
        return 0
    inbox = SignalInbox(SERVER_INBOX_SIGNALS if workers == 1 else SUPERVISOR_SIGNALS)
    inbox.install()
    try:
        if workers == 1:
            served = _serve(
                handler, loop, on_start, options, inbox, worker=False, notifier=notifier
            )
            status = 0
        else:
            served, status = _supervise(
                handler, loop, on_start, workers, options, inbox, notifier, reload_handler
            )
    finally:
        inbox.close(keep_ignoring=inbox.stop_received())
    if not served and signal.SIGINT in inbox.received:
        raise KeyboardInterrupt
    return status


def _notifying(
    on_start: Callable[[Server], object] | None, notifier: Notifier, workers: int
) -> Callable[[Server], object]:
    """`on_start`, then READY=1 (alone) or a STATUS= line (the supervisor, whose
    READY=1 waits for the workers)."""

    def announce(server: Server) -> None:
        if on_start is not None:
            on_start(server)
        serving = f"serving on {', '.join(server.addresses)}"
        if workers == 1:
            notifier.ready(serving)
        else:
            notifier.status(f"starting {workers} workers")

    return announce


def _serve(
    handler: Handler,
    loop: str,
    on_start: Callable[[Server], object] | None,
    options: dict[str, Any],
    inbox: SignalInbox | None,
    *,
    worker: bool,
    notifier: Notifier | None = None,
) -> bool:
    """Serve in this process until stopped; whether the server was announced.
    The loop is closed on return, the inbox still installed."""
    factory = loop_factory(loop)
    server = Server(handler, **_with_recorder(options))
    on_stop = notifier.stopping if notifier is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(
            _serve_until_stopped(server, on_start, inbox, _StopPolicy(worker, on_stop))
        )


def _with_recorder(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with a MetricsExporter under "metrics" replaced by the
    ServerMetrics this process updates (in a worker: made once forked)."""
    exporter = options.get("metrics")
    if isinstance(exporter, MetricsExporter):
        return {**options, "metrics": exporter.recorder()}
    return options


def _supervise(
    handler: Handler,
    loop: str,
    on_start: Callable[[Server], object] | None,
    workers: int,
    options: dict[str, Any],
    inbox: SignalInbox,
    notifier: Notifier | None = None,
    reload_handler: Callable[[], Handler] | None = None,
) -> tuple[bool, int]:
    """Bind (or take the sockets handed over), announce and supervise the
    workers: (announced, exit status)."""
    loop_factory(loop)  # an unknown or missing loop fails here, once
    bind = {name: options.pop(name) for name in BIND_OPTIONS if name in options}
    handed: list[socket.socket] = options.pop("sockets", [])
    exporter = options.get("metrics")
    if not isinstance(exporter, MetricsExporter):  # a plain ServerMetrics is one process's
        exporter = None
    sockets = list(handed) or bind_sockets(**bind)
    try:
        described = Server(handler, sockets=sockets, **{**options, "metrics": None})
        if inbox.stop_received():  # while binding: nothing announced, nothing forked
            logger.info("Stopped")
            return False, 0
        if on_start is not None:
            on_start(described)

        def serve_worker(
            inherited: list[Any], worker_inbox: SignalInbox, ready: Callable[[], None]
        ) -> int:
            worker_options = {**options, "sockets": inherited}
            _serve(handler, loop, lambda _: ready(), worker_options, worker_inbox, worker=True)
            return 0

        def serve_reloaded(
            inherited: list[Any], worker_inbox: SignalInbox, ready: Callable[[], None]
        ) -> int:
            fresh = handler
            if reload_handler is not None and not worker_inbox.stop_received():
                try:
                    fresh = reload_handler()
                except Exception as error:
                    raise WorkerStartError(str(error)) from None
            worker_options = {**options, "sockets": inherited}
            _serve(fresh, loop, lambda _: ready(), worker_options, worker_inbox, worker=True)
            return 0

        serving = f"serving on {', '.join(described.addresses)}, {workers} workers"

        def all_ready() -> None:
            if notifier is not None:
                notifier.ready(serving)

        def stopping() -> None:
            if notifier is not None:
                notifier.stopping()

        def reloading() -> None:
            if notifier is not None:
                notifier.reloading(f"reloading: starting {workers} new workers")

        def reloaded(failure: str | None) -> None:
            if notifier is not None:
                failed = f"; reload failed: {failure}" if failure is not None else ""
                notifier.ready(serving + failed)

        status = supervise(
            workers,
            sockets,
            serve_worker,
            signals=inbox,
            on_ready=all_ready,
            on_stopping=stopping,
            reload_worker=serve_reloaded,
            on_reloading=reloading,
            on_reloaded=reloaded,
            on_worker_exit=exporter.worker_exited if exporter is not None else None,
        )
        return True, status
    finally:
        for sock in sockets:
            sock.close()
        if bind.get("unix") is not None and not handed:
            with contextlib.suppress(OSError):
                os.unlink(bind["unix"])


class _StopPolicy:
    """What the stop signals have asked of a server process so far.

    Alone: SIGINT or SIGTERM stops gracefully, the second one at once. As a
    worker: SIGINT or SIGTERM stops gracefully and repeats are ignored (under
    systemd's KillMode=control-group each worker gets SIGTERM from systemd and
    from its supervisor: both mean the same stop). SIGQUIT stops at once.
    """

    def __init__(self, worker: bool, on_stop: Callable[[], object] | None = None) -> None:
        self.worker = worker
        self.on_stop = on_stop  # called once, as the stop begins
        self.stop = False  # stop gracefully
        self.at_once = False  # ... and abort the connections left

    def note(self, signums: Iterable[int]) -> None:
        for signum in signums:
            self._note(signum)

    def _note(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == RELOAD_SIGNAL:
            # The default action would end the process: serve on instead.
            if self.worker:
                logger.info("%s received: ignored (the supervisor reloads)", name)
            else:
                logger.warning("%s received: ignored (reloading needs --workers)", name)
            return
        if signum in SERVER_SIGNALS and not self.stop and self.on_stop is not None:
            self.on_stop()
        if signum == QUICK_STOP_SIGNAL:
            if not self.at_once:
                logger.warning("%s received: closing every connection now", name)
            self.stop = self.at_once = True
        elif signum in STOP_SIGNALS:
            if not self.stop:
                self.stop = True
                then = "SIGQUIT stops at once" if self.worker else "send it again to stop at once"
                logger.info("%s received: stopping (%s)", name, then)
            elif self.worker:
                logger.info("%s received again: already stopping (SIGQUIT stops at once)", name)
            elif not self.at_once:
                self.at_once = True
                logger.warning("%s received again: closing every connection now", name)


async def _serve_until_stopped(
    server: Server,
    on_start: Callable[[Server], object] | None,
    inbox: SignalInbox | None,
    policy: _StopPolicy,
) -> bool:
    """Start, announce, serve until a stop; whether the server was announced."""
    if inbox is None:
        await server.start()
        if on_start is not None:
            on_start(server)
        await server.serve_forever()
        return True
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    loop.add_reader(inbox.fileno(), wake.set)
    try:
        policy.note(inbox.take())
        if policy.stop:  # before it started: nothing to serve
            await server.stop()
            return False
        await server.start()
        policy.note(inbox.take())
        announced = not policy.stop
        if announced and on_start is not None:
            try:
                on_start(server)
            except BaseException:
                await server.stop()
                raise
        await _serve_until_signalled(server, inbox, policy, wake)
        return announced
    finally:
        loop.remove_reader(inbox.fileno())


async def _serve_until_signalled(
    server: Server, inbox: SignalInbox, policy: _StopPolicy, wake: asyncio.Event
) -> None:
    """The state machine of a server process: serving -> stopping -> [aborting]
    -> stopped, driven by the signals in `inbox` (`wake` is set when one waits).
    A stop from inside (`server.stop()`) ends it too."""
    serving = asyncio.create_task(server.serve_forever())
    stopping: asyncio.Task[None] | None = None
    aborted = False
    while True:
        policy.note(inbox.take())
        if policy.stop and stopping is None:
            stopping = asyncio.create_task(server.stop())
            # Let the stop begin, so that a cancellation lands inside it.
            await asyncio.sleep(0)
        if policy.at_once and stopping is not None and not aborted:
            aborted = True
            stopping.cancel()  # a cancelled stop resets every connection left
        if serving.done():
            break
        wake.clear()
        waiter = asyncio.create_task(wake.wait())
        try:
            await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
    if stopping is not None:
        await asyncio.wait({stopping})
        if not stopping.cancelled():
            stopping.result()
    serving.result()
