"""`gatepass-gateway keys retire KID --now` takes a KID as `keys list` prints it.

A kid is a base64url thumbprint, and one in 64 starts with '-': argparse alone took such a
kid for an option and refused the command.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest

from gateway.cli import _RETIRE_FLAGS, _parser, kid_as_operand, main
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


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    choice: argparse.ArgumentParser = actions[0].choices[name]
    return choice


def test_retire_flags_are_the_parsers() -> None:
    """`kid_as_operand` keeps its own list of `keys retire`'s flags: it must not drift."""
    retire = _subcommand(_subcommand(_parser(), "keys"), "retire")
    options = {s for action in retire._actions for s in action.option_strings}
    assert options == _RETIRE_FLAGS | {"--dir"}


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
