"""PACS report wrapping (issue 4, item 5): ORU^R01 (PDF or text) -> CDA R2 N1 "CR d'imagerie"
(CI-SIS IMG-CR-IMG 2024.01), validated with the CDA XSD and the CI-SIS schematrons
(structurationMinimale + IHE). One compiled validator for the module (compile ~10-15 s).

Synthetic data only (tests/data/pacs/README.md): ANS test patient PAT-TROIS DOMINIQUE.
"""
from __future__ import annotations

import base64
import io
import re

import pytest
from lxml import etree

from engine.cda.build import N1_TEMPLATE_IDS, new_document_id
from engine.cda.header import read_header
from engine.cda.pdf import render_text_report_pdf
from engine.cda.validation import CdaValidator
from engine.transforms import TransformContext, build_chain
from engine.transforms.cda_wrap import (
    CdaWrapError, DEFAULT_NOTICE, wrap_pacs_report,
)
from tests.conftest import ROOT

DATA = ROOT / "tests" / "data" / "pacs"
ORU_PDF = (DATA / "oru_pdf.hl7").read_bytes()
ORU_TEXT = (DATA / "oru_text.hl7").read_bytes()
MIN_PDF = (DATA / "minimal.pdf").read_bytes()
H = "{urn:hl7-org:v3}"

IDENTITY = {  # IdentityView.to_json() shape; ANS test patient (synthetic)
    "id": 1, "ipp": "1234567890121", "ipp_authority": "CENTRE-IMG",
    "ins": {"value": "279035121518989", "oid": "1.2.250.1.213.1.4.10", "kind": "NIR"},
    "birth_name": "PAT-TROIS", "first_given_name": "DOMINIQUE",
    "given_names": ["DOMINIQUE", "MARIE-LOUISE"], "used_name": "PAT-TROIS",
    "used_given_name": "DOMINIQUE", "birth_date": "1979-03-28", "sex": "F",
    "birth_place_cog": "51215", "status": "QUAL",
}

PARAMS = {
    "document_root_oid": "1.2.250.1.999.99.10",
    "accession_root_oid": "1.2.250.1.999.99.4",
    "organization": {"id": "1750803447", "name": "Centre de radiologie (fictif)",
                     "telecom": "tel:0100000000",
                     "addr": {"street_name": "Rue Fictive", "postal_code": "75010",
                              "city": "PARIS"}},
    "facility_type": {"code": "SA08", "display_name": "Cabinet de groupe",
                      "code_system": "1.2.250.1.71.4.2.4"},
    "notice": "Mention d'information RGPD/CNIL : vos données sont traitées par le centre "
              "d'imagerie ; droits d'accès et de rectification auprès du DPO.",
}


def lookup(ipp, authority):
    return dict(IDENTITY) if (ipp, authority) == ("1234567890121", "CENTRE-IMG") else None


@pytest.fixture(scope="module")
def validator(tmp_path_factory):
    v = CdaValidator(cache_dir=tmp_path_factory.mktemp("cda-cache"))
    v.warm_up()
    return v


def _assert_valid(validator, cda: bytes):
    r = validator.validate(cda)
    assert r.xsd_errors == [], r.xsd_errors[:3]
    assert r.schematron_failures == [], [f["text"] for f in r.schematron_failures[:3]]
    assert r.valid


def _body_pdf(cda: bytes) -> bytes:
    root = etree.fromstring(cda)
    text = root.find(f"{H}component/{H}nonXMLBody/{H}text")
    assert text.get("mediaType") == "application/pdf" and text.get("representation") == "B64"
    return base64.b64decode(text.text)


# --------------------------------------------------------------------------------- PDF ORU
@pytest.fixture(scope="module")
def pdf_result():
    return wrap_pacs_report(ORU_PDF, "utf-8", PARAMS, lookup)


def test_pdf_report_validates_clean(validator, pdf_result):
    _assert_valid(validator, pdf_result.cda)


