"""aioserver.pytest_plugin: fresh test projects that use each fixture, run by pytester.

Each project runs in its own pytest process (`runpytest_subprocess`), as a project
that installed aioserver would: the plugin comes from the pytest11 entry point,
and the outer pytest-asyncio does not meddle with the inner one.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest

from aioserver import thanks
from aioserver.pytest_plugin import ServerFactory, ThreadedServerFactory
from aioserver.testing import Ending, TestServer, ThreadedTestServer

from .helpers import PREFIX

pytest_plugins = ["pytester"]

# Several pytest start-ups per project; far above what they need, below the
# per-test timeout.
RUN_TIMEOUT = 50

# Checks, after every fixture's teardown, that what it made was stopped: no task
# left on the server's (or proxy's) loop, no listening socket, no thread; reports
# the count.
CONFTEST = """
import asyncio
import threading

import pytest

from aioserver.pytest_plugin import (
    FaultProxyFactory,
    ServerFactory,
    ThreadedFaultProxyFactory,
    ThreadedServerFactory,
)
from aioserver.testing import FaultProxy, TestServer, ThreadedFaultProxy, ThreadedTestServer

checked = []


def pytest_fixture_post_finalizer(fixturedef, request):
    # The fixtures that own the servers; echo_server and friends hand them on.
    owner = fixturedef.argname.startswith(("_aioserver_", "threaded_"))
    cached = fixturedef.cached_result
    if not owner or cached is None or cached[2] is not None:
        return
    value = cached[0]
    if isinstance(value, (ServerFactory, ThreadedServerFactory)):
        servers = value.servers
    elif isinstance(value, (FaultProxyFactory, ThreadedFaultProxyFactory)):
        servers = value.proxies
    else:
        servers = [value]
    for server in servers:
        if isinstance(server, TestServer):
            assert not server.is_serving
            assert server.server.sockets == []
            pending = [task for task in asyncio.all_tasks(server.loop) if not task.done()]
            assert pending == [], pending
            checked.append(server)
        elif isinstance(server, ThreadedTestServer):
            assert not server.is_serving
            assert server.loop is None
            assert "aioserver-test-server" not in [t.name for t in threading.enumerate()]
            checked.append(server)
        elif isinstance(server, FaultProxy):
            assert not server.is_serving
            assert all(record.ended is not None for record in server.connections)
            pending = [task for task in asyncio.all_tasks(server.loop) if not task.done()]
            assert pending == [], pending
            checked.append(server)
        elif isinstance(server, ThreadedFaultProxy):
            assert not server.is_serving
            assert server.loop is None
            assert "aioserver-fault-proxy" not in [t.name for t in threading.enumerate()]
            checked.append(server)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"aioserver servers checked after teardown: {len(checked)}")
"""

UVLOOP_CONFTEST = (
    CONFTEST
    + """

import uvloop


def pytest_asyncio_loop_factories(config, item):
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
"""
)

HELPERS = """
import asyncio
import socket

import pytest

from aioserver import thanks
from aioserver.testing import Ending, Faults, TestServer


async def talk(address, data):
    reader, writer = await asyncio.open_connection(*address)
    writer.write(data)
    writer.write_eof()
    reply = await reader.read()
    writer.close()
    await writer.wait_closed()
    return reply


def talk_blocking(address, data):
    with socket.create_connection(address) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def check_echo(server):
    assert server.loop is asyncio.get_running_loop()
    assert await talk(server.address, b"ping") == b"ping"
    (record,) = await server.wait_for_closed(1)
    assert record.received == record.sent == b"ping"
    assert record.ended is Ending.CLIENT_CLOSED


async def check_thanks(server):
    assert server.loop is asyncio.get_running_loop()
    assert await talk(server.address, b"hi\\n") == b"Thank you for your message hi\\n"
    assert await server.wait_for_messages(1) == [b"hi\\n"]


