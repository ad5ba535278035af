"""Unit tests of `gateway.mqtt_policy`: no sockets, no clocks (time is a parameter)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.mqtt_policy import (
    CLOSE_POLICY,
    CloseReason,
    ConnectRateLimiter,
    ConnectRefused,
    ConnectRequest,
    PublishRefused,
    RefusalReason,
    SessionIndex,
    SessionState,
    SubscribeRefused,
    admit,
    check_publish,
    check_receive,
    check_subscribe,
    session_from_claims,
)
from shared.claims import AclEntry
from shared.errors import AccessDenied
from shared.keyset import KeySet, SigningKey
from shared.tokens import (
    RejectReason,
    TokenVerifier,
    mint_access_token,
    new_access_token_claims,
)

NOW = 1_700_000_000.0
THUMB = "A" * 43
OTHER_THUMB = "B" * 42 + "A"
KEY = SigningKey.generate()
VERIFIER = TokenVerifier(KeySet.of(KEY), issuer="iss", audience="aud")
ACL = (
    AclEntry(permission="deny", action="all", topic="devices/dev-1/secret/#"),
    AclEntry(permission="allow", action="publish", topic="devices/dev-1/#"),
    AclEntry(permission="allow", action="subscribe", topic="devices/dev-1/commands/#"),
)


def token(
    device_id: str = "dev-1", *, lifetime: int = 300, now: float = NOW, key: SigningKey = KEY
) -> str:
    claims = new_access_token_claims(
        device_id=device_id,
        acl=ACL,
        cert_thumbprint=THUMB,
        issuer="iss",
        audience="aud",
        lifetime=lifetime,
        now=now,
    )
    return mint_access_token(claims, key)


def request(**changes: object) -> ConnectRequest:
    base = ConnectRequest(
        client_id="dev-1", username="dev-1", password=token(), peer_thumbprint=THUMB
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def decide(
    req: ConnectRequest,
    *,
    revoked: frozenset[str] = frozenset(),
    retired: frozenset[str] = frozenset(),
    now: float = NOW + 1,
) -> SessionState:
    return admit(req, verifier=VERIFIER, revoked=revoked, retired_kids=retired, now=now)


def test_admit_grants_the_token() -> None:
    state = decide(request())
    assert (state.device_id, state.client_id, state.kid) == ("dev-1", "dev-1", KEY.kid)
    assert state.exp == int(NOW) + 300


def test_empty_client_id_is_given_sub() -> None:
    assert decide(request(client_id="")).client_id == "dev-1"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"password": None}, RefusalReason.missing_token),
        ({"password": ""}, RefusalReason.missing_token),
        ({"password": "x.y.z"}, RefusalReason.bad_token),
        ({"password": token(key=SigningKey.generate())}, RefusalReason.bad_token),
        ({"username": "dev-2"}, RefusalReason.username_mismatch),
        ({"username": None}, RefusalReason.username_mismatch),
        ({"client_id": "dev-2"}, RefusalReason.client_id_mismatch),
        ({"peer_thumbprint": None}, RefusalReason.no_client_cert),
        ({"peer_thumbprint": OTHER_THUMB}, RefusalReason.cnf_mismatch),
        ({"will_topic": "devices/dev-2/status"}, RefusalReason.will_denied),
        ({"will_topic": "devices/dev-1/secret/x"}, RefusalReason.will_denied),
    ],
)
def test_connect_refusals(changes: dict[str, object], reason: RefusalReason) -> None:
    with pytest.raises(ConnectRefused) as info:
        decide(request(**changes))
    assert info.value.reason is reason
    assert info.value.return_code == 5


def test_allowed_will_is_accepted() -> None:
    decide(request(will_topic="devices/dev-1/status"))


def test_expired_token_and_exp_without_leeway() -> None:
    with pytest.raises(ConnectRefused) as info:
        decide(request(), now=NOW + 400)  # past exp + verifier leeway
    assert info.value.token_reason is RejectReason.expired
    with pytest.raises(ConnectRefused) as info:
        decide(request(), now=NOW + 310)  # inside the verifier's leeway, after exp
    assert info.value.reason is RefusalReason.expired


def test_revoked_and_retired() -> None:
    with pytest.raises(ConnectRefused) as info:
        decide(request(), revoked=frozenset({"dev-1"}))
    assert info.value.reason is RefusalReason.revoked
    with pytest.raises(ConnectRefused) as info:
        decide(request(), retired=frozenset({KEY.kid}))
    assert info.value.reason is RefusalReason.key_retired


def test_publish_subscribe_receive_decisions() -> None:
    state = decide(request())
    check_publish(state, "devices/dev-1/telemetry", NOW + 1)
    check_subscribe(state, "devices/dev-1/commands/#", NOW + 1)
    check_receive(state, "devices/dev-1/commands/open")
    for topic in ("devices/dev-2/telemetry", "devices/dev-1/secret/a"):
        with pytest.raises(PublishRefused) as pub:
            check_publish(state, topic, NOW + 1)
        assert pub.value.reason is RefusalReason.acl_denied
    with pytest.raises(SubscribeRefused):
        check_subscribe(state, "devices/+/commands/#", NOW + 1)
    with pytest.raises(AccessDenied):
        check_receive(state, "devices/dev-2/commands/open")


def test_decisions_end_at_exp() -> None:
    state = decide(request())
    with pytest.raises(PublishRefused) as pub:
        check_publish(state, "devices/dev-1/telemetry", state.exp)
    assert pub.value.reason is RefusalReason.expired
    with pytest.raises(SubscribeRefused) as sub:
        check_subscribe(state, "devices/dev-1/commands/#", state.exp + 1)
    assert sub.value.reason is RefusalReason.expired


def test_session_state_is_frozen_and_consistent() -> None:
    state = decide(request())
    with pytest.raises(AttributeError):
        state.exp = 0  # type: ignore[misc,unused-ignore]
    with pytest.raises(ValueError, match="device id"):
        replace(state, client_id="other")


def test_session_index() -> None:
    index = SessionIndex()
    claims = VERIFIER.verify(token(), NOW)
    a = session_from_claims(claims, "k1")
    b = replace(session_from_claims(VERIFIER.verify(token("dev-2", lifetime=100), NOW), "k2"))
    index.add(1, a)
    index.add(2, b)
    with pytest.raises(ValueError, match="already live"):
        index.add(1, a)
    assert index.of_devices(["dev-2", "nope"]) == [2]
    assert index.of_kid("k1") == [1]
    assert (index.of_client(a.client_id), index.of_client(b.client_id)) == ([1], [2])
    assert index.of_client("nobody") == []
    assert index.expired(NOW + 50) == []
    assert index.expired(NOW + 100) == [2]
    assert index.expired(NOW + 100) == []  # reported once
    index.remove(1)
    index.remove(1)  # a second remove is harmless
    assert index.expired(NOW + 1000) == []
    assert len(index) == 1 and index.of_client(a.client_id) == []


def test_rate_limiter() -> None:
    limiter = ConnectRateLimiter(rate=2, burst=2)
    limiter.take(0)
    limiter.take(0)
    with pytest.raises(ConnectRefused) as info:
        limiter.take(0.1)
    assert (info.value.reason, info.value.return_code) == (RefusalReason.rate_limited, 3)
    limiter.take(0.6)
    with pytest.raises(ValueError, match="positive"):
        ConnectRateLimiter(rate=0, burst=1)


def test_close_policy_covers_every_reason() -> None:
    assert set(CLOSE_POLICY) == set(CloseReason)
    assert not CLOSE_POLICY[CloseReason.revoked].publish_will
    assert CLOSE_POLICY[CloseReason.keepalive].publish_will
