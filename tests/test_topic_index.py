"""FilterIndex against the reference matcher (`shared.topics.topic_matches`)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.topic_index import FilterIndex
from shared.topics import topic_matches

# A small alphabet of levels so that generated filters and names often meet.
_NAME_LEVEL = st.sampled_from(["a", "b", "$SYS", "$x", "", "dev-1", "cmd"])
_FILTER_LEVEL = st.sampled_from(["a", "b", "$SYS", "$x", "", "dev-1", "+"])


@st.composite
def topic_names(draw: st.DrawFn) -> str:
    return "/".join(draw(st.lists(_NAME_LEVEL, min_size=1, max_size=4))) or "a"


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(_FILTER_LEVEL, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "+"


@given(st.lists(topic_filters(), max_size=12), st.lists(topic_names(), max_size=6))
def test_matching_agrees_with_the_reference(filters: list[str], names: list[str]) -> None:
    index = FilterIndex()
    for topic_filter in filters:
        index.add(topic_filter)
    for name in names:
        found = index.matching(name)
        assert len(found) == len(set(found))
        assert set(found) == {f for f in filters if topic_matches(f, name)}


@given(st.lists(topic_filters(), max_size=12), st.data())
def test_discard_leaves_exactly_the_rest(filters: list[str], data: st.DataObject) -> None:
    index = FilterIndex()
    for topic_filter in filters:
        index.add(topic_filter)
    gone = set(data.draw(st.lists(st.sampled_from(filters), max_size=6))) if filters else set()
    for topic_filter in gone:
        index.discard(topic_filter)
    rest = set(filters) - gone
    assert set(index) == rest and len(index) == len(rest)
    for name in ("a", "a/b", "$SYS/a", "dev-1/cmd", "/a"):
        assert set(index.matching(name)) == {f for f in rest if topic_matches(f, name)}


@pytest.mark.parametrize(
    ("topic_filter", "name", "expected"),
    [
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/#", "sport", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("+/+", "/finance", True),
        ("+", "/finance", False),
        ("a/+/c", "a//c", True),
    ],
)
def test_spec_examples(topic_filter: str, name: str, expected: bool) -> None:
    index = FilterIndex()
    index.add(topic_filter)
    assert (index.matching(name) == [topic_filter]) is expected


def test_add_twice_and_discard_unknown() -> None:
    index = FilterIndex()
    index.add("a/b")
    index.add("a/b")
    index.discard("a/c")
    index.discard("a/b/c")
    assert len(index) == 1 and "a/b" in index and "a" not in index
    index.discard("a/b")
    assert len(index) == 0 and list(index) == [] and index.matching("a/b") == []
