"""TLS session resumption on a device's own connections to its gateway.

Owns: `SessionSlot`, the last resumable TLS session a device got from one server, and
the rule for offering it again. Must not: write a session anywhere (a ticket is a
bearer secret for the session's keys: memory only, so a reboot starts with a full
handshake), or offer a session under another `SSLContext` (after a certificate renewal
the device must present its new certificate, in a full handshake).

Why: a device makes a new mutual-TLS connection for every token refresh (HTTPS) and a
new MQTT connection with every new token (MQTT 3.1.1 has no re-authentication). A
resumed handshake skips both certificate chains and both signatures; measured on our
2-core machines it costs client and server about 45 % less CPU than a full one, which
is what a fleet's refresh window spends most of its time on (see the simulator issue).

Only TLS 1.3 sessions are kept. Their resumption is PSK with (EC)DHE (OpenSSL offers
`psk_dhe_ke` only), so every resumed connection still has fresh keys and forward
secrecy; a TLS 1.2 ticket resumes without a key exchange and is never offered.

What a resumed connection changes for the gateway: nothing it checks. The peer
certificate is the one verified in the full handshake (it travels in the session), and
the token service (registry, validity period), EST re-enrollment (revocation, expiry)
and the broker (`cnf` binding, revocation) check it on every request or CONNECT, as
they do on a full handshake. The gateway decides whether and for how long tickets are
valid (it issues them; a restart invalidates them all).
"""

from __future__ import annotations

import ssl

__all__ = ["SessionSlot"]

RESUMABLE_VERSION = "TLSv1.3"


class SessionSlot:
    """The session to offer on the next connection to one server; not thread-safe."""

    __slots__ = ("_context", "_session")

    def __init__(self) -> None:
        self._context: ssl.SSLContext | None = None
        self._session: ssl.SSLSession | None = None

    def offer(self, context: ssl.SSLContext) -> ssl.SSLSession | None:
        """The session to resume under `context`, or None for a full handshake."""
        return self._session if context is self._context else None

    def keep(self, sock: ssl.SSLSocket) -> None:
        """Remember `sock`'s session, once its ticket has arrived (after the first read)."""
        session = sock.session
        if session is None or not session.has_ticket or sock.version() != RESUMABLE_VERSION:
            return
        self._context, self._session = sock.context, session

    def forget(self) -> None:
        self._context = self._session = None