def test_pdf_report_header(pdf_result):
    h = read_header(pdf_result.cda)
    assert h["record_target"]["ins"] == {"value": "279035121518989",
                                         "oid": "1.2.250.1.213.1.4.10"}
    assert {"root": "1.2.250.1.999.99.1", "extension": "1234567890121"} in h["record_target"]["ids"]
    t = h["record_target"]["traits"]
    assert (t["birth_name"], t["given_names"], t["first_given_name"], t["birth_date"], t["sex"],
            t["birth_place_code"]) == ("PAT-TROIS", "DOMINIQUE MARIE-LOUISE", "DOMINIQUE",
                                       "19790328", "F", "51215")
    assert h["order_id"] == {"root": "1.2.250.1.999.99.2", "extension": "984375862"}
    assert h["accession_number"] == {"root": "1.2.250.1.999.99.4", "extension": "105234751"}
    assert h["study_instance_uid"] == "1.2.250.1.999.99.3.123.1876350"
    assert h["modality"] == "CT"
    assert h["code"]["code"] == "18748-4" and h["code"]["code_system"] == "2.16.840.1.113883.6.1"
    assert h["template_ids"] == [t for t, _ in N1_TEMPLATE_IDS]  # exactly the 3 N1 templateIds
    assert h["level"] == "N1"
    assert h["confidentiality_code"]["code"] == "N"
    assert h["version_number"] == 1 and h["replaces"] is None
    assert h["id"]["root"].startswith("1.2.250.1.999.99.10.")
    assert h["set_id"]["root"].startswith("1.2.250.1.999.99.10.") and h["set_id"] != h["id"]
    assert h["author"]["rpps"] == "801234560801" and h["author"]["family"] == "BIDEAULT"
    assert h["legal_authenticator"]["rpps"] == "801234560801"
    assert h["custodian"]["id"] == {"root": "1.2.250.1.71.4.2.2", "extension": "1750803447"}
    assert h["practice_setting"]["code"] == "AMBULATOIRE"
    assert h["facility_type"]["code"] == "SA08"
    assert h["effective_time"] == "20240115111700+0100"
    assert pdf_result.source == "pdf" and pdf_result.action == "initial"


def test_pdf_bytes_identical(pdf_result):
    assert _body_pdf(pdf_result.cda) == MIN_PDF
    assert pdf_result.pdf == MIN_PDF


def test_accepts_application_pdf_ed_form(validator):
    raw = ORU_PDF.replace(b"^AP^PDF^Base64^", b"^application^pdf^Base64^")
    res = wrap_pacs_report(raw, "utf-8", PARAMS, lookup)
    assert _body_pdf(res.cda) == MIN_PDF


# -------------------------------------------------------------------------------- text ORU
@pytest.fixture(scope="module")
def text_result():
    return wrap_pacs_report(ORU_TEXT, "utf-8", PARAMS, lookup)


def test_text_report_pdfa_validates_clean(validator, text_result):
    _assert_valid(validator, text_result.cda)
    assert text_result.source == "text"
    h = read_header(text_result.cda)
    assert h["modality"] == "CT"  # from OBR-24 (no IPC segment)


def test_text_report_pdf_content(text_result):
    pypdf = pytest.importorskip("pypdf")
    pdf = _body_pdf(text_result.cda)
    reader = pypdf.PdfReader(io.BytesIO(pdf))
    text = " ".join(" ".join(p.extract_text().split()) for p in reader.pages)
    assert "céphalées persistantes" in text
    assert "sinusite maxillaire droite à traiter" in text
    assert "Centre de radiologie (données fictives)" in text  # FT \.br\ line
    last = " ".join(reader.pages[-1].extract_text().split())
    assert "Mention d'information RGPD/CNIL" in last


