"""Parse CI-SIS "Transmission de documents CDA-R2 en HL7 v2" v2.1 messages into a ``Submission``.

Guide: ANS, CI-SIS « Transmission de documents CDA en HL7 v2 » v2.1, below "the guide" (its parts):

* ``profils-messages.md`` - ORU^R01^ORU_R01 in HL7 v2.5, MDM^T02/T10/T04^MDM_T02 in HL7 v2.6,
  MSH-21 ``2.1^CISIS_CDA_HL7_V2``; PID-3 identical to CDA recordTarget/patientRole/id; ORC-1 /
  OBX-11 / event consistency; document in OBX (ED) with PRT SB/RCT/REPLY; MetaDMPMSS flag OBX;
* ``meta-dmp-mss.md`` - the MetaDMPMSS table (flag names);
* ``regles-gestion-mssante.md`` - the MSSanté combination matrix;
* ``error-codes.md`` - application error codes 900-906 (ERR-5 of the ACK, with ERR-3 = 207).

Second profile, same entry point: ANS, CI-SIS « Transmission au LPS d'un document CDA provenant
d'un courriel MSSanté », below "the LPS guide":

* ``profils-messages.md`` - MDM^T02/T10/T04^MDM_T02 in HL7 v2.6 only, MSH-21
  ``1.1^CISIS_CDA_HL7_LPS``; OBX 1 = the (single) CDA document followed by PRT SB (required, the
  mail sender) / RCT (required if known, the mail's initial recipient) / REPLY (optional); OBX 2 =
  the MSSanté mail (OBX-3.1 Message-ID, OBX-3.2 subject, OBX-5 content in Base64); OBX 3-6 = the
  MetaDMPMSS flags MASQUE_PS, INVISIBLE_PATIENT, INVISIBLE_REP_LEGAUX, MODIF_CONF_CODE (required,
  in that order). No DESTDMP/DESTMSSANTE* flags: the MSSanté combination matrix does not apply;
* ``evenements-declenchants.md`` - T02/OBX-11 F, T04/OBX-11 D, T10/OBX-11 C;
* ``error-codes.md`` - the same 900-906 codes.

Every finding is reported under a rule of the catalogue (:mod:`engine.reports.rules`): whether
it is an error (AE), a warning or nothing is the channel's choice, per rule; by default a copy in
the HL7 message of CDA metadata (TXA-12, TXA-2, OBR-4.1, OBX-3.1) that differs from the CDA is
a warning, and the submission carries the CDA's value.

Pure function, no I/O. Tolerant reading: CR, LF or CRLF segment separators (the message is read
with :class:`engine.hl7.message.Message`, escapes with :func:`engine.hl7.escape.unescape`);
spaces in assigning-authority names (``ASIP-SANTE- PS``); ``ACK_LECTURE`` for ``ACK_LECTURE_MSS``;
Base64 without its final padding; trailing blanks after a field. Strict output: the ``Submission``
uses the guide's names only.

The document bytes are never modified: ``sha256`` is computed on the exact bytes decoded from
OBX-5 and those bytes are what the submission carries.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Mapping

from lxml import etree

from engine.cda.header import INS_OIDS, RPPS_OID, DoctypeNotAllowed, parse_cda, read_header
from engine.hl7.errors import HL7Error
from engine.hl7.message import Delimiters, Message, Segment
from engine.identity.ins import PATIENT_MAIL_DOMAIN, patient_mail_address
from engine.reports.rules import rule, severity
from engine.reports.submission import (
    FLAG_NAMES,
    INS,
    MAIL_BODY_NAMES,
    REQUIRED_FLAGS,
    Acks,
    Document,
    Issue,
    MssMail,
    Participant,
    PatientTraits,
    Person,
    Sender,
    Submission,
)

PROFILE_ID = "CISIS_CDA_HL7_V2"
PROFILE_VERSION = "2.1"
# lps-cda-mssante/profils-messages.md, « Le segment MSH »: MSH-21.1 = 1.1, MSH-21.2 =
# CISIS_CDA_HL7_LPS; MSH-9 MDM^T02|T10|T04^MDM_T02, MSH-12 = 2.6 (no ORU in this profile)
LPS_PROFILE_ID = "CISIS_CDA_HL7_LPS"
LPS_PROFILE_VERSION = "1.1"
LPS_SUPPORTED = {("MDM", "T02"): "2.6", ("MDM", "T10"): "2.6", ("MDM", "T04"): "2.6"}
# lps-cda-mssante/profils-messages.md « Groupes OBXNTE portant les métadonnées MSSanté »: « Ces
# métadonnées sont requises et doivent apparaître dans le message MDM dans l'ordre présenté »
LPS_REQUIRED_FLAGS = ("MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REP_LEGAUX", "MODIF_CONF_CODE")

# profils-messages.md, "MSH-9" and "MSH-12": ORU^R01^ORU_R01 in 2.5, MDM^T02|T10|T04^MDM_T02 in 2.6
SUPPORTED = {
    ("ORU", "R01"): "2.5",
    ("MDM", "T02"): "2.6",
    ("MDM", "T10"): "2.6",
    ("MDM", "T04"): "2.6",
}
# profils-messages.md, "Le segment ORC": NW = intégration, RO = remplacement, CA = suppression
ORC_ACTION = {"NW": "initial", "RO": "replace", "CA": "delete"}
# profils-messages.md, OBX-11 of the document OBX (table HL7 0085): F validé, C remplacement,
# D suppression
OBX11_ACTION = {"F": "initial", "C": "replace", "D": "delete"}
# profils-messages.md, "Le segment ORC": for MDM the trigger event must agree (T02/T10/T04)
EVENT_ACTION = {"T02": "initial", "T10": "replace", "T04": "delete"}

# tolerant reading of flag names (the ANS example messages send ACK_LECTURE)
FLAG_ALIASES = {
    "ACK_LECTURE": "ACK_LECTURE_MSS",
    "INVISIBLE_REPRESENTANTS_LEGAUX": "INVISIBLE_REP_LEGAUX",
}


# HL7 table 0357 (ERR-3) to pair with the guide code (error-codes.md: messageErrorCondition)
HL7_SEGMENT_SEQUENCE = "100"
HL7_REQUIRED_FIELD = "101"
HL7_DATA_TYPE = "102"
HL7_TABLE_VALUE = "103"
HL7_UNSUPPORTED_TYPE = "200"
HL7_UNSUPPORTED_EVENT = "201"
HL7_UNSUPPORTED_VERSION = "203"
HL7_APPLICATION = "207"


_RAW_BYTES = re.compile("[\udc80-\udcff]+")


class _Ctx:
    def __init__(self, msg: Message, lossless: bool, overrides: Mapping[str, str]) -> None:
        self.msg = msg
        self.codec = msg.charset
        self.lossless = lossless  # False: the message had bytes invalid in its codec
        self.overrides = overrides
        self.errors: list[Issue] = []
        self.warnings: list[Issue] = []

    def s(self, v: str) -> str:
        """A value for the submission: stripped; bytes invalid in the codec read as U+FFFD."""
        return _text(self, v.strip())

    def unescape(self, v: str) -> str:
        return self.msg.delims.unescape(v, self.codec)

    def report(self, rule_id: str, text: str, location: str | None = None,
               hl7: str = HL7_APPLICATION) -> None:
        """A finding of the catalogue's rule ``rule_id``: an error, a warning or nothing, as the
        channel's severity for that rule says (:mod:`engine.reports.rules`)."""
        level = severity(rule_id, self.overrides)
        if level == "off":
            return
        code = rule(rule_id).code
        if level == "reject":
            self.errors.append(Issue(code=code, text=text, location=location, hl7_code=hl7,
                                     rule=rule_id))
        else:
            self.warnings.append(Issue(code=code, text=text, location=location, rule=rule_id))


# ------------------------------------------------------------------------------- helpers
def _b64decode_tolerant(data: bytes, ctx: _Ctx, where: str, *, truncated_ok: bool = False
                        ) -> bytes | None:
    clean = data.translate(None, b" \t\r\n\x0b\x0c")  # C speed; a regex took ~2 ms per 200 KB
    try:
        return base64.b64decode(clean, validate=True)
    except (binascii.Error, ValueError):
        pass
    if re.fullmatch(rb"[A-Za-z0-9+/]*={0,2}", clean):
        try:
            out = base64.b64decode(clean.rstrip(b"=") + b"=" * (-len(clean.rstrip(b"=")) % 4))
            ctx.report("cisis.encoding.tolerated",
                       "Base64 data without its final padding: padding restored on reading",
                       where)
            return out
        except (binascii.Error, ValueError):
            pass
    if truncated_ok and re.fullmatch(rb"[A-Za-z0-9+/]*={0,2}", clean):
        # quirk of the ANS example ORU (CORPSMAIL_PS): Base64 cut one character short; keep the
        # whole quanta
        body = clean.rstrip(b"=")
        body = body[: len(body) - len(body) % 4]
        ctx.report("cisis.encoding.tolerated",
                   "truncated Base64 text: the incomplete last characters were dropped",
                   where)
        return base64.b64decode(body)
    ctx.report("cisis.document.encoding", "OBX-5 data is not valid Base64", where, HL7_DATA_TYPE)
    return None


def _yes_no(value: str) -> bool | None:
    v = value.strip().upper()
    if v in ("Y", "YES", "O", "OUI"):
        return True
    if v in ("N", "NO", "NON"):
        return False
    return None


def _flag_name(code: str) -> str:
    n = re.sub(r"\s+", "", code).upper()
    return FLAG_ALIASES.get(n, n)


def _ei_to_id(value: str, enc: Delimiters, ctx: _Ctx) -> str | None:
    """TXA-12/13 EI to the internal ``root^extension`` / ``root`` form.

    profils-messages.md, TXA-12 note 1: ``extension^^root^ISO`` when the CDA id has an extension,
    the bare OID otherwise (EI-2 namespace may hold a name, e.g. ``^Organisation-Y``)."""
    c = enc.components(value)
    ent = ctx.s(c[0]) if c else ""
    uni = ctx.s(c[2]) if len(c) > 2 else ""
    if not ent:
        return None
    return f"{uni}^{ent}" if uni else ent


def _xtn_address(value: str, enc: Delimiters, ctx: _Ctx) -> str | None:
    """PRT-15: XTN-4 holds the mail address (profils-messages.md PRT-15.4); tolerant scan."""
    for rep in value.split(enc.repetition):
        a = ctx.s(enc.component_of(rep, 4))
        if a:
            return a
        for c in enc.components(rep):
            t = ctx.s(c)
            if "@" in t:
                return t
    return None


def _ins_from_pid3(pid3: str, enc: Delimiters, ctx: _Ctx) -> tuple[INS | None, str | None]:
    """PID-3 repetitions: CX-5 = ``INS`` gives the INS (value CX-1, OID CX-4.2); CX-5 = ``PI`` the
    IPP. CI-SIS annexe INS (cited by profils-messages.md « Les données concernant le patient »)."""
    ins = None
    ipp = None
    for rep in pid3.split(enc.repetition):
        idtype = ctx.s(enc.component_of(rep, 5)).upper()
        val = ctx.s(enc.component_of(rep, 1))
        if idtype == "INS" and val and ins is None:
            oid = ctx.s(enc.component_of(rep, 4, 2))
            ins = INS(value=val, oid=oid)
        elif idtype == "PI" and val and ipp is None:
            ipp = val
    return ins, ipp


def _norm_id(ii: dict | None) -> str | None:
    if not ii or not ii.get("root"):
        return None
    return f"{ii['root']}^{ii['extension']}" if ii.get("extension") else ii["root"]


def _person_from_header(p: dict | None) -> Person | None:
    if not p:
        return None
    rpps = next((i for i in p.get("ids", []) if i and i.get("root") == RPPS_OID), None)
    first = rpps or (p["ids"][0] if p.get("ids") else None)
    return Person(id=(first or {}).get("extension") or (first or {}).get("root"),
                  id_oid=(first or {}).get("root"), family=p.get("family"), given=p.get("given"),
                  organization_id=_norm_id(p.get("organization_id")),
                  organization_name=p.get("organization_name"))


# ------------------------------------------------------------------------------- main entry
@dataclass
class _DocOBX:
    seg: Segment
    set_id: str
    status: str


