"""MQTT 3.1.1 topic names and topic filters (section 4.7): validation and matching.

This module owns the rules of section 4.7 and nothing else:

* what a valid topic name (PUBLISH) and a valid topic filter (SUBSCRIBE) is;
* whether a filter matches a name, including the ``$`` rule (4.7.2): a filter whose
  first level is ``+`` or ``#`` matches no topic name that begins with ``$``;
* two relations between filters that an ACL needs: *covers* (every name matched by
  one is matched by the other) and *intersects* (some name is matched by both).

Both relations are exact for valid inputs; they are checked against brute-force
enumeration in ``tests/test_topics.py``.

It must not do I/O, keep global state, know about ACLs, devices or brokers, or
import anything beyond the standard library and ``shared.errors``. Invalid input
raises :class:`shared.errors.InvalidTopic`; it is never silently "not matching".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from shared.errors import InvalidTopic

__all__ = [
    "MAX_TOPIC_BYTES",
    "TopicFilter",
    "filter_covers",
    "filters_intersect",
    "topic_matches",
    "validate_topic_filter",
    "validate_topic_name",
]

MAX_TOPIC_BYTES: Final = 65535
"""Longest topic name or filter, in UTF-8 bytes (MQTT 3.1.1 section 1.5.3)."""

_SEP: Final = "/"
_ONE: Final = "+"
_MANY: Final = "#"
_WILDCARDS: Final = frozenset((_ONE, _MANY))
_RELATION_REWRITES: Final[dict[tuple[str, ...], tuple[str, ...]]] = {
    (_MANY,): (_ONE, _MANY),
    ("", _MANY): ("", _ONE, _MANY),
}

# How a TopicFilter matches, chosen once so the hot path is plain string work.
_EXACT: Final = 0  # no wildcard: equal strings
_PREFIX: Final = 1  # "a/b/#": equal to "a/b" or starts with "a/b/"
_ALL: Final = 2  # "#": every name not beginning with "$"
_LEVELS: Final = 3  # anything with "+": level by level


def _check_common(text: str, what: str) -> None:
    """Rules shared by names and filters: non-empty, UTF-8, size, no NUL."""
    if not text:
        raise InvalidTopic(f"{what} is empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidTopic(f"{what} is not encodable as UTF-8") from exc
    if size > MAX_TOPIC_BYTES:
        raise InvalidTopic(f"{what} is {size} bytes; the limit is {MAX_TOPIC_BYTES}")
    if "\x00" in text:
        raise InvalidTopic(f"{what} contains U+0000")


def validate_topic_name(topic: str) -> None:
    """Raise InvalidTopic unless `topic` is a valid MQTT 3.1.1 topic name."""
    _check_common(topic, "topic name")
    if _ONE in topic or _MANY in topic:
        raise InvalidTopic("topic name contains a wildcard character")


def validate_topic_filter(filter: str) -> None:
    """Raise InvalidTopic unless `filter` is a valid MQTT 3.1.1 topic filter."""
    _check_common(filter, "topic filter")
    levels = filter.split(_SEP)
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if _MANY in level and (level != _MANY or index != last):
            raise InvalidTopic("'#' must be the whole last level of a topic filter")
        if _ONE in level and level != _ONE:
            raise InvalidTopic("'+' must be a whole level of a topic filter")


def _kind_of(levels: tuple[str, ...]) -> int:
    if _ONE in levels:
        return _LEVELS
    if levels[-1] != _MANY:
        return _EXACT
    return _ALL if len(levels) == 1 else _PREFIX


def _relation_levels(levels: tuple[str, ...]) -> tuple[str, ...]:
    """Levels to compare filters by, with "#" read as "+/#" and "/#" as "/+/#".

    Level by level, a trailing "#" also matches the parent level. For "#" that parent
    is no level at all and for "/#" it is [""], the empty string: neither is a topic
    name. Without it each matches exactly what its rewrite matches, and with these
    two rewrites the level-by-level covers and intersects are exact.
    """
    return _RELATION_REWRITES.get(levels, levels)


def _dollar_excluded(first_filter_level: str, other_first_level: str) -> bool:
    """True if a wildcard first level meets a literal first level that starts with "$"."""
    return (
        first_filter_level in _WILDCARDS
        and other_first_level not in _WILDCARDS
        and other_first_level.startswith("$")
    )


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """A validated topic filter, split once so that matching is cheap.

    `TopicFilter("a/+/#")` raises InvalidTopic for an invalid filter, so an instance
    always holds a valid one. Methods that take a topic name expect it validated.
    """

    text: str
    levels: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _kind: int = field(init=False, repr=False, compare=False)
    _prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate_topic_filter(self.text)
        levels = tuple(self.text.split(_SEP))
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "_kind", _kind_of(levels))
        # For _PREFIX: "a/b/#" -> "a/b"; "/#" -> "".
        object.__setattr__(self, "_prefix", self.text[:-2] if levels[-1] == _MANY else "")

    def matches(self, topic: str) -> bool:
        """Whether this filter matches the (already validated) topic name `topic`."""
        kind = self._kind
        if kind == _EXACT:
            return topic == self.text
        if kind == _PREFIX:
            prefix = self._prefix
            return topic.startswith(prefix) and (
                len(topic) == len(prefix) or topic[len(prefix)] == _SEP
            )
        if kind == _ALL:
            return not topic.startswith("$")
        return self._matches_levels(topic.split(_SEP))

    def _matches_levels(self, names: Sequence[str]) -> bool:
        levels = self.levels
        if levels[0] in _WILDCARDS and names[0].startswith("$"):
            return False
        for index, level in enumerate(levels):
            if level == _MANY:
                return True  # also matches the parent level: "a/#" matches "a"
            if index >= len(names) or (level != _ONE and level != names[index]):
                return False
        return len(levels) == len(names)

    def covers(self, inner: TopicFilter) -> bool:
        """Whether every topic name that `inner` matches is matched by this filter."""
        outer_levels = _relation_levels(self.levels)
        inner_levels = _relation_levels(inner.levels)
        if _dollar_excluded(outer_levels[0], inner_levels[0]):
            return False  # inner matches "$..." names that a leading wildcard refuses
        for index, level in enumerate(outer_levels):
            if level == _MANY:
                return True
            if index >= len(inner_levels):
                return False  # inner matches a shorter name than this filter can
            other = inner_levels[index]
            if other == _MANY:
                return False  # inner matches its parent level and deeper names
            if level != _ONE and level != other:
                return False  # a literal covers only the same literal, never "+"
        return len(outer_levels) == len(inner_levels)

    def intersects(self, other: TopicFilter) -> bool:
        """Whether some topic name is matched by both this filter and `other`."""
        a, b = _relation_levels(self.levels), _relation_levels(other.levels)
        if _dollar_excluded(a[0], b[0]) or _dollar_excluded(b[0], a[0]):
            return False
        for index in range(max(len(a), len(b))):
            left = a[index] if index < len(a) else None
            right = b[index] if index < len(b) else None
            if left == _MANY or right == _MANY:
                return True
            if left is None or right is None:
                return False
            if left != right and left != _ONE and right != _ONE:
                return False
        return True


def topic_matches(filter: str, topic: str) -> bool:
    """Whether topic filter `filter` matches topic name `topic` (both validated)."""
    validate_topic_name(topic)
    return TopicFilter(filter).matches(topic)


def filter_covers(outer: str, inner: str) -> bool:
    """Whether every topic name matched by filter `inner` is matched by filter `outer`."""
    return TopicFilter(outer).covers(TopicFilter(inner))


def filters_intersect(a: str, b: str) -> bool:
    """Whether at least one topic name is matched by both filters `a` and `b`.

    Exact, including the ``$`` rule: "+/x" and "$SYS/x" do not intersect, while
    "+/x" and "+/+" do (witness "a/x"); "+" and "/#" do not (their only common match
    would be the empty string, which is no topic name).
    """
    return TopicFilter(a).intersects(TopicFilter(b))
