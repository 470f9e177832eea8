"""The DMP request builder on every CI-SIS v2.1 corpus report (MDM and ORU) and on a PACS report
wrapped by the engine: each request is read back from its MTOM bytes, validated against the XDS.b
XSDs, its VIHF and signature document verified with signxml, and its metadata compared field by
field with what the CDA header and the MetaDMPMSS flags say. No socket.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import uuid

import pytest
from lxml import etree
from signxml import XMLVerifier
from signxml.exceptions import InvalidSignature
from signxml.verifier import SignatureConfiguration

from engine.reports.cisis import parse_report
from engine.transforms.cda_wrap import CdaWrapParams, build_cisis_oru, wrap_pacs_report
from engine.xds import mtom, schemas
from engine.xds.document_facts import read_document_facts
from engine.xds.envelope import build_iti41, build_iti57_delete, validate_request
from engine.xds.metadata import (
    DE_CLASS, DE_CONFIDENTIALITY, DE_FORMAT, DE_PATIENT_ID, DE_TYPE, DE_UNIQUE_ID, DMP_DELETED,
    HAS_MEMBER, RPLC, SIGNS, SS_PATIENT_ID, UPDATE_AVAILABILITY, MetadataError, entry_uuid_for,
)
from engine.xds.settings import Coded, DmpRequestSettings, VihfSettings, XdsSettings
from engine.xds.signing import SigningIdentityError, load_signing_identity
from engine.xds.vihf import SAML_NS
from tests.conftest import CORPUS
from tests.signing_pki import PASSWORD, make_signing_files
from tests.test_cda_wrap import ORU_PDF, PARAMS, lookup

TRANS = CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1"
CORPUS_REPORTS = sorted(p.relative_to(TRANS).as_posix() for p in TRANS.rglob("message_*"))
#: the two corpus messages the report channel itself refuses (AE): they never reach a connector
REFUSED = {"MDM/Transmission initiale MDM/message_MDM_CR_Radio_INIT_N1.er7": "906",  # not a CDA
           "ORU/Suppression ORU/message_ORU_CR_Bio_DEL_N3_SEGUR.hl7": "904"}          # INS differs
NOW = dt.datetime(2026, 12, 3, 9, 30, 15, 250000, tzinfo=dt.timezone.utc)
ENDPOINT = "https://dmp.test/si-dmp-server/v2/services/repository"
R = f"{{{schemas.RIM_NS}}}"
MASKS = {"MASQUE_PS": "MASQUE_PS", "INVISIBLE_PATIENT": "INVISIBLE_PATIENT",
         "INVISIBLE_REP_LEGAUX": "INVISIBLE_REPRESENTANTS_LEGAUX"}


def counter_uuids():
    n = itertools.count(1)
    return lambda: uuid.UUID(int=next(n))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_signing_files(tmp_path_factory.mktemp("cachet"))


@pytest.fixture(scope="module")
def signer(files):
    return load_signing_identity(files.p12, PASSWORD)


@pytest.fixture(scope="module")
def settings():
    return DmpRequestSettings(
        vihf=VihfSettings(secteur_activite=Coded(code="SA07", scheme="1.2.250.1.71.4.2.4"),
                          lps_name="mini-PFI", lps_version="0.1", lps_homologation_id="TEST-HOMOL"),
        xds=XdsSettings(endpoint=ENDPOINT, source_id="1.2.250.1.999.99.1"))


def _submission(name: str):
    return parse_report((TRANS / name).read_bytes())


def _pacs_submission():
    params = CdaWrapParams.model_validate(PARAMS)
    wrapped = build_cisis_oru(ORU_PDF, "utf-8", wrap_pacs_report(ORU_PDF, "utf-8", params, lookup),
                              params, now=NOW)
    return parse_report(wrapped, "utf-8")


def _build(sub, settings, signer, **kw):
    builder = build_iti57_delete if sub.action == "delete" else build_iti41
    return builder(sub, settings, signer, now=NOW, uuid_factory=counter_uuids(), **kw)


def _read_back(request):
    related = mtom.parse_related(request.body, request.content_type)
    return etree.fromstring(related.root), {cid: p.data for cid, p in related.parts.items()}


def _slot(obj, name):
    return [v.text for v in obj.findall(f"{R}Slot[@name='{name}']/{R}ValueList/{R}Value")]


def _codes(obj, scheme):
    return [(c.get("nodeRepresentation"), _slot(c, "codingScheme")[0])
            for c in obj.findall(f"{R}Classification[@classificationScheme='{scheme}']")]


def _external(obj, scheme):
    return obj.find(f"{R}ExternalIdentifier[@identificationScheme='{scheme}']").get("value")


def _associations(root, kind):
    return [(a.get("sourceObject"), a.get("targetObject"), a)
            for a in root.iter(f"{R}Association") if a.get("associationType") == kind]


def _verify_vihf(root, files):
    assertion = root.find(f".//{{{SAML_NS}}}Assertion")
    result = XMLVerifier().verify(etree.tostring(root), x509_cert=files.certificate, id_attribute="ID",
                                  expect_config=SignatureConfiguration(require_x509=True))
    assert result.signed_xml.tag == assertion.tag
    attrs = {a.get("Name"): a for a in assertion.iter(f"{{{SAML_NS}}}Attribute")}
    return assertion, attrs


def _check_vihf(root, sub, files):
    assertion, attrs = _verify_vihf(root, files)
    value = lambda name: attrs[name].findtext(f"{{{SAML_NS}}}AttributeValue")  # noqa: E731
    assert assertion.findtext(f"{{{SAML_NS}}}Issuer") == (
        "CN=PFI SIGN, OU=499700367909006, O=CENTRE IMAGERIE TEST, ST=Paris (75), C=FR")
    assert assertion.findtext(f"{{{SAML_NS}}}Subject/{{{SAML_NS}}}NameID") == sub.recipients.sender.person.id
    assert value("urn:oasis:names:tc:xacml:2.0:resource:resource-id") == \
        f"{sub.ins.value}^^^&{sub.ins.oid}&ISO^NH"
    assert value("Identifiant_Structure") == sub.recipients.sender.organization_id
    assert value("VIHF_Version") == "4.0" and value("Authentification_Mode") == "INDIRECTE"
    assert value("Ressource_URN") == "urn:dmp" and value("Secteur_Activite") == "SA07^1.2.250.1.71.4.2.4"
    role = attrs["urn:oasis:names:tc:xacml:2.0:subject:role"].find(".//{urn:hl7-org:v3}Role")
    assert (role.get("code"), role.get("codeSystem")) == ("AUTOMATE", "1.2.250.1.213.1.1.4.6")
    assert ("urn:oasis:names:tc:xspa:1.0:resource:patient:hl7:confidentiality-code" in attrs) \
        == sub.flags["CONNEXION_SECRETE"]
    assert assertion.find(f".//{{{SAML_NS}}}AudienceRestriction") is None


def _check_header(root, request, action, to):
    header = root.find(f"{{{schemas.SOAP12_NS}}}Header")
    wsa = lambda tag: header.find(f"{{{schemas.WSA_NS}}}{tag}")  # noqa: E731
    assert wsa("Action").text == action == request.action
    assert wsa("Action").get(f"{{{schemas.SOAP12_NS}}}mustUnderstand") == "true"
    assert wsa("MessageID").text == request.message_id
    assert wsa("To").text == to == request.to


def _check_document_entry(root, parts, doc, entry_uuid, sub):
    raw = doc.raw_bytes()
    facts = read_document_facts(raw)
    eo = root.find(f".//{R}ExtrinsicObject[@id='{entry_uuid}']")
    assert eo.get("mimeType") == "text/xml"
    # the attachment is the exact CDA, and the metadata describes those bytes
    include = root.find(f".//{{{schemas.XDSB_NS}}}Document[@id='{entry_uuid}']/{{{schemas.XOP_NS}}}Include")
    assert parts[mtom.cid_of(include.get("href"))] == raw
    assert _slot(eo, "hash") == [hashlib.sha1(raw).hexdigest()]
    assert _slot(eo, "size") == [str(len(raw))] == [str(doc.size)]
    assert _external(eo, DE_UNIQUE_ID) == doc.id
    assert _external(eo, DE_PATIENT_ID) == f"{sub.ins.value}^^^&{sub.ins.oid}&ISO^NH"
    assert (doc.record_target_ins.value, doc.record_target_ins.oid) == (sub.ins.value, sub.ins.oid)
    assert _codes(eo, DE_TYPE) == [(doc.type_code, "2.16.840.1.113883.6.1")]
    assert _codes(eo, DE_CLASS) == [({"18748-4": "31", "11502-2": "10"}[doc.type_code], "1.2.250.1.213.1.1.4.1")]
    assert _codes(eo, DE_FORMAT)[0][0] == ("urn:ihe:iti:xds-sd:pdf:2008" if doc.level == "N1"
                                           else "urn:ihe:lab:xd-lab:2008")
    masks = [(MASKS[f], "1.2.250.1.213.1.1.4.13") for f in MASKS if sub.flags[f]]
    assert _codes(eo, DE_CONFIDENTIALITY) == [(doc.confidentiality_code, "2.16.840.1.113883.5.25")] + masks
    author = doc.author
    assert _slot(eo.find(f"{R}Classification[@nodeRepresentation='']"), "authorPerson")[0].startswith(
        f"{author.id}^{author.family}^{author.given}^^^^^^&{author.id_oid}&ISO")
    legal = doc.legal_authenticator
    assert _slot(eo, "legalAuthenticator")[0].startswith(f"{legal.id}^{legal.family}^{legal.given}^")
    assert _slot(eo, "creationTime") == [facts.creation_time] and doc.effective_time.startswith(
        facts.creation_time[:8])
    assert eo.find(f"{R}Name/{R}LocalizedString").get("value") == doc.title
    assert _slot(eo, "sourcePatientInfo")[1:] == [f"PID-7|{sub.patient.birth_date or facts.birth_date}",
                                                  f"PID-8|{facts.sex}"]
    return eo


def _check_signature_document(root, parts, request, sub, files):
    sig_uuid = request.signature_entry_uuid
    include = root.find(f".//{{{schemas.XDSB_NS}}}Document[@id='{sig_uuid}']/{{{schemas.XOP_NS}}}Include")
    data = parts[mtom.cid_of(include.get("href"))]
    eo = root.find(f".//{R}ExtrinsicObject[@id='{sig_uuid}']")
    assert _slot(eo, "hash") == [hashlib.sha1(data).hexdigest()]
    results = XMLVerifier().verify(data, x509_cert=files.certificate, id_attribute="Id", validate_schema=False,
                                   expect_config=SignatureConfiguration(expect_references=2))
    manifest = results[0].signed_xml
    digests = {r.get("URI"): r.findtext("{http://www.w3.org/2000/09/xmldsig#}DigestValue")
               for r in manifest}
    for doc in sub.documents:
        assert digests[f"urn:oid:{doc.id}"] == base64.b64encode(
            hashlib.sha256(doc.raw_bytes()).digest()).decode()
    assert f"urn:oid:{request.submission_set_unique_id}" in digests
    ss = request.submission_set_entry_uuid
    assert (sig_uuid, ss) in [(s, t) for s, t, _ in _associations(root, SIGNS)]
    assert (ss, sig_uuid) in [(s, t) for s, t, _ in _associations(root, HAS_MEMBER)]


def _accepted():
    return [n for n in CORPUS_REPORTS if n not in REFUSED]


def test_the_corpus_is_what_these_tests_expect():
    assert len(CORPUS_REPORTS) == 7 and set(REFUSED) <= set(CORPUS_REPORTS)
    for name, code in REFUSED.items():
        assert [e.code for e in _submission(name).errors] == [code]
    assert {_submission(n).action for n in _accepted()} == {"initial", "replace", "delete"}


@pytest.mark.parametrize("name", [n for n in _accepted()] + ["PACS-wrapped ORU"])
def test_every_report_gives_a_valid_signed_request_equal_to_its_cda(name, settings, signer, files):
    sub = _pacs_submission() if name == "PACS-wrapped ORU" else _submission(name)
    assert sub.ok and sub.recipients.dmp
    request = _build(sub, settings, signer)
    assert validate_request(request) == []
    root, parts = _read_back(request)
    _check_vihf(root, sub, files)
    if sub.action == "delete":
        assert schemas.validate_iti57(root) == []
        _check_header(root, request, schemas.ITI57_ACTION, ENDPOINT.rsplit("/", 1)[0] + "/registry")
        updates = _associations(root, UPDATE_AVAILABILITY)
        assert [(s, t) for s, t, _ in updates] == [
            (request.submission_set_entry_uuid, entry_uuid_for(d.id)) for d in sub.documents]
        assert _slot(updates[0][2], "NewStatus") == [DMP_DELETED]
        assert not parts and root.find(f".//{R}ExtrinsicObject") is None
        return
    assert schemas.validate_iti41(root, parts) == []
    _check_header(root, request, schemas.ITI41_ACTION, ENDPOINT)
    ss = root.find(f".//{R}RegistryPackage")
    assert _external(ss, SS_PATIENT_ID) == f"{sub.ins.value}^^^&{sub.ins.oid}&ISO^NH"
    assert len(parts) == len(sub.documents) + 1
    for doc, entry_uuid in zip(sub.documents, request.document_entry_uuids):
        _check_document_entry(root, parts, doc, entry_uuid, sub)
        assert (ss.get("id"), entry_uuid) in [(s, t) for s, t, _ in _associations(root, HAS_MEMBER)]
    rplc = [(s, t) for s, t, _ in _associations(root, RPLC)]
    if sub.action == "replace":
        assert rplc == [(e, entry_uuid_for(d.replaces))
                        for d, e in zip(sub.documents, request.document_entry_uuids)]
        assert all(d.replaces for d in sub.documents)
    else:
        assert rplc == [] and request.replaced_entry_uuids == (None,) * len(sub.documents)
    _check_signature_document(root, parts, request, sub, files)


def test_masks_and_secret_connection_follow_the_flags(settings, signer, files):
    base = _submission("MDM/Remplacement MDM/message_MDM_CR_Radio_RPLC_N1.er7")
    for masked in ({}, {"MASQUE_PS": True}, {"INVISIBLE_PATIENT": True, "INVISIBLE_REP_LEGAUX": True},
                   {"MASQUE_PS": True, "INVISIBLE_PATIENT": True, "INVISIBLE_REP_LEGAUX": True,
                    "CONNEXION_SECRETE": False}):
        flags = {**base.flags, **{k: False for k in MASKS}, **masked}
        sub = base.model_copy(update={"flags": flags})
        root, parts = _read_back(_build(sub, settings, signer))
        _check_vihf(root, sub, files)
        eo = root.find(f".//{R}ExtrinsicObject")
        assert _codes(eo, DE_CONFIDENTIALITY) == [("N", "2.16.840.1.113883.5.25")] + [
            (MASKS[f], "1.2.250.1.213.1.1.4.13") for f in MASKS if flags[f]]


def test_a_known_replaced_entry_and_pv1_patient_class_are_used(settings, signer):
    sub = _submission("MDM/Remplacement MDM/message_MDM_CR_Radio_RPLC_N1.er7")
    known = "urn:uuid:0b5e7c1a-0000-4000-8000-000000000001"
    request = _build(sub, settings, signer, replaced_entry_uuids={sub.parent_document_id: known},
                     patient_class="I")
    root, _ = _read_back(request)
    assert [(s, t) for s, t, _ in _associations(root, RPLC)] == [(request.document_entry_uuids[0], known)]
    ss = root.find(f".//{R}RegistryPackage")
    assert _codes(ss, "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500") == [("03", "1.2.250.1.213.2.2")]


def test_requests_are_reproducible_and_ids_unique(settings, signer):
    sub = _submission("ORU/Transmission initiale ORU/message_ORU_CR_Bio_INIT_N3_SEGUR.hl7")
    first, second = _build(sub, settings, signer), _build(sub, settings, signer)
    assert first == second
    other = build_iti41(sub, settings, signer, now=NOW)
    assert other.message_id != first.message_id and other.submission_set_unique_id != first.submission_set_unique_id
    assert other.document_entry_uuids == first.document_entry_uuids == (entry_uuid_for(sub.documents[0].id),)


def test_a_tampered_vihf_or_cda_is_caught(settings, signer, files):
    sub = _submission("MDM/Transmission initiale MDM/message_MDM_CR_Radio_INIT_N1_Base64.er7")
    root, parts = _read_back(_build(sub, settings, signer))
    value = root.find(".//{%s}Attribute[@Name='Identifiant_Structure']/{%s}AttributeValue" % (SAML_NS, SAML_NS))
    value.text = "999999999"
    with pytest.raises(InvalidSignature):
        _verify_vihf(root, files)
    eo = root.find(f".//{R}ExtrinsicObject")
    del eo.attrib["objectType"], eo.attrib["id"]       # id is required by ebRIM
    assert schemas.validate_iti41(root, parts)


def test_what_cannot_go_to_the_dmp_is_refused(settings, signer):
    sub = _submission("MDM/Transmission initiale MDM/message_MDM_CR_Radio_INIT_N1_Base64.er7")
    with pytest.raises(MetadataError, match="INS"):
        _build(sub.model_copy(update={"ins": None}), settings, signer)
    refused = _submission("ORU/Suppression ORU/message_ORU_CR_Bio_DEL_N3_SEGUR.hl7")
    with pytest.raises(MetadataError, match="recordTarget INS"):
        build_iti41(refused.model_copy(update={"action": "initial", "errors": []}), settings, signer, now=NOW)
    unknown = settings.model_copy(update={"xds": settings.xds.model_copy(update={"class_codes": {}})})
    with pytest.raises(MetadataError, match="classCode") as info:
        _build(sub, unknown, signer)
    assert sub.ins.value not in str(info.value)


def test_signing_identity_from_pem_and_pkcs12(files):
    from_p12 = load_signing_identity(files.p12, PASSWORD)
    bundle = load_signing_identity(files.pem_bundle)
    split = load_signing_identity(files.cert_pem, PASSWORD, key_path=files.encrypted_key_pem)
    assert from_p12.certificate == bundle.certificate == split.certificate == files.certificate
    assert from_p12.chain == split.chain == (files.ca,)
    with pytest.raises(SigningIdentityError, match="wrong password"):
        load_signing_identity(files.p12, "not-it")
    with pytest.raises(SigningIdentityError, match="does not match"):
        load_signing_identity(files.cert_pem, key_path=files.other_key_pem)


def test_settings_default_to_the_guide_and_refuse_unknown_keys(settings):
    assert settings.vihf.version == "4.0" and settings.vihf.authentication_mode == "INDIRECTE"
    assert settings.vihf.signature_algorithm == "rsa-sha256" and settings.vihf.resource_urn == "urn:dmp"
    assert settings.xds.content_type_by_patient_class == {"I": "03", "O": "07", "R": "19", "N": "97", "E": "07"}
    with pytest.raises(ValueError, match="extra"):
        XdsSettings(endpoint=ENDPOINT, source_id="1.2.3", key_password="never here")


def test_an_ec_signing_key_signs_both_signatures(settings, tmp_path):
    from tests.pki import make_pki

    pki = make_pki(tmp_path)
    ec_signer = load_signing_identity(pki.client_cert, key_path=pki.client_key)
    ec_settings = settings.model_copy(update={
        "vihf": settings.vihf.model_copy(update={"signature_algorithm": "ecdsa-sha256"}),
        "xds": settings.xds.model_copy(update={"signature_algorithm": "ecdsa-sha256"})})
    sub = _submission("MDM/Transmission initiale MDM/message_MDM_CR_Radio_INIT_N1_Base64.er7")
    request = _build(sub, ec_settings, ec_signer)
    root, parts = _read_back(request)
    cert = ec_signer.certificate
    XMLVerifier().verify(etree.tostring(root), x509_cert=cert, id_attribute="ID")
    include = root.find(f".//{{{schemas.XDSB_NS}}}Document[@id='{request.signature_entry_uuid}']/"
                        f"{{{schemas.XOP_NS}}}Include")
    XMLVerifier().verify(parts[mtom.cid_of(include.get("href"))], x509_cert=cert, id_attribute="Id",
                         validate_schema=False, expect_config=SignatureConfiguration(expect_references=2))
