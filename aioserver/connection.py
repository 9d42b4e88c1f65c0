"""One connection's whole life, owned by one object.

    accepted -> [PROXY header] -> [TLS handshake] -> serving -> flushing -> [lingering] -> closed

A `Connection` is the protocol of its transport from the moment
`asyncio.start_server` accepts it to the moment the transport is lost. Every
phase, every deadline and every way of ending lives here: the server only
registers connections, sweeps them for idleness and asks them to end.

- Every phase is bounded. The PROXY header and the TLS handshake share one
  deadline from the accept; serving and flushing end after `idle_timeout`
  without progress in either direction (the server's sweep); lingering and a
  stop have an absolute deadline. A connection holds at most one timer.
- `end(how, reason)` is the one way to end: CLOSE flushes what is owed and
  closes, LINGER flushes, half-closes and waits for the client to close too
  (so that closing with its data unread does not reset away the replies), RESET
  aborts with an RST, so the client can tell that replies were lost.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import enum
import errno
import logging
import math
import socket
import ssl as ssl_module
import sys
from typing import TYPE_CHECKING, Any, cast

from .protocols import READ_CHUNK, THANKS_PREFIX, MessageTooLong, ReplyRule, ThanksRule
from .proxy import ProxyHeaderError, is_trusted, printable, split_header
from .sockets import format_address

if TYPE_CHECKING:
    from .server import Server

__all__ = [
    "LINGER_TIMEOUT",
    "Connection",
    "Ending",
    "Phase",
    "connection_class",
    "describe_error",
    "describe_subject",
]

logger = logging.getLogger("aioserver")

# A client still sending after the server half-closed gets this long of
# silence to notice the EOF before the socket is closed: closing with its data
# unread makes the kernel reset the connection, which destroys the replies on
# their way. nginx's lingering close, with a shorter wait since a stop may wait
# for it.
LINGER_TIMEOUT = 0.5
# Replies buffered for a client before the server stops reading from it: the
# default of both loops' plain transports, and set on the TLS layer's too.
WRITE_BUFFER_HIGH = 64 * 1024
# Decrypted input the TLS layer holds before it stops reading, as a plain
# transport reads once at a time.
TLS_READ_BUFFER_HIGH = 64 * 1024
# A read larger than this is answered by a reply rule a slice at a time, so a
# client that takes no replies makes the server hold at most WRITE_BUFFER_HIGH
# plus one slice's replies (28 x 4 KiB for empty thanks lines), plus the read.
FEED_SLICE = 4 * 1024
# At a stop, a client accepted less than this long ago that has sent nothing
# yet is served until this long after its accept: it connected just as the
# server stopped (an old worker at a reload), and its request is on its way. A
# handler whose client was active lately is cancelled this long after the stop,
# so that a request it was answering gets its reply.
FRESH_GRACE = 0.25
# No deadline; a constant, as float("inf") parses its string on every call.
_NEVER = math.inf
# SO_LINGER on, with a zero timeout: close() sends an RST and drops what is queued.
_RESET_ON_CLOSE = (1).to_bytes(4, sys.byteorder) + (0).to_bytes(4, sys.byteorder)


class Phase(enum.IntEnum):
    """Where a connection is in its life; the order is the order of the phases."""

    ACCEPTED = 0
    """Just accepted; `begin()` moves it on."""
    PROXY = 1
    """Reading the PROXY protocol header, in clear text."""
    TLS = 2
    """The TLS handshake."""
    SERVING = 3
    """The protocol or the handler has the connection."""
    FLUSHING = 4
    """Done serving: sending what is owed, then closing."""
    LINGERING = 5
    """Half-closed: dropping what the client still sends until it closes too."""
    CLOSED = 6
    """The transport is gone; counted and logged."""


# The phases each phase may move to. The transport can be lost in any phase.
NEXT_PHASES: dict[Phase, frozenset[Phase]] = {
    # FLUSHING: a client turned away is told why, then closed.
    Phase.ACCEPTED: frozenset({Phase.PROXY, Phase.TLS, Phase.SERVING, Phase.FLUSHING}),
    # FLUSHING: a client turned away once its header named it (access control).
    Phase.PROXY: frozenset({Phase.TLS, Phase.SERVING, Phase.FLUSHING, Phase.CLOSED}),
    Phase.TLS: frozenset({Phase.SERVING, Phase.CLOSED}),
    Phase.SERVING: frozenset({Phase.FLUSHING, Phase.LINGERING, Phase.CLOSED}),
    Phase.FLUSHING: frozenset({Phase.LINGERING, Phase.CLOSED}),
    Phase.LINGERING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


# The phases as plain names: an enum member's lookup costs ~70 ns on every read.
_ACCEPTED = Phase.ACCEPTED
_PROXY = Phase.PROXY
_TLS = Phase.TLS
_SERVING = Phase.SERVING
_FLUSHING = Phase.FLUSHING
_LINGERING = Phase.LINGERING
_CLOSED = Phase.CLOSED


class Ending(enum.Enum):
    """How a connection is ended."""

    CLOSE = "close"
    """Flush what is owed, then close."""
    LINGER = "linger"
    """Flush, half-close, and drop what the client still sends until it closes
    too or falls silent; used where the client may still be sending."""
    RESET = "reset"
    """Abort with an RST now: whatever is still owed is lost, visibly."""


# The endings as plain names too: Ending.CLOSE goes through the enum class's
# __getattr__ hook on every lookup.
_CLOSE = Ending.CLOSE
_LINGER = Ending.LINGER
_RESET = Ending.RESET


class Connection(asyncio.Protocol):
    """One client, from accept to close. See the module's docstring.

    The subclasses say who answers while serving: a reply rule straight from
    `data_received` (the built-in protocols), or the user's handler through a
    stream reader and writer.
    """

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "deadline",
        "eof_held",
        "handler_cancelled",
        "header",
        "held",
        "inner",
        "loop",
        "opener",
        "origin",
        "peer",
        "phase",
        "proxy_peer",
        "quiet",
        "raw",
        "reader",
        "reason",
        "rule",
        "server",
        "started",
        "stop_at",
        "taken",
        "task",
        "timer",
        "transport",
        "wake",
    )

    def __init__(
        self,
        server: Server,
        writer: asyncio.StreamWriter,
        rule: ReplyRule | None,
        reader: asyncio.StreamReader | None = None,
    ) -> None:
        # Server-wide state.
        self.server = server
        self.loop = server.loop
        # The transport: `raw` is the socket's, `transport` the one replies are
        # written to (the TLS layer's once the handshake is done).
        # uvloop's transports have the Transport methods without subclassing it.
        transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        self.raw = self.transport = transport
        self.rule = rule
        # The writer start_server made closes the transport when collected, so
        # it lives as long as the connection.
        self.origin = writer
        # start_server's protocol, told when the transport is gone (see _finish).
        self.opener = transport.get_protocol()
        # For a user's handler: the reader start_server made, and its protocol.
        self.reader = reader
        self.inner = cast(asyncio.Protocol, self.opener) if reader else None
        # The life.
        self.phase = _ACCEPTED
        self.reason = ""
        self.started = self.loop.time()
        self.task: asyncio.Task[None] | None = None
        self.handler_cancelled = False
        self.wake: asyncio.Future[None] | None = None
        # The one timer, and the absolute deadline it serves (inf: none).
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = _NEVER
        # At a stop, when to stop serving a client accepted just before it.
        self.stop_at = _NEVER
        # Counting. `bytes_out` is what was written; `taken` is how much of it
        # the client was last seen to have taken, for the idle sweep.
        self.bytes_in = self.bytes_out = self.taken = 0
        # Idle sweeps since the last sign of life; cheaper to reset than a clock read.
        self.quiet = 0
        # Fetched now only when it will be logged: memory per connection counts.
        self.peer = _peername(transport) if server.logs_peers else None
        self.proxy_peer: Any = None
        self.header = b""
        # A reply rule's input not answered yet (see RuleConnection), and
        # whether the client's EOF came after it.
        self.held = b""
        self.eof_held = False

    # Phases.

    def _to(self, phase: Phase) -> None:
        if phase not in NEXT_PHASES[self.phase]:
            raise AssertionError(f"connection cannot go from {self.phase.name} to {phase.name}")
        self.phase = phase

    def begin(self) -> None:
        """Start the connection's life, just after accept: the PROXY header
        first if the server wants one, then TLS if on, then serving."""
        server = self.server
        self.raw.set_protocol(self)
        if server.proxy_protocol or server.ssl is not None:
            # The PROXY header and the TLS handshake share one deadline.
            self._arm(self.started + server.handshake_timeout)
            if server.proxy_protocol:
                self._to(_PROXY)
            else:
                self._start_tls(b"")
            return
        # What _serve does besides: no deadline, timer or waiting task yet.
        self._to(_SERVING)

    def turn_away(self, reason: str, last: bytes) -> None:
        """End a connection the server has no room for, just after its accept
        or once its PROXY header named the client: `last` says why, and a
        client that sent first still gets it (see `Ending.LINGER`)."""
        if self.phase is _ACCEPTED:
            self.raw.set_protocol(self)
        else:
            self._disarm()  # the header's deadline is met
            self.deadline = _NEVER
        self.reason = reason
        self._to(_FLUSHING)
        if last:
            self.bytes_out += len(last)
            self.transport.write(last)
            # A client turned away may be sending now.
            self._linger(always=True)
        else:
            self.raw.close()

    def _serve(self) -> None:
        self._to(_SERVING)
        self._disarm()
        self.deadline = _NEVER  # the handshake's is met
        self._wake()

    def _read_header(self, data: bytes) -> None:
        self.header += data
        family = _family(self.raw)
        try:
            found = split_header(self.header, family=family)
        except ProxyHeaderError as error:
            self._refuse_header(str(error))
            return
        if found is None:
            return
        peer, rest = found
        self.header = b""
        source = _peername(self.raw)
        # A TCP client whose address cannot be read is not known to be a balancer.
        known = source is not None or family == socket.AF_UNIX
        if not (known and is_trusted(source, self.server.proxy_trusted)):
            source = format_peer(source)
            self._refuse_header(f"PROXY header from {source}, not a trusted balancer")
            return
        if peer is not None:
            self.proxy_peer = self.peer = peer
            if self.server.checks_clients and not self.server.admit_proxied(self, peer):
                return
        if self.server.ssl is not None:
            # Handshake bytes, not input: counted neither here nor later.
            self.bytes_in -= len(rest)
            self._start_tls(rest)
            return
        self._serve()
        if rest:
            self.bytes_in -= len(rest)  # counted again as served
            self.data_received(rest)

    def _refuse_header(self, why: str) -> None:
        logger.warning("Closed %s: %s", self.describe_peer(), why)
        self.end(_CLOSE, why)

    def _start_tls(self, received: bytes) -> None:
        """Hand the transport to the loop's own TLS protocol, with the bytes
        already received after the PROXY header, and the deadline left."""
        self._to(_TLS)
        self._disarm()
        server = self.server
        waiter: asyncio.Future[None] = self.loop.create_future()
        tls = server.tls_protocol(
            self.loop,
            self,
            server.tls_context(self),
            waiter,
            server_side=True,
            ssl_handshake_timeout=max(self.deadline - self.loop.time(), 0.001),
        )
        self.deadline = float("inf")
        waiter.add_done_callback(self._handshake_done)
        self.raw.set_protocol(tls)
        tls.connection_made(self.raw)
        while received and self.phase is _TLS:
            buffer = tls.get_buffer(len(received))
            size = min(len(buffer), len(received))
            buffer[:size] = received[:size]
            received = received[size:]
            tls.buffer_updated(size)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Only the TLS layer calls this, with its transport, once the handshake is done.
        self.transport = cast(asyncio.Transport, transport)
        # Its own buffers default to 512 KiB of replies and 256 KiB of input.
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.transport.set_read_buffer_limits(high=TLS_READ_BUFFER_HIGH)  # type: ignore[attr-defined]
        if self.server.logs_client_certs:
            self.server.note_client_cert(self)
        self._serve()
        if self.inner is not None:
            # The user's handler reads and writes through the TLS layer.
            self.reader = asyncio.StreamReader(limit=self.server.max_message_size, loop=self.loop)
            self.inner = asyncio.StreamReaderProtocol(self.reader, loop=self.loop)
            self.inner.connection_made(transport)

    def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        error = None if waiter.cancelled() else waiter.exception()
        if self.phase is not _TLS:
            return  # serving already, or ended by us
        if isinstance(error, ConnectionAbortedError) and "handshake" in str(error):
            why = f"no TLS handshake within {self.server.handshake_timeout:g} s"
        elif error is None:
            why = "closed during the TLS handshake"
        else:
            why = f"TLS handshake failed: {describe_error(error)}"
            _drop_traceback(error)
        if not self.reason and self.server.metrics is not None:
            self.server.metrics.tls_failed()  # the handshake's own failure, not a stop's
        self.reason = self.reason or why
        # The TLS layer has closed the transport, and will not tell us again.
        self._finish()

    # The one way to end.

    def end(self, how: Ending, reason: str, last: bytes = b"") -> None:
        """End the connection: `last` is written first; see `Ending`.

        The first reason given is the one logged, with the reason of a later
        reset after it. Ending an ended connection again only makes it harsher
        (a RESET still resets).
        """
        if not self.reason:
            self.reason = reason
        elif how is _RESET and reason != self.reason:
            self.reason = f"{self.reason}, then reset: {reason}"
        phase = self.phase
        if phase is _CLOSED:
            return
        if how is _RESET:
            self._cancel_handler()  # it would write to a transport that is gone
            self._reset()
            return
        if phase is _PROXY or phase is _TLS:
            self.raw.close()  # nothing is owed yet
            return
        transport = self.transport
        if last:
            self.bytes_out += len(last)
            transport.write(last)
        if phase is _SERVING or phase is _ACCEPTED:
            self.phase = _FLUSHING  # allowed from both (see NEXT_PHASES)
        if how is _CLOSE:
            transport.close()
        elif phase is not _LINGERING:
            # A client turned away just after its accept may be sending now.
            self._linger(always=phase is _ACCEPTED)

    def shutdown(self) -> None:
        """The server is stopping: end within `shutdown_timeout`.

        A handler is cancelled at its current await (its connection then
        lingers); a reply rule's connection lingers at once; a connection
        still in its handshake or flushing is bounded by the same deadline,
        after which it is reset.
        """
        if self.phase is _PROXY or self.phase is _TLS:
            self.end(_CLOSE, "server stopped")
            return
        if self.phase is _CLOSED:
            return
        now = self.loop.time()
        if self.phase is _SERVING:
            if not self.bytes_in and now < self.started + FRESH_GRACE:
                # Accepted just as the server stopped: its first request is on its way.
                self.stop_at = self.started + FRESH_GRACE
            elif self.rule is None and not self.quiet:
                # A handler that heard from its client this sweep interval may be
                # between a request and its reply: cancelled FRESH_GRACE later.
                self.stop_at = now + FRESH_GRACE
        self._arm(now + self.server.shutdown_timeout)
        if self.phase is _SERVING and self.stop_at == _NEVER:
            self._stop_serving()

    def _stop_serving(self) -> None:
        self.reason = self.reason or "server stopped"
        if not self._cancel_handler():
            self.end(_LINGER, "server stopped")

    def _cancel_handler(self) -> bool:
        """Cancel the user's handler if it runs (not from inside it); whether
        it is cancelled now or was already."""
        task = self.task
        if self.rule is not None or task is None or task.done():
            return False
        if not self.handler_cancelled and task is not asyncio.current_task(self.loop):
            self.handler_cancelled = True
            task.cancel()
        return True

    def idle_check(self, idle_for: float) -> None:
        """Called by the sweep after `idle_for` seconds without a sign of life
        in either direction: end the connection unless the client took some of
        what was sent to it meanwhile. Replies still owed are lost to a reset."""
        pending = self.pending()
        taken = self.bytes_out - pending
        if taken != self.taken:
            self.taken = taken
            self.quiet = 0
            return
        reason = f"idle for {idle_for:g} s"
        if pending:
            self.end(_RESET, f"{reason} with {pending} bytes not taken")
        elif self.phase is _SERVING and self._cancel_handler():
            self.reason = self.reason or reason
        else:
            self.end(_CLOSE, reason)

    def progress_check(self) -> None:
        """Called by the sweep for a connection quiet for a whole interval that
        has sent something not yet seen taken: note it if the client took some."""
        taken = self.bytes_out - self.pending()
        if taken != self.taken:
            self.taken = taken
            self.quiet = 0

    def pending(self) -> int:
        """Bytes written that the client has not taken: still in our buffer, or
        sent and not acknowledged."""
        return self.transport.get_write_buffer_size() + (_socket_queue(self.raw, "TIOCOUTQ") or 0)

    def sent(self) -> int:
        """Bytes handed to the kernel so far."""
        try:
            return self.bytes_out - self.transport.get_write_buffer_size()
        except (AttributeError, RuntimeError):  # a transport torn down already
            return self.bytes_out

    def _linger(self, *, always: bool = False) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        # Quiet for a sweep interval, nothing of ours in flight and nothing of
        # the client's unread: a reset could destroy no reply, so there is
        # nothing to wait for. At a stop this is almost every client. (A client
        # heard from just now may be sending its next line, which a close would
        # answer with a reset.) A client that never sent needs no wait either,
        # nor can TLS half-close.
        unread = _socket_queue(self.raw, "FIONREAD")
        settled = (
            self.quiet > 0
            and not transport.get_write_buffer_size()
            and _socket_queue(self.raw, "TIOCOUTQ") == 0
            and unread == 0
        )
        never_sent = not self.bytes_in and not unread
        if (not always and (settled or never_sent)) or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._to(_LINGERING)
        self.quiet = 0
        transport.resume_reading()
        if self.deadline == _NEVER:
            self.deadline = self.loop.time() + self.server.shutdown_timeout
        self._arm(self.deadline)

    def _tick(self) -> None:
        """The connection's one timer fired: a deadline, or a linger check."""
        self.timer = None
        now = self.loop.time()
        if now >= self.deadline:
            phase = self.phase
            if phase is _PROXY:
                self.end(_CLOSE, f"no PROXY header within {self.server.handshake_timeout:g} s")
                return
            if phase is _LINGERING:
                why = "client still sending, or not acknowledging, at the deadline"
            elif phase is _SERVING:
                why = "handler still running at the deadline"
            else:
                why = "replies not taken by the deadline"
            self.end(_RESET, why)
            return
        if now >= self.stop_at:
            self.stop_at = _NEVER
            if self.phase is _SERVING:
                self._stop_serving()
        elif self.phase is _LINGERING:
            # Silent for a whole LINGER_TIMEOUT, with every byte sent acknowledged.
            if not self.quiet and not self.pending():
                self.transport.close()
                return
            self.quiet = 0
        if self.timer is None and self.phase is not _CLOSED:
            self._arm(self.deadline)

    def _arm(self, deadline: float) -> None:
        """Set the deadline (only ever sooner) and the timer serving it."""
        self.deadline = min(self.deadline, deadline)
        if self.timer is not None:
            self.timer.cancel()
        when = min(self.deadline, self.stop_at)
        if self.phase is _LINGERING:
            when = min(when, self.loop.time() + LINGER_TIMEOUT)
        self.timer = self.loop.call_at(when, self._tick)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _reset(self) -> None:
        """Abort with an RST; what was still in our buffer was never sent."""
        raw = self.raw
        self.bytes_out -= self.transport.get_write_buffer_size()
        sock = raw.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            with contextlib.suppress(OSError, ValueError):  # closed already
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        if self.transport is not raw:
            self.transport.abort()
        raw.abort()

    def _finish(self, exc: Exception | None = None) -> None:
        """The transport is gone: the connection's life is over."""
        if self.phase is _CLOSED:
            return
        self.phase = _CLOSED
        self._disarm()
        self.server.forget(self)
        self._wake()
        # start_server's protocol is told, as if it still had the transport: its
        # reader (a handler's, without TLS) gets the EOF or the error, and it lets
        # go of its writer and task. Untold, they form cycles that only the
        # cyclic collector frees, which costs more than this call.
        if self.opener is not None:  # None only with a test's fake transport
            self.opener.connection_lost(exc)

    # The task start_server made for the connection.

    async def run(self) -> None:
        """The coroutine start_server runs for this connection: the user's
        handler, once serving; for a reply rule, a wait for the end.

        It always ends normally: a cancelled task would make 3.11's stream
        protocol log an error, and our own cancellations are handled here.
        """
        if self.rule is None:
            self.task = asyncio.current_task()  # for a stop to cancel the handler
        try:
            while self.phase < _SERVING:
                await self._wait()
            if self.rule is None and self.phase is _SERVING:
                await self._run_handler()
            while self.rule is not None and self.phase is not _CLOSED:
                await self._wait()
        except asyncio.CancelledError:
            # Not ours (the loop is closing, say): give up on the client.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self.end(_RESET, "cancelled")

    def _wait(self) -> asyncio.Future[None]:
        """A future that the next change of phase sets (see `_wake`)."""
        self.wake = self.loop.create_future()
        return self.wake

    def _wake(self) -> None:
        wake = self.wake
        if wake is not None:
            self.wake = None
            if not wake.done():  # cancelled with the task
                wake.set_result(None)

    async def _run_handler(self) -> None:
        server = self.server
        reader = cast(asyncio.StreamReader, self.reader)
        writer = CountingWriter(self, reader)
        try:
            await server.handler(reader, writer)
        except asyncio.CancelledError:
            if not self.handler_cancelled:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            # Stopped or idle: the client may be sending still.
            self.end(_LINGER, "server stopped")
        except (ConnectionError, asyncio.IncompleteReadError, ssl_module.SSLError) as error:
            self.end(_CLOSE, describe_error(error))
        except Exception:
            logger.exception(
                "Handler %s failed for %s", _name(server.handler), self.describe_peer()
            )
            self.end(_CLOSE, "handler failed")
        else:
            self.end(_CLOSE, "handler returned")

    # Protocol callbacks.

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        phase = self.phase
        if phase is _PROXY:
            self._read_header(data)
        elif phase is _LINGERING:
            self.quiet = 1  # heard from: the linger check waits on
        # FLUSHING: the protocol is done; what arrives is dropped.

    def eof_received(self) -> bool | None:
        if self.phase is _PROXY:
            self.end(_CLOSE, "closed by client before its PROXY header")
        return None  # the transport closes

    def pause_writing(self) -> None:
        if not self.transport.is_closing():
            # The client is not taking replies: stop taking its requests.
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.quiet = 0
        if not self.transport.is_closing() and self.phase is _SERVING:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.reason:
            self.reason = describe_error(exc)
        self._finish(exc)

    def describe_peer(self) -> str:
        return format_peer(self.proxy_peer or self.peer or _peername(self.raw))


