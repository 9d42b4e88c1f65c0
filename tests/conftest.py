"""Shared test set-up: every asyncio test runs on the stdlib loop and on uvloop.

The fixtures live here; the plain helpers they use are in tests/helpers.py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import trustme
import uvloop

from .helpers import (
    AioserverProcess,
    ExceptionRecorder,
    StartServer,
    issue_server_cert,
    make_client_context,
    make_server_context,
    open_fds,
    start_aioserver,
    wait_until,
    write_tls_files,
)

# Modules still import these from here.
__all__ = ["ExceptionRecorder", "open_fds", "wait_until"]

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return LOOP_FACTORIES


@pytest_asyncio.fixture
async def loop_errors() -> ExceptionRecorder:
    """A recorder installed as the running loop's exception handler."""
    recorder = ExceptionRecorder()
    asyncio.get_running_loop().set_exception_handler(recorder)
    return recorder


# TLS: one throwaway CA and one server certificate for the whole run.


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_cert(tls_ca: trustme.CA) -> trustme.LeafCert:
    """A server certificate from `tls_ca` for 127.0.0.1 and localhost."""
    return issue_server_cert(tls_ca)


@pytest.fixture(scope="session")
def server_tls_context(tls_cert: trustme.LeafCert) -> ssl.SSLContext:
    """A server-side context presenting `tls_cert`."""
    return make_server_context(tls_cert)


@pytest.fixture(scope="session")
def client_tls_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """A client-side context that trusts `tls_ca` only."""
    return make_client_context(tls_ca)


@pytest.fixture(scope="session")
def tls_files(
    tls_cert: trustme.LeafCert, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(certfile, keyfile) of `tls_cert`, PEM files for --certfile and --keyfile."""
    return write_tls_files(tls_cert, tmp_path_factory.mktemp("tls"))


# The command in a subprocess.


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """`start_aioserver(ARGS..., ready=1, ...)`: the command started and listening;
    every process it started is killed at teardown."""
    started: list[AioserverProcess] = []

    def start(*args: str, **options: Any) -> AioserverProcess:
        server = start_aioserver(*args, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
