"""CI-SIS "Transmission de documents CDA-R2 en HL7 v2" v2.1: parse_report on the real corpus and on
variants built by editing the corpus text (flags, INS, consistency, quirks)."""
from __future__ import annotations

import base64
import hashlib
import re
import time

import pytest

from engine.hl7.fields import split_segments
from engine.reports.cisis import mss_matrix_row, parse_report
from engine.reports.submission import FLAG_NAMES, Submission
from tests.conftest import CORPUS

VAGUE2 = CORPUS / "ans-hl7v2" / "Vague 2"
TRANS = VAGUE2 / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1"
HODA = "adam.hoda@test-ci-sis.mssante.fr"
INS_TEST = {"value": "279035121518989", "oid": "1.2.250.1.213.1.4.10"}
PHI = ("279035121518989", "PAT-TROIS", "DOMINIQUE", "19790328")


def _flags(y: str) -> dict[str, bool]:
    """Flags from a compact 'YN..' string in FLAG_NAMES order."""
    return {n: c == "Y" for n, c in zip(FLAG_NAMES, y)}


#                 MASQUE_PS INV_PAT INV_REP CONN_SEC MODIF_CONF DESTDMP DESTPS DESTPAT ACK_REC ACK_LECT
# Expected values per file, from each folder's README (comments quote them); where the message
# itself differs from its README, the message wins and the discrepancy is written down.
CORPUS_TABLE = {
    # MDM/Transmission initiale MDM/README.md: "Le CR est envoyé au DMP ainsi qu'au Dr Adam Hoda via
    # la MSS. Le Cr est masqué au patient et à ses représentants légaux. Aucun accusé ... demandé."
    # "L'expéditeur est le Dr Thomas Eric."
    "MDM/Transmission initiale MDM/message_MDM_CR_Radio_INIT_N1_Base64.er7": dict(
        type="MDM^T02^MDM_T02", action="initial", flags=_flags("NYYYNYYNNN"), mss_ps=[HODA],
        mss_patient=None, reply_to=None, sender=("801234564895", "Eric"),
        doc_ids=["1.2.250.1.71.4.2.2.120456789.71024000081"], parent=None, levels=["N1"],
        errors=[]),
    # same README, "plain" variant: corpus defect - its OBX-5 carries the Base64 of the
    # placeholder text "Document medcial au format CDA niveau 1", not a CDA (906)
    "MDM/Transmission initiale MDM/message_MDM_CR_Radio_INIT_N1.er7": dict(
        type="MDM^T02^MDM_T02", action="initial", flags=_flags("NYYYNYYNNN"), mss_ps=[HODA],
        mss_patient=None, reply_to=None, sender=("801234564895", "Eric"),
        doc_ids=[None], parent=None, levels=[None], errors=["906"]),
    # MDM/Remplacement MDM/README.md: new version (v2), "passé de l'état invisible à l'état visible
    # au patient et à ses représentants légaux ... MODIF_CONF_CODE prend la valeur Y"; "publié vers
    # le DMP et envoyé au Dr Adam Hoda par MSS"; OBX-11 = C; parent = relatedDocument (= TXA-13)
    "MDM/Remplacement MDM/message_MDM_CR_Radio_RPLC_N1.er7": dict(
        type="MDM^T10^MDM_T02", action="replace", flags=_flags("NNNYYYYNNN"), mss_ps=[HODA],
        mss_patient=None, reply_to=None, sender=("801234564895", "Eric"),
        doc_ids=["1.2.250.1.71.4.2.2.120456789.71024000082"],
        parent="1.2.250.1.71.4.2.2.120456789.71024000081", levels=["N1"], errors=[]),
    # MDM/Suppression MDM/README.md: last version of the CR, "publiée vers le DMP et envoyée au
    # Dr Adam Hoda par MSS", OBX-11 = D. (Base64 without final padding: read tolerantly.)
    "MDM/Suppression MDM/message_MDM_CR_Radio_DEL_N1.er7": dict(
        type="MDM^T04^MDM_T02", action="delete", flags=_flags("NNNYNYYNNN"), mss_ps=[HODA],
        mss_patient=None, reply_to=None, sender=("801234564895", "Eric"),
        doc_ids=["1.2.250.1.71.4.2.2.120456789.71024000082"], parent=None, levels=["N1"],
        errors=[]),
    # ORU/Transmission initiale ORU/readme.md: "L'expéditeur est le Dr Thierry Diaz. Les documents
    # sont visibles aux PS, au patient et à ses représentants légaux. Ils sont envoyés au DMP et
    # envoyés par MSS à la patiente et au Dr Adam Hoda. Aucun accusé ... n'est demandé."
    # Discrepancy: the message sets ACK_RECEPTION=Y and ACK_LECTURE_MSS=Y (message wins), and its
    # patient PRT carries a malformed INS (20 digits) -> warning, mailbox kept as sent.
    "ORU/Transmission initiale ORU/message_ORU_CR_Bio_INIT_N3_SEGUR.hl7": dict(
        type="ORU^R01^ORU_R01", action="initial", flags=_flags("NNNNNYYYYY"), mss_ps=[HODA],
        mss_patient="27707279035121518989@patient.mssante.fr", reply_to=HODA,
        sender=("801234567866", "DIAZ"), doc_ids=["1.2.250.1.213.1.1.9"], parent=None,
        levels=["N3"], errors=[]),
    # ORU/Remplacement ORU/README.md: v2 with relatedDocument; "envoyés au DMP et par MSS à la
    # patiente et au Dr Adam Hoda"; "Un segment PRT permet de préciser l'adresse mail [de réponse]";
    # "Aucun accusé ... n'est demandé"; OBX-11 = C.
    "ORU/Remplacement ORU/message_ORU_CR_Bio_RPLC_N3_SEGUR.hl7": dict(
        type="ORU^R01^ORU_R01", action="replace", flags=_flags("NNNNNYYYNN"), mss_ps=[HODA],
        mss_patient="279035121518989@patient.mssante.fr", reply_to=HODA,
        sender=("801234567866", "DIAZ"), doc_ids=["1.2.250.1.213.1.1.13"],
        parent="1.2.250.1.213.1.1.12", levels=["N3"], errors=[]),
    # ORU/Suppression ORU/README.md: "envoyés au DMP et par MSS à la patiente et au Dr Adam Hoda
    # pour suppression. Aucun accusé ... demandé"; OBX-11 = D.
    # Corpus defect: the embedded CDA is another document (id ...12, N1) of ANOTHER patient
    # (recordTarget INS-NIR differs from PID-3) -> 904, exactly what the guide's rule is for.
    "ORU/Suppression ORU/message_ORU_CR_Bio_DEL_N3_SEGUR.hl7": dict(
        type="ORU^R01^ORU_R01", action="delete", flags=_flags("NNNNNYYYNN"), mss_ps=[HODA],
        mss_patient="279035121518989@patient.mssante.fr", reply_to=HODA,
        sender=("801234567866", "DIAZ"), doc_ids=["1.2.250.1.213.1.1.12"], parent=None,
        levels=["N1"], errors=["904"]),
}


