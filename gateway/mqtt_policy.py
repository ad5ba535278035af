"""Session rules of the MQTT listener, without I/O: who may connect, publish and subscribe.

Owns: the CONNECT decision (`admit`: token, identity, certificate binding, revocation,
retired keys, will), the per-session value it yields (`SessionState`: device, kid,
exp, compiled ACL), the PUBLISH/SUBSCRIBE/delivery decisions (`check_publish`,
`check_subscribe`, `check_receive`), what each way of ending a session implies
(`CLOSE_POLICY`), the index of live sessions (`SessionIndex`) and the connect rate
limit (`ConnectRateLimiter`).
Must not: touch sockets, amqtt, clocks, logging or metrics; the current time is a
parameter. `gateway.mqtt_broker` is the driver that applies these decisions.

Exception tree (every refusal raises; nothing returns a bool to forget):

    GatewayError (gateway.errors)
    +-- MqttRefusal              has `reason` (a RefusalReason) and `cause` (for logs)
        +-- ConnectRefused       CONNACK `return_code` (5 not authorized, 3 unavailable)
        +-- PublishRefused       the PUBLISH is delivered to no one (no PUBACK)
        +-- SubscribeRefused     SUBACK 0x80 for that filter
"""

from __future__ import annotations

import base64
import heapq
import hmac
import json
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final, Literal

from gateway.errors import GatewayError
from shared.acl import AclRule, CompiledAcl
from shared.claims import AccessTokenClaims
from shared.errors import AccessDenied
from shared.tokens import RejectReason, TokenRejected, TokenVerifier

__all__ = [
    "CLOSE_POLICY",
    "CONNACK_NOT_AUTHORIZED",
    "CONNACK_SERVER_UNAVAILABLE",
    "CloseEffect",
    "CloseReason",
    "ConnectRateLimiter",
    "ConnectRefused",
    "ConnectRequest",
    "DenyAction",
    "MqttRefusal",
    "PublishRefused",
    "RefusalReason",
    "SessionIndex",
    "SessionState",
    "SubscribeRefused",
    "admit",
    "check_publish",
    "check_receive",
    "check_subscribe",
    "session_from_claims",
]

CONNACK_SERVER_UNAVAILABLE: Final = 3
CONNACK_NOT_AUTHORIZED: Final = 5

DenyAction = Literal["ignore", "disconnect"]


class RefusalReason(StrEnum):
    """Why the listener refused something (metric label and audit cause)."""

    missing_token = "missing_token"
    bad_token = "bad_token"
    expired = "expired"
    no_client_cert = "no_client_cert"
    cnf_mismatch = "cnf_mismatch"
    username_mismatch = "username_mismatch"
    client_id_mismatch = "client_id_mismatch"
    revoked = "revoked"
    key_retired = "key_retired"
    will_denied = "will_denied"
    acl_denied = "acl_denied"
    rate_limited = "rate_limited"
    too_many_connections = "too_many_connections"


class MqttRefusal(GatewayError):
    """Base of the listener's refusals: `reason` for metrics, `cause` for the audit log."""

    def __init__(self, reason: RefusalReason, cause: str = "") -> None:
        self.reason = reason
        self.cause = cause or reason.value
        super().__init__(f"{reason.value}: {self.cause}" if cause else reason.value)


class ConnectRefused(MqttRefusal):
    """CONNECT refused: answer CONNACK `return_code` and close, touching no session."""

    def __init__(
        self,
        reason: RefusalReason,
        cause: str = "",
        *,
        return_code: int = CONNACK_NOT_AUTHORIZED,
        token_reason: RejectReason | None = None,
    ) -> None:
        super().__init__(reason, cause)
        self.return_code = return_code
        self.token_reason = token_reason


class PublishRefused(MqttRefusal):
    """PUBLISH refused: deliver to no one, send no PUBACK."""


