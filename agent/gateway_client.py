"""HTTPS client for the gateway's EST and OAuth endpoints (stdlib `http.client`).

Owns: the requests a device makes (`cacerts`, `simpleenroll`, `simplereenroll`,
`/oauth2/token`), one kept-alive TLS connection per client (a token refresh must not
pay a new mutual-TLS handshake), turning transport and HTTP failures into the agent's
error tree, and measuring the gateway's clock from its `Date` header. Blocking: async
callers run it in a worker thread. Must not: store anything on disk.

Kept-alive connections go stale: the gateway closes one idle for `http_idle_timeout`
(30 s by default; a proxy may close sooner), and a gateway restart closes them all.
Reusing one after the server's FIN fails with `SSLEOFError` or a reset, not with a
clean `RemoteDisconnected`, so a client reuses a connection only while it has been
idle less than `idle_reuse` seconds, and a failure on a reused connection is retried
once on a fresh one. A failure on a fresh connection is the gateway's answer.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.errors import ClockSkew, GatewayRefused, GatewayUnreachable, WrongSecret
from agent.tls_resumption import SessionSlot
from shared.errors import PkiError
from shared.pki import certs_from_pkcs7

__all__ = [
    "MAX_CLOCK_SKEW",
    "GatewayClient",
    "OneWriteHTTPSConnection",
    "Reply",
    "TokenGrant",
]

MAX_CLOCK_SKEW = 60.0
MAX_RESPONSE_BYTES = 1 << 20
IDLE_REUSE_S = 20.0
"""Idle seconds after which a kept-alive connection is not reused (the gateway: 30 s)."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    clock_offset: float | None
    """Gateway time minus local time, from the `Date` header (1 s resolution)."""


@dataclass(frozen=True, slots=True)
class TokenGrant:
    access_token: str
    expires_in: int
    clock_offset: float | None


class OneWriteHTTPSConnection(http.client.HTTPSConnection):
    """An `HTTPSConnection` that sends a request's head and body in one write, and
    may resume a TLS session (`session`, from `agent.tls_resumption`).

    `http.client` writes the head and the body separately: two TLS records, two TCP
    segments, and on the gateway two reads and an extra wake-up before the request is
    whole (a fifth of the token endpoint's server time). Our bodies are small (a form
    or a CSR), so the request is gathered and sent at once.
    """

    _gathered: list[bytes] | None = None

    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext,
        timeout: float,
        session: ssl.SSLSession | None = None,
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._tls_context = context
        self._session = session

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP (and TCP_NODELAY)
        self.sock = self._tls_context.wrap_socket(
            self.sock, server_hostname=self.host, session=self._session
        )

    def request(
        self,
        method: str,
        url: str,
        body: Any = None,
        headers: Mapping[str, Any] = {},  # as in the base class; never mutated
        *,
        encode_chunked: bool = False,
    ) -> None:
        self._gathered = []
        try:
            super().request(method, url, body, headers, encode_chunked=encode_chunked)
            data = b"".join(self._gathered)
        finally:
            self._gathered = None
        super().send(data)

    def send(self, data: Any) -> None:
        if self._gathered is not None and isinstance(data, bytes | bytearray):
            self._gathered.append(bytes(data))
        else:
            super().send(data)


