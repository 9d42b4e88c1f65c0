"""Expectations: what a test server answers to which message, and what it did not expect.

`server.expect(match)` declares an `Expectation`; `.respond_with(...)`, `.close()`
or `.reset()` says what to do when a message matches it. A server in expectation
mode (its handler is None, it was made with `expectations=True`, or it has an
expectation) frames what each connection receives into messages by its delimiter
and serves each through `_Book.match`: the next ordered expectation first, then
the one-shot ones, then the permanent ones, each group in the order declared. A
message that none takes is unexpected: it is recorded, answered as the server's
`unexpected` option says, and named by `server.check()`.

The book is written on the server's loop and declared into from any thread, so a
lock guards it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

Matcher: TypeAlias = "bytes | re.Pattern[bytes] | Callable[[bytes], bool]"
"""Exact bytes, a bytes pattern (fullmatch) or a predicate, over the message
without its delimiter."""
Reply: TypeAlias = "bytes | Callable[[bytes], bytes]"
"""Bytes to send, or a function of the message (without its delimiter) returning them."""
Unexpected: TypeAlias = "bytes | Literal['close'] | None"
"""What an unexpected message gets: nothing (None), these bytes, or "close"."""


def _describe_matcher(match: object) -> str:
    if isinstance(match, bytes):
        return repr(match)
    if isinstance(match, re.Pattern):
        return f"re.compile({match.pattern!r})"
    return str(getattr(match, "__qualname__", None) or repr(match))


def _check_matcher(match: object) -> None:
    if isinstance(match, bytes):
        return
    if isinstance(match, re.Pattern):
        if not isinstance(match.pattern, bytes):
            raise TypeError(f"a pattern must be compiled from bytes, not {match.pattern!r}")
        return
    if not callable(match):
        raise TypeError(
            "match must be bytes, a compiled bytes pattern or a predicate, "
            f"not {type(match).__name__}"
        )


def _check_delay(delay: float) -> float:
    if not isinstance(delay, int | float) or not delay >= 0 or delay == float("inf"):
        raise ValueError(f"delay must be a finite number of seconds >= 0, not {delay!r}")
    return float(delay)


class Expectation:
    """One expected message and what the server does when it comes.

    Made by `server.expect(match, ordered=..., once=...)`. Until an action is set
    a matching message is taken and nothing is sent. Each action replaces the
    previous one and may wait `delay` seconds first (reading on that connection
    waits too, so replies keep their order). The methods return the expectation.
    """

    __slots__ = ("_action", "_delay", "_lock", "_messages", "_reply", "match", "once", "ordered")

    def __init__(self, match: Matcher, *, ordered: bool, once: bool, lock: threading.Lock) -> None:
        _check_matcher(match)
        self.match = match
        self.ordered = ordered
        self.once = once or ordered
        self._lock = lock
        self._action: Literal["reply", "close", "reset"] = "reply"
        self._reply: Reply = b""
        self._delay = 0.0
        self._messages: list[bytes] = []

    def __repr__(self) -> str:
        flag = ", ordered=True" if self.ordered else ", once=True" if self.once else ""
        return f"expect({_describe_matcher(self.match)}{flag})"

    # What to do.

    def respond_with(self, reply: Reply, *, delay: float = 0.0) -> Expectation:
        """Send `reply` (bytes, or a function of the message returning bytes)."""
        if not isinstance(reply, bytes) and not callable(reply):
            raise TypeError(f"reply must be bytes or a callable, not {type(reply).__name__}")
        delay = _check_delay(delay)
        with self._lock:
            self._action, self._reply, self._delay = "reply", reply, delay
        return self

    def close(self, *, delay: float = 0.0) -> Expectation:
        """Close the connection (FIN), after what was sent before."""
        delay = _check_delay(delay)
        with self._lock:
            self._action, self._reply, self._delay = "close", b"", delay
        return self

    def reset(self, *, delay: float = 0.0) -> Expectation:
        """Reset the connection (RST): the client sees ECONNRESET."""
        delay = _check_delay(delay)
        with self._lock:
            self._action, self._reply, self._delay = "reset", b"", delay
        return self

    # What it saw.

    @property
    def messages(self) -> list[bytes]:
        """The messages it took, without their delimiter, in arrival order."""
        with self._lock:
            return list(self._messages)

    @property
    def calls(self) -> int:
        """How many messages it took."""
        with self._lock:
            return len(self._messages)

    @property
    def met(self) -> bool:
        """True once it took a message."""
        return self.calls > 0

    # On the server's loop, under the book's lock.

    def _matches(self, message: bytes) -> bool:
        match = self.match
        if isinstance(match, bytes):
            return message == match
        if isinstance(match, re.Pattern):
            return match.fullmatch(message) is not None
        return bool(match(message))

    def _used_up(self) -> bool:
        return self.once and bool(self._messages)


@dataclass(frozen=True)
class _Action:
    """What to do for one message, taken under the lock."""

    kind: Literal["reply", "close", "reset"]
    data: bytes
    delay: float


@dataclass(frozen=True)
class UnexpectedMessage:
    """A message no expectation took."""

    connection: int
    """The index of the connection it came on."""
    message: bytes
    """The message, without its delimiter."""
    reason: str
    """Why none took it, when there is more to say than 'no expectation matched'."""


class _Book:
    """A server's expectations and the unexpected messages, behind one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.expectations: list[Expectation] = []
        self.unexpected: list[UnexpectedMessage] = []

    def add(self, match: Matcher, *, ordered: bool, once: bool) -> Expectation:
        expectation = Expectation(match, ordered=ordered, once=once, lock=self.lock)
        with self.lock:
            self.expectations.append(expectation)
        return expectation

    def clear(self) -> None:
        with self.lock:
            self.expectations.clear()
            self.unexpected.clear()

    def __bool__(self) -> bool:
        with self.lock:
            return bool(self.expectations)

    def take(self, message: bytes, connection: int) -> _Action | None:
        """The action for `message`, or None (recorded as unexpected) if none takes it.

        A matcher or reply function that raises lets the error through: it ends
        the connection as a handler error, which `server.check()` names.
        """
        with self.lock:
            expectation = self._find(message)
            if expectation is None:
                reason = self._why_unexpected(message)
                self.unexpected.append(UnexpectedMessage(connection, message, reason))
                return None
            expectation._messages.append(message)
            kind, reply, delay = expectation._action, expectation._reply, expectation._delay
        data = reply(message) if callable(reply) else reply
        if not isinstance(data, bytes):
            raise TypeError(f"the reply function of {expectation!r} returned {data!r}, not bytes")
        return _Action(kind, data, delay)

    def _find(self, message: bytes) -> Expectation | None:
        pending = [e for e in self.expectations if e.ordered and not e._used_up()]
        if pending and pending[0]._matches(message):
            return pending[0]
        for expectation in self.expectations:
            one_shot = expectation.once and not expectation.ordered
            if one_shot and not expectation._used_up() and expectation._matches(message):
                return expectation
        for expectation in self.expectations:
            if not expectation.once and expectation._matches(message):
                return expectation
        return None

    def _why_unexpected(self, message: bytes) -> str:
        pending = [e for e in self.expectations if e.ordered and not e._used_up()]
        for expectation in pending[1:]:
            if expectation._matches(message):
                return f"out of order: it matches {expectation!r}, but {pending[0]!r} comes first"
        for expectation in self.expectations:
            if expectation._used_up() and expectation._matches(message):
                return f"it matches {expectation!r}, which was already used up"
        return ""

    def problems(self) -> tuple[list[UnexpectedMessage], list[Expectation]]:
        """The unexpected messages, and the one-shot and ordered expectations not met."""
        with self.lock:
            unmet = [e for e in self.expectations if e.once and not e._messages]
            return list(self.unexpected), unmet


