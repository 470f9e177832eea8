"""End to end, teleradiology: the real engine process, real MLLP sockets, receivers standing for the
RIS, the teleradiology platform and the report consumer (``reports-out``).

The configuration is the sample one (``engine/routes.yaml``: identity feed, CI-SIS report channel,
teleradiology routes with the ``profiles`` filter, ``ins_enrich`` on the requests) on free ports.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.reports.teleradiology import check_tlr
from mllp.blocking import BlockingMLLPClient
from tests.conftest import CORPUS
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver, control_id

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "teleradiology"
ADMISSION = CORPUS / "ans-hl7v2" / "SGL" / "admission.er7"
# The report the platform returns: a CI-SIS imaging report (CR d'imagerie, CDA R2 N1 in Base64),
# MDM^T02 v2.6, MSH-21 2.1^CISIS_CDA_HL7_V2, LF segment separators, 330 KB: sent and relayed as is.
REPORT = (CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1"
          / "MDM" / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1_Base64.er7")
INS_REP = b"279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS"


def config(port, status_port, ris, tlr, reports):
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
          shutdown_grace: 5s
          duplicates: {{on_conflict: accept}}
        channels:
          mllp-in:
            type: mllp
            port: {port}
            accept:
              message_types: ["ADT^*", "ORM^O01", "OMI^O23", "ORU^R01", "MDM^T02", "MDM^T04", "MDM^T10"]
              versions: ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6"]
            identity_feed: {{enabled: true}}
            reports:
              enabled: true
              validation: {{xsd: true, schematron: false, on_failure: warn}}
        routes:
          - name: adt-to-ris
            from: mllp-in
            filter: {{message_types: ["ADT^*"]}}
            to: [ris-adt]
          - name: tlr-requests-to-teleradiology
            from: mllp-in
            filter: {{message_types: ["ORM^O01", "OMI^O23"], profiles: [CISIS_TLR_HL7_V2]}}
            transforms: [{{type: ins_enrich}}]
            to: [teleradiology]
          - name: tlr-answers-to-ris
            from: mllp-in
            filter: {{message_types: ["ORU^R01"], profiles: [CISIS_TLR_HL7_V2]}}
            to: [ris-adt]
          - name: orders-to-teleradiology
            from: mllp-in
            filter: {{message_types: ["ORM^O01", "OMI^O23"]}}
            to: [teleradiology]
          - name: reports-out
            from: mllp-in
            filter:
              message_types: ["ORU^R01", "MDM^T02", "MDM^T04", "MDM^T10"]
              profiles: [CISIS_CDA_HL7_V2, ""]
            to: [reports-out]
        destinations:
          ris-adt:
            type: mllp
            host: 127.0.0.1
            port: {ris}
            ack_timeout: 5s
            connect_timeout: 1s
            queue: {{retry: {{initial_delay: 100ms, max_delay: 1s}}, ordering: key, ordering_key: PID-3.1}}
          teleradiology:
            type: mllp
            host: 127.0.0.1
            port: {tlr}
            ack_timeout: 5s
            connect_timeout: 1s
            queue: {{retry: {{initial_delay: 100ms, max_delay: 1s}}, ordering: destination}}
          reports-out:
            type: mllp
            host: 127.0.0.1
            port: {reports}
            ack_timeout: 5s
            connect_timeout: 1s
            queue: {{retry: {{initial_delay: 100ms, max_delay: 1s}}, ordering: destination}}
    """


def msa(ack: bytes) -> list[str]:
    for seg in ack.replace(b"\n", b"\r").split(b"\r"):
        if seg.startswith(b"MSA"):
            return seg.decode().split("|")
    raise AssertionError(f"no MSA in {ack!r}")


def pid(message: bytes) -> bytes:
    return next(s for s in message.replace(b"\n", b"\r").split(b"\r") if s.startswith(b"PID"))


@pytest.fixture
def site(tmp_path):
    ris, platform, consumer = Receiver(), Receiver(), Receiver()
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, ris.port, platform.port, consumer.port),
                        status_port=status_port)
    eng.port = port
    eng.start()
    try:
        yield eng, ris, platform, consumer
    finally:
        eng.stop()
        for r in (ris, platform, consumer):
            r.close()


def test_teleradiology_flows_and_report_relayed_byte_for_byte(site):
    eng, ris, platform, consumer = site
    flows = {n: (SAMPLES / name).read_bytes() for n, name in
             ((1, "flow1_orm_nw.hl7"), (2, "flow2_orm_ca.hl7"), (3, "flow3_oru_ok.hl7"), (4, "flow4_omi_o23.hl7"))}
    for n, raw in flows.items():
        assert check_tlr(raw).flow == n and check_tlr(raw).ok
    report = REPORT.read_bytes()
    assert b"\r" not in report and report.endswith(b"|F|\n")     # LF separators, trailing LF: sent as is

    t0 = time.time()
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=15) as c:
        # the RIS's identity feed first: the registry learns the patient's qualified INS (ins_enrich)
        assert msa(c.send(ADMISSION.read_bytes().replace(b"\n", b"\r")))[1] == "AA"
        for n in (1, 2, 3, 4):
            ack = c.send(flows[n])
            assert msa(ack)[1:3] == ["AA", f"TLR-F{n}-0001"], ack
        ack = c.send(report)
        assert msa(ack)[1:3] == ["AA", "015"], ack

    # flows 1, 2 and 4 reach the platform, in order; flow 3 reaches the RIS (after the ADT)
    got = platform.wait_for(3)
    assert [control_id(m) for m in got] == ["TLR-F1-0001", "TLR-F2-0001", "TLR-F4-0001"]
    got_ris = ris.wait_for(2)
    assert [control_id(m) for m in got_ris] == ["3975", "TLR-F3-0001"]
    got_rep = consumer.wait_for(1)
    # the platform's report is relayed byte for byte, and nothing else reaches reports-out
    assert got_rep[0] == report
    assert got_ris[1] == flows[3]                                # flow 3 unchanged
    time.sleep(0.5)
    assert len(platform.received) == 3 and len(ris.received) == 2 and len(consumer.received) == 1

    # flow 1 left INS-enriched (the qualified INS written into PID-3); still a clean flow 1
    assert INS_REP not in pid(flows[1]) and INS_REP in pid(got[0])
    assert check_tlr(got[0]).flow == 1 and check_tlr(got[0]).problems == []
    for m, n in ((got[1], 2), (got[2], 4)):
        assert INS_REP in pid(m) and check_tlr(m).flow == n and check_tlr(m).problems == []
    assert time.time() - t0 < 30
    log = eng.log_text()
    for canary in ("PAT-TROIS", "279035121518989", "19790328", "DOMINIQUE"):
        assert canary not in log                                  # PHI rule: no patient data in logs
