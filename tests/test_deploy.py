"""The README's production examples, run: HAProxy in front of two instances, systemd's stop.

HAProxy comes from Debian's `haproxy` package, which .ci/run installs; where it
is missing its test is skipped and says so. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
)
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (.ci/run installs Debian's package)"
)

PREFIX = b"Thank you for your message "

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(language: str) -> str:
    """The README's one fenced block in `language`: what the tests run is what it shows."""
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, f"expected one {language} block in README.md"
    return blocks[0]


class Instance:
    """An `aioserver` process whose stderr is collected as it comes."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aioserver",
                "--protocol",
                "thanks",
                "--port",
                "0",
                "--proxy-protocol",
                "--shutdown-timeout",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        assert line.startswith("Listening on 127.0.0.1:"), line
        self.port = int(line.rsplit(":", 1)[1])
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.log.append(raw.decode(errors="replace"))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=10)
        self._reader.join(timeout=5)
        assert self.process.stdout is not None
        self.process.stdout.close()
        assert self.process.stderr is not None
        self.process.stderr.close()
        return code


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


def wait_for(condition: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[int, Path, Instance, Instance]]:
    a, b = Instance(), Instance()
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
        wait_for(lambda: backend_status(stats) == {"a": "UP", "b": "UP"}, "both health checks UP")
        yield port, stats, a, b
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        assert proxy.stdout is not None
        proxy.stdout.close()
        a.stop()
        b.stop()


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
    cluster: tuple[int, Path, Instance, Instance],
) -> None:
    port, stats, a, b = cluster
    with ThreadPoolExecutor(max_workers=50) as pool:
        client_ports = list(pool.map(lambda _: talk(port, 20), range(50)))
    assert len(set(client_ports)) == 50

    def logged_ports(instance: Instance) -> set[int]:
        found = set()
        for line in instance.log:
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
    assert a.stop() == 0
    assert any("Stopped" in line for line in a.log)
    wait_for(lambda: backend_status(stats).get("a") == "DOWN", "instance a marked DOWN")
    with ThreadPoolExecutor(max_workers=20) as pool:
        later = list(pool.map(lambda _: talk(port, 5), range(20)))
    wait_for(lambda: set(later) <= logged_ports(b), "the later clients in b's log")


def test_the_systemd_unit_command_stops_cleanly_on_its_kill_signal() -> None:
    unit = readme_block("ini")
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    command = shlex.split(settings["ExecStart"])
    assert command[0].endswith("/aioserver")
    command = [sys.executable, "-m", "aioserver", *command[1:]]
    command[command.index("--port") + 1] = "0"
    kill_signal = signal.Signals[settings["KillSignal"]]
    stop_timeout = float(settings["TimeoutStopSec"])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline().decode().rsplit(":", 1)[1])
        header = b"PROXY TCP4 198.51.100.1 127.0.0.1 5000 9001\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(header + b"hi\n")
            assert client.recv(100) == PREFIX + b"hi\n"
            started = time.monotonic()
            process.send_signal(kill_signal)
            assert client.recv(100) == b""
        _, err = process.communicate(timeout=stop_timeout)
        assert time.monotonic() - started < stop_timeout
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    assert b"Traceback" not in err
    assert b"198.51.100.1:5000 closed after" in err
