"""MSSanté connector: who gets a mail, the mail itself (headers, body, CDA, IHE_XDM.zip), the SMTP
sender against a real STARTTLS server that requires a client certificate, the outcome of each
server answer, the receipt parser (DSN, MDN) and the IMAP receipt reader against a real IMAP
server over TLS, and the store's once-only recording of receipts."""
from __future__ import annotations

import datetime as dt
import io
import zipfile

import pytest

from engine.connectors.base import ACCEPTED, ERROR, REJECTED, TRANSIENT, Delivery, StoredView
from engine.connectors.mss_receipts import parse_receipt
from engine.connectors.mssante import MssanteConnector, MssanteDestinationConfig, check_files, mssante_targets
from engine.connectors.mssante_mail import MailSettings, build_mail, recipient_for, recipients
from engine.delivery import zam_follow_ups
from engine.connectors.base import BusinessAck, ErrorInfo
from engine.hl7.message import Message
from engine.reports.cisis import parse_report
from engine.xds.settings import XdsSettings
from engine.xds.xdm import XdmSender, check_package
from tests.mail_rig import ImapRig, SmtpRig, make_dsn, make_mdn
from tests.mss_samples import (BOTH_FLAGS, DELETE, INIT, INS, PATIENT, PS, PS2, PS_ONLY_FLAGS, REPLACE, REPLY,
                               variant)
from tests.pki import make_pki, write_pkcs12

BAL = "bal@pfi.test.mssante.fr"
XDS = XdsSettings(endpoint="urn:ihe:iti:xdm:2008", source_id="1.2.250.1.999.1", sign_submission=False)
NOW = dt.datetime(2026, 12, 3, 10, 0, tzinfo=dt.timezone.utc)


def sub_of(raw):
    s = parse_report(raw)
    assert s.ok, s.errors
    return s


def settings(**kw):
    return MailSettings(from_address=BAL, software_id="NIL-TEST-1", xds=XDS,
                        xdm_sender=XdmSender("Centre d'imagerie de test"), **kw)


def mail_for(raw, target):
    sub = sub_of(raw)
    return build_mail(sub, recipient_for(sub, target), settings(), message_id="<t1.5@pfi.test.mssante.fr>",
                      now=NOW)


# -- who gets a mail -------------------------------------------------------------------------
def test_ps_and_patient_each_get_their_own_target():
    sub = sub_of(variant(flags=BOTH_FLAGS, patient=True, second_ps=True))
    assert [(r.target, r.address, r.patient) for r in recipients(sub)] == [
        ("ps-1", PS, False), ("ps-2", PS2, False), ("patient", PATIENT, True)]


def test_invisible_to_the_patient_sends_nothing_to_the_patient():
    raw = variant(flags={**BOTH_FLAGS, "INVISIBLE_PATIENT": "Y"}, patient=True)
    sub = parse_report(raw)      # the channel refuses this row; the connector must not rely on it
    assert [r.target for r in recipients(sub)] == ["ps-1"]
    assert [r.target for r in recipients(sub_of(INIT))] == ["ps-1"]   # corpus: INVISIBLE_PATIENT=Y


def test_no_qualified_ins_no_patient_mail():
    raw = variant(flags=BOTH_FLAGS, patient=True)
    sub = sub_of(raw)
    sub.identity_reliability = "PROV"
    assert [r.target for r in recipients(sub)] == ["ps-1"]
    sub.identity_reliability = "QUAL"
    assert [r.target for r in recipients(sub)] == ["ps-1", "patient"]
    sub.identity_reliability = None
    assert [r.target for r in recipients(sub)] == ["ps-1"]
    sub.identity_reliability, sub.ins = "VALI", None
    assert [r.target for r in recipients(sub)] == ["ps-1"]


def test_targets_from_the_stored_view():
    cfg = _cfg(smtp_port=1)
    sub = sub_of(variant(flags=BOTH_FLAGS, patient=True))
    assert mssante_targets(cfg, StoredView("cisis", sub)) == ("ps-1", "patient")
    assert mssante_targets(cfg, StoredView()) == ()


