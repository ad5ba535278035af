"""EST enrollment against a real gateway process, with `openssl` and `curl` as clients."""

from __future__ import annotations

import base64
import socket
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gatewayproc import GatewayProcess, init_gateway, running_gateway

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = init_gateway(tmp_path_factory.mktemp("est") / "gw")
    with running_gateway(root) as gateway:
        yield gateway


def sh(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(args), capture_output=True, input=input, timeout=30, check=False)


def make_csr(work: Path, cn: str, *extra: str, keyspec: str = "ec") -> tuple[Path, Path]:
    """An openssl-made key and base64 DER CSR; `keyspec` 'ec' or e.g. 'rsa:1024'."""
    key = work / f"{cn}-{keyspec.replace(':', '')}.key"
    csr_der = work / f"{cn}.csr.der"
    if keyspec == "ec":
        assert (
            sh(
                "openssl",
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                str(key),
            ).returncode
            == 0
        )
        newkey = ["-key", str(key)]
    else:
        newkey = ["-newkey", keyspec, "-nodes", "-keyout", str(key)]
    proc = sh(
        "openssl",
        "req",
        "-new",
        *newkey,
        "-subj",
        f"/CN={cn}",
        "-outform",
        "DER",
        "-out",
        str(csr_der),
        *extra,
    )
    assert proc.returncode == 0, proc.stderr
    b64 = work / f"{cn}.csr.b64"
    b64.write_bytes(base64.encodebytes(csr_der.read_bytes()))
    return key, b64


