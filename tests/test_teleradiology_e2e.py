"""End to end, teleradiology: the real engine process, real MLLP sockets, receivers standing for the
RIS, the teleradiology platform and the report consumer (``reports-out``).

The configuration is the sample one (``engine/routes.yaml``: identity feed, teleradiology checks,
CI-SIS report channel, teleradiology routes with the ``profiles`` filter, ``ins_enrich`` on the
requests) on free ports.

The teleradiology step (``teleradiology`` block): the four flows of the CI-SIS « Volet
Téléradiologie » are answered AA and routed; a variant of each that breaks the guide is answered
AE with one ERR per finding (ERR-2 location, ERR-3 HL7 table 0357 code, no ERR-5: the guide's
acknowledgement section defines none), stored, and not delivered, unless ``route_rejected``.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.reports.teleradiology import check_tlr
from mllp.blocking import BlockingMLLPClient
from tests.conftest import CORPUS
from tests.test_teleradiology import drop, seg_edit
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


def config(port, status_port, ris, tlr, reports, teleradiology="{enabled: true}"):
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
            teleradiology: {teleradiology}
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
def site(tmp_path, request):
    teleradiology = getattr(request, "param", "{enabled: true}")
    ris, platform, consumer = Receiver(), Receiver(), Receiver()
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, ris.port, platform.port, consumer.port, teleradiology),
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


# -------------------------------------------------------------------------------------------------
# the teleradiology step: broken flows


def variant(flow: int, cid: str, mutate) -> bytes:
    """A sample edited by ``mutate`` (text -> text), with its own MSH-10."""
    text = mutate((SAMPLES / FLOWS[flow]).read_bytes().decode("utf-8"))
    return seg_edit(text, "MSH", 10, cid).encode("utf-8")


FLOWS = {1: "flow1_orm_nw.hl7", 2: "flow2_orm_ca.hl7", 3: "flow3_oru_ok.hl7", 4: "flow4_omi_o23.hl7"}
# (flow, MSH-10, mutation, [(ERR-2, ERR-3.1)] in order)
BROKEN = [
    # the guide's own negative ACK example (acknowledgement section): unknown version -> AE, 203
    (1, "TLR-F1-B1", lambda t: seg_edit(t, "MSH", 12, "2.5"), [("MSH^1^12", "203")]),
    # flow 1: OBR-13 (relevant clinical information) is required
    (1, "TLR-F1-B2", lambda t: seg_edit(t, "OBR", 13, ""), [("OBR^1^13", "101")]),
    # flow 2: a wrong order control (ORC-1 must be CA for a cancellation, NW for a request)
    (2, "TLR-F2-B1", lambda t: seg_edit(t, "ORC", 1, "XO"), [("ORC^1^1", "103")]),
    # flow 2: ORC-12 (ordering provider) missing; OBR-16 can no longer be compared with it
    (2, "TLR-F2-B2", lambda t: seg_edit(t, "ORC", 12, ""), [("ORC^1^12", "101")]),
    # flow 3: an accepted request (ORC-1 OK) without its imaging protocol OBX
    (3, "TLR-F3-B1", lambda t: drop(t, lambda ln: ln.startswith("OBX")), [("OBX", "100")]),
    # flow 4: IPC-3 (Study Instance UID) missing, and TQ1-6 (image retention) missing
    (4, "TLR-F4-B1", lambda t: seg_edit(seg_edit(t, "IPC", 3, ""), "TQ1", 6, ""),
     [("TQ1^1^6", "101"), ("IPC^1^3^1^1", "101")]),
]


def errs(ack: bytes) -> list[list[str]]:
    return [s.decode("utf-8").split("|") for s in ack.split(b"\r") if s.startswith(b"ERR")]


def send_all(eng):
    """The ADT, then each flow clean and its broken variants (one resent); returns the ACKs."""
    acks = {}
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=15) as c:
        assert msa(c.send(ADMISSION.read_bytes().replace(b"\n", b"\r")))[1] == "AA"
        for n in (1, 2, 3, 4):
            acks[f"TLR-F{n}-0001"] = c.send((SAMPLES / FLOWS[n]).read_bytes())
            for flow, cid, mutate, _ in BROKEN:
                if flow == n:
                    acks[cid] = c.send(variant(flow, cid, mutate))
        # a resent broken message: the same answer, byte for byte (the stored ACK)
        assert c.send(variant(*BROKEN[0][:3])) == acks[BROKEN[0][1]]
    return acks


def check_acks(acks):
    for n in (1, 2, 3, 4):
        ack = acks[f"TLR-F{n}-0001"]
        assert msa(ack)[1:3] == ["AA", f"TLR-F{n}-0001"] and not errs(ack), ack
    for _flow, cid, _mutate, expected in BROKEN:
        ack = acks[cid]
        assert msa(ack)[1:3] == ["AE", cid], ack
        rows = errs(ack)
        assert [(e[2], e[3].split("^")[0]) for e in rows] == expected, rows
        for e in rows:
            assert e[3].endswith("^HL70357") and e[4] == "E" and e[5] == "", e    # no ERR-5 code
            assert e[8].startswith("CI-SIS Volet Téléradiologie, ") and ".md" not in e[8], e
        for canary in ("PAT-TROIS", "279035121518989", "19790328", "DOMINIQUE"):
            assert canary.encode() not in ack


def test_broken_flows_answered_ae_stored_and_not_delivered(site):
    eng, ris, platform, consumer = site
    check_acks(send_all(eng))
    got = platform.wait_for(3)
    assert [control_id(m) for m in got] == ["TLR-F1-0001", "TLR-F2-0001", "TLR-F4-0001"]
    got_ris = ris.wait_for(2)
    assert [control_id(m) for m in got_ris] == ["3975", "TLR-F3-0001"]
    time.sleep(1.0)                                   # nothing else arrives
    assert len(platform.received) == 3 and len(ris.received) == 2 and consumer.received == []
    status = {r["control_id"]: r["status"] for r in eng.messages()}
    assert {cid: status[cid] for _, cid, _, _ in BROKEN} == {cid: "rejected" for _, cid, _, _ in BROKEN}
    assert all(status[f"TLR-F{n}-0001"] == "sent" for n in (1, 2, 3, 4)), status
    assert len(eng.messages()) == 1 + 4 + len(BROKEN)  # the resend was not stored twice
    log = eng.log_text()
    assert "teleradiology.processed" in log
    for canary in ("PAT-TROIS", "279035121518989", "19790328", "DOMINIQUE"):
        assert canary not in log


@pytest.mark.parametrize("site", ["{enabled: true, route_rejected: true}"], indirect=True)
def test_broken_flows_delivered_with_route_rejected(site):
    eng, ris, platform, consumer = site
    check_acks(send_all(eng))                         # still answered AE
    to_platform = ["TLR-F1-0001", "TLR-F1-B1", "TLR-F1-B2", "TLR-F2-0001", "TLR-F2-B1", "TLR-F2-B2",
                   "TLR-F4-0001", "TLR-F4-B1"]
    got = platform.wait_for(len(to_platform))
    assert [control_id(m) for m in got] == to_platform
    got_ris = ris.wait_for(3)
    assert sorted(control_id(m) for m in got_ris) == ["3975", "TLR-F3-0001", "TLR-F3-B1"]
    time.sleep(0.5)
    assert len(platform.received) == len(to_platform) and len(ris.received) == 3


@pytest.mark.parametrize("site", ["{enabled: false}"], indirect=True)
def test_without_the_block_broken_flows_are_accepted_and_routed(site):
    """The checks are the step's: with the block disabled the same variants are stored and routed
    with AA (what the engine did before the step existed)."""
    eng, ris, platform, consumer = site
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=15) as c:
        for flow, cid, mutate, _ in BROKEN:
            assert msa(c.send(variant(flow, cid, mutate)))[1:3] == ["AA", cid]
