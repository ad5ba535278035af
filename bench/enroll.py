"""Benchmark: EST enrollments per second against bare TLS handshakes, same server, same run.

Starts a real `gatepass-gateway serve` subprocess in a temporary directory, registers
`--devices` devices straight into its registry (`gateway.registry.Registry` with
`gateway.enrollment_secrets.hash_secret`, as `device add` does; the running gateway reads
the registry on every request), and makes one P-256 key and CSR per device. None of that
is timed. Then, in `--rounds` interleaved rounds (the order alternates from round to
round, so a drift in machine speed does not favour either side), it measures:

* ``enrollments_per_s``: `POST /.well-known/est/simpleenroll` (HTTP Basic, base64 DER
  CSR) each on a FRESH TLS connection (`Connection: close`, no keep-alive, no session
  resumption; the agent's own client, `OneWriteHTTPSConnection`, which sends the
  request's head and body in one TLS record), i.e. a full handshake + scrypt + CSR
  policy + issuing + two registry commits + the PKCS#7 reply;
* ``bare_handshakes_per_s``: a full TLS handshake on a fresh connection, then close, no
  HTTP at all: the issue's baseline;
* ``handshakes_per_s``: the same client code doing a full handshake and `GET /healthz`
  on a fresh connection each: the cost floor of any new-connection HTTP request.

Each figure is the median over rounds of (requests completed / wall time of the round).
``ratio`` = enrollments_per_s / bare_handshakes_per_s, the issue's definition; the target
is >= 0.7 (issue 3: the CA's work must not dominate the handshake).
``ratio_vs_handshake_healthz`` divides by handshakes_per_s instead: what enrollment adds
to the cheapest HTTP request on a new connection. ``server_cpu_ms_per_op`` is the gateway process's
own CPU time (user + system, from /proc; scrypt threads included) per request, median
over rounds: it does not depend on how busy the clients keep the machine.

Client design: the gateway is one asyncio process, so it can use one core at most. A
single synchronous client would leave it idle during the client's own half of every
handshake (~1 ms of client CPU: ECDHE, verifying the server's chain), so the rate would
measure latency, not capacity. The clients therefore run in a pool of `--workers`
processes (default 3; processes, not threads, because `http.client` and the request
building hold the GIL), each doing fresh connections back to back, so that 3 requests
are in flight and the server always has a handshake to work on. On a 2-core machine the
server gets about one core and the clients share the other; more workers would only
make the clients compete with the server for CPU. Both sides of the ratio are measured
by the same pool and code, so client cost weighs on both alike.

Run: ``.venv/bin/python bench/enroll.py`` (about 15 s on 2 cores). Prints one JSON object.
"""

from __future__ import annotations

import os
import sys

# `python bench/enroll.py` puts bench/ first on the import path, where bench/token.py
# would shadow the stdlib `token` module (imported by `inspect`, hence dataclasses,
# pydantic, ...): take bench/ off the path before anything imports it, and put the
# repository root there instead (for tests.gatewayproc; tests/ is not installed).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import socket  # noqa: E402
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
from gateway.enrollment_secrets import hash_secret, new_secret  # noqa: E402
from gateway.registry import Registry  # noqa: E402
from gateway.tls import client_context  # noqa: E402
from shared.acl import default_rules  # noqa: E402
from shared.pki import build_csr, certs_from_pkcs7, generate_p256_key  # noqa: E402
from tests.gatewayproc import GatewayProcess, init_gateway, start_gateway  # noqa: E402

__all__ = ["EnrollJob", "main"]

ENROLL_PATH = "/.well-known/est/simpleenroll"
HEALTH_PATH = "/healthz"
TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class EnrollJob:
    """One prepared enrollment: the Basic credentials and the base64 DER CSR body."""

    device_id: str
    authorization: str
    body: bytes


@dataclass(frozen=True, slots=True)
class ChunkResult:
    ok: int
    failed: int
    first_failure: str | None
    sample_body: bytes | None


# --- client worker processes ---------------------------------------------------------

_ctx: ssl.SSLContext | None = None
_address: tuple[str, int] = ("127.0.0.1", 0)


def _init_worker(ca_file: str, host: str, port: int) -> None:
    global _ctx, _address
    _ctx = client_context(Path(ca_file))
    _address = (host, port)


