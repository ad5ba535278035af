"""The access-control list a device's token carries, and its enforcement.

This module owns:

* `AclRule`, one entry of the ``acl`` claim in the list form EMQX 5 reads from a JWT:
  ``{"permission": "allow", "action": "publish", "topic": "devices/dev-1/#"}``;
* the stored form of rules with the ``{device_id}`` placeholder and its expansion
  into concrete filters (`expand_placeholders`), the default rules and the rules
  built from ``gatepass-gateway device add`` options (`rules_from_cli`);
* `CompiledAcl`, the decision: first matching rule wins, no match denies, an ``all``
  rule applies to publish and subscribe. A SUBSCRIBE filter is granted only if every
  topic name it can match is granted (a deny rule that *intersects* it refuses it,
  an allow rule must *cover* it).

Enforcement raises :class:`shared.errors.AccessDenied`; `CompiledAcl.permits` is a
bool view for metrics and tests only. This module must not do I/O, read clocks or
configuration, or know about tokens, sessions or brokers; topic grammar lives in
`shared.topics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator

from shared.errors import AccessDenied, InvalidTopic
from shared.topics import TopicFilter, validate_topic_filter, validate_topic_name

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEVICE_ID_PLACEHOLDER",
    "AclRule",
    "Action",
    "CompiledAcl",
    "Permission",
    "RuleAction",
    "compile_acl",
    "default_rules",
    "expand_placeholders",
    "rules_from_claim",
    "rules_from_cli",
    "rules_to_claim",
]

Permission = Literal["allow", "deny"]
RuleAction = Literal["publish", "subscribe", "all"]
Action = Literal["publish", "subscribe"]

DEVICE_ID_PLACEHOLDER: Final = "{device_id}"
DEFAULT_CACHE_SIZE: Final = 1024
"""Decisions a CompiledAcl remembers before it forgets them all."""

_CACHEABLE_TOPIC_CHARS: Final = 256
"""Longer topics are decided every time, so a cache holds at most ~256 KiB of keys."""

_PLACEHOLDER_PROBE: Final = "device"
"""Stands in for the placeholder while a stored rule's filter is validated."""

_FORBIDDEN_IN_DEVICE_ID: Final = ("+", "#", "/", "\x00")


class AclRule(BaseModel):
    """One ACL entry; its JSON form is exactly the EMQX 5 JWT ``acl`` list item."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    permission: Permission
    action: RuleAction
    topic: str

    @field_validator("topic")
    @classmethod
    def _topic_is_filter(cls, topic: str) -> str:
        validate_topic_filter(topic.replace(DEVICE_ID_PLACEHOLDER, _PLACEHOLDER_PROBE))
        return topic


_RULE_LIST: Final = TypeAdapter(tuple[AclRule, ...])


def _rule(permission: Permission, action: RuleAction, topic: str) -> AclRule:
    """Build a rule, reporting a bad filter as InvalidTopic rather than pydantic's error."""
    try:
        return AclRule(permission=permission, action=action, topic=topic)
    except ValidationError as exc:
        raise InvalidTopic(f"invalid ACL topic filter {topic!r}") from exc


def _check_device_id(device_id: str) -> None:
    """Refuse ids whose substitution could widen a filter or reach "$" topics."""
    if not device_id:
        raise InvalidTopic("device id is empty")
    if any(char in device_id for char in _FORBIDDEN_IN_DEVICE_ID):
        raise InvalidTopic("device id contains '+', '#', '/' or U+0000")
    if device_id.startswith("$"):
        raise InvalidTopic("device id starts with '$'")
    try:
        device_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidTopic("device id is not encodable as UTF-8") from exc


def expand_placeholders(rules: Sequence[AclRule], device_id: str) -> tuple[AclRule, ...]:
    """Replace ``{device_id}`` in every rule's filter; raise InvalidTopic for a bad id.

    The id may not contain a wildcard, a level separator or NUL, nor start with "$",
    so an expanded filter never matches more than its literal reading suggests.
    """
    _check_device_id(device_id)
    return tuple(_expand_rule(rule, device_id) for rule in rules)


def _expand_rule(rule: AclRule, device_id: str) -> AclRule:
    if DEVICE_ID_PLACEHOLDER not in rule.topic:
        return rule
    topic = rule.topic.replace(DEVICE_ID_PLACEHOLDER, device_id)
    return _rule(rule.permission, rule.action, topic)


def default_rules() -> tuple[AclRule, ...]:
    """What a device may do when registered without --pub/--sub (stored form)."""
    return (
        AclRule(permission="allow", action="publish", topic="devices/{device_id}/#"),
        AclRule(permission="allow", action="subscribe", topic="devices/{device_id}/commands/#"),
    )