def parse_report(raw: bytes, codec: str = "utf-8", *, strict_mss_matrix: bool = False,
                 rules: Mapping[str, str] | None = None) -> Submission:
    """Parse one ORU^R01 / MDM^T02|T10|T04 message of the CI-SIS guide v2.1.

    Never raises on message content: each finding is reported under a rule of the catalogue
    (:mod:`engine.reports.rules`) and becomes an ``error`` (guide codes 900-906), a ``warning``
    or nothing, as ``rules`` (the channel's overrides: rule id -> reject|warn|off) or the
    catalogue's default says. ``ValueError`` only when there is no MSH at all.

    ``strict_mss_matrix``: regles-gestion-mssante.md says combinations missing from the matrix
    "génèrent un message d'erreur". The official corpus itself sends combinations missing from
    the matrix (MDM examples: PS-only exchange with INVISIBLE_PATIENT=N), so by default only the
    combinations that break an explicit "Point d'attention" of profils-messages.md are errors and
    the other unlisted combinations are warnings; ``True`` makes every unlisted combination an
    error (the rule ``cisis.mss.unlisted-combination`` set to reject, unless ``rules`` names it).
    """
    overrides = dict(rules or {})
    if strict_mss_matrix:
        overrides.setdefault("cisis.mss.unlisted-combination", "reject")
    try:
        text, lossless = bytes(raw).decode(codec), True
    except UnicodeDecodeError:
        text, lossless = bytes(raw).decode(codec, "surrogateescape"), False
    try:
        m = Message(text, codec)
    except HL7Error as exc:
        raise ValueError(exc.text) from None
    ctx = _Ctx(m, lossless, overrides)
    nul = m.nul_field()
    if nul is not None:  # no character of any HL7 charset; the connectors could not write it
        ctx.report("cisis.hl7.nul-character", f"{nul} contains a NUL character", nul, HL7_DATA_TYPE)
    enc, segs = m.delims, m.segments
    msh = segs[0]
    mtype = enc.components(msh.field(9))
    code = ctx.s(mtype[0]) if mtype else ""
    event = ctx.s(mtype[1]) if len(mtype) > 1 else ""
    version = ctx.s(enc.component_of(msh.field(12), 1))
    control_id = ctx.s(msh.field(10))
    sub = Submission(message_type="^".join(ctx.s(c) for c in mtype if c) or "",
                     control_id=control_id, version=version,
                     sending_application=ctx.s(enc.component_of(msh.field(3), 1)) or None,
                     sending_facility=ctx.s(enc.component_of(msh.field(4), 1)) or None)

    msh21 = [ctx.s(r) for r in msh.field(21).split(enc.repetition)]
    # the LPS profile (lps-cda-mssante/profils-messages.md, MSH-21) is recognised on MSH-21 only;
    # everything else keeps the rules of the transmission guide v2.1
    lps_prof = next((p.replace(" ", "") for p in msh21
                     if LPS_PROFILE_ID in p.upper().replace(" ", "")), None)
    # a message that also names the v2.1 profile keeps the v2.1 rules (never relaxed by MSH-21)
    lps = lps_prof is not None and not any(PROFILE_ID in p.upper().replace(" ", "") for p in msh21)

    # --- MSH (profils-messages.md, segment MSH: MSH-9, MSH-12, MSH-21)
    expected_version = (LPS_SUPPORTED if lps else SUPPORTED).get((code, event))
    if lps and code != "MDM":
        ctx.report("cisis.msh.message-type",
                   f"unsupported message type {code!r}: the LPS profile uses MDM^T02/T10/T04 "
                   "only", "MSH-9", HL7_UNSUPPORTED_TYPE)
    elif code not in ("ORU", "MDM"):
        ctx.report("cisis.msh.message-type",
                   f"unsupported message type {code!r}: ORU^R01 or MDM^T02/T10/T04 expected",
                   "MSH-9", HL7_UNSUPPORTED_TYPE)
    elif expected_version is None:
        ctx.report("cisis.msh.message-type", f"unsupported trigger event {code}^{event}", "MSH-9",
                   HL7_UNSUPPORTED_EVENT)
    elif version != expected_version:
        ctx.report("cisis.msh.message-type",
                   f"{code} must use HL7 v{expected_version}, MSH-12 is {version!r}",
                   "MSH-12", HL7_UNSUPPORTED_VERSION)
    prof = next((p for p in msh21 if PROFILE_ID in p.upper().replace(" ", "")), None)
    if lps:
        sub.profile = lps_prof
        if lps_prof.split("^")[0] != LPS_PROFILE_VERSION:
            ctx.report("cisis.msh.profile-version",
                       f"MSH-21 profile version is not {LPS_PROFILE_VERSION}", "MSH-21")
    elif prof is None:
        ctx.report("cisis.msh.profile",
                   f"MSH-21 must carry {PROFILE_VERSION}^{PROFILE_ID}", "MSH-21",
                   HL7_REQUIRED_FIELD)
    else:
        sub.profile = prof.replace(" ", "")
        if sub.profile.split("^")[0] != PROFILE_VERSION:
            ctx.report("cisis.msh.profile-version",
                       f"MSH-21 profile version is not {PROFILE_VERSION}", "MSH-21")

    by_name: dict[str, list[Segment]] = {}
    for s in segs:
        by_name.setdefault(s.name, []).append(s)

    # --- PID (profils-messages.md « Les données concernant le patient »)
    pid = (by_name.get("PID") or [None])[0]
    if pid is None:
        ctx.report("cisis.segment.missing", "PID segment missing", "PID", HL7_SEGMENT_SEQUENCE)
    else:
        sub.ins, sub.ipp = _ins_from_pid3(pid.field(3), enc, ctx)
        names = pid.field(5).split(enc.repetition)
        legal = next((n for n in names if ctx.s(enc.component_of(n, 7)).upper() == "L"), names[0])
        sub.patient = PatientTraits(
            birth_name=ctx.s(enc.component_of(legal, 1)) or None,
            first_given_name=ctx.s(enc.component_of(legal, 2)) or None,
            given_names=ctx.s(enc.component_of(legal, 3)) or None,
            birth_date=ctx.s(enc.component_of(pid.field(7), 1)) or None,
            sex=ctx.s(pid.field(8)) or None,
        )
        if sub.ins is None:
            ctx.report("cisis.ins.not-given",
                       "no INS in PID-3 (CX-5 = INS): identity not qualified", "PID-3")
        else:
            if sub.ins.oid not in INS_OIDS:
                ctx.report("cisis.ins.oid", "PID-3 INS assigning authority is not an INS OID",
                           "PID-3.4", HL7_TABLE_VALUE)
            # CI-SIS annexe INS / PAM FR 2.11: an INS is only usable with a qualified identity
            # (PID-32 = VALI); in the ANS examples PID-32 VALI with an INS is the normal case
            pid32 = ctx.s(pid.field(32)).upper()
            sub.identity_reliability = pid32 or None
            if pid32 and pid32 != "VALI":
                ctx.report("cisis.ins.reliability",
                           f"PID-32 identity reliability is {pid32!r}, not VALI: the INS "
                           "must not be used as the patient identifier", "PID-32")

    # --- ORC-1 and event (profils-messages.md « Le segment ORC »)
    orc = (by_name.get("ORC") or [None])[0]
    orc1 = ctx.s(orc.field(1)).upper() if orc else ""
    if orc is None:
        ctx.report("cisis.segment.missing", "ORC segment missing", "ORC", HL7_SEGMENT_SEQUENCE)
    elif orc1 not in ORC_ACTION:
        ctx.report("cisis.action.code",
                   f"ORC-1 must be NW, RO or CA (got {orc1!r})", "ORC-1", HL7_TABLE_VALUE)
    if not by_name.get("OBR"):
        ctx.report("cisis.segment.missing", "OBR segment missing", "OBR", HL7_SEGMENT_SEQUENCE)
    txa = (by_name.get("TXA") or [None])[0]
    if code == "MDM" and txa is None:
        ctx.report("cisis.segment.missing",
                   "TXA segment missing (required for MDM)", "TXA", HL7_SEGMENT_SEQUENCE)

    pv1 = (by_name.get("PV1") or [None])[0]
    if pv1 is not None:
        # PV1-2: the XDS contentTypeCode (mapping.md « Mapping XDS », « Lot de soumission »)
        sub.patient_class = ctx.s(pv1.field(2)).upper() or None
    if lps:
        # lps-cda-mssante/profils-messages.md « PV1-2 Classe du patient : N (Not applicable) »
        if pv1 is None:
            ctx.report("cisis.segment.missing", "PV1 segment missing", "PV1", HL7_SEGMENT_SEQUENCE)
        elif ctx.s(pv1.field(2)).upper() != "N":
            ctx.report("lps.pv1.class", "PV1-2 should be N (Not applicable)", "PV1-2")

    # --- OBX: documents, MetaDMPMSS flags, mail bodies; PRT; NTE
    mail_obx: list[Segment] = []
    doc_obx: list[_DocOBX] = []
    flags: dict[str, bool] = {}
    flag_seen: dict[str, int] = {}
    bad_flags: set[str] = set()
    prts: list[Segment] = []
    last_flag: str | None = None
    for s in segs:
        if s.name == "PRT":
            prts.append(s)
            continue
        if s.name == "NTE":
            # profils-messages.md « Echange MSSanté Patient »: NTE-4 = FIN -> patient cannot reply
            if last_flag == "DESTMSSANTEPAT" and ctx.s(enc.component_of(s.field(4), 1)).upper() == "FIN":
                sub.recipients.patient_no_reply = True
            continue
        if s.name != "OBX":
            continue
        last_flag = None
        obx3 = s.field(3)
        system = ctx.s(enc.component_of(obx3, 3)).replace(" ", "").upper()
        ident = ctx.s(enc.component_of(obx3, 1))
        setid = ctx.s(s.field(1))
        loc = f"OBX-{setid or '?'}"
        vtype = ctx.s(s.field(2)).upper()
        if system == "METADMPMSS" or _flag_name(ident) in FLAG_NAMES + MAIL_BODY_NAMES:
            name = _flag_name(ident)
            if name in MAIL_BODY_NAMES:
                body = _read_text_obx(s, enc, ctx, loc)
                if body is not None:
                    sub.mail_bodies[name] = body
                continue
            if name not in FLAG_NAMES:
                ctx.report("cisis.flags.unknown",
                           f"unknown MetaDMPMSS code {name!r} ignored", f"{loc}-3")
                continue
            # meta-dmp-mss.md + profils-messages.md: OBX-5.1 from HL7 table 0136 (Y/N)
            val = _yes_no(ctx.s(enc.component_of(s.field(5), 1)))
            if val is None:
                ctx.report("cisis.flags.value",
                           f"{name}: OBX-5 must be Y or N", f"{loc}-5", HL7_TABLE_VALUE)
                bad_flags.add(name)
                continue
            if name in flags and flags[name] != val:
                ctx.report("cisis.flags.value", f"{name} given twice with different values", loc)
            flags[name] = val
            flag_seen[name] = s.index
            last_flag = name
            if vtype not in ("CE", "CWE"):
                ctx.report("cisis.flags.form",
                           f"{name}: OBX-2 should be CE (ORU) or CWE (MDM)", f"{loc}-2")
            # profils-messages.md: « Le champ OBX-11 ... est arbitrairement fixé à F »
            if ctx.s(s.field(11)).upper() not in ("F", ""):
                ctx.report("cisis.flags.form", f"{name}: OBX-11 should be F", f"{loc}-11")
            continue
        if vtype == "ED" and lps and doc_obx:
            # lps-cda-mssante/profils-messages.md: OBX 1 carries the document, OBX 2 « les
            # informations du courriel MSSanté dont a été extrait le document »; « Le message HL7
            # MDM ne peut transmettre qu'un seul document médical »
            mail_obx.append(s)
        elif vtype == "ED":
            doc_obx.append(_DocOBX(s, setid, ctx.s(s.field(11)).upper()))
        else:
            ctx.report("cisis.obx.ignored",
                       f"OBX with value type {vtype!r} ignored (documents use ED)", loc)

    # required flags (profils-messages.md « Ces métadonnées sont requises » sauf CORPSMAIL_*;
    # ACK_RECEPTION / ACK_LECTURE_MSS are « Usage = Optional »)
    required = LPS_REQUIRED_FLAGS if lps else REQUIRED_FLAGS
    for name in required:
        if name not in flags and name not in bad_flags:
            ctx.report("cisis.flags.required", f"required MetaDMPMSS flag {name} missing", "OBX",
                       HL7_REQUIRED_FIELD)
    if lps:
        # the LPS profile carries only its four restriction flags: keep what is carried (the
        # four required ones always present), no DEST*/ACK_* defaults
        sub.flags = {n: flags.get(n, False) for n in LPS_REQUIRED_FLAGS}
        sub.flags.update({n: flags[n] for n in FLAG_NAMES if n in flags})
    else:
        sub.flags = {n: flags.get(n, False) for n in FLAG_NAMES}
    # the guide asks for the flags in its order; tolerate, but say so
    order = [flag_seen[n] for n in (LPS_REQUIRED_FLAGS if lps else FLAG_NAMES) if n in flag_seen]
    if order != sorted(order):
        ctx.report("cisis.flags.form",
                   "MetaDMPMSS flag OBX are not in the order of the guide", "OBX")

    # --- documents (profils-messages.md « Les données concernant la demande de traitement »)
    if not doc_obx:
        ctx.report("cisis.document.missing",
                   "no document OBX (value type ED) in the message", "OBX",
                   HL7_SEGMENT_SEQUENCE)
    if lps:
        sub.mail = _read_lps_mail(mail_obx, enc, ctx)
    if code == "ORU" and len(doc_obx) > 2:
        # profils-messages.md: « Le message ORU peut transmettre une ou deux instances »
        ctx.report("cisis.document.count", "more than two documents in an ORU message", "OBX")
    headers: list[dict | None] = []
    for d in doc_obx:
        doc, header = _read_document(d, enc, ctx)
        if doc is not None:
            sub.documents.append(doc)
            headers.append(header)

    # --- action: ORC-1, OBX-11 and the MDM event must agree (profils-messages.md « Le segment
    # ORC »: « En cas d'incohérence entre ces champs, le message HL7 sera rejeté par la PFI »)
    candidates: dict[str, str] = {}
    if orc1 in ORC_ACTION:
        candidates["ORC-1"] = ORC_ACTION[orc1]
    for d in doc_obx:
        if d.status in OBX11_ACTION:
            candidates[f"OBX-{d.set_id}-11"] = OBX11_ACTION[d.status]
        else:
            ctx.report("cisis.action.code", f"document OBX-11 must be F, C or D (got {d.status!r})",
                       f"OBX-{d.set_id}-11", HL7_TABLE_VALUE)
    if code == "MDM" and event in EVENT_ACTION:
        candidates["MSH-9.2"] = EVENT_ACTION[event]
    if len(set(candidates.values())) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in candidates.items())
        ctx.report("cisis.action.inconsistent",
                   f"inconsistent request: ORC-1, OBX-11 and event disagree ({detail})",
                   "ORC-1")
        sub.action = None  # ambiguous request: no action-specific check, message rejected
    else:
        sub.action = next(iter(candidates.values()), None)

    # --- replacement / deletion (profils-messages.md TXA-13 « Requis dans le cas d'une demande
    # de remplacement »; MDM readme: the parent is CDA relatedDocument[@typeCode=RPLC])
    parent = next((d.replaces for d in sub.documents if d.replaces), None)
    sub.parent_document_id = parent if sub.action == "replace" else None
    if sub.action == "replace":
        if parent is None and any(h for h in headers):
            ctx.report("cisis.version.parent",
                       "replacement without relatedDocument[@typeCode='RPLC'] parent id "
                       "in the document", "OBX-5")
        for d in sub.documents:
            if d.version_number is not None and d.version_number < 2:
                ctx.report("cisis.version.number",
                           "replacement document has versionNumber < 2", "OBX-5")
            if d.replaces and d.id and d.replaces == d.id:
                ctx.report("cisis.version.number",
                           "document replaces itself (same id as its RPLC parent)",
                           "OBX-5")
    if txa is not None:
        _check_txa(txa, sub, enc, ctx, code, event)
    # profils-messages.md « Le segment OBR »: OBR-4.1 « Code du document », a copy of the CDA code
    obr = (by_name.get("OBR") or [None])[0]
    obr4 = ctx.s(enc.component_of(obr.field(4), 1)) if obr is not None else ""
    cda_codes = {d.type_code for d in sub.documents if d.type_code}
    if obr4 and cda_codes and obr4 not in cda_codes:
        ctx.report("cisis.copy.type-code",
                   "OBR-4.1 differs from the CDA ClinicalDocument/code", "OBR-4")

    # --- INS: PID-3 vs CDA recordTarget (profils-messages.md: « Le PID-3 doit être identique aux
    # identifiants de patient portés par le document CDA »; error-codes.md 903/904/905)
    for d, h in zip(sub.documents, headers):
        if h is None:
            continue
        _check_ins(sub, d, h, ctx)

    # --- participants (profils-messages.md, PRT SB / RCT / REPLY)
    _read_prts(prts, sub, enc, ctx, lps=lps)

    if lps:
        # lps-cda-mssante/profils-messages.md « Segment PRT (Requis) Participation Information
        # Expéditeur » with « PRT-15 (Requis) »; RCT is « Requis si connu », REPLY optional.
        # No DESTDMP / DESTMSSANTE* / ACK_* flags in this profile: no DMP, no matrix.
        if sub.recipients.sender is None:
            ctx.report("lps.sender.missing",
                       "PRT SB (mail sender) missing", "PRT", HL7_SEGMENT_SEQUENCE)
        elif not sub.recipients.sender.address:
            ctx.report("lps.sender.missing",
                       "PRT SB without the sender mail address in PRT-15.4", "PRT-15",
                       HL7_REQUIRED_FIELD)
        sub.acks = Acks(reception=sub.flags.get("ACK_RECEPTION", False),
                        lecture=sub.flags.get("ACK_LECTURE_MSS", False))
        if sub.flags.get("MASQUE_PS"):
            # « Cet OBX permet au Consommateur de vérifier que le document n'est pas masqué aux
            # professionnels de santé » (MASQUE_PS)
            ctx.report("lps.masked",
                       "MASQUE_PS=Y: the document is masked to health professionals", "OBX")
        sub.errors = ctx.errors
        sub.warnings = ctx.warnings
        return sub

    # --- destinations, acknowledgements, MSSanté rules
    f = sub.flags
    sub.recipients.dmp = f["DESTDMP"]
    sub.acks = Acks(reception=f["ACK_RECEPTION"], lecture=f["ACK_LECTURE_MSS"])
    _check_mss_rules(sub, ctx)

    sub.errors = ctx.errors
    sub.warnings = ctx.warnings
    return sub


def _text(ctx: _Ctx, v: str) -> str:
    """Text as the codec reads it: bytes invalid in the codec (kept by the lossless decoding of the
    message as lone surrogates) become U+FFFD."""
    if ctx.lossless:
        return v
    return _RAW_BYTES.sub(lambda m: ctx.msg.encode(m.group()).decode(ctx.codec, "replace"), v)


def _read_text_obx(s: Segment, enc: Delimiters, ctx: _Ctx, loc: str) -> str | None:
    """CORPSMAIL_PS / CORPSMAIL_PATIENT: ED (``^text^^Base64^…``) or plain text."""
    v = s.field(5)
    if ctx.s(s.field(2)).upper() == "ED":
        parts = v.split(enc.component, 4)
        encoding = ctx.s(parts[3]).upper() if len(parts) > 3 else ""
        data = parts[4] if len(parts) > 4 else ""
        if encoding == "BASE64":
            b = _b64decode_tolerant(ctx.msg.encode(data), ctx, f"{loc}-5", truncated_ok=True)
            if b is None:
                return None
            return b.decode(ctx.codec, "replace")
        return _text(ctx, ctx.unescape(data))
    return _text(ctx, ctx.unescape(v))


def _read_document(d: _DocOBX, enc: Delimiters, ctx: _Ctx) -> tuple[Document | None, dict | None]:
    """OBX-5 ED: ``source^type^subtype^encoding^data`` (profils-messages.md OBX-5.1..5.5).

    Base64 (the guide's form) and plain text (``A``/empty encoding, HL7-escaped) are read; the
    decoded bytes are kept as they are (sha256 on them)."""
    loc = f"OBX-{d.set_id or '?'}"
    parts = d.seg.field(5).split(enc.component, 4)
    if len(parts) < 5:
        ctx.report("cisis.document.encoding",
                   "document OBX-5 is not an ED value (source^type^subtype^encoding^data)",
                   f"{loc}-5", HL7_DATA_TYPE)
        return None, None
    dtype = ctx.s(parts[1]).upper()
    subtype = ctx.s(parts[2]).upper()
    encoding = ctx.s(parts[3]).upper()
    data = parts[4].rstrip(" \t")
    if dtype not in ("TEXT", "APPLICATION") or subtype not in ("XML", ""):
        ctx.report("cisis.document.media-type",
                   "document OBX-5.2/5.3 should be TEXT|text and XML", f"{loc}-5")
    if encoding == "BASE64":
        body = _b64decode_tolerant(ctx.msg.encode(data), ctx, f"{loc}-5.5")
        if body is None:
            return None, None
    elif encoding in ("A", "", "NONE"):
        body = ctx.msg.encode(ctx.unescape(data))
    elif encoding == "HEX":
        try:
            body = bytes.fromhex(data)
        except ValueError:
            ctx.report("cisis.document.encoding",
                       "OBX-5 data is not valid hexadecimal", f"{loc}-5.5", HL7_DATA_TYPE)
            return None, None
    else:
        ctx.report("cisis.document.encoding",
                   f"unsupported OBX-5.4 encoding {encoding!r}", f"{loc}-5.4",
                   HL7_TABLE_VALUE)
        return None, None
    obx3 = d.seg.field(3)
    doc = Document(sha256=hashlib.sha256(body).hexdigest(), size=len(body),
                   raw_bytes_b64=base64.b64encode(body).decode("ascii"),
                   type_code=ctx.s(enc.component_of(obx3, 1)) or None, obx_set_id=d.set_id,
                   obx_result_status=d.status)
    try:
        header = read_header(parse_cda(body))
    except (etree.XMLSyntaxError, ValueError) as exc:
        if isinstance(exc, etree.XMLSyntaxError):
            kind = "not well-formed XML"
        elif isinstance(exc, DoctypeNotAllowed):
            kind = "refused: it declares a DTD (a CDA document carries none)"
        else:
            kind = "not a CDA R2 ClinicalDocument"
        ctx.report("cisis.document.not-cda", f"document in {loc} is {kind}", f"{loc}-5")
        return doc, None
    c = header.get("code") or {}
    obx_type = doc.type_code
    doc.id = header["id_str"]
    doc.set_id = header["set_id_str"]
    doc.version_number = header["version_number"]
    doc.type_code = c.get("code") or obx_type
    doc.level = header["level"]
    doc.body_media_type = header["media_type"]
    doc.confidentiality_code = (header["confidentiality_code"] or {}).get("code")
    doc.effective_time = header["effective_time"]
    doc.title = header["title"]
    doc.template_ids = [t for t in header["template_ids"] if t]
    doc.author = _person_from_header(header["author"])
    doc.legal_authenticator = _person_from_header(header["legal_authenticator"])
    cust = header["custodian"]
    if cust:
        doc.custodian = Person(organization_id=_norm_id(cust["id"]), organization_name=cust["name"])
    doc.order_id = _norm_id(header["order_id"])
    doc.accession_number = _norm_id(header["accession_number"])
    doc.study_instance_uid = header["study_instance_uid"]
    doc.modality = header["modality"]
    doc.region = (header["region"] or {}).get("code")
    doc.practice_setting = (header["practice_setting"] or {}).get("code")
    doc.facility_type = (header["facility_type"] or {}).get("code")
    doc.replaces = header["replaces_str"]
    ins = header["record_target"]["ins"]
    doc.record_target_ins = INS(**ins) if ins else None
    if doc.id is None:
        ctx.report("cisis.document.no-id",
                   f"document in {loc} has no ClinicalDocument/id", f"{loc}-5")
    # profils-messages.md OBX-3.1 « Code du document »: same code as the CDA
    if obx_type and c.get("code") and obx_type != c.get("code"):
        ctx.report("cisis.copy.type-code",
                   "OBX-3.1 differs from the CDA ClinicalDocument/code", f"{loc}-3")
    return doc, header


def _check_txa(txa: Segment, sub: Submission, enc: Delimiters, ctx: _Ctx, code: str, event: str) -> None:
    """profils-messages.md « Les métadonnées du document [Uniquement pour le message MDM] »."""
    txa12 = _ei_to_id(txa.field(12), enc, ctx)
    txa13 = _ei_to_id(txa.field(13), enc, ctx)
    if not txa12:
        ctx.report("cisis.txa.document-id-missing",
                   "TXA-12 (unique document number) missing", "TXA-12", HL7_REQUIRED_FIELD)
    ids = {d.id for d in sub.documents if d.id}
    if txa12 and ids and txa12 not in ids:
        ctx.report("cisis.copy.document-id",
                   "TXA-12 differs from the CDA ClinicalDocument/id", "TXA-12")
    if sub.action == "replace":
        if not txa13:
            ctx.report("cisis.version.parent",
                       "TXA-13 (parent document number) missing for a replacement",
                       "TXA-13", HL7_REQUIRED_FIELD)
        elif sub.parent_document_id and txa13 != sub.parent_document_id:
            ctx.report("cisis.version.parent",
                       "TXA-13 differs from the CDA relatedDocument RPLC parent id",
                       "TXA-13")
        elif not sub.parent_document_id:
            sub.parent_document_id = txa13
    txa2 = ctx.s(txa.field(2))
    types = {d.type_code for d in sub.documents if d.type_code}
    if txa2 and types and txa2 not in types:
        ctx.report("cisis.copy.type-code", "TXA-2 differs from the document type code", "TXA-2")


def _check_ins(sub: Submission, d: Document, h: dict, ctx: _Ctx) -> None:
    loc = f"OBX-{d.obx_set_id or '?'}"
    rt = h["record_target"]
    cda_ins = rt["ins"]
    if sub.ins is None:
        return
    if cda_ins is None:
        # error-codes.md 903: « le document CDA ... contient une liste d'identifiants de patient
        # mais pas l'INS »
        ctx.report("cisis.ins.absent", "INS not present in the document recordTarget", loc)
        return
    if cda_ins["value"] != sub.ins.value or cda_ins["oid"] != sub.ins.oid:
        # error-codes.md 904 + profils-messages.md « Le PID-3 doit être identique ... »
        ctx.report("cisis.ins.mismatch",
                   "INS of PID-3 differs from the document recordTarget INS", loc)
        return
    t = rt["traits"]
    # error-codes.md 905: INS present but the INS traits are not all present (nom de naissance,
    # prénom(s), date de naissance, sexe - CI-SIS annexe INS)
    missing = [k for k in ("birth_name", "birth_date", "sex") if not t.get(k)]
    if not (t.get("given_names") or t.get("first_given_name")):
        missing.append("given_names")
    if missing:
        ctx.report("cisis.ins.incomplete", "INS traits incomplete in the document: missing "
                   + ", ".join(missing), loc)
        return
    # error-codes.md 904: « les traits ou le matricule ne correspondent pas exactement »
    p = sub.patient
    diffs = []
    if p.birth_name and t.get("birth_name") and p.birth_name.upper() != t["birth_name"].upper():
        diffs.append("birth name")
    if p.birth_date and t.get("birth_date") and t["birth_date"][:8] != p.birth_date[:8]:
        diffs.append("birth date")
    if p.sex and t.get("sex") and p.sex.upper() != t["sex"].upper():
        diffs.append("sex")
    if diffs:
        ctx.report("cisis.ins.traits-mismatch", "patient traits of PID differ from the document: "
                   + ", ".join(diffs), loc)


