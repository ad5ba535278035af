"""Tests of shared.claims: strict access-token claims and their JSON form."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from shared.claims import AccessTokenClaims, AclEntry, Confirmation

THUMB = "q" * 42 + "A"


def payload(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": "https://gatepass.example",
        "sub": "dev-1",
        "aud": "gatepass-mqtt",
        "client_id": "dev-1",
        "iat": 1000,
        "nbf": 1000,
        "exp": 1300,
        "jti": "abc",
        "cnf": {"x5t#S256": THUMB},
        "acl": [{"permission": "allow", "action": "publish", "topic": "devices/dev-1/#"}],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def parse(data: dict[str, Any]) -> AccessTokenClaims:
    return AccessTokenClaims.model_validate_json(json.dumps(data))


def test_round_trip_through_json() -> None:
    claims = parse(payload())
    assert claims.cnf.x5t_s256 == THUMB
    assert claims.acl == (AclEntry(permission="allow", action="publish", topic="devices/dev-1/#"),)
    out = claims.to_jwt_payload()
    assert out == payload()
    assert "scope" not in out
    assert parse(out) == claims


def test_scope_is_kept_when_set() -> None:
    claims = parse(payload(scope="rabbitmq.read:*/*"))
    assert claims.to_jwt_payload()["scope"] == "rabbitmq.read:*/*"


def test_aud_string_or_list() -> None:
    assert parse(payload()).audiences == ("gatepass-mqtt",)
    many = parse(payload(aud=["a", "b"]))
    assert many.aud == ("a", "b")
    assert many.to_jwt_payload()["aud"] == ["a", "b"]


def test_acl_entry_json_form_matches_the_spec() -> None:
    entry = AclEntry(permission="deny", action="all", topic="devices/+/secret")
    assert entry.model_dump() == {
        "permission": "deny",
        "action": "all",
        "topic": "devices/+/secret",
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"exp": "1300"},
        {"exp": True},
        {"iat": 1000.0},
        {"nbf": 1000.5},
        {"exp": -1, "iat": -5, "nbf": -5},
        {"exp": 2**53},
        {"exp": None},
        {"client_id": "dev-2"},
        {"exp": 1000},
        {"exp": 999},
        {"nbf": 1301},
        {"iss": ""},
        {"jti": ""},
        {"aud": []},
        {"aud": ["a", ""]},
        {"aud": ["a", 1]},
        {"surprise": 1},
        {"cnf": {"x5t#S256": THUMB, "extra": 1}},
        {"cnf": {"x5t#S256": "q" * 42 + "B"}},
        {"cnf": {"x5t#S256": "q" * 44}},
        {"cnf": {"x5t#S256": "q" * 42 + "A="}},
        {"cnf": {"x5t_s256": THUMB}},
        {"acl": [{"permission": "allow", "action": "connect", "topic": "a"}]},
        {"acl": [{"permission": "allow", "action": "publish", "topic": ""}]},
        {"acl": [{"permission": "allow", "action": "publish", "topic": "a\u0000b"}]},
        {"acl": [{"permission": "allow", "action": "publish", "topic": "a/#/b"}]},
        {"acl": [{"permission": "allow", "action": "publish", "topic": "a+"}]},
        {"acl": [{"permission": "allow", "action": "publish", "topic": "a", "x": 1}]},
        {"acl": {"permission": "allow"}},
        {"scope": 5},
    ],
)
def test_strict_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse(payload(**bad))


def test_models_are_frozen() -> None:
    claims = parse(payload())
    with pytest.raises(ValidationError):
        claims.exp = 5  # type: ignore[misc,unused-ignore]
    with pytest.raises(ValidationError):
        claims.acl[0].topic = "#"  # type: ignore[misc,unused-ignore]


def test_confirmation_accepts_only_the_wire_name() -> None:
    assert Confirmation.model_validate({"x5t#S256": THUMB}).model_dump(by_alias=True) == {
        "x5t#S256": THUMB
    }
    with pytest.raises(ValidationError):
        Confirmation.model_validate({"x5t_s256": THUMB})


def test_python_construction_is_strict_too() -> None:
    with pytest.raises(ValidationError):
        AccessTokenClaims.model_validate(payload(exp="1300"))
