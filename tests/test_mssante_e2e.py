"""MSSanté end to end: the engine receives the corpus MDM reports over MLLP and sends exactly the
mails their flags ask for to a real SMTP server (STARTTLS, client certificate, DSN); faults of
the server are retried or parked per target; DSNs and MDNs dropped in a real IMAP mailbox (TLS)
become ZAM^Z02 / ZAM^Z03 at the creator's MLLP receiver, never twice across a restart; no
patient data in the logs or /status."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import time

import pytest

from engine.hl7.message import Message
from mllp.blocking import BlockingMLLPClient
from tests.enginectl import ROOT, EngineProcess, free_port
from tests.mail_rig import ImapRig, SmtpRig, make_dsn, make_mdn
from tests.mss_samples import (BOTH_FLAGS, DELETE, INIT, INS, ORU, PATIENT, PS, PS2, PS_ONLY_FLAGS, REPLACE, REPLY,
                               variant)
from tests.peers import Receiver
from tests.test_reports_e2e import PACS_ORU, PACS_REPORTS, _qualified_a28
from tests.pki import make_pki

BAL = "bal@pfi.test.mssante.fr"
IMAP_PW = "imap-test-secret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


#: a PACS report channel whose wrapped reports go to the requesting doctor and the patient
PACS_MSS = PACS_REPORTS + f"""\
                flags: {{DESTDMP: false, DESTMSSANTEPS: true, DESTMSSANTEPAT: true}}
                mss_recipients: [{{address: "{PS}", rpps: "10000000000", family: DEMANDEUR}}]
                mss_reply_to: "{REPLY}"
"""


def config(pki, port, status_port, smtp_port, zam_port, *, imap_port=None, identity=True, max_attempts=20,
           pacs=False):
    pacs_block = ("            identity_feed: {enabled: true}\n" + PACS_MSS) if pacs else ""
    ident = f"identity: {{cert: '{pki.client_cert}', key: '{pki.client_key}'}}" if identity else ""
    imap = (f"imap: {{host: localhost, port: {imap_port}, user: '{BAL}', password_env: MSS_IMAP_PW, "
            f"poll_interval: 300ms}}") if imap_port else ""
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
        channels:
          mllp-in:
            type: mllp
            port: {port}
            reports: {{enabled: true}}
{pacs_block}        routes:
          - name: reports
            from: mllp-in
            filter: {{message_types: ["MDM^*", "ORU^R01"]}}
            to: [mss]
            business_acks: zam-back
        destinations:
          mss:
            type: mssante
            mailbox: '{BAL}'
            smtp: {{host: localhost, port: {smtp_port}, connect_timeout: 3s, timeout: 10s}}
            {ident}
            ca: '{pki.ca}'
            {imap}
            xdm:
              organisation: "Centre d'imagerie de test"
              xds: {{source_id: "1.2.250.1.999.1"}}
            software_id: NIL-TEST-1
            queue:
              ordering: document
              concurrency: 4
              max_attempts: {max_attempts}
              retry: {{initial_delay: 200ms, max_delay: 500ms}}
          zam-back:
            type: mllp
            host: 127.0.0.1
            port: {zam_port}
    """


class Rig:
    def __init__(self, tmp_path, pki, *, policy=None, imap=False, identity=True, max_attempts=20,
                 smtp_down=False, pacs=False):
        self.smtp = None if smtp_down else SmtpRig(pki, policy=policy)
        self.smtp_port = free_port() if smtp_down else self.smtp.port
        self.zam = Receiver()
        self.imap = ImapRig(pki, BAL, IMAP_PW) if imap else None
        self.port, status_port = free_port(), free_port()
        self.eng = EngineProcess(tmp_path, config(pki, self.port, status_port, self.smtp_port, self.zam.port,
                                                  imap_port=self.imap.port if self.imap else None,
                                                  identity=identity, max_attempts=max_attempts, pacs=pacs),
                                 status_port=status_port, env={"MSS_IMAP_PW": IMAP_PW})
        self.eng.start()

    def send(self, *raws):
        with BlockingMLLPClient("127.0.0.1", self.port, timeout=30) as c:
            for raw in raws:
                ack = c.send(raw)
                assert b"MSA|AA|" in ack, ack

    def status(self, key, n, timeout=20.0):
        end = time.time() + timeout
        while True:
            st = self.eng.status()["destinations"]["mss"]
            if st[key] >= n or time.time() > end:
                return st
            time.sleep(0.1)

    def close(self):
        try:
            assert self.eng.stop() == 0
        finally:
            if self.smtp:
                self.smtp.close()
            self.zam.close()
            if self.imap:
                self.imap.close()


