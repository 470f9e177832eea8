"""Retention and export reads/writes: which rows are due, their deletion in small batches, and
streaming reads of everything the export writes. SQL only; the policy, the archive and the
files are in :mod:`engine.retention`.

What may go (checked when selecting AND again in the writer op that deletes, so a message that
became live in between, e.g. replayed by an operator, is kept):

* a message, when none of its queue entries is queued, in flight or in error, none carries a
  document key that still has such an entry at the same destination (a later replacement or
  deletion reads the chain and what was sent), and no mail it sent still awaits its receipt
  (sent less than :data:`RECEIPT_WAIT` ago without any receipt recorded). With it go its queue
  entries, submission, mail receipts and, on SQLite, its ``dedup_index`` row.
* a message's payloads (same conditions): ``raw`` becomes empty, the entries' payload and
  response NULL, the submission ``{"pruned": true}`` (wrapped message, CDA header and
  validation NULL); the metadata rows stay and ``flags`` gains :data:`PAYLOAD_PRUNED`.
* a queue entry in a final state (sent, filtered, cancelled, resolved) of a kept message, under
  the same document and receipt conditions and not replayed by a live entry.
* events older than the delivery limit (not the ``alert_started`` of an alert still firing); identity history rows (and identities) per
  ``engine/retention``'s rules.

Rows are found by seeking the primary key between an id bound found by bisection on the
reception (or creation) time: ids grow with time (one writer allocates them), so no time index
is needed and a batch reads a few hundred rows.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Iterator

import sqlalchemy as sa

from .identities import identities, identity_history, identity_identifiers
from .read_model import open_alert_events
from .schema import events, messages, queue_entries, submissions

#: a mail sent without any receipt recorded keeps its message this long (DSN/MDN arrive within days)
RECEIPT_WAIT = 30 * 86400.0
PAYLOAD_PRUNED = "payload_pruned"
FINAL = ("sent", "filtered", "cancelled", "resolved")
LIVE = "('queued', 'in_flight', 'error')"
_DOC_LIVE = ("(q.doc_key IS NOT NULL AND EXISTS (SELECT 1 FROM queue_entries l WHERE "
             f"l.destination = q.destination AND l.doc_key = q.doc_key AND l.status IN {LIVE}))")
_MSG_LIVE = ("EXISTS (SELECT 1 FROM queue_entries q WHERE q.message_id = m.id AND "
             f"(q.status IN {LIVE} OR {_DOC_LIVE}))")
_IDS = sa.bindparam("ids", expanding=True)
PAGE = 200  # rows per read of the streaming export


def scope_sql(scope: tuple[tuple[str, ...], tuple[str, ...]], params: dict, col: str = "m.channel") -> str:
    """``(channels, excluded)``: the named channels, or every channel but the excluded ones."""
    include, exclude = scope
    if include:
        params["sc_in"] = list(include)
        return f" AND {col} IN :sc_in"
    if exclude:
        params["sc_ex"] = list(exclude)
        return f" AND {col} NOT IN :sc_ex"
    return ""


def _text(sql: str, params: dict) -> sa.TextClause:
    t = sa.text(sql)
    for name in ("ids", "sc_in", "sc_ex"):
        if name in params:
            t = t.bindparams(sa.bindparam(name, expanding=True))
    return t


def _b(v) -> bytes | None:
    return None if v is None else bytes(v)


class RetentionMixin:
    """Retention and export operations of :class:`engine.store.Store`."""

    # -- bounds --------------------------------------------------------------------------------
    @staticmethod
    def id_bound(conn: sa.Connection, table: str, time_col: str, cut: float, *,
                 keep_newest: bool = False) -> int:
        """The highest id whose row's time is before ``cut`` (bisection on the primary key).
        ``keep_newest``: below the table's newest row, which a deletion must leave (SQLite gives
        a new row max(id) + 1: ids named by the audit trail and events would be reused)."""
        lo = conn.execute(sa.text(f"SELECT min(id) FROM {table}")).scalar()
        hi = conn.execute(sa.text(f"SELECT max(id) FROM {table}")).scalar()
        if lo is None:
            return 0
        if keep_newest:
            hi -= 1
        at = sa.text(f"SELECT id, {time_col} FROM {table} WHERE id >= :i ORDER BY id LIMIT 1")
        best = lo - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            row = conn.execute(at, {"i": mid}).first()
            if row is None or row[1] >= cut:
                hi = mid - 1
            else:
                best = max(best, row[0])
                lo = row[0] + 1
        return best

    # -- candidates ----------------------------------------------------------------------------
    def due_messages(self, scope, cut: float, *, after: int, hi: int, limit: int,
                     payloads: bool = False, now: float | None = None) -> tuple[list[int], int, int | None]:
        """Ids of messages received before ``cut`` that may go (or, ``payloads``, whose payloads
        may go), after id ``after`` up to ``hi``; the last id examined (the next cursor); the
        lowest id examined that is due by age but still needed (None: none)."""
        params = {"a": after, "hi": hi, "cut": cut, "lim": int(limit)}
        done = f"m.flags LIKE '%{PAYLOAD_PRUNED}%'" if payloads else "1 = 0"
        with self._read() as conn:
            rows = conn.execute(_text(
                f"SELECT m.id, CASE WHEN {done} THEN 0 WHEN m.received_at >= :cut THEN 3 "
                f"WHEN {_MSG_LIVE} THEN 2 ELSE 1 END FROM messages m WHERE m.id > :a AND m.id <= :hi"
                + scope_sql(scope, params) + " ORDER BY m.id LIMIT :lim", params), params).all()
            ids = [r[0] for r in rows if r[1] == 1]
            kept = [r[0] for r in rows if r[1] in (2, 3)]  # needed, or not due yet (ids and times
            # are ordered only nearly: a row just below the bound may be a few ms too young)
            due = self._without_awaited_receipts(conn, ids, now)
        kept.extend(set(ids) - set(due))
        return due, (rows[-1][0] if rows else hi), (min(kept) if kept else None)

    @staticmethod
    def _without_awaited_receipts(conn: sa.Connection, ids: list[int], now: float | None,
                                  by: str = "message_id") -> list[int]:
        if not ids:
            return ids
        since = (time.time() if now is None else now) - RECEIPT_WAIT
        col = "q.message_id" if by == "message_id" else "q.id"
        waiting = set()
        for key, response in conn.execute(_text(
                f"SELECT {col}, q.response FROM queue_entries q WHERE {col} IN :ids "
                "AND q.status = 'sent' AND q.updated_at > :since AND q.response IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM mail_receipts r WHERE r.message_id = q.message_id "
                "AND r.entry_id = q.id)", {"ids": ids}), {"ids": ids, "since": since}):
            if b"Message-ID: <" in bytes(response):
                waiting.add(key)
        return [i for i in ids if i not in waiting]

    def due_entries(self, scope, cut: float, *, after: int, hi: int, limit: int,
                    now: float | None = None) -> tuple[list[int], int]:
        """Final queue entries updated before ``cut`` whose history may go (their message stays)."""
        params = {"a": after, "hi": hi, "cut": cut, "lim": int(limit)}
        with self._read() as conn:
            rows = conn.execute(_text(
                "SELECT q.id, CASE WHEN q.updated_at < :cut AND q.status IN "
                f"{tuple(FINAL)!r} AND NOT {_DOC_LIVE} AND NOT EXISTS (SELECT 1 FROM queue_entries r "
                f"WHERE r.message_id = q.message_id AND r.replay_of = q.id AND r.status IN {LIVE}) "
                "THEN 1 ELSE 0 END FROM queue_entries q JOIN messages m ON m.id = q.message_id "
                "WHERE q.id > :a AND q.id <= :hi" + scope_sql(scope, params)
                + " ORDER BY q.id LIMIT :lim", params), params).all()
            ids = [r[0] for r in rows if r[1]]
            ids = self._without_awaited_receipts(conn, ids, now, by="id")
        return ids, (rows[-1][0] if rows else hi)

    def due_events(self, scope, cut: float, *, after: int, hi: int, limit: int) -> tuple[list[int], int]:
        """Events before ``cut`` (ids after ``after`` up to ``hi``) and the next cursor; the
        start of an alert still firing stays (see ``open_alert_events``)."""
        params = {"cut": cut, "a": after, "hi": hi, "lim": int(limit)}
        with self._read() as conn:
            rows = conn.execute(_text(
                "SELECT id, CASE WHEN at < :cut THEN 1 ELSE 0 END, kind FROM events e WHERE id > :a AND id <= :hi"
                + scope_sql(scope, params, "e.channel") + " ORDER BY id LIMIT :lim", params), params).all()
            keep = ({eid for eid, _d in open_alert_events(conn)}
                    if any(r[1] and r[2] == "alert_started" for r in rows) else set())
        return [r[0] for r in rows if r[1] and r[0] not in keep], (rows[-1][0] if rows else hi)

    def due_identities(self, cut: datetime, *, limit: int) -> tuple[list[int], list[int]]:
        """Identity history rows written before ``cut`` whose source message is gone, and
        identities not updated since ``cut`` that no kept message's history names and no other
        identity is merged into (their identifiers and history go with them)."""
        with self._read() as conn:
            hist = list(conn.execute(sa.text(
                "SELECT h.id FROM identity_history h WHERE h.at < :cut AND (h.message_id IS NULL "
                "OR NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = h.message_id)) "
                "ORDER BY h.id LIMIT :lim"), {"cut": cut, "lim": int(limit)}).scalars())
            idents = list(conn.execute(sa.text(
                "SELECT i.id FROM identities i WHERE i.updated_at < :cut AND NOT EXISTS ("
                "SELECT 1 FROM identity_history h JOIN messages m ON m.id = h.message_id "
                "WHERE h.identity_id = i.id) AND NOT EXISTS (SELECT 1 FROM identities j "
                "WHERE j.merged_into = i.id) ORDER BY i.id LIMIT :lim"),
                {"cut": cut, "lim": int(limit)}).scalars())
        return hist, idents

    # -- deletions (writer ops: ``store.submit(lambda c: store.delete_messages_within(c, ids))``)
    def _still_due(self, conn: sa.Connection, ids: list[int], now: float | None) -> list[int]:
        lock = "" if self._sqlite else " FOR UPDATE"
        due = list(conn.execute(_text(
            f"SELECT m.id FROM messages m WHERE m.id IN :ids AND NOT {_MSG_LIVE} ORDER BY m.id{lock}",
            {"ids": ids}), {"ids": ids}).scalars())
        return self._without_awaited_receipts(conn, due, now)

    def delete_messages_within(self, conn: sa.Connection, ids: list[int],
                               now: float | None = None) -> dict:
        """Delete these messages (those still due) with their entries, submission, receipts
        and SQLite duplicate key; returns counts per table and the ids kept."""
        due = self._still_due(conn, ids, now)
        counts = {"messages": 0, "queue_entries": 0, "submissions": 0, "mail_receipts": 0,
                  "dedup_index": 0, "kept": sorted(set(ids) - set(due))}
        if not due:
            return counts
        p = {"ids": due}
        if self._sqlite:
            keys = conn.execute(_text("SELECT dedup_key, received_at, id FROM messages WHERE id IN :ids "
                                      "AND dedup_key IS NOT NULL", p), p).all()
            if keys:
                before = conn.execute(sa.text("SELECT total_changes()")).scalar()
                conn.execute(sa.text("DELETE FROM dedup_index WHERE dedup_key = :k AND received_at = :at "
                                     "AND message_id = :m"), [{"k": k[0], "at": k[1], "m": k[2]} for k in keys])
                counts["dedup_index"] = conn.execute(sa.text("SELECT total_changes()")).scalar() - before
        for table, col in (("mail_receipts", "message_id"), ("submissions", "message_id"),
                           ("queue_entries", "message_id"), ("messages", "id")):
            counts[table] = conn.execute(_text(f"DELETE FROM {table} WHERE {col} IN :ids", p), p).rowcount
        return counts

    def prune_payloads_within(self, conn: sa.Connection, ids: list[int],
                              now: float | None = None) -> dict:
        """Empty the payloads of these messages (those still due); metadata rows stay."""
        due = self._still_due(conn, ids, now)
        counts = {"payloads": 0, "kept": sorted(set(ids) - set(due))}
        if not due:
            return counts
        p = {"ids": due, "e": b"", "mark": PAYLOAD_PRUNED}
        counts["payloads"] = conn.execute(_text(
            "UPDATE messages SET raw = :e, flags = CASE WHEN flags IS NULL OR flags = '' THEN :mark "
            "ELSE flags || ',' || :mark END WHERE id IN :ids", p), p).rowcount
        conn.execute(_text("UPDATE queue_entries SET payload = NULL, response = NULL "
                           "WHERE message_id IN :ids", p), p)
        conn.execute(_text("UPDATE submissions SET submission = '{\"pruned\": true}', wrapped = NULL, "
                           "cda_header = NULL, validation = NULL WHERE message_id IN :ids", p), p)
        return counts

    def delete_entries_within(self, conn: sa.Connection, ids: list[int], now: float | None = None) -> dict:
        """Delete these final entries (those still final and not replayed by a live entry)."""
        p = {"ids": ids}
        due = list(conn.execute(_text(
            f"SELECT q.id FROM queue_entries q WHERE q.id IN :ids AND q.status IN {tuple(FINAL)!r} "
            f"AND NOT {_DOC_LIVE} AND NOT EXISTS (SELECT 1 FROM queue_entries r WHERE "
            f"r.message_id = q.message_id AND r.replay_of = q.id AND r.status IN {LIVE})", p), p).scalars())
        due = self._without_awaited_receipts(conn, due, now, by="id")
        counts = {"queue_entries": 0, "mail_receipts": 0, "kept": sorted(set(ids) - set(due))}
        if due:
            p = {"ids": due}
            counts["mail_receipts"] = conn.execute(_text(
                "DELETE FROM mail_receipts WHERE entry_id IN :ids", p), p).rowcount
            counts["queue_entries"] = conn.execute(_text(
                "DELETE FROM queue_entries WHERE id IN :ids", p), p).rowcount
        return counts

    @staticmethod
    def delete_events_within(conn: sa.Connection, ids: list[int]) -> dict:
        p = {"ids": ids}
        return {"events": conn.execute(_text("DELETE FROM events WHERE id IN :ids", p), p).rowcount}

    @staticmethod
    def delete_identities_within(conn: sa.Connection, history_ids: list[int],
                                 identity_ids: list[int]) -> dict:
        counts = {"identity_history": 0, "identity_identifiers": 0, "identities": 0}
        if history_ids:
            p = {"ids": history_ids}
            counts["identity_history"] += conn.execute(_text(
                "DELETE FROM identity_history WHERE id IN :ids", p), p).rowcount
        if identity_ids:
            p = {"ids": identity_ids}
            counts["identity_history"] += conn.execute(_text(
                "DELETE FROM identity_history WHERE identity_id IN :ids", p), p).rowcount
            counts["identity_identifiers"] = conn.execute(_text(
                "DELETE FROM identity_identifiers WHERE identity_id IN :ids", p), p).rowcount
            counts["identities"] = conn.execute(_text(
                "DELETE FROM identities WHERE id IN :ids AND NOT EXISTS (SELECT 1 FROM identities j "
                "WHERE j.merged_into = identities.id)", p), p).rowcount
        return counts

    # -- streaming reads (export, archive) -----------------------------------------------------
    def _pages(self, stmt_for, page: int = PAGE) -> Iterator[dict]:
        """Rows in id order, ``page`` at a time on a fresh read (no whole table in memory)."""
        after = None
        while True:
            with self._read() as conn:
                rows = [dict(r) for r in conn.execute(stmt_for(after).limit(page)).mappings()]
            if not rows:
                return
            yield from rows
            after = rows[-1]["id"] if "id" in rows[-1] else rows[-1]["message_id"]
            if len(rows) < page:
                return

    def iter_messages(self, *, since: float | None = None, until: float | None = None,
                      channels: list[str] | None = None, ids: list[int] | None = None) -> Iterator[dict]:
        """Message rows (raw and ACK as bytes) in id order, by reception time or by id."""
        for r in self._pages(lambda after: _select(messages, after, messages.c.received_at, since,
                                                   until, channels, ids)):
            r["raw"], r["ack"] = bytes(r["raw"]), bytes(r["ack"])
            yield r

    def iter_table(self, table: str, *, since: float | None = None, until: float | None = None,
                   channels: list[str] | None = None) -> Iterator[dict]:
        """Every row of events (by time and channel) or of the identity registry tables."""
        t = _TABLES[table]
        timed = t.c.at if table == "events" else None
        yield from self._pages(lambda after: _select(t, after, timed, since, until,
                                                     channels if timed is not None else None))

    def rows_of_messages(self, table: str, message_ids: list[int]) -> list[dict]:
        """Queue entries, submissions or mail receipts of these messages, in id order."""
        with self._read() as conn:
            if table == "mail_receipts":
                rows = conn.execute(_text("SELECT * FROM mail_receipts WHERE message_id IN :ids ORDER BY id",
                                          {"ids": 1}), {"ids": message_ids}).mappings().all()
            else:
                t = _TABLES[table]
                key = t.c.id if "id" in t.c else t.c.message_id
                rows = conn.execute(sa.select(t).where(t.c.message_id.in_(message_ids))
                                    .order_by(key)).mappings().all()
        return _plain(rows)

    def rows_by_id(self, table: str, ids: list[int], column: str = "id") -> list[dict]:
        """Rows of ``table`` whose ``column`` is one of ``ids`` (what a prune batch removes)."""
        t = _TABLES[table]
        with self._read() as conn:
            return _plain(conn.execute(sa.select(t).where(t.c[column].in_(ids)).order_by(t.c.id)).mappings())


_TABLES = {"queue_entries": queue_entries, "submissions": submissions, "events": events,
           "identities": identities, "identity_identifiers": identity_identifiers,
           "identity_history": identity_history}


def _plain(rows) -> list[dict]:
    return [{k: (_b(v) if isinstance(v, (bytes, memoryview)) else v) for k, v in r.items()} for r in rows]


def _select(t: sa.Table, after, time_col, since, until, channels, ids=None):
    """Rows of ``t`` after id ``after`` in id order, within [since, until) of ``time_col``."""
    s = sa.select(t).order_by(t.c.id)
    if after is not None:
        s = s.where(t.c.id > after)
    if time_col is not None and since is not None:
        s = s.where(time_col >= since)
    if time_col is not None and until is not None:
        s = s.where(time_col < until)
    if channels:
        s = s.where(t.c.channel.in_(channels))
    if ids is not None:
        s = s.where(t.c.id.in_(ids))
    return s


def utc_naive(ts: float) -> datetime:
    """Epoch seconds as the naive UTC datetime the identity registry stores."""
    return datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None)
