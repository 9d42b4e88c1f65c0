"""Logging off the event loop: no log call waits on the sink.

`setup_logging` gives the process the logging cookbook's design, a queue in
front of every handler and one writer thread behind it, with these differences:

- The queue is a `queue.SimpleQueue` (a put is one C call, with no Python lock
  or condition) bounded by QUEUE_SIZE: when the sink is slower than the
  records, new records are dropped and counted, and once the writer catches up
  it logs one line, "N log lines dropped: the log sink was too slow".
- Records are formatted by the writer thread, not by the caller: a message's
  `%` arguments are formatted when the line is written, so they should not be
  objects the caller changes afterwards (aioserver passes strings and numbers).
- The writer takes what has queued up in one batch, writes the default stderr
  sink's lines with one write() per batch, then sleeps LINGER so that the next
  records come in one batch too rather than each waking it.
- Each logger that has handlers keeps its place in the hierarchy: its handlers
  are moved behind the queue (one `_Deferred` handler stands in for them), so a
  dictConfig file (`--log-config`) routes records as it says; only the
  handlers' own work (formatting, writing) moves to the writer thread.
- `LogSite`, for a line logged very often (the access log), skips the
  LogRecord where it can: the caller queues (site, time, arguments), and the
  writer makes the text line from them with the format compiled once for the
  site; a record is made only for a handler that needs one.

A forked child (a worker of --workers) gets a new queue and starts its own
writer thread at its first record (os.register_at_fork); no lock of this
module's is left held in it, and a fork waits (at most FORK_WAIT) for the
writer to be out of any handler. The writer thread is a daemon: `stop_logging`,
at the end of the command and at exit, waits at most STOP_TIMEOUT for what is
queued to be written, so a sink that never takes its lines cannot hold the exit.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import logging.config
import os
import queue
import re
import select
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "DROPPED_MESSAGE",
    "LOG_FORMATS",
    "QUEUE_SIZE",
    "STOP_TIMEOUT",
    "TEXT_FORMAT",
    "WORKER_TEXT_FORMAT",
    "JsonFormatter",
    "LogConfigError",
    "LogSite",
    "TextFormatter",
    "flush_logging",
    "setup_logging",
    "stop_logging",
]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# With --workers, every line says which process wrote it.
WORKER_TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")
DROPPED_MESSAGE = "%d log lines dropped: the log sink was too slow"

# Records waiting for the writer at most: room for 100 ms of access lines at
# 20,000 connections a second, and a stalled sink makes the process hold about
# 1 MiB of them at most (a record is about 0.5 KiB, an access line's 0.3 KiB).
QUEUE_SIZE = 2048
# Records the writer takes from the queue per batch: one write() for all of them.
BATCH_SIZE = 256
# After a batch smaller than BATCH_SIZE the writer sleeps this long, so that
# the next records come in one batch: a wake-up per record cost the process more
# than the record itself. Far under the time QUEUE_SIZE records take to come
# (about 100 ms at 20,000 connections a second).
LINGER = 0.01
# At a stop, how long what is queued may take to be written: a sink slower than
# this is stuck, and the process exits without the rest rather than hang.
STOP_TIMEOUT = 2.0
# How long a fork waits for the writer to finish handing records to handlers,
# so that the child does not inherit a lock a handler held (a stream's).
FORK_WAIT = 0.5

# The attributes every LogRecord has: the others came with extra=.
_STANDARD_ATTRIBUTES = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", (), None).__dict__,
        "asctime",
        "message",
        "taskName",
    }
)
# The attributes of a record that change from one record of a site to the next.
_VARYING = frozenset({"created", "msecs", "relativeCreated", "args", "message", "asctime"})
# One %(name)spec field of a %-style format.
_FIELD = re.compile(r"%\((\w+)\)([#0+ -]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa])")
# The milliseconds of a time stamp, as logging writes them ("%03d").
_MILLISECONDS = tuple(f"{ms:03d}" for ms in range(1000))


class LogConfigError(Exception):
    """Why a --log-config file cannot be used, in one line."""


# Formatters.


class TextFormatter(logging.Formatter):
    """logging.Formatter with the date and time made once per second, not per
    line, and lines of a LogSite made without a record (see `format_site`)."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)
        # The last second formatted, and its date and time with the comma.
        self._second: tuple[int, str] = (-1, "")
        self._uses_time = self.usesTime()
        # Per LogSite: the line around its time stamp and message, the site's
        # constant fields filled in, or None where the format needs a record.
        self._compiled: dict[LogSite, tuple[str, str, str] | None] = {}

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._asctime(record.created)

    def _asctime(self, created: float) -> str:
        second = int(created)
        cached = self._second
        if cached[0] != second:
            cached = self._new_second(second)
        # Milliseconds as LogRecord's msecs: truncated.
        return cached[1] + _MILLISECONDS[int((created - second) * 1000)]

    def _new_second(self, second: int) -> tuple[int, str]:
        stamp = time.strftime(self.default_time_format, self.converter(second))
        cached = self._second = (second, stamp + ",")
        return cached

    def format(self, record: logging.LogRecord) -> str:
        # Formatter.format's steps, less its layers of calls, for most records.
        if record.exc_info or record.exc_text or record.stack_info or self.datefmt:
            return super().format(record)
        record.message = record.getMessage()
        if self._uses_time:
            record.asctime = self._asctime(record.created)
        return self._fmt % record.__dict__  # type: ignore[operator]

    def format_site(self, site: LogSite, created: float, args: tuple[Any, ...]) -> str | None:
        """The line `format` would make of site.record(created, args), or None
        when this format needs the record (fields that vary besides asctime
        and message)."""
        try:
            compiled = self._compiled[site]
        except KeyError:
            compiled = self._compiled[site] = self._compile(site)
        if compiled is None:
            return None
        before, between, after = compiled
        message = site.msg % args if args else site.msg
        if not self._uses_time:
            return f"{before}{message}{after}"
        second = int(created)
        cached = self._second
        if cached[0] != second:
            cached = self._new_second(second)
        milliseconds = _MILLISECONDS[int((created - second) * 1000)]
        return f"{before}{cached[1]}{milliseconds}{between}{message}{after}"

    def _compile(self, site: LogSite) -> tuple[str, str, str] | None:
        """(before, between, after): the line is before + asctime + between +
        message + after (or before + message + after without asctime), for a
        %-style format with the message once and asctime at most once before
        it, whose other fields are all constant for the site."""
        fmt = self._fmt
        if fmt is None or "%%" in fmt or self.datefmt is not None:
            return None
        if not isinstance(self._style, logging.PercentStyle):
            return None
        constants = site.constants
        pieces: list[str] = []  # literal text, with "\0" where asctime and message go
        start = 0
        try:
            for match in _FIELD.finditer(fmt):
                pieces.append(fmt[start : match.start()])
                start = match.end()
                name, spec = match.group(1), match.group(2)
                if name in ("asctime", "message"):
                    if spec != "s":
                        return None
                    pieces.append(f"\0{name}\0")
                elif name in constants:
                    pieces.append(str(("%" + spec) % (constants[name],)))
                else:
                    return None
        except (TypeError, ValueError):
            return None
        pieces.append(fmt[start:])
        if "%" in _FIELD.sub("", fmt):
            return None  # a field this does not know
        text = "".join(pieces)
        head, found, after = text.partition("\0message\0")
        if not found or "\0message\0" in after or "\0asctime\0" in after:
            return None
        if self._uses_time:
            before, found, between = head.partition("\0asctime\0")
            if not found or "\0asctime\0" in between:
                return None
            return before, between, after
        return head, "", after


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, local, milliseconds), level,
    logger, message, pid, then every field passed with extra= (for an access
    line: peer, duration, bytes_in, bytes_out, reason), and exc_info or
    stack_info as text when the record has them."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str, str] = (-1, "", "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            local = time.localtime(second)
            offset = time.strftime("%z", local)
            cached = self._second = (
                second,
                time.strftime("%Y-%m-%dT%H:%M:%S", local),
                f"{offset[:3]}:{offset[3:]}" if len(offset) == 5 else offset,
            )
        return "%s.%03d%s" % (cached[1], record.msecs, cached[2])  # noqa: UP031

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD_ATTRIBUTES:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


