"""Retention (what a prune removes and keeps, the archive) and the export round trip, on SQLite
and PostgreSQL."""
from __future__ import annotations

import base64
import hashlib
import json
import tarfile
import time

import pytest
import sqlalchemy as sa

from engine.config import load_config_text
from engine.retention.prune import Pruner
from engine.store import EntrySpec
from tests.test_store import count, ingest_one, rec, run_op

DAY = 86400.0
PDF = b"%PDF-1.4\n% test report\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


def cda_n1(pdf: bytes = PDF) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<ClinicalDocument xmlns="urn:hl7-org:v3">'
            '<id root="1.2.3" extension="DOC1"/><component><nonXMLBody><text mediaType="application/pdf" '
            f'representation="B64">{base64.b64encode(pdf).decode()}</text></nonXMLBody></component>'
            '</ClinicalDocument>\n').encode()


def config(retention: str, channel_retention: str = "", window: str = "7d"):
    return load_config_text(f"""
engine:
  duplicates: {{window: {window}}}
  retention: {retention}
channels:
  adt_in: {{type: mllp, port: 2575{channel_retention}}}
""", base_dir="/tmp")


def set_entry(store, mid: int, **values) -> None:
    sets = ", ".join(f"{k} = :{k}" for k in values)
    with store.engine.begin() as c:
        c.execute(sa.text(f"UPDATE queue_entries SET {sets} WHERE message_id = :m"), {**values, "m": mid})


def add(store, cid: str, age_days: float, status: str = "sent", *, updated_days: float | None = None,
        entries=None, **entry_values) -> int:
    now = time.time()
    mid = ingest_one(store, rec(cid, body=f"PID|1||IPP-{cid}", received_at=now - age_days * DAY,
                                entries=entries)).message_id
    upd = now - (age_days if updated_days is None else updated_days) * DAY
    set_entry(store, mid, status=status, updated_at=upd, created_at=now - age_days * DAY, **entry_values)
    return mid


def add_submission(store, mid: int, cda: bytes) -> None:
    sub = {"message_type": "ORU^R01", "control_id": "X", "documents": [
        {"sha256": hashlib.sha256(cda).hexdigest(), "size": len(cda), "media_type": "text/xml",
         "raw_bytes_b64": base64.b64encode(cda).decode()}]}
    run_op(store, lambda c: store.insert_submission(c, mid, kind="cisis", action="initial", documents=1,
                                                    errors=0, submission_json=json.dumps(sub)))


def ids(store) -> set[int]:
    with store.engine.connect() as c:
        return set(c.execute(sa.text("SELECT id FROM messages")).scalars())


