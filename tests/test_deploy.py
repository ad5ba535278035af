"""`deploy/gatepass-agent.service`: a valid systemd unit with the promised hardening.

The keys that matter for security and unattended operation are read with configparser
on every machine. Where `systemd-analyze` exists (Debian's `systemd` package), the unit
is also checked by systemd itself: `verify` (with ExecStart pointed at this checkout's
agent, since /opt/gatepass does not exist here) and `security --offline` (its exposure
score). Without it, the same test checks the file's syntax line by line instead.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

from tests.gatewayproc import cli

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "gatepass-agent.service"
STATE = "/var/lib/gatepass-agent"
EXEC_START = f"/opt/gatepass/venv/bin/gatepass-agent run --state {STATE}"
# Added in systemd 254; older versions (252 in Debian 12) warn and ignore them.
NEWER_KEYS = ("RestartSteps", "RestartMaxDelaySec")
MAX_EXPOSURE = 2.0


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(
        strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";")
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def systemd_version() -> int | None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return None
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, out
    return int(match.group(1))


def test_service_runs_unattended_as_gatepass_not_root() -> None:
    service = unit()["Service"]
    assert service["User"] == "gatepass" and service["Group"] == "gatepass"
    assert service["ExecStart"] == EXEC_START
    assert service["Restart"] == "always"
    assert float(service["RestartSec"]) > 0
    assert float(service["RestartMaxDelaySec"]) > float(service["RestartSec"])  # backoff
    assert int(service["RestartSteps"]) > 0
    assert unit()["Unit"]["StartLimitIntervalSec"] == "0"  # never stop restarting
    assert unit()["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit()["Unit"]["After"]


def test_state_directory_is_private_and_the_only_writable_place() -> None:
    service = unit()["Service"]
    assert service["StateDirectory"] == "gatepass-agent"
    assert f"/var/lib/{service['StateDirectory']}" == STATE
    assert service["StateDirectoryMode"] == "0700"
    assert service["UMask"] == "0077"
    assert service["ReadWritePaths"].split() == [STATE]
    assert service["ProtectSystem"] == "strict"


def test_hardening_keys() -> None:
    service = unit()["Service"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictSUIDSGID",
        "LockPersonality",
    ):
        assert service[key] == "yes", key
    assert service["CapabilityBoundingSet"] == ""  # no capabilities at all
    assert service["AmbientCapabilities"] == ""
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    version = systemd_version()
    if version is None:
        _check_syntax_by_hand()
        return
    tool = shutil.which("systemd-analyze")
    assert tool is not None
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(EXEC_START.split()[0], cli("gatepass-agent")))
    verify = subprocess.run(
        [tool, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = [line for line in (verify.stdout + verify.stderr).splitlines() if line.strip()]
    if version < 254:
        problems = [p for p in problems if not any(f"Unknown key '{k}'" in p for k in NEWER_KEYS)]
    assert verify.returncode == 0 and problems == [], verify.stdout + verify.stderr
    security = subprocess.run(
        [tool, "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, security.stdout


def _check_syntax_by_hand() -> None:
    """Without systemd: every line is blank, a comment, a known section or Key=value."""
    section = None
    for number, line in enumerate(UNIT.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("["):
            section = stripped
            assert section in ("[Unit]", "[Service]", "[Install]"), (number, line)
            continue
        assert section is not None, (number, line)
        assert re.fullmatch(r"[A-Z][A-Za-z]+=.*", stripped), (number, line)
