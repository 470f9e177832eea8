"""Outbound MLLP connector (plain, TLS or mutual TLS): send one message, classify its ACK.

The sender underneath keeps one message outstanding per connection, closes the socket on an ACK
timeout before anything is retried, and checks that MSA-2 equals the MSH-10 it sent (a late ACK
must never be credited to the next message: HL7 v2.5 §2.9 and the MLLP transport specification,
HL7 v2.5.1 Appendix C).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from twisted.internet import defer

from engine import logs
from engine.config import ClientTLSConfig, DestinationBase, Duration, RemotePort
from engine.connectors.base import ACCEPTED, ERROR, REJECTED, TRANSIENT, Delivery, Outcome
from engine.hl7.ack import read_ack
from engine.hl7.errors import HL7Error
from engine.hl7.msh import read_msh
from mllp.client import MLLPSender
from mllp.framing import COMMIT_ACK, COMMIT_NAK
from mllp.tls import TLSFiles, client_creator, file_problems

_CODES = {"AA": ACCEPTED, "CA": ACCEPTED, "AE": ERROR, "CE": ERROR, "AR": REJECTED, "CR": REJECTED}


class MLLPDestinationConfig(DestinationBase):
    type: Literal["mllp"]
    host: Annotated[str, Field(min_length=1)]
    port: RemotePort
    tls: ClientTLSConfig | None = None
    keep_alive: bool = True
    connect_timeout: Duration = 10.0
    ack_timeout: Duration = 30.0


def check_tls_files(cfg) -> list[tuple[str, str]]:
    """The registry's ``check`` of MLLP destinations (DRIMbox too): their client TLS files."""
    if cfg.tls is None:
        return []
    files = TLSFiles(cert=cfg.tls.cert, key=cfg.tls.key, ca=cfg.tls.ca)
    return [(f"tls.{field}", msg) for field, msg in file_problems(files)]


def classify_reply(reply: bytes) -> Outcome:
    """Map an HL7 ACK (or an MLLP release 2 commit block) to an Outcome."""
    if reply == COMMIT_ACK:
        return Outcome(ACCEPTED, reply, "commit ACK")
    if reply == COMMIT_NAK:
        return Outcome(REJECTED, reply, "commit NAK")
    try:
        info = read_ack(reply)
    except HL7Error as err:
        return Outcome(TRANSIENT, reply, f"unreadable acknowledgement: {err.text}")
    kind = _CODES.get(info.code)
    if kind is None:
        return Outcome(TRANSIENT, reply, f"unknown MSA-1 {logs.safe(info.code, 8)!r}")
    # Codes only: the peer's texts (MSA-3, ERR-8) may quote patient data, and this detail goes to
    # last_error, the logs and /status; the whole ACK is kept in the entry's response.
    detail = info.code
    if info.errors:
        detail += " ERR " + ",".join(logs.safe(c, 8) for c, _s, _t in info.errors)
    return Outcome(kind, reply, detail)


def control_id_of(delivery: Delivery) -> str:
    """The MSH-10 the ACK must echo: the stored column, unless a transform rewrote the message."""
    if not delivery.transformed:
        return delivery.control_id
    try:
        return read_msh(delivery.payload).control_id
    except HL7Error:
        return delivery.control_id


def make_sender(cfg, reactor) -> MLLPSender:
    creator = None
    if cfg.tls is not None:
        files = TLSFiles(cert=cfg.tls.cert, key=cfg.tls.key, ca=cfg.tls.ca,
                         verify_hostname=cfg.tls.verify_hostname)
        creator = client_creator(files, cfg.host)
    return MLLPSender(cfg.host, cfg.port, reactor=reactor, tls_creator=creator,
                      keep_alive=cfg.keep_alive, connect_timeout=cfg.connect_timeout,
                      ack_timeout=cfg.ack_timeout)


def _transient(fail) -> Outcome:
    """A send that failed (MLLPError: no reply, timeout, mismatch; connection lost and friends):
    retry later."""
    return Outcome(TRANSIENT, None, logs.error_text(fail.value))


class MLLPConnector:
    """One connection per delivery lane: one for a FIFO destination, ``concurrency`` where the
    order is per key or per document (each lane sends one message at a time and waits for its
    outcome, so any idle connection keeps the order of its key)."""

    kind = "mllp"
    needs_stored = False

    def __init__(self, cfg, reactor):
        self.cfg = cfg
        self.timeout = float(cfg.connect_timeout) + float(cfg.ack_timeout)
        q = cfg.queue
        lanes = q.concurrency if q.ordering in ("key", "document") else 1
        self.senders = [make_sender(cfg, reactor) for _ in range(max(1, lanes))]
        self.sender = self.senders[0]

    def _idle_sender(self):
        for sender in self.senders:
            if sender.idle:
                return sender
        return self.senders[0]  # more lanes than connections (a reload lowered concurrency)

    def send(self, delivery: Delivery) -> defer.Deferred:
        """A plain callback chain (no generator): this runs once per delivered message in the
        reactor that also serves ingest."""
        sender = self.sender if len(self.senders) == 1 else self._idle_sender()
        try:
            d = sender.send(delivery.payload, control_id_of(delivery) or None)
        except Exception as exc:  # noqa: BLE001 - a send that cannot even start: retry later
            return defer.succeed(Outcome(TRANSIENT, None, logs.error_text(exc)))
        return d.addCallbacks(classify_reply, _transient)

    def close(self):
        return defer.DeferredList([s.close() for s in self.senders])
