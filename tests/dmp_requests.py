"""Hand-built ITI-41 / ITI-57 requests for the DMP simulator's tests (lxml + signxml).

Independent of the engine's request builder on purpose: the simulator's checks are tested
against requests whose every field a test can break. Modelled on the DMP's example
"publication.xml" (DMP/DRIMbox test data) and the CI-SIS VIHF mapping.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from lxml import etree

from engine.xds.mtom import Part, build_related

SOAP = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
DS = "http://www.w3.org/2000/09/xmldsig#"
XDSB = "urn:ihe:iti:xds-b:2007"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
XOP = "http://www.w3.org/2004/08/xop/include"
HL7 = "urn:hl7-org:v3"
ITI41 = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
ITI57 = "urn:ihe:iti:2010:UpdateDocumentSet"


@dataclass
class Signer:
    cert_pem: bytes
    key_pem: bytes

    @property
    def subject(self) -> str:
        from cryptography import x509
        return x509.load_pem_x509_certificate(self.cert_pem).subject.rfc4514_string()


@dataclass
class Doc:
    content: bytes
    entry_uuid: str = field(default_factory=lambda: f"urn:uuid:{uuid.uuid4()}")
    unique_id: str = ""
    confidentiality: str = "N"
    masks: tuple[str, ...] = ()
    format_code: str = "urn:ihe:iti:xds-sd:pdf:2008"
    replaces: str = ""
    hash: Optional[str] = None
    size: Optional[int] = None
    legal_authenticator: str = "801234564895^NUM-PS^Jean^^^^^^&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS"


def cda_facts(cda: bytes) -> tuple[str, str, str]:
    """(patientId, uniqueId, confidentiality) read from a CDA header."""
    root = etree.fromstring(cda, etree.XMLParser(resolve_entities=False, no_network=True))
    h = {"h": HL7}
    pid = next(i for i in root.iterfind("h:recordTarget/h:patientRole/h:id", h)
               if i.get("root", "").startswith("1.2.250.1.213.1.4."))
    doc_id = root.find("h:id", h)
    uid = doc_id.get("root") + (f"^{doc_id.get('extension')}" if doc_id.get("extension") else "")
    return (f"{pid.get('extension')}^^^&{pid.get('root')}&ISO^NH", uid,
            root.find("h:confidentialityCode", h).get("code"))


def _slot(parent, name, *values):
    s = etree.SubElement(parent, f"{{{RIM}}}Slot", name=name)
    vl = etree.SubElement(s, f"{{{RIM}}}ValueList")
    for v in values:
        etree.SubElement(vl, f"{{{RIM}}}Value").text = v
    return s


def _classification(parent, obj_id, scheme, code, coding, cid):
    c = etree.SubElement(parent, f"{{{RIM}}}Classification", classificationScheme=scheme,
                         classifiedObject=obj_id, id=cid, nodeRepresentation=code)
    _slot(c, "codingScheme", coding)
    name = etree.SubElement(c, f"{{{RIM}}}Name")
    etree.SubElement(name, f"{{{RIM}}}LocalizedString", value=code)
    return c


def _external(parent, obj_id, scheme, value, eid, label):
    e = etree.SubElement(parent, f"{{{RIM}}}ExternalIdentifier", id=eid, identificationScheme=scheme,
                         registryObject=obj_id, value=value)
    name = etree.SubElement(e, f"{{{RIM}}}Name")
    etree.SubElement(name, f"{{{RIM}}}LocalizedString", value=label)


AUTHOR = "801234564895^NUM-PS^Jean^^^^^^&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS"


def _submission_set(objs, patient_id):
    ss = etree.SubElement(objs, f"{{{RIM}}}RegistryPackage", id="SubmissionSet01")
    _slot(ss, "submissionTime", "20260101120000")
    a = etree.SubElement(ss, f"{{{RIM}}}Classification", classificationScheme="urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d",
                         classifiedObject="SubmissionSet01", id="cla-ss-author", nodeRepresentation="")
    _slot(a, "authorPerson", AUTHOR)
    _classification(ss, "SubmissionSet01", "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500", "07", "1.2.250.1.213.2.2", "cla-ss-ct")
    etree.SubElement(ss, f"{{{RIM}}}Classification", classificationNode="urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd",
                     classifiedObject="SubmissionSet01", id="cla-ss-node")
    _external(ss, "SubmissionSet01", "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446", patient_id, "ei-ss-pid", "XDSSubmissionSet.patientId")
    _external(ss, "SubmissionSet01", "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832", "1.2.250.1.999.1", "ei-ss-src", "XDSSubmissionSet.sourceId")
    _external(ss, "SubmissionSet01", "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8", f"2.25.{uuid.uuid4().int}", "ei-ss-uid", "XDSSubmissionSet.uniqueId")
    return ss


def _doc_entry(objs, doc: Doc, patient_id: str, i: int):
    eid = doc.entry_uuid
    eo = etree.SubElement(objs, f"{{{RIM}}}ExtrinsicObject", id=eid, mimeType="text/xml",
                          objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1")
    _slot(eo, "creationTime", "20260101110000")
    _slot(eo, "hash", doc.hash if doc.hash is not None else hashlib.sha1(doc.content).hexdigest())
    _slot(eo, "languageCode", "fr-FR")
    if doc.legal_authenticator:
        _slot(eo, "legalAuthenticator", doc.legal_authenticator)
    _slot(eo, "serviceStartTime", "20260101100000")
    _slot(eo, "size", str(doc.size if doc.size is not None else len(doc.content)))
    _slot(eo, "sourcePatientId", patient_id)
    name = etree.SubElement(eo, f"{{{RIM}}}Name")
    etree.SubElement(name, f"{{{RIM}}}LocalizedString", value="CR d'imagerie")
    a = etree.SubElement(eo, f"{{{RIM}}}Classification", classificationScheme="urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d",
                         classifiedObject=eid, id=f"cla{i}-author", nodeRepresentation="")
    _slot(a, "authorPerson", AUTHOR)
    _classification(eo, eid, "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a", "10", "1.2.250.1.213.1.1.4.1", f"cla{i}-class")
    _classification(eo, eid, "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f", doc.confidentiality, "2.16.840.1.113883.5.25", f"cla{i}-conf")
    for k, mask in enumerate(doc.masks):
        _classification(eo, eid, "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f", mask, "1.2.250.1.213.1.1.4.13", f"cla{i}-mask{k}")
    _classification(eo, eid, "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d", doc.format_code, "1.3.6.1.4.1.19376.1.2.3", f"cla{i}-format")
    _classification(eo, eid, "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1", "SA01", "1.2.250.1.71.4.2.4", f"cla{i}-hcft")
    _classification(eo, eid, "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead", "AMBULATOIRE", "1.2.250.1.213.1.1.4.9", f"cla{i}-ps")
    _classification(eo, eid, "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983", "18748-4", "2.16.840.1.113883.6.1", f"cla{i}-type")
    _external(eo, eid, "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427", patient_id, f"ei{i}-pid", "XDSDocumentEntry.patientId")
    _external(eo, eid, "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab", doc.unique_id, f"ei{i}-uid", "XDSDocumentEntry.uniqueId")
    return eo


def vihf(signer: Signer, patient_id: str, *, version: str = "3.0", drop: tuple[str, ...] = (),
         tamper: Optional[Callable] = None, overrides: Optional[dict] = None) -> etree._Element:
    """A signed VIHF for an automated sender (guide « Exemple d'un VIHF avec automate »)."""
    from signxml import XMLSigner, methods

    aid = f"_{uuid.uuid4()}"
    a = etree.Element(f"{{{SAML}}}Assertion", nsmap={"saml2": SAML}, ID=aid,
                      IssueInstant="2026-01-01T12:00:00Z", Version="2.0")
    etree.SubElement(a, f"{{{SAML}}}Issuer", Format="urn:oasis:names:tc:SAML:1.1:nameid-format:X509SubjectName").text = signer.subject
    etree.SubElement(a, f"{{{DS}}}Signature", nsmap={"ds": DS}, Id="placeholder")
    subj = etree.SubElement(a, f"{{{SAML}}}Subject")
    etree.SubElement(subj, f"{{{SAML}}}NameID").text = "801234564895"
    authn = etree.SubElement(a, f"{{{SAML}}}AuthnStatement", AuthnInstant="2026-01-01T12:00:00Z")
    ctx = etree.SubElement(authn, f"{{{SAML}}}AuthnContext")
    etree.SubElement(ctx, f"{{{SAML}}}AuthnContextClassRef").text = "urn:oasis:names:tc:SAML:2.0:ac:classes:unspecified"
    st = etree.SubElement(a, f"{{{SAML}}}AttributeStatement")
    attrs = {
        "VIHF_Version": version, "Authentification_Mode": "INDIRECTE",
        "Secteur_Activite": "SA07^1.2.250.1.71.4.2.4",
        "urn:oasis:names:tc:xacml:2.0:resource:resource-id": patient_id, "Ressource_URN": "urn:dmp",
        "urn:oasis:names:tc:xspa:1.0:subject:subject-id": "mini-PFI, DMP connector",
        "Identifiant_Structure": "1120456789", "LPS_Nom": "mini-PFI", "LPS_Version": "1.0",
        "LPS_ID_HOMOLOGATION_DMP": "TEST-0001",
    }
    attrs.update(overrides or {})
    for name, value in attrs.items():
        if name in drop:
            continue
        at = etree.SubElement(st, f"{{{SAML}}}Attribute", Name=name)
        etree.SubElement(at, f"{{{SAML}}}AttributeValue").text = value
    for name, tag, code, system in (
        ("urn:oasis:names:tc:xspa:1.0:subject:purposeofuse", "PurposeOfUse", "normal", "1.2.250.1.213.1.1.4.248"),
        ("urn:oasis:names:tc:xacml:2.0:subject:role", "Role", "AUTOMATE", "1.2.250.1.213.1.1.4.6"),
    ):
        if name in drop:
            continue
        at = etree.SubElement(st, f"{{{SAML}}}Attribute", Name=name)
        v = etree.SubElement(at, f"{{{SAML}}}AttributeValue")
        etree.SubElement(v, f"{{{HL7}}}{tag}", nsmap={None: HL7}, code=code, codeSystem=system)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    key = load_pem_private_key(signer.key_pem, None)
    signed = XMLSigner(method=methods.enveloped, signature_algorithm="rsa-sha256", digest_algorithm="sha256",
                       c14n_algorithm="http://www.w3.org/2001/10/xml-exc-c14n#").sign(
        a, key=key, cert=signer.cert_pem.decode("ascii"), reference_uri=aid, id_attribute="ID")
    if tamper is not None:
        tamper(signed)
    return signed


def envelope(action: str, body_child, assertion, *, message_id: Optional[str] = None,
             must_understand: bool = True, to: str = "https://localhost/dmp") -> tuple[bytes, str]:
    env = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"soap": SOAP})
    header = etree.SubElement(env, f"{{{SOAP}}}Header")
    mid = message_id or f"urn:uuid:{uuid.uuid4()}"
    etree.SubElement(header, f"{{{WSA}}}MessageID", nsmap={None: WSA}).text = mid
    etree.SubElement(header, f"{{{WSA}}}To", nsmap={None: WSA}).text = to
    act = etree.SubElement(header, f"{{{WSA}}}Action", nsmap={None: WSA})
    act.text = action
    if must_understand:
        act.set(f"{{{SOAP}}}mustUnderstand", "true")
    if assertion is not None:
        sec = etree.SubElement(header, f"{{{WSSE}}}Security", nsmap={"wsse": WSSE})
        sec.append(assertion)
    etree.SubElement(env, f"{{{SOAP}}}Body").append(body_child)
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8"), mid


