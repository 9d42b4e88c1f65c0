"""The PROXY protocol header: framing without sockets, then through a Server."""

from __future__ import annotations

import asyncio
import logging
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from proxyprotocol.result import (
    ProxyResultIPv4,
    ProxyResultIPv6,
    ProxyResultLocal,
    ProxyResultUnix,
)
from proxyprotocol.v2 import ProxyProtocolV2

from aioserver import cli, echo, serve, thanks
from aioserver.proxy import (
    DEFAULT_PROXY_ALLOW,
    MAX_V1_HEADER,
    ProxyHeaderError,
    is_trusted,
    parse_networks,
    printable,
    split_header,
)

from .conftest import ExceptionRecorder

TCP = socket.AF_INET
# Every family a listener can have: each accepts and refuses the same headers.
LISTENER_FAMILIES = pytest.mark.parametrize(
    "family",
    [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX],
    ids=["tcp4-listener", "tcp6-listener", "unix-listener"],
)

V1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 1234\r\n"
V2 = ProxyProtocolV2().pack(
    ProxyResultIPv4((IPv4Address("203.0.113.7"), 40000), (IPv4Address("127.0.0.1"), 1234))
)


def test_v1_header_is_split_off() -> None:
    assert split_header(V1 + b"hello", family=TCP) == (("203.0.113.7", 40000), b"hello")


def test_v2_header_is_split_off_at_any_chunking() -> None:
    data = V2 + b"after"
    for cut in range(1, len(V2)):
        assert split_header(data[:cut], family=TCP) is None
    assert split_header(data, family=TCP) == (("203.0.113.7", 40000), b"after")


def test_v2_ipv6_and_local_headers() -> None:
    v6 = ProxyProtocolV2().pack(
        ProxyResultIPv6((IPv6Address("2001:db8::1"), 5), (IPv6Address("::1"), 6))
    )
    assert split_header(v6, family=TCP) == (("2001:db8::1", 5, 0, 0), b"")
    local = ProxyProtocolV2().pack(ProxyResultLocal())
    assert split_header(local + b"x", family=TCP) == (None, b"x")


def test_incomplete_v1_waits_and_overlong_v1_fails() -> None:
    assert split_header(b"PRO", family=TCP) is None
    assert split_header(b"PROXY TCP4 1.2.3.4", family=TCP) is None
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        split_header(b"PROXY " + b"9" * MAX_V1_HEADER, family=TCP)


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
    with pytest.raises(ProxyHeaderError) as caught:
        split_header(data, family=TCP)
    assert_loggable(str(caught.value))


def assert_loggable(message: str) -> None:
    """One line of printable ASCII: nothing a client sent reaches the log raw."""
    assert message.isprintable(), message
    assert message.isascii(), message


def v2(source: Any, dest: Any, result: type[Any] = ProxyResultIPv4) -> bytes:
    """A PROXY v2 header for a TCP connection from `source` to `dest`."""
    return bytes(ProxyProtocolV2().pack(result(source, dest, protocol=socket.SOCK_STREAM)))


V2_UNIX = v2("/run/client.sock", "/run/haproxy.sock", ProxyResultUnix)
# The library decodes v2 Unix paths as ASCII; these bytes make it fail, quoting them.
V2_UNIX_NON_ASCII = V2_UNIX.replace(b"client", b"\xff\x1b[2J!")


@LISTENER_FAMILIES
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 1234\r\n", ("203.0.113.7", 40000)),
        (b"PROXY TCP6 2001:DB8:0::7 ::1 40000 1234\r\n", ("2001:db8::7", 40000, 0, 0)),
        (b"PROXY TCP6 ::ffff:203.0.113.7 ::1 1 2\r\n", ("::ffff:203.0.113.7", 1, 0, 0)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ::1 ::1 1 2\r\n", None),
        (v2((IPv4Address("203.0.113.7"), 0), (IPv4Address("127.0.0.1"), 1)), ("203.0.113.7", 0)),
        (
            v2((IPv6Address("fe80::7"), 65535), (IPv6Address("::1"), 1), ProxyResultIPv6),
            ("fe80::7", 65535, 0, 0),
        ),
        (bytes(ProxyProtocolV2().pack(ProxyResultLocal())), None),
    ],
    ids=[
        "v1-ipv4",
        "v1-ipv6-canonical",
        "v1-ipv4-mapped",
        "v1-unknown",
        "v1-unknown-with-addresses",
        "v2-ipv4",
        "v2-ipv6-link-local-has-no-scope-field",
        "v2-local",
    ],
)
def test_accepted_peers_take_the_socket_modules_tuple_form(
    family: int, header: bytes, expected: Any
) -> None:
    assert split_header(header + b"rest", family=family) == (expected, b"rest")


