"""amqtt's subscription table, indexed: by topic for PUBLISH, by client for everything else.

Owns: `SubscriptionTable`, a drop-in for amqtt 0.12.1's `Broker._subscriptions` (a dict
of topic filter -> list of `(session, qos)`), and the per-filter lists it hands out.
Besides being that dict, it keeps a `shared.topic_index.FilterIndex` of its keys and,
for each client id, the filters it is subscribed to. amqtt scans the whole table per
PUBLISH, per CONNECT and per session deletion; with thousands of devices each holding
its own filters that made one message cost thousands of filter tests. With the table,
`gateway.mqtt_broker` asks `matching(topic)` and `filters_of(client_id)` instead.

The lists notice their own changes (amqtt appends and pops them in place), so the
per-client map stays exact whoever mutates them. Its `repr` is a one-line summary:
amqtt logs `repr(self._subscriptions)` after every SUBSCRIBE, evaluated even when
debug logging is off, and the full repr of every session made connecting 5,000
devices quadratic (60 % of the gateway's CPU, 35 connects a second).
Must not: decide who may subscribe or receive (that is `gateway.mqtt_policy`), or touch
sessions beyond reading their `client_id`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, SupportsIndex

from shared.topic_index import FilterIndex

__all__ = ["Subscribers", "SubscriptionTable"]

Entry = tuple[Any, int]  # (amqtt Session, granted QoS)


def _client_ids(entries: Iterable[Entry]) -> set[str]:
    return {session.client_id for session, _ in entries}


class Subscribers(list[Entry]):
    """One filter's `(session, qos)` list; tells its table when its clients change."""

    def __init__(self, table: SubscriptionTable, topic_filter: str, entries: Iterable[Entry]):
        super().__init__(entries)
        self._table = table
        self._filter = topic_filter

    def _changing(self, change: Callable[[], Any]) -> Any:
        before = _client_ids(self)
        result = change()
        if self._table.get(self._filter) is self:  # not a list the table let go of
            self._table._clients_changed(self._filter, before, _client_ids(self))
        return result

    def append(self, entry: Entry) -> None:
        self._changing(lambda: list.append(self, entry))

    def extend(self, entries: Iterable[Entry]) -> None:
        items = list(entries)
        self._changing(lambda: list.extend(self, items))

    def insert(self, index: SupportsIndex, entry: Entry) -> None:
        self._changing(lambda: list.insert(self, index, entry))

    def pop(self, index: SupportsIndex = -1) -> Entry:
        entry: Entry = self._changing(lambda: list.pop(self, index))
        return entry

    def remove(self, entry: Entry) -> None:
        self._changing(lambda: list.remove(self, entry))

    def clear(self) -> None:
        self._changing(lambda: list.clear(self))

    def __setitem__(self, index: Any, value: Any) -> None:
        self._changing(lambda: list.__setitem__(self, index, value))

    def __delitem__(self, index: Any) -> None:
        self._changing(lambda: list.__delitem__(self, index))

    def __iadd__(self, entries: Iterable[Entry]) -> Subscribers:  # type: ignore[override,misc]
        self.extend(entries)
        return self


class SubscriptionTable(dict[str, Subscribers]):
    """topic filter -> `Subscribers`, with the filters indexed for matching."""

    def __init__(self) -> None:
        super().__init__()
        self._index = FilterIndex()
        self._by_client: dict[str, set[str]] = {}

    # -- queries ----------------------------------------------------------------------

    def matching(self, topic: str) -> list[str]:
        """The filters in the table that match topic name `topic`."""
        return self._index.matching(topic)

    def subscribed(self, client_id: str | None, topic_filter: str) -> bool:
        """Whether `client_id` holds a subscription to `topic_filter`."""
        return client_id is not None and topic_filter in self._by_client.get(client_id, ())

    def filters_of(self, client_id: str | None) -> frozenset[str]:
        """The filters `client_id` is subscribed to."""
        if client_id is None:
            return frozenset()
        return frozenset(self._by_client.get(client_id, ()))

    # -- the dict, kept in step with the index ----------------------------------------

    def __setitem__(self, topic_filter: str, entries: Iterable[Entry]) -> None:
        if topic_filter in self:
            del self[topic_filter]
        subscribers = Subscribers(self, topic_filter, ())
        super().__setitem__(topic_filter, subscribers)
        self._index.add(topic_filter)
        subscribers.extend(entries)

    def __delitem__(self, topic_filter: str) -> None:
        subscribers = self[topic_filter]
        self._clients_changed(topic_filter, _client_ids(subscribers), set())
        super().__delitem__(topic_filter)
        self._index.discard(topic_filter)

    def setdefault(self, topic_filter: str, default: Iterable[Entry] = ()) -> Subscribers:
        if topic_filter not in self:
            self[topic_filter] = default
        return self[topic_filter]

    def pop(self, topic_filter: str, *default: Any) -> Any:
        if topic_filter not in self:
            if default:
                return default[0]
            raise KeyError(topic_filter)
        subscribers = self[topic_filter]
        del self[topic_filter]
        return subscribers

    def popitem(self) -> tuple[str, Subscribers]:
        topic_filter = next(reversed(self))
        return topic_filter, self.pop(topic_filter)

    def clear(self) -> None:
        super().clear()
        self._index.clear()
        self._by_client.clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for topic_filter, entries in dict(*args, **kwargs).items():
            self[topic_filter] = entries

    def __ior__(self, other: Any) -> SubscriptionTable:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __repr__(self) -> str:
        return f"<SubscriptionTable: {len(self)} filters, {len(self._by_client)} clients>"

    def _clients_changed(self, topic_filter: str, before: set[str], after: set[str]) -> None:
        for client_id in before - after:
            filters = self._by_client.get(client_id)
            if filters is not None:
                filters.discard(topic_filter)
                if not filters:
                    del self._by_client[client_id]
        for client_id in after - before:
            self._by_client.setdefault(client_id, set()).add(topic_filter)