def _is_report_message(path) -> bool:
    head = split_segments(path.read_bytes()[:2000])[0]
    mtype = head.split(b"|")[8].split(b"^")[0]
    return mtype in (b"ORU", b"MDM")


ALL_MESSAGES = sorted(p for p in VAGUE2.rglob("*") if p.suffix.lower() in (".er7", ".hl7")
                      and "LPS" not in str(p) and _is_report_message(p))


def test_corpus_table_covers_every_oru_mdm():
    found = {str(p.relative_to(TRANS)) for p in ALL_MESSAGES}
    assert found == set(CORPUS_TABLE)


@pytest.fixture(scope="module")
def parsed() -> dict[str, Submission]:
    return {rel: parse_report((TRANS / rel).read_bytes()) for rel in CORPUS_TABLE}


@pytest.mark.parametrize("rel", sorted(CORPUS_TABLE))
def test_corpus_file(parsed, rel):
    exp = CORPUS_TABLE[rel]
    sub = parsed[rel]
    j = sub.to_inspect_json()
    assert j["message_type"] == exp["type"]
    assert j["control_id"] == "015"
    assert j["action"] == exp["action"]
    assert j["ins"] == INS_TEST
    assert j["flags"] == exp["flags"]
    assert "ACK_LECTURE" not in j["flags"]
    assert j["recipients"] == {"mss_ps": exp["mss_ps"], "mss_patient": exp["mss_patient"],
                               "dmp": True, "drimbox": False, "reply_to": exp["reply_to"]}
    assert (sub.recipients.sender.person.id, sub.recipients.sender.person.family) == exp["sender"]
    # « ASIP-SANTE- PS » (space) read tolerantly: the OID is what counts
    assert sub.recipients.sender.person.id_oid == "1.2.250.1.71.4.2.1"
    assert [d["id"] for d in j["documents"]] == exp["doc_ids"]
    assert [d["level"] for d in j["documents"]] == exp["levels"]
    assert sub.parent_document_id == exp["parent"]
    assert sorted(e["code"] for e in j["errors"]) == exp["errors"]
    assert sub.acks.reception == exp["flags"]["ACK_RECEPTION"]
    assert sub.acks.lecture == exp["flags"]["ACK_LECTURE_MSS"]


