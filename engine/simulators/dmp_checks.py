"""What the DMP simulator checks in an ITI-41 / ITI-57 request: pure, no sockets, no Twisted.

The checks are written from the guides, not from the engine's request builder, so that a test
sending the builder's output to the simulator proves something:

* envelope and WS-Addressing (IHE ITI TF-2x Appendix V §V.3.2: ``MessageID``, ``To`` and
  ``Action`` with ``mustUnderstand``; the Action names the transaction), then the XDS.b XSDs;
* the VIHF (CI-SIS "Transmission de documents CDA en HL7 v2", mapping « Mapping VIHF pour le DMP »
  and « Exemple d'un VIHF avec automate »): a SAML 2.0 assertion in ``wsse:Security``, its
  enveloped signature verified with signxml against a trusted signer CA or certificate, the
  Issuer equal to the signing certificate's subject DN, and the attributes the mapping requires;
* the metadata (same guide, « Mapping XDS »; IHE ITI TF-3 §4.2.3; ``lien-entete-cda-meta-xds``):
  SHA-1 hash and size of the attached bytes, patientId a qualified INS
  (``<INS>^^^&<OID>&ISO^NH`` with an INS OID and a valid key) equal in the submission set, every
  entry and the VIHF resource-id, formatCode (N1 ``urn:ihe:iti:xds-sd:pdf:2008``), one
  confidentiality code N/R/V equal to the CDA's plus at most one classification per DMP mask
  (value set JDV_J08-XdsConfidentialityCode-CISIS), author and legalAuthenticator present,
  HasMember for every entry, RPLC to an entry accepted before, ITI-57 targets known (status
  Approved -> Deprecated, or Deleted, the DMP's deletion).

A failed check is a :class:`Refusal`: a SOAP fault for what WS-Security (§12) or WS-Addressing
(SOAP binding §6) define as faults, a ``RegistryError`` (ITI TF-3 Table 4.2.4.1-2 codes) for the
rest. Texts are technical: no patient value is quoted in them.
"""
from __future__ import annotations

import base64
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from typing import Mapping, Optional

from lxml import etree

from engine.identity.ins import nir_format_problem
from engine.identity.model import OID_INS_NIA, OID_INS_NIR, OID_INS_NIR_DEMO, OID_INS_NIR_TEST
from engine.xds import schemas
from engine.xds.mtom import MTOMError, Related, cid_of

SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
WSA_NS = "http://www.w3.org/2005/08/addressing"
WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
SAML_NS = "urn:oasis:names:tc:SAML:2.0:assertion"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
XDSB_NS = "urn:ihe:iti:xds-b:2007"
LCM_NS = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RIM_NS = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
XOP_NS = "http://www.w3.org/2004/08/xop/include"
HL7_NS = "urn:hl7-org:v3"

ITI41_ACTION = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
ITI57_ACTION = "urn:ihe:iti:2010:UpdateDocumentSet"

# ebRIM / XDS identifiers (IHE ITI TF-3 §4.2.5, Table 4.2.5-1).
DOC_ENTRY_TYPE = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
SUBMISSION_SET_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_CONTENT_TYPE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
SS_AUTHOR = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
DE_SCHEMES = {
    "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d": "author",
    "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a": "classCode",
    "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f": "confidentialityCode",
    "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4": "eventCodeList",
    "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d": "formatCode",
    "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1": "healthcareFacilityTypeCode",
    "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead": "practiceSettingCode",
    "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983": "typeCode",
}
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
RPLC = "urn:ihe:iti:2007:AssociationType:RPLC"
SIGNS = "urn:ihe:iti:2007:AssociationType:signs"
UPDATE_STATUS = "urn:ihe:iti:2010:AssociationType:UpdateAvailabilityStatus"
STATUS_APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
STATUS_DEPRECATED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"
# The DMP's deletion (its transaction TD3.3c): ITI-57 UpdateAvailabilityStatus to this status,
# « Version dépubliée » of the ANS terminology TRE_R270-AvailabilityStatus.
STATUS_DELETED = "urn:asip:ci-sis:2010:StatusType:Deleted"

# CI-SIS JDV_J08-XdsConfidentialityCode-CISIS.
CONFIDENTIALITY_SYSTEM = "2.16.840.1.113883.5.25"
CONFIDENTIALITY_CODES = frozenset({"N", "R", "V"})
MASK_SYSTEM = "1.2.250.1.213.1.1.4.13"
MASK_CODES = frozenset({"MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REPRESENTANTS_LEGAUX"})
# Guide « Mapping XDS »: formatCode of a CDA R2 N1 (PDF in nonXMLBody); IHE DSG for the
# XAdES signature entry of the DMP's example (classCode urn:oid:1.3.6.1.4.1.19376.1.2.1.1.1).
FORMAT_N1 = "urn:ihe:iti:xds-sd:pdf:2008"
SIGNATURE_CLASS = "urn:oid:1.3.6.1.4.1.19376.1.2.1.1.1"
FORMAT_SIGNATURE = "http://www.w3.org/2000/09/xmldsig#"
INS_OIDS = frozenset({OID_INS_NIR, OID_INS_NIA, OID_INS_NIR_TEST, OID_INS_NIR_DEMO})

