"""TLS policy of both gateway listeners (HTTPS and MQTT).

Owns: building the server `ssl.SSLContext` (TLS 1.2 and 1.3 only, ECDHE with AEAD
ciphers only, no renegotiation, no compression, client certificates verified against
the device CA alone, never the system roots), and reading the peer certificate of a
connection. Must not: decide whether a verified certificate is still acceptable
(revocation, device status): that is the registry's and the token service's job.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["AEAD_CIPHERS", "client_context", "server_context"]

# TLS 1.2 suites: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 only.
# TLS 1.3 suites are all AEAD and are left at OpenSSL's defaults.
AEAD_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


def server_context(
    cert_file: Path,
    key_file: Path,
    client_ca_file: Path,
    *,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A server context that asks for (or requires) a client certificate from the device CA.

    The HTTPS listener asks without requiring (EST `simpleenroll` and discovery
    endpoints are reached without a certificate); endpoints that need one check it.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(AEAD_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    # One TLS 1.3 ticket per handshake, not OpenSSL's two: an agent keeps only its last
    # one (`agent.tls_resumption`), and each ticket costs an encryption and a record.
    ctx.num_tickets = 1
    ctx.load_cert_chain(str(cert_file), str(key_file))
    # Only the device CA: load_verify_locations on a fresh context never adds system roots.
    ctx.load_verify_locations(cafile=str(client_ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def client_context(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A client context with the same policy that trusts only `ca_file` (tests and tools)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(AEAD_CIPHERS)
    ctx.load_verify_locations(cafile=str(ca_file))
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx
