"""Delivery in windows: claims of several head entries per ordering key, outcomes recorded as
writer ops and fenced by the claiming worker's epoch, recovery after a crash in the middle of a
window, and no store work for a destination whose peer does not answer. Real store (SQLite and
PostgreSQL), real delivery worker in the reactor thread, a scripted connector (no sockets)."""
from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from twisted.internet import defer

from engine.config import load_config_text
from engine.connectors.base import ACCEPTED, REJECTED, TRANSIENT, Outcome
from engine.delivery import DestinationWorker
from engine.store import Completion, EntrySpec
from tests import reactor_thread
from tests.test_store import count, ingest, rec


def _queue(store, keys, dest="ris", hold=0.0):
    recs = [rec(f"W{dest}{i}", entries=[EntrySpec(dest, "r", k, hold=hold)]) for i, k in enumerate(keys)]
    return [r.message_id for r in ingest(store, recs)]


def _write(store, op):
    """Run ``op(conn)`` as a writer op, as the delivery worker does; return its result."""
    done = threading.Event()
    box = []
    store.submit(op, lambda r: (box.append(r), done.set()))
    assert done.wait(10)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _lanes(claimed):
    return [[e.message_id for e in lane] for lane in claimed.lanes]


def test_window_per_key_in_order_and_blocked_keys_skipped(store):
    mids = _queue(store, ["a", "b", "a", "a", "b", "c"])
    got = store.claim_windows("ris", 10, 2, "w#1", 60)
    assert sorted(_lanes(got)) == sorted([[mids[0], mids[2]], [mids[1], mids[4]], [mids[5]]])
    # every key has its head in flight now: nothing more, although mids[3] is queued and due
    assert store.claim_windows("ris", 10, 2, "w#1", 60).lanes == []
    lane_a = next(lane for lane in got.lanes if lane[0].message_id == mids[0])
    # a fails and asks for a retry later; the rest of its window goes back untried
    later = time.time() + 3600
    assert _write(store, lambda c: store.complete_within(c, "w#1", [
        Completion(lane_a[0].id, "queued", 1, later, "AR"),
        Completion(lane_a[1].id, "released", 0)])) == [True, True]
    again = store.claim_windows("ris", 10, 2, "w#1", 60)
    assert again.lanes == [] and again.next_due == pytest.approx(later)
    entries = {e.id: e for e in store.get_message(mids[2]).entries}
    assert entries[lane_a[1].id].status == "queued" and entries[lane_a[1].id].attempts == 0
    # when the retry is due, the window restarts at the failed head, in order
    due = store.claim_windows("ris", 10, 5, "w#1", 60, now=later + 1)
    assert _lanes(due) == [[mids[0], mids[2], mids[3]]]


def test_window_stops_at_the_first_entry_not_due(store):
    first = _queue(store, ["", ""])
    held = _queue(store, [""], hold=3600)
    _queue(store, [""])
    got = store.claim_windows("ris", 1, 10, "w#1", 60)
    assert _lanes(got) == [first]
    assert held  # the held entry, and the due one behind it, stay queued


def test_keys_are_visited_round_robin(store):
    _queue(store, [f"k{i}" for i in range(6)] * 2)
    first = store.claim_windows("ris", 2, 1, "w#1", 60)
    second = store.claim_windows("ris", 2, 1, "w#1", 60, cursor=first.cursor)
    third = store.claim_windows("ris", 2, 1, "w#1", 60, cursor=second.cursor)
    keys = [lane[0].order_key for c in (first, second, third) for lane in c.lanes]
    assert sorted(keys) == [f"k{i}" for i in range(6)]


def test_outcomes_are_fenced_by_the_claiming_epoch_and_carry_extra_rows(store):
    _queue(store, ["", ""])
    (lane,) = store.claim_windows("ris", 1, 2, "host:1#1", 60).lanes

    def extra(conn):
        store._event(conn, "follow_up", destination="ris", entry_id=lane[0].id)

    # a stale worker of the same process (earlier epoch) cannot record over the claim
    assert _write(store, lambda c: store.complete_within(c, "host:1#0", [
        Completion(lane[0].id, "sent", 1, extra=extra)])) == [False]
    assert count(store, "SELECT count(*) FROM events WHERE kind = 'follow_up'") == 0
    assert _write(store, lambda c: store.complete_within(c, "host:1#1", [
        Completion(lane[0].id, "sent", 1, response=b"ACK", extra=extra),
        Completion(lane[1].id, "sent", 1)])) == [True, True]
    assert count(store, "SELECT count(*) FROM events WHERE kind = 'follow_up'") == 1
    assert count(store, "SELECT count(*) FROM events WHERE kind = 'sent'") == 2
    # recorded once: a repeated outcome is refused
    assert _write(store, lambda c: store.complete_within(c, "host:1#1", [
        Completion(lane[1].id, "sent", 1)])) == [False]


