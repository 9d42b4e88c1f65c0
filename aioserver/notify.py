"""Readiness for a service manager: systemd's notification protocol, sd_notify(3).

With `Type=notify`, systemd sets NOTIFY_SOCKET to the address of a datagram
socket (a path, or "@name" in Linux's abstract namespace) and waits for the
service to send `READY=1` there before it counts the service as started (and
starts the units ordered after it). `STATUS=...` is shown by `systemctl status`;
`STOPPING=1` says a stop has begun. `RELOADING=1` (with MONOTONIC_USEC=, as
Type=notify-reload requires) says a reload has begun; `READY=1` again ends it.

A `Notifier` sends these from a non-blocking datagram socket of its own and
never raises into the server: a message that cannot be sent (no one listening,
a full queue) is dropped, and the first such failure is logged as one warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import MutableMapping

__all__ = ["NOTIFY_VARIABLE", "Notifier"]

logger = logging.getLogger("aioserver")

NOTIFY_VARIABLE = "NOTIFY_SOCKET"


class Notifier:
    """Sends sd_notify messages to `address` (a path, or "@name" for an abstract
    socket). Each call sends one datagram; none blocks or raises."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ready_sent = False
        self.stopping_sent = False
        self._socket: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier | None:
        """A notifier for NOTIFY_SOCKET, or None when it is not set. With `unset`
        (the default) the variable is removed from `environ` (os.environ by
        default), as sd_notify(unset_environment=1) does, so that programs this
        process starts do not send as the service."""
        env = os.environ if environ is None else environ
        address = env.get(NOTIFY_VARIABLE, "")
        if unset:
            env.pop(NOTIFY_VARIABLE, None)
        if not address:
            return None
        return cls(address)

    def send(self, *lines: str) -> bool:
        """Send `lines` (such as "READY=1") as one message; whether it was sent."""
        message = "".join(f"{line}\n" for line in lines).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message, _sockaddr(self.address))
        except (OSError, ValueError) as error:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "Cannot notify the service manager at %s=%s: %s",
                    NOTIFY_VARIABLE,
                    self.address,
                    error,
                )
            return False
        return True

    def ready(self, status: str) -> None:
        """READY=1 with a status line, once."""
        if not self.ready_sent:
            self.ready_sent = True
            self.send("READY=1", f"STATUS={status}")

    def reloading(self, status: str) -> None:
        """RELOADING=1 with the time and a status line; the next `ready` sends
        READY=1 again, which ends the reload."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")
        self.ready_sent = False

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        """STOPPING=1, once."""
        if not self.stopping_sent:
            self.stopping_sent = True
            self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


def _sockaddr(address: str) -> str:
    if address.startswith("@"):
        return "\0" + address[1:]  # Linux's abstract namespace
    if address.startswith("/"):
        return address
    raise ValueError("only a socket path or an abstract @name is supported")
