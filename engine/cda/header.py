"""Read the CDA R2 header fields the report channel and the DMP/MSSanté/DRIMbox connectors need.

Sources: CI-SIS "Structuration minimale des documents de santé" (header), CI-SIS IMG-CR-IMG 2024.01
(reference ``corpus/cda/IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml``: inFulfillmentOf/order with
``ps3-20:accessionNumber``, documentationOf/serviceEvent with the Study Instance UID, modality and
region as qualified translations), transmission guide ``mapping.md`` (CDA header -> XDS metadata:
practiceSettingCode = author/assignedAuthor/representedOrganization/standardIndustryClassCode,
healthcareFacilityTypeCode = componentOf/encompassingEncounter/location/healthCareFacility/code).

Untrusted input: lxml with ``resolve_entities=False, no_network=True, load_dtd=False``.
The result holds patient traits (PHI): it must only be stored with the message.
"""
from __future__ import annotations

from typing import Any

from lxml import etree

NS = {"h": "urn:hl7-org:v3", "ps3-20": "urn:dicom-org:ps3-20"}
H = "{urn:hl7-org:v3}"

#: INS OIDs (CI-SIS, "Annexe - INS dans les documents CDA"): NIR, NIA, test NIR, demo NIR
INS_OIDS = {
    "1.2.250.1.213.1.4.8": "INS-NIR",
    "1.2.250.1.213.1.4.9": "INS-NIA",
    "1.2.250.1.213.1.4.10": "INS-NIR-TEST",
    "1.2.250.1.213.1.4.11": "INS-NIR-DEMO",
}
RPPS_OID = "1.2.250.1.71.4.2.1"
#: CDA R2 N1 templateId (IHE XDS-SD / CI-SIS N1 "CDA non structuré")
N1_TEMPLATE = "1.3.6.1.4.1.19376.1.2.20"
DCM_CODESYSTEM = "1.2.840.10008.2.16.4"
MODALITY_QUALIFIER = "121139"  # DCM "Modalité d'imagerie"
REGION_QUALIFIER = "39111-0"  # LOINC "localisation anatomique"


