"""The bench's output: text tables for the terminal, the same as markdown for
docs/benchmarks.md (between its GENERATED markers), and the chart."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .workloads import WORKLOADS, Row, Workload

NAME_WIDTH = 31
STATUS = {True: "met", False: "NOT MET", None: "n/a"}
DISTURBED_NOTE = "* another program took CPU time during at least one round of this row"


def _heading(workload: Workload, titles: dict[str, str]) -> tuple[str, str]:
    ratio = f"; ratio: median of same-round ratios to {workload.ratio_to()}"
    return (
        f"({workload.key}) {titles[workload.key]}",
        f"medians{ratio if workload.reference else ''}",
    )


def _cells(workload: Workload, row: Row) -> list[str] | str:
    """The cells of one row, or the one text that stands for them."""
    if "skipped" in row:
        return str(row["skipped"])
    if not row["rounds_ok"]:
        return f"FAILED: {row['errors'][0][:100]}"
    return [column.show(row) for column in workload.columns]


def _star(row: Row) -> str:
    return "*" if row.get("disturbed_rounds") else ""


def _disturbed(report: dict[str, Any]) -> bool:
    results = report["results"].values()
    return any(row.get("disturbed_rounds") for rows in results for row in rows.values())


def target_value(target: dict[str, Any], workloads: Sequence[Workload] = WORKLOADS) -> str:
    value = target["value"]
    if value is None:
        return "no data"
    if target["kind"] == "ratio":
        return f"{value:.2f}x"
    return next(w for w in workloads if w.key == target["kind"]).show(value)


def format_tables(report: dict[str, Any], workloads: Sequence[Workload] = WORKLOADS) -> str:
    titles = {w["key"]: w["title"] for w in report["workloads"]}
    out: list[str] = []
    for workload in workloads:
        rows = report["results"].get(workload.key)
        if not rows:
            continue
        title, how = _heading(workload, titles)
        out.append(f"{title}   [{how}]")
        out.append(
            f"{'server':<{NAME_WIDTH}}"
            + "".join(f"{c.header:>{c.width}}" for c in workload.columns)
        )
        for name, row in rows.items():
            cells = _cells(workload, row)
            if isinstance(cells, str):
                out.append(f"{name:<{NAME_WIDTH}}  {cells}")
            else:
                columns = zip(cells, workload.columns, strict=True)
                line = "".join(f"{cell:>{column.width}}" for cell, column in columns)
                out.append(f"{name:<{NAME_WIDTH}}{line}{_star(row)}")
        out.append("")
    if _disturbed(report):
        out.append(DISTURBED_NOTE + "\n")
    rounds = report["meta"]["rounds"]
    out.append(f"Targets (medians over {rounds} round(s); each ratio taken within one round)")
    for target in report["targets"]:
        shown = target_value(target, workloads)
        out.append(f"  {STATUS[target['met']]:<8}{target['target']:<74}{shown:>10}")
    return "\n".join(out)


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def markdown_tables(
    report: dict[str, Any], json_link: str, workloads: Sequence[Workload] = WORKLOADS
) -> str:
    """The results part of docs/benchmarks.md: how the run was made, a table per
    workload, and the targets."""
    meta = report["meta"]
    titles = {w["key"]: w["title"] for w in report["workloads"]}
    commit = f", at commit {meta['commit']}" if meta.get("commit") else ""
    out = [
        f"Command: `{meta['command']}` ({meta['rounds']} round(s),"
        f" {meta['warmup_s']:g} s warm-up + {meta['duration_s']:g} s measured per run;"
        f" {meta['elapsed_s'] / 60:.0f} minutes), started {meta['started']}{commit}."
        f" Notes: {'; '.join(meta['notes'])}. Every run of every round is in"
        f" [{Path(json_link).name}]({json_link}).",
        "",
    ]
    for workload in workloads:
        rows = report["results"].get(workload.key)
        if not rows:
            continue
        title, how = _heading(workload, titles)
        out += [f"**{title}** ({how})", ""]
        headers = ["server", *(c.header for c in workload.columns)]
        out.append(_md_row(headers))
        out.append(_md_row(["---", *("---:" for _ in workload.columns)]))
        for name, row in rows.items():
            cells = _cells(workload, row)
            if isinstance(cells, str):
                cells = [cells, *("" for _ in workload.columns[1:])]
            else:
                cells[-1] += _star(row)
            out.append(_md_row([f"`{name}`", *cells]))
        out.append("")
    if _disturbed(report):
        out += [DISTURBED_NOTE, ""]
    out += [
        f"Targets (medians over {meta['rounds']} round(s); each ratio taken within one round):",
        "",
        _md_row(["", "target", "value"]),
        _md_row(["---", "---", "---:"]),
    ]
    for target in report["targets"]:
        shown = target_value(target, workloads)
        out.append(_md_row([STATUS[target["met"]], target["target"], shown]))
    return "\n".join(out) + "\n"


def update_doc(path: Path, section: str, text: str) -> None:
    """Replaces what stands between `<!-- BEGIN GENERATED section ... -->` and
    `<!-- END GENERATED section -->` in `path` with `text`."""
    doc = path.read_text()
    pattern = re.compile(
        rf"(<!-- BEGIN GENERATED {re.escape(section)}\b.*?-->\n)(.*?)(<!-- END GENERATED"
        rf" {re.escape(section)} -->)",
        re.DOTALL,
    )
    if not pattern.search(doc):
        raise SystemExit(f"bench: {path} has no GENERATED {section} markers")
    path.write_text(pattern.sub(lambda m: m.group(1) + "\n" + text + "\n" + m.group(3), doc))


def relative_link(target: Path, doc: Path) -> str:
    return os.path.relpath(target.absolute(), doc.absolute().parent)


COLOURS = {"aioserver": "tab:blue", "peer": "tab:orange", "c": "dimgray"}


def write_chart(
    path: Path, report: dict[str, Any], workloads: Sequence[Workload] = WORKLOADS
) -> str:
    """One bar chart per workload, medians with the range over the rounds."""
    try:  # optional, so imported by name: type checkers need not have it either
        importlib.import_module("matplotlib").use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "no chart: matplotlib does not import"
    results = report["results"]
    shown = [w for w in workloads if results.get(w.key)]
    if not shown:
        return "no chart: nothing was measured"
    titles = {w["key"]: w["title"] for w in report["workloads"]}
    family = {s["name"]: s.get("family", "") for s in report["servers"]}
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 0.8 + 2.5 * len(shown)), squeeze=False)
    for ax, workload in zip(axes[:, 0], shown, strict=True):
        rows = {n: r for n, r in results[workload.key].items() if r.get("rounds_ok")}
        div = workload.chart_scale
        names = list(rows)
        values = [rows[n][workload.metric] / div for n in names]
        spread = [
            [v - rows[n]["range"][0] / div for n, v in zip(names, values, strict=True)],
            [rows[n]["range"][1] / div - v for n, v in zip(names, values, strict=True)],
        ]
        colors = [COLOURS.get(family.get(n, ""), "silver") for n in names]
        ax.barh(names, values, xerr=spread, color=colors, capsize=2)
        ax.invert_yaxis()
        better = "higher" if workload.higher_is_better else "lower"
        ax.set_title(f"({workload.key}) {titles[workload.key]}; {better} is better", fontsize=9)
        ax.set_xlabel(workload.unit, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"scripts/bench: medians of {report['meta']['rounds']} round(s)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"chart: {path}"
