"""Tests for shared.topics: MQTT 3.1.1 section 4.7 examples and property tests.

The property tests compare the implementation with a deliberately simple reference:
matching by a regular expression translated from the filter, and *covers* /
*intersects* by enumerating every topic name over a small alphabet of levels.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import InvalidTopic
from shared.topics import (
    MAX_TOPIC_BYTES,
    TopicFilter,
    filter_covers,
    filters_intersect,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)

Validator = Callable[[str], None]

# --- section 4.7 examples -------------------------------------------------------------


@pytest.mark.parametrize(
    ("filter_", "topic", "expected"),
    [
        # 4.7.1.2 multi-level wildcard
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/tennis/player1/#", "sport/tennis/player2", False),
        ("sport/tennis/player1/#", "sport/tennis", False),
        ("sport/#", "sport", True),
        ("sport/#", "sport/", True),
        ("sport/#", "sports", False),
        ("#", "sport/tennis", True),
        ("#", "/", True),
        # 4.7.1.3 single-level wildcard
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player2", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("+/tennis/#", "sport/tennis/player1", True),
        ("+/tennis/#", "sport/tennis", True),
        ("+", "a", True),
        ("+/+", "/", True),
        ("+//+", "a//b", True),
        # 4.7.2 topics beginning with $
        ("#", "$SYS/broker/uptime", False),
        ("#", "$SYS", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("+", "$SYS", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/#", "$SYS", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("a/+", "a/$x", True),
        ("a/#", "a/$x", True),
        ("+/$x", "a/$x", True),
        # 4.7.3 case sensitivity and spaces
        ("ACCOUNTS", "Accounts", False),
        ("Accounts payable", "Accounts payable", True),
        ("sport", "sport", True),
        ("sport", "sport/", False),
        ("/", "/", True),
    ],
)
def test_matches_spec_examples(filter_: str, topic: str, expected: bool) -> None:
    assert topic_matches(filter_, topic) is expected
    assert TopicFilter(filter_).matches(topic) is expected


@pytest.mark.parametrize(
    "filter_",
    [
        "sport/tennis/#",
        "sport/tennis/+",
        "+",
        "+/tennis/#",
        "sport/+/player1",
        "#",
        "/",
        "//",
        "/+",
        "+/",
        "$SYS/#",
        "a b/c",
        "ü/€/𝄞",
    ],
)
def test_valid_filters(filter_: str) -> None:
    validate_topic_filter(filter_)


@pytest.mark.parametrize(
    "filter_",
    ["sport/tennis#", "sport/tennis/#/ranking", "sport+", "#/a", "a/#/", "##", "++", "a/+b", "+a"],
)
def test_invalid_filters(filter_: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic_filter(filter_)


@pytest.mark.parametrize("topic", ["sport/tennis/#", "sport/+", "+", "#", "a#", "a+b"])
def test_topic_name_rejects_wildcards(topic: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic_name(topic)


@pytest.mark.parametrize("validate", [validate_topic_name, validate_topic_filter])
class TestCommonRules:
    def test_empty(self, validate: Validator) -> None:
        with pytest.raises(InvalidTopic, match="empty"):
            validate("")

    def test_nul(self, validate: Validator) -> None:
        with pytest.raises(InvalidTopic, match="U\\+0000"):
            validate("a/\x00/b")

    @pytest.mark.parametrize("surrogate", ["\ud800", "\udfff", "a/\udc80"])
    def test_lone_surrogate(self, validate: Validator, surrogate: str) -> None:
        with pytest.raises(InvalidTopic, match="UTF-8"):
            validate(surrogate)

    def test_size_limit_counts_utf8_bytes(self, validate: Validator) -> None:
        validate("a" * MAX_TOPIC_BYTES)
        with pytest.raises(InvalidTopic, match="65536 bytes"):
            validate("a" * (MAX_TOPIC_BYTES + 1))
        three_bytes = "€"  # U+20AC is 3 bytes in UTF-8
        validate(three_bytes * (MAX_TOPIC_BYTES // 3))
        with pytest.raises(InvalidTopic):
            validate(three_bytes * (MAX_TOPIC_BYTES // 3) + "a")

    def test_single_and_only_slashes(self, validate: Validator) -> None:
        validate("/")
        validate("///")


def test_invalid_topic_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        validate_topic_name("a/+")


def test_matching_validates_its_inputs() -> None:
    with pytest.raises(InvalidTopic):
        topic_matches("sport+", "sport")
    with pytest.raises(InvalidTopic):
        topic_matches("sport/#", "sport/+")
    with pytest.raises(InvalidTopic):
        filter_covers("#", "a/#/b")
    with pytest.raises(InvalidTopic):
        filters_intersect("", "a")
    with pytest.raises(InvalidTopic):
        TopicFilter("a#")


def test_topic_filter_value_semantics() -> None:
    assert TopicFilter("a/+") == TopicFilter("a/+")
    assert hash(TopicFilter("a/+")) == hash(TopicFilter("a/+"))
    assert TopicFilter("a/+").levels == ("a", "+")
    with pytest.raises(AttributeError):
        TopicFilter("a").text = "b"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("#", "sport/tennis/+", True),
        ("sport/#", "sport", True),
        ("sport/#", "sport/tennis/#", True),
        ("sport/+", "sport/#", False),  # sport/# also matches "sport" and deeper
        ("sport/+/#", "sport/+", True),
        ("sport/tennis", "sport/+", False),
        ("sport/+", "sport/tennis", True),
        ("+/+", "/finance", True),
        ("#", "$SYS/#", False),
        ("+/#", "$SYS/x", False),
        ("$SYS/#", "$SYS/+", True),
        ("#", "+/x", True),
        ("a/+", "a/+/b", False),
        ("a/b", "a/b", True),
    ],
)
def test_covers_examples(outer: str, inner: str, expected: bool) -> None:
    assert filter_covers(outer, inner) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("sport/#", "+/tennis", True),
        ("sport", "sport/#", True),
        ("sport/+", "sport", False),
        ("a/b", "a/c", False),
        ("#", "$SYS/#", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/+", "$SYS/#", True),
        ("+/x", "+/+", True),
        ("/+", "+/finance", True),
        ("a/+/c", "a/b/+", True),
        ("a/+", "a/+/c", False),
    ],
)
def test_intersect_examples(a: str, b: str, expected: bool) -> None:
    assert filters_intersect(a, b) is expected
    assert filters_intersect(b, a) is expected


# --- reference implementation ---------------------------------------------------------

NAME_LEVELS = ("a", "b", "$x", "")
FILTER_LEVELS = (*NAME_LEVELS, "+")
MAX_FILTER_BODY = 3  # levels before an optional trailing "#"
# One level deeper than the longest filter, so "#" vs a fixed depth is always witnessed.
MAX_NAME_DEPTH = MAX_FILTER_BODY + 2


def _all_names() -> tuple[str, ...]:
    names = (
        "/".join(levels)
        for depth in range(1, MAX_NAME_DEPTH + 1)
        for levels in itertools.product(NAME_LEVELS, repeat=depth)
    )
    return tuple(name for name in names if name)  # "" is not a valid topic name


ALL_NAMES = _all_names()


def _reference_regex(filter_: str) -> re.Pattern[str]:
    """Translate a filter into a regular expression over the whole topic name."""
    if filter_ == "#":
        return re.compile(r"(?!\$).*", re.DOTALL)
    body, multi = (filter_[:-2], True) if filter_.endswith("/#") else (filter_, False)
    parts = ["[^/]*" if level == "+" else re.escape(level) for level in body.split("/")]
    pattern = "/".join(parts) + ("(/.*)?" if multi else "")
    if filter_.startswith("+"):
        pattern = r"(?!\$)" + pattern
    return re.compile(pattern, re.DOTALL)


@cache
def _reference_matched(filter_: str) -> frozenset[str]:
    regex = _reference_regex(filter_)
    return frozenset(name for name in ALL_NAMES if regex.fullmatch(name))


def _reference_matches(filter_: str, topic: str) -> bool:
    return _reference_regex(filter_).fullmatch(topic) is not None


filters = st.builds(
    lambda body, multi: "/".join([*body, "#"] if multi else body) or "#",
    st.lists(st.sampled_from(FILTER_LEVELS), min_size=0, max_size=MAX_FILTER_BODY),
    st.booleans(),
).filter(bool)
names = (
    st.lists(st.sampled_from(NAME_LEVELS), min_size=1, max_size=MAX_NAME_DEPTH)
    .map("/".join)
    .filter(bool)
)


def test_reference_sanity() -> None:
    assert _reference_matches("sport/#", "sport")
    assert not _reference_matches("#", "$SYS")
    assert not _reference_matches("+/a", "$x/a")
    assert _reference_matches("+/+", "/finance")
    assert "$x" in _reference_matched("$x/#")


@given(filters)
def test_generated_filters_are_valid(filter_: str) -> None:
    validate_topic_filter(filter_)


@settings(max_examples=400)
@given(filters, names)
def test_matches_agrees_with_reference(filter_: str, topic: str) -> None:
    assert topic_matches(filter_, topic) is _reference_matches(filter_, topic)


@settings(max_examples=400)
@given(filters, filters)
def test_covers_agrees_with_enumeration(outer: str, inner: str) -> None:
    expected = _reference_matched(inner) <= _reference_matched(outer)
    assert filter_covers(outer, inner) is expected


@settings(max_examples=400)
@given(filters, filters)
def test_intersect_agrees_with_enumeration(a: str, b: str) -> None:
    expected = bool(_reference_matched(a) & _reference_matched(b))
    assert filters_intersect(a, b) is expected


def _all_filters() -> tuple[str, ...]:
    found = {
        "/".join([*body, "#"] if multi else body)
        for depth in range(MAX_FILTER_BODY + 1)
        for body in itertools.product(FILTER_LEVELS, repeat=depth)
        for multi in (False, True)
    }
    return tuple(sorted(found - {""}))


def test_covers_and_intersect_exhaustive() -> None:
    """Every pair of filters over the alphabet (about 96,000 pairs), against enumeration."""
    every = _all_filters()
    assert len(every) == 310
    for outer, inner in itertools.product(every, repeat=2):
        matched_outer, matched_inner = _reference_matched(outer), _reference_matched(inner)
        assert filter_covers(outer, inner) is (matched_inner <= matched_outer), (outer, inner)
        assert filters_intersect(outer, inner) is bool(matched_inner & matched_outer), (
            outer,
            inner,
        )


# --- fuzzing the validators -----------------------------------------------------------

_TRICKY = st.sampled_from(["/", "+", "#", "$", "\x00", "\ud800", "a", "€", ""])
fuzz_text = st.one_of(
    st.text(max_size=20),
    st.lists(_TRICKY, max_size=8).map("".join),
)


def _reference_name_valid(text: str) -> bool:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return 0 < size <= MAX_TOPIC_BYTES and not set(text) & {"\x00", "+", "#"}


def _reference_filter_valid(text: str) -> bool:
    if not _reference_name_valid(text.replace("+", "x").replace("#", "x")):
        return False
    levels = text.split("/")
    plus_ok = all(level == "+" or "+" not in level for level in levels)
    hash_ok = all("#" not in level for level in levels[:-1]) and (
        "#" not in levels[-1] or levels[-1] == "#"
    )
    return plus_ok and hash_ok


@settings(max_examples=500)
@given(fuzz_text)
def test_validators_agree_with_reference(text: str) -> None:
    for validate, reference in (
        (validate_topic_name, _reference_name_valid),
        (validate_topic_filter, _reference_filter_valid),
    ):
        try:
            validate(text)
        except InvalidTopic:
            assert not reference(text), text
        else:
            assert reference(text), text


@settings(max_examples=300)
@given(fuzz_text, fuzz_text)
def test_matching_never_raises_anything_but_invalid_topic(filter_: str, topic: str) -> None:
    try:
        result = topic_matches(filter_, topic)
    except InvalidTopic:
        assert not (_reference_filter_valid(filter_) and _reference_name_valid(topic))
    else:
        assert result is _reference_matches(filter_, topic)
