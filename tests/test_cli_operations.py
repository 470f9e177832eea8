"""The operator commands of the CLI on both stores: users (passwords never on the command line,
never printed), audit list with filters, destinations pause/resume/list, messages retry; every
action the CLI takes is in the audit trail (actor cli:<os user>, source cli), refusals too; and
a canary: a patient's name never shows in ``audit list``, their INS only in the detail of the
patient search that used it."""
from __future__ import annotations

import getpass
import json
import time

import pytest

from engine.cli import main
from engine.passwords import verify_password
from engine.store import EntrySpec
from tests.test_store import ingest_one, rec

ME = f"cli:{getpass.getuser()}"
PW = "a long enough passphrase"


@pytest.fixture
def cli(store, store_url, monkeypatch, capsys):
    """``cli(*argv) -> (rc, out, err)`` on the test's store."""
    monkeypatch.setenv("MINIPFI_DB_URL", store_url)

    def run(*argv):
        rc = main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def _last(store, action):
    rows = store.audit_list(action=action, limit=1)
    return rows[0] if rows else None


def test_users_add_list_set_and_their_audit(store, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("ADMIN_PW", PW)
    assert cli("users", "add", "alice", "--role", "admin", "--password-env", "ADMIN_PW")[0] == 0
    pw_file = tmp_path / "pw"
    pw_file.write_text("another long passphrase\n")
    assert cli("users", "add", "bob", "--role", "viewer", "--password-file", str(pw_file))[0] == 0
    assert verify_password(store.user("alice").password_hash, PW)
    assert verify_password(store.user("bob").password_hash, "another long passphrase")
    row = _last(store, "user.add")
    assert (row.actor, row.action, row.target, row.outcome, row.source, row.detail) == (
        ME, "user.add", "user:bob", "ok", "cli", {"role": "viewer"})
    # refusals: one line, audited, nothing written
    rc, _, err = cli("users", "add", "alice", "--role", "viewer", "--password-env", "ADMIN_PW")
    assert rc == 1 and err == "minipfi: user 'alice' already exists\n"
    assert _last(store, "user.add").outcome == "refused"
    monkeypatch.setenv("SHORT", "short")
    rc, _, err = cli("users", "add", "carol", "--role", "viewer", "--password-env", "SHORT")
    assert rc == 1 and "at least 12 characters" in err and store.user("carol") is None
    with pytest.raises(SystemExit):                                # argparse refuses the role
        cli("users", "add", "carol", "--role", "root", "--password-env", "ADMIN_PW")
    # list: names, roles, states; never a hash or a password
    rc, out, _ = cli("users", "list", "--json")
    listed = [json.loads(line) for line in out.splitlines()]
    assert [(u["name"], u["role"], u["active"]) for u in listed] == [("alice", "admin", True), ("bob", "viewer", True)]
    assert "argon2" not in out and PW not in out
    # set: role, disable, password
    assert cli("users", "set", "bob", "--role", "operator", "--disable")[0] == 0
    assert _last(store, "user.change").detail == {"role": "operator", "active": False, "password": False}
    monkeypatch.setenv("NEW_PW", "a brand new passphrase")
    assert cli("users", "set", "bob", "--enable", "--password-env", "NEW_PW")[0] == 0
    bob = store.user("bob")
    assert (bob.role, bob.active) == ("operator", True)
    assert verify_password(bob.password_hash, "a brand new passphrase")
    rc, _, err = cli("users", "set", "nobody", "--disable")
    assert rc == 1 and err == "minipfi: no user 'nobody'\n"
    assert _last(store, "user.change").outcome == "refused"
    rc, out, _ = cli("users", "list")
    assert "bob" in out and "operator" in out and "active" in out
    # no password anywhere in the audit trail
    assert all(PW not in json.dumps(r.detail) for r in store.audit_list(limit=1000))


def test_destinations_pause_resume_list_and_retry(store, cli):
    mid = ingest_one(store, rec("OP1", entries=[EntrySpec("ris", "r"), EntrySpec("pacs", "r")])).message_id
    rc, out, _ = cli("destinations", "pause", "ris", "--reason", "RIS upgrade until 14:00")
    assert (rc, out) == (0, "destination ris paused\n")
    assert store.paused_destinations()["ris"]["by"] == ME
    assert cli("destinations", "pause", "ris")[1] == "destination ris was already paused\n"
    rc, out, _ = cli("destinations", "list")
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert "paused since" in lines["ris"] and "RIS upgrade" in lines["ris"] and lines["pacs"].endswith("active")
    rc, _, err = cli("destinations", "pause", "nowhere")
    assert rc == 1 and "unknown destination 'nowhere'" in err and err.count("\n") == 1
    assert cli("destinations", "resume", "ris")[0] == 0 and store.paused_destinations() == {}
    # retry now: the entry waiting an hour is due at once
    c = store.claim_due("ris", 1, "w", 30)[0]
    assert store.complete(c.id, "w", status="queued", attempts=1, next_attempt_at=time.time() + 3600)
    rc, out, _ = cli("messages", "retry", str(mid), "--destination", "ris")
    assert (rc, out) == (0, f"message {mid}: 1 entry at ris due now\n")
    assert cli("messages", "retry", str(mid))[0] == 1              # nothing waits any more
    rc, _, err = cli("messages", "retry", "999999")
    assert rc == 1 and "unknown message" in err
    got = [(r.action, r.target, r.outcome, r.detail) for r in reversed(store.audit_list())]
    assert got == [
        ("destination.pause", "destination:ris", "ok", {"reason": "RIS upgrade until 14:00", "changed": True}),
        ("destination.pause", "destination:ris", "ok", {"reason": None, "changed": False}),
        ("destination.pause", "destination:nowhere", "refused",
         {"reason": None, "error": "unknown destination 'nowhere' (no queue entries; give --config to name "
                                   "the configured ones)"}),
        ("destination.resume", "destination:ris", "ok", {"changed": True}),
        ("message.retry", f"message:{mid}", "ok", {"destination": "ris", "entries": 1}),
        ("message.retry", f"message:{mid}", "ok", {"destination": None, "entries": 0}),
        ("message.retry", "message:999999", "refused", {"destination": None, "error": "unknown message id(s): [999999]"}),
    ]


def test_replay_handled_show_are_audited_and_audit_list_filters(store, cli):
    mid = ingest_one(store, rec("OP2", entries=[EntrySpec("ris", "r")])).message_id
    c = store.claim_due("ris", 1, "w", 30)[0]
    assert store.complete(c.id, "w", status="error", attempts=1, last_error="AR")
    assert cli("messages", "show", str(mid))[0] == 0
    assert cli("messages", "handled", str(mid), "--destination", "ris")[0] == 0
    assert cli("messages", "replay", str(mid), "--destination", "ris")[0] == 0
    assert cli("messages", "replay", str(mid), "--destination", "hl7")[0] == 1
    rows = {(r.action, r.outcome): r for r in store.audit_list()}
    assert rows[("message.view", "ok")].target == f"message:{mid}"
    assert rows[("message.handled", "ok")].detail == {"destination": "ris", "target": None, "entries": 1}
    assert rows[("message.replay", "ok")].detail == {"destinations": ["ris"], "entries": 1}
    assert "never routed to hl7" in rows[("message.replay", "refused")].detail["error"]
    # audit list: text and JSON, filters
    rc, out, _ = cli("audit", "list", "--action", "message.replay", "--json")
    got = [json.loads(line) for line in out.splitlines()]
    assert [(g["action"], g["outcome"], g["actor"], g["source"]) for g in got] == [
        ("message.replay", "refused", ME, "cli"), ("message.replay", "ok", ME, "cli")]
    rc, out, _ = cli("audit", "list", "--actor", "someone-else")
    assert (rc, out) == (0, "")
    rc, out, _ = cli("audit", "list", "--since", "1h", "--limit", "3")
    lines = out.splitlines()               # the latest: the two audit reads above, then the replay
    assert len(lines) == 3 and "audit.view" in lines[0] and "message.replay" in lines[2]
    rc, out, _ = cli("audit", "list", "--until", "2000-01-01")
    assert out == ""
    (view,) = store.audit_list(action="audit.view", limit=1)
    assert view.detail == {"until": "2000-01-01", "rows": 0} and view.actor == ME


CANARY_NAME = "ZYXCANARY"
CANARY_INS = "279035121518989"


def test_canary_patient_data_stays_out_of_the_audit_list(store, cli):
    """Only the detail of a patient search holds the identifier searched for (accountability needs
    it; the audit list is for administrators and the CLI); nothing else names the patient."""
    body = (f"PID|1||IPP9^^^CHU-X&000897406&N^PI~{CANARY_INS}^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS||"
            f"{CANARY_NAME}^JEANNE||19800101|F")
    mid = ingest_one(store, rec("CAN1", body=body, entries=[EntrySpec("ris", "r")])).message_id
    c = store.claim_due("ris", 1, "w", 30)[0]
    assert store.complete(c.id, "w", status="error", attempts=1, last_error="AR")
    rc, out, _ = cli("messages", "show", str(mid))
    assert CANARY_NAME in out                                   # the operator did see the message
    for argv in (("messages", "handled", str(mid), "--destination", "ris"),
                 ("messages", "replay", str(mid), "--destination", "ris"),
                 ("messages", "retry", str(mid)),
                 ("identities", "show", CANARY_INS),
                 ("destinations", "pause", "ris"), ("destinations", "resume", "ris")):
        cli(*argv)
    for fmt, rows in (((), 7), (("--json",), 8)):   # the second also lists the first read
        rc, out, _ = cli("audit", "list", *fmt)
        assert rc == 0 and len(out.splitlines()) == rows
        assert CANARY_NAME not in out and "19800101" not in out and "IPP9" not in out
        with_ins = [line for line in out.splitlines() if CANARY_INS in line]
        assert len(with_ins) == 1 and "search.patient" in with_ins[0]
    (search,) = store.audit_list(action="search.patient")
    assert search.detail == {"key": CANARY_INS, "found": False} and CANARY_INS not in (search.target or "")