def test_corpus_document_bytes_untouched(parsed):
    for rel, sub in parsed.items():
        raw = (TRANS / rel).read_bytes()
        seg = next(s for s in split_segments(raw) if s.startswith(b"OBX|1|"))
        data = seg.split(b"|")[5].split(b"^", 4)[4]
        expected = base64.b64decode(data + b"=" * (-len(data) % 4))
        doc = sub.documents[0]
        assert doc.raw_bytes() == expected
        assert doc.sha256 == hashlib.sha256(expected).hexdigest() and doc.size == len(expected)


def test_corpus_mail_body(parsed):
    sub = parsed["MDM/Transmission initiale MDM/message_MDM_CR_Radio_INIT_N1_Base64.er7"]
    assert sub.mail_bodies["CORPSMAIL_PS"].startswith("Cher confrère, vous trouverez ci-joint")
    # ORU corpus: Base64 cut one character short -> readable text + warning, no error
    oru = parsed["ORU/Transmission initiale ORU/message_ORU_CR_Bio_INIT_N3_SEGUR.hl7"]
    assert oru.mail_bodies["CORPSMAIL_PS"].startswith("Cher confrère")
    assert any("truncated Base64" in w.text for w in oru.warnings)


def test_corpus_header_fields_reach_submission(parsed):
    sub = parsed["MDM/Remplacement MDM/message_MDM_CR_Radio_RPLC_N1.er7"]
    d = sub.documents[0]
    assert d.type_code == "18748-4" and d.version_number == 2
    assert d.replaces == "1.2.250.1.71.4.2.2.120456789.71024000081"
    assert d.record_target_ins.model_dump() == INS_TEST
    assert d.author and d.author.id_oid == "1.2.250.1.71.4.2.1"
    assert d.confidentiality_code == "N"


