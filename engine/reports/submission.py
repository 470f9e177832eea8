"""Canonical submission of a report message: what the CI-SIS message says, in one model.

One ``Submission`` per ORU^R01 / MDM^T02/T10/T04 message of the CI-SIS guide "Transmission de
documents CDA-R2 en HL7 v2" v2.1. It carries everything the DMP, MSSanté and DRIMbox connectors
need, including the untouched document bytes (Base64 of the exact bytes extracted from OBX-5).

PHI: the patient identity (INS, IPP, traits), the documents and the mail bodies are patient data
(docs/architecture.md, "Patient data (PHI) rule"). A ``Submission`` may only be stored with the
message (message store); logs and events take ``technical_summary()`` only. Error and warning texts
are written by the engine and never contain patient data.
"""
from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: MetaDMPMSS flag names (transmission guide, meta-dmp-mss.md, table « MetaDMP/MSS »), in the
#: order of profils-messages.md « Les métadonnées DMP/MSSanté ». The first 8 are required, the
#: two acknowledgement flags optional (Yes/No), the two CORPSMAIL_* are ED texts, not flags.
REQUIRED_FLAGS = (
    "MASQUE_PS",
    "INVISIBLE_PATIENT",
    "INVISIBLE_REP_LEGAUX",
    "CONNEXION_SECRETE",
    "MODIF_CONF_CODE",
    "DESTDMP",
    "DESTMSSANTEPS",
    "DESTMSSANTEPAT",
)
OPTIONAL_FLAGS = ("ACK_RECEPTION", "ACK_LECTURE_MSS")
FLAG_NAMES = REQUIRED_FLAGS + OPTIONAL_FLAGS
MAIL_BODY_NAMES = ("CORPSMAIL_PS", "CORPSMAIL_PATIENT")

