"""Who may connect: allow/deny, connections per client, and mutual TLS.

Real sockets on loopback: clients bind to source addresses 127.0.0.2,
127.0.0.3 (all of 127.0.0.0/8 is loopback on Linux) before connecting, so the
server sees distinct client addresses. The async tests run on both loops; the
command's own tests start it in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from aioserver import Server, serve, thanks

from .helpers import (
    PREFIX,
    ExceptionRecorder,
    StartServer,
    close,
    make_client_context,
    make_server_context,
    run_aioserver,
    wait_until,
)

BUSY = b"Error: server busy\n"
ACCESS_LINE = re.compile(
    r"^(?P<peer>\S+) closed after [\d.]+ s, \d+ bytes in, \d+ bytes out: (?P<rest>.*)$"
)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "aioserver.access"]


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def open_from(
    source: str, port: int, **options: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connected to 127.0.0.1:`port` from the address `source`."""
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0), **options), 5
    )


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> bytes:
    writer.write(line)
    return await asyncio.wait_for(reader.readline(), 5)


async def everything(reader: asyncio.StreamReader) -> bytes:
    """What the server sends until it ends the connection (b"" if it reset it
    before sending anything)."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b""


# 1. allow and deny.


@pytest.mark.asyncio
async def test_allow_and_deny_by_source_address_deny_wins(
    caplog: pytest.LogCaptureFixture, loop_errors: ExceptionRecorder
) -> None:
    """allow=127.0.0.0/30 and deny=127.0.0.2: clients from .1 and .3 are served;
    .2 (allowed, but denied: deny wins) and .5 (outside allow) are closed at once
    without a byte, not even the busy line, counted as turned away, with one
    warning for the burst and no access-log line."""
    caplog.set_level(logging.INFO, logger="aioserver")
    async with serve(
        thanks, port=0, allow=["127.0.0.0/30"], deny=["127.0.0.2"], idle_timeout=30
    ) as server:
        assert server.port is not None
        for source in ("127.0.0.1", "127.0.0.3"):
            reader, writer = await open_from(source, server.port)
            assert await ask(reader, writer, b"hello\n") == PREFIX + b"hello\n"
            await close(writer)
        for source in ("127.0.0.2", "127.0.0.5"):
            reader, writer = await open_from(source, server.port)
            assert await everything(reader) == b""
            await close(writer)
        await wait_until(lambda: server.stats.active == 0, what="every client gone")
        assert (server.stats.total, server.stats.rejected) == (2, 2)
    warnings = warnings_logged(caplog)
    assert warnings == ["Turning clients away: client 127.0.0.2 refused by allow/deny"]
    peers = [ACCESS_LINE.match(line)["peer"] for line in access_lines(caplog)]  # type: ignore[index]
    assert [peer.rpartition(":")[0] for peer in peers] == ["127.0.0.1", "127.0.0.3"]
    assert "Turned away 2 client(s)" in caplog.text
    assert loop_errors.contexts == []


@pytest.mark.asyncio
async def test_deny_star_refuses_everyone_and_allow_star_lets_everyone_in() -> None:
    async with serve(thanks, port=0, deny=["*"]) as server:
        assert server.port is not None
        reader, writer = await open_from("127.0.0.3", server.port)
        assert await everything(reader) == b""
        await close(writer)
    async with serve(thanks, port=0, allow=["*"]) as server:
        assert server.port is not None
        reader, writer = await open_from("127.0.0.3", server.port)
        assert await ask(reader, writer, b"in\n") == PREFIX + b"in\n"
        await close(writer)


# 2. Connections per client.


@pytest.mark.asyncio
async def test_max_connections_per_client_turns_away_the_second_from_one_address(
    caplog: pytest.LogCaptureFixture, loop_errors: ExceptionRecorder
) -> None:
    """max_connections_per_client=1: with a client from 127.0.0.2 served, a second
    one from .2 reads the busy line (even having sent its line first) then EOF;
    one from .3 is served meanwhile. Once the first .2 client has gone, .2 is
    served again: the count follows the connections."""
    caplog.set_level(logging.INFO, logger="aioserver")
    async with serve(thanks, port=0, max_connections_per_client=1) as server:
        assert server.port is not None
        first_reader, first_writer = await open_from("127.0.0.2", server.port)
        assert await ask(first_reader, first_writer, b"first\n") == PREFIX + b"first\n"

        second_reader, second_writer = await open_from("127.0.0.2", server.port)
        second_writer.write(b"second\n")
        assert await everything(second_reader) == BUSY
        await close(second_writer)

        other_reader, other_writer = await open_from("127.0.0.3", server.port)
        assert await ask(other_reader, other_writer, b"other\n") == PREFIX + b"other\n"
        assert await ask(first_reader, first_writer, b"still\n") == PREFIX + b"still\n"
        assert server.stats.rejected == 1

        await close(first_writer)
        await wait_until(lambda: server.stats.active == 1, what="the first client gone")
        again_reader, again_writer = await open_from("127.0.0.2", server.port)
        assert await ask(again_reader, again_writer, b"again\n") == PREFIX + b"again\n"
        await close(again_writer)
        await close(other_writer)
        await wait_until(lambda: server.stats.active == 0, what="every client gone")
        assert (server.stats.total, server.stats.rejected) == (3, 1)
        assert server._per_client == {}
        assert server._client_of == {}
    assert warnings_logged(caplog) == [
        "Turning clients away: max_connections_per_client=1 reached by 127.0.0.2"
    ]
    assert loop_errors.contexts == []


@pytest.mark.asyncio
async def test_one_warning_per_burst_for_each_reason(
    caplog: pytest.LogCaptureFixture, loop_errors: ExceptionRecorder
) -> None:
    """10 clients denied and 10 over their per-client limit, interleaved, make
    exactly two warnings (one per reason) and, at the stop, one count line each."""
    caplog.set_level(logging.INFO, logger="aioserver")
    async with serve(thanks, port=0, deny=["127.0.0.2"], max_connections_per_client=1) as server:
        assert server.port is not None
        held_reader, held_writer = await open_from("127.0.0.3", server.port)
        assert await ask(held_reader, held_writer, b"held\n") == PREFIX + b"held\n"
        for _ in range(10):
            for source, expected in (("127.0.0.2", b""), ("127.0.0.3", BUSY)):
                reader, writer = await open_from(source, server.port)
                assert await everything(reader) == expected
                await close(writer)
        assert server.stats.rejected == 20
        await close(held_writer)
    warnings = warnings_logged(caplog)
    assert len(warnings) == 2, warnings
    assert "refused by allow/deny" in warnings[0]
    assert "max_connections_per_client=1 reached by 127.0.0.3" in warnings[1]
    counts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Turned away")]
    assert [line.split(" in ")[0] for line in counts] == ["Turned away 10 client(s)"] * 2
    assert loop_errors.contexts == []


@pytest.mark.asyncio
async def test_unix_socket_clients_have_no_address_to_limit(tmp_path: Path) -> None:
    async with serve(
        thanks, unix=tmp_path / "s.sock", max_connections_per_client=1, deny=["*"]
    ) as server:
        clients = [await asyncio.open_unix_connection(str(tmp_path / "s.sock")) for _ in range(2)]
        for index, (reader, writer) in enumerate(clients):
            line = b"%d\n" % index
            assert await ask(reader, writer, line) == PREFIX + line
        for _reader, writer in clients:
            await close(writer)
        assert server.stats.rejected == 0


# 3. Behind a PROXY header: the client it names.


def v1_header(client: str) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 40000 1234\r\n".encode()


@pytest.mark.asyncio
async def test_per_client_limit_is_keyed_by_the_proxy_headers_address(
    caplog: pytest.LogCaptureFixture, loop_errors: ExceptionRecorder
) -> None:
    """Every connection comes from the balancer (127.0.0.1); the limit counts
    the clients the headers name: a second 203.0.113.7 reads the busy line, the
    first .7 and 203.0.113.8 are served."""
    caplog.set_level(logging.INFO, logger="aioserver")
    async with serve(thanks, port=0, proxy_protocol=True, max_connections_per_client=1) as server:
        assert server.port is not None
        first_reader, first_writer = await open_from("127.0.0.1", server.port)
        reply = await ask(first_reader, first_writer, v1_header("203.0.113.7") + b"one\n")
        assert reply == PREFIX + b"one\n"

        second_reader, second_writer = await open_from("127.0.0.1", server.port)
        second_writer.write(v1_header("203.0.113.7") + b"two\n")
        assert await everything(second_reader) == BUSY
        await close(second_writer)

        other_reader, other_writer = await open_from("127.0.0.1", server.port)
        reply = await ask(other_reader, other_writer, v1_header("203.0.113.8") + b"three\n")
        assert reply == PREFIX + b"three\n"
        assert await ask(first_reader, first_writer, b"four\n") == PREFIX + b"four\n"
        await close(first_writer)
        await close(other_writer)
        await wait_until(lambda: server.stats.active == 0, what="every client gone")
        assert (server.stats.total, server.stats.rejected) == (2, 1)
        assert server._per_client == {}
    assert warnings_logged(caplog) == [
        "Turning clients away: max_connections_per_client=1 reached by 203.0.113.7"
    ]
    peers = sorted(ACCESS_LINE.match(line)["peer"] for line in access_lines(caplog))  # type: ignore[index]
    assert peers == ["203.0.113.7:40000", "203.0.113.8:40000"]
    assert loop_errors.contexts == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("header", "served"),
    [
        (v1_header("203.0.113.7"), True),
        (v1_header("203.0.113.9"), False),
        (v1_header("198.51.100.1"), False),
        (b"PROXY UNKNOWN\r\n", True),
    ],
    ids=["allowed", "denied", "outside-allow", "balancers-own-check"],
)
async def test_allow_and_deny_look_at_the_proxy_headers_address(
    header: bytes, served: bool, loop_errors: ExceptionRecorder
) -> None:
    """From the balancer at 127.0.0.1 (outside allow itself): the client the
    header names is checked; a header naming no client (a health check) is the
    balancer's own and is served."""
    async with serve(
        thanks,
        port=0,
        proxy_protocol=True,
        allow=["203.0.113.0/24"],
        deny=["203.0.113.9"],
    ) as server:
        assert server.port is not None
        reader, writer = await open_from("127.0.0.1", server.port)
        writer.write(header + b"hello\n")
        expected = PREFIX + b"hello\n" if served else b""
        if served:
            assert await asyncio.wait_for(reader.readline(), 5) == expected
        else:
            assert await everything(reader) == expected
        await close(writer)
        await wait_until(lambda: server.stats.active == 0, what="the client gone")
        assert server.stats.rejected == (0 if served else 1)
    assert loop_errors.contexts == []