def test_prune_removes_only_what_is_due_and_archives_exactly_it(store, tmp_path):
    m = {
        "sent": add(store, "SENT", 100, response=b"MSA|AA|x"),
        "filtered": add(store, "FILT", 100, "filtered"),
        "queued": add(store, "QUEUED", 100, "queued"),
        "error": add(store, "ERR", 100, "error"),
        "in_flight": add(store, "FLIGHT", 100, "in_flight"),
        "doc_sent": add(store, "DOC1", 100, entries=[EntrySpec("ris", "r", doc_key="K1")]),
        "doc_live": add(store, "DOC2", 1, "queued", entries=[EntrySpec("ris", "r", doc_key="K1")]),
        "mail": add(store, "MAIL", 100, updated_days=10, response=b"Message-ID: <ab.1@x>\r\n"),
        "mid": add(store, "MID", 50, payload=b"SENT-PAYLOAD"),
        "mid_error": add(store, "MIDERR", 50, "error"),
        "new": add(store, "NEW", 1),
    }
    add_submission(store, m["sent"], cda_n1())
    add_submission(store, m["mid"], cda_n1(b"%PDF-mid"))
    raws = {k: store.get_message(v).raw for k, v in m.items()}
    cfg = config(f"{{messages: 90d, payloads: 30d, batch: 2, archive_dir: {tmp_path / 'arch'}}}")
    detail = Pruner(store, lambda: cfg).run()
    gone = {m["sent"], m["filtered"]}
    assert ids(store) == set(m.values()) - gone
    assert detail["counts"]["messages"] == 2 and detail["counts"]["payloads"] == 1
    assert detail["counts"]["submissions"] == 1 and detail["kept"] == 0
    # payload pruning: metadata row stays, content is gone
    mid = store.get_message(m["mid"])
    assert mid.raw == b"" and "payload_pruned" in mid.flags and mid.size == len(raws["mid"])
    assert mid.entries[0].payload is None and mid.entries[0].status == "sent"
    assert json.loads(store.submission_row(m["mid"])["submission"]) == {"pruned": True}
    for k in ("queued", "error", "in_flight", "doc_sent", "mail", "mid_error", "new"):
        assert store.get_message(m[k]).raw == raws[k], k
    # the archive holds exactly what was removed
    tar_path = tmp_path / "arch" / detail["archive"]
    with tarfile.open(tar_path) as tar:
        names = set(tar.getnames())
        rows = [json.loads(x) for x in tar.extractfile("messages.jsonl").read().splitlines()]
        assert {(r["id"], r["pruned"]) for r in rows} == {
            (m["sent"], "message"), (m["filtered"], "message"), (m["mid"], "payload")}
        for r in rows:
            key = next(k for k, v in m.items() if v == r["id"])
            assert tar.extractfile(r["raw_file"]).read() == raws[key]
        manifest = json.loads(tar.extractfile("manifest.json").read())
        for name, info in manifest["files"].items():
            assert hashlib.sha256(tar.extractfile(name).read()).hexdigest() == info["sha256"]
        assert f"documents/{m['sent']}-1.pdf" in names
        assert tar.extractfile(f"documents/{m['sent']}-1.pdf").read() == PDF
        assert tar.extractfile(f"payloads/{m['mid']}.bin").read() is not None
    audit = store.audit_list(action="retention.prune")
    assert len(audit) == 1 and audit[0].actor == "engine"
    assert audit[0].detail["archive"] == detail["archive"]
    assert "IPP" not in json.dumps(audit[0].detail)
    # nothing more is due: a second run removes nothing and writes no audit row
    again = Pruner(store, lambda: cfg).run()
    assert not any(again["counts"].values()) and again["archive"] is None
    assert len(store.audit_list(action="retention.prune")) == 1


def test_defaults_prune_nothing_and_window_and_channels_bound_it(store):
    old = add(store, "OLD", 100)
    assert Pruner(store, lambda: config("{}")).run() is None
    # the duplicates window is longer than the limit: the message stays (a resend is still a duplicate)
    Pruner(store, lambda: config("{messages: 90d}", window="200d")).run()
    assert old in ids(store)
    # the channel's own limit wins over the default
    Pruner(store, lambda: config("{messages: 90d}", ", retention: {messages: 120d}")).run()
    assert old in ids(store)
    add(store, "NEWER", 1)  # the newest row always stays (ids are never reused)
    Pruner(store, lambda: config("{messages: 120d}", ", retention: {messages: 90d}")).run()
    assert old not in ids(store)


def test_prune_ops_are_background_jobs_of_the_writer(store):
    """No ACK waits for retention: each of its writer ops is submitted as a background job, which
    the writer never puts in a transaction with ingest."""
    old = add(store, "OLD", 100)
    add(store, "NEWER", 1)
    seen = []

    def submit(op, callback, **kw):
        seen.append(kw)
        store.submit(op, callback, **kw)

    detail = Pruner(store, lambda: config("{messages: 90d}"), submit=submit).run()
    assert detail["counts"]["messages"] == 1 and old not in ids(store)
    assert seen and all(kw == {"background": True} for kw in seen)


def test_delivery_history_goes_messages_stay(store):
    done = add(store, "DONE", 100)
    err = add(store, "ERR", 100, "error")
    store.add_event("sent", channel="adt_in", message_id=done)
    with store.engine.begin() as c:
        c.execute(sa.text("UPDATE events SET at = :at"), {"at": time.time() - 100 * DAY})
    fresh = add(store, "FRESH", 1)
    store.add_event("sent", channel="adt_in", message_id=fresh)  # newer: the old ones may all go
    Pruner(store, lambda: config("{deliveries: 60d}")).run()
    assert ids(store) == {done, err, fresh}
    assert [e.status for e in store.get_message(err).entries] == ["error"]
    assert store.get_message(done).entries == [] and len(store.get_message(fresh).entries) == 1
    assert count(store, "SELECT count(*) FROM events WHERE at < :t", t=time.time() - 60 * DAY) == 0


