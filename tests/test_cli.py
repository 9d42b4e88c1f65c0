"""The `aioserver` command, run as a subprocess the way a person or a service manager runs it.

Every server is started with `--port 0` (or a Unix socket in tmp_path) and found by
the `Listening on` line it prints; every process is killed in teardown if a test
left it running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from aioserver import Server, __version__, cli, echo, run
from aioserver.protocols import thanks_reply

# The installed console script, next to the interpreter running the tests.
SCRIPT = str(Path(sys.executable).with_name("aioserver"))
# Start-up of a Python process under coverage on a loaded 2-core machine, with room.
START_TIMEOUT = 20.0
# A command that is not serving (errors, --help) ends well within this.
RUN_TIMEOUT = 20.0
# The slack the issue allows a stop past --shutdown-timeout.
STOP_SLACK = 1.0
# A stop forced by a second signal takes no part of the shutdown timeout.
FORCED_STOP_LIMIT = 2.0
# Socket timeout of the test clients: far above any reply time, short of the test timeout.
CLIENT_TIMEOUT = 10.0
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
LISTENING = re.compile(r"^Listening on (\S+)$", re.MULTILINE)

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


# Running the command.


def command_line(args: tuple[str, ...], entry: str) -> list[str]:
    if entry == "script":
        return [SCRIPT, *args]
    return [sys.executable, "-m", "aioserver", *args]


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment (coverage's subprocess set-up included), no AIOSERVER_*."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIOSERVER_")}
    env.update(extra or {})
    return env


class Command:
    """One running `aioserver`, its stdout and stderr collected as they come."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None) -> None:
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
        )
        self._output = {"stdout": bytearray(), "stderr": bytearray()}
        self._ended: set[str] = set()
        self._changed = threading.Condition()
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._pumps = [
            threading.Thread(target=self._pump, args=(name, stream), daemon=True)
            for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr))
        ]
        for pump in self._pumps:
            pump.start()

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        while chunk := stream.read1(65536):  # type: ignore[attr-defined]
            with self._changed:
                self._output[name] += chunk
                self._changed.notify_all()
        with self._changed:
            self._ended.add(name)
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        with self._changed:
            return self._output["stdout"].decode(errors="replace")

    @property
    def stderr(self) -> str:
        with self._changed:
            return self._output["stderr"].decode(errors="replace")

    def wait_for(self, name: str, found: Callable[[str], bool], timeout: float) -> str:
        """Wait until `found(output so far)`; return the output."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                text = self._output[name].decode(errors="replace")
                if found(text):
                    return text
                remaining = deadline - time.monotonic()
                if name in self._ended or remaining <= 0:
                    output = {
                        key: value.decode(errors="replace") for key, value in self._output.items()
                    }
                    raise AssertionError(f"not seen on {name}; output so far: {output}")
                self._changed.wait(remaining)

    def addresses(self, count: int = 1) -> list[str]:
        """The addresses of the first `count` listening lines, waiting for them."""
        text = self.wait_for(
            "stdout", lambda out: len(LISTENING.findall(out)) >= count, START_TIMEOUT
        )
        return LISTENING.findall(text)[:count]

    def address(self) -> str:
        return self.addresses(1)[0]

    def wait_for_log(self, text: str, timeout: float = START_TIMEOUT) -> None:
        self.wait_for("stderr", lambda err: text in err, timeout)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = RUN_TIMEOUT) -> float:
        """Send `signum`, wait for the exit; return the seconds it took."""
        started = time.monotonic()
        self.process.send_signal(signum)
        self.finish(timeout)
        return time.monotonic() - started

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        """Wait for the exit and for all of its output; return the exit status."""
        status = self.process.wait(timeout)
        for pump in self._pumps:
            pump.join(timeout)
        return status

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(RUN_TIMEOUT)
        for pump in self._pumps:
            pump.join(RUN_TIMEOUT)
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self.process.stdout.close()
        self.process.stderr.close()


StartCommand = Callable[..., Command]


@pytest.fixture
def start() -> Iterator[StartCommand]:
    """Start `aioserver ARGS...` (entry="script" for the console script); killed at teardown."""
    started: list[Command] = []

    def start(
        *args: str,
        entry: str = "module",
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Command:
        command = Command(command_line(args, entry), environment(env), cwd)
        started.append(command)
        return command

    yield start
    for command in started:
        command.kill()


def run_command(
    *args: str, entry: str = "module", env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command that is expected to end by itself (errors, --help, --version)."""
    return subprocess.run(
        command_line(args, entry),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=environment(env),
        timeout=RUN_TIMEOUT,
        check=False,
    )


