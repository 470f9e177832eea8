"""Build a CDA R2 level 1 (N1) imaging report, "compte rendu d'imagerie médicale" (IMG-CR-IMG).

Model: CI-SIS "Volet Compte rendu d'imagerie médicale" 2024.01, level 1 (document non structuré,
PDF body). The reference reproduced here element by element is the ANS example published with
that model, ``IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml``; the header rules are those of the CI-SIS
"Structuration minimale des documents de santé" (templateId ``1.2.250.1.213.1.1.1.1``).

* Exactly the 3 N1 templateIds (HL7 France, CI-SIS structuration minimale, IHE XDS-SD / CDA N1):
  in the 2024.01 N1 example the IMG-CR-IMG model templateId is commented out ("Dans un document
  non structuré, seuls les templateId de conformité à HL7 France, aux CI-SIS et au CDA R2 N1 sont
  admis").
* Document type LOINC ``18748-4`` "CR d'imagerie médicale" (JDV_J07 XdsTypeCode CI-SIS).
* ``recordTarget``: INS (+ local IPP) and the strict INS traits (birth name BR, birth given names,
  first given name BR, used name/given name CL, sex, birth date, birth place COG code).
* ``author`` / ``legalAuthenticator``: RPPS id (root ``1.2.250.1.71.4.2.1``), TRE_G15 profession
  code, ``representedOrganization`` with its ``standardIndustryClassCode`` (practice setting).
* ``inFulfillmentOf/order``: order id + DICOM PS3.20 ``ps3-20:accessionNumber``.
* ``documentationOf/serviceEvent``: Study Instance UID, exam code with CCAM / modality (DCM,
  qualifier 121139) / region (SNOMED CT, qualifier LOINC 39111-0) translations, times, performer.
* ``relatedDocument typeCode="RPLC"`` for a replacement (same ``setId``, ``versionNumber`` + 1).
* ``componentOf/encompassingEncounter`` with the health care facility type (JDV_J61 / TRE_R02).
* ``component/nonXMLBody/text mediaType="application/pdf" representation="B64"``.

Pure function, no I/O. The output carries patient data (PHI): it is message content and must only
be stored as such (docs/architecture.md).
"""
from __future__ import annotations

import base64
import re
import secrets
import time
import uuid
from datetime import date, datetime
from typing import Literal, Optional, Union
from zoneinfo import ZoneInfo

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "II", "Code", "Address", "Organization", "HealthProfessional", "PatientInputs",
    "ServiceEventInputs", "EncounterInputs", "ImagingReportInputs", "build_imaging_report_n1",
    "new_document_id", "cda_ts", "RPPS_OID", "FINESS_OID", "LOINC_OID", "DCM_OID", "SNOMED_OID",
    "CCAM_OID", "N1_TEMPLATE_IDS", "DOC_CODE",
]

V3 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
PS320 = "urn:dicom-org:ps3-20"
H = "{%s}" % V3

#: CI-SIS IMG-CR-IMG 2024.01 N1: exactly these three templateIds (the N1 example of that model)
N1_TEMPLATE_IDS = (
    ("2.16.840.1.113883.2.8.2.1", "Conformité spécifications HL7 France"),
    ("1.2.250.1.213.1.1.1.1", "Conformité spécifications CI-SIS"),
    ("1.3.6.1.4.1.19376.1.2.20", "Conformité au CDA R2 Niveau 1 (CDA non structuré)"),
)
RPPS_OID = "1.2.250.1.71.4.2.1"      # ANS: identifiant national des PS (RPPS, forme 8 + n° RPPS)
FINESS_OID = "1.2.250.1.71.4.2.2"    # ANS: identifiant national de structure (FINESS, SIRET…)
LOINC_OID = "2.16.840.1.113883.6.1"
DCM_OID = "1.2.840.10008.2.16.4"
SNOMED_OID = "2.16.840.1.113883.6.96"
CCAM_OID = "1.2.250.1.213.2.5"       # CI-SIS terminologies: the ANS CCAM OID
G15_OID = "1.2.250.1.213.1.1.4.5"    # TRE_G15 profession / savoir-faire
R02_OID = "1.2.250.1.71.4.2.4"       # TRE_R02 secteur d'activité (JDV_J61 healthcareFacilityType)
PRACTICE_OID = "1.2.250.1.213.1.1.4.9"  # TRE_A00 / JDV_J60 practiceSetting (standardIndustryClass)
CONF_OID = "2.16.840.1.113883.5.25"
GENDER_OID = "2.16.840.1.113883.5.1"
ACTCODE_OID = "2.16.840.1.113883.5.4"
PARIS = ZoneInfo("Europe/Paris")