def rules_from_cli(
    pub: Sequence[str], sub: Sequence[str], deny: Sequence[str]
) -> tuple[AclRule, ...]:
    """Rules for ``device add``: denies (action all), then publish, then subscribe allows.

    Without any --pub or --sub the allows are `default_rules()`. Raises InvalidTopic
    for an invalid filter.
    """
    denies = tuple(_rule("deny", "all", topic) for topic in deny)
    if not pub and not sub:
        return denies + default_rules()
    pubs = tuple(_rule("allow", "publish", topic) for topic in pub)
    subs = tuple(_rule("allow", "subscribe", topic) for topic in sub)
    return denies + pubs + subs


def rules_to_claim(rules: Sequence[AclRule]) -> list[dict[str, str]]:
    """The ``acl`` claim value: a JSON-ready list of rule objects, order kept."""
    return [rule.model_dump(mode="json") for rule in rules]


def rules_from_claim(claim: object) -> tuple[AclRule, ...]:
    """Parse an ``acl`` claim value; raises pydantic.ValidationError (a ValueError)."""
    return _RULE_LIST.validate_python(claim)


def _applicable(rules: Iterable[AclRule], action: Action) -> tuple[tuple[bool, TopicFilter], ...]:
    return tuple(
        (rule.permission == "allow", TopicFilter(rule.topic))
        for rule in rules
        if rule.action == action or rule.action == "all"
    )


def _short(topic: str) -> str:
    return repr(topic if len(topic) <= 80 else topic[:80] + "...")


class CompiledAcl:
    """Rules ready for enforcement: filters pre-split, decisions memoized per instance.

    The cache maps a topic to the result of a pure function of (rules, action, topic),
    so it can never change a decision; it is bounded by `cache_size` entries per
    action (emptied when full; 0 disables it) and skips topics longer than 256
    characters.
    """

    __slots__ = ("_cache_size", "_pub_cache", "_publish", "_sub_cache", "_subscribe", "rules")

    def __init__(self, rules: Iterable[AclRule], *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.rules: tuple[AclRule, ...] = tuple(rules)
        self._publish = _applicable(self.rules, "publish")
        self._subscribe = _applicable(self.rules, "subscribe")
        self._cache_size = cache_size
        self._pub_cache: dict[str, bool] = {}
        self._sub_cache: dict[str, bool] = {}

    def __repr__(self) -> str:
        return f"CompiledAcl({list(self.rules)!r})"

    def check_publish(self, topic: str) -> None:
        """Raise AccessDenied unless PUBLISH to topic name `topic` is allowed."""
        allowed = self._pub_cache.get(topic)
        if allowed is None:
            allowed = self._decide_publish(topic)
            self._remember(self._pub_cache, topic, allowed)
        if not allowed:
            raise AccessDenied(f"publish to {_short(topic)} denied")

    def check_subscribe(self, filter: str) -> None:
        """Raise AccessDenied unless every topic name `filter` can match is allowed."""
        allowed = self._sub_cache.get(filter)
        if allowed is None:
            allowed = self._decide_subscribe(filter)
            self._remember(self._sub_cache, filter, allowed)
        if not allowed:
            raise AccessDenied(f"subscribe to {_short(filter)} denied")

    def permits(self, action: Action, topic: str) -> bool:
        """Bool view of the check for `action` (metrics and tests; enforce with check_*)."""
        check = self.check_publish if action == "publish" else self.check_subscribe
        try:
            check(topic)
        except AccessDenied:
            return False
        return True

    def _decide_publish(self, topic: str) -> bool:
        try:
            validate_topic_name(topic)
        except InvalidTopic:
            return False
        for allow, rule_filter in self._publish:
            if rule_filter.matches(topic):
                return allow
        return False

    def _decide_subscribe(self, filter: str) -> bool:
        try:
            wanted = TopicFilter(filter)
        except InvalidTopic:
            return False
        for allow, rule_filter in self._subscribe:
            if allow and rule_filter.covers(wanted):
                return True
            if not allow and rule_filter.intersects(wanted):
                return False
        return False

    def _remember(self, cache: dict[str, bool], topic: str, allowed: bool) -> None:
        if len(topic) > _CACHEABLE_TOPIC_CHARS or self._cache_size <= 0:
            return
        if len(cache) >= self._cache_size:
            cache.clear()
        cache[topic] = allowed


def compile_acl(rules: Iterable[AclRule], *, cache_size: int = DEFAULT_CACHE_SIZE) -> CompiledAcl:
    """Same as `CompiledAcl(rules)`."""
    return CompiledAcl(rules, cache_size=cache_size)
