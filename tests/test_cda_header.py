"""read_header on the reference CI-SIS N1 imaging report (IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml)."""
from __future__ import annotations

import pytest
from lxml import etree

from engine.cda.header import DoctypeNotAllowed, parse_cda, read_header, safe_parser
from tests.conftest import CORPUS

REF_N1 = CORPUS / "cda" / "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml"
REF_N3 = CORPUS / "cda" / "IMG_CR_IMG_2024.01.xml"


@pytest.fixture(scope="module")
def header():
    return read_header(REF_N1.read_bytes())


def test_ids_and_versions(header):
    assert header["id"] == {"root": "1.2.250.1.213.1.1.1.45.2024.2.1", "extension": None}
    assert header["id_str"] == "1.2.250.1.213.1.1.1.45.2024.2.1"
    assert header["set_id_str"] == "1.2.250.1.213.1.1.1.45.2024.2"
    assert header["version_number"] == 2


def test_code_title_confidentiality_time(header):
    assert header["code"]["code"] == "18748-4"
    assert header["code"]["code_system"] == "2.16.840.1.113883.6.1"
    assert header["title"].startswith("CR d’imagerie médicale - Scanner")
    assert header["confidentiality_code"]["code"] == "N"
    assert header["confidentiality_code"]["code_system"] == "2.16.840.1.113883.5.25"
    assert header["effective_time"] == "20210108111700+0100"


def test_template_ids_and_level(header):
    # the 2024.01 N1 model: exactly 3 templateIds (the IMG-CR-IMG one is commented out)
    assert header["template_ids"] == ["2.16.840.1.113883.2.8.2.1", "1.2.250.1.213.1.1.1.1",
                                      "1.3.6.1.4.1.19376.1.2.20"]
    assert header["level"] == "N1"
    assert header["media_type"] == "application/pdf"


def test_author_legal_custodian(header):
    a = header["author"]
    assert a["rpps"] == "801234560801"
    assert (a["family"], a["given"]) == ("BIDEAULT", "Jacques")
    assert a["organization_id"] == {"root": "1.2.250.1.71.4.2.2", "extension": "1750803447"}
    la = header["legal_authenticator"]
    assert la["rpps"] == "801234560801"
    assert header["custodian"] == {"id": {"root": "1.2.250.1.71.4.2.2", "extension": "1750803447"},
                                   "name": "Centre de radiologie Ambroise"}


def test_order_accession_study(header):
    assert header["order_id"] == {"root": "1.2.250.1.748.12345678.12", "extension": "984375862"}
    assert header["accession_number"] == {"root": "1.2.250.1.925.994044.27",
                                          "extension": "105234751"}
    assert header["study_instance_uid"] == "1.2.250.1.925.994044.27.123.1876350"
    assert header["study_instance_uids"] == ["1.2.250.1.925.994044.27.123.1876350",
                                             "1.2.250.1.925.994044.27.123.1876351",
                                             "1.2.250.1.925.994044.27.123.1876352"]
    assert header["modality"] == "CT" and header["modalities"] == ["CT"]
    assert header["region"]["code"] == "774007"
    assert [r["code"] for r in header["regions"]] == ["774007", "67734004"]


def test_practice_facility_relation(header):
    assert header["practice_setting"]["code"] == "AMBULATOIRE"
    assert header["facility_type"]["code"] == "SA08"
    assert header["replaces"] == {"root": "90E1C8EC-F951-4B26-A305-A34848818DD6", "extension": None}
    assert header["replaces_str"] == "90E1C8EC-F951-4B26-A305-A34848818DD6"


def test_record_target(header):
    rt = header["record_target"]
    assert rt["ins"] == {"value": "279035121518989", "oid": "1.2.250.1.213.1.4.10"}
    assert {"root": "1.2.3.4.567.8.9.10", "extension": "1234567890121"} in rt["ids"]
    t = rt["traits"]
    assert t["birth_name"] == "PAT-TROIS"
    assert t["given_names"] == "DOMINIQUE MARIE-LOUISE"
    assert t["first_given_name"] == "DOMINIQUE"
    assert t["sex"] == "F" and t["birth_date"] == "19790328"
    assert t["birth_place_code"] == "51215"


def test_level3_twin_is_n3():
    assert read_header(REF_N3.read_bytes())["level"] == "N3"


def test_not_a_clinical_document():
    with pytest.raises(ValueError):
        read_header(b"<foo xmlns='urn:hl7-org:v3'/>")


def test_entities_are_not_expanded(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    xxe = (f'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "{secret.as_uri()}">]>'
           '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&e;</title></ClinicalDocument>')
    # the parser for untrusted XML never expands an entity, even one it is given ...
    tree = etree.ElementTree(etree.fromstring(xxe.encode(), safe_parser()))
    assert b"TOPSECRET" not in etree.tostring(tree)
    # ... and a CDA that declares a DTD is refused before anything reads it
    with pytest.raises(DoctypeNotAllowed):
        parse_cda(xxe.encode())
    with pytest.raises(DoctypeNotAllowed):
        read_header(xxe.encode())
