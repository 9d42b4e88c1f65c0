"""The PROXY protocol (v1 and v2) header that a load balancer sends first.

HAProxy, nginx and the cloud balancers open each connection with one header
naming the real client. This module finds where that header ends in the bytes
received; the `proxy-protocol` package parses and validates it.
"""

from __future__ import annotations

from typing import Any

from proxyprotocol.detect import ProxyProtocolDetect

__all__ = ["MAX_V1_HEADER", "ProxyHeaderError", "split_header"]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
# The v1 specification's own bound: 107 bytes, CRLF included.
MAX_V1_HEADER = 107

_parser = ProxyProtocolDetect()


class ProxyHeaderError(ValueError):
    """The connection did not start with a valid PROXY protocol header."""


def split_header(data: bytes) -> tuple[Any, bytes] | None:
    """Split a PROXY header off the start of `data`.

    Returns None while the header is incomplete, else `(peer, rest)`: the
    client's address as a socket address tuple (None for a LOCAL or UNKNOWN
    header, such as a balancer's own health check) and the bytes after it.
    Raises ProxyHeaderError when `data` cannot start with a valid header.
    """
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
    else:
        raise ProxyHeaderError("no PROXY protocol header")
    if len(data) < end:
        return None
    try:
        result = _parser.unpack(data[:end])
    except Exception as error:  # any failure to parse untrusted bytes means malformed
        raise ProxyHeaderError(f"malformed PROXY header: {error or type(error).__name__}") from None
    return result.peername, data[end:]