# VIHF attributes the mapping marks as required (LPS_ID is optional).
VIHF_REQUIRED = (
    "VIHF_Version", "Authentification_Mode", "Identifiant_Structure", "Secteur_Activite",
    "urn:oasis:names:tc:xspa:1.0:subject:subject-id", "urn:oasis:names:tc:xacml:2.0:subject:role",
    "urn:oasis:names:tc:xacml:2.0:resource:resource-id", "Ressource_URN",
    "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse", "LPS_Nom", "LPS_Version",
    "LPS_ID_HOMOLOGATION_DMP",
)
RESOURCE_ID = "urn:oasis:names:tc:xacml:2.0:resource:resource-id"

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """One failed rule. ``fault_ns`` set: answer a SOAP fault with Subcode ``{fault_ns}code``;
    empty: a RegistryError with errorCode ``code``."""

    code: str
    context: str
    location: str = ""
    fault_ns: str = ""

    @property
    def is_fault(self) -> bool:
        return bool(self.fault_ns)


@dataclass
class DocumentEntry:
    """One DocumentEntry as the simulator accepted it (the fields a test compares)."""

    entry_id: str
    entry_uuid: str
    unique_id: str
    mime_type: str
    patient_id: str
    hash: str
    size: int
    content: bytes
    codes: dict[str, list[tuple[str, str]]]          # classification name -> [(code, scheme)]
    slots: dict[str, list[str]]
    authors: list[dict[str, list[str]]]
    replaces: str = ""                               # entryUUID of the RPLC target
    is_signature: bool = False
    duplicate_of: str = ""                           # same uniqueId and bytes accepted before

    def code(self, name: str) -> str:
        values = self.codes.get(name) or []
        return values[0][0] if values else ""

    @property
    def confidentiality(self) -> str:
        return next((c for c, s in self.codes.get("confidentialityCode", []) if s == CONFIDENTIALITY_SYSTEM), "")

    @property
    def masks(self) -> frozenset[str]:
        return frozenset(c for c, s in self.codes.get("confidentialityCode", []) if s == MASK_SYSTEM)

    def summary(self) -> dict:
        return {
            "entry_id": self.entry_id, "entry_uuid": self.entry_uuid, "unique_id": self.unique_id,
            "mime_type": self.mime_type, "patient_id": self.patient_id, "hash": self.hash,
            "size": self.size, "codes": {k: [list(x) for x in v] for k, v in self.codes.items()},
            "slots": self.slots, "authors": self.authors, "replaces": self.replaces,
            "is_signature": self.is_signature, "duplicate_of": self.duplicate_of,
        }


@dataclass
class Submission:
    """An accepted request: ITI-41 documents, or ITI-57 status updates (deletions)."""

    action: str
    message_id: str
    patient_id: str
    submission_set: dict
    documents: list[DocumentEntry] = field(default_factory=list)
    status_updates: list[dict] = field(default_factory=list)   # {"target", "from", "to"}
    vihf: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "action": self.action, "message_id": self.message_id, "patient_id": self.patient_id,
            "submission_set": self.submission_set,
            "documents": [d.summary() for d in self.documents],
            "status_updates": self.status_updates, "vihf": self.vihf,
        }


@dataclass(frozen=True)
class CheckResult:
    message_id: str
    action: str
    refusals: tuple[Refusal, ...] = ()
    submission: Optional[Submission] = None

    @property
    def accepted(self) -> bool:
        return not self.refusals and self.submission is not None


@dataclass(frozen=True)
class KnownEntry:
    """What the simulator remembers of an accepted entry."""

    entry_uuid: str
    unique_id: str
    patient_id: str
    hash: str = ""
    status: str = STATUS_APPROVED
    replaces: str = ""


@dataclass(frozen=True)
class VihfTrust:
    """Who may sign a VIHF: a CA bundle (chain verified by signxml / cryptography) or one pinned
    certificate, both PEM paths; the accepted VIHF_Version values (the guide's table says 4.0,
    both its examples 3.0) and Authentification_Mode."""

    ca_pem: Optional[str] = None
    cert_pem: Optional[str] = None
    versions: frozenset[str] = frozenset({"4.0", "3.0"})
    authentication_mode: str = "INDIRECTE"


class _Stop(Exception):
    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal


def _wsa_fault(code: str, context: str) -> Refusal:
    return Refusal(code, context, fault_ns=WSA_NS)


def _wsse_fault(code: str, context: str) -> Refusal:
    return Refusal(code, context, fault_ns=WSSE_NS)


# --------------------------------------------------------------------------------------------
# Envelope, WS-Addressing, XSD
# --------------------------------------------------------------------------------------------