# ------------------------------------------------------------------------------------ PDF/A
def _pdfa_checks(pdf: bytes):
    pypdf = pytest.importorskip("pypdf")
    reader = pypdf.PdfReader(io.BytesIO(pdf))
    assert not reader.is_encrypted and b"/Encrypt" not in pdf
    root = reader.trailer["/Root"]
    xmp = root["/Metadata"].get_object().get_data().decode("utf-8")
    assert re.search(r"<pdfaid:part>2</pdfaid:part>", xmp)
    assert re.search(r"<pdfaid:conformance>B</pdfaid:conformance>", xmp)
    intents = root["/OutputIntents"]
    oi = intents[0].get_object()
    assert oi["/S"] == "/GTS_PDFA1"
    icc = oi["/DestOutputProfile"].get_object().get_data()
    assert icc[36:40] == b"acsp" and icc[16:20] == b"RGB "
    fonts = []
    for page in reader.pages:
        for f in page["/Resources"]["/Font"].values():
            f = f.get_object()
            for d in f.get("/DescendantFonts", [f]):
                d = d.get_object()
                fonts.append(d["/FontDescriptor"].get_object())
    assert fonts and all("/FontFile2" in fd for fd in fonts)  # every font embedded
    assert b"/SMask" not in pdf and b"/Transparency" not in pdf
    return reader


def test_pdfa_markers_accents_and_notice():
    notice = "Information RGPD : données traitées par l'établissement ; réclamation CNIL."
    body = "Résultat : élément hyperdense évoquant une lésion ; à contrôler. ÇÀÉÈÊËÎÏÔÙÛÜŸ œ æ « »\n"
    pdf = render_text_report_pdf(body * 3 + "\n".join(f"ligne {i}" for i in range(120)),
                                 title="CR d’imagerie médicale - Scanner", notice=notice)
    assert pdf.startswith(b"%PDF-1.7")
    reader = _pdfa_checks(pdf)
    assert len(reader.pages) >= 2
    first = reader.pages[0].extract_text()
    assert "élément hyperdense évoquant une lésion ; à contrôler" in first
    assert "ÇÀÉÈÊËÎÏÔÙÛÜŸ" in first
    last = " ".join(reader.pages[-1].extract_text().split())
    assert notice in last
    assert all(notice not in " ".join(p.extract_text().split()) for p in reader.pages[:-1])


def test_wrapped_text_pdf_is_pdfa(text_result):
    _pdfa_checks(_body_pdf(text_result.cda))


def test_default_notice_printed():
    pypdf = pytest.importorskip("pypdf")
    pdf = render_text_report_pdf("Court.", title="CR", notice=DEFAULT_NOTICE)
    text = " ".join(pypdf.PdfReader(io.BytesIO(pdf)).pages[-1].extract_text().split())
    assert "CNIL" in text and "Mon espace santé" in text


# ------------------------------------------------------------------------------ replacement
def test_replacement_same_set_id_version_2_rplc(validator, pdf_result):
    first = read_header(pdf_result.cda)
    corrected = ORU_PDF.replace(b"||||||F|||2024", b"||||||C|||2024")
    assert corrected != ORU_PDF
    seen = {}

    def previous(keys):
        seen.update(keys)
        return first

    res = wrap_pacs_report(corrected, "utf-8", PARAMS, lookup, previous=previous)
    h = read_header(res.cda)
    assert seen["accession_number"] == "1.2.250.1.999.99.4^105234751"
    assert res.action == "replace"
    assert h["set_id"] == first["set_id"]
    assert h["version_number"] == 2
    assert h["replaces"] == first["id"]
    assert h["id"] != first["id"]
    _assert_valid(validator, res.cda)
    # and a third version replaces the second
    h3 = read_header(wrap_pacs_report(corrected, "utf-8", PARAMS, lookup, previous=h).cda)
    assert (h3["set_id"], h3["version_number"], h3["replaces"]) == (first["set_id"], 3, h["id"])


