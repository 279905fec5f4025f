"""Credential keys: generation, hashing and verification.

Keys are random (or set by an operator, at least 16 characters), so a salted SHA-256 is
enough; a slow password hash would cost hundreds of milliseconds per connect. Stored
form: ``sha256$<salt>$<hex digest>``. Verification compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

MIN_KEY_LENGTH = 16


def generate_key() -> str:
    """A new random key (43 URL-safe characters, 256 bits), never starting with ``-``.

    One URL-safe key in 64 would start with ``-``, and ``--key -abc…`` on a command line
    reads as another option.
    """
    while True:
        key = secrets.token_urlsafe(32)
        if not key.startswith("-"):
            return key


def hash_key(key: str, salt: str | None = None) -> str:
    """The stored form of ``key``.

    Raises:
        ValueError: if the key is shorter than :data:`MIN_KEY_LENGTH`.
    """
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"a key must have at least {MIN_KEY_LENGTH} characters")
    salt = salt or secrets.token_hex(8)
    digest = hashlib.sha256(f"{salt}${key}".encode()).hexdigest()
    return f"sha256${salt}${digest}"


def verify_key(key: str, stored: str) -> bool:
    """Whether ``key`` matches the stored hash (constant time)."""
    try:
        algorithm, salt, digest = stored.split("$")
    except ValueError:
        return False
    if algorithm != "sha256":
        return False
    # surrogatepass: a key that is no valid text is wrong, not an error.
    candidate = hashlib.sha256(f"{salt}${key}".encode("utf-8", "surrogatepass")).hexdigest()
    return hmac.compare_digest(candidate, digest)