def assert_stopped_cleanly(command: Command) -> None:
    """The command exited 0 after a stop, logged `Stopped` and no traceback."""
    stderr = command.stderr
    assert command.process.returncode == 0, stderr
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
    expected = (
        message if protocol == "echo" else thanks_reply(b"hello\n") + thanks_reply(b"world\n")
    )
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
    start: StartCommand, entry: str, protocol: str, loop: str
) -> None:
    command = start("--port", "0", "--protocol", protocol, "--loop", loop, entry=entry)
    address = command.address()
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


def test_auto_loop_is_uvloop_when_installed(start: StartCommand) -> None:
    command = start("--port", "0")
    command.address()
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
                expected.extend(b"".join(map(thanks_reply, batch.splitlines(keepends=True))))
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
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return bytes(expected), bytes(received)


async def stop_under_load(command: Command, address: str, signum: int) -> float:
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
    start: StartCommand, signum: signal.Signals, loop: str
) -> None:
    shutdown_timeout = 2.0
    command = start(
        "--port",
        "0",
        "--protocol",
        "thanks",
        "--loop",
        loop,
        "--shutdown-timeout",
        str(shutdown_timeout),
    )
    elapsed = asyncio.run(stop_under_load(command, command.address(), signum))
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
def test_second_sigint_stops_a_long_shutdown_at_once(start: StartCommand, loop: str) -> None:
    command = start("--port", "0", "--loop", loop, "--shutdown-timeout", "60")
    address = command.address()
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
    start: StartCommand, tmp_path: Path
) -> None:
    (tmp_path / "handlers.py").write_text(USER_HANDLERS)
    command = start(
        "--port", "0", "--protocol", "handlers:handler", env={"PYTHONPATH": str(tmp_path)}
    )
    address = command.address()
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
def test_port_in_use_fails_in_one_line(entry: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_command("--port", str(port), entry=entry)
    assert_fails_in_one_line(result, f"cannot listen on 127.0.0.1:{port}: address already in use")


def test_a_second_server_on_the_same_port_fails_and_the_first_serves_on(
    start: StartCommand,
) -> None:
    first = start("--port", "0", "--protocol", "thanks")
    address = first.address()
    result = run_command("--port", address.rpartition(":")[2])
    assert_fails_in_one_line(result, f"cannot listen on {address}: address already in use")
    assert_serves(address, "thanks")
    first.stop()
    assert_stopped_cleanly(first)


# Done when 4: environment variables, and flags over them.


def test_environment_variables_configure_the_command(start: StartCommand) -> None:
    command = start(
        entry="script",
        env={"AIOSERVER_PORT": "0", "AIOSERVER_PROTOCOL": "thanks", "AIOSERVER_CERTFILE": ""},
    )
    assert_serves(command.address(), "thanks")
    command.stop()
    assert_stopped_cleanly(command)


def test_a_flag_wins_over_its_environment_variable(start: StartCommand) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = str(taken.getsockname()[1])
        command = start(
            "--port",
            "0",
            "--protocol",
            "echo",
            env={"AIOSERVER_PORT": busy_port, "AIOSERVER_PROTOCOL": "thanks"},
        )
        assert_serves(command.address(), "echo")
    command.stop()
    assert_stopped_cleanly(command)


# Done when 5: TLS, a Unix socket, IPv6.


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return certfile, keyfile


def test_tls_serves_a_client_that_checks_the_certificate(
    start: StartCommand, ca: trustme.CA, tls_files: tuple[Path, Path]
) -> None:
    certfile, keyfile = tls_files
    command = start(
        "--port",
        "0",
        "--protocol",
        "thanks",
        "--certfile",
        str(certfile),
        "--keyfile",
        str(keyfile),
    )
    address = command.address()
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    assert_serves(address, "thanks", tls=client_context)
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


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("missing certfile", "cannot read TLS certificate"),
        ("keyfile is a directory", "Is a directory"),
        ("not PEM", "no PEM certificate with its private key found"),
        ("no key", "no PEM certificate with its private key found"),
        ("key of another certificate", "the private key does not match the certificate"),
        ("encrypted key", "the TLS private key is encrypted"),
        ("keyfile alone", "--keyfile needs --certfile"),
    ],
)
def test_bad_tls_files_fail_in_one_line(
    ca: trustme.CA, tls_files: tuple[Path, Path], tmp_path: Path, case: str, phrase: str
) -> None:
    certfile, keyfile = tls_files
    other = tmp_path / "other.pem"
    args: tuple[str, ...] = ("--certfile", str(certfile), "--keyfile", str(keyfile))
    if case == "missing certfile":
        args = ("--certfile", str(tmp_path / "nowhere.pem"))
    elif case == "keyfile is a directory":
        args = ("--certfile", str(certfile), "--keyfile", str(tmp_path))
    elif case == "not PEM":
        other.write_text("hello\n")
        args = ("--certfile", str(other), "--keyfile", str(keyfile))
    elif case == "no key":
        args = ("--certfile", str(certfile))
    elif case == "key of another certificate":
        ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other))
        args = ("--certfile", str(certfile), "--keyfile", str(other))
    elif case == "encrypted key":
        other.write_bytes(encrypted(keyfile.read_bytes()))
        args = ("--certfile", str(certfile), "--keyfile", str(other))
    elif case == "keyfile alone":
        args = ("--keyfile", str(keyfile))
    result = run_command("--port", "0", *args)
    assert_fails_in_one_line(result, phrase)
    assert result.stderr.count("\n") == 1


