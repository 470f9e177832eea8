"""DMP connector end to end: corpus reports sent over MLLP to the real engine reach the DMP
simulator (mutual TLS, XSD-valid, VIHF signature checked) as ITI-41 / ITI-57 requests whose
metadata says what the CDA and the flags say; ZAM^Z01 goes back to the creator; faults, outages,
a foreign client certificate and the deferred sending behave as the connector documents.

The simulator runs in this process (tests.reactor_thread), the engine in its own.
"""
from __future__ import annotations

import hashlib
import json
import re
import time

import pytest

from engine.cda.header import read_header
from engine.reports.cisis import parse_report
from engine.simulators.demo_pki import make_demo_pki
from engine.simulators.dmp import DMPSimulator
from mllp.blocking import BlockingMLLPClient
from tests.conftest import CORPUS, ROOT
from tests.enginectl import EngineProcess, free_port, wait
from tests.peers import Receiver
from tests.pki import make_pki
from tests.reactor_thread import call

TRANS = CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1"
MDM_T02 = (TRANS / "MDM" / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1_Base64.er7").read_bytes()
MDM_T10 = (TRANS / "MDM" / "Remplacement MDM" / "message_MDM_CR_Radio_RPLC_N1.er7").read_bytes()
MDM_T04 = (TRANS / "MDM" / "Suppression MDM" / "message_MDM_CR_Radio_DEL_N1.er7").read_bytes()
ORU_INIT = (TRANS / "ORU" / "Transmission initiale ORU" / "message_ORU_CR_Bio_INIT_N3_SEGUR.hl7").read_bytes()
PACS_ORU = (ROOT / "tests" / "data" / "pacs" / "oru_pdf.hl7").read_bytes()
INS = "279035121518989"
PATIENT_ID = f"{INS}^^^&1.2.250.1.213.1.4.10&ISO^NH"   # as in the DMP's example request
CANARIES = ("PAT-TROIS", INS, "19790328")
ENDPOINT_PATH = "/si-dmp-server/v2/services/repository"


def set_flag(raw: bytes, name: str, value: str) -> bytes:
    """The MetaDMPMSS OBX ``name`` set to Y or N (profils-messages.md « Les métadonnées DMP/MSSanté »)."""
    out, n = re.subn(rb"(OBX\|\d+\|CWE\|" + name.encode() + rb"\^[^|]*\|[^|]*\|)[YN]", rb"\g<1>" + value.encode(), raw)
    assert n == 1, name
    return out


def set_control_id(raw: bytes, cid: str) -> bytes:
    f = raw.split(b"|", 10)
    f[9] = cid.encode()
    return b"|".join(f)


def cda_of(raw: bytes) -> bytes:
    """The document as the report channel reads it (HL7 escapes undone, Base64 decoded)."""
    return parse_report(raw, "utf-8").documents[0].raw_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("dmp-e2e-pki")
    return make_demo_pki(d / "demo"), make_pki(d / "other")


@pytest.fixture(scope="module")
def sim(pki):
    demo, _ = pki
    s = DMPSimulator(cert=str(demo.server_cert), key=str(demo.server_key), client_ca=str(demo.ca),
                     signer_ca=str(demo.ca))
    s.port = call(s.start)
    yield s
    call(s.stop)


@pytest.fixture(autouse=True)
def _fresh_sim(sim):
    call(sim.reset)
    yield


def config(port, status_port, sim_port, creator_port, demo, *, hold="0s", client=None, max_attempts=20,
           extra_dest=""):
    cert, key = client or (demo.client_cert, demo.client_key)
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
          duplicates: {{on_conflict: accept}}
        channels:
          mllp-in:
            type: mllp
            port: {port}
            identity_feed: {{enabled: true}}
            reports: {{enabled: true, validation: {{xsd: true, schematron: false, on_failure: warn}}}}
            pacs_reports:
              enabled: true
              sending_applications: [PACS-X]
              cda_wrap:
                organization: {{id: "000897406", name: "Centre d'imagerie de test"}}
                document_root_oid: "1.2.250.1.999.99.10"
                accession_root_oid: "1.2.250.1.999.99.4"
                accepted_identity_statuses: [QUAL, VALI]
              validation: {{xsd: true, schematron: false, on_failure: reject}}
        routes:
          - name: reports-to-dmp
            from: mllp-in
            filter: {{message_types: ["ORU^R01", "MDM^*"]}}
            to: [dmp]
            business_acks: creator
        destinations:
          dmp:
            type: dmp
            hold: {hold}
            tls: {{cert: "{cert}", key: "{key}", ca: "{demo.ca}"}}
            signing: {{cert: "{demo.signer_cert}", key: "{demo.signer_key}"}}
            vihf:
              secteur_activite: {{code: SA07, scheme: 1.2.250.1.71.4.2.4}}
              lps_name: mini-PFI
              lps_version: "0.1"
              lps_homologation_id: TEST-HOMOLOGATION
              structure_id: "1000089740"
            xds:
              endpoint: https://localhost:{sim_port}{ENDPOINT_PATH}
              source_id: 1.2.250.1.999.99.1
            validate_requests: true
            timeout: 10s
            queue:
              ordering: document
              retry: {{initial_delay: 200ms, max_delay: 1s, jitter: 0}}
              max_attempts: {max_attempts}
          creator:
            type: mllp
            host: 127.0.0.1
            port: {creator_port}
            ack_timeout: 5s
{extra_dest}
    """


@pytest.fixture
def rig(tmp_path, pki, sim, request):
    demo, other = pki
    opts = getattr(request, "param", {})
    creator = Receiver()
    port, status_port = free_port(), free_port()
    client = (other.rogue_cert, other.rogue_key) if opts.get("rogue") else None
    eng = EngineProcess(tmp_path, config(port, status_port, sim.port, creator.port, demo, hold=opts.get("hold", "0s"),
                                         client=client, max_attempts=opts.get("max_attempts", 20)),
                        status_port=status_port)
    eng.port = port
    eng.start()
    yield eng, creator
    status = json.dumps(eng.status())
    rc = eng.stop()
    creator.close()
    assert rc == 0, eng.log_tail()
    text = eng.log_text() + status
    for canary in CANARIES:
        assert canary not in text, f"patient data {canary!r} leaked into the logs"


def send_all(eng, *messages) -> list[bytes]:
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=30) as c:
        return [c.send(m) for m in messages]


def entries(eng, destination="dmp") -> list[dict]:
    """The destination's queue entries, read from the engine's SQLite file (read-only, WAL)."""
    import sqlite3

    db = sqlite3.connect(f"file:{eng.data_dir / 'minipfi.db'}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT q.status, q.attempts, q.last_error, m.control_id FROM queue_entries q "
                          "JOIN messages m ON m.id = q.message_id WHERE q.destination = ? ORDER BY q.id",
                          (destination,)).fetchall()
    finally:
        db.close()
    return [dict(r) for r in rows]


def docs(submission):
    return [d for d in submission.documents if not d.is_signature]


def test_corpus_mdm_chain_initial_replacement_deletion_and_zam(rig, sim):
    eng, creator = rig
    t02 = set_flag(MDM_T02, "ACK_RECEPTION", "Y")
    acks = send_all(eng, t02)
    assert b"MSA|AA" in acks[0]
    wait(lambda: len(sim.accepted) == 1, what="the T02 at the DMP")
    send_all(eng, set_control_id(MDM_T10, "T10-1"))
    wait(lambda: len(sim.accepted) == 2, what="the T10 at the DMP")
    send_all(eng, set_control_id(MDM_T04, "T04-1"))
    wait(lambda: len(sim.accepted) == 3, what="the T04 at the DMP")

    first, second, third = sim.accepted
    cda1, cda2 = cda_of(MDM_T02), cda_of(MDM_T10)
    h1 = read_header(cda1)
    (d1,) = docs(first)
    assert d1.content == cda1                                   # the exact bytes, unchanged
    assert (d1.hash, d1.size) == (hashlib.sha1(cda1).hexdigest(), len(cda1))
    assert d1.unique_id == h1["id_str"] and d1.patient_id == PATIENT_ID
    assert first.patient_id == PATIENT_ID
    assert d1.code("formatCode") == "urn:ihe:iti:xds-sd:pdf:2008"          # N1
    assert d1.code("typeCode") == "18748-4" and d1.code("classCode") == "31"
    assert d1.confidentiality == (h1["confidentiality_code"] or {}).get("code", "N")
    assert d1.masks == {"INVISIBLE_PATIENT", "INVISIBLE_REPRESENTANTS_LEGAUX"}   # the flags Y
    assert first.submission_set["content_type"] == "03"           # PV1-2 = I
    assert first.submission_set["source_id"] == "1.2.250.1.999.99.1"
    assert any("801234564895" in v for a in d1.authors for v in a.get("authorPerson", []))
    assert any(d.is_signature for d in first.documents)           # the XAdES signature entry
    assert first.vihf["urn:oasis:names:tc:xacml:2.0:resource:resource-id"][0].startswith(INS)
    (d2,) = docs(second)
    assert d2.content == cda2 and d2.replaces == d1.entry_uuid   # RPLC to the right entry
    assert third.action.endswith("UpdateDocumentSet") or third.status_updates
    assert [u["target"] for u in third.status_updates] == [d2.entry_uuid]

    # ZAM^Z01 for the T02 only (the T10 and T04 did not ask for it)
    (zam,) = creator.wait_for(1)
    segs = {s[:3]: s for s in zam.split(b"\r") if s}
    assert segs[b"MSH"].split(b"|")[8] == b"ZAM^Z01^ZAM_Z01"
    assert segs[b"MSH"].split(b"|")[4:6] == [b"RIS-Y", b"Organisation-Y"]
    obx = segs[b"OBX"].split(b"|")
    assert obx[3].startswith(b"ACK_RECEPTION_DMP") and obx[4] == b"015" and obx[5].startswith(b"Y^")
    time.sleep(0.5)
    assert len(creator.received) == 1
    assert [e["status"] for e in entries(eng)] == ["sent", "sent", "sent"]


def test_oru_and_pacs_report_reach_the_dmp(rig, sim):
    from tests.test_reports_e2e import _qualified_a28

    eng, creator = rig
    acks = send_all(eng, ORU_INIT, _qualified_a28(), PACS_ORU)
    assert all(b"MSA|AA" in a for a in acks), acks
    wait(lambda: len(sim.accepted) == 2, what="ORU and PACS at the DMP")
    by_format = {docs(s)[0].code("formatCode"): docs(s)[0] for s in sim.accepted}
    assert "urn:ihe:iti:xds-sd:pdf:2008" in by_format              # the PACS report's N1
    bio = next(d for f, d in by_format.items() if f != "urn:ihe:iti:xds-sd:pdf:2008")
    assert bio.content == cda_of(ORU_INIT) and bio.patient_id == PATIENT_ID
    (zam,) = creator.wait_for(1)                                   # the ORU asked ACK_RECEPTION=Y
    assert b"ACK_RECEPTION_DMP" in zam and b"|Y^^expandedYes-NoIndicator|" in zam


def test_no_dmp_entry_without_destdmp_or_without_a_qualified_ins(rig, sim):
    eng, _ = rig
    no_dest = set_control_id(set_flag(MDM_T02, "DESTDMP", "N"), "NODEST-1")
    prov = set_control_id(MDM_T02.replace(b"|VALI", b"|PROV", 1), "PROV-1")
    assert b"|PROV" in prov
    acks = send_all(eng, no_dest, prov)
    assert all(b"MSA|AA" in a for a in acks), acks
    time.sleep(1.0)
    assert sim.requests == 0 and entries(eng) == []


def test_soap_fault_with_a_dmp_code_parks_the_entry_and_tells_the_creator(rig, sim):
    eng, creator = rig
    sim.set_behaviour("fault", fault_code="Sender", dmp_code="DMPPatientNotFound",
                      dmp_label="Le patient n'a pas de DMP", count=1)
    send_all(eng, set_flag(MDM_T02, "ACK_RECEPTION", "Y"))
    (zam,) = creator.wait_for(1)
    assert b"|N^^expandedYes-NoIndicator|" in zam
    err = next(s for s in zam.split(b"\r") if s.startswith(b"ERR")).decode("utf-8").split("|")
    assert err[3].startswith("207") and err[5] == "DMPPatientNotFound^Le patient n'a pas de DMP^DMP_ERROR_CODE"
    (e,) = entries(eng)
    assert e["status"] == "error" and e["attempts"] == 1          # a content error is not retried
    assert "DMPPatientNotFound" in e["last_error"] and "DMP" in e["last_error"]
    assert len(sim.accepted) == 0


def test_5xx_is_retried_then_accepted(rig, sim):
    eng, _ = rig
    sim.set_behaviour("http", http_status=503, count=2)
    send_all(eng, MDM_T02)
    wait(lambda: len(sim.accepted) == 1, what="acceptance after two 503")
    (e,) = wait(lambda: [x for x in entries(eng) if x["status"] == "sent"], what="entry sent")
    assert e["attempts"] == 3 and sim.requests == 3


def test_dmp_down_for_a_while_then_messages_go_in_order(rig, sim):
    eng, _ = rig
    call(sim.stop)
    try:
        send_all(eng, MDM_T02, set_control_id(MDM_T10, "T10-2"))
        wait(lambda: any("connection refused" in (e["last_error"] or "") for e in entries(eng)),
             what="a refused connection recorded")
        assert {e["status"] for e in entries(eng)} <= {"queued", "in_flight"}   # waiting, not lost
    finally:
        call(sim.start, sim.port)
    wait(lambda: len(sim.accepted) == 2, what="both after the outage")
    first, second = sim.accepted                                   # the T10's RPLC needs the T02 first
    assert docs(second)[0].replaces == docs(first)[0].entry_uuid


@pytest.mark.parametrize("rig", [{"rogue": True, "max_attempts": 2}], indirect=True)
def test_client_certificate_from_another_ca_is_refused_then_parked(rig, sim):
    eng, _ = rig
    send_all(eng, MDM_T02)
    (e,) = wait(lambda: [x for x in entries(eng) if x["status"] == "error"], what="entry in error")
    assert "TLS handshake failed" in e["last_error"] and "gave up after 2 attempts" in e["last_error"]
    assert len(sim.accepted) == 0


@pytest.mark.parametrize("rig", [{"hold": "3s"}], indirect=True)
def test_deferred_nothing_before_the_hold_and_a_deletion_within_it_cancels(rig, sim):
    eng, _ = rig
    send_all(eng, MDM_T02)
    t0 = time.time()
    send_all(eng, set_control_id(MDM_T04, "T04-HOLD"))
    time.sleep(4.0)
    assert sim.requests == 0                                       # nothing ever left
    assert sorted(e["status"] for e in entries(eng)) == ["cancelled", "cancelled"]
    send_all(eng, set_control_id(MDM_T10, "T10-HOLD"))             # a new chain: waits the hold
    t1 = time.time()
    wait(lambda: sim.requests >= 1, timeout=15, what="the held report")
    assert time.time() - t1 >= 2.5 and t1 - t0 < 30


def test_txa12_copy_differing_from_the_cda_is_warned_and_the_dmp_gets_the_cda_id(rig, sim):
    eng, _ = rig
    cda_id = read_header(cda_of(MDM_T02))["id_str"]
    root, ext = cda_id.rsplit(".", 1)
    altered = MDM_T02.replace(f"|{root}.{ext}^".encode(), f"|{root}.999{ext}^".encode(), 1)
    assert altered != MDM_T02
    (ack,) = send_all(eng, set_control_id(altered, "TXA12-1"))
    assert b"MSA|AA" in ack and b"|W|" in ack                     # accepted with a warning (ERR-4 W)
    wait(lambda: len(sim.accepted) == 1, what="the report at the DMP")
    assert docs(sim.accepted[0])[0].unique_id == cda_id            # the CDA is the document of record
