"""The generic MLLP inbound channel: from one frame to one durable message and its ACK.

Per frame, in the reactor thread and in microseconds: read MSH with the split-based reader, check
what the channel accepts, pick the destinations from MSH (router cache), build the ACK that will be
stored with the message, and hand the record to the group-commit batcher. The ACK is written only
when the store's COMMIT has returned (a positive ACK means durably committed). Bad input is stored
too (status ``rejected``) and answered AE/AR with an ERR segment: nothing is lost, nothing crashes.

ACK rules: HL7 v2.5 §2.9 (original mode AA/AE/AR when MSH-15 and MSH-16 are empty, enhanced mode
CA/CE/CR per MSH-15), MLLP release 2 commit acknowledgement (0x06 / 0x15) when configured.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from engine import logs
from engine.connectors.base import NO_STORED_VIEW, StoredView
from engine.connectors.registry import SINGLE_TARGET, expand, fans_out
from engine.hl7.ack import AckError, ack_code, accept_ack_wanted, build_ack, is_ack
from engine.hl7.encoding import message_codec
from engine.hl7.errors import HL7Error
from engine.hl7.fields import get_field
from engine.hl7.msh import read_msh
from engine.histogram import Histogram
from engine.store import Duplicate, EntrySpec, IngestRecord, Stored
from mllp.framing import COMMIT_ACK, COMMIT_NAK
from mllp.protocol import PendingReply

log = logs.get("engine.channel")
# the one event per accepted message, rendered on the fast path (logs.HotEvent)
_log_stored = logs.HotEvent("engine.channel", "message.stored",
                            ("message_id", "channel", "control_id", "message_type", "destinations", "peer"))

# HL7 table 0357 codes that mean "the receiver does not support this" -> reject (AR/CR);
# the others are content errors -> AE/CE (HL7 v2.5 §2.9.2.2).
_REJECT_CODES = frozenset({"200", "201", "202", "203", "206", "207"})

ENTRIES_CACHE_SIZE = 1024  # route-target tuples whose entry lists are reused (cleared when full)
ORDER_KEY_HEX = 16         # hex digits kept of the SHA-256 of an ordering key
NO_REPLY = b""  # enhanced mode with MSH-15 NE/ER/SU: nothing is written, the connection stays open


def order_key_hash(raw: bytes, path: str | None) -> str:
    """The ordering key of a message, hashed: the key (an IPP) is patient data, the hash is not."""
    if not path:
        return ""
    try:
        value = get_field(raw, path)
    except Exception:  # noqa: BLE001 - a message without that field is ordered with the others
        value = None
    if not value:
        return "-"
    return hashlib.sha256(value.encode("utf-8", "replace") if isinstance(value, str) else value).hexdigest()[:ORDER_KEY_HEX]


@dataclass
class ChannelCounters:
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    conflicts: int = 0
    store_failures: int = 0


class MLLPChannel:
    """Frame handler for one inbound MLLP channel (``type: mllp`` in routes.yaml)."""

    def __init__(self, name, cfg, engine_cfg, router, store_batcher, ack_ids, *, on_stored=None,
                 clock=time.time, steps_for=None):
        self.name = name
        self.cfg = cfg
        self.engine_cfg = engine_cfg
        self.router = router
        self.batcher = store_batcher
        self.ack_ids = ack_ids
        self.on_stored = on_stored  # callable(destinations) -> wakes the delivery workers
        self.clock = clock
        self.counters = ChannelCounters()
        self.last_received_at: float | None = None  # epoch seconds of the last frame (status, console)
        self.ack_latency = Histogram()  # seconds from reception to the ACK (or its decision)
        self.store_ok = True
        self.store = None  # set by the engine when a processing step needs writer-thread ops
        # steps_for(channel cfg, engine cfg) -> the ACK-deciding steps of this channel, in the
        # order they are tried (first match); given by the wiring module
        self.steps_for = steps_for or (lambda _cfg, _engine_cfg: [])
        self.steps = self.steps_for(cfg, engine_cfg)
        self._wake_pending: set | None = None  # destinations to wake after this reactor turn
        # queue entries per route-target tuple without a per-message ordering key (read-only
        # for the store; emptied on reload)
        self._entries_cache: dict = {}

    # routes.yaml reload: the handler picks up the new objects on the next frame
    def reconfigure(self, cfg, engine_cfg, router) -> None:
        self.cfg, self.engine_cfg, self.router = cfg, engine_cfg, router
        self.steps = self.steps_for(cfg, engine_cfg)
        self._entries_cache = {}

    def handle(self, payload: bytes, conn) -> PendingReply | defer.Deferred | bytes | None:
        """The frame's answer; its latency (reception to ACK ready) goes to ``ack_latency``:
        here for answers that come through a Deferred, in ``_on_result`` for the common path."""
        now = self.clock()
        result = self._handle(payload, conn, now)
        if isinstance(result, defer.Deferred):
            result.addBoth(self._observe_latency, now)
        return result

    def _observe_latency(self, result, since: float):
        self.ack_latency.observe(self.clock() - since)
        return result

    def _handle(self, payload: bytes, conn, now: float) -> PendingReply | defer.Deferred | bytes | None:
        self.counters.received += 1
        self.last_received_at = now
        msh = None
        try:
            msh = read_msh(payload)
            if is_ack(msh):
                raise HL7Error("200", "ACK messages are not accepted on an inbound channel", "MSH^1^9")
            problem = self.router.channel_accepts(self.cfg, msh)
            if problem is not None:
                raise HL7Error(*problem)
            codec, charset_flags = message_codec(payload, msh.charset, default=self.cfg.encoding.default,
                                                 cp1252_fallback=self.cfg.encoding.cp1252_fallback)
        except HL7Error as err:
            return self._reject(payload, msh, err, now, conn)
        flags = ",".join(sorted(charset_flags)) if charset_flags else None
        if self.cfg.validation.hl7apy:
            d = threads.deferToThread(_hl7apy_problem, payload, codec)
            d.addCallback(self._after_validation, payload, msh, flags, now, conn, codec)
            return d
        return self._accept(payload, msh, flags, now, conn, codec)

    def _after_validation(self, problem, payload, msh, flags, now, conn, codec="utf-8"):
        if problem is None:
            return self._accept(payload, msh, flags, now, conn, codec)
        if self.cfg.validation.on_error == "reject":  # hl7apy's text may quote field values
            return self._reject(payload, msh, HL7Error("102", problem), now, conn, log_reason=False)
        flags = ",".join(filter(None, [flags, "hl7apy_invalid"]))
        return self._accept(payload, msh, flags, now, conn, codec)

    # -- accepted message -------------------------------------------------------------------
    def _accept(self, payload, msh, flags, now, conn, codec="utf-8"):
        targets = self.router.targets(self.name, msh)
        entries = self._entries_cache.get(targets)  # same targets, no per-message key: reused
        if entries is None:
            entries = self._entries_for(payload, targets, NO_STORED_VIEW)
            if not any(t.ordering == "key" for t in targets):
                if len(self._entries_cache) >= ENTRIES_CACHE_SIZE:
                    self._entries_cache.clear()
                self._entries_cache[targets] = entries
        code = ack_code(msh, "accept")
        ack = self._ack_bytes(msh, code, now)
        record = IngestRecord(
            channel=self.name,
            raw=payload,
            received_at=now,
            sending_app=msh.sending_app,
            sending_facility=msh.sending_facility,
            receiving_app=msh.receiving_app,
            receiving_facility=msh.receiving_facility,
            message_type=msh.message_type,
            control_id=msh.control_id,
            version=msh.version,
            charset=msh.charset,
            status="routed" if entries else "filtered",
            ack=ack,
            ack_code=code,
            flags=flags,
            entries=entries,
            dedup=bool(msh.control_id),
            conflict_ack=self._conflict_ack_factory(msh, now),
        )
        step = self._step_for(msh)
        if step is not None:
            answer = self._answer_factory(msh, now)
            if step.prepare is not None:  # parsing/validation in a thread, off the reactor
                d = threads.deferToThread(step.prepare, payload, codec, self.store)
                # a step that cannot process the message is a content answer, never a store failure
                d.addErrback(lambda f: _PrepareFailed(f.value))
                d.addCallback(self._after_prepare, step, record, targets, codec, answer,
                              payload, msh, now, conn)
            else:  # the step's work in the writer op: no Deferred chain per message
                reply = PendingReply()
                self.batcher.add_op_call(step.make_op(self.store, record, None, codec, answer),
                                         self._on_step_result, reply, step, msh, ack, entries,
                                         conn, now)
                return reply
            d.addCallback(self._step_done, step, msh, conn)
            d.addCallbacks(self._stored, self._store_failed, callbackArgs=(msh, ack, entries, conn),
                           errbackArgs=(msh, now, conn))
            return d
        # hot path: the batcher calls _on_result directly and the protocol gets a PendingReply,
        # no Deferred chain per message
        reply = PendingReply()
        self.batcher.add_call(record, self._on_result, reply, msh, ack, entries, conn, now)
        return reply

    def _entries_for(self, payload, targets, view) -> list[EntrySpec]:
        """One queue entry per delivery target of each destination reached (a connector type
        may fan one message out into several targets, from what the channel stored)."""
        dests = self.router.config.destinations
        out = []
        for t in targets:
            cfg = dests.get(t.destination)
            names = expand(cfg, view) if cfg is not None else SINGLE_TARGET
            key = order_key_hash(payload, t.ordering_key) if t.ordering == "key" else ""
            for name in names:
                out.append(EntrySpec(destination=t.destination, route=t.route, order_key=key,
                                     transforms=t.transforms_json, target=name, hold=t.hold,
                                     by_document=t.ordering == "document"))
        return out

    def _fan_out(self, record, targets, prepared):
        """After a step's ``prepare``: destinations whose connector fans out get their targets
        from what the step found (the canonical submission)."""
        dests = self.router.config.destinations
        if not any(t.destination in dests and fans_out(dests[t.destination]) for t in targets):
            return record
        view = StoredView(kind=getattr(prepared, "kind", None),
                          submission=getattr(prepared, "submission", None),
                          wrapped=getattr(prepared, "wrapped", None))
        record.entries = self._entries_for(record.raw, targets, view)
        if record.status in ("routed", "filtered"):
            record.status = "routed" if record.entries else "filtered"
        return record

    def _on_result(self, result, reply, msh, ack, entries, conn, now):
        self.ack_latency.observe(self.clock() - now)
        if isinstance(result, BaseException):
            try:
                value = self._store_failed(Failure(result), msh, now, conn)
            except Exception as exc:  # noqa: BLE001 - the protocol logs it and closes
                reply.fail(exc)
                return
            reply.resolve(value)
            return
        try:
            value = self._stored(result, msh, ack, entries, conn)
        except Exception as exc:  # noqa: BLE001 - the protocol logs it and closes, as with a Deferred
            reply.fail(exc)
            return
        reply.resolve(value)

    def _on_step_result(self, result, reply, step, msh, ack, entries, conn, now):
        """A step op's outcome, as the Deferred path had it: ``_step_done`` first (its failure
        is answered as a store failure), then as a plain record's (:meth:`_on_result`)."""
        if not isinstance(result, BaseException):
            try:
                result = self._step_done(result, step, msh, conn)
            except Exception as exc:  # noqa: BLE001
                result = exc
        self._on_result(result, reply, msh, ack, entries, conn, now)

    def _step_for(self, msh):
        if self.store is None:
            return None
        for step in self.steps:
            if step.applies(msh):
                return step
        return None

    def _after_prepare(self, prepared, step, record, targets, codec, answer, payload, msh, now, conn):
        if isinstance(prepared, _PrepareFailed):
            # the exception's type only: its text may quote a field value (patient data)
            log.error(step.name + ".failed", channel=self.name, control_id=logs.safe(msh.control_id),
                      error=type(prepared.error).__name__)
            err = HL7Error("207", f"the {step.name} step could not process this message "
                                  f"({type(prepared.error).__name__}); it is stored, not routed")
            # AE, not AR: resending the same content will not help
            return self._reject(payload, msh, err, now, conn, outcome="error").addCallback(_Final)
        return self.batcher.add_op(step.make_op(self.store, self._fan_out(record, targets, prepared),
                                                prepared, codec, answer))

    def _step_done(self, res, step, msh, conn):
        """Pass the store result on; an ACK rewritten by the step replaces the precomputed AA."""
        if isinstance(res, _Final):
            return res
        if isinstance(res.result, Stored):
            after = getattr(step, "after_commit", None)
            if after is not None:
                after(res.result.message_id, self.store)
            if res.ack is not None:
                log.info(step.name + ".processed", message_id=res.result.message_id, channel=self.name,
                         control_id=logs.safe(msh.control_id), action=res.action, findings=res.violations,
                         outcome=res.outcome)
                return _Answered(res.result, res.ack, res.outcome, res.routed)
        return res.result

    def _answer_factory(self, msh, now):
        def answer(outcome, errors):
            code = ack_code(msh, outcome)
            return build_ack(msh, code, control_id=self.ack_ids.next(), timestamp=_hl7_ts(now),
                             errors=errors), code

        return answer

    def _stored(self, result, msh, ack, entries, conn):
        self.store_ok = True
        if type(result) is Stored:  # the common case first (Stored has no subclass)
            self.counters.accepted += 1
            _log_stored(result.message_id, self.name, logs.safe(msh.control_id),
                        logs.safe(msh.message_type), len(entries), conn.peer)
            if entries and self.on_stored is not None:
                self._wake_after_turn(entries)
            return self._reply(msh, ack, "accept")
        if isinstance(result, _Final):  # answered and stored already (a step that failed)
            return result.ack
        if isinstance(result, _Answered):  # a processing step: AE (not routed) or AA with warnings
            if result.outcome == "error":
                self.counters.rejected += 1
            else:
                self.counters.accepted += 1
            if entries and result.routed and self.on_stored is not None:
                self.on_stored({e.destination for e in entries})
            return self._reply(msh, result.ack, result.outcome)
        if isinstance(result, Duplicate):
            if result.same_content:
                self.counters.duplicates += 1
                log.info("message.duplicate", original_id=result.original_id, channel=self.name,
                         control_id=logs.safe(msh.control_id), peer=conn.peer)
            else:
                self.counters.conflicts += 1
                log.warning("message.duplicate_conflict", original_id=result.original_id,
                            message_id=result.message_id, channel=self.name,
                            control_id=logs.safe(msh.control_id), peer=conn.peer)
            return result.ack  # the stored ACK, byte for byte
        raise TypeError(f"unexpected store result {type(result).__name__}")

    def _wake_after_turn(self, entries) -> None:
        """Wake the delivery workers once per reactor turn (one batch), not once per message."""
        pending = self._wake_pending
        if pending is None:
            pending = self._wake_pending = set()
            later = getattr(self.batcher, "later", None)
            if later is None:
                self._wake_pending = None
                self.on_stored({e.destination for e in entries})
                return
            later(self._wake_now)
        for e in entries:
            pending.add(e.destination)

    def _wake_now(self) -> None:
        pending, self._wake_pending = self._wake_pending, None
        if pending and self.on_stored is not None:
            self.on_stored(pending)

    def _store_failed(self, failure, msh, now, conn):
        """Store unavailable: never a positive ACK (AR + ERR 207, or close, per routes.yaml)."""
        self.store_ok = False
        self.counters.store_failures += 1
        log.error("message.store_failed", channel=self.name, control_id=logs.safe(msh.control_id if msh else ""),
                  error=logs.error_text(failure.value), peer=conn.peer)
        if self.engine_cfg.on_store_unavailable == "close":
            return None
        if self.cfg.ack.mode == "mllp_commit":
            return COMMIT_NAK
        err = AckError("207", "Message not stored: the engine's store is unavailable; resend later")
        return build_ack(msh, ack_code(msh, "reject"), control_id=self.ack_ids.next(),
                         timestamp=_hl7_ts(now), errors=[err])

    # -- rejected message (stored, not routed) ---------------------------------------------------
    def _reject(self, payload, msh, err: HL7Error, now, conn, log_reason: bool = True,
                outcome: str | None = None):
        """``outcome``: AE ("error") or AR ("reject"); by default from the table 0357 code."""
        self.counters.rejected += 1
        if outcome is None:
            outcome = "reject" if err.code in _REJECT_CODES else "error"
        code = ack_code(msh, outcome)
        if self.cfg.ack.mode == "mllp_commit":
            ack = COMMIT_NAK
        else:
            ack = build_ack(msh, code, control_id=self.ack_ids.next(), timestamp=_hl7_ts(now),
                            errors=[AckError(err.code, err.text, err.severity, err.location)])
        record = IngestRecord(
            channel=self.name,
            raw=payload,
            received_at=now,
            sending_app=msh.sending_app if msh else "",
            sending_facility=msh.sending_facility if msh else "",
            receiving_app=msh.receiving_app if msh else "",
            receiving_facility=msh.receiving_facility if msh else "",
            message_type=msh.message_type if msh else "",
            control_id=msh.control_id if msh else "",
            version=msh.version if msh else "",
            charset=msh.charset if msh else "",
            status="rejected",
            ack=ack,
            ack_code=code,
            error_code=err.code,
            entries=[],
            dedup=False,
        )
        log.warning("message.rejected", channel=self.name, control_id=logs.safe(msh.control_id if msh else ""),
                    hl7_error=err.code, reason=logs.safe(err.text, 200) if log_reason else None,
                    location=err.location, peer=conn.peer)
        d = self.batcher.add(record)
        # A rejected message is answered with its NAK whether or not the store took it: the
        # sender must fix the message, not resend it. A store failure is still logged.
        d.addCallbacks(lambda _r: ack, self._rejected_store_failed, errbackArgs=(ack,))
        return d

    def _rejected_store_failed(self, failure, ack):
        self.store_ok = False
        self.counters.store_failures += 1
        log.error("message.store_failed", channel=self.name, error=logs.error_text(failure.value))
        return ack

    # -- ACK helpers ---------------------------------------------------------------------------
    def _ack_bytes(self, msh, code, now) -> bytes:
        if self.cfg.ack.mode == "mllp_commit":
            return COMMIT_ACK
        return build_ack(msh, code, control_id=self.ack_ids.next(), timestamp=_hl7_ts(now))

    def _reply(self, msh, ack: bytes, outcome: str):
        if self.cfg.ack.mode != "mllp_commit" and not accept_ack_wanted(msh, outcome):
            return NO_REPLY
        return ack

    def _conflict_ack_factory(self, msh, now):
        if self.engine_cfg.duplicates.on_conflict != "reject":
            return None
        if self.cfg.ack.mode == "mllp_commit":
            return lambda: COMMIT_NAK

        def conflict_ack() -> bytes:
            err = AckError("205", "Duplicate key: this MSH-10 was already received from this sender "
                                  "with a different content; the message was stored but not routed")
            return build_ack(msh, ack_code(msh, "error"), control_id=self.ack_ids.next(),
                             timestamp=_hl7_ts(now), errors=[err])

        return conflict_ack


