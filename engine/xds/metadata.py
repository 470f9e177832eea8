"""The XDS metadata of a DMP request: the ``lcm:SubmitObjectsRequest`` of ITI-41 (publication,
replacement) and of ITI-57 (deletion).

Sources: CI-SIS "Transmission de documents CDA-R2 en HL7 v2" v2.1, mapping.md « Mapping XDS »
(« Lot de soumission », « Fiche »), the CI-SIS annex « Lien entre l'en-tête CDA et les métadonnées
XDS », profils-messages.md (MetaDMPMSS flags), def-proc-collab.md (« Demande de remplacement »:
the CDA relatedDocument RPLC gives the RPLC association; « Demande de suppression »: the document
goes to availabilityStatus Deleted); IHE ITI TF-3 §4.2.3 (attributes), §4.2.5 (the UUIDs),
§4.2.2 (associations); IHE ITI-57 (Update Document Set); the DMP's example request.

* one SubmissionSet (author = the SB PRT, contentTypeCode from PV1-2, patientId = the qualified INS
  ``<INS>^^^&<OID>&ISO^NH``, sourceId, uniqueId, submissionTime);
* one DocumentEntry per CDA (everything the CDA header gives, the SHA-1 and size of the exact bytes,
  confidentialityCode = the CDA's then one per active mask);
* the XAdES signature document entry (``signature_document``) with HasMember and ``signs``;
* a replacement adds an RPLC association from the new entry to the replaced one;
* a deletion (ITI-57) is a SubmissionSet and an UpdateAvailabilityStatus association to the
  entry, new status ``urn:asip:ci-sis:2010:StatusType:Deleted`` (DMP « TD3.3c »).

MODIF_CONF_CODE (profils-messages.md « Modification Confidentiality Code »: the request changes
the masking or the visibility) needs nothing of its own: in indirect authentication such a change
is a replacement carrying the new confidentiality classifications (contexte-metier.md), which this
module writes from the flags like any other. CONNEXION_SECRETE is a VIHF attribute (``vihf``).

entryUUIDs: the registry keeps the UUIDs a source gives (IHE ITI TF-3 §4.2.3.1.5), so each
DocumentEntry gets ``urn:uuid:`` + UUIDv5 of its uniqueId (:func:`entry_uuid_for`): a replacement or
a deletion finds the entry to point to from the CDA ids alone when the connector has not stored it.
The metadata holds PHI (INS, names, birth date).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lxml import etree

from engine.xds.document_facts import Actor, DocumentFacts, read_document_facts
from engine.xds.schemas import LCM_NS, RIM_NS
from engine.xds.settings import Coded, XdsSettings
from engine.xds.signature_document import build_signature_document
from engine.xds.signing import SigningIdentity

_R = f"{{{RIM_NS}}}"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

# IHE ITI TF-3 §4.2.5 (Metadata Identifiers)
SUBMISSION_SET_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
SS_AUTHOR = "urn:uuid:a7058bb9-b4e4-4307-ba5b-e3f0ab85e12d"
SS_CONTENT_TYPE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
STABLE_ENTRY = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
DE_AUTHOR = "urn:uuid:93606bcf-9494-43ec-9b4e-a7748d1a838d"
DE_CLASS = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
DE_CONFIDENTIALITY = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
DE_EVENT = "urn:uuid:2c6b8cb7-8b2a-4051-b291-b1ae6a575ef4"
DE_FORMAT = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
DE_FACILITY = "urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1"
DE_PRACTICE = "urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead"
DE_TYPE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
RPLC = "urn:ihe:iti:2007:AssociationType:RPLC"
SIGNS = "urn:ihe:iti:2007:AssociationType:signs"
UPDATE_AVAILABILITY = "urn:ihe:iti:2010:AssociationType:UpdateAvailabilityStatus"
APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
DMP_DELETED = "urn:asip:ci-sis:2010:StatusType:Deleted"

#: mapping.md « Fiche », formatCode: « CDA N1 => urn:ihe:iti:xds-sd:pdf:2008 »
N1_FORMAT = Coded(code="urn:ihe:iti:xds-sd:pdf:2008", scheme="1.3.6.1.4.1.19376.1.2.3",
                  display="Document à corps non structuré en Pdf/A-1")
CDA_MIME_TYPE = "text/xml"   # mapping.md « Fiche », mimeType: « text/xml pour un document CDA »
RPPS_OID = "1.2.250.1.71.4.2.1"
STRUCTURE_OID = "1.2.250.1.71.4.2.2"   # national structure ids (FINESS, SIRET...) of PRT-8.10
#: MetaDMPMSS flag -> TRE_A07 StatutVisibiliteDocument code (1.2.250.1.213.1.1.4.13), as the DMP
#: example classifies them
VISIBILITY_SCHEME = "1.2.250.1.213.1.1.4.13"
MASKS = (("MASQUE_PS", "MASQUE_PS", "Masqué aux professionnels de santé"),
         ("INVISIBLE_PATIENT", "INVISIBLE_PATIENT", "Non visible par le patient"),
         ("INVISIBLE_REP_LEGAUX", "INVISIBLE_REPRESENTANTS_LEGAUX",
          "Non visible par les représentants légaux du patient"))
#: CDA encompassingEncounter/code (HL7 ActCode) -> PV1-2 patient class, when PV1-2 is not known
ENCOUNTER_PATIENT_CLASS = {"IMP": "I", "ACUTE": "I", "NONAC": "I", "AMB": "O", "EMER": "E",
                           "HH": "O", "FLD": "O", "VR": "O", "SS": "O"}
#: the signature document entry (the DMP example's « Signature01 », IHE DSG)
SIGNATURE_CLASS = Coded(code="urn:oid:1.3.6.1.4.1.19376.1.2.1.1.1", scheme="URN", display="Digital Signature")
SIGNATURE_TYPE = Coded(code="E1762", scheme="ASTM", display="Full Document")
SIGNATURE_FORMAT = Coded(code="http://www.w3.org/2000/09/xmldsig#", scheme="URN",
                         display="Default Signature Style")
SIGNATURE_PURPOSE = Coded(code="1.2.840.10065.1.12.1.14", scheme="1.2.840.10065.1.12", display="Source")


class MetadataError(ValueError):
    """The message or its CDA lacks what the metadata needs (text without patient data)."""


@dataclass(frozen=True)
class EntryIds:
    unique_id: str
    entry_uuid: str
    replaces_entry_uuid: str | None = None


@dataclass(frozen=True)
class SubmissionMetadata:
    request: etree._Element                      # lcm:SubmitObjectsRequest
    attachments: tuple[tuple[str, bytes], ...]   # (entryUUID, exact bytes), in document order
    submission_set_unique_id: str
    submission_set_entry_uuid: str
    documents: tuple[EntryIds, ...]
    signature: EntryIds | None = None


def entry_uuid_for(unique_id: str) -> str:
    """The entryUUID this engine gives the DocumentEntry of ``unique_id`` (UUIDv5, OID namespace)."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, unique_id)}"


