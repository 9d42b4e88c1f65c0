"""`--workers 2`: two processes serve one port, a dead one is replaced, SIGTERM stops all.

The supervisor and its workers as one state machine, tried as an operator would:
a stop signal at the worst moments (right after the `Listening on` line, while a
worker is being restarted), a second signal, a worker killed during the stop,
and SIGTERM to every process at once as systemd's KillMode=control-group sends
it. Each race is repeated enough to have caught the old code every time.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aioserver.workers import RESTART_BACKOFF

from .helpers import LOOPS, AioserverProcess, expected_thanks, jam, start_aioserver

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


# Every process of one supervisor, found by a token in its environment: the
# workers are forks of it and inherit it, whatever happened to the supervisor.

TOKEN_VARIABLE = "TEST_AIOSERVER_TOKEN"
# A stop here (no client, or a client that reads) takes milliseconds; the old
# code hung for ever.
STOP_TIMEOUT = 10.0
STARTED = re.compile(r"Started worker (\d+)")


def processes_with(token: str) -> list[int]:
    """The live processes whose environment holds `token` (zombies have none)."""
    needle = f"{TOKEN_VARIABLE}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{name}/environ", "rb") as environ:
            if needle in environ.read().split(b"\0"):
                found.append(int(name))
    return found


@pytest.fixture
def tokens() -> Iterator[Callable[[], dict[str, str]]]:
    """`tokens()`: an environment with a new token; at teardown, every process
    still holding one of them is killed, so a failure leaves nothing behind."""
    made: list[str] = []

    def new() -> dict[str, str]:
        made.append(uuid.uuid4().hex)
        return {TOKEN_VARIABLE: made[-1]}

    yield new
    for token in made:
        for pid in processes_with(token):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def token_of(env: dict[str, str]) -> str:
    return env[TOKEN_VARIABLE]


def start_supervisor(env: dict[str, str], loop: str, *args: str) -> AioserverProcess:
    return start_aioserver(
        "--port", "0", "--workers", "2", "--loop", loop, "--no-access-log", *args, env=env
    )


def wait_for_workers(process: AioserverProcess, count: int = 2) -> list[int]:
    """The pids of the first `count` workers, once the supervisor has logged them."""
    err = process.wait_for("stderr", lambda err: len(STARTED.findall(err)) >= count, STOP_TIMEOUT)
    return [int(pid) for pid in STARTED.findall(err)[:count]]


def assert_all_ended(
    process: AioserverProcess, env: dict[str, str], status: int = 0, note: object = None
) -> None:
    """The supervisor exited with `status`, without a traceback, and left no process."""
    err = process.stderr
    assert process.returncode == status, (note, err)
    assert "Traceback" not in err, note
    assert processes_with(token_of(env)) == [], (note, err)


def read_to_end(client: socket.socket) -> bytes:
    received = bytearray()
    while chunk := client.recv(65536):
        received += chunk
    return bytes(received)


# A stop requested before, during or after the workers start stops them all.

STOP_RACE_REPEATS = 20


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_right_after_the_listening_line_stops_every_worker(
    tokens: Callable[[], dict[str, str]], signum: signal.Signals, loop: str
) -> None:
    # The old supervisor printed the line before its handlers were in place (it
    # died of the signal: -15, or 130 for SIGINT), or took the signal before any
    # worker existed, forked them anyway and waited for ever.
    for attempt in range(STOP_RACE_REPEATS):
        env = tokens()
        with start_supervisor(env, loop) as process:
            process.process.send_signal(signum)  # at once: the workers are being forked
            process.finish(STOP_TIMEOUT)
            assert_all_ended(process, env, note=attempt)
            assert f"{signum.name} received: stopping" in process.stderr, attempt


# SIGTERM while the supervisor restarts a worker it found dead.

RESTART_RACE_REPEATS = 20
# At the same time: the race is in each supervisor, and 2 cores are enough.
RESTART_RACE_PARALLEL = 4
# After the supervisor logged the death: the old code hung in 12 tries of 20
# with these (its replacement took the signal within the first millisecond).
RESTART_RACE_DELAYS = [0.0, 0.0002, 0.0004, 0.0006, 0.0008]


def stop_during_a_restart(env: dict[str, str], loop: str, delay: float) -> AioserverProcess:
    with start_supervisor(env, loop) as process:
        victim, _ = wait_for_workers(process)
        # Old enough to be replaced at once, without the restart back-off.
        time.sleep(RESTART_BACKOFF + 0.2)
        os.kill(victim, signal.SIGKILL)
        process.wait_for_log(f"Worker {victim} exited (killed by SIGKILL); starting another")
        time.sleep(delay)  # the replacement is being forked, or starting its loop
        process.process.send_signal(signal.SIGTERM)
        process.finish(STOP_TIMEOUT)
    return process


def test_sigterm_during_a_restart_stops_every_worker(
    tokens: Callable[[], dict[str, str]],
) -> None:
    # The old replacement ran the supervisor's inherited handler (the signal
    # was lost, and forwarded to its siblings as a second one), or was killed by
    # SIGTERM before its loop handled it: the supervisor hung or exited 1.
    runs = [
        (tokens(), LOOPS[attempt % 2], RESTART_RACE_DELAYS[attempt % len(RESTART_RACE_DELAYS)])
        for attempt in range(RESTART_RACE_REPEATS)
    ]
    with ThreadPoolExecutor(RESTART_RACE_PARALLEL) as pool:
        processes = list(pool.map(lambda run: stop_during_a_restart(*run), runs))
    for (env, loop, delay), process in zip(runs, processes, strict=True):
        assert_all_ended(process, env, note=(loop, delay))
        assert "SIGTERM received: stopping the workers" in process.stderr


# The exit status says whether every worker stopped cleanly.

PID_FIRST_HANDLER = """\
import os

