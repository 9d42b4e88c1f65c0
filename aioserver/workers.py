"""Several worker processes serving the same listening sockets, and the signals
that start and end a process's life.

The supervisor binds the sockets once, with `aioserver.sockets.bind_sockets` (so
a port in use fails at once, in one place, and port 0 gives every worker the
same real port), then forks the workers, which inherit them and each run their
own event loop and `Server`. The kernel hands each new connection to one worker
waiting in accept.

Signals, in every process, go through a `SignalInbox`: its handlers only record
the signal and write a byte to a pipe, and the process's main loop (the
supervisor's `select`, or a server's event loop) takes them from there and acts.
Nothing else runs in a signal handler, so a signal never acts in the middle of
a decision (a fork, a restart, the end of the loop): it is taken between two.

The supervisor is one state machine, run by `supervise`:

    running --SIGINT/SIGTERM--> stopping --SIGINT/SIGTERM/SIGQUIT--> quitting
       |                                                               ^
       +---------------------------SIGQUIT-----------------------------+

- running: start the workers still to start (one at a time, each after
  checking that no signal is waiting), restart a worker that dies.
- stopping: never fork again; the signal is forwarded to every worker, which
  stops gracefully.
- quitting: SIGQUIT to every worker, which closes its connections at once.
- It returns once no worker is left: 0 if every worker exited 0 after the stop
  began, 1 if any failed or was killed then.

Reloading is part of running. SIGHUP (once every worker has reported ready)
forks as many fresh workers, running `reload_worker` (which imports the handler
anew); once they all report ready, the old ones get SIGTERM and stop gracefully
while the sockets, held here throughout, stay open. A fresh worker that exits
before that abandons the reload (one error line; the old workers serve on). A
stop signal during a reload reaches every worker, old and fresh.

Each worker reports through a pipe once it accepts (its `ready` callback writes
its pid); once every worker running reports, the supervisor calls `on_ready`
(the readiness a service manager waits for), and `on_stopping` as a stop begins.

A worker is forked with the stop signals blocked; before it unblocks them it
closes the supervisor's inbox and installs its own, so a signal meant for the
supervisor never runs in a worker, and a stop signal a worker receives before
its event loop runs is kept, and taken as soon as the loop runs: the worker
stops without serving and exits 0.
A worker takes SIGINT and SIGTERM as "stop gracefully" and ignores repeats
(under systemd's default KillMode=control-group every worker gets SIGTERM twice,
from systemd and from the supervisor); SIGQUIT stops it at once.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, NoReturn

__all__ = [
    "QUICK_STOP_SIGNAL",
    "RELOAD_SIGNAL",
    "STOP_SIGNALS",
    "SUPERVISOR_SIGNALS",
    "SignalInbox",
    "WorkerMain",
    "WorkerStartError",
    "supervise",
]

logger = logging.getLogger("aioserver")

# A service manager stops with SIGTERM, a person with Ctrl-C (SIGINT): a
# graceful stop. SIGQUIT (Ctrl-\) stops at once; it is also what a supervisor
# sends its workers when it is told to stop a second time.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
QUICK_STOP_SIGNAL = signal.SIGQUIT
# What stops a server process (alone or as a worker).
SERVER_SIGNALS = (*STOP_SIGNALS, QUICK_STOP_SIGNAL)
# SIGHUP makes the supervisor reload (fresh workers, then the old ones stop);
# a server alone, or a worker, logs it and serves on (not SIGHUP's default
# action, which would end it).
RELOAD_SIGNAL = signal.SIGHUP
# What a server process's inbox takes: the stop signals and SIGHUP.
SERVER_INBOX_SIGNALS = (*SERVER_SIGNALS, RELOAD_SIGNAL)
# The supervisor handles SIGCHLD too: it wakes its loop to reap.
SUPERVISOR_SIGNALS = (*SERVER_SIGNALS, RELOAD_SIGNAL, signal.SIGCHLD)

# A worker that dies sooner than this after its start is restarted only after
# this long, so a worker that cannot start does not spin the supervisor.
RESTART_BACKOFF = 1.0
# linux/prctl.h
PR_SET_PDEATHSIG = 1

# A worker's report: its pid and the length of a message that follows, 0 for
# "ready" (it accepts), else why it cannot start (UTF-8, at most
# MAX_REPORT_MESSAGE bytes); written to the supervisor's pipe in one write
# (atomic, being under PIPE_BUF).
REPORT = struct.Struct("=IH")
MAX_REPORT_MESSAGE = 2048

# What a forked worker runs: serve the inherited sockets, taking stop signals
# from the inbox given, and calling the ready callback given once it accepts;
# its return value (an int, or None for 0) is its exit status.
WorkerMain = Callable[[list[socket.socket], "SignalInbox", Callable[[], None]], object]


class WorkerStartError(Exception):
    """Raised by a worker function, before it reports ready, for a reason said
    in one line (such as a handler module that does not import): the worker
    exits 1 and the supervisor logs the reason once, without a traceback."""


class SignalInbox:
    """Signals recorded by handlers that do nothing else; the main loop takes them.

    `install()` (main thread only) sets a handler for each of `signals` that
    appends the signal number to a queue and writes a byte to a non-blocking
    pipe, whose read end (`fileno()`) the main loop watches; the pipe is also
    the interpreter's wakeup fd, so a loop blocked in C wakes up even when the
    signal is delivered to another thread. `take()` empties both. `close()`
    puts back the handlers found at install, or ignores the signals from then
    on (`keep_ignoring`), and closes the pipe.
    """

    def __init__(self, signals: Iterable[int]) -> None:
        self.signals = tuple(signals)
        # Every signal recorded since install, taken or not.
        self.received: set[int] = set()
        self._queue: collections.deque[int] = collections.deque()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: dict[int, Any] = {}
        self._previous_wakeup_fd = -1
        self._installed = False

    def fileno(self) -> int:
        """The pipe's read end: readable once a signal is waiting."""
        return self._read_fd

    def install(self) -> None:
        """Handle `signals` from now on (main thread only)."""
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._record)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._installed = True

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._queue.append(signum)
        self.received.add(signum)
        with contextlib.suppress(OSError):  # full: it is readable anyway
            os.write(self._write_fd, b"\0")

    def take(self) -> list[int]:
        """The signals recorded since the last call, oldest first."""
        with contextlib.suppress(OSError):
            while os.read(self._read_fd, 512):
                pass
        taken: list[int] = []
        while self._queue:
            taken.append(self._queue.popleft())
        return taken

    def waiting(self) -> bool:
        """Whether a signal came since the last `take`: recorded, or caught
        by another thread and not yet handed to its Python handler in the main
        thread (the interpreter has written its byte to the pipe)."""
        if self._queue:
            return True
        readable, _, _ = select.select([self._read_fd], [], [], 0)
        return bool(readable)

    def stop_received(self) -> bool:
        """Whether a stop signal (SIGINT, SIGTERM or SIGQUIT) ever came."""
        return bool(self.received & set(SERVER_SIGNALS))

    def close(self, keep_ignoring: bool = False) -> None:
        """Put back the previous handlers (or SIG_IGN for every one of `signals`
        with `keep_ignoring`) and wakeup fd, then close the pipe. SIG_IGN, unlike
        a Python handler, lasts through the interpreter's finalization: a
        process on its way out after a stop cannot be killed by a repeat."""
        if self._installed:
            # Blocked meanwhile. Blocking runs the Python handler of a signal
            # already caught (CPython checks on return), so no caught signal is
            # left for the next handler to find; one that comes later waits for
            # the next handler (and is dropped if that is SIG_IGN).
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
            try:
                for signum, previous in self._previous.items():
                    if keep_ignoring:
                        signal.signal(signum, signal.SIG_IGN)
                    else:
                        signal.signal(signum, signal.SIG_DFL if previous is None else previous)
                signal.set_wakeup_fd(self._previous_wakeup_fd)
                self._installed = False
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._close_pipe()

    def _close_pipe(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._read_fd = self._write_fd = -1

    def replace_in_worker(self, signals: Iterable[int]) -> SignalInbox:
        """In a forked child, with the signals still blocked: drop this (the
        supervisor's) inbox without touching the supervisor's pipe contents,
        reset the signals it handled to their defaults, and install and return
        a new inbox for `signals`."""
        signal.set_wakeup_fd(-1)
        self._installed = False
        self._close_pipe()
        for signum in self.signals:
            signal.signal(signum, signal.SIG_DFL)
        inbox = SignalInbox(signals)
        inbox.install()
        return inbox


def supervise(
    workers: int,
    sockets: list[socket.socket],
    serve_worker: WorkerMain,
    *,
    signals: SignalInbox | None = None,
    on_ready: Callable[[], object] | None = None,
    on_stopping: Callable[[], object] | None = None,
    reload_worker: WorkerMain | None = None,
    on_reloading: Callable[[], object] | None = None,
    on_reloaded: Callable[[str | None], object] | None = None,
    on_worker_exit: Callable[[int], object] | None = None,
) -> int:
    """Run `workers` forked processes, each calling `serve_worker(sockets,
    inbox, ready)`, where `ready()` reports that the worker accepts.

    Stops them all on SIGINT or SIGTERM to the supervisor, even one that came
    before, during or after a worker was started or restarted (none is started
    after it); a second SIGINT or SIGTERM, or a SIGQUIT, makes them stop at once.
    A worker that dies while serving is replaced. The sockets are closed in
    this process on return.

    `signals`, if given, is an installed inbox for SUPERVISOR_SIGNALS (so that
    the caller can have them handled from before it announces the server);
    otherwise one is installed here and closed on return.

    `on_ready()` is called (in the supervisor) once, when all `workers` workers
    have reported ready at the same time; `on_stopping()` once, as a stop begins.
    Neither should raise or block. `on_worker_exit(pid)` is called for each
    worker reaped (as the metrics mark it dead); it should not block either.

    SIGHUP reloads (once every worker has reported ready; one that comes
    during a reload starts another after it): `on_reloading()`, then
    `workers` fresh workers are forked, running `reload_worker` (default
    `serve_worker`), which every worker started later runs too; once they all
    report ready, the old ones get SIGTERM and stop gracefully, and
    `on_reloaded(None)` is called. A fresh worker that exits first (one that
    raises WorkerStartError says why) abandons the reload: the other fresh
    workers get SIGTERM, the old ones serve on, one error line is logged and
    `on_reloaded(reason)` is called. A stop signal during a reload stops every
    worker, old and fresh.

    Returns the exit status: 0 if every worker exited 0 after the stop began,
    1 if any of them failed or was killed then.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    own = signals is None
    inbox = SignalInbox(SUPERVISOR_SIGNALS) if signals is None else signals
    if own:
        inbox.install()
    try:
        supervisor = _Supervisor(workers, sockets, serve_worker, inbox)
        supervisor.on_ready, supervisor.on_stopping = on_ready, on_stopping
        supervisor.reload_worker = reload_worker or serve_worker
        supervisor.on_reloading, supervisor.on_reloaded = on_reloading, on_reloaded
        supervisor.on_worker_exit = on_worker_exit
        return supervisor.run()
    finally:
        if own:
            inbox.close()


class _Supervisor:
    RUNNING, STOPPING, QUITTING = "running", "stopping", "quitting"

    def __init__(
        self,
        workers: int,
        sockets: list[socket.socket],
        serve_worker: WorkerMain,
        inbox: SignalInbox,
    ) -> None:
        self.sockets = sockets
        self.serve_worker = serve_worker
        self.inbox = inbox
        self.state = self.RUNNING
        self.pid = os.getpid()
        self.children: dict[int, float] = {}  # pid -> start time
        # When each worker still to start is due (monotonic), soonest first.
        self.due: list[float] = [time.monotonic()] * workers
        self.failed = False
        # What a worker started now runs: serve_worker, reload_worker after a reload.
        self.main: WorkerMain = serve_worker
        self.reload_worker: WorkerMain = serve_worker
        self.on_reloading: Callable[[], object] | None = None
        self.on_reloaded: Callable[[str | None], object] | None = None
        # A reload asked for (SIGHUP) and not begun; one under way: its fresh
        # workers started, and how many are still to start.
        self.reload_asked = False
        self.reloading = False
        self.fresh: set[int] = set()
        self.fresh_due = 0
        # Workers told to stop by a reload: the old ones once it succeeded
        # (retired), the fresh ones of a reload abandoned. Neither is replaced.
        self.retired: set[int] = set()
        self.abandoned: set[int] = set()
        # Why a worker could not start, as it reported (WorkerStartError).
        self.start_errors: dict[int, str] = {}
        self.prctl = _load_prctl()
        self.workers = workers
        self.on_ready: Callable[[], object] | None = None
        self.on_stopping: Callable[[], object] | None = None
        self.on_worker_exit: Callable[[int], object] | None = None
        # Workers running that have reported ready, and the report pipe.
        self.ready: set[int] = set()
        self.announced = False
        self._reports = b""
        self._ready_read, self._ready_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> int:
        try:
            while True:
                # Take, then reap: a SIGCHLD taken here is reaped here, not
                # waited for again. And reap before acting on a stop signal: a
                # worker that died before it was taken died while serving.
                signums = self.inbox.take()
                self._reap()
                for signum in signums:
                    self._on_signal(signum)
                self._take_ready()
                if self.state != self.RUNNING:
                    if not self.children:
                        break
                    self._wait(None)
                    continue
                self._start_due()
                self._advance_reload()
                # A signal that stopped _start_due left a byte in the pipe: no wait.
                self._wait(max(self.due[0] - time.monotonic(), 0.0) if self.due else None)
        finally:
            for sock in self.sockets:
                sock.close()
            for fd in (self._ready_read, self._ready_write):
                os.close(fd)
        logger.info("Stopped")
        return 1 if self.failed else 0

    def _wait(self, timeout: float | None) -> None:
        """Until a signal is waiting (SIGCHLD included), a worker reports ready,
        or `timeout` passes."""
        select.select([self.inbox.fileno(), self._ready_read], [], [], timeout)

    def _read_reports(self) -> None:
        """Read the workers' reports: ready, or why one cannot start. A report
        from a worker reaped already is ignored (it died after it)."""
        with contextlib.suppress(OSError):
            while chunk := os.read(self._ready_read, 4096):
                self._reports += chunk
        size = REPORT.size
        while len(self._reports) >= size:
            pid, length = REPORT.unpack(self._reports[:size])
            if len(self._reports) < size + length:
                return  # the rest of a report (never split: one write) comes
            message = self._reports[size : size + length].decode(errors="replace")
            self._reports = self._reports[size + length :]
            if pid not in self.children:
                continue
            if length:
                self.start_errors[pid] = message
            else:
                self.ready.add(pid)

    def _take_ready(self) -> None:
        """Read the workers' reports; call on_ready once all are ready."""
        self._read_reports()
        if not self.announced and self.state == self.RUNNING and len(self.ready) >= self.workers:
            self.announced = True
            if self.on_ready is not None:
                self.on_ready()

    def _report_ready(self, why_not: str = "") -> None:
        """In a worker: tell the supervisor this worker accepts (or why it cannot start)."""
        message = why_not.encode(errors="replace")[:MAX_REPORT_MESSAGE]
        with contextlib.suppress(OSError):
            os.write(self._ready_write, REPORT.pack(os.getpid(), len(message)) + message)

    def _advance_reload(self) -> None:
        """Begin a reload asked for, start its fresh workers, end it once they
        all accept (the old ones then stop gracefully)."""
        if self.reload_asked and self.announced and not self.reloading:
            self.reload_asked = False
            self.reloading = True
            self.fresh_due = self.workers
            logger.info("Reloading: starting %d new workers", self.workers)
            if self.on_reloading is not None:
                self.on_reloading()
        if not self.reloading:
            return
        while self.fresh_due and self.state == self.RUNNING:
            pid = self._fork(self.reload_worker)
            if pid is None:
                return  # a signal came: the loop takes it first
            self.fresh.add(pid)
            self.fresh_due -= 1
        if self.fresh_due or not self.fresh <= self.ready:
            return
        old = set(self.children) - self.fresh - self.retired - self.abandoned
        self.retired |= old
        self.reloading = False
        self.fresh.clear()
        self.main = self.reload_worker
        self.due.clear()  # the fresh workers replace any still to restart
        logger.info(
            "Reloaded: %d new workers accept; stopping the old ones (%s)",
            self.workers,
            ", ".join(str(pid) for pid in sorted(old)) or "none left",
        )
        for pid in old:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self.on_reloaded is not None:
            self.on_reloaded(None)

    def _abandon_reload(self, reason: str) -> None:
        """A fresh worker exited before the reload ended: stop the other fresh
        ones, keep the old ones serving."""
        logger.error("Reload failed: %s; the old workers serve on", reason)
        for pid in self.fresh:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.abandoned |= self.fresh
        self.fresh.clear()
        self.fresh_due = 0
        self.reloading = False
        if self.on_reloaded is not None:
            self.on_reloaded(reason)

    def _on_signal(self, signum: int) -> None:
        if signum == RELOAD_SIGNAL:
            if self.state != self.RUNNING:
                logger.info("SIGHUP received while stopping: ignored")
            elif self.reloading:
                logger.info("SIGHUP received during a reload: another one follows it")
                self.reload_asked = True
            else:
                self.reload_asked = True
            return
        if signum not in SERVER_SIGNALS:
            return  # SIGCHLD: the next _reap does it
        name = signal.Signals(signum).name
        if signum == QUICK_STOP_SIGNAL or self.state == self.STOPPING:
            if self.state == self.QUITTING:
                return
            again = " again" if signum != QUICK_STOP_SIGNAL else ""
            logger.warning("%s received%s: stopping the workers at once", name, again)
            self._stopping()
            self.state = self.QUITTING
            self._signal_all(QUICK_STOP_SIGNAL)
        elif self.state == self.RUNNING:
            logger.info(
                "%s received: stopping the workers (send it again to stop them at once)", name
            )
            self._stopping()
            self.state = self.STOPPING
            self._signal_all(signum)

    def _stopping(self) -> None:
        if self.state == self.RUNNING and self.on_stopping is not None:
            self.on_stopping()

    def _signal_all(self, signum: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self._read_reports()  # why it could not start, if it said: before the pop
            started = self.children.pop(pid, None)
            self.ready.discard(pid)
            if started is None:
                continue
            if self.on_worker_exit is not None:
                self.on_worker_exit(pid)
            start_error = self.start_errors.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            why = _describe_exit(code)
            if self.state != self.RUNNING:
                if code != 0:
                    self.failed = True
                    logger.warning("Worker %d exited (%s) while stopping", pid, why)
                continue
            if pid in self.abandoned:
                self.abandoned.discard(pid)
                continue
            if pid in self.retired:
                self.retired.discard(pid)
                if code != 0:
                    logger.warning("Worker %d exited (%s) while stopping after a reload", pid, why)
                continue
            if pid in self.fresh:
                self.fresh.discard(pid)
                self._abandon_reload(
                    start_error or f"worker {pid} exited ({why}) before it accepted"
                )
                continue
            now = time.monotonic()
            if start_error is not None:
                logger.warning("Worker %d cannot start: %s; starting another", pid, start_error)
            else:
                logger.warning("Worker %d exited (%s); starting another", pid, why)
            self.due.append(now + RESTART_BACKOFF if now - started < RESTART_BACKOFF else now)
            self.due.sort()

    def _start_due(self) -> None:
        while self.due and self.due[0] <= time.monotonic() and self.state == self.RUNNING:
            if self._fork(self.main) is None:
                return  # a signal came: the loop takes it first
            self.due.pop(0)

    def _fork(self, main: WorkerMain) -> int | None:
        """Start one worker, unless a signal is waiting. Signals stay blocked
        across the fork: blocking them runs the Python handler of any signal
        that came before (CPython checks for them on return), so `waiting()`
        sees it, and one that comes after waits in the kernel: in the
        supervisor until the mask is back, in the worker until its own inbox
        is installed. (The mask is this thread's: a signal that another thread,
        such as a log writer, catches during the fork is taken right after it,
        and the new worker is stopped with the others.)"""
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.inbox.signals)
        try:
            if self.inbox.waiting():
                return None
            pid = os.fork()
            if pid == 0:
                self._worker(mask, main)
            self.children[pid] = time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        logger.info("Started worker %d", pid)
        return pid

    def _worker(self, mask: Iterable[int], main: WorkerMain) -> NoReturn:
        code = 1
        try:
            inbox = self.inbox.replace_in_worker(SERVER_INBOX_SIGNALS)
            _become_worker(self.pid, self.prctl)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(self._ready_read)
            result = main(self.sockets, inbox, self._report_ready)
            code = result if isinstance(result, int) else 0
        except WorkerStartError as error:
            self._report_ready(str(error) or "it could not start")
        except BaseException:
            logger.exception("Worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once in the supervisor rather than in every worker."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


def _become_worker(supervisor: int, prctl: Callable[..., int] | None) -> None:
    # A Ctrl-C in a terminal signals the whole process group: keep the workers
    # out of it, so that a Ctrl-C reaches them through the supervisor only.
    os.setpgid(0, 0)
    # Should the supervisor die (even by SIGKILL), Linux sends this worker
    # SIGTERM, and it stops as usual instead of serving on as an orphan.
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before prctl took effect
        os._exit(0)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