DOC_CODE = ("18748-4", "CR d’imagerie médicale")  # displayName as in the 2024.01 example

_TS_RE = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d+)?)?)?)?)?)?([+-]\d{4})?$")
_OID_RE = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")
_UUID_RE = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")


def cda_ts(value: Union[datetime, date, str], *, tz: ZoneInfo = PARIS) -> str:
    """HL7 v3 TS: ``YYYYMMDDHHMMSS+ZZZZ`` for a datetime (naive = Europe/Paris), ``YYYYMMDD`` for
    a date; a string is checked against the TS pattern and returned as is."""
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=tz)
        return dt.strftime("%Y%m%d%H%M%S%z")
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    v = str(value).strip()
    if not _TS_RE.match(v):
        raise ValueError(f"not an HL7 TS value: {v!r}")
    return v


def new_document_id(root_oid: Optional[str] = None) -> "II":
    """A new unique document id (an OID, no extension: safe as an XDS ``uniqueId``).

    * ``root_oid`` given: ``<root_oid>.<microseconds since epoch><3 random digits>``
      (the "OID.timestamp" scheme; at most 64 characters as XDS uniqueId requires);
    * otherwise the UUID-derived OID ``2.25.<uuid4 as integer>`` (ITU-T X.667).
    """
    if root_oid:
        if not _OID_RE.match(root_oid):
            raise ValueError(f"not an OID: {root_oid!r}")
        oid = f"{root_oid}.{time.time_ns() // 1000}{secrets.randbelow(1000):03d}"
        if len(oid) > 64:
            raise ValueError("document root OID too long for a 64-character unique id")
        return II(root=oid)
    return II(root=f"2.25.{uuid.uuid4().int}")


# ------------------------------------------------------------------------------------- inputs
class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class II(_M):
    """HL7 v3 instance identifier."""

    root: str
    extension: Optional[str] = None

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        v = v.strip()
        if not (_OID_RE.match(v) or _UUID_RE.match(v)):
            raise ValueError(f"II root must be an OID or a UUID, got {v!r}")
        return v

    def key(self) -> str:
        return f"{self.root}^{self.extension}" if self.extension else self.root


class Code(_M):
    code: str
    code_system: str
    display_name: Optional[str] = None
    code_system_name: Optional[str] = None


class Address(_M):
    house_number: Optional[str] = None
    street_name: Optional[str] = None
    unit_id: Optional[str] = None
    postal_code: Optional[str] = None
    city: Optional[str] = None
    country: Optional[str] = None


class Organization(_M):
    id: II
    name: str
    telecom: Optional[str] = None          # e.g. "tel:0146000000"
    addr: Optional[Address] = None
    #: practice setting (JDV_J60 / TRE_A00, codeSystem 1.2.250.1.213.1.1.4.9), e.g. AMBULATOIRE
    industry_class: Optional[Code] = None


