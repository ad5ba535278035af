"""A set of MQTT topic filters that answers "which of you match this topic name?".

Owns: `FilterIndex`, a trie over the filters' levels, so that finding the filters a
PUBLISH reaches costs about the topic's depth, not the number of subscriptions (a
broker with 5,000 devices each subscribed to its own command topic would otherwise
test 5,000 filters per message). Matching follows MQTT 3.1.1 section 4.7 exactly as
`shared.topics.topic_matches` does, including the `$` rule; `tests/test_topic_index.py`
checks the two against each other.

Must not: validate filters or names (callers hold valid ones; see `shared.topics`), do
I/O, or know about sessions, ACLs or brokers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

__all__ = ["FilterIndex"]

_SEP: Final = "/"
_ONE: Final = "+"
_MANY: Final = "#"


class _Node:
    __slots__ = ("children", "filter")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.filter: str | None = None  # the filter whose last level is this node


class FilterIndex:
    """A mutable set of topic filters, indexed for matching topic names."""

    __slots__ = ("_root", "_size")

    def __init__(self) -> None:
        self._root = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, topic_filter: object) -> bool:
        if not isinstance(topic_filter, str):
            return False
        node = self._find(topic_filter)
        return node is not None and node.filter is not None

    def __iter__(self) -> Iterator[str]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.filter is not None:
                yield node.filter
            stack.extend(node.children.values())

    def add(self, topic_filter: str) -> None:
        node = self._root
        for level in topic_filter.split(_SEP):
            node = node.children.setdefault(level, _Node())
        if node.filter is None:
            node.filter = topic_filter
            self._size += 1

    def discard(self, topic_filter: str) -> None:
        """Remove `topic_filter` if present, pruning the branches it alone used."""
        path = [self._root]
        levels = topic_filter.split(_SEP)
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        if path[-1].filter is None:
            return
        path[-1].filter = None
        self._size -= 1
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.filter is not None or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def clear(self) -> None:
        self._root = _Node()
        self._size = 0

    def matching(self, topic: str) -> list[str]:
        """Every filter in the set that matches topic name `topic` (each once)."""
        levels = topic.split(_SEP)
        depth = len(levels)
        # MQTT-4.7.2-1: a first-level wildcard never matches a name beginning with "$".
        dollar = topic.startswith("$")
        found: list[str] = []
        stack = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            wild = not (dollar and index == 0)
            many = node.children.get(_MANY) if wild else None
            if many is not None and many.filter is not None:
                found.append(many.filter)  # "a/#" matches "a" and everything below it
            if index == depth:
                if node.filter is not None:
                    found.append(node.filter)
                continue
            level = levels[index]
            if level != _ONE and level != _MANY:
                exact = node.children.get(level)
                if exact is not None:
                    stack.append((exact, index + 1))
            one = node.children.get(_ONE) if wild else None
            if one is not None:
                stack.append((one, index + 1))
        return found

    def _find(self, topic_filter: str) -> _Node | None:
        node: _Node | None = self._root
        for level in topic_filter.split(_SEP):
            assert node is not None
            node = node.children.get(level)
            if node is None:
                return None
        return node
