"""The `aioserver` command: options from flags and AIOSERVER_* variables, then `run`.

Precedence: a flag wins over its environment variable, which wins over the default.
Stdout gets one `Listening on ADDRESS` line per listening socket once accepting;
logs go to stderr. Exit status: 0 after a stop by SIGINT/SIGTERM, 1 when the
server cannot start (one line on stderr, no traceback), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .loops import LOOP_NAMES, resolve_loop
from .protocols import DEFAULT_MAX_MESSAGE_SIZE, Handler, echo, thanks
from .runner import run
from .server import (
    DEFAULT_BACKLOG,
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PORT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    Server,
)

__all__ = ["load_handler", "main"]

ENV_PREFIX = "AIOSERVER_"
BUILTIN_PROTOCOLS: dict[str, Handler] = {"echo": echo, "thanks": thanks}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

logger = logging.getLogger("aioserver")


class StartupError(Exception):
    """A reason the server cannot start, said in one line."""


def load_handler(spec: str) -> Handler:
    """`echo`, `thanks`, or `module:callable` naming a coroutine function."""
    if spec in BUILTIN_PROTOCOLS:
        return BUILTIN_PROTOCOLS[spec]
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise StartupError(f"unknown protocol {spec!r}: use echo, thanks or MODULE:CALLABLE")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise StartupError(f"cannot import {module_name!r}: {error}") from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise StartupError(f"{module_name!r} has no attribute {attribute!r}") from None
    if not inspect.iscoroutinefunction(target):
        raise StartupError(
            f"{spec} is not a coroutine function: define it as 'async def handler(reader, writer)'"
        )
    handler: Handler = target
    return handler


def _timeout(text: str) -> float | None:
    """Seconds; 0 or 'none' turns the timeout off."""
    if text.strip().lower() in ("none", "off", "0"):
        return None
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return value


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


class _Option:
    """One setting: its flag, its environment variable, how to parse it."""

    def __init__(
        self,
        name: str,
        help: str,
        *,
        parse: Callable[[str], Any] = str,
        default: Any = None,
        choices: Sequence[str] | None = None,
        repeat: bool = False,
        switch: bool = False,
        metavar: str | None = None,
    ) -> None:
        self.name = name
        self.dest = name.replace("-", "_")
        self.env = ENV_PREFIX + self.dest.upper()
        self.help = help
        self.parse = parse
        self.default = default
        self.choices = choices
        self.repeat = repeat
        self.switch = switch
        self.metavar = metavar


OPTIONS = [
    _Option(
        "protocol",
        "echo, thanks, or MODULE:CALLABLE naming your own async (reader, writer) handler",
        default="echo",
        metavar="echo|thanks|MODULE:CALLABLE",
    ),
    _Option(
        "host",
        "address to listen on; repeat for several (the variable takes a comma-separated"
        " list); ::1 and 0.0.0.0 work",
        default=[DEFAULT_HOST],
        repeat=True,
    ),
    _Option("port", "TCP port; 0 picks a free one", parse=_port, default=DEFAULT_PORT),
    _Option(
        "unix",
        "listen on this Unix socket path instead of host and port",
        metavar="PATH",
    ),
    _Option("loop", "event loop", default="auto", choices=LOOP_NAMES),
    _Option("backlog", "listen backlog", parse=_positive_int, default=DEFAULT_BACKLOG),
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
        parse=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
    ),
    _Option(
        "idle-timeout",
        "close a client silent for this many seconds (0 or none: never)",
        parse=_timeout,
        default=DEFAULT_IDLE_TIMEOUT,
    ),
    _Option(
        "max-message-size",
        "longest line, in bytes, the thanks protocol accepts",
        parse=_positive_int,
        default=DEFAULT_MAX_MESSAGE_SIZE,
    ),
    _Option(
        "shutdown-timeout",
        "seconds clients get at a stop to take the replies owed to them",
        parse=_non_negative_float,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
    ),
    _Option("certfile", "TLS certificate chain (PEM); turns TLS on", metavar="FILE"),
    _Option("keyfile", "TLS private key (PEM), if not in the certfile", metavar="FILE"),
    _Option("log-level", "log level on stderr", default="info", choices=LOG_LEVELS),
    _Option(
        "access-log",
        "log one line per connection closed",
        parse=_flag,
        default=True,
        switch=True,
    ),
]


def build_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aioserver",
        description="Serve the echo or thank-you protocol (or your handler) over TCP.",
        epilog="Every option can also be set by the environment variable shown;"
        " a flag wins over the variable.",
    )
    for option in OPTIONS:
        default = option.default
        if option.env in environ:
            raw = environ[option.env]
            try:
                if option.repeat:
                    default = [part.strip() for part in raw.split(",") if part.strip()]
                else:
                    default = option.parse(raw)
            except (ValueError, argparse.ArgumentTypeError) as error:
                parser.error(f"{option.env}={raw!r}: {error}")
            if option.choices is not None and default not in option.choices:
                parser.error(f"{option.env}={raw!r}: choose from {', '.join(option.choices)}")
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = f"{option.help} [env {option.env}; default {shown}]"
        if option.switch:
            parser.add_argument(
                f"--{option.name}",
                dest=option.dest,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
        elif option.repeat:
            parser.add_argument(
                f"--{option.name}",
                dest=option.dest,
                action="append",
                default=None,
                metavar=option.metavar,
                help=help_text,
            )
            parser.set_defaults(**{f"{option.dest}_default": default})
        else:
            parser.add_argument(
                f"--{option.name}",
                dest=option.dest,
                type=option.parse,
                default=default,
                choices=option.choices,
                metavar=option.metavar,
                help=help_text,
            )
    parser.add_argument("--version", action="version", version=f"aioserver {__version__}")
    return parser


def _tls_context(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if certfile is None:
        if keyfile is not None:
            raise StartupError("--keyfile needs --certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as error:
        raise StartupError(f"TLS file not found: {error.filename}") from None
    except (ssl.SSLError, OSError) as error:
        raise StartupError(f"cannot load TLS certificate {certfile!r}: {error}") from None
    return context


def _print_listening(server: Server) -> None:
    for address in server.addresses:
        print(f"Listening on {address}", flush=True)


def _bind_error(error: OSError, args: argparse.Namespace) -> str:
    where = args.unix if args.unix is not None else ", ".join(f"{h}:{args.port}" for h in args.host)
    reason = error.strerror or str(error)
    if isinstance(error, PermissionError):
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
    return f"cannot listen on {where}: {reason}"


def main(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Run the command; return its exit status."""
    environ = dict(os.environ if environ is None else environ)
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    args.host = args.host or args.host_default
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aioserver.access").disabled = not args.access_log
    try:
        handler = load_handler(args.protocol)
        context = _tls_context(args.certfile, args.keyfile)
        loop_name = resolve_loop(args.loop)
    except (StartupError, RuntimeError) as error:
        print(f"aioserver: error: {error}", file=sys.stderr)
        return 1
    logger.info("aioserver %s: protocol %s on the %s loop", __version__, args.protocol, loop_name)
    try:
        run(
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
            ssl=context,
        )
    except OSError as error:
        print(f"aioserver: error: {_bind_error(error, args)}", file=sys.stderr)
        return 1
    return 0
