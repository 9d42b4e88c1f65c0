"""The `aioserver` command: options from flags and AIOSERVER_* variables, then `run`.

Precedence: a flag wins over its environment variable, which wins over the
default; an empty variable counts as unset. Stdout gets one `Listening on ADDRESS`
line per listening socket once accepting; logs go to stderr, the first line naming
the version, protocol and loop. Exit status: 0 after a stop by SIGINT/SIGTERM
(graceful or, after a second signal or SIGQUIT, at once), 1 when the server cannot
start (one line on stderr, no traceback) or, with --workers, when a worker failed
or was killed during the stop, 2 for bad arguments, 130 when interrupted before
serving.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import inspect
import logging
import math
import os
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from . import __version__
from .logs import LOG_FORMATS, LogConfigError, flush_logging, setup_logging, stop_logging
from .loops import LOOP_NAMES, resolve_loop
from .metrics import MetricsExporter, MetricsUnavailableError, parse_metrics_address
from .protocols import DEFAULT_MAX_MESSAGE_SIZE, Handler, echo, thanks
from .proxy import DEFAULT_PROXY_ALLOW, parse_networks
from .runner import run
from .server import (
    DEFAULT_BACKLOG,
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    MAX_CONNECTIONS_LIMIT,
    MAX_MESSAGE_SIZE_LIMIT,
    MAX_SECONDS,
    Server,
    format_address,
)
from .sockets import MAX_BACKLOG, InheritedSocketError

__all__ = ["StartupError", "build_parser", "load_handler", "main"]

ENV_PREFIX = "AIOSERVER_"
BUILTIN_PROTOCOLS: dict[str, Handler] = {"echo": echo, "thanks": thanks}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# --ssl-cert-reqs: whether TLS clients must present a certificate (uvicorn's names).
SSL_CERT_REQS = ("none", "optional", "required")
_VERIFY_MODES = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}

# A worker per core is the plan; more than this is a typo that would fork a storm.
MAX_WORKERS = 256

EXIT_CANNOT_START = 1
# 128 + SIGINT, as a shell reports a command Ctrl-C ended.
EXIT_INTERRUPTED = 130

# Why a listening socket could not be made, in words; other errors use strerror.
BIND_REASONS = {
    errno.EADDRINUSE: "address already in use",
    errno.EADDRNOTAVAIL: "no such address on this machine",
    errno.EEXIST: "the path exists and is not a socket",
}

logger = logging.getLogger("aioserver")


class StartupError(Exception):
    """A reason the server cannot start, said in one line."""


def load_handler(spec: str, *, fresh: bool = False) -> Handler:
    """The handler `spec` names: `echo`, `thanks`, or `MODULE:CALLABLE`.

    CALLABLE may be dotted (`module:Class.method`) and must be a coroutine
    function. Anything else raises StartupError with a one-line reason, also
    when importing the module fails.

    With `fresh` (a reload's worker), MODULE's top-level package and its
    modules are imported anew from their source, whatever was imported or
    cached before (a .pyc is not trusted: a file rewritten within the same
    second at the same size would look unchanged to it).
    """
    if spec in BUILTIN_PROTOCOLS:
        return BUILTIN_PROTOCOLS[spec]
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise StartupError(f"unknown protocol {spec!r}: use echo, thanks or MODULE:CALLABLE")
    try:
        module = _import_fresh(module_name) if fresh else importlib.import_module(module_name)
    except ImportError as error:
        raise StartupError(f"cannot import {module_name!r}: {error}") from None
    except Exception as error:
        raise StartupError(
            f"importing {module_name!r} failed: {type(error).__name__}: {error}"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise StartupError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not inspect.iscoroutinefunction(target):
        raise StartupError(
            f"{spec} is not a coroutine function: define it as 'async def handler(reader, writer)'"
        )
    handler: Handler = target
    return handler


def _import_fresh(module_name: str) -> Any:
    """Import `module_name` anew, with its top-level package (aioserver's own
    modules excepted), compiling from source without reading or writing .pyc."""
    top = module_name.split(".")[0]
    if top != __name__.split(".")[0]:
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]
    importlib.invalidate_caches()
    saved = sys.pycache_prefix, sys.dont_write_bytecode
    # No cache can live under a file: every module is compiled from its source.
    sys.pycache_prefix, sys.dont_write_bytecode = os.devnull, True
    try:
        return importlib.import_module(module_name)
    finally:
        sys.pycache_prefix, sys.dont_write_bytecode = saved


# Parsers for option values: each says in its error what it expected.


def _integer(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise argparse.ArgumentTypeError(f"expected a number {bound}, not {value}")
    return value


def _port(text: str) -> int:
    return _integer(text, 0, 65535)


def _up_to(high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _integer(text, 1, high)

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, not {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds from 0 to {MAX_SECONDS:g}, not {text!r}"
        )
    return value


def _timeout(text: str) -> float | None:
    """Seconds; 0 or 'none' turns the timeout off."""
    if text.strip().lower() in ("none", "off"):
        return None
    return _seconds(text) or None


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _metrics_address(text: str) -> tuple[str, int]:
    try:
        return parse_metrics_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@dataclass(frozen=True)
class _Option:
    """One setting: its flag, its environment variable, how to parse it."""

    name: str
    help: str
    parse: Callable[[str], Any] = str
    default: Any = None
    choices: Sequence[str] | None = None
    repeat: bool = False
    switch: bool = False
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    def shown_default(self) -> str:
        if self.default is None:
            return "not set"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if isinstance(self.default, list):
            return ",".join(self.default)
        return str(self.default)


OPTIONS = (
    _Option(
        "protocol",
        "echo, thanks, or MODULE:CALLABLE naming your own async (reader, writer)"
        " handler; MODULE is imported from the current directory or PYTHONPATH",
        default="echo",
        metavar="echo|thanks|MODULE:CALLABLE",
    ),
    _Option(
        "host",
        "address to listen on; repeat for several (the variable takes a"
        " comma-separated list); ::1 and 0.0.0.0 work",
        default=[DEFAULT_HOST],
        repeat=True,
    ),
    _Option("port", "TCP port; 0 picks a free one", parse=_port, default=DEFAULT_PORT),
    _Option(
        "unix",
        "listen on this Unix socket path instead of host and port; a stale"
        " socket file is replaced, any other file is an error",
        metavar="PATH",
    ),
    _Option("loop", "event loop", default="auto", choices=LOOP_NAMES),
    _Option("backlog", "listen backlog", parse=_up_to(MAX_BACKLOG), default=DEFAULT_BACKLOG),
    _Option(
        "reuse-port",
        "set SO_REUSEPORT so several processes can share the port",
        parse=_flag,
        default=False,
        switch=True,
    ),
    _Option(
        "max-connections",
        "clients over this are turned away at once",
        parse=_up_to(MAX_CONNECTIONS_LIMIT),
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
    ),
    _Option(
        "idle-timeout",
        "close a client silent for this many seconds (0 or none: never)",
        parse=_timeout,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
    ),
    _Option(
        "max-message-size",
        "longest line, in bytes, the thanks protocol accepts",
        parse=_up_to(MAX_MESSAGE_SIZE_LIMIT),
        default=DEFAULT_MAX_MESSAGE_SIZE,
        metavar="BYTES",
    ),
    _Option(
        "shutdown-timeout",
        "seconds clients get at a stop to take the replies owed to them",
        parse=_seconds,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        metavar="SECONDS",
    ),
    _Option(
        "proxy-protocol",
        "expect a PROXY protocol v1/v2 header first on every connection, as a"
        " load balancer such as HAProxy sends with send-proxy; logs then name the real client",
        parse=_flag,
        default=False,
        switch=True,
    ),
    _Option(
        "proxy-allow",
        "with --proxy-protocol, the balancer addresses (CIDR, or * for any) allowed to"
        " send a PROXY header; a header from elsewhere closes the connection; repeat"
        " for several (the variable takes a comma-separated list)",
        default=list(DEFAULT_PROXY_ALLOW),
        repeat=True,
        metavar="CIDR",
    ),
    _Option(
        "allow",
        "only clients from these addresses (CIDR, or * for any) may connect; with"
        " --proxy-protocol the client is the one the PROXY header names; repeat for"
        " several (the variable takes a comma-separated list); unset: everyone",
        repeat=True,
        metavar="CIDR",
    ),
    _Option(
        "deny",
        "refuse clients from these addresses (CIDR, or * for any), even if --allow"
        " names them: they are closed at once; repeat for several (the variable takes"
        " a comma-separated list)",
        repeat=True,
        metavar="CIDR",
    ),
    _Option(
        "max-connections-per-client",
        "connections one client address may have open; more are turned away at once,"
        " as over --max-connections; unset: no limit",
        parse=_up_to(MAX_CONNECTIONS_LIMIT),
        metavar="N",
    ),
    _Option(
        "ssl-ca-certs",
        "CA certificates (PEM) that client certificates are checked against, for"
        " mutual TLS with --ssl-cert-reqs",
        metavar="FILE",
    ),
    _Option(
        "ssl-cert-reqs",
        "whether a TLS client must present a certificate issued by --ssl-ca-certs:"
        " none (not asked for), optional (checked if presented) or required (a client"
        " without one fails its handshake)",
        default="none",
        choices=SSL_CERT_REQS,
    ),
    _Option(
        "workers",
        "worker processes sharing the listening sockets, each with its own event loop;"
        " 1 serves from this process",
        parse=_up_to(MAX_WORKERS),
        default=1,
        metavar="N",
    ),
    _Option(
        "fd",
        "serve on this listening socket, an open descriptor handed over by a supervisor,"
        " instead of binding; repeat for several (the variable takes a comma-separated"
        " list). Sockets passed by systemd socket activation (LISTEN_FDS) are served"
        " without it",
        repeat=True,
        metavar="N",
    ),
    _Option("certfile", "TLS certificate chain (PEM); turns TLS on", metavar="FILE"),
    _Option("keyfile", "TLS private key (PEM), if not in the certfile", metavar="FILE"),
    _Option("log-level", "log level on stderr", default="info", choices=LOG_LEVELS),
    _Option(
        "log-format",
        "log lines on stderr as text, or as json: one object per line with time, level,"
        " logger, message, pid, and on access lines peer, duration, bytes_in, bytes_out"
        " and reason",
        default="text",
        choices=LOG_FORMATS,
    ),
    _Option(
        "log-config",
        "a logging.config.dictConfig file in JSON (YAML too when PyYAML is installed)"
        " that sets levels, handlers and formats instead of --log-level and --log-format;"
        " its handlers still write from a thread of their own, off the event loop",
        metavar="FILE",
    ),
    _Option(
        "access-log",
        "log one line per connection closed (logger aioserver.access, level info)",
        parse=_flag,
        default=True,
        switch=True,
    ),
    _Option(
        "metrics",
        "serve Prometheus metrics over HTTP at http://HOST:PORT/metrics, from a listener"
        " of their own (:PORT or PORT: on 127.0.0.1; port 0 picks a free one, logged);"
        " with --workers, summed over the workers. Needs prometheus_client"
        " (the metrics extra)",
        parse=_metrics_address,
        metavar="HOST:PORT",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the built-in defaults; `_parse` lays the variables over them."""
    parser = argparse.ArgumentParser(
        prog="aioserver",
        description="Serve the echo or thank-you protocol (or your handler) over TCP."
        " SIGINT or SIGTERM stops it gracefully; a second one stops it at once.",
        epilog="Every option can also be set by the environment variable shown;"
        " a flag wins over the variable, an empty variable counts as unset.",
    )
    for option in OPTIONS:
        help_text = f"{option.help} [env {option.env}; default {option.shown_default()}]"
        if option.switch:
            parser.add_argument(
                f"--{option.name}",
                action=argparse.BooleanOptionalAction,
                default=option.default,
                help=help_text,
            )
        elif option.repeat:
            # None, not the default list: "append" would add to the default.
            parser.add_argument(
                f"--{option.name}", action="append", metavar=option.metavar, help=help_text
            )
        else:
            parser.add_argument(
                f"--{option.name}",
                type=option.parse,
                default=option.default,
                choices=option.choices,
                metavar=option.metavar,
                help=help_text,
            )
    parser.add_argument("--version", action="version", version=f"aioserver {__version__}")
    return parser


def _parse(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, environ: Mapping[str, str]
) -> argparse.Namespace:
    """Parse argv over defaults taken from the environment."""

    def bad_variable(option: _Option, raw: str, why: object) -> NoReturn:
        parser.error(f"{option.env}={raw!r}: {why}")

    repeated: dict[str, list[str]] = {}
    for option in OPTIONS:
        raw = environ.get(option.env, "")
        if not raw:
            continue
        if option.repeat:
            repeated[option.dest] = [part.strip() for part in raw.split(",") if part.strip()]
            continue
        try:
            value = option.parse(raw)
        except argparse.ArgumentTypeError as error:
            bad_variable(option, raw, error)
        if option.choices is not None and value not in option.choices:
            bad_variable(option, raw, f"choose from {', '.join(option.choices)}")
        parser.set_defaults(**{option.dest: value})
    args = parser.parse_args(argv)
    for option in OPTIONS:
        if option.repeat and getattr(args, option.dest) is None:
            setattr(args, option.dest, repeated.get(option.dest) or option.default)
    return args


def _no_password() -> str:
    raise StartupError("the TLS private key is encrypted, and aioserver asks for no password")


def _tls_context(
    certfile: str | None,
    keyfile: str | None,
    ca_certs: str | None = None,
    cert_reqs: str = "none",
) -> ssl.SSLContext | None:
    """A server TLS context from PEM files, or None without a certfile; with
    `ca_certs` and `cert_reqs` (none, optional, required), for mutual TLS."""
    if certfile is None:
        if keyfile is not None:
            raise StartupError("--keyfile needs --certfile")
        if ca_certs is not None:
            raise StartupError("--ssl-ca-certs needs --certfile")
        return None
    for kind, path in (("certificate", certfile), ("private key", keyfile)):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise StartupError(f"cannot read TLS {kind} {path}: {error.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except ssl.SSLError as error:
        files = certfile if keyfile is None else f"{certfile} and {keyfile}"
        if error.reason == "KEY_VALUES_MISMATCH":
            why = "the private key does not match the certificate"
        elif "PEM lib" in str(error):
            why = "no PEM certificate with its private key found"
        else:
            why = str(error.reason or error)
        raise StartupError(f"cannot load TLS certificate from {files}: {why}") from None
    if ca_certs is not None:
        try:
            context.load_verify_locations(cafile=ca_certs)
        except ssl.SSLError as error:  # an OSError too: first
            reason = str(error.reason or error)
            why = "no PEM certificate found" if "NO_CERTIFICATE" in reason else reason
            raise StartupError(f"cannot load TLS CA certificates from {ca_certs}: {why}") from None
        except OSError as error:
            why = error.strerror or str(error)
            raise StartupError(f"cannot read TLS CA certificates {ca_certs}: {why}") from None
    context.verify_mode = _VERIFY_MODES[cert_reqs]
    return context


def _reloader(spec: str) -> Callable[[], Handler] | None:
    """What a reload's worker calls to load the handler anew (the built-in
    protocols need no import: None)."""
    if spec in BUILTIN_PROTOCOLS:
        return None
    return lambda: load_handler(spec, fresh=True)


def _print_listening(server: Server) -> None:
    try:
        for address in server.addresses:
            print(f"Listening on {address}", flush=True)
    except BrokenPipeError:
        # Whoever read stdout has gone; the server serves on. Later writes to
        # stdout (and the flush at exit) go nowhere instead of failing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        logger.warning("stdout is closed: the Listening lines were not read")


def _bind_error(error: OSError, args: argparse.Namespace) -> str:
    """One line on why listening failed, naming the address."""
    if isinstance(error, InheritedSocketError):
        return f"cannot serve on a socket handed over: {error}"
    if args.unix is not None:
        where = format_address(args.unix)
    else:
        where = ", ".join(format_address((host, args.port)) for host in args.host)
    if isinstance(error, PermissionError):
        reason = "permission denied"
        if args.unix is None and 0 < args.port < 1024:
            reason += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    elif error.errno in BIND_REASONS:
        reason = BIND_REASONS[error.errno]
    else:
        reason = error.strerror or str(error)
    return f"cannot listen on {where}: {reason}"


def _fail(message: str) -> int:
    flush_logging()  # the log lines before it come first
    print(f"aioserver: error: {message}", file=sys.stderr)
    return EXIT_CANNOT_START


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command with `argv` (default sys.argv) and `environ` (default
    os.environ); return its exit status. Argument errors exit 2 via SystemExit.
    """
    try:
        return _main(argv, environ)
    finally:
        stop_logging()  # writes what is queued, waiting a bounded time


def _main(argv: Sequence[str] | None, environ: Mapping[str, str] | None) -> int:
    parser = build_parser()
    args = _parse(parser, argv, os.environ if environ is None else environ)
    try:
        parse_networks(args.proxy_allow)
    except ValueError as error:
        parser.error(f"argument --proxy-allow: {error}")
    for name in ("allow", "deny"):
        try:
            parse_networks(getattr(args, name) or ())
        except ValueError as error:
            parser.error(f"argument --{name}: {error}")
    if args.ssl_cert_reqs != "none" and args.ssl_ca_certs is None:
        parser.error(f"argument --ssl-cert-reqs: {args.ssl_cert_reqs} needs --ssl-ca-certs")
    try:
        fds = [_integer(fd, 0) for fd in args.fd or []]
    except argparse.ArgumentTypeError as error:
        parser.error(f"argument --fd: {error}")
    try:
        setup_logging(
            args.log_level, log_format=args.log_format, config=args.log_config, workers=args.workers
        )
    except LogConfigError as error:
        return _fail(str(error))
    try:
        if ":" in args.protocol and not {"", os.getcwd()} & set(sys.path):
            # As uvicorn does: a module in the current directory is found, also
            # from the console script, whose sys.path starts with its own directory.
            sys.path.insert(0, os.getcwd())
        try:
            handler = load_handler(args.protocol)
            context = _tls_context(
                args.certfile, args.keyfile, args.ssl_ca_certs, args.ssl_cert_reqs
            )
            loop_name = resolve_loop(args.loop)
        except (StartupError, RuntimeError) as error:
            return _fail(str(error))
        logger.info(
            "aioserver %s: protocol %s on the %s loop", __version__, args.protocol, loop_name
        )
        exporter = None
        if args.metrics is not None:
            exporter = MetricsExporter(*args.metrics, workers=args.workers)
            try:
                exporter.start()
            except MetricsUnavailableError as error:
                return _fail(str(error))
            except OSError as error:
                why = BIND_REASONS.get(error.errno or 0) or error.strerror or str(error)
                return _fail(f"cannot serve metrics on {exporter.address}: {why}")
        try:
            status = run(
                handler,
                loop=loop_name,
                on_start=_print_listening,
                host=args.host,
                port=args.port,
                unix=args.unix,
                backlog=args.backlog,
                reuse_port=args.reuse_port,
                max_connections=args.max_connections,
                idle_timeout=args.idle_timeout,
                max_message_size=args.max_message_size,
                shutdown_timeout=args.shutdown_timeout,
                proxy_protocol=args.proxy_protocol,
                proxy_allow=args.proxy_allow,
                allow=args.allow or (),
                deny=args.deny or (),
                max_connections_per_client=args.max_connections_per_client,
                ssl=context,
                workers=args.workers,
                access_log=args.access_log,
                fds=fds,
                inherit=True,
                notify=True,
                metrics=exporter,
                reload_handler=_reloader(args.protocol),
            )
        except OSError as error:
            return _fail(_bind_error(error, args))
        finally:
            if exporter is not None:
                exporter.close()
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were in place (or after they left).
        return EXIT_INTERRUPTED
    return status
