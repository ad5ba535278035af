"""The OAuth token endpoint against a real gateway, with `curl`, `openssl` and joserfc."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet as JoseKeySet

from tests.gatewayproc import GatewayProcess, init_gateway, running_gateway, wait_for
from tests.test_est_http import curl, enroll_ok, sh

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = init_gateway(
        tmp_path_factory.mktemp("tok") / "gw", "token_burst = 3", "token_rate_per_minute = 1.0"
    )
    with running_gateway(root) as gateway:
        yield gateway


def get_token(
    gw: GatewayProcess,
    cert: Path | None,
    key: Path | None,
    form: str = "grant_type=client_credentials",
    *extra: str,
) -> tuple[int, dict[str, object], str]:
    args = ["-H", "Content-Type: application/x-www-form-urlencoded", "--data", form, *extra]
    if cert is not None and key is not None:
        args = ["--cert", str(cert), "--key", str(key), *args]
    status, body, head = curl(gw, "/oauth2/token", *args)
    return status, json.loads(body), head


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_token_with_curl_verified_by_joserfc(gw: GatewayProcess, tmp_path: Path) -> None:
    key, cert = enroll_ok(gw, tmp_path, "tok-1")
    status, body, head = get_token(gw, cert, key)
    assert status == 200, body
    assert "Cache-Control: no-store" in head
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    token = str(body["access_token"])

    status, jwks_body, _ = curl(gw, "/.well-known/jwks.json")
    assert status == 200
    keys = JoseKeySet.import_key_set(json.loads(jwks_body))
    decoded = jose_jwt.decode(token, keys, algorithms=["ES256"])
    assert decoded.header["typ"] == "at+jwt" and decoded.header["alg"] == "ES256"
    claims = decoded.claims
    assert claims["sub"] == claims["client_id"] == "tok-1"
    assert claims["aud"] == "gatepass-mqtt"
    assert claims["exp"] - claims["iat"] == 300
    assert {"permission": "allow", "action": "publish", "topic": "devices/tok-1/#"} in claims["acl"]

    der = sh("openssl", "x509", "-in", str(cert), "-outform", "DER").stdout
    digest = sh("openssl", "dgst", "-sha256", "-binary", input=der).stdout
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert claims["cnf"] == {"x5t#S256": expected}


def test_metadata(gw: GatewayProcess) -> None:
    status, body, _ = curl(gw, "/.well-known/oauth-authorization-server")
    assert status == 200
    meta = json.loads(body)
    assert meta["token_endpoint_auth_methods_supported"] == ["tls_client_auth"]
    assert meta["tls_client_certificate_bound_access_tokens"] is True
    assert meta["token_endpoint"].endswith("/oauth2/token")
    assert meta["jwks_uri"].endswith("/.well-known/jwks.json")
    assert meta["mqtt_uri"] == f"mqtts://127.0.0.1:{gw.mqtt_port}"


def test_refusals(gw: GatewayProcess, tmp_path: Path) -> None:
    key, cert = enroll_ok(gw, tmp_path, "tok-2")
    # No certificate.
    status, body, _ = get_token(gw, None, None)
    assert (status, body["error"]) == (401, "invalid_client")
    # Wrong grant type, missing grant type, client_id of another device.
    status, body, _ = get_token(gw, cert, key, "grant_type=password")
    assert (status, body["error"]) == (400, "unsupported_grant_type")
    status, body, _ = get_token(gw, cert, key, "scope=x")
    assert (status, body["error"]) == (400, "invalid_request")
    status, body, _ = get_token(gw, cert, key, "grant_type=client_credentials&client_id=tok-1")
    assert (status, body["error"]) == (401, "invalid_client")
    # Oversized body.
    big = tmp_path / "big"
    big.write_text("grant_type=client_credentials&pad=" + "x" * 100_000)
    status, _, _ = curl(
        gw,
        "/oauth2/token",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "-H",
        "Content-Type: application/x-www-form-urlencoded",
        "--data-binary",
        f"@{big}",
    )
    assert status == 413


def test_foreign_ca_fails_handshake(gw: GatewayProcess, tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    cert = tmp_path / "c.pem"
    proc = sh(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-subj",
        "/CN=tok-1",
        "-days",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    result = sh(
        "curl",
        "-sS",
        "--cacert",
        str(gw.ca),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--data",
        "grant_type=client_credentials",
        f"{gw.https_url}/oauth2/token",
    )
    assert result.returncode != 0  # TLS alert: unknown CA


def test_revoked_device_refused(gw: GatewayProcess, tmp_path: Path) -> None:
    key, cert = enroll_ok(gw, tmp_path, "tok-rev")
    assert get_token(gw, cert, key)[0] == 200
    gw.admin("device", "revoke", "tok-rev")
    status, body, _ = get_token(gw, cert, key)
    assert (status, body["error"]) == (401, "invalid_client")


def test_rate_limit(gw: GatewayProcess, tmp_path: Path) -> None:
    key, cert = enroll_ok(gw, tmp_path, "tok-rate")
    statuses = [get_token(gw, cert, key) for _ in range(5)]
    assert [s for s, _, _ in statuses[:3]] == [200, 200, 200]
    status, body, head = statuses[3]
    assert status == 429 and "Retry-After:" in head
    assert body["error"] == "slow_down"


def test_rotation_and_retirement(gw: GatewayProcess, tmp_path: Path) -> None:
    key, cert = enroll_ok(gw, tmp_path, "tok-rot")
    old = str(get_token(gw, cert, key)[1]["access_token"])
    old_kid = json.loads(b64url_decode(old.split(".")[0]))["kid"]
    new_kid = json.loads(gw.admin("keys", "rotate", "--json").stdout)["current"]

    def jwks_kids() -> set[str]:
        return {k["kid"] for k in json.loads(curl(gw, "/.well-known/jwks.json")[1])["keys"]}

    wait_for(lambda: new_kid in jwks_kids())
    assert old_kid in jwks_kids()  # old tokens keep verifying until they expire
    new = str(get_token(gw, cert, key)[1]["access_token"])
    assert json.loads(b64url_decode(new.split(".")[0]))["kid"] == new_kid
    gw.admin("keys", "retire", old_kid, "--now")
    wait_for(lambda: old_kid not in jwks_kids())
    listed = json.loads(gw.admin("keys", "list", "--json").stdout)
    assert {k["kid"]: k["state"] for k in listed}[old_kid] == "retired"


def test_expired_certificate_refused(tmp_path: Path) -> None:
    root = init_gateway(tmp_path / "gw", "cert_validity_days = 0.00005")  # about 4 seconds
    with running_gateway(root) as gw:
        key, cert = enroll_ok(gw, tmp_path, "tok-exp")

        def refused() -> bool:
            result = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--cacert",
                    str(gw.ca),
                    "--cert",
                    str(cert),
                    "--key",
                    str(key),
                    "--data",
                    "grant_type=client_credentials",
                    f"{gw.https_url}/oauth2/token",
                ],
                capture_output=True,
                timeout=30,
                check=False,
            )
            return result.returncode != 0 or b"invalid_client" in result.stdout

        wait_for(refused, timeout=30)


def test_automatic_rotation(tmp_path: Path) -> None:
    root = init_gateway(tmp_path / "gw", "key_rotation_days = 0.00005")  # about 4 s
    with running_gateway(root) as gw:
        first = json.loads(gw.admin("keys", "list", "--json").stdout)
        assert [k["state"] for k in first] == ["current"]

        def rotated() -> bool:
            keys = json.loads(gw.admin("keys", "list", "--json").stdout)
            return len(keys) >= 2 and first[0]["kid"] in {
                k["kid"] for k in keys if k["state"] == "previous"
            }

        wait_for(rotated, timeout=30)
        kids = {k["kid"] for k in json.loads(curl(gw, "/.well-known/jwks.json")[1])["keys"]}
        assert first[0]["kid"] in kids and len(kids) >= 2


def test_metrics_count_tokens(gw: GatewayProcess) -> None:
    assert get_token(gw, None, None)[0] == 401
    _, body, head = curl(gw, "/metrics")
    text = body.decode()
    assert "text/plain" in head
    assert "gatepass_tokens_issued_total" in text
    assert 'gatepass_tokens_refused_total{reason="invalid_client"}' in text
    assert "gatepass_token_issue_seconds_bucket" in text
