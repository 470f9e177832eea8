"""DRIMbox connector: the CI-SIS report message (ORU^R01 / MDM) to the DRIMbox source.

CI-SIS "Transmission de documents CDA en HL7 v2", actors and transactions: the DRIMbox source
receives the same report message as the other consumers (the CDA R2 in an OBX) and returns a
technical acknowledgement only (AA), no business acknowledgement (ZAM) and no MSSanté. So the
default mode is MLLP (or MLLP over TLS), one message outstanding, AA/CA = delivered, with the
MLLP outcome policies.

``expect_ack: false``: the ANS reference DRIMbox reads the socket until the sender closes it and
never answers. In that mode each message goes on its own connection, which is closed after the
last byte; a clean close counts as delivered. Risk: nothing proves that the DRIMbox stored the
report (a crash after the TCP hand-over loses it silently), so use it only for receivers that
cannot acknowledge. ``framing: none`` sends the bare message without the MLLP block characters.
The guide has no recipient flag for the DRIMbox: which reports reach it is decided by the
routes (the sample sends every CI-SIS report to it).
"""
from __future__ import annotations

from typing import Literal

from twisted.internet import defer

from engine import logs
from engine.connectors.base import ACCEPTED, TRANSIENT, Delivery, Outcome
from engine.connectors.mllp import MLLPDestinationConfig, classify_reply, control_id_of, make_sender
from mllp.client import MLLPError
from mllp.oneshot import OneShotError, send_and_close
from mllp.tls import TLSFiles, client_creator


class DrimboxDestinationConfig(MLLPDestinationConfig):
    type: Literal["drimbox"]  # type: ignore[assignment]
    expect_ack: bool = True
    framing: Literal["mllp", "none"] = "mllp"


class DrimboxConnector:
    kind = "drimbox"
    needs_stored = False

    def __init__(self, cfg, reactor):
        self.cfg = cfg
        self.reactor = reactor
        self.timeout = float(cfg.connect_timeout) + float(cfg.ack_timeout)
        self.sender = make_sender(cfg, reactor) if cfg.expect_ack else None
        self._creator = None
        if not cfg.expect_ack and cfg.tls is not None:
            self._creator = client_creator(TLSFiles(cert=cfg.tls.cert, key=cfg.tls.key, ca=cfg.tls.ca,
                                                    verify_hostname=cfg.tls.verify_hostname), cfg.host)

    @defer.inlineCallbacks
    def send(self, delivery: Delivery):
        if self.sender is not None:
            try:
                reply = yield self.sender.send(delivery.payload, control_id_of(delivery) or None)
            except (MLLPError, Exception) as exc:  # noqa: BLE001 - no answer: retry later
                return Outcome(TRANSIENT, None, logs.error_text(exc))
            return classify_reply(reply)
        try:
            said = yield send_and_close(self.reactor, self.cfg.host, self.cfg.port, delivery.payload,
                                        framed=self.cfg.framing == "mllp", tls_creator=self._creator,
                                        timeout=self.timeout)
        except OneShotError as exc:
            return Outcome(TRANSIENT, None, logs.error_text(exc))
        return Outcome(ACCEPTED, said or None, "handed over, connection closed (no ACK expected)")

    def close(self):
        if self.sender is not None:
            return self.sender.close()
        return defer.succeed(None)

