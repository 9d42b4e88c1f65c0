"""Logging off the event loop (aioserver/logs.py): a sink nobody reads never stops
the server, drops are counted and said once, JSON lines, --log-config, the process
id in worker mode, and a forked child's own writer thread.

The command runs as a real process on 127.0.0.1 with --port 0; every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import aioserver
from aioserver import logs
from aioserver.server import ACCESS_FIELDS, ACCESS_FORMAT, access_logger

from .helpers import (
    RUN_TIMEOUT,
    START_TIMEOUT,
    StartServer,
    aioserver_argv,
    aioserver_env,
    open_fds,
    run_aioserver,
    wait_until,
)

# Connections made in a row while nobody reads the server's stderr: with the
# pipe at its smallest (one page) and QUEUE_SIZE records queued, well past both.
CONNECTIONS = 3_000
# Each of them must be served within this (the figure).
SERVED_WITHIN = 1.0
DROPPED = re.compile(r"(\d+) log lines dropped: the log sink was too slow")
ACCESS = re.compile(r"(\S+) closed after [\d.]+ s, (\d+) bytes in, (\d+) bytes out: (.+)$")


def echo_once(port: int, payload: bytes = b"ping") -> tuple[str, float]:
    """Connect, send `payload`, read it back, close; (the client's address, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=SERVED_WITHIN) as sock:
        client = "%s:%d" % sock.getsockname()[:2]  # noqa: UP031
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(len(payload) - len(received))
            assert chunk, "the server closed before echoing"
            received += chunk
    assert received == payload
    return client, time.monotonic() - started


def read_port(process: subprocess.Popen[bytes]) -> int:
    """The port of the first `Listening on` line on the process's stdout."""
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    match = re.fullmatch(r"Listening on 127\.0\.0\.1:(\d+)\n", line)
    assert match, f"not a Listening line: {line!r}"
    return int(match.group(1))


@contextlib.contextmanager
def unread_stderr(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """The command with its stderr a pipe of one page that nobody reads until
    the test says so; killed at the end if still running."""
    process = subprocess.Popen(
        aioserver_argv(["--port", "0", *args]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=aioserver_env(),
    )
    try:
        assert process.stderr is not None
        # The smallest pipe Linux allows: a few dozen log lines fill it.
        fcntl.fcntl(process.stderr.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(ValueError):  # communicated with already
            process.communicate(timeout=RUN_TIMEOUT)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


# The case: a pipe nobody reads.


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_server_serves_on_while_nobody_reads_its_stderr(loop: str) -> None:
    with unread_stderr("--loop", loop) as process:
        port = read_port(process)
        echo_once(port)  # one-time costs out of the descriptor count
        fds_before = open_fds(process.pid)
        slowest = 0.0
        for _ in range(CONNECTIONS):
            _client, took = echo_once(port)
            slowest = max(slowest, took)
        assert slowest < SERVED_WITHIN
        # No descriptor piles up: every connection was closed, its line dropped.
        deadline = time.monotonic() + 5
        while open_fds(process.pid) > fds_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_fds(process.pid) <= fds_before
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode == 0, err[-2000:]
    log = err.decode()
    dropped = [int(count) for count in DROPPED.findall(log)]
    assert dropped, log[-2000:]
    written = sum(1 for line in log.splitlines() if ACCESS.search(line))
    assert written < CONNECTIONS + 1
    # Every access line was either written or counted (other lines may be dropped too).
    assert written + sum(dropped) >= CONNECTIONS + 1
    assert "Traceback" not in log
    assert out == b""


def test_a_sink_that_never_takes_its_lines_does_not_hold_the_exit() -> None:
    with unread_stderr() as process:
        port = read_port(process)
        for _ in range(200):  # some 20 KiB of access lines: the pipe is full
            echo_once(port)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        # stderr is still not read: the exit waits STOP_TIMEOUT for it, no more.
        assert process.wait(logs.STOP_TIMEOUT + RUN_TIMEOUT) == 0
        assert time.monotonic() - started < logs.STOP_TIMEOUT + 3


# Drops, in process.


class BlockingStream(io.StringIO):
    """A sink that blocks in its first write until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no descriptor: the writer calls write()")

    def write(self, text: str) -> int:
        self.entered.set()
        assert self.release.wait(RUN_TIMEOUT)
        return super().write(text)


@pytest.fixture
def logging_set_up() -> Iterator[None]:
    """Whatever a test set up with setup_logging is undone at its end."""
    try:
        yield
    finally:
        logs.stop_logging()


@pytest.mark.usefixtures("logging_set_up")
@pytest.mark.parametrize("source", ["logger", "site"])
def test_records_past_the_queue_are_dropped_and_counted_once(source: str) -> None:
    stream = BlockingStream()
    logs.setup_logging("INFO", stream=stream)
    logger = logging.getLogger("aioserver.test")
    logger.info("the first line, which the sink blocks on")
    assert stream.entered.wait(RUN_TIMEOUT)
    extra = 37
    # The writer holds the first line; the queue is empty and takes QUEUE_SIZE.
    if source == "logger":
        for number in range(logs.QUEUE_SIZE + extra):
            logger.info("line %d", number)
    else:
        site = logs.LogSite(access_logger, logging.INFO, ACCESS_FORMAT, ACCESS_FIELDS)
        assert site.targets is not None  # the queued path
        for number in range(logs.QUEUE_SIZE + extra):
            site.log(("127.0.0.1:1", 0.5, number, number, "closed"))
    stream.release.set()
    assert logs.stop_logging(RUN_TIMEOUT)
    lines = stream.getvalue().splitlines()
    assert [int(n) for line in lines for n in DROPPED.findall(line)] == [extra]
    assert len(lines) == 1 + logs.QUEUE_SIZE + 1
    assert "WARNING aioserver: 37 log lines dropped" in lines[1]
    # The lines kept are the first ones, in order.
    if source == "logger":
        assert lines[2].endswith("INFO aioserver.test: line 0")
        assert lines[-1].endswith(f"line {logs.QUEUE_SIZE - 1}")
    else:
        assert lines[-1].endswith(
            f"127.0.0.1:1 closed after 0.500 s, {logs.QUEUE_SIZE - 1} bytes in,"
            f" {logs.QUEUE_SIZE - 1} bytes out: closed"
        )


@pytest.mark.usefixtures("logging_set_up")
def test_a_site_line_is_the_line_of_its_record() -> None:
    """The writer makes a LogSite's line without a record: the same line."""
    for fmt in (logs.TEXT_FORMAT, logs.WORKER_TEXT_FORMAT):
        stream = io.StringIO()
        logs.setup_logging("INFO", stream=stream, workers=2 if "process" in fmt else 1)
        site = logs.LogSite(access_logger, logging.INFO, ACCESS_FORMAT, ACCESS_FIELDS)
        args = ("[::1]:5", 1.23456, 1, 2, "reset by client")
        site.log(args)
        assert logs.stop_logging(RUN_TIMEOUT)
        [line] = stream.getvalue().splitlines()
        record = site.record(time.time(), args)
        expected = logging.Formatter(fmt).format(record)
        # The same but for the time stamp.
        assert line[23:] == expected[23:]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", line[:23])


@pytest.mark.usefixtures("logging_set_up")
def test_a_forked_child_writes_with_a_writer_thread_of_its_own() -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as sink:
        logs.setup_logging("INFO", stream=sink, workers=2)
        logger = logging.getLogger("aioserver.test")
        logger.info("parent before")
        pid = os.fork()
        if pid == 0:  # the child: log, then leave as a worker does
            code = 1
            try:
                logger.info("child %d", os.getpid())
                logging.getLogger("aioserver.access").info("child access line")
                logging.shutdown()  # what a worker calls before os._exit
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        logger.info("parent after")
        assert logs.stop_logging(RUN_TIMEOUT)
    with os.fdopen(read_end) as reader:
        lines = reader.read().splitlines()
    assert os.waitstatus_to_exitcode(status) == 0
    parent = os.getpid()
    assert any(f"[{parent}] INFO aioserver.test: parent before" in line for line in lines)
    assert any(f"[{pid}] INFO aioserver.test: child {pid}" in line for line in lines)
    assert any(f"[{pid}] INFO aioserver.access: child access line" in line for line in lines)
    assert any(f"[{parent}] INFO aioserver.test: parent after" in line for line in lines)
    # The child wrote its own lines only, each once: none of the parent's twice.
    assert sum("parent before" in line for line in lines) == 1


# The formats and the configuration file.


def test_json_lines_parse_with_the_access_fields(start_server: StartServer) -> None:
    command = start_server("--port", "0", "--log-format", "json")
    client, _ = echo_once(command.port, b"hello")
    command.wait_for_log('"closed by client"')
    command.stop()
    assert command.returncode == 0
    entries = [json.loads(line) for line in command.stderr.splitlines()]
    for entry in entries:
        assert {"time", "level", "logger", "message", "pid"} <= set(entry)
        assert entry["pid"] == command.pid
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", entry["time"])
    [access] = [entry for entry in entries if entry["logger"] == "aioserver.access"]
    assert access["level"] == "INFO"
    assert access["peer"] == client
    assert access["bytes_in"] == access["bytes_out"] == 5
    assert access["reason"] == "closed by client"
    assert 0 <= access["duration"] < RUN_TIMEOUT
    assert access["message"].startswith(f"{client} closed after ")
    assert entries[-1]["message"] == "Stopped"


LOG_CONFIG = {
    "version": 1,
    "formatters": {
        "access": {"format": "%(peer)s %(bytes_in)d %(bytes_out)d %(reason)s | %(message)s"},
        "plain": {"format": "%(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "access_file": {"class": "logging.FileHandler", "formatter": "access"},
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        },
    },
    "loggers": {
        "aioserver.access": {"handlers": ["access_file"], "level": "INFO", "propagate": False}
    },
    "root": {"handlers": ["console"], "level": "INFO"},
}


@pytest.mark.parametrize("given", ["flag", "variable"])
def test_log_config_routes_the_access_log_to_a_file(
    start_server: StartServer, tmp_path: Path, given: str
) -> None:
    access_log = tmp_path / "access.log"
    config = json.loads(json.dumps(LOG_CONFIG))
    config["handlers"]["access_file"]["filename"] = str(access_log)
    config_file = tmp_path / "logging.json"
    config_file.write_text(json.dumps(config))
    if given == "flag":
        command = start_server("--port", "0", "--log-config", str(config_file))
    else:
        command = start_server("--port", "0", env={"AIOSERVER_LOG_CONFIG": str(config_file)})
    client, _ = echo_once(command.port, b"hi")
    command.stop()
    assert command.returncode == 0, command.stderr
    [line] = access_log.read_text().splitlines()
    assert line.startswith(f"{client} 2 2 closed by client | {client} closed after ")
    assert "closed after" not in command.stderr
    assert "INFO aioserver: Stopped" in command.stderr.splitlines()


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("{not json", "is not valid JSON"),
        ("[]", "must be a logging.config.dictConfig dictionary"),
        ('{"version": 1, "handlers": {"h": {"class": "no.such.Handler"}}}', "log config "),
        (None, "cannot read log config"),
    ],
    ids=["not-json", "not-an-object", "bad-handler", "missing"],
)
def test_a_log_config_that_does_not_load_fails_in_one_line(
    tmp_path: Path, content: str | None, phrase: str
) -> None:
    config_file = tmp_path / "logging.json"
    if content is not None:
        config_file.write_text(content)
    result = run_aioserver("--port", "0", "--log-config", str(config_file))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("aioserver: error: "), line
    assert phrase in line, line


def test_a_yaml_log_config_without_pyyaml_says_so(tmp_path: Path) -> None:
    try:
        import yaml  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("PyYAML is installed here")
    config_file = tmp_path / "logging.yaml"
    config_file.write_text("version: 1\n")
    result = run_aioserver("--port", "0", "--log-config", str(config_file))
    assert result.returncode == 1
    assert result.stderr == (
        f"aioserver: error: log config {config_file} is YAML, which needs PyYAML"
        " installed; JSON needs nothing\n"
    )


# Worker mode.


def worker_pids(pid: int) -> set[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(child) for child in children}


def test_worker_lines_carry_the_process_id(start_server: StartServer) -> None:
    command = start_server("--port", "0", "--workers", "2")
    deadline = time.monotonic() + START_TIMEOUT
    while len(worker_pids(command.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = worker_pids(command.pid)
    assert len(workers) == 2
    # Each worker logs its own Listening line once it serves.
    for pid in workers:
        command.wait_for_log(f"[{pid}] INFO aioserver: Listening on")
    for _ in range(20):
        echo_once(command.port)
    command.wait_for_log("closed after")
    command.stop()
    assert command.returncode == 0, command.stderr
    pids = {command.pid, *workers}
    lines = command.stderr.splitlines()
    for line in lines:
        match = re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[(\d+)\] [A-Z]+ ", line)
        assert match, line
        assert int(match.group(1)) in pids, line
    access = [line for line in lines if "closed after" in line]
    assert len(access) == 20
    # Served (and logged) by the workers, after their fork.
    assert {int(re.search(r"\[(\d+)\]", line).group(1)) for line in access} <= workers  # type: ignore[union-attr]


# The Server option.


@pytest.mark.asyncio
@pytest.mark.parametrize("access_log", [True, False])
async def test_server_access_log_option(access_log: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aioserver")
    async with aioserver.serve(aioserver.echo, port=0, access_log=access_log) as server:
        assert server.logs_peers is access_log
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        client = "%s:%d" % writer.get_extra_info("sockname")[:2]  # noqa: UP031
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: server.stats.active == 0, what="the server to see the close")
    access = [record for record in caplog.records if record.name == "aioserver.access"]
    if not access_log:
        assert access == []
        return
    [record] = access
    assert record.getMessage().startswith(f"{client} closed after ")
    fields = {name: getattr(record, name) for name in ACCESS_FIELDS}
    assert fields["peer"] == client
    assert (fields["bytes_in"], fields["bytes_out"]) == (4, 4)
    assert fields["reason"] == "closed by client"
