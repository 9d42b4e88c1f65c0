"""`--metrics HOST:PORT`: Prometheus metrics after real traffic to the command.

Every scrape is parsed with prometheus_client's own parser, and the counts are
exact for the connections made: accepted, closed by reason, bytes, turned away
over --max-connections, a failed TLS handshake, and `--workers 2` summed over
both workers (a worker killed leaves the live gauge). A real Prometheus server
(Debian's package, which .ci/run installs) scrapes the README's configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from aioserver.metrics import CLOSED_REASONS, closed_reason, parse_metrics_address

from .helpers import AioserverProcess, run_aioserver, start_aioserver, write_tls_files

README = Path(__file__).resolve().parent.parent / "README.md"
PROMETHEUS = shutil.which("prometheus")
# Counters reach the scrape a loop iteration after the client sees its close.
SCRAPE_TIMEOUT = 10.0
# Prometheus's start, a few 1 s scrapes and its query, with room on a loaded machine.
PROMETHEUS_TIMEOUT = 20.0
SERVING_METRICS = re.compile(r"Serving metrics on http://127\.0\.0\.1:(\d+)/metrics")

PID_HANDLER = """\
import os

async def pid(reader, writer):
    while line := await reader.readline():
        writer.write(b"%d " % os.getpid() + line)
        await writer.drain()
    writer.close()
"""

Samples = dict[str, float]


def metrics_port(process: AioserverProcess) -> int:
    """The port of the metrics listener, from its log line."""
    process.wait_for_log("Serving metrics on http://")
    found = SERVING_METRICS.search(process.stderr)
    assert found is not None, process.stderr
    return int(found.group(1))


def scrape(port: int) -> Samples:
    """Every sample served, keyed `name` or `name{label="value",...}`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def scrape_until(port: int, condition: Callable[[Samples], bool], what: str) -> Samples:
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while True:
        samples = scrape(port)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last scrape: {samples}")
        time.sleep(0.05)


def closed_total(samples: Samples) -> float:
    return sum(
        samples[f'aioserver_connections_closed_total{{reason="{r}"}}'] for r in CLOSED_REASONS
    )


