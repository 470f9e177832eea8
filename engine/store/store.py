"""The durable store: group-commit writer thread, claims, stats (SQLAlchemy only, no Twisted).

Durability contract: a callback of ``submit_ingest``/``submit`` runs only after the COMMIT holding
its rows returned; if the transaction failed, every callback of it gets the exception.

Writer (hot path)
    One dedicated thread owns one connection. It sleeps until work is queued, drains *everything*
    queued (while the previous COMMIT ran, producers kept queueing) and writes it in ONE
    transaction, then runs the callbacks. After the callbacks it lingers at most
    min(1 ms, the last transaction's time) until as many RECORDS as it just served plus those
    queued at COMMIT time are queued: the producers it just answered resubmit within a round
    trip, so the two halves of the closed-loop producers merge into one commit instead of
    alternating in half-size batches. The count is in records, not jobs: the engine submits one
    job per reactor turn holding several records (measured at 8 connections: 4.0 records per
    commit without linger, 4.8 with the former job-counted 0.5 ms linger, 6.1 with this one;
    +20 % msg/s). ``MINIPFI_WRITER_LINGER_S`` / ``MINIPFI_WRITER_LINGER_FACTOR`` tune it (0
    disables). Counters (``batches``, ``batched_records``, ``busy_s``, ``linger_s``) are
    logged when the writer stops.

    * SQLite: ``BEGIN IMMEDIATE``, one dedup lookup (``IN``) for the batch (see "Duplicate
      keys on SQLite"), message ids from ``max(id)`` read inside the write-locked transaction,
      ``executemany`` on the sqlite3 cursor, COMMIT.
    * PostgreSQL: message ids come from blocks of 1024 ``nextval`` values. The common case is
      ONE statement in autocommit mode (atomic by itself, its COMMIT included): a CTE inserting
      the messages whose dedup key does not exist within the window (correlated ``NOT EXISTS``
      on the (dedup_key, received_at) index), their queue entries, and returning the inserted
      ids; rows are passed as one JSON parameter (psycopg's Python-level array dumping cost
      more than the commit). Records whose key existed, and repeats of a key inside the batch,
      then go through the complete path (lookup + duplicate/conflict decisions + inserts) in a
      regular transaction. If that second pass fails, every callback of the batch gets the
      exception although the first pass is committed; a resend is then answered as a duplicate
      with the stored ACK, which is what the sender would have got.

    Failure: a database-level error (connection lost, database locked or read-only, failed
    COMMIT) fails every callback of the batch, sets ``writer_healthy`` False and drops the
    connection; the next batch reconnects. A non-database error raised by one job (a generic op
    raising, an integrity error) makes the writer retry the batch's jobs one transaction each,
    so only the offending job fails.

Duplicate keys on SQLite
    A commit rewrites every B-tree page it touches into the WAL, and an index ordered by
    (MSH-3, MSH-4, MSH-10) is touched at one place per sender: 8 senders with their own
    control-id sequences cost 8 leaves (about 40 % of a commit's WAL frames, measured 47.3
    against 29.7 ``pwrite`` per 8-record commit). So ``messages`` has no key index on SQLite
    (migration 0005). The writer holds the keys of the messages written since the last merge
    in memory (key -> id, sha256, received time, ACK), and once ``DEDUP_MERGE_AT`` are held it
    writes them all, sorted, into the ``dedup_index`` table (WITHOUT ROWID, ordered by key)
    inside the transaction of that batch, with ``store_meta.dedup_merged_to`` = the last id
    merged: one merge writes each touched leaf once for many keys. A lookup reads
    ``dedup_index`` (joined to ``messages`` for the hash and the stored ACK), then the held keys,
    then those of the open transaction (ids grow in that order). The held keys are only what
    is committed: a transaction's keys join them after its COMMIT, and a new writer connection
    (start, reconnection) reads them back from ``messages.dedup_key`` above the mark, so a
    crash loses nothing. Memory: at most ``DEDUP_MERGE_AT`` (512) keys plus a batch. Measured
    at 8 connections: the writer's batch 0.75-1.12 -> 0.65-0.86 ms, +6-10 % msg/s in paired
    runs.
    PostgreSQL logs row changes, not pages: it keeps ``ix_messages_dedup``.

SQLite settings (every connection): ``journal_mode=WAL``, ``synchronous=FULL`` (a COMMIT is on disk
when it returns), ``busy_timeout=10000``, ``foreign_keys=ON``, ``journal_size_limit=64 MiB``,
``page_size=4096`` for new files: with 8 KiB pages the 8-producer benchmark was about 10 % slower
(more WAL bytes per small commit); 64 KiB pages tripled the commit time of small messages, so
large (200 KB) ORU messages are not optimised at their expense.
Checkpoints: the writer connection runs with ``wal_autocheckpoint=0`` (an automatic checkpoint
runs inside the COMMIT, i.e. before the callbacks, and was the p99 source) and checkpoints
(PASSIVE) itself after its callbacks once about 48 MiB went into the WAL, or when idle for 0.5 s
after writing. Other connections keep SQLite's default autocheckpoint. The WAL volume is
estimated from what a commit writes: whole pages, so a small message costs its bytes plus about
one page (its share of the table, queue and index pages) and each commit about four more (page
1, the queue table's and indexes' last leaves). Measured for a commit of 8 ADTs from 8 senders:
22.6 WAL frames while ``messages`` had the dedup index (8 of its leaves per commit), about 11
since migration 0005; the estimate (about 59 KB) stays above what is written. Counting only
the message bytes (as before) let the WAL grow to about 150 MB between checkpoints, past
``journal_size_limit``: SQLite then truncates it at each restart and every commit appends to a
growing file, whose ``fdatasync`` also has to journal the new size (measured
on this VM: 0.42 ms per 8-message commit appending, 0.24-0.34 ms overwriting a WAL kept below
the limit; 0.56 against 0.47 ms per batch, checkpoints included). 48 MiB rather than 16: a
checkpoint stalls the writer for a few milliseconds, and at 13k msg/s a 16 MiB WAL is
checkpointed about 8 times a second, enough stalls to show in the p99 (32 connections: 9.4-10.7
ms at 16 MiB, 4.1-5.5 ms at 48 MiB; same throughput).

Sync API (claims, completion, replay, reads) uses the pooled engine from the calling thread; on
SQLite write transactions there start with ``BEGIN IMMEDIATE``, reads with a deferred ``BEGIN``.
Claims on PostgreSQL lock the head rows with ``FOR UPDATE SKIP LOCKED``.
"""
from __future__ import annotations