def test_lps_profile_read_with_its_own_rules():
    """MSH-21 1.1^CISIS_CDA_HL7_LPS is read with the LPS guide's rules (tests/test_reports_lps.py);
    the v2.1 profile keeps its own: a v2.1 message whose MSH-21 names neither profile is 906."""
    lps = next(p for p in VAGUE2.rglob("*_Base64.er7") if "LPS" in str(p))
    sub = parse_report(lps.read_bytes())
    assert sub.profile == "1.1^CISIS_CDA_HL7_LPS" and sub.errors == []
    other = parse_report(BASE.replace("2.1^CISIS_CDA_HL7_V2", "1.1^CISIS_CDA_HL7_XYZ").encode())
    assert any(e.location == "MSH-21" and e.code == "906" for e in other.errors)
    # naming the LPS profile next to the v2.1 one does not relax the v2.1 rules (DESTDMP etc.)
    both = BASE.replace("2.1^CISIS_CDA_HL7_V2", "2.1^CISIS_CDA_HL7_V2~1.1^CISIS_CDA_HL7_LPS")
    both = re.sub(r"OBX\|\d+\|CWE\|DESTDMP\^[^\n]*\n", "", both)
    sub = parse_report(both.encode())
    assert sub.profile == "2.1^CISIS_CDA_HL7_V2"
    assert any("DESTDMP missing" in e.text for e in sub.errors)


# ------------------------------------------------------------------------------- variants
BASE = (TRANS / "MDM/Transmission initiale MDM/message_MDM_CR_Radio_INIT_N1_Base64.er7").read_text(
    encoding="utf-8")
ORU = (TRANS / "ORU/Remplacement ORU/message_ORU_CR_Bio_RPLC_N3_SEGUR.hl7").read_text(
    encoding="utf-8")


def set_flag(text: str, name: str, value: str) -> str:
    new, n = re.subn(rf"(OBX\|\d+\|C[EW]+\|{name}\^[^|]*\|\|)[YN]", rf"\g<1>{value}", text)
    assert n == 1, name
    return new


def codes(sub: Submission) -> list[str]:
    return sorted(e.code for e in sub.errors)


def _no_phi(sub: Submission):
    for issue in sub.errors + sub.warnings:
        for p in PHI:
            assert p not in issue.text


def test_variant_clean_base_has_no_error():
    sub = parse_report(BASE.encode())
    assert sub.errors == []


def test_masque_ps_with_mss_ps_is_906():
    sub = parse_report(set_flag(BASE, "MASQUE_PS", "Y").encode())
    assert codes(sub) == ["906"] and "MASQUE_PS=Y forbids DESTMSSANTEPS=Y" in sub.errors[0].text
    _no_phi(sub)


def test_invisible_patient_with_patient_mailbox_is_906():
    text = set_flag(ORU, "INVISIBLE_PATIENT", "Y")
    sub = parse_report(text.encode())
    assert codes(sub) == ["906"]
    assert "INVISIBLE_PATIENT=Y forbids DESTMSSANTEPAT=Y" in sub.errors[0].text
    _no_phi(sub)


def test_patient_flag_without_patient_prt_is_906():
    text = set_flag(BASE, "INVISIBLE_PATIENT", "N")
    text = set_flag(text, "INVISIBLE_REP_LEGAUX", "N")
    text = set_flag(text, "DESTMSSANTEPAT", "Y")
    sub = parse_report(text.encode())
    assert codes(sub) == ["906"] and "no PRT RCT patient mailbox" in sub.errors[0].text


def test_ps_flag_without_rct_is_906():
    text = "\n".join(s for s in BASE.split("\n") if not s.startswith("PRT||UC||RCT"))
    sub = parse_report(text.encode())
    assert codes(sub) == ["906"] and "no PRT RCT professional address" in sub.errors[0].text


def test_dmp_without_sender_is_906():
    text = "\n".join(s for s in BASE.split("\n") if not s.startswith("PRT||UC||SB"))
    sub = parse_report(text.encode())
    assert codes(sub) == ["906"] and "PRT SB" in sub.errors[0].text


def test_matrix_rows():
    assert mss_matrix_row(_flags("NNNYYYYYNN")) == 1
    assert mss_matrix_row(_flags("NYNYYYYNNN")) == 2
    assert mss_matrix_row(_flags("YNYNYNNYNN")) == 3
    assert mss_matrix_row(_flags("NNNYYYYNNN")) is None  # the official MDM replacement example


