"""Local user accounts of the console and the CLI: name, role, password hash, active.

The store keeps hashes only (``engine.passwords`` makes and checks them); it never sees a
password. An account is disabled, never deleted: the audit trail keeps naming it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa

ROLES = ("viewer", "operator", "admin")  # each role may do what the ones before it may

_USER_COLS = "id, name, role, password_hash, active, created_at"


@dataclass(slots=True)
class UserRow:
    id: int
    name: str
    role: str
    password_hash: str
    active: bool
    created_at: float


def _row(r) -> UserRow:
    return UserRow(int(r.id), r.name, r.role, r.password_hash, bool(r.active), float(r.created_at))


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")


class AccountsMixin:
    """Account operations of :class:`engine.store.Store`."""

    ROLES = ROLES

    def add_user(self, name: str, role: str, password_hash: str) -> int:
        """A new active account; ValueError on an empty or taken name or an unknown role."""
        _check_role(role)
        if not name or not name.strip() or name != name.strip():
            raise ValueError("a user name must be non-empty, without surrounding spaces")
        now = time.time()
        try:
            with self._write_tx() as conn:
                if conn.execute(sa.text("SELECT 1 FROM users WHERE name = :n"), {"n": name}).first():
                    raise ValueError(f"user {name!r} already exists")
                return conn.execute(sa.text(
                    "INSERT INTO users (name, role, password_hash, active, created_at, updated_at) "
                    "VALUES (:n, :r, :h, :a, :now, :now) RETURNING id"),
                    {"n": name, "r": role, "h": password_hash, "a": True, "now": now}).scalar_one()
        except sa.exc.IntegrityError as exc:  # a concurrent add of the same name
            raise ValueError(f"user {name!r} already exists") from exc

    def user(self, name: str) -> UserRow | None:
        with self._read() as conn:
            r = conn.execute(sa.text(f"SELECT {_USER_COLS} FROM users WHERE name = :n"),
                             {"n": name}).first()
        return None if r is None else _row(r)

    def list_users(self) -> list[UserRow]:
        with self._read() as conn:
            rows = conn.execute(sa.text(f"SELECT {_USER_COLS} FROM users ORDER BY name")).all()
        return [_row(r) for r in rows]

    def set_user(self, name: str, *, role: str | None = None, password_hash: str | None = None,
                 active: bool | None = None) -> bool:
        """Change what is given; False when there is no such user. ValueError on a bad role."""
        sets, params = [], {"n": name, "now": time.time()}
        if role is not None:
            _check_role(role)
            sets.append("role = :r")
            params["r"] = role
        if password_hash is not None:
            sets.append("password_hash = :h")
            params["h"] = password_hash
        if active is not None:
            sets.append("active = :a")
            params["a"] = bool(active)
        with self._write_tx() as conn:
            done = conn.execute(sa.text(
                f"UPDATE users SET {', '.join(sets + ['updated_at = :now'])} WHERE name = :n"), params)
            return done.rowcount > 0
