"""SIGHUP to the supervisor (`--workers N`): fresh workers import the handler anew,
and once they all accept the old ones stop gracefully; the sockets stay open.

Every test runs the command in a subprocess, with a handler module written to
tmp_path (`--protocol mod:handle`, cwd tmp_path), on 127.0.0.1, and is bounded.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import (
    RUN_TIMEOUT,
    START_TIMEOUT,
    AioserverProcess,
    start_aioserver,
    wait_until_blocking,
)

# Same size in v1 and v2: a .pyc checked by mtime and size would take a rewrite
# within the same second for the old file.
HANDLER = """\
import os

async def handle(reader, writer):
    while line := await reader.readline():
        writer.write(b"VERSION %d " % os.getpid() + line)
        await writer.drain()
    writer.close()
"""
SLOW_IMPORT = "import time\ntime.sleep(1.5)\n"
REPLY = re.compile(rb"^(v\d) (\d+) (.*)\n$")


def write_handler(directory: Path, version: str, prefix: str = "") -> None:
    (directory / "mod.py").write_text(prefix + HANDLER.replace("VERSION", version))


def start(directory: Path, *args: str, workers: int = 2) -> AioserverProcess:
    return start_aioserver(
        "--protocol",
        "mod:handle",
        "--port",
        "0",
        "--workers",
        str(workers),
        "--shutdown-timeout",
        "5",
        "--no-access-log",
        *args,
        cwd=directory,
    )


def started_workers(process: AioserverProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"Started worker (\d+)", process.stderr)]


def wait_for_count(process: AioserverProcess, text: str, count: int) -> None:
    process.wait_for("stderr", lambda err: err.count(text) >= count, START_TIMEOUT)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def ask(port: int, line: bytes) -> tuple[str, int, bytes]:
    """One connection, one request, everything until EOF: (version, pid, echoed line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=RUN_TIMEOUT) as client:
        client.sendall(line + b"\n")
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(4096):
            received += chunk
    match = REPLY.match(received)
    assert match, received
    assert match[3] == line, received
    return match[1].decode(), int(match[2]), match[3]


