"""Group commit from the reactor: everything received in one reactor turn goes to the store as one batch.

The reactor thread never waits on the database. Each record gets a Deferred; the first record of a
turn schedules a flush with ``callLater(0)``, which runs after the reactor has handled all the I/O
of that turn, so one batch holds every frame that arrived together. The store's writer thread
merges batches that queue up while a commit is running (notes/performance.md, lessons 1 and 3) and
calls back from its own thread; the results are handed back to the reactor once per batch.
"""
from __future__ import annotations

from twisted.internet import defer


class IngestBatcher:
    def __init__(self, store, reactor):
        self._store = store
        self._reactor = reactor
        self._records: list = []
        self._deferreds: list[defer.Deferred] = []
        self._scheduled = False

    def add(self, record) -> defer.Deferred:
        d = defer.Deferred()
        self._records.append(record)
        self._deferreds.append(d)
        if not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self._flush)
        return d

    def add_op(self, op) -> defer.Deferred:
        """A writer-thread op (message insert plus work in the same transaction), one Deferred."""
        d = defer.Deferred()
        call_from_thread = self._reactor.callFromThread

        def done(result):  # runs in the writer thread
            call_from_thread(_fire, d, result)

        try:
            self._store.submit(op, done)
        except BaseException as exc:  # noqa: BLE001
            _fire(d, exc)
        return d

    def _flush(self) -> None:
        self._scheduled = False
        records, deferreds = self._records, self._deferreds
        self._records, self._deferreds = [], []
        if not records:
            return
        call_from_thread = self._reactor.callFromThread

        def done(results):  # runs in the writer thread
            call_from_thread(_deliver, deferreds, results)

        try:
            self._store.submit_ingest(records, done)
        except BaseException as exc:  # noqa: BLE001 - writer stopped: every record fails, none is lost silently
            _deliver(deferreds, exc)


def _deliver(deferreds, results) -> None:
    if isinstance(results, BaseException):
        for d in deferreds:
            d.errback(results)
        return
    for d, result in zip(deferreds, results):
        d.callback(result)


def _fire(d, result) -> None:
    if isinstance(result, BaseException):
        d.errback(result)
    else:
        d.callback(result)
