"""The load generator of scripts/bench in Python, used only when bench_load.c cannot be
compiled (no C compiler). Same modes, options and JSON lines as the C program.

It is far slower than the C one, so with it the bench measures mostly this program:
the bench says so in its notes. It exists so the bench and its smoke test still run.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time
from typing import Any

THANKS_PREFIX = b"Thank you for your message "
PING = b"ping\n"
RECV_SIZE = 256 * 1024


class LoadError(Exception):
    pass


class Conn:
    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.state = "free"  # connecting, ping, idle, active
        self.out = b""
        self.sent = 0
        self.exp = b""
        self.got = 0
        self.t0 = 0.0
        self.events = 0


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sel = selectors.DefaultSelector()
        self.addr = (args.host, args.port)
        prefix = THANKS_PREFIX if args.proto == "thanks" else b""
        line = bytes(ord("a") + (i * 7 + i // 26) % 26 for i in range(args.size - 1)) + b"\n"
        self.req, self.rep = line, prefix + line
        self.ping_rep = prefix + PING
        self.latencies: list[float] = []
        self.requests = 0
        self.reply_bytes = 0
        self.measuring = False

    def open(self, conn: Conn) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            raise LoadError(f"connect: {os.strerror(err)}")
        conn.sock, conn.state, conn.t0 = sock, "connecting", time.monotonic()
        conn.events = selectors.EVENT_WRITE
        self.sel.register(sock, conn.events, conn)

    def close(self, conn: Conn) -> None:
        assert conn.sock is not None
        self.sel.unregister(conn.sock)
        conn.sock.close()
        conn.sock, conn.state = None, "free"

    def interest(self, conn: Conn, events: int) -> None:
        if events != conn.events:
            assert conn.sock is not None
            self.sel.modify(conn.sock, events, conn)
            conn.events = events

    def send(self, conn: Conn) -> None:
        assert conn.sock is not None
        while conn.sent < len(conn.out):
            try:
                conn.sent += conn.sock.send(conn.out[conn.sent :])
            except BlockingIOError:
                break
        partial = conn.sent < len(conn.out)
        self.interest(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if partial else 0))

    def begin(self, conn: Conn, state: str, out: bytes, exp: bytes) -> None:
        conn.state, conn.out, conn.sent, conn.exp, conn.got = state, out, 0, exp, 0
        self.send(conn)

    def readable(self, conn: Conn) -> bool:
        """Reads what is there; True when the expected reply is complete."""
        assert conn.sock is not None
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return False
        if not data:
            raise LoadError(f"server closed a connection ({conn.got} of {len(conn.exp)} read)")
        if data != conn.exp[conn.got : conn.got + len(data)]:
            raise LoadError(f"reply differs from the expected bytes at offset {conn.got}")
        conn.got += len(data)
        return conn.got == len(conn.exp)

    def connected(self, conn: Conn) -> None:
        assert conn.sock is not None
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise LoadError(f"connect: {os.strerror(err)}")

    def establish(self, conns: list[Conn], limit: float) -> None:
        opened = done = pending = 0
        deadline = time.monotonic() + limit
        while done < len(conns):
            while opened < len(conns) and pending < self.args.max_pending:
                self.open(conns[opened])
                opened, pending = opened + 1, pending + 1
            for key, events in self.sel.select(0.1):
                conn: Conn = key.data
                if conn.state == "connecting":
                    self.connected(conn)
                    self.begin(conn, "ping", PING, self.ping_rep)
                elif conn.state == "ping":
                    if events & selectors.EVENT_WRITE:
                        self.send(conn)
                    if events & selectors.EVENT_READ and self.readable(conn):
                        conn.state = "idle"
                        self.interest(conn, selectors.EVENT_READ)
                        pending, done = pending - 1, done + 1
                elif conn.state == "idle":
                    raise LoadError("data or EOF on an idle connection")
            if time.monotonic() > deadline:
                raise LoadError(f"only {done} of {len(conns)} connections opened")

    def run_load(self, conns: list[Conn], connect_s: float) -> dict[str, Any]:
        a = self.args
        active = conns[a.idle :] if a.mode == "rr" else conns
        warm_end = time.monotonic() + a.warmup
        end = warm_end + a.duration
        for conn in active:
            if a.mode == "rr":
                conn.t0 = time.monotonic()
                self.begin(conn, "active", self.req, self.rep)
            else:
                self.open(conn)
        cpu0 = wait0 = srv0 = 0.0
        stat0: list[tuple[int, int]] = []
        while True:
            now = time.monotonic()
            if not self.measuring and now >= warm_end:
                self.measuring = True
                cpu0, wait0, srv0 = self_cpu(), self_wait(), proc_cpu(a.server_pid)
                stat0 = cpu_stat()
            if now >= end:
                break
            for key, events in self.sel.select(max(min(end, warm_end) - now, 0.001)):
                conn = key.data
                if conn.state == "idle":
                    raise LoadError("event on an idle connection")
                if conn.state == "connecting":
                    self.connected(conn)
                    self.begin(conn, "active", self.req, self.rep)  # t0 stays at connect
                    continue
                if events & selectors.EVENT_WRITE and conn.sent < len(conn.out):
                    self.send(conn)
                if not (events & selectors.EVENT_READ and self.readable(conn)):
                    continue
                done = time.monotonic()
                if self.measuring:
                    self.latencies.append(done - conn.t0)
                    self.requests += 1
                    self.reply_bytes += len(conn.exp)
                if a.mode == "rr":
                    conn.t0 = done
                    self.begin(conn, "active", self.req, self.rep)
                else:
                    self.close(conn)
                    self.open(conn)
        window = time.monotonic() - warm_end
        cpu1, wait1, srv1 = self_cpu(), self_wait(), proc_cpu(a.server_pid)
        stat1 = cpu_stat()
        self.drain(active)
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return lat[min(int(p * len(lat)), len(lat) - 1)] * 1e6 if lat else 0.0

        return {
            "mode": a.mode,
            "connections": a.conns,
            "idle": a.idle,
            "size": a.size,
            "requests": self.requests,
            "duration_s": window,
            "rps": self.requests / window,
            "reply_bytes": self.reply_bytes,
            "mbps": self.reply_bytes / window / 1e6,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "max_us": lat[-1] * 1e6 if lat else 0.0,
            "connect_s": connect_s,
            "loadgen_cpu": (cpu1 - cpu0) / window,
            "server_cpu": (srv1 - srv0) / window if srv0 >= 0 and srv1 >= 0 else -1.0,
            "loadgen_wait": (wait1 - wait0) / window,
            "cpu_busy": [
                (b1 - b0) / max(t1 - t0, 1)
                for (b0, t0), (b1, t1) in zip(stat0, stat1, strict=False)
            ],
        }

    def drain(self, conns: list[Conn], limit: float = 2.0) -> None:
        """Lets the requests in flight finish, so that closing sends FIN, not a reset."""
        busy = {id(c) for c in conns if c.state in ("active", "connecting")}
        deadline = time.monotonic() + limit
        while busy and time.monotonic() < deadline:
            for key, events in self.sel.select(0.05):
                conn = key.data
                if conn.state == "connecting":
                    self.close(conn)
                elif conn.state == "active":
                    if events & selectors.EVENT_WRITE and conn.sent < len(conn.out):
                        self.send(conn)
                    if not (events & selectors.EVENT_READ and self.readable(conn)):
                        continue
                    conn.state = "idle"
                    self.interest(conn, selectors.EVENT_READ)
                else:
                    continue
                busy.discard(id(conn))

    def run_hold(self, conns: list[Conn], connect_s: float) -> dict[str, Any]:
        ready = {"mode": "hold", "ready": True, "connections": len(conns), "connect_s": connect_s}
        print(json.dumps(ready), flush=True)
        stdin = sys.stdin.fileno()
        self.sel.register(stdin, selectors.EVENT_READ, None)
        closed = 0
        deadline = time.monotonic() + self.args.duration
        while time.monotonic() < deadline:
            for key, _ in self.sel.select(0.1):
                if key.data is None:
                    if not os.read(stdin, 64):
                        return {"mode": "hold", "closed_by_server": closed}
                    continue
                conn = key.data
                assert conn.sock is not None
                try:
                    if conn.sock.recv(64):
                        raise LoadError("data on an idle connection")
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.close(conn)  # EOF or reset: the server closed it, as when stopping
                closed += 1
        raise LoadError("hold: nobody closed stdin in time")


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def self_wait() -> float:
    try:
        with open("/proc/self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_stat() -> list[tuple[int, int]]:
    """(busy, total) jiffies of each CPU; busy is all but idle and iowait."""
    stats = []
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                v = [int(x) for x in values[:8]]
                stats.append((sum(v) - v[3] - v[4], sum(v)))
    return stats


def proc_cpu(pid: int) -> float:
    if not pid:
        return -1.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return -1.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["rr", "connect", "hold"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--proto", choices=["echo", "thanks"], default="echo")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--idle", type=int, default=0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--server-pid", type=int, default=0)
    p.add_argument("--max-pending", type=int, default=64)
    p.add_argument("--timeout", type=float, default=0.0)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    try:
        if not ipaddress.ip_address(args.host).is_loopback:
            raise LoadError("refusing a host outside 127.0.0.0/8")
        limit = args.timeout or args.warmup + args.duration + 120
        signal.alarm(int(limit) + 1)  # a bound on the whole run, as in the C program
        total = args.conns + (args.idle if args.mode == "rr" else 0)
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if total + 16 > hard:
            raise LoadError(f"{total} connections need more file descriptors than {hard}")
        load = Load(args)
        conns = [Conn() for _ in range(total)]
        start = time.monotonic()
        if args.mode != "connect":
            load.establish(conns, limit)
        connect_s = time.monotonic() - start
        if args.mode == "hold":
            result = load.run_hold(conns, connect_s)
        else:
            result = load.run_load(conns, connect_s)
    except (LoadError, OSError) as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
