"""Benchmark: resident memory and CPU of one `gatepass-agent run --interval 1`.

Starts a real `gatepass-gateway serve` subprocess in a temporary directory, registers a
device, enrolls it with the real CLI (`gatepass-agent enroll`), then runs
`gatepass-agent run --state DIR --interval 1` (default settings otherwise: TLS with the
client certificate to the built-in broker, QoS 1, the SQLite outbox with FULL sync) for
`--seconds` (default 60) and stops it with SIGTERM. Meanwhile it samples, every
`--sample` seconds, the agent process's

* ``VmRSS`` from ``/proc/PID/status`` (resident memory): ``rss_mb_max`` is the largest
  sample; ``vm_hwm_mb`` is the kernel's own peak (``VmHWM``) read just before the stop,
  which also catches a spike between two samples; ``rss_anon_mb_max`` and
  ``rss_file_mb_max`` split it into the process's own memory (``RssAnon``) and mapped
  files (``RssFile``: libpython, cryptography's module with its OpenSSL, libcrypto);
* ``utime + stime`` from ``/proc/PID/stat``: ``cpu_percent_of_one_core`` is the agent's
  CPU time over wall time from process start to the stop (interpreter start-up, imports,
  TLS and enrollment-state loading included, the conservative figure);
  ``cpu_percent_steady`` leaves out the first `--warmup` seconds.

``messages.acked`` is `last_seq - outbox_depth - outbox_dropped` from `gatepass-agent
status --json` after the stop: readings that left the outbox on PUBACK.
Targets (issue 6): at most 40 MB resident and 2 % of one core. Prints one JSON object;
exits 1 if the agent failed (exited early, non-zero, or nothing was acknowledged).

Run: ``.venv/bin/python -m bench.agent [--seconds 60]``.
"""

from __future__ import annotations

import os
import sys

# `python bench/agent.py` would put bench/ first on the import path, where bench/token.py
# shadows the stdlib `token` module: take bench/ off the path and put the repository
# root there instead (for tests.gatewayproc; tests/ is not installed).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.gatewayproc import (  # noqa: E402
    GatewayProcess,
    agent_enroll,
    cli,
    init_gateway,
    run_cli,
    running_gateway,
)

__all__ = ["ProcSample", "main", "measure"]

