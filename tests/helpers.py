"""What the test modules share: one copy of each helper they used to repeat.

- the thanks protocol's reply prefix and an oracle for its replies;
- async clients' `close`, `wait_until` (and its blocking twin), `open_fds`,
  `ExceptionRecorder` for the loop's exception handler;
- the IPv6 probe (`ipv6_works()`, `HAS_IPV6`, the `needs_ipv6` mark);
- TLS material made with trustme (the session fixtures in conftest.py use it);
- the `aioserver` command in a subprocess: `start_aioserver` starts it and reads
  its `Listening on ADDRESS` lines, `run_aioserver` runs one that ends by itself.

Plain code only; the fixtures built on it live in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Protocol

import pytest
import trustme

# Replies and clients.

# The thanks protocol answers each line with this prefix, then the line.
PREFIX = b"Thank you for your message "


def expected_thanks(data: bytes) -> bytes:
    """What the thanks protocol must send for `data` followed by EOF: an oracle
    written apart from the server's own rule. Each line keeps its ending; a final
    fragment without one is answered with a newline."""
    *lines, fragment = data.split(b"\n")
    replies = [PREFIX + line + b"\n" for line in lines]
    if fragment:
        replies.append(PREFIX + fragment + b"\n")
    return b"".join(replies)


async def close(writer: asyncio.StreamWriter) -> None:
    """Close a client's writer and wait until it is closed; a peer that reset the
    connection or closed it first is no error here."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


# Waiting and counting.


async def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, what: str = "the condition"
) -> None:
    """Wait for `condition` to hold, checking every few milliseconds without
    blocking the loop; fail the test at `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def wait_until_blocking(
    condition: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = 0.05,
) -> None:
    """`wait_until` for synchronous tests: sleeps `interval` between checks."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def open_fds(pid: int | str = "self", below: int | None = None) -> int:
    """How many file descriptors a process (this one by default) has open now;
    with `below`, only those numbered under it."""
    names = os.listdir(f"/proc/{pid}/fd")
    return sum(1 for name in names if below is None or int(name) < below)


class ExceptionRecorder:
    """Collects what reaches the running loop's exception handler."""

    def __init__(self) -> None:
        self.contexts: list[dict[str, object]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        self.contexts.append(context)


# IPv6.


def ipv6_works() -> bool:
    """Whether this host can listen on ::1 (containers often have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = ipv6_works()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="::1 is not available here")


# TLS, made with trustme; conftest.py serves these as session fixtures.

# The names the server certificate is good for.
TLS_NAMES = ("127.0.0.1", "localhost")


def issue_server_cert(ca: trustme.CA) -> trustme.LeafCert:
    """A server certificate signed by `ca` for 127.0.0.1 and localhost."""
    return ca.issue_cert(*TLS_NAMES)


def make_server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    """A server-side context presenting `cert`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


def make_client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client-side context that verifies certificates against `ca` (and only it)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def write_tls_files(cert: trustme.LeafCert, directory: Path) -> tuple[Path, Path]:
    """Write `cert` and its key as directory/cert.pem and directory/key.pem, as the
    command's --certfile and --keyfile take them; return (certfile, keyfile)."""
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return certfile, keyfile


# The `aioserver` command in a subprocess.

# The installed console script, next to the interpreter running the tests.
SCRIPT = str(Path(sys.executable).with_name("aioserver"))
# Start-up of a Python process under coverage on a loaded 2-core machine, with room.
START_TIMEOUT = 20.0
# A command that is not serving (errors, --help) ends well within this, as does a stop.
RUN_TIMEOUT = 20.0
# The line the command prints on stdout for each address it listens on.
LISTENING = re.compile(r"^Listening on (\S+)$", re.MULTILINE)

# How the command is started: `python -m aioserver`, or the console script.
Entry = Literal["module", "script"]


def aioserver_argv(args: Sequence[str], entry: Entry = "module") -> list[str]:
    """The command line of `aioserver ARGS...`."""
    if entry == "script":
        return [SCRIPT, *args]
    return [sys.executable, "-m", "aioserver", *args]


def aioserver_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment (coverage's subprocess set-up included) without
    any AIOSERVER_* variable, then `extra`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIOSERVER_")}
    env.update(extra or {})
    return env


def _preexec(
    fd_limit: int | None, preexec_fn: Callable[[], None] | None
) -> Callable[[], None] | None:
    """What the child runs before exec: lower its soft RLIMIT_NOFILE to `fd_limit`
    (before Python imports anything), then `preexec_fn`."""
    if fd_limit is None:
        return preexec_fn

    def prepare() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, hard))
        if preexec_fn is not None:
            preexec_fn()

    return prepare


