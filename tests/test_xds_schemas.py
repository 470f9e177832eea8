"""The shipped XDS.b schemas compile (through the rim.xsd resolver) and judge real messages."""
from __future__ import annotations

import hashlib

from lxml import etree

from engine.xds import schemas
from tests.conftest import SPECS

EXAMPLES = SPECS / "dmp-drimbox" / "JeuxDeDonnees" / "exemples" / "XDS"


def _envelope(raw: bytes) -> etree._Element:
    start = raw.index(b"<soap:Envelope")
    end = raw.index(b"</soap:Envelope>") + len(b"</soap:Envelope>")
    return etree.fromstring(raw[start:end])


def test_shipped_files_are_unchanged_copies():
    for line in (schemas.RESOURCES / "MANIFEST").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256((schemas.RESOURCES / name).read_bytes()).hexdigest() == digest, name
    # the reference copies are the same bytes: nothing was edited to make them compile
    assert (schemas.SCHEMA_DIR / "ebRS30" / "rim.xsd").read_bytes() == (
        SPECS / "ihe-xds" / "schema" / "ebRS30" / "rim.xsd").read_bytes()


def test_the_dmp_example_request_fails_only_on_its_known_slot_order_quirk():
    errors = schemas.validate_iti41(_envelope((EXAMPLES / "publication.xml").read_bytes()))
    # the DRIMbox sample puts Slots after Classifications in two ExtrinsicObjects (against ebRIM 3.0)
    assert len(errors) == 2 and all("Slot': This element is not expected" in e for e in errors)


def test_the_dmp_example_answer_is_valid_and_a_bad_status_is_not():
    root = _envelope((EXAMPLES / "response.xml").read_bytes())
    assert schemas.validate_registry_response(root) == []
    body = root.find(f"{{{schemas.SOAP12_NS}}}Body")[0]
    del body.attrib["status"]            # required by rs.xsd
    assert schemas.validate_registry_response(root)


def test_envelope_checks_action_and_body():
    root = _envelope((EXAMPLES / "response.xml").read_bytes())
    errors = schemas.validate_registry_response(root, action=schemas.ITI57_RESPONSE_ACTION)
    assert any("wsa:Action" in e for e in errors)
    assert any("expected" in e for e in schemas.validate_iti41(root))


def test_documents_and_entries_must_name_each_other():
    root = _envelope((EXAMPLES / "publication.xml").read_bytes())
    doc = root.find(f".//{{{schemas.XDSB_NS}}}Document")
    doc.set("id", "Elsewhere")
    errors = schemas.validate_iti41(root)
    assert "xdsb:Document 'Elsewhere' names no ExtrinsicObject" in errors
    assert "ExtrinsicObject 'DocumentKOS' has no xdsb:Document" in errors


def test_xop_include_must_resolve_when_attachments_are_given():
    request = etree.fromstring(
        f'<x:ProvideAndRegisterDocumentSetRequest xmlns:x="{schemas.XDSB_NS}" xmlns:lcm="{schemas.LCM_NS}"'
        f' xmlns:rim="{schemas.RIM_NS}" xmlns:xop="{schemas.XOP_NS}">'
        '<lcm:SubmitObjectsRequest><rim:RegistryObjectList><rim:ExtrinsicObject id="Doc1"/>'
        '</rim:RegistryObjectList></lcm:SubmitObjectsRequest>'
        '<x:Document id="Doc1"><xop:Include href="cid:doc1@x"/></x:Document>'
        '</x:ProvideAndRegisterDocumentSetRequest>')
    assert schemas.validate_iti41(request) == []
    assert schemas.validate_iti41(request, {"doc1@x": b"<ClinicalDocument/>"}) == []
    assert schemas.validate_iti41(request, {}) == ["xop:Include 'cid:doc1@x': no such attachment"]
    assert request.find(f".//{{{schemas.XOP_NS}}}Include") is not None   # the caller's tree is untouched
