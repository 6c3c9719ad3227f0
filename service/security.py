"""The API key: ``Authorization: Bearer KEY`` (HTTP) or ``authorization`` metadata (gRPC)."""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr


def bearer_matches(authorization: str | None, key: SecretStr) -> bool:
    """Whether an ``Authorization`` value is ``Bearer <key>`` (scheme case-insensitive, spaces around the
    key ignored). Digests of equal length are compared in constant time: the time taken tells nothing
    of the key, not even its length."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    given = hashlib.sha256(token.strip().encode()).digest()
    expected = hashlib.sha256(key.get_secret_value().encode()).digest()
    return hmac.compare_digest(given, expected) and scheme.lower() == "bearer"