def echo_once(port: int, data: bytes) -> bytes:
    """Send `data`, half-close, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    return received


def test_counts_and_bytes_are_exact_for_the_connections_made() -> None:
    with start_aioserver("--port", "0", "--metrics", ":0", "--protocol", "echo") as server:
        port = metrics_port(server)
        before = scrape(port)
        assert before["aioserver_connections_accepted_total"] == 0
        assert before["aioserver_connections_active"] == 0
        # Every label value is there from the start, at 0.
        for reason in ("max_connections", "per_client", "denied", "out_of_fds"):
            assert before[f'aioserver_connections_turned_away_total{{reason="{reason}"}}'] == 0
        payloads = [b"hello\n" * (i + 1) for i in range(5)]
        for payload in payloads:
            assert echo_once(server.port, payload) == payload
        samples = scrape_until(port, lambda s: closed_total(s) == 5, "5 connections closed")
        assert samples["aioserver_connections_accepted_total"] == 5
        assert samples['aioserver_connections_closed_total{reason="client_closed"}'] == 5
        assert samples["aioserver_connections_active"] == 0
        size = sum(len(payload) for payload in payloads)
        assert samples["aioserver_received_bytes_total"] == size
        assert samples["aioserver_sent_bytes_total"] == size
        assert samples["aioserver_connection_duration_seconds_count"] == 5
        assert samples['aioserver_connection_duration_seconds_bucket{le="+Inf"}'] == 5
        assert samples["aioserver_tls_handshake_failures_total"] == 0
        server.stop()
        assert server.returncode == 0, server.stderr


def test_clients_over_max_connections_are_counted_as_turned_away() -> None:
    with start_aioserver(
        "--port", "0", "--metrics", ":0", "--protocol", "thanks", "--max-connections", "1"
    ) as server:
        port = metrics_port(server)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as held:
            held.sendall(b"hi\n")
            assert held.recv(100) == b"Thank you for your message hi\n"
            for _ in range(3):
                assert echo_once(server.port, b"") == b"Error: server busy\n"
            samples = scrape(port)
            assert samples['aioserver_connections_turned_away_total{reason="max_connections"}'] == 3
            assert samples["aioserver_connections_accepted_total"] == 1
            assert samples["aioserver_connections_active"] == 1
        samples = scrape_until(port, lambda s: closed_total(s) == 1, "the held connection closed")
        assert samples["aioserver_connections_active"] == 0


def test_a_failed_tls_handshake_is_counted(
    tmp_path: Path, tls_cert: trustme.LeafCert, client_tls_context: ssl.SSLContext
) -> None:
    certfile, keyfile = write_tls_files(tls_cert, tmp_path)
    with start_aioserver(
        "--port", "0", "--metrics", ":0", "--certfile", str(certfile), "--keyfile", str(keyfile)
    ) as server:
        port = metrics_port(server)
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            client_tls_context.wrap_socket(raw, server_hostname="127.0.0.1") as client,
        ):
            client.sendall(b"secret\n")
            assert client.recv(100) == b"secret\n"
        # Plain text to a TLS port: the handshake fails.
        with contextlib.suppress(ConnectionResetError):
            echo_once(server.port, b"GET / HTTP/1.0\r\n\r\n")
        samples = scrape_until(port, lambda s: closed_total(s) == 2, "both connections closed")
        assert samples["aioserver_tls_handshake_failures_total"] == 1
        assert samples['aioserver_connections_closed_total{reason="tls_failed"}'] == 1
        assert samples["aioserver_connections_accepted_total"] == 2


def ask_pid(port: int) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"who\n")
        client.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := client.recv(100):
            reply += chunk
    return int(reply.split(b" ", 1)[0]), reply


def test_workers_are_summed_and_a_dead_worker_leaves_the_live_gauge(tmp_path: Path) -> None:
    (tmp_path / "pidhandler.py").write_text(PID_HANDLER)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "TMPDIR": str(temporary),  # where the supervisor makes its multiprocess directory
    }
    with start_aioserver(
        "--protocol", "pidhandler:pid", "--port", "0", "--workers", "2",
        "--metrics", ":0", "--no-access-log", env=env,
    ) as server:  # fmt: skip
        port = metrics_port(server)
        (directory,) = temporary.glob("aioserver-metrics-*")
        pids: set[int] = set()
        sent = made = 0
        while len(pids) < 2:
            assert made < 400, f"one worker answered {made} connections"
            pid, reply = ask_pid(server.port)
            pids.add(pid)
            sent += len(reply)
            made += 1
        samples = scrape_until(port, lambda s: closed_total(s) == made, f"{made} closed")
        assert samples["aioserver_connections_accepted_total"] == made
        assert samples['aioserver_connections_closed_total{reason="handler_returned"}'] == made
        assert samples["aioserver_received_bytes_total"] == made * len(b"who\n")
        assert samples["aioserver_sent_bytes_total"] == sent
        assert samples["aioserver_connections_active"] == 0
        # A connection left open, on a worker then killed: its live gauge leaves the sum.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as held:
            held.sendall(b"who\n")
            victim = int(held.recv(100).split(b" ", 1)[0])
            scrape_until(port, lambda s: s["aioserver_connections_active"] == 1, "1 open")
            os.kill(victim, signal.SIGKILL)
            server.wait_for_log(f"Worker {victim} exited (killed by SIGKILL)")
            samples = scrape_until(
                port, lambda s: s["aioserver_connections_active"] == 0, "the dead worker's 1 gone"
            )
        assert samples["aioserver_connections_accepted_total"] == made + 1
        assert directory.is_dir()
        server.stop()
        assert server.returncode == 0, server.stderr
    assert not directory.exists(), "the multiprocess directory is removed at exit"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("nine", "expected HOST:PORT, :PORT or PORT, not 'nine'"),
        ("localhost:", "expected HOST:PORT, :PORT or PORT, not 'localhost:'"),
        ("127.0.0.1:70000", "expected a port from 0 to 65535, not 70000"),
        ("::1:9100", "put an IPv6 address in brackets"),
        ("[::1]9100", "expected HOST:PORT"),
    ],
)
def test_a_bad_metrics_value_is_one_line_and_exit_2(value: str, why: str) -> None:
    result = run_aioserver("--metrics", value)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"aioserver: error: argument --metrics: {why}"), last


def test_a_bad_metrics_variable_is_one_line_and_exit_2() -> None:
    result = run_aioserver(env={"AIOSERVER_METRICS": "x:y"})
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert (
        last
        == "aioserver: error: AIOSERVER_METRICS='x:y': expected HOST:PORT, :PORT or PORT, not 'x:y'"
    )


def test_a_metrics_port_in_use_is_one_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = run_aioserver("--port", "0", "--metrics", str(busy))
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert (
        last
        == f"aioserver: error: cannot serve metrics on 127.0.0.1:{busy}: address already in use"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9100", ("127.0.0.1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9100", ("::1", 9100)),
    ],
)
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_address(text) == expected


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("closed by client", "client_closed"),
        ("handler returned", "handler_returned"),
        ("idle for 300 s", "idle"),
        ("idle for 1 s with 10 bytes not taken", "idle"),
        ("reset by client", "reset"),
        ("server stopped, then reset: replies not taken by the deadline", "stopped"),
        ("TLS handshake failed: TLS error: WRONG_VERSION_NUMBER", "tls_failed"),
        ("no TLS handshake within 10 s", "tls_failed"),
        ("handler failed", "error"),
        ("ETIMEDOUT: Connection timed out", "error"),
        ("", "other"),
    ],
)
def test_closed_reasons_map_to_a_fixed_set(reason: str, label: str) -> None:
    assert closed_reason(reason) == label
    assert label in CLOSED_REASONS


def readme_block(language: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, f"expected one {language} block in README.md"
    return str(blocks[0])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def prometheus_value(port: int, query: str) -> str | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None  # not up yet
    result = answer["data"]["result"]
    return str(result[0]["value"][1]) if result else None


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus is not installed (.ci/run installs Debian's package)"
)
def test_a_real_prometheus_scrapes_the_readme_configuration(tmp_path: Path) -> None:
    with start_aioserver("--port", "0", "--metrics", ":0") as server:
        port = metrics_port(server)
        shown = readme_block("yaml")
        assert "127.0.0.1:9100" in shown
        config = tmp_path / "prometheus.yml"
        config.write_text(shown.replace("127.0.0.1:9100", f"127.0.0.1:{port}"))
        web = free_port()
        assert PROMETHEUS is not None
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            for i in range(3):
                assert echo_once(server.port, b"%d\n" % i) == b"%d\n" % i
            deadline = time.monotonic() + PROMETHEUS_TIMEOUT
            value = None
            while value != "3":
                assert prometheus.poll() is None, "prometheus exited"
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"Prometheus reported {value!r}, not 3, after {PROMETHEUS_TIMEOUT} s"
                    )
                time.sleep(0.5)
                value = prometheus_value(web, "aioserver_connections_accepted_total")
        finally:
            prometheus.terminate()
            try:
                prometheus.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.communicate()
