"""pytest fixtures over aioserver.testing (registered through the pytest11 entry point).

Installing aioserver is enough: pytest loads this plugin by its `pytest11` entry
point. Every fixture is function-scoped and yields a started server.

For asyncio tests (pytest-asyncio 1.x, strict or auto mode):

- `echo_server`, `thanks_server`: a `TestServer` with the built-in protocol.
- `expect_server`: a `TestServer` that answers by its expectations
  (`expect_server.expect(b"PING").respond_with(b"PONG\\n")`), lines ending in LF.
- `server_factory`: `await server_factory(handler, **options)` starts a
  `TestServer` with any handler and the options of TestServer.
- `fault_proxy_factory`: `await fault_proxy_factory(upstream_address, **options)`
  starts a `FaultProxy` to that service, with the options of FaultProxy.

They run on the event loop of the test that uses them, whatever its loop scope
(`@pytest.mark.asyncio(loop_scope=...)` or `asyncio_default_test_loop_scope`), so
a module- or session-scoped loop works as well as the default. A synchronous test
that asks for one fails at setup, saying to use the threaded fixture.

For any test, synchronous or not, with no pytest-asyncio needed:

- `threaded_echo_server`, `threaded_thanks_server`, `threaded_expect_server`: a
  `ThreadedTestServer`.
- `threaded_server_factory`: `threaded_server_factory(handler, **options)`.
- `threaded_fault_proxy_factory`: `threaded_fault_proxy_factory(upstream_address,
  **options)` starts a `ThreadedFaultProxy`.

At teardown every server and proxy is stopped through `aioserver.Server.stop()`,
on its own loop: the listening socket closes, every connection task is cancelled
and awaited, no task, socket or thread is left and nothing warns.

Checks: when the test function has passed, `check()` runs on every server these
fixtures made for it, and an unexpected message, an unmet one-shot or ordered
expectation or a handler error fails the test (not its teardown), with the
transcript of the connections involved. `@pytest.mark.aioserver_no_check` opts a
test (or a class or module, by `pytestmark`) out. When a test that used these
fixtures fails in any phase, its report gets a section "Captured aioserver
<phase>" with each server's transcript: per connection what it received and sent,
2 KiB each way, the last 20 connections (for a proxy, what it carried each way).

A server with a wider scope than a test is one the test project makes itself:
`async with TestServer(...)` in a fixture with that scope and loop scope. A test
on another loop that uses it fails with WrongLoopError (or, for a synchronous
test, a failure naming the fixture) instead of hanging.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Literal, Union, Unpack, cast

import pytest

from .protocols import Handler, echo, thanks
from .testing import (
    FaultProxy,
    ProxyOptions,
    ServerOptions,
    TestServer,
    ThreadedFaultProxy,
    ThreadedTestServer,
    WrongLoopError,
)
from .testing.base import TestServerBase

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the threaded fixtures work without it
    HAVE_PYTEST_ASYNCIO = False
else:
    HAVE_PYTEST_ASYNCIO = True

__all__ = [
    "FaultProxyFactory",
    "ServerFactory",
    "ThreadedFaultProxyFactory",
    "ThreadedServerFactory",
    "echo_server",
    "expect_server",
    "fault_proxy_factory",
    "server_factory",
    "thanks_server",
    "threaded_echo_server",
    "threaded_expect_server",
    "threaded_fault_proxy_factory",
    "threaded_server_factory",
    "threaded_thanks_server",
]

LoopScope = Literal["function", "class", "module", "package", "session"]
LOOP_SCOPES: tuple[LoopScope, ...] = ("function", "class", "module", "package", "session")

NO_CHECK_MARKER = "aioserver_no_check"

# What the fixtures made for a test: servers, proxies and factories; the servers
# are checked after the test, and all are shown in the report of a failure.
Made = Union[
    TestServerBase,
    "ServerFactory",
    "ThreadedServerFactory",
    "FaultProxyFactory",
    "ThreadedFaultProxyFactory",
]
_MADE = pytest.StashKey[list[Made]]()


def _register(request: pytest.FixtureRequest, made: Made) -> None:
    node = request.node
    if isinstance(node, pytest.Item):
        node.stash.setdefault(_MADE, []).append(made)


def _made_of(item: pytest.Item) -> list[TestServerBase | FaultProxy | ThreadedFaultProxy]:
    """Every server and proxy the fixtures made for `item`, factories' included."""
    made: list[TestServerBase | FaultProxy | ThreadedFaultProxy] = []
    for entry in item.stash.get(_MADE, []):
        if isinstance(entry, ServerFactory | ThreadedServerFactory):
            made += entry.servers
        elif isinstance(entry, FaultProxyFactory | ThreadedFaultProxyFactory):
            made += entry.proxies
        else:
            made.append(entry)
    return made


