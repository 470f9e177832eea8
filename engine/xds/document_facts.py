"""What the XDS document entry takes from the CDA header, with the code systems the metadata needs.

CI-SIS "Transmission de documents CDA-R2 en HL7 v2" v2.1, mapping.md « Mapping XDS » (« Fiche »)
and the CI-SIS annex « Lien entre l'en-tête CDA et les métadonnées XDS »: author, legalAuthenticator,
typeCode (code), confidentialityCode, creationTime (effectiveTime), languageCode, title, uniqueId
(id), patientId / sourcePatientId / sourcePatientInfo (recordTarget), serviceStart/StopTime
(documentationOf/serviceEvent/effectiveTime), practiceSettingCode (serviceEvent performer's
organisation standardIndustryClassCode), healthcareFacilityTypeCode (encompassingEncounter
location), event codes (serviceEvent code and its modality / region translations), references
(order, accession number, Study Instance UID), the replaced document (relatedDocument RPLC).

The engine's canonical ``Submission`` keeps codes without their code systems; this module reads the
exact CDA bytes again (safe parser: no DTD, no entities, no network). The result holds PHI.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from engine.cda.header import INS_OIDS, NS, parse_cda, read_header
from engine.xds.settings import Coded as Code

H = "{urn:hl7-org:v3}"


@dataclass(frozen=True)
class Actor:
    """A CDA assignedAuthor / assignedEntity: person id (root, extension), names, organisation."""

    id_root: str | None
    id_extension: str | None
    family: str | None
    given: str | None
    org_name: str | None = None
    org_root: str | None = None
    org_extension: str | None = None
    specialty: Code | None = None


@dataclass(frozen=True)
class DocumentFacts:
    unique_id: str
    type_code: Code | None
    confidentiality: Code | None
    creation_time: str | None
    language: str | None
    title: str | None
    level: str | None
    template_ids: tuple[str, ...]
    authors: tuple[Actor, ...]
    legal_authenticator: Actor | None
    ins: tuple[str, str] | None                 # (value, OID)
    local_patient_id: tuple[str, str] | None    # (extension, root), the first non-INS id
    patient_name: tuple[str | None, str | None]  # (birth family name, first given name)
    birth_date: str | None
    sex: str | None
    service_start: str | None
    service_stop: str | None
    practice_setting: Code | None
    facility_type: Code | None
    encounter_code: str | None
    event_codes: tuple[Code, ...] = field(default_factory=tuple)
    references: tuple[str, ...] = field(default_factory=tuple)   # referenceIdList values
    replaces: str | None = None


def xds_time(ts: str | None) -> str | None:
    """HL7 TS -> XDS DTM in UTC (IHE ITI TF-3 §4.2.3.1.7): the offset, when given, is applied;
    fractions of a second are dropped; without an offset the value is kept as it is."""
    if not ts:
        return None
    ts = ts.strip()
    sign = next((c for c in "+-" if c in ts[8:]), None)
    offset = None
    if sign:
        ts, off = ts[: ts.rindex(sign)], ts[ts.rindex(sign) + 1:]
        if len(off) == 4 and off.isdigit():
            minutes = int(off[:2]) * 60 + int(off[2:])
            offset = dt.timedelta(minutes=minutes if sign == "+" else -minutes)
    ts = ts.split(".")[0]
    fmt = {8: "%Y%m%d", 10: "%Y%m%d%H", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}.get(len(ts))
    if not ts.isdigit() or fmt is None:
        return None
    if offset is None or len(ts) == 8:
        return ts
    return (dt.datetime.strptime(ts, fmt) - offset).strftime(fmt)


def _code(el) -> Code | None:
    if el is None or not el.get("code") or not el.get("codeSystem"):
        return None
    return Code(code=el.get("code"), scheme=el.get("codeSystem"), display=el.get("displayName"))


def _actor(assigned) -> Actor | None:
    if assigned is None:
        return None
    pid = assigned.find(f"{H}id")
    name = assigned.find(f"{H}assignedPerson/{H}name")
    org = assigned.find(f"{H}representedOrganization")
    oid = org.find(f"{H}id") if org is not None else None
    text = (lambda el, tag: ((el.findtext(f"{H}{tag}") or "").strip() or None) if el is not None else None)
    return Actor(id_root=pid.get("root") if pid is not None else None,
                 id_extension=pid.get("extension") if pid is not None else None,
                 family=text(name, "family"), given=text(name, "given"),
                 org_name=text(org, "name"),
                 org_root=oid.get("root") if oid is not None else None,
                 org_extension=oid.get("extension") if oid is not None else None,
                 specialty=_code(assigned.find(f"{H}code")))


IMAGING_REPORT = "18748-4"


def _references(root, header: dict) -> tuple[str, ...]:
    """referenceIdList (IHE ITI TF-3 §4.2.3.2.28, CXi): order, accession number, study UID, as
    the DMP example writes them. A serviceEvent id is a Study Instance UID only in an imaging
    report (CI-SIS IMG-CR-IMG); elsewhere (biology) it is not referenced."""
    out = []
    imaging = (header.get("code") or {}).get("code") == IMAGING_REPORT or header["modalities"]
    order, accession = header["order_id"], header["accession_number"]
    if accession and accession.get("extension") and accession.get("root"):
        out.append(f"{accession['extension']}^^^&{accession['root']}&ISO^urn:ihe:iti:xds:2013:accession")
    for uid in header["study_instance_uids"] if imaging else ():
        out.append(f"{uid}^^^^urn:ihe:iti:xds:2016:studyInstanceUID")
    if order and order.get("extension") and order.get("root"):
        out.append(f"{order['extension']}^^^&{order['root']}&ISO^urn:ihe:iti:xds:2013:order")
    return tuple(out)


def _event_codes(root) -> tuple[Code, ...]:
    codes: list[Code] = []
    for code_el in root.xpath("h:documentationOf/h:serviceEvent/h:code", namespaces=NS):
        for el in [code_el, *code_el.findall(f"{H}translation")]:
            c = _code(el)
            if c and c not in codes:
                codes.append(c)
    return tuple(codes)


def read_document_facts(cda: bytes) -> DocumentFacts:
    """The facts of one CDA document (``ValueError`` / ``XMLSyntaxError`` when it is no CDA)."""
    root = parse_cda(cda).getroot()
    header = read_header(root)
    if not header["id_str"]:
        raise ValueError("the CDA has no ClinicalDocument/id")
    first = (lambda path: next(iter(root.xpath(path, namespaces=NS)), None))
    patient_ids = header["record_target"]["ids"]
    ins = header["record_target"]["ins"]
    local = next((i for i in patient_ids if i and i.get("root") and i["root"] not in INS_OIDS
                  and i.get("extension")), None)
    traits = header["record_target"]["traits"]
    low = first("h:documentationOf/h:serviceEvent/h:effectiveTime/h:low/@value")
    high = first("h:documentationOf/h:serviceEvent/h:effectiveTime/h:high/@value")
    practice = _code(first("h:documentationOf/h:serviceEvent/h:performer/h:assignedEntity/"
                           "h:representedOrganization/h:standardIndustryClassCode")) or _code(
        first("h:author/h:assignedAuthor/h:representedOrganization/h:standardIndustryClassCode"))
    encounter = first("h:componentOf/h:encompassingEncounter/h:code")
    return DocumentFacts(
        unique_id=header["id_str"],
        type_code=_code(root.find(f"{H}code")),
        confidentiality=_code(root.find(f"{H}confidentialityCode")),
        creation_time=xds_time(header["effective_time"]),
        language=first("h:languageCode/@code"),
        title=header["title"],
        level=header["level"],
        template_ids=tuple(t for t in header["template_ids"] if t),
        authors=tuple(a for a in (_actor(x) for x in root.findall(f"{H}author/{H}assignedAuthor")) if a),
        legal_authenticator=_actor(first("h:legalAuthenticator/h:assignedEntity")),
        ins=(ins["value"], ins["oid"]) if ins else None,
        local_patient_id=(local["extension"], local["root"]) if local else None,
        patient_name=(traits.get("birth_name"), traits.get("first_given_name") or traits.get("given_names")),
        birth_date=traits.get("birth_date"),
        sex=traits.get("sex"),
        service_start=xds_time(low),
        service_stop=xds_time(high),
        practice_setting=practice,
        facility_type=_code(first("h:componentOf/h:encompassingEncounter/h:location/"
                                  "h:healthCareFacility/h:code")),
        encounter_code=encounter.get("code") if encounter is not None else None,
        event_codes=_event_codes(root),
        references=_references(root, header),
        replaces=header["replaces_str"],
    )