def test_crash_in_the_middle_of_a_window_redelivers_the_rest_in_order(store):
    """A worker claimed 10, recorded 4, then the process died: at the next start recovery puts
    the 6 back, the new worker (new epoch) gets them in order, and the dead worker's outcome
    arriving late is fenced. Delivered at least once: the 6 are sent again (the duplicates)."""
    mids = _queue(store, [""] * 10)
    (lane,) = store.claim_windows("ris", 1, 10, "host:1#1", 60).lanes
    assert [e.message_id for e in lane] == mids
    _write(store, lambda c: store.complete_within(
        c, "host:1#1", [Completion(e.id, "sent", 1) for e in lane[:4]]))
    assert store.recover_in_flight() == 6
    (again,) = store.claim_windows("ris", 1, 10, "host:2#1", 60).lanes
    assert [e.message_id for e in again] == mids[4:]
    assert _write(store, lambda c: store.complete_within(
        c, "host:1#1", [Completion(lane[5].id, "sent", 1)])) == [False]
    assert _write(store, lambda c: store.complete_within(
        c, "host:2#1", [Completion(e.id, "sent", 1) for e in again])) == [True] * 6
    statuses = [e.status for m in mids for e in store.get_message(m).entries]
    assert statuses == ["sent"] * 10


def _entries(store, mids):
    return {e.id: e for m in mids for e in store.get_message(m).entries}


def _group(store, owner, completions):
    """An outcome group in a transaction of its own (as the worker runs it on PostgreSQL)."""
    return store.in_transaction(lambda c: store.complete_within(c, owner, completions))


def test_a_mixed_outcome_group_records_only_live_entries_of_its_owner(store):
    """One group with outcomes of live entries, of an entry another worker holds, of an entry
    already finished, an id given twice, releases and an unknown id: only the first outcome of
    each entry still in flight under the owner is recorded, with one event (none for a
    release); a release and an outcome without response keep what the entry had."""
    a, b = "host:1#2", "host:1#1"
    mids = _queue(store, ["k0", "k1", "k2", "k3", "k4"])
    other = _queue(store, [""], dest="pacs")
    e0, e1, e2, e3, e4 = [lane[0].id for lane in sorted(
        store.claim_windows("ris", 10, 1, a, 60).lanes, key=lambda lane: lane[0].order_key)]
    (p0,), = [[e.id for e in lane] for lane in store.claim_windows("pacs", 1, 1, b, 60).lanes]
    assert _group(store, a, [Completion(e0, "queued", 1, None, "AR", response=b"ACK-AR"),
                             Completion(e4, "sent", 1)]) == [True, True]
    (again,) = store.claim_windows("ris", 10, 1, a, 60).lanes
    assert [e.id for e in again] == [e0]
    # the owner alone is not the fence: an entry not in flight is never recorded again
    with store.engine.begin() as c:
        c.execute(sa.text("UPDATE queue_entries SET lease_owner = :o WHERE id = :i"), {"o": a, "i": e4})
    last_event = count(store, "SELECT max(id) FROM events")
    got = _group(store, a, [
        Completion(e1, "sent", 1, response=b"ACK1", payload=b"P1"),
        Completion(p0, "sent", 1),                      # held by another worker: fenced
        Completion(e1, "error", 2, last_error="late"),  # the same id again: recorded once
        Completion(e2, "released", 0),
        Completion(e0, "released", 0),                  # keeps attempts, error and response
        Completion(e3, "error", 1, last_error="AE"),
        Completion(e4, "sent", 2),                      # already sent: not in flight
        Completion(10 ** 9, "sent", 1),                 # no such entry
    ])
    assert got == [True, False, False, True, True, True, False, False]
    rows = _entries(store, mids + other)
    assert (rows[e1].status, rows[e1].attempts, rows[e1].response, rows[e1].payload,
            rows[e1].last_error, rows[e1].lease_owner) == ("sent", 1, b"ACK1", b"P1", None, None)
    assert (rows[e2].status, rows[e2].attempts, rows[e2].last_error) == ("queued", 0, None)
    assert (rows[e0].status, rows[e0].attempts, rows[e0].last_error, rows[e0].response,
            rows[e0].lease_owner) == ("queued", 1, "AR", b"ACK-AR", None)
    assert (rows[e3].status, rows[e3].attempts, rows[e3].last_error) == ("error", 1, "AE")
    assert (rows[p0].status, rows[p0].lease_owner) == ("in_flight", b)
    assert (rows[e4].status, rows[e4].attempts, rows[e4].lease_owner) == ("sent", 1, a)
    with store.engine.connect() as c:
        new = c.execute(sa.text("SELECT kind, entry_id, destination, channel, detail FROM events "
                                "WHERE id > :n ORDER BY id"), {"n": last_event}).all()
    assert [(r.kind, r.entry_id, r.destination, r.channel) for r in new] == [
        ("sent", e1, "ris", "adt_in"), ("error", e3, "ris", "adt_in")]
    assert json.loads(new[1].detail) == {"attempts": 1, "error": "AE"}
    # the releases went back to the queue: the next claim takes them again
    assert sorted(e.id for lane in store.claim_windows("ris", 10, 1, a, 60).lanes
                  for e in lane) == sorted([e0, e2])