class GatewayClient:
    """Requests to one gateway over one TLS context; thread-safe, one request at a time."""

    def __init__(
        self,
        base_url: str,
        context: ssl.SSLContext,
        timeout: float = 15.0,
        idle_reuse: float = IDLE_REUSE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise GatewayUnreachable(f"gateway URL must be https://HOST[:PORT], not {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 443
        self._context = context
        self._timeout = timeout
        self._idle_reuse = idle_reuse
        self._clock = clock
        self._conn: OneWriteHTTPSConnection | None = None
        self._idle_since = 0.0  # monotonic time the connection's last reply was read
        self._session = SessionSlot()
        self._lock = threading.Lock()

    @property
    def idle_reuse(self) -> float:
        """Idle seconds after which the kept-alive connection is not reused."""
        return self._idle_reuse

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- EST ---------------------------------------------------------------------------

    def cacerts(self) -> list[x509.Certificate]:
        reply = self._request("GET", "/.well-known/est/cacerts")
        return _certificates(reply)

    def simpleenroll(
        self, device_id: str, secret: str, csr: x509.CertificateSigningRequest
    ) -> tuple[list[x509.Certificate], Reply]:
        basic = base64.b64encode(f"{device_id}:{secret}".encode()).decode()
        reply = self._request(
            "POST",
            "/.well-known/est/simpleenroll",
            _csr_body(csr),
            {"Content-Type": "application/pkcs10", "Authorization": f"Basic {basic}"},
        )
        if reply.status == 401:
            raise WrongSecret(
                "enrollment refused: wrong, used or expired secret, or unknown device id", 401
            )
        return _certificates(reply), reply

    def simplereenroll(self, csr: x509.CertificateSigningRequest) -> list[x509.Certificate]:
        reply = self._request(
            "POST",
            "/.well-known/est/simplereenroll",
            _csr_body(csr),
            {"Content-Type": "application/pkcs10"},
        )
        return _certificates(reply)

    # --- OAuth -------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """RFC 8414 metadata; Gatepass adds `mqtt_uri`, where its MQTT listener is."""
        reply = self._request("GET", "/.well-known/oauth-authorization-server")
        if reply.status != 200:
            raise GatewayRefused(f"metadata refused ({reply.status})", reply.status)
        return _json(reply)

    def token(self, device_id: str) -> TokenGrant:
        body = f"grant_type=client_credentials&client_id={device_id}".encode()
        reply = self._request(
            "POST",
            "/oauth2/token",
            body,
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        data = _json(reply)
        if reply.status != 200:
            code = str(data.get("error", "error"))
            detail = str(data.get("error_description", ""))
            raise GatewayRefused(f"token refused: {code} {detail}".strip(), reply.status, code)
        try:
            return TokenGrant(
                str(data["access_token"]), int(data["expires_in"]), reply.clock_offset
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GatewayRefused("token response is malformed", reply.status) from exc

    # --- transport ---------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        with self._lock:
            for attempt in (1, 2):
                reused = self._reusable()
                conn = self._connection()
                try:
                    conn.request(method, path, body=body, headers=headers or {})
                    response = conn.getresponse()
                    data = response.read(MAX_RESPONSE_BYTES)
                except ssl.SSLCertVerificationError as exc:
                    self._drop()
                    raise _verification_error(exc) from exc
                except (OSError, http.client.HTTPException) as exc:
                    self._drop()
                    if isinstance(exc, ssl.SSLError):
                        self._session.forget()  # the next handshake is a full one
                    if reused and attempt == 1:
                        continue  # the gateway had closed the kept-alive connection
                    raise GatewayUnreachable(
                        f"cannot reach the gateway at {self._host}:{self._port}: {_reason(exc)}"
                    ) from exc
                self._idle_since = self._clock()
                if isinstance(conn.sock, ssl.SSLSocket):
                    self._session.keep(conn.sock)  # the ticket came with the reply
                if response.getheader("Connection", "").lower() == "close":
                    self._drop()
                return Reply(response.status, data, _clock_offset(response.getheader("Date")))
        raise AssertionError("unreachable")  # pragma: no cover

    def _reusable(self) -> bool:
        """Whether there is a kept-alive connection fresh enough to reuse (else drop it)."""
        if self._conn is None:
            return False
        if self._clock() - self._idle_since >= self._idle_reuse:
            self._drop()
            return False
        return True

    def _connection(self) -> OneWriteHTTPSConnection:
        if self._conn is None:
            self._conn = OneWriteHTTPSConnection(
                self._host,
                self._port,
                timeout=self._timeout,
                context=self._context,
                session=self._session.offer(self._context),
            )
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _csr_body(csr: x509.CertificateSigningRequest) -> bytes:
    return base64.encodebytes(csr.public_bytes(Encoding.DER))


def _certificates(reply: Reply) -> list[x509.Certificate]:
    if reply.status != 200:
        reason = reply.body.decode("utf-8", "replace").strip()[:200]
        raise GatewayRefused(f"gateway refused ({reply.status}): {reason}", reply.status)
    try:
        return certs_from_pkcs7(reply.body)
    except PkiError as exc:
        raise GatewayRefused(
            f"gateway sent an unreadable certificate: {exc}", reply.status
        ) from exc


def _json(reply: Reply) -> dict[str, Any]:
    try:
        data = json.loads(reply.body)
    except ValueError as exc:
        raise GatewayRefused(f"gateway answered {reply.status} without JSON", reply.status) from exc
    if not isinstance(data, dict):
        raise GatewayRefused("gateway answered with unexpected JSON", reply.status)
    return data


def _clock_offset(date_header: str | None) -> float | None:
    if not date_header:
        return None
    try:
        return parsedate_to_datetime(date_header).timestamp() - time.time()
    except (TypeError, ValueError):
        return None


def _verification_error(exc: ssl.SSLCertVerificationError) -> Exception:
    message = str(exc.verify_message or exc)
    if "not yet valid" in message or "expired" in message:
        return ClockSkew(
            f"cannot verify the gateway ({message}): this device's clock is probably wrong "
            f"(it says {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}); set it (NTP)",
            offset=float("nan"),
        )
    return GatewayUnreachable(
        f"the gateway's certificate is not trusted by the given CA ({message})"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    return str(exc) or type(exc).__name__