def test_patient_only_with_dmp_unlisted_warning_then_strict_error():
    # matrix row 3 (patient only) requires DESTDMP=N and CONNEXION_SECRETE=N
    text = set_flag(ORU, "DESTMSSANTEPS", "N")
    text = set_flag(text, "DESTDMP", "Y")
    lenient = parse_report(text.encode())
    assert lenient.errors == []
    assert any("not listed in the MSSanté management matrix" in w.text for w in lenient.warnings)
    assert lenient.recipients.mss_ps == []  # DESTMSSANTEPS=N: the RCT PS address is not used
    strict = parse_report(text.encode(), strict_mss_matrix=True)
    assert codes(strict) == ["906"]
    assert codes(parse_report(set_flag(text, "DESTDMP", "N").encode(), strict_mss_matrix=True)) == []


def test_strict_matrix_flags_official_mdm_example():
    assert codes(parse_report(BASE.encode(), strict_mss_matrix=True)) == ["906"]


def test_missing_required_flag_and_bad_value():
    text = "\n".join(s for s in BASE.split("\n") if "|CONNEXION_SECRETE^" not in s)
    sub = parse_report(text.encode())
    assert codes(sub) == ["906"] and "CONNEXION_SECRETE missing" in sub.errors[0].text
    bad = re.sub(r"(DESTDMP\^[^|]*\|\|)Y", r"\1X", BASE)
    sub = parse_report(bad.encode())
    assert codes(sub) == ["906"] and "DESTDMP: OBX-5 must be Y or N" in sub.errors[0].text


def test_ack_lecture_quirk_normalised():
    text = set_flag(BASE, "ACK_LECTURE_MSS", "Y").replace("|ACK_LECTURE_MSS^", "|ACK_LECTURE^")
    sub = parse_report(text.encode())
    j = sub.to_inspect_json()
    assert j["flags"]["ACK_LECTURE_MSS"] is True and "ACK_LECTURE" not in j["flags"]
    assert sub.acks.lecture is True and sub.errors == []


def test_optional_ack_flags_absent_are_false():
    text = "\n".join(s for s in BASE.split("\n") if "|ACK_" not in s)
    sub = parse_report(text.encode())
    assert sub.errors == [] and sub.flags["ACK_RECEPTION"] is False


def test_orc_obx11_inconsistent():
    text = BASE.replace("ORC|NW|", "ORC|RO|")
    sub = parse_report(text.encode())
    assert codes(sub) == ["906"] and "inconsistent request" in sub.errors[0].text
    # OBX-11 C on the document but ORC NW and T02
    lines = BASE.split("\n")
    lines = [re.sub(r"\|\|\|\|\|\|F\|$", "||||||C|", s) if s.startswith("OBX|1|ED") else s
             for s in lines]
    sub = parse_report("\n".join(lines).encode())
    assert "906" in codes(sub) and any("OBX-1-11=replace" in e.text for e in sub.errors)


def test_event_inconsistent_with_orc():
    text = BASE.replace("MDM^T02^MDM_T02", "MDM^T04^MDM_T02")
    sub = parse_report(text.encode())
    assert codes(sub) == ["906"] and "MSH-9.2=delete" in sub.errors[0].text


def test_unsupported_version_and_profile():
    sub = parse_report(BASE.replace("|P|2.6|", "|P|2.5|").encode())
    assert codes(sub) == ["906"] and sub.errors[0].hl7_code == "203"
    sub = parse_report(BASE.replace("2.1^CISIS_CDA_HL7_V2", "").encode())
    assert codes(sub) == ["906"] and sub.errors[0].location == "MSH-21"


def test_ins_mismatch_pid_vs_cda_is_904():
    text = BASE.replace("PID|||279035121518989^", "PID|||180035121518989^", 1)
    sub = parse_report(text.encode())
    assert codes(sub) == ["904"]
    _no_phi(sub)