async def check_factory(server_factory):
    async def greet(reader, writer):
        writer.write(b"hello " + await reader.readline())
        writer.close()
        await writer.wait_closed()

    greeter = await server_factory(greet)
    slow = await server_factory(thanks, faults=Faults(delay=0.05), max_message_size=16)
    assert greeter.loop is slow.loop is asyncio.get_running_loop()
    assert await talk(greeter.address, b"you\\n") == b"hello you\\n"
    assert await talk(slow.address, b"x\\n") == b"Thank you for your message x\\n"
"""

# Async tests in strict mode: markers choose function, class, module and session
# loops; a project fixture builds on a plugin fixture; a wider-scoped server is
# made by the project itself, on its fixture's loop.
STRICT_TESTS = (
    HELPERS
    + """
import pytest_asyncio

loops = {}


@pytest.mark.asyncio
async def test_echo_server(echo_server):
    await check_echo(echo_server)


@pytest.mark.asyncio
async def test_thanks_server(thanks_server):
    await check_thanks(thanks_server)


@pytest.mark.asyncio
async def test_server_factory(server_factory):
    await check_factory(server_factory)


@pytest_asyncio.fixture
async def connected(echo_server):
    reader, writer = await asyncio.open_connection(*echo_server.address)
    yield reader, writer
    writer.close()
    await writer.wait_closed()


@pytest.mark.asyncio
async def test_project_fixture_over_a_plugin_fixture(connected, echo_server):
    reader, writer = connected
    writer.write(b"abc")
    assert await reader.readexactly(3) == b"abc"
    assert len(echo_server.connections) == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_module_loop(echo_server, thanks_server, server_factory):
    loops["module"] = asyncio.get_running_loop()
    await check_echo(echo_server)
    await check_thanks(thanks_server)
    await check_factory(server_factory)


@pytest.mark.asyncio(loop_scope="module")
async def test_module_loop_again(echo_server):
    assert asyncio.get_running_loop() is loops["module"]
    assert echo_server.connections == []  # a new server for every test
    await check_echo(echo_server)


@pytest.mark.asyncio(loop_scope="session")
async def test_session_loop(echo_server, thanks_server, server_factory):
    assert asyncio.get_running_loop() is not loops["module"]
    await check_echo(echo_server)
    await check_thanks(thanks_server)
    await check_factory(server_factory)


@pytest.mark.asyncio(loop_scope="class")
class TestClassLoop:
    async def test_one(self, echo_server):
        loops["class"] = asyncio.get_running_loop()
        await check_echo(echo_server)

    async def test_two(self, thanks_server):
        assert asyncio.get_running_loop() is loops["class"]
        await check_thanks(thanks_server)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_server():
    async with TestServer(thanks) as server:
        yield server


@pytest.mark.asyncio(loop_scope="module")
async def test_shared_server_first(shared_server):
    await check_thanks(shared_server)


@pytest.mark.asyncio(loop_scope="module")
async def test_shared_server_second(shared_server):
    assert len(shared_server.connections) == 1
    assert await talk(shared_server.address, b"again\\n") == (
        b"Thank you for your message again\\n"
    )
"""
)

# Synchronous tests and a non-asyncio client: the threaded fixtures.
SYNC_TESTS = (
    HELPERS
    + """

def test_threaded_echo_server(threaded_echo_server):
    assert talk_blocking(threaded_echo_server.address, b"ping") == b"ping"
    (record,) = threaded_echo_server.wait_for_closed(1)
    assert record.received == b"ping"


def test_threaded_thanks_server(threaded_thanks_server):
    assert talk_blocking(threaded_thanks_server.address, b"a\\nb\\n") == (
        b"Thank you for your message a\\nThank you for your message b\\n"
    )
    assert threaded_thanks_server.wait_for_messages(2) == [b"a\\n", b"b\\n"]


def test_threaded_server_factory(threaded_server_factory):
    flaky = threaded_server_factory(thanks, loop="asyncio", faults=Faults(close_after=10))
    assert talk_blocking(flaky.address, b"long enough\\n") == b"Thank you "
    flaky.refuse_connections()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(flaky.address)
    flaky.accept_connections()
    flaky.faults.clear()
    assert talk_blocking(flaky.address, b"x\\n") == b"Thank you for your message x\\n"