# -- the mail --------------------------------------------------------------------------------
def test_mail_to_a_professional_headers_body_and_attachments():
    mail = mail_for(variant(flags=BOTH_FLAGS, patient=True, reply=True, fin=True), "ps-1")
    m = mail.message
    assert (m["From"], m["To"], m["Reply-To"]) == (BAL, PS, REPLY)
    assert m["Message-ID"] == "<t1.5@pfi.test.mssante.fr>"
    assert m["X-MSS-CODECDA"] == "18748-4" and m["X-MSS-INS"] == "O" and m["X-MSS-NIL"] == "NIL-TEST-1"
    assert m["X-MSS-MES"] is None                       # FIN is for the patient's mail only
    assert m["Return-Receipt-To"] == BAL and m["Disposition-Notification-To"] == BAL
    assert m.get_body(("plain",)).get_content().strip().startswith("Cher confrère")
    atts = {p.get_filename(): p.get_payload(decode=True) for p in m.iter_attachments()}
    assert sorted(atts) == ["CDA.xml", "IHE_XDM.zip"]
    cda = sub_of(INIT).documents[0].raw_bytes()
    assert atts["CDA.xml"] == cda
    assert check_package(atts["IHE_XDM.zip"]) == []
    z = zipfile.ZipFile(io.BytesIO(atts["IHE_XDM.zip"]))
    assert sorted(z.namelist()) == ["IHE_XDM/SUBSET01/DOC0001.XML", "IHE_XDM/SUBSET01/METADATA.XML",
                                    "INDEX.HTM", "README.TXT"]
    assert z.read("IHE_XDM/SUBSET01/DOC0001.XML") == cda
    assert b"<lcm:SubmitObjectsRequest" in z.read("IHE_XDM/SUBSET01/METADATA.XML")[:200]
    assert mail.notify == "SUCCESS,FAILURE,DELAY" and mail.rcpt == PS


def test_mail_to_the_patient_carries_fin_and_the_patient_body():
    raw = variant(flags=BOTH_FLAGS, patient=True, fin=True)
    m = mail_for(raw, "patient").message
    assert m["To"] == PATIENT and m["X-MSS-MES"] == "FIN"
    assert "ci-joint un document" in m.get_body(("plain",)).get_content()   # no CORPSMAIL_PATIENT


def test_receipts_not_asked_no_receipt_headers():
    mail = mail_for(INIT, "ps-1")
    assert mail.message["Return-Receipt-To"] is None and mail.message["Disposition-Notification-To"] is None
    assert mail.notify == "FAILURE,DELAY"


def test_replacement_and_deletion_get_the_default_body_when_none_is_given():
    rep = mail_for(variant(REPLACE, drop_body=True), "ps-1").message
    assert "remplace la version" in rep.get_body(("plain",)).get_content()
    assert "Remplacement" in rep["Subject"]
    assert [p.get_filename() for p in rep.iter_attachments()] == ["CDA.xml", "IHE_XDM.zip"]
    dele = mail_for(variant(DELETE, drop_body=True), "ps-1").message
    assert "supprimé" in dele.get_body(("plain",)).get_content()
    assert list(dele.iter_attachments()) == [] and dele["X-MSS-CODECDA"] is None
    given = mail_for(REPLACE, "ps-1").message                    # the creator's body wins
    assert given.get_body(("plain",)).get_content().startswith("Cher confrère")


def test_xdm_checker_finds_wrong_hash_and_missing_uri():
    package = mail_for(INIT, "ps-1").message
    data = {p.get_filename(): p.get_payload(decode=True) for p in package.iter_attachments()}["IHE_XDM.zip"]
    z = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as w:
        for n in z.namelist():
            body = z.read(n)
            if n.endswith("DOC0001.XML"):
                body += b" "
            w.writestr(n, body)
    problems = check_package(out.getvalue())
    assert any("hash slot" in p for p in problems) and any("size slot" in p for p in problems)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as w:
        for n in z.namelist():
            body = z.read(n)
            if n.endswith("METADATA.XML"):   # a SOAP envelope around it, as in the ANS sample
                body = (b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>'
                        + body.split(b"?>", 1)[1] + b"</s:Body></s:Envelope>")
            w.writestr(n, body)
    assert any("METADATA.XML line" in p for p in check_package(out.getvalue()))