def test_ins_oid_mismatch_is_904():
    text = BASE.replace("ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO",
                        "ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO", 1)
    assert codes(parse_report(text.encode())) == ["904"]


def _edit_cda(text: str, edit) -> str:
    lines = text.split("\n")
    for i, s in enumerate(lines):
        if s.startswith("OBX|1|ED"):
            f = s.split("|")
            c = f[5].split("^", 4)
            cda = base64.b64decode(c[4]).decode("utf-8")
            c[4] = base64.b64encode(edit(cda).encode("utf-8")).decode("ascii")
            f[5] = "^".join(c)
            lines[i] = "|".join(f)
    return "\n".join(lines)


def test_ins_absent_from_cda_is_903():
    text = _edit_cda(BASE, lambda x: x.replace('root="1.2.250.1.213.1.4.10"', 'root="1.2.3.4"'))
    assert codes(parse_report(text.encode())) == ["903"]


def test_ins_traits_incomplete_is_905():
    text = _edit_cda(BASE, lambda x: re.sub(r"<birthTime[^>]*>(</birthTime>)?", "", x, count=1))
    sub = parse_report(text.encode())
    assert codes(sub) == ["905"] and "birth_date" in sub.errors[0].text


def test_traits_differ_is_904():
    text = BASE.replace("||19790328|F|", "||19790328|M|", 1)
    sub = parse_report(text.encode())
    assert codes(sub) == ["904"] and "sex" in sub.errors[0].text


def test_replacement_without_txa13_is_900():
    rplc = (TRANS / "MDM/Remplacement MDM/message_MDM_CR_Radio_RPLC_N1.er7").read_text("utf-8")
    text = rplc.replace("|1.2.250.1.71.4.2.2.120456789.71024000081^Organisation-Y|", "||", 1)
    sub = parse_report(text.encode())
    assert codes(sub) == ["900"] and "TXA-13" in sub.errors[0].text


def test_txa12_mismatch_is_a_906_warning_by_default_and_an_error_when_rejected():
    """TXA-12 is a copy of ClinicalDocument/id: the CDA is the document of record."""
    text = BASE.replace("|1.2.250.1.71.4.2.2.120456789.71024000081^Organisation-Y|",
                        "|1.2.250.1.71.4.2.2.120456789.99^Organisation-Y|", 1)
    sub = parse_report(text.encode())
    assert codes(sub) == []
    assert [(w.rule, w.code) for w in sub.warnings if "TXA-12" in w.text] == [("cisis.copy.document-id", "906")]
    assert sub.documents[0].id == parse_report(BASE.encode()).documents[0].id  # the CDA's id
    strict = parse_report(text.encode(), rules={"cisis.copy.document-id": "reject"})
    assert codes(strict) == ["906"] and strict.errors[0].rule == "cisis.copy.document-id"
    off = parse_report(text.encode(), rules={"cisis.copy.document-id": "off"})
    assert not any("TXA-12" in i.text for i in off.errors + off.warnings)


@pytest.mark.parametrize("sep", ["\r", "\r\n", "\n"])
def test_segment_separators(sep):
    sub = parse_report(BASE.replace("\n", sep).encode())
    ref = parse_report(BASE.encode())
    assert sub.errors == [] and sub.to_inspect_json() == ref.to_inspect_json()


def test_plain_text_ed_form_gives_same_bytes():
    ref = parse_report(BASE.encode())
    cda = ref.documents[0].raw_bytes()
    # HL7 escape of the XML (v2.5 §2.7), carriage returns as \X0D\ / \X0A\
    esc = (cda.replace(b"\\", b"\\E\\").replace(b"|", b"\\F\\").replace(b"^", b"\\S\\")
           .replace(b"&", b"\\T\\").replace(b"~", b"\\R\\").replace(b"\r", b"\\X0D\\")
           .replace(b"\n", b"\\X0A\\"))
    lines = BASE.encode().split(b"\n")
    for i, s in enumerate(lines):
        if s.startswith(b"OBX|1|ED"):
            f = s.split(b"|")
            f[5] = b"^text^XML^A^" + esc
            lines[i] = b"|".join(f)
    sub = parse_report(b"\n".join(lines))
    assert sub.errors == []
    assert sub.documents[0].sha256 == ref.documents[0].sha256