def _servers_of(item: pytest.Item) -> list[TestServerBase]:
    return [made for made in _made_of(item) if isinstance(made, TestServerBase)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{NO_CHECK_MARKER}: do not fail the test when a server from the aioserver "
        "fixtures saw unexpected messages, unmet expectations or handler errors",
    )


class ServerFactory:
    """Starts TestServers on the loop it was made on; `aclose()` stops them all.

    The `server_factory` fixture is one, closed at the end of the test.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.servers: list[TestServer] = []

    async def __call__(
        self, handler: Handler | None = echo, **options: Unpack[ServerOptions]
    ) -> TestServer:
        """A started TestServer(handler, **options); OSError if it cannot bind."""
        if asyncio.get_running_loop() is not self.loop:
            raise WrongLoopError(
                "server_factory: called from another event loop than the test's; "
                "servers it makes run on the loop of the test that asked for it"
            )
        server = TestServer(handler, **options)
        await server.start()
        self.servers.append(server)
        return server

    async def aclose(self) -> None:
        """Stop every server made, the last first, even if a stop fails.

        `servers` still lists them afterwards, stopped; calling again is harmless.
        """
        await _stop_all_async(list(reversed(self.servers)))


class ThreadedServerFactory:
    """Starts ThreadedTestServers; `close()` stops them all.

    The `threaded_server_factory` fixture is one, closed at the end of the test.
    """

    def __init__(self) -> None:
        self.servers: list[ThreadedTestServer] = []

    def __call__(
        self,
        handler: Handler | None = echo,
        *,
        loop: str = "auto",
        **options: Unpack[ServerOptions],
    ) -> ThreadedTestServer:
        """A started ThreadedTestServer(handler, loop=loop, **options)."""
        server = ThreadedTestServer(handler, loop=loop, **options).start()
        self.servers.append(server)
        return server

    def close(self) -> None:
        """Stop every server made, the last first, even if a stop fails.

        `servers` still lists them afterwards, stopped; calling again is harmless.
        """
        _stop_all(list(reversed(self.servers)))


class FaultProxyFactory:
    """Starts FaultProxies on the loop it was made on; `aclose()` stops them all.

    The `fault_proxy_factory` fixture is one, closed at the end of the test.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.proxies: list[FaultProxy] = []

    async def __call__(
        self, upstream_address: tuple[str, int] | str, **options: Unpack[ProxyOptions]
    ) -> FaultProxy:
        """A started FaultProxy(upstream_address, **options); OSError if it cannot bind."""
        if asyncio.get_running_loop() is not self.loop:
            raise WrongLoopError(
                "fault_proxy_factory: called from another event loop than the test's; "
                "proxies it makes run on the loop of the test that asked for it"
            )
        proxy = FaultProxy(upstream_address, **options)
        await proxy.start()
        self.proxies.append(proxy)
        return proxy

    async def aclose(self) -> None:
        """Stop every proxy made, the last first, even if a stop fails."""
        await _stop_all_async(list(reversed(self.proxies)))


class ThreadedFaultProxyFactory:
    """Starts ThreadedFaultProxies; `close()` stops them all.

    The `threaded_fault_proxy_factory` fixture is one, closed at the end of the test.
    """

    def __init__(self) -> None:
        self.proxies: list[ThreadedFaultProxy] = []

    def __call__(
        self,
        upstream_address: tuple[str, int] | str,
        *,
        loop: str = "auto",
        **options: Unpack[ProxyOptions],
    ) -> ThreadedFaultProxy:
        """A started ThreadedFaultProxy(upstream_address, loop=loop, **options)."""
        proxy = ThreadedFaultProxy(upstream_address, loop=loop, **options).start()
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        """Stop every proxy made, the last first, even if a stop fails."""
        _stop_all(list(reversed(self.proxies)))


async def _stop_all_async(servers: Sequence[TestServer | FaultProxy]) -> None:
    if not servers:
        return
    try:
        await servers[0].stop()
    finally:
        await _stop_all_async(servers[1:])