"""
)

# Auto mode: no markers at all, so the loop is the default test loop scope.
AUTO_TESTS = (
    HELPERS
    + """
loops = set()


async def test_echo_server(echo_server):
    loops.add(asyncio.get_running_loop())
    await check_echo(echo_server)


async def test_thanks_server(thanks_server):
    loops.add(asyncio.get_running_loop())
    await check_thanks(thanks_server)


async def test_server_factory(server_factory):
    loops.add(asyncio.get_running_loop())
    await check_factory(server_factory)


async def test_threaded_server_in_an_async_test(threaded_echo_server):
    assert await talk(threaded_echo_server.address, b"any loop") == b"any loop"


def test_loops_seen(pytestconfig):
    expected = 1 if pytestconfig.getini("asyncio_default_test_loop_scope") == "session" else 3
    assert len(loops) == expected
"""
)

# Misuse that must fail with a message that says what to do.
MISUSE_TESTS = (
    HELPERS
    + """
import pytest_asyncio


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_server():
    async with TestServer() as server:
        yield server


@pytest.mark.asyncio
async def test_function_loop_uses_module_loop_server(module_server):
    await talk(module_server.address, b"never answered")


def test_sync_test_uses_module_loop_server(module_server):
    talk_blocking(module_server.address, b"never answered")


def test_sync_test_asks_for_an_in_loop_fixture(echo_server):
    pass


@pytest.mark.asyncio(loop_scope="module")
async def test_the_right_loop_still_works(module_server):
    assert await talk(module_server.address, b"ok") == b"ok"
"""
)

# Expectations checked after each test, the opt-out, and the transcript of a failure.
EXPECT_TESTS = (
    HELPERS
    + """
import re


@pytest.mark.asyncio
async def test_met(expect_server):
    expect_server.expect(b"HELLO", ordered=True).respond_with(b"hi\\n")
    expect_server.expect(re.compile(rb"GET \\w+"), ordered=True).respond_with(b"value\\n")
    assert await talk(expect_server.address, b"HELLO\\nGET key\\n") == b"hi\\nvalue\\n"


@pytest.mark.asyncio
async def test_unexpected(expect_server):
    expect_server.expect(b"PING").respond_with(b"PONG\\n")
    assert await talk(expect_server.address, b"PING\\nSURPRISE\\n") == b"PONG\\n"


@pytest.mark.asyncio
async def test_unmet(server_factory):
    server = await server_factory(None, delimiter=b"\\r\\n")
    server.expect(b"QUIT", once=True)


@pytest.mark.asyncio
async def test_handler_error(server_factory):
    async def broken(reader, writer):
        await reader.read(1)
        raise ValueError("the handler broke")

    server = await server_factory(broken)
    await talk(server.address, b"x")
    await server.wait_for_closed(1)


@pytest.mark.aioserver_no_check
@pytest.mark.asyncio
async def test_opted_out(expect_server):
    await talk(expect_server.address, b"SURPRISE\\n")


def test_threaded_unmet(threaded_expect_server):
    threaded_expect_server.expect(b"DATA", once=True)
    assert talk_blocking(threaded_expect_server.address, b"") == b""


@pytest.mark.asyncio
async def test_fails_by_itself(echo_server):
    assert await talk(echo_server.address, b"sent by the client") == b"something else"