def curl(
    gw: GatewayProcess, path: str, *args: str, data: Path | None = None
) -> tuple[int, bytes, str]:
    """POST/GET with curl; returns (status, body, headers)."""
    cmd = ["curl", "-sS", "--cacert", str(gw.ca), "-D", "-", "-o", "-", *args]
    if data is not None:
        cmd += ["--data-binary", f"@{data}"]
    proc = sh(*cmd, f"{gw.https_url}{path}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    while out.startswith(b"HTTP/1.1 100"):  # interim answers to Expect: 100-continue
        out = out.partition(b"\r\n\r\n")[2]
    head, _, body = out.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body, head.decode("latin-1")


def enroll(gw: GatewayProcess, device: str, secret: str, csr: Path) -> tuple[int, bytes, str]:
    return curl(
        gw,
        "/.well-known/est/simpleenroll",
        "-u",
        f"{device}:{secret}",
        "-H",
        "Content-Type: application/pkcs10",
        data=csr,
    )


def device_state(gw: GatewayProcess, device: str) -> tuple[str, int]:
    with sqlite3.connect(gw.root / "gateway.db") as db:
        status = db.execute("SELECT status FROM devices WHERE id = ?", (device,)).fetchone()[0]
        certs = db.execute(
            "SELECT COUNT(*) FROM certificates WHERE device_id = ?", (device,)
        ).fetchone()[0]
    return status, certs


def assert_untouched(gw: GatewayProcess, device: str) -> None:
    assert device_state(gw, device) == ("registered", 0)
    status, body, _ = curl(gw, "/healthz")
    assert status == 200 and b"ok" in body


def pkcs7_to_pem(work: Path, body: bytes, name: str) -> Path:
    p7 = work / f"{name}.p7"
    p7.write_bytes(base64.b64decode(body))
    pem = work / f"{name}.pem"
    proc = sh(
        "openssl", "pkcs7", "-inform", "DER", "-in", str(p7), "-print_certs", "-out", str(pem)
    )
    assert proc.returncode == 0, proc.stderr
    return pem


def first_cert(work: Path, bundle: Path, name: str) -> Path:
    """The certificate of `bundle` whose subject is `CN=<name>` (PKCS#7 has no order)."""
    text = bundle.read_text()
    for block in text.split("-----END CERTIFICATE-----")[:-1]:
        pem = block[block.index("-----BEGIN CERTIFICATE-----") :] + "-----END CERTIFICATE-----\n"
        subject = sh("openssl", "x509", "-noout", "-subject", input=pem.encode()).stdout
        if subject.strip() == f"subject=CN = {name}".encode():
            out = work / f"{name}-leaf.pem"
            out.write_text(pem)
            return out
    raise AssertionError(f"no certificate for {name} in {text}")


def register_and_enroll(
    gw: GatewayProcess, work: Path, device: str, *acl: str
) -> tuple[Path, Path, str]:
    """`device add` (with `acl` flags), then enroll with openssl and curl in `work`.

    Returns the key file, the device's certificate file and the response headers.
    """
    work.mkdir(parents=True, exist_ok=True)
    secret = gw.add_device(device, *acl)
    key, csr = make_csr(work, device)
    status, body, head = enroll(gw, device, secret, csr)
    assert status == 200, body
    return key, first_cert(work, pkcs7_to_pem(work, body, device), device), head


def enroll_ok(gw: GatewayProcess, work: Path, device: str) -> tuple[Path, Path]:
    key, cert, head = register_and_enroll(gw, work, device)
    assert "application/pkcs7-mime" in head and "smime-type=certs-only" in head
    return key, cert


def test_cacerts_is_pkcs7_with_the_ca(gw: GatewayProcess, tmp_path: Path) -> None:
    status, body, head = curl(gw, "/.well-known/est/cacerts")
    assert status == 200 and "application/pkcs7-mime" in head
    pem = pkcs7_to_pem(tmp_path, body, "cacerts")
    fp = sh("openssl", "x509", "-in", str(pem), "-noout", "-fingerprint", "-sha256").stdout
    ca_fp = sh("openssl", "x509", "-in", str(gw.ca), "-noout", "-fingerprint", "-sha256").stdout
    assert fp == ca_fp


def test_enroll_with_openssl_and_curl(gw: GatewayProcess, tmp_path: Path) -> None:
    _key, cert = enroll_ok(gw, tmp_path, "dev-openssl")
    verify = sh("openssl", "verify", "-CAfile", str(gw.ca), str(cert))
    assert verify.returncode == 0 and b"OK" in verify.stdout, verify.stdout + verify.stderr
    text = sh("openssl", "x509", "-in", str(cert), "-noout", "-text").stdout.decode()
    assert "Subject: CN = dev-openssl" in text
    assert "URI:urn:gatepass:device:dev-openssl" in text
    assert "TLS Web Client Authentication" in text
    assert "CA:FALSE" in text
    enddate = sh("openssl", "x509", "-in", str(cert), "-noout", "-checkend", str(29 * 86400))
    assert enddate.returncode == 0  # valid for at least 29 more days
    assert (
        sh("openssl", "x509", "-in", str(cert), "-noout", "-checkend", str(31 * 86400)).returncode
        == 1
    )  # and not beyond 30
    assert device_state(gw, "dev-openssl") == ("enrolled", 1)


def test_secret_is_single_use(gw: GatewayProcess, tmp_path: Path) -> None:
    secret = gw.add_device("dev-once")
    _, csr = make_csr(tmp_path, "dev-once")
    assert enroll(gw, "dev-once", secret, csr)[0] == 200
    status, _body, head = enroll(gw, "dev-once", secret, csr)
    assert status == 401 and "WWW-Authenticate: Basic" in head
    assert device_state(gw, "dev-once") == ("enrolled", 1)


def test_wrong_and_missing_secret(gw: GatewayProcess, tmp_path: Path) -> None:
    gw.add_device("dev-wrong")
    _, csr = make_csr(tmp_path, "dev-wrong")
    status, _, head = enroll(gw, "dev-wrong", "not-the-secret", csr)
    assert status == 401 and "WWW-Authenticate: Basic" in head
    status, _, head = curl(
        gw, "/.well-known/est/simpleenroll", "-H", "Content-Type: application/pkcs10", data=csr
    )
    assert status == 401 and "WWW-Authenticate" in head
    assert_untouched(gw, "dev-wrong")


def test_expired_secret(gw: GatewayProcess, tmp_path: Path) -> None:
    secret = gw.add_device("dev-expired")
    with sqlite3.connect(gw.root / "gateway.db") as db:
        db.execute(
            "UPDATE enrollment_secrets SET expires_at = 1 WHERE device_id = ?", ("dev-expired",)
        )
    _, csr = make_csr(tmp_path, "dev-expired")
    assert enroll(gw, "dev-expired", secret, csr)[0] == 401
    assert_untouched(gw, "dev-expired")


@pytest.mark.parametrize(
    ("name", "cn", "extra", "keyspec"),
    [
        ("other-cn", "someone-else", (), "ec"),
        ("ca-true", None, ("-addext", "basicConstraints=critical,CA:TRUE"), "ec"),
        ("rsa1024", None, (), "rsa:1024"),
    ],
)
def test_policy_refusals_are_403(
    gw: GatewayProcess,
    tmp_path: Path,
    name: str,
    cn: str | None,
    extra: tuple[str, ...],
    keyspec: str,
) -> None:
    device = f"dev-{name}"
    secret = gw.add_device(device)
    _, csr = make_csr(tmp_path, cn or device, *extra, keyspec=keyspec)
    status, body, head = enroll(gw, device, secret, csr)
    assert status == 403, body
    assert "text/plain" in head and body.strip()
    assert_untouched(gw, device)


def test_garbage_is_400(gw: GatewayProcess, tmp_path: Path) -> None:
    secret = gw.add_device("dev-garbage")
    junk = tmp_path / "junk"
    junk.write_bytes(b"this is !!! not base64 DER")
    status, body, _ = enroll(gw, "dev-garbage", secret, junk)
    assert status == 400 and body.strip()
    junk.write_bytes(base64.encodebytes(b"\x30\x03\x02\x01\x00"))
    assert enroll(gw, "dev-garbage", secret, junk)[0] == 400
    assert_untouched(gw, "dev-garbage")


def test_huge_body_is_413(gw: GatewayProcess, tmp_path: Path) -> None:
    secret = gw.add_device("dev-huge")
    big = tmp_path / "big"
    big.write_bytes(b"A" * (10 * 1024 * 1024))
    status, _, _ = enroll(gw, "dev-huge", secret, big)
    assert status == 413
    assert_untouched(gw, "dev-huge")


def test_wrong_content_type_is_415(gw: GatewayProcess, tmp_path: Path) -> None:
    secret = gw.add_device("dev-ctype")
    _, csr = make_csr(tmp_path, "dev-ctype")
    status, _, _ = curl(
        gw,
        "/.well-known/est/simpleenroll",
        "-u",
        f"dev-ctype:{secret}",
        "-H",
        "Content-Type: text/plain",
        data=csr,
    )
    assert status == 415
    assert_untouched(gw, "dev-ctype")


def test_wrong_method_is_405(gw: GatewayProcess) -> None:
    assert curl(gw, "/.well-known/est/simpleenroll")[0] == 405


def test_simplereenroll(gw: GatewayProcess, tmp_path: Path) -> None:
    key, cert = enroll_ok(gw, tmp_path, "dev-re")
    _, csr = make_csr(_subdir(tmp_path, "renew"), "dev-re")
    status, body, _ = curl(
        gw,
        "/.well-known/est/simplereenroll",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "-H",
        "Content-Type: application/pkcs10",
        data=csr,
    )
    assert status == 200, body
    assert device_state(gw, "dev-re") == ("enrolled", 2)
    # Another device's certificate cannot renew this device (CSR subject is dev-re).
    other_key, other_cert = enroll_ok(gw, _subdir(tmp_path, "other"), "dev-other")
    status, _, _ = curl(
        gw,
        "/.well-known/est/simplereenroll",
        "--cert",
        str(other_cert),
        "--key",
        str(other_key),
        "-H",
        "Content-Type: application/pkcs10",
        data=csr,
    )
    assert status == 403
    # Without a certificate: 401.
    assert (
        curl(
            gw,
            "/.well-known/est/simplereenroll",
            "-H",
            "Content-Type: application/pkcs10",
            data=csr,
        )[0]
        == 401
    )
    # A revoked certificate cannot renew.
    gw.admin("device", "revoke", "dev-re")
    status, _, _ = curl(
        gw,
        "/.well-known/est/simplereenroll",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "-H",
        "Content-Type: application/pkcs10",
        data=csr,
    )
    assert status == 401
    assert device_state(gw, "dev-re") == ("revoked", 2)


def _subdir(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir(exist_ok=True)
    return path


def test_no_tls11_and_no_cbc(gw: GatewayProcess) -> None:
    target = f"127.0.0.1:{gw.https_port}"
    tls11 = sh("openssl", "s_client", "-connect", target, "-tls1_1", input=b"")
    assert tls11.returncode != 0
    cbc = sh(
        "openssl",
        "s_client",
        "-connect",
        target,
        "-tls1_2",
        "-cipher",
        "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:AES128-SHA",
        input=b"",
    )
    assert cbc.returncode != 0
    good = sh(
        "openssl", "s_client", "-connect", target, "-tls1_2", "-CAfile", str(gw.ca), input=b""
    )
    assert good.returncode == 0 and b"Verify return code: 0 (ok)" in good.stdout


def test_failed_secrets_are_rate_limited_and_counted(tmp_path: Path) -> None:
    root = init_gateway(tmp_path / "gw", "failure_burst = 3", "failure_rate_per_minute = 1.0")
    with running_gateway(root) as gw:
        secret = gw.add_device("dev-brute")
        _, csr = make_csr(tmp_path, "dev-brute")
        statuses = [enroll(gw, "dev-brute", f"guess-{i}", csr)[0] for i in range(4)]
        assert statuses[:3] == [401, 401, 401]
        status, _, head = enroll(gw, "dev-brute", "guess-4", csr)
        assert statuses[3] == 429 and status == 429 and "Retry-After:" in head
        # Even the right secret waits until the bucket refills: nothing is stored.
        assert enroll(gw, "dev-brute", secret, csr)[0] == 429
        assert device_state(gw, "dev-brute") == ("registered", 0)
        for i in range(5):  # held to the limit: counted, but no longer written to disk
            assert enroll(gw, "dev-brute", f"more-{i}", csr)[0] == 429
        with sqlite3.connect(gw.root / "gateway.db") as db:
            audited = db.execute(
                "SELECT outcome, detail FROM audit WHERE device_id = ? AND event = 'enroll'",
                ("dev-brute",),
            ).fetchall()
        assert audited == [("refused", "wrong secret")] * 3
        _, metrics, _ = curl(gw, "/metrics")
        text = metrics.decode()
        assert 'gatepass_enrollments_total{kind="enroll",outcome="refused_401"} 3.0' in text
        assert 'gatepass_enrollments_total{kind="enroll",outcome="refused_429"} 8.0' in text
        assert "gatepass_http_request_seconds_bucket" in text


def test_unfinished_requests_are_closed(tmp_path: Path) -> None:
    root = init_gateway(tmp_path / "gw", "http_idle_timeout = 2.0")
    with running_gateway(root) as gw:
        ctx = ssl.create_default_context(cafile=str(gw.ca))
        for payload in (b"", b"POST /oauth2/token HTTP/1.1\r\nHost: x\r\n"):  # no blank line
            raw = socket.create_connection(("127.0.0.1", gw.https_port), timeout=30)
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(payload)
                started = time.monotonic()
                assert tls.recv(100) == b""  # the gateway closes the connection
                assert 1.5 <= time.monotonic() - started <= 10
        assert curl(gw, "/healthz")[0] == 200  # and keeps serving
