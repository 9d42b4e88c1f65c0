"""The children of the bench: servers and the load generator, started, watched and
always stopped, even when the bench itself is killed."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import select
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .common import HOST, ROOT, BenchError, Result, Settings
from .servers import Server

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
READY_LINE = re.compile(rb"Listening on (\S+):(\d+)\r?\n")
READY_TIMEOUT_S = 30.0  # a server that has not printed its port by then has failed
STOP_TIMEOUT_S = 5.0  # a server still running this long after its stop signal is killed

_children: set[subprocess.Popen[bytes]] = set()
_libc = ctypes.CDLL(None, use_errno=True)


def _in_child() -> None:
    # Between fork and exec: die with the harness even if it is killed with SIGKILL,
    # and start with SIGINT handled by default even if our own shell ignored it.
    _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    _libc.signal(int(signal.SIGINT), 0)  # SIG_DFL


def spawn(argv: list[str], cpu: int | None, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Starts a child pinned to one CPU and tracked, so that kill_children ends it."""
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]  # taskset execs: the pid stays the same
    proc = subprocess.Popen(argv, cwd=ROOT, preexec_fn=_in_child, start_new_session=True, **kwargs)
    _children.add(proc)
    return proc


def reap(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL, timeout: float = STOP_TIMEOUT_S
) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe:
            with contextlib.suppress(OSError):
                pipe.close()
    _children.discard(proc)


def kill_children() -> None:
    for proc in list(_children):
        reap(proc, signal.SIGKILL)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Waits for a child to exit, precisely (a pidfd) rather than by polling."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if ready:
        proc.wait()
    return bool(ready)


def read_line(stream: IO[bytes], proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line from a child's stdout, or BenchError if it exits or is silent too long."""
    fd = stream.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"no output line within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                proc.wait(1)
                raise BenchError(f"exited with code {proc.returncode} before its ready line")
            buf += chunk
    return buf


def vm_rss(pid: int) -> int:
    """Resident set size in bytes, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


@dataclass
class Running:
    server: Server
    proc: subprocess.Popen[bytes]
    port: int
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, limit: int = 600) -> str:
        self.log.seek(0)
        text = self.log.read().decode(errors="replace").strip()
        return text[-limit:]


@contextlib.contextmanager
def running_server(
    build: Path,
    server: Server,
    cpu: int | None,
    *,
    prefix: tuple[str, ...] = (),
    ready_timeout: float = READY_TIMEOUT_S,
    stop_timeout: float = STOP_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> Iterator[Running]:
    """The one place servers start and stop: start, wait for the port, stop, reap.

    `prefix` runs the server under another program (valgrind); the server gets its
    stop signal at the end and `stop_timeout` seconds to exit before SIGKILL.
    """
    argv = [*prefix, *(arg.replace("{build}", str(build)) for arg in server.argv)]
    with tempfile.TemporaryFile() as log:
        if server.workers > 1:
            cpu = None
        proc = spawn(argv, cpu, stdout=subprocess.PIPE, stderr=log, env=env)
        try:
            assert proc.stdout is not None
            try:
                seen = b""  # a banner may come first: read lines until the ready one
                while not (match := READY_LINE.search(seen)):
                    seen += read_line(proc.stdout, proc, ready_timeout)
            except BenchError as exc:
                log.seek(0)
                raise BenchError(f"{exc}: {log.read().decode(errors='replace')[-600:]}") from None
            if match.group(1).decode() != HOST:
                raise BenchError(f"listens on {match.group(1).decode()}, not {HOST}")
            # Keep reading its stdout so that a chatty server never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            yield Running(server, proc, int(match.group(2)), log)
        finally:
            reap(proc, server.stop_signal, stop_timeout)


def load(settings: Settings, mode: str, running: Running, **options: float | int) -> Result:
    """Runs the load generator once against a running server; returns its JSON."""
    argv = [*settings.load_argv, mode, "--host", HOST, "--port", str(running.port)]
    argv += ["--proto", running.server.protocol, "--server-pid", str(running.pid)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    timeout = settings.warmup + settings.duration + settings.clients / 500 + 30
    proc = spawn(argv, settings.load_cpu, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"load generator still running after {timeout:.0f} s") from None
    finally:
        reap(proc)
    result = parse_load_output(out, err, running)
    result["other_cpu"] = other_cpu(settings, result)
    return result


def other_cpu(settings: Settings, result: Result) -> float | None:
    """The most CPU time, as a share of the window, that something other than the server
    and the load generator took on either of their two CPUs (known only when pinned)."""
    busy = result.get("cpu_busy") or []
    if settings.server_cpu is None or settings.load_cpu is None or len(busy) < 2:
        return None
    mine = {settings.server_cpu: result["server_cpu"], settings.load_cpu: result["loadgen_cpu"]}
    return float(max(busy[cpu] - used for cpu, used in mine.items() if cpu < len(busy)))


def parse_load_output(out: bytes, err: bytes, running: Running) -> Result:
    lines = out.decode().strip().splitlines()
    if not lines:
        raise BenchError(f"load generator printed nothing: {err.decode()[-300:]}")
    result: Result = json.loads(lines[-1])
    if "error" in result:
        tail = running.log_tail(300)
        raise BenchError(result["error"] + (f"; server log: {tail}" if tail else ""))
    result["address"] = f"{HOST}:{running.port}"
    return result


@contextlib.contextmanager
def holding(settings: Settings, running: Running, clients: int) -> Iterator[Result]:
    """Keeps `clients` connections open (each served once) for the body of the with."""
    argv = [*settings.load_argv, "hold", "--host", HOST, "--port", str(running.port)]
    argv += ["--proto", running.server.protocol, "--conns", str(clients)]
    argv += ["--duration", str(600)]  # the load generator's own bound on holding
    proc = spawn(
        argv,
        settings.load_cpu,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        try:
            ready: Result = json.loads(read_line(proc.stdout, proc, clients / 200 + 30))
        except BenchError:
            out, err = proc.communicate(timeout=5)
            parse_load_output(out, err, running)  # raises with the load generator's error
            raise
        if "error" in ready:
            raise BenchError(ready["error"])
        yield ready
        out, _ = proc.communicate(timeout=30)  # closes its stdin: it lets go and exits
        ready.update(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        reap(proc)
