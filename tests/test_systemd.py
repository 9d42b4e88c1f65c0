"""Under a service manager: socket activation, `--fd`, and readiness through NOTIFY_SOCKET.

Socket activation is tried with Debian's `systemd-socket-activate` (package
`systemd`, which .ci/run installs; where it is missing those tests are skipped
and say so): it listens, and on the first connection execs the command with
LISTEN_FDS and LISTEN_PID set, as systemd does for a .socket unit. Readiness is
read from an AF_UNIX datagram socket the test binds and names in NOTIFY_SOCKET,
as systemd does for Type=notify. Everything listens on 127.0.0.1.

The command's stdout and stderr go to files here, not pipes: a message on the
notify socket is then known to come after whatever the command had written
before sending it (the `Listening on` line before READY=1).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from aioserver.sockets import InheritedSocketError, inherited_sockets, sockets_from_fds

from .helpers import PREFIX, RUN_TIMEOUT, START_TIMEOUT, aioserver_argv, aioserver_env

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None,
    reason="systemd-socket-activate is not installed (.ci/run installs Debian's systemd package)",
)
README = Path(__file__).resolve().parent.parent / "README.md"
# A datagram the command sends arrives within this (it is sent once it accepts).
NOTIFY_TIMEOUT = START_TIMEOUT
# sun_path holds 107 bytes and a NUL.
MAX_UNIX_PATH = 107


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Command:
    """A command whose stdout and stderr go to files in `directory`."""

    def __init__(
        self,
        argv: Sequence[str],
        directory: Path,
        env: dict[str, str],
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.out_path, self.err_path = directory / "stdout", directory / "stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                pass_fds=pass_fds,
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, what: str, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            text = self.stdout if what == "stdout" else self.stderr
            match = re.search(pattern, text, re.M)
            if match:
                return match
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} not on {what} (exit status {self.process.poll()});"
                    f" stdout: {self.stdout!r}; stderr: {self.stderr!r}"
                )
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(RUN_TIMEOUT)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(RUN_TIMEOUT)


@contextlib.contextmanager
def command(
    argv: Sequence[str],
    directory: Path,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Iterator[Command]:
    launched = Command(argv, directory, aioserver_env(env), pass_fds)
    try:
        yield launched
    finally:
        launched.kill()


def activated_argv(port: int, args: Sequence[str], env: dict[str, str]) -> list[str]:
    """`systemd-socket-activate` listening on 127.0.0.1:PORT, then `aioserver ARGS`.
    It hands the command no environment but what -E names: pass it all."""
    assert ACTIVATE is not None
    setenv = [f"--setenv={key}={value}" for key, value in aioserver_env(env).items()]
    return [ACTIVATE, "-l", f"127.0.0.1:{port}", *setenv, *aioserver_argv(args)]


def ask(port: int, line: bytes = b"hi") -> bytes:
    """One client: send a line and EOF, return everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=RUN_TIMEOUT) as client:
        client.sendall(line + b"\n")
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(4096):
            received += chunk
    return received


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """An AF_UNIX datagram socket, as systemd's for Type=notify, and its address."""
    path = tmp_path / "notify.sock"
    short: str | None = None
    if len(os.fsencode(path)) > MAX_UNIX_PATH:  # a long test name: a short directory
        short = tempfile.mkdtemp(prefix="aiosd")
        path = Path(short) / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(NOTIFY_TIMEOUT)
        yield sock, str(path)
    if short is not None:
        shutil.rmtree(short, ignore_errors=True)


def receive(sock: socket.socket) -> list[str]:
    """The lines of the next datagram (the test fails at NOTIFY_TIMEOUT)."""
    try:
        data = sock.recv(4096)
    except TimeoutError:
        pytest.fail(f"no notification within {NOTIFY_TIMEOUT} s")
    assert data.endswith(b"\n"), data
    return data.decode().splitlines()


def nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(NOTIFY_TIMEOUT)
    return False


# Socket activation.


@needs_activate
@pytest.mark.parametrize("workers", ["1", "2"])
def test_socket_activation_serves_the_socket_passed(tmp_path: Path, workers: str) -> None:
    port = free_port()
    argv = activated_argv(port, ["--protocol", "thanks", "--workers", workers], {})
    with command(argv, tmp_path) as server:
        server.wait_for("stderr", rf"Listening on 127\.0\.0\.1:{port} as 3")
        # The first connection starts the command; it waits in the backlog meanwhile.
        assert ask(port) == PREFIX + b"hi\n"
        server.wait_for("stdout", rf"^Listening on 127\.0\.0\.1:{port}$")
        server.wait_for("stderr", r"Socket activation: serving fd 3$")
        if workers == "2":
            server.wait_for("stderr", r"Started worker \d+(.|\n)*Started worker \d+")
        assert ask(port, b"again") == PREFIX + b"again\n"
        assert server.stop() == 0
    assert "Stopped" in server.stderr
    assert "Traceback" not in server.stderr


