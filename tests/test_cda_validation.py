"""Official validation: CDA XSD on every official example, CI-SIS schematrons on the reference N1.

The validator uses the resources packaged with the engine (the corpus still comes from ../shared).
The schematron tests share one compiled validator per module (compilation of the
structurationMinimale stylesheet takes ~10 s; the generated XSLT is cached on disk in a temp dir).
"""
from __future__ import annotations

import re
import time

import pytest

from engine.cda.resources import PACKAGED
from engine.cda.validation import CdaValidator
from tests.conftest import CORPUS

CDA_DIR = CORPUS / "cda"
REF_N1 = CDA_DIR / "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml"
OFFICIAL = sorted(CDA_DIR.glob("*.xml"))


@pytest.fixture(scope="module")
def validator(tmp_path_factory):
    return CdaValidator(cache_dir=tmp_path_factory.mktemp("cda-cache"))


@pytest.fixture(scope="module")
def compiled(validator):
    t0 = time.perf_counter()
    validator.warm_up()
    validator.compile_timings["warm_up_total_s"] = time.perf_counter() - t0
    return validator


def _ref() -> str:
    return REF_N1.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", OFFICIAL, ids=lambda p: p.name)
def test_official_examples_xsd_clean(validator, path):
    report = validator.validate(path.read_bytes(), schematron=False)
    assert report.xsd_errors == [], report.xsd_errors[:3]
    assert report.valid


def test_xsd_missing_required_element(validator):
    broken = re.sub(r"<typeId [^>]*/>", "", _ref(), count=1)
    report = validator.validate(broken.encode(), schematron=False)
    assert not report.valid
    assert report.xsd_errors and "line" in report.xsd_errors[0]
    assert any("typeId" in e["message"] for e in report.xsd_errors)


def test_xsd_not_well_formed(validator):
    report = validator.validate(b"<ClinicalDocument xmlns='urn:hl7-org:v3'>", schematron=False)
    assert not report.valid and "not well-formed" in report.xsd_errors[0]["message"]


def test_missing_value_set_generated_in_cache(compiled):
    [voc] = compiled.cache_dir.glob("include/*/voc-1.2.250.1.213.1.1.5.471-DYNAMIC.xml")
    text = voc.read_text()
    assert text.count("<concept ") > 100 and 'code="18748-4"' in text
    # nothing written into the packaged resources
    assert compiled.resources.root == PACKAGED
    assert not (PACKAGED / "schematrons" / "profils" / "structurationMinimale" / "include" / voc.name).exists()
    assert not list(PACKAGED.rglob("*.xsl"))


def test_reference_n1_schematron_clean(compiled):
    report = compiled.validate(REF_N1.read_bytes())
    assert report.schematron_failures == [], report.schematron_failures[:3]
    assert report.valid
    assert report.timings["schematron_ms"] > 0


def _fail_texts(report):
    return " | ".join(f["text"] for f in report.schematron_failures)


def test_schematron_missing_record_target(compiled):
    broken = re.sub(r"<recordTarget>.*?</recordTarget>", "", _ref(), count=1, flags=re.S)
    report = compiled.validate(broken.encode())
    assert not report.valid
    assert "recordTarget" in _fail_texts(report)
    assert all(f["location"] for f in report.schematron_failures)


def test_schematron_missing_legal_authenticator(compiled):
    broken = re.sub(r"<legalAuthenticator>.*?</legalAuthenticator>", "", _ref(), count=1,
                    flags=re.S)
    report = compiled.validate(broken.encode())
    assert not report.valid and "legalAuthenticator" in _fail_texts(report)


def test_schematron_wrong_template_id(compiled):
    broken = _ref().replace('<templateId root="1.2.250.1.213.1.1.1.1"/>',
                            '<templateId root="1.2.250.1.213.1.1.1.999"/>', 1)
    report = compiled.validate(broken.encode())
    assert not report.valid
    assert report.schematron_failures
    assert report.xsd_errors == []  # XSD cannot see it: only the schematron does


def test_schematron_bad_confidentiality_code(compiled):
    broken = _ref().replace('<confidentialityCode code="N"', '<confidentialityCode code="ZZ"', 1)
    report = compiled.validate(broken.encode())
    assert not report.valid and "Confidentiality" in _fail_texts(report)
    assert any("confidentialityCode" in f["location"] for f in report.schematron_failures)


def test_report_json_shape(compiled):
    j = compiled.validate(REF_N1.read_bytes()).to_json()
    assert set(j) >= {"valid", "xsd_errors", "schematron_failures", "timings"}


def test_benchmark_validation(compiled, capsys):
    """Figures for the closing note: XSD and schematron cost per document; ingest pipeline."""
    from engine.reports.cisis import parse_report
    from tests.conftest import CORPUS as C

    data = REF_N1.read_bytes()
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        compiled.validate(data, schematron=False)
    xsd_ms = (time.perf_counter() - t0) / n * 1000
    t0 = time.perf_counter()
    for _ in range(5):
        compiled.validate(data)
    full_ms = (time.perf_counter() - t0) / 5 * 1000
    oru = (C / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" /
           "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1" / "ORU" / "Transmission initiale ORU" /
           "message_ORU_CR_Bio_INIT_N3_SEGUR.hl7").read_bytes()
    t0 = time.perf_counter()
    for _ in range(n):
        sub = parse_report(oru)
        compiled.validate(sub.documents[0].raw_bytes(), schematron=False)
    pipe = (time.perf_counter() - t0) / n
    with capsys.disabled():
        print(f"\n[bench] compile {compiled.compile_timings}")
        print(f"[bench] XSD only, reference N1 ({len(data) // 1024} KB): {xsd_ms:.1f} ms/doc; "
              f"XSD + schematron (structurationMinimale + IHE): {full_ms:.0f} ms/doc")
        print(f"[bench] ORU {len(oru) // 1024} KB parse + extraction + XSD: {pipe * 1000:.1f} ms/msg"
              f" = {1 / pipe:.0f} msg/s")
    assert full_ms < 5000


def test_document_type_checked_against_the_generated_jdv_j07(compiled):
    """The value set missing upstream, generated into the cache from JDV_J07, is really read:
    a document type outside it fails, the reference one passes."""
    broken = _ref().replace('<code code="18748-4"', '<code code="99999-9"', 1)
    report = compiled.validate(broken.encode())
    assert not report.valid
    assert any("1.2.250.1.213.1.1.5.471" in f["text"] for f in report.schematron_failures), \
        _fail_texts(report)[:500]