def _read_prts(prts: list[Segment], sub: Submission, enc: Delimiters, ctx: _Ctx, *, lps: bool = False
               ) -> None:
    """PRT-4 SB (sender), RCT (MSSanté recipients, PS/organisation/BAL or patient), REPLY.

    LPS profile (lps-cda-mssante/profils-messages.md): SB = the sender of the MSSanté mail, RCT =
    the initial recipient of the mail (PS, organisation or BAL), same field layout."""
    mss_ps: list[str] = []
    patients: list[str] = []
    for p in prts:
        role = ctx.s(enc.component_of(p.field(4), 1)).upper()
        loc = f"PRT[{p.index}]"
        if role == "SB":
            pers = p.field(5)
            person = None
            if ctx.s(enc.component_of(pers, 1)):
                # PRT-5.9 assigning authority: tolerant on the namespace (« ASIP-SANTE- PS »),
                # the OID in 5.9.2 is what counts
                person = Person(id=ctx.s(enc.component_of(pers, 1)),
                                id_oid=ctx.s(enc.component_of(pers, 9, 2)) or None,
                                family=ctx.s(enc.component_of(pers, 2)) or None,
                                given=ctx.s(enc.component_of(pers, 3)) or None)
            org = p.field(8)
            sub.recipients.sender = Sender(
                person=person,
                organization_name=ctx.s(enc.component_of(org, 1)) or None,
                organization_id_type=ctx.s(enc.component_of(org, 7)) or None,
                organization_id=ctx.s(enc.component_of(org, 10)) or None,
                device=ctx.s(enc.component_of(p.field(10), 1)) or None,
                address=_xtn_address(p.field(15), enc, ctx),
            )
            # LPS: PRT-8 « requis si connu si l'expéditeur est une organisation » only
            if sub.recipients.sender.organization_id is None and not (lps and person):
                ctx.report("cisis.prt.sender-organisation",
                           "PRT SB without PRT-8.10 organisation identifier", loc)
        elif role == "RCT":
            addr = _xtn_address(p.field(15), enc, ctx)
            sub.recipients.rct.append(_participant(p, addr, enc, ctx))
            if not addr:
                ctx.report("cisis.prt.recipient-address",
                           "PRT RCT without a mail address in PRT-15.4", loc,
                           HL7_REQUIRED_FIELD)
                continue
            is_patient = (ctx.s(enc.component_of(p.field(5), 13)).upper() == "INS"
                          or addr.lower().endswith(PATIENT_MAIL_DOMAIN))
            (patients if is_patient else mss_ps).append(addr)
        elif role == "REPLY":
            addr = _xtn_address(p.field(15), enc, ctx)
            if addr:
                sub.recipients.reply_to = addr
        else:
            ctx.report("cisis.prt.role", f"PRT-4 role {role!r} ignored", loc)
    sub.recipients.mss_ps = list(dict.fromkeys(mss_ps))
    if len(set(patients)) > 1:
        ctx.report("cisis.prt.patient-mailbox",
                   "several patient mailboxes given: the first one is used", "PRT")
    sub.recipients.mss_patient = patients[0] if patients else None
    if sub.recipients.mss_patient and sub.ins:
        if sub.recipients.mss_patient.lower() != patient_mail_address(sub.ins.value).lower():
            # MSSanté patient mailboxes are <INS>@patient.mssante.fr
            ctx.report("cisis.prt.patient-mailbox",
                       "patient mailbox does not match the PID-3 INS", "PRT-15")


