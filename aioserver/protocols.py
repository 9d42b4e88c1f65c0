"""The two built-in protocols: their reply rules, and handlers over streams.

The reply rules are plain objects fed with bytes that return the bytes to send,
so they are tested without sockets. The handlers `echo` and `thanks` have the
`asyncio.start_server` callback signature and work with any stream pair; an
`aioserver.Server` runs the same rules straight on the transport instead (see
`rule_for`), which saves a stream layer per connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

__all__ = [
    "BUSY_REPLY",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "READ_CHUNK",
    "EchoRule",
    "Handler",
    "MessageTooLong",
    "ReplyRule",
    "ThanksRule",
    "busy_reply",
    "echo",
    "rule_for",
    "serve_rule",
    "thanks",
    "thanks_reply",
]

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# 64 KiB: the stream reader's own default limit, and far above any line a person
# types, while a hostile client can make the server hold no more than this per line.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024

# 64 KiB per read: the size uvloop and the selector loop read at once, so one read
# is one system call.
READ_CHUNK = 64 * 1024

THANKS_PREFIX = b"Thank you for your message "
BUSY_REPLY = b"Error: server busy\n"


class MessageTooLong(Exception):
    """A message went past the limit.

    `reply` is what to send before closing: the replies to the complete messages
    received before the long one, then one line naming the limit.
    """

    def __init__(self, limit: int, replies_before: bytes = b"") -> None:
        super().__init__(f"message longer than {limit} bytes")
        self.limit = limit
        self.reply = replies_before + f"Error: message longer than {limit} bytes\n".encode()


class ReplyRule(Protocol):
    """A protocol as a pure function of the bytes received."""

    def feed(self, data: bytes) -> bytes:
        """Take received bytes; return the bytes to send now (maybe empty).

        Raises MessageTooLong when a message goes past the limit.
        """

    def finish(self) -> bytes:
        """The client sent EOF: return the last bytes to send before closing."""


class EchoRule:
    """RFC 862: every byte back, in order, nothing added."""

    __slots__ = ()

    def feed(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        return b""


def thanks_reply(message: bytes) -> bytes:
    """The reply to one message: the prefix, the message, and a newline if it had none."""
    if message.endswith(b"\n"):
        return THANKS_PREFIX + message
    return THANKS_PREFIX + message + b"\n"


class ThanksRule:
    """Lines ending in LF, each answered by `thanks_reply`, bytes untouched.

    A line, its LF included, may be at most `max_message_size` bytes. Past that,
    `feed` raises MessageTooLong and the rule must not be fed again.
    """

    __slots__ = ("limit", "pending")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size < 1:
            raise ValueError("max_message_size must be at least 1")
        # The longest line, its LF included.
        self.limit = max_message_size
        # What came after the last LF: the start of a line not answered yet.
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        if self.pending:
            data = self.pending + data
            self.pending = b""
        # The common case, one whole line per read: one concatenation. partition
        # tells "one LF, at the end" for half of what find and rfind cost (their
        # argument parsing costs more than their search).
        _line, lf, rest = data.partition(b"\n")
        if lf and not rest and len(data) <= self.limit:
            return THANKS_PREFIX + data
        end = data.rfind(b"\n") + 1
        self.pending = data[end:]
        lines = data[:end].split(b"\n")
        lines.pop()  # the piece after the last LF: the pending fragment, or empty
        limit = self.limit
        if end > limit or len(self.pending) > limit:
            for index, line in enumerate(lines):
                if len(line) >= limit:  # with its LF, over the limit
                    raise MessageTooLong(limit, self._answer(lines[:index]))
            if len(self.pending) > limit:
                # A fragment this long can only become a line over the limit.
                raise MessageTooLong(limit, self._answer(lines))
        return self._answer(lines) if lines else b""

    @staticmethod
    def _answer(lines: list[bytes]) -> bytes:
        return b"".join([THANKS_PREFIX + line + b"\n" for line in lines])

    def finish(self) -> bytes:
        pending, self.pending = self.pending, b""
        return thanks_reply(pending) if pending else b""


def busy_reply(handler: Handler) -> bytes:
    """What a client of `handler` is told when the server is full (may be nothing)."""
    return BUSY_REPLY if handler is thanks else b""


def rule_for(handler: Handler, max_message_size: int) -> ReplyRule | None:
    """The reply rule behind a built-in handler, or None for any other handler."""
    if handler is echo:
        return EchoRule()
    if handler is thanks:
        return ThanksRule(max_message_size)
    return None


async def serve_rule(
    rule: ReplyRule, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Serve one connection's streams with `rule` until EOF or a message too long,
    reading no faster than the client takes the replies; then close the writer."""
    try:
        while data := await reader.read(READ_CHUNK):
            try:
                reply = rule.feed(data)
            except MessageTooLong as error:
                writer.write(error.reply)
                return
            if reply:
                writer.write(reply)
                # Read no faster than the client takes the replies.
                await writer.drain()
        writer.write(rule.finish())
    finally:
        writer.close()
        await writer.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo (RFC 862 over TCP): send every byte back; at EOF, finish sending and close."""
    await serve_rule(EchoRule(), reader, writer)


async def thanks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer each line with b"Thank you for your message " + the line.

    The line keeps its own ending (CRLF included); a last fragment without LF at EOF
    is answered with a reply ending in LF. A line longer than
    DEFAULT_MAX_MESSAGE_SIZE gets one line "Error: message longer than N bytes"
    and the connection closes.
    """
    await serve_rule(ThanksRule(), reader, writer)
