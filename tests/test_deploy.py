"""The README's production examples, run: HAProxy in front of two instances, systemd's stop.

HAProxy comes from Debian's `haproxy` package, which .ci/run installs; where it
is missing its test is skipped and says so. Everything listens on 127.0.0.1.
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
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .helpers import PREFIX, AioserverProcess, start_aioserver, wait_until_blocking

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
)
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (.ci/run installs Debian's package)"
)

README = Path(__file__).resolve().parent.parent / "README.md"
# HAProxy's start, its health checks and the instances' access logs, with room.
WAIT_TIMEOUT = 15.0


def readme_block(language: str) -> str:
    """The README's one fenced block in `language`: what the tests run is what it shows."""
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, f"expected one {language} block in README.md"
    return str(blocks[0])


def instance() -> AioserverProcess:
    """An `aioserver` behind HAProxy, as the README runs it, on a port of its own."""
    server = start_aioserver(
        "--protocol", "thanks", "--port", "0", "--proxy-protocol", "--shutdown-timeout", "2"
    )
    assert re.fullmatch(r"127\.0\.0\.1:\d+", server.address), server.address
    return server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def backend_status(stats_socket: Path) -> dict[str, str]:
    with socket.socket(socket.AF_UNIX) as control:
        control.connect(str(stats_socket))
        control.sendall(b"show stat\n")
        text = b""
        while chunk := control.recv(65536):
            text += chunk
    status = {}
    for row in text.decode().splitlines():
        fields = row.split(",")
        if len(fields) > 17 and fields[0] == "aioserver" and fields[1] in ("a", "b"):
            status[fields[1]] = fields[17]
    return status


def wait_for(condition: Callable[[], bool], what: str) -> None:
    wait_until_blocking(condition, WAIT_TIMEOUT, what)


@pytest.fixture
def cluster(
    tmp_path: Path,
) -> Iterator[tuple[int, Path, AioserverProcess, AioserverProcess]]:
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(instance())
        b = stack.enter_context(instance())
        port = free_port()
        stats = tmp_path / "haproxy.sock"
        config = tmp_path / "haproxy.cfg"
        shown = readme_block("haproxy")
        for old, new in [
            ("127.0.0.1:1234", f"127.0.0.1:{port}"),
            ("127.0.0.1:9001", f"127.0.0.1:{a.port}"),
            ("127.0.0.1:9002", f"127.0.0.1:{b.port}"),
            ("inter 2s fall 2", "inter 200ms fall 1"),  # notice a stopped instance sooner
        ]:
            assert old in shown
            shown = shown.replace(old, new)
        config.write_text(f"global\n    stats socket {stats} mode 600 level admin\n\n{shown}")
        assert HAPROXY is not None
        proxy = subprocess.Popen(
            [HAPROXY, "-f", str(config), "-db"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            wait_for(lambda: stats.exists(), "HAProxy's stats socket")
            wait_for(
                lambda: backend_status(stats) == {"a": "UP", "b": "UP"}, "both health checks UP"
            )
            yield port, stats, a, b
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
            assert proxy.stdout is not None
            proxy.stdout.close()


def talk(port: int, lines: int) -> int:
    """One client: send `lines` lines through HAProxy; return its own local port."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        local_port = int(client.getsockname()[1])
        payload = b"".join(b"client %d line %d\n" % (local_port, i) for i in range(lines))
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    expected = b"".join(PREFIX + b"client %d line %d\n" % (local_port, i) for i in range(lines))
    assert received == expected
    return local_port


@needs_haproxy
def test_fifty_clients_through_haproxy_reach_both_instances_with_their_real_ports(
    cluster: tuple[int, Path, AioserverProcess, AioserverProcess],
) -> None:
    port, stats, a, b = cluster
    with ThreadPoolExecutor(max_workers=50) as pool:
        client_ports = list(pool.map(lambda _: talk(port, 20), range(50)))
    assert len(set(client_ports)) == 50

    def logged_ports(server: AioserverProcess) -> set[int]:
        found = set()
        for line in server.stderr.splitlines():
            match = re.search(r"127\.0\.0\.1:(\d+) closed after", line)
            if match:
                found.add(int(match.group(1)))
        return found

    wait_for(
        lambda: set(client_ports) <= logged_ports(a) | logged_ports(b),
        "every client's own port in an access log",
    )
    served_by_a = set(client_ports) & logged_ports(a)
    served_by_b = set(client_ports) & logged_ports(b)
    assert served_by_a
    assert served_by_b
    assert backend_status(stats) == {"a": "UP", "b": "UP"}

    # Stop one instance: HAProxy marks it down and the other serves everyone.
    a.stop(timeout=10)
    assert a.returncode == 0
    assert "Stopped" in a.stderr
    wait_for(lambda: backend_status(stats).get("a") == "DOWN", "instance a marked DOWN")
    with ThreadPoolExecutor(max_workers=20) as pool:
        later = list(pool.map(lambda _: talk(port, 5), range(20)))
    wait_for(lambda: set(later) <= logged_ports(b), "the later clients in b's log")


def test_the_systemd_unit_command_stops_cleanly_on_its_kill_signal() -> None:
    unit = readme_block("ini")
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    executable, *args = shlex.split(settings["ExecStart"])
    assert executable.endswith("/aioserver")
    args[args.index("--port") + 1] = "0"
    kill_signal = signal.Signals[settings["KillSignal"]]
    stop_timeout = float(settings["TimeoutStopSec"])
    with start_aioserver(*args) as server:
        header = b"PROXY TCP4 198.51.100.1 127.0.0.1 5000 9001\r\n"
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(header + b"hi\n")
            assert client.recv(100) == PREFIX + b"hi\n"
            started = time.monotonic()
            server.process.send_signal(kill_signal)
            assert client.recv(100) == b""
        server.finish(timeout=stop_timeout)
        assert time.monotonic() - started < stop_timeout
    assert server.returncode == 0
    assert "Traceback" not in server.stderr
    assert "198.51.100.1:5000 closed after" in server.stderr
