"""The `aioserver` command, run as a subprocess the way a person or a service manager runs it.

Every server is started with `--port 0` (or a Unix socket in tmp_path) and found by
the `Listening on` line it prints; every process is killed in teardown if a test
left it running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import re
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from aioserver import Server, __version__, cli, echo, run, thanks

from .helpers import (
    PREFIX,
    RUN_TIMEOUT,
    START_TIMEOUT,
    AioserverProcess,
    Entry,
    StartServer,
    aioserver_argv,
    aioserver_env,
    close,
    expected_thanks,
    needs_ipv6,
    run_aioserver,
)

# The slack the issue allows a stop past --shutdown-timeout.
STOP_SLACK = 1.0
# A stop forced by a second signal takes no part of the shutdown timeout.
FORCED_STOP_LIMIT = 2.0
# Socket timeout of the test clients: far above any reply time, short of the test timeout.
CLIENT_TIMEOUT = 10.0
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")

USER_HANDLERS = '''\
import asyncio


async def handler(reader, writer):
    """Answer each line in capitals; cancelled at a stop like any coroutine."""
    try:
        while line := await reader.readline():
            writer.write(b"got " + line.upper())
            await writer.drain()
    finally:
        writer.close()


def not_async(reader, writer):
    pass


VALUE = 42
'''


# Checking the command.


def assert_stopped_cleanly(command: AioserverProcess) -> None:
    """The command exited 0 after a stop, logged `Stopped` and no traceback."""
    stderr = command.stderr
    assert command.returncode == 0, stderr
    assert "Stopped" in stderr
    assert "Traceback" not in stderr


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not log lines."""
    return [line for line in stderr.splitlines() if not LOG_LINE.match(line)]


def assert_fails_in_one_line(
    result: subprocess.CompletedProcess[str], *phrases: str, status: int = 1
) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    [line] = error_lines(result.stderr)
    assert line.startswith("aioserver: error: "), line
    for phrase in phrases:
        assert phrase in line


# Clients.


def connect(address: str, tls: ssl.SSLContext | None = None) -> socket.socket:
    """A blocking client socket to a `Listening on` address."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CLIENT_TIMEOUT)
        sock.connect(address.removeprefix("unix:"))
        return sock
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    sock = socket.create_connection((host, int(port)), timeout=CLIENT_TIMEOUT)
    if tls is not None:
        return tls.wrap_socket(sock, server_hostname=host)
    return sock


def receive(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes, or fewer if the server closes first."""
    data = bytearray()
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return bytes(data)


def converse(
    address: str, message: bytes, reply_size: int, tls: ssl.SSLContext | None = None
) -> bytes:
    with connect(address, tls) as sock:
        sock.sendall(message)
        return receive(sock, reply_size)


def assert_serves(address: str, protocol: str, tls: ssl.SSLContext | None = None) -> None:
    message = b"hello\nworld\n"
    expected = message if protocol == "echo" else PREFIX + b"hello\n" + PREFIX + b"world\n"
    assert converse(address, message, len(expected), tls) == expected


# Done when 1: the listening line, both entry points, both protocols.


@pytest.mark.parametrize(
    ("entry", "protocol", "loop"),
    [
        ("script", "echo", "asyncio"),
        ("script", "thanks", "uvloop"),
        ("module", "echo", "uvloop"),
        ("module", "thanks", "asyncio"),
    ],
)
def test_port_0_prints_the_real_port_and_serves(
    start_server: StartServer, entry: Entry, protocol: str, loop: str
) -> None:
    command = start_server("--port", "0", "--protocol", protocol, "--loop", loop, entry=entry)
    address = command.address
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address)
    assert not address.endswith(":0")
    assert_serves(address, protocol)
    command.stop()
    assert_stopped_cleanly(command)
    first_log = command.stderr.splitlines()[0]
    assert f"aioserver {__version__}" in first_log
    assert f"protocol {protocol}" in first_log
    assert f"{loop} loop" in first_log
    assert command.stdout == f"Listening on {address}\n"


def test_auto_loop_is_uvloop_when_installed(start_server: StartServer) -> None:
    command = start_server("--port", "0")
    command.stop()
    assert "protocol echo on the uvloop loop" in command.stderr.splitlines()[0]