def test_unix_socket_serves_and_refuses_a_second_server(
    start: StartCommand, tmp_path: Path
) -> None:
    path = tmp_path / "echo.sock"
    command = start("--unix", str(path))
    address = command.address()
    assert address == f"unix:{path}"
    assert_serves(address, "echo")
    result = run_command("--unix", str(path))
    assert_fails_in_one_line(result, f"cannot listen on unix:{path}: address already in use")
    assert_serves(address, "echo")
    command.stop()
    assert_stopped_cleanly(command)
    assert not path.exists()


def test_unix_socket_left_by_a_dead_server_is_replaced(start: StartCommand, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert path.is_socket()
    command = start("--unix", str(path), "--protocol", "thanks")
    assert_serves(command.address(), "thanks")
    command.stop()
    assert_stopped_cleanly(command)


def test_unix_socket_path_that_is_another_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me\n")
    result = run_command("--unix", str(path))
    assert_fails_in_one_line(
        result, f"cannot listen on unix:{path}: the path exists and is not a socket"
    )
    assert path.read_text() == "keep me\n"


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_works(), reason="::1 is not available here")
def test_ipv6_and_ipv4_loopback_share_the_port(start: StartCommand) -> None:
    command = start("--host", "::1", "--host", "127.0.0.1", "--port", "0", "--protocol", "thanks")
    ipv6, ipv4 = command.addresses(2)
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
def test_user_handler_serves(start: StartCommand, user_package: Path, entry: str) -> None:
    if entry == "module":  # found on PYTHONPATH
        command = start(
            "--port",
            "0",
            "--protocol",
            "mypkg.mod:handler",
            env={"PYTHONPATH": str(user_package)},
        )
    else:  # found in the current directory, as with uvicorn
        command = start(
            "--port", "0", "--protocol", "mypkg.mod:handler", entry=entry, cwd=user_package
        )
    expected = b"got HI\ngot THERE\n"
    assert converse(command.address(), b"hi\nthere\n", len(expected)) == expected
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
    result = run_command(
        "--port", "0", "--protocol", protocol, env={"PYTHONPATH": str(user_package)}
    )
    assert_fails_in_one_line(result, phrase)
    assert result.stderr.count("\n") == 1


