"""Accounts, the audit trail and delivery controls in the store (SQLite + PostgreSQL): unique
names and known roles, disabling, append-only audit rows with filters and listeners, pause and
resume with the change counter, "retry now" making a waiting entry due."""
from __future__ import annotations

import time

import pytest

from engine.store import AuditRow, EntrySpec, UnknownMessage
from tests.test_store import count, ingest_one, rec


def test_users_add_duplicate_roles_and_disable(store):
    uid = store.add_user("alice", "admin", "$argon2id$h1")
    assert isinstance(uid, int)
    with pytest.raises(ValueError, match="already exists"):
        store.add_user("alice", "viewer", "$argon2id$h2")
    with pytest.raises(ValueError, match="unknown role"):
        store.add_user("bob", "root", "$argon2id$h2")
    with pytest.raises(ValueError):
        store.add_user(" bob", "viewer", "$argon2id$h2")
    store.add_user("bob", "viewer", "$argon2id$h2")
    assert [(u.name, u.role, u.active) for u in store.list_users()] == [
        ("alice", "admin", True), ("bob", "viewer", True)]
    u = store.user("alice")
    assert (u.id, u.password_hash) == (uid, "$argon2id$h1") and u.created_at <= time.time()
    assert store.user("carol") is None
    assert store.set_user("bob", role="operator", active=False)
    assert store.set_user("bob", password_hash="$argon2id$h3")
    b = store.user("bob")
    assert (b.role, b.active, b.password_hash) == ("operator", False, "$argon2id$h3")
    assert store.set_user("bob", active=True) and store.user("bob").active
    assert not store.set_user("carol", role="viewer")
    with pytest.raises(ValueError):
        store.set_user("bob", role="superuser")
    assert store.user("bob").role == "operator"
    assert store.ROLES == ("viewer", "operator", "admin")


def test_audit_append_list_filters_and_listener(store):
    seen: list[AuditRow] = []
    store.add_audit_listener(seen.append)
    store.add_audit_listener(lambda row: 1 / 0)   # a failing listener never fails the audit
    t0 = time.time()
    a = store.audit("alice", "login", source="10.0.0.1")
    b = store.audit("alice", "login.failed", outcome="refused", source="10.0.0.2")
    c = store.audit("cli:root", "destination.pause", target="destination:ris",
                    detail={"reason": "maintenance"}, source="cli")
    d = store.audit("bob", "loginx")
    assert a < b < c < d
    with pytest.raises(ValueError):
        store.audit("alice", "login", outcome="maybe")
    rows = store.audit_list()
    assert [r.id for r in rows] == [d, c, b, a]                     # newest first
    assert rows[1].detail == {"reason": "maintenance"} and rows[1].target == "destination:ris"
    assert rows[3].detail is None and rows[3].source == "10.0.0.1" and rows[3].outcome == "ok"
    assert [r.id for r in store.audit_list(action="login")] == [b, a]  # dotted children, not 'loginx'
    assert [r.id for r in store.audit_list(actor="alice")] == [b, a]
    assert [r.id for r in store.audit_list(limit=2, offset=1)] == [c, b]
    assert store.audit_list(since=time.time() + 60) == []
    assert [r.id for r in store.audit_list(since=t0, until=rows[2].at)] == [a]  # until excluded
    assert [r.id for r in seen] == [a, b, c, d]
    assert seen[2] == rows[1]
    # append-only: the store has no way to change a row
    assert not [m for m in dir(store) if m.startswith(("audit_update", "audit_delete", "delete_audit"))]


def test_pause_resume_and_the_change_counter(store):
    v0 = store.controls_version()
    assert store.paused_destinations() == {}
    assert store.pause_destination("ris", by="alice", reason="RIS upgrade")
    assert not store.pause_destination("ris", by="bob")        # already paused: unchanged
    p = store.paused_destinations()
    assert list(p) == ["ris"] and p["ris"]["by"] == "alice" and p["ris"]["reason"] == "RIS upgrade"
    v1 = store.controls_version()
    assert v1 == v0 + 1
    assert store.resume_destination("ris", by="bob")
    assert not store.resume_destination("ris", by="bob")
    assert not store.resume_destination("pacs", by="bob")
    assert store.paused_destinations() == {} and store.controls_version() == v1 + 1
    assert store.pause_destination("ris", by="carol")          # paused again after a resume
    assert store.paused_destinations()["ris"]["by"] == "carol"


def test_retry_now_makes_a_waiting_entry_due(store):
    mid = ingest_one(store, rec("R1", entries=[EntrySpec("ris", "r"), EntrySpec("pacs", "r")])).message_id
    later = time.time() + 3600
    for dest in ("ris", "pacs"):
        c = store.claim_due(dest, 1, "w", 30)[0]
        assert store.complete(c.id, "w", status="queued", attempts=1, next_attempt_at=later,
                              last_error="peer down")
    assert store.claim_due("ris", 1, "w", 30) == []              # waiting for its retry
    v = store.controls_version()
    assert store.retry_now(mid, "ris") == 1
    assert store.controls_version() == v + 1
    assert [c.destination for c in store.claim_due("ris", 1, "w", 30)] == ["ris"]
    assert store.claim_due("pacs", 1, "w", 30) == []             # the other destination still waits
    assert store.retry_now(mid) == 1                             # pacs now; ris is in flight
    assert store.retry_now(mid) == 0 and store.controls_version() == v + 2
    assert count(store, "SELECT count(*) FROM queue_entries WHERE message_id = :m AND status = 'queued' "
                 "AND next_attempt_at > :t", m=mid, t=time.time()) == 0
    with pytest.raises(UnknownMessage):
        store.retry_now(mid + 1000)


def test_retry_now_leaves_a_deferred_delivery_held(store):
    """A hold (DMP, DRIMbox: a correction or deletion within the delay wins) is not a retry
    wait: "retry now" must not send the document before its delay is over."""
    mid = ingest_one(store, rec("H1", entries=[EntrySpec("dmp", "r", hold=600.0)])).message_id
    assert store.retry_now(mid) == 0 and store.retry_now(mid, "dmp") == 0
    assert store.claim_due("dmp", 1, "w", 30) == []


def test_resume_sends_at_once_what_waited_for_a_retry(store):
    """README: `resume` sends again at once. A FIFO head in backoff (the peer was down before the
    pause) would otherwise hold the whole queue until its next attempt; a hold stays a hold."""
    mid = ingest_one(store, rec("W1", entries=[EntrySpec("ris", "r")])).message_id
    ingest_one(store, rec("W2", entries=[EntrySpec("ris", "r", hold=600.0)]))
    c = store.claim_due("ris", 1, "w", 30)[0]
    assert c.message_id == mid
    assert store.complete(c.id, "w", status="queued", attempts=3, next_attempt_at=time.time() + 3600)
    assert store.pause_destination("ris", by="op") and store.resume_destination("ris", by="op")
    assert [e.message_id for e in store.claim_due("ris", 5, "w", 30)] == [mid]