class HealthProfessional(_M):
    rpps: str                              # national id, "8" + RPPS number (e.g. 801234560801)
    id_root: str = RPPS_OID
    family: Optional[str] = None
    given: Optional[str] = None
    prefix: Optional[str] = None
    suffix: Optional[str] = None
    #: profession / specialty (TRE_G15, codeSystem 1.2.250.1.213.1.1.4.5), e.g. G15_10/SM44
    role: Code = Field(default_factory=lambda: Code(
        code="G15_10/SM44", code_system=G15_OID, display_name="Médecin - Radio-diagnostic (SM)"))
    telecom: Optional[str] = None
    addr: Optional[Address] = None
    organization: Organization


class PatientInputs(_M):
    """Strict INS traits (identity registry) plus the local IPP."""

    ins_value: str
    ins_oid: str                           # 1.2.250.1.213.1.4.8 (NIR), .9 (NIA), .10/.11 (test)
    ipp: Optional[str] = None
    ipp_root: Optional[str] = None         # OID of the IPP assigning authority
    birth_name: str
    given_names: list[str]                 # all the birth-certificate given names, in order
    first_given_name: str
    used_name: Optional[str] = None
    used_given_name: Optional[str] = None
    birth_date: Union[date, str]
    sex: Literal["M", "F", "U"]
    birth_place_cog: Optional[str] = None  # code officiel géographique (INSEE)
    birth_place_city: Optional[str] = None
    addr: Optional[Address] = None
    telecoms: list[str] = Field(default_factory=list)


class ServiceEventInputs(_M):
    study_instance_uid: str
    exam_code: Optional[Code] = None       # LOINC exam code (JDV_CodesDocumentImagerie_CISIS)
    ccam: Optional[Code] = None
    modality: Code                         # DCM, JDV_ModaliteAcquisition_CISIS
    regions: list[Code] = Field(default_factory=list)  # SNOMED CT, JDV_RegionAnatomique_CISIS
    low: Union[datetime, str]
    high: Optional[Union[datetime, str]] = None
    performer: Optional[HealthProfessional] = None  # defaults to the author

    @field_validator("study_instance_uid")
    @classmethod
    def _uid(cls, v: str) -> str:
        v = v.strip()
        if not _OID_RE.match(v) or len(v) > 64:
            raise ValueError("StudyInstanceUID must be a DICOM UID (OID, at most 64 characters)")
        return v


class EncounterInputs(_M):
    code: Code = Field(default_factory=lambda: Code(
        code="AMB", code_system=ACTCODE_OID, display_name="Ambulatoire (hors établissement)"))
    low: Union[datetime, str]
    high: Optional[Union[datetime, str]] = None
    facility_id: II
    #: health care facility type (JDV_J61 / TRE_R02, codeSystem 1.2.250.1.71.4.2.4), e.g. SA08
    facility_type: Code
    location_name: Optional[str] = None
    location_addr: Optional[Address] = None


class ImagingReportInputs(_M):
    document_id: II
    set_id: II
    version_number: int = Field(1, ge=1)
    effective_time: Union[datetime, str]
    confidentiality_code: Literal["N", "R", "V"] = "N"
    title: str = "CR d’imagerie médicale"
    doc_code_translations: list[Code] = Field(default_factory=list)
    patient: PatientInputs
    author: HealthProfessional
    author_time: Optional[Union[datetime, str]] = None   # defaults to effective_time
    legal_authenticator: HealthProfessional
    legal_authenticator_time: Union[datetime, str]
    custodian: Organization
    order_id: Optional[II] = None
    accession_number: Optional[II] = None
    service_event: ServiceEventInputs
    encounter: EncounterInputs
    replaces: Optional[II] = None          # relatedDocument RPLC parentDocument/id
    pdf: bytes

    @field_validator("pdf")
    @classmethod
    def _pdf(cls, v: bytes) -> bytes:
        if not v.startswith(b"%PDF-"):
            raise ValueError("the report body is not a PDF file (no %PDF- header)")
        return v


# ------------------------------------------------------------------------------------ builder
_CONF_DISPLAY = {"N": "Normal", "R": "Restreint", "V": "Très restreint"}
_SEX_DISPLAY = {"M": "Masculin", "F": "Féminin", "U": "Inconnu"}


