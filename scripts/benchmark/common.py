"""What every module of the bench shares: paths, counts, settings, the run error."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).absolute().parent.parent.parent
SCRIPTS = ROOT / "scripts"
HOST = "127.0.0.1"  # every server listens here: no traffic leaves loopback

ACTIVE_CONNECTIONS = 50  # the active clients of (a) to (e)
MANY_CLIENTS = 10_000  # the connected clients of (d), (f) and (g)
SMOKE_CLIENTS = 100  # (d), (f), (g) in --smoke: enough to go through every code path
SMOKE_ACTIVE = 4  # (a) to (e) in --smoke

# One run's figures: the load generator's JSON, or a workload's own dict.
Result = dict[str, Any]


class BenchError(Exception):
    """A run that could not be measured; its message goes into the table and JSON."""


@dataclass
class Settings:
    rounds: int
    duration: float
    warmup: float
    clients: int
    active: int
    build: Path
    server_cpu: int | None
    load_cpu: int | None
    load_argv: tuple[str, ...]
    retry_budget: int = 0  # runs that may still be repeated because they were disturbed


def eprint(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
