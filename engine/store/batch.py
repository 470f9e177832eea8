"""Writing one batch of ingest records: duplicate decisions and the inserts, per back end.
"""
from __future__ import annotations

import hashlib
import json
import time

import sqlalchemy as sa


from .models import (
    Duplicate,
    IngestRecord,
    IngestResult,
    Stored,
)
from .sql import (
    E_DETAIL,
    E_MESSAGE_ID,
    M_ACK,
    M_DEDUP_KEY,
    M_ID,
    M_RAW,
    M_RECEIVED_AT,
    M_SHA256,
    PG_FAST,
    PG_INSERT_ALL,
    ack_code_of,
    entry_row,
)

from .writer import PG_ID_BLOCK, Job


class BatchMixin:
    """Ingest rows of :class:`engine.store.Store`, inside the writer's transaction."""

    def ingest_within(self, conn: sa.Connection, records: list[IngestRecord]) -> list[IngestResult]:
        """Ingest ``records`` inside the caller's open transaction (a ``submit`` op).

        For channels whose ACK depends on work done in the same transaction as the message
        insert (the identity feed applies the ADT to the registry before answering): the op
        calls this, then does its work, and the whole is committed once by the writer.
        """
        raw = conn.connection.driver_connection
        return self._ingest(raw, [Job(records, None, None)])[0]

    def _alloc_ids(self, cur, n: int) -> list[int]:
        if self._sqlite:
            cur.execute("SELECT max(id) FROM messages")
            start = (cur.fetchone()[0] or 0) + 1
            return list(range(start, start + n))
        pool = self._id_pool
        if len(pool) < n:
            if self._sql_nextval is None:
                cur.execute("SELECT pg_get_serial_sequence('messages', 'id')")
                seq = cur.fetchone()[0]
                self._sql_nextval = f"SELECT nextval('{seq}') FROM generate_series(1, %s)"
            cur.execute(self._sql_nextval, (max(PG_ID_BLOCK, n - len(pool)),))
            pool.extend(r[0] for r in cur.fetchall())
        return [pool.popleft() for _ in range(n)]

    def _ingest_pg_fast(self, raw, jobs: list[Job], *, autocommit: bool = True) -> list[list[IngestResult]]:
        """PostgreSQL, autocommit: one statement for the common case (no duplicates); records
        whose key exists (or repeats inside the batch) are then handled by ``_ingest`` in a
        regular transaction. If that second pass fails, every callback gets the exception even
        though the first pass is committed: a resend is then answered as a duplicate with the
        stored ACK, which is the outcome the sender would have had.

        ``autocommit=False``: inside the caller's open transaction (a batch with step ops), both
        passes in it, nothing committed here."""
        cur = raw.cursor()
        now = time.time()
        window = self.dedup_window_seconds
        sha256 = hashlib.sha256
        results: list[list] = [[None] * len(job.records) for job in jobs]
        first: list = []      # (j, i, rec, row)
        deferred: list = []   # (j, i, rec)
        seen: set = set()
        msg_rows = []
        entry_rows = []
        for j, job in enumerate(jobs):
            for i, rec in enumerate(job.records):
                if rec.dedup:
                    key = f"{rec.sending_app}|{rec.sending_facility}|{rec.control_id}"
                    if key in seen:
                        deferred.append((j, i, rec))
                        continue
                    seen.add(key)
                else:
                    key = None
                row = [None, rec.channel, rec.received_at, rec.sending_app, rec.sending_facility,
                       rec.receiving_app, rec.receiving_facility, rec.message_type,
                       rec.control_id, rec.version, rec.charset, len(rec.raw),
                       sha256(rec.raw).hexdigest(), key, rec.status, rec.ack_code, rec.ack.hex(),
                       rec.error_code, rec.raw.hex(), rec.flags]
                msg_rows.append(row)
                first.append((j, i, rec, row))
        if msg_rows:
            ids = self._alloc_ids(cur, len(msg_rows))
            for mid, (j, i, rec, row) in zip(ids, first):
                row[M_ID] = mid
                for e in rec.entries:
                    entry_rows.append(entry_row(mid, e, now))
            dumps = json.dumps
            self._phase_commit = autocommit
            cur.execute(PG_FAST, {"w": window, "m": dumps(msg_rows),
                                   "e": dumps(entry_rows)})
            inserted = {r[0] for r in cur.fetchall()}
            self._phase_commit = False
            for j, i, rec, row in first:
                if row[M_ID] in inserted:
                    results[j][i] = Stored(row[M_ID])
                else:
                    deferred.append((j, i, rec))
        if deferred:
            deferred.sort(key=lambda t: (t[0], t[1]))
            pseudo = Job([t[2] for t in deferred], None, None)
            if not autocommit:
                for (j, i, _rec), res in zip(deferred, self._ingest(raw, [pseudo])[0]):
                    results[j][i] = res
                return results
            raw.autocommit = False
            try:
                self._phase_commit = False
                out = self._ingest(raw, [pseudo])[0]
                self._phase_commit = True
                raw.commit()
            except BaseException:
                # the first pass is committed: never retry the batch (its records would come
                # back as duplicates of themselves); fail every callback instead
                self._phase_commit = True
                try:
                    raw.rollback()
                except Exception:  # noqa: BLE001
                    pass
                raise
            for (j, i, _rec), res in zip(deferred, out):
                results[j][i] = res
        return results

    def _ingest(self, raw, jobs: list[Job]) -> list[list[IngestResult]]:
        """Write the records of ``jobs`` (inside the open transaction); return per-job results."""
        cur = raw.cursor()
        now = time.time()
        window = self.dedup_window_seconds
        sha256 = hashlib.sha256

        # pass 1: hashes, keys
        prepared = []  # (job_index, record, sha, key)
        keys = set()
        min_at = None
        for j, job in enumerate(jobs):
            for rec in job.records:
                if rec.dedup:
                    key = f"{rec.sending_app}|{rec.sending_facility}|{rec.control_id}"
                    keys.add(key)
                    if min_at is None or rec.received_at < min_at:
                        min_at = rec.received_at
                else:
                    key = None
                prepared.append((j, rec, sha256(rec.raw).hexdigest(), key))

        # one dedup lookup for the batch
        found: dict[str, list] = {}
        if keys:
            cutoff = min_at - window
            if self._sqlite:
                klist = list(keys)
                for k in range(0, len(klist), 500):
                    chunk = klist[k:k + 500]
                    cur.execute(
                        "SELECT d.dedup_key, m.id, m.sha256, m.received_at, m.ack "
                        "FROM dedup_index d JOIN messages m ON m.id = d.message_id "
                        f"WHERE d.dedup_key IN ({','.join('?' * len(chunk))}) "
                        "AND d.received_at >= ?", (*chunk, cutoff))
                    for row in sorted(cur.fetchall(), key=lambda r: r[1]):
                        found.setdefault(row[0], []).append(row[1:])
                # then the keys not merged yet: committed, then this transaction's (ids grow)
                for held in (self._recent_keys, self._staged_keys):
                    if held:
                        for key in keys:
                            entries = held.get(key)
                            if entries:
                                found.setdefault(key, []).extend(entries)
            else:
                # prepare=False: a generic plan of "= ANY($1)" may pick a sequential scan
                cur.execute(
                    "SELECT dedup_key, id, sha256, received_at, ack FROM messages "
                    "WHERE dedup_key = ANY(%s::text[]) AND received_at >= %s",
                    (list(keys), cutoff), prepare=False)
                for row in sorted(cur.fetchall(), key=lambda r: r[1]):
                    found.setdefault(row[0], []).append(
                        (row[1], row[2], row[3], bytes(row[4])))

        results: list[list[IngestResult]] = [[] for _ in jobs]
        msg_rows = []
        entry_rows = []
        event_rows = []
        pending_ids: list = []  # message rows whose id is allocated after the loop
        for j, rec, sha, key in prepared:
            status = rec.status
            ack = rec.ack
            ack_code = rec.ack_code
            error_code = rec.error_code
            conflict_of = None
            if key is not None:
                cands = found.get(key)
                if cands:
                    lo = rec.received_at - window
                    hi = rec.received_at + window
                    cands = [c for c in cands if lo <= c[2] <= hi]
                if cands:
                    same = None
                    for c in cands:
                        if c[1] == sha:
                            same = c
                            break
                    if same is not None:
                        results[j].append(Duplicate(same[0], same[3], True, None))
                        event_rows.append([now, "duplicate", rec.channel, None, same[0], None,
                                           {"control_id": rec.control_id}])
                        continue
                    conflict_of = cands[-1][0]
                    if rec.conflict_ack is not None:
                        status = "conflict"
                        ack = rec.conflict_ack()
                        ack_code = ack_code_of(ack)
                        error_code = "205"
            row = [None, rec.channel, rec.received_at, rec.sending_app, rec.sending_facility,
                   rec.receiving_app, rec.receiving_facility, rec.message_type, rec.control_id,
                   rec.version, rec.charset, len(rec.raw), sha, key, status, ack_code, ack,
                   error_code, rec.raw, rec.flags]
            msg_rows.append(row)
            res_list = results[j]
            if status == "conflict":
                res = Duplicate(conflict_of, ack, False, None)
                pending_ids.append((row, res, None))
                event_rows.append([now, "duplicate_conflict", rec.channel, None, row,
                                   None, {"original_id": conflict_of,
                                          "control_id": rec.control_id}])
            else:
                res = Stored(0)
                pending_ids.append((row, res, rec.entries))
                if conflict_of is not None:
                    event_rows.append([now, "duplicate_conflict", rec.channel, None, row, None,
                                       {"original_id": conflict_of, "accepted": True,
                                        "control_id": rec.control_id}])
            res_list.append(res)
            if key is not None:
                found.setdefault(key, []).append((row, sha, rec.received_at, ack))

        if msg_rows:
            ids = self._alloc_ids(cur, len(msg_rows))
            # SQLite: this transaction's keys, held once it commits (see _keys_committed)
            staged = self._staged_keys if self._sqlite else None
            for mid, (row, res, entries) in zip(ids, pending_ids):
                row[M_ID] = mid
                res.message_id = mid
                if entries:
                    for e in entries:
                        entry_rows.append(entry_row(mid, e, now))
                if staged is not None and row[M_DEDUP_KEY] is not None:
                    staged.setdefault(row[M_DEDUP_KEY], []).append(
                        (mid, row[M_SHA256], row[M_RECEIVED_AT], row[M_ACK]))
                    self._staged_n += 1
            # references to rows of this batch (in-batch duplicates) become ids
            for res_list in results:
                for res in res_list:
                    if type(res) is Duplicate and type(res.original_id) is list:
                        res.original_id = res.original_id[0]
        for ev in event_rows:
            if type(ev[E_MESSAGE_ID]) is list:
                ev[E_MESSAGE_ID] = ev[E_MESSAGE_ID][0]
            d = ev[E_DETAIL]
            if type(d.get("original_id")) is list:
                d["original_id"] = d["original_id"][0]
            ev[E_DETAIL] = json.dumps(d)
        if self._sqlite:
            if msg_rows:
                cur.executemany(self._sql_ins_msg, msg_rows)
            if entry_rows:
                cur.executemany(self._sql_ins_entry, entry_rows)
            if event_rows:
                cur.executemany(self._sql_ins_event, event_rows)
        elif msg_rows or event_rows:
            for r in msg_rows:
                r[M_ACK] = r[M_ACK].hex()
                r[M_RAW] = r[M_RAW].hex()
            dumps = json.dumps
            cur.execute(PG_INSERT_ALL, {"m": dumps(msg_rows), "e": dumps(entry_rows),
                                         "v": dumps(event_rows)})
        return results
