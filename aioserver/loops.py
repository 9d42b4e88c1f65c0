"""Event loop choice: "auto" (uvloop when it imports), "asyncio" or "uvloop".

A loop factory, for `asyncio.Runner(loop_factory=...)`, rather than an event loop
policy: policies are deprecated from Python 3.14.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

__all__ = ["LOOP_NAMES", "LoopName", "loop_factory", "resolve_loop"]

LoopName = Literal["auto", "asyncio", "uvloop"]
LOOP_NAMES: tuple[LoopName, ...] = ("auto", "asyncio", "uvloop")


def resolve_loop(name: str) -> Literal["asyncio", "uvloop"]:
    """The loop that `name` stands for here: "auto" becomes uvloop when it imports.

    Raises ValueError for an unknown name and RuntimeError when "uvloop" is asked
    for and does not import.
    """
    if name not in LOOP_NAMES:
        raise ValueError(f"unknown loop {name!r}: choose one of {', '.join(LOOP_NAMES)}")
    if name == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError as error:
        if name == "uvloop":
            raise RuntimeError(
                "uvloop is not installed: pip install 'aioserver-tcp[uvloop]'"
            ) from error
        return "asyncio"
    return "uvloop"


def loop_factory(name: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """A function that makes a new event loop of the kind `name` resolves to."""
    if resolve_loop(name) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop
