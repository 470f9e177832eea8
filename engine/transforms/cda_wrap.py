"""``cda_wrap``: wrap a bare PACS report (ORU^R01) into a CDA R2 N1 "CR d'imagerie médicale".

The PACS sends its report as an ORU^R01 carrying either a PDF (OBX value type
``ED``) or text lines (OBX ``TX``/``FT``); the engine builds the CDA R2 N1 document of the CI-SIS
IMG-CR-IMG 2024.01 model (:mod:`engine.cda.build`) with the patient's strict INS traits taken from
the identity registry, never from the PACS message.

Two entry points:

* :func:`wrap_pacs_report` (pure): ``(raw, codec, params, lookup, previous=...) -> WrapResult``
  with the CDA bytes, its header (:func:`engine.cda.header.read_header`) and warnings. This is what
  the report channel calls: **the CDA document is what goes into the canonical submission**.
* the registered transform ``cda_wrap`` (thin layer, ``operates_on="bytes"``): returns an
  ORU^R01 of the CI-SIS guide "Transmission de documents CDA-R2 en HL7 v2" v2.1
  (``profils-messages.md``: MSH-21 ``2.1^CISIS_CDA_HL7_V2``, ORC-1 NW/RO, document OBX ``ED``
  ``^TEXT^XML^Base64^…`` with OBX-11 F/C, PRT SB, PRT RCT per MSSanté recipient the flags ask for (``mss_recipients``;
  the patient as ``<INS>@patient.mssante.fr``), PRT REPLY, then the 8 required MetaDMPMSS flag OBX).
  ``ctx.extras["identity_lookup"]`` is ``lookup(ipp, authority) -> dict | None``
  (:meth:`IdentityView.to_json`); optional ``ctx.extras["previous_document_lookup"]`` is
  ``lookup(keys: dict) -> dict | None`` giving the header (``read_header`` form: ``id``,
  ``set_id``, ``version_number``) of the version to replace.

Where each field is read in the PACS ORU (conventions of this module):

============================  ===================================================================
CDA                           ORU^R01 (first match wins)
============================  ===================================================================
patient (INS + strict traits)  identity registry, looked up with the PID-3 repetition whose CX-5 is
                              ``PI`` (else the first non-INS one); authority = CX-4.1, else CX-4.2.
                              A PID-3 INS (CX-5 ``INS``) must equal the registry INS.
IPP root OID                  PID-3 CX-4.2 when CX-4.3 = ``ISO``, else ``params.ipp_root_oid``
order id (inFulfillmentOf)    ORC-2, else OBR-2 (EI: CX-1 extension, EI-3 root when ISO, else
                              ``params.order_root_oid``)
accession number (ps3-20)     OBR-18 (IHE SWF "placer field 1"), else OBR-3.1 (filler order
                              number); root = ``params.accession_root_oid`` (OBR-3 EI-3 if ISO)
StudyInstanceUID              ZDS-1.1 (IHE RAD SWF ``ZDS|<uid>^<app>^Application^DICOM``), else the
                              OBX whose OBX-3.1 is ``113014`` (DCM "Study Instance UID") or
                              ``StudyInstanceUID`` (OBX-5), else IPC-3
modality                      IPC-5.1, else OBR-24 when it is a DICOM modality, else
                              ``params.default_modality``
region                        OBX whose OBX-3.1 is ``39111-0`` (LOINC body site), OBX-5 CE
exam code                     OBR-4 when its coding system (4.3) is ``LN``; ``CCAM`` -> CCAM
                              translation
service times                 OBR-7 (start), OBR-8 (end, else OBR-7)
document effectiveTime        OBR-22 (results report/status change), else MSH-7
author                        OBR-32.1 (principal result interpreter, NDL/CNN: 1 id, 2 family,
                              3 given, 6 prefix; 11-digit RPPS numbers get the ``8`` prefix of the
                              national PS id), else ``params.default_author``
legal authenticator           OBX-16 of the report OBX (responsible observer, XCN), else the
                              author; time = OBX-14, else OBR-22, else MSH-7
report body                   first OBX ``ED`` with subtype PDF and encoding Base64
                              (``^AP^PDF^Base64^…`` / ``^application^pdf^Base64^…``), byte for byte;
                              else the OBX ``TX``/``FT`` lines (repetitions = lines, ``\\.br\\``),
                              rendered to PDF/A-2B with ``params.notice`` (:mod:`engine.cda.pdf`)
replacement                   ``previous`` given (header of the replaced version): same setId,
                              versionNumber + 1, RPLC its id. OBX-11 or OBR-25 = ``C`` without a
                              previous version is an error.
encounter code                PV1-2: I -> IMP, E -> EMER, else AMB (ActCode)
============================  ===================================================================

Errors raise :class:`CdaWrapError` (a :class:`TransformError`) with a ``code`` and a text that
names fields, never their values (PHI rule, docs/architecture.md).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.cda.build import (
    CCAM_OID, DCM_OID, FINESS_OID, LOINC_OID, PRACTICE_OID, R02_OID, RPPS_OID, SNOMED_OID,
    ACTCODE_OID, G15_OID, PARIS, Address, Code, EncounterInputs, HealthProfessional, II,
    ImagingReportInputs, Organization, PatientInputs, ServiceEventInputs, build_imaging_report_n1,
    cda_ts, new_document_id,
)
from engine.cda.header import INS_OIDS, read_header
from engine.hl7.errors import HL7Error
from engine.hl7.escape import escape
from engine.hl7.message import Message, Segment
from engine.identity.ins import patient_mail_address
from engine.transforms import TransformContext, TransformError, register

__all__ = ["CdaWrapParams", "CdaWrapError", "WrapResult", "wrap_pacs_report", "cda_wrap_transform",
           "build_cisis_oru", "DEFAULT_NOTICE"]

DEFAULT_NOTICE = (
    "Information du patient : les données de ce compte rendu font l'objet d'un traitement "
    "informatique par l'établissement, responsable de traitement, pour la prise en charge de vos "
    "soins (RGPD, art. 6-1-c et 9-2-h ; loi Informatique et Libertés). Sauf opposition de votre "
    "part, ce document peut être partagé avec les professionnels qui vous suivent et versé dans "
    "votre Dossier Médical Partagé (Mon espace santé). Vous disposez d'un droit d'accès, de "
    "rectification, de limitation et d'opposition : adressez-vous au délégué à la protection des "
    "données de l'établissement. Vous pouvez introduire une réclamation auprès de la CNIL "
    "(www.cnil.fr).")

#: DICOM modalities (PS3.3 C.7.3.1.1.1, subset of JDV_ModaliteAcquisition_CISIS) with the French
#: display names of the CI-SIS value set
MODALITIES = {
    "CT": "Tomodensitométrie", "MR": "Imagerie par résonance magnétique", "US": "Echographie",
    "CR": "Radiographie numérisée", "DX": "Radiographie numérique", "MG": "Mammographie",
    "XA": "Angiographie", "RF": "Radiofluoroscopie", "NM": "Médecine nucléaire",
    "PT": "Tomographie par émission de positons", "OT": "Autre", "IO": "Radiographie intra-orale",
    "PX": "Radiographie panoramique", "BMD": "Ostéodensitométrie", "DOC": "Document",
}
ENCOUNTER = {"I": ("IMP", "Hospitalisation"), "E": ("EMER", "Urgences")}
INS_NAMESPACE = {"1.2.250.1.213.1.4.9": "ASIP-SANTE-INS-NIA"}  # others: ASIP-SANTE-INS-NIR
META_FLAGS = (  # profils-messages.md: required flag OBX, in this order
    ("MASQUE_PS", "Masqué aux professionnels de Santé"),
    ("INVISIBLE_PATIENT", "Document Non Visible par le patient"),
    ("INVISIBLE_REP_LEGAUX", "Non visible par les représentants Légaux du patient"),
    ("CONNEXION_SECRETE", "Connexion Secrete"),
    ("MODIF_CONF_CODE", "Modification Confidentiality Code"),
    ("DESTDMP", "Destinataire DMP"),
    ("DESTMSSANTEPS", "Destinataire (Professionnel de Santé, organisation ou BAL applicative)"),
    ("DESTMSSANTEPAT", "Destinataire Patient"),
)


# ------------------------------------------------------------------------------------ params
class _P(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CodeParam(_P):
    code: str
    display_name: Optional[str] = None
    code_system: str

    def to_code(self) -> Code:
        return Code(code=self.code, code_system=self.code_system, display_name=self.display_name)


class OrgParam(_P):
    id: str                                  # FINESS / SIRET… (extension)
    id_root: str = FINESS_OID
    name: str
    telecom: Optional[str] = None
    addr: Optional[Address] = None
    practice_setting: Optional[CodeParam] = Field(default_factory=lambda: CodeParam(
        code="AMBULATOIRE", display_name="Ambulatoire", code_system=PRACTICE_OID))

    def to_org(self) -> Organization:
        return Organization(id=II(root=self.id_root, extension=self.id), name=self.name,
                            telecom=self.telecom, addr=self.addr,
                            industry_class=self.practice_setting.to_code()
                            if self.practice_setting else None)


class PersonParam(_P):
    rpps: str
    family: Optional[str] = None
    given: Optional[str] = None
    prefix: Optional[str] = None


class MssRecipientParam(_P):
    """A professional (or organisation / application mailbox) who receives the report by MSSanté:
    one PRT RCT of the wrapped ORU (CI-SIS « Transmission de documents CDA en HL7 v2 »,
    profils-messages, segment PRT: PRT-4 ``RCT``, PRT-5 the person, PRT-15.4 the address)."""
    address: str                             # MSSanté mailbox (PRT-15.4)
    rpps: Optional[str] = None               # RPPS (11 digits) or national PS id (PRT-5.1)
    family: Optional[str] = None
    given: Optional[str] = None


class CdaWrapParams(_P):
    #: root OID for new document ids and setIds (None: UUID-derived ``2.25.…`` OIDs)
    document_root_oid: Optional[str] = None
    ipp_root_oid: Optional[str] = None       # when PID-3 CX-4 carries no ISO OID
    order_root_oid: Optional[str] = None     # when ORC-2/OBR-2 EI-3 is empty
    accession_root_oid: Optional[str] = None  # issuer of the accession numbers (required if any)
    organization: OrgParam                   # author / performer organisation
    custodian: Optional[OrgParam] = None     # default: organization
    author_role: CodeParam = Field(default_factory=lambda: CodeParam(
        code="G15_10/SM44", display_name="Médecin - Radio-diagnostic (SM)", code_system=G15_OID))
    default_author: Optional[PersonParam] = None
    facility_type: CodeParam = Field(default_factory=lambda: CodeParam(
        code="SA07", display_name="Cabinet individuel", code_system=R02_OID))
    location_name: Optional[str] = None
    confidentiality_code: Literal["N", "R", "V"] = "N"
    title: str = "CR d’imagerie médicale"
    notice: str = DEFAULT_NOTICE
    default_modality: Optional[str] = None
    on_missing_identity: Literal["error", "skip"] = "error"
    #: identity statuses whose INS may be used (RNIV: only a qualified identity, QUAL)
    accepted_identity_statuses: list[str] = Field(default_factory=lambda: ["QUAL"])
    # --- registered transform output (ORU^R01, CI-SIS transmission guide v2.1)
    receiving_application: str = "PFI"
    receiving_facility: str = ""
    flags: dict[str, bool] = Field(default_factory=lambda: {
        "MASQUE_PS": False, "INVISIBLE_PATIENT": False, "INVISIBLE_REP_LEGAUX": False,
        "CONNEXION_SECRETE": False, "MODIF_CONF_CODE": False, "DESTDMP": True,
        "DESTMSSANTEPS": False, "DESTMSSANTEPAT": False})
    #: recipients of the mail to professionals (DESTMSSANTEPS=Y); the patient's recipient
    #: (DESTMSSANTEPAT=Y) is ``<INS>@patient.mssante.fr`` of the registry identity
    mss_recipients: list[MssRecipientParam] = Field(default_factory=list)
    #: answer address of the mail (PRT REPLY, PRT-15.4), optional
    mss_reply_to: Optional[str] = None

    @model_validator(mode="after")
    def _recipients_for_flags(self):
        # « PRT RCT requis si le document est échangé via MSSanté » (profils-messages): a flag
        # DESTMSSANTEPS=Y with nobody to send to would be refused on every report
        if self.flags.get("DESTMSSANTEPS") and not self.mss_recipients:
            raise ValueError("flags.DESTMSSANTEPS is true: mss_recipients must name at least one "
                             "MSSanté address")
        if self.mss_recipients and not self.flags.get("DESTMSSANTEPS"):
            raise ValueError("mss_recipients given but flags.DESTMSSANTEPS is false")
        return self


class CdaWrapError(TransformError):
    """``code``: missing_identity, identity_not_qualified, ins_mismatch, no_report, bad_pdf,
    missing_field, no_previous, bad_character (a NUL in a field). The text never carries field values."""

    def __init__(self, code: str, text: str, field: str | None = None):
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text
        self.field = field  # the field at fault (``OBR-18``), when one is


@dataclass
class WrapResult:
    cda: bytes
    header: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    source: str = "pdf"            # "pdf" (OBX ED) or "text" (OBX TX/FT rendered to PDF/A)
    action: str = "initial"        # "initial" or "replace"
    pdf: bytes = b""               # the PDF embedded in the CDA (byte-identical to the OBX one)
    keys: dict[str, Any] = field(default_factory=dict)   # order/accession/study ids (no PHI)
    #: the registry identity's status (IHE PAM France PID-32) that allowed its INS to be used
    identity_status: str | None = None


# ----------------------------------------------------------------------------- ORU reading
def _read(raw: bytes | str, codec: str) -> Message:
    text = raw.decode(codec or "utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else raw
    try:
        m = Message(text, codec or "utf-8")
    except HL7Error:
        raise CdaWrapError("missing_field", "message does not start with MSH") from None
    where = m.nul_field()  # never written into the CDA nor looked up in the store
    if where is not None:
        raise CdaWrapError("bad_character", f"{where} contains a NUL character", where)
    return m


def _f(seg: Optional[Segment], n: int) -> str:
    return seg.field(n) if seg is not None else ""


def _c(m: Message, value: str, n: int, sub: Optional[int] = None) -> str:
    """Component n (1-based) of the first repetition (or its sub-component), unescaped, stripped."""
    return m.text(value.split(m.delims.repetition, 1)[0], n, sub).strip()


def _ts(v: str) -> Optional[str]:
    """HL7 v2 DTM -> CDA TS (kept as given, Europe/Paris offset added when missing)."""
    v = (v or "").strip()
    if not v:
        return None
    digits = v.split("+")[0].split("-")[0]
    if len(digits) < 8 or not digits[:8].isdigit():
        return None
    if len(digits) >= 12 and "+" not in v and "-" not in v:
        fmt = {12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}.get(len(digits[:14]))
        if fmt:
            try:
                return cda_ts(datetime.strptime(digits[:14], fmt).replace(tzinfo=PARIS))
            except ValueError:
                return None
    return v


def _national_ps_id(value: str) -> str:
    # national PS id = "8" + RPPS number (11 digits), as in the CI-SIS examples (801234560801)
    return "8" + value if len(value) == 11 and value.isdigit() else value


def _ei_root(m: Message, ei: str) -> Optional[str]:
    return _c(m, ei, 3) if _c(m, ei, 4).upper() == "ISO" and _c(m, ei, 3) else None


def _find_report(m: Message) -> tuple[Optional[bytes], Optional[str], Optional[Segment], list[str]]:
    """(pdf bytes, text, report OBX, warnings)."""
    warnings: list[str] = []
    pdf, pdf_obx = None, None
    lines: list[str] = []
    text_obx = None
    for i, obx in enumerate(m.all("OBX"), 1):
        vt = _f(obx, 2).upper()
        if vt == "ED":
            v = _f(obx, 5)
            typ, sub, enc = _c(m, v, 2).upper(), _c(m, v, 3).upper(), _c(m, v, 4).upper()
            if sub != "PDF" and not (typ == "APPLICATION" and sub == "PDF"):
                warnings.append(f"OBX[{i}]: ED of subtype {sub or '(empty)'} ignored")
                continue
            if pdf is not None:
                warnings.append(f"OBX[{i}]: second PDF ignored (the first one is wrapped)")
                continue
            if enc != "BASE64":
                raise CdaWrapError("bad_pdf", f"OBX[{i}]-5.4: encoding must be Base64")
            data = "".join(_c(m, v, 5).split())
            try:
                pdf = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise CdaWrapError("bad_pdf", f"OBX[{i}]-5.5: invalid Base64") from None
            if not pdf.startswith(b"%PDF-"):
                raise CdaWrapError("bad_pdf", f"OBX[{i}]-5.5: decoded data is not a PDF file")
            pdf_obx = obx
        elif vt in ("TX", "FT"):
            code = _c(m, _f(obx, 3), 1)
            if code in ("113014", "StudyInstanceUID", "39111-0"):
                continue
            text_obx = text_obx or obx
            for rep in obx.field(5).split(m.delims.repetition):
                lines.append(m.delims.unescape(rep, m.charset).rstrip())
    if pdf is not None:
        if lines:
            warnings.append("text OBX ignored: the PDF OBX is the report")
        return pdf, None, pdf_obx, warnings
    if lines:
        return None, "\n".join(lines), text_obx, warnings
    raise CdaWrapError("no_report", "no OBX ED (PDF, Base64) nor TX/FT report text")


def _person(m: Message, value: str, *, xcn: bool) -> Optional[dict]:
    """OBR-32 NDL (CNN in component 1, sub-components) or OBX-16 XCN (components)."""
    if not value:
        return None
    if xcn:
        pid, fam, giv, pre = _c(m, value, 1), _c(m, value, 2), _c(m, value, 3), _c(m, value, 6)
    else:
        pid, fam, giv, pre = (_c(m, value, 1, 1), _c(m, value, 1, 2), _c(m, value, 1, 3),
                              _c(m, value, 1, 6))
    if not pid:
        return None
    return {"rpps": _national_ps_id(pid), "family": fam or None, "given": giv or None,
            "prefix": pre or None}


def _previous_dict(prev: Any) -> tuple[II, II, int]:
    def to_ii(x) -> II:
        if isinstance(x, II):
            return x
        if isinstance(x, dict):
            return II(root=x["root"], extension=x.get("extension"))
        root, _, ext = str(x).partition("^")
        return II(root=root, extension=ext or None)
    try:
        return to_ii(prev["id"]), to_ii(prev["set_id"]), int(prev["version_number"] or 1)
    except (KeyError, TypeError, ValueError):
        raise CdaWrapError("no_previous", "previous document needs id, set_id, version_number") \
            from None


# --------------------------------------------------------------------------------- wrapping
def wrap_pacs_report(raw: bytes, codec: str, params: Union[CdaWrapParams, dict],
                     lookup: Callable[[str, str], Optional[dict]], *,
                     previous: Union[dict, Callable[[dict], Optional[dict]], None] = None
                     ) -> WrapResult:
    """Build the CDA R2 N1 imaging report for a PACS ORU^R01 (see the module docstring table).

    ``lookup(ipp, authority)`` returns the identity registry view (``IdentityView.to_json()``)
    or None. ``previous``: the header (``read_header`` form) of the version being replaced, or a
    callable receiving ``WrapResult.keys`` and returning it (None: initial version).
    """
    p = params if isinstance(params, CdaWrapParams) else CdaWrapParams.model_validate(params)
    m = _read(raw, codec)
    warnings: list[str] = []
    msh, pid, pv1 = m.segment("MSH"), m.segment("PID"), m.segment("PV1")
    orc, obr = m.segment("ORC"), m.segment("OBR")
    if pid is None:
        raise CdaWrapError("missing_field", "no PID segment")
    if obr is None:
        raise CdaWrapError("missing_field", "no OBR segment")

    # --- patient: IPP from PID-3, traits from the identity registry (never from the PACS)
    ipp = ipp_auth = ipp_root = None
    pid_ins = None
    candidates = []
    for rep in pid.field(3).split(m.delims.repetition):
        if not rep:
            continue
        idtype = _c(m, rep, 5).upper()
        oid = _c(m, rep, 4, 2)
        if idtype == "INS" or (oid in INS_OIDS and idtype != "PI"):
            pid_ins = pid_ins or (_c(m, rep, 1), oid)
        elif _c(m, rep, 1):
            candidates.append((idtype != "PI", rep))  # CX-5 PI first, then the others in order
    if candidates:
        rep = min(candidates, key=lambda t: t[0])[1]
        oid = _c(m, rep, 4, 2)
        ipp = _c(m, rep, 1)
        ipp_auth = _c(m, rep, 4, 1) or oid
        ipp_root = oid if _c(m, rep, 4, 3).upper() == "ISO" and oid else None
    if not ipp:
        raise CdaWrapError("missing_field", "PID-3: no IPP (CX-5 PI) to look the patient up")
    ipp_root = ipp_root or p.ipp_root_oid
    if not ipp_root:
        raise CdaWrapError("missing_field", "PID-3 CX-4.2: no ISO OID for the IPP and no "
                                            "ipp_root_oid parameter")
    ident = lookup(ipp, ipp_auth or "")
    if not ident:
        raise CdaWrapError("missing_identity", "patient unknown to the identity registry "
                                               "(PID-3 IPP)")
    ins = ident.get("ins") or {}
    if not ins.get("value") or not ins.get("oid"):
        raise CdaWrapError("identity_not_qualified", "the registry identity has no INS")
    if p.accepted_identity_statuses and ident.get("status") not in p.accepted_identity_statuses:
        raise CdaWrapError("identity_not_qualified",
                           "the registry identity status does not allow the INS to be used "
                           f"(accepted: {', '.join(p.accepted_identity_statuses)})")
    if pid_ins and (pid_ins[0] != ins["value"] or (pid_ins[1] and pid_ins[1] != ins["oid"])):
        raise CdaWrapError("ins_mismatch", "PID-3 INS differs from the identity registry INS")
    given = [g for g in (ident.get("given_names") or []) if g]
    if isinstance(ident.get("given_names"), str):
        given = ident["given_names"].split()
    first_given = ident.get("first_given_name") or (given[0] if given else None)
    missing = [k for k, v in (("birth_name", ident.get("birth_name")),
                              ("first_given_name", first_given),
                              ("birth_date", ident.get("birth_date")),
                              ("sex", ident.get("sex"))) if not v]
    if missing:
        raise CdaWrapError("identity_not_qualified",
                           f"registry identity lacks INS traits: {', '.join(missing)}")
    sex = ident["sex"] if ident["sex"] in ("M", "F") else "U"
    patient = PatientInputs(
        ins_value=ins["value"], ins_oid=ins["oid"], ipp=ipp, ipp_root=ipp_root,
        birth_name=ident["birth_name"], given_names=given or [first_given],
        first_given_name=first_given, used_name=ident.get("used_name"),
        used_given_name=ident.get("used_given_name"),
        birth_date=str(ident["birth_date"]).replace("-", "")[:8], sex=sex,
        birth_place_cog=ident.get("birth_place_cog"))

    # --- order id (ORC-2, else OBR-2) and accession number (OBR-18, else OBR-3)
    order_ei = _f(orc, 2) if _c(m, _f(orc, 2), 1) else _f(obr, 2)
    order_id = None
    if _c(m, order_ei, 1):
        root = _ei_root(m, order_ei) or p.order_root_oid
        if not root:
            raise CdaWrapError("missing_field", "ORC-2/OBR-2 has no ISO root and no "
                                                "order_root_oid parameter")
        order_id = II(root=root, extension=_c(m, order_ei, 1))
    else:
        warnings.append("no placer order number (ORC-2/OBR-2)")
    acc_value, acc_root = _c(m, _f(obr, 18), 1), None
    if not acc_value and _c(m, _f(obr, 3), 1):
        acc_value, acc_root = _c(m, _f(obr, 3), 1), _ei_root(m, _f(obr, 3))
    accession = None
    if acc_value:
        acc_root = acc_root or p.accession_root_oid
        if not acc_root:
            raise CdaWrapError("missing_field", "accession number without issuer: set "
                                                "accession_root_oid")
        accession = II(root=acc_root, extension=acc_value)
    else:
        warnings.append("no accession number (OBR-18/OBR-3)")

    # --- StudyInstanceUID: ZDS-1.1, else OBX 113014/StudyInstanceUID, else IPC-3
    study = _c(m, _f(m.segment("ZDS"), 1), 1)
    region_codes: list[Code] = []
    for obx in m.all("OBX"):
        code = _c(m, _f(obx, 3), 1)
        if code in ("113014", "StudyInstanceUID") and not study:
            study = _c(m, _f(obx, 5), 1)
        elif code == "39111-0":
            v = _f(obx, 5)
            if _c(m, v, 1):
                sys_ = _c(m, v, 3).upper()
                region_codes.append(Code(
                    code=_c(m, v, 1), display_name=_c(m, v, 2) or None,
                    code_system=SNOMED_OID if sys_ in ("SCT", "SNM", "SNOMED", "SNOMED CT", "")
                    else _c(m, v, 3), code_system_name="SNOMED CT" if sys_ in (
                        "SCT", "SNM", "SNOMED", "SNOMED CT", "") else None))
    ipc = m.segment("IPC")
    study = study or _c(m, _f(ipc, 3), 1)
    if not study:
        raise CdaWrapError("missing_field", "no StudyInstanceUID (ZDS-1, OBX 113014, IPC-3)")

    # --- modality: IPC-5, else OBR-24, else params.default_modality
    modality = _c(m, _f(ipc, 5), 1).upper()
    if not modality and _c(m, _f(obr, 24), 1).upper() in MODALITIES:
        modality = _c(m, _f(obr, 24), 1).upper()
    modality = modality or (p.default_modality or "").upper()
    if not modality:
        raise CdaWrapError("missing_field", "no modality (IPC-5, OBR-24) and no default_modality")
    if modality not in MODALITIES:
        warnings.append(f"modality {modality} outside the known DICOM list")

    # --- exam code (OBR-4): LOINC -> serviceEvent/code; CCAM -> translation
    u4 = _f(obr, 4)
    exam = ccam = None
    exam_text = _c(m, u4, 2) or _c(m, u4, 5)
    for off in (0, 3):  # CE triplets: 1-3 and alternate 4-6
        c, d, s = _c(m, u4, 1 + off), _c(m, u4, 2 + off), _c(m, u4, 3 + off).upper()
        if c and s in ("LN", "LOINC") and exam is None:
            exam = Code(code=c, display_name=d or None, code_system=LOINC_OID,
                        code_system_name="LOINC")
        elif c and s in ("CCAM", CCAM_OID, "1.2.250.1.215.300.1") and ccam is None:
            ccam = Code(code=c, display_name=d or None, code_system=CCAM_OID,
                        code_system_name="CCAM")

    # --- times
    msh7 = _ts(_f(msh, 7))
    low = _ts(_f(obr, 7)) or msh7
    high = _ts(_f(obr, 8)) or low
    eff = _ts(_f(obr, 22)) or msh7
    if not (low and eff):
        raise CdaWrapError("missing_field", "no usable date/time (OBR-7, OBR-22, MSH-7)")

    # --- report body
    pdf, text, rep_obx, w = _find_report(m)
    warnings += w
    source = "pdf"
    if pdf is None:
        source = "text"
        from engine.cda.pdf import render_text_report_pdf

        title_pdf = p.title + (f" - {exam_text}" if exam_text else "")
        pdf = render_text_report_pdf(text or "", title=title_pdf, notice=p.notice)

    # --- author (OBR-32) and legal authenticator (OBX-16, else author)
    org = p.organization.to_org()
    author_d = _person(m, _f(obr, 32), xcn=False)
    if author_d is None and p.default_author is not None:
        author_d = p.default_author.model_dump()
        author_d["rpps"] = _national_ps_id(author_d["rpps"])
    if author_d is None:
        raise CdaWrapError("missing_field", "no author: OBR-32 empty and no default_author")
    role = p.author_role.to_code()
    author = HealthProfessional(organization=org, role=role, **author_d)
    la_d = _person(m, _f(rep_obx, 16), xcn=True) or author_d
    legal = HealthProfessional(organization=org, role=role, **la_d)
    la_time = _ts(_f(rep_obx, 14)) or eff

    # --- ids, replacement
    keys = {"order_id": order_id.key() if order_id else None,
            "accession_number": accession.key() if accession else None,
            "study_instance_uid": study}
    prev = previous(keys) if callable(previous) else previous
    status = (_f(rep_obx, 11) or _f(obr, 25)).strip().upper()
    doc_id = new_document_id(p.document_root_oid)
    if prev:
        parent, set_id, version = _previous_dict(prev)
        version += 1
        action = "replace"
    else:
        if status == "C":
            raise CdaWrapError("no_previous", "corrected report (OBX-11/OBR-25 = C) but the "
                                              "replaced document is unknown")
        parent, set_id, version, action = None, new_document_id(p.document_root_oid), 1, "initial"
    enc_code = ENCOUNTER.get(_c(m, _f(pv1, 2), 1).upper(), ("AMB", "Ambulatoire"))
    title = p.title + (f" - {exam_text}" if exam_text else "")

    inputs = ImagingReportInputs(
        document_id=doc_id, set_id=set_id, version_number=version, effective_time=eff,
        confidentiality_code=p.confidentiality_code, title=title,
        doc_code_translations=[exam] if exam else [],
        patient=patient, author=author, author_time=eff, legal_authenticator=legal,
        legal_authenticator_time=la_time,
        custodian=(p.custodian or p.organization).to_org(),
        order_id=order_id, accession_number=accession,
        service_event=ServiceEventInputs(
            study_instance_uid=study, exam_code=exam, ccam=ccam,
            modality=Code(code=modality, display_name=MODALITIES.get(modality),
                          code_system=DCM_OID, code_system_name="DCM"),
            regions=region_codes, low=low, high=high),
        encounter=EncounterInputs(
            code=Code(code=enc_code[0], display_name=enc_code[1], code_system=ACTCODE_OID),
            low=low, high=high, facility_id=org.id, facility_type=p.facility_type.to_code(),
            location_name=p.location_name or org.name, location_addr=org.addr),
        replaces=parent, pdf=pdf)
    cda = build_imaging_report_n1(inputs)
    return WrapResult(cda=cda, header=read_header(cda), warnings=warnings, source=source,
                      action=action, pdf=pdf, keys=keys, identity_status=ident.get("status"))


# ------------------------------------------------------------------ ORU^R01 output (CI-SIS)
def build_cisis_oru(raw: bytes, codec: str, result: WrapResult, params: CdaWrapParams,
                    *, now: Optional[datetime] = None) -> bytes:
    """ORU^R01 v2.5 of the CI-SIS guide "Transmission de documents CDA-R2 en HL7 v2" v2.1
    (profils-messages.md) carrying ``result.cda`` in Base64 (OBX ED ``^TEXT^XML^Base64^…``)."""
    m = _read(raw, codec)
    msh = m.segment("MSH")
    h = result.header
    e = lambda s: escape(s or "", "|", "^~\\&")  # noqa: E731
    ts = (now or datetime.now(timezone.utc)).astimezone(PARIS).strftime("%Y%m%d%H%M%S")
    ctrl = hashlib.sha256((_f(msh, 10) + (h["id_str"] or "")).encode()).hexdigest()[:20].upper()
    rt = h["record_target"]
    ins, tr = rt["ins"], rt["traits"]
    ins_ns = INS_NAMESPACE.get(ins["oid"], "ASIP-SANTE-INS-NIR")
    pid3 = [f"{e(ins['value'])}^^^{ins_ns}&{ins['oid']}&ISO^INS"]
    for i in rt["ids"]:
        if i["root"] != ins["oid"] and i.get("extension"):
            pid3.append(f"{e(i['extension'])}^^^&{i['root']}&ISO^PI")
    given = (tr.get("given_names") or "").split()
    pid5 = f"{e(tr['birth_name'])}^{e(tr['first_given_name'])}^{e(' '.join(given[1:]))}^^^^L"
    replace = result.action == "replace"
    status = "C" if replace else "F"
    order = h["order_id"] or {}
    acc = h["accession_number"] or {}
    a = h["author"] or {}
    org = params.organization
    segs = [
        "|".join(["MSH", "^~\\&", e(_c(m, _f(msh, 3), 1)) or "PACS", e(_c(m, _f(msh, 4), 1)),
                  e(params.receiving_application), e(params.receiving_facility), ts, "",
                  "ORU^R01^ORU_R01", ctrl, "P", "2.5", "", "", "", "", "FRA", "UNICODE UTF-8",
                  "", "", "2.1^CISIS_CDA_HL7_V2"]),
        # PID-32: the registry status that allowed the INS (DMP and MSSanté use it only qualified)
        "|".join(["PID", "", "", "~".join(pid3), "", pid5, "", e(tr.get("birth_date")),
                  e(tr.get("sex"))] + ([""] * 23 + [e(result.identity_status)] if result.identity_status else [])),
        "PV1|1|" + ("O"),
        "|".join(["ORC", "RO" if replace else "NW",
                  f"{e(order.get('extension'))}^^{e(order.get('root'))}^ISO" if order else "",
                  f"{e(acc.get('extension'))}^^{e(acc.get('root'))}^ISO" if acc else ""]),
        "|".join(["OBR", "1",
                  f"{e(order.get('extension'))}^^{e(order.get('root'))}^ISO" if order else "",
                  f"{e(acc.get('extension'))}^^{e(acc.get('root'))}^ISO" if acc else "",
                  "18748-4^CR d'imagerie médicale^LN", "", "", h["effective_time"][:14]]
                 + [""] * 17 + [status]),
        "|".join(["OBX", "1", "ED", "18748-4^CR d'imagerie médicale^LN", "",
                  "^TEXT^XML^Base64^" + base64.b64encode(result.cda).decode("ascii"),
                  "", "", "", "", "", status]),
        "|".join(["PRT", "", "UC", "", "SB^Send by^participation",
                  f"{e(a.get('rpps'))}^{e(a.get('family'))}^{e(a.get('given'))}^^^^^^"
                  f"ASIP-SANTE-PS&{RPPS_OID}&ISO^D^^^RPPS", "", "",
                  f"{e(org.name)}^^^^^ASIP-SANTE-ST&{org.id_root}&ISO^FINEG^^^{e(org.id)}"]),
    ]
    segs += _recipient_prts(params, ins, tr, e)
    for n, (flag, label) in enumerate(META_FLAGS, 2):
        yn = "Y" if params.flags.get(flag, False) else "N"
        segs.append(f"OBX|{n}|CE|{flag}^{label}^MetaDMPMSS||{yn}^^expandedYes-NoIndicator"
                    "||||||F")
    return ("\r".join(segs) + "\r").encode("utf-8")


def _recipient_prts(params: CdaWrapParams, ins: dict, traits: dict, e) -> list[str]:
    """PRT RCT of the MSSanté recipients the flags ask for and the PRT REPLY (profils-messages,
    PRT; field layout of the guide's ORU examples: PRT-5 XCN with 5.13 ``IDNPS`` or ``INS``,
    PRT-15 ``^^X.400^<address>``)."""
    def prt(role: str, person: str, address: str) -> str:
        return "|".join(["PRT", "", "UC", "", f"{role}^^participation", person] + [""] * 9
                        + [f"^^X.400^{e(address)}"])

    out = []
    if params.flags.get("DESTMSSANTEPS"):
        for r in params.mss_recipients:
            person = (f"{e(_national_ps_id(r.rpps))}^{e(r.family)}^{e(r.given)}^^^^^^"
                      f"ASIP-SANTE-PS&{RPPS_OID}&ISO^D^^^IDNPS") if r.rpps else ""
            out.append(prt("RCT", person, r.address))
    if params.flags.get("DESTMSSANTEPAT"):
        ns = INS_NAMESPACE.get(ins["oid"], "ASIP-SANTE-INS-NIR")
        person = (f"{e(ins['value'])}^{e(traits.get('birth_name'))}^{e(traits.get('first_given_name'))}"
                  f"^^^^^^{ns}&{ins['oid']}&ISO^L^^^INS")
        out.append(prt("RCT", person, patient_mail_address(ins["value"])))
    if params.mss_reply_to:
        out.append(prt("REPLY", "", params.mss_reply_to))
    return out


@register("cda_wrap", CdaWrapParams, operates_on="bytes")
def cda_wrap_transform(data: bytes, params: CdaWrapParams, ctx: TransformContext,
                       notes: list[str]) -> Optional[bytes]:
    """Thin layer over :func:`wrap_pacs_report`: the CI-SIS ORU^R01 carrying the CDA."""
    lookup = ctx.extras.get("identity_lookup")
    if lookup is None:
        raise TransformError("cda_wrap: ctx.extras['identity_lookup'] is not wired")
    try:
        res = wrap_pacs_report(data, ctx.codec, params, lookup,
                               previous=ctx.extras.get("previous_document_lookup"))
    except CdaWrapError as exc:
        if exc.code in ("missing_identity", "identity_not_qualified") \
                and params.on_missing_identity == "skip":
            notes.append(f"cda_wrap: skipped ({exc.code})")
            return None
        raise
    notes.append(f"cda_wrap: {res.action} CDA N1 from {res.source}, {len(res.cda)} bytes")
    notes += [f"cda_wrap: {w}" for w in res.warnings]
    return build_cisis_oru(data, ctx.codec, res, params)