import hashlib
import json
import sys
import logging
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

from engine.logs import error_text

from .schema import submissions
from .models import (
    ClaimedEntry,
    Duplicate,
    EntryRow,
    EntrySpec,
    IngestRecord,
    IngestResult,
    MessageRow,
    MessageSummary,
    Stored,
    UnknownMessage,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_PAGE_SIZE = 4096
SQLITE_BUSY_TIMEOUT_MS = 10000
WRITER_WAL_AUTOCHECKPOINT = 0
CHECKPOINT_IDLE_S = 0.5
CHECKPOINT_FORCE_BYTES = 48 * 1024 * 1024  # estimated WAL bytes (below JOURNAL_SIZE_LIMIT)
WAL_PAGES_PER_RECORD = 1
WAL_PAGES_PER_COMMIT = 4
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
PG_ID_BLOCK = 1024
# SQLite: keys held in memory before they are written into dedup_index, in the transaction of
# the batch that reaches the count. A merge writes about two leaves per sender, whatever the
# count, so it must hold many keys per sender (a leaf holds about 60); 512 keys took 1.7 ms and
# 2,048 took 6.9 ms (writer alone, 8 senders): one merge per 64 commits of 8 records, short
# enough to stay out of the ACK p99 also at 32 connections (one per about 20 commits).
DEDUP_MERGE_AT = 512
WRITER_LINGER_MAX_S = float(os.environ.get("MINIPFI_WRITER_LINGER_S", "0.001"))
WRITER_LINGER_FACTOR = float(os.environ.get("MINIPFI_WRITER_LINGER_FACTOR", "1.0"))

_MSG_COLS = (
    "id, channel, received_at, sending_app, sending_facility, receiving_app, receiving_facility, "
    "message_type, control_id, version, charset, size, sha256, dedup_key, status, ack_code, ack, "
    "error_code, raw, flags"
)
_ENTRY_COLS = (
    "message_id, destination, route, status, order_key, transforms, attempts, next_attempt_at, "
    "created_at, updated_at, target, doc_key, doc_id, action"
)
_ENTRY_KEYS = tuple(c.strip() for c in _ENTRY_COLS.split(","))
_EVENT_COLS = "at, kind, channel, destination, message_id, entry_id, detail"


def _pg_json_insert(table: str, cols: str, types: str) -> str:
    """``INSERT … SELECT`` from ONE json parameter (an array of row arrays, bytea as hex): a
    constant, cached, server-side prepared statement whatever the batch size, and the client
    side is a single C-accelerated ``json.dumps`` (psycopg's Python-level array dumping cost
    more than the whole commit)."""
    exprs = []
    for i, t in enumerate(types.split()):
        if t == "bytea":
            exprs.append(f"decode(r->>{i}, 'hex')")
        else:
            exprs.append(f"(r->>{i})::{t}")
    return (f"INSERT INTO {table} ({cols}) SELECT {', '.join(exprs)} "
            "FROM jsonb_array_elements(%s::jsonb) AS r")


_PG_INSERT = {
    "messages": _pg_json_insert("messages", _MSG_COLS, "int8 text float8 text text text text text "
                                "text text text int4 text text text text bytea text bytea text"),
    "queue_entries": _pg_json_insert("queue_entries", _ENTRY_COLS,
                                     "int8 text text text text text int4 float8 float8 float8 "
                                     "text text text text"),
    "events": _pg_json_insert("events", _EVENT_COLS, "float8 text text text int8 int8 text"),
}
# messages, their queue entries and events in ONE statement (one round trip); the foreign key
# check of queue_entries runs at the end of the statement and sees the new messages.
_PG_INSERT_ALL = (
    "WITH m AS (" + _PG_INSERT["messages"].replace("%s", "%(m)s") + "), "
    "v AS (" + _PG_INSERT["events"].replace("%s", "%(v)s") + ") "
    + _PG_INSERT["queue_entries"].replace("%s", "%(e)s")
)

# PostgreSQL hot path, ONE statement = one round trip, atomic by itself (autocommit): insert the
# batch's messages except those whose dedup key already exists within the window (those, and
# repeats of a key inside the batch, go to a second, complete pass), their entries, and return
# the ids actually inserted.
# The lookup is a correlated NOT EXISTS on (dedup_key, received_at): its plan is an index probe
# even as a generic prepared plan (an "= ANY($1)" lookup is not: it degraded to 190 ms).
_PG_FAST = (
    "WITH m AS (" + _PG_INSERT["messages"].replace("%s", "%(m)s")
    + " WHERE r->>13 IS NULL OR NOT EXISTS (SELECT 1 FROM messages x "
    "  WHERE x.dedup_key = r->>13 "
    "  AND x.received_at BETWEEN (r->>2)::float8 - %(w)s AND (r->>2)::float8 + %(w)s) "
    "  RETURNING id), "
    "e AS (" + _PG_INSERT["queue_entries"].replace("%s", "%(e)s")
    + " WHERE (r->>0)::int8 IN (SELECT id FROM m)) "
    "SELECT id FROM m"
)

_COMPLETE_KIND = {"sent": "sent", "error": "error", "queued": "retry", "filtered": "filtered"}

_DB_LEVEL_NAMES = ("OperationalError", "InterfaceError")


def _is_db_level(exc: BaseException) -> bool:
    """Connection/lock/IO level errors: the whole batch fails, the connection is dropped."""
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return True
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return type(exc).__name__ in _DB_LEVEL_NAMES or any(
        c.__name__ in _DB_LEVEL_NAMES for c in type(exc).__mro__
    )


def _entry_row(mid, e, now: float) -> tuple:
    """The queue_entries row of one EntrySpec (column order of ``_ENTRY_COLS``); a held
    destination's entry is first due ``hold`` seconds after reception."""
    due = now + e.hold if e.hold else now
    return (mid, e.destination, e.route, "queued", e.order_key, e.transforms, 0, due, now, now,
            e.target, e.doc_key, e.doc_id, e.action)


def _ack_code_of(ack: bytes) -> str:
    """MSA-1 of an ACK built by the caller ('' if not found)."""
    i = ack.find(b"MSA")
    if i < 0 or len(ack) < i + 6:
        return ""
    sep = ack[i + 3:i + 4]
    return ack[i + 4:].split(sep, 1)[0].split(b"\r", 1)[0][:8].decode("ascii", "replace")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


class _Job:
    __slots__ = ("records", "op", "callback")

    def __init__(self, records, op, callback):
        self.records = records
        self.op = op
        self.callback = callback


class _BatchFailed(Exception):
    def __init__(self, exc: BaseException, db_level: bool):
        super().__init__(str(exc))
        self.exc = exc
        self.db_level = db_level


class Store:
    def __init__(self, url: str, *, dedup_window_seconds: float = 7 * 86400, pool_size: int = 5):
        self.url = url
        self.dedup_window_seconds = float(dedup_window_seconds)
        u = sa.engine.make_url(url)
        self.dialect = u.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database backend {self.dialect!r}")
        self._sqlite = self.dialect == "sqlite"
        if self._sqlite:
            db = u.database
            if db and db != ":memory:" and not db.startswith("file:"):
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(url, pool_size=pool_size, max_overflow=10)
            event.listen(self.engine, "connect", self._sqlite_on_connect)
            event.listen(self.engine, "begin", self._sqlite_on_begin)
            self._ph = "?"
        else:
            self.engine = sa.create_engine(url, pool_size=pool_size, max_overflow=10,
                                           pool_pre_ping=True)
            self._ph = "%s"
        self._wengine = self.engine.execution_options(minipfi_write=True)
        ph = self._ph
        self._sql_ins_msg = f"INSERT INTO messages ({_MSG_COLS}) VALUES ({', '.join([ph] * 20)})"
        self._sql_ins_entry = (
            f"INSERT INTO queue_entries ({_ENTRY_COLS}) VALUES ({', '.join([ph] * 14)})"
        )
        self._sql_ins_event = f"INSERT INTO events ({_EVENT_COLS}) VALUES ({', '.join([ph] * 7)})"
        self._sql_nextval: str | None = None

        # writer state
        self._queue: deque[_Job] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._wconn: sa.Connection | None = None
        self._id_pool: deque[int] = deque()
        self._phase_commit = False
        self._queued_at_commit = 0
        self._linger_target: int | None = None  # set while lingering: submits wake only at it
        # Called in the writer thread after all the callbacks of a transaction (and after a
        # refused submit's callback): lets a consumer hand the results of one commit over to
        # another thread in ONE wake-up (engine.ingest.IngestBatcher).
        self.after_batch: Callable[[], None] | None = None
        self._ckpt_bytes = 0
        # SQLite duplicate keys not yet in dedup_index (see "Duplicate keys on SQLite"):
        # committed ones, and those of the open transaction; key -> [(id, sha256, received_at, ack)]
        self._recent_keys: dict[str, list] = {}
        self._recent_n = 0
        self._staged_keys: dict[str, list] = {}
        self._staged_n = 0
        self._merging = False
        self.writer_healthy = True
        self.linger = WRITER_LINGER_MAX_S
        self.linger_factor = WRITER_LINGER_FACTOR
        # records submitted / taken by the writer (each written by one thread only; their
        # difference is what is queued, for the linger)
        self._submitted = 0
        self._taken = 0
        self.batches = 0            # counters for benchmarks / status
        self.batched_jobs = 0
        self.batched_records = 0
        self.busy_s = 0.0           # time in transactions + callbacks
        self.linger_s = 0.0
        # stats(): message and duplicate counts up to these ids (see stats)
        self._stats_lock = threading.Lock()
        self._stats_msgs: dict[tuple[str, str], int] = {}
        self._stats_dups: dict[str, int] = {}
        self._stats_msg_mark = 0
        self._stats_dup_mark = 0

    # ------------------------------------------------------------------ setup
    @staticmethod
    def default_url(data_dir: Path) -> str:
        return f"sqlite:///{Path(data_dir) / 'minipfi.db'}"

    @staticmethod
    def _sqlite_on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_on_begin)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # only effective on a new file
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        cur.close()

    @staticmethod
    def _sqlite_on_begin(conn):
        if conn.get_execution_options().get("minipfi_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    def migrate(self) -> None:
        """``alembic upgrade head`` on this database; idempotent."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self._wengine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1").scalar()
            return True
        except Exception:  # noqa: BLE001
            return False

    def dispose(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.stop()
        self.engine.dispose()

    # ------------------------------------------------------------------ writer
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._stopped = False
        self._thread = threading.Thread(target=self._writer_loop, name="store-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        """Flush everything submitted so far, then stop the writer thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._stopped = True
        if self.batches:
            log.info("store writer: %d batches, %.1f records/batch, %.3f ms/batch busy, "
                     "%.1f s lingering", self.batches, self.batched_records / self.batches,
                     1000 * self.busy_s / self.batches, self.linger_s)

    def submit_ingest(self, records: list[IngestRecord],
                      callback: Callable[[list[IngestResult] | BaseException], None]) -> None:
        self._enqueue(_Job(records, None, callback), len(records))

    def submit(self, op: Callable[[sa.Connection], T],
               callback: Callable[[T | BaseException], None]) -> None:
        self._enqueue(_Job(None, op, callback), 1)

    def _enqueue(self, job: _Job, records: int) -> None:
        if self._stopped:
            job.callback(RuntimeError("store writer is stopped"))
            self._after_batch()
            return
        self._queue.append(job)
        self._submitted += records
        target = self._linger_target  # while lingering, only the target wakes the writer
        if target is None or self._submitted - self._taken >= target:
            self._wake.set()

    def read(self, fn: Callable[[sa.Connection], T]) -> T:
        """Run ``fn`` on a read connection (registry lookups, CLI): no writer involved."""
        with self._read() as conn:
            return fn(conn)

    def ingest_within(self, conn: sa.Connection, records: list[IngestRecord]) -> list[IngestResult]:
        """Ingest ``records`` inside the caller's open transaction (a ``submit`` op).

        For channels whose ACK depends on work done in the same transaction as the message
        insert (the identity feed applies the ADT to the registry before answering): the op
        calls this, then does its work, and the whole is committed once by the writer.
        """
        raw = conn.connection.driver_connection
        return self._ingest(raw, [_Job(records, None, None)])[0]

    def _writer_loop(self) -> None:
        queue = self._queue
        wake = self._wake
        last_write = 0.0
        while True:
            idle_ckpt = self._sqlite and self._ckpt_bytes > 0
            if not queue and not self._stopping:
                woke = wake.wait(CHECKPOINT_IDLE_S if idle_ckpt else None)
                if not woke and idle_ckpt and time.monotonic() - last_write >= CHECKPOINT_IDLE_S:
                    self._checkpoint()
                    continue
            wake.clear()
            jobs = []
            pop = queue.popleft
            while queue:
                jobs.append(pop())
            if not jobs:
                if self._stopping:
                    break
                continue
            t0 = time.monotonic()
            served = 0
            for job in jobs:
                served += len(job.records) if job.records is not None else 1
            self._taken += served
            self._queued_at_commit = 0
            try:
                self._run_jobs(jobs)
            except BaseException as exc:  # noqa: BLE001 - the writer must survive
                # a bug, not a database error: nobody may wait forever for an answer
                log.error("store writer: unexpected error: %s", error_text(exc))
                failure = exc if isinstance(exc, Exception) else RuntimeError("store writer failed")
                for job in jobs:
                    self._callback(job, failure)
            last_write = time.monotonic()
            self.batched_records += served
            self.busy_s += last_write - t0
            # Linger, counted in RECORDS (the engine submits one job per reactor turn, holding
            # every record of that turn, so a count of jobs says little): the producers just
            # answered resubmit within a round trip, while those queued during the commit are
            # already waiting. Waiting (briefly) until as many records as this batch plus those
            # queued at COMMIT time are there merges the two halves of closed-loop producers
            # into one commit instead of letting them alternate in half-size batches. The wait
            # is bounded by min(linger, linger_factor x this transaction's time): a lone
            # producer is never held longer than a commit costs. (Writing each reactor turn's
            # records as they arrive, inside an open transaction, was tried: 5.6-6.1k msg/s
            # against 6.6-7.9k for this, interleaved runs: a writer wake-up per reactor turn
            # costs more than the inserts it moves off the critical path.)
            target = served + self._queued_at_commit
            lingering = bool(self.linger) and not self._stopping
            if lingering:
                # Set before the results go out: the producers they answer wake the writer
                # only once the target is reached, not at each submit (every wake-up is a
                # thread switch on the core the reactor also needs); and the reactor, woken by
                # after_batch, then finds the writer already asleep instead of waiting for the
                # GIL while it does this bookkeeping.
                wake.clear()
                self._linger_target = target
            self._after_batch()
            if lingering and self._submitted - self._taken < target:
                deadline = last_write + min(self.linger, self.linger_factor * (last_write - t0))
                try:
                    while self._submitted - self._taken < target and not self._stopping:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        wake.wait(remaining)
                        wake.clear()
                finally:
                    self._linger_target = None
                self.linger_s += time.monotonic() - last_write
            else:
                self._linger_target = None
            if self._sqlite and self._ckpt_bytes >= CHECKPOINT_FORCE_BYTES:
                self._checkpoint()
        self._close_wconn()

    def _checkpoint(self) -> None:
        self._ckpt_bytes = 0
        try:
            conn = self._writer_conn()
            conn.connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except Exception as exc:  # noqa: BLE001
            log.warning("store writer: checkpoint failed: %s", type(exc).__name__)

    def _writer_conn(self) -> sa.Connection:
        if self._wconn is None:
            conn = self._wengine.connect()
            if self._sqlite:
                try:
                    raw = conn.connection.driver_connection
                    raw.execute(f"PRAGMA wal_autocheckpoint={WRITER_WAL_AUTOCHECKPOINT}")
                    self._load_recent_keys(raw)
                except BaseException:
                    conn.close()
                    raise
            self._wconn = conn
            self._id_pool.clear()
        return self._wconn

    def _close_wconn(self) -> None:
        conn, self._wconn = self._wconn, None
        if conn is not None:
            try:
                conn.invalidate()
            except Exception:  # noqa: BLE001
                pass
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def _run_jobs(self, jobs: list[_Job]) -> None:
        try:
            results = self._transaction(jobs)
        except _BatchFailed as failed:
            if failed.db_level or len(jobs) == 1:
                if failed.db_level:
                    self.writer_healthy = False
                for job in jobs:
                    self._callback(job, failed.exc)
                return
            for job in jobs:  # isolate the offending job
                self._run_jobs([job])
            return
        self.writer_healthy = True
        self.batches += 1
        self.batched_jobs += len(jobs)
        self._queued_at_commit = self._submitted - self._taken
        for job, res in zip(jobs, results):
            self._callback(job, res)

    def _after_batch(self) -> None:
        """Run ``after_batch`` once every callback of a transaction has run (see __init__)."""
        hook = self.after_batch
        if hook is not None:
            try:
                hook()
            except Exception:  # noqa: BLE001
                log.error("store writer: after_batch raised: %s", error_text(sys.exc_info()[1]))

    @staticmethod
    def _callback(job: _Job, value) -> None:
        try:
            job.callback(value)
        except Exception:  # noqa: BLE001
            log.error("store writer: callback raised: %s", error_text(sys.exc_info()[1]))

    def _transaction(self, jobs: list[_Job]) -> list:
        """Run ``jobs`` in one transaction and COMMIT; raise ``_BatchFailed`` (rolled back)."""
        phase = "connect"
        trans = None
        raw = None
        self._phase_commit = False
        self._staged_keys, self._staged_n, self._merging = {}, 0, False
        try:
            conn = self._writer_conn()
            raw = conn.connection.driver_connection
            ingest_idx = [i for i, job in enumerate(jobs) if job.op is None]
            results: list = [None] * len(jobs)
            if len(ingest_idx) == len(jobs):
                # hot path: only ingests, straight on the DBAPI connection
                ingest_jobs = jobs
                phase = "begin"
                if self._sqlite:
                    raw.execute("BEGIN IMMEDIATE")
                    phase = "execute"
                    results = self._ingest(raw, jobs)
                    self._merge_keys_if_due(raw)
                    phase = "commit"
                    raw.commit()
                    self._keys_committed()
                else:
                    # Autocommit: the dedup lookup, then ONE statement writing every row of the
                    # batch (atomic by itself, its COMMIT included): 2 round trips per batch.
                    raw.autocommit = True
                    try:
                        phase = "execute"
                        results = self._ingest_pg_fast(raw, jobs)
                    finally:
                        raw.autocommit = False
                return results
            phase = "begin"
            trans = conn.begin()
            phase = "execute"
            for i, job in enumerate(jobs):
                if job.op is not None:
                    results[i] = job.op(conn)
            if ingest_idx:
                ingest_jobs = [jobs[i] for i in ingest_idx]
                outs = self._ingest(raw, ingest_jobs)
                for i, out in zip(ingest_idx, outs):
                    results[i] = out
            if self._sqlite:
                self._merge_keys_if_due(raw)
            phase = "commit"
            trans.commit()
            if self._sqlite:
                self._keys_committed()
            return results
        except BaseException as exc:  # noqa: BLE001
            if self._phase_commit:
                phase = "commit"
            db_level = phase != "execute" or _is_db_level(exc)
            try:
                if trans is not None:
                    trans.rollback()
                elif raw is not None:
                    raw.rollback()
            except Exception:  # noqa: BLE001
                db_level = True
            if db_level:
                self._close_wconn()
            if not isinstance(exc, Exception):
                raise
            raise _BatchFailed(exc, db_level) from exc

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

    # -- duplicate keys on SQLite (see the module docstring) -------------------------------
    def _load_recent_keys(self, raw) -> None:
        """The keys of the messages written after the last merge, from ``messages.dedup_key``
        (a fresh writer connection: at start, and after a connection was dropped)."""
        row = raw.execute("SELECT value FROM store_meta WHERE name = 'dedup_merged_to'").fetchone()
        keys: dict[str, list] = {}
        n = 0
        for key, mid, sha, at, ack in raw.execute(
                "SELECT dedup_key, id, sha256, received_at, ack FROM messages "
                "WHERE id > ? AND dedup_key IS NOT NULL ORDER BY id", (row[0] if row else 0,)):
            keys.setdefault(key, []).append((mid, sha, at, bytes(ack)))
            n += 1
        self._recent_keys, self._recent_n = keys, n

    def _merge_keys_if_due(self, raw) -> None:
        """Inside the open transaction: once enough keys are held, write them all (sorted: each
        leaf of dedup_index is written once for many keys) and move the mark."""
        if self._recent_n + self._staged_n < DEDUP_MERGE_AT:
            return
        rows = [(key, at, mid) for held in (self._recent_keys, self._staged_keys)
                for key, entries in held.items() for mid, _sha, at, _ack in entries]
        rows.sort()
        raw.executemany("INSERT INTO dedup_index (dedup_key, received_at, message_id) "
                        "VALUES (?, ?, ?)", rows)
        raw.execute("UPDATE store_meta SET value = ? WHERE name = 'dedup_merged_to'",
                    (max(r[2] for r in rows),))
        self._merging = True

    def _keys_committed(self) -> None:
        """After COMMIT: the open transaction's keys join the held ones (or, if it merged,
        nothing is held any more)."""
        if self._merging:
            self._recent_keys, self._recent_n = {}, 0
        elif self._staged_n:
            held = self._recent_keys
            for key, entries in self._staged_keys.items():
                held.setdefault(key, []).extend(entries)
            self._recent_n += self._staged_n
        self._staged_keys, self._staged_n, self._merging = {}, 0, False

    def _ingest_pg_fast(self, raw, jobs: list[_Job]) -> list[list[IngestResult]]:
        """PostgreSQL, autocommit: one statement for the common case (no duplicates); records
        whose key exists (or repeats inside the batch) are then handled by ``_ingest`` in a
        regular transaction. If that second pass fails, every callback gets the exception even
        though the first pass is committed: a resend is then answered as a duplicate with the
        stored ACK, which is the outcome the sender would have had."""
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
                row[0] = mid
                for e in rec.entries:
                    entry_rows.append(_entry_row(mid, e, now))
            dumps = json.dumps
            self._phase_commit = True
            cur.execute(_PG_FAST, {"w": window, "m": dumps(msg_rows),
                                   "e": dumps(entry_rows)})
            inserted = {r[0] for r in cur.fetchall()}
            self._phase_commit = False
            self._ckpt_bytes += sum(len(r[18]) for r in msg_rows)
            for j, i, rec, row in first:
                if row[0] in inserted:
                    results[j][i] = Stored(row[0])
                else:
                    deferred.append((j, i, rec))
        if deferred:
            deferred.sort(key=lambda t: (t[0], t[1]))
            pseudo = _Job([t[2] for t in deferred], None, None)
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

    def _ingest(self, raw, jobs: list[_Job]) -> list[list[IngestResult]]:
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
        nbytes = 0
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
                        ack_code = _ack_code_of(ack)
                        error_code = "205"
            row = [None, rec.channel, rec.received_at, rec.sending_app, rec.sending_facility,
                   rec.receiving_app, rec.receiving_facility, rec.message_type, rec.control_id,
                   rec.version, rec.charset, len(rec.raw), sha, key, status, ack_code, ack,
                   error_code, rec.raw, rec.flags]
            nbytes += len(rec.raw) + len(ack) + WAL_PAGES_PER_RECORD * SQLITE_PAGE_SIZE
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
                row[0] = mid
                res.message_id = mid
                if entries:
                    for e in entries:
                        entry_rows.append(_entry_row(mid, e, now))
                if staged is not None and row[13] is not None:
                    staged.setdefault(row[13], []).append((mid, row[12], row[2], row[16]))
                    self._staged_n += 1
            # references to rows of this batch (in-batch duplicates) become ids
            for res_list in results:
                for res in res_list:
                    if type(res) is Duplicate and type(res.original_id) is list:
                        res.original_id = res.original_id[0]
        for ev in event_rows:
            if type(ev[4]) is list:
                ev[4] = ev[4][0]
            d = ev[6]
            if type(d.get("original_id")) is list:
                d["original_id"] = d["original_id"][0]
            ev[6] = json.dumps(d)
        if self._sqlite:
            if msg_rows:
                cur.executemany(self._sql_ins_msg, msg_rows)
            if entry_rows:
                cur.executemany(self._sql_ins_entry, entry_rows)
            if event_rows:
                cur.executemany(self._sql_ins_event, event_rows)
        elif msg_rows or event_rows:
            for r in msg_rows:
                r[16] = r[16].hex()
                r[18] = r[18].hex()
            dumps = json.dumps
            cur.execute(_PG_INSERT_ALL, {"m": dumps(msg_rows), "e": dumps(entry_rows),
                                         "v": dumps(event_rows)})
        self._ckpt_bytes += nbytes + WAL_PAGES_PER_COMMIT * SQLITE_PAGE_SIZE
        return results

    # ------------------------------------------------------------------ sync API
    @contextmanager
    def _write_tx(self) -> Iterator[sa.Connection]:
        with self._wengine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            yield conn

    def _event(self, conn: sa.Connection, kind: str, *, channel=None, destination=None,
               message_id=None, entry_id=None, detail: dict | None = None, at=None) -> None:
        conn.execute(
            sa.text(f"INSERT INTO events ({_EVENT_COLS}) VALUES "
                    "(:at, :kind, :channel, :destination, :message_id, :entry_id, :detail)"),
            {"at": time.time() if at is None else at, "kind": kind, "channel": channel,
             "destination": destination, "message_id": message_id, "entry_id": entry_id,
             "detail": json.dumps(detail or {})})

    def add_event(self, kind: str, *, channel=None, destination=None, message_id=None,
                  entry_id=None, detail: dict | None = None) -> None:
        with self._write_tx() as conn:
            self._event(conn, kind, channel=channel, destination=destination,
                        message_id=message_id, entry_id=entry_id, detail=detail)

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
                sa.text(f"INSERT INTO events ({_EVENT_COLS}) VALUES "
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
            rows = conn.execute(
                sa.text("SELECT q.id, q.message_id, q.destination, q.route, q.order_key, "
                        "q.transforms, q.attempts, m.raw, m.control_id, m.message_type, m.channel, "
                        "q.target, m.charset, q.doc_key, q.action "
                        "FROM queue_entries q JOIN messages m ON m.id = q.message_id "
                        "WHERE q.id IN :ids ORDER BY q.id")
                .bindparams(sa.bindparam("ids", expanding=True)), {"ids": list(ids)}).mappings().all()
        return [ClaimedEntry(id=r["id"], message_id=r["message_id"], destination=r["destination"],
                             route=r["route"], order_key=r["order_key"], transforms=r["transforms"],
                             attempts=r["attempts"], raw=bytes(r["raw"]), control_id=r["control_id"],
                             message_type=r["message_type"], channel=r["channel"],
                             target=r["target"], charset=r["charset"], doc_key=r["doc_key"],
                             action=r["action"]) for r in rows]

    def complete(self, entry_id: int, owner: str, *, status: str, attempts: int,
                 next_attempt_at: float | None = None, last_error: str | None = None,
                 response: bytes | None = None, payload: bytes | None = None) -> bool:
        if status not in _COMPLETE_KIND:
            raise ValueError(f"complete(): invalid status {status!r}")
        now = time.time()
        if status == "queued" and next_attempt_at is None:
            next_attempt_at = now
        with self._write_tx() as conn:
            row = conn.execute(sa.text(
                "UPDATE queue_entries SET status = :s, attempts = :a, "
                "next_attempt_at = COALESCE(:n, next_attempt_at), last_error = :e, "
                "response = COALESCE(:r, response), payload = COALESCE(:p, payload), "
                "lease_owner = NULL, lease_until = NULL, updated_at = :now "
                "WHERE id = :id AND status = 'in_flight' AND lease_owner = :o "
                "RETURNING destination, message_id"),
                {"s": status, "a": attempts, "n": next_attempt_at, "e": last_error,
                 "r": response, "p": payload, "now": now, "id": entry_id, "o": owner}).first()
            if row is None:
                return False
            detail: dict[str, Any] = {"attempts": attempts}
            if last_error is not None:
                detail["error"] = last_error[:500]
            if status == "queued":
                detail["next_attempt_at"] = next_attempt_at
            conn.execute(sa.text(
                f"INSERT INTO events ({_EVENT_COLS}) SELECT :at, :kind, m.channel, :dest, m.id, "
                ":eid, :detail FROM messages m WHERE m.id = :mid"),
                {"at": now, "kind": _COMPLETE_KIND[status], "dest": row[0], "mid": row[1],
                 "eid": entry_id, "detail": json.dumps(detail)})
        return True

    # -- processing steps' verdicts (inside a writer op's transaction) -----------------------
    def set_verdict(self, conn: sa.Connection, message_id: int, *, ack: bytes, ack_code: str,
                    status: str, error_code: str | None, unroute: bool) -> None:
        """A processing step decided the ACK of a message stored in this transaction: the ACK
        stored for duplicate replay, the status, and (rejected) no queue entries. On SQLite the
        writer's held duplicate keys carry the ACK too: the one of this transaction is replaced,
        so that a resend is answered with the step's ACK, not the AA computed in advance."""
        for entries in self._staged_keys.values():
            for i, (mid, sha, at, _ack) in enumerate(entries):
                if mid == message_id:
                    entries[i] = (mid, sha, at, ack)
        if unroute:
            conn.execute(sa.text("DELETE FROM queue_entries WHERE message_id = :id"), {"id": message_id})
        conn.execute(
            sa.text("UPDATE messages SET ack = :ack, ack_code = :code, status = :status, "
                    "error_code = :ec WHERE id = :id"),
            {"ack": ack, "code": ack_code, "status": status, "id": message_id, "ec": error_code})

    # -- canonical submissions of report messages -------------------------------------------
    @staticmethod
    def insert_submission(conn: sa.Connection, message_id: int, *, kind: str, action: str | None,
                          documents: int, errors: int, submission_json: str,
                          validation: dict | None = None, wrapped: bytes | None = None,
                          doc_key: str | None = None, cda_header: dict | None = None) -> None:
        """Inside a writer op: the canonical submission stored with its message."""
        conn.execute(submissions.insert().values(
            message_id=message_id, kind=kind, action=action, documents=documents, errors=errors,
            submission=submission_json, validation=json.dumps(validation) if validation else None,
            wrapped=wrapped, doc_key=doc_key,
            cda_header=json.dumps(cda_header, default=str) if cda_header else None,
            created_at=time.time()))

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

    def set_validation(self, message_id: int, validation: dict, callback) -> None:
        """Attach a (later) validation report to a stored submission, through the writer."""
        self.submit(lambda c: c.execute(submissions.update()
                                        .where(submissions.c.message_id == message_id)
                                        .values(validation=json.dumps(validation))), callback)

    def latest_pacs_header(self, doc_key: str) -> dict | None:
        """The CDA header of the latest PACS report wrapped without error for the same exam."""
        with self._read() as conn:
            row = conn.execute(sa.select(submissions.c.cda_header)
                               .where(submissions.c.doc_key == doc_key, submissions.c.kind == "pacs",
                                      submissions.c.errors == 0)
                               .order_by(submissions.c.message_id.desc()).limit(1)).first()
        return json.loads(row[0]) if row and row[0] else None

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
            unsent = [(r[0], r[1]) for r in earlier if r[2] in ("queued", "error")]
            reached = any(r[2] in ("sent", "in_flight") for r in earlier)
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
                sa.text(f"INSERT INTO events ({_EVENT_COLS}) SELECT :at, 'cancelled', m.channel, :dest, "
                        "m.id, :eid, :detail FROM messages m WHERE m.id = :mid"),
                [{"at": now, "dest": d, "mid": m, "eid": i,
                  "detail": json.dumps({"deletion_message_id": message_id})} for i, m, d in cancelled])
        return len(cancelled)

    def release(self, entry_id: int, owner: str) -> None:
        with self._write_tx() as conn:
            conn.execute(sa.text(
                "UPDATE queue_entries SET status = 'queued', lease_owner = NULL, "
                "lease_until = NULL, updated_at = :now "
                "WHERE id = :id AND status = 'in_flight' AND lease_owner = :o"),
                {"now": time.time(), "id": entry_id, "o": owner})

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

    def get_message(self, message_id: int) -> MessageRow | None:
        with self._read() as conn:
            m = conn.execute(sa.text(f"SELECT {_MSG_COLS} FROM messages WHERE id = :id"),
                             {"id": message_id}).first()
            if m is None:
                return None
            ents = conn.execute(sa.text(
                "SELECT id, message_id, destination, route, status, order_key, transforms, "
                "attempts, next_attempt_at, created_at, updated_at, lease_owner, lease_until, "
                "last_error, response, payload, target, doc_key, action FROM queue_entries "
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

    def list_messages(self, *, limit: int = 100, offset: int = 0,
                      channel: str | None = None) -> list[MessageSummary]:
        """Newest first. ``status`` aggregates: the message status if rejected/filtered/conflict;
        else over the latest entry per destination (a replay supersedes the earlier attempt):
        'error' if any error, 'queued' if any queued/in_flight, else 'sent'."""
        where = "WHERE channel = :ch" if channel is not None else ""
        with self._read() as conn:
            rows = conn.execute(sa.text(
                "SELECT m.id, m.channel, m.control_id, m.message_type, m.received_at, m.status, "
                "m.sending_app, m.sending_facility, m.size, "
                "  SUM(CASE WHEN e.status = 'error' THEN 1 ELSE 0 END), "
                "  SUM(CASE WHEN e.status IN ('queued', 'in_flight') THEN 1 ELSE 0 END) "
                "FROM (SELECT id, channel, control_id, message_type, received_at, status, "
                "      sending_app, sending_facility, size FROM messages "
                f"      {where} ORDER BY id DESC LIMIT :lim OFFSET :off) m "
                "LEFT JOIN queue_entries e ON e.message_id = m.id AND e.id = ("
                "  SELECT max(e2.id) FROM queue_entries e2 "
                "  WHERE e2.message_id = m.id AND e2.destination = e.destination "
                "  AND e2.target = e.target) "
                "GROUP BY m.id, m.channel, m.control_id, m.message_type, m.received_at, m.status, "
                "m.sending_app, m.sending_facility, m.size ORDER BY m.id DESC"),
                {"ch": channel, "lim": int(limit), "off": int(offset)}).all()
        out = []
        for r in rows:
            status = r[5]
            if status not in ("rejected", "filtered", "conflict"):
                if r[9]:
                    status = "error"
                elif r[10]:
                    status = "queued"
                else:
                    status = "sent"
            out.append(MessageSummary(r[0], r[1], r[2], r[3], iso(r[4]), status, r[6], r[7],
                                      r[8]))
        return out

    def replay(self, message_ids: list[int]) -> dict[int, int]:
        ids = list(dict.fromkeys(int(i) for i in message_ids))
        if not ids:
            return {}
        now = time.time()
        expand = sa.bindparam("ids", expanding=True)
        with self._write_tx() as conn:
            chans = dict(conn.execute(
                sa.text("SELECT id, channel FROM messages WHERE id IN :ids").bindparams(expand),
                {"ids": ids}).all())
            missing = [i for i in ids if i not in chans]
            if missing:
                raise UnknownMessage(f"unknown message id(s): {missing}")
            # the latest entry of each (destination, target): a replay supersedes the earlier one
            latest = conn.execute(sa.text(
                "SELECT e.message_id, e.destination, e.route, e.order_key, e.transforms, e.target, "
                "e.doc_key, e.doc_id, e.action FROM queue_entries e WHERE e.id IN ("
                "  SELECT max(id) FROM queue_entries WHERE message_id IN :ids "
                "  GROUP BY message_id, destination, target) ORDER BY e.id").bindparams(expand),
                {"ids": ids}).mappings().all()
            counts = {i: 0 for i in ids}
            rows = []
            for r in latest:
                counts[r["message_id"]] += 1
                spec = EntrySpec(r["destination"], r["route"], r["order_key"], r["transforms"],
                                 r["target"], 0.0, r["doc_key"], r["doc_id"], r["action"])
                rows.append(dict(zip(_ENTRY_KEYS, _entry_row(r["message_id"], spec, now))))
            if rows:
                conn.execute(sa.text(
                    f"INSERT INTO queue_entries ({_ENTRY_COLS}) VALUES "
                    f"({', '.join(':' + k for k in _ENTRY_KEYS)})"), rows)
            for i in ids:
                self._event(conn, "replay", channel=chans[i], message_id=i,
                            detail={"entries": counts[i]}, at=now)
        return counts

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
            msg_mark, dup_mark = self._stats_msg_mark, self._stats_dup_mark
            for chan, status, n, top in conn.execute(sa.text(
                    "SELECT channel, status, count(*), max(id) FROM messages WHERE id > :w "
                    "GROUP BY channel, status"), {"w": self._stats_msg_mark}).all():
                msgs[(chan, status)] = msgs.get((chan, status), 0) + n
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
            self._stats_msgs, self._stats_dups = msgs, dups
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
        return {"channels": channels, "destinations": dests}