# The rest of a well-behaved command line.


def test_help_names_every_variable_and_default() -> None:
    result = run_command("--help", entry="script")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # undo argparse's wrapping
    for option in cli.OPTIONS:
        assert f"--{option.name}" in text
        assert f"[env {option.env}; default {option.shown_default()}]" in text
    assert "[env AIOSERVER_PORT; default 1234]" in text
    assert "[env AIOSERVER_HOST; default 127.0.0.1]" in text


def test_version() -> None:
    result = run_command("--version")
    assert (result.returncode, result.stdout) == (0, f"aioserver {__version__}\n")


@pytest.mark.parametrize(
    ("args", "env", "phrase"),
    [
        (("--port", "x"), {}, "argument --port: expected a whole number, not 'x'"),
        (("--loop", "tokio"), {}, "argument --loop: invalid choice: 'tokio'"),
        ((), {"AIOSERVER_PORT": "70000"}, "AIOSERVER_PORT='70000': expected a number from 0"),
    ],
)
def test_argument_errors_exit_2(args: tuple[str, ...], env: dict[str, str], phrase: str) -> None:
    result = run_command(*args, env=env)
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
    start: StartCommand, args: tuple[str, ...], env: dict[str, str], logged: bool
) -> None:
    command = start("--port", "0", *args, env=env)
    address = command.address()
    assert_serves(address, "echo")
    if logged:
        command.wait_for_log("closed after")
    command.stop()
    assert_stopped_cleanly(command)
    assert ("closed after" in command.stderr) is logged


def test_limit_flags_reach_the_server(start: StartCommand) -> None:
    command = start(
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
    address = command.address()
    with connect(address) as first:
        first.sendall(b"short\n")
        assert receive(first, 33) == thanks_reply(b"short\n")
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


@pytest.mark.skipif(os.geteuid() == 0, reason="root may listen on any port")
def test_permission_denied_on_a_low_port() -> None:
    result = run_command("--port", "1")
    assert_fails_in_one_line(result, "cannot listen on 127.0.0.1:1: permission denied")


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
        (cli._positive_int, "0"),
        (cli._flag, "maybe"),
    ],
)
def test_bad_option_values(parse: Callable[[str], object], text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


def test_environment_precedence_in_process() -> None:
    parser = cli.build_parser()
    env = {"AIOSERVER_HOST": "::1, 127.0.0.1", "AIOSERVER_LOOP": "asyncio", "AIOSERVER_UNIX": ""}
    args = cli._parse(parser, [], env)
    assert (args.host, args.loop, args.unix) == (["::1", "127.0.0.1"], "asyncio", None)
    args = cli._parse(cli.build_parser(), ["--host", "0.0.0.0"], env)
    assert args.host == ["0.0.0.0"]
    assert cli._parse(cli.build_parser(), [], {}).host == ["127.0.0.1"]


@pytest.mark.parametrize(
    "env",
    [{"AIOSERVER_LOOP": "tokio"}, {"AIOSERVER_REUSE_PORT": "maybe"}],
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
    assert cli.load_handler("thanks") is cli.BUILTIN_PROTOCOLS["thanks"]


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
