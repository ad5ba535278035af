"""The exception tree of the `shared` package.

    GatepassError                 base of every error Gatepass raises on purpose
    +-- InvalidTopic              a topic name or filter breaks MQTT 3.1.1 section 4.7
    +-- AccessDenied              an ACL refuses an action on a topic
    +-- TokenRejected             an access token failed verification (has a `reason`;
    |                             defined in `shared.tokens`, beside the verifier)
    +-- PkiError                  a key, certificate, CSR or PKCS#7 blob cannot be used

Local mistakes (bad configuration, programming errors) are not part of this tree.
This module must not import anything beyond the standard library.
"""

from __future__ import annotations

__all__ = ["AccessDenied", "GatepassError", "InvalidTopic", "PkiError"]


class GatepassError(Exception):
    """Base class of every deliberate Gatepass error."""


class InvalidTopic(GatepassError, ValueError):
    """A topic name or topic filter is not valid MQTT 3.1.1."""


class AccessDenied(GatepassError):
    """An ACL refused an action on a topic."""


class PkiError(GatepassError, ValueError):
    """A key, certificate, CSR or PKCS#7 structure is malformed or unusable."""
