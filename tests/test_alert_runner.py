"""The alert runner in process, on a real store: open alerts read back on SQLite and PostgreSQL,
store events written, a burst of alerts capped per notifier and summarised once the minute
allows, and /status's view of it."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet import reactor

import engine.wiring  # noqa: F401 - registers the destination types
from engine.alerting.runner import AlertRunner
from engine.config import load_config_text
from engine.store import Store
from tests.enginectl import wait
from tests.peers import WebhookReceiver
from tests.pki import make_expiring
from tests.reactor_thread import call


def test_open_alerts_are_the_started_without_a_later_end(store):
    def ev(kind, rule, subject, since):
        store.add_event(kind, detail={"rule": rule, "kind": "queue_depth", "subject": subject,
                                      "since": since, "value": 1})

    ev("alert_started", "depth", "ris", 1.0)
    ev("alert_started", "depth", "pacs", 2.0)
    ev("alert_ended", "depth", "ris", 1.0)
    ev("alert_started", "depth", "ris", 5.0)
    ev("alert_started", "down", "pacs", 6.0)
    ev("alert_ended", "down", "pacs", 6.0)
    opened = sorted((a["rule"], a["subject"], a["since"]) for a in store.open_alerts())
    assert opened == [("depth", "pacs", 2.0), ("depth", "ris", 5.0)]


@pytest.fixture
def hook():
    h = WebhookReceiver()
    yield h
    h.close()


def test_a_burst_is_capped_then_summarised(tmp_path, sqlite_url, hook):
    certs = [make_expiring(tmp_path, 5, cn=f"c{i}") for i in range(5)]
    dests = "".join(f"""
  d{i}: {{type: mllp, host: 127.0.0.1, port: 2600, tls: {{cert: "{c}", key: "{k}"}}}}""" for i, (c, k) in enumerate(certs))
    cfg = load_config_text(f"""
destinations:{dests}
alerts:
  notify:
    hook: {{type: webhook, url: "http://127.0.0.1:{hook.port}/a", max_per_minute: 2}}
  rules:
    - {{name: certs, kind: certificate_expiry, days: [7], notify: [hook]}}
""")
    store = Store(sqlite_url)
    store.migrate()
    store.start()
    now = [1_800_000_000.0]
    eng = SimpleNamespace(config=cfg, store=store, workers={}, data_dir=Path(tmp_path), last_reload=None)
    runner = call(AlertRunner, eng, reactor, lambda: now[0])
    try:
        call(runner._evaluate, runner._read())
        wait(lambda: len(hook.bodies()) == 2, timeout=10)
        assert {b["state"] for b in hook.bodies()} == {"started"}
        status = call(runner.status)
        assert len(status["active"]) == 5
        assert [n["result"] for n in status["last_notices"]].count("held back") == 3
        now[0] += 30  # the minute is not over: no summary yet
        call(runner._evaluate, runner._read())
        now[0] += 31
        call(runner._evaluate, runner._read())
        wait(lambda: len(hook.bodies()) == 3, timeout=10)
        assert hook.bodies()[2]["state"] == "suppressed" and hook.bodies()[2]["value"] == 3
        wait(lambda: len(store.open_alerts()) == 5, timeout=10)  # every start recorded, sent or not
    finally:
        store.stop()
        store.dispose()
