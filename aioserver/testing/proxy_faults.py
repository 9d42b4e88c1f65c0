"""The faults of one direction of a `FaultProxy`, and how a `_Link` reads them.

`ProxyFaults` holds the switches of one direction (Toxiproxy's toxics), aimed at
connections by an `Aim`. `_Pacing` shows them to a `_Link` (faults.py) as a test
server's `Faults`, so that the code that paces a test server's replies paces a
proxied direction too; `_vary` cuts the pieces of a slicer with a variation.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, cast

from .faults import Aim, Faults, _check_count, _check_seconds, _count, _seconds, _Setting, _Switches


def _check_optional_seconds(name: str, value: float | None) -> float | None:
    return None if value is None else _check_seconds(name, value)


def _check_variation(name: str, value: int) -> int:
    if value is None:
        raise ValueError(f"{name} must be an integer >= 0, not None")
    return cast(int, _check_count(name, value))


class ProxyFaults(_Switches):
    """The faults of one direction of a `FaultProxy`; change them at any time, from any thread.

    `proxy.upstream` carries client -> service, `proxy.downstream` service ->
    client. Times are in seconds and sizes in bytes (Toxiproxy's are in
    milliseconds and KB). Each setting is read when data arrives, so a change
    applies from the next chunk on, to connections already open too:

    - latency, jitter: every chunk waits latency +/- jitter (drawn uniformly per
      chunk, never below 0) before it is passed on; order is kept.
    - bandwidth: bytes per second at most (paced in pieces of 1/50 s worth);
      None: unlimited.
    - slice_size, slice_variation, slice_delay: each chunk is passed on in pieces
      of slice_size bytes (+/- slice_variation, drawn per piece), slice_delay
      apart; slice_size None: not split.
    - timeout: data is dropped, and the connection is closed (both sides) this
      many seconds later; 0: dropped and never closed, a hung connection. Counted
      from the accept when on then, else from the first chunk dropped. An EOF is
      dropped too; switched off before it fires, data flows again.
    - limit_data: once this many bytes were passed on in this direction (from
      the connection's start), the connection is closed (both sides): the
      receiver gets exactly those bytes, then EOF. 0: closed at the first data.
    - reset_peer: when data arrives it is dropped, and this many seconds later
      (0: at once) both sides are reset (RST); None: off.
    - slow_close: seconds between the source's EOF and the EOF passed on.

    `connections` (an `Aim`, by default `Aim.all()`) says which connections
    these faults apply to, decided once per connection at its accept and
    counted from when it was set; a connection missed gets none of this
    direction's faults. The record of a connection names the faults that were
    on for it (`ProxyRecord.upstream_faults`, `downstream_faults`).
    """

    __slots__ = (
        "_bandwidth",
        "_jitter",
        "_latency",
        "_limit_data",
        "_reset_peer",
        "_slice_delay",
        "_slice_size",
        "_slice_variation",
        "_slow_close",
        "_timeout",
    )
    # The switches, each checked when set (kept in the slots above).
    latency = _seconds()
    jitter = _seconds()
    bandwidth = _count(least=1)
    slice_size = _count(least=1)
    slice_variation = _Setting(_check_variation)
    slice_delay = _seconds()
    timeout = _Setting(_check_optional_seconds)
    limit_data = _count()
    reset_peer = _Setting(_check_optional_seconds)
    slow_close = _seconds()
    # The faults, by name, in the order repr shows them, with their "off" values.
    _off: ClassVar[dict[str, object]] = {
        "latency": 0.0,
        "jitter": 0.0,
        "bandwidth": None,
        "slice_size": None,
        "slice_variation": 0,
        "slice_delay": 0.0,
        "timeout": None,
        "limit_data": None,
        "reset_peer": None,
        "slow_close": 0.0,
    }

    def __init__(
        self,
        *,
        latency: float = 0.0,
        jitter: float = 0.0,
        bandwidth: int | None = None,
        slice_size: int | None = None,
        slice_variation: int = 0,
        slice_delay: float = 0.0,
        timeout: float | None = None,
        limit_data: int | None = None,
        reset_peer: float | None = None,
        slow_close: float = 0.0,
        connections: Aim | None = None,
    ) -> None:
        super().__init__()
        self.latency = latency
        self.jitter = jitter
        self.bandwidth = bandwidth
        self.slice_size = slice_size
        self.slice_variation = slice_variation
        self.slice_delay = slice_delay
        self.timeout = timeout
        self.limit_data = limit_data
        self.reset_peer = reset_peer
        self.slow_close = slow_close
        self.connections = connections if connections is not None else Aim.all()

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name, off in self._off.items()
            if getattr(self, name) != off
        )
        aim = "" if self.connections == Aim.all() else f"connections={self.connections!r}"
        return f"ProxyFaults({', '.join(part for part in (shown, aim) if part)})"


# What a direction that the aim missed gets: no fault at all.
_NO_FAULTS = ProxyFaults()
# A test server's faults, all off: what `_Pacing` answers for a fault it does not map.
_LINK_OFF = Faults()


class _Pacing:
    """One direction's `ProxyFaults` as a `_Link` reads its `Faults`.

    latency +/- jitter is the link's delay (drawn at each read, so per chunk),
    limit_data its close_after; slow_close is applied by `_Direction` to the EOF
    (the link's own slow_close acts on closing, which a proxy does not do); any
    other fault a link asks for reads as off.
    """

    def __init__(self, faults: ProxyFaults) -> None:
        self._faults = faults

    @property
    def delay(self) -> float:
        faults = self._faults
        if faults.jitter <= 0:
            return faults.latency
        return max(0.0, faults.latency + random.uniform(-faults.jitter, faults.jitter))

    @property
    def bandwidth(self) -> int | None:
        return self._faults.bandwidth

    @property
    def slice_size(self) -> int | None:
        # With a variation, `_Direction.carry` cuts the pieces, each at most this.
        size = self._faults.slice_size
        return None if size is None else size + self._faults.slice_variation

    @property
    def slice_delay(self) -> float:
        return self._faults.slice_delay

    @property
    def close_after(self) -> int | None:
        return self._faults.limit_data

    def __getattr__(self, name: str) -> Any:
        return getattr(_LINK_OFF, name)


def _vary(data: bytes, size: int, variation: int) -> list[bytes]:
    """`data` cut into pieces of size +/- variation bytes (at least 1 each)."""
    pieces = []
    start = 0
    while start < len(data):
        step = max(1, size + random.randint(-variation, variation))
        pieces.append(data[start : start + step])
        start += step
    return pieces
