"""Passcode and password hashing with argon2id."""

from __future__ import annotations

from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError


def hasher(profile: str = "default") -> PasswordHasher:
    if profile == "cheapest":
        return PasswordHasher.from_parameters(profiles.CHEAPEST)
    return PasswordHasher()


def hash_secret(ph: PasswordHasher, secret: str) -> str:
    return ph.hash(secret)


def verify_secret(ph: PasswordHasher, stored: str, secret: str) -> bool:
    """Constant-time by construction (argon2 recomputes the hash and compares digests)."""
    try:
        return ph.verify(stored, secret)
    except (VerificationError, InvalidHashError):
        return False