# -- receipts (pure) -------------------------------------------------------------------------
def test_dsn_delivered_failed_and_delayed():
    (ok,) = parse_receipt(make_dsn("<a.1@x>", PS))
    assert (ok.event, ok.ok, ok.original_message_id, ok.address) == ("Z02", True, "<a.1@x>", PS)
    (bad,) = parse_receipt(make_dsn("<a.1@x>", PS, action="failed", status="5.1.1",
                                    diagnostic="550 5.1.1 mailbox unknown", receipt_id="<d2@x>"))
    assert (bad.ok, bad.error_code) == (False, "550") and bad.error_label.startswith("Action non effectuée")
    assert bad.key != ok.key
    assert parse_receipt(make_dsn("<a.1@x>", PS, action="delayed", status="4.4.1")) == []
    (no_envid,) = parse_receipt(make_dsn("<a.2@x>", PS, envid=False))
    assert no_envid.original_message_id == "<a.2@x>"            # from the returned headers


def test_mdn_read_and_error():
    (read,) = parse_receipt(make_mdn("<a.1@x>", PS))
    assert (read.event, read.ok, read.address, read.original_message_id) == ("Z03", True, PS, "<a.1@x>")
    (err,) = parse_receipt(make_mdn("<a.1@x>", PS, receipt_id="<m2@x>", disposition=
                                    "automatic-action/MDN-sent-automatically; processed/Error: 902^Identifiant inconnu"))
    assert (err.ok, err.error_code, err.error_label) == (False, "902", "Identifiant inconnu")
    assert parse_receipt(b"From: a@b\r\nSubject: hello\r\n\r\nnot a receipt\r\n") == []


# -- SMTP over real sockets ------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _cfg(smtp_port, pki=None, *, identity=True, imap_port=None, **extra):
    d = {"type": "mssante", "mailbox": BAL,
         "smtp": {"host": "localhost", "port": smtp_port, "connect_timeout": "3s", "timeout": "5s"},
         "ca": str(pki.ca) if pki else "/nonexistent",
         "xdm": {"organisation": "Centre d'imagerie de test",
                 "xds": {"source_id": "1.2.250.1.999.1"}},
         "software_id": "NIL-TEST-1"}
    if identity and pki:
        d["identity"] = {"cert": str(pki.client_cert), "key": str(pki.client_key)}
    if imap_port:
        d["imap"] = {"host": "localhost", "port": imap_port, "user": BAL, "password_env": "MSS_TEST_IMAP_PW",
                     "poll_interval": "1s"}
    d.update(extra)
    return MssanteDestinationConfig.model_validate(d)


def _delivery(raw, target, entry_id=7):
    sub = sub_of(raw)
    return Delivery(entry_id=entry_id, message_id=1, destination="mss", target=target, attempt=1,
                    channel="in", message_type="MDM^T02", control_id=sub.control_id, charset="UNICODE UTF-8",
                    payload=raw, original=raw, action=sub.action, stored=StoredView("cisis", sub))


@pytest.fixture
def smtp(pki):
    rig = SmtpRig(pki)
    yield rig
    rig.close()


def test_sends_over_starttls_with_the_client_certificate_and_dsn(pki, smtp):
    conn = MssanteConnector(_cfg(smtp.port, pki), None)
    out = conn.send_blocking(_delivery(variant(flags=PS_ONLY_FLAGS), "ps-1"))
    assert out.kind == ACCEPTED, out.detail
    (got,) = smtp.wait_for(1)
    assert got.peer_cert_cn is not None                   # the server saw our certificate
    assert got.mail_from == BAL and got.rcpt_tos == [PS]
    mid = got.message["Message-ID"]
    assert mid.endswith(".7@pfi.test.mssante.fr>")
    assert got.mail_options == ["RET=HDRS", f"ENVID={mid.strip('<>')}"]
    assert got.rcpt_options == ["NOTIFY=SUCCESS,FAILURE,DELAY", f"ORCPT=rfc822;{PS}"]
    assert got.xdm_problems() == []
    assert out.response.startswith(f"Message-ID: {mid}\r\n".encode())
    assert out.business_acks == ()                         # DSN offered: the Z02 comes from the DSN