@LISTENER_FAMILIES
@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (V2_UNIX, "names a Unix-socket client"),
        (V2_UNIX_NON_ASCII, "malformed PROXY header: .ascii. codec can.t decode byte 0xff"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 40000 1234\r\n", "scope id: fe80::1%eth0$"),
        (b"PROXY TCP4 1.2.3.4\x1b[2J 127.0.0.1 1 2\r\n", "not one line of ASCII"),
        (b"PROXY TCP6 fe80::1%\x1b]0;pwned\x07 ::1 1 2\r\n", "not one line of ASCII"),
        (b"PROXY TCP4 1.2.3.4\x00 127.0.0.1 1 2\r\n", "not one line of ASCII"),
        (b"PROXY TCP4 1.2.3.4 127.0.0.1 \t1 2\r\n", "not one line of ASCII"),
        ("PROXY TCP4 1.2.3.\u0664 127.0.0.1 1 2\r\n".encode(), "not one line of ASCII"),
        (b"PROXY TCP4 1.2.3.4 127.0.0.1 1 2\n", "ending in CRLF"),
        (b"PROXY TCP4 example.com 127.0.0.1 1 2\r\n", "malformed.*example\\.com"),
        (b"PROXY TCP4 1.2.3.4/8 127.0.0.1 1 2\r\n", "malformed"),
        (b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n", "malformed"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 127.0.0.1 65536 2\r\n", "malformed"),
        (b"PROXY TCP4 " + b"1" * 80 + b" 1.1.1.1 1 2\r\n", "malformed.*\\.\\.\\.$"),
    ],
    ids=[
        "v2-unix-family",
        "v2-unix-family-non-ascii-path",
        "v1-ipv6-scope-id",
        "v1-escape-sequence-in-address",
        "v1-control-characters-in-scope-id",
        "v1-nul-in-address",
        "v1-tab-in-port",
        "v1-non-ascii-digit",
        "v1-no-crlf",
        "v1-host-name-not-ip",
        "v1-cidr-not-ip",
        "v1-ipv6-as-tcp4",
        "v1-ipv4-as-tcp6",
        "v1-port-out-of-range",
        "v1-long-address-truncated",
    ],
)
def test_unacceptable_headers_fail_with_a_loggable_reason(
    family: int, header: bytes, reason: str
) -> None:
    with pytest.raises(ProxyHeaderError, match=reason) as caught:
        split_header(header + b"rest", family=family)
    assert_loggable(str(caught.value))
    assert len(str(caught.value)) < 200


def test_split_header_needs_a_listener_family() -> None:
    with pytest.raises(ValueError, match="address family"):
        split_header(V1, family=socket.AF_PACKET)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text: 1.2.3.4", "plain text: 1.2.3.4"),
        ("a\\b", "a\\\\b"),
        ("\r\n\x1b[2J\x00\x7f", "\\x0d\\x0a\\x1b[2J\\x00\\x7f"),
        ("caf\u00e9 \u2028 \U0001f600", "caf\\xe9 \\u2028 \\U0001f600"),
        ("\udcff", "\\udcff"),
        (b"\xff\xfe\\\n ok", "\\xff\\xfe\\\\\\x0a ok"),
    ],
    ids=["plain", "backslash", "control", "non-ascii", "lone-surrogate", "bytes"],
)
def test_printable_escapes_what_a_terminal_or_log_would_act_on(
    text: str | bytes, shown: str
) -> None:
    assert printable(text) == shown
    assert_loggable(printable(text))


def test_printable_escapes_are_reversible() -> None:
    every = "".join(map(chr, range(0, 0x110000, 97)))
    shown = printable(every, limit=10**7)
    assert_loggable(shown)
    assert shown.encode().decode("unicode_escape") == every
    raw = bytes(range(256))
    assert printable(raw, limit=10**4).encode().decode("unicode_escape").encode("latin-1") == raw


def test_printable_truncates_to_the_limit_with_a_marker() -> None:
    assert printable("a" * 80) == "a" * 80
    assert printable("a" * 81) == "a" * 77 + "..."
    assert printable(b"x" * 10**6, limit=10) == "xxxxxxx..."
    # An escape is kept whole or dropped whole.
    assert printable("\x00" * 5, limit=10) == "\\x00..."
    assert printable("ab\x00", limit=3) == "..."
    with pytest.raises(ValueError, match="at least 3"):
        printable("x", limit=2)


def test_parse_networks_takes_cidrs_and_bare_addresses() -> None:
    assert parse_networks([" 10.0.0.0/8", "192.0.2.1", "2001:db8::/32 ", "::1"]) == (
        IPv4Network("10.0.0.0/8"),
        IPv4Network("192.0.2.1/32"),
        IPv6Network("2001:db8::/32"),
        IPv6Network("::1/128"),
    )
    assert parse_networks([]) == ()
    assert parse_networks(DEFAULT_PROXY_ALLOW) == (
        IPv4Network("127.0.0.0/8"),
        IPv6Network("::1/128"),
    )