# The sink of the default set-up, and the handler that stands in for handlers.


class _StreamSink(logging.Handler):
    """Writes formatted lines to a stream (stderr), one write() per batch.

    Only the writer thread calls it. With a real file descriptor it writes with
    os.write, holding no Python lock while the sink blocks; otherwise through
    the stream object.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self.fd: int | None
        try:
            stream.flush()
            self.fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None
        self.pending: list[str] = []

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: only the writer thread gets here.
        if self.filters and not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pending.append(self.format(record))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        # logging.shutdown calls this from the main thread: the writer thread
        # writes, and stop_logging waits for it.
        pass

    def write_pending(self) -> None:
        if not self.pending:
            return
        text = "\n".join(self.pending) + "\n"
        self.pending.clear()
        try:
            if self.fd is None:
                self.stream.write(text)
                self.stream.flush()
                return
            view = memoryview(text.encode(self.encoding, "backslashreplace"))
            while view:
                try:
                    view = view[os.write(self.fd, view) :]
                except BlockingIOError:  # a non-blocking stderr: wait as a blocking one would
                    select.select([], [self.fd], [])
        except (OSError, ValueError):
            pass  # stderr is closed or gone: the lines have nowhere to go


class _Deferred(logging.Handler):
    """Stands in, on one logger, for that logger's handlers (`targets`): hands
    each record to the writer thread, which calls them."""

    def __init__(self, writer: _Writer, targets: Sequence[logging.Handler]) -> None:
        super().__init__()
        self.writer = writer
        self.targets = tuple(targets)

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: the queue is thread-safe, and a lock per record costs.
        if self.filters and not self.filter(record):
            return False
        self.writer.put((record, self.targets))
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def flush(self) -> None:
        # A worker calls logging.shutdown() before os._exit: its lines get out.
        self.writer.flush(STOP_TIMEOUT)


def _targets_for(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of `logger` reaches, as Logger.callHandlers walks
    them, with each _Deferred replaced by the handlers it stands for."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if isinstance(handler, _Deferred):
                found.extend(handler.targets)
            else:
                found.append(handler)
        if not current.propagate:
            break
        current = current.parent
    return found


# The queue and the writer thread.


class _Marker:
    """Put in the queue by flush and stop: set once what came before is written."""

    __slots__ = ("done", "stop")

    def __init__(self, stop: bool = False) -> None:
        self.done = threading.Event()
        self.stop = stop


# What is queued: a record with the handlers to hand it to, or a LogSite's
# (site, time, arguments), whose handlers are the site's; or a marker.
_RecordItem = tuple[logging.LogRecord, tuple[logging.Handler, ...]]
_SiteItem = tuple["LogSite", float, tuple[Any, ...]]
_Item = _RecordItem | _SiteItem


class _Writer:
    """The bounded queue, the writer thread, the count of dropped records."""

    def __init__(self) -> None:
        self.active = False  # set up and not stopped
        self.fork_locked = False
        self._reset()

    def _reset(self) -> None:
        self.queue: queue.SimpleQueue[_Item | _Marker] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        # Held only to add one to `dropped`; the writer reads it without.
        self.drop_lock = threading.Lock()
        self.dropped = 0
        self.reported = 0
        # Held by the writer while it hands records to handlers, and by a fork.
        # Reentrant: a handler may log, and a stopped writer writes at once.
        self.dispatch_lock = threading.RLock()
        # Held to start or stop the thread.
        self.start_lock = threading.Lock()
        # Sinks with lines not written yet.
        self.unwritten: list[_StreamSink] = []

    def start(self) -> bool:
        """Start the thread unless it runs; False when it cannot (not set up,
        or the interpreter is shutting down)."""
        with self.start_lock:
            if self.thread is not None:
                return True
            if not self.active:
                return False
            thread = threading.Thread(
                target=self._run, args=(self.queue,), name="aioserver-log-writer", daemon=True
            )
            try:
                thread.start()
            except RuntimeError:
                return False
            self.thread = thread
            return True

    def put(self, item: _Item) -> None:
        """Queue `item`, or count it dropped if the queue is full."""
        if self.thread is None and not self.start():
            # Not running (stopped, or exiting): write it here and now.
            self._write([item])
            return
        pending = self.queue
        if pending.qsize() < QUEUE_SIZE:
            pending.put(item)
        else:
            self.drop()

    def drop(self) -> None:
        with self.drop_lock:
            self.dropped += 1

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` until what was queued before is written."""
        thread = self.thread
        if thread is None or thread is threading.current_thread() or not thread.is_alive():
            return True
        marker = _Marker()
        self.queue.put(marker)
        return marker.done.wait(timeout)

    def stop(self, timeout: float) -> bool:
        """Write what is queued (waiting up to `timeout`) and end the thread."""
        with self.start_lock:
            self.active = False
            thread, self.thread = self.thread, None
        if thread is None or thread is threading.current_thread() or not thread.is_alive():
            return True
        deadline = time.monotonic() + timeout
        marker = _Marker(stop=True)
        self.queue.put(marker)
        if not marker.done.wait(timeout):
            return False
        thread.join(max(deadline - time.monotonic(), 0.0))
        return True

    def _run(self, pending: queue.SimpleQueue[_Item | _Marker]) -> None:
        get, get_nowait = pending.get, pending.get_nowait
        while True:
            # Idle, this waits for the next record; busy, the records of the
            # last LINGER are there already. Only this thread takes from the
            # queue, so what qsize counts is there.
            batch = [get()]
            for _ in range(min(pending.qsize(), BATCH_SIZE - 1)):
                batch.append(get_nowait())
            if _Marker not in map(type, batch):
                # The usual batch, records only (a scan in C, not a loop here).
                self._write_guarded(batch)  # type: ignore[arg-type]
            else:
                items: list[_Item] = []
                for item in batch:
                    if isinstance(item, _Marker):
                        self._write_guarded(items)
                        items = []
                        item.done.set()
                        if item.stop:
                            return
                    else:
                        items.append(item)
                self._write_guarded(items)
            if len(batch) < BATCH_SIZE:
                time.sleep(LINGER)

    def _write_guarded(self, items: list[_Item]) -> None:
        # Handlers' errors are theirs to report (handleError); anything else
        # must not end this thread, or every later line would be dropped unseen.
        try:
            self._write(items)
        except Exception:
            for sink in self.unwritten:
                sink.pending.clear()
            self.unwritten = []
            with contextlib.suppress(Exception):
                traceback.print_exc(file=sys.__stderr__)

    def _write(self, items: list[_Item]) -> None:
        """Hand each item to its handlers, write the sinks' lines, report drops."""
        if items:
            with self.dispatch_lock:
                self._dispatch(items)
        self._write_sinks()
        dropped = self.dropped - self.reported
        if dropped:
            self.reported += dropped
            logger = logging.getLogger("aioserver")
            if logger.isEnabledFor(logging.WARNING):
                record = logger.makeRecord(
                    logger.name, logging.WARNING, __file__, 0, DROPPED_MESSAGE, (dropped,), None
                )
                with self.dispatch_lock:
                    self._dispatch([(record, tuple(_targets_for(logger)))])
                self._write_sinks()

    def _dispatch(self, items: list[_Item]) -> None:
        """Hand each item to its handlers: here the lines of a site whose every
        handler is a sink that makes them without a record (the access log's,
        in one loop per batch rather than a call per line), else `_handle`."""
        for item in items:
            if isinstance(item[0], LogSite):
                site, created, args = item
                fast = site.fast_sinks
                if fast is None:
                    fast = site.fast_sinks = _fast_sinks(site)
                if fast:
                    for sink, text_formatter in fast:
                        line = text_formatter.format_site(site, created, args)
                        pending = sink.pending
                        if not pending:
                            self.unwritten.append(sink)
                        pending.append(line or "")
                    continue
            self._handle(item)

    def _handle(self, item: _Item) -> None:
        record: logging.LogRecord | None
        if isinstance(item[0], LogSite):
            site, created, args = item
            targets = site.targets or ()
            record = None
        else:
            record, targets = item
        for handler in targets:
            try:
                if record is None:
                    if site.level < handler.level:
                        continue
                    if type(handler) is _StreamSink and not handler.filters:
                        formatter = handler.formatter
                        if isinstance(formatter, TextFormatter):
                            line = formatter.format_site(site, created, args)
                            if line is not None:
                                pending = handler.pending
                                if not pending:
                                    self.unwritten.append(handler)
                                pending.append(line)
                                continue
                    record = site.record(created, args)
                if record.levelno >= handler.level:
                    handler.handle(record)
                    if type(handler) is _StreamSink and handler not in self.unwritten:
                        self.unwritten.append(handler)
            except Exception:
                if record is not None:
                    handler.handleError(record)

    def _write_sinks(self) -> None:
        sinks, self.unwritten = self.unwritten, []
        for sink in sinks:
            if sink.fd is None:
                with self.dispatch_lock:  # the stream object has a lock of its own
                    sink.write_pending()
            else:
                sink.write_pending()

    # Fork: see the module's docstring.

    def before_fork(self) -> None:
        thread = self.thread
        if thread is not None and thread.is_alive():
            self.fork_locked = self.dispatch_lock.acquire(timeout=FORK_WAIT)

    def after_fork_in_parent(self) -> None:
        if self.fork_locked:
            self.fork_locked = False
            self.dispatch_lock.release()

    def after_fork_in_child(self) -> None:
        # The parent's thread does not exist here, and its queue and the sinks'
        # lines are the parent's to write: start afresh, the thread at the
        # first record.
        self.fork_locked = False
        for sink in self.unwritten:
            sink.pending.clear()
        self._reset()


