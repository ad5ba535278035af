"""Minting and verifying Gatepass access tokens (compact JWS, ES256, RFC 9068 `at+jwt`).

Owns: `new_access_token_claims`, `mint_access_token` and `TokenTemplate` (the token
service side), `TokenVerifier` (the broker side: parse, authenticate, validate,
cache), `verify_jws_signature` and `verify_es256_signature` (the JWS layer alone),
and `TokenRejected` with its `RejectReason`.
Must not: read the clock (`now` is a parameter), touch files or the network, log, or
accept anything but compact ES256 with a key from the in-memory `KeySet`.

Verification order (cheapest and least trusting first; every step raises):

    size            > MAX_TOKEN_BYTES                               too_large
    framing         three base64url segments, canonical, no padding  malformed
    header JSON     UTF-8 JSON object, no duplicate member names     malformed, duplicate_key,
                                                                     bad_header
    typ             exactly "at+jwt"                                 wrong_type
    header members  none of jku x5u jwk x5c crit cty b64 zip         forbidden_header
    alg             exactly "ES256" (pinned; never read from a key)  bad_algorithm
    kid             a string naming a key of the KeySet              bad_header, unknown_kid
    signature       64 bytes r||s, 0 < r, s < n, ECDSA P-256 SHA-256 bad_signature
    payload JSON    only after the signature: no duplicate names     malformed, duplicate_key
    claims          `AccessTokenClaims`, strict                      bad_claims
    iss, aud        exact equality / membership                      wrong_issuer, wrong_audience
    times           now >= exp + leeway                              expired
                    nbf > now + leeway                               not_yet_valid
                    iat > now + leeway                               issued_in_future

Any other exception inside verification becomes `TokenRejected(internal_error)`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from enum import StrEnum
from typing import Any, Final, NamedTuple, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from pydantic import ValidationError

from shared.claims import AccessTokenClaims, AclEntry, Confirmation
from shared.errors import GatepassError
from shared.keyset import KeySet, SigningKey

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "FORBIDDEN_HEADERS",
    "LEEWAY_SECONDS",
    "MAX_TOKEN_BYTES",
    "MintedToken",
    "RejectReason",
    "TokenRejected",
    "TokenTemplate",
    "TokenVerifier",
    "mint_access_token",
    "new_access_token_claims",
    "verify_es256_signature",
    "verify_jws_signature",
]

LEEWAY_SECONDS: Final = 30
MAX_TOKEN_BYTES: Final = 4096
ACCESS_TOKEN_TYPE: Final = "at+jwt"
ALGORITHM: Final = "ES256"
FORBIDDEN_HEADERS: Final = frozenset({"jku", "x5u", "jwk", "x5c", "crit", "cty", "b64", "zip"})
DEFAULT_CACHE_SIZE: Final = 10_000

# Order of the P-256 group: r and s must lie in [1, n - 1].
_P256_ORDER: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_SCALAR_BYTES: Final = 32
_SIGNATURE_BYTES: Final = 2 * _SCALAR_BYTES
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())
_DETAIL_LIMIT: Final = 64

# Header and payload are non-empty; the signature may be empty so that `alg: none`
# tokens reach the algorithm check and are refused for what they are.
_COMPACT_JWS: Final = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]*)")
# Last character of a canonical segment, by length mod 4 (the unused bits are zero).
_CANONICAL_LAST: Final = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}


class RejectReason(StrEnum):
    """Why a token was refused (for the audit log; a client is only told 'bad token')."""

    too_large = "too_large"
    malformed = "malformed"
    duplicate_key = "duplicate_key"
    bad_header = "bad_header"
    wrong_type = "wrong_type"
    forbidden_header = "forbidden_header"
    unknown_kid = "unknown_kid"
    bad_algorithm = "bad_algorithm"
    bad_signature = "bad_signature"
    bad_claims = "bad_claims"
    wrong_issuer = "wrong_issuer"
    wrong_audience = "wrong_audience"
    expired = "expired"
    not_yet_valid = "not_yet_valid"
    issued_in_future = "issued_in_future"
    internal_error = "internal_error"


class TokenRejected(GatepassError):
    """An access token failed verification; `reason` says which check refused it."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail[:200]
        super().__init__(f"{reason.value}: {self.detail}" if self.detail else reason.value)


class _DuplicateKey(Exception):
    """A JSON object repeats a member name (internal signal of `_loads`)."""