# 4. The library's arguments.


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"allow": ["10.0.0.5/8"]}, "has host bits set"),
        ({"deny": ["nonsense"]}, "is not a CIDR"),
        ({"max_connections_per_client": 0}, "max_connections_per_client must be"),
    ],
    ids=["allow-host-bits", "deny-not-a-cidr", "limit-zero"],
)
def test_bad_library_options_raise_value_error(options: dict[str, Any], phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        Server(thanks, **options)


# 5. Mutual TLS.


@pytest.fixture(scope="module")
def alice(tls_ca: trustme.CA) -> trustme.LeafCert:
    """A client certificate from the server's CA."""
    return tls_ca.issue_cert("alice.example.org", common_name="alice")


def mtls_server_context(
    tls_cert: trustme.LeafCert, tls_ca: trustme.CA, mode: ssl.VerifyMode
) -> ssl.SSLContext:
    """A server context presenting `tls_cert` that checks clients against `tls_ca`."""
    context = make_server_context(tls_cert)
    tls_ca.configure_trust(context)
    context.verify_mode = mode
    return context


def client_context(tls_ca: trustme.CA, cert: trustme.LeafCert | None) -> ssl.SSLContext:
    context = make_client_context(tls_ca)
    if cert is not None:
        cert.configure_cert(context)
    return context


async def whose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Tells the client the commonName of its certificate, or "-"."""
    cert = writer.get_extra_info("peercert")
    names = dict(pair for rdn in cert["subject"] for pair in rdn) if cert else {}
    writer.write(f"{names.get('commonName', '-')}\n".encode())
    await writer.drain()
    writer.close()


async def answer(port: int, context: ssl.SSLContext) -> bytes | None:
    """What the server sends a TLS client until EOF, or None when the handshake
    fails (in TLS 1.3 the client may learn it only at its first read)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context), 5
        )
    except (ssl.SSLError, ConnectionError):
        return None
    try:
        return await asyncio.wait_for(reader.read(), 5) or None
    except (ssl.SSLError, ConnectionError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


@pytest.mark.asyncio
async def test_a_client_certificate_reaches_the_handler_and_the_access_log(
    tls_ca: trustme.CA,
    tls_cert: trustme.LeafCert,
    alice: trustme.LeafCert,
    caplog: pytest.LogCaptureFixture,
    loop_errors: ExceptionRecorder,
) -> None:
    caplog.set_level(logging.INFO, logger="aioserver")
    context = mtls_server_context(tls_cert, tls_ca, ssl.CERT_REQUIRED)
    async with serve(whose, port=0, ssl=context) as server:
        assert server.port is not None
        assert await answer(server.port, client_context(tls_ca, alice)) == b"alice\n"
        await wait_until(lambda: server.stats.active == 0, what="the client gone")
    [line] = access_lines(caplog)
    assert ACCESS_LINE.match(line), line
    assert ": handler returned, client certificate CN=alice," in line, line
    [record] = [r for r in caplog.records if r.name == "aioserver.access"]
    assert getattr(record, "client_cert", "").startswith("CN=alice,")
    assert loop_errors.contexts == []


@pytest.mark.asyncio
@pytest.mark.parametrize("client", ["no-certificate", "another-ca"])
async def test_required_refuses_a_client_without_a_valid_certificate_at_the_handshake(
    client: str,
    tls_ca: trustme.CA,
    tls_cert: trustme.LeafCert,
    caplog: pytest.LogCaptureFixture,
    loop_errors: ExceptionRecorder,
) -> None:
    """Under CERT_REQUIRED a client with no certificate, or one from another CA,
    fails its handshake: the handler never runs, and the access log has exactly
    one line, "TLS handshake failed: ..."."""
    caplog.set_level(logging.INFO, logger="aioserver")
    mallory = trustme.CA().issue_cert("mallory.example.org", common_name="mallory")
    cert = None if client == "no-certificate" else mallory
    context = mtls_server_context(tls_cert, tls_ca, ssl.CERT_REQUIRED)
    async with serve(whose, port=0, ssl=context) as server:
        assert server.port is not None
        assert await answer(server.port, client_context(tls_ca, cert)) is None
        await wait_until(lambda: server.stats.active == 0, what="the client gone")
    lines = access_lines(caplog)
    assert len(lines) == 1, lines
    assert ": TLS handshake failed: " in lines[0], lines
    assert "client certificate" not in lines[0]
    assert loop_errors.contexts == []


@pytest.mark.asyncio
async def test_optional_serves_clients_with_and_without_a_certificate(
    tls_ca: trustme.CA,
    tls_cert: trustme.LeafCert,
    alice: trustme.LeafCert,
    caplog: pytest.LogCaptureFixture,
    loop_errors: ExceptionRecorder,
) -> None:
    caplog.set_level(logging.INFO, logger="aioserver")
    context = mtls_server_context(tls_cert, tls_ca, ssl.CERT_OPTIONAL)
    async with serve(whose, port=0, ssl=context) as server:
        assert server.port is not None
        assert await answer(server.port, client_context(tls_ca, alice)) == b"alice\n"
        assert await answer(server.port, client_context(tls_ca, None)) == b"-\n"
        await wait_until(lambda: server.stats.active == 0, what="the clients gone")
    lines = access_lines(caplog)
    assert len(lines) == 2, lines
    assert sum("client certificate CN=alice," in line for line in lines) == 1, lines
    assert sum(line.endswith(": handler returned") for line in lines) == 1, lines
    assert loop_errors.contexts == []


# 6. The command.


@pytest.fixture
def ca_file(tls_ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


def blocking_exchange(
    port: int, line: bytes, source: str = "127.0.0.1", context: ssl.SSLContext | None = None
) -> bytes | None:
    """Send `line` from `source` (over TLS with `context`) and read one reply
    line; b"" when the server closed without one, None over TLS when the
    handshake failed (in TLS 1.3 the client may learn it as an EOF at its
    first read)."""
    with socket.socket() as raw:
        raw.settimeout(5)
        raw.bind((source, 0))
        raw.connect(("127.0.0.1", port))
        sock: socket.socket = raw
        try:
            if context is not None:
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(line)
            received = b""
            while not received.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        except (ssl.SSLError, ConnectionError):
            return None if context is not None else b""
        finally:
            if sock is not raw:
                sock.close()
        return received or (None if context is not None else b"")


def test_the_command_with_mutual_tls_serves_a_client_with_a_certificate_only(
    start_server: StartServer,
    tls_files: tuple[Path, Path],
    ca_file: Path,
    tls_ca: trustme.CA,
    alice: trustme.LeafCert,
) -> None:
    certfile, keyfile = tls_files
    command = start_server(
        "--port", "0", "--protocol", "thanks", "--certfile", str(certfile),
        "--keyfile", str(keyfile), "--ssl-ca-certs", str(ca_file),
        "--ssl-cert-reqs", "required",
    )  # fmt: skip
    with_cert = blocking_exchange(command.port, b"hi\n", context=client_context(tls_ca, alice))
    assert with_cert == PREFIX + b"hi\n"
    without = blocking_exchange(command.port, b"hi\n", context=client_context(tls_ca, None))
    assert without is None
    command.wait_for_log("client certificate CN=alice,")
    command.wait_for_log("TLS handshake failed")
    command.stop()
    assert command.returncode == 0
    assert command.stderr.count("TLS handshake failed") == 1


def test_the_command_with_allow_deny_and_a_per_client_limit_from_the_environment(
    start_server: StartServer,
) -> None:
    command = start_server(
        "--port", "0", "--protocol", "thanks", "--allow", "127.0.0.0/30", "--deny", "127.0.0.2",
        env={"AIOSERVER_MAX_CONNECTIONS_PER_CLIENT": "1"},
    )  # fmt: skip
    port = command.port
    assert blocking_exchange(port, b"a\n", source="127.0.0.2") == b""
    assert blocking_exchange(port, b"a\n", source="127.0.0.9") == b""
    with socket.socket() as held:
        held.settimeout(5)
        held.bind(("127.0.0.3", 0))
        held.connect(("127.0.0.1", port))
        held.sendall(b"held\n")
        assert held.recv(100) == PREFIX + b"held\n"
        assert blocking_exchange(port, b"b\n", source="127.0.0.3") == BUSY
    assert blocking_exchange(port, b"c\n", source="127.0.0.1") == PREFIX + b"c\n"
    command.wait_for_log("max_connections_per_client=1 reached by 127.0.0.3")
    command.stop()
    assert command.returncode == 0
    assert command.stderr.count("Turning clients away: client 127.0.0.2 refused by allow/deny") == 1
    assert "Turning clients away: client 127.0.0.9" not in command.stderr  # the same burst


def test_help_names_each_option_and_its_variable() -> None:
    result = run_aioserver("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for option, variable in [
        ("--allow CIDR", "[env AIOSERVER_ALLOW; default not set]"),
        ("--deny CIDR", "[env AIOSERVER_DENY; default not set]"),
        ("--max-connections-per-client N", "[env AIOSERVER_MAX_CONNECTIONS_PER_CLIENT;"),
        ("--ssl-ca-certs FILE", "[env AIOSERVER_SSL_CA_CERTS; default not set]"),
        ("--ssl-cert-reqs {none,optional,required}", "[env AIOSERVER_SSL_CERT_REQS; default none]"),
    ]:
        assert option in text
        assert variable in text


@pytest.mark.parametrize(
    ("args", "env", "phrase"),
    [
        (("--allow", "10.0.0.5/8"), {}, "argument --allow: '10.0.0.5/8' has host bits set"),
        (("--deny", "nonsense"), {}, "argument --deny: 'nonsense' is not a CIDR"),
        ((), {"AIOSERVER_DENY": "10.0.0.0/8,bad"}, "argument --deny: 'bad' is not a CIDR"),
        (
            ("--max-connections-per-client", "0"),
            {},
            "argument --max-connections-per-client: expected a number from 1",
        ),
        (("--ssl-cert-reqs", "sometimes"), {}, "argument --ssl-cert-reqs: invalid choice"),
        (
            ("--ssl-cert-reqs", "required"),
            {},
            "argument --ssl-cert-reqs: required needs --ssl-ca-certs",
        ),
        (
            (),
            {"AIOSERVER_SSL_CERT_REQS": "optional"},
            "argument --ssl-cert-reqs: optional needs --ssl-ca-certs",
        ),
    ],
    ids=[
        "allow-host-bits",
        "deny-not-a-cidr",
        "env-deny",
        "limit-zero",
        "cert-reqs-unknown",
        "required-without-ca",
        "env-optional-without-ca",
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    args: tuple[str, ...], env: dict[str, str], phrase: str
) -> None:
    result = run_aioserver("--port", "0", *args, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: aioserver")
    errors = [line for line in result.stderr.splitlines() if "aioserver: error:" in line]
    assert len(errors) == 1, result.stderr
    assert result.stderr.splitlines()[-1] == errors[0]
    assert errors[0].startswith(f"aioserver: error: {phrase}"), errors


@pytest.fixture
def bad_ca_files(tmp_path: Path) -> dict[str, Path]:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    return {"missing": tmp_path / "nowhere.pem", "not-pem": not_pem}


@pytest.mark.parametrize(
    ("which", "phrase"),
    [
        ("missing", "cannot read TLS CA certificates"),
        ("not-pem", "cannot load TLS CA certificates from"),
    ],
)
def test_a_ca_file_that_does_not_load_fails_in_one_line(
    which: str,
    phrase: str,
    bad_ca_files: dict[str, Path],
    tls_files: tuple[Path, Path],
) -> None:
    certfile, keyfile = tls_files
    result = run_aioserver(
        "--port", "0", "--certfile", str(certfile), "--keyfile", str(keyfile),
        "--ssl-ca-certs", str(bad_ca_files[which]), "--ssl-cert-reqs", "required",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"aioserver: error: {phrase}"), result.stderr


def test_ssl_ca_certs_needs_a_certfile(ca_file: Path) -> None:
    result = run_aioserver("--port", "0", "--ssl-ca-certs", str(ca_file))
    assert result.returncode == 1, result.stderr
    assert result.stderr == "aioserver: error: --ssl-ca-certs needs --certfile\n"