def _stop_all(servers: Sequence[ThreadedTestServer | ThreadedFaultProxy]) -> None:
    if not servers:
        return
    try:
        servers[0].stop()
    finally:
        _stop_all(servers[1:])


# In-loop fixtures. Each public fixture picks, by the loop scope of the test that
# asks for it, one of the variants below: an async fixture with that loop scope,
# so pytest-asyncio runs it (setup, teardown) on the test's own loop.

InLoopKind = Literal[
    "echo_server", "thanks_server", "expect_server", "server_factory", "fault_proxy_factory"
]
ServerKind = Literal["echo_server", "thanks_server", "expect_server"]
HANDLERS: dict[str, Handler | None] = {
    "echo_server": echo,
    "thanks_server": thanks,
    "expect_server": None,
}


def _variant_name(kind: InLoopKind, scope: LoopScope) -> str:
    return f"_aioserver_{kind}_on_{scope}_loop"


def _is_async_test(item: pytest.Item) -> bool:
    if HAVE_PYTEST_ASYNCIO and item.config.pluginmanager.has_plugin("asyncio"):
        return pytest_asyncio.is_async_test(item)
    return inspect.iscoroutinefunction(getattr(item, "obj", None))


def _test_loop_scope(item: pytest.Item) -> LoopScope:
    marker = item.get_closest_marker("asyncio")
    scope = None
    if marker is not None:
        scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
    if scope is None:
        try:
            scope = item.config.getini("asyncio_default_test_loop_scope")
        except ValueError:  # pragma: no cover - a pytest-asyncio without the option
            scope = None
    if scope not in LOOP_SCOPES:
        return "function"
    return cast(LoopScope, scope)


def _on_test_loop(request: pytest.FixtureRequest, kind: InLoopKind) -> object:
    if not HAVE_PYTEST_ASYNCIO or not request.config.pluginmanager.has_plugin("asyncio"):
        pytest.fail(
            f"{kind} runs on the event loop of an asyncio test and needs pytest-asyncio "
            f"(pip install 'pytest-asyncio>=1,<2'); use threaded_{kind} without it",
            pytrace=False,
        )
    item = request.node
    if not isinstance(item, pytest.Item) or not pytest_asyncio.is_async_test(item):
        pytest.fail(
            f"{kind} runs on the event loop of an asyncio test, but {request.node.nodeid} "
            "is not one (a synchronous test, or an async test without "
            "@pytest.mark.asyncio in strict mode); a synchronous test uses "
            f"threaded_{kind}",
            pytrace=False,
        )
    return request.getfixturevalue(_variant_name(kind, _test_loop_scope(item)))


def _define_variants() -> None:
    for scope in LOOP_SCOPES:
        kinds: tuple[ServerKind, ...] = ("echo_server", "thanks_server", "expect_server")
        for kind in kinds:
            _define_server_variant(kind, scope)
        _define_factory_variant(scope)
        _define_proxy_factory_variant(scope)


def _define_server_variant(kind: ServerKind, scope: LoopScope) -> None:
    handler = HANDLERS[kind]

    async def variant(request: pytest.FixtureRequest) -> AsyncIterator[TestServer]:
        async with TestServer(handler) as server:
            _register(request, server)
            yield server

    name = _variant_name(kind, scope)
    globals()[name] = pytest_asyncio.fixture(variant, name=name, loop_scope=scope)


def _define_factory_variant(scope: LoopScope) -> None:
    async def variant(request: pytest.FixtureRequest) -> AsyncIterator[ServerFactory]:
        factory = ServerFactory()
        _register(request, factory)
        try:
            yield factory
        finally:
            await factory.aclose()

    name = _variant_name("server_factory", scope)
    globals()[name] = pytest_asyncio.fixture(variant, name=name, loop_scope=scope)


def _define_proxy_factory_variant(scope: LoopScope) -> None:
    async def variant(request: pytest.FixtureRequest) -> AsyncIterator[FaultProxyFactory]:
        factory = FaultProxyFactory()
        _register(request, factory)
        try:
            yield factory
        finally:
            await factory.aclose()

    name = _variant_name("fault_proxy_factory", scope)
    globals()[name] = pytest_asyncio.fixture(variant, name=name, loop_scope=scope)


if HAVE_PYTEST_ASYNCIO:
    _define_variants()


@pytest.fixture
def echo_server(request: pytest.FixtureRequest) -> TestServer:
    """A started echo TestServer on this asyncio test's loop, stopped after the test."""
    return cast(TestServer, _on_test_loop(request, "echo_server"))


