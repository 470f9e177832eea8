"""Queue entries: claims with leases, completion, release, recovery, replay, and the document
rules (chain keys, cancellation by a deletion). Claims on PostgreSQL lock the head rows with
``FOR UPDATE SKIP LOCKED``; on SQLite write transactions start with ``BEGIN IMMEDIATE``.

Delivery workers claim and complete inside the writer's transactions (``claim_windows_within``,
``complete_within``, ``release_within``, run as writer ops): a claim or a completion shares the
group commit of ingest instead of paying a COMMIT (and on SQLite a wait for the write lock) of
its own. A claim takes, per ordering key, a window of the due entries at the head of that key,
in id order, so that a worker sends many entries per round trip to the store. The heads are
found by seeking the ``(destination, status, order_key, id)`` index key after key, starting
after the last key visited (round robin), never by grouping the whole queue: with 100,000
queued entries the grouping query of ``claim_due`` took 50-190 ms per claim.
"""
from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa


from .models import (
    ClaimedEntry,
    ClaimedWindows,
    Completion,
    EntrySpec,
    FollowUp,
    ReplayedTarget,
    UnknownMessage,
)
from .sql import COMPLETE_KIND, ENTRY_COLS, ENTRY_KEYS, EVENT_COLS, entry_row



# Outcome groups run per delivery window: their statements are built once, not per group
# (building a text clause parses its bind parameters again).
_LIVE = ("SELECT q.id, q.destination, q.message_id, q.replay_of, m.channel FROM queue_entries q "
         "JOIN messages m ON m.id = q.message_id WHERE q.id IN :ids "
         "AND q.status = 'in_flight' AND q.lease_owner = :o")
_LIVE_SQLITE = sa.text(_LIVE).bindparams(sa.bindparam("ids", expanding=True))
_SQL_COMPLETE = (
    "UPDATE queue_entries SET status = :s, attempts = :a, "
    "next_attempt_at = COALESCE(:n, next_attempt_at), last_error = :e, "
    "response = COALESCE(:r, response), payload = COALESCE(:p, payload), "
    "lease_owner = NULL, lease_until = NULL, updated_at = :now "
    "WHERE id = :id AND status = 'in_flight' AND lease_owner = :o")
_SQL_COMPLETE_EVENT = f"INSERT INTO events ({EVENT_COLS}) VALUES (:at, :kind, :ch, :dest, :mid, :eid, :detail)"
_SQL_RELEASE = ("UPDATE queue_entries SET status = 'queued', lease_owner = NULL, "
                "lease_until = NULL, updated_at = :now "
                "WHERE id = :id AND status = 'in_flight' AND lease_owner = :o")
_RELEASE = sa.text(_SQL_RELEASE)

# PostgreSQL: a whole outcome group in ONE statement (one server execution instead of two per
# entry): the outcomes come as one JSON array (rows ``[id, status, attempts, next_attempt_at,
# last_error, response hex, payload hex, event kind, event detail, position]``; a release has
# no kind and keeps attempts, next_attempt_at, last_error, response and payload); the UPDATE
# records those whose entry is still in flight under the owner (the fence, rechecked on the
# latest row version after a lock wait) and returns them; their events are inserted from what
# it returned, in the group's order. One JSON parameter: psycopg dumped typed arrays five
# times slower (measured, 64 outcomes). ``q.id = ANY(ARRAY(...))`` makes the plan a primary key
# lookup whatever the statistics (else a generic plan may scan the table for in-flight rows).
_PG_COMPLETE = (
    "WITH v AS (SELECT (r->>0)::int8 AS id, r->>1 AS s, (r->>2)::int4 AS a, (r->>3)::float8 AS n, "
    "  r->>4 AS e, decode(r->>5, 'hex') AS resp, decode(r->>6, 'hex') AS pay, r->>7 AS kind, "
    "  r->>8 AS detail, (r->>9)::int4 AS pos FROM jsonb_array_elements(%(g)s::jsonb) AS r), "
    "u AS (UPDATE queue_entries q SET status = v.s, attempts = COALESCE(v.a, q.attempts), "
    "  next_attempt_at = COALESCE(v.n, q.next_attempt_at), "
    "  last_error = CASE WHEN v.kind IS NULL THEN q.last_error ELSE v.e END, "
    "  response = COALESCE(v.resp, q.response), payload = COALESCE(v.pay, q.payload), "
    "  lease_owner = NULL, lease_until = NULL, updated_at = %(now)s "
    "  FROM v WHERE q.id = ANY(ARRAY(SELECT id FROM v)) AND q.id = v.id "
    "  AND q.status = 'in_flight' AND q.lease_owner = %(o)s "
    "  RETURNING q.id, q.message_id, q.destination, q.replay_of, v.kind, v.detail, v.pos), "
    f"ev AS (INSERT INTO events ({EVENT_COLS}) "
    "  SELECT %(now)s, u.kind, m.channel, u.destination, u.message_id, u.id, u.detail "
    "  FROM u JOIN messages m ON m.id = u.message_id WHERE u.kind IS NOT NULL ORDER BY u.pos) "
    "SELECT id, message_id, destination, replay_of FROM u")


