"""Store writer thread: failure handling, crash durability (SIGKILL), throughput sanity."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.store import EntrySpec, IngestRecord, Store, Stored

from .test_store import ingest, rec, run_op

ROOT = Path(__file__).resolve().parent.parent


def submit_wait(store: Store, records, timeout: float = 30):
    done = threading.Event()
    box = []
    store.submit_ingest(records, lambda r: (box.append(r), done.set()))
    assert done.wait(timeout), "callback never fired"
    return box[0]


def n_messages(store: Store, control_id: str) -> int:
    with store.engine.connect() as c:
        return c.execute(sa.text("SELECT count(*) FROM messages WHERE control_id = :c"),
                         {"c": control_id}).scalar()


# --------------------------------------------------------------------------- failures


def test_writer_survives_locked_sqlite(sqlite_url):
    s = Store(sqlite_url)
    s.migrate()
    s.start()
    try:
        assert isinstance(ingest(s, [rec("OK1")])[0], Stored)
        # shorten the writer connection's busy timeout (reset when it reconnects)
        run_op(s, lambda c: c.exec_driver_sql("PRAGMA busy_timeout=200"))
        path = sa.engine.make_url(sqlite_url).database
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            res = submit_wait(s, [rec("FAIL1"), rec("FAIL2")])
            assert isinstance(res, BaseException)
            assert s.writer_healthy is False
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert isinstance(ingest(s, [rec("OK2")])[0], Stored)
        assert s.writer_healthy is True
        assert n_messages(s, "FAIL1") == 0 and n_messages(s, "FAIL2") == 0
        assert n_messages(s, "OK2") == 1
    finally:
        s.stop()
        s.dispose()


def test_writer_survives_killed_postgresql_connection(pg_url):
    s = Store(pg_url)
    s.migrate()
    s.start()
    try:
        assert isinstance(ingest(s, [rec("OK1")])[0], Stored)
        pid = run_op(s, lambda c: c.exec_driver_sql("SELECT pg_backend_pid()").scalar())
        with s.engine.connect() as c:
            assert c.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        time.sleep(0.2)
        res = submit_wait(s, [rec("FAIL1")])
        assert isinstance(res, BaseException)
        assert s.writer_healthy is False
        assert isinstance(ingest(s, [rec("OK2")])[0], Stored)
        assert s.writer_healthy is True
        assert n_messages(s, "FAIL1") == 0 and n_messages(s, "OK2") == 1
    finally:
        s.stop()
        s.dispose()


def test_writer_unreachable_database_fails_every_callback():
    s = Store("postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2")
    s.start()
    try:
        results = []
        done = threading.Event()

        def cb(r):
            results.append(r)
            if len(results) == 3:
                done.set()

        s.submit_ingest([rec("A")], cb)
        s.submit(lambda c: 1, cb)
        s.submit_ingest([rec("B"), rec("C")], cb)
        assert done.wait(30)
        assert all(isinstance(r, BaseException) for r in results)
        assert s.writer_healthy is False
        # still serving (and still failing) later submissions
        assert isinstance(submit_wait(s, [rec("D")]), BaseException)
    finally:
        s.stop()
        s.dispose()
    # after stop, submissions are refused immediately
    box = []
    s.submit_ingest([rec("E")], box.append)
    assert isinstance(box[0], RuntimeError)


# --------------------------------------------------------------------------- crash durability

CHILD = textwrap.dedent("""
    import sys, threading, time
    from engine.store import Store, IngestRecord, EntrySpec, Stored
    url = sys.argv[1]
    s = Store(url)
    s.migrate()
    s.start()
    out_lock = threading.Lock()
    raw = b"MSH|^~\\\\&|APP|FAC|R|F|20250101||ADT^A01|%s|P|2.5\\rPID|1||X\\r" + b"Z" * 600

    def producer(n):
        i = 0
        while True:
            cid = f"{n}-{i}"
            r = IngestRecord("ch", raw % cid.encode(), time.time(), "APP", "FAC", "R", "F",
                             "ADT^A01", cid, "2.5", "UTF-8", "routed", b"ACK " + cid.encode(),
                             "AA", entries=[EntrySpec("d", "r")])
            ev = threading.Event()

            def cb(res, ev=ev):
                if isinstance(res, list) and isinstance(res[0], Stored):
                    with out_lock:
                        sys.stdout.write(f"{res[0].message_id}\\n")
                        sys.stdout.flush()
                ev.set()

            s.submit_ingest([r], cb)
            ev.wait()
            i += 1

    sys.stdout.write("READY\\n")
    sys.stdout.flush()
    for n in range(4):
        threading.Thread(target=producer, args=(n,), daemon=True).start()
    time.sleep(60)
