"""Operator actions on the store (SQLite + PostgreSQL): replay to named destinations without a
second live entry, the link to the replayed entry, errors resolved by a later success or marked
handled leaving the current counts, and message search filters."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

import engine.store as _store_mod

from engine.store import EntrySpec, ReplayedTarget, UnknownMessage
from tests.test_store import count, ingest_one, rec


def _fail(store, dest, error="AR"):
    c = store.claim_due(dest, 1, "w", 30)[0]
    assert store.complete(c.id, "w", status="error", attempts=1, last_error=error)
    return c.id


def _send(store, dest):
    c = store.claim_due(dest, 1, "w", 30)[0]
    assert store.complete(c.id, "w", status="sent", attempts=1)
    return c.id


def test_replay_names_destinations_and_never_doubles_a_live_target(store):
    mid = ingest_one(store, rec("P1", entries=[EntrySpec("ris", "r"), EntrySpec("pacs", "r"),
                                               EntrySpec("lis", "r")])).message_id
    failed = _fail(store, "ris")
    sent = _send(store, "lis")
    report: list[ReplayedTarget] = []
    # named: lis (sent, the operator asks again) and pacs (still queued: skipped)
    assert store.replay([mid], ["lis", "pacs"], report=report) == {mid: 1}
    by_dest = {t.destination: t for t in report}
    assert by_dest["lis"].replay_of == sent and by_dest["lis"].entry_id is not None
    assert by_dest["pacs"].entry_id is None and by_dest["pacs"].skipped == "still queued"
    live = count(store, "SELECT count(*) FROM queue_entries WHERE message_id = :m AND destination = 'pacs' "
                 "AND status IN ('queued', 'in_flight')", m=mid)
    assert live == 1
    # default: the errored target only
    report.clear()
    assert store.replay([mid], report=report) == {mid: 1}
    assert [(t.destination, t.replay_of) for t in report] == [("ris", failed)]
    # a destination the message never went to is refused, and nothing is written
    before = count(store, "SELECT count(*) FROM queue_entries")
    with pytest.raises(ValueError, match="never routed to hl7"):
        store.replay([mid], ["hl7"])
    with pytest.raises(UnknownMessage):
        store.replay([mid + 1000], ["ris"])
    assert count(store, "SELECT count(*) FROM queue_entries") == before
    detail = count(store, "SELECT detail FROM events WHERE kind = 'replay' ORDER BY id LIMIT 1")
    assert '"skipped": [["pacs", "", "still queued"]]' in detail


def test_error_resolved_by_a_successful_replay_leaves_the_counts(store):
    mid = ingest_one(store, rec("P2", entries=[EntrySpec("ris", "r")])).message_id
    first = _fail(store, "ris")
    assert store.stats()["destinations"]["ris"]["error"] == 1
    assert store.replay([mid]) == {mid: 1}
    # while the replay waits the error is still current
    assert store.stats()["destinations"]["ris"]["error"] == 1
    second = _fail(store, "ris")            # the replay fails too: one current error, not two
    d = store.stats()["destinations"]["ris"]
    assert d["error"] == 1 and d.get("resolved") == 1
    store.replay([mid])
    third = _send(store, "ris")
    d = store.stats()["destinations"]["ris"]
    assert d["error"] == 0 and d["sent"] == 1 and d["resolved"] == 2
    entries = {e.id: e for e in store.get_message(mid).entries}
    assert entries[second].replay_of == first and entries[third].replay_of == second
    assert entries[first].last_error == "AR"        # the history stays
    assert count(store, "SELECT count(*) FROM events WHERE kind = 'resolved' AND message_id = :m", m=mid) == 2
    assert [r.status for r in store.list_messages()] == ["sent"]


def test_operator_marks_an_error_handled(store):
    mid = ingest_one(store, rec("P3", entries=[EntrySpec("ris", "r"), EntrySpec("pacs", "r")])).message_id
    _fail(store, "ris")
    _send(store, "pacs")
    assert store.list_messages(status="error")[0].id == mid
    assert store.mark_handled(mid, "pacs") == 0          # nothing in error there
    assert store.mark_handled(mid, "ris") == 1
    assert store.mark_handled(mid, "ris") == 0
    assert store.stats()["destinations"]["ris"]["error"] == 0
    assert store.list_messages(status="error") == []
    assert [r.status for r in store.list_messages(status="handled")] == ["handled"]
    assert count(store, "SELECT count(*) FROM events WHERE kind = 'handled'") == 1
    with pytest.raises(UnknownMessage):
        store.mark_handled(mid + 1000, "ris")
    # a handled target can still be replayed by name
    assert store.replay([mid], ["ris"]) == {mid: 1}


def test_list_messages_filters(store):
    t0 = time.time()
    old = ingest_one(store, rec("F1", received_at=t0 - 7200)).message_id
    a = ingest_one(store, rec("F2", entries=[EntrySpec("ris", "r"), EntrySpec("pacs", "r")])).message_id
    b = ingest_one(store, rec("F3", channel="lab", entries=[EntrySpec("lis", "r")])).message_id
    c = ingest_one(store, rec("F2", body="PID|1||OTHER", dedup=False)).message_id
    _send(store, "ris")                  # old
    _fail(store, "ris")                  # a at ris
    ids = lambda **kw: [r.id for r in store.list_messages(**kw)]  # noqa: E731
    assert ids(status="error") == [a]
    assert ids(status="error", destination="pacs") == []       # a's error is at ris
    assert ids(status="queued", destination="pacs") == [a]
    assert ids(destination="lis") == [b]
    assert ids(channel="lab") == [b]
    assert ids(control_id="F2") == [c, a]
    assert ids(message_type="ADT") == [c, b, a, old]
    assert ids(message_type="ADT^A01") == [c, b, a, old]
    assert ids(message_type="ORU") == []
    assert ids(since=t0 - 60) == [c, b, a]
    assert ids(until=t0 - 60) == [old]
    assert ids(status="sent") == [old]
    assert ids(status="queued", limit=1) == [c]
    assert store.message_ids_by_control_id("F2") == [c, a]
    assert store.message_ids_by_control_id("nope") == []


def test_migration_0008_adds_the_link_to_an_existing_store(store_url):
    """A store at 0007 with entries upgrades in place: old entries link to nothing."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    from engine.store import Store

    s = Store(store_url)
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(_store_mod.__file__).parent / "migrations"))
        with s._wengine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0007")
        with s._wengine.begin() as conn:
            mid = conn.execute(sa.text(
                "INSERT INTO messages (channel, received_at, size, sha256, status, ack, raw) "
                "VALUES ('c', 1, 1, 'x', 'routed', :b, :b) RETURNING id"), {"b": b"x"}).scalar_one()
            conn.execute(sa.text(
                "INSERT INTO queue_entries (message_id, destination, route, status, next_attempt_at, "
                "created_at, updated_at) VALUES (:m, 'ris', 'r', 'error', 1, 1, 1)"), {"m": mid})
        s.migrate()
        assert [e.replay_of for e in s.get_message(mid).entries] == [None]
        assert s.replay([mid]) == {mid: 1}
        assert s.get_message(mid).entries[-1].replay_of == s.get_message(mid).entries[0].id
    finally:
        s.dispose()


