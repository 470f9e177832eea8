"""Store: migrations, ingest/dedup, claims, completion, replay, listing, stats (SQLite + PostgreSQL)."""
from __future__ import annotations

import engine.store as _engine_store
from pathlib import Path
import json
import threading
import time

import pytest
import sqlalchemy as sa

from engine.store import (
    ClaimedEntry,
    Duplicate,
    EntrySpec,
    IngestRecord,
    Store,
    Stored,
    UnknownMessage,
)

CONFLICT_ACK = b"MSH|^~\\&|ENG|FAC|APP|FAC|20250101||ACK^A01^ACK|X1|P|2.5\rMSA|AE|C1\rERR|||205^Duplicate key identifier^HL70357|E\r"


def make_raw(control_id: str, body: str = "PID|1||IPP1") -> bytes:
    return (f"MSH|^~\\&|APP|FAC|RAPP|RFAC|20250101120000||ADT^A01^ADT_A01|{control_id}|P|2.5\r"
            f"{body}\r").encode()


def rec(control_id: str = "C1", *, body: str = "PID|1||IPP1", channel: str = "adt_in",
        entries=None, status: str = "routed", received_at: float | None = None,
        ack: bytes | None = None, dedup: bool = True, conflict_ack=None) -> IngestRecord:
    if entries is None:
        entries = [EntrySpec("ris", "adt_to_ris")]
    return IngestRecord(
        channel=channel, raw=make_raw(control_id, body),
        received_at=time.time() if received_at is None else received_at,
        sending_app="APP", sending_facility="FAC", receiving_app="RAPP", receiving_facility="RFAC",
        message_type="ADT^A01", control_id=control_id, version="2.5", charset="UTF-8",
        status=status, ack=ack if ack is not None else f"ACK-{control_id}-{body}".encode(),
        ack_code="AA" if status != "rejected" else "AR",
        error_code=None if status != "rejected" else "200",
        entries=entries, dedup=dedup, conflict_ack=conflict_ack)


def ingest(store: Store, records: list[IngestRecord], timeout: float = 10):
    done = threading.Event()
    box = []

    def cb(result):
        box.append(result)
        done.set()

    store.submit_ingest(records, cb)
    assert done.wait(timeout), "writer callback never fired"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def ingest_one(store, record):
    return ingest(store, [record])[0]


def run_op(store: Store, op, timeout: float = 10):
    done = threading.Event()
    box = []
    store.submit(op, lambda r: (box.append(r), done.set()))
    assert done.wait(timeout)
    return box[0]


def count(store: Store, sql: str, **params) -> int:
    with store.engine.connect() as c:
        return c.execute(sa.text(sql), params).scalar()


# --------------------------------------------------------------------------- schema


def test_migrate_twice_is_idempotent(store_url):
    s = Store(store_url)
    s.migrate()
    s.migrate()
    assert s.ping()
    insp = sa.inspect(s.engine)
    assert {"messages", "queue_entries", "events", "alembic_version"} <= set(insp.get_table_names())
    with s.engine.connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == _HEAD
    s.dispose()


def test_postgresql_payload_columns_are_compressed_with_lz4(pg_url):
    """The large payload columns use lz4 (the server here is built with it): a 286 KB report
    cost the server about 4x more to insert with the default pglz."""
    s = Store(pg_url)
    s.migrate()
    with s.engine.connect() as c:
        methods = dict(c.execute(sa.text(
            "SELECT a.attrelid::regclass::text || '.' || a.attname, a.attcompression FROM pg_attribute a "
            "WHERE a.attrelid IN ('messages'::regclass, 'queue_entries'::regclass, 'submissions'::regclass) "
            "AND a.attname IN ('raw', 'payload', 'response', 'submission', 'wrapped')")).all())
    s.dispose()
    assert set(methods.values()) == {"l"}, methods
    assert len(methods) == 5


def test_default_url_creates_data_dir(tmp_path):
    url = Store.default_url(tmp_path / "deep" / "data")
    assert url == f"sqlite:///{tmp_path / 'deep' / 'data' / 'minipfi.db'}"
    s = Store(url)
    assert s.dialect == "sqlite"
    s.migrate()
    assert (tmp_path / "deep" / "data" / "minipfi.db").exists()
    with s.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    s.dispose()


