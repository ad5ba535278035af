"""TLS session resumption on the agent's connections, against a real gateway process.

A resumed connection must skip the full handshake (that is its point: a fleet's
refresh window is mostly handshakes) and must change nothing the gateway checks: the
token is bound to the same certificate, the broker accepts the CONNECT, a revoked
device is refused, and a renewed certificate (a new `SSLContext`) is never hidden
behind an old session.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.errors import GatewayRefused
from agent.gateway_client import GatewayClient
from agent.mqtt_link import MqttLink
from agent.tls_resumption import SessionSlot
from shared.pki import x5t_s256
from tests.gatewayproc import GatewayProcess, init_gateway, running_gateway
from tests.test_est_http import enroll_ok

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = init_gateway(tmp_path_factory.mktemp("resume") / "gw", "token_burst = 50")
    with running_gateway(root) as gateway:
        yield gateway


def device_context(gw: GatewayProcess, key: Path, cert: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(gw.ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def fresh_connection_client(gw: GatewayProcess, ctx: ssl.SSLContext) -> GatewayClient:
    # idle_reuse=0: every request on a new connection, as a device's token refresh is.
    return GatewayClient(f"https://127.0.0.1:{gw.https_port}", ctx, idle_reuse=0)


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def resumed(client: GatewayClient) -> bool:
    conn = client._conn  # the test looks at the connection the client keeps
    assert conn is not None and isinstance(conn.sock, ssl.SSLSocket)
    return bool(conn.sock.session_reused)


def test_token_refresh_resumes_and_stays_bound_to_the_certificate(
    gw: GatewayProcess, tmp_path: Path
) -> None:
    key, cert = enroll_ok(gw, tmp_path, "dev-resume-http")
    thumbprint = x5t_s256(x509.load_pem_x509_certificate(cert.read_bytes()))
    client = fresh_connection_client(gw, device_context(gw, key, cert))
    try:
        first = client.token("dev-resume-http")
        assert not resumed(client)
        second = client.token("dev-resume-http")
        assert resumed(client)
        for grant in (first, second):
            assert claims(grant.access_token)["cnf"] == {"x5t#S256": thumbprint}
        assert claims(second.access_token)["jti"] != claims(first.access_token)["jti"]
    finally:
        client.close()


def test_a_revoked_device_is_refused_on_a_resumed_connection(
    gw: GatewayProcess, tmp_path: Path
) -> None:
    key, cert = enroll_ok(gw, tmp_path, "dev-resume-revoked")
    client = fresh_connection_client(gw, device_context(gw, key, cert))
    try:
        client.token("dev-resume-revoked")
        gw.admin("device", "revoke", "dev-resume-revoked")
        with pytest.raises(GatewayRefused) as info:
            client.token("dev-resume-revoked")
        assert resumed(client)
        assert info.value.status == 401
    finally:
        client.close()


def test_a_new_context_is_never_resumed(gw: GatewayProcess, tmp_path: Path) -> None:
    # After a certificate renewal the agent builds a new context: the new certificate
    # must be presented in a full handshake, not hidden behind the old session.
    key, cert = enroll_ok(gw, tmp_path, "dev-resume-renewed")
    slot = SessionSlot()
    old, new = device_context(gw, key, cert), device_context(gw, key, cert)
    with socket.create_connection(("127.0.0.1", gw.https_port)) as raw:
        with old.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert tls.recv(65536).startswith(b"HTTP/1.1 200")
            slot.keep(tls)
    assert slot.offer(old) is not None
    assert slot.offer(new) is None


def test_a_tls_1_2_session_is_not_kept(gw: GatewayProcess, tmp_path: Path) -> None:
    # TLS 1.2 tickets resume without a key exchange (no forward secrecy): never offered.
    key, cert = enroll_ok(gw, tmp_path, "dev-resume-tls12")
    ctx = device_context(gw, key, cert)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    slot = SessionSlot()
    with socket.create_connection(("127.0.0.1", gw.https_port)) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert tls.recv(65536).startswith(b"HTTP/1.1 200")
            assert tls.version() == "TLSv1.2" and tls.session is not None
            slot.keep(tls)
    assert slot.offer(ctx) is None


async def test_mqtt_reconnect_resumes_and_the_broker_accepts_it(
    gw: GatewayProcess, tmp_path: Path
) -> None:
    name = "dev-resume-mqtt"
    key, cert = enroll_ok(gw, tmp_path, name)
    ctx = device_context(gw, key, cert)
    client = fresh_connection_client(gw, ctx)
    link = MqttLink()
    try:
        for expect_resumed in (False, True, True):
            token = client.token(name).access_token
            await link.connect(
                "127.0.0.1",
                gw.mqtt_port,
                client_id=name,
                username=name,
                password=token,
                tls_context=ctx,
                timeout=20,
            )
            assert link.resumed is expect_resumed
            await link.publish(f"devices/{name}/telemetry", b'{"n":1}', qos=1)
            await link.disconnect()
    finally:
        link.abort()
        client.close()