class LongLived(threading.Thread):
    """One connection exchanging request and reply until the server ends it."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.client = socket.create_connection(("127.0.0.1", port), timeout=RUN_TIMEOUT)
        self.replies: list[bytes] = []
        self.sent = 0
        self.ending: bytes | BaseException | None = None  # b"" for a clean EOF
        self.lock = threading.Lock()

    def run(self) -> None:
        reader = self.client.makefile("rb")
        try:
            while True:
                self.client.sendall(b"long %d\n" % self.sent)
                self.sent += 1
                reply = reader.readline()
                if not reply:
                    self.ending = reader.read()  # b"": nothing after the EOF
                    return
                with self.lock:
                    self.replies.append(reply)
                time.sleep(0.002)
        except BaseException as error:
            self.ending = error
        finally:
            reader.close()
            self.client.close()

    def count(self) -> int:
        with self.lock:
            return len(self.replies)


def test_a_reload_serves_the_new_code_with_no_refused_connection_or_lost_reply(
    tmp_path: Path,
) -> None:
    write_handler(tmp_path, "v1")
    with start(tmp_path) as server:
        wait_for_count(server, "Started worker", 2)
        old = set(started_workers(server))
        long_lived = LongLived(server.port)
        long_lived.start()
        results: list[tuple[str, int, bool]] = []  # version, pid, old workers gone at start
        errors: list[BaseException] = []
        resets: list[int] = []  # see the end
        hup_sent = threading.Event()

        def client_loop() -> None:
            deadline = time.monotonic() + 60
            try:
                index = 0
                while (
                    index < 200
                    or sum(v == "v2" for v, _, _ in results) < 50
                    or sum(gone for _, _, gone in results) < 20
                ):
                    assert time.monotonic() < deadline, "the client loop took too long"
                    gone = hup_sent.is_set() and not any(alive(pid) for pid in old)
                    try:
                        version, pid, _ = ask(server.port, b"c %d" % index)
                    except OSError as error:  # reset: at send, shutdown or recv
                        if error.errno not in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):
                            raise
                        resets.append(index)
                    else:
                        results.append((version, pid, gone))
                    index += 1
                    if index == 60:
                        # The rewrite and the SIGHUP come from the main thread.
                        hup_sent.wait(RUN_TIMEOUT)
            except BaseException as error:
                errors.append(error)

        loop = threading.Thread(target=client_loop, daemon=True)
        loop.start()
        while len(results) < 50 and loop.is_alive():
            time.sleep(0.01)
        write_handler(tmp_path, "v2")
        before_hup = long_lived.count()
        server.process.send_signal(signal.SIGHUP)
        hup_sent.set()
        loop.join(90)
        long_lived.join(RUN_TIMEOUT)
        assert not loop.is_alive()
        assert not long_lived.is_alive()
        assert errors == [], errors  # no ConnectionRefusedError, no short reply
        server.wait_for_log("Reloaded: 2 new workers accept")
        new = set(started_workers(server)) - old
        assert len(new) == 2

        versions = [version for version, _, _ in results]
        assert versions[0] == "v1"
        assert versions[-1] == "v2"
        for version, pid, _ in results:
            assert pid in (old if version == "v1" else new), (version, pid, old, new)
        # While both old and new workers accept, either may answer; once the old
        # ones are gone, only v2 answers.
        after = [version for version, _, gone in results if gone]
        assert after
        assert set(after) == {"v2"}
        assert versions.index("v2") >= 50

        # The long-lived connection: every reply whole and in order, served by an
        # old worker across the SIGHUP, then a clean EOF (no reset, nothing after).
        # Its next request may race the old worker closing a connection that
        # looked idle (nothing in flight either way): a clean EOF, or a reset,
        # but never a reply cut short (checked below: every reply is whole).
        assert long_lived.ending == b"" or isinstance(long_lived.ending, ConnectionResetError), (
            long_lived.ending
        )
        assert long_lived.count() > before_hup
        first = REPLY.match(long_lived.replies[0])
        assert first is not None
        pid = int(first[2])
        assert pid in old
        assert long_lived.replies == [
            b"v1 %d long %d\n" % (pid, i) for i in range(long_lived.count())
        ]
        # At most the request in flight when its worker stopped went unread.
        assert long_lived.sent - long_lived.count() <= 1

        assert not any(alive(pid) for pid in old)
        assert all(alive(pid) for pid in new)
        assert {ask(server.port, b"after")[0] for _ in range(10)} == {"v2"}
        server.stop()
    assert server.returncode == 0
    assert "Traceback" not in server.stderr
    assert "ERROR" not in server.stderr
    # A connection an old worker accepted just as its stop began is served
    # too (FRESH_GRACE in aioserver/connection.py), not reset.
    assert resets == []


def test_a_module_broken_at_the_reload_leaves_the_old_workers_serving(tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    with start(tmp_path) as server:
        wait_for_count(server, "Started worker", 2)
        old = set(started_workers(server))
        (tmp_path / "mod.py").write_text("async def handle(reader, writer:\n")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("Reload failed")
        time.sleep(0.5)  # room for any other line the failure would log
        errors = [line for line in server.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1, server.stderr
        assert re.search(
            r"ERROR aioserver: Reload failed: importing 'mod' failed: SyntaxError: .*;"
            r" the old workers serve on$",
            errors[0],
        ), errors[0]
        assert "Traceback" not in server.stderr
        assert all(alive(pid) for pid in old)
        answered = {ask(server.port, b"still") for _ in range(10)}
        assert {version for version, _, _ in answered} == {"v1"}
        assert {pid for _, pid, _ in answered} <= old
        # Fixed, the next SIGHUP reloads.
        write_handler(tmp_path, "v2")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("Reloaded: 2 new workers accept")
        assert ask(server.port, b"fixed")[0] == "v2"
        server.stop()
    assert server.returncode == 0


def test_sigterm_during_a_reload_stops_old_and_new_workers(tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    with start(tmp_path) as server:
        wait_for_count(server, "Started worker", 2)
        write_handler(tmp_path, "v2", prefix=SLOW_IMPORT)  # the fresh workers take 1.5 s
        server.process.send_signal(signal.SIGHUP)
        wait_for_count(server, "Started worker", 4)
        assert "Reloaded" not in server.stderr
        workers = started_workers(server)
        server.stop(signal.SIGTERM)
        assert server.returncode == 0, server.stderr
    assert not any(alive(pid) for pid in workers)
    assert "Traceback" not in server.stderr
    assert "Reloaded" not in server.stderr


def test_sighup_to_a_single_process_is_logged_and_ignored(tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    with start(tmp_path, workers=1) as server:
        write_handler(tmp_path, "v2")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("SIGHUP received: ignored (reloading needs --workers)")
        assert ask(server.port, b"same")[:2] == ("v1", server.pid)
        server.stop()
    assert server.returncode == 0


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    directory = tempfile.mkdtemp(prefix="aiosd")  # short: sun_path is 108 bytes
    path = os.path.join(directory, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(START_TIMEOUT)
        yield sock, path
    shutil.rmtree(directory, ignore_errors=True)


def test_notify_socket_gets_reloading_then_ready(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    write_handler(tmp_path, "v1")
    server = start_aioserver(
        "--protocol",
        "mod:handle",
        "--port",
        "0",
        "--workers",
        "2",
        cwd=tmp_path,
        env={"NOTIFY_SOCKET": address},
    )
    with server:

        def receive() -> list[str]:
            return sock.recv(4096).decode().splitlines()

        serving = f"STATUS=serving on {server.address}, 2 workers"
        assert receive() == ["STATUS=starting 2 workers"]
        assert receive() == ["READY=1", serving]
        wait_for_count(server, "Started worker", 2)
        old = started_workers(server)
        write_handler(tmp_path, "v2")
        server.process.send_signal(signal.SIGHUP)
        reloading = receive()
        assert reloading[0] == "RELOADING=1"
        assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1])
        usec = int(reloading[1].split("=")[1])
        assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 10_000_000
        assert reloading[2:] == ["STATUS=reloading: starting 2 new workers"]
        assert receive() == ["READY=1", serving]
        # READY=1 comes once the new workers accept; the old ones, told to stop
        # then, may still take a connection until their listeners close.
        wait_until_blocking(lambda: not any(alive(pid) for pid in old), 10, "old workers gone")
        assert ask(server.port, b"x")[0] == "v2"
        server.stop()
        assert receive() == ["STOPPING=1", "STATUS=stopping"]
    assert server.returncode == 0