def test_ping_false_when_unreachable():
    s = Store("postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2")
    assert s.dialect == "postgresql"
    assert s.ping() is False
    s.dispose()


# --------------------------------------------------------------------------- ingest + dedup


def test_ingest_then_get_message(store):
    r = rec("C1", entries=[EntrySpec("ris", "r1", order_key="abc", transforms='["t1"]'),
                           EntrySpec("pacs", "r2")])
    r.flags = "cp1252_fallback"
    res = ingest_one(store, r)
    assert isinstance(res, Stored)
    m = store.get_message(res.message_id)
    assert m.raw == r.raw and m.ack == r.ack
    assert (m.channel, m.control_id, m.message_type, m.status, m.ack_code) == (
        "adt_in", "C1", "ADT^A01", "routed", "AA")
    assert m.size == len(r.raw) and len(m.sha256) == 64 and m.flags == "cp1252_fallback"
    assert abs(m.received_at - r.received_at) < 1e-3
    assert [(e.destination, e.route, e.order_key, e.transforms, e.status, e.attempts)
            for e in m.entries] == [("ris", "r1", "abc", '["t1"]', "queued", 0),
                                    ("pacs", "r2", "", "[]", "queued", 0)]
    assert store.get_message(10**9) is None


def test_one_submission_many_records_and_binary_safety(store):
    raw_bytes = make_raw("B1", "OBX|1|ED|||\x00\x01\xff\xfe".encode("latin-1").decode("latin-1"))
    r1 = rec("B1")
    r1.raw = raw_bytes + bytes(range(256))
    r2 = rec("B2", status="filtered", entries=[])
    r3 = rec("B3", status="rejected", entries=[])
    res = ingest(store, [r1, r2, r3])
    assert [type(x) for x in res] == [Stored, Stored, Stored]
    assert store.get_message(res[0].message_id).raw == r1.raw
    assert store.get_message(res[2].message_id).status == "rejected"


def test_duplicate_same_content_replays_stored_ack(store):
    first = ingest_one(store, rec("C1", ack=b"MSH|...|ACK original\rMSA|AA|C1\r"))
    again = rec("C1", ack=b"a different ACK the caller would have sent")
    dup = ingest_one(store, again)
    assert isinstance(dup, Duplicate)
    assert dup.same_content and dup.original_id == first.message_id and dup.message_id is None
    assert dup.ack == b"MSH|...|ACK original\rMSA|AA|C1\r"
    assert count(store, "SELECT count(*) FROM messages") == 1
    assert count(store, "SELECT count(*) FROM queue_entries") == 1
    assert count(store, "SELECT count(*) FROM events WHERE kind = 'duplicate'") == 1
    st = store.stats()["channels"]["adt_in"]
    assert st["duplicates"] == 1 and st["received"] == 2


def test_duplicate_inside_one_batch(store):
    res = ingest(store, [rec("D1"), rec("D1"), rec("D2")])
    assert isinstance(res[0], Stored) and isinstance(res[2], Stored)
    assert isinstance(res[1], Duplicate) and res[1].original_id == res[0].message_id
    assert res[1].ack == rec("D1").ack
    assert count(store, "SELECT count(*) FROM messages") == 2


def test_duplicate_different_content_conflict(store):
    first = ingest_one(store, rec("C1", body="PID|1||IPP1"))
    res = ingest_one(store, rec("C1", body="PID|1||IPP2", conflict_ack=lambda: CONFLICT_ACK))
    assert isinstance(res, Duplicate) and not res.same_content
    assert res.original_id == first.message_id and res.ack == CONFLICT_ACK
    m = store.get_message(res.message_id)
    assert m.status == "conflict" and m.entries == [] and m.ack == CONFLICT_ACK
    assert m.ack_code == "AE" and m.error_code == "205"
    with store.engine.connect() as c:
        ev = c.execute(sa.text("SELECT message_id, detail FROM events "
                               "WHERE kind = 'duplicate_conflict'")).all()
    assert len(ev) == 1 and ev[0][0] == res.message_id
    assert json.loads(ev[0][1])["original_id"] == first.message_id
    assert store.stats()["channels"]["adt_in"]["conflicts"] == 1
    # the same conflicting content again: replayed from the conflict row, nothing new stored
    again = ingest_one(store, rec("C1", body="PID|1||IPP2", conflict_ack=lambda: b"other"))
    assert isinstance(again, Duplicate) and again.same_content and again.ack == CONFLICT_ACK
    # conflict_ack None: accepted as a new message
    accepted = ingest_one(store, rec("C1", body="PID|1||IPP3"))
    assert isinstance(accepted, Stored)
    assert len(store.get_message(accepted.message_id).entries) == 1