"""
)


def test_check_after_the_test_fails_it_and_failures_show_the_transcript(
    pytester: pytest.Pytester,
) -> None:
    make_project(pytester, STRICT_INI)
    pytester.makepyfile(test_expect=EXPECT_TESTS)
    result = run(pytester, "-rf")
    result.assert_outcomes(passed=2, failed=5)
    result.stdout.fnmatch_lines(["aioserver servers checked after teardown: 7"])
    out = result.stdout.str()
    # Each check failure names its problem, with the opt-out.
    result.stdout.fnmatch_lines_random(
        [
            "*<TestServer expectations 127.0.0.1:* serving>: 1 problem(s)",
            "*- unexpected message b'SURPRISE' on connection #0",
            "*- one-shot expectation expect(b'QUIT', once=True) was never met",
            "*- handler error on connection #0: ValueError('the handler broke')",
            "*<ThreadedTestServer expectations 127.0.0.1:* serving>: 1 problem(s)",
            "*- one-shot expectation expect(b'DATA', once=True) was never met",
            "*(opt out with @pytest.mark.aioserver_no_check)",
        ]
    )
    assert "test_opted_out" not in out.split("short test summary info")[1]
    assert "test_met" not in out.split("short test summary info")[1]
    # The report of every failure has the transcript section.
    assert out.count("Captured aioserver call") == 5
    result.stdout.fnmatch_lines(
        [
            "*test_fails_by_itself*",
            "*Captured aioserver call*",
            "<TestServer echo 127.0.0.1:* serving>, 1 connection(s):",
            "connection #0 from 127.0.0.1:*, client closed:",
            "  received 18 bytes: b'sent by the client'",
            "  sent 18 bytes: b'sent by the client'",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*Captured aioserver call*",
            "<TestServer expectations 127.0.0.1:* serving>, 1 connection(s):",
            "connection #0 from 127.0.0.1:*, client closed:",
            "  received 14 bytes: b'PING\\nSURPRISE\\n'",
            "  sent 5 bytes: b'PONG\\n'",
        ]
    )


# The fault proxy's fixtures, in-loop (on the test's loop, whatever its scope) and
# threaded; a synchronous test asking for the in-loop one; a failure's report.
PROXY_TESTS = (
    HELPERS
    + """
from aioserver.testing import ProxyEnding, ProxyFaults


@pytest.mark.asyncio
async def test_fault_proxy_factory(echo_server, fault_proxy_factory):
    proxy = await fault_proxy_factory(echo_server.address, downstream=ProxyFaults(limit_data=2))
    assert proxy.loop is asyncio.get_running_loop()
    assert await talk(proxy.address, b"abc") == b"ab"
    (record,) = await proxy.wait_for_closed(1)
    assert (record.to_service, record.to_client) == (b"abc", b"ab")
    assert record.ended is ProxyEnding.CLOSED_BY_FAULT
    assert fault_proxy_factory.proxies == [proxy]


@pytest.mark.asyncio(loop_scope="module")
async def test_fault_proxy_factory_on_a_module_loop(echo_server, fault_proxy_factory):
    proxy = await fault_proxy_factory(echo_server.address)
    assert proxy.loop is asyncio.get_running_loop()
    assert await talk(proxy.address, b"module") == b"module"


def test_threaded_fault_proxy_factory(threaded_echo_server, threaded_fault_proxy_factory):
    proxy = threaded_fault_proxy_factory(
        threaded_echo_server.address, loop="asyncio", upstream=ProxyFaults(latency=0.05)
    )
    assert talk_blocking(proxy.address, b"sync") == b"sync"
    (record,) = proxy.wait_for_closed(1)
    assert (record.to_service, record.upstream_faults) == (b"sync", ("latency",))


def test_sync_test_asks_for_the_in_loop_factory(fault_proxy_factory):
    pass


@pytest.mark.asyncio
async def test_a_failure_shows_what_the_proxy_carried(echo_server, fault_proxy_factory):
    proxy = await fault_proxy_factory(echo_server.address)
    assert await talk(proxy.address, b"seen") == b"not this"
