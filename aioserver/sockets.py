"""Listening sockets, bound one way for every caller.

`Server.start` (inside an event loop) and the worker supervisor (before any
loop exists) both bind here. Host names are resolved first: by
`resolve_addresses`, or by `resolve_addresses_async`, which asks the running
loop so that a DNS lookup never blocks it. Then `bind_resolved`, the one routine
that binds TCP sockets, makes, binds and listens on one socket per address. A
Unix socket path goes through `bind_unix`, which first replaces a stale socket
file left behind by a server that died (`clear_stale_socket`).

`bind_sockets` and `bind_sockets_async` put these together. The sockets they
return are in blocking mode, as created: `asyncio.start_server(sock=...)` makes
them non-blocking itself, and a supervisor hands them to its workers as they are.
On any failure every socket made so far is closed and the OSError propagates
unchanged, so its errno says what went wrong (EADDRINUSE, EADDRNOTAVAIL,
EACCES, EEXIST).

Sockets bound by someone else are taken over here too: `inherited_sockets` finds
the ones a service manager passed by socket activation (systemd's LISTEN_FDS
protocol, as sd_listen_fds(3) reads it), `sockets_from_fds` wraps descriptors
named by number (`--fd`). Either checks that each is a listening stream socket
and makes it close-on-exec, or raises `InheritedSocketError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "LISTEN_FDS_START",
    "MAX_BACKLOG",
    "InheritedSocketError",
    "ResolvedAddress",
    "bind_resolved",
    "bind_sockets",
    "bind_sockets_async",
    "bind_unix",
    "clear_stale_socket",
    "format_address",
    "inherited_sockets",
    "resolve_addresses",
    "resolve_addresses_async",
    "sockets_from_fds",
]

# Loopback: a service is never exposed to the network unless asked to be.
DEFAULT_HOST = "127.0.0.1"
# The fixed port of the C++ design this project grows from.
DEFAULT_PORT = 1234
# As uvicorn: enough for a burst of thousands of connects; the kernel caps it at
# net.core.somaxconn anyway.
DEFAULT_BACKLOG = 2048
# listen() takes a C int, and Linux caps the queue at net.core.somaxconn (4096
# by default) anyway: a larger backlog is a typo, not a plan.
MAX_BACKLOG = 65535
# TCP port numbers are 16 bits; 0 asks the kernel to pick a free one.
MAX_PORT = 65535
# Addresses to listen on, not to connect to: a None host means every interface
# (0.0.0.0 and ::), as in asyncio.start_server.
PASSIVE_FLAGS = socket.AI_PASSIVE
# The same, answered from the arguments alone (an IP literal or None, and a port
# number) without a lookup, so it may run on the event loop's thread; any other
# name fails at once with EAI_NONAME.
NUMERIC_FLAGS = PASSIVE_FLAGS | socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
# Socket activation: the first descriptor passed (SD_LISTEN_FDS_START), and the
# variables that say how many, for which process, and their names.
LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ResolvedAddress(NamedTuple):
    """One address to listen on, as getaddrinfo gave it (canonical name dropped)."""

    family: socket.AddressFamily
    type: socket.SocketKind
    proto: int
    sockaddr: tuple[Any, ...]


def resolve_addresses(hosts: Iterable[str | None], port: int) -> list[ResolvedAddress]:
    """Every address the `hosts` name for listening on `port`, in order, each once.

    A host of None or "" means every interface. Blocks for as long as name
    resolution takes: in an event loop, use `resolve_addresses_async`. Raises
    socket.gaierror (an OSError) for a name that does not resolve.
    """
    _check_port(port)
    found: list[ResolvedAddress] = []
    for host in _names(hosts):
        found += _addresses(
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=PASSIVE_FLAGS)
        )
    return _unique(found)


async def resolve_addresses_async(hosts: Iterable[str | None], port: int) -> list[ResolvedAddress]:
    """`resolve_addresses` for a running event loop, which it never blocks.

    IP literals and None are resolved at once; any other name through
    `loop.getaddrinfo`, which looks it up off the loop's thread (asyncio's
    default executor, libuv's thread pool for uvloop).
    """
    _check_port(port)
    loop = asyncio.get_running_loop()
    found: list[ResolvedAddress] = []
    for host in _names(hosts):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=NUMERIC_FLAGS)
        except socket.gaierror as error:
            if error.errno != socket.EAI_NONAME:
                raise
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=PASSIVE_FLAGS)
        found += _addresses(infos)
    return _unique(found)


def bind_resolved(
    addresses: Iterable[ResolvedAddress],
    port: int,
    *,
    backlog: int = DEFAULT_BACKLOG,
    reuse_port: bool = False,
) -> list[socket.socket]:
    """Make, bind and listen on a TCP socket for each address, on `port`.

    Each socket has SO_REUSEADDR (a restart need not wait out TIME_WAIT), and
    SO_REUSEPORT with `reuse_port`; an IPv6 one has IPV6_V6ONLY, so that :: and
    0.0.0.0 can both be bound. Each address is bound on `port`, whatever port it
    was resolved with; with port 0 the first socket gets a free port from the
    kernel, and every other socket is bound on that same port.

    An address whose family the kernel lacks (socket() fails with EAFNOSUPPORT,
    such as :: with IPv6 disabled) is skipped, as asyncio.start_server does,
    unless no other address binds. On any other failure every socket made so
    far is closed and the OSError propagates unchanged. ValueError if there is
    no address at all.
    """
    _check_port(port)
    _check_backlog(backlog)
    sockets: list[socket.socket] = []
    unsupported: OSError | None = None
    try:
        for address in addresses:
            try:
                sock = _new_socket(address)
            except OSError as error:
                if error.errno != errno.EAFNOSUPPORT:
                    raise
                unsupported = unsupported or error
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(_on_port(address.sockaddr, port))
            sock.listen(backlog)
            # With port 0, every address shares the port the kernel gave the first.
            port = port or int(sock.getsockname()[1])
        if not sockets:
            if unsupported is not None:
                raise unsupported
            raise ValueError("no address to listen on")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def clear_stale_socket(path: str | os.PathLike[str]) -> None:
    """Remove a socket file no server listens on; refuse to touch anything else.

    Nothing there (or a Linux abstract address, which has no file): nothing to
    do. A file that is not a socket: FileExistsError (EEXIST). A socket a server
    listens on, even one whose backlog is full: OSError(EADDRINUSE). Never
    blocks: the probe that tells a live server from a dead one is non-blocking.
    """
    name = os.fspath(path)
    if _is_abstract(name):
        return
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(name)
        except ConnectionRefusedError:
            # Left behind by a server that died (or closed without removing it).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            return
        except FileNotFoundError:
            return  # removed since the stat
        except BlockingIOError:
            pass  # a live server whose backlog is full
        except OSError as error:
            # EPROTOTYPE: a live socket of another type (datagram) is bound there.
            if error.errno != errno.EPROTOTYPE:
                raise
    raise OSError(errno.EADDRINUSE, "a server is already listening on", name)


def bind_unix(path: str | os.PathLike[str], backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """Listen on a Unix socket at `path`, replacing a stale socket file first
    (see `clear_stale_socket`). The socket is closed if binding fails."""
    _check_backlog(backlog)
    clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_sockets(
    *,
    host: str | Sequence[str | None] | None = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    unix: str | os.PathLike[str] | None = None,
    backlog: int = DEFAULT_BACKLOG,
    reuse_port: bool = False,
) -> list[socket.socket]:
    """The listening sockets for these options, before any event loop runs.

    `host` is one address or name, several, or None for every interface;
    `unix` is a Unix socket path to listen on instead of host and port (where
    reuse_port does not apply). Raises OSError (e.g. EADDRINUSE) with nothing
    left open, ValueError for an out-of-range port or backlog or no host.
    Resolving a name may block: in an event loop, use `bind_sockets_async`.
    """
    _check_backlog(backlog)
    if unix is not None:
        return [bind_unix(unix, backlog)]
    addresses = resolve_addresses(_host_list(host), port)
    return bind_resolved(addresses, port, backlog=backlog, reuse_port=reuse_port)


async def bind_sockets_async(
    *,
    host: str | Sequence[str | None] | None = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    unix: str | os.PathLike[str] | None = None,
    backlog: int = DEFAULT_BACKLOG,
    reuse_port: bool = False,
) -> list[socket.socket]:
    """`bind_sockets` inside an event loop: names are resolved without blocking it."""
    _check_backlog(backlog)
    if unix is not None:
        return [bind_unix(unix, backlog)]
    addresses = await resolve_addresses_async(_host_list(host), port)
    return bind_resolved(addresses, port, backlog=backlog, reuse_port=reuse_port)


class InheritedSocketError(OSError):
    """A descriptor handed over that cannot be served on (not open, not a socket,
    not a listening stream socket), or LISTEN_* variables that make no sense.
    Its str() is the reason in one line, naming the descriptor."""

    def __str__(self) -> str:
        return str(self.strerror)


def inherited_sockets(
    environ: MutableMapping[str, str] | None = None, *, unset: bool = True
) -> list[socket.socket] | None:
    """The listening sockets a service manager passed to this process, or None.

    As sd_listen_fds(3): LISTEN_PID must be this process's id and LISTEN_FDS
    the number of descriptors passed, from fd 3 on; otherwise (not set, or set
    for another process, as a parent's variables inherited) None, and nothing
    is touched. LISTEN_FDS=0 is None too. With `unset` (the default), LISTEN_PID,
    LISTEN_FDS and LISTEN_FDNAMES are removed from `environ` (os.environ by
    default, and so from the real environment) in every case, so that no
    process started from here takes them for its own. Each socket is checked
    and made close-on-exec as `sockets_from_fds` does; InheritedSocketError
    for malformed variables or a descriptor that is not a listening stream socket.
    """
    env = os.environ if environ is None else environ
    pid_text, count_text = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if unset:
        for name in LISTEN_VARIABLES:
            env.pop(name, None)
    if not pid_text or not count_text:
        return None
    try:
        pid = int(pid_text)
    except ValueError:
        raise InheritedSocketError(
            errno.EINVAL, f"LISTEN_PID={pid_text!r} is not a process id"
        ) from None
    if pid != os.getpid():
        return None
    try:
        count = int(count_text)
    except ValueError:
        count = -1
    if count < 0:
        raise InheritedSocketError(
            errno.EINVAL, f"LISTEN_FDS={count_text!r} is not a number of descriptors"
        )
    if count == 0:
        return None
    return sockets_from_fds(range(LISTEN_FDS_START, LISTEN_FDS_START + count))


def sockets_from_fds(fds: Iterable[int]) -> list[socket.socket]:
    """Listening sockets for descriptors this process was handed (each once).

    Each must be an open socket of type SOCK_STREAM that listens (TCP or Unix);
    it is made close-on-exec, and returned in the mode it came in. On failure
    InheritedSocketError says which descriptor and why, and the descriptors
    are left open and as they were (the sockets made so far are detached, not
    closed).
    """
    sockets: list[socket.socket] = []
    try:
        for fd in dict.fromkeys(fds):
            sockets.append(_listening_socket(fd))
    except BaseException:
        for sock in sockets:
            sock.detach()
        raise
    for sock in sockets:
        sock.set_inheritable(False)
    return sockets


def _listening_socket(fd: int) -> socket.socket:
    if fd < 0:
        raise InheritedSocketError(errno.EBADF, f"fd {fd} is not a file descriptor")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        raise InheritedSocketError(error.errno, f"fd {fd} is not open") from None
    if not stat.S_ISSOCK(mode):
        raise InheritedSocketError(errno.ENOTSOCK, f"fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        kind = sock.type
    except OSError as error:
        sock.detach()
        raise InheritedSocketError(error.errno, f"fd {fd}: {error.strerror}") from None
    if kind != socket.SOCK_STREAM or not listening:
        sock.detach()
        what = "a stream socket" if kind != socket.SOCK_STREAM else "listening"
        raise InheritedSocketError(errno.EINVAL, f"fd {fd} is not {what}")
    return sock


def _host_list(host: str | Sequence[str | None] | None) -> list[str | None]:
    return [host] if host is None or isinstance(host, str) else list(host)


def _names(hosts: Iterable[str | None]) -> list[str | None]:
    # "" means every interface, as in asyncio.start_server; getaddrinfo rejects it.
    names = [host or None for host in hosts]
    if not names:
        raise ValueError("no host to listen on")
    return names


def _addresses(infos: Iterable[tuple[Any, Any, int, str, Any]]) -> list[ResolvedAddress]:
    return [
        ResolvedAddress(family, kind, proto, tuple(sockaddr))
        for family, kind, proto, _canonname, sockaddr in infos
    ]


def _unique(addresses: list[ResolvedAddress]) -> list[ResolvedAddress]:
    # Two names for one address (or getaddrinfo repeating itself) would make the
    # second bind fail with EADDRINUSE.
    return list(dict.fromkeys(addresses))


def _new_socket(address: ResolvedAddress) -> socket.socket:
    return socket.socket(address.family, address.type, address.proto)


def _on_port(sockaddr: tuple[Any, ...], port: int) -> tuple[Any, ...]:
    # (host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6.
    return (sockaddr[0], port, *sockaddr[2:])


def _is_abstract(path: str) -> bool:
    # Linux's abstract namespace: a name that starts with NUL has no file.
    return path.startswith("\0")


def _check_port(port: int) -> None:
    if not isinstance(port, int) or not 0 <= port <= MAX_PORT:
        raise ValueError(f"port must be an integer between 0 and {MAX_PORT}, not {port!r}")


def _check_backlog(backlog: int) -> None:
    if not isinstance(backlog, int) or not 1 <= backlog <= MAX_BACKLOG:
        raise ValueError(f"backlog must be an integer between 1 and {MAX_BACKLOG}, not {backlog!r}")


def format_address(sockname: Any) -> str:
    """A bound address as people write it: 127.0.0.1:80, [::1]:80 or unix:/path."""
    if isinstance(sockname, (str, bytes)):  # a tuple: no union built per call
        path = os.fsdecode(sockname)
        return f"unix:{path}"
    host, port = sockname[0], sockname[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
