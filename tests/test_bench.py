"""scripts/bench runs: a --smoke run covers every workload and server and writes
well-formed JSON. These tests check the harness, never the speed: the figures of a
smoke run (a fraction of a second, a few connections) mean nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SMOKE_TIMEOUT_S = 90  # a smoke run takes about 25 s; under the suite's 120 s per test
INSTRUCTIONS_TIMEOUT_S = 100  # two short lifetimes of one server under callgrind

WORKLOAD_PROTOCOLS = {"a": "echo", "b": "echo", "c": "thanks", "d": "echo", "e": "echo"}
WORKLOAD_PROTOCOLS |= {"f": "echo", "g": "echo"}
SERVERS = {
    "echo": {
        "aioserver-echo-uvloop",
        "aioserver-echo-asyncio",
        "start-server-echo-uvloop",
        "start-server-echo-asyncio",
        "protocol-echo-uvloop",
        "threading-echo",
        "c-pthread-echo",
        "c-epoll-echo",
    },
    "thanks": {
        "aioserver-thanks-uvloop",
        "aioserver-thanks-asyncio",
        "threading-thanks",
        "c-thread-thanks",
    },
}
# The frameworks' servers (scripts/bench_peers.py), in the throughput workloads only,
# and the module each imports.
PEERS = {
    "echo": {"gevent-echo": "gevent", "twisted-echo": "twisted", "trio-echo": "trio"},
    "thanks": {"gevent-thanks": "gevent", "twisted-thanks": "twisted", "trio-thanks": "trio"},
}
PEER_WORKLOADS = {"a", "b", "c", "d", "e"}
# Several worker processes: a throughput row only.
WORKERS_ROW, WORKERS_WORKLOADS = "aioserver-echo-uvloop-2workers", {"a", "e"}
HAS_C_COMPILER = any(cc and shutil.which(cc) for cc in (os.environ.get("CC"), "gcc", "cc", "clang"))


def imports(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON of one smoke run, shared by the tests of this module."""
    if not HAS_C_COMPILER:
        pytest.skip("no C compiler for the load generator, scripts/bench_load.c")
    tmp = tmp_path_factory.mktemp("bench")
    command = [sys.executable, str(SCRIPTS / "bench"), "--smoke", "--json", str(tmp / "b.json")]
    command += ["--chart", str(tmp / "b.png"), "--build-dir", str(tmp / "build")]
    proc = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report: dict[str, Any] = json.loads((tmp / "b.json").read_text())
    report["_stdout"] = proc.stdout
    report["_chart"] = tmp / "b.png"
    report["_json"] = tmp / "b.json"
    return report


def test_a_smoke_run_has_results_for_every_workload(smoke: dict[str, Any]) -> None:
    assert smoke["meta"]["smoke"] is True
    assert sorted(smoke["results"]) == sorted(WORKLOAD_PROTOCOLS)


@pytest.mark.parametrize(
    ("key", "protocol"), WORKLOAD_PROTOCOLS.items(), ids=[f"({key})" for key in WORKLOAD_PROTOCOLS]
)
def test_every_server_has_a_row_in_each_workload(
    smoke: dict[str, Any], key: str, protocol: str
) -> None:
    rows = smoke["results"][key]
    peers = PEERS[protocol] if key in PEER_WORKLOADS else {}
    expected = SERVERS[protocol] | set(peers)
    expected |= {WORKERS_ROW} if key in WORKERS_WORKLOADS else set()
    assert set(rows) == expected
    for name, row in rows.items():
        if "skipped" in row:
            assert name in peers, f"{name}: {row['skipped']}"
            assert not imports(peers[name]), f"{name} skipped though {peers[name]} imports"
        else:
            assert row["rounds_ok"] == 1, f"{name}: {row['errors']}"


def test_the_peers_come_with_the_bench_extra() -> None:
    """scripts/_venv.sh installs the bench extra, so the peers run in the smoke test."""
    for module in ("gevent", "twisted", "trio"):
        assert imports(module), f"{module} does not import: is the bench extra installed?"