def _el(parent, tag: str, attrib: Optional[dict] = None, text: Optional[str] = None, ns: str = V3):
    e = etree.SubElement(parent, f"{{{ns}}}{tag}")
    for k, v in (attrib or {}).items():
        if v is not None:
            e.set(k, v)
    if text is not None:
        e.text = text
    return e


def _comment(parent, text: str) -> None:
    parent.append(etree.Comment(f" {text} "))


def _ii(parent, ii: II, tag: str = "id", ns: str = V3):
    return _el(parent, tag, {"root": ii.root, "extension": ii.extension}, ns=ns)


def _code(parent, c: Code, tag: str = "code"):
    return _el(parent, tag, {"code": c.code, "displayName": c.display_name,
                             "codeSystem": c.code_system, "codeSystemName": c.code_system_name})


def _addr(parent, a: Optional[Address], **attrib):
    if a is None:
        return
    e = _el(parent, "addr", attrib or None)
    # CDA AD part order as in the example
    for tag, v in (("houseNumber", a.house_number), ("streetName", a.street_name),
                   ("unitID", a.unit_id), ("postalCode", a.postal_code), ("city", a.city),
                   ("country", a.country)):
        if v:
            _el(e, tag, text=v)


def _org(parent, tag: str, org: Organization, *, industry: bool = True):
    o = _el(parent, tag)
    _ii(o, org.id)
    _el(o, "name", text=org.name)
    if org.telecom:
        _el(o, "telecom", {"value": org.telecom})
    _addr(o, org.addr)
    if industry and org.industry_class is not None:
        _code(o, org.industry_class, "standardIndustryClassCode")
    return o


def _professional(parent, tag: str, p: HealthProfessional, *, with_code: bool = True,
                  org_tag: str = "representedOrganization"):
    """assignedAuthor / assignedEntity content, in the order of the 2024.01 example."""
    a = _el(parent, tag)
    _comment(a, "Identifiant du PS (RPPS)")
    _el(a, "id", {"root": p.id_root, "extension": p.rpps})
    if with_code:
        _comment(a, "Profession / spécialité du PS (TRE_G15)")
        _code(a, p.role)
    _addr(a, p.addr)
    if p.telecom:
        _el(a, "telecom", {"value": p.telecom, "use": "WP"})
    if p.family or p.given:
        person = _el(a, "assignedPerson")
        name = _el(person, "name")
        if p.prefix:
            _el(name, "prefix", text=p.prefix)
        if p.given:
            _el(name, "given", text=p.given)
        if p.family:
            _el(name, "family", text=p.family)
        if p.suffix:
            _el(name, "suffix", text=p.suffix)
    _org(a, org_tag, p.organization)
    return a


def _ivl(parent, low, high) -> None:
    et = _el(parent, "effectiveTime")
    _el(et, "low", {"value": cda_ts(low)})
    if high is not None:
        _el(et, "high", {"value": cda_ts(high)})