def _fast_sinks(site: LogSite) -> tuple[tuple[_StreamSink, TextFormatter], ...]:
    """The site's handlers with their formatters if each is a sink whose
    formatter makes the site's lines without a record; else ()."""
    fast = []
    for handler in site.targets or ():
        formatter = handler.formatter
        if (
            type(handler) is not _StreamSink
            or handler.filters
            or site.level < handler.level
            or not isinstance(formatter, TextFormatter)
            or formatter.format_site(site, 0.0, ()) is None
        ):
            return ()
        fast.append((handler, formatter))
    return tuple(fast)


_writer = _Writer()
# What setup_logging changed: (logger, its handlers before, its level before or None).
_restore: list[tuple[logging.Logger, list[logging.Handler], int | None]] = []
_atexit_registered = False

if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_writer.before_fork,
        after_in_parent=_writer.after_fork_in_parent,
        after_in_child=_writer.after_fork_in_child,
    )


# The command's set-up.


def setup_logging(
    level: str | int = "INFO",
    *,
    log_format: str = "text",
    config: str | os.PathLike[str] | None = None,
    workers: int = 1,
    stream: TextIO | None = None,
) -> None:
    """Set up logging for the process, every handler behind the queue.

    Without `config`: the root logger at `level`, writing to `stream` (stderr)
    lines in `log_format`, "text" (TEXT_FORMAT, or WORKER_TEXT_FORMAT with the
    process id when `workers` > 1) or "json" (see JsonFormatter). With
    `config`, a logging.config.dictConfig file in JSON (or YAML, when PyYAML is
    installed) sets levels, handlers and formats instead; existing loggers stay
    enabled unless it says "disable_existing_loggers": true. Raises
    LogConfigError, with one line saying why, when the file cannot be used.

    Undone by `stop_logging`, which is also registered to run at exit.
    """
    global _atexit_registered
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    stop_logging()
    root = logging.getLogger()
    if config is not None:
        _configure(config)
        loggers = [root] + [
            logger
            for logger in list(logging.Logger.manager.loggerDict.values())
            if isinstance(logger, logging.Logger)
        ]
        for logger in loggers:
            handlers = list(logger.handlers)
            if handlers:
                _restore.append((logger, handlers, None))
                _replace_handlers(logger, [_Deferred(_writer, handlers)])
    else:
        sink = _StreamSink(sys.stderr if stream is None else stream)
        if log_format == "json":
            sink.setFormatter(JsonFormatter())
        else:
            sink.setFormatter(TextFormatter(WORKER_TEXT_FORMAT if workers > 1 else TEXT_FORMAT))
        _restore.append((root, list(root.handlers), root.level))
        _replace_handlers(root, [_Deferred(_writer, [sink])])
        root.setLevel(level.upper() if isinstance(level, str) else level)
    _writer.active = True
    _writer.start()
    if not _atexit_registered:
        atexit.register(stop_logging)
        _atexit_registered = True


