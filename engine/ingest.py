"""Group commit from the reactor: everything received in one reactor turn goes to the store as one batch.

The reactor thread never waits on the database. The first record of a turn schedules a flush at
the end of the turn (``EngineReactor.call_after_io``; ``callLater(0)`` on another reactor), which
runs after the reactor has handled all the I/O of that turn, so one batch holds every frame that
arrived together. The store's writer thread
merges batches that queue up while a commit is running (group commit: one fsync for every message that arrived while the previous one ran) and
calls back from its own thread; the results are handed back to the reactor through one queue
drained by one ``callFromThread`` per commit (the store's ``after_batch`` hook), not one per
batch: a commit often holds the batches of several reactor turns, and each wake-up of the reactor
from the writer is a thread switch on the core both share (measured at 8 connections: about 4
batches per commit).

Two ways to add a record: ``add`` returns a Deferred; ``add_call(record, fn, *args)`` calls
``fn(result, *args)`` in the reactor thread, ``result`` being the store result or the exception,
with no Deferred (the per-message hot path: a Deferred chain per message was measurable). A
writer op (a record with a step's work in the same transaction) likewise: ``add_op`` or
``add_op_call``.
``later(fn)`` runs ``fn`` once after the current reactor turn (coalescing per-batch work).
"""
from __future__ import annotations

from collections import deque

from twisted.internet import defer


class IngestBatcher:
    def __init__(self, store, reactor):
        self._store = store
        self._reactor = reactor
        self._records: list = []
        self._sinks: list = []  # per record: a Deferred, or (fn, args)
        self._scheduled = False
        self._ready: deque = deque()  # (sinks, results) handed over by the writer thread
        self._drain_scheduled = False
        store.after_batch = self._kick
        # engine.reactor.EngineReactor runs end-of-turn work without a timer; other reactors
        # (tests) get callLater(0), which runs at the same point of the next iteration
        after_io = getattr(reactor, "call_after_io", None)
        self._after_turn = after_io if after_io is not None else (lambda fn: reactor.callLater(0, fn))

    def add(self, record) -> defer.Deferred:
        d = defer.Deferred()
        self._records.append(record)
        self._sinks.append(d)
        if not self._scheduled:
            self._scheduled = True
            self._after_turn(self._flush)
        return d

    def add_call(self, record, fn, *args) -> None:
        """``fn(result_or_exception, *args)`` in the reactor thread once the batch committed."""
        self._records.append(record)
        self._sinks.append((fn, args))
        if not self._scheduled:
            self._scheduled = True
            self._after_turn(self._flush)

    def later(self, fn) -> None:
        """Run ``fn()`` in the reactor thread after the current reactor turn."""
        self._after_turn(fn)

    def add_op(self, op) -> defer.Deferred:
        """A writer-thread op (message insert plus work in the same transaction), one Deferred,
        fired with the commit's other results (one reactor wake-up per commit, as for records)."""
        d = defer.Deferred()
        self.add_op_call(op, _settle, d)
        return d

    def add_op_call(self, op, fn, *args) -> None:
        """:meth:`add_op` without a Deferred: ``fn(result_or_exception, *args)`` in the reactor
        thread once the commit is done (a step's per-message path, as ``add_call`` for records)."""
        sink = (fn, args)
        ready = self._ready

        def done(result):  # runs in the writer thread; _kick follows the commit's callbacks
            ready.append(((sink,), (result,)))

        try:
            self._store.submit(op, done)
        except BaseException as exc:  # noqa: BLE001
            _deliver((sink,), exc)

    def _flush(self) -> None:
        self._scheduled = False
        records, sinks = self._records, self._sinks
        self._records, self._sinks = [], []
        if not records:
            return
        ready = self._ready

        def done(results):  # runs in the writer thread; _kick follows the commit's callbacks
            ready.append((sinks, results))

        try:
            self._store.submit_ingest(records, done)
        except BaseException as exc:  # noqa: BLE001 - writer stopped: every record fails, none is lost silently
            _deliver(sinks, exc)

    def _kick(self) -> None:
        """After a commit's callbacks (writer thread): one reactor wake-up for all its results.
        Waking from inside each callback let the reactor (woken by the first, while the writer
        waited for the GIL after the pipe write) drain before the next callback: about 1.7
        wake-ups per commit instead of 1. Under the GIL: the drain clears the flag before it
        pops, so a batch appended while the flag still reads True is seen by that drain."""
        if self._ready and not self._drain_scheduled:
            self._drain_scheduled = True
            self._reactor.callFromThread(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        ready = self._ready
        while ready:
            sinks, results = ready.popleft()
            _deliver(sinks, results)


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


def _settle(result, d) -> None:
    if isinstance(result, BaseException):
        d.errback(result)
    else:
        d.callback(result)
