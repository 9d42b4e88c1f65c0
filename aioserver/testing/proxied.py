"""One proxied connection: a client's connection carried to the service, each way
through its faults.

`_Proxied` connects to the service and runs a `_Direction` each way. A direction
reads its source as data comes, records each chunk and hands it to a
`_ProxyLink`: the `_Link` (faults.py) that paces a test server's replies (delay,
bandwidth, slicing, close after a number of bytes), fed by `_Pacing`
(proxy_faults.py), which reads the direction's `ProxyFaults` in the link's
terms. The faults that drop data (timeout, reset_peer) act before the link; an
EOF goes through the link after the data before it, slow_close later.
`_Proxied.finish` ends the connection once, closing (or resetting) both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

from ..protocols import READ_CHUNK
from .faults import Faults, _Link
from .proxy_faults import ProxyFaults, _Pacing, _vary
from .proxy_recording import ProxyEnding, _ProxyLive, _ProxyRecording
from .recording import _Live, _Recording

# Bytes a direction may hold back (latency, bandwidth, slicer) before the proxy
# stops reading its source until they are sent: the source is then slowed by TCP.
HIGH_WATER = 256 * 1024


class _Tap:
    """Stands in for the recording of a direction's `_Link`: what it sends is
    recorded in `field` ("to_service" or "to_client")."""

    def __init__(self, recording: _ProxyRecording, field: str) -> None:
        self._recording = recording
        self._field = field

    def sent(self, live: _ProxyLive, data: bytes) -> None:
        self._recording.add(live, self._field, data)


class _ProxyLink(_Link):
    """A `_Link` carrying one direction to its destination's writer; its close by
    limit_data closes the whole proxied connection."""

    def __init__(
        self,
        proxied: _Proxied,
        faults: ProxyFaults,
        field: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        super().__init__(
            cast(_Recording, _Tap(proxied.recording, field)),
            cast(_Live, proxied.live),
            cast(Faults, _Pacing(faults)),
            reader,
            writer,
            READ_CHUNK,
        )
        self.proxied = proxied

    def close_by_fault(self) -> None:
        super().close_by_fault()
        self.proxied.finish(ProxyEnding.CLOSED_BY_FAULT)


class _Direction:
    """One direction of a proxied connection: reads its source, passes data on
    through its link, applies the faults that drop data."""

    def __init__(
        self,
        proxied: _Proxied,
        source: str,
        faults: ProxyFaults,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proxied = proxied
        self.source = source  # "client" or "service"
        self.destination = "service" if source == "client" else "client"
        self.faults = faults
        self.reader = reader
        self.received = f"from_{source}"
        self.link = _ProxyLink(proxied, faults, f"to_{self.destination}", reader, writer)
        self.timer: asyncio.TimerHandle | None = None
        self.done = False  # the source's EOF was passed on (or dropped)

    async def pump(self) -> None:
        proxied = self.proxied
        while True:
            try:
                data = await self.reader.read(READ_CHUNK)
            except OSError as error:  # reset, or gone
                proxied.lost(self.source, error)
                return
            if not data:
                break
            self.carry(data)
            try:
                await self.pace()
            except OSError as error:
                proxied.lost(self.destination, error)
                return
        if proxied.ending is not None:
            return
        proxied.first_eof = proxied.first_eof or self.source
        if not self.dropping():
            slow_close = self.faults.slow_close
            if slow_close > 0:
                self.link.queue(None, slow_close)
            else:
                self.link.write_eof()
            await self.link.flushed()
        self.done = True
        proxied.check_done()

    def carry(self, data: bytes) -> None:
        proxied = self.proxied
        proxied.recording.add(proxied.live, self.received, data)
        if proxied.ending is not None or self.dropping():
            return
        faults, link = self.faults, self.link
        size, variation = faults.slice_size, faults.slice_variation
        if size is not None and variation > 0:
            for piece in _vary(data, size, variation):
                link.write(piece)
        else:
            link.write(data)

    def dropping(self) -> bool:
        """Whether reset_peer or timeout drops what arrives now (arming them)."""
        faults = self.faults
        reset_peer, timeout = faults.reset_peer, faults.timeout
        if reset_peer is not None:
            if reset_peer <= 0:
                self.proxied.reset_by_fault()
            elif self.timer is None:
                self.timer = self.link.loop.call_later(reset_peer, self.proxied.reset_by_fault)
            return True
        if timeout is not None:
            self.arm_timeout(timeout)
            return True
        if self.timer is not None:  # the timeout was switched off: data flows again
            self.timer.cancel()
            self.timer = None
        return False

    def arm_timeout(self, timeout: float) -> None:
        if timeout > 0 and self.timer is None:
            self.timer = self.link.loop.call_later(timeout, self.timed_out)

    def timed_out(self) -> None:
        self.timer = None
        if self.faults.timeout is not None:
            self.proxied.finish(ProxyEnding.CLOSED_BY_FAULT)

    async def pace(self) -> None:
        """Wait while too much is held back, or the destination is not taking it."""
        link = self.link
        if link.outbox and sum(len(data or b"") for _, data in link.outbox) > HIGH_WATER:
            await link.flushed()
        if not link.dead:
            await link.inner_writer.drain()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.link.discard()


class _Proxied:
    """One client's connection, carried to the service over a connection of its own."""

    def __init__(
        self,
        recording: _ProxyRecording,
        live: _ProxyLive,
        upstream: ProxyFaults,
        downstream: ProxyFaults,
    ) -> None:
        self.recording = recording
        self.live = live
        self.upstream_faults = upstream
        self.downstream_faults = downstream
        self.ending: ProxyEnding | None = None
        self.error: BaseException | None = None
        self.first_eof: str | None = None
        self.finished = asyncio.Event()
        self.directions: list[_Direction] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def run(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        address: tuple[str, int],
        connect_timeout: float,
    ) -> None:
        self.writers.append(client_writer)
        try:
            try:
                async with asyncio.timeout(connect_timeout):
                    service_reader, service_writer = await asyncio.open_connection(*address)
            except TimeoutError:
                raise TimeoutError(
                    f"connect to {address[0]}:{address[1]} timed out after {connect_timeout:g} s"
                ) from None
        except OSError as error:  # refused, unreachable, timed out, a name not found
            self.finish(ProxyEnding.UPSTREAM_FAILED, error)
            self.recording.finish(self.live, ProxyEnding.UPSTREAM_FAILED, error)
            return
        except asyncio.CancelledError:
            self.finish(ProxyEnding.PROXY_STOPPED)
            self.recording.finish(self.live, ProxyEnding.PROXY_STOPPED, None)
            raise
        self.writers.append(service_writer)
        upstream = _Direction(self, "client", self.upstream_faults, client_reader, service_writer)
        downstream = _Direction(
            self, "service", self.downstream_faults, service_reader, client_writer
        )
        self.directions = [upstream, downstream]
        for direction in self.directions:
            if direction.faults.timeout is not None:
                direction.arm_timeout(direction.faults.timeout)
        loop = asyncio.get_running_loop()
        pumps = [loop.create_task(direction.pump()) for direction in self.directions]
        try:
            await self.finished.wait()
        finally:
            self.finish(ProxyEnding.PROXY_STOPPED)  # when cancelled: stopping
            for task in pumps:
                task.cancel()
            await asyncio.wait(pumps)
            failed = [t.exception() for t in pumps if not t.cancelled() and t.exception()]
            if failed:
                self.ending, self.error = ProxyEnding.PROXY_FAILED, failed[0]
            with contextlib.suppress(Exception):
                await service_writer.wait_closed()
            ending = cast(ProxyEnding, self.ending)
            self.recording.finish(self.live, ending, self.error)
        if failed:
            raise cast(BaseException, failed[0])  # aioserver.Server logs it

    # The ways to end, each closing (or resetting) both sides once.

    def check_done(self) -> None:
        """After an EOF was passed on: both sides closed, the connection ends."""
        if all(direction.done for direction in self.directions):
            first = self.first_eof
            self.finish(
                ProxyEnding.CLIENT_CLOSED if first == "client" else ProxyEnding.SERVICE_CLOSED
            )

    def lost(self, side: str, error: BaseException) -> None:
        """A side reset (or failed): reset the other side."""
        ending = ProxyEnding.CLIENT_RESET if side == "client" else ProxyEnding.SERVICE_RESET
        self.finish(ending, error, reset="service" if side == "client" else "client")

    def reset_by_fault(self) -> None:
        self.finish(ProxyEnding.RESET_BY_FAULT, reset="both")

    def finish(
        self, ending: ProxyEnding, error: BaseException | None = None, reset: str = ""
    ) -> None:
        """End: drop what is held back, close both sides (or reset `reset`:
        "client", "service" or "both"). Only the first call counts."""
        if self.ending is not None:
            return
        self.ending, self.error = ending, error
        for direction in self.directions:
            direction.stop()
        for direction in self.directions:
            link = direction.link
            if reset in ("both", direction.destination) and not link.inner_writer.is_closing():
                link.reset()  # SO_LINGER 0 and abort: an RST
        for writer in self.writers:
            writer.close()
        self.finished.set()
