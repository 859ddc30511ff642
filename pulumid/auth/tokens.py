"""Tokens: minted at random, stored only as hashes, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What the database keeps instead of a token: a leaked database grants no access.

    Tokens carry 256 random bits, so an unsalted SHA-256 cannot be reversed by search.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def same(given: str | bytes, expected: str | bytes) -> bool:
    """Constant-time equality of two secrets (or of their hashes)."""
    a = given.encode("utf-8", "surrogatepass") if isinstance(given, str) else given
    b = expected.encode("utf-8", "surrogatepass") if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)