def test_a_star_means_any_source() -> None:
    assert parse_networks(["*"]) is None
    assert parse_networks(["10.0.0.0/8", " * "]) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("10.0.0.5/8", "'10.0.0.5/8' has host bits set: did you mean 10.0.0.0/8?"),
        ("balancer.internal", "'balancer.internal' is not a CIDR"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not a CIDR"),
        ("", "'' is not a CIDR"),
        ("fe80::%eth0/64", "'fe80::%eth0/64': a scope id"),
        ("**", "'\\*\\*' is not a CIDR"),
    ],
    ids=["host-bits-set", "host-name", "prefix-too-long", "empty", "scope-id", "double-star"],
)
def test_parse_networks_names_the_bad_entry(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_networks(["127.0.0.1", spec, "*"])
    assert "\n" not in str(caught.value)


LOOPBACK = parse_networks(DEFAULT_PROXY_ALLOW)
BALANCERS = parse_networks(["10.1.0.0/16", "2001:db8::/32"])


@pytest.mark.parametrize(
    ("peer", "networks", "trusted"),
    [
        (("127.0.0.1", 5000), LOOPBACK, True),
        (("127.8.9.10", 5000), LOOPBACK, True),
        (("203.0.113.7", 5000), LOOPBACK, False),
        (("::1", 5000, 0, 0), LOOPBACK, True),
        (("2001:db8::1", 5000, 0, 0), LOOPBACK, False),
        (("::ffff:127.0.0.1", 5000, 0, 0), LOOPBACK, True),
        (("::ffff:203.0.113.7", 5000, 0, 0), LOOPBACK, False),
        (("10.1.2.3", 5000), BALANCERS, True),
        (("10.2.0.1", 5000), BALANCERS, False),
        (("::ffff:10.1.2.3", 5000, 0, 0), BALANCERS, True),
        (("2001:db8:7::1", 5000, 0, 0), BALANCERS, True),
        (("fe80::1%eth0", 5000, 0, 2), parse_networks(["fe80::/64"]), True),
        (("fe80::1%eth0", 5000, 0, 2), LOOPBACK, False),
        (("203.0.113.7", 5000), None, True),
        (("2001:db8::1", 5000, 0, 0), None, True),
        (("203.0.113.7", 5000), (), False),
        ("", (), True),
        ("/run/aioserver.sock", (), True),
        (b"\x00abstract", (), True),
        (None, (), True),
        (("not an address", 5000), LOOPBACK, False),
        ((), LOOPBACK, False),
        (5000, LOOPBACK, False),
    ],
    ids=[
        "v4-loopback",
        "v4-loopback-range",
        "v4-elsewhere",
        "v6-loopback",
        "v6-elsewhere",
        "v4-mapped-loopback",
        "v4-mapped-elsewhere",
        "v4-balancer",
        "v4-not-balancer",
        "v4-mapped-balancer",
        "v6-balancer",
        "v6-link-local-with-scope",
        "v6-link-local-not-allowed",
        "any-v4",
        "any-v6",
        "no-networks",
        "unix-unnamed",
        "unix-path",
        "unix-abstract",
        "unix-none",
        "garbage-host",
        "empty-tuple",
        "not-a-peer",
    ],
)
def test_is_trusted(peer: Any, networks: Any, trusted: bool) -> None:
    assert is_trusted(peer, networks) is trusted


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--proxy-allow", "127.0.0.1", "--proxy-allow", "10.0.0.5/8"], {}),
        ([], {"AIOSERVER_PROXY_ALLOW": "127.0.0.1, nonsense"}),
    ],
    ids=["flag", "variable"],
)
def test_the_command_refuses_a_bad_proxy_allow_as_a_bad_argument(
    argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--proxy-protocol", *argv], environ)
    assert exited.value.code == 2
    assert "aioserver: error: argument --proxy-allow: '" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "environ", "allowed"),
    [
        ([], {}, list(DEFAULT_PROXY_ALLOW)),
        (["--proxy-allow", "10.0.0.0/8", "--proxy-allow", "*"], {}, ["10.0.0.0/8", "*"]),
        ([], {"AIOSERVER_PROXY_ALLOW": "10.0.0.0/8, ::1"}, ["10.0.0.0/8", "::1"]),
        (["--proxy-allow", "*"], {"AIOSERVER_PROXY_ALLOW": "10.0.0.0/8"}, ["*"]),
    ],
    ids=["default", "flags", "variable", "flag-over-variable"],
)
def test_the_command_passes_proxy_allow_to_run(
    argv: list[str],
    environ: dict[str, str],
    allowed: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options: dict[str, Any] = {}
    monkeypatch.setattr(cli, "run", lambda handler, **kwargs: options.update(kwargs) or 0)
    assert cli.main(["--proxy-protocol", *argv], environ) == 0
    assert options["proxy_protocol"] is True
    assert options["proxy_allow"] == allowed


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
