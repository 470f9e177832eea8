"""Group commit from the reactor: everything received in one reactor turn goes to the store as one batch.

The reactor thread never waits on the database. Each record gets a Deferred; the first record of a
turn schedules a flush with ``callLater(0)``, which runs after the reactor has handled all the I/O
of that turn, so one batch holds every frame that arrived together. The store's writer thread
merges batches that queue up while a commit is running (notes/performance.md, lessons 1 and 3) and
calls back from its own thread; the results are handed back to the reactor once per batch
(one ``callFromThread`` per batch).

Two ways to add a record: ``add`` returns a Deferred; ``add_call(record, fn, *args)`` calls
``fn(result, *args)`` in the reactor thread, ``result`` being the store result or the exception,
with no Deferred (the per-message hot path: a Deferred chain per message was measurable).
``later(fn)`` runs ``fn`` once after the current reactor turn (coalescing per-batch work).
"""
from __future__ import annotations

from twisted.internet import defer


class IngestBatcher:
    def __init__(self, store, reactor):
        self._store = store
        self._reactor = reactor
        self._records: list = []
        self._sinks: list = []  # per record: a Deferred, or (fn, args)
        self._scheduled = False

    def add(self, record) -> defer.Deferred:
        d = defer.Deferred()
        self._records.append(record)
        self._sinks.append(d)
        if not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self._flush)
        return d

    def add_call(self, record, fn, *args) -> None:
        """``fn(result_or_exception, *args)`` in the reactor thread once the batch committed."""
        self._records.append(record)
        self._sinks.append((fn, args))
        if not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self._flush)

    def later(self, fn) -> None:
        """Run ``fn()`` in the reactor thread after the current reactor turn."""
        self._reactor.callLater(0, fn)

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
        records, sinks = self._records, self._sinks
        self._records, self._sinks = [], []
        if not records:
            return
        call_from_thread = self._reactor.callFromThread

        def done(results):  # runs in the writer thread
            call_from_thread(_deliver, sinks, results)

        try:
            self._store.submit_ingest(records, done)
        except BaseException as exc:  # noqa: BLE001 - writer stopped: every record fails, none is lost silently
            _deliver(sinks, exc)


def _deliver(sinks, results) -> None:
    if isinstance(results, BaseException):
        results = [results] * len(sinks)
    Deferred = defer.Deferred
    for sink, result in zip(sinks, results):
        if type(sink) is Deferred:
            if isinstance(result, BaseException):
                sink.errback(result)
            else:
                sink.callback(result)
            continue
        fn, args = sink
        try:
            fn(result, *args)
        except Exception:  # noqa: BLE001 - one record's handler must not starve the others
            from twisted.python import log as twlog

            twlog.err(None, "ingest result handler failed")


def _fire(d, result) -> None:
    if isinstance(result, BaseException):
        d.errback(result)
    else:
        d.callback(result)