_ts_cache = [0, ""]


def _hl7_ts(epoch: float) -> str:
    """HL7 DTM with seconds precision and offset (cached per second: this runs per message)."""
    sec = int(epoch)
    if _ts_cache[0] != sec:
        _ts_cache[0] = sec
        _ts_cache[1] = time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(sec))
    return _ts_cache[1]


class _PrepareFailed:
    """A step's ``prepare`` raised: the message is answered AE 207 and stored as rejected."""

    __slots__ = ("error",)

    def __init__(self, error):
        self.error = error


class _Final:
    """The reply to a message that is already stored and answered (no step result to apply)."""

    __slots__ = ("ack",)

    def __init__(self, ack):
        self.ack = ack


class _Answered:
    """A stored message whose ACK was decided by a processing step in the same transaction."""

    __slots__ = ("stored", "ack", "outcome", "routed")

    def __init__(self, stored, ack, outcome, routed):
        self.stored, self.ack, self.outcome, self.routed = stored, ack, outcome, routed


def _hl7apy_problem(payload: bytes, codec: str) -> str | None:
    """hl7apy strict validation (about 10 ms per message: opt-in, in a thread)."""
    try:
        from hl7apy.parser import parse_message
        from hl7apy.consts import VALIDATION_LEVEL

        text = payload.decode(codec, "replace").replace("\r\n", "\r").replace("\n", "\r")
        parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        return None
    except Exception as exc:  # noqa: BLE001 - any hl7apy complaint is a validation failure
        return f"hl7apy strict validation failed: {type(exc).__name__}: {logs.safe(exc, 160)}"
