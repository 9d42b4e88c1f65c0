"""The Server over real loopback sockets, on both loops."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import resource
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import aioserver
from aioserver import Server, echo, serve, thanks
from aioserver.server import format_address

from .helpers import (
    PREFIX,
    ExceptionRecorder,
    StartServer,
    close,
    needs_ipv6,
    open_fds,
    wait_until,
)


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert server.port is not None
    return await asyncio.open_connection("127.0.0.1", server.port)


async def echo_round_trip(port: int, size: int, seed: int) -> tuple[str, str]:
    """Send `size` random bytes in random chunks while reading; return both SHA-256s."""
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent, received = hashlib.sha256(), hashlib.sha256()

    async def send() -> None:
        left = size
        while left:
            chunk = rng.randbytes(min(left, rng.randint(1, 128 * 1024)))
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()
            left -= len(chunk)
        writer.write_eof()

    sender = asyncio.create_task(send())
    while data := await reader.read(256 * 1024):
        received.update(data)
    await sender
    await close(writer)
    return sent.hexdigest(), received.hexdigest()


@pytest.mark.asyncio
async def test_echo_is_byte_exact_for_50_clients_of_10_mib(loop_errors: ExceptionRecorder) -> None:
    """50 concurrent clients each send 10 MiB in random chunks and get it all back."""
    async with serve(echo, port=0) as server:
        assert server.port is not None
        results = await asyncio.gather(
            *(echo_round_trip(server.port, 10 * 1024 * 1024, seed) for seed in range(50))
        )
        assert server.stats.bytes_in == server.stats.bytes_out == 50 * 10 * 1024 * 1024
    assert all(sent == received for sent, received in results)
    assert loop_errors.contexts == []


@pytest.mark.asyncio
async def test_echo_half_close_gets_the_full_echo_then_eof() -> None:
    async with serve(echo, port=0) as server:
        reader, writer = await connect(server)
        writer.write(b"before the half-close")
        writer.write_eof()
        assert await reader.read() == b"before the half-close"
        assert reader.at_eof()
        await close(writer)


@pytest.mark.asyncio
async def test_thanks_answers_1000_pipelined_lines_in_order() -> None:
    async with serve(thanks, port=0) as server:
        reader, writer = await connect(server)
        writer.write(b"".join(b"message %d\n" % i for i in range(1000)))
        for i in range(1000):
            assert await reader.readline() == PREFIX + b"message %d\n" % i
        writer.write_eof()
        assert await reader.read() == b""
        await close(writer)


@pytest.mark.asyncio
async def test_thanks_keeps_bytes_and_answers_a_final_fragment() -> None:
    async with serve(thanks, port=0) as server:
        reader, writer = await connect(server)
        writer.write(b"crlf\r\nnul\x00byte\n\xff\xfe not utf-8\nfragm")
        writer.write(b"ent")
        writer.write_eof()
        assert await reader.read() == (
            PREFIX
            + b"crlf\r\n"
            + PREFIX
            + b"nul\x00byte\n"
            + PREFIX
            + b"\xff\xfe not utf-8\n"
            + PREFIX
            + b"fragment\n"
        )
        await close(writer)


@pytest.mark.asyncio
async def test_thanks_oversize_line_gets_an_error_and_others_are_served(
    loop_errors: ExceptionRecorder,
) -> None:
    async with serve(thanks, port=0, max_message_size=1024) as server:
        other_reader, other_writer = await connect(server)
        reader, writer = await connect(server)
        writer.write(b"fine\n" + b"x" * 2000 + b"\n")
        assert (
            await reader.read() == PREFIX + b"fine\n" + b"Error: message longer than 1024 bytes\n"
        )
        await close(writer)
        other_writer.write(b"still here\n")
        assert await other_reader.readline() == PREFIX + b"still here\n"
        await close(other_writer)
    assert loop_errors.contexts == []


@pytest.fixture
def raise_fd_limit() -> Iterator[Callable[[int], None]]:
    """Raise this process's soft RLIMIT_NOFILE for the test, skipping when the
    hard limit is too low; restore it afterwards."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)

    def ensure(wanted: int) -> None:
        soft, hard = saved
        if soft >= wanted:
            return
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    yield ensure
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


