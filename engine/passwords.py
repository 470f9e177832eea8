"""Password hashes of the local accounts: argon2id (RFC 9106) with argon2-cffi's defaults, which
are RFC 9106's second recommended option (64 MiB, 3 passes, 4 lanes) and above the OWASP
Password Storage Cheat Sheet's minimum for argon2id. Pure: no store, no I/O.

The PHC string format keeps the parameters with each hash, so raising them later only needs
``needs_rehash`` at the next successful login. A malformed or foreign hash never verifies and
never raises: a damaged row must lock its account out, not crash the login path.
"""
from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import Argon2Error

_HASHER = PasswordHasher()  # argon2id, library defaults (RFC 9106 low-memory option)


def hash_password(pw: str) -> str:
    """The PHC string (``$argon2id$v=19$m=...,t=...,p=...$salt$hash``) of ``pw``, fresh salt."""
    if not isinstance(pw, str) or not pw:
        raise ValueError("a password must be a non-empty string")
    return _HASHER.hash(pw)


def verify_password(hash: str, pw: str) -> bool:  # noqa: A002 - the API's name
    """True only when ``pw`` matches ``hash``; False for a wrong password, an empty or
    malformed hash, or any type error (never raises)."""
    if not isinstance(hash, str) or not isinstance(pw, str) or not hash.startswith("$argon2"):
        return False
    try:
        return _HASHER.verify(hash, pw)
    except (Argon2Error, ValueError, TypeError):
        return False


def needs_rehash(hash: str) -> bool:  # noqa: A002
    """True when ``hash`` was made with other parameters than today's (or is unreadable)."""
    try:
        return _HASHER.check_needs_rehash(hash)
    except (Argon2Error, ValueError, TypeError, AttributeError):
        return True