def test_pkcs12_identity_with_password_from_the_environment(pki, smtp, tmp_path, monkeypatch):
    p12 = write_pkcs12(pki, tmp_path / "client.p12", b"s3cret")
    monkeypatch.setenv("MSS_TEST_P12_PW", "s3cret")
    cfg = _cfg(smtp.port, pki)
    cfg = cfg.model_copy(update={"identity": cfg.identity.model_copy(
        update={"cert": str(p12), "key": None, "password_env": "MSS_TEST_P12_PW"})})
    assert check_files(cfg) == []
    out = MssanteConnector(cfg, None).send_blocking(_delivery(INIT, "ps-1"))
    assert out.kind == ACCEPTED, out.detail
    monkeypatch.delenv("MSS_TEST_P12_PW")
    assert "MSS_TEST_P12_PW" in check_files(cfg)[0][1]


def test_no_client_certificate_is_a_clear_transient_failure(pki, smtp):
    out = MssanteConnector(_cfg(smtp.port, pki, identity=False), None).send_blocking(_delivery(INIT, "ps-1"))
    assert out.kind == TRANSIENT
    assert "client certificate" in out.detail or "TLS" in out.detail, out.detail
    assert smtp.received == []


def test_untrusted_client_certificate_refused(pki, smtp):
    cfg = _cfg(smtp.port, pki, identity=False).model_copy(update={"identity": _cfg(
        smtp.port, pki).identity.model_copy(update={"cert": str(pki.rogue_cert), "key": str(pki.rogue_key)})})
    out = MssanteConnector(cfg, None).send_blocking(_delivery(INIT, "ps-1"))
    assert out.kind == TRANSIENT and out.detail.startswith("TLS failed"), out.detail


def test_4xx_is_retried_and_5xx_is_a_content_error_with_the_smtp_code(pki):
    replies = {PS: "451 4.3.0 try again later", PS2: "550 5.1.1 mailbox unknown"}
    rig = SmtpRig(pki, policy=lambda addr, n: replies.get(addr))
    try:
        conn = MssanteConnector(_cfg(rig.port, pki), None)
        raw = variant(flags=PS_ONLY_FLAGS, second_ps=True)
        busy = conn.send_blocking(_delivery(raw, "ps-1"))
        assert busy.kind == REJECTED and "451" in busy.detail and busy.error.code == "451"
        gone = conn.send_blocking(_delivery(raw, "ps-2"))
        assert gone.kind == ERROR and gone.error == ErrorInfo("550", "SMTPERRORCODE", gone.error.label)
        (ack,) = gone.business_acks
        assert (ack.event, ack.ok, ack.address, ack.error.code) == ("Z02", False, PS2, "550")
        assert PS2 not in gone.detail and "mailbox unknown" not in gone.detail   # no server text
        assert rig.received == []
    finally:
        rig.close()


def test_server_down_is_transient(pki):
    rig = SmtpRig(pki)
    port = rig.port
    rig.close()
    out = MssanteConnector(_cfg(port, pki), None).send_blocking(_delivery(INIT, "ps-1"))
    assert out.kind == TRANSIENT and out.detail == "connection refused"


def test_unknown_target_or_no_submission_is_an_error(pki):
    conn = MssanteConnector(_cfg(1, pki), None)
    assert conn.send_blocking(_delivery(INIT, "patient")).kind == ERROR
    d = _delivery(INIT, "ps-1")
    assert conn.send_blocking(Delivery(**{**d.__dict__, "stored": StoredView()})).kind == ERROR


