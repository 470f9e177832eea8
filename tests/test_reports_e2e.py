"""Report channels end to end (issue 4): real engine, real MLLP, the ANS corpus and a PACS report.

* every CI-SIS ORU/MDM of the Vague 2 corpus is answered as its content deserves, stored with its
  canonical submission, and relayed to the destination byte for byte;
* invalid flag combinations and INS mismatches get AE with the guide's code in ERR-5;
* a PACS PDF report is wrapped into a CDA R2 N1 that validates against the CDA XSD and the
  CI-SIS structurationMinimale schematron, stored as the canonical submission and sent on as a
  CI-SIS ORU^R01.
"""
from __future__ import annotations

import base64
import json
import time

import pytest

from engine.reports.cisis import parse_report
from mllp.blocking import BlockingMLLPClient
from tests.conftest import CORPUS, ROOT
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver

TRANS = CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1"
REPORT_FILES = sorted(p for p in TRANS.rglob("*") if p.suffix in (".er7", ".hl7") and p.name != "ack.er7")
PACS_ORU = ROOT / "tests" / "data" / "pacs" / "oru_pdf.hl7"

# Known defects of the corpus files (see tests/test_reports_cisis.py for the per-file table):
# the "plain" MDM carries Base64 of a placeholder sentence, not a CDA; the ORU deletion's CDA is
# another patient's. Everything else is accepted.
EXPECTED_NAK = {"message_MDM_CR_Radio_INIT_N1.er7": "906", "message_ORU_CR_Bio_DEL_N3_SEGUR.hl7": "904"}


#: the PACS report block of a channel (the cda_wrap parameters of the test organisation)
PACS_REPORTS = """\
            pacs_reports:
              enabled: true
              sending_applications: [PACS-X]
              cda_wrap:
                organization: {id: "000897406", name: "Centre d'imagerie de test"}
                document_root_oid: "1.2.250.1.999.99.10"
                accession_root_oid: "1.2.250.1.999.99.4"
                accepted_identity_statuses: [QUAL, VALI]
"""


