"""Pause, resume and "retry now" in the delivery worker (real store on SQLite and PostgreSQL,
real worker in the reactor thread, a scripted connector): a paused destination claims nothing
and loses nothing, what it holds goes back untried, resume sends at once; a retry-now wakes a
FIFO sleeping until its head's next attempt."""
from __future__ import annotations

import time

from engine.connectors.base import ACCEPTED, REJECTED, Outcome
from engine.delivery import DestinationWorker
from tests import reactor_thread
from engine.store import EntrySpec
from tests.test_delivery_windows import CountingStore, Scripted, _cfg
from tests.test_store import ingest, rec

_n = iter(range(10**6))


def _queue(store, keys, dest="ris"):
    """Messages with control ids unique in the test (no duplicates), one entry each."""
    recs = [rec(f"C{next(_n)}", entries=[EntrySpec(dest, "r", k)]) for k in keys]
    return [r.message_id for r in ingest(store, recs)]


def _accept(d):
    return Outcome(ACCEPTED, b"MSA|AA", "AA")


def test_paused_worker_claims_nothing_and_resume_sends_at_once(store):
    _queue(store, ["", ""])
    connector = Scripted(_accept)
    counting = CountingStore(store)
    worker = DestinationWorker("ris", _cfg(), counting, connector, reactor_thread.reactor)
    worker.paused = True
    try:
        reactor_thread.call(worker.start)
        for i in range(5):
            _queue(store, [""])
            reactor_thread.call(worker.wake)
        time.sleep(1.5)  # longer than the poll interval of an idle worker
        assert (counting.ops, connector.sent) == (0, [])
        assert store.stats()["destinations"]["ris"]["queued"] == 7
        t0 = time.monotonic()
        reactor_thread.call(worker.set_paused, False)
        assert reactor_thread.wait_for(lambda: worker.counters["sent"] == 7, timeout=10)
        assert time.monotonic() - t0 < 1.0
        # paused again: the next commits stay queued
        reactor_thread.call(worker.set_paused, True)
        _queue(store, [""])
        reactor_thread.call(worker.wake)
        time.sleep(0.3)
        assert len(connector.sent) == 7 and store.stats()["destinations"]["ris"]["queued"] == 1
    finally:
        reactor_thread.call(worker.stop, 1.0)


def test_pause_in_the_middle_of_a_window_sends_the_rest_back_untried(store):
    mids = _queue(store, [""] * 6)
    gate = {"n": 0}
    worker = None

    def answer(d):
        gate["n"] += 1
        if gate["n"] == 2:
            worker.paused = True  # paused while the window is being sent (as set_paused does)
        return Outcome(ACCEPTED, b"MSA|AA", "AA")

    worker = DestinationWorker("ris", _cfg(), store, Scripted(answer), reactor_thread.reactor)
    try:
        reactor_thread.call(worker.start)
        assert reactor_thread.wait_for(lambda: not worker._lanes and not worker.held and gate["n"] == 2)
        statuses = [e.status for m in mids for e in store.get_message(m).entries]
        assert statuses == ["sent", "sent"] + ["queued"] * 4
        assert all(e.attempts == 0 for m in mids[2:] for e in store.get_message(m).entries)
    finally:
        reactor_thread.call(worker.stop, 1.0)


def test_retry_now_wakes_a_fifo_sleeping_for_its_head(store):
    (mid,) = _queue(store, [""])
    answers = [Outcome(REJECTED, b"MSA|AR", "AR")]
    connector = Scripted(lambda d: answers.pop() if answers else _accept(d))
    worker = DestinationWorker("ris", _cfg("destination", 1, "10s"), store, connector, reactor_thread.reactor)
    try:
        reactor_thread.call(worker.start)
        assert reactor_thread.wait_for(lambda: worker._sleep_until > 0)
        assert store.retry_now(mid, "ris") == 1
        t0 = time.monotonic()
        reactor_thread.call(worker.recheck)
        assert reactor_thread.wait_for(lambda: worker.counters["sent"] == 1, timeout=5)
        assert time.monotonic() - t0 < 1.0 and len(connector.sent) == 2
    finally:
        reactor_thread.call(worker.stop, 1.0)