class _Framer:
    """Splits what a connection receives into messages by a delimiter.

    With `delimiter` None, each chunk read is one message. Messages come without
    their delimiter; at EOF a last fragment without one is a message too.
    """

    def __init__(self, delimiter: bytes | None, limit: int) -> None:
        self.delimiter = delimiter
        self.limit = limit
        self.pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        delimiter = self.delimiter
        if delimiter is None:
            return [data]
        data = self.pending + data
        parts = data.split(delimiter)
        self.pending = parts.pop()
        for part in (*parts, self.pending):
            if len(part) > self.limit:
                raise _TooLong(self.limit, part[:64])
        return parts

    def finish(self) -> bytes | None:
        pending, self.pending = self.pending, b""
        return pending or None


class _TooLong(Exception):
    def __init__(self, limit: int, head: bytes) -> None:
        super().__init__(f"longer than {limit} bytes: the connection was closed")
        self.head = head  # the message's first bytes


def _check_delimiter(delimiter: bytes | None) -> None:
    if delimiter is not None and (not isinstance(delimiter, bytes) or not delimiter):
        raise ValueError(f"delimiter must be non-empty bytes or None, not {delimiter!r}")


def _check_unexpected(unexpected: object) -> None:
    if unexpected is not None and unexpected != "close" and not isinstance(unexpected, bytes):
        raise ValueError(f'unexpected must be None, bytes or "close", not {unexpected!r}')
