"""/status store counts: reused for at least a second, and longer when computing them is slow."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from twisted.internet import defer

import engine.status.http as http
from engine.status.http import StatusService


class SlowStore:
    writer_healthy = True

    def __init__(self, cost_s):
        self.cost_s = cost_s
        self.calls = 0

    def stats(self):
        self.calls += 1
        time.sleep(self.cost_s)
        return {"channels": {}, "destinations": {}}


def fake_engine(store):
    return SimpleNamespace(store=store, config=SimpleNamespace(engine=SimpleNamespace(name="t")),
                           version="0", started_at=time.time(), recovery_done=True, stopping=False,
                           config_path="routes.yaml", config_fingerprint="x", last_reload=None,
                           channels={}, workers={})


@pytest.fixture(autouse=True)
def inline_threads(monkeypatch):
    # the service runs the store query in a thread; here it runs inline
    monkeypatch.setattr(http.threads, "deferToThread", lambda f, *a, **k: defer.maybeDeferred(f, *a, **k))


def status(service):
    box = []
    service.status().addBoth(box.append)
    code, body = box[0]
    assert code == 200
    return body


def test_cheap_counts_are_reused_for_one_second_only():
    store = SlowStore(0.0)
    svc = StatusService(fake_engine(store))
    status(svc)
    status(svc)
    assert store.calls == 1
    assert svc._stats_ttl == StatusService.STATS_MAX_AGE_S
    svc._cache = (svc._cache[0] - 1.1, svc._cache[1])  # a second later
    body = status(svc)
    assert store.calls == 2 and body["counts_age_s"] == 0.0


def test_slow_counts_are_kept_in_proportion_to_their_cost():
    store = SlowStore(0.1)  # a large store: 0.1 s per aggregate
    svc = StatusService(fake_engine(store))
    status(svc)
    assert svc._stats_ttl >= StatusService.STATS_COST_FACTOR * 0.1
    svc._cache = (svc._cache[0] - 1.5, svc._cache[1])  # 1.5 s later: still fresh enough
    body = status(svc)
    assert store.calls == 1 and body["counts_age_s"] >= 1.5
    svc._cache = (svc._cache[0] - svc._stats_ttl, svc._cache[1])
    status(svc)
    assert store.calls == 2
