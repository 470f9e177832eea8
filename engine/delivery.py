"""Delivery workers: claim due queue entries, transform, send, record the outcome, retry or dead-letter.

One worker per destination. The store's claim returns only the head entry of each ordering key, so
with ``ordering: destination`` a failing message blocks the ones behind it (strict FIFO, Mirth
"queue on failure" semantics) and with ``ordering: key`` different patients progress in parallel.
Each entry is one delivery target of the destination (``target``): a message fanned out into
several targets has one entry each, with its own attempts, so a partial failure retries only
what failed. The worker hands the connector a :class:`engine.connectors.base.Delivery` (ids,
attempt, payload after transforms, the stored view when the connector needs it) and records the
generic :class:`Outcome`: accepted -> sent; content error -> error unless ``on_ae: retry``;
refused -> retry unless ``on_ar: error``; transient -> retry with exponential backoff and jitter
(or the receiver's ``retry_after``) until ``max_attempts``, then error (dead letter). The lease of
an entry in flight follows from the connector's own ``timeout``. Database calls run in threads,
sends in the reactor.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import time

from twisted.internet import defer, task, threads

from engine import logs
from engine.connectors.base import (
    ACCEPTED,
    CONTENT_ERROR,
    NO_STORED_VIEW,
    REFUSED,
    BusinessAck,
    Delivery,
    ErrorInfo,
    Outcome,
    StoredView,
)
from engine.hl7.ack import ControlIdGenerator, hl7_timestamp
from engine.hl7.errors import HL7Error
from engine.hl7.encoding import codec_for
from engine.hl7.msh import read_msh
from engine.reports.zam import ZamFacts, build_zam
from engine.store.models import FollowUp
from engine.transforms import TransformContext, chain_from_json

log = logs.get("engine.delivery")

POLL_INTERVAL = 1.0  # catches entries made by other processes (CLI replay, other instances)
MIN_LEASE_S = 60.0   # an entry in flight is leased at least this long ...
LEASE_FACTOR = 4     # ... or this many times the connector's timeout, whichever is longer
STORE_RETRY_S = 1.0  # a failed completion is retried this often until the store takes it


def load_stored_view(store, message_id: int) -> StoredView:
    """What the channel stored for a message besides its bytes (report messages: the canonical
    submission, and for PACS reports the wrapped CI-SIS message)."""
    row = store.submission_row(message_id)
    if row is None:
        return NO_STORED_VIEW
    from engine.reports.submission import Submission

    return StoredView(kind=row["kind"], submission=Submission.model_validate_json(row["submission"]),
                      wrapped=row.get("wrapped"),
                      validation=json.loads(row["validation"]) if row.get("validation") else None)


def _codec(charset: str) -> str:
    try:
        return codec_for(charset)
    except HL7Error:  # stored messages passed this check at ingest; keep a safe fallback
        return "utf-8"


def worker_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


ZAM_CHANNEL = "engine:zam"  # the pseudo-channel of the ZAM messages the engine writes
_ZAM_IDS = ControlIdGenerator("ZAM")


def business_ack_follow_ups(outcome: Outcome, delivery: Delivery, route: str, acks_to: str | None,
                            *, engine_name: str, facility: str = "") -> list[FollowUp]:
    """The ZAM messages a final outcome gives rise to: one per business fact the connector
    reported, when the report asked for it (ACK_RECEPTION for Z01 and Z02, ACK_LECTURE_MSS for
    Z03: CI-SIS "Transmission de documents CDA en HL7 v2", meta-dmp-mss.md) and the route names
    a ``business_acks`` destination. Pure: no I/O."""
    if not outcome.business_acks:
        return []
    return zam_follow_ups(outcome.business_acks, delivery.stored.submission, delivery.original,
                          route, acks_to, engine_name=engine_name, facility=facility)


def zam_follow_ups(facts, submission, original_raw: bytes, route: str, acks_to: str | None,
                   *, engine_name: str, facility: str = "") -> list[FollowUp]:
    """The ZAM messages of business facts about the report ``original_raw`` (at delivery time,
    or later from a mail receipt), for those its submission asked for. Pure: no I/O."""
    if acks_to is None or submission is None:
        return []
    sub = submission
    wanted = {"Z01": sub.acks.reception, "Z02": sub.acks.reception, "Z03": sub.acks.lecture}
    try:
        original = read_msh(original_raw)
    except HL7Error:
        return []
    out = []
    for fact in facts:
        if not wanted.get(fact.event):
            continue
        cid = _ZAM_IDS.next()
        raw = build_zam(ZamFacts(fact.event, fact.ok,
                                 error_code=fact.error.code if fact.error else None,
                                 error_label=fact.error.label if fact.error else None,
                                 address=fact.address),
                        original, control_id=cid, timestamp=hl7_timestamp(),
                        sending_app=engine_name, sending_facility=facility)
        out.append(FollowUp(channel=ZAM_CHANNEL, destination=acks_to, route=route, raw=raw,
                            message_type=f"ZAM^{fact.event}", control_id=cid, version="2.6",
                            charset="UNICODE UTF-8", sending_app=engine_name,
                            sending_facility=facility, receiving_app=original.sending_app,
                            receiving_facility=original.sending_facility))
    return out


class DestinationWorker:
    def __init__(self, name, cfg, store, connector, reactor, *, owner=None, rng=None,
                 business_acks_for=None, on_follow_ups=None, engine_name: str = "mini-pfi"):
        self.name = name
        # route name -> the destination of its business acknowledgements (or None)
        self.business_acks_for = business_acks_for or (lambda route: None)
        # called with the destinations that got follow-up entries (to wake their workers)
        self.on_follow_ups = on_follow_ups or (lambda names: None)
        self.engine_name = engine_name
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
        self.last_error_at: float | None = None   # epoch seconds of last_error
        self._chains: dict[str, object] = {}
        self._receipts_loop = None

    @property
    def capacity(self) -> int:
        q = self.cfg.queue
        return 1 if q.ordering == "destination" else max(1, q.concurrency)

    def start(self) -> None:
        self.running = True
        self.wake()
        self._start_receipts()

    def reconfigure(self, cfg, connector) -> None:
        old = self.connector
        self.cfg, self.connector = cfg, connector
        if old is not connector:
            # the old connection closes once its in-flight message is answered
            defer.DeferredList(list(self.in_flight.values())).addBoth(lambda _: old.close())
            self._stop_receipts()
            self._start_receipts()
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
        lease = max(MIN_LEASE_S, LEASE_FACTOR * float(getattr(self.connector, "timeout", MIN_LEASE_S)))
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
            payload, stored = yield self._prepare(entry)
        except Exception as exc:  # noqa: BLE001 - a transform failure parks the entry, visibly
            detail = f"transform failed: {logs.error_text(exc)}"
            yield self._complete(entry, "error", attempts, detail=detail)
            return
        if payload is None:
            yield self._complete(entry, "filtered", attempts, detail="filtered by a transform")
            return
        delivery = Delivery(entry_id=entry.id, message_id=entry.message_id, destination=self.name,
                            target=entry.target, attempt=attempts, channel=entry.channel,
                            message_type=entry.message_type, control_id=entry.control_id,
                            charset=entry.charset, payload=payload, original=entry.raw,
                            action=entry.action, stored=stored)
        outcome: Outcome = yield self.connector.send(delivery)
        sent_payload = None if payload is entry.raw else payload
        q = self.cfg.queue
        if outcome.kind == ACCEPTED:
            status = "sent"
        elif outcome.kind == CONTENT_ERROR:
            status = "error" if q.on_content_error == "error" else "retry"
        elif outcome.kind == REFUSED:
            status = "error" if q.on_refused == "error" else "retry"
        else:
            status = "retry"
        if status == "retry" and q.max_attempts and attempts >= q.max_attempts:
            status = "error"
            outcome = dataclasses.replace(outcome, detail=f"{outcome.detail} (gave up after {attempts} attempts)")
        follow_ups = []
        if status != "retry" and outcome.business_acks:
            follow_ups = business_ack_follow_ups(outcome, delivery, entry.route,
                                                 self.business_acks_for(entry.route),
                                                 engine_name=self.engine_name)
        yield self._complete(entry, status, attempts, outcome=outcome, payload=sent_payload,
                             follow_ups=follow_ups)

    def _prepare(self, entry):
        """The payload after the route's transforms and the stored view, in a thread when
        either needs work (the common MLLP relay needs neither)."""
        specs = entry.transforms or "[]"
        needs_stored = getattr(self.connector, "needs_stored", False)
        if specs == "[]" and not needs_stored:
            return defer.succeed((entry.raw, NO_STORED_VIEW))
        chain = None
        if specs != "[]":
            chain = self._chains.get(specs)
            if chain is None:
                chain = chain_from_json(specs)
                self._chains[specs] = chain
        store = self.store

        def run():
            loaded = []

            def stored_view():
                if not loaded:
                    loaded.append(load_stored_view(store, entry.message_id))
                return loaded[0]

            payload = entry.raw
            if chain is not None:
                ctx = TransformContext(message_id=entry.message_id, channel=entry.channel,
                                       destination=self.name, codec=_codec(entry.charset),
                                       extras=self._extras(stored_view))
                payload = chain(entry.raw, ctx).payload
            return payload, (stored_view() if needs_stored else NO_STORED_VIEW)

        return threads.deferToThread(run)

    def _extras(self, stored_view) -> dict:
        """What transforms may read besides the message: registry lookups and the stored view
        (both run in this thread), never the store itself."""
        from engine.store.identities import make_identity_lookup

        return {"identity_lookup": make_identity_lookup(self.store), "stored": stored_view}

    @defer.inlineCallbacks
    def _complete(self, entry, status, attempts, *, outcome: Outcome | None = None, detail: str = "",
                  payload: bytes | None = None, follow_ups=()):
        response = outcome.response if outcome else None
        detail = detail or (outcome.detail if outcome else "")
        if outcome is not None and outcome.error is not None:
            detail = f"{detail} [{outcome.error}]" if detail else str(outcome.error)
        next_at = None
        store_status = status
        if status == "retry":
            delay = self.cfg.queue.retry.delay(attempts, self.rng)
            if outcome is not None and outcome.retry_after is not None:
                delay = max(0.0, float(outcome.retry_after))
            next_at = time.time() + delay
            store_status = "queued"
        self.counters[status] = self.counters.get(status, 0) + 1
        if status in ("error", "retry"):
            self.last_error, self.last_error_at = detail, time.time()
        log_fn = log.info if status in ("sent", "filtered") else log.warning
        log_fn("delivery." + status, destination=self.name, target=entry.target or None,
               entry_id=entry.id, message_id=entry.message_id,
               control_id=logs.safe(entry.control_id), attempts=attempts, detail=detail or None,
               next_attempt_in_s=round(next_at - time.time(), 3) if next_at else None)
        while True:
            try:
                ok = yield threads.deferToThread(
                    self.store.complete, entry.id, self.owner, status=store_status, attempts=attempts,
                    next_attempt_at=next_at, last_error=detail if status != "sent" else None,
                    response=response, payload=payload, follow_ups=follow_ups)
                if not ok:
                    log.warning("delivery.fenced", destination=self.name, entry_id=entry.id)
                elif follow_ups:
                    for f in follow_ups:
                        log.info("delivery.business_ack_queued", destination=self.name, entry_id=entry.id,
                                 message_id=entry.message_id, ack_type=f.message_type, to=f.destination)
                    self.on_follow_ups(sorted({f.destination for f in follow_ups}))
                return
            except Exception as exc:  # noqa: BLE001 - keep the outcome until the store takes it
                log.error("delivery.record_failed", destination=self.name, entry_id=entry.id, error=logs.error_text(exc))
                if not self.running:
                    return  # the lease expires; recovery re-queues it (at-least-once)
                d = defer.Deferred()
                self.reactor.callLater(STORE_RETRY_S, d.callback, None)
                yield d

    # -- mail receipts: connectors that read them back (MSSanté: DSN and MDN over IMAP) ---------
    def _start_receipts(self) -> None:
        interval = getattr(self.connector, "receipt_poll_interval", None)
        if not self.running or not interval or not self.cfg.enabled:
            return
        loop = task.LoopingCall(self._poll_receipts)
        loop.clock = self.reactor
        self._receipts_loop = loop
        loop.start(float(interval), now=True).addErrback(
            lambda f: log.error("delivery.receipts_stopped", destination=self.name,
                                error=logs.error_text(f.value)))

    def _stop_receipts(self) -> None:
        loop, self._receipts_loop = self._receipts_loop, None
        if loop is not None and loop.running:
            loop.stop()

    def _poll_receipts(self):
        """One pass over the receipts mailbox, in a thread; a failure is logged and the next
        pass tries again (nothing is flagged read before it is recorded)."""
        d = threads.deferToThread(self.connector.poll_receipts, self._record_receipt)

        def done(counts):
            if counts and (counts.get("receipts") or counts.get("other")):
                log.info("delivery.receipts_read", destination=self.name, **counts)

        def failed(f):
            log.warning("delivery.receipts_failed", destination=self.name, error=logs.error_text(f.value))

        return d.addCallbacks(done, failed)

    def _record_receipt(self, receipt) -> None:
        """(In a thread.) Match a receipt to the entry of its mail, record it once and queue the
        ZAM^Z02 / ZAM^Z03 its report asked for, in one transaction. Raises if the store fails."""
        entry = self.store.mail_entry(receipt.original_message_id)
        if entry is None:
            log.warning("delivery.receipt_unmatched", destination=self.name, receipt=receipt.event)
            return
        error = (ErrorInfo(receipt.error_code, "", receipt.error_label or "")
                 if receipt.error_code else None)
        stored = load_stored_view(self.store, entry["message_id"])
        follow_ups = zam_follow_ups([BusinessAck(receipt.event, receipt.ok, error, receipt.address)],
                                    stored.submission, entry["raw"], entry["route"],
                                    self.business_acks_for(entry["route"]), engine_name=self.engine_name)
        recorded = self.store.record_receipt(entry, key=receipt.key, event=receipt.event, ok=receipt.ok,
                                             error_code=receipt.error_code, follow_ups=follow_ups)
        log.info("delivery.receipt", destination=self.name, entry_id=entry["id"],
                 message_id=entry["message_id"], receipt=receipt.event, ok=receipt.ok,
                 error_code=receipt.error_code, new=recorded, business_acks=len(follow_ups) if recorded else 0)
        if recorded and follow_ups:
            names = sorted({f.destination for f in follow_ups})
            self.reactor.callFromThread(self.on_follow_ups, names)

    @defer.inlineCallbacks
    def stop(self, grace: float):
        """Stop claiming; let in-flight sends finish within ``grace`` seconds, then release them."""
        self.running = False
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._stop_receipts()
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