@pytest.fixture
def rig_factory(tmp_path, pki):
    made = []

    def make(**kw):
        folder = tmp_path / f"e{len(made)}"
        folder.mkdir()
        r = Rig(folder, pki, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def by_rcpt(mails):
    return {m.rcpt_tos[0]: m for m in mails}


def test_corpus_reports_give_the_mails_their_flags_ask_for(rig_factory):
    r = rig_factory()
    # the corpus MDM: DESTMSSANTEPS=Y, DESTMSSANTEPAT=N (and INVISIBLE_PATIENT=Y): one mail
    r.send(INIT)
    (first,) = r.smtp.wait_for(1)
    assert first.rcpt_tos == [PS] and first.mail_from == BAL
    m = first.message
    assert (m["From"], m["To"], m["Reply-To"]) == (BAL, PS, None)
    assert m["X-MSS-CODECDA"] == "18748-4" and m["X-MSS-INS"] == "O" and m["X-MSS-NIL"] == "NIL-TEST-1"
    assert m.get_body(("plain",)).get_content().startswith("Cher confrère")
    assert sorted(first.attachments()) == ["CDA.xml", "IHE_XDM.zip"]
    assert first.xdm_problems() == []
    assert first.rcpt_options == ["NOTIFY=FAILURE,DELAY", f"ORCPT=rfc822;{PS}"]      # no ACK_RECEPTION in the corpus file
    # replacement, then deletion, without CORPSMAIL: the default bodies
    r.send(variant(REPLACE, drop_body=True, control_id="MSS-RPLC"))
    r.smtp.wait_for(2)
    r.send(variant(DELETE, drop_body=True, control_id="MSS-DEL"))
    mails = r.smtp.wait_for(3)
    rep, dele = mails[1].message, mails[2].message
    assert "remplace la version" in rep.get_body(("plain",)).get_content()
    assert mails[1].xdm_problems() == []
    assert "supprimé" in dele.get_body(("plain",)).get_content() and mails[2].attachments() == {}
    # PS + patient, Reply-To, NTE FIN, receipts asked: two mails, two targets
    r.send(variant(flags=BOTH_FLAGS, patient=True, reply=True, fin=True, control_id="MSS-BOTH"))
    mails = by_rcpt(r.smtp.wait_for(5)[3:])
    assert sorted(mails) == [INS + "@patient.mssante.fr", PS]
    ps, pat = mails[PS].message, mails[PATIENT].message
    assert ps["Reply-To"] == REPLY and pat["Reply-To"] == REPLY
    assert pat["X-MSS-MES"] == "FIN" and ps["X-MSS-MES"] is None
    assert ps["Disposition-Notification-To"] == BAL and ps["Return-Receipt-To"] == BAL
    assert mails[PS].rcpt_options == ["NOTIFY=SUCCESS,FAILURE,DELAY", f"ORCPT=rfc822;{PS}"]
    assert mails[PATIENT].xdm_problems() == []
    # INVISIBLE_PATIENT=Y: nothing to the patient even with a patient PRT
    r.send(variant(flags={**PS_ONLY_FLAGS}, patient=True, control_id="MSS-INVIS"))
    assert r.status("sent", 6)["sent"] == 6
    time.sleep(0.5)
    assert [m.rcpt_tos for m in r.smtp.received[5:]] == [[PS]]
    # an identity that is not qualified (PID-32 PROV): no mail to the patient's INS mailbox
    prov = variant(flags=BOTH_FLAGS, patient=True, control_id="MSS-PROV")
    assert prov.count(b"|VALI") == 1
    r.send(prov.replace(b"|VALI", b"|PROV"))
    assert r.status("sent", 7)["sent"] == 7
    time.sleep(0.5)
    assert [m.rcpt_tos for m in r.smtp.received[6:]] == [[PS]]
    # the corpus ORU (CDA N3, PS + patient, receipts asked; its PRT names a mistyped patient
    # mailbox: the mail goes to the INS's, meta-dmp-mss.md)
    r.send(variant(ORU, control_id="MSS-ORU"))
    mails = by_rcpt(r.smtp.wait_for(9)[7:])
    assert sorted(mails) == [PATIENT, PS]
    assert all(m.xdm_problems() == [] and m.message["X-MSS-CODECDA"] == "11502-2" for m in mails.values())
    assert mails[PS].message["Disposition-Notification-To"] == BAL
    # each report's targets are stored with its entries
    row = next(x for x in r.eng.messages() if x["control_id"] == "MSS-BOTH")
    shown = json.loads(r.eng.cli("messages", "show", str(row["id"]), "--json", "--data-dir",
                                 str(r.eng.data_dir)).stdout)
    assert sorted(e["target"] for e in shown["entries"]) == ["patient", "ps-1"]


def test_pacs_wrapped_report_goes_to_the_doctor_and_the_patient(rig_factory):
    """A bare PACS ORU, wrapped into a CDA N1 at reception with the channel's recipients and
    flags: one mail to the configured doctor, one to the patient's INS mailbox, each with the
    wrapped CDA and a valid XDM."""
    r = rig_factory(pacs=True)
    r.send(_qualified_a28(), PACS_ORU.read_bytes())
    mails = by_rcpt(r.smtp.wait_for(2))
    assert sorted(mails) == [PATIENT, PS]
    for mail in mails.values():
        m = mail.message
        assert (m["From"], m["Reply-To"], m["X-MSS-CODECDA"]) == (BAL, REPLY, "18748-4")
        assert sorted(mail.attachments()) == ["CDA.xml", "IHE_XDM.zip"]
        assert mail.xdm_problems() == []
        cda = mail.attachments()["CDA.xml"]
        assert b"<ClinicalDocument" in cda and INS.encode() in cda
    assert mails[PATIENT].message["X-MSS-INS"] == "O"
    # the mails carry the CDA stored with the message, byte for byte
    row = next(x for x in r.eng.messages() if x["control_id"] == "PACS0001")
    shown = json.loads(r.eng.cli("messages", "show", str(row["id"]), "--json", "--data-dir",
                                 str(r.eng.data_dir)).stdout)
    doc = shown["submission"]["submission"]["documents"][0]
    assert base64.b64decode(doc["raw_bytes_b64"]) == mails[PS].attachments()["CDA.xml"]
    assert sorted(e["target"] for e in shown["entries"]) == ["patient", "ps-1"]


def test_receipts_become_zam_and_are_applied_once_across_a_restart(rig_factory):
    r = rig_factory(imap=True)
    r.send(variant(flags=BOTH_FLAGS, patient=True, control_id="MSS-RCPT"))
    mails = by_rcpt(r.smtp.wait_for(2))
    ps_id, pat_id = mails[PS].message["Message-ID"], mails[PATIENT].message["Message-ID"]
    assert mails[PS].mail_options[1] == f"ENVID={ps_id.strip('<>')}"
    r.status("sent", 2)
    r.imap.drop(make_dsn(ps_id, PS))
    r.imap.drop(make_mdn(pat_id, PATIENT))
    zams = r.zam.wait_for(2, timeout=30)
    got = {}
    for raw in zams:
        msg = Message.parse(raw, "utf-8")
        got[msg.value("MSH-9")] = msg
    z02, z03 = got["ZAM^Z02^ZAM_Z01"], got["ZAM^Z03^ZAM_Z01"]
    assert z02.value("OBX-3.1") == "ACK_RECEPTION_MSS" and z02.value("OBX-4") == "MSS-RCPT"
    assert z02.value("OBX-5.1") == "Y"
    obx2 = list(z02)[2]
    assert obx2.value(3, 1) == "DESTINATAIRE_MSS" and obx2.value(5) == PS
    assert z03.value("OBX-3.1") == "ACK_LECTURE_MSS" and list(z03)[2].value(5) == PATIENT
    assert z03.value("MSH-5") == "RIS-Y" and z03.value("MSH-6") == "Organisation-Y"   # the creator
    end = time.time() + 10
    while r.imap.flags() != [["\\Seen"], ["\\Seen"]] and time.time() < end:
        time.sleep(0.1)
    assert r.imap.flags() == [["\\Seen"], ["\\Seen"]]
    # the receipts are shown with the message
    row = next(x for x in r.eng.messages() if x["control_id"] == "MSS-RCPT")
    shown = json.loads(r.eng.cli("messages", "show", str(row["id"]), "--json", "--data-dir",
                                 str(r.eng.data_dir)).stdout)
    assert sorted((x["event"], x["ok"], x["target"]) for x in shown["receipts"]) == [
        ("Z02", True, "ps-1"), ("Z03", True, "patient")]
    # a restart after the receipts were recorded but before the mailbox was told (flags lost)
    assert r.eng.stop() == 0
    for m in r.imap.inbox.messages:
        m.flags.clear()
    r.eng.start()
    end = time.time() + 10
    while r.imap.flags() != [["\\Seen"], ["\\Seen"]] and time.time() < end:
        time.sleep(0.1)
    assert r.imap.flags() == [["\\Seen"], ["\\Seen"]]
    time.sleep(1.0)
    assert len(r.zam.received) == 2                     # none applied twice
    assert '"new":false' in r.eng.log_text().replace(' ', '')


def test_5xx_for_one_of_two_recipients_parks_only_that_one_with_a_zam(rig_factory):
    r = rig_factory(policy=lambda addr, n: "550 5.1.1 mailbox unknown" if addr == PS2 else None)
    r.send(variant(flags=PS_ONLY_FLAGS, second_ps=True, control_id="MSS-550"))
    st = r.status("errored", 1)
    assert st["errored"] == 1 and st["sent"] == 1, st
    assert "SMTP 550 on RCPT" in st["last_error"] and PS2 not in st["last_error"]
    assert [m.rcpt_tos for m in r.smtp.received] == [[PS]]
    (zam,) = r.zam.wait_for(1)
    msg = Message.parse(zam, "utf-8")
    assert msg.value("MSH-9") == "ZAM^Z02^ZAM_Z01" and msg.value("OBX-5.1") == "N"
    assert list(msg)[2].value(5) == PS2
    err = msg.segment("ERR")
    assert (err.value(5, 1), err.value(5, 3)) == ("550", "SMTPERRORCODE")


def test_4xx_then_2xx_is_delivered_once(rig_factory):
    r = rig_factory(policy=lambda addr, n: "451 4.3.0 busy" if n <= 2 else None)
    r.send(INIT)
    st = r.status("sent", 1)
    assert st["sent"] == 1 and st["errored"] == 0, st
    assert r.smtp.rcpt_count[PS] == 3 and len(r.smtp.received) == 1


def test_server_down_for_a_while_then_delivered(rig_factory, pki):
    r = rig_factory(smtp_down=True)
    r.send(INIT)
    deadline = time.monotonic() + 20  # the first attempt builds the mail before it connects
    st = r.eng.status()["destinations"]["mss"]
    while not st["last_error"] and time.monotonic() < deadline:
        time.sleep(0.1)
        st = r.eng.status()["destinations"]["mss"]
    assert st["sent"] == 0 and st["queue_depth"] == 1 and "connection refused" in (st["last_error"] or ""), st
    r.smtp = SmtpRig(pki, port=r.smtp_port)
    (got,) = r.smtp.wait_for(1, timeout=20)
    assert got.rcpt_tos == [PS]
    assert r.status("sent", 1)["sent"] == 1


def test_no_client_certificate_is_retried_then_parked_with_a_zam(rig_factory):
    r = rig_factory(identity=False, max_attempts=2)
    r.send(variant(flags=PS_ONLY_FLAGS, control_id="MSS-NOCERT"))
    st = r.status("errored", 1)
    assert st["errored"] == 1, st
    assert "client certificate" in st["last_error"] and "gave up after 2 attempts" in st["last_error"], st
    assert r.smtp.received == []
    (zam,) = r.zam.wait_for(1)               # receipts asked: the creator hears of the failure
    msg = Message.parse(zam, "utf-8")
    assert msg.value("MSH-9") == "ZAM^Z02^ZAM_Z01" and msg.value("OBX-5.1") == "N"
    assert (msg.value("ERR-5.1"), msg.value("ERR-5.3")) == ("111", "SMTPERRORCODE")


def test_canary_no_patient_data_in_logs_or_status(rig_factory):
    # the ANS test patient's names (synthetic, and the CDA must match PID), INS, birth date and
    # the name in the mail body are the canaries
    family, given = "PAT-TROIS", "DOMINIQUE"
    raw = variant(flags=BOTH_FLAGS, patient=True, control_id="MSS-CANARY")
    r = rig_factory(policy=lambda addr, n: "550 5.1.1 no such user " + addr if addr == PATIENT else None)
    r.send(raw)
    st = r.status("errored", 1)
    assert st["errored"] == 1 and st["sent"] == 1
    status_text = json.dumps(r.eng.status())
    assert r.eng.stop() == 0
    text = r.eng.log_text() + status_text
    for secret in (INS, given, family, "19790328", "patient.mssante.fr", "Dupont"):
        assert secret not in text, secret


def test_minipfi_check_names_an_unusable_certificate(tmp_path, pki):
    def check(text):
        cfg = tmp_path / "routes.yaml"
        cfg.write_text(textwrap.dedent(text))
        return subprocess.run([sys.executable, "-m", "engine.cli", "check", str(cfg)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    text = config(pki, free_port(), free_port(), 1, 2)
    bad = check(text.replace(str(pki.client_key), str(tmp_path / "gone.key")))
    assert bad.returncode != 0
    assert "destinations.mss.identity" in bad.stdout + bad.stderr and "gone.key" in bad.stdout + bad.stderr
    ok = check(text)
    assert ok.returncode == 0, ok.stdout + ok.stderr