# The key visit of a claim on SQLite (``claim_windows_within``): the head of the next key,
# whether an entry of that key before its head is in flight, the window.
_SEEK_AFTER = ("SELECT order_key, id, next_attempt_at FROM queue_entries WHERE destination = :d "
               "AND status = 'queued' AND order_key > :k ORDER BY order_key, id LIMIT 1")
_SEEK_FIRST = ("SELECT order_key, id, next_attempt_at FROM queue_entries WHERE destination = :d "
               "AND status = 'queued' ORDER BY order_key, id LIMIT 1")
_BLOCKED = ("SELECT 1 FROM queue_entries WHERE destination = :d AND status = 'in_flight' "
            "AND order_key = :k AND id < :id LIMIT 1")
_WINDOW = ("SELECT id, next_attempt_at FROM queue_entries WHERE destination = :d "
           "AND status = 'queued' AND order_key = :k AND id >= :id ORDER BY id LIMIT :w")

# PostgreSQL: the whole key visit in ONE statement (instead of four): the head of the next key
# after :k, or with :wrap of the first key (``wrap`` says which); whether an entry of that key
# before its head is in flight; the head's lock (SKIP LOCKED: another instance is claiming the
# key), taken only when the head is due, not blocked and not of the key :first the claim
# started at (a visit that comes back to it ends the claim); then, only if locked, the window
# from the head, locked (a wait: what holds one of its rows is not claiming). The CTEs with
# FOR UPDATE are materialized, each run once, in that order (each needs the one before); the
# window's bounds are InitPlans, so the key's index is read in id order from the head.
_PG_VISIT = (
    "WITH h AS ((SELECT order_key, id, next_attempt_at, false AS wrap FROM queue_entries "
    "  WHERE destination = %(d)s AND status = 'queued' AND order_key > %(k)s "
    "  ORDER BY order_key, id LIMIT 1) "
    " UNION ALL (SELECT order_key, id, next_attempt_at, true FROM queue_entries "
    "  WHERE %(wrap)s AND destination = %(d)s AND status = 'queued' ORDER BY order_key, id LIMIT 1) "
    " LIMIT 1), "
    "b AS MATERIALIZED (SELECT h.*, EXISTS (SELECT 1 FROM queue_entries x WHERE x.destination = %(d)s "
    "  AND x.status = 'in_flight' AND x.order_key = h.order_key AND x.id < h.id) AS blocked FROM h), "
    "l AS (SELECT id FROM queue_entries WHERE id = (SELECT id FROM b WHERE NOT blocked "
    "  AND next_attempt_at <= %(now)s AND order_key IS DISTINCT FROM %(first)s) "
    "  AND status = 'queued' FOR UPDATE SKIP LOCKED), "
    "w AS (SELECT id, next_attempt_at FROM queue_entries WHERE destination = %(d)s "
    "  AND status = 'queued' AND order_key = (SELECT order_key FROM b) AND id >= (SELECT id FROM l) "
    "  ORDER BY id LIMIT %(w)s FOR UPDATE) "
    "SELECT b.order_key, b.id, b.next_attempt_at, b.wrap, b.blocked, EXISTS (SELECT 1 FROM l), "
    "  ARRAY(SELECT id FROM w ORDER BY id), ARRAY(SELECT next_attempt_at FROM w ORDER BY id) FROM b")
# PostgreSQL: the claimed entries taken and read in one statement
_PG_TAKE = (
    "UPDATE queue_entries q SET status = 'in_flight', lease_owner = %(o)s, lease_until = %(lu)s, "
    "updated_at = %(now)s FROM messages m WHERE q.id = ANY(%(ids)s::int8[]) AND m.id = q.message_id "
    "RETURNING q.id, q.message_id, q.destination, q.route, q.order_key, q.transforms, q.attempts, "
    "m.raw, m.control_id, m.message_type, m.channel, q.target, m.charset, q.doc_key, q.action")

_TAKE = sa.text("UPDATE queue_entries SET status = 'in_flight', lease_owner = :o, "
                "lease_until = :lu, updated_at = :now WHERE id IN :ids"
                ).bindparams(sa.bindparam("ids", expanding=True))
_CLAIMED = sa.text("SELECT q.id, q.message_id, q.destination, q.route, q.order_key, "
                   "q.transforms, q.attempts, m.raw, m.control_id, m.message_type, m.channel, "
                   "q.target, m.charset, q.doc_key, q.action "
                   "FROM queue_entries q JOIN messages m ON m.id = q.message_id "
                   "WHERE q.id IN :ids ORDER BY q.id").bindparams(sa.bindparam("ids", expanding=True))

