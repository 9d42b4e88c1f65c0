"""Shared test set-up: every asyncio test runs on the stdlib loop and on uvloop."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping

import pytest
import pytest_asyncio
import uvloop

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return LOOP_FACTORIES


def open_fds() -> int:
    """How many file descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd"))


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for `condition` to hold, checking every few milliseconds; fail at `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition still false after {timeout} s")
        await asyncio.sleep(0.005)


class ExceptionRecorder:
    """Collects what reaches the running loop's exception handler."""

    def __init__(self) -> None:
        self.contexts: list[dict[str, object]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        self.contexts.append(context)


@pytest_asyncio.fixture
async def loop_errors() -> ExceptionRecorder:
    """A recorder installed as the running loop's exception handler."""
    recorder = ExceptionRecorder()
    asyncio.get_running_loop().set_exception_handler(recorder)
    return recorder
