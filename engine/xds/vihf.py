"""The VIHF: the SAML 2 assertion that authenticates a DMP request made by a structure (indirect
authentication), signed with the structure's signing certificate.

CI-SIS "Transmission de documents CDA-R2 en HL7 v2" v2.1, mapping.md « Mapping VIHF pour le DMP »
and « Exemple d'un VIHF avec automate »:

* Issuer = the signing certificate's DN (Format X509SubjectName); enveloped XML-DSig signature on
  ``@ID`` with exclusive c14n (the c14n that keeps the digest valid once the assertion sits in the
  SOAP header), KeyInfo with the certificate;
* Subject/NameID = PRT-5.1 of the SB PRT (« identifiant de la personne responsable du
  traitement »); AuthnStatement with the configured AuthnContextClassRef; no AudienceRestriction;
* attributes VIHF_Version, Authentification_Mode INDIRECTE, Secteur_Activite, resource-id
  ``<INS>^^^&<OID>&ISO^NH``, Ressource_URN ``urn:dmp``, subject-id, Identifiant_Structure
  (PRT-8.10 of the SB PRT), LPS_*, purposeofuse, role (AUTOMATE), and the confidentiality-code
  attribute when the message asks for a secret connection (CONNEXION_SECRETE = Y).

The assertion holds the patient's INS: it is PHI and is never logged.

signxml writes no ``InclusiveNamespaces PrefixList`` correctly (signxml issue #163: the digest then
fails), so the signature uses plain exclusive c14n, which the guide's algorithm URIs allow.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from lxml import etree
from signxml import XMLSigner
from signxml.algorithms import CanonicalizationMethod

from engine.xds.settings import Coded, VihfSettings
from engine.xds.signing import SigningIdentity, SigningIdentityError, load_signing_identity

__all__ = ["SAML_NS", "VihfError", "build_vihf", "load_signing_identity", "SigningIdentity",
           "SigningIdentityError", "resource_id", "iso_instant"]

SAML_NS = "urn:oasis:names:tc:SAML:2.0:assertion"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
HL7_NS = "urn:hl7-org:v3"
X509_SUBJECT = "urn:oasis:names:tc:SAML:1.1:nameid-format:X509SubjectName"
_S = f"{{{SAML_NS}}}"

ATTR_RESOURCE_ID = "urn:oasis:names:tc:xacml:2.0:resource:resource-id"
ATTR_SUBJECT_ID = "urn:oasis:names:tc:xspa:1.0:subject:subject-id"
ATTR_ROLE = "urn:oasis:names:tc:xacml:2.0:subject:role"
ATTR_PURPOSE = "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"
ATTR_CONFIDENTIALITY = "urn:oasis:names:tc:xspa:1.0:resource:patient:hl7:confidentiality-code"


class VihfError(ValueError):
    """The message lacks what the VIHF needs (the text names the field, never its value)."""


def iso_instant(now: dt.datetime) -> str:
    """SAML dateTime in UTC with milliseconds, as in both examples (« 2024-09-02T13:22:25.789Z »)."""
    now = now.astimezone(dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def resource_id(ins: Any) -> str:
    """``<INS>^^^&<OID>&ISO^NH`` (mapping.md, resource-id; the DMP example)."""
    return f"{ins.value}^^^&{ins.oid}&ISO^NH"


def _attribute(parent, name: str, value: str | etree._Element) -> None:
    attr = etree.SubElement(parent, f"{_S}Attribute", Name=name)
    val = etree.SubElement(attr, f"{_S}AttributeValue")
    if isinstance(value, str):
        val.text = value
    else:
        val.append(value)


def _hl7_ce(tag: str, coded: Coded, system_name: str | None = None) -> etree._Element:
    el = etree.Element(f"{{{HL7_NS}}}{tag}", nsmap={None: HL7_NS, "xsi": XSI_NS})
    el.set("code", coded.code)
    el.set("codeSystem", coded.scheme)
    if system_name:
        el.set("codeSystemName", system_name)
    if coded.display:
        el.set("displayName", coded.display)
    el.set(f"{{{XSI_NS}}}type", "CE")
    return el


def _sender(submission: Any):
    recipients = getattr(submission, "recipients", None)
    return getattr(recipients, "sender", None)


def build_vihf(submission: Any, settings: VihfSettings, signer: SigningIdentity, *,
               now: dt.datetime, assertion_id: str) -> etree._Element:
    """The signed ``saml2:Assertion`` for one request about ``submission``'s patient."""
    ins = getattr(submission, "ins", None)
    if ins is None:
        raise VihfError("no qualified INS: the VIHF resource-id needs one")
    sender = _sender(submission)
    person = getattr(sender, "person", None)
    name_id = getattr(person, "id", None)
    if not name_id:
        raise VihfError("no PRT-5.1 in the SB PRT: the VIHF NameID needs it")
    structure = settings.structure_id or getattr(sender, "organization_id", None)
    if not structure:
        raise VihfError("no PRT-8.10 in the SB PRT and no vihf.structure_id: Identifiant_Structure "
                        "needs one")
    subject_id = settings.subject_id
    if not subject_id:
        names = [n for n in (getattr(person, "family", None), getattr(person, "given", None)) if n]
        subject_id = " ".join(names) if names else f"{settings.lps_name}, {settings.lps_version}"

    instant = iso_instant(now)
    root = etree.Element(f"{_S}Assertion", nsmap={"saml2": SAML_NS, "xsi": XSI_NS},
                         ID=assertion_id, IssueInstant=instant, Version="2.0")
    etree.SubElement(root, f"{_S}Issuer", Format=X509_SUBJECT).text = signer.subject_dn
    etree.SubElement(root, f"{{{DS_NS}}}Signature", Id="placeholder", nsmap={"ds": DS_NS})
    subject = etree.SubElement(root, f"{_S}Subject")
    etree.SubElement(subject, f"{_S}NameID").text = name_id
    if settings.validity:
        until = now + dt.timedelta(seconds=settings.validity)
        etree.SubElement(root, f"{_S}Conditions", NotBefore=instant, NotOnOrAfter=iso_instant(until))
    authn = etree.SubElement(root, f"{_S}AuthnStatement", AuthnInstant=instant)
    ctx = etree.SubElement(authn, f"{_S}AuthnContext")
    etree.SubElement(ctx, f"{_S}AuthnContextClassRef").text = settings.authn_context

    stmt = etree.SubElement(root, f"{_S}AttributeStatement")
    _attribute(stmt, "VIHF_Version", settings.version)
    _attribute(stmt, "Authentification_Mode", settings.authentication_mode)
    _attribute(stmt, "Secteur_Activite",
               f"{settings.secteur_activite.code}^{settings.secteur_activite.scheme}")
    _attribute(stmt, ATTR_RESOURCE_ID, resource_id(ins))
    _attribute(stmt, "Ressource_URN", settings.resource_urn)
    _attribute(stmt, ATTR_SUBJECT_ID, subject_id)
    _attribute(stmt, "Identifiant_Structure", structure)
    _attribute(stmt, "LPS_Version", settings.lps_version)
    if settings.lps_id:
        _attribute(stmt, "LPS_ID", settings.lps_id)
    _attribute(stmt, "LPS_Nom", settings.lps_name)
    _attribute(stmt, "LPS_ID_HOMOLOGATION_DMP", settings.lps_homologation_id)
    _attribute(stmt, ATTR_PURPOSE, _hl7_ce("PurposeOfUse", settings.purpose_of_use,
                                           "mode acces VIHF 1.0"))
    _attribute(stmt, ATTR_ROLE, _hl7_ce("Role", settings.role))
    flags = getattr(submission, "flags", {}) or {}
    if settings.secret_connection and flags.get("CONNEXION_SECRETE"):
        _attribute(stmt, ATTR_CONFIDENTIALITY, _hl7_ce("ConfidentialityCode",
                                                       settings.secret_connection_code))

    xml_signer = XMLSigner(signature_algorithm=settings.signature_algorithm,
                           digest_algorithm=settings.digest_algorithm,
                           c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0)
    return xml_signer.sign(root, key=signer.key, cert=[signer.certificate_pem.decode("ascii")],
                           reference_uri=f"#{assertion_id}", id_attribute="ID")
