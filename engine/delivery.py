"""Delivery workers: claim due queue entries, transform, send, record the outcome, retry or dead-letter.

One worker per destination. A claim takes, per ordering key, a window of the due entries at the
head of that key (``WINDOW``); the worker sends each window in order, one entry after the other,
in a *lane* (a key in one lane only; a lane may take several keys, one after the other), so with
``ordering: destination`` a failing message blocks the ones behind it (strict FIFO, Mirth "queue
on failure" semantics: the rest of the window goes back to the queue untried) and with
``ordering: key`` different patients progress in parallel, at most ``concurrency`` lanes. Claims and outcomes are writer ops (``Store.submit``): they share the
group commit of ingest, the outcomes of one reactor turn in one op, so a delivered message costs
no COMMIT of its own and no thread of the pool. Outcomes are fenced by the claim's owner, which
carries an epoch per worker instance (a worker replaced by a reload cannot record over its
successor); an outcome not recorded before a crash leaves its entry in flight, re-queued at the
next start (at-least-once).

No work for a destination that cannot take it: a commit that routes to it wakes it only when
something may be due. A destination whose peer does not answer (connection refused, timeout:
a transient outcome without a response) is *down*: it sleeps until the next step of its retry
policy, counted per destination, then probes with one entry (one connection attempt), and
resumes full windows once the peer answers. A single FIFO whose head waits for its retry sleeps
until then (new entries are behind it). A disabled destination only polls. A destination an
operator paused claims nothing and sets no timer (its entries stay queued; what is in flight
finishes, the rest of its windows goes back untried); resuming it claims at once.
Each entry is one delivery target of the destination (``target``): a message fanned out into
several targets has one entry each, with its own attempts, so a partial failure retries only
what failed. The worker hands the connector a :class:`engine.connectors.base.Delivery` (ids,
attempt, payload after transforms, the stored view when the connector needs it) and records the
generic :class:`Outcome`: accepted -> sent; content error -> error unless ``on_ae: retry``;
refused -> retry unless ``on_ar: error``; transient -> retry with exponential backoff and jitter
(or the receiver's ``retry_after``) until ``max_attempts``, then error (dead letter). The lease of
an entry in flight follows from the connector's own ``timeout`` (times the window). Claims and
outcomes are writer ops, transforms and stored-view reads run in threads, sends in the reactor.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import socket
import time

from twisted.internet import defer, task, threads
from twisted.python import failure

from engine import logs
from engine.connectors.base import (
    ACCEPTED,
    CONTENT_ERROR,
    NO_STORED_VIEW,
    REFUSED,
    TRANSIENT,
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
from engine.store.models import Completion, FollowUp
from engine.transforms import TransformContext, chain_from_json

log = logs.get("engine.delivery")
# the one event per delivered message, rendered on the fast path (logs.HotEvent)
_log_sent = logs.HotEvent("engine.delivery", "delivery.sent",
                          ("destination", "target", "entry_id", "message_id", "control_id", "attempts"))

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


_EPOCHS = itertools.count(1)
WINDOW = 256  # entries of one ordering key per claim, and per lane
KEYS_PER_LANE = 32  # keys a claim may hand one lane (many patients with a message or two each)
# Outcomes are handed to the writer in groups: when this many are waiting, when a lane ends, or
# this long after the first (a writer op of one outcome cost about 1 ms of the writer's time,
# and often a commit of its own, measured under the end-to-end benchmark)
FLUSH_AT = 64
FLUSH_AFTER_S = 0.005
# Entries one claim may take for a destination with several lanes (``ordering: key``). The
# entries of many keys lie on as many table pages, which the claim and then the outcome rewrite:
# measured about 50 us per entry in the writer against 10 for a FIFO's run of entries, so a
# claim for four free lanes (1,024 entries) held the writer 30-60 ms, and the ACKs of the
# records committed after it waited as long. The other lanes go on sending meanwhile.
KEYED_CLAIM_MAX = 64


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
        # the fence of every claim and outcome: process and worker instance (epoch)
        self.owner = f"{owner or worker_owner()}#{next(_EPOCHS)}"
        self.rng = rng or random.Random()
        self.running = False
        self.paused = False                    # an operator paused it (engine.store.controls)
        self.held: dict[int, object] = {}      # claimed entries whose outcome is not recorded
        self._lanes: set = set()               # Deferreds of the lanes being sent
        self._claiming = False
        self._rerun = False
        self._timer = None
        self._cursor: str | None = None
        self._sleep_until = 0.0                # a single FIFO whose head waits for its retry
        self._down_until = 0.0                 # the peer does not answer: next probe
        self._down_steps = 0
        self._pending: list[Completion] = []   # outcomes not yet handed to the writer
        self._flush_scheduled = None           # the delayed call of _flush
        self._flushing: list | None = None     # the outcomes being written
        self._recorded = 0                     # outcomes recorded / committed (sequence numbers)
        self._committed = 0
        self._waiters: list = []               # (sequence, Deferred)
        self.claims = 0                        # store claims made (tests, benchmarks)
        self.counters = {"sent": 0, "error": 0, "retry": 0, "filtered": 0}
        self.consecutive_failures = 0          # failed attempts since the last success (alerts)
        self.last_error: str | None = None
        self.last_error_at: float | None = None   # epoch seconds of last_error
        self.last_sent_at: float | None = None    # epoch seconds of the last entry sent
        self._chains: dict[str, object] = {}
        self._receipts_loop = None

    @property
    def peer_down(self) -> bool:
        """The peer did not answer: the worker sleeps until its next probe."""
        return self._down_steps > 0

    @property
    def capacity(self) -> int:
        q = self.cfg.queue
        return 1 if q.ordering == "destination" else max(1, q.concurrency)

    @property
    def in_flight(self) -> dict:
        return self.held

    def start(self) -> None:
        self.running = True
        self._claim_now()
        self._start_receipts()

    def reconfigure(self, cfg, connector) -> None:
        old = self.connector
        self.cfg, self.connector = cfg, connector
        self._down_until = self._sleep_until = 0.0
        self._down_steps = 0
        if old is not connector:
            # the old connection closes once the lanes using it are done
            defer.DeferredList(list(self._lanes)).addBoth(lambda _: old.close())
            self._stop_receipts()
            self._start_receipts()
        self.wake()

    # -- operator controls ----------------------------------------------------------------------
    def set_paused(self, paused: bool) -> None:
        """Pause: claim nothing from now on. Resume: claim at once, without waiting for a retry
        step or a FIFO head's sleep (a peer still down is probed with one entry)."""
        if paused == self.paused:
            return
        self.paused = paused
        if paused:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
        else:
            self.recheck()

    def recheck(self) -> None:
        """An operator made entries due now ("retry now"): forget the sleeps and look again."""
        self._sleep_until = self._down_until = 0.0
        self._claim_now()

    # -- when to look for work ------------------------------------------------------------------
    def wake(self) -> None:
        """New entries were committed for this destination: look for work if any can be due."""
        if not self.running or self.paused:
            return
        if not self.cfg.enabled:
            if self._timer is None or not self._timer.active():
                self._schedule(POLL_INTERVAL)
            return  # disabled: nothing to claim, its poll is scheduled
        now = time.time()
        if now < self._down_until or now < self._sleep_until:
            return  # its timer is set for that time; new entries cannot be due before
        self._claim_now()

    def _claim_now(self) -> None:
        if not self.running or self.paused:
            return
        if self._claiming:
            self._rerun = True
            return
        if len(self._lanes) >= self.capacity:
            return  # a lane ending claims again
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._claim()

    def _on_timer(self) -> None:
        self._timer = None
        self._sleep_until = 0.0
        self._claim_now()

    def _schedule(self, delay: float) -> None:
        if not self.running or self.paused:
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.reactor.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, delay), self._on_timer)

    # -- claims ---------------------------------------------------------------------------------
    def _claim(self) -> None:
        if not self.cfg.enabled:
            self._schedule(POLL_INTERVAL)
            return
        free = self.capacity - len(self._lanes)
        probing = self._down_steps > 0  # one entry, one connection attempt
        keys, window, most = (1, 1, 1) if probing else (free * KEYS_PER_LANE, WINDOW, free * WINDOW)
        if self.capacity > 1:
            most = min(most, KEYED_CLAIM_MAX)
        timeout = float(getattr(self.connector, "timeout", MIN_LEASE_S))
        lease = max(MIN_LEASE_S, LEASE_FACTOR * timeout) + (window - 1) * timeout
        name, owner, cursor, store = self.name, self.owner, self._cursor, self.store
        self._claiming = True
        self._rerun = False
        self.claims += 1
        d = self._write(lambda conn: store.claim_windows_within(
            conn, name, keys, window, owner, lease, time.time(), cursor, max_entries=most))
        d.addCallbacks(self._claimed, self._claim_failed)

    def _claim_failed(self, failure) -> None:
        self._claiming = False
        log.error("delivery.claim_failed", destination=self.name, error=logs.error_text(failure.value))
        self._schedule(POLL_INTERVAL)

    def _claimed(self, claimed) -> None:
        self._claiming = False
        self._cursor = claimed.cursor
        # each key's window goes to one lane (its order kept), the keys spread over the lanes
        free = max(1, self.capacity - len(self._lanes))
        lanes: list[list] = [[] for _ in range(min(free, len(claimed.lanes)))]
        for i, window in enumerate(claimed.lanes):
            for entry in window:
                self.held[entry.id] = entry
            lanes[i % len(lanes)].append(window)
        for windows in lanes:
            d = self._run_lane(windows)
            self._lanes.add(d)
            d.addBoth(self._lane_done, d)
        if not self.running:
            return
        if claimed.lanes or self._rerun:
            # lanes still free (a claim capped by KEYED_CLAIM_MAX, or new entries meanwhile)
            if len(self._lanes) < self.capacity:
                self.reactor.callLater(0, self._claim_now)
            return
        delay = POLL_INTERVAL
        if claimed.next_due is not None:
            wait = max(0.0, float(claimed.next_due) - time.time())
            if self.cfg.queue.ordering in ("destination", "none"):
                # one FIFO: new entries are behind the waiting head, so commits do not wake it
                # before the head is due (a look per POLL_INTERVAL still sees a head cancelled
                # by a deletion, or entries written by another process)
                self._sleep_until = time.time() + wait
            delay = min(POLL_INTERVAL, wait)
        self._schedule(delay)

    def _lane_done(self, result, d):
        self._lanes.discard(d)
        if isinstance(result, failure.Failure):
            log.error("delivery.lane_failed", destination=self.name, error=logs.error_text(result.value))
        if self.running:
            if time.time() < self._down_until:
                self._schedule(self._down_until - time.time())
            else:
                self.reactor.callLater(0, self._claim_now)
        return None

    # -- one lane: the window of one key, in order ----------------------------------------------
    # A lane and an attempt are plain callback chains, not inlineCallbacks generators: three
    # nested generators per message cost the reactor more than the send itself (measured with
    # py-spy under the end-to-end benchmark), and the reactor also serves ingest.
    def _run_lane(self, windows) -> defer.Deferred:
        """Send the windows of the lane's keys one key after the other, each in order; fires
        once every outcome of the lane is committed."""
        return _Lane(self, windows).run()

    def _release(self, entries) -> None:
        """Give claimed entries back to the queue untried (same attempts, due as they were)."""
        for rest in entries:
            self._record(Completion(rest.id, "released", rest.attempts))

    def _attempt(self, entry):
        """Deliver one entry; returns its status (``sent``, ``retry``, ...), or a Deferred of it
        when the transforms or the send must wait."""
        attempts = entry.attempts + 1
        prepared = self._prepare(entry)
        if isinstance(prepared, defer.Deferred):
            return prepared.addCallbacks(self._send_prepared, self._prepare_failed,
                                         callbackArgs=(entry, attempts), errbackArgs=(entry, attempts))
        return self._send_prepared(prepared, entry, attempts)

    def _prepare_failed(self, fail, entry, attempts) -> str:
        # a transform failure parks the entry, visibly
        detail = f"transform failed: {logs.error_text(fail.value)}"
        return self._outcome(entry, "error", attempts, detail=detail)

    def _send_prepared(self, prepared, entry, attempts):
        payload, stored = prepared
        if payload is None:
            return self._outcome(entry, "filtered", attempts, detail="filtered by a transform")
        delivery = Delivery(entry_id=entry.id, message_id=entry.message_id, destination=self.name,
                            target=entry.target, attempt=attempts, channel=entry.channel,
                            message_type=entry.message_type, control_id=entry.control_id,
                            charset=entry.charset, payload=payload, original=entry.raw,
                            action=entry.action, stored=stored)
        sent = self.connector.send(delivery)
        if not isinstance(sent, defer.Deferred):
            return self._sent(sent, entry, attempts, delivery, payload)
        return sent.addCallback(self._sent, entry, attempts, delivery, payload)

    def _sent(self, outcome: Outcome, entry, attempts, delivery, payload) -> str:
        if outcome.kind == TRANSIENT and outcome.response is None:
            self._peer_down()
        else:
            self._down_steps = 0
            self._down_until = 0.0
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
        follow_ups = ()
        if status != "retry" and outcome.business_acks:
            follow_ups = tuple(business_ack_follow_ups(outcome, delivery, entry.route,
                                                       self.business_acks_for(entry.route),
                                                       engine_name=self.engine_name))
        return self._outcome(entry, status, attempts, outcome=outcome, payload=sent_payload,
                             follow_ups=follow_ups)

    def _peer_down(self) -> None:
        """No answer from the peer: no claim before the next step of the retry policy (lanes
        failing together count as one step)."""
        if time.time() < self._down_until:
            return
        self._down_steps += 1
        self._down_until = time.time() + self.cfg.queue.retry.delay(self._down_steps, self.rng)

    def _prepare(self, entry):
        """The payload after the route's transforms and the stored view: at once when neither
        needs work (the common MLLP relay), else a Deferred of them computed in a thread."""
        specs = entry.transforms or "[]"
        needs_stored = getattr(self.connector, "needs_stored", False)
        if specs == "[]" and not needs_stored:
            return entry.raw, NO_STORED_VIEW
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

    def _outcome(self, entry, status, attempts, *, outcome: Outcome | None = None, detail: str = "",
                 payload: bytes | None = None, follow_ups: tuple = ()) -> str:
        """Count and log an outcome, and queue it for the writer (with the messages it gives
        rise to, stored and queued in the same transaction); returns the status."""
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
        self.consecutive_failures = self.consecutive_failures + 1 if status in ("error", "retry") else 0
        if status in ("error", "retry"):
            self.last_error, self.last_error_at = detail, time.time()
        if status == "sent":
            self.last_sent_at = time.time()
            _log_sent(self.name, entry.target or None, entry.id, entry.message_id,
                      logs.safe(entry.control_id), attempts)
        else:
            log_fn = log.info if status == "filtered" else log.warning
            log_fn("delivery." + status, destination=self.name, target=entry.target or None,
                   entry_id=entry.id, message_id=entry.message_id,
                   control_id=logs.safe(entry.control_id), attempts=attempts, detail=detail or None,
                   next_attempt_in_s=round(next_at - time.time(), 3) if next_at else None)
        self._record(Completion(entry.id, store_status, attempts, next_at,
                                detail if status != "sent" else None, response, payload,
                                follow_ups=follow_ups))
        return status

    # -- outcomes: one writer op per reactor turn -----------------------------------------------
    def _write(self, op) -> defer.Deferred:
        """Run ``op(conn)`` and commit; fires in the reactor thread once it committed (or with
        the error). SQLite: in the store writer's transactions (one writer: no wait for the
        write lock); with several lanes as a *background* op, never in the transaction of an
        ingest record, whose ACK waits for its commit (their claims and outcomes rewrite about
        one page per entry; a FIFO's, a few pages per window, share the commit of ingest: held
        back, they delayed the FIFO's next window, measured 0.49x delivered against 0.57x in
        e2e). PostgreSQL: in a transaction of its own in a pool thread, so that ingest keeps
        its one-statement autocommit path (a writer transaction holding an op takes the
        general path: measured, ingest fell to 0.27x of the disabled case while delivering)."""
        d = defer.Deferred()
        reactor = self.reactor

        def done(result):  # writer thread
            reactor.callFromThread(_fire, d, result)

        try:
            if getattr(self.store, "dialect", "sqlite") == "postgresql":
                return threads.deferToThread(self.store.in_transaction, op)
            self.store.submit(op, done, background=self.capacity > 1)
        except Exception as exc:  # noqa: BLE001 - no store: the caller retries later
            d.errback(exc)
        return d

    def _record(self, completion: Completion) -> None:
        self._pending.append(completion)
        self._recorded += 1
        if len(self._pending) >= FLUSH_AT:
            self._flush_soon(0)
        else:
            self._flush_soon(FLUSH_AFTER_S)

    def _flush_soon(self, delay: float) -> None:
        call = self._flush_scheduled
        if call is not None and call.active():
            if delay > 0 or call.getTime() <= self.reactor.seconds():
                return
            call.cancel()
        self._flush_scheduled = self.reactor.callLater(delay, self._flush)

    def _all_recorded(self) -> defer.Deferred:
        """Fires once every outcome recorded so far is committed (flushed now)."""
        if self._committed >= self._recorded:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((self._recorded, d))
        if self._pending:
            self._flush_soon(0)
        return d

    def _flush(self) -> None:
        self._flush_scheduled = None
        if self._flushing or not self._pending:
            return
        # several lanes: at most FLUSH_AT per op, else the outcomes recorded while the previous
        # group was written make one large group (100-260 measured), a writer op as long as a
        # large claim; a FIFO's lane waits for all its outcomes at its window's end, in one op
        cut = FLUSH_AT if self.capacity > 1 else len(self._pending)
        batch, self._pending = self._pending[:cut], self._pending[cut:]
        upto = self._recorded - len(self._pending)
        self._flushing = batch
        store, owner = self.store, self.owner
        d = self._write(lambda conn: store.complete_within(conn, owner, batch))
        d.addCallbacks(self._flushed, self._flush_failed, callbackArgs=(batch, upto),
                       errbackArgs=(batch,))

    def _flushed(self, recorded, batch, upto) -> None:
        self._flushing = None
        woken: set[str] = set()
        for c, ok in zip(batch, recorded):
            entry = self.held.pop(c.entry_id, None)
            if not ok:
                log.warning("delivery.fenced", destination=self.name, entry_id=c.entry_id)
            elif c.follow_ups:
                for f in c.follow_ups:
                    log.info("delivery.business_ack_queued", destination=self.name, entry_id=c.entry_id,
                             message_id=entry.message_id if entry is not None else None,
                             ack_type=f.message_type, to=f.destination)
                woken.update(f.destination for f in c.follow_ups)
        if woken:
            self.on_follow_ups(sorted(woken))
        self._committed = upto
        waiters, self._waiters = self._waiters, []
        for seq, w in waiters:
            if seq <= upto:
                w.callback(None)
            else:
                self._waiters.append((seq, w))
        if self._pending:
            self._flush_soon(0 if self._waiters or len(self._pending) >= FLUSH_AT else FLUSH_AFTER_S)

    def _flush_failed(self, fail, batch) -> None:
        """Keep the outcomes until the store takes them; when stopping, their entries stay in
        flight and the next start re-queues them (at-least-once)."""
        self._flushing = None
        log.error("delivery.record_failed", destination=self.name, entries=len(batch),
                  error=logs.error_text(fail.value))
        self._pending[:0] = batch
        if self.running:
            if self._flush_scheduled is not None and self._flush_scheduled.active():
                self._flush_scheduled.cancel()
            self._flush_scheduled = self.reactor.callLater(STORE_RETRY_S, self._flush)

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
        """Stop claiming; let the lanes finish their current send within ``grace`` seconds,
        then put what is still held back in the queue."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._stop_receipts()
        pending = list(self._lanes)
        if pending:
            timeout = defer.Deferred()
            call = self.reactor.callLater(grace, timeout.callback, None)
            yield defer.DeferredList([defer.DeferredList(pending), timeout], fireOnOneCallback=True)
            if call.active():
                call.cancel()
        recording = {c.entry_id for c in [*self._pending, *(self._flushing or ())]}
        held = [i for i in self.held if i not in recording]
        if held:
            store, owner = self.store, self.owner
            try:
                yield self._write(lambda conn: store.release_within(conn, owner, held))
            except Exception as exc:  # noqa: BLE001 - recovery at next start re-queues them
                log.error("delivery.release_failed", destination=self.name, entries=len(held),
                          error=logs.error_text(exc))
        try:
            yield self.connector.close()
        except Exception:  # noqa: BLE001
            pass


class _Lane:
    """One lane's run: its windows in order, one entry at a time, as a callback chain. An entry
    whose attempt completes at once (filtered by a transform, a connector that answers without
    waiting) is followed in the same loop rather than by recursion."""

    __slots__ = ("worker", "windows", "w", "i", "done")

    def __init__(self, worker: DestinationWorker, windows) -> None:
        self.worker = worker
        self.windows = windows
        self.w = 0       # the window being sent
        self.i = 0       # the next entry of that window
        self.done = defer.Deferred()

    def run(self) -> defer.Deferred:
        self._next()
        return self.done

    def _next(self) -> None:
        worker = self.worker
        try:
            while self.w < len(self.windows):
                entries = self.windows[self.w]
                if self.i >= len(entries):
                    self.w, self.i = self.w + 1, 0
                    continue
                if not worker.running:
                    break  # the rest stays held: released by stop()
                if worker.paused or time.time() < worker._down_until:
                    # paused, or the peer is down (no attempt of our own): this entry and those
                    # behind it in its key go back to the queue untried, order kept
                    worker._release(entries[self.i:])
                    self.w, self.i = self.w + 1, 0
                    continue
                status = worker._attempt(entries[self.i])
                if isinstance(status, defer.Deferred):
                    status.addCallbacks(self._attempted, self._failed)
                    return
                self._after(status)
        except Exception:  # noqa: BLE001 - reported as the lane's failure, like any bug
            self._failed(failure.Failure())
            return
        self._finish()

    def _after(self, status: str) -> None:
        """Account for the outcome of the current entry; a retry ends its key's window."""
        if status == "retry":
            # order: nothing behind a failed entry of its key goes before it
            self.worker._release(self.windows[self.w][self.i + 1:])
            self.w, self.i = self.w + 1, 0
        else:
            self.i += 1

    def _attempted(self, status) -> None:
        try:
            self._after(status)
        except Exception:  # noqa: BLE001
            self._failed(failure.Failure())
            return
        self._next()

    def _finish(self) -> None:
        self.worker._all_recorded().chainDeferred(self.done)

    def _failed(self, fail) -> None:
        if not self.done.called:
            self.done.errback(fail)


def _fire(d, result) -> None:
    if isinstance(result, BaseException):
        d.errback(result)
    else:
        d.callback(result)