class SubscribeRefused(MqttRefusal):
    """SUBSCRIBE refused for one filter: SUBACK 0x80 for it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRequest:
    """What a CONNECT and its TLS connection say about the client.

    `client_id` is "" when the client sent an empty one; `peer_thumbprint` is the
    `x5t#S256` of the verified client certificate, or None without one.
    """

    client_id: str
    username: str | None
    password: str | None
    peer_thumbprint: str | None
    will_topic: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionState:
    """What a verified token grants one session; fixed for the session's life.

    `acl` memoizes decisions internally but never changes them.
    """

    device_id: str
    client_id: str
    kid: str
    jti: str
    exp: int
    acl: CompiledAcl = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.device_id or self.client_id != self.device_id:
            raise ValueError("a session's client id is its device id")


def _kid_of(token: str) -> str:
    """The `kid` header of a token the verifier already accepted (so well-formed)."""
    segment = token.split(".", 1)[0]
    header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    kid = header["kid"]
    if not isinstance(kid, str):
        raise TypeError("kid is not a string")
    return kid


def session_from_claims(claims: AccessTokenClaims, kid: str) -> SessionState:
    """The session value for verified `claims` signed by key `kid`."""
    rules = tuple(
        AclRule(permission=entry.permission, action=entry.action, topic=entry.topic)
        for entry in claims.acl
    )
    return SessionState(
        device_id=claims.sub,
        client_id=claims.sub,
        kid=kid,
        jti=claims.jti,
        exp=claims.exp,
        acl=CompiledAcl(rules),
    )


def _verify(verifier: TokenVerifier, token: str | None, now: float) -> AccessTokenClaims:
    if not token:
        raise ConnectRefused(RefusalReason.missing_token, "no password (token) in CONNECT")
    try:
        return verifier.verify(token, now)
    except TokenRejected as exc:
        reason = (
            RefusalReason.expired
            if exc.reason is RejectReason.expired
            else (RefusalReason.bad_token)
        )
        raise ConnectRefused(reason, str(exc), token_reason=exc.reason) from exc


def _check_identity(request: ConnectRequest, claims: AccessTokenClaims) -> None:
    if request.username != claims.sub:
        raise ConnectRefused(RefusalReason.username_mismatch, "username is not the token's sub")
    if request.client_id and request.client_id != claims.sub:
        raise ConnectRefused(RefusalReason.client_id_mismatch, "client id is not the token's sub")
    if request.peer_thumbprint is None:
        raise ConnectRefused(RefusalReason.no_client_cert, "no client certificate")
    if not hmac.compare_digest(request.peer_thumbprint, claims.cnf.x5t_s256):
        raise ConnectRefused(RefusalReason.cnf_mismatch, "certificate is not the token's cnf")


def admit(
    request: ConnectRequest,
    *,
    verifier: TokenVerifier,
    revoked: Set[str],
    retired_kids: Set[str],
    now: float,
) -> SessionState:
    """Decide a CONNECT; return the session value or raise ConnectRefused.

    Order: token (signature, issuer, audience, times), then `now < exp` without
    leeway (a session ends at `exp`, so none starts at or after it), identity
    (username and client id equal `sub`; an empty client id is given `sub`),
    certificate binding (`cnf.x5t#S256`), revocation, retired key, will topic.
    """
    claims = _verify(verifier, request.password, now)
    if now >= claims.exp:
        raise ConnectRefused(RefusalReason.expired, f"exp {claims.exp} has passed")
    _check_identity(request, claims)
    if claims.sub in revoked:
        raise ConnectRefused(RefusalReason.revoked, f"device {claims.sub!r} is revoked")
    kid = _kid_of(request.password or "")
    if kid in retired_kids:
        raise ConnectRefused(RefusalReason.key_retired, f"key {kid!r} is retired")
    state = session_from_claims(claims, kid)
    if request.will_topic is not None:
        try:
            state.acl.check_publish(request.will_topic)
        except AccessDenied as exc:
            raise ConnectRefused(RefusalReason.will_denied, str(exc)) from exc
    return state


def _check_live(state: SessionState, now: float, error: type[MqttRefusal]) -> None:
    if now >= state.exp:
        raise error(RefusalReason.expired, f"session of {state.device_id!r} expired")


def check_publish(state: SessionState, topic: str, now: float) -> None:
    """Raise PublishRefused unless the session is live and its ACL allows `topic`."""
    _check_live(state, now, PublishRefused)
    try:
        state.acl.check_publish(topic)
    except AccessDenied as exc:
        raise PublishRefused(RefusalReason.acl_denied, str(exc)) from exc


def check_subscribe(state: SessionState, topic_filter: str, now: float) -> None:
    """Raise SubscribeRefused unless the session is live and may subscribe `topic_filter`."""
    _check_live(state, now, SubscribeRefused)
    try:
        state.acl.check_subscribe(topic_filter)
    except AccessDenied as exc:
        raise SubscribeRefused(RefusalReason.acl_denied, str(exc)) from exc


def check_receive(state: SessionState, topic: str) -> None:
    """Raise AccessDenied unless the session's ACL lets it receive topic name `topic`.

    Used for every delivery, retained messages included. Expiry is not checked here:
    a persistent session keeps collecting QoS 1 messages while its device fetches a
    fresh token, and the connection itself is closed at `exp`.
    """
    state.acl.check_subscribe(topic)


class CloseReason(StrEnum):
    """Why the listener ended a live session."""

    expired = "expired"
    revoked = "revoked"
    key_retired = "key_retired"
    acl_violation = "acl_violation"
    keepalive = "keepalive"
    oversize_packet = "oversize_packet"
    protocol_violation = "protocol_violation"
    slow_subscriber = "slow_subscriber"
    takeover = "takeover"
    shutdown = "shutdown"


@dataclass(frozen=True, slots=True)
class CloseEffect:
    """What closing for a reason implies: whether the will is still published."""

    publish_will: bool


CLOSE_POLICY: Final[dict[CloseReason, CloseEffect]] = {
    # The token that allowed the will no longer stands: no will.
    CloseReason.expired: CloseEffect(publish_will=False),
    CloseReason.revoked: CloseEffect(publish_will=False),
    CloseReason.key_retired: CloseEffect(publish_will=False),
    CloseReason.shutdown: CloseEffect(publish_will=False),
    # The client misbehaved or vanished while its token stood: MQTT 3.1.1 section 3.1.2.5.
    CloseReason.acl_violation: CloseEffect(publish_will=True),
    CloseReason.keepalive: CloseEffect(publish_will=True),
    CloseReason.oversize_packet: CloseEffect(publish_will=True),
    CloseReason.protocol_violation: CloseEffect(publish_will=True),
    CloseReason.slow_subscriber: CloseEffect(publish_will=True),
    CloseReason.takeover: CloseEffect(publish_will=True),
}


class SessionIndex:
    """Live sessions by connection id, with lookups by client id, device, kid and expiry.

    Connection ids are chosen by the caller (any int unique among live connections).
    """

    __slots__ = ("_by_client", "_by_conn", "_expiry")

    def __init__(self) -> None:
        self._by_conn: dict[int, SessionState] = {}
        self._by_client: dict[str, set[int]] = {}  # every CONNECT asks: no scan per connect
        self._expiry: list[tuple[int, int]] = []  # heap of (exp, conn id)

    def __len__(self) -> int:
        return len(self._by_conn)

    def add(self, conn_id: int, state: SessionState) -> None:
        if conn_id in self._by_conn:
            raise ValueError(f"connection {conn_id} is already live")
        self._by_conn[conn_id] = state
        self._by_client.setdefault(state.client_id, set()).add(conn_id)
        heapq.heappush(self._expiry, (state.exp, conn_id))

    def remove(self, conn_id: int) -> None:
        """Forget a connection (its expiry entry is dropped lazily)."""
        state = self._by_conn.pop(conn_id, None)
        if state is None:
            return
        conn_ids = self._by_client.get(state.client_id)
        if conn_ids is not None:
            conn_ids.discard(conn_id)
            if not conn_ids:
                del self._by_client[state.client_id]

    def of_client(self, client_id: str) -> list[int]:
        """Live connections with this MQTT client id (a takeover closes them)."""
        return sorted(self._by_client.get(client_id, ()))

    def get(self, conn_id: int) -> SessionState | None:
        return self._by_conn.get(conn_id)

    def of_devices(self, device_ids: Iterable[str]) -> list[int]:
        wanted = frozenset(device_ids)
        return [cid for cid, state in self._by_conn.items() if state.device_id in wanted]

    def of_kid(self, kid: str) -> list[int]:
        return [cid for cid, state in self._by_conn.items() if state.kid == kid]

    def expired(self, now: float) -> list[int]:
        """Connections whose session reached `exp` at `now` (each reported once)."""
        due: list[int] = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            exp, conn_id = heapq.heappop(heap)
            state = self._by_conn.get(conn_id)
            if state is not None and state.exp == exp:
                due.append(conn_id)
        return due


class ConnectRateLimiter:
    """Token bucket of CONNECTs: `rate` per second on average, bursts up to `burst`."""

    __slots__ = ("_burst", "_last", "_level", "_rate")

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._rate = rate
        self._burst = float(burst)
        self._level = float(burst)
        self._last: float | None = None

    def take(self, now: float) -> None:
        """Spend one CONNECT or raise ConnectRefused(rate_limited, CONNACK 3)."""
        if self._last is not None and now > self._last:
            self._level = min(self._burst, self._level + (now - self._last) * self._rate)
        self._last = now if self._last is None else max(self._last, now)
        if self._level < 1.0:
            raise ConnectRefused(
                RefusalReason.rate_limited,
                "connect rate exceeded",
                return_code=CONNACK_SERVER_UNAVAILABLE,
            )
        self._level -= 1.0