def _participant(p: Segment, addr: str | None, enc: Delimiters, ctx: _Ctx) -> Participant:
    """A PRT RCT as carried: PRT-5 person (5.1 id, 5.2 family, 5.3 given, 5.9.2 OID), PRT-8
    organisation (8.1 name, 8.6 assigning authority, 8.7 type, 8.10 number), PRT-15.4 address."""
    pers, org = p.field(5), p.field(8)
    person = None
    if ctx.s(enc.component_of(pers, 1)) or ctx.s(enc.component_of(pers, 2)):
        person = Person(id=ctx.s(enc.component_of(pers, 1)) or None,
                        id_oid=ctx.s(enc.component_of(pers, 9, 2)) or None,
                        family=ctx.s(enc.component_of(pers, 2)) or None,
                        given=ctx.s(enc.component_of(pers, 3)) or None)
    return Participant(address=addr, person=person,
                       organization_name=ctx.s(enc.component_of(org, 1)) or None,
                       organization_authority=ctx.s(enc.component_of(org, 6)) or None,
                       organization_id_type=ctx.s(enc.component_of(org, 7)) or None,
                       organization_id=ctx.s(enc.component_of(org, 10)) or None)


def _read_lps_mail(mail_obx: list[Segment], enc: Delimiters, ctx: _Ctx) -> MssMail | None:
    """lps-cda-mssante/profils-messages.md « Le groupe de segments portant les informations du
    courriel MSSanté » (Usage R, [1..1]): OBX-2 ED, OBX-3.1 = Message-ID of the mail, OBX-3.2 =
    subject, OBX-5 = « Contenu du courriel codé en base 64 », OBX-11 fixed to F."""
    if not mail_obx:
        ctx.report("lps.mail.missing",
                   "OBX with the MSSanté mail information (OBX 2) missing", "OBX",
                   HL7_SEGMENT_SEQUENCE)
        return None
    if len(mail_obx) > 1:
        # « Le message HL7 MDM ne peut transmettre qu'un seul document médical »
        ctx.report("lps.mail.count",
                   "more than one document/mail ED OBX: the LPS MDM carries one document "
                   "and one mail", "OBX")
    s = mail_obx[0]
    setid = ctx.s(s.field(1))
    loc = f"OBX-{setid or '?'}"
    mail = MssMail(message_id=ctx.s(ctx.unescape(enc.component_of(s.field(3), 1))) or None,
                   subject=ctx.s(ctx.unescape(enc.component_of(s.field(3), 2))) or None,
                   content=_read_text_obx(s, enc, ctx, loc), obx_set_id=setid or None)
    if mail.message_id is None:
        ctx.report("lps.mail.form", "mail OBX-3.1 (Message-ID) empty", f"{loc}-3")
    if ctx.s(s.field(11)).upper() != "F":
        ctx.report("lps.mail.form", "mail OBX-11 should be F", f"{loc}-11")
    return mail


def mss_matrix_row(f: dict[str, bool]) -> int | None:
    """Row (1-3) of the regles-gestion-mssante.md matrix matching the flags, or None."""
    ps, pat = f["DESTMSSANTEPS"], f["DESTMSSANTEPAT"]
    if (not f["MASQUE_PS"] and not f["INVISIBLE_PATIENT"] and not f["INVISIBLE_REP_LEGAUX"]
            and ps and pat):
        return 1  # PS + patient
    if (not f["MASQUE_PS"] and f["INVISIBLE_PATIENT"] and not f["INVISIBLE_REP_LEGAUX"]
            and ps and not pat):
        return 2  # PS only
    if (not f["INVISIBLE_PATIENT"] and not f["CONNEXION_SECRETE"] and not f["DESTDMP"]
            and not ps and pat):
        return 3  # patient only
    return None


def _check_mss_rules(sub: Submission, ctx: _Ctx) -> None:
    f = sub.flags
    ps, pat = f["DESTMSSANTEPS"], f["DESTMSSANTEPAT"]
    r = sub.recipients
    # PRT RCT « requis si le document est échangé via MSSanté » (profils-messages.md)
    if ps and not r.mss_ps:
        ctx.report("cisis.mss.recipient-missing",
                   "DESTMSSANTEPS=Y but no PRT RCT professional address", "PRT")
    if pat and not r.mss_patient:
        ctx.report("cisis.mss.recipient-missing",
                   "DESTMSSANTEPAT=Y but no PRT RCT patient mailbox", "PRT")
    if not ps and r.mss_ps:
        ctx.report("cisis.mss.recipient-ignored",
                   "PRT RCT professional addresses ignored: DESTMSSANTEPS=N", "PRT")
        r.mss_ps = []
    if not pat and r.mss_patient:
        ctx.report("cisis.mss.recipient-ignored",
                   "PRT RCT patient mailbox ignored: DESTMSSANTEPAT=N", "PRT")
        r.mss_patient = None
    # PRT SB « requis ... dans le cas d'une publication du document sur le DMP » (VIHF)
    if f["DESTDMP"] and r.sender is None:
        ctx.report("cisis.mss.dmp-sender",
                   "DESTDMP=Y but no PRT SB sender (needed for the VIHF token)", "PRT")
    if not (ps or pat):
        return  # no MSSanté exchange: the matrix does not apply
    explicit = False
    # profils-messages.md MASQUE_PS « Point d'attention »: a document masked to PS must not be
    # exchanged between PS over MSSanté (matrix rows 1-2: MASQUE_PS = N)
    if f["MASQUE_PS"] and ps:
        explicit = True
        ctx.report("cisis.mss.forbidden-combination",
                   "MSSanté rule: MASQUE_PS=Y forbids DESTMSSANTEPS=Y", "OBX")
    # profils-messages.md INVISIBLE_PATIENT « Point d'attention »: a document hidden from the
    # patient must not be sent to the patient (matrix rows 1 and 3: INVISIBLE_PATIENT = N)
    if f["INVISIBLE_PATIENT"] and pat:
        explicit = True
        ctx.report("cisis.mss.forbidden-combination",
                   "MSSanté rule: INVISIBLE_PATIENT=Y forbids DESTMSSANTEPAT=Y", "OBX")
    if explicit:
        return
    if mss_matrix_row(f) is None:
        # regles-gestion-mssante.md: « Les cas non représentés génèrent un message d'erreur »
        # (rule cisis.mss.unlisted-combination, warn by default: the corpus itself sends such
        # combinations; see parse_report)
        ctx.report("cisis.mss.unlisted-combination", "MSSanté rule: flag combination not listed in "
                   "the MSSanté management matrix (Règles de gestion MSSanté)", "OBX")
