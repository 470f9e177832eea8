"""Outbound MLLP connector (plain, TLS or mutual TLS): send one message, classify its ACK.

The sender underneath keeps one message outstanding per connection, closes the socket on an ACK
timeout before anything is retried, and checks that MSA-2 equals the MSH-10 it sent
(notes/mllp-ack-encoding.md, sender rules; Mirth #1441).
"""
from __future__ import annotations

from twisted.internet import defer

from engine import logs
from engine.connectors.base import ACCEPTED, ERROR, REJECTED, TRANSIENT, Outcome
from engine.hl7.ack import read_ack
from engine.hl7.errors import HL7Error
from mllp.client import MLLPError, MLLPSender
from mllp.framing import COMMIT_ACK, COMMIT_NAK
from mllp.tls import TLSFiles, client_creator

_CODES = {"AA": ACCEPTED, "CA": ACCEPTED, "AE": ERROR, "CE": ERROR, "AR": REJECTED, "CR": REJECTED}


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


class MLLPConnector:
    kind = "mllp"

    def __init__(self, cfg, reactor):
        self.cfg = cfg
        creator = None
        if cfg.tls is not None:
            files = TLSFiles(cert=cfg.tls.cert, key=cfg.tls.key, ca=cfg.tls.ca,
                             verify_hostname=cfg.tls.verify_hostname)
            creator = client_creator(files, cfg.host)
        self.sender = MLLPSender(cfg.host, cfg.port, reactor=reactor, tls_creator=creator,
                                 keep_alive=cfg.keep_alive, connect_timeout=cfg.connect_timeout,
                                 ack_timeout=cfg.ack_timeout)

    @defer.inlineCallbacks
    def send(self, payload: bytes, control_id: str):
        try:
            reply = yield self.sender.send(payload, control_id or None)
        except MLLPError as exc:
            return Outcome(TRANSIENT, None, logs.error_text(exc))
        except Exception as exc:  # noqa: BLE001 - connection lost and friends: retry later
            return Outcome(TRANSIENT, None, logs.error_text(exc))
        return classify_reply(reply)

    def close(self):
        return self.sender.close()