# Done when 2: SIGTERM and SIGINT with 100 busy clients; a second SIGINT.

BUSY_CLIENTS = 100
# Lines a client writes at once, and most lines it has unanswered: requests and
# replies are in flight both ways when the signal comes.
BATCH = 5
WINDOW = 50
# Replies every client has had before the signal: the load is running.
REPLIES_BEFORE_SIGNAL = 50


async def busy_client(address: str, number: int, served: Callable[[], None]) -> tuple[bytes, bytes]:
    """Send lines, reading replies as they come, until the server closes.

    Returns (every reply owed, what was received). Calls `served()` once
    REPLIES_BEFORE_SIGNAL replies have come.
    """
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    expected = bytearray()
    received = bytearray()
    answered = 0
    progress = asyncio.Event()

    async def read() -> None:
        nonlocal answered
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.extend(chunk)
                before, answered = answered, answered + chunk.count(b"\n")
                if before < REPLIES_BEFORE_SIGNAL <= answered:
                    served()
                progress.set()

    async def send() -> None:
        sent = 0
        with contextlib.suppress(ConnectionError):
            while True:
                if sent - answered >= WINDOW:
                    progress.clear()
                    await progress.wait()
                    continue
                batch = b"".join(
                    b"client %d message %d\n" % (number, sent + i) for i in range(BATCH)
                )
                expected.extend(expected_thanks(batch))
                sent += BATCH
                writer.write(batch)
                await writer.drain()

    reading = asyncio.create_task(read())
    sending = asyncio.create_task(send())
    try:
        await asyncio.wait({reading, sending}, return_when=asyncio.FIRST_COMPLETED)
        if sending.done():
            sending.result()  # a failure of the test's own sender
        await reading  # until the server closes the connection
    finally:
        for task in (reading, sending):
            task.cancel()
        await asyncio.wait({reading, sending})
        await close(writer)
    return bytes(expected), bytes(received)


async def stop_under_load(command: AioserverProcess, address: str, signum: int) -> float:
    """Signal the command while BUSY_CLIENTS clients send; check every reply they got."""
    all_served = asyncio.Event()
    served = 0

    def one_served() -> None:
        nonlocal served
        served += 1
        if served == BUSY_CLIENTS:
            all_served.set()

    clients = [
        asyncio.create_task(busy_client(address, number, one_served))
        for number in range(BUSY_CLIENTS)
    ]
    await asyncio.wait_for(all_served.wait(), START_TIMEOUT)
    started = time.monotonic()
    command.process.send_signal(signum)
    results = await asyncio.wait_for(asyncio.gather(*clients), RUN_TIMEOUT)
    await asyncio.to_thread(command.finish)
    elapsed = time.monotonic() - started
    for expected, received in results:
        assert received.count(b"\n") >= REPLIES_BEFORE_SIGNAL
        assert received.endswith(b"\n"), received[-80:]
        assert received == expected[: len(received)]
    return elapsed


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_gracefully_with_100_busy_clients(
    start_server: StartServer, signum: signal.Signals, loop: str
) -> None:
    shutdown_timeout = 2.0
    command = start_server(
        "--port",
        "0",
        "--protocol",
        "thanks",
        "--loop",
        loop,
        "--shutdown-timeout",
        str(shutdown_timeout),
    )
    elapsed = asyncio.run(stop_under_load(command, command.address, signum))
    assert_stopped_cleanly(command)
    assert elapsed < shutdown_timeout + STOP_SLACK
    assert f"{signum.name} received: stopping" in command.stderr
    assert command.stderr.count("closed after") == BUSY_CLIENTS


