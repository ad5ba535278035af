"""The HTTPS API as thin aiohttp adapters: parse -> call the service -> render.

Owns: routes, reading bodies within limits, HTTP Basic parsing, the peer certificate
of the TLS connection, and rendering errors in each protocol's own format (RFC 7030
`text/plain` for EST, RFC 6749 section 5.2 JSON for OAuth). Must not: decide policy;
`gateway.enrollment` and `gateway.token_service` do.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.errors import (
    BadRequest,
    ClientError,
    OAuthError,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    UnsupportedMediaType,
)
from gateway.runtime import Gateway

__all__ = ["GATEWAY_KEY", "build_app"]

log = logging.getLogger("gatepass.http")

PKCS7_TYPE = "application/pkcs7-mime; smime-type=certs-only"
GATEWAY_KEY = web.AppKey("gateway", Gateway)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(
        client_max_size=gateway.settings.max_request_body,
        middlewares=[_metrics_middleware],
        handler_args={"max_field_size": 8190, "max_line_size": 8190},
    )
    app[GATEWAY_KEY] = gateway
    app.router.add_get("/.well-known/est/cacerts", cacerts)
    est_expect, oauth_expect = _expect_handler(_est_error), _expect_handler(_oauth_error)
    app.router.add_post("/.well-known/est/simpleenroll", simpleenroll, expect_handler=est_expect)
    app.router.add_post(
        "/.well-known/est/simplereenroll", simplereenroll, expect_handler=est_expect
    )
    app.router.add_post("/oauth2/token", token, expect_handler=oauth_expect)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/.well-known/oauth-authorization-server", metadata)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


@web.middleware
async def _metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        return response
    except web.HTTPException as exc:
        response = exc
        raise
    finally:
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "unmatched"
        status = response.status if response is not None else 500
        request.app[GATEWAY_KEY].metrics.observe_request(
            path, status, time.perf_counter() - started
        )


def _expect_handler(
    render: Callable[[ClientError], web.Response],
) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """Answer `Expect: 100-continue` with 413 at once when the announced body is too big."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        limit = request.app[GATEWAY_KEY].settings.max_request_body
        if request.content_length is not None and request.content_length > limit:
            return render(PayloadTooLarge(f"request body larger than {limit} bytes"))
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="unsupported Expect header")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    return expect


# --- EST (RFC 7030) -------------------------------------------------------------------


async def cacerts(request: web.Request) -> web.StreamResponse:
    body = request.app[GATEWAY_KEY].enrollment.cacerts()
    return _pkcs7_response(body)


async def simpleenroll(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    source = _source(request)
    try:
        device_id, secret = _basic_credentials(request)
        csr_body = await _read_body(request, "application/pkcs10")
        body = await gw.enrollment.enroll(device_id, secret, csr_body, source)
    except ClientError as exc:
        return _est_error(exc)
    return _pkcs7_response(body)


async def simplereenroll(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    try:
        peer = _peer_certificate(request)
        if peer is None:
            raise Unauthorized("client certificate required")
        csr_body = await _read_body(request, "application/pkcs10")
        body = await gw.enrollment.reenroll(peer, csr_body, _source(request))
    except ClientError as exc:
        return _est_error(exc)
    return _pkcs7_response(body)


# --- OAuth 2.0 (RFC 6749, RFC 8705, RFC 8414) ----------------------------------------


async def token(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    try:
        body = await _read_body(request, "application/x-www-form-urlencoded")
        form = _parse_form(body)
        issued = gw.tokens.issue(_peer_certificate(request), form, _source(request))
    except ClientError as exc:
        return _oauth_error(exc)
    return web.Response(
        body=issued.to_json(),
        content_type="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


async def jwks(request: web.Request) -> web.StreamResponse:
    body = request.app[GATEWAY_KEY].jwks()
    return web.json_response(body, headers={"Cache-Control": "public, max-age=60"})


async def metadata(request: web.Request) -> web.StreamResponse:
    base = f"https://{request.host}"
    host = request.url.host or "localhost"
    return web.json_response(request.app[GATEWAY_KEY].metadata(base, host))


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.StreamResponse:
    data = generate_latest(request.app[GATEWAY_KEY].metrics.registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


# --- helpers -------------------------------------------------------------------------


def _source(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else "unknown"


def _peer_certificate(request: web.Request) -> bytes | None:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_object is None:
        return None
    der: bytes | None = ssl_object.getpeercert(binary_form=True)
    return der


def _basic_credentials(request: web.Request) -> tuple[str, str]:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        raise Unauthorized("HTTP Basic credentials required")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise Unauthorized("malformed HTTP Basic credentials") from exc
    device_id, sep, secret = decoded.partition(":")
    if not sep or not device_id or not secret:
        raise Unauthorized("malformed HTTP Basic credentials")
    return device_id, secret


async def _read_body(request: web.Request, content_type: str) -> bytes:
    limit = request.app[GATEWAY_KEY].settings.max_request_body
    # Refuse by the announced length before reading a byte of a huge body.
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
    if request.content_type != content_type:
        raise UnsupportedMediaType(f"content type must be {content_type}")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"request body larger than {limit} bytes") from exc


def _parse_form(body: bytes) -> dict[str, str]:
    from urllib.parse import parse_qsl

    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise OAuthError("invalid_request", "malformed form body") from exc
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:  # RFC 6749 section 3.2: parameters must not be repeated
            raise OAuthError("invalid_request", f"parameter {key} repeated")
        form[key] = value
    return form


def _pkcs7_response(body: bytes) -> web.Response:
    return web.Response(
        body=body,
        headers={"Content-Type": PKCS7_TYPE, "Content-Transfer-Encoding": "base64"},
    )


def _est_error(exc: ClientError) -> web.Response:
    headers = {}
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Basic realm="gatepass-est", charset="UTF-8"'
    if isinstance(exc, TooManyRequests):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return web.Response(status=exc.status, text=exc.public + "\n", headers=headers)


def _oauth_error(exc: ClientError) -> web.Response:
    if isinstance(exc, OAuthError):
        code = exc.error
    elif isinstance(exc, TooManyRequests):
        code = "slow_down"
    elif isinstance(exc, PayloadTooLarge | UnsupportedMediaType | BadRequest):
        code = "invalid_request"
    else:
        code = "invalid_client"
    status = exc.status
    if isinstance(exc, UnsupportedMediaType):
        status = 400  # RFC 6749: a wrong content type is an invalid_request
    body: dict[str, Any] = {"error": code, "error_description": exc.public}
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if isinstance(exc, TooManyRequests):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )
