"""The agent's HTTPS client against a real gateway: kept-alive connections that go stale.

Regression: a fleet of 5,000 simulated devices fetched its first tokens, the gateway
closed the idle connections (close_notify after `http_idle_timeout`, its FIN 30 s
later), and every device's refresh then reused its dead connection and failed with
`SSLEOFError`, which the client did not retry: the whole fleet's tokens expired.
"""

from __future__ import annotations

import asyncio
import select
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.gateway_client import GatewayClient, OneWriteHTTPSConnection
from agent.tokens import TokenKeeper
from gateway.statedir import StateDir
from gateway.tls import client_context, server_context
from tests.gatewayproc import GatewayProcess, init_gateway, running_gateway, start_gateway
from tests.test_est_http import enroll_ok

DEVICE = "dev-keepalive"


@pytest.fixture
def gw_root(tmp_path: Path) -> Path:
    return init_gateway(tmp_path / "gw")


@pytest.fixture
def gw(gw_root: Path) -> Iterator[GatewayProcess]:
    with running_gateway(gw_root, env={"GATEPASS_HTTP_IDLE_TIMEOUT": "1"}) as proc:
        yield proc


@pytest.fixture
def clients() -> Iterator[list[GatewayClient]]:
    made: list[GatewayClient] = []
    yield made
    for client in made:
        client.close()


def device_client(
    gw: GatewayProcess, work: Path, made: list[GatewayClient], **kwargs: Any
) -> GatewayClient:
    key, cert = enroll_ok(gw, work, DEVICE)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(gw.ca))
    ctx.load_cert_chain(str(cert), str(key))
    client = GatewayClient(f"https://127.0.0.1:{gw.https_port}", ctx, **kwargs)
    made.append(client)
    return client


def kept_alive_socket(client: GatewayClient) -> ssl.SSLSocket:
    conn = client._conn  # the test looks at the connection the client keeps
    assert conn is not None and isinstance(conn.sock, ssl.SSLSocket)
    return conn.sock


def test_token_after_the_gateway_restarted_under_a_kept_alive_connection(
    gw_root: Path, tmp_path: Path, clients: list[GatewayClient]
) -> None:
    # A killed gateway's sockets end with a FIN and no close_notify: reusing such a
    # connection fails with SSLEOFError, as it does 30 s after an idle close.
    first = start_gateway(gw_root)
    second: GatewayProcess | None = None
    try:
        client = device_client(first, tmp_path, clients, idle_reuse=3600)  # always reuse
        assert client.token(DEVICE).access_token
        old = kept_alive_socket(client)
        first.stop(signal.SIGKILL)
        second = start_gateway(gw_root, https_port=first.https_port)
        assert client.token(DEVICE).access_token
        assert kept_alive_socket(client) is not old
    finally:
        for proc in (first, second):
            if proc is not None and proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait(timeout=10)


def test_reused_connection_closed_by_the_gateway_is_retried(
    gw: GatewayProcess, tmp_path: Path, clients: list[GatewayClient]
) -> None:
    client = device_client(gw, tmp_path, clients, idle_reuse=3600)  # always reuse: force the retry
    assert client.token(DEVICE).access_token
    sock = kept_alive_socket(client)
    # The gateway's idle timeout is 1 s: wait (with a deadline) for its close_notify.
    readable, _, _ = select.select([sock], [], [], 10)
    assert readable, "the gateway did not close the idle connection"
    grant = client.token(DEVICE)
    assert grant.access_token
    assert kept_alive_socket(client) is not sock  # a fresh connection served the retry


def test_idle_connection_is_not_reused(
    gw: GatewayProcess, tmp_path: Path, clients: list[GatewayClient]
) -> None:
    now = [1000.0]
    client = device_client(gw, tmp_path, clients, idle_reuse=20, clock=lambda: now[0])
    client.token(DEVICE)
    sock = kept_alive_socket(client)
    now[0] += 19.9
    client.token(DEVICE)
    assert kept_alive_socket(client) is sock
    now[0] += 20
    client.token(DEVICE)
    assert kept_alive_socket(client) is not sock
    assert sock.fileno() == -1  # the stale one was closed, not leaked


def test_fresh_connection_is_reused_within_the_idle_limit(
    gw: GatewayProcess, tmp_path: Path, clients: list[GatewayClient]
) -> None:
    client = device_client(gw, tmp_path, clients)
    client.token(DEVICE)
    sock = kept_alive_socket(client)
    client.token(DEVICE)
    assert kept_alive_socket(client) is sock


def test_token_keeper_gives_the_connection_back_when_the_next_refresh_is_far(
    gw: GatewayProcess, tmp_path: Path, clients: list[GatewayClient]
) -> None:
    client = device_client(gw, tmp_path, clients)  # gateway's 300 s tokens, 20 s reuse
    keeper = TokenKeeper(client, DEVICE)
    token = asyncio.run(keeper.fetch())
    assert token.expires_at - token.issued_at == 300
    assert client._conn is None  # no descriptor held for the ~200 s until the refresh


def test_token_keeper_keeps_the_connection_when_the_next_refresh_is_near(
    gw: GatewayProcess, tmp_path: Path, clients: list[GatewayClient]
) -> None:
    client = device_client(gw, tmp_path, clients, idle_reuse=3600)
    asyncio.run(TokenKeeper(client, DEVICE).fetch())
    assert client._conn is not None


def test_a_request_leaves_in_one_tls_record(gw_root: Path) -> None:
    # http.client writes a request's head and body apart: two TLS records, and on the
    # gateway two reads and an extra wake-up before the token request is whole.
    state = StateDir(gw_root)
    server_ctx = server_context(state.server_cert, state.server_key, state.ca_cert)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        records: list[bytes] = []

        def serve() -> None:
            raw, _ = listener.accept()
            with server_ctx.wrap_socket(raw, server_side=True) as tls:
                records.append(tls.recv(65536))  # one record's plaintext at most
                tls.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        conn = OneWriteHTTPSConnection(
            "127.0.0.1", port, context=client_context(state.ca_cert), timeout=10
        )
        try:
            body = b"grant_type=client_credentials"
            conn.request("POST", "/oauth2/token", body=body, headers={"X-Test": "1"})
            assert conn.getresponse().status == 204
        finally:
            conn.close()
        server.join(timeout=10)
    assert records and records[0].startswith(b"POST /oauth2/token HTTP/1.1\r\n")
    assert records[0].endswith(b"\r\n\r\n" + body)
