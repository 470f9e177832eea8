"""The engine's own control methods (what the console calls, in the engine process): pause,
resume and retry-now write the store, audit with the caller's name and address, and apply to
the worker at once; an unknown destination or message is refused and audited; a reload names
who asked for it. Real engine object in the test reactor, real store (SQLite and PostgreSQL)."""
from __future__ import annotations

import textwrap
import time

import pytest
from twisted.internet import defer

from engine.app import Engine
from engine.store import UnknownMessage
from tests import reactor_thread
from tests.enginectl import free_port


@pytest.fixture
def engine(tmp_path, store_url, monkeypatch):
    monkeypatch.setenv("MINIPFI_DB_URL", store_url)
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(textwrap.dedent(f"""
        engine:
          status: {{bind: 127.0.0.1, port: {free_port()}}}
        channels:
          in: {{type: mllp, port: 0}}
        routes:
          - {{name: all, from: in, to: [ris, pacs]}}
        destinations:
          ris: {{type: mllp, host: 127.0.0.1, port: {free_port()}}}
          pacs: {{type: mllp, host: 127.0.0.1, port: {free_port()}}}
    """))
    eng = Engine(cfg, tmp_path / "data", reactor_thread.reactor)
    reactor_thread.call(eng.start)
    yield eng
    reactor_thread.call(eng.shutdown)


def _call(fn, *args, **kw):
    """Run an Engine method in the reactor; its Deferred's result, or its exception raised."""
    return reactor_thread.call(lambda: defer.maybeDeferred(fn, *args, **kw))


def test_pause_resume_retry_apply_at_once_and_are_audited(engine):
    store = engine.store
    assert _call(engine.pause_destination, "ris", "alice", "RIS upgrade", source="10.0.0.5") is True
    assert engine.workers["ris"].paused and not engine.workers["pacs"].paused
    assert store.paused_destinations()["ris"]["by"] == "alice" and "ris" in engine.paused
    assert _call(engine.pause_destination, "ris", "bob") is False
    with pytest.raises(ValueError, match="unknown destination"):
        _call(engine.pause_destination, "nowhere", "alice")
    assert _call(engine.resume_destination, "ris", "alice", source="10.0.0.5") is True
    assert not engine.workers["ris"].paused and store.paused_destinations() == {}
    with pytest.raises(UnknownMessage):
        _call(engine.retry_now, 424242, None, "alice", source="10.0.0.5")
    rows = [(r.actor, r.action, r.target, r.outcome, r.source) for r in reversed(store.audit_list())]
    assert rows == [
        ("engine", "engine.start", None, "ok", None),
        ("alice", "destination.pause", "destination:ris", "ok", "10.0.0.5"),
        ("bob", "destination.pause", "destination:ris", "ok", None),
        ("alice", "destination.pause", "destination:nowhere", "refused", None),
        ("alice", "destination.resume", "destination:ris", "ok", "10.0.0.5"),
        ("alice", "message.retry", "message:424242", "refused", "10.0.0.5"),
    ]
    assert store.audit_list(action="destination.pause", actor="bob")[0].detail == {"reason": None, "changed": False}


def test_a_change_made_by_another_process_is_polled(engine):
    store = engine.store
    store.pause_destination("pacs", by="cli:root")   # as the CLI does, in its own process
    assert reactor_thread.wait_for(lambda: engine.workers["pacs"].paused, timeout=3)
    assert engine.paused["pacs"]["by"] == "cli:root"
    store.resume_destination("pacs", by="cli:root")
    assert reactor_thread.wait_for(lambda: not engine.workers["pacs"].paused, timeout=3)


def test_reload_is_audited_with_who_asked(engine):
    assert reactor_thread.call(engine.reload, "alice", "10.0.0.9") is True
    engine.config_path.write_text("channels: [\n")
    assert reactor_thread.call(engine.reload) is False
    ok, refused = None, None
    for _ in range(100):
        rows = engine.store.audit_list(action="config.reload")
        if len(rows) == 2:
            refused, ok = rows
            break
        time.sleep(0.05)  # the audit row is written off the reactor
    assert (ok.actor, ok.source, ok.outcome, ok.detail["result"]) == ("alice", "10.0.0.9", "ok", "applied")
    assert (refused.actor, refused.outcome) == ("engine", "refused") and refused.detail["reason"]