def _reject(reason: RejectReason, detail: str = "") -> NoReturn:
    raise TokenRejected(reason, detail)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _DETAIL_LIMIT else text[: _DETAIL_LIMIT - 3] + "..."


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(segment: str) -> bytes:
    """Decode one segment already known to be in the base64url alphabet."""
    remainder = len(segment) % 4
    if remainder:
        if remainder == 1 or segment[-1] not in _CANONICAL_LAST[remainder]:
            _reject(RejectReason.malformed, "non-canonical base64url")
        segment += "=" * (4 - remainder)
    try:
        return base64.urlsafe_b64decode(segment)
    except binascii.Error:  # unreachable after the checks above; kept as a guard
        _reject(RejectReason.malformed, "bad base64url")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _loads(data: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no repeated member names."""
    try:
        return json.loads(
            data.decode("utf-8"), object_pairs_hook=_unique_object, parse_constant=_no_constants
        )
    except _DuplicateKey:
        _reject(RejectReason.duplicate_key, f"{what} repeats a member name")
    except (ValueError, RecursionError):
        _reject(RejectReason.malformed, f"{what} is not UTF-8 JSON")


class _Parts(NamedTuple):
    signing_input: bytes
    header: bytes
    payload: bytes
    signature: bytes


def _check_size(token: str) -> None:
    """The first check, before anything hashes or scans the token."""
    if not isinstance(token, str):
        _reject(RejectReason.malformed, "token is not a string")
    if len(token) > MAX_TOKEN_BYTES:
        _reject(RejectReason.too_large, f"{len(token)} characters")


def _split(token: str) -> _Parts:
    _check_size(token)
    match = _COMPACT_JWS.fullmatch(token)
    if match is None:
        _reject(RejectReason.malformed, "not a compact JWS of three base64url segments")
    header, payload, signature = match.groups()
    return _Parts(
        token[: match.end(2)].encode("ascii"),
        _b64decode(header),
        _b64decode(payload),
        _b64decode(signature),
    )


def _check_header(
    header_json: bytes, keys: KeySet, typ: str | None
) -> tuple[dict[str, Any], ec.EllipticCurvePublicKey]:
    header = _loads(header_json, "header")
    if not isinstance(header, dict):
        _reject(RejectReason.bad_header, "header is not a JSON object")
    if typ is not None and header.get("typ") != typ:
        _reject(RejectReason.wrong_type, f"typ {_short(header.get('typ'))}")
    forbidden = FORBIDDEN_HEADERS.intersection(header)
    if forbidden:
        _reject(RejectReason.forbidden_header, ",".join(sorted(forbidden)))
    alg = header.get("alg")
    if alg != ALGORITHM:
        _reject(RejectReason.bad_algorithm, f"alg {_short(alg)}")
    kid = header.get("kid")
    if type(kid) is not str:
        _reject(RejectReason.bad_header, "kid missing or not a string")
    public_key = keys.get(kid)
    if public_key is None:
        _reject(RejectReason.unknown_kid, f"kid {_short(kid)}")
    return header, public_key


def _verify_es256(public_key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes) -> None:
    if len(signature) != _SIGNATURE_BYTES:
        _reject(RejectReason.bad_signature, f"signature is {len(signature)} bytes, not 64")
    r = int.from_bytes(signature[:_SCALAR_BYTES], "big")
    s = int.from_bytes(signature[_SCALAR_BYTES:], "big")
    if not (0 < r < _P256_ORDER and 0 < s < _P256_ORDER):
        _reject(RejectReason.bad_signature, "r or s out of range")
    try:
        public_key.verify(encode_dss_signature(r, s), message, _ECDSA_SHA256)
    except InvalidSignature:
        _reject(RejectReason.bad_signature, "signature does not verify")


def _verify_jws(token: str, keys: KeySet, typ: str | None) -> tuple[dict[str, Any], bytes]:
    parts = _split(token)
    header, public_key = _check_header(parts.header, keys, typ)
    _verify_es256(public_key, parts.signature, parts.signing_input)
    return header, parts.payload


def _internal(exc: Exception) -> TokenRejected:
    return TokenRejected(RejectReason.internal_error, type(exc).__name__)


def verify_es256_signature(
    public_key: ec.EllipticCurvePublicKey, signature: bytes, message: bytes
) -> None:
    """Check a raw (IEEE P1363, r||s) ES256 signature; raise TokenRejected(bad_signature)."""
    try:
        _verify_es256(public_key, signature, message)
    except TokenRejected:
        raise
    except Exception as exc:
        raise _internal(exc) from exc


def verify_jws_signature(
    token: str, keys: KeySet, *, typ: str | None = ACCESS_TOKEN_TYPE
) -> tuple[dict[str, Any], bytes]:
    """Check the JWS layer only and return (header, payload bytes); claims are not read.

    `alg` stays pinned to ES256; `typ=None` skips the media-type check (for generic
    JWS test vectors). Raises TokenRejected.
    """
    try:
        return _verify_jws(token, keys, typ)
    except TokenRejected:
        raise
    except Exception as exc:
        raise _internal(exc) from exc


class _Cached(NamedTuple):
    claims: AccessTokenClaims
    exp: int
    nbf: int
    iat: int


class TokenVerifier:
    """Verifies access tokens for one issuer and audience against an in-memory KeySet.

    Successful results are cached by token (only tokens that carry our signature ever
    enter the cache, so its size is bounded by what we minted); a hit re-runs the time
    checks, so a cached token stops working at exactly the same moment as an uncached one.
    """

    def __init__(
        self,
        keys: KeySet,
        *,
        issuer: str,
        audience: str,
        leeway: int = LEEWAY_SECONDS,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if not isinstance(keys, KeySet):
            raise TypeError("keys must be a KeySet")
        if not issuer or not audience:
            raise ValueError("issuer and audience must be non-empty")
        if leeway < 0 or cache_size < 0:
            raise ValueError("leeway and cache_size must not be negative")
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._cache_size = cache_size
        self._cache: OrderedDict[str, _Cached] = OrderedDict()

    @property
    def keys(self) -> KeySet:
        return self._keys

    def replace_keys(self, keys: KeySet) -> None:
        """Verify with `keys` from now on; results cached under the old set are dropped."""
        if not isinstance(keys, KeySet):
            raise TypeError("keys must be a KeySet")
        self._keys = keys
        self._cache = OrderedDict()

    def verify(self, token: str, now: float) -> AccessTokenClaims:
        """Return the claims of a valid token or raise TokenRejected (never anything else)."""
        try:
            return self._verify(token, now)
        except TokenRejected:
            raise
        except Exception as exc:
            raise _internal(exc) from exc

    def _verify(self, token: str, now: float) -> AccessTokenClaims:
        if not math.isfinite(now):
            _reject(RejectReason.internal_error, "now is not a finite number")
        _check_size(token)
        cache = self._cache
        hit = cache.get(token)
        if hit is not None:
            if now >= hit.exp + self._leeway:
                del cache[token]  # expired for good (unless the clock runs backwards)
            self._check_times(hit.exp, hit.nbf, hit.iat, now)
            return hit.claims
        claims = self._verify_uncached(token, now)
        if self._cache_size:
            if len(cache) >= self._cache_size:
                cache.popitem(last=False)
            cache[token] = _Cached(claims, claims.exp, claims.nbf, claims.iat)
        return claims

    def _verify_uncached(self, token: str, now: float) -> AccessTokenClaims:
        _, payload_json = _verify_jws(token, self._keys, ACCESS_TOKEN_TYPE)
        # Authenticated from here on. Parse once for duplicate names (pydantic's JSON
        # parser keeps the last duplicate silently), then validate strictly in JSON mode.
        if not isinstance(_loads(payload_json, "payload"), dict):
            _reject(RejectReason.bad_claims, "payload is not a JSON object")
        claims = _validate_claims(payload_json)
        if claims.iss != self._issuer:
            _reject(RejectReason.wrong_issuer, f"iss {_short(claims.iss)}")
        aud = claims.aud
        if (aud != self._audience) if isinstance(aud, str) else (self._audience not in aud):
            _reject(RejectReason.wrong_audience, f"aud {_short(aud)}")
        self._check_times(claims.exp, claims.nbf, claims.iat, now)
        return claims

    def _check_times(self, exp: int, nbf: int, iat: int, now: float) -> None:
        leeway = self._leeway
        if now >= exp + leeway:
            _reject(RejectReason.expired, f"exp {exp}")
        if nbf > now + leeway:
            _reject(RejectReason.not_yet_valid, f"nbf {nbf}")
        if iat > now + leeway:
            _reject(RejectReason.issued_in_future, f"iat {iat}")


def _validate_claims(payload: bytes) -> AccessTokenClaims:
    try:
        # JSON mode, strict: integers stay integers, arrays become tuples.
        return AccessTokenClaims.model_validate_json(payload)
    except ValidationError as exc:
        fields = sorted({".".join(map(str, err["loc"])) or "claims" for err in exc.errors()})
        _reject(RejectReason.bad_claims, ",".join(fields))


def _token_times(now: float, lifetime: int, not_after: float | None) -> tuple[int, int]:
    """(iat, exp) of a token minted at `now`: whole seconds, never past `not_after`."""
    if lifetime <= 0:
        raise ValueError("lifetime must be positive")
    issued = math.floor(now)
    exp = issued + lifetime
    if not_after is not None:
        exp = min(exp, math.floor(not_after))
    if exp <= issued:
        raise ValueError("the client certificate expires before the token could start")
    return issued, exp


def _new_jti() -> str:
    return secrets.token_urlsafe(16)


def new_access_token_claims(
    *,
    device_id: str,
    acl: Iterable[AclEntry],
    cert_thumbprint: str,
    issuer: str,
    audience: str | tuple[str, ...],
    lifetime: int,
    now: float,
    not_after: float | None = None,
    scope: str | None = None,
) -> AccessTokenClaims:
    """Claims for a device token valid from `now` for `lifetime` s, never past `not_after`.

    `cert_thumbprint` is the `x5t#S256` of the client certificate, `not_after` its
    expiry. Raises ValueError if no valid token can be made (e.g. certificate expired).
    """
    issued, exp = _token_times(now, lifetime, not_after)
    return AccessTokenClaims(
        iss=issuer,
        sub=device_id,
        aud=audience,
        client_id=device_id,
        iat=issued,
        nbf=issued,
        exp=exp,
        jti=_new_jti(),
        cnf=Confirmation.model_validate({"x5t#S256": cert_thumbprint}),
        acl=tuple(acl),
        scope=scope,
    )


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii")


@functools.lru_cache(maxsize=64)
def _header_segment(kid: str) -> str:
    return _b64encode(_json({"alg": ALGORITHM, "typ": ACCESS_TOKEN_TYPE, "kid": kid}))


def _sign_compact(payload_json: bytes, key: SigningKey) -> str:
    """The compact JWS of `payload_json` with header {alg, typ: at+jwt, kid}."""
    signing_input = f"{_header_segment(key.kid)}.{_b64encode(payload_json)}"
    r, s = decode_dss_signature(key.private_key.sign(signing_input.encode("ascii"), _ECDSA_SHA256))
    signature = r.to_bytes(_SCALAR_BYTES, "big") + s.to_bytes(_SCALAR_BYTES, "big")
    token = f"{signing_input}.{_b64encode(signature)}"
    if len(token) > MAX_TOKEN_BYTES:
        raise ValueError(f"token would be {len(token)} bytes; verifiers accept {MAX_TOKEN_BYTES}")
    return token


def mint_access_token(claims: AccessTokenClaims, key: SigningKey) -> str:
    """Sign `claims` as a compact ES256 JWS with header {alg, typ: at+jwt, kid}."""
    return _sign_compact(_json(claims.to_jwt_payload()), key)


class MintedToken(NamedTuple):
    token: str
    iat: int
    exp: int


class TokenTemplate:
    """One certificate's token, validated and serialized once, minted again and again.

    A device gets the same claims for every token on a certificate; only `iat`, `nbf`,
    `exp` and `jti` change. Building the pydantic model and its JSON for each token
    cost twice the signature itself, so the fixed members go through
    `new_access_token_claims` (the same validation as the one-off path) once, here,
    and are kept as JSON bytes; `mint` appends the four changing members, which are
    integers and a base64url string and so need no escaping.
    """

    __slots__ = ("_lifetime", "_not_after", "_prefix")

    _CHANGING: Final = ("iat", "nbf", "exp", "jti")

    def __init__(
        self,
        *,
        device_id: str,
        acl: Iterable[AclEntry],
        cert_thumbprint: str,
        issuer: str,
        audience: str | tuple[str, ...],
        lifetime: int,
        not_after: float | None = None,
        scope: str | None = None,
    ) -> None:
        sample = new_access_token_claims(
            device_id=device_id,
            acl=acl,
            cert_thumbprint=cert_thumbprint,
            issuer=issuer,
            audience=audience,
            lifetime=lifetime,
            now=0,
            scope=scope,
        )
        fixed = {k: v for k, v in sample.to_jwt_payload().items() if k not in self._CHANGING}
        self._prefix = _json(fixed)[:-1]  # without the closing brace
        self._lifetime = lifetime
        self._not_after = not_after

    def claims_json(self, now: float) -> tuple[bytes, int, int]:
        """The payload of a token minted at `now`, with its iat and exp."""
        issued, exp = _token_times(now, self._lifetime, self._not_after)
        changing = b',"iat":%d,"nbf":%d,"exp":%d,"jti":"%s"}' % (
            issued,
            issued,
            exp,
            _new_jti().encode("ascii"),
        )
        return self._prefix + changing, issued, exp

    def mint(self, key: SigningKey, now: float) -> MintedToken:
        """A signed token valid from `now`; ValueError if none can be made."""
        payload, issued, exp = self.claims_json(now)
        return MintedToken(_sign_compact(payload, key), issued, exp)
