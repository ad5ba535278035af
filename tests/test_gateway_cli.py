"""`gatepass-gateway keys retire KID --now` takes a KID as `keys list` prints it.

A kid is a base64url thumbprint, and one in 64 starts with '-': argparse alone took such a
kid for an option and refused the command.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from gateway.cli import kid_as_operand, main
from tests.gatewayproc import run_cli


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["keys", "retire", "-abc", "--now", "--dir", "gw"],
            ["keys", "retire", "--now", "--dir", "gw", "--", "-abc"],
        ),
        (
            ["keys", "retire", "--dir", "-gw", "_abc", "--now"],
            ["keys", "retire", "--dir", "-gw", "_abc", "--now"],
        ),
        (
            ["keys", "retire", "--dir=gw", "--json", "--now", "-x"],
            ["keys", "retire", "--dir=gw", "--json", "--now", "--", "-x"],
        ),
        (["keys", "retire", "--now", "--", "-abc"], ["keys", "retire", "--now", "--", "-abc"]),
        (["keys", "retire", "--dir"], ["keys", "retire", "--dir"]),
        (["device", "show", "-abc", "--dir", "gw"], ["device", "show", "-abc", "--dir", "gw"]),
    ],
)
def test_kid_as_operand(argv: list[str], expected: list[str]) -> None:
    assert kid_as_operand(argv) == expected


def _quiet_main(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def test_retire_a_kid_that_starts_with_a_dash(tmp_path: Path) -> None:
    gw = tmp_path / "gw"
    run_cli("gatepass-gateway", "init", "--dir", str(gw))
    kid = ""
    for _ in range(2000):  # P(no kid starts with '-') = (63/64)**2000, about 1e-14
        kid = json.loads(_quiet_main("keys", "rotate", "--dir", str(gw), "--json"))["current"]
        if kid.startswith("-"):
            break
    assert kid.startswith("-")

    done = run_cli("gatepass-gateway", "keys", "retire", kid, "--now", "--dir", str(gw), "--json")

    assert json.loads(done.stdout)["retired"] == kid
    listed = json.loads(
        run_cli("gatepass-gateway", "keys", "list", "--dir", str(gw), "--json").stdout
    )
    assert {k["kid"]: k["state"] for k in listed}[kid] == "retired"