def oid_from_uuid(value: uuid.UUID) -> str:
    """A uniqueId for a submission set or a signature: ``2.25.<UUID as an integer>`` (ITU-T X.667)."""
    return f"2.25.{value.int}"


def xds_now(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y%m%d%H%M%S")


class _Writer:
    """Builds registry objects with short local ids for Classifications and ExternalIdentifiers."""

    def __init__(self) -> None:
        self.count = 0

    def local_id(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count:02d}"

    @staticmethod
    def slot(parent, name: str, values) -> None:
        values = [v for v in values if v]
        if not values:
            return
        slot = etree.SubElement(parent, f"{_R}Slot", name=name)
        vlist = etree.SubElement(slot, f"{_R}ValueList")
        for v in values:
            etree.SubElement(vlist, f"{_R}Value").text = v

    @staticmethod
    def name(parent, text: str | None, tag: str = "Name") -> None:
        if text is None:
            return
        etree.SubElement(etree.SubElement(parent, f"{_R}{tag}"), f"{_R}LocalizedString",
                         {XML_LANG: "fr-FR"}, charset="UTF-8", value=text)

    def coded(self, parent, scheme: str, obj: str, coded: Coded) -> None:
        cl = etree.SubElement(parent, f"{_R}Classification", classificationScheme=scheme,
                              classifiedObject=obj, id=self.local_id("cl"),
                              nodeRepresentation=coded.code)
        self.slot(cl, "codingScheme", [coded.scheme])
        self.name(cl, coded.display or coded.code)

    def author(self, parent, scheme: str, obj: str, person: str | None, institution: str | None,
               specialty: str | None = None) -> None:
        cl = etree.SubElement(parent, f"{_R}Classification", classificationScheme=scheme,
                              classifiedObject=obj, id=self.local_id("cl"), nodeRepresentation="")
        self.slot(cl, "authorPerson", [person])
        self.slot(cl, "authorInstitution", [institution])
        self.slot(cl, "authorSpecialty", [specialty])

    def external_id(self, parent, scheme: str, obj: str, value: str, label: str) -> None:
        ei = etree.SubElement(parent, f"{_R}ExternalIdentifier", identificationScheme=scheme,
                              registryObject=obj, id=self.local_id("ei"), value=value)
        self.name(ei, label)

    def association(self, parent, kind: str, source: str, target: str, assoc_id: str,
                    slots: Mapping[str, str] | None = None) -> None:
        assoc = etree.SubElement(parent, f"{_R}Association", associationType=kind, id=assoc_id,
                                 sourceObject=source, targetObject=target)
        for name, value in (slots or {}).items():
            self.slot(assoc, name, [value])


def xcn(person_id: str | None, family: str | None, given: str | None, oid: str | None) -> str | None:
    """An XCN as the DMP example writes it: ``id^family^given^^^^^^&OID&ISO^D^^^IDNPS`` (the
    identifier type IDNPS for a national PS id, RPPS OID)."""
    if not person_id:
        return None
    value = f"{person_id}^{family or ''}^{given or ''}^^^^^^&{oid or ''}&ISO"
    return value + ("^D^^^IDNPS" if oid == RPPS_OID else "")


def xon(name: str | None, org_id: str | None, oid: str | None) -> str | None:
    """An XON: ``name^^^^^&OID&ISO^IDNST^^^id`` (the DMP example)."""
    if not org_id:
        return None
    return f"{name or ''}^^^^^&{oid or STRUCTURE_OID}&ISO^IDNST^^^{org_id}"


def _actor_xcn(actor: Actor | None) -> str | None:
    if actor is None:
        return None
    return xcn(actor.id_extension, actor.family, actor.given, actor.id_root)


def patient_id(ins: Any) -> str:
    """XDS patientId: the qualified INS ``<INS>^^^&<OID>&ISO^NH`` (mapping.md, patientId)."""
    return f"{ins.value}^^^&{ins.oid}&ISO^NH"


def _content_type(submission: Any, facts: list[DocumentFacts], settings: XdsSettings,
                  patient_class: str | None) -> Coded:
    """contentTypeCode from PV1-2 (mapping.md « Lot de soumission »). The Submission carries no
    PV1-2: it comes from ``patient_class`` (or a ``patient_class`` attribute of the submission),
    then from the CDA encounter code (ActCode), then from the settings' default."""
    pclass = patient_class or getattr(submission, "patient_class", None)
    if not pclass:
        code = next((f.encounter_code for f in facts if f.encounter_code), None)
        pclass = ENCOUNTER_PATIENT_CLASS.get(code or "")
    value = settings.content_type_by_patient_class.get((pclass or "").upper(),
                                                       settings.content_type_default)
    return Coded(code=value, scheme=settings.content_type_scheme)


def _submission_set(root, w: _Writer, submission: Any, settings: XdsSettings, *, entry_uuid: str,
                    unique_id: str, now: dt.datetime, content_type: Coded) -> None:
    sender = getattr(getattr(submission, "recipients", None), "sender", None)
    person = getattr(sender, "person", None)
    author_person = xcn(getattr(person, "id", None), getattr(person, "family", None),
                        getattr(person, "given", None), getattr(person, "id_oid", None))
    if author_person is None:
        raise MetadataError("no PRT-5 in the SB PRT: the submission set authorPerson needs it")
    ss = etree.SubElement(root, f"{_R}RegistryPackage", id=entry_uuid)
    w.slot(ss, "submissionTime", [xds_now(now)])
    w.name(ss, settings.submission_title)
    # authorInstitution: PRT-8 of the SB PRT; the Submission keeps PRT-8.1 and 8.10 but not the
    # assigning authority PRT-8.6, taken as the national structure OID
    w.author(ss, SS_AUTHOR, entry_uuid, author_person,
             xon(getattr(sender, "organization_name", None), getattr(sender, "organization_id", None), None))
    w.coded(ss, SS_CONTENT_TYPE, entry_uuid, content_type)
    etree.SubElement(ss, f"{_R}Classification", classifiedObject=entry_uuid,
                     classificationNode=SUBMISSION_SET_NODE, id=w.local_id("cl"))
    w.external_id(ss, SS_PATIENT_ID, entry_uuid, patient_id(submission.ins), "XDSSubmissionSet.patientId")
    w.external_id(ss, SS_SOURCE_ID, entry_uuid, settings.source_id, "XDSSubmissionSet.sourceId")
    w.external_id(ss, SS_UNIQUE_ID, entry_uuid, unique_id, "XDSSubmissionSet.uniqueId")


def _confidentiality(w: _Writer, parent, obj: str, first: Coded | None, flags: Mapping[str, bool],
                     settings: XdsSettings) -> None:
    """mapping.md « Fiche », confidentialityCode: the CDA's first, then the MetaDMPMSS ones."""
    if first is None:
        raise MetadataError("the CDA has no confidentialityCode")
    w.coded(parent, DE_CONFIDENTIALITY, obj, first)
    if settings.mask_classifications:
        for flag, code, display in MASKS:
            if flags.get(flag):
                w.coded(parent, DE_CONFIDENTIALITY, obj, Coded(code=code, scheme=VISIBILITY_SCHEME,
                                                               display=display))


def _source_patient(facts: DocumentFacts, ins: Any) -> str:
    """sourcePatientId: the IPP (recordTarget id other than the INS) ``^PI``, or the INS ``^NH``."""
    if facts.local_patient_id:
        ext, root = facts.local_patient_id
        return f"{ext}^^^&{root}&ISO^PI"
    return patient_id(ins)


def _format_code(facts: DocumentFacts, settings: XdsSettings) -> Coded:
    if facts.level == "N1":
        return N1_FORMAT
    for template in facts.template_ids:
        if template in settings.format_codes:
            return settings.format_codes[template]
    raise MetadataError("no formatCode for this CDA model: add its templateId to xds.format_codes")


def _document_entry(root, w: _Writer, facts: DocumentFacts, data: bytes, submission: Any,
                    settings: XdsSettings, entry_uuid: str) -> None:
    ins = submission.ins
    if facts.ins is None or facts.ins != (ins.value, ins.oid):
        raise MetadataError("the CDA recordTarget INS differs from the message's (PID-3)")
    if facts.type_code is None:
        raise MetadataError("the CDA has no code (typeCode)")
    class_code = settings.class_codes.get(facts.type_code.code)
    if class_code is None:
        raise MetadataError(f"no classCode for typeCode {facts.type_code.code}: add its ASS_X04 row "
                            "to xds.class_codes")
    facility = facts.facility_type or settings.healthcare_facility_type
    practice = facts.practice_setting or settings.practice_setting
    if facility is None or practice is None:
        raise MetadataError("no healthcareFacilityTypeCode or practiceSettingCode in the CDA nor "
                            "in the settings")
    eo = etree.SubElement(root, f"{_R}ExtrinsicObject", id=entry_uuid, mimeType=CDA_MIME_TYPE,
                          objectType=STABLE_ENTRY)
    w.slot(eo, "creationTime", [facts.creation_time])
    w.slot(eo, "languageCode", [facts.language or settings.language_default])
    w.slot(eo, "legalAuthenticator", [_actor_xcn(facts.legal_authenticator)])
    w.slot(eo, "serviceStartTime", [facts.service_start])
    w.slot(eo, "serviceStopTime", [facts.service_stop])
    w.slot(eo, "sourcePatientId", [_source_patient(facts, ins)])
    family, given = facts.patient_name
    w.slot(eo, "sourcePatientInfo", [f"PID-5|{family or ''}^{given or ''}^^^^^L" if family else None,
                                     f"PID-7|{facts.birth_date}" if facts.birth_date else None,
                                     f"PID-8|{facts.sex}" if facts.sex else None])
    w.slot(eo, "hash", [hashlib.sha1(data).hexdigest()])
    w.slot(eo, "size", [str(len(data))])
    w.slot(eo, "urn:ihe:iti:xds:2013:referenceIdList", list(facts.references))
    w.name(eo, facts.title)
    for author in facts.authors:
        w.author(eo, DE_AUTHOR, entry_uuid, _actor_xcn(author),
                 xon(author.org_name, author.org_extension, author.org_root),
                 f"{author.specialty.code}^{author.specialty.display or ''}^{author.specialty.scheme}"
                 if author.specialty else None)
    w.coded(eo, DE_CLASS, entry_uuid, class_code)
    w.coded(eo, DE_TYPE, entry_uuid, facts.type_code)
    _confidentiality(w, eo, entry_uuid, facts.confidentiality, submission.flags, settings)
    w.coded(eo, DE_FORMAT, entry_uuid, _format_code(facts, settings))
    w.coded(eo, DE_FACILITY, entry_uuid, facility)
    w.coded(eo, DE_PRACTICE, entry_uuid, practice)
    for event in facts.event_codes:
        w.coded(eo, DE_EVENT, entry_uuid, event)
    w.external_id(eo, DE_PATIENT_ID, entry_uuid, patient_id(ins), "XDSDocumentEntry.patientId")
    w.external_id(eo, DE_UNIQUE_ID, entry_uuid, facts.unique_id, "XDSDocumentEntry.uniqueId")


def _signature_entry(root, w: _Writer, data: bytes, facts: DocumentFacts, submission: Any,
                     settings: XdsSettings, *, entry_uuid: str, unique_id: str, now: dt.datetime) -> None:
    """The DMP example's « Signature01 » entry, with the first document's context codes."""
    ins = submission.ins
    eo = etree.SubElement(root, f"{_R}ExtrinsicObject", id=entry_uuid, mimeType="text/xml",
                          objectType=STABLE_ENTRY)
    stamp = xds_now(now)
    w.slot(eo, "creationTime", [stamp])
    w.slot(eo, "languageCode", ["art"])   # IHE DSG: an artificial language
    w.slot(eo, "legalAuthenticator", [_actor_xcn(facts.legal_authenticator)])
    w.slot(eo, "serviceStartTime", [stamp])
    w.slot(eo, "serviceStopTime", [stamp])
    w.slot(eo, "sourcePatientId", [patient_id(ins)])
    w.slot(eo, "hash", [hashlib.sha1(data).hexdigest()])
    w.slot(eo, "size", [str(len(data))])
    w.slot(eo, "urn:ihe:iti:xds:2013:referenceIdList", list(facts.references))
    w.name(eo, "Source")
    for author in facts.authors[:1]:
        w.author(eo, DE_AUTHOR, entry_uuid, _actor_xcn(author),
                 xon(author.org_name, author.org_extension, author.org_root))
    w.coded(eo, DE_CLASS, entry_uuid, SIGNATURE_CLASS)
    w.coded(eo, DE_TYPE, entry_uuid, SIGNATURE_TYPE)
    # a signature tells that the documents exist: no more visible than they are
    _confidentiality(w, eo, entry_uuid, facts.confidentiality, submission.flags, settings)
    w.coded(eo, DE_FORMAT, entry_uuid, SIGNATURE_FORMAT)
    w.coded(eo, DE_FACILITY, entry_uuid, facts.facility_type or settings.healthcare_facility_type)
    w.coded(eo, DE_PRACTICE, entry_uuid, facts.practice_setting or settings.practice_setting)
    w.coded(eo, DE_EVENT, entry_uuid, SIGNATURE_PURPOSE)
    w.external_id(eo, DE_PATIENT_ID, entry_uuid, patient_id(ins), "XDSDocumentEntry.patientId")
    w.external_id(eo, DE_UNIQUE_ID, entry_uuid, unique_id, "XDSDocumentEntry.uniqueId")


@dataclass
class _Draft:
    """A SubmitObjectsRequest with its submission set written, and the documents read."""

    request: etree._Element
    objects: etree._Element
    writer: _Writer
    ss_uuid: str
    ss_unique: str
    blobs: list[bytes]
    facts: list[DocumentFacts]


def _start(submission: Any, settings: XdsSettings, *, now: dt.datetime,
           uuid_factory: Callable[[], uuid.UUID], patient_class: str | None) -> _Draft:
    if getattr(submission, "ins", None) is None:
        raise MetadataError("no qualified INS: nothing goes to the DMP without one")
    docs = list(getattr(submission, "documents", []) or [])
    if not docs:
        raise MetadataError("the message carries no document")
    blobs = [d.raw_bytes() for d in docs]
    facts = [read_document_facts(b) for b in blobs]
    request = etree.Element(f"{{{LCM_NS}}}SubmitObjectsRequest", nsmap={"lcm": LCM_NS, "rim": RIM_NS})
    objects = etree.SubElement(request, f"{_R}RegistryObjectList")
    draft = _Draft(request, objects, _Writer(), f"urn:uuid:{uuid_factory()}",
                   oid_from_uuid(uuid_factory()), blobs, facts)
    _submission_set(objects, draft.writer, submission, settings, entry_uuid=draft.ss_uuid,
                    unique_id=draft.ss_unique, now=now,
                    content_type=_content_type(submission, facts, settings, patient_class))
    return draft


def build_submission_metadata(submission: Any, settings: XdsSettings, signer: SigningIdentity | None, *,
                              now: dt.datetime, uuid_factory: Callable[[], uuid.UUID] = uuid.uuid4,
                              patient_class: str | None = None,
                              replaced_entry_uuids: Mapping[str, str] | None = None
                              ) -> SubmissionMetadata:
    """ITI-41 metadata for a publication (action ``initial``) or a replacement (``replace``).

    ``replaced_entry_uuids``: replaced document uniqueId -> its entryUUID in the DMP, when the
    connector knows it; otherwise the entryUUID this engine gave it (:func:`entry_uuid_for`)."""
    d = _start(submission, settings, now=now, uuid_factory=uuid_factory, patient_class=patient_class)
    objects, w, ss_uuid, ss_unique, blobs, facts = d.objects, d.writer, d.ss_uuid, d.ss_unique, d.blobs, d.facts
    entries: list[EntryIds] = []
    for fact, blob in zip(facts, blobs):
        entry = entry_uuid_for(fact.unique_id)
        replaced = None
        if getattr(submission, "action", None) == "replace":
            parent = fact.replaces or getattr(submission, "parent_document_id", None)
            if not parent:
                raise MetadataError("a replacement without the replaced document id (relatedDocument "
                                    "RPLC / TXA-13)")
            replaced = (replaced_entry_uuids or {}).get(parent) or entry_uuid_for(parent)
        _document_entry(objects, w, fact, blob, submission, settings, entry)
        entries.append(EntryIds(fact.unique_id, entry, replaced))
    attachments = [(e.entry_uuid, b) for e, b in zip(entries, blobs)]

    signature = None
    if settings.sign_submission:
        if signer is None:
            raise MetadataError("xds.sign_submission needs the signing identity")
        sig_unique = oid_from_uuid(uuid_factory())
        sig_bytes = build_signature_document(
            signer, signature_id=sig_unique, submission_set_unique_id=ss_unique,
            documents=[(e.unique_id, b) for e, b in zip(entries, blobs)], now=now,
            algorithm=settings.signature_algorithm)
        signature = EntryIds(sig_unique, f"urn:uuid:{uuid_factory()}")
        _signature_entry(objects, w, sig_bytes, facts[0], submission, settings,
                         entry_uuid=signature.entry_uuid, unique_id=sig_unique, now=now)
        attachments.append((signature.entry_uuid, sig_bytes))

    original = {"SubmissionSetStatus": "Original"}
    for e in entries:
        w.association(objects, HAS_MEMBER, ss_uuid, e.entry_uuid, f"urn:uuid:{uuid_factory()}", original)
        if e.replaces_entry_uuid:
            w.association(objects, RPLC, e.entry_uuid, e.replaces_entry_uuid, f"urn:uuid:{uuid_factory()}")
    if signature:
        w.association(objects, HAS_MEMBER, ss_uuid, signature.entry_uuid, f"urn:uuid:{uuid_factory()}",
                      original)
        w.association(objects, SIGNS, signature.entry_uuid, ss_uuid, f"urn:uuid:{uuid_factory()}",
                      original)
    return SubmissionMetadata(request=d.request, attachments=tuple(attachments),
                              submission_set_unique_id=ss_unique, submission_set_entry_uuid=ss_uuid,
                              documents=tuple(entries), signature=signature)


def build_deletion_metadata(submission: Any, settings: XdsSettings, *, now: dt.datetime,
                            uuid_factory: Callable[[], uuid.UUID] = uuid.uuid4,
                            patient_class: str | None = None,
                            entry_uuids: Mapping[str, str] | None = None) -> SubmissionMetadata:
    """ITI-57 metadata that deletes the documents of a deletion message (MDM^T04, ORU with OBX-11
    « D »): per document, an UpdateAvailabilityStatus association from a new submission set to
    its entry, OriginalStatus Approved, NewStatus ``urn:asip:ci-sis:2010:StatusType:Deleted``.

    ``entry_uuids``: document uniqueId -> entryUUID in the DMP when known (else :func:`entry_uuid_for`)."""
    d = _start(submission, settings, now=now, uuid_factory=uuid_factory, patient_class=patient_class)
    objects, w, ss_uuid, ss_unique, facts = d.objects, d.writer, d.ss_uuid, d.ss_unique, d.facts
    entries = []
    for fact in facts:
        target = (entry_uuids or {}).get(fact.unique_id) or entry_uuid_for(fact.unique_id)
        w.association(objects, UPDATE_AVAILABILITY, ss_uuid, target, f"urn:uuid:{uuid_factory()}",
                      {"OriginalStatus": APPROVED, "NewStatus": DMP_DELETED})
        entries.append(EntryIds(fact.unique_id, target))
    return SubmissionMetadata(request=d.request, attachments=(), submission_set_unique_id=ss_unique,
                              submission_set_entry_uuid=ss_uuid, documents=tuple(entries))