@pytest.mark.asyncio
async def test_cancelling_serve_forever_with_1000_idle_clients_is_immediate_and_clean(
    loop_errors: ExceptionRecorder, raise_fd_limit: Callable[[int], None]
) -> None:
    """1,000 idle clients: the stop takes under 1 s and leaves no task and no socket."""
    raise_fd_limit(4096)
    # libuv keeps one reserve fd (on /dev/null) from the first accept on, to recover
    # from EMFILE: open it before counting.
    async with serve(echo, port=0) as warm_up:
        await close((await connect(warm_up))[1])
    fds_before = open_fds()
    tasks_before = asyncio.all_tasks()
    server = Server(echo, port=0)
    await server.start()
    serving = asyncio.create_task(server.serve_forever())
    clients = [await connect(server) for _ in range(1000)]
    await wait_until(lambda: server.stats.active == 1000)
    started = time.monotonic()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert not server.is_serving()
    assert server.stats.active == 0
    assert asyncio.all_tasks() == tasks_before
    for reader, writer in clients:
        assert await reader.read() == b""  # closed by the server
        writer.close()
    # uvloop closes a transport's socket one loop iteration after close().
    await wait_until(lambda: open_fds() == fds_before)
    assert loop_errors.contexts == []


@pytest.mark.asyncio
async def test_stop_flushes_replies_owed_and_is_idempotent() -> None:
    async with serve(thanks, port=0) as server:
        reader, writer = await connect(server)
        writer.write(b"a\nb\npartial")
        assert await reader.readline() == PREFIX + b"a\n"
        await server.stop()
        await server.stop()
        # The complete lines were answered; the partial one was not a message yet.
        assert await reader.read() == PREFIX + b"b\n"
        await close(writer)
    assert not server.is_serving()


@pytest.mark.asyncio
async def test_a_users_handler_sees_the_cancellation_at_its_await() -> None:
    seen: list[str] = []
    entered = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(line.upper())
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("cancelled")
            writer.write(b"bye\n")
            raise

    async with serve(handler, port=0) as server:
        reader, writer = await connect(server)
        writer.write(b"hello\n")
        await entered.wait()
    assert seen == ["cancelled"]
    assert await reader.read() == b"HELLO\nbye\n"
    await close(writer)
    assert server.stats.bytes_out == len(b"HELLO\nbye\n")


@pytest.mark.asyncio
async def test_a_failing_handler_is_logged_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture, loop_errors: ExceptionRecorder
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(3)
        if data == b"bad":
            raise RuntimeError("handler bug")
        writer.writelines([data, b"!"])
        await writer.drain()

    async with serve(handler, port=0) as server:
        reader, writer = await connect(server)
        writer.write(b"bad")
        assert await reader.read() == b""
        await close(writer)
        reader, writer = await connect(server)
        writer.write(b"ok?")
        assert await reader.read() == b"ok?!"
        await close(writer)
        reader, writer = await connect(server)
        writer.write(b"o")  # then EOF: readexactly raises IncompleteReadError
        writer.write_eof()
        assert await reader.read() == b""
        await close(writer)
    assert "handler bug" in caplog.text
    assert loop_errors.contexts == []


@pytest.mark.asyncio
async def test_max_connections_turns_extra_clients_away(caplog: pytest.LogCaptureFixture) -> None:
    async with serve(thanks, port=0, max_connections=2) as server:
        admitted = [await connect(server) for _ in range(2)]
        for reader, writer in admitted:
            writer.write(b"hi\n")
            assert await reader.readline() == PREFIX + b"hi\n"
        extra_reader, extra_writer = await connect(server)
        assert await extra_reader.read() == b"Error: server busy\n"
        await close(extra_writer)
        for reader, writer in admitted:
            writer.write(b"still\n")
            assert await reader.readline() == PREFIX + b"still\n"
            await close(writer)
        assert server.stats.rejected == 1
    assert "max_connections=2 reached" in caplog.text


