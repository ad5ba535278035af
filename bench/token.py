"""Benchmark: OAuth tokens per second against a trivial endpoint, same server, same run.

Starts a real `gatepass-gateway serve` subprocess in a temporary directory (rate limits
lifted with `GATEPASS_*` variables), registers one device with the CLI and enrolls it
over HTTPS (EST `simpleenroll`), then measures in `--rounds` interleaved rounds (the order
alternates, so drift in machine speed favours neither side), median of rounds:

(a) keep-alive: `POST /oauth2/token` (`grant_type=client_credentials`, mutual TLS)
    back to back over ONE kept-alive connection of the agent's own client
    (`OneWriteHTTPSConnection`: head and body in one TLS record), against
    `GET /healthz` back to back over one kept-alive mTLS connection of its own. One
    synchronous client, as a device refreshing its token would be: this measures the
    request path (aiohttp + token service) per request, client cost included on both
    sides. Target ratio >= 0.8.
(b) new connection: each token request on a FRESH mutual-TLS connection (full
    handshake with the device's certificate, `Connection: close`, no resumption),
    against `GET /healthz` on a fresh mTLS connection each. These run in a pool of
    `--workers` client processes (default 3) so that the single-process asyncio gateway
    always has a handshake to work on rather than waiting for one client's half of the
    handshake; processes, not threads, because `http.client` holds the GIL. On 2 cores
    more workers would only take CPU from the server. Target ratio >= 0.8.

``server_cpu_ms_per_op`` is the gateway process's own CPU time (user + system, from
/proc) per request, median over rounds: the server's cost, whatever the clients do.

Run: ``.venv/bin/python bench/token.py`` (about 15 s on 2 cores). Prints one JSON object.
"""

from __future__ import annotations

import os
import sys

# This file is named like the stdlib `token` module, which `inspect` (hence dataclasses,
# pydantic, ...) imports: take the script's own directory off the import path before
# anything imports it, and put the repository root there instead (for tests.gatewayproc).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import base64  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from multiprocessing.pool import Pool  # noqa: E402
from pathlib import Path  # noqa: E402

from cryptography.hazmat.primitives import serialization  # noqa: E402

from agent.gateway_client import OneWriteHTTPSConnection  # noqa: E402
from bench._common import UNLIMITED_ENV, server_cpu_seconds, stop_gateway  # noqa: E402
from gateway.tls import client_context  # noqa: E402
from shared.pki import (  # noqa: E402
    build_csr,
    certs_from_pkcs7,
    generate_p256_key,
    write_private_key,
)
from tests.gatewayproc import GatewayProcess, init_gateway, start_gateway  # noqa: E402

__all__ = ["main"]

TOKEN_PATH = "/oauth2/token"
HEALTH_PATH = "/healthz"
TOKEN_BODY = b"grant_type=client_credentials"
TOKEN_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}
TIMEOUT_S = 15.0
DEVICE_ID = "bench-token-1"


@dataclass(frozen=True, slots=True)
class Tls:
    """Where the client finds the trust anchor and its identity (paths: picklable)."""

    ca: str
    cert: str
    key: str
    host: str
    port: int

    def context(self) -> ssl.SSLContext:
        return client_context(Path(self.ca), Path(self.cert), Path(self.key))


@dataclass(frozen=True, slots=True)
class Sample:
    rate: float
    cpu_ms_per_op: float | None


# --- requests ------------------------------------------------------------------------


def _check(status: int, data: bytes, path: str) -> None:
    if status != 200:
        raise RuntimeError(f"{path}: {status} {data[:200]!r}")
    if path == TOKEN_PATH and b'"access_token"' not in data:
        raise RuntimeError(f"{path}: no access_token in {data[:200]!r}")


def _token_request(conn: http.client.HTTPSConnection, headers: dict[str, str]) -> None:
    conn.request("POST", TOKEN_PATH, body=TOKEN_BODY, headers={**TOKEN_HEADERS, **headers})
    response = conn.getresponse()
    _check(response.status, response.read(), TOKEN_PATH)


def _health_request(conn: http.client.HTTPSConnection, headers: dict[str, str]) -> None:
    conn.request("GET", HEALTH_PATH, headers=headers)
    response = conn.getresponse()
    _check(response.status, response.read(), HEALTH_PATH)


Request = Callable[[http.client.HTTPSConnection, dict[str, str]], None]
REQUESTS: dict[str, Request] = {"token": _token_request, "healthz": _health_request}

# --- client worker processes (mode b) ------------------------------------------------

_ctx: ssl.SSLContext | None = None
_tls: Tls | None = None


def _init_worker(tls: Tls) -> None:
    global _ctx, _tls
    _tls, _ctx = tls, tls.context()


def _fresh_connections(job: tuple[str, int]) -> int:
    """`count` requests of one kind, each on a new mTLS connection closed afterwards."""
    kind, count = job
    assert _tls is not None and _ctx is not None
    request = REQUESTS[kind]
    for _ in range(count):
        conn = OneWriteHTTPSConnection(_tls.host, _tls.port, context=_ctx, timeout=TIMEOUT_S)
        try:
            request(conn, {"Connection": "close"})
        finally:
            conn.close()
    return count


# --- measuring -----------------------------------------------------------------------


