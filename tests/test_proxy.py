"""The PROXY protocol header: framing without sockets, then through a Server."""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address, IPv6Address

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal
from proxyprotocol.v2 import ProxyProtocolV2

from aioserver import echo, serve, thanks
from aioserver.proxy import MAX_V1_HEADER, ProxyHeaderError, split_header

from .conftest import ExceptionRecorder

V1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 1234\r\n"
V2 = ProxyProtocolV2().pack(
    ProxyResultIPv4((IPv4Address("203.0.113.7"), 40000), (IPv4Address("127.0.0.1"), 1234))
)


def test_v1_header_is_split_off() -> None:
    assert split_header(V1 + b"hello") == (("203.0.113.7", 40000), b"hello")


def test_v2_header_is_split_off_at_any_chunking() -> None:
    data = V2 + b"after"
    for cut in range(1, len(V2)):
        assert split_header(data[:cut]) is None
    assert split_header(data) == (("203.0.113.7", 40000), b"after")


def test_v2_ipv6_and_local_headers() -> None:
    v6 = ProxyProtocolV2().pack(
        ProxyResultIPv6((IPv6Address("2001:db8::1"), 5), (IPv6Address("::1"), 6))
    )
    assert split_header(v6) == (("2001:db8::1", 5, 0, 0), b"")
    local = ProxyProtocolV2().pack(ProxyResultLocal())
    assert split_header(local + b"x") == (None, b"x")


def test_incomplete_v1_waits_and_overlong_v1_fails() -> None:
    assert split_header(b"PRO") is None
    assert split_header(b"PROXY TCP4 1.2.3.4") is None
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        split_header(b"PROXY " + b"9" * MAX_V1_HEADER)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n",
        b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x99\x11\x00\x00",
    ],
    ids=["no-header", "bad-address", "bad-family", "bad-v2-version"],
)
def test_malformed_headers_fail(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        split_header(data)


@pytest.mark.asyncio
@pytest.mark.parametrize("header", [V1, V2], ids=["v1", "v2"])
async def test_built_in_protocols_see_only_the_bytes_after_the_header(
    header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aioserver")
    async with serve(thanks, port=0, proxy_protocol=True) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(header[:5])
        await asyncio.sleep(0.01)  # the header arrives in two pieces
        writer.write(header[5:] + b"hi\n")
        assert await reader.readline() == b"Thank you for your message hi\n"
        writer.close()
        await writer.wait_closed()
    assert "203.0.113.7:40000 closed after" in caplog.text


@pytest.mark.asyncio
async def test_a_users_handler_sees_the_real_client() -> None:
    async def whoami(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = writer.get_extra_info("peername")[:2]
        writer.write(f"{host} {port} ".encode() + await reader.read(100))
        await writer.drain()
        writer.close()

    async with serve(whoami, port=0, proxy_protocol=True) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(V2 + b"payload")
        assert await reader.read() == b"203.0.113.7 40000 payload"
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_a_missing_header_closes_that_connection_only(
    caplog: pytest.LogCaptureFixture, loop_errors: ExceptionRecorder
) -> None:
    async with serve(echo, port=0, proxy_protocol=True) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"no header here")
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(V1 + b"fine")
        assert await reader.readexactly(4) == b"fine"
        writer.close()
        await writer.wait_closed()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no PROXY protocol header" in warnings[0].getMessage()
    assert loop_errors.contexts == []