def config(port, status_port, reports_port):
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
          duplicates: {{on_conflict: accept}}   # the corpus reuses MSH-10 015 across files
        channels:
          mllp-in:
            type: mllp
            port: {port}
            identity_feed: {{enabled: true}}
            reports: {{enabled: true, validation: {{xsd: true, schematron: false, on_failure: warn}}}}
{PACS_REPORTS}              validation: {{xsd: true, schematron: false, on_failure: reject}}
        routes:
          - name: pacs
            from: mllp-in
            filter: {{message_types: ["ORU^R01"], sending_applications: [PACS-X]}}
            transforms: [{{type: wrapped_report}}]
            to: [reports]
          - name: reports
            from: mllp-in
            filter: {{message_types: ["ORU^R01", "MDM^*"]}}
            to: [reports]
        destinations:
          reports:
            type: mllp
            host: 127.0.0.1
            port: {reports_port}
            ack_timeout: 5s
    """


def ack_fields(ack: bytes) -> tuple[str, list[list[str]]]:
    segs = ack.split(b"\r")
    msa = next(s for s in segs if s.startswith(b"MSA")).decode().split("|")
    errs = [s.decode("utf-8").split("|") for s in segs if s.startswith(b"ERR")]
    return msa[1], errs


@pytest.fixture
def rig(tmp_path):
    receiver = Receiver()
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, receiver.port), status_port=status_port)
    eng.port = port
    eng.start()
    yield eng, receiver
    rc = eng.stop()
    receiver.close()
    assert rc == 0, eng.log_tail()
    for canary in ("PAT-TROIS", "279035121518989", "19790328"):
        assert canary not in eng.log_text(), f"patient data {canary!r} leaked into the logs"


def show(eng, mid) -> dict:
    return json.loads(eng.cli("messages", "show", str(mid), "--json").stdout)


def test_corpus_reports_are_checked_stored_and_relayed_unchanged(rig):
    eng, receiver = rig
    assert len(REPORT_FILES) == 7
    sent_ok = []
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=30) as c:
        for path in REPORT_FILES:
            raw = path.read_bytes()
            code, errs = ack_fields(c.send(raw))
            if path.name in EXPECTED_NAK:
                assert code == "AE", path.name
                assert errs[0][3].startswith("207") and errs[0][5].startswith(EXPECTED_NAK[path.name]), errs
            else:
                assert code == "AA", (path.name, errs)
                sent_ok.append(raw)
    received = receiver.wait_for(len(sent_ok), timeout=30)
    assert sorted(received) == sorted(sent_ok)  # relayed byte for byte, rejected ones not routed
    rows = sorted(eng.messages(), key=lambda r: r["id"])
    assert len(rows) == len(REPORT_FILES)
    for path, row in zip(REPORT_FILES, rows):
        stored = show(eng, row["id"])
        assert stored["raw"].encode("latin-1") == path.read_bytes()
        sub = stored["submission"]
        assert sub["kind"] == "cisis"
        expected = parse_report(path.read_bytes(), "utf-8")
        assert sub["submission"]["action"] == expected.action
        assert [d["id"] for d in sub["submission"]["documents"]] == [d.id for d in expected.documents]
        assert sub["submission"]["flags"] == expected.flags
        if path.name not in EXPECTED_NAK:
            assert all(d["valid"] for d in sub["validation"]["documents"]), sub["validation"]


def _variant(old: bytes, new: bytes, cid: bytes) -> bytes:
    src = (TRANS / "MDM" / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1_Base64.er7").read_bytes()
    assert old in src
    return src.replace(old, new, 1).replace(b"|MDM^T02^MDM_T02|015|", b"|MDM^T02^MDM_T02|" + cid + b"|", 1)


def test_invalid_flag_combination_and_ins_mismatch_get_the_guide_codes(rig):
    eng, receiver = rig
    masked_to_ps = _variant(b"MASQUE_PS^Masqu\xc3\xa9 aux professionnels de Sant\xc3\xa9^MetaDMPMSS||N^",
                            b"MASQUE_PS^Masqu\xc3\xa9 aux professionnels de Sant\xc3\xa9^MetaDMPMSS||Y^", b"V1")
    other_ins = _variant(b"PID|||279035121518989^", b"PID|||180036512345671^", b"V2")
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=30) as c:
        code, errs = ack_fields(c.send(masked_to_ps))
        assert code == "AE" and any(e[5].startswith("906") and "MASQUE_PS" in e[8] for e in errs), errs
        code, errs = ack_fields(c.send(other_ins))
        assert code == "AE" and any(e[5].startswith("904") for e in errs), errs
    statuses = {r["control_id"]: r["status"] for r in eng.messages()}
    assert statuses == {"V1": "rejected", "V2": "rejected"}  # stored, not routed
    assert receiver.received == []


def _qualified_a28() -> bytes:
    """The ANS test patient under the PACS's IPP, as the identity feed would have it."""
    pid = [""] * 33
    pid[0], pid[1] = "PID", "1"
    pid[3] = ("1234567890121^^^CENTRE-IMG&1.2.250.1.999.99.1&ISO^PI~"
              "279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS")
    pid[5], pid[7], pid[8] = "PAT-TROIS^DOMINIQUE^DOMINIQUE^^^^L", "19790328", "F"
    pid[11], pid[32] = "^^^^^^BDL^^63220", "VALI"
    return ("MSH|^~\\&|GAM|CENTRE-IMG|DPI|CENTRE-IMG|20240115100000||ADT^A28^ADT_A05|A28-1|P|2.5^FRA^2.11"
            "|||||FRA|UNICODE UTF-8|FR||2.11^IHE_FRANCE-2.11-PAM\rEVN||20240115100000\r"
            + "|".join(pid) + "\rPV1|1|N\r").encode()