class RuleConnection(Connection):
    """Answers with a reply rule, from the transport's own callbacks.

    A read larger than FEED_SLICE is answered a slice at a time, and what is
    left when the client stops taking replies is held (reading paused) until it
    takes them: a read of empty lines would otherwise make 28 times its size in
    thanks replies at once.
    """

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self.phase is not _SERVING:
            Connection.data_received(self, data)
            return
        self.quiet = 0
        size = len(data)
        self.bytes_in += size
        if size > FEED_SLICE:
            self._feed_slices(data)
            return
        try:
            reply = self.rule.feed(data)  # type: ignore[union-attr]
        except MessageTooLong as error:
            self.end(_LINGER, f"message longer than {error.limit} bytes", error.reply)
            return
        if reply:
            self.bytes_out += len(reply)
            self.transport.write(reply)

    def _feed_slices(self, data: bytes, *, hold: bool = True) -> None:
        transport = self.transport
        feed = self.rule.feed  # type: ignore[union-attr]
        for start in range(0, len(data), FEED_SLICE):
            if hold and transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
                self.held = data[start:]
                transport.pause_reading()
                return
            try:
                reply = feed(data[start : start + FEED_SLICE])
            except MessageTooLong as error:
                self.end(_LINGER, f"message longer than {error.limit} bytes", error.reply)
                return
            if reply:
                self.bytes_out += len(reply)
                transport.write(reply)
        self.held = b""
        if self.eof_held:
            self.eof_received()

    def resume_writing(self) -> None:
        self.quiet = 0
        if self.phase is not _SERVING or self.transport.is_closing():
            return
        if self.held:
            self._feed_slices(self.held)
        if not self.held:
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        if self.phase is _SERVING:
            if self.held:
                if self.transport.can_write_eof():
                    self.eof_held = True  # answered once what is held is
                    return True
                # TLS cannot stay half-open: answer what is held now.
                self._feed_slices(self.held, hold=False)
                if self.phase is not _SERVING:
                    return None
            self.end(_CLOSE, "closed by client", self.rule.finish())  # type: ignore[union-attr]
            return None  # the transport closes
        return Connection.eof_received(self)