def test_export_round_trip(store, tmp_path, monkeypatch, capsys):
    from engine.cli import main

    m1 = add(store, "E1", 2, payload=b"PAYLOAD-1", response=b"MSA|AA|E1")
    m2 = add(store, "E2", 1)
    add_submission(store, m2, cda_n1())
    add(store, "OUT", 40)  # before --since
    monkeypatch.setenv("MINIPFI_DB_URL", store.url)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 10 * DAY))
    out = tmp_path / "exp"
    assert main(["export", "--since", since, str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "minipfi-export/1" and manifest["counts"]["messages"] == 2
    for name, info in manifest["files"].items():
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["size"]
    rows = [json.loads(x) for x in (out / "messages.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [m1, m2]
    for r in rows:
        assert (out / r["raw_file"]).read_bytes() == store.get_message(r["id"]).raw
    entries = [json.loads(x) for x in (out / "entries.jsonl").read_text().splitlines()]
    assert {e["message_id"] for e in entries} == {m1, m2}
    e1 = next(e for e in entries if e["message_id"] == m1)
    assert (out / e1["payload_file"]).read_bytes() == b"PAYLOAD-1"
    assert (out / e1["response_file"]).read_bytes() == b"MSA|AA|E1"
    sub = json.loads((out / "submissions.jsonl").read_text())
    assert (out / sub["document_files"][0]["file"]).read_bytes() == cda_n1()
    assert (out / sub["document_files"][0]["pdf_file"]).read_bytes() == PDF
    assert "raw_bytes_b64" not in json.dumps(sub)
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(manifest["files"]) | {"manifest.json"} and "README.txt" in on_disk
    audit = store.audit_list(action="export")
    assert len(audit) == 1 and audit[0].actor.startswith("cli:")
    # a non-empty folder is refused, on one line
    capsys.readouterr()
    assert main(["export", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be absent or empty" in err
    refused = store.audit_list(action="export")[0]
    assert refused.outcome == "refused" and "must be absent or empty" in refused.detail["error"]


@pytest.mark.parametrize("archive", [False, True])
def test_identity_registry_limit(store, tmp_path, archive):
    from datetime import datetime, timedelta

    kept_msg = add(store, "ADT1", 1)
    old, new = datetime.utcnow() - timedelta(days=400), datetime.utcnow()
    with store.engine.begin() as c:
        def ident(ipp, at, merged_into=None):
            return c.execute(sa.text(
                "INSERT INTO identities (ipp, ipp_authority, active, merged_into, created_at, updated_at) "
                "VALUES (:ipp, 'FAC', :act, :mi, :at, :at) RETURNING id"),
                {"ipp": ipp, "act": merged_into is None, "mi": merged_into, "at": at}).scalar_one()

        def hist(iid, at, mid=None):
            c.execute(sa.text("INSERT INTO identity_history (identity_id, at, action, message_id) "
                              "VALUES (:i, :at, 'updated', :m)"), {"i": iid, "at": at, "m": mid})

        gone = ident("IPP-A", old)
        hist(gone, old)
        c.execute(sa.text("INSERT INTO identity_identifiers (identity_id, value, authority, type) "
                          "VALUES (:i, 'IPP-A', 'FAC', 'PI')"), {"i": gone})
        named = ident("IPP-B", old)
        hist(named, old, kept_msg)           # a kept message names it: it stays
        fresh = ident("IPP-C", new)
        hist(fresh, old, 999999)              # old row, source message gone: goes
        hist(fresh, new)
        survivor = ident("IPP-E", old)
        ident("IPP-D", old, merged_into=survivor)  # the stub goes first, then the survivor
    cfg = config("{identities: 365d" + (f", archive_dir: {tmp_path}" if archive else "") + "}")
    detail = Pruner(store, lambda: cfg).run()
    if archive:  # one batch per run: the survivor goes in the next run, once its stub is gone
        with tarfile.open(tmp_path / detail["archive"]) as tar:
            archived = [json.loads(x)["ipp"] for x in tar.extractfile("identities.jsonl").read().splitlines()]
            hist = [json.loads(x) for x in tar.extractfile("identity_history.jsonl").read().splitlines()]
        assert sorted(archived) == ["IPP-A", "IPP-D"] and len(hist) == 2
        second = Pruner(store, lambda: cfg).run()
        assert second["counts"]["identities"] == 1
        detail["counts"]["identities"] += 1
    with store.engine.connect() as c:
        left = set(c.execute(sa.text("SELECT ipp FROM identities")).scalars())
        hist_left = c.execute(sa.text("SELECT count(*) FROM identity_history")).scalar()
        idents_left = c.execute(sa.text("SELECT count(*) FROM identity_identifiers")).scalar()
    assert left == {"IPP-B", "IPP-C"}
    assert hist_left == 2 and idents_left == 0
    assert detail["counts"]["identities"] == 3 and "IPP" not in json.dumps(detail)


def test_a_message_needed_again_is_kept_and_a_pruned_payload_is_not_replayed(store):
    a = add(store, "RACE", 100)
    b = add(store, "PAY", 50)
    ids_due, _cursor, _kept = store.due_messages(((), ()), time.time() - 90 * DAY, after=0, hi=10**9, limit=10)
    assert ids_due == [a]
    store.replay([a], ["ris"])  # an operator replays it between selection and deletion
    res = run_op(store, lambda c: store.delete_messages_within(c, ids_due))
    assert res["kept"] == [a] and res["messages"] == 0 and a in ids(store)
    Pruner(store, lambda: config("{payloads: 30d}")).run()
    with pytest.raises(ValueError, match="payload pruned"):
        store.replay([b], ["ris"])


def test_payload_of_a_message_released_later_goes_in_a_later_run(store):
    held = add(store, "HELD", 50, "error")
    done = add(store, "DONE", 49)
    pruner = Pruner(store, lambda: config("{payloads: 30d}"))
    assert pruner.run()["counts"] == {"payloads": 1}
    assert store.get_message(done).raw == b"" and store.get_message(held).raw != b""
    store.mark_handled(held, "ris")  # the error is dealt with: its payload may go now
    assert pruner.run()["counts"] == {"payloads": 1}
    assert store.get_message(held).raw == b""
    assert pruner.run()["counts"] == {}


def test_the_start_of_an_alert_still_firing_is_kept(store):
    """After a restart the engine takes an alert whose alert_started has no alert_ended as
    firing, without a new notice: pruning that event would notify the start again."""
    def alert(kind, subject):
        store.add_event(kind, detail={"rule": "late", "kind": "queue_age", "subject": subject,
                                      "since": 1.0, "value": 90})
    alert("alert_started", "ris")      # still firing
    alert("alert_started", "pacs")     # ended: both may go
    alert("alert_ended", "pacs")
    store.add_event("sent", channel="adt_in")
    with store.engine.begin() as c:
        c.execute(sa.text("UPDATE events SET at = :at"), {"at": time.time() - 100 * DAY})
    store.add_event("sent", channel="adt_in")  # newer: the old ones may all go
    Pruner(store, lambda: config("{deliveries: 60d}")).run()
    assert [a["subject"] for a in store.open_alerts()] == ["ris"]
    assert count(store, "SELECT count(*) FROM events") == 2


def test_ids_are_never_reused_after_a_prune(store):
    """SQLite gives a new row max(id) + 1: had retention removed the newest rows, new messages
    would take their ids, and the audit trail ("message:42"), the events and the incremental
    /status counts would name or skip the wrong ones. The newest row stays until a newer one."""
    old = add(store, "OLD1", 100)
    newest = add(store, "OLD2", 100)
    for _ in range(2):
        store.add_event("sent", channel="adt_in")
    with store.engine.begin() as c:
        c.execute(sa.text("UPDATE events SET at = :at"), {"at": time.time() - 100 * DAY})
    top_event = count(store, "SELECT max(id) FROM events")
    Pruner(store, lambda: config("{messages: 60d, deliveries: 60d}")).run()
    assert ids(store) == {newest} and old < newest
    assert count(store, "SELECT count(*) FROM events WHERE id = :i", i=top_event) == 1
    assert ingest_one(store, rec("NEW1")).message_id > newest
    store.add_event("sent", channel="adt_in")
    assert count(store, "SELECT max(id) FROM events") > top_event
