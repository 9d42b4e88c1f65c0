"""`--workers 2`: two processes serve one port, a dead one is replaced, SIGTERM stops all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PID_HANDLER = """\
import asyncio, os

async def pid(reader, writer):
    while line := await reader.readline():
        writer.write(b"%d " % os.getpid() + line)
        await writer.drain()
    writer.close()
"""


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    (tmp_path / "pidhandler.py").write_text(PID_HANDLER)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aioserver",
            "--protocol",
            "pidhandler:pid",
            "--port",
            "0",
            "--workers",
            "2",
            "--shutdown-timeout",
            "2",
            # Hundreds of connections: their log lines would fill the stderr pipe,
            # which this test reads only at the end.
            "--no-access-log",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    assert line.startswith("Listening on 127.0.0.1:"), line
    try:
        yield process, int(line.rsplit(":", 1)[1])
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stdout.close()
        assert process.stderr is not None
        process.stderr.close()


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
    supervisor: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = supervisor
    workers = pids_serving(port, 2)
    assert len(workers) == 2
    assert process.pid not in workers

    # A client of one worker stays connected while the other worker is killed.
    survivor_client = socket.create_connection(("127.0.0.1", port), timeout=10)
    survivor_client.sendall(b"first\n")
    survivor_pid = int(survivor_client.recv(100).split(b" ", 1)[0])
    victim = (workers - {survivor_pid}).pop()
    os.kill(victim, signal.SIGKILL)

    deadline = time.monotonic() + 15
    serving = pids_serving(port, 2)
    while serving != (serving - {victim}) or len(serving) < 2:
        assert time.monotonic() < deadline, f"no replacement for {victim}: {serving}"
        serving = pids_serving(port, 2) - {victim}
    assert survivor_pid in serving
    survivor_client.sendall(b"second\n")
    assert survivor_client.recv(100) == b"%d second\n" % survivor_pid
    survivor_client.close()

    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert time.monotonic() - started < 3
    assert process.stderr is not None
    err = process.stderr.read().decode()
    assert "Traceback" not in err
    assert f"Worker {victim} exited (killed by SIGKILL)" in err
    for pid in serving:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
