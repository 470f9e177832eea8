"""CI-SIS « Transmission au LPS d'un document CDA provenant d'un courriel MSSanté » (MSH-21
``1.1^CISIS_CDA_HL7_LPS``, guide shared/specs/ig/lps-cda-mssante/profils-messages.md): parse_report
on the Vague 2 corpus folder Trans_LPS_CDA_MSSanté and on variants built by editing its text."""
from __future__ import annotations

import base64
import hashlib
import re

import pytest

from engine.hl7.fields import split_segments
from engine.reports.cisis import parse_report
from engine.reports.submission import Submission
from tests.conftest import CORPUS

LPS = (CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_LPS_CDA_MSSanté"
       / "TRANSMISSION_LPS_DOC_CDA_COURRIEL_FROM_MSSANTE_V1.1")
INS_TEST = {"value": "279035121518989", "oid": "1.2.250.1.213.1.4.10"}
PHI = ("279035121518989", "PAT-TROIS", "DOMINIQUE", "19790328")
V1 = "1.2.250.1.71.4.2.2.120456789.71024000081"
V2 = "1.2.250.1.71.4.2.2.120456789.71024000082"
# Readme.md of the folder: « Après réception d'un courriel par le GESTIONNAIRE de documents (la
# PFI), celui-ci retransmet au(x) destinataire(s) le document reçu au moyen du message HL7v2.6 MDM »
# Transmission initiale MDM/README.md: « l'expéditeur est le Dr Thomas Eric. Le CR est transmis au
# DPI de l'hôpitalA » -> PRT SB (RPPS 801234564895, PRT-5.2 Eric, PRT-5.3 Thomas), PRT RCT the DPI
# mailbox of the hospital, organisation « Service d'urologie » (UF 3435), PRT REPLY.
SENDER = ("801234564895", "Eric", "Thomas", "thomas.eric@medecin.mssante.fr")
RCT = "dpi@hopitalA.mssante.fr"
REPLY = "adam.hoda@test-ci-sis.mssante.fr"


def _flags(y: str) -> dict[str, bool]:
    names = ("MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REP_LEGAUX", "MODIF_CONF_CODE")
    return {n: c == "Y" for n, c in zip(names, y)}


#             MASQUE_PS INVISIBLE_PATIENT INVISIBLE_REP_LEGAUX MODIF_CONF_CODE
CORPUS_TABLE = {
    # Transmission initiale MDM/README.md: « transmission initiale d'un CR d'imagerie médicale issu
    # d'un courriel reçu par la PFI ... Le Cr est masqué au patient et à ses représentants
    # légaux »; the _Base64 file « identique au précédent mais contenant le document en Base64 ».
    "Transmission initiale MDM/message_MDM__LPS_MSS_CR_Radio_INIT_N1_Base64.er7": dict(
        type="MDM^T02^MDM_T02", action="initial", flags=_flags("NYYN"), doc_ids=[V1],
        txa12=V1, parent=None, levels=["N1"], org="Service d'urolgie",  # sic, in the message
        subject="XDM/1.0/DDM+CR d’examens radiologiques PAT-TROIS DOMINIQUE 07/08/2010",
        errors=[]),
    # same README, "plain" file: corpus defect (as in the v2.1 folder) - its OBX-5 carries the
    # Base64 of the placeholder text « Document medcial au format CDA niveau 1 », not the CDA
    # the README announces -> 906; the document id is then only known from TXA-12.
    "Transmission initiale MDM/message_MDM__LPS_MSS_CR_Radio_INIT_N1.er7": dict(
        type="MDM^T02^MDM_T02", action="initial", flags=_flags("NYYN"), doc_ids=[None],
        txa12=V1, parent=None, levels=[None], org="Service d'urologie",
        subject="XDM/1.0/DDM+CR d’examens de radiologie PAT-TROIS DOMINIQUE 07/08/2010",
        errors=["906"]),
    # Remplacement MDM/README.md: « nouvelle version du CR (version 2) ... le CR est passé de l'état
    # invisible à l'état visible au patient et à ses représentants légaux. En conséquence, la
    # métadonnée MODIF_CONF_CODE prend la valeur "Y" »; « indiquée par la valeur de l'OBX-11 ("C")
    # et par la valeur de l'ORC-1 ("RO") »; parent = TXA-13 = CDA relatedDocument RPLC (v1).
    "Remplacement MDM/message_MDM__LPS_MSS_CR_Radio_RPLC_N1.er7": dict(
        type="MDM^T10^MDM_T02", action="replace", flags=_flags("NNNY"), doc_ids=[V2], txa12=V2,
        parent=V1, levels=["N1"], org="Service d'urologie",
        subject="XDM/1.0/DDM+CR d’examens radiologie PAT-TROIS DOMINIQUE 07/08/2010",
        errors=[]),
    # Suppression MDM/README.md: « Le message MDM contient la dernière version du CR à supprimer »
    # (v2); « indiquée par la valeur de l'OBX-11 ("D") et par la valeur de l'ORC-1 qui prend la
    # valeur CA ». Flags as in the message (visible: the state after the replacement).
    "Suppression MDM/message_MDM__LPS_MSS_CR_Radio_DEL_N1.er7": dict(
        type="MDM^T04^MDM_T02", action="delete", flags=_flags("NNNN"), doc_ids=[V2], txa12=V2,
        parent=None, levels=["N1"], org="Service d'urologie",
        subject="XDM/1.0/DDM+CR d’examens de radiologie PAT-TROIS DOMINIQUE 07/08/2010",
        errors=[]),
}

