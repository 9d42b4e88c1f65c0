"""Test servers for integration tests: recorded connections and injected faults.

`TestServer` runs on the event loop of the code that starts it (an async test, an
async fixture); `ThreadedTestServer` runs the same server on its own loop in a
background thread, for synchronous tests and clients that are not asyncio. Both
bind port 0 and are accepting when handed over, so `server.port` is real and no
test sleeps or races for a port.

Every connection is recorded (`ConnectionRecord`: peer, bytes received, bytes sent,
messages, how it ended), and helpers wait for a number of connections, messages or
closed connections with a timeout. `Faults` switches delays, truncation,
half-closes, resets, stalls, bandwidth limits, sliced writes and slow closes on and
off while the server runs, aimed by an `Aim` at every connection, the first n, the
k-th or each with a probability; `refuse_connections()` takes the server down
while keeping its port, `blackhole_connections()` makes connects hang, and
`accept_connections()` brings it back.

`server.expect(match).respond_with(reply)` declares what the server answers to
which message (a server made with handler None answers only so); `server.check()`
raises AssertionError naming unexpected messages, one-shot or ordered expectations
not met and handler errors, with a transcript of the connections involved.

`FaultProxy` (and `ThreadedFaultProxy`) puts the same kind of faults in front of
any TCP service, a real Redis or PostgreSQL as well as a test server: it forwards
each connection to the service and applies the `ProxyFaults` of each direction
(`proxy.upstream`, client -> service; `proxy.downstream`, service -> client):
latency with jitter, bandwidth, slicing, timeout, limit_data, reset_peer and
slow_close, Toxiproxy's toxics, aimed by an `Aim`; each connection is recorded as
a `ProxyRecord` (the bytes each way, before and after the faults, and its
`ProxyEnding`).

Stopping goes through `aioserver.Server.stop()`: the listening socket closes, every
connection task is cancelled and awaited, every socket is closed.
"""

# The modules, by role: recording (ConnectionRecord, Ending, the waits, the
# transcript), faults (Aim, Faults, and the reader and writer that apply them),
# expectations (Expectation, the book of expectations, framing by delimiter),
# listener (the listening aioserver.Server, refusing and listening again on one
# port), lifecycle (_ListeningBase: the state, listener, address, records and
# waits that test servers and fault proxies share), in_loop (_InLoop and
# WrongLoopError: the public methods on the loop that started it), in_thread
# (_Threaded: the same on its own loop in a thread, blocking), base
# (TestServerBase: what both test servers share), server (TestServer, in-loop),
# threaded (ThreadedTestServer, in a thread), proxy_faults (ProxyFaults, one
# direction's faults), proxy_recording (ProxyRecord, ProxyEnding), proxied (one
# proxied connection, carried each way through its faults) and fault_proxy
# (FaultProxy, in-loop, and ThreadedFaultProxy, in a thread). The names imported
# "as" themselves are internal ones that the former single module testing.py
# defined, importable from here as they were; they are not part of the API.
from ..protocols import echo, thanks
from .base import ServerOptions
from .base import _handler_name as _handler_name
from .expectations import Expectation, UnexpectedMessage
from .fault_proxy import DEFAULT_CONNECT_TIMEOUT, FaultProxy, ProxyOptions, ThreadedFaultProxy
from .faults import _LINGER_RESET as _LINGER_RESET
from .faults import Aim, Faults
from .faults import _FaultyWriter as _FaultyWriter
from .faults import _Link as _Link
from .faults import _peer as _peer
from .faults import _RecordingReader as _RecordingReader
from .in_loop import WrongLoopError
from .in_loop import _wrong_loop_message as _wrong_loop_message
from .in_thread import _T as _T
from .lifecycle import DEFAULT_WAIT_TIMEOUT, TEST_SHUTDOWN_TIMEOUT
from .lifecycle import _check_wait as _check_wait
from .listener import _placeholder as _placeholder
from .proxy_faults import ProxyFaults
from .proxy_recording import ProxyEnding, ProxyRecord
from .recording import ConnectionRecord, Ending
from .recording import _Live as _Live
from .recording import _Recording as _Recording
from .server import TestServer
from .threaded import ThreadedTestServer

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_WAIT_TIMEOUT",
    "TEST_SHUTDOWN_TIMEOUT",
    "Aim",
    "ConnectionRecord",
    "Ending",
    "Expectation",
    "FaultProxy",
    "Faults",
    "ProxyEnding",
    "ProxyFaults",
    "ProxyOptions",
    "ProxyRecord",
    "ServerOptions",
    "TestServer",
    "ThreadedFaultProxy",
    "ThreadedTestServer",
    "UnexpectedMessage",
    "WrongLoopError",
    "echo",
    "thanks",
]