@pytest.mark.asyncio
async def test_echo_over_max_connections_is_closed_without_a_word() -> None:
    async with serve(echo, port=0, max_connections=1) as server:
        reader, writer = await connect(server)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        extra_reader, extra_writer = await connect(server)
        assert await extra_reader.read() == b""
        await close(extra_writer)
        await close(writer)


@pytest.mark.asyncio
async def test_idle_timeout_closes_silent_clients_only() -> None:
    async with serve(echo, port=0, idle_timeout=0.3) as server:
        silent_reader, silent_writer = await connect(server)
        talker_reader, talker_writer = await connect(server)
        started = time.monotonic()
        for _ in range(8):  # 0.48 s of chatter, longer than the timeout
            talker_writer.write(b"x")
            assert await talker_reader.readexactly(1) == b"x"
            await asyncio.sleep(0.06)
        assert await silent_reader.read() == b""
        assert 0.25 < time.monotonic() - started < 1.0
        talker_writer.write(b"y")
        assert await talker_reader.readexactly(1) == b"y"
        await close(silent_writer)
        await close(talker_writer)


@pytest.mark.asyncio
async def test_client_reset_is_one_log_line_and_no_loop_error(
    caplog: pytest.LogCaptureFixture, loop_errors: ExceptionRecorder
) -> None:
    caplog.set_level(logging.INFO, logger="aioserver")
    async with serve(echo, port=0) as server:
        assert server.port is not None
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"x" * 100_000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST, with replies still on their way
        await wait_until(lambda: server.stats.total == 3 and not server.stats.active)
        reader, writer = await connect(server)
        writer.write(b"probe")
        assert await reader.readexactly(5) == b"probe"
        await close(writer)
    access = [r for r in caplog.records if r.name == "aioserver.access"]
    assert len(access) == 4
    assert "Traceback" not in caplog.text
    assert all(r.exc_info is None for r in caplog.records)
    assert loop_errors.contexts == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("host", "shown"),
    [
        pytest.param("127.0.0.1", {"127.0.0.1": "127.0.0.1:{}"}, id="ipv4"),
        pytest.param(
            ["127.0.0.1", "::1"],
            {"127.0.0.1": "127.0.0.1:{}", "::1": "[::1]:{}"},
            id="ipv4-and-ipv6",
            marks=needs_ipv6,
        ),
    ],
)
async def test_server_reports_what_it_bound(host: str | list[str], shown: dict[str, str]) -> None:
    """`shown` maps each address bound to how `addresses` shows it, port as {}."""
    server = Server(echo, host=host, port=0)
    assert server.addresses == []
    assert server.port is None
    assert not server.is_serving()
    await server.start()
    try:
        assert server.is_serving()
        assert server.addresses == [address.format(server.port) for address in shown.values()]
        for ip in shown:
            reader, writer = await asyncio.open_connection(ip, server.port)
            writer.write(b"six")
            assert await reader.readexactly(3) == b"six"
            await close(writer)
        with pytest.raises(RuntimeError, match="starts once"):
            await server.start()
    finally:
        await server.stop()
    assert server.addresses == []


@pytest.mark.asyncio
async def test_port_in_use_raises_oserror() -> None:
    async with serve(echo, port=0) as server:
        with pytest.raises(OSError, match="in use"):
            async with serve(echo, port=server.port or 0):
                pass