Action = Literal["initial", "replace", "delete"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Issue(_Model):
    """An error (guide code 900-906) or a warning. ``text`` never holds patient data."""

    code: str
    text: str
    location: str | None = None
    #: HL7 table 0357 code for ERR-3 (207 application error by default, error-codes.md)
    hl7_code: str | None = None
    #: the id of the check in the catalogue (:mod:`engine.reports.rules`)
    rule: str | None = None


class INS(_Model):
    value: str
    oid: str


class Person(_Model):
    """A health professional (RPPS) or an organisation-bound actor."""

    id: str | None = None
    id_oid: str | None = None
    family: str | None = None
    given: str | None = None
    organization_id: str | None = None
    organization_name: str | None = None


class PatientTraits(_Model):
    birth_name: str | None = None
    given_names: str | None = None
    first_given_name: str | None = None
    used_name: str | None = None
    birth_date: str | None = None
    sex: str | None = None


class Document(_Model):
    id: str | None = None
    set_id: str | None = None
    version_number: int | None = None
    type_code: str | None = None
    level: Literal["N1", "N3"] | None = None
    sha256: str
    size: int
    media_type: str = "text/xml"
    body_media_type: str | None = None
    confidentiality_code: str | None = None
    effective_time: str | None = None
    title: str | None = None
    template_ids: list[str] = Field(default_factory=list)
    author: Person | None = None
    legal_authenticator: Person | None = None
    custodian: Person | None = None
    order_id: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    modality: str | None = None
    region: str | None = None
    practice_setting: str | None = None
    facility_type: str | None = None
    replaces: str | None = None
    record_target_ins: INS | None = None
    obx_set_id: str | None = None
    obx_result_status: str | None = None
    #: Base64 of the exact bytes extracted from OBX-5 (never re-serialised)
    raw_bytes_b64: str | None = None
    #: alternative to raw_bytes_b64: a reference to where the bytes are stored
    reference: str | None = None

    def raw_bytes(self) -> bytes:
        if self.raw_bytes_b64 is None:
            raise ValueError("document bytes are held by reference")
        return base64.b64decode(self.raw_bytes_b64)


class Sender(_Model):
    person: Person | None = None
    organization_id: str | None = None
    organization_id_type: str | None = None
    organization_name: str | None = None
    device: str | None = None
    #: PRT-15.4 of the PRT SB: the sender's mail address (LPS profile: the MSSanté mail sender,
    #: lps-cda-mssante/profils-messages.md « Segment PRT (Requis) ... Expéditeur »)
    address: str | None = None


class Participant(_Model):
    """A PRT RCT as carried: address (PRT-15.4), person (PRT-5), organisation (PRT-8)."""

    address: str | None = None
    person: Person | None = None
    organization_name: str | None = None
    organization_id: str | None = None
    organization_id_type: str | None = None
    organization_authority: str | None = None


class MssMail(_Model):
    """LPS profile, OBX 2 « informations du courriel MSSanté dont a été extrait le document »
    (lps-cda-mssante/profils-messages.md): OBX-3.1 Message-ID, OBX-3.2 subject, OBX-5 the mail
    content in Base64 (PHI: stored with the message only)."""

    message_id: str | None = None
    subject: str | None = None
    content: str | None = None
    obx_set_id: str | None = None


class Recipients(_Model):
    mss_ps: list[str] = Field(default_factory=list)
    mss_patient: str | None = None
    dmp: bool = False
    drimbox: bool = False
    reply_to: str | None = None
    sender: Sender | None = None
    #: NTE-4 « FIN » after DESTMSSANTEPAT: the patient must not be able to reply
    patient_no_reply: bool = False
    #: every PRT RCT as carried (address, person, organisation); for the LPS profile these are
    #: the initial recipient(s) of the MSSanté mail
    rct: list[Participant] = Field(default_factory=list)


class Acks(_Model):
    reception: bool = False
    lecture: bool = False


class Submission(_Model):
    message_type: str
    control_id: str
    version: str | None = None
    profile: str | None = None
    sending_application: str | None = None
    sending_facility: str | None = None
    action: Action | None = None
    parent_document_id: str | None = None
    ins: INS | None = None
    #: PID-32 (identity reliability, IHE PAM France): the INS is qualified only with VALI
    identity_reliability: str | None = None
    ipp: str | None = None
    #: PV1-2 patient class (I, O, E, R, N...): the DMP metadata's contentTypeCode
    patient_class: str | None = None
    patient: PatientTraits = Field(default_factory=PatientTraits)
    documents: list[Document] = Field(default_factory=list)
    flags: dict[str, bool] = Field(default_factory=dict)
    recipients: Recipients = Field(default_factory=Recipients)
    acks: Acks = Field(default_factory=Acks)
    mail_bodies: dict[str, str] = Field(default_factory=dict)
    #: LPS profile only (MSH-21 ``1.1^CISIS_CDA_HL7_LPS``): the MSSanté mail the document came from
    mail: MssMail | None = None
    errors: list[Issue] = Field(default_factory=list)
    warnings: list[Issue] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_inspect_json(self, *, include_bytes: bool = False) -> dict[str, Any]:
        """The ``minipfi inspect --json`` view, plus a few useful extras."""
        docs = []
        for d in self.documents:
            item = {"id": d.id, "type_code": d.type_code, "level": d.level, "sha256": d.sha256,
                    "size": d.size, "set_id": d.set_id, "version_number": d.version_number,
                    "replaces": d.replaces, "confidentiality_code": d.confidentiality_code}
            if include_bytes:
                item["raw_bytes_b64"] = d.raw_bytes_b64
            docs.append(item)
        return {
            "message_type": self.message_type,
            "control_id": self.control_id,
            "action": self.action,
            "parent_document_id": self.parent_document_id,
            "ins": self.ins.model_dump() if self.ins else None,
            "flags": {k: bool(v) for k, v in self.flags.items()},
            "recipients": {
                "mss_ps": list(self.recipients.mss_ps),
                "mss_patient": self.recipients.mss_patient,
                "dmp": self.recipients.dmp,
                "drimbox": self.recipients.drimbox,
                "reply_to": self.recipients.reply_to,
            },
            "acks": self.acks.model_dump(),
            "documents": docs,
            "errors": [_issue_json(e) for e in self.errors],
            "warnings": [_issue_json(w) for w in self.warnings],
        }

    def technical_summary(self) -> dict[str, Any]:
        """PHI-free view for logs/events: ids of the message, codes, counts, hashes."""
        return {
            "message_type": self.message_type,
            "control_id": self.control_id,
            "action": self.action,
            "documents": [{"sha256": d.sha256, "size": d.size, "level": d.level,
                           "type_code": d.type_code} for d in self.documents],
            "flags": dict(self.flags),
            "dmp": self.recipients.dmp,
            "mss_ps_count": len(self.recipients.mss_ps),
            "mss_patient": self.recipients.mss_patient is not None,
            "errors": [{"code": e.code, "text": e.text} for e in self.errors],
        }


def _issue_json(i: Issue) -> dict[str, Any]:
    return {"rule": i.rule, "code": i.code, "location": i.location, "text": i.text}