def _request(
    method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, bytes]:
    """One request on a fresh TLS connection, closed afterwards (full handshake each)."""
    assert _ctx is not None
    conn = OneWriteHTTPSConnection(*_address, context=_ctx, timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers={**headers, "Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _run_chunk(call: Callable[[int], tuple[int, bytes]], count: int) -> ChunkResult:
    ok = failed = 0
    first_failure: str | None = None
    sample: bytes | None = None
    for i in range(count):
        try:
            status, data = call(i)
        except OSError as exc:
            status, data = 0, repr(exc).encode()
        if status == 200:
            ok += 1
            sample = sample or data
        else:
            failed += 1
            first_failure = first_failure or f"{status}: {data[:200]!r}"
    return ChunkResult(ok, failed, first_failure, sample)


def _enroll_chunk(jobs: Sequence[EnrollJob]) -> ChunkResult:
    def call(i: int) -> tuple[int, bytes]:
        job = jobs[i]
        headers = {"Authorization": job.authorization, "Content-Type": "application/pkcs10"}
        return _request("POST", ENROLL_PATH, job.body, headers)

    return _run_chunk(call, len(jobs))


def _handshake_chunk(count: int) -> ChunkResult:
    return _run_chunk(lambda i: _request("GET", HEALTH_PATH, None, {}), count)


def _bare_handshake(_: int) -> tuple[int, bytes]:
    """A full TLS handshake on a fresh connection, then close; no HTTP."""
    assert _ctx is not None
    with socket.create_connection(_address, timeout=TIMEOUT_S) as raw:
        with _ctx.wrap_socket(raw, server_hostname=_address[0]) as tls:
            return (200 if tls.version() else 0), b""


def _bare_handshake_chunk(count: int) -> ChunkResult:
    return _run_chunk(_bare_handshake, count)


# --- measuring -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    rate: float
    cpu_ms_per_op: float | None


def timed_round(
    pool: Pool, func: Callable[..., ChunkResult], chunks: list[object], pid: int
) -> tuple[Sample, bytes | None]:
    """Run `func` on every chunk in the pool; requests per second of wall time."""
    cpu_before = server_cpu_seconds(pid)
    started = time.perf_counter()
    results = pool.map(func, chunks, chunksize=1)
    elapsed = time.perf_counter() - started
    cpu_after = server_cpu_seconds(pid)
    ok = sum(r.ok for r in results)
    failed = sum(r.failed for r in results)
    if failed:
        first = next(r.first_failure for r in results if r.first_failure)
        raise RuntimeError(f"{failed} of {ok + failed} requests failed; first: {first}")
    cpu = None
    if cpu_before is not None and cpu_after is not None:
        cpu = (cpu_after - cpu_before) / ok * 1e3
    sample = next((r.sample_body for r in results if r.sample_body), None)
    return Sample(ok / elapsed, cpu), sample


def split(items: Sequence[EnrollJob], parts: int) -> list[list[EnrollJob]]:
    return [list(items[i::parts]) for i in range(parts)]


def median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


# --- set-up (not timed) --------------------------------------------------------------


def register_devices(database: Path, count: int, prefix: str) -> list[tuple[str, str]]:
    """Add `count` devices with fresh one-time secrets, as `device add` would."""
    devices = []
    now = time.time()
    with Registry.open(database) as registry:
        for i in range(count):
            device_id, secret = f"{prefix}-{i:05d}", new_secret()
            registry.add_device(device_id, default_rules(), hash_secret(secret), now + 3600, now)
            devices.append((device_id, secret))
    return devices


def prepare_jobs(devices: Sequence[tuple[str, str]]) -> list[EnrollJob]:
    jobs = []
    for device_id, secret in devices:
        der = build_csr(generate_p256_key(), device_id).public_bytes(serialization.Encoding.DER)
        basic = base64.b64encode(f"{device_id}:{secret}".encode()).decode("ascii")
        jobs.append(EnrollJob(device_id, f"Basic {basic}", base64.b64encode(der)))
    return jobs


def check_reply(body: bytes | None, device_id_prefix: str) -> None:
    """Outside timing: a sampled reply is a PKCS#7 with a certificate for one of ours."""
    if body is None:
        raise RuntimeError("no enrollment reply to check")
    subjects = [cert.subject.rfc4514_string() for cert in certs_from_pkcs7(body)]
    if not any(s.startswith(f"CN={device_id_prefix}-") for s in subjects):
        raise RuntimeError(f"no device certificate in the reply: {subjects}")


# --- the bench -----------------------------------------------------------------------


def bench(
    gw: GatewayProcess, jobs: list[EnrollJob], rounds: int, workers: int, prefix: str
) -> dict[str, object]:
    host = "127.0.0.1"
    warmup_jobs, jobs = jobs[:workers], jobs[workers:]
    per_round = len(jobs) // rounds
    pid = gw.proc.pid
    enroll_samples: list[Sample] = []
    handshake_samples: list[Sample] = []
    bare_samples: list[Sample] = []
    ctx = multiprocessing.get_context()
    with ctx.Pool(workers, _init_worker, (str(gw.ca), host, gw.https_port)) as pool:
        # Warm up both paths (worker start-up, imports, server caches) before timing.
        timed_round(pool, _enroll_chunk, list(split(warmup_jobs, workers)), pid)
        warm: list[object] = [max(1, per_round // workers)] * workers
        timed_round(pool, _handshake_chunk, warm, pid)
        timed_round(pool, _bare_handshake_chunk, warm, pid)
        sample_body: bytes | None = None
        for r in range(rounds):
            batch = jobs[r * per_round : (r + 1) * per_round]
            enroll_chunks: list[object] = list(split(batch, workers))
            hs_chunks: list[object] = [len(c) for c in split(batch, workers)]
            order = ["enroll", "healthz", "bare"]
            for kind in order if r % 2 == 0 else order[::-1]:
                if kind == "enroll":
                    enroll, sample_body = timed_round(pool, _enroll_chunk, enroll_chunks, pid)
                    enroll_samples.append(enroll)
                elif kind == "healthz":
                    handshake_samples.append(timed_round(pool, _handshake_chunk, hs_chunks, pid)[0])
                else:
                    bare_samples.append(timed_round(pool, _bare_handshake_chunk, hs_chunks, pid)[0])
    check_reply(sample_body, prefix)
    enroll_rate = statistics.median(s.rate for s in enroll_samples)
    handshake_rate = statistics.median(s.rate for s in handshake_samples)
    bare_rate = statistics.median(s.rate for s in bare_samples)
    return {
        "enrollments_per_s": round(enroll_rate, 1),
        "bare_handshakes_per_s": round(bare_rate, 1),
        "handshakes_per_s": round(handshake_rate, 1),
        "ratio": round(enroll_rate / bare_rate, 3),
        "ratio_vs_handshake_healthz": round(enroll_rate / handshake_rate, 3),
        "target_ratio": 0.7,
        "server_cpu_ms_per_op": {
            "enrollment": median_or_none([s.cpu_ms_per_op for s in enroll_samples]),
            "bare_handshake": median_or_none([s.cpu_ms_per_op for s in bare_samples]),
            "handshake_healthz": median_or_none([s.cpu_ms_per_op for s in handshake_samples]),
        },
        "rounds_enrollments_per_s": [round(s.rate, 1) for s in enroll_samples],
        "rounds_bare_handshakes_per_s": [round(s.rate, 1) for s in bare_samples],
        "rounds_handshakes_per_s": [round(s.rate, 1) for s in handshake_samples],
        "n": per_round * rounds,
        "per_round": per_round,
        "rounds": rounds,
        "workers": workers,
        "cpus": os.cpu_count(),
        "tls": "fresh connection per request, full handshake, no resumption",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=1500, help="enrollments in all rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=3, help="client processes")
    args = parser.parse_args(argv)
    prefix = "bench"
    with tempfile.TemporaryDirectory(prefix="gatepass-bench-enroll-") as tmp:
        root = init_gateway(Path(tmp) / "gw")
        count = args.devices + args.workers
        jobs = prepare_jobs(register_devices(root / "gateway.db", count, prefix))
        gw = start_gateway(root, env=UNLIMITED_ENV)
        try:
            result = bench(gw, jobs, args.rounds, args.workers, prefix)
        finally:
            stop_gateway(gw)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
