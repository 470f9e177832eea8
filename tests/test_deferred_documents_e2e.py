"""Deferred delivery and per-document order, end to end: real engine, real MLLP, the ANS corpus
imaging report in its three versions (MDM^T02 initial, T10 replacement, T04 deletion).

* a held destination sends nothing before its delay;
* T02 then T04 of the same document within the hold: nothing is sent, both entries cancelled;
* T02 then T10: both sent, in that order;
* a deletion of a document already delivered is sent (there is something to delete).
"""
from __future__ import annotations

import json
import time

import pytest

from mllp.blocking import BlockingMLLPClient
from tests.conftest import CORPUS
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver

MDM = CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1" / "MDM"
T02 = (MDM / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1_Base64.er7").read_bytes()
T10 = (MDM / "Remplacement MDM" / "message_MDM_CR_Radio_RPLC_N1.er7").read_bytes()
T04 = (MDM / "Suppression MDM" / "message_MDM_CR_Radio_DEL_N1.er7").read_bytes()


def config(port, status_port, dest_port, hold):
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
          duplicates: {{on_conflict: accept}}   # the corpus reuses MSH-10 values across files
        channels:
          mllp-in:
            type: mllp
            port: {port}
            reports: {{enabled: true, validation: {{xsd: true, schematron: false, on_failure: warn}}}}
        routes:
          - {{name: reports, from: mllp-in, filter: {{message_types: ["MDM^*"]}}, to: [dmp-side]}}
        destinations:
          dmp-side:
            type: mllp
            host: 127.0.0.1
            port: {dest_port}
            ack_timeout: 5s
            hold: {hold}
            queue: {{ordering: document, concurrency: 4, retry: {{initial_delay: 200ms, max_delay: 1s}}}}
    """


@pytest.fixture
def rig(tmp_path, request, db_url):
    hold = getattr(request, "param", "3s")
    receiver = Receiver()
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, receiver.port, hold), db_url=db_url,
                        status_port=status_port)
    eng.port = port
    eng.start()
    yield eng, receiver
    rc = eng.stop()
    receiver.close()
    assert rc == 0, eng.log_tail()
    for canary in ("PAT-TROIS", "279035121518989"):
        assert canary not in eng.log_text(), f"patient data {canary!r} leaked into the logs"


def send_all(eng, *messages):
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=30) as c:
        for raw in messages:
            ack = c.send(raw)
            assert b"MSA|AA|" in ack, ack


def entries(eng) -> list[dict]:
    out = []
    for row in sorted(eng.messages(), key=lambda r: r["id"]):
        shown = json.loads(eng.cli("messages", "show", str(row["id"]), "--json").stdout)
        out.extend(shown["entries"])
    return out


@pytest.mark.parametrize("rig", ["2s"], indirect=True)
def test_held_destination_sends_nothing_before_its_delay(rig):
    eng, receiver = rig
    t0 = time.time()
    send_all(eng, T02)
    time.sleep(1.2)
    assert receiver.received == []
    assert eng.status()["destinations"]["dmp-side"]["queued"] == 1
    got = receiver.wait_for(1, timeout=15)
    assert time.time() - t0 >= 2.0
    assert got == [T02]


@pytest.mark.parametrize("rig", ["3s"], indirect=True)
def test_initial_then_deletion_within_the_hold_sends_nothing(rig):
    eng, receiver = rig
    send_all(eng, T02, T04)
    time.sleep(5.0)
    assert receiver.received == []
    es = entries(eng)
    assert [e["status"] for e in es] == ["cancelled", "cancelled"], es
    assert [e["action"] for e in es] == ["initial", "delete"]
    assert es[0]["doc_key"] == es[1]["doc_key"] and es[0]["doc_key"]
    assert "deletion" in es[0]["last_error"]
    st = eng.status()["destinations"]["dmp-side"]
    assert st["cancelled"] == 2 and st["queued"] == 0


@pytest.mark.parametrize("rig", ["1s"], indirect=True)
def test_initial_then_replacement_are_sent_in_order(rig):
    eng, receiver = rig
    send_all(eng, T02, T10)
    got = receiver.wait_for(2, timeout=20)
    assert got == [T02, T10]
    es = entries(eng)
    assert [e["status"] for e in es] == ["sent", "sent"]
    assert es[0]["doc_key"] == es[1]["doc_key"]


@pytest.mark.parametrize("rig", ["0s"], indirect=True)
def test_deletion_of_a_delivered_document_is_sent(rig):
    eng, receiver = rig
    send_all(eng, T02)
    receiver.wait_for(1, timeout=15)
    send_all(eng, T04)
    assert receiver.wait_for(2, timeout=15) == [T02, T04]