def test_an_outcome_waiting_for_a_row_lock_is_fenced_by_what_the_lock_holder_committed(pg_url):
    """PostgreSQL, two instances on one database: while an outcome group waits for the lock of
    its entry, another instance takes the entry over (recovery, then its own claim) and
    commits: the fence is checked again on the committed row, the outcome is dropped."""
    from engine.store import Store

    store = Store(pg_url)
    store.migrate()
    store.start()
    try:
        _queue(store, [""])
        ((entry,),) = store.claim_windows("ris", 1, 1, "host:1#1", 60).lanes
        other = store.engine.connect()
        tx = other.begin()
        other.execute(sa.text("UPDATE queue_entries SET lease_owner = 'host:2#1' WHERE id = :i"),
                      {"i": entry.id})
        box = []
        t = threading.Thread(target=lambda: box.append(
            _group(store, "host:1#1", [Completion(entry.id, "sent", 1)])))
        t.start()
        time.sleep(0.5)
        assert t.is_alive()  # waiting for the row lock
        tx.commit()
        other.close()
        t.join(10)
        assert box == [[False]]
        (row,) = store.get_message(entry.message_id).entries
        assert (row.status, row.lease_owner) == ("in_flight", "host:2#1")
        assert count(store, "SELECT count(*) FROM events WHERE kind = 'sent'") == 0
    finally:
        store.stop()
        store.dispose()


def test_a_claim_skips_a_key_whose_head_another_instance_holds(pg_url):
    """PostgreSQL: a key whose head row is locked by another instance's claim is skipped at
    once (no wait), the other keys are claimed; once the lock is gone the key is claimed."""
    from engine.store import Store

    store = Store(pg_url)
    store.migrate()
    store.start()
    try:
        mids = _queue(store, ["a", "a", "b"])
        head = store.get_message(mids[0]).entries[0].id
        other = store.engine.connect()
        tx = other.begin()
        other.execute(sa.text("SELECT id FROM queue_entries WHERE id = :i FOR UPDATE"), {"i": head})
        box = []
        t = threading.Thread(target=lambda: box.append(store.claim_windows("ris", 10, 5, "host:1#1", 60)))
        t.start()
        t.join(3)
        waited = t.is_alive()
        tx.rollback()
        t.join(10)
        assert not waited and _lanes(box[0]) == [[mids[2]]]
        other.close()
        assert _lanes(store.claim_windows("ris", 10, 5, "host:1#1", 60)) == [[mids[0], mids[1]]]
    finally:
        store.stop()
        store.dispose()


# --------------------------------------------------------------------------- the worker