@pytest.mark.asyncio
async def test_unix_socket_replaces_a_stale_file_and_refuses_others(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    regular = tmp_path / "file"
    regular.write_bytes(b"keep me")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays: what a crashed server leaves
    async with serve(thanks, unix=path) as server:
        assert server.addresses == [f"unix:{path}"]
        assert server.port is None
        with pytest.raises(OSError, match="already listening"):
            await Server(thanks, unix=path).start()
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"over unix\n")
        assert await reader.readline() == PREFIX + b"over unix\n"
        await close(writer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    with pytest.raises(FileExistsError):
        await Server(echo, unix=regular).start()
    assert regular.read_bytes() == b"keep me"


@pytest.mark.asyncio
async def test_tls_echo(
    server_tls_context: ssl.SSLContext, client_tls_context: ssl.SSLContext
) -> None:
    async with serve(thanks, port=0, ssl=server_tls_context) as server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client_tls_context
        )
        writer.write(b"secret\n")
        assert await reader.readline() == PREFIX + b"secret\n"
        await close(writer)


@pytest.mark.asyncio
async def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="port"):
        Server(echo, port=70000)
    with pytest.raises(ValueError, match="max_connections"):
        Server(echo, max_connections=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        Server(echo, idle_timeout=0)
    with pytest.raises(ValueError, match="shutdown_timeout"):
        Server(echo, shutdown_timeout=-1)
    with pytest.raises(TypeError, match="coroutine function"):
        Server("echo")  # type: ignore[arg-type]


def test_format_address() -> None:
    assert format_address(("10.0.0.1", 80)) == "10.0.0.1:80"
    assert format_address(("::1", 80, 0, 0)) == "[::1]:80"
    assert format_address("/tmp/s") == "unix:/tmp/s"
    assert format_address(b"/tmp/s") == "unix:/tmp/s"


def test_run_serves_until_a_signal_and_returns() -> None:
    """The blocking entry point, in a child process so that SIGINT reaches it alone."""
    code = (
        "import aioserver\n"
        "aioserver.run(aioserver.thanks, loop='asyncio', port=0,"
        " on_start=lambda s: print(s.port, flush=True))\n"
        "print('returned', flush=True)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"run\n")
            assert sock.recv(100) == PREFIX + b"run\n"
            child.send_signal(2)
            assert sock.recv(100) == b""
        out, err = child.communicate(timeout=10)
    finally:
        child.kill()
        child.wait()
    assert out == b"returned\n"
    assert child.returncode == 0
    assert b"Traceback" not in err


def test_version_is_exported() -> None:
    assert aioserver.__version__.count(".") == 2
    assert set(aioserver.__all__) >= {"Server", "serve", "run", "echo", "thanks"}


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_that_never_reads_holds_bounded_memory(
    start_server: StartServer, loop: str
) -> None:
    """A client pushing 64 MiB without reading raises server RSS by under 16 MiB."""
    server = start_server("--port", "0", "--loop", loop, "--log-level", "error")
    port = server.port
    rss_before = _rss_kib(server.pid)
    hog = socket.create_connection(("127.0.0.1", port))
    hog.setblocking(False)
    chunk = b"\xab" * 65536
    sent, blocked_since = 0, None
    deadline = time.monotonic() + 20
    while sent < 64 * 1024 * 1024 and time.monotonic() < deadline:
        try:
            sent += hog.send(chunk)
            blocked_since = None
        except BlockingIOError:
            # Blocked for 1 s: the server has stopped reading, as it should.
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since > 1.0:
                break
            time.sleep(0.01)
    grown = _rss_kib(server.pid) - rss_before
    assert grown < 16 * 1024, f"RSS grew by {grown} KiB after {sent} bytes"
    assert sent < 64 * 1024 * 1024  # the kernel and the server stopped taking more
    with socket.create_connection(("127.0.0.1", port), timeout=5) as other:
        other.sendall(b"second client")
        assert other.recv(100) == b"second client"
    hog.close()
    server.stop()  # SIGTERM, as before; the fixture kills it if a check failed
