"""The delivery seam without sockets: one message fanned out into several targets of one
destination, each target with its own state, attempts and response; a partial failure retries
only what failed. Real store (SQLite and PostgreSQL), real delivery worker in the reactor thread,
a connector type registered through the public registry."""
from __future__ import annotations

import time
from typing import Literal

import pytest
from twisted.internet import defer, reactor

from engine.config import DestinationBase, load_config_text
from engine.connectors.base import ACCEPTED, ERROR, TRANSIENT, ErrorInfo, Outcome
from engine.connectors.registry import ConnectorType, expand, register
from engine.delivery import DestinationWorker
from engine.router import Router
from engine.store import EntrySpec, IngestRecord, Store
from tests import reactor_thread


class FanOutConfig(DestinationBase):
    type: Literal["test-fanout"]
    targets: list[str]


class ScriptedConnector:
    """Answers per target from a script: a list of outcome kinds, one per attempt."""

    kind = "test-fanout"
    needs_stored = True
    timeout = 5.0

    def __init__(self, cfg, _reactor):
        self.cfg = cfg
        self.script: dict[str, list[str]] = {}
        self.calls: list[tuple[str, int, int]] = []

    def send(self, delivery):
        self.calls.append((delivery.target, delivery.attempt, delivery.entry_id))
        kinds = self.script.get(delivery.target) or [ACCEPTED]
        kind = kinds.pop(0) if len(kinds) > 1 else kinds[0]
        if kind == ACCEPTED:
            return defer.succeed(Outcome(ACCEPTED, f"ok {delivery.target}".encode()))
        if kind == ERROR:
            return defer.succeed(Outcome(ERROR, None, "refused", error=ErrorInfo("42", "test", "label")))
        return defer.succeed(Outcome(TRANSIENT, None, "down", retry_after=0.05))

    def close(self):
        return defer.succeed(None)


register(ConnectorType("test-fanout", FanOutConfig, ScriptedConnector,
                       targets=lambda cfg, stored: list(cfg.targets)))

CONFIG = """
channels:
  in: {type: mllp, port: 0}
routes:
  - {name: all, from: in, to: [fan]}
destinations:
  fan:
    type: test-fanout
    targets: [ps, patient, dmp]
    queue: {retry: {initial_delay: 50ms, max_delay: 100ms, jitter: 0}, max_attempts: 5}
"""


def _record(entries) -> IngestRecord:
    raw = b"MSH|^~\\&|RIS|CHU|PFI|CHU|20240101||ORU^R01|C1|P|2.5\rPID|1||X\r"
    return IngestRecord(channel="in", raw=raw, received_at=time.time(), sending_app="RIS",
                        sending_facility="CHU", receiving_app="PFI", receiving_facility="CHU",
                        message_type="ORU^R01", control_id="C1", version="2.5", charset="",
                        status="routed", ack=b"MSH|^~\\&|PFI\rMSA|AA|C1\r", ack_code="AA",
                        entries=entries)


def _ingest(store, record) -> int:
    done = []
    store.submit_ingest([record], done.append)
    deadline = time.time() + 10
    while not done and time.time() < deadline:
        time.sleep(0.01)
    (res,) = done[0]
    return res.message_id


def _deliver(store, cfg, script, done) -> dict:
    """Ingest one message fanned out to the destination's targets, run a real worker with the
    scripted connector until ``done(statuses)``; return the entries by target and the calls."""
    mid = _ingest(store, _record([EntrySpec("fan", "all", target=t) for t in expand(cfg)]))
    connector = ScriptedConnector(cfg, reactor)
    connector.script = script
    worker = DestinationWorker("fan", cfg, store, connector, reactor)
    reactor_thread.call(worker.start)
    deadline = time.time() + 15
    while time.time() < deadline and not done([e.status for e in store.get_message(mid).entries]):
        time.sleep(0.05)
    reactor_thread.call(worker.stop, 1.0)
    return {e.target: e for e in store.get_message(mid).entries}, connector.calls


def test_registry_expands_and_config_knows_the_type():
    cfg = load_config_text(CONFIG)
    assert expand(cfg.destination("fan")) == ("ps", "patient", "dmp")
    target = Router(cfg).targets("in", type("M", (), {"message_code": "ORU", "trigger": "R01",
                                                       "sending_app": "RIS", "sending_facility": "",
                                                       "receiving_app": "", "version": "2.5"})())
    assert [t.destination for t in target] == ["fan"]


def test_one_failing_target_is_retried_alone(store):
    cfg = load_config_text(CONFIG).destination("fan")
    states, calls = _deliver(store, cfg, {"patient": [TRANSIENT, TRANSIENT, ACCEPTED]},
                             lambda sts: all(st == "sent" for st in sts))
    assert {t: (e.status, e.attempts) for t, e in states.items()} == {
        "ps": ("sent", 1), "patient": ("sent", 3), "dmp": ("sent", 1)}
    assert states["patient"].response == b"ok patient"
    assert sorted((t, a) for t, a, _ in calls) == [
        ("dmp", 1), ("patient", 1), ("patient", 2), ("patient", 3), ("ps", 1)]
    counts = store.stats()["destinations"]["fan"]
    assert counts["sent"] == 3 and counts["queued"] == 0


def test_content_error_of_one_target_parks_only_that_target(store):
    cfg = load_config_text(CONFIG).destination("fan")
    states, _calls = _deliver(store, cfg, {"dmp": [ERROR]},
                              lambda sts: all(st in ("sent", "error") for st in sts))
    assert {t: e.status for t, e in states.items()} == {"ps": "sent", "patient": "sent", "dmp": "error"}
    assert "test 42: label" in states["dmp"].last_error  # the structured error reaches the operator
    assert states["dmp"].attempts == 1


@pytest.mark.parametrize("hold", [0.0, 30.0])
def test_hold_defers_the_first_attempt(sqlite_url, hold):
    store = Store(sqlite_url)
    store.migrate()
    store.start()
    try:
        mid = _ingest(store, _record([EntrySpec("d", "r", hold=hold)]))
        claimed = store.claim_due("d", 5, "w", 60)
        assert [c.message_id for c in claimed] == ([mid] if not hold else [])
        if hold:
            due = store.next_due_at("d")
            assert due is not None and due - time.time() > hold - 5
            assert [c.message_id for c in store.claim_due("d", 5, "w", 60, now=time.time() + hold + 1)] == [mid]
    finally:
        store.stop()
        store.dispose()
