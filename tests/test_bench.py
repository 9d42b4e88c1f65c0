"""scripts/bench runs: a --smoke run covers every workload and server and writes
well-formed JSON. These tests check the harness, never the speed: the figures of a
smoke run (a fraction of a second, a few connections) mean nothing.
"""

from __future__ import annotations

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
SMOKE_TIMEOUT_S = 55  # a smoke run takes about 20 s; under the suite's 60 s per test

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
# Several worker processes: a throughput row only.
WORKERS_ROW, WORKERS_WORKLOADS = "aioserver-echo-uvloop-2workers", {"a", "e"}
HAS_C_COMPILER = any(cc and shutil.which(cc) for cc in (os.environ.get("CC"), "gcc", "cc", "clang"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON of one smoke run, shared by the tests of this module."""
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
    expected = SERVERS[protocol] | ({WORKERS_ROW} if key in WORKERS_WORKLOADS else set())
    assert set(rows) == expected
    for name, row in rows.items():
        if "skipped" in row:
            assert name.startswith("c-"), f"{name}: {row['skipped']}"
            assert not HAS_C_COMPILER, f"{name} skipped with a C compiler present"
        else:
            assert row["rounds_ok"] == 1, f"{name}: {row['errors']}"


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
    assert len(smoke["targets"]) == 12
    for target in smoke["targets"]:
        assert isinstance(target["met"], bool), target
        assert isinstance(target["value"], float | int), target
    assert "Targets" in smoke["_stdout"]


def test_traffic_stays_on_127_0_0_1(smoke: dict[str, Any]) -> None:
    assert smoke["meta"]["host"] == "127.0.0.1"
    for run in smoke["runs"]:
        assert run["result"]["address"].startswith("127.0.0.1:"), run
    for server in smoke["servers"]:
        assert "127.0.0.1" in server["command"].split(), server


def test_the_bench_sources_name_no_other_address() -> None:
    sources = [SCRIPTS / "bench", *SCRIPTS.glob("bench_*.py"), *SCRIPTS.glob("bench_*.c")]
    assert len(sources) >= 7
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