def iti41(signer: Signer, docs: list[Doc], patient_id: str, *, assertion="auto",
          message_id: Optional[str] = None, mutate: Optional[Callable] = None,
          must_understand: bool = True) -> tuple[bytes, str, str]:
    """(body, Content-Type, MessageID) of an ITI-41 request with one entry per doc."""
    req = etree.Element(f"{{{XDSB}}}ProvideAndRegisterDocumentSetRequest", nsmap={"xdsb": XDSB, "lcm": LCM, "rim": RIM})
    sor = etree.SubElement(req, f"{{{LCM}}}SubmitObjectsRequest")
    objs = etree.SubElement(sor, f"{{{RIM}}}RegistryObjectList")
    _submission_set(objs, patient_id)
    for i, d in enumerate(docs):
        _doc_entry(objs, d, patient_id, i)
    for i, d in enumerate(docs):
        hm = etree.SubElement(objs, f"{{{RIM}}}Association", id=f"urn:uuid:{uuid.uuid4()}",
                              associationType="urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember",
                              sourceObject="SubmissionSet01", targetObject=d.entry_uuid)
        _slot(hm, "SubmissionSetStatus", "Original")
        if d.replaces:
            etree.SubElement(objs, f"{{{RIM}}}Association", id=f"urn:uuid:{uuid.uuid4()}",
                             associationType="urn:ihe:iti:2007:AssociationType:RPLC",
                             sourceObject=d.entry_uuid, targetObject=d.replaces)
    parts = []
    for i, d in enumerate(docs):
        el = etree.SubElement(req, f"{{{XDSB}}}Document", id=d.entry_uuid)
        cid = f"doc{i}@minipfi"
        etree.SubElement(el, f"{{{XOP}}}Include", nsmap={"xop": XOP}, href=f"cid:{cid}")
        parts.append(Part(cid, "text/xml", d.content))
    if mutate is not None:
        mutate(req)
    a = vihf(signer, patient_id) if assertion == "auto" else assertion
    env, mid = envelope(ITI41, req, a, message_id=message_id, must_understand=must_understand)
    body, ct = build_related(env, parts, action=ITI41)
    return body, ct, mid