def test_correction_without_previous_is_an_error():
    corrected = ORU_PDF.replace(b"||||||F|||2024", b"||||||C|||2024")
    with pytest.raises(CdaWrapError) as ei:
        wrap_pacs_report(corrected, "utf-8", PARAMS, lookup)
    assert ei.value.code == "no_previous"


# ------------------------------------------------------------------------ identity problems
def test_missing_identity_clear_error():
    with pytest.raises(CdaWrapError) as ei:
        wrap_pacs_report(ORU_PDF, "utf-8", PARAMS, lambda ipp, auth: None)
    assert ei.value.code == "missing_identity"
    assert "identity registry" in str(ei.value)
    assert "1234567890121" not in str(ei.value)  # PHI rule: no values in error texts


def test_unqualified_identity_refused():
    with pytest.raises(CdaWrapError) as ei:
        wrap_pacs_report(ORU_PDF, "utf-8", PARAMS, lambda i, a: dict(IDENTITY, status="PROV"))
    assert ei.value.code == "identity_not_qualified"


def test_pid_ins_mismatch_refused():
    raw = ORU_PDF.replace(b"^PI||", b"^PI~123456789012345^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS||")
    with pytest.raises(CdaWrapError) as ei:
        wrap_pacs_report(raw, "utf-8", PARAMS, lookup)
    assert ei.value.code == "ins_mismatch"


def test_traits_come_from_registry_not_pacs():
    raw = ORU_PDF.replace(b"PAT-TROIS^DOMINIQUE", b"AUTRE^NOM")
    h = read_header(wrap_pacs_report(raw, "utf-8", PARAMS, lookup).cda)
    assert h["record_target"]["traits"]["birth_name"] == "PAT-TROIS"


# --------------------------------------------------------------------- registered transform
def _ctx(**extras):
    return TransformContext(message_id=1, channel="pacs-in", destination="reports", codec="utf-8",
                            extras={"identity_lookup": lookup, **extras})


def test_transform_returns_cisis_oru_with_cda():
    from engine.reports.cisis import parse_report

    chain = build_chain([{"type": "cda_wrap", **PARAMS}])
    res = chain(ORU_PDF, _ctx())
    assert res.payload.startswith(b"MSH|^~\\&|PACS-X|CENTRE-IMG|PFI|")
    assert b"|2.1^CISIS_CDA_HL7_V2" in res.payload.split(b"\r")[0]
    sub = parse_report(res.payload, "utf-8")
    assert [e for e in sub.errors] == [], sub.errors
    assert sub.action == "initial"
    assert sub.ins.value == "279035121518989"
    doc = sub.documents[0]
    assert doc.level == "N1" and doc.type_code == "18748-4"
    assert any("cda_wrap: initial CDA N1 from pdf" in n for n in res.notes)


def test_transform_skip_on_missing_identity():
    chain = build_chain([{"type": "cda_wrap", **PARAMS, "on_missing_identity": "skip"}])
    res = chain(ORU_PDF, TransformContext(codec="utf-8",
                                          extras={"identity_lookup": lambda i, a: None}))
    assert res.payload is None
    chain = build_chain([{"type": "cda_wrap", **PARAMS}])
    with pytest.raises(CdaWrapError):
        chain(ORU_PDF, TransformContext(codec="utf-8",
                                        extras={"identity_lookup": lambda i, a: None}))


def test_transform_replacement_uses_previous_lookup():
    from engine.reports.cisis import parse_report

    first = read_header(wrap_pacs_report(ORU_PDF, "utf-8", PARAMS, lookup).cda)
    chain = build_chain([{"type": "cda_wrap", **PARAMS}])
    res = chain(ORU_PDF, _ctx(previous_document_lookup=lambda keys: first))
    sub = parse_report(res.payload, "utf-8")
    assert sub.errors == [], sub.errors
    assert sub.action == "replace"