""")


def crash_run(tmp_path: Path, url: str, want: int = 1500) -> list[int]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE,
                            cwd=str(ROOT), env=env)
    acked: list[int] = []
    deadline = time.monotonic() + 30
    try:
        assert proc.stdout.readline().strip() == b"READY"
        while len(acked) < want and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line.endswith(b"\n"):
                break
            acked.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
    # lines fully written before the kill count as acknowledged too
    for line in rest.split(b"\n")[:-1]:
        acked.append(int(line))
    return acked


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_crash_durability_sigkill(backend, tmp_path, request):
    url = (f"sqlite:///{tmp_path / 'crash.db'}" if backend == "sqlite"
           else request.getfixturevalue("pg_url"))
    acked = crash_run(tmp_path, url)
    assert len(acked) > 100
    s = Store(url)
    try:
        with s.engine.connect() as c:
            present = set(c.execute(sa.text("SELECT id FROM messages")).scalars())
            n_entries = c.execute(sa.text("SELECT count(*) FROM queue_entries")).scalar()
        missing = set(acked) - present
        assert not missing, f"{len(missing)} acknowledged messages lost"
        assert n_entries == len(present)       # never a message without its entries
        print(f"\n[{backend}] acked {len(acked)}, stored {len(present)} after SIGKILL")
    finally:
        s.dispose()


# --------------------------------------------------------------------------- throughput


def test_throughput_sanity(store_url):
    """8 closed-loop producers (each waits for its result before the next); prints records/s."""
    s = Store(store_url)
    s.migrate()
    s.start()
    raw = (b"MSH|^~\\&|APP|FAC|RAPP|RFAC|20250101120000||ADT^A01^ADT_A01|%s|P|2.5\r"
           b"EVN|A01|20250101120000\rPID|1||123456^^^HOSP^PI||NAME^GIVEN||19700101|M\r"
           + b"PV1|1|I|WARD^101^1^HOSP||||1234^DR^X|||||||||||V1||||||||||||||||||||||||20250101\r"
           * 5)
    duration = 2.0
    stop_at = time.monotonic() + duration
    counts = [0] * 8
    errors = []

    def producer(n):
        lock = threading.Lock()
        box = []

        def cb(res):
            box.append(res)
            lock.release()

        i = 0
        while time.monotonic() < stop_at:
            cid = f"{n}-{i}"
            r = IngestRecord("ch", raw % cid.encode(), time.time(), "APP", "FAC", "RAPP", "RFAC",
                             "ADT^A01", cid, "2.5", "UTF-8", "routed", b"ACK", "AA",
                             entries=[EntrySpec("dest", "route")])
            lock.acquire()
            s.submit_ingest([r], cb)
            lock.acquire()
            lock.release()
            if not isinstance(box.pop(), list):
                errors.append(cid)
            i += 1
        counts[n] = i

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    total = sum(counts)
    rate = total / elapsed
    batch = s.batched_jobs / max(1, s.batches)
    s.stop()
    try:
        with s.engine.connect() as c:
            stored = c.execute(sa.text("SELECT count(*) FROM messages")).scalar()
    finally:
        s.dispose()
    print(f"\n[{s.dialect}] 8 producers: {rate:.0f} records/s ({total} in {elapsed:.2f}s, "
          f"mean batch {batch:.1f})")
    assert not errors
    assert stored == total
    assert rate > 500


def test_writer_bug_fails_the_batch_callbacks_instead_of_hanging(sqlite_url, monkeypatch):
    """A non-database exception escaping the transaction code (a bug) must not leave producers
    waiting forever for an answer: every callback of the batch gets the error, and the writer
    goes on with the next batch."""
    s = Store(sqlite_url)
    s.migrate()
    real = Store._run_jobs
    calls = []

    def broken(self, jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise KeyError("bug")
        return real(self, jobs)

    monkeypatch.setattr(Store, "_run_jobs", broken)
    s.start()
    try:
        res = submit_wait(s, [rec("BUG1"), rec("BUG2")], timeout=10)
        assert isinstance(res, KeyError)
        assert isinstance(submit_wait(s, [rec("AFTER")])[0], Stored)
        assert n_messages(s, "BUG1") == 0
    finally:
        s.stop()
        s.dispose()


def test_linger_wakes_when_the_target_is_reached(sqlite_url):
    """While lingering the writer is woken once the expected records are queued (not at each
    submit), and never later than the deadline: a lone producer is not held up."""
    s = Store(sqlite_url)
    s.migrate()
    s.linger = 0.5
    s.linger_factor = 1000.0  # the deadline is 0.5 s after a commit: only the target ends it early
    s.start()
    try:
        # two producers: batch of 2, so the writer then lingers for 2 records
        done = threading.Event()
        box = []

        def cb(r):
            box.append(r)
            if len(box) == 2:
                done.set()

        s.submit_ingest([rec("L1")], cb)
        s.submit_ingest([rec("L2")], cb)
        assert done.wait(10)
        t0 = time.monotonic()
        first = threading.Event()
        s.submit_ingest([rec("L3")], lambda r: first.set())
        time.sleep(0.05)
        assert not first.is_set()  # held: one of the two expected records
        s.submit_ingest([rec("L4")], lambda r: None)
        assert first.wait(5)
        assert time.monotonic() - t0 < 0.4  # woken by the target, before the deadline
        t1 = time.monotonic()
        lone = threading.Event()
        s.submit_ingest([rec("L5")], lambda r: lone.set())
        assert lone.wait(5)  # alone: released at the deadline at the latest
        assert time.monotonic() - t1 < 2.0
    finally:
        s.stop()
        s.dispose()


def test_after_batch_runs_once_per_transaction_after_its_callbacks(sqlite_url):
    """The hook that lets the engine hand a commit's results to the reactor in one wake-up runs
    in the writer thread after every callback of the transaction, once per transaction, and
    also after a refused submit (writer stopped), so no result waits for a hand-off that never
    comes."""
    s = Store(sqlite_url)
    s.migrate()
    events = []
    s.after_batch = lambda: events.append(("after", threading.get_ident()))
    gate = threading.Event()
    s.submit(lambda c: gate.wait(5), lambda r: None)  # holds the writer while jobs queue up
    s.start()
    try:
        done = threading.Event()
        for i in range(3):
            s.submit_ingest([rec(f"AB{i}")], lambda r, i=i: (events.append(("cb", i)),
                                                             i == 2 and done.set()))
        gate.set()
        assert done.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and events[-1][0] != "after":
            time.sleep(0.01)
        cbs = [e for e in events if e[0] == "cb"]
        assert [e[1] for e in cbs] == [0, 1, 2]
        # the three ingests went into one transaction: one hook call after their callbacks
        last_cb = max(i for i, e in enumerate(events) if e[0] == "cb")
        assert events[last_cb + 1][0] == "after"
        assert sum(1 for e in events[events.index(cbs[0]):] if e[0] == "after") == 1
        assert events[-1][1] == s._thread.ident
    finally:
        s.stop()
        s.dispose()
    events.clear()
    box = []
    s.submit_ingest([rec("LATE")], box.append)
    assert isinstance(box[0], RuntimeError) and [e[0] for e in events] == ["after"]


# --------------------------------------------------------------------------- background work


def test_background_op_waits_for_the_ingest_queued_with_it(sqlite_url, monkeypatch):
    """A background op (delivery's claims and outcomes) never shares a transaction with ingest
    records queued at the same time, and the records go first: their ACKs wait for their own
    commit, not for the op."""
    from engine.store import writer as store_mod

    monkeypatch.setattr(store_mod, "BACKGROUND_WAIT_S", 30.0)
    s = Store(sqlite_url)
    s.migrate()
    order = []
    gate = threading.Event()
    s.submit(lambda c: gate.wait(5), lambda r: None)  # holds the writer while jobs queue up
    s.start()
    try:
        done = threading.Event()

        def seen(conn):  # in the background op's transaction: is the record committed?
            return conn.execute(sa.text("SELECT count(*) FROM messages WHERE control_id = 'FG1'")).scalar()

        s.submit(seen, lambda r: (order.append(("background", r)), done.set()), background=True)
        s.submit_ingest([rec("FG1")], lambda r: order.append(("ingest", type(r[0]).__name__)))
        gate.set()
        assert done.wait(10)
        assert order == [("ingest", "Stored"), ("background", 1)]
    finally:
        s.stop()
        s.dispose()


def test_background_op_runs_under_continuous_ingest(sqlite_url, monkeypatch):
    """Ingest that never stops does not hold a background op back for more than about
    ``BACKGROUND_WAIT_S``: delivery keeps its share of the writer."""
    from engine.store import writer as store_mod

    monkeypatch.setattr(store_mod, "BACKGROUND_WAIT_S", 0.05)
    s = Store(sqlite_url)
    s.migrate()
    s.start()
    stop = threading.Event()

    def producer(n):
        i = 0
        while not stop.is_set():
            i += 1
            submit_wait(s, [rec(f"P{n}-{i}")])

    producers = [threading.Thread(target=producer, args=(n,), daemon=True) for n in range(4)]
    try:
        for t in producers:
            t.start()
        time.sleep(0.2)
        for _ in range(5):
            t0 = time.monotonic()
            done = threading.Event()
            s.submit(lambda c: None, lambda r: done.set(), background=True)
            assert done.wait(5)
            assert time.monotonic() - t0 < 2.0
    finally:
        stop.set()
        for t in producers:
            t.join(10)
        s.stop()
        s.dispose()