def iti57_delete(signer: Signer, target_uuid: str, patient_id: str) -> tuple[bytes, str, str]:
    """An ITI-57 availability-status update Approved -> Deprecated of one entry."""
    req = etree.Element(f"{{{LCM}}}SubmitObjectsRequest", nsmap={"lcm": LCM, "rim": RIM})
    objs = etree.SubElement(req, f"{{{RIM}}}RegistryObjectList")
    _submission_set(objs, patient_id)
    assoc = etree.SubElement(objs, f"{{{RIM}}}Association", id="urn:uuid:%s" % uuid.uuid4(),
                             associationType="urn:ihe:iti:2010:AssociationType:UpdateAvailabilityStatus",
                             sourceObject="SubmissionSet01", targetObject=target_uuid)
    _slot(assoc, "OriginalStatus", "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved")
    _slot(assoc, "NewStatus", "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated")
    hm = etree.SubElement(objs, f"{{{RIM}}}Association", id=f"urn:uuid:{uuid.uuid4()}",
                          associationType="urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember",
                          sourceObject="SubmissionSet01", targetObject=assoc.get("id"))
    _slot(hm, "SubmissionSetStatus", "Original")
    env, mid = envelope(ITI57, req, vihf(signer, patient_id))
    body, ct = build_related(env, [], action=ITI57)
    return body, ct, mid