ALL_MESSAGES = sorted(p for p in LPS.rglob("*.er7")
                      if split_segments(p.read_bytes()[:2000])[0].split(b"|")[8].startswith(b"MDM"))


def test_corpus_table_covers_every_mdm():
    assert {str(p.relative_to(LPS)) for p in ALL_MESSAGES} == set(CORPUS_TABLE)


@pytest.fixture(scope="module")
def parsed() -> dict[str, Submission]:
    return {rel: parse_report((LPS / rel).read_bytes()) for rel in CORPUS_TABLE}


def _txa12(rel: str) -> str:
    txa = next(s for s in split_segments((LPS / rel).read_bytes()) if s.startswith(b"TXA|"))
    return txa.split(b"|")[12].split(b"^")[0].decode()


@pytest.mark.parametrize("rel", sorted(CORPUS_TABLE))
def test_corpus_file(parsed, rel):
    exp = CORPUS_TABLE[rel]
    sub = parsed[rel]
    assert sub.message_type == exp["type"] and sub.control_id == "015" and sub.version == "2.6"
    assert sub.profile == "1.1^CISIS_CDA_HL7_LPS"
    assert sub.action == exp["action"]
    assert sub.ins.model_dump() == INS_TEST
    assert sub.flags == exp["flags"]
    assert [d.id for d in sub.documents] == exp["doc_ids"]
    assert _txa12(rel) == exp["txa12"]
    assert [d.level for d in sub.documents] == exp["levels"]
    assert sub.parent_document_id == exp["parent"]
    s = sub.recipients.sender
    assert (s.person.id, s.person.family, s.person.given, s.address) == SENDER
    assert s.person.id_oid == "1.2.250.1.71.4.2.1"  # « ASIP-SANTE- PS » read tolerantly
    r = sub.recipients
    assert r.mss_ps == [RCT] and r.mss_patient is None and r.reply_to == REPLY
    assert not r.dmp and not r.drimbox
    assert [(p.address, p.organization_name, p.organization_id, p.organization_id_type)
            for p in r.rct] == [(RCT, exp["org"], "3435", "UF")]
    assert sub.mail.message_id == "1" and sub.mail.subject == exp["subject"]
    assert sub.mail.content == "Corps du courriel"
    assert sorted(e.code for e in sub.errors) == exp["errors"]
    assert not sub.acks.reception and not sub.acks.lecture
    for i in sub.errors + sub.warnings:
        assert all(p not in i.text for p in PHI)


def test_corpus_document_bytes_untouched(parsed):
    for rel, sub in parsed.items():
        raw = (LPS / rel).read_bytes()
        seg = next(s for s in split_segments(raw) if s.startswith(b"OBX|1|"))
        data = seg.split(b"|")[5].split(b"^", 4)[4]
        expected = base64.b64decode(data + b"=" * (-len(data) % 4))
        assert sub.documents[0].raw_bytes() == expected
        assert sub.documents[0].sha256 == hashlib.sha256(expected).hexdigest()


def test_corpus_replacement_document(parsed):
    d = parsed["Remplacement MDM/message_MDM__LPS_MSS_CR_Radio_RPLC_N1.er7"].documents[0]
    assert d.version_number == 2 and d.replaces == V1 and d.type_code == "18748-4"
    assert d.record_target_ins.model_dump() == INS_TEST


# ------------------------------------------------------------------------------- variants
BASE = (LPS / "Transmission initiale MDM/message_MDM__LPS_MSS_CR_Radio_INIT_N1_Base64.er7"
        ).read_text(encoding="utf-8")
RPLC = (LPS / "Remplacement MDM/message_MDM__LPS_MSS_CR_Radio_RPLC_N1.er7").read_text(encoding="utf-8")


def codes(sub: Submission) -> list[str]:
    return sorted(e.code for e in sub.errors)


def sub_(text: str, old: str, new: str, count: int = 1) -> str:
    assert text.count(old) >= 1, old
    return text.replace(old, new, count)


def drop(text: str, prefix: str) -> str:
    return "\n".join(l for l in text.split("\n") if not l.startswith(prefix))


def edit_cda(text: str, old: bytes, new: bytes) -> str:
    m = re.search(r"(OBX\|1\|ED\|[^|]*\|\|\^text\^XML\^Base64\^)([^|\n]*)", text)
    data = m.group(2).encode()
    cda = base64.b64decode(data + b"=" * (-len(data) % 4))
    assert old in cda
    new_b64 = base64.b64encode(cda.replace(old, new)).decode()
    return text[:m.start(2)] + new_b64 + text[m.end(2):]


