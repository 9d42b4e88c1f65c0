"""aioserver.sockets: one way to bind listening sockets, tried on real sockets.

TCP only ever on loopback (127.0.0.1, 127.0.0.2, ::1); Unix sockets under tmp_path.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aioserver import sockets as sockets_module
from aioserver.sockets import (
    ResolvedAddress,
    bind_resolved,
    bind_sockets,
    bind_sockets_async,
    bind_unix,
    clear_stale_socket,
    resolve_addresses,
    resolve_addresses_async,
)

# More than enough clients to fill a listen(0) backlog, which holds one or two.
MAX_BACKLOG_FILL = 64
# A check that must not block answers within this; a hang is caught by the timeout mark.
PROMPT = 2.0


def open_fds() -> int:
    """How many file descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd"))


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(
    not ipv6_loopback_works(),
    reason="IPv6 is unavailable here: socket.has_ipv6 is false or ::1 cannot be bound",
)


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    """Sockets a test made, closed at its end."""
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def listener(host: str, port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, port))
    sock.listen()
    return sock


def unix_listener(path: Path, backlog: int = 8) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(backlog)
    return sock


def accepts(sock: socket.socket) -> bool:
    """True if a client can connect to `sock` and be accepted."""
    address = sock.getsockname()
    with socket.socket(sock.family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(address)
        sock.settimeout(5)
        peer, _ = sock.accept()
        peer.close()
        sock.settimeout(None)
    return True


def has_errno(code: int) -> Callable[[OSError], bool]:
    """For pytest.raises: the error's errno is `code`."""
    return lambda error: error.errno == code


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


# Resolving.


def test_resolution_keeps_order_and_drops_repeats() -> None:
    addresses = resolve_addresses(["127.0.0.1", "localhost", "127.0.0.2", "127.0.0.1"], 0)
    assert addresses[0] == ResolvedAddress(
        socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, ("127.0.0.1", 0)
    )
    assert len(set(addresses)) == len(addresses)
    hosts = [address.sockaddr[0] for address in addresses]
    assert hosts.index("127.0.0.1") < hosts.index("127.0.0.2")


def test_no_host_means_every_interface() -> None:
    wildcards = {address.sockaddr[:2] for address in resolve_addresses([None], 1234)}
    assert ("0.0.0.0", 1234) in wildcards
    if socket.has_ipv6:
        assert ("::", 1234) in wildcards
    assert resolve_addresses([""], 1234) == resolve_addresses([None], 1234)


@pytest.mark.asyncio
async def test_async_resolution_matches_the_blocking_one() -> None:
    # Runs on asyncio's loop and on uvloop (see conftest): "localhost" goes through
    # loop.getaddrinfo, the literals and None are answered at once.
    hosts = ["localhost", "127.0.0.1", "::1", None]
    assert await resolve_addresses_async(hosts, 0) == resolve_addresses(hosts, 0)
    addresses = await resolve_addresses_async(["localhost"], 0)
    assert ("127.0.0.1", 0) in {address.sockaddr[:2] for address in addresses}


def test_async_lookup_runs_off_the_loop_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # A lookup that only finishes once a task on the loop lets it: were it run on
    # the loop's own thread, it would wait out its 5 s and say so.
    real_getaddrinfo = socket.getaddrinfo
    entered, released = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def gated_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        flags = kwargs.get("flags", args[3] if len(args) > 3 else 0)
        if not flags & socket.AI_NUMERICHOST:
            seen["thread"] = threading.current_thread()
            entered.set()
            seen["released"] = released.wait(5)
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", gated_getaddrinfo)

    async def main() -> list[ResolvedAddress]:
        lookup = asyncio.create_task(resolve_addresses_async(["localhost"], 0))
        await asyncio.to_thread(entered.wait, 5)
        released.set()
        return await lookup

    addresses = asyncio.run(main())
    assert seen["released"], "the lookup blocked the event loop"
    assert seen["thread"] is not threading.main_thread()
    assert addresses == resolve_addresses(["localhost"], 0)


def test_ip_literals_need_no_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = ["127.0.0.1", "::1", None, ""]

    async def main() -> list[ResolvedAddress]:
        async def no_lookup(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"looked up {args}")

        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", no_lookup)
        return await resolve_addresses_async(hosts, 0)

    assert asyncio.run(main()) == resolve_addresses(hosts, 0)


# Binding TCP sockets.


def test_port_zero_is_shared_across_addresses(opened: list[socket.socket]) -> None:
    opened += bind_sockets(host=["127.0.0.1", "127.0.0.2"], port=0)
    assert [sock.getsockname()[0] for sock in opened] == ["127.0.0.1", "127.0.0.2"]
    port = port_of(opened[0])
    assert port != 0
    assert port_of(opened[1]) == port
    assert all(accepts(sock) for sock in opened)


@needs_ipv6
def test_port_zero_is_shared_with_ipv6(opened: list[socket.socket]) -> None:
    opened += bind_sockets(host=["127.0.0.1", "::1"], port=0)
    ipv4, ipv6 = opened
    assert (ipv4.family, ipv6.family) == (socket.AF_INET, socket.AF_INET6)
    assert port_of(ipv4) != 0
    assert port_of(ipv6) == port_of(ipv4)
    assert ipv6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert accepts(ipv4)
    assert accepts(ipv6)


def test_sockets_come_back_blocking_and_listening(opened: list[socket.socket]) -> None:
    opened += bind_sockets(host="127.0.0.1", port=0, backlog=16)
    [sock] = opened
    assert sock.getblocking()
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


def test_reuse_port_sets_so_reuseport(opened: list[socket.socket]) -> None:
    opened += bind_sockets(host="127.0.0.1", port=0, reuse_port=True)
    assert opened[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    # ...so a second listener can share the port.
    opened += bind_sockets(host="127.0.0.1", port=port_of(opened[0]), reuse_port=True)
    assert port_of(opened[1]) == port_of(opened[0])


def test_names_for_one_address_bind_it_once(opened: list[socket.socket]) -> None:
    # "localhost" is 127.0.0.1 (maybe ::1 too): a second bind of it would fail.
    opened += bind_sockets(host=["127.0.0.1", "localhost", "127.0.0.1"], port=0)
    names = [sock.getsockname()[:2] for sock in opened]
    assert len(set(names)) == len(names)
    assert names[0] == ("127.0.0.1", port_of(opened[0]))


def test_address_in_use_closes_what_was_bound() -> None:
    with listener("127.0.0.2") as blocker:
        port = port_of(blocker)
        fds_before = open_fds()
        # 127.0.0.1 binds first, then 127.0.0.2 fails: the first must be closed.
        with pytest.raises(OSError, check=has_errno(errno.EADDRINUSE)):
            bind_sockets(host=["127.0.0.1", "127.0.0.2"], port=port)
        assert open_fds() == fds_before
        with listener("127.0.0.1", port):
            pass  # free again


@needs_ipv6
def test_address_in_use_on_ipv6_closes_what_was_bound() -> None:
    with listener("::1") as blocker:
        port = port_of(blocker)
        fds_before = open_fds()
        with pytest.raises(OSError, check=has_errno(errno.EADDRINUSE)):
            bind_sockets(host=["127.0.0.1", "::1"], port=port)
        assert open_fds() == fds_before


@pytest.mark.asyncio
async def test_async_address_in_use_closes_what_was_bound() -> None:
    with listener("127.0.0.2") as blocker:
        fds_before = open_fds()
        with pytest.raises(OSError, check=has_errno(errno.EADDRINUSE)):
            await bind_sockets_async(host=["127.0.0.1", "127.0.0.2"], port=port_of(blocker))
        assert open_fds() == fds_before


def test_a_family_the_kernel_lacks_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    # As asyncio.start_server does for "::" on a kernel without IPv6.
    real_new_socket = sockets_module._new_socket

    def no_ipv6(address: ResolvedAddress) -> socket.socket:
        if address.family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real_new_socket(address)

    monkeypatch.setattr(sockets_module, "_new_socket", no_ipv6)
    ipv4 = ResolvedAddress(socket.AF_INET, socket.SOCK_STREAM, 6, ("127.0.0.1", 0))
    ipv6 = ResolvedAddress(socket.AF_INET6, socket.SOCK_STREAM, 6, ("::1", 0, 0, 0))
    [sock] = bind_resolved([ipv6, ipv4], 0)
    with sock:
        assert sock.getsockname()[0] == "127.0.0.1"
    with pytest.raises(OSError, check=has_errno(errno.EAFNOSUPPORT)):
        bind_resolved([ipv6], 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"port": -1}, "port must be"),
        ({"port": 65536}, "port must be"),
        ({"backlog": 0}, "backlog must be"),
        ({"host": []}, "no host"),
    ],
)
def test_bad_options_are_value_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bind_sockets(**{"host": "127.0.0.1", "port": 0, **options})