def test_dedup_window_and_dedup_false(store_url):
    s = Store(store_url, dedup_window_seconds=3600)
    s.migrate()
    s.start()
    try:
        old = ingest_one(s, rec("W1", received_at=time.time() - 2 * 3600))
        new = ingest_one(s, rec("W1"))
        assert isinstance(new, Stored) and new.message_id != old.message_id
        assert isinstance(ingest_one(s, rec("W1")), Duplicate)
        a = ingest_one(s, rec("", dedup=False))
        b = ingest_one(s, rec("", dedup=False))
        assert isinstance(a, Stored) and isinstance(b, Stored)
        assert s.get_message(a.message_id).dedup_key is None
    finally:
        s.stop()
        s.dispose()


def test_generic_submit_and_poison_job_isolated(store):
    assert run_op(store, lambda c: c.execute(sa.text("SELECT 41 + 1")).scalar()) == 42

    def boom(conn):
        conn.execute(sa.text("INSERT INTO events (at, kind, detail) VALUES (1, 'x', '{}')"))
        raise ValueError("bad op")

    results = {}
    done = threading.Event()
    lock = threading.Lock()

    def cb(name):
        def _cb(r):
            with lock:
                results[name] = r
                if len(results) == 3:
                    done.set()
        return _cb

    store.submit_ingest([rec("P1")], cb("a"))
    store.submit(boom, cb("boom"))
    store.submit_ingest([rec("P2")], cb("b"))
    assert done.wait(10)
    assert isinstance(results["boom"], ValueError)
    assert isinstance(results["a"][0], Stored) and isinstance(results["b"][0], Stored)
    assert count(store, "SELECT count(*) FROM events WHERE kind = 'x'") == 0
    assert store.writer_healthy


# --------------------------------------------------------------------------- claims


def queue(store, n, dest="ris", keys=None):
    ids = []
    for i in range(n):
        key = keys[i] if keys else ""
        ids.append(ingest_one(store, rec(f"Q{dest}{i}", entries=[EntrySpec(dest, "r", key)]))
                   .message_id)
    return ids


def test_claim_fifo_head_blocks(store):
    mids = queue(store, 3)
    c1 = store.claim_due("ris", 10, "w1", 30)
    assert [c.message_id for c in c1] == [mids[0]]          # one in flight per destination
    assert isinstance(c1[0], ClaimedEntry) and c1[0].raw == make_raw("Qris0")
    assert (c1[0].control_id, c1[0].channel, c1[0].message_type) == ("Qris0", "adt_in", "ADT^A01")
    assert store.claim_due("ris", 10, "w1", 30) == []       # head in flight blocks the rest
    # failure with retry later: head stays queued but not due, still blocks
    later = time.time() + 3600
    assert store.complete(c1[0].id, "w1", status="queued", attempts=1, next_attempt_at=later,
                          last_error="connection refused")
    assert store.claim_due("ris", 10, "w1", 30) == []
    assert store.next_due_at("ris") == pytest.approx(later)
    again = store.claim_due("ris", 10, "w1", 30, now=later + 1)
    assert [c.id for c in again] == [c1[0].id] and again[0].attempts == 1
    assert store.complete(again[0].id, "w1", status="sent", attempts=2, response=b"ACK")
    nxt = store.claim_due("ris", 10, "w1", 30)
    assert [c.message_id for c in nxt] == [mids[1]]
    assert store.claim_due("other", 10, "w1", 30) == []