def test_two_documents_in_one_oru():
    lines = ORU.split("\n")
    i = next(k for k, s in enumerate(lines) if s.startswith("OBX|1|ED"))
    lines.insert(i + 1, lines[i].replace("OBX|1|", "OBX|2|", 1))
    sub = parse_report("\n".join(lines).encode())
    assert len(sub.documents) == 2 and sub.errors == []
    assert sub.documents[0].sha256 == sub.documents[1].sha256


def test_garbage_base64_is_906():
    text = _edit_cda(BASE, lambda x: x)  # sanity
    text = re.sub(r"(OBX\|1\|ED\|[^|]*\|\|\^text\^XML\^Base64\^)", r"\1@@@", text)
    sub = parse_report(text.encode())
    assert "906" in codes(sub)


def test_not_hl7_raises():
    with pytest.raises(ValueError):
        parse_report(b"hello")


def test_inspect_json_keys_and_pid32():
    sub = parse_report(BASE.replace("|N|VALI", "|N|PROV").encode())
    j = sub.to_inspect_json()
    assert set(j) >= {"message_type", "control_id", "action", "ins", "flags", "recipients",
                      "documents", "errors"}
    assert set(j["documents"][0]) >= {"id", "type_code", "level", "sha256"}
    assert all(isinstance(v, bool) for v in j["flags"].values())
    assert any("PID-32" in w.text for w in sub.warnings)
    summary = sub.technical_summary()
    assert not any(p in repr(summary) for p in PHI)


def test_benchmark_parse_200kb(capsys):
    raw = (TRANS / "ORU/Transmission initiale ORU/message_ORU_CR_Bio_INIT_N3_SEGUR.hl7").read_bytes()
    n, t0 = 30, time.perf_counter()
    for _ in range(n):
        parse_report(raw)
    dt = (time.perf_counter() - t0) / n
    with capsys.disabled():
        print(f"\n[bench] parse_report ORU {len(raw) // 1024} KB message "
              f"({len(parse_report(raw).documents[0].raw_bytes()) // 1024} KB CDA): "
              f"{dt * 1000:.1f} ms/msg, {1 / dt:.0f} msg/s")
    assert dt < 0.5


def test_plain_text_mail_body_uses_the_one_unescape():
    """A CORPSMAIL body sent as escaped text (not Base64) is read with engine.hl7.escape.unescape:
    \\.br\\ is one line feed, \\Xhh\\ is decoded with the message codec, unknown escapes are kept."""
    lines = BASE.split("\n")
    i = next(k for k, s in enumerate(lines) if "CORPSMAIL_PS" in s)
    f = lines[i].split("|")
    f[2], f[5] = "TX", "Cher confr\\XC3A8\\re,\\.br\\ci-joint \\H\\le CR\\N\\ \\Zlocal\\ A\\T\\B"
    lines[i] = "|".join(f)
    sub = parse_report("\n".join(lines).encode())
    assert sub.mail_bodies["CORPSMAIL_PS"] == "Cher confr\u00e8re,\nci-joint le CR \\Zlocal\\ A&B"


def test_bytes_invalid_in_the_codec_read_as_replacement_characters():
    raw = BASE.encode().replace(b"PAT-TROIS", b"PAT-TR\xffIS", 1)
    sub = parse_report(raw)
    assert sub.patient.birth_name == "PAT-TR\ufffdIS"
    assert sub.documents[0].sha256 == parse_report(BASE.encode()).documents[0].sha256
