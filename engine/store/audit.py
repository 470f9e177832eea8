"""The audit trail: who did what, when, to what, with which outcome (the questions of IHE ATNA,
ITI TF-2 3.20, and of DICOM PS3.15 A.5 audit messages), append-only.

The store offers no update or delete of audit rows. Actions of the store (pause, replay,
retry...) do not audit themselves: their callers (CLI, console, engine) know the actor and the
source and call :meth:`AuditMixin.audit` with them. Listeners (the syslog export) are called
after the commit, in the calling thread; one that raises is logged and never fails the action.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import sqlalchemy as sa

from .sql import time_range

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "refused", "failed")

_AUDIT_COLS = "id, at, actor, action, target, outcome, detail, source"


@dataclass(slots=True)
class AuditRow:
    id: int
    at: float
    actor: str            # a user name, 'cli:<os user>' or 'engine'
    action: str           # dotted: 'login.failed', 'destination.pause', ...
    target: str | None    # internal ids only: 'message:42', 'destination:ris'
    outcome: str          # ok | refused | failed
    detail: dict | None
    source: str | None    # the client's IP address, or 'cli'


def _row(r) -> AuditRow:
    return AuditRow(int(r.id), float(r.at), r.actor, r.action, r.target, r.outcome,
                    None if r.detail is None else json.loads(r.detail), r.source)


class AuditMixin:
    """Audit operations of :class:`engine.store.Store`."""

    _audit_listeners: tuple[Callable[[AuditRow], Any], ...] = ()

    def add_audit_listener(self, fn: Callable[[AuditRow], Any]) -> None:
        """``fn(row)`` after each committed audit row (in the thread that audited)."""
        self._audit_listeners = self._audit_listeners + (fn,)

    def audit(self, actor: str, action: str, *, target: str | None = None, outcome: str = "ok",
              detail: dict | None = None, source: str | None = None) -> int:
        """Append one audit row in a transaction of its own; returns its id."""
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        if not actor or not action:
            raise ValueError("an audit row needs an actor and an action")
        at = time.time()
        text = None if detail is None else json.dumps(detail, sort_keys=True, default=str)
        with self._write_tx() as conn:
            rid = conn.execute(sa.text(
                "INSERT INTO audit_log (at, actor, action, target, outcome, detail, source) "
                "VALUES (:at, :actor, :action, :target, :outcome, :detail, :source) RETURNING id"),
                {"at": at, "actor": actor, "action": action, "target": target, "outcome": outcome,
                 "detail": text, "source": source}).scalar_one()
        if self._audit_listeners:
            row = AuditRow(int(rid), at, actor, action, target, outcome,
                           None if text is None else json.loads(text), source)
            for fn in self._audit_listeners:
                try:
                    fn(row)
                except Exception:  # noqa: BLE001 - an export never fails the audited action
                    log.exception("audit listener failed")
        return int(rid)

    def audit_list(self, *, since: float | None = None, until: float | None = None,
                   actor: str | None = None, action: str | None = None, limit: int = 100,
                   offset: int = 0) -> list[AuditRow]:
        """Newest first. ``since``/``until`` bound ``at`` (``until`` excluded); ``action``
        matches itself and its dotted children ('login' also finds 'login.failed')."""
        where, params = [], {"lim": int(limit), "off": int(offset)}
        time_range(where, params, "at", since, until)
        if actor is not None:
            where.append("actor = :actor")
            params["actor"] = actor
        if action is not None:
            where.append("(action = :action OR substr(action, 1, :plen) = :prefix)")
            params.update(action=action, prefix=action + ".", plen=len(action) + 1)
        cond = f"WHERE {' AND '.join(where)} " if where else ""
        with self._read() as conn:
            rows = conn.execute(sa.text(
                f"SELECT {_AUDIT_COLS} FROM audit_log {cond}ORDER BY at DESC, id DESC "
                "LIMIT :lim OFFSET :off"), params).all()
        return [_row(r) for r in rows]
