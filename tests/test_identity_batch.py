"""The identity feed's batch apply (``apply_events``: one read for the lookups of a group commit,
writes held and sent grouped) against the same ADTs applied one per transaction, on SQLite and
PostgreSQL: same results, same registry rows, same history in the same order."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import sqlalchemy as sa

from engine.config import IdentityFeedConfig
from engine.identity import InsPolicy, parse_adt
from engine.steps.identity_feed import IdentityFeed
from engine.store import Duplicate, StepOp, Store
from engine.store import identities as registry
from engine.store.identities import (
    apply_event,
    apply_events,
    identities,
    identity_history,
    identity_identifiers,
)
from tests.test_identity_registry import db  # noqa: F401 - the registry on both stores
from tests.test_identity_support import SYNTH_NIR_F, SYNTH_NIR_M, adt, make_nir
from tests.test_store import rec

TEST_ENV = InsPolicy(environment="test")
NIR_X = make_nir("2850763220177")
NIR_Y = make_nir("2790363220188")


def _evn(n: int) -> str:
    return f"202403061{n:05d}"


# Each list: ADTs applied after the seed, in one batch. Same patient twice, INS collisions and
# releases, merges (known and unknown MRG-1), an identifier change, a deletion, older events and
# events for a merged IPP, with upserts after each of them.
SEED = [adt("A28", ipp="800001", ins=SYNTH_NIR_F, evn=_evn(1), control="s1"),
        adt("A28", ipp="800002", ins=SYNTH_NIR_M, sex="M", dob="19850712", evn=_evn(2), control="s2"),
        adt("A28", ipp="800003", ins=None, status="PROV", evn=_evn(3), control="s3")]
BATCHES = {
    "distinct_patients": [
        adt("A31", ipp="800001", ins=SYNTH_NIR_F, birth_name="SYNTH-DEUX", evn=_evn(10)),
        adt("A31", ipp="800002", ins=SYNTH_NIR_M, sex="M", dob="19850712", evn=_evn(11)),
        adt("A01", ipp="800004", ins=NIR_X, evn=_evn(12)),
        adt("A28", ipp="800005", ins=None, status="PROV", zfa=None, zfd=None, evn=_evn(13)),
    ],
    "same_patient_twice": [
        adt("A31", ipp="800001", birth_name="SYNTH-DEUX", evn=_evn(10)),
        adt("A28", ipp="800006", ins=NIR_X, evn=_evn(11)),
        adt("A31", ipp="800001", birth_name="SYNTH-TROIS", evn=_evn(12)),
        adt("A31", ipp="800006", ins=NIR_X, birth_name="SYNTH-QUATRE", evn=_evn(13)),
        adt("A31", ipp="800001", birth_name="SYNTH-OLD", evn=_evn(4)),  # older: ignored
    ],
    "ins_collision_and_release": [
        adt("A28", ipp="800007", ins=SYNTH_NIR_F, evn=_evn(10)),  # held by 800001: collision
        adt("A31", ipp="800001", ins=None, status="PROV", evn=_evn(11)),  # 800001 drops it
        adt("A31", ipp="800007", ins=SYNTH_NIR_F, evn=_evn(12)),  # now free: taken
        adt("A31", ipp="800003", ins=NIR_Y, dob="19790328", status="VALI", evn=_evn(13)),
    ],
    "merge_in_batch": [
        adt("A31", ipp="800001", birth_name="SYNTH-DEUX", evn=_evn(10)),
        adt("A40", ipp="800002", mrg="800001", ins=SYNTH_NIR_M, sex="M", dob="19850712", evn=_evn(11)),
        adt("A31", ipp="800001", birth_name="SYNTH-TROIS", evn=_evn(12)),  # merged: ignored
        adt("A28", ipp="800008", ins=SYNTH_NIR_F, evn=_evn(13)),  # released by the merge: taken
        adt("A40", ipp="800008", mrg="809999", ins=SYNTH_NIR_F, evn=_evn(14)),  # unknown MRG-1
        adt("A31", ipp="809999", ins=None, status="PROV", evn=_evn(15)),  # alias of 800008
    ],
    "same_ins_two_new_patients": [
        adt("A28", ipp="800011", ins=NIR_X, evn=_evn(10)),
        adt("A28", ipp="800012", ins=NIR_X, evn=_evn(11)),  # INS-COLLISION with the first
        adt("A31", ipp="800011", ins=None, status="PROV", evn=_evn(12)),  # drops it
        adt("A31", ipp="800012", ins=NIR_X, evn=_evn(13)),  # now free: taken
    ],
    "change_id_and_delete": [
        adt("A31", ipp="800003", ins=None, status="PROV", birth_name="SYNTH-DEUX", evn=_evn(10)),
        adt("A47", ipp="800009", mrg="800003", ins=None, status="PROV", evn=_evn(11)),
        adt("A28", ipp="800003", ins=NIR_Y, dob="19790328", evn=_evn(12)),  # the old IPP is free again: new identity
        adt("A29", ipp="800002", ins=SYNTH_NIR_M, sex="M", dob="19850712", evn=_evn(13)),
        adt("A28", ipp="800010", ins=SYNTH_NIR_M, sex="M", dob="19850712", evn=_evn(14)),  # inactive holder
        adt("A47", ipp="800001", mrg="800010", ins=None, evn=_evn(15)),  # target in use: rejected
    ],
    "new_identities_around_a_merge_stub": [
        adt("A28", ipp="800013", ins=None, status="PROV", evn=_evn(10)),
        adt("A40", ipp="800013", mrg="809998", ins=None, status="PROV", evn=_evn(11)),  # stub
        adt("A28", ipp="800014", ins=None, status="PROV", evn=_evn(12)),  # id after the stub's
        adt("A28", ipp="800015", ins=NIR_X, evn=_evn(13)),
    ],
}


def _registry(conn) -> dict:
    """Every registry row, without the wall-clock columns and the identifier row ids."""
    idt = [{k: v for k, v in r.items() if k not in ("created_at", "updated_at")}
           for r in conn.execute(sa.select(identities).order_by(identities.c.id)).mappings()]
    ii = identity_identifiers
    idf = sorted(tuple(r) for r in conn.execute(sa.select(ii.c.identity_id, ii.c.type, ii.c.value,
                                                          ii.c.authority)))
    h = identity_history
    hist = [{k: v for k, v in r.items() if k not in ("id", "at")}
            for r in conn.execute(sa.select(h).order_by(h.c.id)).mappings()]
    return {"identities": idt, "identifiers": idf, "history": hist}


def _outcome(results) -> list:
    return [(r.identity_id, r.action, r.ins_taken, r.note,
             [(v.field, v.rule, v.severity, v.code) for v in r.violations]) for r in results]


def _run(engine, batch: list[bytes], *, together: bool):
    with engine.begin() as conn:
        apply_events(conn, [(parse_adt(raw), 1 + n) for n, raw in enumerate(SEED)], policy=TEST_ENV)
    events = [(parse_adt(raw), 100 + n) for n, raw in enumerate(batch)]
    if together:
        with engine.begin() as conn:
            results = apply_events(conn, events, policy=TEST_ENV)
    else:
        results = []
        for event, mid in events:
            with engine.begin() as conn:
                results.append(apply_event(conn, event, message_id=mid, policy=TEST_ENV))
    with engine.connect() as conn:
        return _outcome(results), _registry(conn)


def _clear(engine) -> None:
    with engine.begin() as conn:
        for t in (identity_history, identity_identifiers):
            conn.execute(t.delete())
        conn.execute(identities.update().values(merged_into=None))
        conn.execute(identities.delete())


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_batch_equals_one_by_one(db, name):
    engine = db
    one_by_one = _run(engine, BATCHES[name], together=False)
    _clear(engine)
    if engine.dialect.name == "postgresql":  # identity ids restart (SQLite: max(id) + 1)
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER SEQUENCE identities_id_seq RESTART WITH 1")
        engine.dispose()  # and the blocks of ids held by the pooled connections go
    together = _run(engine, BATCHES[name], together=True)
    assert together == one_by_one
    actions = [r[1] for r in together[0]]
    assert len(set(actions)) > 1 or name == "distinct_patients"  # the scenarios do branch


def test_batch_uses_fewer_statements(db, monkeypatch):
    """The point of the batch: the lookups of distinct patients in one read, their writes grouped."""
    engine = db
    _run(engine, [], together=True)
    batch = [adt("A31", ipp=f"80000{n}", ins=None, status="PROV", birth_name="SYNTH-NEW",
                 evn=_evn(20 + n), control=str(n))
             for n in range(1, 4)] + [adt("A28", ipp=f"81000{n}", ins=None, status="PROV", evn=_evn(30 + n))
                                      for n in range(1, 5)]
    statements = []  # the batch runs on the DBAPI cursor: counted there
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        if engine.dialect.name == "sqlite":  # one trace per row (values inlined): the rows of
            # an executemany (same statement, consecutive) count once
            def trace(sql):
                key = " ".join(sql.split()[:3])
                if statements[-1:] != [key] and key != "BEGIN":
                    statements.append(key)
            raw.set_trace_callback(trace)
        else:
            import psycopg

            def counted(method):
                def run(cur, query, *a, **kw):
                    statements.append(query)
                    return method(cur, query, *a, **kw)
                return run
            monkeypatch.setattr(psycopg.Cursor, "execute", counted(psycopg.Cursor.execute))
            monkeypatch.setattr(psycopg.Cursor, "executemany", counted(psycopg.Cursor.executemany))
        try:
            results = apply_events(conn, [(parse_adt(raw), n) for n, raw in enumerate(batch)],
                                   policy=TEST_ENV)
        finally:
            if engine.dialect.name == "sqlite":
                raw.set_trace_callback(None)
            monkeypatch.undo()
    assert [r.action for r in results] == ["updated"] * 3 + ["created"] * 4
    assert all(isinstance(r.identity_id, int) for r in results)
    # one read, the ids of the new identities (SQLite: max(id); PostgreSQL: a block from the
    # sequence), the INS identifiers dropped, the new identities, their identifiers, the
    # updates (one statement per set of changed columns: two here), the history rows: 8
    # statements instead of 3 to 5 per ADT
    assert len(statements) <= 8, statements


# --------------------------------------------------------------------------- through the writer


def _answer(outcome, errors):
    code = "AE" if outcome == "error" else "AA"
    return f"MSA|{code}|{len(errors)}".encode(), code


def _record(n: int, raw: bytes):
    return dataclasses.replace(rec(f"ID{n}"), raw=raw)


def _one_transaction(store_url, make_ops) -> tuple[list, dict]:
    """Submit ``make_ops(store)`` while the writer is held, so that they share one transaction
    (unless one fails); return their results and the stored ACK code of each control id."""
    s = Store(store_url)
    s.migrate()
    gate = threading.Event()
    s.submit(lambda c: gate.wait(5), lambda r: None)
    s.start()
    try:
        ops = make_ops(s)
        box: dict = {}
        done = threading.Event()
        for n, op in enumerate(ops):
            s.submit(op, lambda r, n=n: (box.__setitem__(n, r), len(box) == len(ops) and done.set()))
        gate.set()
        assert done.wait(30)
        with s.engine.connect() as c:
            stored = dict(c.execute(sa.text("SELECT control_id, ack_code FROM messages")).all())
        return [box[n] for n in range(len(ops))], stored
    finally:
        s.stop()
        s.dispose()


def _ops(store, records, run) -> list:
    return [StepOp(r, (store, r, "utf-8", _answer), run) for r in records]


def test_writer_runs_the_adts_of_a_transaction_in_one_batch(store_url):
    feed = IdentityFeed(IdentityFeedConfig(enabled=True), "test")
    calls = []

    def run(conn, items):
        calls.append(len(items))
        return feed.apply_batch(conn, items)

    adts = [adt("A28", ipp="700001", ins=SYNTH_NIR_F, evn=_evn(1), control="a"),
            adt("A28", ipp="700002", ins=NIR_X, status="PROV", evn=_evn(2), control="b"),  # AE
            adt("A31", ipp="700001", birth_name="SYNTH-DEUX", evn=_evn(3), control="c"),  # same patient
            adt("A40", ipp="700003", mrg="700001", ins=SYNTH_NIR_F, evn=_evn(4), control="d"),
            adt("A31", ipp="700001", birth_name="SYNTH-TROIS", evn=_evn(5), control="e")]  # merged
    records = [_record(n, raw) for n, raw in enumerate(adts)]
    results, stored = _one_transaction(store_url, lambda s: _ops(s, records, run))
    assert calls == [5]
    assert [r.action for r in results] == ["created", "created", "updated", "merged", "ignored_merged"]
    assert [r.outcome for r in results] == ["accept", "error", "accept", "accept", "accept"]
    assert stored == {"ID0": "AA", "ID1": "AE", "ID2": "AA", "ID3": "AA", "ID4": "AA"}


def test_a_failing_op_in_the_batch_leaves_the_other_verdicts(store_url):
    feed = IdentityFeed(IdentityFeedConfig(enabled=True), "test")
    adts = [adt("A28", ipp="700011", ins=SYNTH_NIR_F, evn=_evn(1), control="a"),
            adt("A28", ipp="700012", ins=NIR_X, status="PROV", evn=_evn(2), control="b"),  # AE
            adt("A31", ipp="700011", birth_name="SYNTH-DEUX", evn=_evn(3), control="c")]
    records = [_record(n, raw) for n, raw in enumerate(adts)]

    def boom(conn, items):
        raise ValueError("a defect of another step")

    def make(s):
        ops = _ops(s, records, feed.apply_batch)
        ops.insert(1, StepOp(_record(9, adts[0]), None, boom))
        return ops + _ops(s, records[:1], feed.apply_batch)  # a resend of the first: duplicate

    results, stored = _one_transaction(store_url, make)
    assert isinstance(results[1], ValueError)
    ok = [results[0], results[2], results[3]]
    assert [r.action for r in ok] == ["created", "created", "updated"]
    assert [r.outcome for r in ok] == ["accept", "error", "accept"]
    assert isinstance(results[4].result, Duplicate)
    assert results[4].result.original_id == results[0].result.message_id
    assert stored == {"ID0": "AA", "ID1": "AE", "ID2": "AA"}  # the failed op's message rolled back


def test_only_the_first_feed_of_a_transaction_reads_ahead(store_url):
    """The lookups read before the messages insert (``StepOp.read``) are the first group's only:
    a second feed (another channel) in the same transaction reads after the first one's writes."""
    feeds = [IdentityFeed(IdentityFeedConfig(enabled=True), "test") for _ in range(2)]
    reads = []

    def counting(feed):
        def read(conn, items):
            reads.append(len(items))
            return feed.read_ahead(conn, items)
        return read

    adts = [adt("A28", ipp="700031", ins=SYNTH_NIR_F, evn=_evn(1), control="a"),
            adt("A28", ipp="700032", ins=None, status="PROV", evn=_evn(2), control="b"),
            adt("A31", ipp="700031", birth_name="SYNTH-DEUX", evn=_evn(3), control="c"),
            adt("A31", ipp="700032", birth_name="SYNTH-DEUX", ins=None, status="PROV", evn=_evn(4),
                control="d")]
    records = [_record(n, raw) for n, raw in enumerate(adts)]

    def make(s):
        return [StepOp(r, (s, r, "utf-8", _answer), feeds[n // 2].apply_batch, counting(feeds[n // 2]))
                for n, r in enumerate(records)]

    results, stored = _one_transaction(store_url, make)
    assert reads == [2]
    assert [r.action for r in results] == ["created", "created", "updated", "updated"]
    assert stored == {"ID0": "AA", "ID1": "AA", "ID2": "AA", "ID3": "AA"}


def test_a_write_failing_at_commit_is_isolated(store_url):
    """On PostgreSQL the transaction runs in a pipeline: a queued write's error surfaces with the
    COMMIT (which the server then skips). That is no connection failure: the other ops of the
    batch are retried without the failing one and keep their verdicts."""
    feed = IdentityFeed(IdentityFeedConfig(enabled=True), "test")
    adts = [adt("A28", ipp="700021", ins=SYNTH_NIR_F, evn=_evn(1), control="a"),
            adt("A28", ipp="700022", ins=None, status="PROV", evn=_evn(2), control="b")]
    records = [_record(n, raw) for n, raw in enumerate(adts)]

    def merge_into_nobody(conn, items):  # no such identity: a foreign key violation
        conn.execute(identities.update().values(merged_into=999999))  # no RETURNING: queued
        return [None] * len(items)

    def make(s):
        # last: nothing reads after it, its error comes back with the COMMIT
        return _ops(s, records, feed.apply_batch) + [StepOp(_record(9, adts[0]), None, merge_into_nobody)]

    results, stored = _one_transaction(store_url, make)
    assert isinstance(results[2], sa.exc.IntegrityError) or type(results[2]).__name__ == "ForeignKeyViolation"
    assert [r.action for r in results[:2]] == ["created", "created"]
    assert stored == {"ID0": "AA", "ID1": "AA"}


def _new_patients(engine, first: int, n: int, evn: int) -> list[int]:
    events = [(parse_adt(adt("A28", ipp=str(first + k), ins=None, status="PROV", evn=_evn(evn + k))),
               None) for k in range(n)]
    with engine.begin() as conn:
        results = apply_events(conn, events, policy=TEST_ENV)
    assert [r.action for r in results] == ["created"] * n
    return [r.identity_id for r in results]


def test_identity_ids_in_blocks_never_collide(db, store_url, monkeypatch):
    """New identities take their ids before their INSERT (held with the other writes): on
    PostgreSQL in blocks from the sequence. Two engines on one database, batches spanning block
    boundaries, a restart (blocks held by the old connections are lost): no id twice, every
    identity holds its own IPP."""
    monkeypatch.setattr(registry, "IDENTITY_ID_BLOCK", 3)
    other = sa.create_engine(store_url)
    try:
        ids = _new_patients(db, 810000, 5, 10)  # a block of 3, then the next
        ids += _new_patients(other, 811000, 2, 20)
        ids += _new_patients(db, 812000, 2, 30)  # the rest of db's second block, then a third
        ids += _new_patients(other, 813000, 4, 40)
        db.dispose()  # a restart
        ids += _new_patients(db, 814000, 1, 50)
    finally:
        other.dispose()
    assert len(set(ids)) == len(ids) == 14
    with db.connect() as conn:
        ii = identity_identifiers
        rows = conn.execute(sa.select(ii.c.identity_id, ii.c.value).where(ii.c.type == "PI")).all()
    assert sorted(int(v) // 1000 for _i, v in rows) == sorted(
        [810] * 5 + [811] * 2 + [812] * 2 + [813] * 4 + [814])
    assert sorted(i for i, _v in rows) == sorted(ids)


@pytest.mark.parametrize("variants", [256, 0])
def test_an_update_writes_the_columns_that_changed(tmp_path, monkeypatch, variants):
    """Only the changed columns of the snapshot are written (each costs its conversion), unless
    MAX_UPDATE_VARIANTS statements are built already: then every column, same outcome."""
    monkeypatch.setattr(registry, "MAX_UPDATE_VARIANTS", variants)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'r.db'}")
    registry.create_tables(engine)
    apply_events_in(engine, adt("A28", ipp="820001", ins=SYNTH_NIR_F, evn=_evn(1)))
    updates = []
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        raw.set_trace_callback(lambda sql: sql.startswith("UPDATE identities") and updates.append(sql))
        apply_events(conn, [(parse_adt(adt("A31", ipp="820001", ins=SYNTH_NIR_F,
                                           birth_name="SYNTH-DEUX", evn=_evn(2))), None)],
                     policy=TEST_ENV)
        raw.set_trace_callback(None)
    (sql,) = updates
    assert "birth_name=" in sql and "last_event_time=" in sql
    assert ("given_names=" in sql) == (variants == 0)
    with engine.connect() as conn:
        row = conn.execute(sa.select(identities)).mappings().one()
    assert row["birth_name"] == "SYNTH-DEUX" and row["given_names"] and row["ins_value"]
    engine.dispose()


def apply_events_in(engine, raw: bytes) -> None:
    with engine.begin() as conn:
        apply_events(conn, [(parse_adt(raw), None)], policy=TEST_ENV)
