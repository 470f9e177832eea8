"""SQLite checkpoints: the WAL's length read from its WAL-index, and a WAL the writer keeps
bounded whatever writes it (ingest, or ops such as delivery's claims and outcomes)."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from engine.store import EntrySpec, IngestRecord, Store, Stored, wal_index
from engine.store import writer as writer_mod

from .test_store_writer import submit_wait


def run_op(store: Store, op, timeout: float = 30):
    done = threading.Event()
    box = []
    store.submit(op, lambda r: (box.append(r), done.set()))
    assert done.wait(timeout), "op never answered"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


# --------------------------------------------------------------------------- the WAL-index


def test_wal_index_reads_the_length_and_the_backfill_sqlite_reports(tmp_path):
    path = str(tmp_path / "x.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (v BLOB)")
    for _ in range(40):
        conn.execute("INSERT INTO t VALUES (randomblob(3000))")
    shm = wal_index.shm_path(path)
    before = wal_index.read(shm)
    busy, log_frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert (busy, before.frames, before.backfilled) == (0, log_frames, 0)
    after = wal_index.read(shm)
    assert (after.frames, after.backfilled, after.pending) == (log_frames, copied, 0)
    conn.execute("INSERT INTO t VALUES (1)")  # a complete checkpoint: the WAL restarts
    assert wal_index.read(shm).frames < 5
    conn.close()


def test_wal_index_refuses_a_header_being_rewritten_or_not_initialised(tmp_path):
    path = str(tmp_path / "x.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (v)")
    data = bytearray(open(path + "-shm", "rb").read(200))
    assert wal_index.parse(bytes(data)) is not None
    torn = bytearray(data)
    torn[16] ^= 1  # mxFrame of the first copy only
    assert wal_index.parse(bytes(torn)) is None
    cold = bytearray(data)
    cold[12] = cold[48 + 12] = 0  # isInit
    assert wal_index.parse(bytes(cold)) is None
    assert wal_index.parse(bytes(data[:99])) is None
    assert wal_index.read(str(tmp_path / "none-shm")) is None
    assert wal_index.shm_path(":memory:") is None and wal_index.shm_path(None) is None
    assert wal_index.shm_path("file:/d/x.db?mode=rwc") == "/d/x.db-shm"
    conn.close()


_DMS_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)  # SQLite's unix VFS: the DMS byte
except OSError:
    print("held")
else:
    print("free")
"""