def safe_parser(*, huge: bool = True) -> etree.XMLParser:
    """The only XML parser configuration used for untrusted input (no DTD, no entities, no network)."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           dtd_validation=False, huge_tree=huge, remove_comments=False)


class DoctypeNotAllowed(ValueError):
    """The document declares a DTD. A CDA R2 document is defined by its XML schema and carries no
    document type declaration; one that does is refused as content, before anything reads it
    (its entities are never expanded, and XSD validation cannot run on unexpanded entities)."""


def parse_cda(cda_bytes: bytes) -> etree._ElementTree:
    """Parse an untrusted CDA: ``etree.XMLSyntaxError`` when not well-formed,
    :class:`DoctypeNotAllowed` when it declares a DTD."""
    root = etree.fromstring(cda_bytes, safe_parser())
    tree = etree.ElementTree(root)
    info = root.getroottree().docinfo
    if info.doctype or info.internalDTD is not None:
        raise DoctypeNotAllowed("document type declaration (DTD) not allowed in a CDA document")
    return tree


def _ii(el) -> dict[str, str | None] | None:
    if el is None:
        return None
    return {"root": el.get("root"), "extension": el.get("extension")}


def ii_to_str(ii: dict | None) -> str | None:
    """Document id as one string: ``root^extension`` (TXA-12 EI form) or the bare OID root.

    Transmission guide, profils-messages.md TXA-12 note 1: ``extension^^root^ISO`` when extension is
    present; bare OID otherwise. We keep the internal form ``root^extension`` / ``root``.
    """
    if not ii or not ii.get("root"):
        return None
    return f"{ii['root']}^{ii['extension']}" if ii.get("extension") else ii["root"]


def _code(el) -> dict[str, str | None] | None:
    if el is None:
        return None
    return {"code": el.get("code"), "code_system": el.get("codeSystem"),
            "display_name": el.get("displayName")}


def _first(root, path: str):
    r = root.xpath(path, namespaces=NS)
    return r[0] if r else None


def _person(assigned) -> dict[str, Any] | None:
    if assigned is None:
        return None
    ids = [_ii(i) for i in assigned.findall(f"{H}id")]
    rpps = next((i for i in ids if i and i["root"] == RPPS_OID), None)
    name = assigned.find(f"{H}assignedPerson/{H}name")
    org = assigned.find(f"{H}representedOrganization")
    return {
        "ids": ids,
        "rpps": rpps["extension"] if rpps else None,
        "family": (name.findtext(f"{H}family") or "").strip() or None if name is not None else None,
        "given": (name.findtext(f"{H}given") or "").strip() or None if name is not None else None,
        "organization_id": _ii(org.find(f"{H}id")) if org is not None else None,
        "organization_name": (org.findtext(f"{H}name") or None) if org is not None else None,
    }


def read_header(cda: bytes | etree._ElementTree | etree._Element) -> dict[str, Any]:
    """Return the header fields of a CDA R2 document as a plain dict (see module docstring)."""
    if isinstance(cda, (bytes, bytearray)):
        root = parse_cda(bytes(cda)).getroot()
    elif isinstance(cda, etree._ElementTree):
        root = cda.getroot()
    else:
        root = cda
    if root.tag != f"{H}ClinicalDocument":
        raise ValueError("root element is not hl7:ClinicalDocument")

    # recordTarget: INS = id whose root is an INS OID; the others are local ids (IPP)
    pr = _first(root, "h:recordTarget/h:patientRole")
    patient_ids = [_ii(i) for i in pr.findall(f"{H}id")] if pr is not None else []
    ins = next((i for i in patient_ids if i and i["root"] in INS_OIDS), None)
    pat = pr.find(f"{H}patient") if pr is not None else None
    traits: dict[str, Any] = {}
    if pat is not None:
        name = pat.find(f"{H}name")
        if name is not None:
            fam = [f for f in name.findall(f"{H}family")]
            giv = [g for g in name.findall(f"{H}given")]
            birth = next((f.text for f in fam if f.get("qualifier") == "BR"), None)
            traits["birth_name"] = birth or (fam[0].text if fam else None)
            used = next((f.text for f in fam if f.get("qualifier") == "CL"), None)
            traits["used_name"] = used
            # INS traits: given names of the birth certificate (unqualified <given>), first given (BR)
            unq = [g.text for g in giv if not g.get("qualifier")]
            traits["given_names"] = unq[0] if unq else None
            traits["first_given_name"] = next((g.text for g in giv if g.get("qualifier") == "BR"),
                                              None)
            traits["used_given_name"] = next((g.text for g in giv if g.get("qualifier") == "CL"),
                                             None)
        sex = pat.find(f"{H}administrativeGenderCode")
        traits["sex"] = sex.get("code") if sex is not None else None
        bt = pat.find(f"{H}birthTime")
        traits["birth_date"] = bt.get("value") if bt is not None else None
        bp = pat.find(f"{H}birthplace/{H}place/{H}addr/{H}county")
        traits["birth_place_code"] = bp.text if bp is not None else None

    template_ids = [t.get("root") for t in root.findall(f"{H}templateId")]
    body = _first(root, "h:component/*")
    if body is not None and body.tag == f"{H}nonXMLBody":
        level = "N1"
    elif body is not None and body.tag == f"{H}structuredBody":
        level = "N3"
    else:
        level = None
    media_type = None
    if level == "N1":
        txt = body.find(f"{H}text")
        media_type = txt.get("mediaType") if txt is not None else None

    author = _first(root, "h:author/h:assignedAuthor")
    legal = _first(root, "h:legalAuthenticator/h:assignedEntity")
    custodian = _first(root, "h:custodian/h:assignedCustodian/h:representedCustodianOrganization")
    order = _first(root, "h:inFulfillmentOf/h:order")
    events = root.xpath("h:documentationOf/h:serviceEvent", namespaces=NS)
    study_uids, modalities, regions = [], [], []
    for ev in events:
        sid = ev.find(f"{H}id")
        if sid is not None and sid.get("root"):
            study_uids.append(sid.get("root"))
        for tr in ev.xpath("h:code/h:translation", namespaces=NS):
            q = tr.find(f"{H}qualifier/{H}name")
            qcode = q.get("code") if q is not None else None
            if qcode == MODALITY_QUALIFIER or (q is None and tr.get("codeSystem") == DCM_CODESYSTEM):
                if tr.get("code") not in modalities:
                    modalities.append(tr.get("code"))
            elif qcode == REGION_QUALIFIER:
                c = _code(tr)
                if c not in regions:
                    regions.append(c)
    rel = _first(root, "h:relatedDocument[@typeCode='RPLC']/h:parentDocument/h:id")
    vn = _first(root, "h:versionNumber")
    eff = _first(root, "h:effectiveTime")
    practice = _first(root, "h:author/h:assignedAuthor/h:representedOrganization/"
                            "h:standardIndustryClassCode")
    facility = _first(root, "h:componentOf/h:encompassingEncounter/h:location/"
                            "h:healthCareFacility/h:code")
    doc_id = _ii(root.find(f"{H}id"))
    set_id = _ii(root.find(f"{H}setId"))
    code = root.find(f"{H}code")
    return {
        "id": doc_id,
        "id_str": ii_to_str(doc_id),
        "set_id": set_id,
        "set_id_str": ii_to_str(set_id),
        "version_number": int(vn.get("value")) if vn is not None and (vn.get("value") or "").isdigit()
        else None,
        "code": _code(code),
        "title": root.findtext(f"{H}title"),
        "confidentiality_code": _code(root.find(f"{H}confidentialityCode")),
        "effective_time": eff.get("value") if eff is not None else None,
        "template_ids": template_ids,
        "level": level,
        "media_type": media_type,
        "author": _person(author),
        "legal_authenticator": _person(legal),
        "custodian": {"id": _ii(custodian.find(f"{H}id")),
                      "name": custodian.findtext(f"{H}name")} if custodian is not None else None,
        "order_id": _ii(order.find(f"{H}id")) if order is not None else None,
        "accession_number": _ii(order.find("{urn:dicom-org:ps3-20}accessionNumber"))
        if order is not None else None,
        "study_instance_uids": study_uids,
        "study_instance_uid": study_uids[0] if study_uids else None,
        "modalities": modalities,
        "modality": modalities[0] if modalities else None,
        "regions": regions,
        "region": regions[0] if regions else None,
        "practice_setting": _code(practice),
        "facility_type": _code(facility),
        "replaces": _ii(rel),
        "replaces_str": ii_to_str(_ii(rel)),
        "record_target": {
            "ids": patient_ids,
            "ins": {"value": ins["extension"], "oid": ins["root"]} if ins else None,
            "traits": traits,
        },
    }
