"""Receipts of sent mails (DSN, MDN): matched to the queue entry of the mail, recorded once, with
the business acknowledgement they give rise to queued in the same transaction.

The connector stores the mail's Message-ID in the entry's response (``Message-ID: <...>``); the
receipt names it back (``Original-Envelope-Id`` / ``Original-Message-ID``). Each receipt has a
unique key: recording one twice (a restart after the commit but before the mailbox was told)
changes nothing and queues nothing.
"""
from __future__ import annotations

import json
import re
import time
from typing import Sequence

import sqlalchemy as sa

from .models import FollowUp
from .sql import EVENT_COLS

_ENTRY_IN_ID = re.compile(r"^<[0-9a-f]+\.(\d+)@")


class ReceiptsMixin:
    """Receipt operations of :class:`engine.store.Store`."""

    def mail_entry(self, mail_id: str) -> dict | None:
        """The sent entry whose mail had this Message-ID (the connector writes the entry id into
        it: ``<token.entry_id@domain>``), checked against the stored response; None if unknown."""
        m = _ENTRY_IN_ID.match(mail_id or "")
        if m is None:
            return None
        with self._read() as conn:
            row = conn.execute(sa.text(
                "SELECT q.id, q.message_id, q.destination, q.route, q.target, q.response, m.raw, "
                "m.channel FROM queue_entries q JOIN messages m ON m.id = q.message_id "
                "WHERE q.id = :id"), {"id": int(m.group(1))}).mappings().first()
        if row is None or row["response"] is None:
            return None
        if f"Message-ID: {mail_id}\r\n".encode("ascii", "replace") not in bytes(row["response"]):
            return None
        out = dict(row)
        out["raw"] = bytes(out["raw"])
        out.pop("response")
        return out

    def record_receipt(self, entry: dict, *, key: str, event: str, ok: bool, error_code: str | None,
                       follow_ups: Sequence[FollowUp] = ()) -> bool:
        """Record a receipt of ``entry`` (a :meth:`mail_entry` row) and queue its follow-ups
        (at most one ZAM) in one transaction. False when that receipt was already recorded."""
        now = time.time()
        with self._write_tx() as conn:
            seen = conn.execute(sa.text("SELECT 1 FROM mail_receipts WHERE receipt_key = :k"),
                                {"k": key}).first()
            if seen is not None:
                return False
            zam_id = None
            for f in follow_ups:
                zam_id = self._insert_follow_up(conn, f, now, cause=(entry["message_id"], entry["id"]))
            conn.execute(sa.text(
                "INSERT INTO mail_receipts (receipt_key, entry_id, message_id, event, ok, error_code, "
                "zam_message_id, received_at) VALUES (:k, :e, :m, :ev, :ok, :code, :z, :at)"),
                {"k": key, "e": entry["id"], "m": entry["message_id"], "ev": event, "ok": bool(ok),
                 "code": error_code, "z": zam_id, "at": now})
            conn.execute(sa.text(
                f"INSERT INTO events ({EVENT_COLS}) VALUES (:at, 'receipt', :ch, :d, :mid, :eid, :detail)"),
                {"at": now, "ch": entry["channel"], "d": entry["destination"], "mid": entry["message_id"],
                 "eid": entry["id"], "detail": json.dumps({"event": event, "ok": bool(ok),
                                                           "error_code": error_code,
                                                           "zam_message_id": zam_id})})
        return True

    def mail_receipts(self, message_id: int) -> list[dict]:
        """The receipts recorded for the mails of a message (``minipfi messages show``)."""
        with self._read() as conn:
            rows = conn.execute(sa.text(
                "SELECT r.entry_id, q.target, r.event, r.ok, r.error_code, r.zam_message_id, "
                "r.received_at FROM mail_receipts r JOIN queue_entries q ON q.id = r.entry_id "
                "WHERE r.message_id = :m ORDER BY r.id"), {"m": message_id}).mappings().all()
        return [dict(r, ok=bool(r["ok"])) for r in rows]