def _text(el) -> str:
    return "".join(el.itertext()).strip() if el is not None else ""


def _must_understand(el) -> bool:
    return el.get(f"{{{SOAP12_NS}}}mustUnderstand", el.get("mustUnderstand", "")).strip() in ("true", "1")


def parse_envelope(related: Related) -> etree._Element:
    xml = related.root.lstrip()
    if b"<!DOCTYPE" in xml[:4096]:
        raise _Stop(Refusal("XDSRepositoryError", "a SOAP message must not carry a DTD", fault_ns=SOAP12_NS))
    try:
        env = etree.fromstring(xml, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise _Stop(Refusal("XDSRepositoryError", f"the SOAP envelope is not well-formed (line {exc.lineno})",
                            fault_ns=SOAP12_NS)) from None
    if env.tag != f"{{{SOAP12_NS}}}Envelope":
        raise _Stop(Refusal("VersionMismatch", "not a SOAP 1.2 Envelope", fault_ns=SOAP12_NS))
    return env


def read_addressing(env: etree._Element) -> tuple[str, str]:
    """(MessageID, Action), whatever their validity, for the answer's RelatesTo."""
    header = env.find(f"{{{SOAP12_NS}}}Header")
    if header is None:
        return "", ""
    return _text(header.find(f"{{{WSA_NS}}}MessageID")), _text(header.find(f"{{{WSA_NS}}}Action"))


def check_addressing(env: etree._Element, *, mime_action: str = "", expected_to: str = "") -> str:
    """The transaction's Action, after the WS-Addressing checks (faults per WS-Addressing 1.0
    SOAP Binding §6.4: MessageAddressingHeaderRequired, InvalidAddressingHeader, ActionNotSupported)."""
    header = env.find(f"{{{SOAP12_NS}}}Header")
    if header is None:
        raise _Stop(_wsa_fault("MessageAddressingHeaderRequired", "SOAP Header missing"))
    for name in ("MessageID", "To", "Action"):
        found = header.findall(f"{{{WSA_NS}}}{name}")
        if not found or not _text(found[0]):
            raise _Stop(_wsa_fault("MessageAddressingHeaderRequired", f"wsa:{name} missing"))
        if len(found) > 1:
            raise _Stop(_wsa_fault("InvalidAddressingHeader", f"wsa:{name} given twice"))
    action_el = header.find(f"{{{WSA_NS}}}Action")
    action = _text(action_el)
    if not _must_understand(action_el):
        raise _Stop(_wsa_fault("InvalidAddressingHeader", "wsa:Action without mustUnderstand=\"true\""))
    if action not in (ITI41_ACTION, ITI57_ACTION):
        raise _Stop(_wsa_fault("ActionNotSupported", "wsa:Action is not ITI-41 nor ITI-57"))
    if mime_action and mime_action != action:
        raise _Stop(_wsa_fault("InvalidAddressingHeader", "the MIME action parameter differs from wsa:Action"))
    if expected_to and _text(header.find(f"{{{WSA_NS}}}To")) != expected_to:
        raise _Stop(_wsa_fault("InvalidAddressingHeader", "wsa:To is not this endpoint"))
    body = env.find(f"{{{SOAP12_NS}}}Body")
    children = [c for c in body if isinstance(c.tag, str)] if body is not None else []
    want = f"{{{XDSB_NS}}}ProvideAndRegisterDocumentSetRequest" if action == ITI41_ACTION else f"{{{LCM_NS}}}SubmitObjectsRequest"
    if len(children) != 1 or children[0].tag != want:
        raise _Stop(_wsa_fault("ActionMismatch", "the Body element does not match wsa:Action"))
    return action


def check_schema(env: etree._Element, action: str) -> None:
    """The XDS.b XSDs. The attachments stand as empty base64 in the XOP infoset: that each
    xop:Include names a MIME part is checked with the metadata (XDSMissingDocument), and
    encoding the documents in base64 only to validate them cost half the validation's time."""
    errors = (schemas.validate_iti41(env) if action == ITI41_ACTION
              else schemas.validate_iti57(env))
    if errors:
        line = re.match(r"line (\d+)", errors[0])
        where = f" (first at line {line.group(1)})" if line else ""
        code = "XDSRepositoryMetadataError" if action == ITI41_ACTION else "XDSRegistryMetadataError"
        raise _Stop(Refusal(code, f"the request does not conform to the XDS.b schemas: "
                                  f"{len(errors)} error(s){where}"))


# --------------------------------------------------------------------------------------------
# VIHF
# --------------------------------------------------------------------------------------------

def _dn_parts(dn: str) -> frozenset[tuple[str, str]]:
    """``"C=FR, O=x, CN=y"`` -> {("C","FR"),...}: RDN order and spacing do not matter."""
    parts = set()
    for piece in re.split(r"(?<!\\),", dn):
        key, eq, value = piece.partition("=")
        if eq:
            parts.add((key.strip().upper(), value.strip()))
    return frozenset(parts)


def _attributes(assertion) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for attr in assertion.iterfind(f"{{{SAML_NS}}}AttributeStatement/{{{SAML_NS}}}Attribute"):
        values = []
        for v in attr.iterfind(f"{{{SAML_NS}}}AttributeValue"):
            child = next((c for c in v if isinstance(c.tag, str)), None)
            values.append(child.get("code", "") if child is not None else _text(v))
        out.setdefault(attr.get("Name", ""), []).extend(values)
    return out


def _signing_cert(result, pinned: Optional[str]):
    """The certificate whose key verified the signature: the pinned one, or the KeyInfo's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if pinned:
        candidates = [x509.load_pem_x509_certificate(pinned.encode("ascii"))]
    else:
        candidates = []
        for el in result.signature_xml.iter(f"{{{DS_NS}}}X509Certificate"):
            try:
                candidates.append(x509.load_der_x509_certificate(base64.b64decode("".join(el.itertext()))))
            except ValueError:
                continue
    for cert in candidates:
        pem = cert.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        if pem.strip() == result.signature_key.strip():
            return cert
    return None


def check_vihf(env: etree._Element, trust: VihfTrust) -> dict[str, list[str]]:
    """Verify the VIHF's signature and required content; its attributes (from the signed
    copy) when it passes. Faults per WS-Security 1.0 §12: InvalidSecurity, FailedCheck,
    InvalidSecurityToken, FailedAuthentication."""
    from signxml import InvalidInput, InvalidSignature, XMLVerifier   # heavy import, off the module load

    header = env.find(f"{{{SOAP12_NS}}}Header")
    security = header.find(f"{{{WSSE_NS}}}Security") if header is not None else None
    assertion = security.find(f"{{{SAML_NS}}}Assertion") if security is not None else None
    if assertion is None:
        raise _Stop(_wsse_fault("InvalidSecurity", "no VIHF (saml2:Assertion in wsse:Security)"))
    assertion_id = assertion.get("ID", "")
    if not assertion_id:
        raise _Stop(_wsse_fault("InvalidSecurityToken", "the VIHF has no ID"))
    signature = assertion.find(f"{{{DS_NS}}}Signature")
    if signature is None:
        raise _Stop(_wsse_fault("InvalidSecurity", "the VIHF is not signed"))
    refs = signature.findall(f"{{{DS_NS}}}SignedInfo/{{{DS_NS}}}Reference")
    if len(refs) != 1 or refs[0].get("URI") != f"#{assertion_id}":
        raise _Stop(_wsse_fault("FailedCheck", "the VIHF signature does not reference the assertion's ID"))
    kwargs: dict = {}
    if trust.cert_pem:
        with open(trust.cert_pem, "rb") as fh:
            kwargs["x509_cert"] = fh.read().decode("ascii")
    elif trust.ca_pem:
        kwargs["ca_pem_file"] = trust.ca_pem
    else:
        raise ValueError("VihfTrust needs a CA bundle or a certificate")
    data = etree.tostring(assertion)
    try:
        result = XMLVerifier().verify(data, id_attribute="ID", **kwargs)
    except (InvalidSignature, InvalidInput) as exc:
        kind = "FailedAuthentication" if "cert" in str(exc).lower() else "FailedCheck"
        raise _Stop(_wsse_fault(kind, f"VIHF signature rejected ({type(exc).__name__})")) from None
    signed = result.signed_xml
    if signed is None or signed.tag != f"{{{SAML_NS}}}Assertion" or signed.get("ID") != assertion_id:
        raise _Stop(_wsse_fault("FailedCheck", "the signed element is not the VIHF assertion"))
    cert = _signing_cert(result, kwargs.get("x509_cert"))
    issuer = signed.find(f"{{{SAML_NS}}}Issuer")
    if issuer is None or cert is None or _dn_parts(_text(issuer)) != _dn_parts(cert.subject.rfc4514_string()):
        raise _Stop(_wsse_fault("InvalidSecurityToken", "VIHF Issuer is not the signing certificate's subject DN"))
    if not _text(signed.find(f"{{{SAML_NS}}}Subject/{{{SAML_NS}}}NameID")):
        raise _Stop(_wsse_fault("InvalidSecurityToken", "VIHF Subject/NameID missing"))
    if not _text(signed.find(f"{{{SAML_NS}}}AuthnStatement/{{{SAML_NS}}}AuthnContext/{{{SAML_NS}}}AuthnContextClassRef")):
        raise _Stop(_wsse_fault("InvalidSecurityToken", "VIHF AuthnContextClassRef missing"))
    if not signed.get("IssueInstant"):
        raise _Stop(_wsse_fault("InvalidSecurityToken", "VIHF IssueInstant missing"))
    attrs = _attributes(signed)
    for name in VIHF_REQUIRED:
        if not any(v.strip() for v in attrs.get(name, [])):
            raise _Stop(_wsse_fault("InvalidSecurityToken", f"VIHF attribute {name} missing"))
    if attrs["VIHF_Version"][0] not in trust.versions:
        raise _Stop(_wsse_fault("InvalidSecurityToken", "VIHF_Version not accepted"))
    if attrs["Authentification_Mode"][0] != trust.authentication_mode:
        raise _Stop(_wsse_fault("InvalidSecurityToken", "Authentification_Mode not accepted"))
    if not re.fullmatch(r"[^^\s]+\^[0-9]+(\.[0-9]+)+", attrs["Secteur_Activite"][0].strip()):
        raise _Stop(_wsse_fault("InvalidSecurityToken", "Secteur_Activite is not code^OID"))
    if attrs["Ressource_URN"][0] != "urn:dmp":
        raise _Stop(_wsse_fault("InvalidSecurityToken", "Ressource_URN is not urn:dmp"))
    if attrs["urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"][0] != "normal":
        raise _Stop(_wsse_fault("InvalidSecurityToken", "purposeofuse is not normal"))
    return attrs


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------

def _slots(obj) -> dict[str, list[str]]:
    return {s.get("name", ""): [_text(v) for v in s.iterfind(f"{{{RIM_NS}}}ValueList/{{{RIM_NS}}}Value")]
            for s in obj.iterfind(f"{{{RIM_NS}}}Slot")}


def _external_id(obj, scheme: str) -> str:
    for ei in obj.iterfind(f"{{{RIM_NS}}}ExternalIdentifier"):
        if ei.get("identificationScheme") == scheme:
            return ei.get("value", "")
    return ""


def ins_problem(patient_id: str) -> Optional[str]:
    """None when ``patient_id`` is a qualified INS in CX form ``<INS>^^^&<OID>&ISO^NH``."""
    m = re.fullmatch(r"([0-9A-Za-z]{15})\^\^\^&([0-9.]+)&ISO\^NH", patient_id or "")
    if not m:
        return "patientId is not an INS in the form <INS>^^^&<OID>&ISO^NH"
    if m.group(2) not in INS_OIDS:
        return "patientId assigning authority is not an INS OID"
    problem = nir_format_problem(m.group(1))
    return f"patientId: {problem}" if problem else None


def _cda_facts(content: bytes) -> Optional[dict]:
    """What the checks compare in a CDA R2 header; None when the bytes are not a CDA."""
    try:
        root = etree.fromstring(content, _PARSER)
    except etree.XMLSyntaxError:
        return None
    if root.tag != f"{{{HL7_NS}}}ClinicalDocument":
        return None
    h = {"h": HL7_NS}
    ins = ""
    for id_el in root.iterfind("h:recordTarget/h:patientRole/h:id", h):
        if id_el.get("root") in INS_OIDS:
            ins = f"{id_el.get('extension', '')}^^^&{id_el.get('root')}&ISO^NH"
            break
    doc_id = root.find("h:id", h)
    uid_root = doc_id.get("root", "") if doc_id is not None else ""
    uid_ext = doc_id.get("extension", "") if doc_id is not None else ""
    conf = root.find("h:confidentialityCode", h)
    return {
        "n1": root.find("h:component/h:nonXMLBody", h) is not None,
        "ins": ins,
        "unique_ids": {uid_root, f"{uid_root}^{uid_ext}"} if uid_ext else {uid_root},
        "confidentiality": conf.get("code", "") if conf is not None else "",
        "legal_authenticator": root.find("h:legalAuthenticator", h) is not None,
    }


def _classifications(obj) -> tuple[dict[str, list[tuple[str, str]]], list[dict[str, list[str]]]]:
    codes: dict[str, list[tuple[str, str]]] = {}
    authors = []
    for c in obj.iterfind(f"{{{RIM_NS}}}Classification"):
        name = DE_SCHEMES.get(c.get("classificationScheme", ""))
        if name is None:
            continue
        if name == "author":
            authors.append(_slots(c))
            continue
        scheme = (_slots(c).get("codingScheme") or [""])[0]
        codes.setdefault(name, []).append((c.get("nodeRepresentation", ""), scheme))
    return codes, authors


def _entry(eo, docs: Mapping[str, bytes], location: str) -> DocumentEntry:
    entry_id = eo.get("id", "")
    if entry_id not in docs:
        raise _Stop(Refusal("XDSMissingDocument", "a DocumentEntry has no Document attached", location))
    content = docs[entry_id]
    slots = _slots(eo)
    codes, authors = _classifications(eo)
    hash_slot = (slots.get("hash") or [""])[0].lower()
    size_slot = (slots.get("size") or [""])[0]
    if hash_slot and hash_slot != hashlib.sha1(content).hexdigest():
        raise _Stop(Refusal("XDSRepositoryMetadataError",
                            "hash is not the SHA-1 of the attached document (ITI TF-2b §3.41.4.1.3)", location))
    if size_slot and size_slot != str(len(content)):
        raise _Stop(Refusal("XDSRepositoryMetadataError",
                            "size is not the length of the attached document (ITI TF-2b §3.41.4.1.3)", location))
    unique_id = _external_id(eo, DE_UNIQUE_ID)
    if not unique_id:
        raise _Stop(Refusal("XDSRegistryMetadataError", "DocumentEntry.uniqueId missing", location))
    entry_uuid = entry_id if entry_id.startswith("urn:uuid:") else f"urn:uuid:{uuid.uuid4()}"
    return DocumentEntry(
        entry_id=entry_id, entry_uuid=entry_uuid, unique_id=unique_id,
        mime_type=eo.get("mimeType", ""), patient_id=_external_id(eo, DE_PATIENT_ID),
        hash=hashlib.sha1(content).hexdigest(), size=len(content), content=content,
        codes=codes, slots=slots, authors=authors,
        is_signature=any(c == SIGNATURE_CLASS for c, _ in codes.get("classCode", [])),
    )


def _check_entry_rules(entry: DocumentEntry, ss_patient: str) -> None:
    loc = entry.entry_id
    if entry.patient_id != ss_patient:
        raise _Stop(Refusal("XDSPatientIdDoesNotMatch",
                            "DocumentEntry.patientId differs from the submission set's", loc))
    for name in ("classCode", "typeCode", "formatCode", "healthcareFacilityTypeCode", "practiceSettingCode"):
        if len(entry.codes.get(name, [])) != 1 or not entry.codes[name][0][0]:
            raise _Stop(Refusal("XDSRegistryMetadataError", f"DocumentEntry.{name}: exactly one code required", loc))
    conf = entry.codes.get("confidentialityCode", [])
    levels = [c for c, s in conf if s == CONFIDENTIALITY_SYSTEM]
    masks = [c for c, s in conf if s == MASK_SYSTEM]
    if len(levels) != 1 or levels[0] not in CONFIDENTIALITY_CODES:
        raise _Stop(Refusal("XDSRegistryMetadataError",
                            "confidentialityCode: exactly one of N, R, V (2.16.840.1.113883.5.25)", loc))
    if len(levels) + len(masks) != len(conf) or not set(masks) <= MASK_CODES:
        raise _Stop(Refusal("XDSRegistryMetadataError",
                            "confidentialityCode: a code outside JDV_J08-XdsConfidentialityCode-CISIS", loc))
    if len(set(masks)) != len(masks):
        raise _Stop(Refusal("XDSRegistryMetadataError", "confidentialityCode: a mask classified twice", loc))
    if not any(a.get("authorPerson") and a["authorPerson"][0] for a in entry.authors):
        raise _Stop(Refusal("XDSRegistryMetadataError", "DocumentEntry.author (authorPerson) missing", loc))
    if not (entry.slots.get("legalAuthenticator") or [""])[0]:
        raise _Stop(Refusal("XDSRegistryMetadataError", "DocumentEntry.legalAuthenticator missing", loc))
    for slot in ("creationTime", "languageCode", "sourcePatientId", "hash", "size"):
        if not (entry.slots.get(slot) or [""])[0]:
            raise _Stop(Refusal("XDSRegistryMetadataError", f"DocumentEntry.{slot} missing", loc))
    fmt = entry.code("formatCode")
    if entry.is_signature:
        if fmt != FORMAT_SIGNATURE:
            raise _Stop(Refusal("XDSRegistryMetadataError", "signature entry formatCode is not xmldsig", loc))
        return
    if entry.mime_type != "text/xml":
        return
    cda = _cda_facts(entry.content)
    if cda is None:
        raise _Stop(Refusal("XDSRepositoryMetadataError", "a text/xml entry is not a CDA R2 document", loc))
    if cda["n1"] and fmt != FORMAT_N1:
        raise _Stop(Refusal("XDSRegistryMetadataError", f"formatCode of a CDA N1 must be {FORMAT_N1}", loc))
    if not cda["n1"] and fmt == FORMAT_N1:
        raise _Stop(Refusal("XDSRegistryMetadataError", "formatCode says N1 for a structured CDA", loc))
    if cda["ins"] != entry.patient_id:
        raise _Stop(Refusal("XDSPatientIdDoesNotMatch", "patientId is not the CDA recordTarget's INS", loc))
    if entry.unique_id not in cda["unique_ids"]:
        raise _Stop(Refusal("XDSRegistryMetadataError", "uniqueId is not the CDA's id", loc))
    if levels[0] != cda["confidentiality"]:
        raise _Stop(Refusal("XDSRegistryMetadataError",
                            "confidentialityCode differs from the CDA's confidentialityCode", loc))
    if not cda["legal_authenticator"]:
        raise _Stop(Refusal("XDSRegistryMetadataError", "the CDA has no legalAuthenticator", loc))


def _submission_set(objects) -> tuple[etree._Element, dict]:
    packages = [p for p in objects.iterfind(f"{{{RIM_NS}}}RegistryPackage")
                if any(c.get("classificationNode") == SUBMISSION_SET_NODE
                       for c in p.iterfind(f"{{{RIM_NS}}}Classification"))]
    if len(packages) != 1:
        raise _Stop(Refusal("XDSRegistryMetadataError", "exactly one SubmissionSet required"))
    ss = packages[0]
    info = {
        "id": ss.get("id", ""),
        "patient_id": _external_id(ss, SS_PATIENT_ID),
        "unique_id": _external_id(ss, SS_UNIQUE_ID),
        "source_id": _external_id(ss, SS_SOURCE_ID),
        "submission_time": (_slots(ss).get("submissionTime") or [""])[0],
        "content_type": next((c.get("nodeRepresentation", "") for c in ss.iterfind(f"{{{RIM_NS}}}Classification")
                              if c.get("classificationScheme") == SS_CONTENT_TYPE), ""),
        "author": [_slots(c) for c in ss.iterfind(f"{{{RIM_NS}}}Classification")
                   if c.get("classificationScheme") == SS_AUTHOR],
    }
    for key in ("unique_id", "source_id", "submission_time", "content_type"):
        if not info[key]:
            raise _Stop(Refusal("XDSRegistryMetadataError", f"SubmissionSet.{key} missing", info["id"]))
    if not any(a.get("authorPerson") for a in info["author"]):
        raise _Stop(Refusal("XDSRegistryMetadataError", "SubmissionSet.author (authorPerson) missing", info["id"]))
    problem = ins_problem(info["patient_id"])
    if problem:
        raise _Stop(Refusal("XDSRegistryMetadataError", problem, info["id"]))
    return ss, info


def _attachments(request, related: Related) -> dict[str, bytes]:
    docs: dict[str, bytes] = {}
    for d in request.iterfind(f"{{{XDSB_NS}}}Document"):
        include = d.find(f"{{{XOP_NS}}}Include")
        if include is None:
            raise _Stop(Refusal("XDSRepositoryMetadataError", "a Document is not sent as an MTOM attachment", d.get("id", "")))
        try:
            cid = cid_of(include.get("href", ""))
        except MTOMError:
            raise _Stop(Refusal("XDSRepositoryMetadataError", "xop:Include href is not a cid: URL", d.get("id", ""))) from None
        part = related.parts.get(cid)
        if part is None:
            raise _Stop(Refusal("XDSMissingDocument", "an xop:Include names no MIME part", d.get("id", "")))
        docs[d.get("id", "")] = part.data
    return docs


def _resent(known: Mapping[str, KnownEntry], entry: DocumentEntry, target: str) -> bool:
    """``entry`` was already accepted, same bytes, as the replacement of ``target``."""
    return any(k.unique_id == entry.unique_id and k.hash == entry.hash and k.replaces == target
               for k in known.values())


def check_iti41(env, related: Related, known: Mapping[str, KnownEntry], vihf_ins: str,
                message_id: str, vihf: dict) -> Submission:
    request = env.find(f"{{{SOAP12_NS}}}Body/{{{XDSB_NS}}}ProvideAndRegisterDocumentSetRequest")
    objects = request.find(f"{{{LCM_NS}}}SubmitObjectsRequest/{{{RIM_NS}}}RegistryObjectList")
    ss, info = _submission_set(objects)
    if info["patient_id"] != vihf_ins:
        raise _Stop(Refusal("XDSPatientIdDoesNotMatch",
                            "SubmissionSet.patientId is not the VIHF resource-id", info["id"]))
    docs = _attachments(request, related)
    entries = []
    for eo in objects.iterfind(f"{{{RIM_NS}}}ExtrinsicObject"):
        if eo.get("objectType") != DOC_ENTRY_TYPE:
            continue
        entry = _entry(eo, docs, eo.get("id", ""))
        _check_entry_rules(entry, info["patient_id"])
        entries.append(entry)
    if not entries:
        raise _Stop(Refusal("XDSRegistryMetadataError", "no DocumentEntry in the submission"))
    if len(docs) != len(entries):
        raise _Stop(Refusal("XDSMissingDocumentMetadata", "a Document has no DocumentEntry"))
    by_id = {e.entry_id: e for e in entries}
    members = set()
    for assoc in objects.iterfind(f"{{{RIM_NS}}}Association"):
        kind, src, tgt = assoc.get("associationType"), assoc.get("sourceObject"), assoc.get("targetObject")
        if kind == HAS_MEMBER and src == info["id"]:
            members.add(tgt)
        elif kind == RPLC:
            if src not in by_id:
                raise _Stop(Refusal("XDSRegistryMetadataError", "RPLC source is not an entry of this submission", src or ""))
            target = known.get(tgt or "")
            if target is not None and target.status != STATUS_APPROVED and _resent(known, by_id[src], tgt):
                pass      # the same replacement again (a re-send after a lost answer)
            elif target is None or target.status != STATUS_APPROVED:
                raise _Stop(Refusal("XDSUnresolvedReferenceException",
                                    "RPLC target is not an approved entry of this registry", src))
            if target.patient_id != info["patient_id"]:
                raise _Stop(Refusal("XDSPatientIdDoesNotMatch", "RPLC target belongs to another patient", src))
            by_id[src].replaces = target.entry_uuid
        elif kind == SIGNS:
            if src not in by_id or not by_id[src].is_signature or tgt != info["id"]:
                raise _Stop(Refusal("XDSRegistryMetadataError",
                                    "a signs association must go from the signature entry to the submission set",
                                    src or ""))
    missing = [e.entry_id for e in entries if e.entry_id not in members]
    if missing:
        raise _Stop(Refusal("XDSRegistryMetadataError", "DocumentEntry without HasMember from the submission set",
                            missing[0]))
    for e in entries:
        # ITI TF-3 Table 4.2.4.1-2: a uniqueId already registered with another hash is
        # XDSNonIdenticalHash; the same bytes again (a re-send after a lost answer) are accepted.
        same = [k for k in known.values() if k.unique_id == e.unique_id]
        if any(k.hash != e.hash for k in same):
            raise _Stop(Refusal("XDSNonIdenticalHash", "uniqueId already registered with another hash", e.entry_id))
        e.duplicate_of = same[0].entry_uuid if same else ""
    return Submission(action=ITI41_ACTION, message_id=message_id, patient_id=info["patient_id"],
                      submission_set=info, documents=entries, vihf=vihf)


def check_iti57(env, known: Mapping[str, KnownEntry], vihf_ins: str, message_id: str, vihf: dict) -> Submission:
    objects = env.find(f"{{{SOAP12_NS}}}Body/{{{LCM_NS}}}SubmitObjectsRequest/{{{RIM_NS}}}RegistryObjectList")
    ss, info = _submission_set(objects)
    if info["patient_id"] != vihf_ins:
        raise _Stop(Refusal("XDSPatientIdDoesNotMatch",
                            "SubmissionSet.patientId is not the VIHF resource-id", info["id"]))
    updates = []
    for assoc in objects.iterfind(f"{{{RIM_NS}}}Association"):
        if assoc.get("associationType") != UPDATE_STATUS:
            continue
        slots = _slots(assoc)
        original = (slots.get("OriginalStatus") or [""])[0]
        new = (slots.get("NewStatus") or [""])[0]
        target = known.get(assoc.get("targetObject", ""))
        if target is None:
            raise _Stop(Refusal("XDSUnresolvedReferenceException",
                                "the status update targets no entry of this registry", assoc.get("id", "")))
        if target.patient_id != info["patient_id"]:
            raise _Stop(Refusal("XDSPatientIdDoesNotMatch", "the target belongs to another patient", assoc.get("id", "")))
        if target.status == new and original != new:
            # the same update again (a re-send after a lost answer): accepted, changes nothing
            updates.append({"target": target.entry_uuid, "unique_id": target.unique_id, "from": new, "to": new})
            continue
        if original != target.status:
            raise _Stop(Refusal("XDSMetadataUpdateError", "OriginalStatus is not the entry's status", assoc.get("id", "")))
        if new not in (STATUS_APPROVED, STATUS_DEPRECATED, STATUS_DELETED) or new == original:
            raise _Stop(Refusal("XDSMetadataUpdateError", "NewStatus is not a valid change", assoc.get("id", "")))
        updates.append({"target": target.entry_uuid, "unique_id": target.unique_id, "from": original, "to": new})
    if not updates:
        raise _Stop(Refusal("XDSMetadataUpdateError", "no UpdateAvailabilityStatus association"))
    return Submission(action=ITI57_ACTION, message_id=message_id, patient_id=info["patient_id"],
                      submission_set=info, status_updates=updates, vihf=vihf)


def check_request(related: Related, *, trust: VihfTrust, known: Mapping[str, KnownEntry],
                  mime_action: str = "", expected_to: str = "", validate_schema: bool = True) -> CheckResult:
    """Every check, in the order a DMP would make them; the first failure stops."""
    message_id = action = ""
    try:
        env = parse_envelope(related)
        message_id, action = read_addressing(env)
        action = check_addressing(env, mime_action=mime_action, expected_to=expected_to)
        vihf = check_vihf(env, trust)
        if validate_schema:
            check_schema(env, action)
        vihf_ins = vihf[RESOURCE_ID][0]
        if action == ITI41_ACTION:
            sub = check_iti41(env, related, known, vihf_ins, message_id, vihf)
        else:
            sub = check_iti57(env, known, vihf_ins, message_id, vihf)
    except _Stop as stop:
        return CheckResult(message_id=message_id, action=action, refusals=(stop.refusal,))
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        # only reachable without the XSD check (a structure the schemas would have refused)
        return CheckResult(message_id=message_id, action=action, refusals=(Refusal(
            "XDSRepositoryError", f"unreadable request structure ({type(exc).__name__})", fault_ns=SOAP12_NS),))
    return CheckResult(message_id=message_id, action=action, submission=sub)