def jam(sock: socket.socket) -> int:
    """Send until the server stops reading from a client that takes no replies."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    while sent < 1 << 30:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            # Still blocked after this long: the server has paused reading.
            _, writable, _ = select.select([], [sock], [], 0.5)
            if not writable:
                return sent
    raise AssertionError("the server kept reading from a client that takes no replies")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_second_sigint_stops_a_long_shutdown_at_once(start_server: StartServer, loop: str) -> None:
    command = start_server("--port", "0", "--loop", loop, "--shutdown-timeout", "60")
    address = command.address
    with connect(address) as stuck:
        assert jam(stuck) > 0
        command.process.send_signal(signal.SIGINT)
        command.wait_for_log("SIGINT received: stopping")
        with pytest.raises(subprocess.TimeoutExpired):
            command.process.wait(0.5)  # the flush owed to `stuck` holds the stop
        elapsed = command.stop(signal.SIGINT)
    assert_stopped_cleanly(command)
    assert elapsed < FORCED_STOP_LIMIT
    assert "SIGINT received again: closing every connection now" in command.stderr


def test_sigterm_with_idle_clients_of_a_user_handler_is_immediate(
    start_server: StartServer, tmp_path: Path
) -> None:
    (tmp_path / "handlers.py").write_text(USER_HANDLERS)
    command = start_server(
        "--port", "0", "--protocol", "handlers:handler", env={"PYTHONPATH": str(tmp_path)}
    )
    address = command.address
    with connect(address) as first, connect(address) as second:
        first.sendall(b"one\n")
        assert receive(first, 8) == b"got ONE\n"
        second.sendall(b"two\n")
        assert receive(second, 8) == b"got TWO\n"
        elapsed = command.stop(signal.SIGTERM)
        assert first.recv(1) == b""
    assert_stopped_cleanly(command)
    assert elapsed < 1 + STOP_SLACK


# Done when 3: port in use.


@pytest.mark.parametrize("entry", ["module", "script"])
def test_port_in_use_fails_in_one_line(entry: Entry) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_aioserver("--port", str(port), entry=entry)
    assert_fails_in_one_line(result, f"cannot listen on 127.0.0.1:{port}: address already in use")


def test_a_second_server_on_the_same_port_fails_and_the_first_serves_on(
    start_server: StartServer,
) -> None:
    first = start_server("--port", "0", "--protocol", "thanks")
    address = first.address
    result = run_aioserver("--port", address.rpartition(":")[2])
    assert_fails_in_one_line(result, f"cannot listen on {address}: address already in use")
    assert_serves(address, "thanks")
    first.stop()
    assert_stopped_cleanly(first)


# linux/prctl.h and linux/capability.h
PR_CAPBSET_DROP = 24
CAP_SETPCAP = 8
CAP_NET_BIND_SERVICE = 10


def capabilities(kind: str) -> int:
    """This process's capability set `kind` (Inh, Prm, Eff, Bnd, Amb) as a bit mask."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"Cap{kind}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no Cap{kind} in /proc/self/status")


def without_low_ports() -> Callable[[], None] | None:
    """A preexec_fn that leaves the command unprivileged for ports below 1024, or
    None when this process is already; skips the test when that cannot be had.

    As root (CI runs as root) it drops CAP_NET_BIND_SERVICE from the child's
    capability bounding set, so the command, though uid 0, lacks the one privilege
    the kernel checks for a low port. (Switching to nobody does not work here: the
    venv's interpreter links into /root, which nobody may not enter.)
    """
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start <= 1:
        pytest.skip(f"any user may listen on port 1 here (ip_unprivileged_port_start={start})")
    bind_service = 1 << CAP_NET_BIND_SERVICE
    if not capabilities("Eff") & bind_service:
        return None
    if (capabilities("Inh") | capabilities("Amb")) & bind_service:
        pytest.skip("CAP_NET_BIND_SERVICE is inheritable here: a child keeps it")
    if not capabilities("Eff") & (1 << CAP_SETPCAP):
        pytest.skip("this process may listen on low ports and cannot give that up (no CAP_SETPCAP)")
    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        if libc.prctl(PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE)")

    return drop


