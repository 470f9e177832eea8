"""The read model: what the CLI, ``/status`` and a console read (messages, entries, counts,
submissions), on pooled read connections, never through the writer.
"""
from __future__ import annotations

import json
import time
from typing import Callable, TypeVar

import sqlalchemy as sa


from .models import (
    EntryRow,
    MessageRow,
    MessageSummary,
)
from .schema import submissions
from .sql import MSG_COLS, iso, time_range


T = TypeVar("T")


class ReadModelMixin:
    """Reads of :class:`engine.store.Store`."""

    def read(self, fn: Callable[[sa.Connection], T]) -> T:
        """Run ``fn`` on a read connection (registry lookups, CLI): no writer involved."""
        with self._read() as conn:
            return fn(conn)

    def get_message(self, message_id: int) -> MessageRow | None:
        with self._read() as conn:
            m = conn.execute(sa.text(f"SELECT {MSG_COLS} FROM messages WHERE id = :id"),
                             {"id": message_id}).first()
            if m is None:
                return None
            ents = conn.execute(sa.text(
                "SELECT id, message_id, destination, route, status, order_key, transforms, "
                "attempts, next_attempt_at, created_at, updated_at, lease_owner, lease_until, "
                "last_error, response, payload, target, doc_key, action, replay_of FROM queue_entries "
                "WHERE message_id = :id ORDER BY id"), {"id": message_id}).mappings().all()
        vals = dict(m._mapping)
        vals["ack"] = bytes(vals["ack"])
        vals["raw"] = bytes(vals["raw"])
        entries = []
        for e in ents:
            ev = dict(e)
            for k in ("response", "payload"):
                ev[k] = None if ev[k] is None else bytes(ev[k])
            entries.append(EntryRow(**ev))
        return MessageRow(**vals, entries=entries)

    def list_messages(self, *, limit: int = 100, offset: int = 0, channel: str | None = None,
                      status: str | None = None, destination: str | None = None,
                      message_type: str | None = None, control_id: str | None = None,
                      since: float | None = None, until: float | None = None,
                      sending_app: str | None = None, ids: list[int] | None = None) -> list[MessageSummary]:
        """Newest first, filtered. ``status`` aggregates: the message status if
        rejected/filtered/conflict; else over the latest entry per destination and target (a
        replay supersedes the earlier attempt): 'error' if any error, 'queued' if any
        queued/in_flight, 'handled' if an error was resolved by an operator and nothing else is
        pending, 'cancelled' if nothing was sent and a deletion cancelled an entry, else 'sent'. With ``destination`` only that destination's entries count (and
        only messages routed there are listed). ``message_type`` is ``CODE^TRIGGER`` or ``CODE``;
        ``since``/``until`` bound the reception time (epoch seconds, ``until`` excluded);
        ``sending_app`` is MSH-3 (its first component, or the whole field); ``ids`` keeps only
        these messages (the console's patient search finds them)."""
        where, params = [], {"lim": int(limit), "off": int(offset)}
        if ids is not None:
            if not ids:
                return []
            where.append("m.id IN (" + ", ".join(str(int(i)) for i in ids) + ")")
        if sending_app is not None:
            where.append("(m.sending_app = :app OR m.sending_app LIKE :app_prefix)")
            params.update(app=sending_app, app_prefix=sending_app.replace("%", "") + "^%")
        for col, value in (("channel", channel), ("control_id", control_id)):
            if value is not None:
                where.append(f"m.{col} = :{col}")
                params[col] = value
        if message_type is not None:
            where.append("(m.message_type = :mt OR m.message_type LIKE :mt_prefix)")
            params.update(mt=message_type, mt_prefix=message_type.replace("%", "") + "^%")
        time_range(where, params, "m.received_at", since, until)
        dest = ""
        if destination is not None:
            dest = " AND e.destination = :dest"
            params["dest"] = destination
            where.append("EXISTS (SELECT 1 FROM queue_entries d WHERE d.message_id = m.id "
                         "AND d.destination = :dest)")

        def latest(cond: str) -> str:
            return ("(SELECT count(*) FROM queue_entries e WHERE e.message_id = m.id" + dest +
                    f" AND {cond} AND e.id = (SELECT max(e2.id) FROM queue_entries e2 "
                    "WHERE e2.message_id = m.id AND e2.destination = e.destination "
                    "AND e2.target = e.target))")

        errors, waiting = latest("e.status = 'error'"), latest("e.status IN ('queued', 'in_flight')")
        handled = latest("e.status = 'resolved'")
        sent, cancelled = latest("e.status = 'sent'"), latest("e.status = 'cancelled'")
        agg = ("CASE WHEN m.status IN ('rejected', 'filtered', 'conflict') THEN m.status "
               f"WHEN {errors} > 0 THEN 'error' WHEN {waiting} > 0 THEN 'queued' "
               f"WHEN {handled} > 0 THEN 'handled' "
               f"WHEN {sent} = 0 AND {cancelled} > 0 THEN 'cancelled' ELSE 'sent' END")
        outer = ""
        if status is not None:
            outer = "WHERE x.agg = :status"
            params["status"] = status
        cond = ("WHERE " + " AND ".join(where)) if where else ""
        with self._read() as conn:
            rows = conn.execute(sa.text(
                "SELECT x.id, x.channel, x.control_id, x.message_type, x.received_at, x.agg, "
                "x.sending_app, x.sending_facility, x.size FROM ("
                "  SELECT m.id, m.channel, m.control_id, m.message_type, m.received_at, "
                f"  m.sending_app, m.sending_facility, m.size, {agg} AS agg FROM messages m {cond}) x "
                f"{outer} ORDER BY x.id DESC LIMIT :lim OFFSET :off"), params).all()
        return [MessageSummary(mid, ch, cid, mt, iso(at), st, app, fac, size)
                for mid, ch, cid, mt, at, st, app, fac, size in rows]

    def raw_between(self, since: float, until: float, *, after_id: int = 0,
                    limit: int = 500) -> list[tuple[int, bytes, str]]:
        """``(id, raw, charset)`` of the messages received in ``[since, until)`` with an id above
        ``after_id``, by id, ``limit`` at a time: the console's patient search reads the content
        it matches (patient identifiers are not columns, see the module docstring of ``schema``)."""
        with self._read() as conn:
            rows = conn.execute(sa.text(
                "SELECT id, raw, charset FROM messages WHERE received_at >= :s AND received_at < :u "
                "AND id > :a ORDER BY id LIMIT :lim"),
                {"s": float(since), "u": float(until), "a": int(after_id), "lim": int(limit)}).all()
        return [(i, bytes(raw), cs or "") for i, raw, cs in rows]

    def message_ids_by_control_id(self, control_id: str, limit: int = 20) -> list[int]:
        """Ids of the messages carrying this MSH-10, newest first (several senders may reuse one)."""
        with self._read() as conn:
            return list(conn.execute(sa.text(
                "SELECT id FROM messages WHERE control_id = :c ORDER BY id DESC LIMIT :lim"),
                {"c": control_id, "lim": int(limit)}).scalars())

    def submission_row(self, message_id: int) -> dict | None:
        """The stored submission row of a message (kind, submission JSON, validation, wrapped)."""
        with self._read() as conn:
            row = conn.execute(sa.select(submissions).where(
                submissions.c.message_id == message_id)).mappings().first()
        if row is None:
            return None
        out = dict(row)
        if out.get("wrapped") is not None:
            out["wrapped"] = bytes(out["wrapped"])
        return out

    def latest_pacs_header(self, doc_key: str) -> dict | None:
        """The CDA header of the latest PACS report wrapped without error for the same exam."""
        with self._read() as conn:
            row = conn.execute(sa.select(submissions.c.cda_header)
                               .where(submissions.c.doc_key == doc_key, submissions.c.kind == "pacs",
                                      submissions.c.errors == 0)
                               .order_by(submissions.c.message_id.desc()).limit(1)).first()
        return json.loads(row[0]) if row and row[0] else None

    def open_alerts(self) -> list[dict]:
        """Alerts whose latest event is ``alert_started`` (no ``alert_ended`` after it): the
        details (rule, kind, subject, since, value) of the alerts firing when the engine stopped."""
        with self._read() as conn:
            return [d for _id, d in open_alert_events(conn)]

    def stats(self) -> dict:
        """Counts per channel and destination for the status endpoint, without scanning the
        messages table at each call (a hospital's store holds millions of rows of about 2 KB).

        Messages: their status is final once committed (a processing step sets it in the
        insert's own transaction), so counts are kept here and only rows with a higher id than
        the last call are counted. Ids grow in commit order because one writer inserts them
        (SQLite: max(id) inside the write-locked transaction; PostgreSQL: sequence blocks taken
        by that writer), so no row can appear below the mark later. Duplicates: the same with
        the writer's 'duplicate' events. Queue entries change status, so they are counted each
        time, from the (destination, status, ...) index alone; the oldest queued entry is the
        one with the lowest id.
        """
        now = time.time()
        with self._stats_lock, self._read() as conn:
            msgs, dups = dict(self._stats_msgs), dict(self._stats_dups)
            codes = dict(self._stats_codes)
            msg_mark, dup_mark = self._stats_msg_mark, self._stats_dup_mark
            for chan, status, ack_code, error_code, n, top in conn.execute(sa.text(
                    "SELECT channel, status, ack_code, error_code, count(*), max(id) FROM messages "
                    "WHERE id > :w GROUP BY channel, status, ack_code, error_code"),
                    {"w": self._stats_msg_mark}).all():
                msgs[(chan, status)] = msgs.get((chan, status), 0) + n
                key = (chan, status, ack_code or "", error_code or "")
                codes[key] = codes.get(key, 0) + n
                msg_mark = max(msg_mark, top)
            for chan, n, top in conn.execute(sa.text(
                    "SELECT channel, count(*), max(id) FROM events "
                    "WHERE kind = 'duplicate' AND id > :w GROUP BY channel"),
                    {"w": self._stats_dup_mark}).all():
                dups[chan] = dups.get(chan, 0) + n
                dup_mark = max(dup_mark, top)
            counts = conn.execute(sa.text(
                "SELECT destination, status, count(*) FROM queue_entries "
                "GROUP BY destination, status")).all()
            oldest = {}
            for dest in {d for d, st, n in counts if st == "queued" and n}:
                oldest[dest] = conn.execute(sa.text(
                    "SELECT created_at FROM queue_entries WHERE id = (SELECT min(id) "
                    "FROM queue_entries WHERE destination = :d AND status = 'queued')"),
                    {"d": dest}).scalar()
            # every query succeeded: keep the new counts and marks
            self._stats_msgs, self._stats_dups, self._stats_codes = msgs, dups, codes
            self._stats_msg_mark, self._stats_dup_mark = msg_mark, dup_mark
        msg = [(c, st, n) for (c, st), n in msgs.items()]
        q = [(d, st, n, oldest.get(d) if st == "queued" else None) for d, st, n in counts]
        channels: dict[str, dict] = {}

        def ch(name):
            return channels.setdefault(name, {"received": 0, "filtered": 0, "rejected": 0,
                                              "duplicates": 0, "conflicts": 0})

        for name, status, n in msg:
            c = ch(name)
            c["received"] += n
            if status == "filtered":
                c["filtered"] += n
            elif status == "rejected":
                c["rejected"] += n
            elif status == "conflict":
                c["conflicts"] += n
        for name, n in dups.items():
            c = ch(name)
            c["duplicates"] += n
            c["received"] += n
        dests: dict[str, dict] = {}
        for name, status, n, oldest in q:
            d = dests.setdefault(name, {"queued": 0, "in_flight": 0, "sent": 0, "error": 0,
                                        "filtered": 0, "cancelled": 0,
                                        "oldest_queued_age_s": None})
            d[status] = d.get(status, 0) + n
            if status == "queued" and oldest is not None:
                d["oldest_queued_age_s"] = max(0.0, now - oldest)
        # stored messages per (channel, status, MSA-1, ERR-3 code), for /metrics
        by_code = [{"channel": c, "status": st, "ack_code": a, "error_code": e, "count": n}
                   for (c, st, a, e), n in sorted(codes.items())]
        return {"channels": channels, "destinations": dests, "messages_by_code": by_code}


def open_alert_events(conn) -> list[tuple[int, dict]]:
    """``(event id, detail)`` of each ``alert_started`` event with no ``alert_ended`` after it
    for the same rule and subject (retention keeps these: a restart reads them back)."""
    latest: dict[tuple, tuple[str, int, dict]] = {}
    for eid, kind, detail in conn.execute(sa.text(
            "SELECT id, kind, detail FROM events WHERE kind IN ('alert_started', 'alert_ended') "
            "ORDER BY id")).all():
        d = json.loads(detail or "{}")
        latest[(d.get("rule"), d.get("subject"))] = (kind, eid, d)
    return [(eid, d) for kind, eid, d in latest.values() if kind == "alert_started"]
