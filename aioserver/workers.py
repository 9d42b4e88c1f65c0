"""Several worker processes serving the same listening sockets.

The supervisor binds the sockets once, with `aioserver.sockets.bind_sockets` (so
a port in use fails at once, in one place, and port 0 gives every worker the
same real port), then forks the workers, which inherit them and each run their
own event loop and `Server`.
The kernel hands each new connection to one worker waiting in accept. The
supervisor restarts a worker that dies, forwards SIGINT and SIGTERM to all of
them so each stops through the usual cancellation path, and exits when they
have.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["supervise"]

logger = logging.getLogger("aioserver")

# A worker that dies sooner than this after its start is restarted only after
# this long, so a worker that cannot start does not spin the supervisor.
RESTART_BACKOFF = 1.0
# linux/prctl.h
PR_SET_PDEATHSIG = 1


def supervise(
    workers: int,
    sockets: list[socket.socket],
    serve_worker: Callable[[list[socket.socket]], Any],
) -> int:
    """Run `workers` forked processes, each calling `serve_worker(sockets)`.

    Returns 0 once every worker has exited after a SIGINT or SIGTERM to the
    supervisor, or 1 if any of them exited with a failure then. A worker that
    dies while serving is replaced. A second signal is forwarded too, which
    makes the workers abort their remaining connections.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    stopping = False
    supervisor = os.getpid()
    children: dict[int, float] = {}  # pid -> start time

    def start_one() -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                _become_worker(supervisor)
                serve_worker(sockets)
                code = 0
            except BaseException:
                logger.exception("Worker %d failed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = time.monotonic()
        logger.info("Started worker %d", pid)

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed = False
    try:
        for _ in range(workers):
            start_one()
        while children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            started = children.pop(pid, None)
            if started is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                failed = failed or code != 0
                continue
            logger.warning("Worker %d exited (%s); starting another", pid, _describe_exit(code))
            if time.monotonic() - started < RESTART_BACKOFF:
                time.sleep(RESTART_BACKOFF)
            if not stopping:
                start_one()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for sock in sockets:
            sock.close()
    logger.info("Stopped")
    return 1 if failed else 0


def _become_worker(supervisor: int) -> None:
    # A Ctrl-C in a terminal signals the whole process group: keep the workers
    # out of it so that each gets exactly one signal, the supervisor's.
    os.setpgid(0, 0)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    # Should the supervisor die (even by SIGKILL), Linux sends this worker
    # SIGTERM, and it stops as usual instead of serving on as an orphan.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before prctl took effect
        os._exit(0)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
