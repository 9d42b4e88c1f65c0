"""Expectations on the test servers: matchers, one-shot and ordered, delimiters,
unexpected messages, check() and transcripts; real clients on 127.0.0.1.

Every asyncio test runs on the stdlib loop and on uvloop (tests/conftest.py);
the threaded tests take both loops as a parameter.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable

import pytest

from aioserver import thanks
from aioserver.testing import (
    Ending,
    Expectation,
    TestServer,
    ThreadedTestServer,
    UnexpectedMessage,
)

from .helpers import LOOPS, PREFIX, close, talk


def talk_blocking(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def check_message(server: TestServer | ThreadedTestServer) -> str:
    with pytest.raises(AssertionError) as caught:
        server.check()
    return str(caught.value)


# Matchers, and permanent expectations.


@pytest.mark.asyncio
async def test_exact_bytes_answer_every_time_and_check_passes() -> None:
    async with TestServer(None) as server:
        assert server.expects
        ping = server.expect(b"PING").respond_with(b"PONG\n")
        assert isinstance(ping, Expectation)
        assert repr(ping) == "expect(b'PING')"
        assert await talk(server.address, b"PING\nPING\n") == b"PONG\nPONG\n"
        assert await talk(server.address, b"PING") == b"PONG\n"  # a last fragment at EOF
        records = await server.wait_for_closed(2)
        server.check()
    assert ping.calls == 3
    assert ping.messages == [b"PING"] * 3
    assert ping.met
    assert [r.ended for r in records] == [Ending.CLIENT_CLOSED] * 2
    assert records[0].messages == [b"PING\n", b"PING\n"]
    assert repr(server).startswith("<TestServer expectations 127.0.0.1:")


@pytest.mark.asyncio
async def test_a_pattern_fullmatches_and_a_reply_function_gets_the_message() -> None:
    async with TestServer(None) as server:
        get = server.expect(re.compile(rb"GET (\w+)"))
        get.respond_with(lambda message: b"VALUE " + message[4:].upper() + b"\n")
        assert repr(get) == "expect(re.compile(b'GET (\\\\w+)'))"
        replies = await talk(server.address, b"GET key\nGET key extra\nGET x\n")
        assert replies == b"VALUE KEY\nVALUE X\n"
        unexpected = server.unexpected_messages
    assert unexpected == [UnexpectedMessage(0, b"GET key extra", "")]


@pytest.mark.asyncio
async def test_a_predicate_matches() -> None:
    def is_sum(message: bytes) -> bool:
        return message.startswith(b"SUM ")

    async with TestServer(None) as server:
        server.expect(is_sum).respond_with(
            lambda message: b"%d\n" % sum(int(n) for n in message.split()[1:])
        )
        assert repr(server.expectations[0]) == f"expect({is_sum.__qualname__})"
        assert await talk(server.address, b"SUM 1 2 3\nSUM 40 2\n") == b"6\n42\n"
        server.check()


# One-shot and ordered.


@pytest.mark.asyncio
async def test_one_shot_is_used_up_before_permanent_ones_and_then_unexpected() -> None:
    async with TestServer(None) as server:
        server.expect(re.compile(rb"HELLO.*")).respond_with(b"hello again\n")
        first = server.expect(b"HELLO", once=True).respond_with(b"welcome\n")
        quit_ = server.expect(b"QUIT", once=True).respond_with(b"bye\n")
        assert repr(first) == "expect(b'HELLO', once=True)"
        replies = await talk(server.address, b"HELLO\nHELLO\n")
        assert replies == b"welcome\nhello again\n"  # the one-shot first, then the permanent
        assert first.calls == 1
        message = check_message(server)
    assert "1 problem(s)" in message
    assert "one-shot expectation expect(b'QUIT', once=True) was never met" in message
    assert not quit_.met


@pytest.mark.asyncio
async def test_a_used_up_one_shot_makes_the_next_match_unexpected() -> None:
    async with TestServer(None) as server:
        server.expect(b"HELLO", once=True).respond_with(b"welcome\n")
        assert await talk(server.address, b"HELLO\nHELLO\n") == b"welcome\n"
        message = check_message(server)
    assert (
        "unexpected message b'HELLO' on connection #0 (it matches "
        "expect(b'HELLO', once=True), which was already used up)"
    ) in message
    assert "transcript of the connections involved:" in message
    assert "connection #0 from 127.0.0.1:" in message
    assert "received 12 bytes: b'HELLO\\nHELLO\\n'" in message
    assert "sent 8 bytes: b'welcome\\n'" in message


@pytest.mark.asyncio
async def test_ordered_expectations_in_order_pass() -> None:
    async with TestServer(None) as server:
        login = server.expect(b"LOGIN", ordered=True).respond_with(b"OK login\n")
        server.expect(b"SEND", ordered=True).respond_with(b"OK send\n")
        server.expect(b"NOOP").respond_with(b"OK\n")
        assert repr(login) == "expect(b'LOGIN', ordered=True)"
        assert login.once
        replies = await talk(server.address, b"NOOP\nLOGIN\nNOOP\nSEND\n")
        assert replies == b"OK\nOK login\nOK\nOK send\n"
        server.check()


@pytest.mark.asyncio
async def test_ordered_expectations_out_of_order_fail_the_check() -> None:
    async with TestServer(None, unexpected=b"ERR unexpected\n") as server:
        server.expect(b"A", ordered=True).respond_with(b"a\n")
        server.expect(b"B", ordered=True).respond_with(b"b\n")
        server.expect(b"C", ordered=True).respond_with(b"c\n")
        replies = await talk(server.address, b"B\nA\nB\n")
        assert replies == b"ERR unexpected\na\nb\n"
        message = check_message(server)
    assert "2 problem(s)" in message
    assert (
        "unexpected message b'B' on connection #0 (out of order: it matches "
        "expect(b'B', ordered=True), but expect(b'A', ordered=True) comes first)"
    ) in message
    assert "ordered expectation expect(b'C', ordered=True) was never met" in message


# Delimiters.


@pytest.mark.parametrize("delimiter", [b"\r\n", b"\x00", b"END"])
@pytest.mark.asyncio
async def test_other_delimiters_frame_the_messages(delimiter: bytes) -> None:
    async with TestServer(None, delimiter=delimiter) as server:
        assert server.delimiter == delimiter
        server.expect(b"one").respond_with(b"1" + delimiter)
        server.expect(b"two\n").respond_with(b"2" + delimiter)
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"one" + delimiter[:1])
        await writer.drain()
        writer.write(delimiter[1:] + b"two\n" + delimiter)
        writer.write_eof()
        assert await reader.read() == b"1" + delimiter + b"2" + delimiter
        await close(writer)
        (record,) = await server.wait_for_closed(1)
        server.check()
    assert record.messages == [b"one" + delimiter, b"two\n" + delimiter]


@pytest.mark.asyncio
async def test_no_delimiter_takes_each_chunk_as_it_arrives() -> None:
    async with TestServer(None, delimiter=None) as server:
        server.expect(re.compile(rb"[a-z]+\n?")).respond_with(lambda data: data.upper())
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"first")
        assert await reader.readexactly(5) == b"FIRST"
        writer.write(b"second\n")
        assert await reader.readline() == b"SECOND\n"
        await close(writer)
        await server.wait_for_closed(1)
        assert server.messages == [b"first", b"second\n"]
        server.check()


# Unexpected messages.


@pytest.mark.asyncio
async def test_unexpected_gets_nothing_by_default_and_is_recorded() -> None:
    async with TestServer(expectations=True) as server:  # the echo handler is not used
        assert server.expects
        assert await talk(server.address, b"anything\nmore") == b""
        assert server.unexpected_messages == [
            UnexpectedMessage(0, b"anything", ""),
            UnexpectedMessage(0, b"more", ""),
        ]
        message = check_message(server)
    assert message.startswith("<TestServer echo 127.0.0.1:")
    assert "- unexpected message b'anything' on connection #0\n" in message
    assert "- unexpected message b'more' on connection #0\n" in message


@pytest.mark.asyncio
async def test_unexpected_gets_fixed_bytes() -> None:
    async with TestServer(None, unexpected=b"ERR unexpected\n") as server:
        server.expect(b"OK").respond_with(b"fine\n")
        assert await talk(server.address, b"what\nOK\n") == b"ERR unexpected\nfine\n"


@pytest.mark.asyncio
async def test_unexpected_closes() -> None:
    async with TestServer(None, unexpected="close") as server:
        server.expect(b"OK").respond_with(b"fine\n")
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"OK\nwhat\n")
        assert await reader.read() == b"fine\n"
        await close(writer)
        (record,) = await server.wait_for_closed(1)
    assert record.ended is Ending.SERVER_CLOSED
    assert [u.message for u in server.unexpected_messages] == [b"what"]


@pytest.mark.asyncio
async def test_a_message_over_max_message_size_is_unexpected_and_closes() -> None:
    async with TestServer(None, max_message_size=8) as server:
        assert await talk(server.address, b"far too long for it\n") == b""
        await server.wait_for_closed(1)
        (unexpected,) = server.unexpected_messages
    assert unexpected.message == b"far too long for it"
    assert unexpected.reason == "longer than 8 bytes: the connection was closed"


# Actions: close, reset, delay.


@pytest.mark.asyncio
async def test_close_and_reset_actions() -> None:
    async with TestServer(None) as server:
        server.expect(b"BYE").respond_with(b"bye\n")  # replaced by the close
        server.expectations[0].close()
        server.expect(b"BOOM").reset()
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"BYE\nnever read\n")
        assert await reader.read() == b""
        await close(writer)
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"BOOM\n")
        with pytest.raises(ConnectionResetError):
            await reader.read()
        await close(writer)
        records = await server.wait_for_closed(2)
        server.check()
    assert [r.ended for r in records] == [Ending.SERVER_CLOSED, Ending.RESET_BY_FAULT]


@pytest.mark.asyncio
async def test_delay_holds_the_reply_and_keeps_the_order() -> None:
    async with TestServer(None) as server:
        server.expect(b"slow").respond_with(b"slow\n", delay=0.2)
        server.expect(b"fast").respond_with(b"fast\n")
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await talk(server.address, b"slow\nfast\n") == b"slow\nfast\n"
        assert loop.time() - started >= 0.19


# Handler errors reach check().


@pytest.mark.asyncio
async def test_a_handler_error_fails_the_check_with_its_traceback() -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3)
        raise ValueError("broken handler")

    async with TestServer(broken) as server:
        assert not server.expects
        assert await talk(server.address, b"abc") == b""
        await server.wait_for_closed(1)
        message = check_message(server)
    assert "handler error on connection #0: ValueError('broken handler')" in message
    assert "    Traceback (most recent call last):" in message
    assert 'raise ValueError("broken handler")' in message
    assert "received 3 bytes: b'abc'" in message


@pytest.mark.asyncio
async def test_a_failing_reply_function_is_a_handler_error() -> None:
    async with TestServer(None) as server:
        server.expect(b"x").respond_with(lambda message: 1 // 0)  # type: ignore[arg-type, return-value]
        assert await talk(server.address, b"x\n") == b""
        (record,) = await server.wait_for_closed(1)
        message = check_message(server)
    assert record.ended is Ending.HANDLER_FAILED
    assert "handler error on connection #0: ZeroDivisionError" in message


@pytest.mark.asyncio
async def test_a_handler_server_is_unchanged_until_it_has_an_expectation() -> None:
    async with TestServer(thanks) as server:
        assert not server.expects
        assert await talk(server.address, b"hi\n") == PREFIX + b"hi\n"
        server.check()
        server.expect(b"hi").respond_with(b"expected\n")
        assert server.expects
        assert await talk(server.address, b"hi\n") == b"expected\n"
        server.clear_expectations()
        assert server.expectations == []
        assert await talk(server.address, b"hi\n") == PREFIX + b"hi\n"
        server.check()


# The threaded server.


@pytest.mark.parametrize("loop_name", LOOPS)
def test_threaded_server_expectations_and_check(loop_name: str) -> None:
    with ThreadedTestServer(None, loop=loop_name, delimiter=b"\r\n") as server:
        server.expect(b"HELO", ordered=True).respond_with(b"250 hi\r\n")
        server.expect(b"QUIT", ordered=True).respond_with(b"221 bye\r\n")
        server.expect(b"DATA", once=True)
        assert talk_blocking(server.address, b"HELO\r\nQUIT\r\nRSET\r\n") == (
            b"250 hi\r\n221 bye\r\n"
        )
        server.wait_for_closed(1)
        message = check_message(server)
    assert message.startswith("<ThreadedTestServer expectations 127.0.0.1:")
    assert "- unexpected message b'RSET' on connection #0\n" in message
    assert "- one-shot expectation expect(b'DATA', once=True) was never met" in message


# The transcript.


@pytest.mark.asyncio
async def test_the_transcript_is_bounded() -> None:
    async with TestServer() as server:  # echo
        for number in range(22):
            assert await talk(server.address, b"%02d" % number + b"x" * 3000) != b""
        await server.wait_for_closed(22)
        transcript = server.transcript()
    assert re.match(r"<TestServer echo 127.0.0.1:\d+ serving>, 22 connection\(s\):\n", transcript)
    assert "(2 earlier connections left out)" in transcript
    assert "connection #1 from" not in transcript
    assert "connection #2 from" in transcript
    assert "connection #21 from" in transcript
    assert "received 3002 bytes: b'21xxx" in transcript
    assert "... and 954 more bytes" in transcript


# Misuse.


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: TestServer(None, delimiter=b""), ValueError, "delimiter must be"),
        (lambda: TestServer(None, unexpected="reset"), ValueError, "unexpected must be"),  # type: ignore[arg-type]
        (lambda: TestServer(None).expect("text"), TypeError, "match must be bytes"),  # type: ignore[arg-type]
        (lambda: TestServer(None).expect(re.compile("s")), TypeError, "compiled from bytes"),  # type: ignore[arg-type]
        (lambda: TestServer(None).expect(b"x").respond_with("s"), TypeError, "reply must be"),  # type: ignore[arg-type]
        (lambda: TestServer(None).expect(b"x").close(delay=-1), ValueError, "delay must be"),
    ],
    ids=["empty-delimiter", "bad-unexpected", "str-match", "str-pattern", "str-reply", "delay"],
)
def test_bad_arguments_are_refused(
    make: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make()