"""
)


def test_fault_proxy_fixtures(pytester: pytest.Pytester) -> None:
    make_project(pytester, STRICT_INI)
    pytester.makepyfile(test_proxy=PROXY_TESTS)
    result = run(pytester, "-rfE")
    result.assert_outcomes(passed=3, failed=1, errors=1)
    # 4 echo servers and 4 proxies, each stopped with nothing left behind.
    result.stdout.fnmatch_lines(["aioserver servers checked after teardown: 8"])
    result.stdout.fnmatch_lines(
        [
            "*fault_proxy_factory runs on the event loop of an asyncio test, but "
            "test_proxy.py::test_sync_test_asks_for_the_in_loop_factory is not one*"
            "threaded_fault_proxy_factory*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*test_a_failure_shows_what_the_proxy_carried*",
            "*Captured aioserver call*",
            "<TestServer echo 127.0.0.1:* serving>, 1 connection(s):",
            "*",
            "<FaultProxy 127.0.0.1:* -> 127.0.0.1:* serving>, 1 connection(s):",
            "connection #0 from 127.0.0.1:*, client closed:",
            "  from the client 4 bytes: b'seen'",
            "  to the service 4 bytes: b'seen'",
            "  from the service 4 bytes: b'seen'",
            "  to the client 4 bytes: b'seen'",
        ]
    )


README = Path(__file__).resolve().parent.parent / "README.md"
# What a README test module may import besides the standard library: what an
# empty project that installs only aioserver (with its pytest extra) has, and
# redis-py for the fault proxy's example.
README_PACKAGES = {"aioserver", "pytest", "pytest_asyncio", "redis"}


def readme_test_modules() -> list[str]:
    """Every test module (python block) of the README's "Use it in your tests" section."""
    section = README.read_text().split("## Use it in your tests", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def imported_packages(module: str) -> set[str]:
    return {name.split(".")[0] for name in re.findall(r"^(?:from|import) (\w[\w.]*)", module, re.M)}


def test_the_readme_modules_import_only_aioserver_pytest_and_redis() -> None:
    modules = readme_test_modules()
    assert len(modules) >= 2, "expected the README's test modules, the fault proxy's among them"
    for module in modules:
        imported = imported_packages(module)
        assert imported - README_PACKAGES <= set(sys.stdlib_module_names), imported
    assert any("FaultProxyFactory" in module for module in modules)


def make_project(pytester: pytest.Pytester, ini: str, conftest: str = CONFTEST) -> None:
    pytester.makeini("[pytest]\nfilterwarnings = error\n" + ini)
    pytester.makeconftest(conftest)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=RUN_TIMEOUT)


STRICT_INI = "asyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"


def test_strict_mode_with_every_loop_scope(pytester: pytest.Pytester) -> None:
    make_project(pytester, STRICT_INI)
    pytester.makepyfile(test_async=STRICT_TESTS, test_sync=SYNC_TESTS)
    result = run(pytester)
    result.assert_outcomes(passed=14)
    # 16 in-loop servers (the project's own shared one aside) and 3 threaded ones.
    result.stdout.fnmatch_lines(["aioserver servers checked after teardown: 19"])


def test_strict_mode_on_asyncio_and_uvloop(pytester: pytest.Pytester) -> None:
    make_project(pytester, STRICT_INI, UVLOOP_CONFTEST)
    pytester.makepyfile(test_async=STRICT_TESTS)
    result = run(pytester)
    result.assert_outcomes(passed=22)
    result.stdout.fnmatch_lines(["aioserver servers checked after teardown: 32"])


@pytest.mark.parametrize(
    ("fixture_loop_scope", "test_loop_scope"),
    [("function", "function"), ("session", "function"), ("function", "session")],
    ids=["default", "wide-fixture-default", "session-tests"],
)
def test_auto_mode(
    pytester: pytest.Pytester, fixture_loop_scope: str, test_loop_scope: str
) -> None:
    make_project(
        pytester,
        "asyncio_mode = auto\n"
        f"asyncio_default_fixture_loop_scope = {fixture_loop_scope}\n"
        f"asyncio_default_test_loop_scope = {test_loop_scope}\n",
    )
    pytester.makepyfile(test_auto=AUTO_TESTS, test_sync=SYNC_TESTS)
    result = run(pytester)
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["aioserver servers checked after teardown: 8"])