def port_of(address: str) -> int:
    """The port of a `Listening on` address: 127.0.0.1:PORT or [::1]:PORT."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise AssertionError(f"not a TCP address: {address!r}")
    return int(port)


class AioserverProcess:
    """One running `aioserver`, its stdout and stderr collected as they come (by
    threads, so no pipe fills however much it logs).

    From a coroutine, call the blocking methods (`finish`, `stop`) through
    `asyncio.to_thread` if other tasks must run meanwhile.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.argv = argv
        # The addresses of the `Listening on` lines, once `wait_ready` has read them.
        self.addresses: list[str] = []
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            preexec_fn=preexec_fn,
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

    def __repr__(self) -> str:
        return f"<AioserverProcess {self.process.pid} {' '.join(self.argv)}>"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def stdout(self) -> str:
        """Everything on stdout so far."""
        with self._changed:
            return self._output["stdout"].decode(errors="replace")

    @property
    def stderr(self) -> str:
        """Everything on stderr (the log) so far."""
        with self._changed:
            return self._output["stderr"].decode(errors="replace")

    def wait_for(self, name: str, found: Callable[[str], bool], timeout: float) -> str:
        """Wait until `found(output so far on name)`, "stdout" or "stderr"; return
        that output. Fails with all the output when the stream ends or time is up."""
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
                    raise AssertionError(
                        f"not seen on {name} of {self!r} (exit status {self.process.poll()});"
                        f" output so far: {output}"
                    )
                self._changed.wait(remaining)

    def wait_ready(self, count: int = 1, timeout: float = START_TIMEOUT) -> list[str]:
        """Wait for `count` `Listening on` lines; keep and return their addresses."""
        text = self.wait_for("stdout", lambda out: len(LISTENING.findall(out)) >= count, timeout)
        self.addresses = LISTENING.findall(text)[:count]
        return self.addresses

    @property
    def address(self) -> str:
        """The first address listened on."""
        assert self.addresses, f"{self!r}: wait_ready() has not seen a Listening line"
        return self.addresses[0]

    @property
    def port(self) -> int:
        """The port of the first address listened on."""
        return port_of(self.address)

    def wait_for_log(self, text: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until `text` is on stderr."""
        self.wait_for("stderr", lambda err: text in err, timeout)

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        """Wait for the exit and for all of its output; return the exit status."""
        status = self.process.wait(timeout)
        for pump in self._pumps:
            pump.join(timeout)
        return status

    def stop(self, signum: int = signal.SIGTERM, timeout: float = RUN_TIMEOUT) -> float:
        """Send `signum` (if it still runs), wait for the exit and all of its
        output; return the seconds that took. The status is in `returncode`."""
        started = time.monotonic()
        self.process.send_signal(signum)
        self.finish(timeout)
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL if it still runs; reap it and close its pipes. Harmless twice."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(RUN_TIMEOUT)
        for pump in self._pumps:
            pump.join(RUN_TIMEOUT)
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self.process.stdout.close()
        self.process.stderr.close()

    def open_fds(self, below: int | None = None) -> int:
        """Descriptors the server has open (only those numbered under `below`)."""
        return open_fds(self.process.pid, below)

    def __enter__(self) -> AioserverProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kill()


def spawn_aioserver(
    *args: str,
    entry: Entry = "module",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    fd_limit: int | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> AioserverProcess:
    """Start `aioserver ARGS...` and return at once, without waiting for it.

    `env` is added to this environment less its AIOSERVER_* variables; `fd_limit`
    sets the child's soft RLIMIT_NOFILE before it starts; `preexec_fn` runs in
    the child before exec (after the limit).
    """
    return AioserverProcess(
        aioserver_argv(args, entry),
        env=aioserver_env(env),
        cwd=cwd,
        preexec_fn=_preexec(fd_limit, preexec_fn),
    )


def start_aioserver(
    *args: str,
    ready: int = 1,
    timeout: float = START_TIMEOUT,
    entry: Entry = "module",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    fd_limit: int | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> AioserverProcess:
    """Start `aioserver ARGS...` (as `spawn_aioserver`) and wait up to `timeout`
    for its first `ready` `Listening on` lines: their addresses are in
    `.addresses`, the first in `.address`, its port in `.port`. A command that
    does not get there is killed and the test fails with its output.

    Use it as a context manager, or kill it in teardown (conftest's
    `start_server` fixture does).
    """
    server = spawn_aioserver(
        *args, entry=entry, env=env, cwd=cwd, fd_limit=fd_limit, preexec_fn=preexec_fn
    )
    try:
        server.wait_ready(ready, timeout)
    except BaseException:
        server.kill()
        raise
    return server


def run_aioserver(
    *args: str,
    entry: Entry = "module",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    fd_limit: int | None = None,
    preexec_fn: Callable[[], None] | None = None,
    timeout: float = RUN_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run `aioserver ARGS...` that is expected to end by itself (errors, --help,
    --version), with the options of `spawn_aioserver`; return its output as text."""
    return subprocess.run(
        aioserver_argv(args, entry),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=aioserver_env(env),
        cwd=cwd,
        preexec_fn=_preexec(fd_limit, preexec_fn),
        timeout=timeout,
        check=False,
    )


class StartServer(Protocol):
    """The `start_server` fixture: `start_aioserver`, killed at the test's teardown."""

    def __call__(
        self,
        *args: str,
        ready: int = 1,
        timeout: float = START_TIMEOUT,
        entry: Entry = "module",
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        fd_limit: int | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> AioserverProcess: ...


def jam(sock: socket.socket) -> None:
    """Send until the server stops reading from a client that takes no replies."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    for _ in range(1 << 14):
        try:
            sock.send(chunk)
        except BlockingIOError:
            _, writable, _ = select.select([], [sock], [], 0.3)
            if not writable:
                sock.setblocking(True)
                return
    raise AssertionError("the server kept reading from a client that takes no replies")


# The event loops a test runs the command or a threaded server on.
LOOPS = ["asyncio", "uvloop"]


async def talk(address: tuple[str, int], data: bytes) -> bytes:
    """Send `data`, half-close, and return everything received until EOF."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        writer.write_eof()
        return await reader.read()
    finally:
        await close(writer)


def sends(data: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A handler that writes `data` in one write as the client connects, then closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    return handler