# -- IMAP receipts over real TLS -------------------------------------------------------------
def test_imap_reader_hands_over_receipts_and_flags_them_read(pki, monkeypatch):
    monkeypatch.setenv("MSS_TEST_IMAP_PW", "imap-secret")
    imap = ImapRig(pki, BAL, "imap-secret")
    try:
        imap.drop(make_dsn("<a.7@pfi.test.mssante.fr>", PS))
        imap.drop(b"From: someone@x\r\nSubject: hello\r\nMessage-ID: <h@x>\r\n\r\nplain mail\r\n")
        imap.drop(make_mdn("<a.7@pfi.test.mssante.fr>", PS))
        conn = MssanteConnector(_cfg(1, pki, imap_port=imap.port), None)
        got = []
        counts = conn.poll_receipts(got.append)
        assert counts == {"receipts": 2, "other": 1}
        assert [(r.event, r.ok, r.original_message_id) for r in got] == [
            ("Z02", True, "<a.7@pfi.test.mssante.fr>"), ("Z03", True, "<a.7@pfi.test.mssante.fr>")]
        assert imap.flags() == [["\\Seen"], [], ["\\Seen"]]   # the plain mail stays unread
        assert conn.poll_receipts(got.append) == {"receipts": 0, "other": 0}

        def broken(_r):
            raise RuntimeError("store down")

        imap.drop(make_dsn("<a.8@pfi.test.mssante.fr>", PS))
        with pytest.raises(RuntimeError):
            conn.poll_receipts(broken)
        assert imap.flags()[-1] == []                          # not recorded: not flagged
        assert conn.poll_receipts(got.append)["receipts"] == 1
    finally:
        imap.close()


def test_imap_wrong_password_fails_without_flagging(pki, monkeypatch):
    monkeypatch.setenv("MSS_TEST_IMAP_PW", "wrong")
    imap = ImapRig(pki, BAL, "imap-secret")
    try:
        imap.drop(make_dsn("<a.7@pfi.test.mssante.fr>", PS))
        conn = MssanteConnector(_cfg(1, pki, imap_port=imap.port), None)
        with pytest.raises(Exception):
            conn.poll_receipts(lambda r: None)
        assert imap.flags() == [[]]
    finally:
        imap.close()


# -- the store: a receipt recorded once, with its ZAM ----------------------------------------
def test_receipt_recorded_once_with_its_zam(store):
    import dataclasses

    import sqlalchemy as sa

    from engine.store.models import EntrySpec
    from tests.test_store import count, ingest_one, rec

    raw = variant(flags=PS_ONLY_FLAGS)
    sub = sub_of(raw)
    mid = ingest_one(store, dataclasses.replace(rec("MSS1", entries=[EntrySpec("mss", "r", "")]), raw=raw)).message_id
    eid = count(store, "SELECT id FROM queue_entries WHERE message_id = :m", m=mid)
    mail_id = f"<abc.{eid}@pfi.test.mssante.fr>"
    with store._write_tx() as conn:
        conn.execute(sa.text("UPDATE queue_entries SET status='sent', response=:r WHERE id=:id"),
                     {"r": f"Message-ID: {mail_id}\r\nSMTP: 250\r\n".encode(), "id": eid})
    assert store.mail_entry("<abc.999@x>") is None
    assert store.mail_entry(f"<zzz.{eid}@pfi.test.mssante.fr>") is None    # id not in the response
    entry = store.mail_entry(mail_id)
    assert entry["id"] == eid and entry["message_id"] == mid
    zams = zam_follow_ups([BusinessAck("Z03", True, None, PS)], sub, entry["raw"], "r", "zam-back",
                          engine_name="mini-pfi")
    assert len(zams) == 1
    assert store.record_receipt(entry, key="k1", event="Z03", ok=True, error_code=None, follow_ups=zams)
    assert not store.record_receipt(entry, key="k1", event="Z03", ok=True, error_code=None, follow_ups=zams)
    assert count(store, "SELECT count(*) FROM queue_entries WHERE destination = 'zam-back'") == 1
    (rec,) = store.mail_receipts(mid)
    assert (rec["event"], rec["ok"], rec["entry_id"]) == ("Z03", True, eid) and rec["zam_message_id"]
    zam = Message.parse(store.get_message(rec["zam_message_id"]).raw, "utf-8")
    assert zam.value("MSH-9") == "ZAM^Z03^ZAM_Z01" and zam.value("OBX-4") == sub.control_id
    assert INS.encode() not in str(rec).encode()


