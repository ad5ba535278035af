"""Tests for shared.acl: the rule model, placeholder expansion and enforcement."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.acl import (
    DEFAULT_CACHE_SIZE,
    AclRule,
    Action,
    CompiledAcl,
    compile_acl,
    default_rules,
    expand_placeholders,
    rules_from_claim,
    rules_from_cli,
    rules_to_claim,
)
from shared.errors import AccessDenied, GatepassError, InvalidTopic


def allow(action: str, topic: str) -> AclRule:
    return AclRule.model_validate({"permission": "allow", "action": action, "topic": topic})


def deny(action: str, topic: str) -> AclRule:
    return AclRule.model_validate({"permission": "deny", "action": action, "topic": topic})


# --- the rule model -------------------------------------------------------------------


def test_json_form_is_exactly_the_spec_form() -> None:
    rule = allow("publish", "devices/dev-1/#")
    expected = {"permission": "allow", "action": "publish", "topic": "devices/dev-1/#"}
    assert json.loads(rule.model_dump_json()) == expected
    assert list(json.loads(rule.model_dump_json())) == ["permission", "action", "topic"]
    assert rule.model_dump(mode="json") == expected


def test_json_round_trip() -> None:
    text = '{"permission": "deny", "action": "all", "topic": "devices/+/secret/#"}'
    rule = AclRule.model_validate_json(text)
    assert rule == deny("all", "devices/+/secret/#")
    assert AclRule.model_validate_json(rule.model_dump_json()) == rule


def test_claim_round_trip_keeps_order() -> None:
    rules = (deny("all", "a/#"), allow("publish", "a/b"), allow("subscribe", "c/+"))
    claim = rules_to_claim(rules)
    assert claim == [
        {"permission": "deny", "action": "all", "topic": "a/#"},
        {"permission": "allow", "action": "publish", "topic": "a/b"},
        {"permission": "allow", "action": "subscribe", "topic": "c/+"},
    ]
    assert rules_from_claim(json.loads(json.dumps(claim))) == rules


@pytest.mark.parametrize(
    "claim",
    [
        {"permission": "allow", "action": "publish", "topic": "a"},  # not a list
        [{"permission": "allow", "action": "publish"}],
        [{"permission": "allow", "action": "publish", "topic": "a", "qos": 1}],
        [{"permission": "ALLOW", "action": "publish", "topic": "a"}],
        [{"permission": "allow", "action": "read", "topic": "a"}],
        [{"permission": "allow", "action": "publish", "topic": "a/#/b"}],
        [{"permission": "allow", "action": "publish", "topic": 7}],
        [["allow", "publish", "a"]],
    ],
)
def test_rules_from_claim_rejects_malformed(claim: object) -> None:
    with pytest.raises(ValidationError):
        rules_from_claim(claim)


@pytest.mark.parametrize(
    "data",
    [
        {"permission": "allow", "action": "publish", "topic": "a", "extra": "x"},
        {"permission": "permit", "action": "publish", "topic": "a"},
        {"permission": "allow", "action": "pub", "topic": "a"},
        {"permission": "allow", "action": "publish", "topic": b"a"},
        {"permission": "allow", "action": "publish", "topic": ""},
        {"permission": "allow", "action": "publish", "topic": "sport+"},
        {"permission": "allow", "action": "publish", "topic": "a/\x00"},
        {"permission": "allow", "action": "publish", "topic": "devices/{device_id}#"},
        {"permission": "allow", "action": "publish", "topic": "{device_id}/\ud800"},
        {"permission": "allow", "action": "publish"},
    ],
)
def test_rule_is_strict(data: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AclRule.model_validate(data)


def test_rule_is_frozen_and_hashable() -> None:
    rule = allow("publish", "a")
    with pytest.raises(ValidationError):
        rule.topic = "b"
    assert hash(rule) == hash(allow("publish", "a"))


def test_rule_accepts_placeholder() -> None:
    rule = allow("publish", "devices/{device_id}/#")
    assert rule.topic == "devices/{device_id}/#"


# --- placeholders, defaults and the CLI -----------------------------------------------


def test_expand_placeholders() -> None:
    stored = (
        deny("all", "devices/{device_id}/secret/#"),
        allow("publish", "fleet/{device_id}-status"),
        allow("subscribe", "broadcast/#"),
    )
    assert expand_placeholders(stored, "dev-1") == (
        deny("all", "devices/dev-1/secret/#"),
        allow("publish", "fleet/dev-1-status"),
        allow("subscribe", "broadcast/#"),
    )


@pytest.mark.parametrize(
    "device_id", ["", "+", "#", "dev/1", "dev+1", "dev#", "a\x00b", "$SYS", "\ud800"]
)
def test_expand_refuses_ids_that_could_widen(device_id: str) -> None:
    with pytest.raises(InvalidTopic):
        expand_placeholders(default_rules(), device_id)


def test_expand_refuses_ids_even_without_placeholders() -> None:
    with pytest.raises(InvalidTopic):
        expand_placeholders([allow("publish", "a")], "x/y")


def test_expand_reports_too_long_result_as_invalid_topic() -> None:
    with pytest.raises(InvalidTopic):
        expand_placeholders(default_rules(), "d" * 70_000)


@settings(max_examples=300)
@given(st.text(max_size=12))
def test_expansion_never_adds_wildcards_or_levels(device_id: str) -> None:
    template = allow("subscribe", "devices/{device_id}/+/x{device_id}/#")
    try:
        (expanded,) = expand_placeholders([template], device_id)
    except InvalidTopic:
        return
    assert expanded.topic.split("/") == ["devices", device_id, "+", f"x{device_id}", "#"]


def test_default_rules() -> None:
    assert default_rules() == (
        allow("publish", "devices/{device_id}/#"),
        allow("subscribe", "devices/{device_id}/commands/#"),
    )
    acl = CompiledAcl(expand_placeholders(default_rules(), "dev-1"))
    acl.check_publish("devices/dev-1/telemetry")
    acl.check_subscribe("devices/dev-1/commands/#")
    with pytest.raises(AccessDenied):
        acl.check_publish("devices/dev-2/telemetry")
    with pytest.raises(AccessDenied):
        acl.check_subscribe("devices/dev-1/telemetry")


def test_rules_from_cli_defaults() -> None:
    assert rules_from_cli([], [], []) == default_rules()
    assert rules_from_cli([], [], ["devices/{device_id}/secret/#"]) == (
        deny("all", "devices/{device_id}/secret/#"),
        *default_rules(),
    )


def test_rules_from_cli_order_denies_then_pub_then_sub() -> None:
    rules = rules_from_cli(
        pub=["devices/+/commands/#", "audit"],
        sub=["devices/+/telemetry"],
        deny=["devices/admin/#", "$SYS/#"],
    )
    assert rules == (
        deny("all", "devices/admin/#"),
        deny("all", "$SYS/#"),
        allow("publish", "devices/+/commands/#"),
        allow("publish", "audit"),
        allow("subscribe", "devices/+/telemetry"),
    )


def test_rules_from_cli_pub_only_has_no_default_subscribe() -> None:
    assert rules_from_cli(["a/#"], [], []) == (allow("publish", "a/#"),)


@pytest.mark.parametrize(
    ("pub", "sub", "deny_"), [(["a/#/b"], [], []), ([], ["+x"], []), ([], [], [""])]
)
def test_rules_from_cli_rejects_bad_filters(
    pub: list[str], sub: list[str], deny_: list[str]
) -> None:
    with pytest.raises(InvalidTopic):
        rules_from_cli(pub, sub, deny_)


# --- enforcement ----------------------------------------------------------------------


def test_first_match_wins() -> None:
    allow_first = CompiledAcl([allow("publish", "a/#"), deny("publish", "a/b")])
    allow_first.check_publish("a/b")
    deny_first = CompiledAcl([deny("publish", "a/b"), allow("publish", "a/#")])
    with pytest.raises(AccessDenied):
        deny_first.check_publish("a/b")
    deny_first.check_publish("a/c")


def test_no_match_denies() -> None:
    acl = CompiledAcl([allow("publish", "a")])
    with pytest.raises(AccessDenied, match="publish"):
        acl.check_publish("b")
    with pytest.raises(AccessDenied, match="subscribe"):
        acl.check_subscribe("a")
    empty = CompiledAcl([])
    with pytest.raises(AccessDenied):
        empty.check_publish("a")
    with pytest.raises(AccessDenied):
        empty.check_subscribe("a")


def test_access_denied_is_a_gatepass_error() -> None:
    with pytest.raises(GatepassError):
        CompiledAcl([]).check_publish("a")


def test_all_applies_to_both_actions() -> None:
    acl = CompiledAcl([deny("all", "a/secret"), allow("all", "a/#")])
    acl.check_publish("a/x")
    acl.check_subscribe("a/x")
    acl.check_subscribe("a/+/y")
    for check in (acl.check_publish, acl.check_subscribe):
        with pytest.raises(AccessDenied):
            check("a/secret")


def test_action_specific_rules_do_not_leak() -> None:
    acl = CompiledAcl([allow("publish", "p/#"), allow("subscribe", "s/#")])
    acl.check_publish("p/1")
    acl.check_subscribe("s/1")
    with pytest.raises(AccessDenied):
        acl.check_subscribe("p/1")
    with pytest.raises(AccessDenied):
        acl.check_publish("s/1")
    # A deny for the other action is not consulted either.
    acl2 = CompiledAcl([deny("subscribe", "x"), allow("all", "x")])
    acl2.check_publish("x")
    with pytest.raises(AccessDenied):
        acl2.check_subscribe("x")


@pytest.mark.parametrize("topic", ["a/+", "a/#", "#", "", "a/\x00", "a/\ud800", "a" * 65536])
def test_invalid_publish_topic_is_denied(topic: str) -> None:
    acl = CompiledAcl([allow("all", "#")])
    with pytest.raises(AccessDenied):
        acl.check_publish(topic)


@pytest.mark.parametrize("filter_", ["a/#/b", "a+", "", "a/\x00", "\ud800"])
def test_invalid_subscribe_filter_is_denied(filter_: str) -> None:
    acl = CompiledAcl([allow("all", "#")])
    with pytest.raises(AccessDenied):
        acl.check_subscribe(filter_)


def test_dollar_topics_are_not_granted_by_hash() -> None:
    acl = CompiledAcl([allow("all", "#")])
    with pytest.raises(AccessDenied):
        acl.check_publish("$SYS/broker")
    with pytest.raises(AccessDenied):
        acl.check_subscribe("$SYS/#")
    acl.check_subscribe("+/x")


def test_subscribe_needs_coverage_not_overlap() -> None:
    acl = CompiledAcl([allow("subscribe", "devices/dev-1/#")])
    acl.check_subscribe("devices/dev-1/#")
    acl.check_subscribe("devices/dev-1")
    acl.check_subscribe("devices/dev-1/+/x")
    for wider in ("devices/+/telemetry", "devices/#", "#", "+/dev-1/#", "devices/+"):
        with pytest.raises(AccessDenied):
            acl.check_subscribe(wider)


def test_subscribe_refused_by_intersecting_deny() -> None:
    acl = CompiledAcl([deny("all", "devices/dev-1/secret/#"), allow("all", "devices/dev-1/#")])
    with pytest.raises(AccessDenied):
        acl.check_subscribe("devices/dev-1/#")
    with pytest.raises(AccessDenied):
        acl.check_subscribe("devices/dev-1/+")  # matches devices/dev-1/secret
    with pytest.raises(AccessDenied):
        acl.check_subscribe("devices/dev-1/+/x")  # matches devices/dev-1/secret/x
    acl.check_subscribe("devices/dev-1/telemetry")
    acl.check_subscribe("devices/dev-1/status/#")
    acl.check_subscribe("devices/dev-1/secrets")  # a different level, not under secret/


def test_deny_before_allow_only_when_deny_comes_first() -> None:
    later_deny = CompiledAcl(
        [allow("all", "devices/dev-1/#"), deny("all", "devices/dev-1/secret/#")]
    )
    later_deny.check_subscribe("devices/dev-1/#")
    later_deny.check_publish("devices/dev-1/secret/x")


def test_backend_with_wide_filters() -> None:
    rules = rules_from_cli(pub=["devices/+/commands/#"], sub=["devices/+/telemetry"], deny=[])
    acl = CompiledAcl(expand_placeholders(rules, "backend"))
    acl.check_subscribe("devices/+/telemetry")
    acl.check_subscribe("devices/dev-9/telemetry")
    acl.check_publish("devices/dev-9/commands/reboot")
    with pytest.raises(AccessDenied):
        acl.check_subscribe("devices/#")


def test_a_deny_refuses_wide_subscriptions_that_reach_it() -> None:
    rules = rules_from_cli(
        pub=["devices/+/commands/#"], sub=["devices/+/telemetry"], deny=["devices/admin/#"]
    )
    acl = CompiledAcl(expand_placeholders(rules, "backend"))
    with pytest.raises(AccessDenied):
        acl.check_subscribe("devices/+/telemetry")  # would receive devices/admin/telemetry
    acl.check_subscribe("devices/dev-9/telemetry")
    with pytest.raises(AccessDenied):
        acl.check_publish("devices/admin/commands/x")
    acl.check_publish("devices/dev-9/commands/x")


def test_permits_is_a_bool_view() -> None:
    acl = CompiledAcl([allow("publish", "a"), allow("subscribe", "b/#")])
    assert acl.permits("publish", "a") is True
    assert acl.permits("publish", "b") is False
    assert acl.permits("subscribe", "b/+") is True
    assert acl.permits("subscribe", "a") is False


def test_compile_acl_and_rules_attribute() -> None:
    rules = (allow("publish", "a"),)
    acl = compile_acl(rules)
    assert isinstance(acl, CompiledAcl)
    assert acl.rules == rules
    acl.check_publish("a")
    assert "CompiledAcl" in repr(acl)


def test_denial_message_does_not_echo_huge_topics() -> None:
    acl = CompiledAcl([])
    with pytest.raises(AccessDenied) as info:
        acl.check_publish("x" * 60_000)
    assert len(str(info.value)) < 200


def test_cache_is_bounded_and_decisions_stable() -> None:
    acl = CompiledAcl([allow("publish", "t/#")], cache_size=8)
    for round_ in range(3):
        for index in range(50):
            assert acl.permits("publish", f"t/{index}")
            assert not acl.permits("publish", f"u/{index}")
        assert len(acl._pub_cache) <= 8, round_
    long_topic = "t/" + "x" * 300
    acl.check_publish(long_topic)
    assert long_topic not in acl._pub_cache


def test_cache_can_be_disabled() -> None:
    acl = CompiledAcl([allow("all", "#")], cache_size=0)
    acl.check_publish("a")
    acl.check_subscribe("a/#")
    assert acl._pub_cache == {}
    assert acl._sub_cache == {}
    assert DEFAULT_CACHE_SIZE == 1024


# --- property tests against a simple reference ----------------------------------------

NAME_LEVELS = ("a", "b", "$x", "")
FILTER_LEVELS = (*NAME_LEVELS, "+")
MAX_NAME_DEPTH = 5
ALL_NAMES = tuple(
    name
    for depth in range(1, MAX_NAME_DEPTH + 1)
    for levels in itertools.product(NAME_LEVELS, repeat=depth)
    if (name := "/".join(levels))
)


@cache
def _regex(filter_: str) -> re.Pattern[str]:
    """Filter -> regular expression over a whole topic name (MQTT 3.1.1 section 4.7)."""
    if filter_ == "#":
        return re.compile(r"(?!\$).*", re.DOTALL)
    body, multi = (filter_[:-2], True) if filter_.endswith("/#") else (filter_, False)
    parts = ["[^/]*" if level == "+" else re.escape(level) for level in body.split("/")]
    pattern = "/".join(parts) + ("(/.*)?" if multi else "")
    return re.compile((r"(?!\$)" if filter_.startswith("+") else "") + pattern, re.DOTALL)


@cache
def _matched(filter_: str) -> tuple[str, ...]:
    return tuple(name for name in ALL_NAMES if _regex(filter_).fullmatch(name))


def _reference_allows(rules: Sequence[AclRule], action: Action, topic: str) -> bool:
    """First matching rule for `action` on concrete `topic` decides; no match denies."""
    for rule in rules:
        if rule.action in (action, "all") and _regex(rule.topic).fullmatch(topic):
            return rule.permission == "allow"
    return False


filters = st.builds(
    lambda body, multi: "/".join([*body, "#"] if multi else body) or "#",
    st.lists(st.sampled_from(FILTER_LEVELS), max_size=3),
    st.booleans(),
)
names = st.sampled_from(ALL_NAMES)
rules_st = st.lists(
    st.builds(
        AclRule,
        permission=st.sampled_from(["allow", "deny"]),
        action=st.sampled_from(["publish", "subscribe", "all"]),
        topic=filters,
    ),
    max_size=5,
)


@settings(max_examples=300)
@given(rules_st, filters)
def test_subscribe_is_sound(rules: list[AclRule], filter_: str) -> None:
    """If a filter is granted, every topic it matches is granted by first-match."""
    acl = CompiledAcl(rules)
    if acl.permits("subscribe", filter_):
        for topic in _matched(filter_):
            assert _reference_allows(rules, "subscribe", topic), topic


@settings(max_examples=300)
@given(rules_st, names)
def test_publish_and_concrete_subscribe_agree_with_reference(
    rules: list[AclRule], topic: str
) -> None:
    acl = CompiledAcl(rules)
    assert acl.permits("publish", topic) is _reference_allows(rules, "publish", topic)
    # A topic name is also a filter matching only itself: subscribe is then exact.
    assert acl.permits("subscribe", topic) is _reference_allows(rules, "subscribe", topic)


@settings(max_examples=100)
@given(rules_st, st.lists(st.one_of(names, filters), max_size=30))
def test_cache_never_changes_a_decision(rules: list[AclRule], queries: list[str]) -> None:
    cached = CompiledAcl(rules, cache_size=4)
    uncached = CompiledAcl(rules, cache_size=0)
    actions: tuple[Action, ...] = ("publish", "subscribe")
    for action, query in itertools.product(actions, queries * 2):
        assert cached.permits(action, query) is uncached.permits(action, query)
