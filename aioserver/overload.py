"""Overload: clients turned away over `max_connections` or for want of file
descriptors, logged once per burst, and the descriptors a server can count on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import Server

__all__ = [
    "ACCEPT_OUT_OF_RESOURCES",
    "TURN_AWAY_BURST_GAP",
    "AcceptGuard",
    "TurnedAway",
    "free_fds",
]

logger = logging.getLogger("aioserver")

# A burst of clients turned away (one warning as it starts, one line summing it
# up) ends after this long without one: longer than the 1 s asyncio's loop waits
# to accept again when out of descriptors, so that pause does not split a burst.
TURN_AWAY_BURST_GAP = 2.0
# What asyncio's selector loop tells its exception handler when accept() fails
# for want of descriptors or memory; it then stops accepting for a second.
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"


class TurnedAway:
    """Clients turned away, logged once per burst: a warning as it starts, and a
    line with the count when TURN_AWAY_BURST_GAP passes without another."""

    def __init__(self) -> None:
        self.count = 0
        self.started = self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def add(self, loop: asyncio.AbstractEventLoop, count: int, reason: str) -> None:
        self.count += count
        self.last = loop.time()
        if self.timer is None:
            logger.warning("Turning clients away: %s", reason)
            self.started = self.last
            self.timer = loop.call_later(TURN_AWAY_BURST_GAP, self.end)

    def end(self, *, final: bool = False) -> None:
        if self.timer is None:
            return
        self.timer.cancel()
        if not final and self.timer.when() < self.last + TURN_AWAY_BURST_GAP:
            self.timer = asyncio.get_running_loop().call_at(
                self.last + TURN_AWAY_BURST_GAP, self.end
            )
            return
        self.timer = None
        if self.count:
            logger.info("Turned away %d client(s) in %.1f s", self.count, self.last - self.started)
        self.count = 0


class AcceptGuard:
    """Out of file descriptors, asyncio's selector loop reports every failed
    accept to the loop's exception handler (with a traceback), leaves the clients
    waiting, and stops accepting for a second. Installed as that handler for the
    server's life, this turns those clients away at once instead, as libuv does
    for uvloop: it frees a reserve descriptor, accepts and closes every waiting
    client with it, and counts them. Everything else goes to the handler it wraps.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.previous = self.loop.get_exception_handler()
        self.reserve: int | None = _open_reserve()
        # The loop's retry of a stopped server's listener fails: drop that too.
        self.retry_due = 0.0
        self.loop.set_exception_handler(self.handle)

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = context.get("message", "")
        listener = context.get("socket")
        fd = listener.fileno() if listener is not None else -1
        error = context.get("exception")
        if message == ACCEPT_OUT_OF_RESOURCES and fd in {s.fileno() for s in self.server.sockets}:
            self.retry_due = loop.time() + 1.0
            count = self.turn_away_waiting(fd)
            self.server.count_turned_away(count, f"cannot accept: {error}", kind="out_of_fds")
            return
        if self.server.stopping and isinstance(error, ValueError) and "_start_serving" in message:
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def turn_away_waiting(self, fd: int) -> int:
        if self.reserve is None:
            return 0
        os.close(self.reserve)
        listener = socket.socket(fileno=fd)
        count = 0
        try:
            for _ in range(self.server.backlog):
                try:
                    client, _address = listener.accept()
                except OSError:  # BlockingIOError once none is waiting
                    break
                client.close()
                count += 1
        finally:
            listener.detach()
            self.reserve = _open_reserve()
        return count

    def remove(self) -> None:
        if self.reserve is not None:
            os.close(self.reserve)
            self.reserve = None
        if self.loop.time() < self.retry_due:
            self.loop.call_at(self.retry_due + 0.1, self.remove)
        elif self.loop.get_exception_handler() == self.handle:
            self.loop.set_exception_handler(self.previous)


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def free_fds() -> int | None:
    """How many more descriptors this process may open, or None where unknown."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        names = os.listdir("/proc/self/fd")
    except (ImportError, OSError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    # The limit caps descriptor numbers, not their count; the listing counts the
    # descriptor it was read through.
    return soft - sum(1 for name in names if int(name) < soft) + 1
