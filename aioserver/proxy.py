"""The PROXY protocol (v1 and v2) header that a load balancer sends first.

HAProxy, nginx and the cloud balancers open each connection with one header
naming the real client. This module finds where that header ends in the bytes
received; the `proxy-protocol` package parses it, and `split_header` then checks
the client it names before anyone uses it. `parse_networks` and `is_trusted`
decide which balancers may send a header at all.

Everything a client sends is untrusted: error messages render it with
`printable`, so they are safe to log.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias, cast

from proxyprotocol.detect import ProxyProtocolDetect
from proxyprotocol.result import is_ipv4, is_ipv6, is_local, is_unix, is_unknown

__all__ = [
    "DEFAULT_PROXY_ALLOW",
    "MAX_V1_HEADER",
    "Network",
    "Peer",
    "ProxyHeaderError",
    "is_trusted",
    "parse_networks",
    "printable",
    "split_header",
]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
# The v1 specification's own bound: 107 bytes, CRLF included.
MAX_V1_HEADER = 107
# Loopback only (as uvicorn's --forwarded-allow-ips): a remote balancer must be named explicitly.
DEFAULT_PROXY_ALLOW = ("127.0.0.0/8", "::1/128")
# The proxy-allow entry that trusts every source (parse_networks returns None).
ANY_SOURCE = "*"
# Long enough to recognise a bad address, short enough to keep a log line one line.
PRINTABLE_LIMIT = 80
# Ends a `printable` result that was cut short.
TRUNCATED = "..."

# The v1 line is US-ASCII text; anything outside space..tilde is refused unparsed.
_V1_TEXT = frozenset(range(0x20, 0x7F))
# AF_UNIX is missing from some Windows builds of Python.
_LISTENER_FAMILIES = frozenset(
    {socket.AF_INET, socket.AF_INET6, getattr(socket, "AF_UNIX", socket.AF_INET)}
)
_MAX_PORT = 65535

_parser = ProxyProtocolDetect()

# A client address in socket module form: (host, port) or (host, port, flowinfo, scope_id).
Peer: TypeAlias = tuple[str, int] | tuple[str, int, int, int]
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyHeaderError(ValueError):
    """The connection did not start with a valid, acceptable PROXY protocol header.

    The message is printable ASCII: client-sent text in it is escaped.
    """


def printable(text: str | bytes, limit: int = PRINTABLE_LIMIT) -> str:
    """`text` (client-controlled) as printable ASCII, safe to put in a log line.

    Backslashes, control characters and anything outside ASCII are escaped as
    repr does (\\\\, \\xNN, \\uNNNN, \\UNNNNNNNN); bytes are taken one by one.
    A result longer than `limit` characters is cut, between escapes, to at most
    `limit` characters ending in "...". `limit` must be at least 3.
    """
    if limit < len(TRUNCATED):
        raise ValueError(f"limit must be at least {len(TRUNCATED)}, not {limit}")
    codes: Iterable[int] = text if isinstance(text, bytes) else map(ord, text)
    pieces: list[str] = []
    used = 0
    # Stops one piece past the limit, so a huge input costs no more than a short one.
    for code in codes:
        piece = _escape(code)
        pieces.append(piece)
        used += len(piece)
        if used > limit:
            room = limit - len(TRUNCATED)
            while used > room:
                used -= len(pieces.pop())
            return "".join(pieces) + TRUNCATED
    return "".join(pieces)


def _escape(code: int) -> str:
    if code == 0x5C:
        return "\\\\"
    if 0x20 <= code < 0x7F:
        return chr(code)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def split_header(data: bytes, *, family: int) -> tuple[Peer | None, bytes] | None:
    """Split a PROXY header off the start of `data`, received on a listening
    socket of address `family` (AF_INET, AF_INET6 or AF_UNIX; else ValueError).

    Returns None while the header is incomplete, else `(peer, rest)`: the bytes
    after the header, and the client's address as the socket module gives it,
    `(host, port)` for IPv4 or `(host, port, 0, 0)` for IPv6 with `host` in
    canonical form; None for a LOCAL or UNKNOWN header, such as a balancer's
    own health check. TCP and Unix listeners accept the same clients: HAProxy
    on a Unix socket still names TCP clients.

    Raises ProxyHeaderError when `data` cannot start with a valid header, or
    the header names a Unix-socket client, an IPv6 address with a scope id, or
    anything that is not an IP address literal and a port.
    """
    if family not in _LISTENER_FAMILIES:
        raise ValueError(f"not a listening socket's address family: {family!r}")
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < V2_FIXED:
        return None
    if data.startswith(V2_SIGNATURE):
        end = V2_FIXED + int.from_bytes(data[14:16], "big")
    elif data.startswith(V1_SIGNATURE[: len(data)]) and len(data) < len(V1_SIGNATURE):
        return None
    elif data.startswith(V1_SIGNATURE):
        end = data.find(b"\n", 0, MAX_V1_HEADER) + 1
        if not end:
            if len(data) >= MAX_V1_HEADER:
                raise ProxyHeaderError(f"PROXY v1 header longer than {MAX_V1_HEADER} bytes")
            return None
        # The parser would let through a tab in a port, or anything in a scope id.
        if not data.endswith(b"\r\n", 0, end) or not _V1_TEXT.issuperset(data[: end - 2]):
            raise ProxyHeaderError(
                "PROXY v1 header not one line of ASCII text ending in CRLF:"
                f" {printable(data[:end])}"
            )
    else:
        raise ProxyHeaderError("no PROXY protocol header")
    if len(data) < end:
        return None
    try:
        result = _parser.unpack(data[:end])
    except Exception as error:  # any failure to parse untrusted bytes means malformed
        # The parser's messages quote the input.
        why = printable(str(error) or type(error).__name__)
        raise ProxyHeaderError(f"malformed PROXY header: {why}") from None
    if is_local(result) or is_unknown(result):
        return None, data[end:]
    if is_unix(result):
        raise ProxyHeaderError(
            "PROXY header names a Unix-socket client; only IPv4 and IPv6 clients are accepted"
        )
    if is_ipv4(result):
        return _checked_peer(result.peername, 4), data[end:]
    if is_ipv6(result):
        return _checked_peer(result.peername, 6), data[end:]
    raise ProxyHeaderError(f"PROXY header of unknown type {result.type.name}")


def _checked_peer(peername: Any, version: int) -> Peer:
    """`peername` from the parser as a Peer of IP `version`, or ProxyHeaderError."""
    size = 2 if version == 4 else 4
    if not isinstance(peername, tuple) or len(peername) != size:
        raise ProxyHeaderError(f"PROXY header names no IPv{version} socket address")
    host, port, *rest = peername
    if not isinstance(host, str):
        raise ProxyHeaderError(f"PROXY header names no IPv{version} address")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ProxyHeaderError(f"PROXY header names no IP address: {printable(host)}") from None
    if address.version != version:
        raise ProxyHeaderError(f"PROXY header names {printable(host)} as an IPv{version} address")
    # A scope id names an interface of the balancer's host, meaningless here.
    if isinstance(address, ipaddress.IPv6Address) and (address.scope_id is not None or any(rest)):
        raise ProxyHeaderError(
            f"PROXY header names an IPv6 address with a scope id: {printable(host)}"
        )
    # bool is an int, but never a port.
    if type(port) is not int or not 0 <= port <= _MAX_PORT:
        raise ProxyHeaderError(f"PROXY header names no port: {printable(repr(port))}")
    if version == 4:
        return str(address), port
    mapped = cast(ipaddress.IPv6Address, address).ipv4_mapped
    if mapped is not None:
        # As the socket module writes it (and str() does from Python 3.13 on).
        return f"::ffff:{mapped}", port, 0, 0
    return str(address), port, 0, 0


def parse_networks(specs: Iterable[str]) -> tuple[Network, ...] | None:
    """The networks that `specs` name: each a CIDR (10.0.0.0/8) or a bare
    address (that one host); "*" among them means any source, returned as None.

    Surrounding whitespace is ignored. Raises ValueError, one line naming the
    first bad entry, for anything else, including host bits set in a CIDR
    (10.0.0.5/8) and scope ids.
    """
    networks: list[Network] = []
    any_source = False
    for spec in specs:
        text = spec.strip()
        if text == ANY_SOURCE:
            any_source = True
            continue
        if "%" in text:
            raise ValueError(f"{spec!r}: a scope id (%) cannot be part of a network")
        try:
            networks.append(ipaddress.ip_network(text))
            continue
        except ValueError:
            pass
        try:
            # Says which network was meant rather than quietly trusting a wider one.
            meant = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"{spec!r} is not a CIDR (such as 10.0.0.0/8), an IP address or {ANY_SOURCE}"
            ) from None
        raise ValueError(f"{spec!r} has host bits set: did you mean {meant}?")
    return None if any_source else tuple(networks)


def is_trusted(peer: Any, networks: Sequence[Network] | None) -> bool:
    """Whether the socket peer `peer` may send a PROXY header.

    `peer` is the real peer, as getpeername gives it: a tuple for TCP, or a
    path ('' or a str or bytes path, or None) for a client of a Unix socket,
    which is always trusted, since only local processes can connect. Pass
    None only for a Unix socket. `networks` is parse_networks' result: None
    trusts every TCP peer. An IPv4-mapped IPv6 peer (::ffff:127.0.0.1) also
    matches IPv4 networks; anything unrecognised is not trusted.
    """
    if peer is None or isinstance(peer, str | bytes):
        return True
    if networks is None:
        return True
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    # getnameinfo puts a link-local peer's interface after "%"; networks have none.
    host = peer[0].partition("%")[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    # `in` is False, not an error, across IP versions.
    return any(candidate in network for candidate in candidates for network in networks)
