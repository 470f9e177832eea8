"""Alerts end to end: the real engine process, an SMTP relay with STARTTLS (aiosmtpd) and a
webhook receiver on 127.0.0.1. A destination goes down and comes back (one start, one end, by
mail and webhook), a certificate near its end, a refused reload, a restart that must not notify
a start again; and no patient data in any of it while report messages flow."""
from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest

from mllp.blocking import BlockingMLLPClient
from tests.conftest import CORPUS
from tests.enginectl import EngineProcess, free_port, wait
from tests.mail_rig import SmtpRig
from tests.peers import Receiver, WebhookReceiver
from tests.pki import make_expiring, make_pki

TRANS = CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1"
REPORTS = sorted(p for p in TRANS.rglob("*") if p.suffix in (".er7", ".hl7") and p.name != "ack.er7")[:3]
PHI_CANARIES = ("PAT-TROIS", "279035121518989", "19790328", "DOMINIQUE", "Breteuil")
TOKEN = "alert-hook-token"


def states(bodies) -> list[tuple[str, str, str]]:
    return [(b["alert"], b["subject"], b["state"]) for b in bodies]


def config(ports, pki, short_cert, short_key):
    return f"""
        engine:
          name: pfi-test
          status: {{bind: 127.0.0.1, port: {ports['status']}}}
          duplicates: {{on_conflict: accept}}
          shutdown_grace: 2s
        channels:
          mllp-in: {{type: mllp, port: {ports['in']}}}
        routes:
          - {{name: reports, from: mllp-in, to: [ris]}}
        destinations:
          ris:
            type: mllp
            host: 127.0.0.1
            port: {ports['ris']}
            connect_timeout: 1s
            ack_timeout: 2s
            queue: {{retry: {{initial_delay: 100ms, max_delay: 300ms}}}}
          archive:
            type: mllp
            host: 127.0.0.1
            port: {ports['archive']}
            tls: {{cert: {short_cert}, key: {short_key}, ca: {pki.ca}}}
        alerts:
          check_every: 200ms
          notify:
            mail:
              type: email
              host: 127.0.0.1
              port: {ports['smtp']}
              ca_file: {pki.ca}
              client_cert: {pki.client_cert}
              client_key: {pki.client_key}
              from: pfi@chu.test
              to: [it@chu.test]
            hook: {{type: webhook, url: "http://127.0.0.1:{ports['hook']}/alerts", token_env: ALERT_HOOK_TOKEN}}
          rules:
            - {{name: ris-down, kind: destination_down, destinations: [ris], for: 1s, notify: [mail, hook]}}
            - {{name: certs, kind: certificate_expiry, days: [30], notify: [hook]}}
            - {{name: reload, kind: reload_refused, notify: [hook]}}
    """


@pytest.fixture
def rig(tmp_path):
    pki = make_pki(tmp_path / "pki")
    short_cert, short_key = make_expiring(tmp_path / "pki", days=10)
    smtp, hook = SmtpRig(pki), WebhookReceiver()
    ports = {"status": free_port(), "in": free_port(), "ris": free_port(), "archive": free_port(),
             "smtp": smtp.port, "hook": hook.port}
    eng = EngineProcess(tmp_path, config(ports, pki, short_cert, short_key), status_port=ports["status"],
                        env={"ALERT_HOOK_TOKEN": TOKEN})
    eng.ports = ports
    yield eng, smtp, hook
    eng.stop()
    smtp.close()
    hook.close()


def metrics(eng) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{eng.status_port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_destination_down_certificate_reload_restart_and_no_patient_data(rig):
    eng, smtp, hook = rig
    eng.start()
    cert_subject = "destinations.archive.tls.cert:30d"
    wait(lambda: hook.bodies("certs"))
    # reports with a patient's identity go to a destination whose port is closed
    with BlockingMLLPClient("127.0.0.1", eng.ports["in"], timeout=10) as c:
        for path in REPORTS:
            assert b"MSA|AA" in c.send(path.read_bytes())
    t0 = time.time()
    wait(lambda: hook.bodies("ris-down"))
    assert time.time() - t0 >= 0.9  # for: 1s
    (mail,) = smtp.wait_for(1)
    assert "STARTED: ris-down (ris)" in mail.message["Subject"] and mail.peer_cert_cn == "client.test"
    text = mail.message.get_content()
    assert "Alerte déclenchée" in text and "Alert started" in text and "destination_down" in text
    status = eng.status()["alerts"]
    assert {(a["rule"], a["subject"]) for a in status["active"]} == {("ris-down", "ris"), ("certs", cert_subject)}
    scrape = metrics(eng)
    assert 'minipfi_alert_active{rule="ris-down",subject="ris"} 1.0' in scrape
    assert f'minipfi_alert_active{{rule="certs",subject="{cert_subject}"}} 1.0' in scrape

    # the peer comes up: the reports go out, the alert ends once
    receiver = Receiver(port=eng.ports["ris"])
    try:
        receiver.wait_for(len(REPORTS))
        wait(lambda: [b for b in hook.bodies("ris-down") if b["state"] == "ended"])
        smtp.wait_for(2)
        time.sleep(0.6)  # three more checks: nothing more
    finally:
        receiver.close()
    assert states(hook.bodies("ris-down")) == [("ris-down", "ris", "started"), ("ris-down", "ris", "ended")]
    subjects = [m.message["Subject"] for m in smtp.received]
    assert len(subjects) == 2 and "ENDED: ris-down (ris)" in subjects[1]
    assert states(hook.bodies("certs")) == [("certs", cert_subject, "started")]
    cert_notice = hook.bodies("certs")[0]
    assert 9 < cert_notice["value"] <= 10 and cert_notice["engine"] == "pfi-test"
    assert {auth for auth, _ in hook.posts} == {f"Bearer {TOKEN}"}
    notices = eng.status()["alerts"]["last_notices"]
    assert {(n["notifier"], n["state"], n["result"]) for n in notices if n["rule"] == "ris-down"} == {
        ("mail", "started", "sent"), ("hook", "started", "sent"), ("mail", "ended", "sent"), ("hook", "ended", "sent")}

    # a refused reload (the running configuration stays): an alert; a good one ends it
    good = eng.config.read_text()
    eng.config.write_text(good + "\nbogus: [\n")
    eng.proc.send_signal(signal.SIGHUP)
    wait(lambda: hook.bodies("reload"))
    eng.config.write_text(good)
    eng.proc.send_signal(signal.SIGHUP)
    wait(lambda: len(hook.bodies("reload")) == 2)
    assert states(hook.bodies("reload")) == [("reload", "config", "started"), ("reload", "config", "ended")]
    final_status = eng.status()

    # a restart: the certificate alert still fires, but its start was notified already
    assert eng.stop() == 0
    eng.start()
    wait(lambda: eng.status()["alerts"]["active"])
    time.sleep(0.8)
    after = eng.status()["alerts"]["active"]
    assert [(a["rule"], a["subject"]) for a in after] == [("certs", cert_subject)]
    assert after[0]["since"] == final_status["alerts"]["active"][0]["since"]
    assert states(hook.bodies("certs")) == [("certs", cert_subject, "started")]

    # no patient data anywhere an alert goes
    seen = [m.data.decode("utf-8", "replace") for m in smtp.received]
    seen += [json.dumps(b, ensure_ascii=False) for b in hook.bodies()]
    seen += [json.dumps(final_status["alerts"], ensure_ascii=False), metrics(eng)]
    for canary in PHI_CANARIES:
        assert not any(canary in s for s in seen), canary
    assert any("PAT-TROIS" in p.read_text(errors="replace") for p in REPORTS)  # the canary is real