def test_concurrent_replays_add_one_entry(store):
    """Replays of one message from several threads (two operators, two CLIs) add one entry."""
    import threading

    mid = ingest_one(store, rec("P5", entries=[EntrySpec("ris", "r")])).message_id
    _fail(store, "ris")
    added, errors = [], []
    start = threading.Barrier(6)

    def replay():
        start.wait()
        try:
            added.append(store.replay([mid])[mid])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=replay) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and sorted(added) == [0, 0, 0, 0, 0, 1]
    assert count(store, "SELECT count(*) FROM queue_entries WHERE message_id = :m AND status = 'queued'", m=mid) == 1


def test_a_message_whose_deliveries_were_cancelled_is_not_listed_as_sent(store):
    """A report deleted before it left (its entries cancelled by the deletion) was never
    delivered: listing it as 'sent' would tell the operator the opposite."""
    import sqlalchemy as sa

    mid = ingest_one(store, rec("C1", entries=[EntrySpec("ris", "r"), EntrySpec("pacs", "r")])).message_id
    with store.engine.begin() as c:
        c.execute(sa.text("UPDATE queue_entries SET status = 'cancelled' WHERE message_id = :m"), {"m": mid})
    assert [(r.id, r.status) for r in store.list_messages()] == [(mid, "cancelled")]
    assert [r.id for r in store.list_messages(status="cancelled", destination="ris")] == [mid]
    assert store.list_messages(status="sent") == []
    with store.engine.begin() as c:  # one of them sent after all: the message did leave
        c.execute(sa.text("UPDATE queue_entries SET status = 'sent' WHERE message_id = :m AND destination = 'ris'"),
                  {"m": mid})
    assert [r.status for r in store.list_messages()] == ["sent"]
    assert [r.status for r in store.list_messages(destination="pacs")] == ["cancelled"]