def test_claim_per_key_parallel(store):
    mids = queue(store, 5, keys=["k1", "k2", "k1", "k3", "k2"])
    claimed = store.claim_due("ris", 10, "w", 30)
    assert [c.message_id for c in claimed] == [mids[0], mids[1], mids[3]]
    assert store.claim_due("ris", 10, "w", 30) == []
    assert store.complete(claimed[1].id, "w", status="sent", attempts=1)   # k2 head done
    assert [c.message_id for c in store.claim_due("ris", 10, "w", 30)] == [mids[4]]
    # limit applies oldest first
    assert store.complete(claimed[0].id, "w", status="error", attempts=1, last_error="AR")
    assert [c.message_id for c in store.claim_due("ris", 1, "w", 30)] == [mids[2]]


def test_complete_fencing_and_events(store):
    queue(store, 1)
    c = store.claim_due("ris", 1, "owner-a", 30)[0]
    assert store.complete(c.id, "owner-b", status="sent", attempts=1) is False
    assert store.complete(c.id, "owner-a", status="sent", attempts=1, response=b"MSA|AA",
                          payload=b"transformed") is True
    assert store.complete(c.id, "owner-a", status="sent", attempts=1) is False  # not in flight
    e = store.get_message(c.message_id).entries[0]
    assert (e.status, e.attempts, e.response, e.payload, e.lease_owner) == (
        "sent", 1, b"MSA|AA", b"transformed", None)
    with pytest.raises(ValueError):
        store.complete(c.id, "owner-a", status="bogus", attempts=1)
    assert count(store, "SELECT count(*) FROM events WHERE kind = 'sent' AND entry_id = :i",
                 i=c.id) == 1
    queue(store, 1, dest="pacs")
    c2 = store.claim_due("pacs", 1, "w", 30)[0]
    assert store.complete(c2.id, "w", status="filtered", attempts=0)
    assert store.stats()["destinations"]["pacs"]["filtered"] == 1


def test_recover_in_flight_and_release(store):
    queue(store, 2, keys=["a", "b"])
    claimed = store.claim_due("ris", 10, "w", 30)
    assert len(claimed) == 2
    store.release(claimed[0].id, "w")
    assert store.stats()["destinations"]["ris"]["in_flight"] == 1
    assert store.recover_in_flight() == 1
    assert store.recover_in_flight() == 0
    d = store.stats()["destinations"]["ris"]
    assert d["queued"] == 2 and d["in_flight"] == 0 and d["oldest_queued_age_s"] >= 0
    assert count(store, "SELECT count(*) FROM events WHERE kind = 'recovered'") == 1
    again = store.claim_due("ris", 10, "w2", 30)
    assert sorted(c.id for c in again) == sorted(c.id for c in claimed)
    assert all(c.attempts == 0 for c in again)
    assert store.complete(claimed[0].id, "w", status="sent", attempts=1) is False  # fenced


def test_replay(store):
    res = ingest_one(store, rec("R1", entries=[EntrySpec("ris", "r1", "k", '["a"]'),
                                               EntrySpec("pacs", "r2")]))
    mid = res.message_id
    claimed = store.claim_due("ris", 1, "w", 30)
    store.complete(claimed[0].id, "w", status="error", attempts=3, last_error="AR")
    # default: only the targets that ended in error; pacs still waits, it is not queued twice
    assert store.replay([mid]) == {mid: 1}
    entries = store.get_message(mid).entries
    assert len(entries) == 3
    new = entries[-1]
    assert (new.destination, new.route, new.order_key, new.transforms, new.status, new.attempts,
            new.replay_of) == ("ris", "r1", "k", '["a"]', "queued", 0, claimed[0].id)
    # replay again: the replayed entry is live, nothing is added
    assert store.replay([mid]) == {mid: 0}
    assert store.replay([mid], ["ris", "pacs"]) == {mid: 0}
    assert count(store, "SELECT count(*) FROM events WHERE kind = 'replay'") == 3
    filtered = ingest_one(store, rec("R2", status="filtered", entries=[])).message_id
    assert store.replay([filtered]) == {filtered: 0}
    with pytest.raises(UnknownMessage):
        store.replay([mid, 987654321])
    with pytest.raises(KeyError):
        store.replay([987654321])
    assert len(store.get_message(mid).entries) == 3   # the failed replay wrote nothing