def _dms_lock_seen_from_another_process(shm: str) -> str:
    return subprocess.run([sys.executable, "-c", _DMS_PROBE, shm], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_reading_the_wal_index_keeps_sqlite_s_locks(tmp_path):
    """POSIX record locks belong to the process and the file: closing ANY descriptor of the
    ``-shm`` releases every lock SQLite's connections of this process hold on it. Without its
    dead-man-switch lock another connection takes the WAL-index for abandoned and rebuilds it
    under the feet of the others (a SIGBUS of the engine, seen in a test run). The reader keeps
    one descriptor open per file instead of opening and closing one per read."""
    path = str(tmp_path / "x.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (v)")
    shm = wal_index.shm_path(path)
    assert _dms_lock_seen_from_another_process(shm) == "held"
    for _ in range(3):
        assert wal_index.read(shm) is not None
    assert _dms_lock_seen_from_another_process(shm) == "held"
    conn.execute("INSERT INTO t VALUES (1)")
    assert wal_index.read(shm).frames >= 1
    conn.close()


def test_the_reader_follows_a_wal_index_recreated_by_sqlite(tmp_path):
    """The last connection's close deletes the ``-shm``; the next one creates a new file, which
    the reader then reads (not the deleted one it still had open)."""
    path = str(tmp_path / "x.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (v)")
    shm = wal_index.shm_path(path)
    first = wal_index.read(shm).frames
    conn.close()
    assert not os.path.exists(shm)
    assert wal_index.read(shm) is None
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    for _ in range(20):
        conn.execute("INSERT INTO t VALUES (randomblob(5000))")
    assert wal_index.read(shm).frames > first + 20
    assert _dms_lock_seen_from_another_process(shm) == "held"
    conn.close()


# --------------------------------------------------------------------------- through the writer


@pytest.fixture
def small_wal(monkeypatch):
    """Thresholds of a few MB, so that a test writes a few of them."""
    monkeypatch.setattr(writer_mod, "WAL_CHECKPOINT_FRAMES", 1024)
    monkeypatch.setattr(writer_mod, "WAL_RETRY_FRAMES", 256)


def _pad(n_rows: int):
    def op(conn):
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS pad (id INTEGER PRIMARY KEY, v BLOB)")
        conn.exec_driver_sql(f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                             f"WHERE i < {n_rows}) INSERT INTO pad SELECT i, randomblob(1000) FROM n")
    return op


def _scatter(ids: list[int]):
    """Like a claim or an outcome group of per-patient lanes: rows all over a table."""
    def op(conn):
        conn.exec_driver_sql(f"UPDATE pad SET v = randomblob(1000) WHERE id IN ({','.join(map(str, ids))})")
    return op


def test_writes_the_writer_does_not_know_keep_the_wal_bounded(sqlite_url, small_wal):
    """Ops that rewrite pages all over a table (200 pages a commit, 120 MB in all), like the
    claims and outcomes of per-patient lanes: the writer checkpoints once the WAL reached the
    threshold (when it estimated the WAL from the messages' bytes, such writes were not
    counted and the WAL grew by all of them)."""
    s = Store(sqlite_url)
    s.migrate()
    s.linger = 0
    s.start()
    try:
        run_op(s, _pad(4000))
        longest = 0
        step = 4000 // 200
        for n in range(150):
            run_op(s, _scatter([1 + (n % step) + step * k for k in range(200)]))
            longest = max(longest, wal_index.read(s._shm).frames)
        # the threshold and the commits of one WAL_CHECK_S
        assert longest <= 1024 + 3 * 200, longest
        assert s.checkpoints >= 20  # 30,000 pages written
        assert s.checkpoint_failures == 0
    finally:
        s.stop()
        s.dispose()


def test_a_reader_that_holds_the_wal_delays_the_restart_not_the_writer(sqlite_url, small_wal):
    """A checkpoint cannot copy the frames a reader's snapshot still needs: the writer tries
    again WAL_RETRY_FRAMES later (not after every commit), and restarts the WAL once the
    reader is gone."""
    s = Store(sqlite_url)
    s.migrate()
    s.linger = 0
    s.start()
    reader = sqlite3.connect(sa.engine.make_url(sqlite_url).database, isolation_level=None)
    try:
        run_op(s, _pad(2000))
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM pad").fetchone()  # a snapshot held open
        before = s.checkpoints
        for n in range(40):
            run_op(s, _scatter(list(range(1 + n, 2000, 40))))  # 50 rows a commit
        state = wal_index.read(s._shm)
        assert state.frames > 1024 and state.pending > 0  # could not restart under the reader
        tries = s.checkpoints - before
        assert 1 <= tries <= state.frames // 256 + 1, tries
        reader.execute("COMMIT")
        for n in range(40):
            run_op(s, _scatter(list(range(1 + n, 2000, 40))))
            if wal_index.read(s._shm).frames < state.frames:
                break
        assert wal_index.read(s._shm).frames < state.frames  # restarted at its first frame
    finally:
        reader.close()
        s.stop()
        s.dispose()


def test_ingest_alone_keeps_the_wal_below_the_journal_size_limit(sqlite_url, small_wal):
    """800 commits of 8 small records, about 7 frames each (23 MB without checkpoints): the WAL
    is overwritten from its start rather than grown (an appending WAL makes every commit's
    fdatasync also journal the file size)."""
    s = Store(sqlite_url)
    s.migrate()
    s.linger = 0
    s.start()
    try:
        big = b"MSH|^~\\&|A|F|R|RF|20250101||ADT^A01|%s|P|2.5\rPID|1||X\r"
        path = sa.engine.make_url(sqlite_url).database + "-wal"
        biggest = 0
        for n in range(800):
            recs = [IngestRecord("ch", big % f"W{n}-{i}".encode(), time.time(), "A", "F", "R", "RF",
                                 "ADT^A01", f"W{n}-{i}", "2.5", "", "routed", b"ACK", "AA",
                                 entries=[EntrySpec("dest", "route")]) for i in range(8)]
            assert isinstance(submit_wait(s, recs)[0], Stored)
            biggest = max(biggest, os.path.getsize(path))
        # the threshold and the commits of one WAL_CHECK_S (0.2-1 ms each)
        assert biggest <= (1024 + 200) * (4096 + 24), biggest
        assert s.checkpoints >= 3
    finally:
        s.stop()
        s.dispose()


def test_the_writer_checkpoints_when_idle_and_the_wal_restarts(sqlite_url):
    s = Store(sqlite_url)
    s.migrate()
    s.start()
    try:
        run_op(s, _pad(500))
        deadline = time.monotonic() + 5
        while s.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.checkpoints >= 1
        state = wal_index.read(s._shm)
        assert state.pending == 0
        run_op(s, _scatter([1, 2]))
        assert wal_index.read(s._shm).frames < state.frames  # restarted at its first frame
        assert s._shm in wal_index._open
    finally:
        s.stop()
        s.dispose()
    # the last connection closed, SQLite deleted the -shm: its descriptor is closed too
    assert not os.path.exists(s._shm) and s._shm not in wal_index._open
