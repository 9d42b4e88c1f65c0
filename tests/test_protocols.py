"""The reply rules without sockets, and the stream handlers under plain start_server."""

from __future__ import annotations

import asyncio

import pytest

from aioserver import echo, thanks
from aioserver.protocols import (
    BUSY_REPLY,
    DEFAULT_MAX_MESSAGE_SIZE,
    EchoRule,
    MessageTooLong,
    ThanksRule,
    busy_reply,
    rule_for,
    thanks_reply,
)

from .helpers import PREFIX, close


def test_echo_rule_returns_every_byte() -> None:
    rule = EchoRule()
    assert rule.feed(b"\x00\xffabc") == b"\x00\xffabc"
    assert rule.finish() == b""


def test_thanks_reply_keeps_the_line_ending() -> None:
    assert thanks_reply(b"hi\n") == PREFIX + b"hi\n"
    assert thanks_reply(b"hi\r\n") == PREFIX + b"hi\r\n"
    assert thanks_reply(b"hi") == PREFIX + b"hi\n"


def test_thanks_rule_answers_each_line_whatever_the_chunking() -> None:
    rule = ThanksRule()
    assert rule.feed(b"one\ntw") == PREFIX + b"one\n"
    assert rule.feed(b"o") == b""
    assert rule.feed(b"\r\n\n") == PREFIX + b"two\r\n" + PREFIX + b"\n"
    assert rule.finish() == b""


def test_thanks_rule_leaves_bytes_untouched() -> None:
    rule = ThanksRule()
    line = b"\x00\xff\xfe\x1b[31m\x7f\n"
    assert rule.feed(line) == PREFIX + line


def test_thanks_rule_answers_a_final_fragment_with_a_newline() -> None:
    rule = ThanksRule()
    assert rule.feed(b"last words") == b""
    assert rule.finish() == PREFIX + b"last words\n"
    assert rule.finish() == b""


def test_thanks_rule_limit_counts_the_newline() -> None:
    rule = ThanksRule(max_message_size=4)
    assert rule.feed(b"abc\n") == PREFIX + b"abc\n"
    with pytest.raises(MessageTooLong) as caught:
        rule.feed(b"abcd\n")
    assert caught.value.limit == 4
    assert caught.value.reply == b"Error: message longer than 4 bytes\n"


def test_thanks_rule_rejects_a_long_fragment_before_its_newline() -> None:
    rule = ThanksRule(max_message_size=4)
    assert rule.feed(b"abcd") == b""  # could still end at EOF as a 4-byte message
    with pytest.raises(MessageTooLong):
        rule.feed(b"e")


def test_thanks_rule_answers_the_lines_before_a_long_one() -> None:
    rule = ThanksRule(max_message_size=8)
    with pytest.raises(MessageTooLong) as caught:
        rule.feed(b"a\n" + b"x" * 20 + b"\nb\n")
    assert caught.value.reply == PREFIX + b"a\n" + b"Error: message longer than 8 bytes\n"
    rule = ThanksRule(max_message_size=8)
    with pytest.raises(MessageTooLong) as caught:
        rule.feed(b"a\nb\n" + b"x" * 20)
    assert (
        caught.value.reply
        == PREFIX + b"a\n" + PREFIX + b"b\n" + b"Error: message longer than 8 bytes\n"
    )


def test_thanks_rule_needs_a_positive_limit() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ThanksRule(0)


def test_rule_for_knows_only_the_built_in_handlers() -> None:
    async def mine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass

    assert isinstance(rule_for(echo, 10), EchoRule)
    assert isinstance(rule_for(thanks, 10), ThanksRule)
    assert rule_for(mine, 10) is None
    assert busy_reply(thanks) == BUSY_REPLY == b"Error: server busy\n"
    assert busy_reply(echo) == b""


async def _exchange(handler: object, payload: bytes) -> bytes:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        writer.write_eof()
        reply = await reader.read()
        await close(writer)
    return reply


@pytest.mark.asyncio
async def test_echo_works_under_plain_start_server() -> None:
    payload = bytes(range(256)) * 1000
    assert await _exchange(echo, payload) == payload


@pytest.mark.asyncio
async def test_thanks_works_under_plain_start_server() -> None:
    assert await _exchange(thanks, b"a\r\nb") == PREFIX + b"a\r\n" + PREFIX + b"b\n"


@pytest.mark.asyncio
async def test_thanks_under_plain_start_server_enforces_the_default_limit() -> None:
    reply = await _exchange(thanks, b"x" * (DEFAULT_MAX_MESSAGE_SIZE + 1) + b"\n")
    assert reply == f"Error: message longer than {DEFAULT_MAX_MESSAGE_SIZE} bytes\n".encode()