def test_stats_counts_only_new_rows_and_match_a_full_recount(store, store_url):
    """stats() keeps message and duplicate counts between calls and adds the rows above its
    marks: after more ingests (new rows, duplicates, rejections, another channel) it must say
    exactly what a fresh Store (counting everything once) says, and it must not read the rows
    it already counted."""
    ingest(store, [rec("K1"), rec("K2", status="filtered", entries=[])])
    first = store.stats()
    assert first["channels"]["adt_in"]["received"] == 2
    ingest(store, [rec("K1"), rec("K3", status="rejected", entries=[]), rec("K4")])
    ingest_one(store, rec("K5", channel="lab", entries=[EntrySpec("lis", "r")]))
    ingest_one(store, rec("K4"))
    again = store.stats()
    assert again["channels"]["adt_in"] == {"received": 6, "filtered": 1, "rejected": 1,
                                           "duplicates": 2, "conflicts": 0}
    def no_age(st):  # the oldest entry's age moves with the clock
        return {d: {k: v for k, v in c.items() if k != "oldest_queued_age_s"}
                for d, c in st["destinations"].items()}

    fresh = Store(store_url)
    try:
        recount = fresh.stats()
    finally:
        fresh.dispose()
    assert recount["channels"] == again["channels"]
    assert no_age(recount) == no_age(again)
    # the rows already counted are not read again: only ids above the mark are queried
    seen = []
    orig = store._read

    def spy():
        cm = orig()

        class Wrap:
            def __enter__(self):
                conn = cm.__enter__()
                real = conn.execute

                def execute(stmt, params=None, *a, **k):
                    seen.append((str(stmt), dict(params or {})))
                    return real(stmt, params, *a, **k)
                conn.execute = execute
                return conn

            def __exit__(self, *exc):
                return cm.__exit__(*exc)
        return Wrap()
    store._read = spy
    try:
        store.stats()
    finally:
        store._read = orig
    mark = max(p.get("w", 0) for q, p in seen if "FROM messages" in q)
    with store.engine.connect() as c:
        assert mark == c.execute(sa.text("SELECT max(id) FROM messages")).scalar()


def test_list_messages_aggregate_status(store):
    sent = ingest_one(store, rec("L1")).message_id
    err = ingest_one(store, rec("L2", entries=[EntrySpec("pacs", "r")])).message_id
    queued = ingest_one(store, rec("L3", entries=[EntrySpec("hl7", "r")])).message_id
    filt = ingest_one(store, rec("L4", status="filtered", entries=[])).message_id
    rej = ingest_one(store, rec("L5", status="rejected", entries=[], channel="other")).message_id
    c = store.claim_due("ris", 1, "w", 30)[0]
    store.complete(c.id, "w", status="sent", attempts=1)
    c = store.claim_due("pacs", 1, "w", 30)[0]
    store.complete(c.id, "w", status="error", attempts=1)
    rows = store.list_messages()
    assert [r.id for r in rows] == [rej, filt, queued, err, sent]
    assert {r.id: r.status for r in rows} == {
        sent: "sent", err: "error", queued: "queued", filt: "filtered", rej: "rejected"}
    r0 = rows[-1]
    assert (r0.channel, r0.control_id, r0.message_type, r0.sending_app, r0.sending_facility) == (
        "adt_in", "L1", "ADT^A01", "APP", "FAC")
    assert r0.size == len(make_raw("L1")) and r0.received_at.endswith("+00:00")
    assert [r.id for r in store.list_messages(limit=2, offset=1)] == [filt, queued]
    assert [r.id for r in store.list_messages(channel="other")] == [rej]
    # a replay supersedes the error
    store.replay([err])
    assert {r.id: r.status for r in store.list_messages()}[err] == "queued"


def test_stats(store):
    ingest(store, [rec("S1"), rec("S2", status="filtered", entries=[]),
                   rec("S3", status="rejected", entries=[]), rec("S1")])
    ingest_one(store, rec("S1", body="PID|1||OTHER", conflict_ack=lambda: CONFLICT_ACK))
    ingest_one(store, rec("S9", channel="lab", entries=[EntrySpec("lis", "r")]))
    st = store.stats()
    assert st["channels"]["adt_in"] == {"received": 5, "filtered": 1, "rejected": 1,
                                        "duplicates": 1, "conflicts": 1}
    assert st["channels"]["lab"]["received"] == 1
    ris = st["destinations"]["ris"]
    assert ris["queued"] == 1 and ris["sent"] == 0 and ris["oldest_queued_age_s"] is not None
    c = store.claim_due("lis", 1, "w", 30)
    assert store.stats()["destinations"]["lis"]["in_flight"] == 1
    store.complete(c[0].id, "w", status="sent", attempts=1)
    lis = store.stats()["destinations"]["lis"]
    assert lis["sent"] == 1 and lis["oldest_queued_age_s"] is None