class CountingStore:
    """The real store, counting the ops the worker runs (claims and outcomes: writer ops on
    SQLite, transactions of their own on PostgreSQL)."""

    def __init__(self, store):
        self._store = store
        self.ops = 0
        self.background: set[bool] = set()  # how the writer ops were submitted

    def submit(self, op, callback, **kw):
        self.ops += 1
        self.background.add(kw.get("background", False))
        return self._store.submit(op, callback, **kw)

    def in_transaction(self, op):
        self.ops += 1
        return self._store.in_transaction(op)

    def __getattr__(self, name):
        return getattr(self._store, name)


class Scripted:
    kind = "scripted"
    needs_stored = False
    timeout = 5.0

    def __init__(self, answer):
        self.answer = answer
        self.sent: list[tuple[str, int]] = []  # (control id, attempt)

    def send(self, delivery):
        self.sent.append((delivery.control_id, delivery.attempt))
        return defer.succeed(self.answer(delivery))

    def close(self):
        return defer.succeed(None)


def _cfg(ordering="destination", concurrency=1, initial="1s"):
    key = "\n    ordering_key: PID-3.1" if ordering == "key" else ""
    text = f"""
channels:
  in: {{type: mllp, port: 0}}
routes:
  - {{name: all, from: in, to: [ris]}}
destinations:
  ris:
    type: mllp
    host: 127.0.0.1
    port: 9
    queue:
      retry: {{initial_delay: {initial}, max_delay: 10s, jitter: 0}}
      max_attempts: 0
      ordering: {ordering}{key}
      concurrency: {concurrency}
"""
    return load_config_text(text.replace("    ordering_key", "      ordering_key")).destination("ris")


def _run(worker, until, timeout=20.0):
    reactor_thread.call(worker.start)
    ok = reactor_thread.wait_for(until, timeout=timeout)
    return ok


@pytest.mark.parametrize("nkeys,lanes", [(4, 4), (12, 2)])
def test_worker_keeps_the_order_of_each_key_across_a_failure(store, nkeys, lanes):
    """Keys in parallel lanes (more keys than lanes: a lane takes several keys one after the
    other); one entry of key k1 is refused once: nothing behind it in k1 goes before its retry
    succeeds, the other keys go on."""
    keys = [f"k{i % nkeys}" for i in range(40)]
    _queue(store, keys)
    refused = {"Wris5"}

    def answer(d):
        if d.control_id in refused:
            refused.discard(d.control_id)
            return Outcome(REJECTED, b"MSA|AR", "AR")
        return Outcome(ACCEPTED, b"MSA|AA", "AA")

    connector = Scripted(answer)
    worker = DestinationWorker("ris", _cfg("key", lanes, "50ms"), store, connector, reactor_thread.reactor)
    try:
        assert _run(worker, lambda: worker.counters["sent"] >= 40)
    finally:
        reactor_thread.call(worker.stop, 1.0)
    per_key: dict[str, list[str]] = {}
    for cid, _attempt in connector.sent:
        per_key.setdefault(keys[int(cid[4:])], []).append(cid)
    for key, sent in per_key.items():
        expected = [f"Wris{i}" for i in range(40) if keys[i] == key]
        if key == keys[5]:  # Wris5 refused once, then sent again before anything behind it
            at = expected.index("Wris5")
            assert sent[:at + 2] == expected[:at] + ["Wris5", "Wris5"] and sent[at + 2:] == expected[at + 1:]
        else:
            assert sent == expected
    assert ("Wris5", 2) in connector.sent
    assert store.stats()["destinations"]["ris"]["sent"] == 40


def test_a_down_destination_sleeps_and_probes_once_per_step(store):
    """The peer does not answer: after the first failure, commits that route more messages to
    it wake the worker without any store work (no claim, no send); at the next step of the
    retry policy one probe (one entry, one connection attempt) goes out, not one per key."""
    _queue(store, [f"p{i}" for i in range(8)])
    connector = Scripted(lambda d: Outcome(TRANSIENT, None, "connection refused"))
    counting = CountingStore(store)
    worker = DestinationWorker("ris", _cfg("key", 4, "1500ms"), counting, connector,
                               reactor_thread.reactor)
    try:
        assert _run(worker, lambda: worker._down_until > 0 and not worker._lanes and not worker.held)
        ops_down, sent_down = counting.ops, len(connector.sent)
        assert sent_down <= 4  # the lanes that were already going when the peer failed
        for i in range(20):  # twenty commits routed to the destination while it is down
            _queue(store, [f"n{i}"])
            reactor_thread.call(worker.wake)
        time.sleep(0.3)
        assert (counting.ops, len(connector.sent)) == (ops_down, sent_down)
        # the next step: one probe, then asleep again for a longer step
        assert reactor_thread.wait_for(lambda: len(connector.sent) > sent_down, timeout=5)
        time.sleep(0.3)
        assert len(connector.sent) == sent_down + 1
        assert worker._down_steps == 2
    finally:
        reactor_thread.call(worker.stop, 1.0)