def timed(run: Callable[[], int], pid: int) -> Sample:
    """Requests per second of wall time for `run()`, and server CPU per request."""
    cpu_before = server_cpu_seconds(pid)
    started = time.perf_counter()
    done = run()
    elapsed = time.perf_counter() - started
    cpu_after = server_cpu_seconds(pid)
    cpu = None
    if cpu_before is not None and cpu_after is not None:
        cpu = (cpu_after - cpu_before) / done * 1e3
    return Sample(done / elapsed, cpu)


def keepalive_run(conn: http.client.HTTPSConnection, kind: str, count: int) -> Callable[[], int]:
    request = REQUESTS[kind]

    def run() -> int:
        for _ in range(count):
            request(conn, {})
        return count

    return run


def fresh_run(pool: Pool, kind: str, count: int, workers: int) -> Callable[[], int]:
    jobs = [(kind, count // workers + (1 if i < count % workers else 0)) for i in range(workers)]
    return lambda: sum(pool.map(_fresh_connections, jobs, chunksize=1))


def interleaved(
    runs: dict[str, Callable[[], int]], rounds: int, pid: int
) -> dict[str, list[Sample]]:
    """Each run once to warm up, then `rounds` rounds in alternating order."""
    for run in runs.values():
        run()
    samples: dict[str, list[Sample]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(timed(runs[name], pid))
    return samples


def summarize(samples: dict[str, list[Sample]], target: float) -> dict[str, object]:
    token = statistics.median(s.rate for s in samples["token"])
    health = statistics.median(s.rate for s in samples["healthz"])

    def cpu(name: str) -> float | None:
        values = [s.cpu_ms_per_op for s in samples[name] if s.cpu_ms_per_op is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "tokens_per_s": round(token, 1),
        "healthz_per_s": round(health, 1),
        "ratio": round(token / health, 3),
        "target_ratio": target,
        "server_cpu_ms_per_op": {"token": cpu("token"), "healthz": cpu("healthz")},
        "rounds_tokens_per_s": [round(s.rate, 1) for s in samples["token"]],
        "rounds_healthz_per_s": [round(s.rate, 1) for s in samples["healthz"]],
    }


# --- set-up (not timed) --------------------------------------------------------------


def enroll_device(gw: GatewayProcess, work: Path) -> Tls:
    """Register one device with the CLI and enroll it over HTTPS; its key stays here."""
    secret = gw.add_device(DEVICE_ID)
    key = generate_p256_key()
    csr = build_csr(key, DEVICE_ID).public_bytes(serialization.Encoding.DER)
    basic = base64.b64encode(f"{DEVICE_ID}:{secret}".encode()).decode("ascii")
    conn = http.client.HTTPSConnection(
        "127.0.0.1", gw.https_port, context=client_context(gw.ca), timeout=TIMEOUT_S
    )
    try:
        conn.request(
            "POST",
            "/.well-known/est/simpleenroll",
            body=base64.b64encode(csr),
            headers={"Authorization": f"Basic {basic}", "Content-Type": "application/pkcs10"},
        )
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"enrollment failed: {response.status} {body[:200]!r}")
    cert = next(
        c for c in certs_from_pkcs7(body) if c.subject.rfc4514_string() == f"CN={DEVICE_ID}"
    )
    cert_file, key_file = work / "device.pem", work / "device.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private_key(key_file, key)
    return Tls(str(gw.ca), str(cert_file), str(key_file), "127.0.0.1", gw.https_port)


# --- the bench -----------------------------------------------------------------------


def bench(gw: GatewayProcess, tls: Tls, args: argparse.Namespace) -> dict[str, object]:
    pid = gw.proc.pid
    ctx = tls.context()
    conns = {
        kind: OneWriteHTTPSConnection(tls.host, tls.port, context=ctx, timeout=TIMEOUT_S)
        for kind in REQUESTS
    }
    try:
        keepalive = interleaved(
            {
                kind: keepalive_run(conn, kind, args.keepalive_requests)
                for kind, conn in conns.items()
            },
            args.rounds,
            pid,
        )
    finally:
        for conn in conns.values():
            conn.close()
    mp = multiprocessing.get_context()
    with mp.Pool(args.workers, _init_worker, (tls,)) as pool:
        fresh = interleaved(
            {kind: fresh_run(pool, kind, args.fresh_requests, args.workers) for kind in REQUESTS},
            args.rounds,
            pid,
        )
    return {
        "keepalive": {
            **summarize(keepalive, 0.8),
            "requests_per_round": args.keepalive_requests,
            "clients": "one synchronous client, one kept-alive mTLS connection per kind",
        },
        "new_connection": {
            **summarize(fresh, 0.8),
            "requests_per_round": args.fresh_requests,
            "clients": f"{args.workers} client processes, full mTLS handshake per request",
        },
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keepalive-requests", type=int, default=1000, help="per round, each")
    parser.add_argument("--fresh-requests", type=int, default=300, help="per round, each")
    parser.add_argument("--workers", type=int, default=3, help="client processes for (b)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gatepass-bench-token-") as tmp:
        root = init_gateway(Path(tmp) / "gw")
        gw = start_gateway(root, env=UNLIMITED_ENV)
        try:
            tls = enroll_device(gw, Path(tmp))
            result = bench(gw, tls, args)
        finally:
            stop_gateway(gw)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