TARGET_RSS_MB = 40.0
TARGET_CPU_PERCENT = 2.0
DEVICE_ID = "bench-agent"
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One look at a process: resident and peak memory (kB), CPU seconds, when."""

    rss_kb: int
    hwm_kb: int
    anon_kb: int
    file_kb: int
    cpu_s: float
    at: float


def _status_kb(status: str, key: str) -> int:
    for line in status.splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise ValueError(f"{key} not in /proc status")


def sample(pid: int) -> ProcSample:
    """Read VmRSS/VmHWM and utime+stime of `pid` (raises OSError once it is gone)."""
    at = time.monotonic()
    status = Path(f"/proc/{pid}/status").read_text()
    # Fields after the command name, which may contain spaces and parentheses.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ProcSample(
        rss_kb=_status_kb(status, "VmRSS"),
        hwm_kb=_status_kb(status, "VmHWM"),
        anon_kb=_status_kb(status, "RssAnon"),
        file_kb=_status_kb(status, "RssFile"),
        cpu_s=ticks / os.sysconf("SC_CLK_TCK"),
        at=at,
    )


@dataclass(slots=True)
class Run:
    """What was seen of the agent process during one run."""

    started_at: float
    samples: list[ProcSample] = field(default_factory=list)
    exit_code: int | None = None
    exited_early: bool = False
    output: str = ""


def enroll(gw: GatewayProcess, state: Path) -> None:
    secret = gw.add_device(DEVICE_ID)
    mqtt = f"mqtts://127.0.0.1:{gw.mqtt_port}"
    agent_enroll(gw.https_url, gw.ca, DEVICE_ID, secret, state, "--mqtt", mqtt)


def measure(state: Path, seconds: float, interval: float, every: float) -> Run:
    """Run the agent for `seconds`, sampling it every `every` seconds, then SIGTERM it."""
    started_at = time.monotonic()
    proc = subprocess.Popen(
        [cli("gatepass-agent"), "run", "--state", str(state), "--interval", str(interval)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    run = Run(started_at=started_at)
    deadline = started_at + seconds
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                run.exited_early = True
                break
            try:
                run.samples.append(sample(proc.pid))
            except OSError:
                run.exited_early = proc.poll() is not None
                break
            time.sleep(min(every, max(0.0, deadline - time.monotonic())))
        if proc.poll() is None:
            run.samples.append(sample(proc.pid))  # the last look, right before the stop
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run.exit_code = proc.returncode
    run.output = out.decode(errors="replace")[-2000:]
    return run


def cpu_percent(first: ProcSample, last: ProcSample, since: float | None = None) -> float:
    """CPU time between two samples (or since process start) over the wall time."""
    if since is not None:
        wall = last.at - since
        cpu = last.cpu_s
    else:
        wall = last.at - first.at
        cpu = last.cpu_s - first.cpu_s
    return 100.0 * cpu / wall if wall > 0 else 0.0


def report(run: Run, status: dict[str, object], seconds: float, warmup: float) -> dict[str, object]:
    samples = run.samples
    last = samples[-1]
    steady = [s for s in samples if s.at - run.started_at >= warmup]
    rss_mb_max = max(s.rss_kb for s in samples) / 1024
    cpu_total = cpu_percent(samples[0], last, since=run.started_at)
    cpu_steady = cpu_percent(steady[0], last) if len(steady) >= 2 else None
    depth = int(str(status.get("outbox_depth") or 0))
    dropped = int(str(status.get("outbox_dropped") or 0))
    last_seq = int(str(status.get("last_seq") or 0))
    return {
        "seconds": round(last.at - run.started_at, 1),
        "interval_s": 1.0,
        "samples": len(samples),
        "rss_mb_max": round(rss_mb_max, 1),
        "vm_hwm_mb": round(last.hwm_kb / 1024, 1),
        "rss_mb_last": round(last.rss_kb / 1024, 1),
        # VmRSS = RssAnon (the agent's own heap) + RssFile (mapped code: libpython,
        # cryptography's Rust/OpenSSL module, libcrypto, ...; shareable, clean pages).
        "rss_anon_mb_max": round(max(s.anon_kb for s in samples) / 1024, 1),
        "rss_file_mb_max": round(max(s.file_kb for s in samples) / 1024, 1),
        "cpu_percent_of_one_core": round(cpu_total, 2),
        "cpu_percent_steady": None if cpu_steady is None else round(cpu_steady, 2),
        "cpu_seconds": round(last.cpu_s, 2),
        "warmup_s": warmup,
        "targets": {"rss_mb_max": TARGET_RSS_MB, "cpu_percent_of_one_core": TARGET_CPU_PERCENT},
        "within_targets": max(rss_mb_max, last.hwm_kb / 1024) <= TARGET_RSS_MB
        and cpu_total <= TARGET_CPU_PERCENT,
        "messages": {
            "published": last_seq,
            "acked": last_seq - depth - dropped,
            "outbox_depth": depth,
            "dropped": dropped,
        },
        "agent": {
            "exit_code": run.exit_code,
            "exited_early": run.exited_early,
            "connects": status.get("connects"),
            "last_error": status.get("last_error"),
        },
        "requested_seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the run")
    parser.add_argument("--warmup", type=float, default=5.0, help="left out of cpu_steady")
    parser.add_argument("--sample", type=float, default=0.25, help="seconds between samples")
    parser.add_argument(
        "--token-lifetime", type=int, default=None, help="gateway token_lifetime (default 300)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gatepass-bench-agent-") as tmp:
        lines = [] if args.token_lifetime is None else [f"token_lifetime = {args.token_lifetime}"]
        root = init_gateway(Path(tmp) / "gw", *lines)
        with running_gateway(root) as gw:
            state = Path(tmp) / "agent"
            enroll(gw, state)
            run = measure(state, args.seconds, 1.0, args.sample)
            status: dict[str, object] = json.loads(
                run_cli("gatepass-agent", "status", "--state", str(state), "--json").stdout
            )
    if not run.samples:
        print(json.dumps({"error": "agent exited at once", "output": run.output}))
        return 1
    result = report(run, status, args.seconds, args.warmup)
    print(json.dumps(result, indent=2))
    messages = result["messages"]
    assert isinstance(messages, dict)
    failed = run.exited_early or run.exit_code != 0 or not messages["acked"]
    if failed:
        print(run.output, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