def test_a_fifo_waiting_for_its_head_is_not_woken_by_commits(store):
    """A single FIFO whose head waits for its retry: new entries are behind it, so a commit
    does not send the worker to the store before the head is due (a look per second at most)."""
    _queue(store, [""])
    connector = Scripted(lambda d: Outcome(REJECTED, b"MSA|AR", "AR"))
    counting = CountingStore(store)
    worker = DestinationWorker("ris", _cfg("destination", 1, "5s"), counting, connector,
                               reactor_thread.reactor)
    try:
        assert _run(worker, lambda: worker._sleep_until > 0)
        ops, t0 = counting.ops, time.monotonic()
        for i in range(20):
            _queue(store, [""])
            reactor_thread.call(worker.wake)
        time.sleep(0.3)
        looks = counting.ops - ops
        assert looks <= 1 + int(time.monotonic() - t0) and len(connector.sent) == 1
        # a FIFO's claims and outcomes share the commit of ingest (small, and its next window
        # waits for them); on PostgreSQL they are transactions of their own
        assert counting.background <= {False}
    finally:
        reactor_thread.call(worker.stop, 1.0)


class SizingStore(CountingStore):
    """Records the entries of each claim and the outcomes of each group the worker writes."""

    def __init__(self, store):
        super().__init__(store)
        self.claimed: list[int] = []
        self.groups: list[int] = []

    def claim_windows_within(self, conn, *args, **kw):
        claimed = self._store.claim_windows_within(conn, *args, **kw)
        self.claimed.append(sum(len(w) for w in claimed.lanes))
        return claimed

    def complete_within(self, conn, owner, completions):
        self.groups.append(len(completions))
        return self._store.complete_within(conn, owner, completions)


def test_keyed_lanes_claim_and_record_in_bounded_writer_ops(store):
    """Several lanes (``ordering: key``): a claim takes at most ``KEYED_CLAIM_MAX`` entries and
    an outcome group holds at most ``FLUSH_AT`` outcomes (SQLite: as background writer ops), however many lanes are free or how
    many outcomes came in while the previous group was written (each such op holds the store
    writer, and the ACKs of the ingest behind it); the keys still go out whole and in order."""
    from engine import delivery

    keys = [f"k{i % 60}" for i in range(300)]
    _queue(store, keys)
    sizing = SizingStore(store)
    connector = Scripted(lambda d: Outcome(ACCEPTED, b"MSA|AA", "AA"))
    worker = DestinationWorker("ris", _cfg("key", 4), sizing, connector, reactor_thread.reactor)
    try:
        assert _run(worker, lambda: worker.counters["sent"] >= 300)
        assert reactor_thread.wait_for(lambda: worker._committed >= 300, timeout=10)
        assert 0 < max(sizing.claimed) <= delivery.KEYED_CLAIM_MAX
        assert 0 < max(sizing.groups) <= delivery.FLUSH_AT and sum(sizing.groups) == 300
        if sizing.dialect == "sqlite":  # never in a transaction with ingest records
            assert sizing.background == {True}
        sent = [int(cid[4:]) for cid, _attempt in connector.sent]
        for k in range(60):
            of_key = [i for i in sent if i % 60 == k]
            assert of_key == sorted(of_key) and len(of_key) == 5
    finally:
        reactor_thread.call(worker.stop, 1.0)


def test_disabled_worker_owner_carries_an_epoch():
    queue = SimpleNamespace(ordering="destination", concurrency=1)
    cfg = SimpleNamespace(enabled=False, queue=queue)
    a = DestinationWorker("d", cfg, None, None, None, owner="h:1")
    b = DestinationWorker("d", cfg, None, None, None, owner="h:1")
    assert a.owner.startswith("h:1#") and b.owner.startswith("h:1#") and a.owner != b.owner