def test_variant_clean_base_has_no_error():
    assert parse_report(BASE.encode()).errors == []


def test_cisis_v2_rules_not_applied_to_lps():
    sub = parse_report(BASE.encode())
    # no DESTDMP/DESTMSSANTE*/ACK_* flag in this profile: none required, none invented
    assert set(sub.flags) == {"MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REP_LEGAUX",
                              "MODIF_CONF_CODE"}
    assert not any("MSSanté rule" in w.text for w in sub.warnings)


def test_event_inconsistent_with_orc_is_906():
    sub = parse_report(sub_(BASE, "MDM^T02^MDM_T02", "MDM^T10^MDM_T02").encode())
    assert "906" in codes(sub) and sub.action is None


def test_obx11_inconsistent_is_906():
    sub = parse_report(RPLC.replace("ORC|RO|", "ORC|CA|").encode())
    assert "906" in codes(sub) and sub.action is None


def test_replacement_without_txa13_is_900():
    txa = next(l for l in RPLC.split("\n") if l.startswith("TXA|"))
    f = txa.split("|")
    f[13] = ""
    sub = parse_report(RPLC.replace(txa, "|".join(f)).encode())
    assert "900" in codes(sub)


def test_txa12_mismatch_is_a_906_warning_unless_rejected():
    text = sub_(BASE, V1 + "^Organisation-Y", V1 + "9^Organisation-Y").encode()
    sub = parse_report(text)
    assert sub.errors == [] and any(w.location == "TXA-12" and w.code == "906" for w in sub.warnings)
    sub = parse_report(text, rules={"cisis.copy.document-id": "reject"})
    assert any(e.location == "TXA-12" and e.code == "906" for e in sub.errors)


def test_ins_mismatch_pid_vs_cda_is_904():
    sub = parse_report(sub_(BASE, "PID|||279035121518989^", "PID|||180035121518989^").encode())
    assert codes(sub) == ["904"]


def test_ins_absent_from_cda_is_903():
    text = edit_cda(BASE, b'root="1.2.250.1.213.1.4.10"', b'root="1.2.250.1.999"')
    assert codes(parse_report(text.encode())) == ["903"]


def test_sender_prt_required():
    sub = parse_report(drop(BASE, "PRT||UC||SB").encode())
    assert any("PRT SB" in e.text for e in sub.errors) and codes(sub) == ["906"]


def test_rct_and_reply_optional():
    sub = parse_report(drop(drop(BASE, "PRT||UC||RCT"), "PRT||UC||REPLY").encode())
    assert sub.errors == [] and sub.recipients.mss_ps == [] and sub.recipients.reply_to is None


def test_mail_obx_required():
    sub = parse_report(drop(BASE, "OBX|2|ED").encode())
    assert codes(sub) == ["906"] and sub.mail is None


def test_second_document_is_906():
    doc = next(l for l in BASE.split("\n") if l.startswith("OBX|1|ED"))
    sub = parse_report(BASE.replace(doc, doc + "\n" + doc.replace("OBX|1|", "OBX|7|")).encode())
    assert "906" in codes(sub)


def test_required_flag_missing_and_bad_value():
    sub = parse_report(drop(BASE, "OBX|6|CWE|MODIF_CONF_CODE").encode())
    assert any("MODIF_CONF_CODE missing" in e.text for e in sub.errors)
    bad = sub_(BASE, "MASQUE_PS^Masqué aux professionnels de Santé^MetaDMPMSS||N^",
               "MASQUE_PS^Masqué aux professionnels de Santé^MetaDMPMSS||X^")
    assert codes(parse_report(bad.encode())) == ["906"]


def test_masque_ps_warning():
    t = sub_(BASE, "MASQUE_PS^Masqué aux professionnels de Santé^MetaDMPMSS||N^",
             "MASQUE_PS^Masqué aux professionnels de Santé^MetaDMPMSS||Y^")
    sub = parse_report(t.encode())
    assert sub.errors == [] and sub.flags["MASQUE_PS"]
    assert any("MASQUE_PS=Y" in w.text for w in sub.warnings)


def test_oru_or_wrong_version_with_lps_profile_is_rejected():
    sub = parse_report(sub_(BASE, "MDM^T02^MDM_T02", "ORU^R01^ORU_R01").encode())
    assert any(e.location == "MSH-9" for e in sub.errors)
    sub = parse_report(sub_(BASE, "|015|P|2.6|", "|015|P|2.5|").encode())
    assert any(e.location == "MSH-12" for e in sub.errors)


def test_profile_version_warning():
    sub = parse_report(sub_(BASE, "1.1^CISIS_CDA_HL7_LPS", "1.0^CISIS_CDA_HL7_LPS").encode())
    assert sub.errors == [] and any(w.location == "MSH-21" for w in sub.warnings)