@pytest.fixture
def thanks_server(request: pytest.FixtureRequest) -> TestServer:
    """A started thanks TestServer on this asyncio test's loop, stopped after the test."""
    return cast(TestServer, _on_test_loop(request, "thanks_server"))


@pytest.fixture
def expect_server(request: pytest.FixtureRequest) -> TestServer:
    """A started TestServer answering by its expectations, on this asyncio test's loop."""
    return cast(TestServer, _on_test_loop(request, "expect_server"))


@pytest.fixture
def server_factory(request: pytest.FixtureRequest) -> ServerFactory:
    """`await server_factory(handler, **options)`: TestServers stopped after the test."""
    return cast(ServerFactory, _on_test_loop(request, "server_factory"))


@pytest.fixture
def fault_proxy_factory(request: pytest.FixtureRequest) -> FaultProxyFactory:
    """`await fault_proxy_factory(upstream_address, **options)`: FaultProxies to
    that service on this asyncio test's loop, stopped after the test."""
    return cast(FaultProxyFactory, _on_test_loop(request, "fault_proxy_factory"))


# Threaded fixtures.


@pytest.fixture
def threaded_echo_server(request: pytest.FixtureRequest) -> Iterator[ThreadedTestServer]:
    """A started echo ThreadedTestServer, stopped (thread joined) after the test."""
    with ThreadedTestServer(echo) as server:
        _register(request, server)
        yield server


@pytest.fixture
def threaded_thanks_server(request: pytest.FixtureRequest) -> Iterator[ThreadedTestServer]:
    """A started thanks ThreadedTestServer, stopped (thread joined) after the test."""
    with ThreadedTestServer(thanks) as server:
        _register(request, server)
        yield server


@pytest.fixture
def threaded_expect_server(request: pytest.FixtureRequest) -> Iterator[ThreadedTestServer]:
    """A started ThreadedTestServer answering by its expectations, stopped after the test."""
    with ThreadedTestServer(None) as server:
        _register(request, server)
        yield server


@pytest.fixture
def threaded_server_factory(request: pytest.FixtureRequest) -> Iterator[ThreadedServerFactory]:
    """`threaded_server_factory(handler, **options)`: servers stopped after the test."""
    factory = ThreadedServerFactory()
    _register(request, factory)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def threaded_fault_proxy_factory(
    request: pytest.FixtureRequest,
) -> Iterator[ThreadedFaultProxyFactory]:
    """`threaded_fault_proxy_factory(upstream_address, **options)`: ThreadedFaultProxies
    to that service, stopped (threads joined) after the test."""
    factory = ThreadedFaultProxyFactory()
    _register(request, factory)
    try:
        yield factory
    finally:
        factory.close()


# A synchronous test never runs an event loop, so an in-loop server from one of
# its fixtures would never answer: say so before the test hangs on it.


# After a test that passed: check every server the fixtures made for it.


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    _refuse_stopped_loops(item)
    result = yield  # a test that failed stops here: its failure is the report
    if item.get_closest_marker(NO_CHECK_MARKER) is None:
        failures = []
        for server in _servers_of(item):
            try:
                server.check()
            except AssertionError as error:
                failures.append(str(error))
        if failures:
            pytest.fail(
                "\n\n".join(failures) + f"\n(opt out with @pytest.mark.{NO_CHECK_MARKER})",
                pytrace=False,
            )
    return result


# The transcript of every server in the report of a test that failed.


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    excinfo = call.excinfo
    if excinfo is not None and not excinfo.errisinstance(pytest.skip.Exception):
        made = _made_of(item)
        if made:
            transcript = "\n\n".join(each.transcript() for each in made)
            item.add_report_section(call.when, "aioserver", transcript)
    return (yield)


def _refuse_stopped_loops(item: pytest.Item) -> None:
    funcargs = getattr(item, "funcargs", None)
    if not funcargs or _is_async_test(item):
        return
    for name, value in funcargs.items():
        if not isinstance(value, TestServer) or not value.is_serving:
            continue
        loop = value.loop
        if loop is not None and not loop.is_running():
            pytest.fail(
                f"{item.nodeid} is a synchronous test, but its fixture {name!r} is "
                f"{value!r}, an in-loop server whose event loop does not run during "
                "the test, so it would never answer. Make the test an asyncio test "
                "on the fixture's loop, or use a ThreadedTestServer (the threaded_* "
                "fixtures).",
                pytrace=False,
            )