def _claimed_entry(r) -> ClaimedEntry:
    """A claimed entry from a row of the columns of ``_CLAIMED`` (and ``_PG_TAKE``), in order."""
    return ClaimedEntry(id=r[0], message_id=r[1], destination=r[2], route=r[3], order_key=r[4],
                        transforms=r[5], attempts=r[6], raw=bytes(r[7]), control_id=r[8],
                        message_type=r[9], channel=r[10], target=r[11], charset=r[12],
                        doc_key=r[13], action=r[14])


def _windows(lanes_ids: list[list[int]], rows, last: str | None, next_due: float | None) -> ClaimedWindows:
    """The claimed windows, in lane order, from the rows of the claimed entries (any order)."""
    by_id = {e.id: e for e in map(_claimed_entry, rows)}
    return ClaimedWindows([[by_id[i] for i in lane] for lane in lanes_ids], last, next_due)


def _event_detail(c: Completion, nxt: float | None) -> str:
    """The JSON detail of an outcome event; the common one (sent, no error) without json.dumps."""
    if c.last_error is None and c.status != "queued":
        return f'{{"attempts": {int(c.attempts)}}}'
    detail: dict[str, Any] = {"attempts": c.attempts}
    if c.last_error is not None:
        detail["error"] = c.last_error[:500]
    if c.status == "queued":
        detail["next_attempt_at"] = nxt
    return json.dumps(detail)


