"""Operator controls of delivery: pause and resume a destination, "retry now" for a message.

A paused destination claims nothing: its entries stay queued, nothing is lost, and what is in
flight finishes. Each change raises the one-row counter ``control_changes.seq`` in the same
transaction, so that a running engine notices a change made by another process (the CLI) with
one cheap read (:meth:`ControlsMixin.controls_version`). These methods do not audit: the caller
knows the actor and calls ``audit``.
"""
from __future__ import annotations

import time

import sqlalchemy as sa

from .models import UnknownMessage

_BUMP = "UPDATE control_changes SET seq = seq + 1 WHERE id = 1"


class ControlsMixin:
    """Delivery controls of :class:`engine.store.Store`."""

    def pause_destination(self, name: str, *, by: str, reason: str | None = None) -> bool:
        """Pause ``name``; False (nothing written) when it is paused already."""
        with self._write_tx() as conn:
            done = conn.execute(sa.text(
                "INSERT INTO destination_controls (destination, paused, changed_by, changed_at, reason) "
                "VALUES (:d, :p, :by, :at, :reason) ON CONFLICT (destination) DO UPDATE SET "
                "paused = excluded.paused, changed_by = excluded.changed_by, "
                "changed_at = excluded.changed_at, reason = excluded.reason "
                "WHERE NOT destination_controls.paused RETURNING destination"),
                {"d": name, "p": True, "by": by, "at": time.time(), "reason": reason}).first()
            if done is None:
                return False
            conn.execute(sa.text(_BUMP))
            return True

    def resume_destination(self, name: str, *, by: str) -> bool:
        """Resume ``name``; False when it was not paused. Its entries waiting for a retry
        become due now (resume sends at once, as retry-now would; a hold stays)."""
        now = time.time()
        with self._write_tx() as conn:
            done = conn.execute(sa.text(
                "UPDATE destination_controls SET paused = :p, changed_by = :by, changed_at = :at, "
                "reason = NULL WHERE destination = :d AND paused"),
                {"d": name, "p": False, "by": by, "at": now})
            if done.rowcount == 0:
                return False
            conn.execute(sa.text(
                "UPDATE queue_entries SET next_attempt_at = :now WHERE destination = :d "
                "AND status = 'queued' AND attempts > 0 AND next_attempt_at > :now"), {"d": name, "now": now})
            conn.execute(sa.text(_BUMP))
            return True

    def paused_destinations(self) -> dict[str, dict]:
        """name -> {by, at, reason} of the destinations paused now."""
        with self._read() as conn:
            rows = conn.execute(sa.text(
                "SELECT destination, changed_by, changed_at, reason FROM destination_controls "
                "WHERE paused ORDER BY destination")).all()
        return {r.destination: {"by": r.changed_by, "at": float(r.changed_at), "reason": r.reason}
                for r in rows}

    def controls_version(self) -> int:
        """A counter raised by every pause, resume and retry-now that changed something."""
        with self._read() as conn:
            return int(conn.execute(sa.text("SELECT seq FROM control_changes WHERE id = 1")).scalar() or 0)

    def retry_now(self, message_id: int, destination: str | None = None) -> int:
        """The queued entries of this message (at ``destination`` if named) waiting for a later
        attempt become due now; returns how many. An entry not tried yet is held (deferred
        delivery: a correction within the delay wins) and stays so. Unknown message:
        :class:`UnknownMessage`."""
        now = time.time()
        one_dest = " AND destination = :d" if destination is not None else ""
        with self._write_tx() as conn:
            if conn.execute(sa.text("SELECT 1 FROM messages WHERE id = :m"), {"m": int(message_id)}).first() is None:
                raise UnknownMessage(f"unknown message id(s): [{message_id}]")
            ids = conn.execute(sa.text(
                "UPDATE queue_entries SET next_attempt_at = :now, updated_at = :now "
                "WHERE message_id = :m AND status = 'queued' AND attempts > 0 "
                f"AND next_attempt_at > :now{one_dest} "
                "RETURNING id"), {"now": now, "m": int(message_id), "d": destination}).scalars().all()
            if ids:
                conn.execute(sa.text(_BUMP))
        return len(ids)