ENV_HANDLER = """\
import os

async def env(reader, writer):
    await reader.read()
    names = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
    writer.write(repr([os.environ.get(name) for name in names]).encode())
    writer.close()
"""


@needs_activate
def test_the_variables_are_unset_for_the_workers_and_what_they_start(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    _sock, address = notify_socket
    (tmp_path / "envhandler.py").write_text(ENV_HANDLER)
    port = free_port()
    env = {"PYTHONPATH": str(tmp_path), "NOTIFY_SOCKET": address}
    args = ["--protocol", "envhandler:env", "--workers", "2"]
    with command(activated_argv(port, args, env), tmp_path) as server:
        server.wait_for("stderr", rf"Listening on 127\.0\.0\.1:{port} as 3")
        assert ask(port) == b"[None, None, None, None]"
        assert server.stop() == 0


@needs_activate
def test_the_readme_socket_unit_and_its_service(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """The README's .socket unit and service, as systemd would run them: the
    socket on ListenStream, the service's ExecStart socket-activated, Type=notify."""
    blocks = re.findall(r"```systemd\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "expected one systemd block in README.md"
    units = dict(
        line.split("=", 1)
        for line in blocks[0].splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert units["ListenStream"] == "127.0.0.1:9001"
    assert units["Type"] == "notify"
    executable, *args = shlex.split(units["ExecStart"])
    assert executable.endswith("/aioserver")
    workers = int(args[args.index("--workers") + 1])
    sock, address = notify_socket
    port = free_port()
    kill_signal = signal.Signals[units["KillSignal"]]
    argv = activated_argv(port, args, {"NOTIFY_SOCKET": address})
    with command(argv, tmp_path) as server:
        server.wait_for("stderr", rf"Listening on 127\.0\.0\.1:{port} as 3")
        assert ask(port) == PREFIX + b"hi\n"
        assert receive(sock) == [f"STATUS=starting {workers} workers"]
        assert receive(sock) == [
            "READY=1",
            f"STATUS=serving on 127.0.0.1:{port}, {workers} workers",
        ]
        server.process.send_signal(kill_signal)
        assert server.process.wait(float(units["TimeoutStopSec"])) == 0
        assert receive(sock) == ["STOPPING=1", "STATUS=stopping"]


# --fd: a socket handed over by any other supervisor.


@pytest.mark.parametrize("workers", ["1", "2"])
def test_fd_serves_a_socket_bound_by_the_parent(tmp_path: Path, workers: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        fd = listener.fileno()
        args = ["--protocol", "thanks", "--fd", str(fd), "--workers", workers, "--port", "1"]
        with command(aioserver_argv(args), tmp_path, pass_fds=[fd]) as server:
            server.wait_for("stdout", rf"^Listening on 127\.0\.0\.1:{port}$")
            assert ask(port) == PREFIX + b"hi\n"
            assert server.stop() == 0
    assert "Traceback" not in server.stderr


def test_fd_from_the_environment_variable(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        fd = listener.fileno()
        env = {"AIOSERVER_FD": str(fd)}
        argv = aioserver_argv(["--protocol", "thanks"])
        with command(argv, tmp_path, env=env, pass_fds=[fd]) as server:
            server.wait_for("stdout", rf"^Listening on 127\.0\.0\.1:{port}$")
            assert ask(port) == PREFIX + b"hi\n"
            assert server.stop() == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [("x", "expected a whole number, not 'x'"), ("-1", "expected a number at least 0, not -1")],
)
def test_a_bad_fd_value_is_one_line_and_exit_2(value: str, message: str) -> None:
    result = subprocess.run(
        aioserver_argv(["--fd", value]),
        capture_output=True,
        text=True,
        env=aioserver_env(),
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"aioserver: error: argument --fd: {message}"


def test_an_fd_that_is_no_listening_socket_cannot_start(tmp_path: Path) -> None:
    with socket.socket() as unbound:
        fd = unbound.fileno()
        result = subprocess.run(
            aioserver_argv(["--fd", str(fd)]),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=aioserver_env(),
            pass_fds=[fd],
            timeout=RUN_TIMEOUT,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"aioserver: error: cannot serve on a socket handed over: fd {fd} is not listening"
    )
    assert "Traceback" not in result.stderr


# Readiness.


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_after_the_listening_line_and_stopping_after_sigterm(
    tmp_path: Path, notify_socket: tuple[socket.socket, str], workers: int
) -> None:
    sock, address = notify_socket
    args = ["--protocol", "thanks", "--port", "0", "--workers", str(workers)]
    with command(aioserver_argv(args), tmp_path, env={"NOTIFY_SOCKET": address}) as server:
        if workers > 1:
            assert receive(sock) == [f"STATUS=starting {workers} workers"]
        ready = receive(sock)
        # Written before READY=1 was sent: on stdout already.
        match = re.search(r"^Listening on (127\.0\.0\.1:(\d+))$", server.stdout, re.M)
        assert match, server.stdout
        serving = f"serving on {match[1]}" + (f", {workers} workers" if workers > 1 else "")
        assert ready == ["READY=1", f"STATUS={serving}"]
        if workers > 1:  # the log is written by a thread of its own: wait for it
            server.wait_for("stderr", r"Started worker \d+(.|\n)*Started worker \d+")
        port = int(match[2])
        assert ask(port) == PREFIX + b"hi\n"
        assert nothing_waiting(sock)
        assert server.stop() == 0
        assert receive(sock) == ["STOPPING=1", "STATUS=stopping"]
        assert nothing_waiting(sock)
    assert "Cannot notify" not in server.stderr


def test_an_abstract_notify_socket(tmp_path: Path) -> None:
    name = f"aioserver-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(NOTIFY_TIMEOUT)
        argv = aioserver_argv(["--port", "0"])
        with command(argv, tmp_path, env={"NOTIFY_SOCKET": "@" + name}) as server:
            assert receive(sock)[0] == "READY=1"
            assert server.stop() == 0
            assert receive(sock)[0] == "STOPPING=1"


def test_a_notify_socket_no_one_listens_on_is_one_warning(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sock"
    argv = aioserver_argv(["--protocol", "thanks", "--port", "0"])
    with command(argv, tmp_path, env={"NOTIFY_SOCKET": str(missing)}) as server:
        match = server.wait_for("stdout", r"^Listening on 127\.0\.0\.1:(\d+)$")
        assert ask(int(match[1])) == PREFIX + b"hi\n"
        assert server.stop() == 0
    assert server.stderr.count("Cannot notify the service manager") == 1
    assert "Traceback" not in server.stderr


SUPERVISED = """\
import os, select, signal, sys, time
from aioserver.workers import supervise

directory = sys.argv[1]

def serve_worker(sockets, inbox, ready):
    try:
        os.close(os.open(os.path.join(directory, "first"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        time.sleep(0.5)  # the second worker is slow to accept
    with open(os.path.join(directory, "ready"), "a") as out:
        out.write("%d %f\\n" % (os.getpid(), time.monotonic()))
    ready()
    while not inbox.take():
        select.select([inbox.fileno()], [], [])
    return 0

def all_ready():
    with open(os.path.join(directory, "all"), "w") as out:
        out.write("%f\\n" % time.monotonic())
    os.kill(os.getpid(), signal.SIGTERM)

def stopping():
    with open(os.path.join(directory, "stopping"), "w") as out:
        out.write("%f\\n" % time.monotonic())

sys.exit(supervise(2, [], serve_worker, on_ready=all_ready, on_stopping=stopping))
"""


def test_the_supervisor_is_ready_once_every_worker_is(tmp_path: Path) -> None:
    """`supervise` calls on_ready only after the slower worker reported ready."""
    script = tmp_path / "supervised.py"
    script.write_text(SUPERVISED)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env=aioserver_env(),
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    reports = [line.split() for line in (tmp_path / "ready").read_text().splitlines()]
    assert len({pid for pid, _ in reports}) == 2
    all_ready = float((tmp_path / "all").read_text())
    assert all_ready >= max(float(when) for _, when in reports)
    assert float((tmp_path / "stopping").read_text()) >= all_ready


# The discovery itself, in this process.


def test_variables_for_another_process_are_not_ours_and_are_unset() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
    assert inherited_sockets(env) is None
    assert env == {}
    assert inherited_sockets({}) is None


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"LISTEN_PID": "me", "LISTEN_FDS": "1"}, "LISTEN_PID='me' is not a process id"),
        ({"LISTEN_FDS": "many"}, "LISTEN_FDS='many' is not a number of descriptors"),
        ({"LISTEN_FDS": "-2"}, "LISTEN_FDS='-2' is not a number of descriptors"),
    ],
)
def test_malformed_variables_are_an_error(variables: dict[str, str], message: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), **variables}
    with pytest.raises(InheritedSocketError) as raised:
        inherited_sockets(env)
    assert str(raised.value) == message
    assert env == {}


def test_sockets_from_fds_checks_each_and_leaves_them_open_on_failure() -> None:
    with (
        socket.socket() as listening,
        socket.socket() as idle,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram,
    ):
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        listening.set_inheritable(True)
        for fd, why in [
            (idle.fileno(), "is not listening"),
            (datagram.fileno(), "is not a stream socket"),
        ]:
            with pytest.raises(InheritedSocketError, match=rf"^fd {fd} {why}$"):
                sockets_from_fds([listening.fileno(), fd])
            assert listening.get_inheritable()  # left as it was, and open
        with (
            tempfile.TemporaryFile() as plain,
            pytest.raises(InheritedSocketError, match=r"is not a socket$"),
        ):
            sockets_from_fds([plain.fileno()])
        [taken] = sockets_from_fds([listening.fileno(), listening.fileno()])
        assert taken.fileno() == listening.fileno()
        assert not taken.get_inheritable()
        taken.detach()  # `listening` closes it