class ThanksConnection(RuleConnection):
    """Answers thanks's common case itself: a read of one whole line, with
    nothing pending, gets THANKS_PREFIX + the line, as ThanksRule.feed would
    give it, without the call (650 of 7,200 instructions a line). Anything
    else goes to the rule."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        rule: ThanksRule = self.rule  # type: ignore[assignment]
        size = len(data)
        if self.phase is _SERVING and not rule.pending and size <= FEED_SLICE:
            _line, lf, rest = data.partition(b"\n")
            if lf and not rest and size <= rule.limit:
                self.quiet = 0
                self.bytes_in += size
                reply = THANKS_PREFIX + data
                self.bytes_out += len(reply)
                self.transport.write(reply)
                return
        RuleConnection.data_received(self, data)


class EchoConnection(RuleConnection):
    """Echo's rule is the identity, and owes nothing at the end: the same,
    without the calls (nor anything held, as echo answers a read at once)."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self.phase is not _SERVING:
            Connection.data_received(self, data)
            return
        self.quiet = 0
        size = len(data)
        self.bytes_in += size
        self.bytes_out += size
        self.transport.write(data)

    def eof_received(self) -> bool | None:
        if self.phase is _SERVING:
            self.end(_CLOSE, "closed by client")
            return None  # the transport closes
        return Connection.eof_received(self)


