"""`--workers 2`: two processes serve one port, a dead one is replaced, SIGTERM stops all."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import AioserverProcess, start_aioserver

PID_HANDLER = """\
import asyncio, os

async def pid(reader, writer):
    while line := await reader.readline():
        writer.write(b"%d " % os.getpid() + line)
        await writer.drain()
    writer.close()
"""

# How long the supervisor may take to replace a killed worker.
REPLACEMENT_TIMEOUT = 15.0


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[AioserverProcess]:
    (tmp_path / "pidhandler.py").write_text(PID_HANDLER)
    pythonpath = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    with start_aioserver(
        "--protocol",
        "pidhandler:pid",
        "--port",
        "0",
        "--workers",
        "2",
        "--shutdown-timeout",
        "2",
        # Hundreds of connections: keep their log lines out of the log this test reads.
        "--no-access-log",
        env={"PYTHONPATH": pythonpath},
    ) as process:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", process.address), process.address
        yield process


def ask_pid(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"who\n")
        reply = client.recv(100)
    pid, rest = reply.split(b" ", 1)
    assert rest == b"who\n"
    return int(pid)


def pids_serving(port: int, want: int, attempts: int = 400) -> set[int]:
    """Connect until `want` distinct worker pids have answered."""
    seen: set[int] = set()
    for _ in range(attempts):
        seen.add(ask_pid(port))
        if len(seen) >= want:
            break
    return seen


def test_two_workers_share_the_port_survive_sigkill_and_stop_on_sigterm(
    supervisor: AioserverProcess,
) -> None:
    process, port = supervisor.process, supervisor.port
    workers = pids_serving(port, 2)
    assert len(workers) == 2
    assert process.pid not in workers

    # A client of one worker stays connected while the other worker is killed.
    survivor_client = socket.create_connection(("127.0.0.1", port), timeout=10)
    survivor_client.sendall(b"first\n")
    survivor_pid = int(survivor_client.recv(100).split(b" ", 1)[0])
    victim = (workers - {survivor_pid}).pop()
    os.kill(victim, signal.SIGKILL)

    # Until the replacement answers, only the survivor may; the victim never again.
    deadline = time.monotonic() + REPLACEMENT_TIMEOUT
    serving = pids_serving(port, 2)
    while len(serving) < 2:
        assert serving == {survivor_pid}, f"killed {victim}, then answered: {serving}"
        assert time.monotonic() < deadline, f"no replacement for {victim}: {serving}"
        serving = pids_serving(port, 2)
    assert victim not in serving
    assert survivor_pid in serving
    [replacement] = serving - workers  # a new process, not one of the first two
    survivor_client.sendall(b"second\n")
    assert survivor_client.recv(100) == b"%d second\n" % survivor_pid
    survivor_client.close()

    started = time.monotonic()
    supervisor.stop(signal.SIGTERM, timeout=10)
    assert supervisor.returncode == 0
    assert time.monotonic() - started < 3
    err = supervisor.stderr
    assert "Traceback" not in err
    assert f"Worker {victim} exited (killed by SIGKILL)" in err
    for pid in (survivor_pid, replacement):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