def test_add_event(store):
    store.add_event("alert", channel="adt_in", detail={"reason": "queue depth"})
    with store.engine.connect() as c:
        row = c.execute(sa.text("SELECT kind, channel, detail FROM events")).one()
    assert row[0] == "alert" and json.loads(row[2]) == {"reason": "queue depth"}


def test_concurrent_claimers_never_double_claim(store_url):
    """Two Store instances (two pools), two threads each, claiming per-key heads in parallel."""
    writer = Store(store_url)
    writer.migrate()
    writer.start()
    keys = [f"k{i % 20}" for i in range(200)]
    ingest(writer, [rec(f"CC{i}", entries=[EntrySpec("ris", "r", keys[i])]) for i in range(200)])
    writer.stop()
    stores = [writer, Store(store_url)]
    claimed: list[int] = []
    lock = threading.Lock()
    errors = []

    def worker(s: Store, name: str):
        try:
            idle = 0
            while idle < 20:
                got = s.claim_due("ris", 5, name, 30)
                if not got:
                    idle += 1
                    time.sleep(0.005)
                    continue
                idle = 0
                with lock:
                    claimed.extend(c.id for c in got)
                for c in got:
                    assert s.complete(c.id, name, status="sent", attempts=1)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(stores[i % 2], f"w{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(claimed) == 200 and len(set(claimed)) == 200
    assert writer.stats()["destinations"]["ris"]["sent"] == 200
    for s in stores:
        s.dispose()


def test_mixed_batch_new_duplicates_and_conflicts(store):
    x = ingest_one(store, rec("X1")).message_id
    res = ingest(store, [rec("N1"), rec("X1"), rec("N2"),
                         rec("X1", body="PID|1||CHANGED", conflict_ack=lambda: CONFLICT_ACK),
                         rec("N1"), rec("N3", dedup=False)])
    assert [type(r).__name__ for r in res] == ["Stored", "Duplicate", "Stored", "Duplicate",
                                               "Duplicate", "Stored"]
    assert res[1].same_content and res[1].original_id == x and res[1].ack == rec("X1").ack
    assert not res[3].same_content and res[3].original_id == x and res[3].ack == CONFLICT_ACK
    assert res[4].same_content and res[4].original_id == res[0].message_id
    assert store.get_message(res[3].message_id).status == "conflict"
    assert count(store, "SELECT count(*) FROM messages") == 5
    assert count(store, "SELECT count(*) FROM queue_entries") == 4
    st = store.stats()["channels"]["adt_in"]
    assert (st["received"], st["duplicates"], st["conflicts"]) == (7, 2, 1)


_HEAD = sorted(p.name[:4] for p in (Path(_engine_store.__file__).parent / "migrations" / "versions").glob("0*.py"))[-1]


# --- duplicate keys: held in memory on SQLite, merged into dedup_index, read back at start ---

def _dedup_index_rows(store):
    return count(store, "SELECT count(*) FROM dedup_index")


@pytest.mark.parametrize("merge_at", [3, 10_000])
def test_duplicates_found_before_and_after_the_keys_are_merged(store_url, monkeypatch, merge_at):
    """On SQLite the latest keys are held by the writer and written into dedup_index once
    DEDUP_MERGE_AT are held (3: a merge every other batch; 10,000: never in this test); a key
    is found wherever it is: merged, held, or written earlier in the same transaction. On
    PostgreSQL the setting does nothing and the same answers are expected."""
    import engine.store.dedup as store_mod

    monkeypatch.setattr(store_mod, "DEDUP_MERGE_AT", merge_at)
    s = Store(store_url)
    s.migrate()
    s.start()
    try:
        first = {}
        for b in range(4):
            for r in ingest(s, [rec(f"M{b}a"), rec(f"M{b}b")]):
                first[r.message_id] = r
        ids = sorted(first)
        again = ingest(s, [rec(f"M{b}{x}") for b in range(4) for x in "ab"])
        assert [type(r) for r in again] == [Duplicate] * 8
        assert [r.original_id for r in again] == ids
        assert all(r.same_content for r in again)
        conflict = ingest_one(s, rec("M0a", body="PID|1||CHANGED", conflict_ack=lambda: CONFLICT_ACK))
        assert not conflict.same_content and conflict.original_id == ids[0]
        assert conflict.ack == CONFLICT_ACK
        # the conflict row is a key like any other: the same changed content is its duplicate
        assert ingest_one(s, rec("M0a", body="PID|1||CHANGED")).original_id == conflict.message_id
        if s.dialect == "sqlite":
            merged = _dedup_index_rows(s)
            assert (merged > 0) == (merge_at == 3)
            with s.engine.connect() as c:
                mark = c.execute(sa.text(
                    "SELECT value FROM store_meta WHERE name = 'dedup_merged_to'")).scalar()
            assert (mark > 0) == (merge_at == 3)
            assert merged == count(s, f"SELECT count(*) FROM messages WHERE id <= {mark}")
    finally:
        s.stop()
        s.dispose()


@pytest.mark.parametrize("merge_at", [5, 10_000])
def test_duplicates_found_after_a_restart(store_url, monkeypatch, merge_at):
    """A new writer reads the keys written after the last merge back from messages: a resend
    after a restart (or a crash) is still a duplicate, merged or not."""
    import engine.store.dedup as store_mod

    monkeypatch.setattr(store_mod, "DEDUP_MERGE_AT", merge_at)
    s = Store(store_url)
    s.migrate()
    s.start()
    stored = [ingest_one(s, rec(f"R{i}")).message_id for i in range(8)]
    s.stop()
    s.dispose()
    s2 = Store(store_url)
    s2.migrate()
    s2.start()
    try:
        res = ingest(s2, [rec(f"R{i}") for i in range(8)] + [rec("R-new")])
        assert [type(r) for r in res] == [Duplicate] * 8 + [Stored]
        assert [r.original_id for r in res[:8]] == stored
        assert res[0].ack == rec("R0").ack
    finally:
        s2.stop()
        s2.dispose()


def test_sqlite_migration_moves_existing_keys_into_dedup_index(sqlite_url):
    """A store created before migration 0005 keeps answering its messages' resends as
    duplicates: the migration copies their keys into dedup_index and sets the mark."""
    from alembic import command
    from alembic.config import Config

    s = Store(sqlite_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(_engine_store.__file__).parent / "migrations"))
    with s._wengine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    r = rec("OLD1")
    with s._wengine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO messages (channel, received_at, sending_app, sending_facility, "
            "message_type, control_id, size, sha256, dedup_key, status, ack, raw) VALUES "
            "('adt_in', :at, 'APP', 'FAC', 'ADT^A01', 'OLD1', :size, :sha, 'APP|FAC|OLD1', "
            "'routed', :ack, :raw)"),
            {"at": time.time(), "size": len(r.raw), "sha": __import__("hashlib").sha256(r.raw).hexdigest(),
             "ack": r.ack, "raw": r.raw})
    s.migrate()
    assert _dedup_index_rows(s) == 1
    with s.engine.connect() as c:
        assert "ix_messages_dedup" not in {i["name"] for i in sa.inspect(c).get_indexes("messages")}
    s.start()
    try:
        dup = ingest_one(s, rec("OLD1"))
        assert isinstance(dup, Duplicate) and dup.same_content and dup.ack == r.ack
    finally:
        s.stop()
        s.dispose()


@pytest.mark.parametrize("status,error,nxt", [("sent", None, None), ("filtered", None, None),
                                              ("error", "bad ACK", None), ("queued", None, 12.5),
                                              ("queued", "x" * 600, 3.0)])
def test_outcome_event_detail_is_the_json_of_its_fields(status, error, nxt):
    """The fast path for plain outcomes writes what json.dumps writes for the same fields."""
    from engine.store.models import Completion
    from engine.store.queue import _event_detail

    c = Completion(7, status, 3, nxt, error)
    expected = {"attempts": 3}
    if error is not None:
        expected["error"] = error[:500]
    if status == "queued":
        expected["next_attempt_at"] = nxt
    assert _event_detail(c, nxt) == json.dumps(expected)