def test_no_address_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no address"):
        bind_resolved([], 0)


@pytest.mark.asyncio
async def test_async_sockets_serve_through_start_server() -> None:
    [sock] = await bind_sockets_async(host="localhost", port=0)
    assert sock.getsockname()[0] == "127.0.0.1"

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        writer.close()

    server = await asyncio.start_server(echo, sock=sock)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(sock))
        writer.write(b"hello\n")
        assert await reader.readline() == b"hello\n"
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
        sock.close()


# Unix sockets.


def test_unix_socket_is_created(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with bind_unix(path) as sock:
        assert sock.family == socket.AF_UNIX
        assert sock.getblocking()
        assert sock.getsockname() == str(path)
        assert accepts(sock)


def test_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s"
    unix_listener(path).close()  # a server that died: its file stays
    assert path.is_socket()
    [sock] = bind_sockets(unix=str(path))
    with sock:
        assert accepts(sock)


def test_regular_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_text("keep me")
    fds_before = open_fds()
    with pytest.raises(FileExistsError, check=has_errno(errno.EEXIST)):
        bind_unix(path)
    assert path.read_text() == "keep me"
    assert open_fds() == fds_before


def test_live_unix_server_is_in_use(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with unix_listener(path) as live:
        fds_before = open_fds()
        with pytest.raises(OSError, check=has_errno(errno.EADDRINUSE)):
            bind_unix(path)
        assert open_fds() == fds_before
        assert path.is_socket()
        assert accepts(live)


@pytest.mark.timeout(10)
def test_live_unix_server_with_full_backlog_is_in_use(tmp_path: Path) -> None:
    # A blocking probe would wait for room in the backlog forever.
    path = tmp_path / "s"
    clients: list[socket.socket] = []
    with unix_listener(path, backlog=0):
        try:
            for _ in range(MAX_BACKLOG_FILL):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(client)
                client.setblocking(False)
                try:
                    client.connect(str(path))
                except BlockingIOError:
                    break
            else:
                pytest.fail(f"the backlog took {MAX_BACKLOG_FILL} clients without filling")
            started = time.monotonic()
            with pytest.raises(OSError, check=has_errno(errno.EADDRINUSE)):
                clear_stale_socket(path)
            assert time.monotonic() - started < PROMPT
            assert path.is_socket()
        finally:
            for client in clients:
                client.close()


def test_live_datagram_socket_is_in_use(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as live:
        live.bind(str(path))
        with pytest.raises(OSError, check=has_errno(errno.EADDRINUSE)):
            clear_stale_socket(path)
        assert path.is_socket()


def test_nothing_to_clear(tmp_path: Path) -> None:
    clear_stale_socket(tmp_path / "absent")
    clear_stale_socket("\0aioserver-test-absent")


def test_unix_bind_failure_closes_its_socket(tmp_path: Path) -> None:
    fds_before = open_fds()
    with pytest.raises(FileNotFoundError):
        bind_unix(tmp_path / "no-such-directory" / "s")
    assert open_fds() == fds_before


def test_abstract_unix_address(opened: list[socket.socket]) -> None:
    name = f"\0aioserver-test-{uuid.uuid4().hex}"
    opened += bind_sockets(unix=name)
    assert opened[0].getsockname() == name.encode()
    assert accepts(opened[0])


@pytest.mark.asyncio
async def test_async_unix_socket_serves_through_start_unix_server(tmp_path: Path) -> None:
    path = tmp_path / "s"
    unix_listener(path).close()  # stale
    [sock] = await bind_sockets_async(unix=path)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        writer.close()

    server = await asyncio.start_unix_server(echo, sock=sock)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"hello\n")
        assert await reader.readline() == b"hello\n"
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
        sock.close()