def test_threaded_fixtures_need_no_pytest_asyncio(pytester: pytest.Pytester) -> None:
    make_project(pytester, "")
    pytester.makepyfile(
        test_sync=SYNC_TESTS
        + """

def test_in_loop_fixture_without_pytest_asyncio(echo_server):
    pass
"""
    )
    result = run(pytester, "-p", "no:asyncio")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        ["*echo_server runs on the event loop of an asyncio test and needs pytest-asyncio*"]
    )


def test_misuse_fails_with_a_clear_message(pytester: pytest.Pytester) -> None:
    make_project(pytester, STRICT_INI)
    pytester.makepyfile(test_misuse=MISUSE_TESTS)
    result = run(pytester, "-rfE")
    result.assert_outcomes(passed=1, failed=2, errors=1)
    result.stdout.fnmatch_lines_random(
        [
            "*WrongLoopError: port: <TestServer echo 127.0.0.1:* serving> runs on the event "
            "loop it was started on*",
            "*test_sync_test_uses_module_loop_server is a synchronous test, but its fixture "
            "'module_server' is <TestServer echo*an in-loop server whose event loop does not "
            "run during the test*",
            "*echo_server runs on the event loop of an asyncio test, but "
            "test_misuse.py::test_sync_test_asks_for_an_in_loop_fixture is not one*"
            "threaded_echo_server*",
        ]
    )
    result.stdout.no_fnmatch_line("*attached to a different loop*")


@pytest.mark.parametrize("mode", ["strict", "auto"])
@pytest.mark.parametrize("number", range(len(readme_test_modules())))
def test_the_readme_example_passes(pytester: pytest.Pytester, mode: str, number: int) -> None:
    module = readme_test_modules()[number]
    if "redis" in imported_packages(module) and shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs Debian's redis-server)")
    make_project(
        pytester, f"asyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_readme=module)
    result = run(pytester)
    tests = len(re.findall(r"^(?:async )?def test_", module, re.M))
    result.assert_outcomes(passed=tests)
    # Each test there uses one server or proxy from the fixtures, stopped cleanly.
    result.stdout.fnmatch_lines([f"aioserver servers checked after teardown: {tests}"])


# The fixtures in this very suite too: strict mode, each test on asyncio and uvloop.


@pytest.mark.asyncio
async def test_in_loop_fixtures_in_process(
    echo_server: TestServer, thanks_server: TestServer
) -> None:
    loop = asyncio.get_running_loop()
    assert echo_server.loop is thanks_server.loop is loop
    reader, writer = await asyncio.open_connection(*echo_server.address)
    writer.write(b"echo")
    assert await reader.readexactly(4) == b"echo"
    writer.close()
    await writer.wait_closed()
    reader, writer = await asyncio.open_connection(*thanks_server.address)
    writer.write(b"hi\n")
    assert await reader.readline() == PREFIX + b"hi\n"
    writer.close()
    await writer.wait_closed()


@pytest.mark.asyncio
async def test_server_factory_in_process(server_factory: ServerFactory) -> None:
    custom = await server_factory(thanks, max_message_size=8)
    assert custom.loop is asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*custom.address)
    writer.write(b"far too long\n")
    assert await reader.read() == b"Error: message longer than 8 bytes\n"
    writer.close()
    await writer.wait_closed()
    (record,) = await custom.wait_for_closed(1)
    assert record.ended is Ending.SERVER_CLOSED
    assert server_factory.servers == [custom]


def talk_blocking(address: tuple[str, int], data: bytes) -> bytes:
    """Send `data`, half-close, and return up to 64 bytes of the reply."""
    with socket.create_connection(address) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return sock.recv(64)


def test_threaded_thanks_server_in_process(threaded_thanks_server: ThreadedTestServer) -> None:
    assert talk_blocking(threaded_thanks_server.address, b"hi\n") == PREFIX + b"hi\n"


def test_threaded_server_factory_in_process(
    threaded_server_factory: ThreadedServerFactory,
) -> None:
    echo_server = threaded_server_factory(loop="asyncio")
    assert talk_blocking(echo_server.address, b"hi\n") == b"hi\n"
    assert threaded_server_factory.servers == [echo_server]