# -- configuration ---------------------------------------------------------------------------
def test_check_reports_unusable_certificates(pki, tmp_path):
    good = _cfg(25, pki)
    assert check_files(good) == []
    expired = good.model_copy(update={"identity": good.identity.model_copy(
        update={"cert": str(pki.expired_cert), "key": str(pki.expired_key)})})
    assert check_files(expired) == [("identity.cert", check_files(expired)[0][1])]
    assert "expired" in check_files(expired)[0][1]
    missing = good.model_copy(update={"ca": str(tmp_path / "none.pem")})
    assert check_files(missing)[0][0] == "ca"


def test_config_refuses_a_bad_mailbox_and_unknown_keys(pki):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _cfg(25, pki, mailbox="not-an-address")
    with pytest.raises(ValidationError):
        _cfg(25, pki, smtp={"host": "x", "port": 25, "starttls": False})
    cfg = _cfg(25, pki)
    assert cfg.xdm.xds.endpoint == "urn:ihe:iti:xdm:2008" and cfg.xdm.xds.sign_submission is False


def test_imap_sasl_external_with_the_client_certificate(pki):
    imap = ImapRig(pki, BAL, "unused-password", client_cn="client.test")
    try:
        imap.drop(make_mdn("<a.7@pfi.test.mssante.fr>", PS))
        cfg = _cfg(1, pki, imap_port=imap.port)
        cfg = cfg.model_copy(update={"imap": cfg.imap.model_copy(update={"password_env": None})})
        got = []
        assert MssanteConnector(cfg, None).poll_receipts(got.append) == {"receipts": 1, "other": 0}
        assert got[0].event == "Z03"
        no_cert = cfg.model_copy(update={"identity": None})
        with pytest.raises(Exception):
            MssanteConnector(no_cert, None).poll_receipts(got.append)
    finally:
        imap.close()


def test_rig_refuses_mail_before_starttls(pki, smtp):
    import smtplib

    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as plain:
        plain.ehlo()
        assert plain.has_extn("starttls") and not plain.has_extn("dsn")
        assert plain.mail(BAL)[0] == 530


def test_a_server_without_starttls_gets_nothing_in_clear(pki):
    rig = SmtpRig(pki, plain=True)
    try:
        out = MssanteConnector(_cfg(rig.port, pki), None).send_blocking(_delivery(INIT, "ps-1"))
        assert out.kind == REJECTED and "STARTTLS" in out.detail
        assert rig.received == []
    finally:
        rig.close()


def test_implicit_tls(pki):
    rig = SmtpRig(pki, implicit_tls=True)
    try:
        cfg = _cfg(rig.port, pki)
        cfg = cfg.model_copy(update={"smtp": cfg.smtp.model_copy(update={"security": "tls"})})
        out = MssanteConnector(cfg, None).send_blocking(_delivery(INIT, "ps-1"))
        assert out.kind == ACCEPTED, out.detail
        assert rig.wait_for(1)[0].rcpt_tos == [PS]
    finally:
        rig.close()


def test_imap_with_starttls(pki, monkeypatch):
    monkeypatch.setenv("MSS_TEST_IMAP_PW", "imap-secret")
    imap = ImapRig(pki, BAL, "imap-secret", starttls=True)
    try:
        imap.drop(make_dsn("<a.9@pfi.test.mssante.fr>", PS))
        cfg = _cfg(1, pki, imap_port=imap.port)
        cfg = cfg.model_copy(update={"imap": cfg.imap.model_copy(update={"security": "starttls"})})
        got = []
        assert MssanteConnector(cfg, None).poll_receipts(got.append)["receipts"] == 1
    finally:
        imap.close()
