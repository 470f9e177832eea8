"""The group-commit writer: one thread, one connection, one transaction for everything queued.

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

    Batches with ops run in a regular transaction: generic ops first, in order; then the first
    group of step ops' ``read`` (``StepOp.read``: the identity feed's lookups); then the
    records of the step ops (``StepOp``) and of the plain ingests in one ``_ingest`` (on
    PostgreSQL the one-statement insert above, inside the transaction); then each run of
    consecutive step ops sharing a ``run`` in one call (the identity feed applies all the ADTs
    of the commit together). On PostgreSQL a batch of steps and ingests only runs in one psycopg
    pipeline (see ``_pipeline_guard``): 2 round trips for the identity feed's batch.

    Failure: a database-level error (connection lost, database locked or read-only, failed
    COMMIT) fails every callback of the batch, sets ``writer_healthy`` False and drops the
    connection; the next batch reconnects. A non-database error raised by one job (a generic op
    raising, an integrity error) makes the writer retry the batch's jobs one transaction each,
    so only the offending job fails.

SQLite settings (every connection): ``journal_mode=WAL``, ``synchronous=FULL`` (a COMMIT is on disk
when it returns), ``busy_timeout=10000``, ``foreign_keys=ON``, ``journal_size_limit=64 MiB``,
``page_size=4096`` for new files: with 8 KiB pages the 8-producer benchmark was about 10 % slower
(more WAL bytes per small commit); 64 KiB pages tripled the commit time of small messages, so
large (200 KB) ORU messages are not optimised at their expense.
Checkpoints: the writer connection runs with ``wal_autocheckpoint=0`` (an automatic checkpoint
runs inside the COMMIT, i.e. before the callbacks, and was the p99 source) and checkpoints
(PASSIVE) itself after its callbacks, once the WAL holds ``WAL_CHECKPOINT_FRAMES`` (32 MiB), or
when idle for 0.5 s after writing. Other connections keep SQLite's default autocheckpoint. The
WAL's length is read from the WAL-index after each transaction (:mod:`engine.store.wal_index`:
exact, whatever wrote the frames). It was estimated from the messages' bytes before, which
missed delivery's claims and outcomes: while per-patient lanes drained a backlog, the WAL grew
to 300-400 MB and its checkpoint, of pages all over the queue, stalled the writer for 100-190
ms. The WAL is kept below ``journal_size_limit`` (64 MiB) on purpose: SQLite truncates a longer
one at each restart, and every commit then appends to a growing file, whose ``fdatasync`` also
has to journal the new size (measured on this VM: 0.42 ms per 8-message commit appending,
0.24-0.34 ms overwriting a WAL kept below the limit). A checkpoint of 32 MiB stalls the writer
for 10-27 ms (measured: ingest and per-patient drains alike); at 16 MiB, more frequent stalls
showed in the 32-connection ingest p99 (9.4-10.7 ms against 4.1-5.5). Checkpoints run by a
thread of their own, concurrent with the writer, were measured and dropped: their syncs of the
database file slowed the writer's commit syncs (ingest at 32 connections 3-8 % slower, p99 +1.5
ms), for a better p99 only while per-patient lanes drained (14 ms against 21-23).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable, TypeVar

import sqlalchemy as sa

from engine.logs import error_text

from .wal_index import read as read_wal_index
from .models import (
    IngestRecord,
    IngestResult,
    StepOp,
)
from .sql import is_db_level


log = logging.getLogger('engine.store.store')

T = TypeVar("T")

SQLITE_PAGE_SIZE = 4096
SQLITE_BUSY_TIMEOUT_MS = 10000
WRITER_WAL_AUTOCHECKPOINT = 0
CHECKPOINT_IDLE_S = 0.5
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
# WAL lengths in frames (one page each, SQLITE_PAGE_SIZE): the writer checkpoints once the WAL
# holds WAL_CHECKPOINT_FRAMES (below JOURNAL_SIZE_LIMIT); after a checkpoint that could not copy
# every frame (a reader still needs older ones), it tries again WAL_RETRY_FRAMES later. The
# WAL-index is read at most every WAL_CHECK_S.
WAL_CHECKPOINT_FRAMES = 32 * 1024 * 1024 // SQLITE_PAGE_SIZE
WAL_RETRY_FRAMES = 512
WAL_CHECK_S = 0.005
PG_ID_BLOCK = 1024
# SQLite: keys held in memory before they are written into dedup_index, in the transaction of
# the batch that reaches the count. A merge writes about two leaves per sender, whatever the
# count, so it must hold many keys per sender (a leaf holds about 60); 512 keys took 1.7 ms and
# 2,048 took 6.9 ms (writer alone, 8 senders): one merge per 64 commits of 8 records, short
# enough to stay out of the ACK p99 also at 32 connections (one per about 20 commits).

WRITER_LINGER_MAX_S = float(os.environ.get("MINIPFI_WRITER_LINGER_S", "0.001"))
WRITER_LINGER_FACTOR = float(os.environ.get("MINIPFI_WRITER_LINGER_FACTOR", "1.0"))
# how long a background job (delivery's claims and outcomes) may be held back while foreground
# work (ingest) keeps coming; measured with per-patient lanes draining a backlog: 5-20 ms gave
# the same ACK p99, strict alternation a higher one
BACKGROUND_WAIT_S = 0.01


class Job:
    __slots__ = ("records", "op", "callback", "background", "since")

    def __init__(self, records, op, callback, background=False):
        self.records = records
        self.op = op
        self.callback = callback
        self.background = background
        self.since = time.monotonic() if background else 0.0


class BatchFailed(Exception):
    def __init__(self, exc: BaseException, db_level: bool):
        super().__init__(str(exc))
        self.exc = exc
        self.db_level = db_level


class WriterMixin:
    """The writer thread of :class:`engine.store.Store` (state set up by Store.__init__)."""

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
            log.info("store writer: %d batches, %.1f records/batch, %.3f ms/batch busy "
                     "(%.3f in COMMIT), %.1f s lingering", self.batches,
                     self.batched_records / self.batches, 1000 * self.busy_s / self.batches,
                     1000 * self.commit_s / self.batches, self.linger_s)
        if self.checkpoints:
            log.info("store checkpoints: %d, %.1f ms each", self.checkpoints,
                     1000 * self.checkpoint_s / self.checkpoints)

    def submit_ingest(self, records: list[IngestRecord],
                      callback: Callable[[list[IngestResult] | BaseException], None]) -> None:
        self._enqueue(Job(records, None, callback), len(records))

    def submit(self, op: Callable[[sa.Connection], T],
               callback: Callable[[T | BaseException], None], *, background: bool = False) -> None:
        """``background``: work nobody waits an ACK for (delivery's claims and outcomes): never
        in the same transaction as foreground work (see ``_take_jobs``)."""
        self._enqueue(Job(None, op, callback, background), 1)

    def _enqueue(self, job: Job, records: int) -> None:
        if self._stopped:
            job.callback(RuntimeError("store writer is stopped"))
            self._after_batch()
            return
        self._queue.append(job)
        self._submitted += records
        target = self._linger_target  # while lingering, only the target wakes the writer
        if target is None or self._submitted - self._taken >= target:
            self._wake.set()

    def _writer_loop(self) -> None:
        queue = self._queue
        wake = self._wake
        last_write = 0.0
        while True:
            idle_ckpt = self._wal_written
            if not queue and not self._stopping:
                woke = wake.wait(CHECKPOINT_IDLE_S if idle_ckpt else None)
                if not woke and idle_ckpt and time.monotonic() - last_write >= CHECKPOINT_IDLE_S:
                    self._checkpoint()
                    continue
            wake.clear()
            jobs = self._take_jobs(queue)
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
            self._wal_written = self._sqlite
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
            # jobs put back by _take_jobs are due now: no waiting for more records first
            lingering = bool(self.linger) and not self._stopping and not self._put_back
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
            if self._sqlite:
                self._wal_check()
        self._close_wconn()

    _put_back = False  # the last _take_jobs left jobs in the queue

    def _take_jobs(self, queue) -> list[Job]:
        """Everything queued, unless foreground jobs (ingest, steps, ops submitted without
        ``background``) and background ones are both waiting. Then the foreground ones, while
        the oldest background job has waited less than ``BACKGROUND_WAIT_S``, else the
        background ones; the others go back to the head of the queue for the next transaction.
        A background op can be long (delivery's claims and outcomes for many ordering keys
        rewrite about one page per entry: measured 10-60 ms for a claim of 256-1,024 entries
        while per-patient lanes drained a backlog) and an ACK waited for the whole transaction
        its record was in; now it waits for at most one background transaction, and delivery
        still gets one at least every ``BACKGROUND_WAIT_S`` under continuous ingest."""
        jobs = []
        pop = queue.popleft
        while queue:
            jobs.append(pop())
        self._put_back = False
        background = [j for j in jobs if j.background]
        if not background or len(background) == len(jobs):
            return jobs
        self._put_back = True
        foreground = [j for j in jobs if not j.background]
        if time.monotonic() - background[0].since >= BACKGROUND_WAIT_S:
            queue.extendleft(reversed(foreground))
            return background
        queue.extendleft(reversed(background))
        return foreground

    def checkpoint_stats(self) -> dict | None:
        """SQLite (None on PostgreSQL): the WAL's length in frames now (None when unreadable),
        the checkpoints run since start, their seconds, and the failed ones."""
        if not self._sqlite:
            return None
        state = read_wal_index(self._shm)
        return {"wal_frames": state.frames if state is not None else None,
                "checkpoints": self.checkpoints, "seconds": self.checkpoint_s,
                "failed": self.checkpoint_failures}

    def _wal_check(self) -> None:
        """After a transaction: checkpoint when the WAL is long enough (at most every
        ``WAL_CHECK_S``: the WAL-index read is three system calls)."""
        now = time.monotonic()
        if now < self._wal_next_check:
            return
        self._wal_next_check = now + WAL_CHECK_S
        state = read_wal_index(self._shm)
        if state is None:
            return
        if state.frames < self._wal_ckpt_frames:
            self._wal_ckpt_frames = 0  # the WAL restarted
        if (state.frames >= WAL_CHECKPOINT_FRAMES
                and state.frames >= self._wal_ckpt_frames + WAL_RETRY_FRAMES):
            self._wal_ckpt_frames = state.frames
            self._checkpoint()

    def _checkpoint(self) -> None:
        self._wal_written = False
        t0 = time.monotonic()
        try:
            conn = self._writer_conn()
            conn.connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except Exception as exc:  # noqa: BLE001
            self.checkpoint_failures += 1
            log.warning("store writer: checkpoint failed: %s", type(exc).__name__)
            return
        self.checkpoint_s += time.monotonic() - t0
        self.checkpoints += 1

    def _writer_conn(self) -> sa.Connection:
        if self._wconn is None:
            conn = self._wengine.connect()
            if not self._sqlite:
                sa.event.listen(conn, "before_cursor_execute", self._pipeline_guard)
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

    # ------------------------------------------------------------------ PostgreSQL pipeline
    # A transaction of steps (the identity feed) on PostgreSQL runs in one psycopg pipeline,
    # its BEGIN and COMMIT sent as statements (the DBAPI connection in autocommit, so that
    # psycopg sends no BEGIN of its own, which would be one round trip more): writes are queued,
    # a read on the DBAPI cursor sends them with it and waits once (the BEGIN goes with the
    # messages insert), and the last held writes go with the COMMIT. 5 round trips per batch
    # (BEGIN, messages, lookups, writes, COMMIT) become 3. SQLAlchemy reads cannot run in a
    # pipeline (their result is inspected before it has arrived): the guard below ends the
    # pipeline first (one sync), and the rest of the transaction runs without it.
    def _pipeline_guard(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if self._pipe is None or context is None:
            return
        compiled = context.compiled
        if ((context.isinsert or context.isupdate or context.isdelete)
                and not (compiled is not None and compiled.effective_returning)):
            return  # plain DML: queued like the others
        self._end_pipeline()

    def _end_pipeline(self, exc: BaseException | None = None) -> None:
        """Send what is queued and wait for all of it (raises the first error, if any)."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            if exc is None:
                pipe.__exit__(None, None, None)
            else:
                pipe.__exit__(type(exc), exc, exc.__traceback__)

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

    def _run_jobs(self, jobs: list[Job]) -> None:
        t0 = time.monotonic()
        try:
            results = self._transaction(jobs)
        except BatchFailed as failed:
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
        self.commit_time.observe(time.monotonic() - t0)
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
    def _callback(job: Job, value) -> None:
        try:
            job.callback(value)
        except Exception:  # noqa: BLE001
            log.error("store writer: callback raised: %s", error_text(sys.exc_info()[1]))

    @staticmethod
    def _step_groups(jobs: list[Job], step_idx: list[int]):
        """(start, end) in ``step_idx`` of each run of consecutive StepOps sharing ``run``."""
        k = 0
        while k < len(step_idx):
            run = jobs[step_idx[k]].op.run
            m = k + 1
            while m < len(step_idx) and jobs[step_idx[m]].op.run == run:
                m += 1
            yield k, m
            k = m

    def _run_steps(self, conn, jobs: list[Job], step_idx: list[int], stored: list, results: list,
                   ahead) -> None:
        """Each run of consecutive StepOps sharing ``run`` in one call, in submit order; the
        first with what its ``read`` returned, if it has one."""
        for k, m in self._step_groups(jobs, step_idx):
            run = jobs[step_idx[k]].op.run
            pairs = [(jobs[step_idx[x]].op.item, stored[x]) for x in range(k, m)]
            outs = run(conn, pairs) if k or ahead is None else run(conn, pairs, ahead)
            for x, out in zip(range(k, m), outs):
                results[step_idx[x]] = out

    def _transaction(self, jobs: list[Job]) -> list:
        """Run ``jobs`` in one transaction and COMMIT; raise ``BatchFailed`` (rolled back)."""
        phase = "connect"
        trans = None
        raw = None
        pipelined = False
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
                    tc = time.monotonic()
                    raw.commit()
                    self.commit_s += time.monotonic() - tc
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
            # PostgreSQL, steps and ingests only (other ops may read through SQLAlchemy at any
            # point): the transaction in one pipeline (see _pipeline_guard)
            pipelined = not self._sqlite and len(ingest_idx) + sum(
                type(job.op) is StepOp for job in jobs) == len(jobs)
            if pipelined:
                raw.autocommit = True
                self._pipe = raw.pipeline()
                self._pipe.__enter__()
                raw.execute("BEGIN")
            if self._sqlite:  # on the driver (SQLAlchemy's begin then finds it begun)
                raw.execute("BEGIN IMMEDIATE")
            trans = conn.begin()
            phase = "execute"
            step_idx = []
            for i, job in enumerate(jobs):
                op = job.op
                if op is None:
                    continue
                if type(op) is StepOp:
                    step_idx.append(i)
                else:
                    results[i] = op(conn)
            ahead = None
            if step_idx and jobs[step_idx[0]].op.read is not None:
                _k, m = next(self._step_groups(jobs, step_idx))
                ahead = jobs[step_idx[0]].op.read(conn, [jobs[i].op.item for i in step_idx[:m]])
            if ingest_idx or step_idx:
                # the steps' records first (as when each step op stored its own), then the
                # plain ones: one duplicate lookup and one insert for the whole transaction
                ing = [Job([jobs[i].op.record], None, None) for i in step_idx] + [jobs[i] for i in ingest_idx]
                if self._sqlite or not step_idx:
                    outs = self._ingest(raw, ing)
                else:  # the one-statement insert (duplicate check included): one round trip
                    outs = self._ingest_pg_fast(raw, ing, autocommit=False)
                for i, out in zip(ingest_idx, outs[len(step_idx):]):
                    results[i] = out
                if step_idx:
                    self._run_steps(conn, jobs, step_idx, [out[0] for out in outs[:len(step_idx)]], results,
                                    ahead)
            if self._sqlite:
                self._merge_keys_if_due(raw)
            phase = "commit"
            tc = time.monotonic()
            if pipelined:
                raw.execute("COMMIT")  # queued after the last writes if the pipeline is open
                self._end_pipeline()
                raw.autocommit = False
            trans.commit()  # pipelined: SQLAlchemy's side only, the DBAPI connection is idle
            self.commit_s += time.monotonic() - tc
            if self._sqlite:
                self._keys_committed()
            return results
        except BaseException as exc:  # noqa: BLE001
            if self._phase_commit:
                phase = "commit"
            # in a pipeline, a statement's error may surface at the COMMIT: the server then
            # skipped the COMMIT (rolled back for sure), so only connection errors count there
            db_level = (phase != "execute" and not (pipelined and phase == "commit")) or is_db_level(exc)
            try:
                self._end_pipeline(exc)
            except Exception:  # noqa: BLE001
                db_level = True
            try:
                if trans is not None:
                    trans.rollback()
                elif raw is not None:
                    raw.rollback()
                if pipelined:
                    raw.autocommit = False
            except Exception:  # noqa: BLE001
                db_level = True
            if db_level:
                self._close_wconn()
            if not isinstance(exc, Exception):
                raise
            raise BatchFailed(exc, db_level) from exc