def build_imaging_report_n1(inputs: ImagingReportInputs) -> bytes:
    """The CDA R2 N1 "CR d'imagerie médicale" (CI-SIS IMG-CR-IMG 2024.01) as UTF-8 bytes.

    Element order follows the CDA R2 schema (POCD_MT000040.ClinicalDocument) and the reference
    example. The PDF is embedded byte for byte (Base64, ``representation="B64"``).
    """
    i = inputs
    root = etree.Element(f"{H}ClinicalDocument", nsmap={None: V3, "xsi": XSI, "ps3-20": PS320})
    _comment(root, "Compte rendu d'imagerie médicale, CDA R2 niveau 1 - CI-SIS IMG-CR-IMG 2024.01")
    # --- Document identity (CI-SIS Structuration minimale, en-tête)
    _el(root, "realmCode", {"code": "FR"})
    _el(root, "typeId", {"root": "2.16.840.1.113883.1.3", "extension": "POCD_HD000040"})
    for oid, label in N1_TEMPLATE_IDS:
        _comment(root, label)
        _el(root, "templateId", {"root": oid})
    _comment(root, "Identifiant unique du document")
    _ii(root, i.document_id)
    code = _el(root, "code", {"code": DOC_CODE[0], "displayName": DOC_CODE[1],
                              "codeSystem": LOINC_OID, "codeSystemName": "LOINC"})
    for t in i.doc_code_translations:  # JDV_CodesDocumentImagerie_CISIS (1.2.250.1.213.1.1.5.687)
        _code(code, t, "translation")
    _el(root, "title", text=i.title)
    _el(root, "effectiveTime", {"value": cda_ts(i.effective_time)})
    _el(root, "confidentialityCode", {"code": i.confidentiality_code,
                                      "displayName": _CONF_DISPLAY[i.confidentiality_code],
                                      "codeSystem": CONF_OID})
    _el(root, "languageCode", {"code": "fr-FR"})
    _comment(root, "Identifiant du lot de versions et numéro de version")
    _ii(root, i.set_id, "setId")
    _el(root, "versionNumber", {"value": str(i.version_number)})

    # --- recordTarget (INS + IPP, strict INS traits)
    p = i.patient
    pr = _el(_el(root, "recordTarget"), "patientRole")
    _comment(pr, "INS (matricule INS + OID de l'autorité d'affectation)")
    _el(pr, "id", {"extension": p.ins_value, "root": p.ins_oid})
    if p.ipp:
        if not p.ipp_root:
            raise ValueError("patient IPP given without the OID of its assigning authority")
        _comment(pr, "IPP du patient dans l'établissement")
        _el(pr, "id", {"extension": p.ipp, "root": p.ipp_root})
    _addr(pr, p.addr)
    for t in p.telecoms:
        _el(pr, "telecom", {"value": t})
    pat = _el(pr, "patient", {"classCode": "PSN"})
    name = _el(pat, "name")
    _comment(name, "Nom et prénoms de naissance (traits stricts de l'INS)")
    _el(name, "family", {"qualifier": "BR"}, p.birth_name)
    _el(name, "given", text=" ".join(p.given_names) if p.given_names else p.first_given_name)
    _el(name, "given", {"qualifier": "BR"}, p.first_given_name)
    if p.used_name or p.used_given_name:
        _comment(name, "Nom et prénom utilisés")
        if p.used_name:
            _el(name, "family", {"qualifier": "CL"}, p.used_name)
        if p.used_given_name:
            _el(name, "given", {"qualifier": "CL"}, p.used_given_name)
    _el(pat, "administrativeGenderCode", {"code": p.sex, "displayName": _SEX_DISPLAY[p.sex],
                                          "codeSystem": GENDER_OID})
    _el(pat, "birthTime", {"value": cda_ts(p.birth_date)})
    if p.birth_place_cog or p.birth_place_city:
        _comment(pat, "Lieu de naissance (code officiel géographique)")
        addr = _el(_el(_el(pat, "birthplace"), "place"), "addr")
        if p.birth_place_cog:
            _el(addr, "county", text=p.birth_place_cog)
        if p.birth_place_city:
            _el(addr, "city", text=p.birth_place_city)

    # --- author (radiologue rédacteur)
    author = _el(root, "author")
    _el(author, "time", {"value": cda_ts(i.author_time or i.effective_time)})
    _professional(author, "assignedAuthor", i.author)

    # --- custodian
    cust = _el(_el(_el(root, "custodian", {"typeCode": "CST"}), "assignedCustodian",
                   {"classCode": "ASSIGNED"}), "representedCustodianOrganization",
               {"classCode": "ORG", "determinerCode": "INSTANCE"})
    _ii(cust, i.custodian.id)
    _el(cust, "name", text=i.custodian.name)
    if i.custodian.telecom:
        _el(cust, "telecom", {"value": i.custodian.telecom})
    _addr(cust, i.custodian.addr)

    # --- legalAuthenticator (radiologue signataire)
    la = _el(root, "legalAuthenticator")
    _el(la, "time", {"value": cda_ts(i.legal_authenticator_time)})
    _el(la, "signatureCode", {"code": "S"})
    _professional(la, "assignedEntity", i.legal_authenticator)

    # --- inFulfillmentOf: order + DICOM PS3.20 accession number
    if i.order_id is not None or i.accession_number is not None:
        order = _el(_el(root, "inFulfillmentOf"), "order")
        if i.order_id is not None:
            _comment(order, "Numéro de la demande (placer order number)")
            _ii(order, i.order_id)
        else:  # order/id is mandatory in the CDA schema
            _el(order, "id", {"nullFlavor": "UNK"})
        if i.accession_number is not None:
            _comment(order, "Accession Number")
            _ii(order, i.accession_number, "accessionNumber", ns=PS320)

    # --- documentationOf/serviceEvent (one study)
    se = i.service_event
    ev = _el(_el(root, "documentationOf"), "serviceEvent", {"classCode": "ACT"})
    _comment(ev, "Identifiant de l'examen (DICOM Study Instance UID)")
    _el(ev, "id", {"root": se.study_instance_uid})
    if se.exam_code is not None:
        ec = _code(ev, se.exam_code)
    else:
        # no LOINC exam code known: nullFlavor OTH, the only one the CI-SIS datatype rule
        # dtr1-1-ANY allows together with <translation> (modality, region, CCAM)
        ec = _el(ev, "code", {"nullFlavor": "OTH"})
    if se.ccam is not None:
        _code(ec, se.ccam, "translation")
    _comment(ec, "Modalité d'imagerie (JDV_ModaliteAcquisition_CISIS 1.2.250.1.213.1.1.5.618)")
    mt = _code(ec, se.modality, "translation")
    _el(_el(mt, "qualifier"), "name", {"code": "121139", "displayName": "Modalité d'imagerie",
                                       "codeSystem": DCM_OID, "codeSystemName": "DCM"})
    for r in se.regions:
        rt = _code(ec, r, "translation")
        _el(_el(rt, "qualifier"), "name", {"code": "39111-0",
                                           "displayName": "localisation anatomique",
                                           "codeSystem": LOINC_OID, "codeSystemName": "LOINC"})
    _ivl(ev, se.low, se.high)
    perf = _el(ev, "performer", {"typeCode": "PRF"})
    _professional(perf, "assignedEntity", se.performer or i.author)

    # --- relatedDocument RPLC (replacement)
    if i.replaces is not None:
        if i.version_number < 2:
            raise ValueError("a replacement document must have versionNumber >= 2")
        rd = _el(root, "relatedDocument", {"typeCode": "RPLC"})
        _comment(rd, "Document remplacé")
        _ii(_el(rd, "parentDocument"), i.replaces)

    # --- componentOf/encompassingEncounter
    enc = i.encounter
    ee = _el(_el(root, "componentOf"), "encompassingEncounter")
    _code(ee, enc.code)
    _ivl(ee, enc.low, enc.high)
    hcf = _el(_el(ee, "location"), "healthCareFacility")
    _ii(hcf, enc.facility_id)
    _code(hcf, enc.facility_type)
    if enc.location_name or enc.location_addr:
        loc = _el(hcf, "location")
        if enc.location_name:
            _el(loc, "name", text=enc.location_name)
        _addr(loc, enc.location_addr)

    # --- body: PDF encapsulated (IHE XDS-SD)
    body = _el(_el(root, "component"), "nonXMLBody")
    _el(body, "text", {"mediaType": "application/pdf", "representation": "B64"},
        base64.b64encode(i.pdf).decode("ascii"))
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