async def pid_first(reader, writer):
    writer.write(b"%d\\n" % os.getpid())
    await writer.drain()
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
"""


@pytest.fixture
def pid_first(tmp_path: Path) -> dict[str, str]:
    """The environment for `--protocol pidhandler:pid_first`: each client is first
    told the pid of the worker serving it, then echoed."""
    (tmp_path / "pidhandler.py").write_text(PID_FIRST_HANDLER)
    return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@contextlib.contextmanager
def stuck_client(port: int) -> Iterator[tuple[socket.socket, int]]:
    """A client that takes no replies, holding its worker's stop for the whole
    shutdown timeout; and the pid of that worker."""
    with socket.create_connection(("127.0.0.1", port), timeout=STOP_TIMEOUT) as client:
        pid = int(client.makefile("rb").readline())
        jam(client)
        yield client, pid


@pytest.mark.parametrize("loop", LOOPS)
def test_a_worker_killed_during_the_stop_makes_the_supervisor_exit_1(
    tokens: Callable[[], dict[str, str]], pid_first: dict[str, str], loop: str
) -> None:
    env = {**tokens(), **pid_first}
    args = ("--protocol", "pidhandler:pid_first", "--shutdown-timeout", "30")
    with start_supervisor(env, loop, *args) as process:
        wait_for_workers(process)
        with stuck_client(process.port) as (_, victim):
            process.process.send_signal(signal.SIGTERM)
            process.wait_for(
                "stderr", lambda err: err.count("SIGTERM received: stopping (") >= 2, STOP_TIMEOUT
            )
            os.kill(victim, 0)  # still stopping: its client owes it the shutdown timeout
            os.kill(victim, signal.SIGKILL)
            process.finish(STOP_TIMEOUT)
    assert_all_ended(process, env, status=1)
    assert f"Worker {victim} exited (killed by SIGKILL) while stopping" in process.stderr


@pytest.mark.parametrize("loop", LOOPS)
def test_a_second_signal_makes_the_supervisor_stop_the_workers_at_once(
    tokens: Callable[[], dict[str, str]], pid_first: dict[str, str], loop: str
) -> None:
    env = {**tokens(), **pid_first}
    args = ("--protocol", "pidhandler:pid_first", "--shutdown-timeout", "60")
    with start_supervisor(env, loop, *args) as process:
        wait_for_workers(process)
        with stuck_client(process.port) as (client, _):
            process.process.send_signal(signal.SIGINT)
            process.wait_for(
                "stderr", lambda err: err.count("SIGINT received: stopping (") >= 2, STOP_TIMEOUT
            )
            elapsed = process.stop(signal.SIGINT, timeout=STOP_TIMEOUT)
            with pytest.raises(ConnectionResetError):  # it was owed replies: reset, not EOF
                read_to_end(client)
    assert_all_ended(process, env)
    assert elapsed < 2.0
    err = process.stderr
    assert "SIGINT received again: stopping the workers at once" in err
    assert "SIGQUIT received: closing every connection now" in err


# systemd's default KillMode=control-group: SIGTERM to every process at once.

SLOW_READER_LINES = 1500  # 61.5 KB of replies: all read by the server at once


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("workers_first", [False, True], ids=["systemd-order", "workers-first"])
def test_sigterm_to_every_process_at_once_keeps_the_grace_period(
    tokens: Callable[[], dict[str, str]], loop: str, workers_first: bool
) -> None:
    # systemd signals the main process first, then the others; workers first
    # (2 ms apart) is the order in which a worker is sure to get its two
    # SIGTERMs one after the other, which the old worker took as "at once".
    env = tokens()
    args = ("--protocol", "thanks", "--shutdown-timeout", "10")
    with start_supervisor(env, loop, *args) as process:
        workers = wait_for_workers(process)
        with socket.socket() as client:
            # A small receive window: most of the replies wait in the server.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(STOP_TIMEOUT)
            client.connect(("127.0.0.1", process.port))
            lines = b"".join(b"message %05d\n" % i for i in range(SLOW_READER_LINES))
            client.sendall(lines)
            time.sleep(0.3)  # every line read and answered, the replies owed
            for pid in [*workers, process.pid] if workers_first else [process.pid, *workers]:
                with contextlib.suppress(ProcessLookupError):  # a worker without clients
                    os.kill(pid, signal.SIGTERM)
                if workers_first:
                    time.sleep(0.002)
            received = bytearray()
            while chunk := client.recv(1024):  # slowly: 100 KB/s
                received += chunk
                time.sleep(0.01)
        assert bytes(received) == expected_thanks(lines)
        process.finish(STOP_TIMEOUT)
    assert_all_ended(process, env)
    assert "closing every connection now" not in process.stderr


# A second signal soon after the first, when the old supervisor had put the
# default handlers back: killed by it, or a traceback.

SECOND_SIGNAL_DELAYS = [0.002, 0.004, 0.006, 0.008, 0.010, 0.012]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_second_signal_2_to_12_ms_after_the_first_exits_0(
    tokens: Callable[[], dict[str, str]], loop: str
) -> None:
    for delay in SECOND_SIGNAL_DELAYS:
        for signum in (signal.SIGTERM, signal.SIGINT):
            env = tokens()
            with start_supervisor(env, loop) as process:
                wait_for_workers(process)
                process.process.send_signal(signum)
                time.sleep(delay)
                process.process.send_signal(signum)
                process.finish(STOP_TIMEOUT)
            assert_all_ended(process, env, note=(delay, signum))
