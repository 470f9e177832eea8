"""Delivery workers: claim due queue entries, transform, send, record the outcome, retry or dead-letter.

One worker per destination. The store's claim returns only the head entry of each ordering key, so
with ``ordering: destination`` a failing message blocks the ones behind it (strict FIFO, Mirth
"queue on failure" semantics) and with ``ordering: key`` different patients progress in parallel.
Outcome policy (HL7 v2.5 §2.9.2.2): AA/CA sent; AE/CE error (no endless retry) unless ``on_ae:
retry``; AR/CR and no-answer failures retry with exponential backoff and jitter until
``max_attempts``, then error (dead letter). Database calls run in threads, sends in the reactor.
"""
from __future__ import annotations

import os
import random
import socket
import time

from twisted.internet import defer, threads

from engine import logs
from engine.connectors.base import ACCEPTED, ERROR, REJECTED, Outcome
from engine.hl7.encoding import codec_for
from engine.hl7.msh import read_msh
from engine.transforms import TransformContext, chain_from_json

log = logs.get("engine.delivery")

POLL_INTERVAL = 1.0  # catches entries made by other processes (CLI replay, other instances)


def worker_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class DestinationWorker:
    def __init__(self, name, cfg, store, connector, reactor, *, owner=None, rng=None):
        self.name = name
        self.cfg = cfg
        self.store = store
        self.connector = connector
        self.reactor = reactor
        self.owner = owner or worker_owner()
        self.rng = rng or random.Random()
        self.running = False
        self.in_flight: dict[int, defer.Deferred] = {}
        self._claiming = False
        self._wake_call = None
        self._rerun = False
        self.counters = {"sent": 0, "error": 0, "retry": 0, "filtered": 0}
        self.last_error: str | None = None
        self._chains: dict[str, object] = {}

    @property
    def capacity(self) -> int:
        q = self.cfg.queue
        return 1 if q.ordering == "destination" else max(1, q.concurrency)

    def start(self) -> None:
        self.running = True
        self.wake()

    def reconfigure(self, cfg, connector) -> None:
        old = self.connector
        self.cfg, self.connector = cfg, connector
        if old is not connector:
            # the old connection closes once its in-flight message is answered
            defer.DeferredList(list(self.in_flight.values())).addBoth(lambda _: old.close())
        self.wake()

    def wake(self) -> None:
        """Look for work now (new messages routed here, or a retry falling due)."""
        if not self.running:
            return
        if not self.cfg.enabled and self._wake_call is not None and self._wake_call.active():
            return  # disabled: nothing to claim, its poll is already scheduled
        if self._claiming:
            self._rerun = True
            return
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        self._claim()

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        if self._wake_call is not None and self._wake_call.active():
            if self._wake_call.getTime() <= self.reactor.seconds() + delay:
                return
            self._wake_call.cancel()
        self._wake_call = self.reactor.callLater(max(0.0, delay), self.wake)

    @defer.inlineCallbacks
    def _claim(self):
        free = self.capacity - len(self.in_flight)
        if free <= 0 or not self.cfg.enabled:
            if not self.cfg.enabled:
                self._schedule(POLL_INTERVAL)
            return
        self._claiming = True
        self._rerun = False
        lease = max(60.0, self.cfg.ack_timeout * 4 + self.cfg.connect_timeout)
        try:
            entries = yield threads.deferToThread(self.store.claim_due, self.name, free, self.owner, lease)
            next_due = None
            if not entries:
                next_due = yield threads.deferToThread(self.store.next_due_at, self.name)
        except Exception as exc:  # noqa: BLE001 - store down: try again shortly, visibly
            log.error("delivery.claim_failed", destination=self.name, error=logs.error_text(exc))
            self._claiming = False
            self._schedule(POLL_INTERVAL)
            return
        self._claiming = False
        for entry in entries:
            d = self._process(entry)
            self.in_flight[entry.id] = d
            d.addBoth(self._finished, entry.id)
        if entries or self._rerun:
            if len(self.in_flight) < self.capacity:
                self.reactor.callLater(0, self.wake)
            return
        delay = POLL_INTERVAL
        if next_due is not None:
            delay = min(POLL_INTERVAL, max(0.0, float(next_due) - time.time()))
        self._schedule(delay)

    def _finished(self, result, entry_id):
        self.in_flight.pop(entry_id, None)
        if self.running:
            self.reactor.callLater(0, self.wake)
        return None

    @defer.inlineCallbacks
    def _process(self, entry):
        attempts = entry.attempts + 1
        try:
            payload = yield self._transform(entry)
        except Exception as exc:  # noqa: BLE001 - a transform failure parks the entry, visibly
            detail = f"transform failed: {logs.error_text(exc)}"
            yield self._complete(entry, "error", attempts, detail=detail)
            return
        if payload is None:
            yield self._complete(entry, "filtered", attempts, detail="filtered by a transform")
            return
        control_id = entry.control_id
        if payload is not entry.raw:
            try:
                control_id = read_msh(payload).control_id
            except Exception:  # noqa: BLE001
                pass
        outcome: Outcome = yield self.connector.send(payload, control_id)
        sent_payload = None if payload is entry.raw else payload
        q = self.cfg.queue
        if outcome.kind == ACCEPTED:
            status = "sent"
        elif outcome.kind == ERROR:
            status = "error" if q.on_ae == "error" else "retry"
        elif outcome.kind == REJECTED:
            status = "error" if q.on_ar == "error" else "retry"
        else:
            status = "retry"
        if status == "retry" and q.max_attempts and attempts >= q.max_attempts:
            status = "error"
            outcome = Outcome(outcome.kind, outcome.response, f"{outcome.detail} (gave up after {attempts} attempts)")
        yield self._complete(entry, status, attempts, outcome=outcome, payload=sent_payload)

    def _transform(self, entry):
        specs = entry.transforms or "[]"
        if specs == "[]":
            return defer.succeed(entry.raw)
        chain = self._chains.get(specs)
        if chain is None:
            chain = chain_from_json(specs)
            self._chains[specs] = chain

        def run():
            try:
                codec = codec_for(read_msh(entry.raw).charset)
            except Exception:  # noqa: BLE001
                codec = "utf-8"
            ctx = TransformContext(message_id=entry.message_id, channel=entry.channel,
                                   destination=self.name, codec=codec, extras=self._extras())
            return chain(entry.raw, ctx).payload

        return threads.deferToThread(run)

    def _extras(self) -> dict:
        """What transforms may read besides the message: registry lookups (run in this thread)."""
        from engine.identity.lookup import make_identity_lookup

        return {"identity_lookup": make_identity_lookup(self.store), "store": self.store}

    @defer.inlineCallbacks
    def _complete(self, entry, status, attempts, *, outcome: Outcome | None = None, detail: str = "",
                  payload: bytes | None = None):
        response = outcome.response if outcome else None
        detail = detail or (outcome.detail if outcome else "")
        next_at = None
        store_status = status
        if status == "retry":
            delay = self.cfg.queue.retry.delay(attempts, self.rng)
            next_at = time.time() + delay
            store_status = "queued"
        self.counters[status] = self.counters.get(status, 0) + 1
        if status in ("error", "retry"):
            self.last_error = detail
        log_fn = log.info if status in ("sent", "filtered") else log.warning
        log_fn("delivery." + status, destination=self.name, entry_id=entry.id, message_id=entry.message_id,
               control_id=logs.safe(entry.control_id), attempts=attempts, detail=detail or None,
               next_attempt_in_s=round(next_at - time.time(), 3) if next_at else None)
        while True:
            try:
                ok = yield threads.deferToThread(
                    self.store.complete, entry.id, self.owner, status=store_status, attempts=attempts,
                    next_attempt_at=next_at, last_error=detail if status != "sent" else None,
                    response=response, payload=payload)
                if not ok:
                    log.warning("delivery.fenced", destination=self.name, entry_id=entry.id)
                return
            except Exception as exc:  # noqa: BLE001 - keep the outcome until the store takes it
                log.error("delivery.record_failed", destination=self.name, entry_id=entry.id, error=logs.error_text(exc))
                if not self.running:
                    return  # the lease expires; recovery re-queues it (at-least-once)
                d = defer.Deferred()
                self.reactor.callLater(1.0, d.callback, None)
                yield d

    @defer.inlineCallbacks
    def stop(self, grace: float):
        """Stop claiming; let in-flight sends finish within ``grace`` seconds, then release them."""
        self.running = False
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        pending = list(self.in_flight.values())
        if pending:
            timeout = defer.Deferred()
            call = self.reactor.callLater(grace, timeout.callback, None)
            yield defer.DeferredList([defer.DeferredList(pending), timeout], fireOnOneCallback=True)
            if call.active():
                call.cancel()
        for entry_id in list(self.in_flight):
            try:
                yield threads.deferToThread(self.store.release, entry_id, self.owner)
            except Exception as exc:  # noqa: BLE001 - recovery at next start re-queues it
                log.error("delivery.release_failed", destination=self.name, entry_id=entry_id, error=logs.error_text(exc))
        try:
            yield self.connector.close()
        except Exception:  # noqa: BLE001
            pass

