"""SubscriptionTable: still the dict amqtt expects, and its indexes never drift from it."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from gateway.mqtt_subscriptions import SubscriptionTable
from shared.topics import topic_matches


@dataclass(frozen=True)
class FakeSession:
    """Only what the table reads of an amqtt Session."""

    client_id: str


def _truth(table: SubscriptionTable) -> dict[str, set[str]]:
    """client id -> filters, computed the slow way from the dict itself."""
    by_client: dict[str, set[str]] = {}
    for topic_filter, entries in table.items():
        for session, _ in entries:
            by_client.setdefault(session.client_id, set()).add(topic_filter)
    return by_client


def _check(table: SubscriptionTable) -> None:
    truth = _truth(table)
    for client_id in {*truth, "nobody"}:
        assert table.filters_of(client_id) == truth.get(client_id, set())
    for topic in ("a", "a/b", "dev/1/cmd", "$SYS/x"):
        expected = {f for f in table if topic_matches(f, topic)}
        assert set(table.matching(topic)) == expected


def test_the_way_amqtt_uses_it() -> None:
    table = SubscriptionTable()
    one, two = FakeSession("one"), FakeSession("two")
    # amqtt's add_subscription: create the list, then append to what it reads back
    table["dev/+/cmd"] = []
    table["dev/+/cmd"].append((one, 1))
    table.setdefault("dev/+/cmd", []).append((two, 0))
    table.setdefault("#", []).append((two, 1))
    _check(table)
    assert table.subscribed("one", "dev/+/cmd") and not table.subscribed("one", "#")
    assert sorted(table.matching("dev/7/cmd")) == ["#", "dev/+/cmd"]
    # amqtt's _del_subscription: pop by index, then delete the filter once empty
    table["dev/+/cmd"].pop(0)
    _check(table)
    assert table.filters_of("one") == frozenset()
    table["dev/+/cmd"].pop(0)
    del table["dev/+/cmd"]
    _check(table)
    assert table.matching("dev/7/cmd") == ["#"]
    table.clear()
    _check(table)
    assert table.filters_of("two") == frozenset() and table.matching("x") == []


def test_a_list_the_table_let_go_of_changes_nothing() -> None:
    table = SubscriptionTable()
    table["a"] = [(FakeSession("one"), 0)]
    orphan = table.pop("a")
    orphan.append((FakeSession("two"), 0))
    assert table.filters_of("two") == frozenset() and "a" not in table
    _check(table)


_FILTERS = st.sampled_from(["a", "a/b", "a/+", "+/b", "#", "dev/+/cmd", "$SYS/#"])
_CLIENTS = st.sampled_from(["c1", "c2", "c3"])
_OPS = st.one_of(
    st.tuples(st.just("subscribe"), _FILTERS, _CLIENTS),
    st.tuples(st.just("unsubscribe"), _FILTERS, _CLIENTS),
    st.tuples(st.just("drop_filter"), _FILTERS, _CLIENTS),
)


@given(st.lists(_OPS, max_size=40))
def test_random_operations_keep_the_indexes_exact(ops: list[tuple[str, str, str]]) -> None:
    table = SubscriptionTable()
    for op, topic_filter, client_id in ops:
        if op == "subscribe":
            table.setdefault(topic_filter, []).append((FakeSession(client_id), 1))
        elif op == "unsubscribe" and topic_filter in table:
            entries = table[topic_filter]
            for index, (session, _) in enumerate(entries):
                if session.client_id == client_id:
                    entries.pop(index)
                    break
            if not entries:
                del table[topic_filter]
        elif op == "drop_filter":
            table.pop(topic_filter, None)
        _check(table)


class LoudSession(FakeSession):
    def __repr__(self) -> str:
        raise AssertionError("the table's repr must not render sessions")


def test_repr_is_a_summary_that_never_renders_sessions() -> None:
    # amqtt evaluates repr(self._subscriptions) on every SUBSCRIBE, log level or not.
    table = SubscriptionTable()
    for i in range(1000):
        table.setdefault(f"devices/d{i}/commands/#").append((LoudSession(f"d{i}"), 1))
    assert repr(table) == "<SubscriptionTable: 1000 filters, 1000 clients>"