def test_each_run_holds_well_formed_figures(smoke: dict[str, Any]) -> None:
    clients = smoke["meta"]["clients"]
    assert smoke["runs"]
    for run in smoke["runs"]:
        assert run["ok"], run
        result = run["result"]
        if run["workload"] in "abcde":
            assert result["requests"] > 0
            assert result["rps"] > 0
            assert result["mbps"] > 0
            assert 0 < result["p50_us"] <= result["p99_us"] <= result["max_us"] + 1
        else:
            assert result["clients"] == clients
            assert result["rss_before"] > 0
            assert result["rss_after"] > 0
            assert result["stop_s"] >= 0
            assert result["closed_by_server"] == clients


def test_every_target_gets_a_verdict(smoke: dict[str, Any]) -> None:
    assert len(smoke["targets"]) == 16
    for target in smoke["targets"]:
        assert isinstance(target["met"], bool), target
        assert isinstance(target["value"], float | int), target
    assert "Targets" in smoke["_stdout"]


def test_the_doc_tables_are_made_from_the_json(smoke: dict[str, Any], tmp_path: Path) -> None:
    """--from-json with --doc rewrites the GENERATED part of the doc and nothing else."""
    doc = tmp_path / "benchmarks.md"
    original = (ROOT / "docs" / "benchmarks.md").read_text()
    doc.write_text(original)
    command = [sys.executable, str(SCRIPTS / "bench"), "--from-json", str(smoke["_json"])]
    command += ["--doc", str(doc)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = doc.read_text()
    assert text != original
    assert "| `aioserver-echo-uvloop` |" in text
    assert "| `twisted-thanks` |" in text
    head = original.split("<!-- BEGIN GENERATED throughput")[0]
    tail = original.split("<!-- END GENERATED throughput -->")[1]
    assert text.startswith(head)
    assert text.endswith(tail)


def test_traffic_stays_on_127_0_0_1(smoke: dict[str, Any]) -> None:
    assert smoke["meta"]["host"] == "127.0.0.1"
    for run in smoke["runs"]:
        assert run["result"]["address"].startswith("127.0.0.1:"), run
    for server in smoke["servers"]:
        assert "127.0.0.1" in server["command"].split(), server


def test_the_bench_sources_name_no_other_address() -> None:
    sources = [SCRIPTS / "bench", *SCRIPTS.glob("bench_*.py"), *SCRIPTS.glob("bench_*.c")]
    sources += SCRIPTS.glob("benchmark/*.py")
    assert len(sources) >= 15
    for source in sources:
        text = source.read_text()
        addresses = set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", text))
        assert addresses <= {"127.0.0.1", "127.0.0.0"}, (source.name, addresses)  # 0: in /8
        assert "INADDR_ANY" not in text, source.name


def test_the_chart_is_a_png(smoke: dict[str, Any]) -> None:
    """matplotlib comes with the test extra (and the bench extra), so a chart is drawn."""
    chart: Path = smoke["_chart"]
    said = [line for line in smoke["_stdout"].splitlines() if "chart" in line]
    assert chart.is_file(), f"no chart at {chart}; the bench said: {said}"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind is not installed")
def test_instruction_counts_come_from_callgrind(tmp_path: Path) -> None:
    """--instructions --smoke: one server, N and 2N exchanges under callgrind."""
    out = tmp_path / "i.json"
    command = [sys.executable, str(SCRIPTS / "bench"), "--instructions", "--smoke"]
    command += ["--servers", "aioserver-echo-uvloop", "--workloads", "echo-1k"]
    command += ["--json", str(out), "--build-dir", str(tmp_path / "build")]
    proc = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=INSTRUCTIONS_TIMEOUT_S
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    [row] = report["counts"]
    assert row["ok"], row
    assert (row["workload"], row["server"]) == ("echo-1k", "aioserver-echo-uvloop")
    small, large = row["totals"]
    assert 0 < small < large
    assert row["per_unit"] == (large - small) / row["n"] > 0
    assert "Targets (on instruction counts)" in proc.stdout
    assert len(report["targets"]) == 4