def flush_logging(timeout: float = STOP_TIMEOUT) -> bool:
    """Wait up to `timeout` for every record logged so far to be written; False
    if the sink did not take them in time."""
    return _writer.flush(timeout)


def stop_logging(timeout: float = STOP_TIMEOUT) -> bool:
    """Write what is queued, waiting up to `timeout`, stop the writer thread and
    put back the handlers setup_logging replaced. False if the sink did not take
    the queued lines in time (the thread is left blocked on it; it is a daemon).
    Harmless when logging is not set up."""
    if not _writer.active and _writer.thread is None and not _restore:
        return True
    done = _writer.stop(timeout)
    for logger, handlers, level in reversed(_restore):
        _replace_handlers(logger, handlers)
        if level is not None:
            logger.setLevel(level)
    _restore.clear()
    return done


def _replace_handlers(logger: logging.Logger, handlers: Iterable[logging.Handler]) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        if isinstance(handler, _Deferred):
            handler.close()
    for handler in handlers:
        logger.addHandler(handler)


def _configure(path: str | os.PathLike[str]) -> None:
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except OSError as error:
        raise LogConfigError(f"cannot read log config {name}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise LogConfigError(f"log config {name} is not UTF-8 text") from None
    data: Any
    if name.endswith((".yaml", ".yml")):
        try:
            yaml: Any = importlib.import_module("yaml")
        except ImportError:
            raise LogConfigError(
                f"log config {name} is YAML, which needs PyYAML installed; JSON needs nothing"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise LogConfigError(
                f"log config {name} is not valid YAML: {_one_line(error)}"
            ) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise LogConfigError(f"log config {name} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise LogConfigError(
            f"log config {name} must be a logging.config.dictConfig dictionary (a JSON object)"
        )
    data.setdefault("disable_existing_loggers", False)
    try:
        logging.config.dictConfig(data)
    except Exception as error:
        why = _one_line(error)
        if error.__cause__ is not None:
            why = f"{why}: {_one_line(error.__cause__)}"
        raise LogConfigError(f"log config {name}: {why}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# A call site that logs very often.


class LogSite:
    """The records of one call site, made as cheaply as the set-up allows.

    Made once (where the records will be made, so that the thread and the
    process are right) with the logger, level and message; `log(args)` then
    logs `msg % args`, with each argument also set as the record's attribute
    named in `fields` (as extra= would set it). Whether the logger is enabled
    for `level` is the caller's to check, once.

    Where every handler the logger reaches is behind the queue of
    `setup_logging` (with no filter on the logger or its stand-in handlers),
    `log` only queues (site, time, args): the writer makes the line from them
    and makes a LogRecord only for a handler that needs one. Otherwise it makes
    the record from a template of its constant attributes (LogRecord.__init__
    and Logger.findCaller cost more than all the rest) and calls
    `logger.handle`, as Logger.info does after its level check. With a custom
    record factory (logging.setLogRecordFactory) the records are the
    factory's. The handlers are looked at once, when the site is made.
    """

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        msg: str,
        fields: Sequence[str] = (),
        func: str | None = None,
    ) -> None:
        self.logger = logger
        self.level = level
        self.msg = msg
        self.fields = tuple(fields)
        self.func = func
        # The records name the module that made the site, as the caller.
        self.pathname = sys._getframe(1).f_code.co_filename
        record = logger.makeRecord(logger.name, level, self.pathname, 0, msg, (), None, func)
        self._custom = logging.getLogRecordFactory() is not logging.LogRecord
        template = dict(record.__dict__)
        if "taskName" in template:
            template["taskName"] = None  # not the task that made the template
        # The fields' keys too, so that a record's dict is never resized.
        template.update(dict.fromkeys(self.fields))
        self._template = template
        self._created = record.created
        self._relative = record.relativeCreated
        # What a formatter may fill in once for every line of the site.
        self.constants = {
            key: value
            for key, value in template.items()
            if key not in _VARYING and key not in self.fields
        }
        # The handlers `log` queues for, or None to log through the logger.
        self.targets = self._queued_targets()
        # For the writer: the sinks that make the lines without records, once known.
        self.fast_sinks: tuple[tuple[_StreamSink, TextFormatter], ...] | None = None

    def _queued_targets(self) -> tuple[logging.Handler, ...] | None:
        """The handlers behind the queue that the logger's records reach, if
        they are all behind it and nothing filters on the way; else None."""
        logger: logging.Logger | None = self.logger
        if self._custom or not _writer.active or self.logger.disabled or self.logger.filters:
            return None
        targets: list[logging.Handler] = []
        while logger is not None:
            for handler in logger.handlers:
                if not isinstance(handler, _Deferred) or handler.filters:
                    return None
                if self.level >= handler.level:
                    targets.extend(handler.targets)
            if not logger.propagate:
                break
            logger = logger.parent
        return tuple(targets)

    def log(self, args: tuple[Any, ...]) -> None:
        """Log `msg % args` (see the class's docstring)."""
        if self.targets is None:
            self.logger.handle(self.record(_time(), args))
            return
        writer = _writer
        pending = writer.queue
        # _Writer.put, inlined: this is the line logged per connection.
        if writer.thread is None:
            writer.put((self, _time(), args))
        elif pending.qsize() < QUEUE_SIZE:
            pending.put((self, _time(), args))
        else:
            writer.drop()

    def record(self, created: float, args: tuple[Any, ...]) -> logging.LogRecord:
        """The record logged at `created` with `args`."""
        if self._custom:
            record = self.logger.makeRecord(
                self.logger.name,
                self.level,
                self.pathname,
                0,
                self.msg,
                args,
                None,
                self.func,
                dict(zip(self.fields, args, strict=False)),
            )
            record.created = created
            return record
        record = _new_record(logging.LogRecord)
        attributes = record.__dict__
        attributes.update(self._template)
        attributes["created"] = created
        attributes["msecs"] = int((created - int(created)) * 1000) + 0.0
        attributes["relativeCreated"] = self._relative + (created - self._created) * 1000
        attributes["args"] = args
        attributes.update(zip(self.fields, args, strict=False))
        return record


_new_record = object.__new__
_time = time.time
