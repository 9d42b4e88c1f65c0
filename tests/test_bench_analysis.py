"""The bench's analysis and report (scripts/benchmark/) on fixed figures: medians,
same-round ratios, target verdicts, instruction counts, the plan and the tables."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from benchmark import analysis, instructions, report, runner  # noqa: E402
from benchmark.servers import SERVERS, by_name  # noqa: E402
from benchmark.workloads import WORKLOADS, by_key  # noqa: E402

UV, C_EPOLL, OBVIOUS = "aioserver-echo-uvloop", "c-epoll-echo", "start-server-echo-uvloop"


def rr(rps: float, **more: Any) -> dict[str, Any]:
    """A request-reply result as the load generator reports it."""
    figures = {"rps": rps, "mbps": rps / 1000, "p50_us": 400.0, "p99_us": 900.0}
    return figures | {"server_cpu": 0.99, "loadgen_cpu": 0.8, "mode": "rr"} | more


def ok(result: dict[str, Any], disturbed: bool = False) -> dict[str, Any]:
    return {"ok": True, "result": result, "disturbed": disturbed, "discarded": []}


def failed(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


# Three rounds of (a): aioserver at 100, 90, 120 thousand requests/s, C epoll at 125,
# 100, 150 thousand: same-round ratios 0.8, 0.9, 0.8.
RUNS: analysis.Runs = {
    ("a", UV, 0): ok(rr(100_000)),
    ("a", UV, 1): ok(rr(90_000), disturbed=True),
    ("a", UV, 2): ok(rr(120_000)),
    ("a", C_EPOLL, 0): ok(rr(125_000)),
    ("a", C_EPOLL, 1): ok(rr(100_000)),
    ("a", C_EPOLL, 2): ok(rr(150_000)),
    ("a", OBVIOUS, 0): ok(rr(50_000)),
    ("a", OBVIOUS, 1): failed("exited with code 1 before its ready line"),
    ("a", OBVIOUS, 2): ok(rr(80_000)),
    ("d", UV, 0): ok(rr(95_000)),
    ("d", UV, 1): ok(rr(99_000)),
    ("d", UV, 2): ok(rr(96_000)),
    ("g", UV, 0): ok({"stop_s": 0.5, "signal": "SIGTERM", "timed_out": False}),
    ("g", UV, 1): ok({"stop_s": 0.7, "signal": "SIGTERM", "timed_out": False}),
    ("g", UV, 2): ok({"stop_s": 3.0, "signal": "SIGTERM", "timed_out": True}),
}


def test_same_round_ratios_skip_a_round_that_failed() -> None:
    ratios = analysis.same_round_ratios(RUNS, WORKLOADS, 3, ("a", UV), ("a", OBVIOUS))
    assert ratios == [2.0, 1.5]
    assert analysis.same_round_ratios(RUNS, WORKLOADS, 3, ("a", UV), ("a", C_EPOLL)) == [
        0.8,
        0.9,
        0.8,
    ]


def test_summarize_takes_medians_ranges_and_ratios() -> None:
    summary = analysis.summarize(RUNS, 3, [UV, C_EPOLL, OBVIOUS, "absent"])
    row = summary["a"][UV]
    assert row["rounds_ok"] == 3
    assert row["rps"] == 100_000
    assert row["range"] == [90_000, 120_000]
    assert row["ratio"] == pytest.approx(0.8)  # the median of 0.8, 0.9, 0.8
    assert row["disturbed_rounds"] == 1
    assert row["mode"] == "rr"  # the same text in every round is kept
    assert summary["a"][C_EPOLL]["ratio"] == 1.0
    obvious = summary["a"][OBVIOUS]
    assert obvious["rounds_ok"] == 2
    assert obvious["errors"] == ["exited with code 1 before its ready line"]
    assert obvious["rps"] == 65_000
    assert "absent" not in summary["a"]


def test_many_clients_is_compared_with_the_same_server_in_a() -> None:
    row = analysis.summarize(RUNS, 3, [UV])["d"][UV]
    assert row["ratio"] == pytest.approx(0.95)  # 0.95, 1.1, 0.8


def test_flags_are_not_averaged() -> None:
    row = analysis.summarize(RUNS, 3, [UV])["g"][UV]
    assert row["stop_s"] == 0.7
    assert row["timed_out"] is True  # any round that timed out
    assert row["signal"] == "SIGTERM"


def test_targets_get_met_not_met_or_no_data() -> None:
    targets = (
        analysis.Target("a", UV, ">=", 0.85, ("a", C_EPOLL)),
        analysis.Target("a", UV, ">=", 1.5, ("a", OBVIOUS)),
        analysis.Target("a", UV, ">=", 2.0, ("a", "trio-echo")),
        analysis.Target("g", UV, "<", 1.0),
    )
    checked = analysis.check_targets(RUNS, 3, targets)
    assert [t["met"] for t in checked] == [False, True, None, True]
    assert checked[0]["value"] == pytest.approx(0.8)
    assert checked[1]["value"] == 1.75
    assert checked[1]["rounds"] == 2
    assert checked[2]["value"] is None
    assert checked[3]["value"] == 0.7
    assert checked[0]["target"] == f"(a) {UV} >= 0.85x {C_EPOLL}"
    assert checked[3]["target"] == f"(g) {UV} stop time < 1,000 ms"
    assert report.target_value(checked[0]) == "0.80x"
    assert report.target_value(checked[3]) == "700 ms"
    assert report.target_value(checked[2]) == "no data"


def test_every_target_names_known_servers_and_workloads() -> None:
    names = {s.name for s in SERVERS}
    keys = {w.key for w in WORKLOADS}
    for target in analysis.TARGETS:
        assert target.workload in keys, target
        assert target.server in names, target
        if target.versus:
            assert target.versus[0] in keys, target
            assert target.versus[1] in names, target
    for count in analysis.COUNT_TARGETS:
        workloads = {w.key: w for w in instructions.COUNT_WORKLOADS}
        assert count.server in workloads[count.workload].servers, count
        assert count.versus[1] in workloads[count.versus[0]].servers, count
        by_name(count.server)


def test_instructions_per_exchange_cancel_start_up() -> None:
    # 500 M to start and stop, 5,000 per request: N = 1,000 and 2N.
    assert analysis.per_unit(505_000_000, 510_000_000, 1000) == 5000
    with pytest.raises(ValueError, match="at least 1"):
        analysis.per_unit(1, 2, 0)


def test_count_targets() -> None:
    counts: dict[tuple[str, str], float | None] = {
        ("echo-1k", UV): 5_000,
        ("echo-1k", "protocol-echo-uvloop"): 4_400,
        ("echo-64", UV): 4_000,
        ("thanks-64", "aioserver-thanks-uvloop"): 7_000,
        ("connect", UV): 100_000,
        ("connect", OBVIOUS): 98_000,
        ("connect", f"{UV}-access-log"): None,  # failed
    }
    checked = analysis.check_count_targets(counts)
    assert [t["met"] for t in checked] == [False, False, False, None]
    assert checked[0]["value"] == pytest.approx(5_000 / 4_400)
    assert checked[1]["value"] == 1.75
    assert checked[1]["target"].endswith("(the thanks rule)")
    assert checked[3]["value"] is None


def test_the_plan_shares_one_lifetime_for_f_and_g_and_rotates() -> None:
    servers = [by_name(UV), by_name(C_EPOLL), by_name("aioserver-echo-uvloop-2workers")]
    workloads = [by_key("a"), by_key("f"), by_key("g")]
    plan = runner.make_plan(2, workloads, servers)
    firsts = [step.server.name for step in plan if step.workloads[0].key == "a"]
    assert firsts == [
        UV,
        C_EPOLL,
        "aioserver-echo-uvloop-2workers",
        C_EPOLL,
        "aioserver-echo-uvloop-2workers",
        UV,
    ]
    held = [step for step in plan if step.workloads[0].key == "f"]
    assert [[w.key for w in step.workloads] for step in held] == [["f", "g"]] * 4
    # --workers runs in (a) and (e) only.
    assert "aioserver-echo-uvloop-2workers" not in {step.server.name for step in held}


def fixed_report() -> dict[str, Any]:
    results = analysis.summarize(RUNS, 3, [UV, C_EPOLL, OBVIOUS])
    results["a"]["trio-echo"] = {"skipped": "skipped: trio does not import in python"}
    return {
        "meta": {
            "command": "scripts/bench",
            "rounds": 3,
            "warmup_s": 0.3,
            "duration_s": 1.0,
            "elapsed_s": 300,
            "started": "2026-11-30T12:00:00+0000",
            "commit": "abc1234",
            "notes": ["server pinned to CPU 0, load generator to CPU 1"],
        },
        "servers": [],
        "workloads": [
            {"key": w.key, "title": w.title.format(active=50, clients="10,000")} for w in WORKLOADS
        ],
        "results": results,
        "targets": analysis.check_targets(RUNS, 3, analysis.TARGETS[:1]),
    }


def test_the_text_and_markdown_tables() -> None:
    fixed = fixed_report()
    text = report.format_tables(fixed)
    assert "(a) echo, 1 KiB request-reply, 50 connections" in text
    assert "ratio: median of same-round ratios to c-epoll-echo" in text
    line = next(line for line in text.splitlines() if line.startswith(UV))
    assert "100,000" in line
    assert line.endswith("0.80*")
    assert "skipped: trio does not import" in text
    assert "NOT MET (a) aioserver-echo-uvloop >= 0.85x c-epoll-echo" in text
    markdown = report.markdown_tables(fixed, "bench-results.json")
    assert "at commit abc1234" in markdown
    header = "| server | req/s | MB/s | p50 ms | p99 ms | srv CPU | load CPU |"
    assert header + " srv user us | srv sys us | ratio |" in markdown
    # Runs without the server's user and system times show "-" there.
    assert f"| `{UV}` | 100,000 | 100.0 | 0.40 | 0.90 | 99% | 80% | - | - | 0.80* |" in markdown
    assert "| `trio-echo` | skipped: trio does not import in python |" in markdown
    assert "| stop | signal | exit | closed |" in markdown
    assert "| `aioserver-echo-uvloop` | >700 ms | SIGTERM |" in markdown


def test_update_doc_replaces_only_between_its_markers(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "before\n<!-- BEGIN GENERATED throughput: by scripts/bench -->\nold\n"
        "<!-- END GENERATED throughput -->\nafter\n"
    )
    report.update_doc(doc, "throughput", "new\n")
    assert doc.read_text() == (
        "before\n<!-- BEGIN GENERATED throughput: by scripts/bench -->\n\nnew\n\n"
        "<!-- END GENERATED throughput -->\nafter\n"
    )
    with pytest.raises(SystemExit, match="no GENERATED instructions markers"):
        report.update_doc(doc, "instructions", "x")


def test_the_instruction_tables() -> None:
    records = [
        {"workload": "echo-1k", "server": UV, "ok": True, "n": 100, "per_unit": 5_500.0},
        {
            "workload": "echo-1k",
            "server": "protocol-echo-uvloop",
            "ok": True,
            "n": 100,
            "per_unit": 5_000.0,
        },
        {
            "workload": "echo-1k",
            "server": "gevent-echo",
            "ok": False,
            "skipped": "skipped: gevent does not import in python",
        },
    ]
    workloads = [instructions.COUNT_WORKLOADS[0]]
    meta = {"valgrind": "valgrind-3.19.0", "elapsed_s": 120, "started": "now"}
    built = instructions.build_report(records, workloads, ["--instructions"], meta)
    assert built["counts"][0]["ratio"] == 1.1
    assert built["targets"][0]["met"] is True  # 1.10x <= 1.10x
    text = instructions.format_counts(built)
    assert "5,500 request" in text
    assert "1.10  protocol-echo-uvloop" in text
    markdown = instructions.markdown_counts(built, "bench-instructions.json")
    assert f"| echo-1k | `{UV}` | 5,500 | request | 100 | 1.10 | `protocol-echo-uvloop` |" in (
        markdown
    )
    assert "| echo-1k | `gevent-echo` | skipped: gevent does not import" in markdown


def test_callgrind_totals_are_read_from_the_out_file(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_text(
        "version: 1\ncmd: python\nevents: Ir\nfn=main\n1 5\nsummary: 1234\ntotals: 1234\n"
    )
    assert instructions.callgrind_total(out) == 1234
    assert instructions.request(5) == b"ahov\n"


def test_the_servers_cpu_time_per_request_is_the_median_over_rounds() -> None:
    runs: analysis.Runs = {
        ("a", UV, index): ok(rr(100_000, server_user_us=user, server_sys_us=system))
        for index, (user, system) in enumerate([(1.5, 7.0), (1.7, 7.9), (1.6, 8.4)])
    }
    fixed = fixed_report()
    fixed["results"] = analysis.summarize(runs, 3, [UV])
    line = next(line for line in report.format_tables(fixed).splitlines() if line.startswith(UV))
    assert line.split()[-3:] == ["1.60", "7.90", "-"]  # user, sys, and no ratio without C epoll
