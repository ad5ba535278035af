"""The ACL -> RabbitMQ scope translation (`gateway.rabbitmq`): pure, no broker.

The property tests check the one promise that matters: every topic RabbitMQ would let a
device publish or subscribe to under the translated scopes is allowed by its ACL.
RabbitMQ's own matching is modelled by `scope_permits`/`wildcard_match`, a port of
`rabbit_oauth2_scope` and `wildcard` 3.10 that `tests/test_rabbitmq.py` checks against
the real Erlang code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.rabbitmq import (
    Grant,
    UnrepresentableAcl,
    check_acl,
    mqtt_to_amqp,
    render_conf,
    render_enabled_plugins,
    scope_claim,
    scope_permits,
    subscription_queues,
    translate_acl,
    wildcard_match,
    write_key_files,
)
from shared.acl import AclRule, compile_acl, default_rules, expand_placeholders, rules_from_cli
from shared.keyset import SigningKey
from shared.topics import validate_topic_filter

RSID = "gatepass"


def claim_for(rules: tuple[AclRule, ...], device_id: str, strict: bool = True) -> str:
    return scope_claim(translate_acl(rules, device_id, strict=strict), RSID)


def may_publish(claim: str, topic: str) -> bool:
    rk = mqtt_to_amqp(topic)
    return scope_permits(claim, RSID, "write", "exchange", "amq.topic") and scope_permits(
        claim, RSID, "write", "topic", "amq.topic", routing_key=rk
    )


def may_subscribe(claim: str, client_id: str, filter: str) -> bool:
    queues_ok = all(
        scope_permits(claim, RSID, permission, "queue", queue)
        for queue in subscription_queues(client_id)
        for permission in ("configure", "write", "read")
    )
    return (
        queues_ok
        and scope_permits(claim, RSID, "read", "exchange", "amq.topic")
        and scope_permits(
            claim, RSID, "read", "topic", "amq.topic", routing_key=mqtt_to_amqp(filter)
        )
    )


def default_claim(device_id: str) -> str:
    return claim_for(expand_placeholders(default_rules(), device_id), device_id)


# --- examples ------------------------------------------------------------------------------


def test_default_device_scopes_are_exact() -> None:
    grant = translate_acl(expand_placeholders(default_rules(), "dev-1"), "dev-1")
    assert grant.scopes == (
        "write:%2F/amq.topic/devices.dev-1",
        "write:%2F/amq.topic/devices.dev-1.*",
        "read:%2F/amq.topic/devices.dev-1.commands",
        "read:%2F/amq.topic/devices.dev-1.commands.*",
        "configure:%2F/mqtt-subscription-dev-1qos0",
        "write:%2F/mqtt-subscription-dev-1qos0",
        "read:%2F/mqtt-subscription-dev-1qos0",
        "configure:%2F/mqtt-subscription-dev-1qos1",
        "write:%2F/mqtt-subscription-dev-1qos1",
        "read:%2F/mqtt-subscription-dev-1qos1",
    )
    assert grant.dropped == grant.narrowed == ()
    assert scope_claim(grant, RSID).startswith("gatepass.write:%2F/amq.topic/devices.dev-1 ")


def test_dev_1_cannot_reach_dev_10() -> None:
    claim = default_claim("dev-1")
    assert may_publish(claim, "devices/dev-1/telemetry")
    assert may_publish(claim, "devices/dev-1")
    assert not may_publish(claim, "devices/dev-10/telemetry")
    assert not may_publish(claim, "devices/dev-10")
    assert not may_publish(claim, "devices/dev-1x")
    assert may_subscribe(claim, "dev-1", "devices/dev-1/commands/#")
    assert may_subscribe(claim, "dev-1", "devices/dev-1/commands/+/x")
    assert not may_subscribe(claim, "dev-1", "devices/dev-10/commands/#")
    assert not may_subscribe(claim, "dev-1", "devices/dev-1/commandsX")
    assert not may_subscribe(claim, "dev-1", "devices/dev-1/#")
    # The queues of another client (even one whose id extends ours) are not ours.
    assert not scope_permits(claim, RSID, "read", "queue", "mqtt-subscription-dev-1qosqos1")
    assert not scope_permits(claim, RSID, "read", "queue", "mqtt-subscription-dev-10qos1")


def test_backend_plus_subscription_is_granted_as_that_filter_only() -> None:
    rules = rules_from_cli([], ["devices/+/telemetry"], [])
    grant = translate_acl(rules, "backend")
    assert [why for _, why in grant.narrowed] == [
        "subscribe: granted only as this exact filter: RabbitMQ cannot express '+'"
    ]
    claim = scope_claim(grant, RSID)
    assert may_subscribe(claim, "backend", "devices/+/telemetry")
    assert not may_subscribe(claim, "backend", "devices/dev-1/telemetry")  # narrower
    assert not may_subscribe(claim, "backend", "devices/a/b/telemetry")
    assert not may_subscribe(claim, "backend", "devices/#")
    assert not may_publish(claim, "devices/dev-1/telemetry")


def test_plus_for_publishing_is_refused_with_a_clear_message() -> None:
    rules = rules_from_cli(["devices/+/commands/#"], ["devices/+/telemetry"], [])
    with pytest.raises(UnrepresentableAcl, match=r"'\+' cannot be granted for publishing"):
        check_acl(rules, "backend")
    grant = translate_acl(rules, "backend", strict=False)
    assert [rule.topic for rule, _ in grant.dropped] == ["devices/+/commands/#"]
    assert not any("commands" in scope for scope in grant.scopes)


@pytest.mark.parametrize(
    ("pub", "message"),
    [
        ("#", "wildcard"),
        ("+/x", "wildcard"),
        ("devices/a.b", "'.' and '\\*'"),
        ("devices/*", "'.' and '\\*'"),
    ],
)
def test_unrepresentable_filters(pub: str, message: str) -> None:
    with pytest.raises(UnrepresentableAcl, match=message):
        check_acl(rules_from_cli([pub], [], []), "dev-1")


def test_device_id_with_dot_is_refused() -> None:
    with pytest.raises(UnrepresentableAcl, match=r"device id 'a\.b'"):
        check_acl(expand_placeholders(default_rules(), "a.b"), "a.b")


def test_deny_overlapping_an_allow_is_refused_or_dropped() -> None:
    rules = rules_from_cli(["devices/dev-1/#"], [], ["devices/dev-1/secret/#"])
    with pytest.raises(UnrepresentableAcl, match="overlaps the earlier deny"):
        check_acl(rules, "dev-1")
    assert translate_acl(rules, "dev-1", strict=False).scopes == ()


def test_deny_disjoint_from_allows_is_harmless() -> None:
    rules = rules_from_cli(["devices/dev-1/#"], [], ["devices/dev-2/#"])
    claim = scope_claim(check_acl(rules, "dev-1"), RSID)
    assert may_publish(claim, "devices/dev-1/x")


def test_special_characters_are_literal() -> None:
    rules = rules_from_cli(["a b/c%/x:y/é"], [], [])
    claim = scope_claim(check_acl(rules, "d"), RSID)
    assert "%20" in claim and "%25" in claim and "%3A" in claim and " a" not in claim
    assert may_publish(claim, "a b/c%/x:y/é")
    assert not may_publish(claim, "a b/c%25/x:y/é")
    assert not may_publish(claim, "a+b/c%/x:y/é")


def test_scope_claim_refuses_bad_resource_server_id() -> None:
    with pytest.raises(ConfigError):
        scope_claim(Grant(scopes=()), "bad id")


def test_wildcard_model() -> None:
    assert wildcard_match("devices.dev-1.x", "devices.dev-1.*")
    assert not wildcard_match("devices.dev-10.x", "devices.dev-1.*")
    assert wildcard_match("devices.*.t", "devices.%2A.t")
    assert not wildcard_match("devices.x.t", "devices.%2A.t")
    assert wildcard_match("a b", "a+b")
    assert not wildcard_match("abXb", "a*b")  # greedy, no backtracking (as in Erlang)
    assert not wildcard_match("anything", "a%zz*")
    assert wildcard_match("", "*")


# --- properties ------------------------------------------------------------------------------

LEVELS = ["devices", "dev-1", "dev-10", "commands", "telemetry", "a", "", "x y", "%41"]
NAME_LEVELS = [*LEVELS, "dev-1.x", "*", "$SYS", "a+"]


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from([*LEVELS, "+"]), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "a"


@st.composite
def acls(draw: st.DrawFn) -> tuple[AclRule, ...]:
    count = draw(st.integers(min_value=1, max_value=5))
    return tuple(
        AclRule(
            permission=draw(st.sampled_from(["allow", "allow", "deny"])),
            action=draw(st.sampled_from(["publish", "subscribe", "all"])),
            topic=draw(filters()),
        )
        for _ in range(count)
    )


names = st.lists(st.sampled_from(NAME_LEVELS), min_size=1, max_size=5).map(
    lambda levels: "/".join(levels) or "a"
)


def _canonical_name(topic: str) -> str:
    """The MQTT topic RabbitMQ really routes `topic` as ("." is a level separator)."""
    return topic.replace(".", "/")


def _canonical_filter(filter: str) -> str:
    """The MQTT filter equivalent to the binding RabbitMQ makes for `filter`."""
    words = mqtt_to_amqp(filter).split(".")
    return "/".join("+" if word == "*" else word for word in words)


@settings(max_examples=400, deadline=None)
@given(rules=acls(), topic=names)
def test_every_topic_the_scopes_allow_publishing_the_acl_allows(
    rules: tuple[AclRule, ...], topic: str
) -> None:
    claim = claim_for(rules, "dev-1", strict=False)
    if "+" in topic:
        return  # not a topic name: MQTT clients cannot publish to it
    if may_publish(claim, topic):
        assert compile_acl(rules).permits("publish", _canonical_name(topic)), claim


@settings(max_examples=400, deadline=None)
@given(rules=acls(), filter=filters())
def test_every_filter_the_scopes_allow_subscribing_the_acl_allows(
    rules: tuple[AclRule, ...], filter: str
) -> None:
    claim = claim_for(rules, "dev-1", strict=False)
    if may_subscribe(claim, "dev-1", filter):
        canonical = _canonical_filter(filter)
        validate_topic_filter(canonical)
        assert compile_acl(rules).permits("subscribe", canonical), claim


@settings(max_examples=200, deadline=None)
@given(rules=acls())
def test_strict_translation_refuses_exactly_when_something_would_be_dropped(
    rules: tuple[AclRule, ...],
) -> None:
    lenient = translate_acl(rules, "dev-1", strict=False)
    if lenient.dropped:
        with pytest.raises(UnrepresentableAcl):
            check_acl(rules, "dev-1")
    else:
        assert check_acl(rules, "dev-1") == lenient


# --- rabbitmq.conf ---------------------------------------------------------------------------


def test_render_conf_and_key_files(tmp_path: Path) -> None:
    key = SigningKey.generate()
    paths = write_key_files(tmp_path / "keys", {key.kid: key.public_key})
    assert paths[key.kid].read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    conf = render_conf(
        resource_server_id=RSID, key_files=paths, mqtt_port=1883, management_port=15672
    )
    lines = conf.splitlines()
    assert f"auth_oauth2.signing_keys.{key.kid} = {paths[key.kid]}" in lines
    assert "auth_oauth2.algorithms.1 = ES256" in lines
    assert "auth_oauth2.resource_server_id = gatepass" in lines
    assert "mqtt.allow_anonymous = false" in lines
    assert render_enabled_plugins() == (
        "[rabbitmq_mqtt,rabbitmq_auth_backend_oauth2,rabbitmq_management].\n"
    )
    with pytest.raises(ConfigError):
        render_conf(resource_server_id=RSID, key_files={}, mqtt_port=1, management_port=2)