def test_permission_denied_on_a_low_port() -> None:
    result = run_aioserver("--port", "1", preexec_fn=without_low_ports())
    assert_fails_in_one_line(
        result,
        "cannot listen on 127.0.0.1:1: permission denied",
        "(ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    )


# Done when 4: environment variables, and flags over them.


def test_environment_variables_configure_the_command(start_server: StartServer) -> None:
    command = start_server(
        entry="script",
        env={"AIOSERVER_PORT": "0", "AIOSERVER_PROTOCOL": "thanks", "AIOSERVER_CERTFILE": ""},
    )
    assert_serves(command.address, "thanks")
    command.stop()
    assert_stopped_cleanly(command)


def test_a_flag_wins_over_its_environment_variable(start_server: StartServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = str(taken.getsockname()[1])
        command = start_server(
            "--port",
            "0",
            "--protocol",
            "echo",
            env={"AIOSERVER_PORT": busy_port, "AIOSERVER_PROTOCOL": "thanks"},
        )
        assert_serves(command.address, "echo")
    command.stop()
    assert_stopped_cleanly(command)


# Done when 5: TLS, a Unix socket, IPv6.


def test_tls_serves_a_client_that_checks_the_certificate(
    start_server: StartServer, client_tls_context: ssl.SSLContext, tls_files: tuple[Path, Path]
) -> None:
    certfile, keyfile = tls_files
    command = start_server(
        "--port",
        "0",
        "--protocol",
        "thanks",
        "--certfile",
        str(certfile),
        "--keyfile",
        str(keyfile),
    )
    address = command.address
    assert_serves(address, "thanks", tls=client_tls_context)
    with pytest.raises(ssl.SSLCertVerificationError):
        converse(address, b"x\n", 1, tls=ssl.create_default_context())
    command.stop()
    assert_stopped_cleanly(command)


def encrypted(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


# The options of a bad TLS case, from (certfile, keyfile, tmp_path, the CA); a case
# writes any file of its own into tmp_path/other.pem.
TlsArgs = Callable[[Path, Path, Path, trustme.CA], tuple[str, ...]]


def not_pem(certfile: Path, keyfile: Path, tmp: Path, ca: trustme.CA) -> tuple[str, ...]:
    (tmp / "other.pem").write_text("hello\n")
    return ("--certfile", str(tmp / "other.pem"), "--keyfile", str(keyfile))


def key_of_another(certfile: Path, keyfile: Path, tmp: Path, ca: trustme.CA) -> tuple[str, ...]:
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(tmp / "other.pem"))
    return ("--certfile", str(certfile), "--keyfile", str(tmp / "other.pem"))


def encrypted_key(certfile: Path, keyfile: Path, tmp: Path, ca: trustme.CA) -> tuple[str, ...]:
    (tmp / "other.pem").write_bytes(encrypted(keyfile.read_bytes()))
    return ("--certfile", str(certfile), "--keyfile", str(tmp / "other.pem"))


@pytest.mark.parametrize(
    ("tls_args", "phrase"),
    [
        pytest.param(
            lambda cert, key, tmp, ca: ("--certfile", str(tmp / "nowhere.pem")),
            "cannot read TLS certificate",
            id="missing certfile",
        ),
        pytest.param(
            lambda cert, key, tmp, ca: ("--certfile", str(cert), "--keyfile", str(tmp)),
            "Is a directory",
            id="keyfile is a directory",
        ),
        pytest.param(not_pem, "no PEM certificate with its private key found", id="not PEM"),
        pytest.param(
            lambda cert, key, tmp, ca: ("--certfile", str(cert)),
            "no PEM certificate with its private key found",
            id="no key",
        ),
        pytest.param(
            key_of_another,
            "the private key does not match the certificate",
            id="key of another certificate",
        ),
        pytest.param(encrypted_key, "the TLS private key is encrypted", id="encrypted key"),
        pytest.param(
            lambda cert, key, tmp, ca: ("--keyfile", str(key)),
            "--keyfile needs --certfile",
            id="keyfile alone",
        ),
    ],
)
def test_bad_tls_files_fail_in_one_line(
    tls_ca: trustme.CA,
    tls_files: tuple[Path, Path],
    tmp_path: Path,
    tls_args: TlsArgs,
    phrase: str,
) -> None:
    certfile, keyfile = tls_files
    result = run_aioserver("--port", "0", *tls_args(certfile, keyfile, tmp_path, tls_ca))
    assert_fails_in_one_line(result, phrase)
    assert result.stderr.count("\n") == 1


def test_unix_socket_serves_and_refuses_a_second_server(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "echo.sock"
    command = start_server("--unix", str(path))
    address = command.address
    assert address == f"unix:{path}"
    assert_serves(address, "echo")
    result = run_aioserver("--unix", str(path))
    assert_fails_in_one_line(result, f"cannot listen on unix:{path}: address already in use")
    assert_serves(address, "echo")
    command.stop()
    assert_stopped_cleanly(command)
    assert not path.exists()


def test_unix_socket_left_by_a_dead_server_is_replaced(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert path.is_socket()
    command = start_server("--unix", str(path), "--protocol", "thanks")
    assert_serves(command.address, "thanks")
    command.stop()
    assert_stopped_cleanly(command)


def test_unix_socket_path_that_is_another_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me\n")
    result = run_aioserver("--unix", str(path))
    assert_fails_in_one_line(
        result, f"cannot listen on unix:{path}: the path exists and is not a socket"
    )
    assert path.read_text() == "keep me\n"


@needs_ipv6
def test_ipv6_and_ipv4_loopback_share_the_port(start_server: StartServer) -> None:
    command = start_server(
        "--host", "::1", "--host", "127.0.0.1", "--port", "0", "--protocol", "thanks", ready=2
    )
    ipv6, ipv4 = command.addresses
    port = ipv6.rpartition(":")[2]
    assert ipv6 == f"[::1]:{port}"
    assert ipv4 == f"127.0.0.1:{port}"
    assert_serves(ipv6, "thanks")
    assert_serves(ipv4, "thanks")
    command.stop()
    assert_stopped_cleanly(command)


# Done when 6: a user's handler.


@pytest.fixture
def user_package(tmp_path: Path) -> Path:
    """tmp_path/mypkg with mod.py (good and bad handlers) and broken.py (fails on import)."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(USER_HANDLERS)
    (package / "broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    return tmp_path


@pytest.mark.parametrize("entry", ["module", "script"])
def test_user_handler_serves(start_server: StartServer, user_package: Path, entry: Entry) -> None:
    if entry == "module":  # found on PYTHONPATH
        command = start_server(
            "--port",
            "0",
            "--protocol",
            "mypkg.mod:handler",
            env={"PYTHONPATH": str(user_package)},
        )
    else:  # found in the current directory, as with uvicorn
        command = start_server(
            "--port", "0", "--protocol", "mypkg.mod:handler", entry=entry, cwd=user_package
        )
    expected = b"got HI\ngot THERE\n"
    assert converse(command.address, b"hi\nthere\n", len(expected)) == expected
    command.stop(signal.SIGINT)
    assert_stopped_cleanly(command)
    assert "protocol mypkg.mod:handler" in command.stderr.splitlines()[0]


@pytest.mark.parametrize(
    ("protocol", "phrase"),
    [
        ("mypkg.mod:missing", "module 'mypkg.mod' has no attribute 'missing'"),
        ("mypkg.absent:handler", "cannot import 'mypkg.absent': No module named 'mypkg.absent'"),
        ("mypkg.mod:not_async", "mypkg.mod:not_async is not a coroutine function"),
        ("mypkg.mod:VALUE", "mypkg.mod:VALUE is not a coroutine function"),
        ("mypkg.broken:handler", "RuntimeError: broken on purpose"),
        ("chat", "unknown protocol 'chat': use echo, thanks or MODULE:CALLABLE"),
    ],
)
def test_a_bad_protocol_fails_in_one_line(user_package: Path, protocol: str, phrase: str) -> None:
    result = run_aioserver(
        "--port", "0", "--protocol", protocol, env={"PYTHONPATH": str(user_package)}
    )
    assert_fails_in_one_line(result, phrase)
    assert result.stderr.count("\n") == 1


# The rest of a well-behaved command line.


def test_help_names_every_variable_and_default() -> None:
    result = run_aioserver("--help", entry="script")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # undo argparse's wrapping
    for option in cli.OPTIONS:
        assert f"--{option.name}" in text
        assert f"[env {option.env}; default {option.shown_default()}]" in text
    assert "[env AIOSERVER_PORT; default 1234]" in text
    assert "[env AIOSERVER_HOST; default 127.0.0.1]" in text


def test_version() -> None:
    result = run_aioserver("--version")
    assert (result.returncode, result.stdout) == (0, f"aioserver {__version__}\n")


@pytest.mark.parametrize(
    ("args", "env", "phrase"),
    [
        (("--port", "x"), {}, "argument --port: expected a whole number, not 'x'"),
        (("--loop", "tokio"), {}, "argument --loop: invalid choice: 'tokio'"),
        ((), {"AIOSERVER_PORT": "70000"}, "AIOSERVER_PORT='70000': expected a number from 0"),
    ],
    ids=["port-not-a-number", "unknown-loop", "env-port-out-of-range"],
)
def test_argument_errors_exit_2(args: tuple[str, ...], env: dict[str, str], phrase: str) -> None:
    result = run_aioserver(*args, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: aioserver")
    assert result.stderr.splitlines()[-1].startswith(f"aioserver: error: {phrase}")


@pytest.mark.parametrize(
    ("args", "env", "logged"),
    [
        ((), {}, True),
        (("--no-access-log",), {}, False),
        ((), {"AIOSERVER_ACCESS_LOG": "off"}, False),
        (("--access-log",), {"AIOSERVER_ACCESS_LOG": "off"}, True),
    ],
    ids=["default", "flag-off", "env-off", "flag-over-env"],
)
def test_access_log_switch(
    start_server: StartServer, args: tuple[str, ...], env: dict[str, str], logged: bool
) -> None:
    command = start_server("--port", "0", *args, env=env)
    address = command.address
    assert_serves(address, "echo")
    if logged:
        command.wait_for_log("closed after")
    command.stop()
    assert_stopped_cleanly(command)
    assert ("closed after" in command.stderr) is logged


def test_limit_flags_reach_the_server(start_server: StartServer) -> None:
    command = start_server(
        "--port",
        "0",
        "--protocol",
        "thanks",
        "--max-connections",
        "1",
        "--max-message-size",
        "16",
        "--idle-timeout",
        "0.3",
    )
    address = command.address
    with connect(address) as first:
        first.sendall(b"short\n")
        assert receive(first, 33) == PREFIX + b"short\n"
        with connect(address) as turned_away:  # receive() reads to EOF from here on
            assert receive(turned_away, 100) == b"Error: server busy\n"
        first.sendall(b"a line of more than sixteen bytes\n")
        assert receive(first, 100) == b"Error: message longer than 16 bytes\n"
    # Once the server has let the first client go, a silent one is closed when idle.
    command.wait_for_log("message longer than 16 bytes")
    with connect(address) as silent:
        started = time.monotonic()
        assert receive(silent, 1) == b""
        assert 0.2 < time.monotonic() - started < 5
    command.stop()
    assert_stopped_cleanly(command)


# In process: what a subprocess cannot reach.


def test_interrupt_before_serving_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert cli.main(["--port", "0", "--log-level", "critical"], environ={}) == cli.EXIT_INTERRUPTED


def test_permission_denied_on_a_low_port_says_why() -> None:
    args = argparse.Namespace(unix=None, host=["127.0.0.1", "::1"], port=80)
    message = cli._bind_error(PermissionError(13, "Permission denied"), args)
    assert message == (
        "cannot listen on 127.0.0.1:80, [::1]:80: permission denied"
        " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    )


def test_name_that_does_not_resolve() -> None:
    args = argparse.Namespace(unix=None, host=["nowhere.invalid"], port=1234)
    error = socket.gaierror(-2, "Name or service not known")
    assert cli._bind_error(error, args) == (
        "cannot listen on nowhere.invalid:1234: Name or service not known"
    )


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (cli._timeout, "none", None),
        (cli._timeout, "0", None),
        (cli._timeout, "2.5", 2.5),
        (cli._seconds, "0", 0.0),
        (cli._flag, "yes", True),
        (cli._flag, "0", False),
    ],
    ids=["timeout-none", "timeout-0", "timeout-2.5", "seconds-0", "flag-yes", "flag-0"],
)
def test_option_values(parse: Callable[[str], object], text: str, value: object) -> None:
    assert parse(text) == value


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (cli._seconds, "soon"),
        (cli._seconds, "-1"),
        (cli._seconds, "inf"),
        (cli._seconds, "nan"),
        (cli._seconds, "1e300"),
        (cli._up_to(5), "0"),
        (cli._up_to(5), "6"),
        (cli._flag, "maybe"),
    ],
    ids=[
        "seconds-soon",
        "seconds-negative",
        "seconds-inf",
        "seconds-nan",
        "seconds-huge",
        "up-to-0",
        "up-to-over",
        "flag-maybe",
    ],
)
def test_bad_option_values(parse: Callable[[str], object], text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--backlog", "2147483648"),
        ("--backlog", "0"),
        ("--port", "65536"),
        ("--max-connections", "1048577"),
        ("--max-message-size", str((1 << 30) + 1)),
        ("--workers", "257"),
        ("--idle-timeout", "1e300"),
        ("--shutdown-timeout", "1000001"),
    ],
    ids=lambda value: str(value).lstrip("-"),
)
def test_every_number_is_bounded_before_use(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out of its bounds, a numeric option is one line and exit 2, never a
    traceback from deeper down (a backlog of 2**31 was an OverflowError)."""
    with pytest.raises(SystemExit) as exit_info:
        cli._parse(cli.build_parser(), [option, value], {})
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"aioserver: error: argument {option}: expected a number"), error


def test_a_closed_stdout_is_not_a_bind_error_and_the_server_serves_on() -> None:
    """Whoever reads stdout may go away before the Listening line: the server
    warns once, serves on, and stops with exit 0 as usual."""
    process = subprocess.Popen(
        aioserver_argv(["--port", "0", "--loop", "asyncio"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=aioserver_env(),
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()  # before the server writes a line
    try:
        lines: list[str] = []
        while not any("Listening on" in line for line in lines):
            line = process.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        port = int(lines[-1].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"still here")
            assert sock.recv(100) == b"still here"
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    log = "".join(lines) + rest
    assert "stdout is closed: the Listening lines were not read" in log
    assert "cannot listen" not in log
    assert "Traceback" not in log


ENV = {"AIOSERVER_HOST": "::1, 127.0.0.1", "AIOSERVER_LOOP": "asyncio", "AIOSERVER_UNIX": ""}


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], ENV, {"host": ["::1", "127.0.0.1"], "loop": "asyncio", "unix": None}),
        (["--host", "0.0.0.0"], ENV, {"host": ["0.0.0.0"]}),
        ([], {}, {"host": ["127.0.0.1"]}),
    ],
    ids=["environment", "flag-over-environment", "default"],
)
def test_environment_precedence_in_process(
    argv: list[str], env: dict[str, str], expected: dict[str, object]
) -> None:
    args = cli._parse(cli.build_parser(), argv, env)
    assert {name: getattr(args, name) for name in expected} == expected


@pytest.mark.parametrize(
    "env",
    [{"AIOSERVER_LOOP": "tokio"}, {"AIOSERVER_REUSE_PORT": "maybe"}],
    ids=["loop-tokio", "reuse-port-maybe"],
)
def test_bad_environment_values_exit_2(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli._parse(cli.build_parser(), [], env)
    assert exit_info.value.code == 2
    name = next(iter(env))
    assert f"aioserver: error: {name}=" in capsys.readouterr().err


def test_load_handler_follows_dotted_attributes(
    user_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (user_package / "mypkg" / "nested.py").write_text(
        "class Service:\n    @staticmethod\n    async def handle(reader, writer):\n        pass\n"
    )
    monkeypatch.syspath_prepend(str(user_package))
    handler = cli.load_handler("mypkg.nested:Service.handle")
    assert handler.__name__ == "handle"


@pytest.mark.parametrize(
    ("name", "handler"), [("echo", echo), ("thanks", thanks)], ids=["echo", "thanks"]
)
def test_load_handler_knows_the_built_in_protocols(name: str, handler: object) -> None:
    assert cli.load_handler(name) is handler
    assert cli.BUILTIN_PROTOCOLS[name] is handler


@pytest.mark.parametrize("thread", ["main", "other"])
def test_run_returns_when_the_server_is_stopped_from_inside(thread: str) -> None:
    stops: list[asyncio.Future[None]] = []

    def stop_at_once(server: Server) -> None:
        stops.append(asyncio.ensure_future(server.stop()))

    def serve() -> None:
        run(echo, loop="asyncio", on_start=stop_at_once, port=0)

    if thread == "main":
        serve()
    else:
        worker = threading.Thread(target=serve)
        worker.start()
        worker.join(RUN_TIMEOUT)
    [stop] = stops
    assert stop.done()
