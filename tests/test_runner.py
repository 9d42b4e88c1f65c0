"""`run` in a single process: its signals, from before the `Listening on` line
until the event loop is closed, and the exit status it hands the command.

The command is run as an operator runs it (a subprocess, stopped by signals);
what a subprocess cannot show (the handlers left behind, a signal before the
server is announced) is tried in this process.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from aioserver import Server, cli, echo, run

from .helpers import LOOPS, START_TIMEOUT, AioserverProcess, jam, start_aioserver

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
# A stop without clients takes milliseconds.
STOP_TIMEOUT = 10.0


def start(loop: str, *args: str) -> AioserverProcess:
    return start_aioserver("--port", "0", "--loop", loop, "--no-access-log", *args)


def assert_exited_0(process: AioserverProcess, note: object = None) -> None:
    err = process.stderr
    assert process.returncode == 0, (note, err)
    assert "Traceback" not in err, (note, err)
    assert "Stopped" in err, (note, err)


# A second signal at any moment after the first: the old runner put the
# default handlers back before the loop was closed, and a signal then killed
# the process (-15, -2) or left a traceback from uvloop (exit 1).

SECOND_SIGNAL_DELAYS = [0.002, 0.004, 0.006, 0.008, 0.010, 0.012]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_2_to_12_ms_after_the_first_exits_0(
    signum: signal.Signals, loop: str
) -> None:
    for delay in SECOND_SIGNAL_DELAYS:
        with start(loop) as process:
            process.process.send_signal(signum)
            time.sleep(delay)
            process.process.send_signal(signum)
            process.finish(STOP_TIMEOUT)
        assert_exited_0(process, delay)


SIGNAL_AT_START_REPEATS = 10


@pytest.mark.parametrize("loop", LOOPS)
def test_a_signal_right_after_the_listening_line_stops_gracefully(loop: str) -> None:
    for attempt in range(SIGNAL_AT_START_REPEATS):
        signum = (signal.SIGTERM, signal.SIGINT)[attempt % 2]
        with start(loop) as process:
            process.process.send_signal(signum)
            process.finish(STOP_TIMEOUT)
        assert_exited_0(process, attempt)
        assert f"{signum.name} received: stopping" in process.stderr


@pytest.mark.parametrize("loop", LOOPS)
def test_sigquit_stops_at_once(loop: str) -> None:
    with start(loop, "--shutdown-timeout", "60") as process:
        host, _, port = process.address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=STOP_TIMEOUT) as stuck:
            jam(stuck)
            elapsed = process.stop(signal.SIGQUIT, timeout=STOP_TIMEOUT)
    assert_exited_0(process)
    assert elapsed < 2.0
    assert "SIGQUIT received: closing every connection now" in process.stderr


# In this process: the handlers `run` leaves, a signal before the announcement.


@pytest.fixture
def signal_state() -> Iterator[None]:
    """Put back the handlers and the wakeup fd a test's `run` left."""
    handlers = {signum: signal.getsignal(signum) for signum in HANDLED}
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd)
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    signal.set_wakeup_fd(wakeup_fd)


def current_wakeup_fd() -> int:
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return fd


@pytest.mark.usefixtures("signal_state")
def test_after_a_stop_by_signal_the_signals_stay_ignored() -> None:
    before = current_wakeup_fd()
    started: list[Server] = []

    def stop_me(server: Server) -> None:
        started.append(server)
        signal.raise_signal(signal.SIGTERM)

    assert run(echo, loop="asyncio", on_start=stop_me, port=0) == 0
    [server] = started
    assert not server.is_serving()
    # The process was asked to end: a repeat cannot kill it on its way out.
    for signum in HANDLED:
        assert signal.getsignal(signum) is signal.SIG_IGN
    assert current_wakeup_fd() == before


@pytest.mark.usefixtures("signal_state")
@pytest.mark.parametrize("loop", LOOPS)
def test_a_server_stopped_from_inside_puts_the_handlers_back(loop: str) -> None:
    handlers = {signum: signal.getsignal(signum) for signum in HANDLED}
    wakeup_fd = current_wakeup_fd()
    stops: list[asyncio.Future[None]] = []

    def stop_at_once(server: Server) -> None:
        stops.append(asyncio.ensure_future(server.stop()))
        for signum in HANDLED:  # handled while it serves
            assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN)

    assert run(echo, loop=loop, on_start=stop_at_once, port=0) == 0
    [stop] = stops
    assert stop.done()
    assert {signum: signal.getsignal(signum) for signum in HANDLED} == handlers
    assert current_wakeup_fd() == wakeup_fd


@pytest.mark.usefixtures("signal_state")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_before_the_server_is_announced_stops_it_unannounced(
    monkeypatch: pytest.MonkeyPatch, signum: signal.Signals
) -> None:
    start = Server.start

    async def signalled_start(self: Server) -> None:
        signal.raise_signal(signum)
        await start(self)

    monkeypatch.setattr(Server, "start", signalled_start)
    announced: list[Server] = []
    if signum == signal.SIGINT:
        # As Ctrl-C before anything runs: the command exits 130.
        with pytest.raises(KeyboardInterrupt):
            run(echo, loop="asyncio", on_start=announced.append, port=0)
    else:
        assert run(echo, loop="asyncio", on_start=announced.append, port=0) == 0
    assert announced == []


def test_workers_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        run(echo, workers=0)
    errors: list[BaseException] = []

    def in_a_thread() -> None:
        try:
            run(echo, workers=2, port=0)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(START_TIMEOUT)
    [error] = errors
    assert isinstance(error, RuntimeError)


@pytest.mark.parametrize("status", [0, 1])
def test_the_command_exits_with_the_status_run_returns(
    monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    monkeypatch.setattr(cli, "run", lambda *args, **kwargs: status)
    assert cli.main(["--port", "0", "--log-level", "critical"], environ={}) == status