# ----------------------------------------------------------------------------------- ids
def test_new_document_id():
    a, b = new_document_id("1.2.250.1.999.99.10"), new_document_id("1.2.250.1.999.99.10")
    assert a != b and a.extension is None and len(a.root) <= 64
    assert re.fullmatch(r"1\.2\.250\.1\.999\.99\.10\.[1-9]\d+", a.root)
    u = new_document_id()
    assert re.fullmatch(r"2\.25\.[1-9]\d*", u.root)
    with pytest.raises(ValueError):
        new_document_id("not-an-oid")


def test_params_validation():
    from engine.transforms import validate_specs

    assert validate_specs([{"type": "cda_wrap", **PARAMS}]) == []
    probs = validate_specs([{"type": "cda_wrap", **PARAMS, "on_missing_identity": "maybe"}])
    assert probs and probs[0].path == "[0].on_missing_identity"


# ------------------------------------------------------------------- MSSanté recipients (PRT)
MSS_FLAGS = {"DESTDMP": True, "DESTMSSANTEPS": True, "DESTMSSANTEPAT": True}
DOCTOR = {"address": "medecin.demandeur@test-ci-sis.mssante.fr", "rpps": "10000000000",
          "family": "DEMANDEUR", "given": "JEAN"}


def _prts(payload: bytes) -> list[list[str]]:
    return [s.split("|") for s in payload.decode().split("\r") if s.startswith("PRT|")]


def test_recipients_written_as_prt_and_read_back():
    from engine.reports.cisis import parse_report

    params = {**PARAMS, "flags": MSS_FLAGS, "mss_recipients": [DOCTOR],
              "mss_reply_to": "secretariat@test-ci-sis.mssante.fr"}
    res = build_chain([{"type": "cda_wrap", **params}])(ORU_PDF, _ctx())
    roles = [p[4] for p in _prts(res.payload)]
    assert roles == ["SB^Send by^participation", "RCT^^participation", "RCT^^participation",
                     "REPLY^^participation"]
    # the segment order of the guide: PRT after the document OBX, before the flag OBX
    segs = [s[:3] for s in res.payload.decode().split("\r") if s]
    assert segs.index("PRT") > segs.index("OBX") and segs[-1] == "OBX"
    sub = parse_report(res.payload, "utf-8")
    assert sub.errors == [], sub.errors
    r = sub.recipients
    assert r.mss_ps == ["medecin.demandeur@test-ci-sis.mssante.fr"]
    assert r.mss_patient == "279035121518989@patient.mssante.fr"
    assert r.reply_to == "secretariat@test-ci-sis.mssante.fr"
    assert r.rct[0].person.id == "810000000000"  # RPPS -> national PS id


def test_patient_only_has_no_professional_prt():
    from engine.reports.cisis import parse_report

    params = {**PARAMS, "flags": {"DESTDMP": True, "DESTMSSANTEPAT": True}}
    res = build_chain([{"type": "cda_wrap", **params}])(ORU_PDF, _ctx())
    assert [p[15] for p in _prts(res.payload) if p[4].startswith("RCT")] \
        == ["^^X.400^279035121518989@patient.mssante.fr"]
    sub = parse_report(res.payload, "utf-8")
    assert sub.errors == [] and sub.recipients.mss_ps == []


def test_no_mss_flag_no_recipient_prt():
    res = build_chain([{"type": "cda_wrap", **PARAMS}])(ORU_PDF, _ctx())
    assert [p[4] for p in _prts(res.payload)] == ["SB^Send by^participation"]


def test_recipients_and_flags_must_agree():
    from engine.transforms import validate_specs

    probs = validate_specs([{"type": "cda_wrap", **PARAMS, "flags": MSS_FLAGS}])
    assert probs and "mss_recipients" in probs[0].message
    probs = validate_specs([{"type": "cda_wrap", **PARAMS, "mss_recipients": [DOCTOR]}])
    assert probs and "DESTMSSANTEPS" in probs[0].message