class HandlerConnection(Connection):
    """Forwards every event to the stream protocol the user's handler reads from."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self.phase is not _SERVING:
            Connection.data_received(self, data)
            return
        self.quiet = 0
        self.bytes_in += len(data)
        self.inner.data_received(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        if self.phase is _SERVING:
            return self.inner.eof_received()  # type: ignore[union-attr]
        return Connection.eof_received(self)

    def pause_writing(self) -> None:
        if self.phase >= _SERVING:
            self.inner.pause_writing()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.quiet = 0
        if self.phase >= _SERVING:
            self.inner.resume_writing()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase >= _SERVING and self.inner is not self.opener:
            # The TLS layer's stream protocol (start_server's is told in _finish).
            self.inner.connection_lost(exc)  # type: ignore[union-attr]
        super().connection_lost(exc)


class SharedBufferReads(Connection, asyncio.BufferedProtocol):
    """Reads into one buffer the whole server shares, for asyncio's own loop.

    Given a plain Protocol, that loop reads each chunk into a new 256 KiB bytes
    object, and such a large allocation can cost malloc a fresh mapping per read:
    with 10,000 clients connected it was a third of the throughput. Each read is
    handed on at once, so one buffer serves every connection. (uvloop reads into
    a buffer of its own and needs none of this.)
    """

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server.read_buffer[:nbytes].tobytes())


class BufferedRuleConnection(SharedBufferReads, RuleConnection):
    __slots__ = ()


class BufferedThanksConnection(SharedBufferReads, ThanksConnection):
    __slots__ = ()


class BufferedEchoConnection(SharedBufferReads, EchoConnection):
    __slots__ = ()


class BufferedHandlerConnection(SharedBufferReads, HandlerConnection):
    __slots__ = ()


# The connection class for (who answers, whether reads go to a shared buffer).
_CLASSES: dict[tuple[str, bool], type[Connection]] = {
    ("handler", False): HandlerConnection,
    ("rule", False): RuleConnection,
    ("thanks", False): ThanksConnection,
    ("echo", False): EchoConnection,
    ("handler", True): BufferedHandlerConnection,
    ("rule", True): BufferedRuleConnection,
    ("thanks", True): BufferedThanksConnection,
    ("echo", True): BufferedEchoConnection,
}


def connection_class(answers: str, shared_buffer: bool) -> type[Connection]:
    """The class for a connection answered by "handler", "rule" (any reply
    rule), "thanks" (a ThanksRule) or "echo" (an EchoRule)."""
    return _CLASSES[answers, shared_buffer]


class CountingWriter(asyncio.StreamWriter):
    """The writer a user's handler gets: a StreamWriter that counts what it sends."""

    def __init__(self, connection: Connection, reader: asyncio.StreamReader) -> None:
        super().__init__(
            connection.transport,
            cast(asyncio.BaseProtocol, connection.inner),
            reader,
            connection.loop,
        )
        self._connection = connection

    def __del__(self) -> None:
        # StreamWriter closes an open transport when collected; this one's
        # transport belongs to the connection, which may be lingering on it.
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        connection = self._connection
        connection.bytes_out += len(data)
        connection.quiet = 0
        super().write(data)

    def writelines(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # Behind a load balancer, the peer is the client its PROXY header named.
        if name == "peername" and self._connection.proxy_peer is not None:
            return self._connection.proxy_peer
        return super().get_extra_info(name, default)


class _SmallBufferTLS(asyncio.sslproto.SSLProtocol):
    # The stdlib's TLS protocol allocates (and zero-fills) a 256 KiB read buffer
    # per connection; a read of READ_CHUNK is what the loop does anyway.
    max_size = READ_CHUNK


def tls_protocol_for(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol class to upgrade a connection on `loop`: the loop's
    own (uvloop's is compiled), with the same constructor as asyncio's."""
    if type(loop).__module__.startswith("uvloop"):
        import uvloop.loop

        return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
    return _SmallBufferTLS


def describe_error(exc: BaseException) -> str:
    """One line on why a connection was lost, without a traceback."""
    if isinstance(exc, ConnectionResetError):
        return "reset by client"
    if isinstance(exc, BrokenPipeError):
        return "client went away"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "closed by client mid-message"
    if isinstance(exc, ssl_module.SSLError):
        return f"TLS error: {printable(str(getattr(exc, 'reason', None) or exc))}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return printable(f"{type(exc).__name__}: {exc}")


# The usual short names of certificate subject attributes (RFC 4514 and common use).
_SUBJECT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "domainComponent": "DC",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "userId": "UID",
}
# A subject is longer than a PROXY header's text, but still one log line.
SUBJECT_LIMIT = 256


def describe_subject(peercert: Any) -> str | None:
    """A client certificate's subject, as `get_extra_info("peercert")` gives
    the certificate, written as RFC 4514 does (CN=alice,O=Example: the most
    specific first), escaped by `printable`; None without one."""
    subject = peercert.get("subject") if isinstance(peercert, dict) else None
    if not subject:
        return None
    parts = [
        "+".join(f"{_SUBJECT_NAMES.get(name, name)}={value}" for name, value in rdn)
        for rdn in reversed(subject)
    ]
    return printable(",".join(parts), SUBJECT_LIMIT)


def format_peer(peer: Any) -> str:
    """A peer's address as people write it, or "client" where there is none."""
    return format_address(peer) if peer else "client"


def _drop_traceback(error: BaseException) -> None:
    # A failed handshake's exception holds, through its traceback, the frames
    # of the TLS protocol that raised it, and they hold it: a cycle that keeps
    # the protocol's buffers alive until the cyclic collector runs.
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__context__ or current.__cause__


def _name(handler: Any) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


def _family(transport: asyncio.BaseTransport) -> int:
    sockname = transport.get_extra_info("sockname")
    if isinstance(sockname, tuple):
        return socket.AF_INET6 if len(sockname) == 4 else socket.AF_INET
    return socket.AF_UNIX


def _peername(transport: asyncio.BaseTransport) -> Any:
    """The peer's address, or None: a Unix client has none, and uvloop raises
    ValueError once the socket is closed."""
    try:
        return transport.get_extra_info("peername")
    except (OSError, ValueError):
        return None


def _socket_queue(transport: asyncio.BaseTransport, request: str) -> int | None:
    """A socket queue's length in bytes by ioctl: TIOCOUTQ, sent but not yet
    acknowledged; FIONREAD, received but not yet read. None where unknown."""
    sock = transport.get_extra_info("socket")
    try:
        import fcntl
        import termios

        queued = fcntl.ioctl(sock.fileno(), getattr(termios, request), b"\0\0\0\0")
    except (ImportError, AttributeError, OSError, ValueError):
        return None
    return int.from_bytes(queued, sys.byteorder)