def test_pacs_pdf_report_becomes_a_valid_n1_submission(rig, tmp_path):
    eng, receiver = rig
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=30) as c:
        code, errs = ack_fields(c.send(PACS_ORU.read_bytes().replace(b"PACS0001", b"P-NOID", 1)))
        assert code == "AE" and errs[0][5].startswith("902"), errs  # patient unknown to the registry
        assert ack_fields(c.send(_qualified_a28()))[0] == "AA"
        code, errs = ack_fields(c.send(PACS_ORU.read_bytes()))
        assert code == "AA", errs
    out = receiver.wait_for(1, timeout=30)[0]
    assert b"2.1^CISIS_CDA_HL7_V2" in out.split(b"\r", 1)[0]
    row = next(r for r in eng.messages() if r["control_id"] == "PACS0001")
    sub = show(eng, row["id"])["submission"]
    assert sub["kind"] == "pacs" and sub["errors"] == 0
    assert sub["wrapped"].encode("utf-8") == out  # what was sent is the stored wrapped message
    docs = sub["submission"]["documents"]
    assert len(docs) == 1 and docs[0]["level"] == "N1" and docs[0]["type_code"] == "18748-4"
    assert sub["submission"]["ins"] == {"value": "279035121518989", "oid": "1.2.250.1.213.1.4.10"}
    cda = base64.b64decode(docs[0]["raw_bytes_b64"])
    pdf_in = (ROOT / "tests" / "data" / "pacs" / "minimal.pdf").read_bytes()
    assert base64.b64encode(pdf_in) in cda.replace(b"\n", b"").replace(b" ", b"")  # the PDF untouched
    from engine.cda.validation import CdaValidator

    report = CdaValidator(cache_dir=tmp_path / "cda-cache").validate(cda, schematron=True)
    assert report.valid, (report.xsd_errors, report.schematron_failures[:5])


def test_schematron_in_warn_mode_runs_after_the_ack_and_is_attached(tmp_path):
    """on_failure: warn -> the ACK does not wait for the schematrons; the report lands later."""
    receiver = Receiver()
    port, status_port = free_port(), free_port()
    cfg = config(port, status_port, receiver.port).replace(
        "validation: {xsd: true, schematron: false, on_failure: warn}",
        "validation: {xsd: true, schematron: true, on_failure: warn}")
    eng = EngineProcess(tmp_path, cfg, status_port=status_port).start()
    try:
        path = TRANS / "MDM" / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1_Base64.er7"
        t0 = time.time()
        with BlockingMLLPClient("127.0.0.1", port, timeout=60) as c:
            code, errs = ack_fields(c.send(path.read_bytes()))
        ack_delay = time.time() - t0
        assert code == "AA", errs
        row = eng.messages()[0]
        deadline = time.time() + 120
        while time.time() < deadline:
            val = show(eng, row["id"])["submission"]["validation"]
            if val and val.get("schematron") == "done":
                break
            time.sleep(0.5)
        assert val["schematron"] == "done", val
        assert len(val["documents"]) == 1 and "schematron_failures" in val["documents"][0]
        # the generated stylesheets are cached in the engine's data directory
        assert sorted(p.name.split("-")[0] for p in (eng.data_dir / "cache" / "cda").glob("*.xsl")) == \
            ["IHE", "structurationMinimale"]
        assert ack_delay < 5.0  # the schematron compilation (about 12 s) is not on the ACK path
    finally:
        assert eng.stop() == 0
        receiver.close()


def test_cli_inspect_and_cda_validate(tmp_path):
    eng = EngineProcess(tmp_path, "engine: {}\n")
    path = TRANS / "MDM" / "Remplacement MDM" / "message_MDM_CR_Radio_RPLC_N1.er7"
    doc = json.loads(eng.cli("inspect", str(path), "--json").stdout)
    for key in ("message_type", "control_id", "action", "ins", "flags", "recipients", "documents", "errors"):
        assert key in doc
    assert doc["action"] == "replace" and doc["ins"]["oid"] == "1.2.250.1.213.1.4.10"
    assert doc["recipients"]["dmp"] is True and isinstance(doc["recipients"]["mss_ps"], list)
    assert set(doc["documents"][0]) >= {"id", "type_code", "level", "sha256"}
    assert "ACK_LECTURE_MSS" in doc["flags"] and "ACK_LECTURE" not in doc["flags"]
    good = CORPUS / "cda" / "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml"
    r = eng.cli("cda", "validate", str(good), "--json", "--xsd-only")
    assert json.loads(r.stdout)["valid"] is True
    broken = tmp_path / "broken.xml"
    broken.write_bytes(good.read_bytes().replace(b"<recordTarget", b"<recordTargetX", 1)
                       .replace(b"</recordTarget>", b"</recordTargetX>", 1))
    r = eng.cli("cda", "validate", str(broken), "--xsd-only", check=False)
    assert r.returncode == 1 and "INVALID" in r.stdout and "XSD line" in r.stdout