class QueueMixin:
    """Queue operations of :class:`engine.store.Store`."""

    def recover_in_flight(self) -> int:
        now = time.time()
        with self._write_tx() as conn:
            rows = conn.execute(sa.text(
                "SELECT q.id, q.destination, q.message_id, m.channel, q.lease_owner "
                "FROM queue_entries q JOIN messages m ON m.id = q.message_id "
                "WHERE q.status = 'in_flight'")).all()
            if not rows:
                return 0
            conn.execute(sa.text(
                "UPDATE queue_entries SET status = 'queued', lease_owner = NULL, "
                "lease_until = NULL, updated_at = :now WHERE status = 'in_flight'"), {"now": now})
            conn.execute(
                sa.text(f"INSERT INTO events ({EVENT_COLS}) VALUES "
                        "(:at, 'recovered', :ch, :dest, :mid, :eid, :detail)"),
                [{"at": now, "ch": r.channel, "dest": r.destination, "mid": r.message_id,
                  "eid": r.id, "detail": json.dumps({"lease_owner": r.lease_owner})}
                 for r in rows])
            return len(rows)

    def claim_due(self, destination: str, limit: int, owner: str, lease_seconds: float,
                  now: float | None = None) -> list[ClaimedEntry]:
        now = time.time() if now is None else now
        lock = " FOR UPDATE OF q SKIP LOCKED" if not self._sqlite else ""
        with self._write_tx() as conn:
            ids = conn.execute(sa.text(
                "SELECT q.id FROM queue_entries q JOIN ("
                "  SELECT min(id) AS hid FROM queue_entries"
                "  WHERE destination = :d AND status IN ('queued', 'in_flight')"
                "  GROUP BY order_key) h ON q.id = h.hid "
                "WHERE q.status = 'queued' AND q.next_attempt_at <= :now "
                f"ORDER BY q.id LIMIT :lim{lock}"),
                {"d": destination, "now": now, "lim": int(limit)}).scalars().all()
            if not ids:
                return []
            conn.execute(
                sa.text("UPDATE queue_entries SET status = 'in_flight', lease_owner = :o, "
                        "lease_until = :lu, updated_at = :now WHERE id IN :ids")
                .bindparams(sa.bindparam("ids", expanding=True)),
                {"o": owner, "lu": now + lease_seconds, "now": now, "ids": list(ids)})
            # read in the same transaction as the update (the rows are ours now)
            claimed = self._claimed_rows(conn, list(ids))
        return claimed

    def complete(self, entry_id: int, owner: str, *, status: str, attempts: int,
                 next_attempt_at: float | None = None, last_error: str | None = None,
                 response: bytes | None = None, payload: bytes | None = None,
                 follow_ups: "tuple[FollowUp, ...] | list[FollowUp]" = ()) -> bool:
        """Record the outcome of an entry in flight (fenced by its lease owner), with the
        messages the outcome gives rise to (``follow_ups``: stored and queued in the same
        transaction). False when the lease was lost: nothing is written."""
        if status not in COMPLETE_KIND:
            raise ValueError(f"complete(): invalid status {status!r}")
        done = Completion(entry_id, status, attempts, next_attempt_at, last_error, response, payload,
                          follow_ups=tuple(follow_ups))
        with self._write_tx() as conn:
            return self.complete_within(conn, owner, [done])[0]

    # -- windows: claims and outcomes inside the writer's transaction ----------------------------
    def claim_windows(self, destination: str, keys: int, window: int, owner: str,
                      lease_seconds: float, now: float | None = None,
                      cursor: str | None = None) -> ClaimedWindows:
        """``claim_windows_within`` in a transaction of its own (CLI, tests)."""
        with self._write_tx() as conn:
            return self.claim_windows_within(conn, destination, keys, window, owner, lease_seconds,
                                             time.time() if now is None else now, cursor)

    def claim_windows_within(self, conn: sa.Connection, destination: str, keys: int, window: int,
                             owner: str, lease_seconds: float, now: float,
                             cursor: str | None = None, max_visit: int = 256,
                             max_entries: int | None = None) -> ClaimedWindows:
        """Claim, for at most ``keys`` ordering keys, the due entries at the head of each key (at
        most ``window`` per key, contiguous from the head, stopping at the first not due). A key
        whose oldest unfinished entry is in flight, or whose head is not due, is skipped. Keys
        are visited in ``order_key`` order starting after ``cursor``, wrapping around, at most
        ``max_visit`` of them, until ``max_entries`` entries are taken."""
        if not self._sqlite:
            return self._claim_windows_pg(conn, destination, keys, window, owner, lease_seconds,
                                          now, cursor, max_visit, max_entries)
        # the statements of the key visit run once or more per key (up to ``max_visit`` keys
        # per claim, in the writer): straight on the driver's cursor, whose statement cache
        # keeps them compiled, without SQLAlchemy's per-execute work (measured: the claims
        # were a third of the writer's time with a thousand keys; sqlite3 takes the same
        # named parameters)
        cur = conn.connection.dbapi_connection.cursor()

        def run(sql, params):
            return cur.execute(sql, params)
        lanes_ids: list[list[int]] = []
        next_due = None
        seen: set[str] = set()
        key = cursor
        wrapped = cursor is None
        last = cursor
        taken = 0
        while len(lanes_ids) < keys and len(seen) < max_visit and (max_entries is None or taken < max_entries):
            if key is None:
                row = run(_SEEK_FIRST, {"d": destination}).fetchone()
            else:
                row = run(_SEEK_AFTER, {"d": destination, "k": key}).fetchone()
            if row is None:
                if wrapped:
                    break
                wrapped, key = True, None
                continue
            head_key, head_id, head_due = row[0], row[1], row[2]
            if head_key in seen:  # round the whole circle
                break
            key = last = head_key
            seen.add(key)
            if head_due > now:
                next_due = head_due if next_due is None else min(next_due, head_due)
            elif run(_BLOCKED, {"d": destination, "k": key, "id": head_id}).fetchone() is None:
                ids = []
                room = window if max_entries is None else min(window, max_entries - taken)
                for r in run(_WINDOW, {"d": destination, "k": key, "id": head_id, "w": int(room)}):
                    if r[1] > now:
                        break
                    ids.append(r[0])
                if ids:
                    lanes_ids.append(ids)
                    taken += len(ids)
        if not lanes_ids:
            return ClaimedWindows([], last, next_due)
        flat = [i for lane in lanes_ids for i in lane]
        conn.execute(_TAKE, {"o": owner, "lu": now + lease_seconds, "now": now, "ids": flat})
        return _windows(lanes_ids, conn.execute(_CLAIMED, {"ids": flat}), last, next_due)

    def _claim_windows_pg(self, conn: sa.Connection, destination: str, keys: int, window: int,
                          owner: str, lease_seconds: float, now: float, cursor: str | None,
                          max_visit: int, max_entries: int | None) -> ClaimedWindows:
        """``claim_windows_within`` on PostgreSQL: one statement per key visited
        (``_PG_VISIT``), then one that takes the claimed entries and reads them
        (``_PG_TAKE``). Same walk as on SQLite: the wrap to the first key is folded into the
        visit that finds no key after the last one."""
        cur = conn.connection.dbapi_connection.cursor()
        lanes_ids: list[list[int]] = []
        seen: set[str] = set()
        key = last = cursor
        wrapped, first, next_due, taken = cursor is None, None, None, 0
        while len(lanes_ids) < keys and len(seen) < max_visit and (max_entries is None or taken < max_entries):
            room = window if max_entries is None else min(window, max_entries - taken)
            cur.execute(_PG_VISIT, {"d": destination, "k": key, "wrap": key is None or not wrapped,
                                    "now": now, "first": first, "w": int(room)})
            row = cur.fetchone()
            if row is None:
                break
            head_key, _head_id, head_due, wrap, blocked, locked, ids, dues = row
            if wrap and key is not None:
                wrapped = True
            if head_key in seen:  # round the whole circle
                break
            key = last = head_key
            if first is None:
                first = key
            seen.add(key)
            if head_due > now:
                next_due = head_due if next_due is None else min(next_due, head_due)
            elif blocked or not locked:
                pass  # in flight before its head, or another instance is claiming this key
            else:
                ids = ids[:next((j for j, at in enumerate(dues) if at > now), len(ids))]
                if ids:
                    lanes_ids.append(ids)
                    taken += len(ids)
        if not lanes_ids:
            return ClaimedWindows([], last, next_due)
        cur.execute(_PG_TAKE, {"o": owner, "lu": now + lease_seconds, "now": now,
                               "ids": [i for lane in lanes_ids for i in lane]})
        return _windows(lanes_ids, cur.fetchall(), last, next_due)

    @staticmethod
    def _claimed_rows(conn: sa.Connection, ids: list[int]) -> list[ClaimedEntry]:
        return [_claimed_entry(r) for r in conn.execute(_CLAIMED, {"ids": list(ids)})]

    def complete_within(self, conn: sa.Connection, owner: str,
                        completions: list[Completion]) -> list[bool]:
        """Record outcomes inside the caller's transaction; an outcome is recorded only if its
        entry is still in flight under ``owner`` (a stale worker's outcome is dropped: False).
        One event per recorded outcome (none for a release); each recorded completion's
        follow-up messages are stored and queued, and its ``extra`` runs, in the same
        transaction."""
        if not completions:
            return []
        now = time.time()
        if not self._sqlite:
            return self._complete_pg(conn, owner, completions, now)
        live = {r.id: r for r in conn.execute(
            _LIVE_SQLITE,
            {"ids": [c.entry_id for c in completions], "o": owner})}
        live_cause = {i: r.message_id for i, r in live.items()}
        live_dest = {i: r.destination for i, r in live.items()}
        live_replay = {i: r.replay_of for i, r in live.items()}
        updates, releases, events, ok = [], [], [], []
        for c in completions:
            row = live.pop(c.entry_id, None)  # an id given twice is recorded once
            ok.append(row is not None)
            if row is None:
                continue
            if c.status == "released":
                releases.append({"id": c.entry_id, "o": owner, "now": now})
                continue
            if c.status not in COMPLETE_KIND:
                raise ValueError(f"complete(): invalid status {c.status!r}")
            nxt = c.next_attempt_at
            if c.status == "queued" and nxt is None:
                nxt = now
            updates.append({"s": c.status, "a": c.attempts, "n": nxt, "e": c.last_error,
                            "r": c.response, "p": c.payload, "now": now, "id": c.entry_id, "o": owner})
            events.append({"at": now, "kind": COMPLETE_KIND[c.status], "ch": row.channel,
                           "dest": row.destination, "mid": row.message_id, "eid": c.entry_id,
                           "detail": _event_detail(c, nxt)})
        if updates:
            # one row per delivered message: the driver's executemany, without SQLAlchemy's
            # per-row parameter handling (plain floats, ints, text and bytes here)
            cur = conn.connection.dbapi_connection.cursor()
            cur.executemany(_SQL_COMPLETE, updates)
            cur.executemany(_SQL_COMPLETE_EVENT, events)
        if releases:
            conn.execute(_RELEASE, releases)
        for c, recorded in zip(completions, ok):
            if recorded and c.status != "released":
                cause = (live_cause[c.entry_id], c.entry_id)
                for f in c.follow_ups:
                    self._insert_follow_up(conn, f, now, cause=cause)
                if c.extra is not None:
                    c.extra(conn)
                replay_of = live_replay[c.entry_id]
                if replay_of is not None and c.status != "queued":
                    self._resolve_replayed(conn, c.entry_id, live_cause[c.entry_id],
                                           live_dest[c.entry_id], now)
        return ok

    def _complete_pg(self, conn: sa.Connection, owner: str, completions: list[Completion],
                     now: float) -> list[bool]:
        """``complete_within`` on PostgreSQL: the group in one statement (``_PG_COMPLETE``), then
        what recorded outcomes bring with them (follow-ups, ``extra``, replay resolution)."""
        rows, first = [], {}
        for pos, c in enumerate(completions):
            if c.entry_id in first:
                continue  # an id given twice is recorded once (its first outcome)
            first[c.entry_id] = pos
            if c.status == "released":
                rows.append([c.entry_id, "queued", None, None, None, None, None, None, None, pos])
                continue
            nxt = c.next_attempt_at
            if c.status == "queued" and nxt is None:
                nxt = now
            kind = COMPLETE_KIND.get(c.status)
            rows.append([c.entry_id, c.status[:16], c.attempts, nxt, c.last_error,
                         None if c.response is None else bytes(c.response).hex(),
                         None if c.payload is None else bytes(c.payload).hex(),
                         kind or "?", _event_detail(c, nxt) if kind else "{}", pos])
        rows.sort(key=lambda r: r[0])  # rows locked in id order, as the claims lock them
        cur = conn.connection.dbapi_connection.cursor()
        cur.execute(_PG_COMPLETE, {"g": json.dumps(rows), "now": now, "o": owner})
        live = {r[0]: r for r in cur.fetchall()}
        ok = [first[c.entry_id] == pos and c.entry_id in live for pos, c in enumerate(completions)]
        for c, recorded in zip(completions, ok):
            if recorded and c.status != "released" and c.status not in COMPLETE_KIND:
                # an invalid status of a live entry: the caller's transaction is rolled back
                raise ValueError(f"complete(): invalid status {c.status!r}")
        for c, recorded in zip(completions, ok):
            if recorded and c.status != "released":
                _id, message_id, destination, replay_of = live[c.entry_id]
                for f in c.follow_ups:
                    self._insert_follow_up(conn, f, now, cause=(message_id, c.entry_id))
                if c.extra is not None:
                    c.extra(conn)
                if replay_of is not None and c.status != "queued":
                    self._resolve_replayed(conn, c.entry_id, message_id, destination, now)
        return ok

    def release_within(self, conn: sa.Connection, owner: str, entry_ids: list[int]) -> None:
        """Put entries claimed by ``owner`` back in the queue, untried (a worker stopping)."""
        if entry_ids:
            now = time.time()
            conn.execute(_RELEASE, [{"id": i, "o": owner, "now": now} for i in entry_ids])

    @staticmethod
    def _insert_follow_up(conn: sa.Connection, f: FollowUp, now: float, *, cause: tuple[int, int]) -> int:
        from hashlib import sha256

        mid = conn.execute(sa.text(
            "INSERT INTO messages (channel, received_at, sending_app, sending_facility, receiving_app, "
            "receiving_facility, message_type, control_id, version, charset, size, sha256, dedup_key, "
            "status, ack_code, ack, error_code, raw, flags) VALUES (:ch, :at, :sa, :sf, :ra, :rf, :mt, "
            ":cid, :v, :cs, :size, :sha, NULL, 'routed', '', :ack, NULL, :raw, NULL) RETURNING id"),
            {"ch": f.channel, "at": now, "sa": f.sending_app, "sf": f.sending_facility,
             "ra": f.receiving_app, "rf": f.receiving_facility, "mt": f.message_type,
             "cid": f.control_id, "v": f.version, "cs": f.charset, "size": len(f.raw),
             "sha": sha256(f.raw).hexdigest(), "ack": b"", "raw": f.raw}).scalar_one()
        conn.execute(sa.text(
            f"INSERT INTO queue_entries ({ENTRY_COLS}) VALUES (:m, :d, :r, 'queued', '', '[]', 0, "
            ":at, :at, :at, '', NULL, NULL, NULL)"), {"m": mid, "d": f.destination, "r": f.route, "at": now})
        conn.execute(sa.text(
            f"INSERT INTO events ({EVENT_COLS}) VALUES (:at, 'generated', :ch, :d, :mid, NULL, :detail)"),
            {"at": now, "ch": f.channel, "d": f.destination, "mid": mid,
             "detail": json.dumps({"message_type": f.message_type, "cause_message_id": cause[0],
                                   "cause_entry_id": cause[1]})})
        return mid

    # -- documents: chain keys and deletions (inside a writer op's transaction) ---------------
    @staticmethod
    def document_chain_key(conn: sa.Connection, doc_ids: list[str]) -> str | None:
        """The ``doc_key`` of the latest entry that carried one of these (hashed) document ids:
        a replacement or a deletion joins the chain of the document it names."""
        if not doc_ids:
            return None
        return conn.execute(
            sa.text("SELECT doc_key FROM queue_entries WHERE doc_id IN :ids AND doc_key IS NOT NULL "
                    "ORDER BY id DESC LIMIT 1").bindparams(sa.bindparam("ids", expanding=True)),
            {"ids": list(doc_ids)}).scalar()

    def cancel_for_deletion(self, conn: sa.Connection, message_id: int) -> int:
        """A deletion (``action = 'delete'``) just stored as ``message_id``: for each of its
        entries, the earlier entries of the same document, destination and target that were not
        sent (queued, or parked in error) are cancelled; if nothing of that document was ever
        sent there (nor is in flight), the deletion is cancelled too: there is nothing to
        delete at the receiver. Returns the number of entries cancelled."""
        now = time.time()
        mine = conn.execute(sa.text(
            "SELECT id, destination, target, doc_key FROM queue_entries "
            "WHERE message_id = :m AND action = 'delete' AND doc_key IS NOT NULL"),
            {"m": message_id}).mappings().all()
        cancelled: list[tuple[int, int, str]] = []  # (entry id, message id, destination)
        for e in mine:
            earlier = conn.execute(sa.text(
                "SELECT id, message_id, status FROM queue_entries WHERE destination = :d "
                "AND doc_key = :k AND target = :t AND id < :id"),
                {"d": e["destination"], "k": e["doc_key"], "t": e["target"], "id": e["id"]}).all()
            unsent = [(r.id, r.message_id) for r in earlier if r.status in ("queued", "error")]
            reached = any(r.status in ("sent", "in_flight") for r in earlier)
            if not unsent:
                continue
            ids = [i for i, _m in unsent]
            if not reached:
                ids.append(e["id"])
                unsent.append((e["id"], message_id))
            conn.execute(
                sa.text("UPDATE queue_entries SET status = 'cancelled', updated_at = :now, "
                        "last_error = :why WHERE id IN :ids AND status IN ('queued', 'error')")
                .bindparams(sa.bindparam("ids", expanding=True)),
                {"now": now, "ids": ids, "why": f"cancelled by the deletion in message {message_id}"})
            cancelled.extend((i, m, e["destination"]) for i, m in unsent)
        if cancelled:
            conn.execute(
                sa.text(f"INSERT INTO events ({EVENT_COLS}) SELECT :at, 'cancelled', m.channel, :dest, "
                        "m.id, :eid, :detail FROM messages m WHERE m.id = :mid"),
                [{"at": now, "dest": d, "mid": m, "eid": i,
                  "detail": json.dumps({"deletion_message_id": message_id})} for i, m, d in cancelled])
        return len(cancelled)

    def release(self, entry_id: int, owner: str) -> None:
        with self._write_tx() as conn:
            self.release_within(conn, owner, [entry_id])

    def next_due_at(self, destination: str) -> float | None:
        """Earliest ``next_attempt_at`` among the claimable heads (queued, first of their
        order_key): entries blocked behind an in-flight or waiting head do not count."""
        with self._read() as conn:
            return conn.execute(sa.text(
                "SELECT min(q.next_attempt_at) FROM queue_entries q JOIN ("
                "  SELECT min(id) AS hid FROM queue_entries"
                "  WHERE destination = :d AND status IN ('queued', 'in_flight')"
                "  GROUP BY order_key) h ON q.id = h.hid WHERE q.status = 'queued'"),
                {"d": destination}).scalar()

    def replay(self, message_ids: list[int], destinations: "list[str] | None" = None, *,
               report: "list[ReplayedTarget] | None" = None) -> dict[int, int]:
        """Queue again the delivery targets of these messages; returns the new entries per message.

        Which targets: those of ``destinations`` when named (whatever their last state: the
        operator asks for a new delivery), else those whose latest entry ended in ``error``. A
        target that still has a live entry (queued or in flight) is never given a second one:
        the receiver would get the message twice. Each new entry links to the entry it replays
        (``replay_of``). ``report`` (a list), when given, receives one :class:`ReplayedTarget` per
        target considered, replayed or skipped with the reason. A named destination the message
        was never routed to raises :class:`ValueError`; an unknown id :class:`UnknownMessage`.
        """
        ids = list(dict.fromkeys(int(i) for i in message_ids))
        if not ids:
            return {}
        wanted = list(dict.fromkeys(destinations)) if destinations else None
        now = time.time()
        expand = sa.bindparam("ids", expanding=True)
        # two replays of one message at once must not both find no live entry: on PostgreSQL
        # the message rows are locked (nothing on the ingest or delivery path locks them); on
        # SQLite the write transaction already holds the database lock
        lock = "" if self._sqlite else " FOR UPDATE"
        with self._write_tx() as conn:
            chans = dict(conn.execute(
                sa.text(f"SELECT id, channel FROM messages WHERE id IN :ids ORDER BY id{lock}").bindparams(expand),
                {"ids": ids}).all())
            missing = [i for i in ids if i not in chans]
            if missing:
                raise UnknownMessage(f"unknown message id(s): {missing}")
            emptied = conn.execute(sa.text(
                "SELECT id FROM messages WHERE id IN :ids AND flags LIKE '%payload_pruned%'").bindparams(expand),
                {"ids": ids}).scalars().all()
            if emptied:  # retention removed the bytes: there is nothing left to send
                raise ValueError(f"message(s) {', '.join(map(str, emptied))}: payload pruned by retention, "
                                 "nothing to replay")
            # the latest entry of each (destination, target), and whether any entry of it is live
            latest = conn.execute(sa.text(
                "SELECT e.id, e.message_id, e.destination, e.route, e.order_key, e.transforms, "
                "e.target, e.doc_key, e.doc_id, e.action, e.status, (SELECT count(*) FROM queue_entries l "
                "  WHERE l.message_id = e.message_id AND l.destination = e.destination "
                "  AND l.target = e.target AND l.status IN ('queued', 'in_flight')) AS live "
                "FROM queue_entries e WHERE e.id IN ("
                "  SELECT max(id) FROM queue_entries WHERE message_id IN :ids "
                "  GROUP BY message_id, destination, target) ORDER BY e.id").bindparams(expand),
                {"ids": ids}).mappings().all()
            if wanted:
                for i in ids:
                    known = {r["destination"] for r in latest if r["message_id"] == i}
                    unknown = [d for d in wanted if d not in known]
                    if unknown:
                        raise ValueError(f"message {i} was never routed to {', '.join(unknown)}"
                                         f" (its destinations: {', '.join(sorted(known)) or 'none'})")
            counts = {i: 0 for i in ids}
            rows, done = [], []
            for r in latest:
                if wanted is not None and r["destination"] not in wanted:
                    continue
                if wanted is None and r["status"] != "error":
                    continue
                target = ReplayedTarget(r["message_id"], r["destination"], r["target"], r["id"])
                if r["live"]:
                    target.skipped = f"still {r['status']}" if r["status"] in ("queued", "in_flight") \
                        else "an entry is still waiting"
                    done.append(target)
                    continue
                counts[r["message_id"]] += 1
                spec = EntrySpec(r["destination"], r["route"], r["order_key"], r["transforms"],
                                 r["target"], 0.0, r["doc_key"], r["doc_id"], r["action"])
                row = dict(zip(ENTRY_KEYS, entry_row(r["message_id"], spec, now)))
                row["replay_of"] = r["id"]
                target.entry_id = conn.execute(sa.text(
                    f"INSERT INTO queue_entries ({ENTRY_COLS}, replay_of) VALUES "
                    f"({', '.join(':' + k for k in ENTRY_KEYS)}, :replay_of) RETURNING id"), row).scalar_one()
                done.append(target)
            for i in ids:
                mine = [t for t in done if t.message_id == i]
                self._event(conn, "replay", channel=chans[i], message_id=i, at=now, detail={
                    "entries": counts[i],
                    "replayed": [[t.destination, t.target, t.replay_of, t.entry_id]
                                 for t in mine if t.entry_id is not None],
                    "skipped": [[t.destination, t.target, t.skipped] for t in mine if t.skipped]})
        if report is not None:
            report.extend(done)
        return counts

    def mark_handled(self, message_id: int, destination: str, target: str | None = None) -> int:
        """An operator dealt with the errors of this message at ``destination`` (or one target of
        it): its entries in ``error`` stop counting as current errors (status ``resolved``, an
        event ``handled`` keeps the history). Returns how many entries changed; 0 when none
        was in error. Unknown message: :class:`UnknownMessage`."""
        now = time.time()
        with self._write_tx() as conn:
            channel = conn.execute(sa.text("SELECT channel FROM messages WHERE id = :m"),
                                   {"m": int(message_id)}).scalar()
            if channel is None:
                raise UnknownMessage(f"unknown message id(s): [{message_id}]")
            one_target = " AND target = :t" if target is not None else ""
            rows = conn.execute(sa.text(
                "UPDATE queue_entries SET status = 'resolved', updated_at = :now "
                f"WHERE message_id = :m AND destination = :d AND status = 'error'{one_target} RETURNING id"),
                {"now": now, "m": int(message_id), "d": destination, "t": target}).scalars().all()
            for eid in rows:
                self._event(conn, "handled", channel=channel, destination=destination,
                            message_id=int(message_id), entry_id=eid, at=now, detail={"by": "operator"})
        return len(rows)

    @staticmethod
    def _resolve_replayed(conn: sa.Connection, entry_id: int, message_id: int, destination: str,
                          now: float) -> None:
        """A replay entry reached a final state: the earlier entries of its target still in
        ``error`` are history now (status ``resolved``), so the destination's current counts
        drop them; the events keep what happened."""
        ids = conn.execute(sa.text(
            "UPDATE queue_entries SET status = 'resolved', updated_at = :now "
            "WHERE message_id = :m AND destination = :d AND status = 'error' AND id < :id "
            "AND target = (SELECT target FROM queue_entries WHERE id = :id) RETURNING id"),
            {"now": now, "m": message_id, "d": destination, "id": entry_id}).scalars().all()
        if ids:
            conn.execute(
                sa.text(f"INSERT INTO events ({EVENT_COLS}) SELECT :at, 'resolved', m.channel, :dest, "
                        "m.id, :eid, :detail FROM messages m WHERE m.id = :mid"),
                [{"at": now, "dest": destination, "mid": message_id, "eid": i,
                  "detail": json.dumps({"by_entry": entry_id})} for i in ids])
