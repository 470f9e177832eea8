"""The catalogue of the report steps' checks: what each one is, where it comes from, and whether a
message that breaks it is refused or only warned about.

Every check of the report channels (CI-SIS reports and the LPS profile in
:mod:`engine.reports.cisis`, CDA validation and PACS wrapping in :mod:`engine.reports.processing`,
teleradiology flows in :mod:`engine.reports.teleradiology`) reports through one of these ids. The
checks stay where they are; this module holds only the data and the severity arithmetic (pure, no
I/O).

Policy (defaults): ``reject`` for what prevents a correct delivery: the guide's codes 900-905 as
« Codes d'erreur » defines them, a CDA that is not well-formed or fails the XSD, a missing
document or segment, a flag combination the MSSanté rules forbid, an action the event does not
allow. ``warn`` for a copy in the HL7 message of metadata the CDA carries (TXA-12 against
ClinicalDocument/id, TXA-2, OBR-4.1 and OBX-3.1 against ClinicalDocument/code) and for what the engine
reads tolerantly: the CDA is the document of record, its value is the one the canonical
submission carries for the DMP and MSSanté metadata downstream.

A channel tightens or relaxes a rule in ``routes.yaml`` (``reports: {rules: {<id>: reject|warn|off}}``,
same under ``pacs_reports`` and ``teleradiology``). A rule marked not ``relaxable`` leaves nothing
to deliver when it fails (no wrapped document): it can only be rejected.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal, Mapping

Severity = Literal["reject", "warn", "off"]
SEVERITIES: tuple[str, ...] = ("reject", "warn", "off")

# which configuration block's ``rules`` may name a rule (the step that runs it)
STEP_REPORTS = "reports"            # CI-SIS reports, LPS profile, CDA validation
STEP_PACS = "pacs_reports"          # PACS wrap (its wrapped ORU is also read with the CI-SIS rules)
STEP_TLR = "teleradiology"

CISIS = "CI-SIS Transmission de documents CDA en HL7 v2 (v2.1)"
LPS = "CI-SIS Transmission au LPS d'un document CDA provenant d'un courriel MSSanté (v1.1)"
MSS = CISIS + ", Règles de gestion MSSanté"
TLR = "CI-SIS Volet Téléradiologie, Volume 2 - Détail des transactions"
CDA = "HL7 CDA R2 (CDA.xsd) and CI-SIS structuration minimale"

PROFILES = "Profils des messages"


@dataclass(frozen=True)
class Rule:
    id: str
    step: str        # STEP_REPORTS | STEP_PACS | STEP_TLR
    guide: str
    section: str
    #: the guide's error code: applicationErrorCondition 900-906 (CI-SIS, ERR-5) or, for the
    #: teleradiology guide which defines none, the HL7 table 0357 condition (ERR-3)
    code: str
    default: Severity
    summary: str
    relaxable: bool = True


R, W = "reject", "warn"
REP, PACS, T = STEP_REPORTS, STEP_PACS, STEP_TLR

RULES: tuple[Rule, ...] = (
    # ---------------------------------------------------------------- CI-SIS, message and segments
    Rule("cisis.hl7.nul-character", REP, CISIS, "HL7 v2.5 §2.7 (character sets): no NUL in a field", "906", R,
         "a field holds a NUL character (sent or as a \\X00\\ escape): no connector can write it",
         relaxable=False),
    Rule("cisis.msh.message-type", REP, CISIS, f"{PROFILES}, segment MSH (MSH-9, MSH-12)", "906", R,
         "message type, trigger event or HL7 version not those of the profile"),
    Rule("cisis.msh.profile", REP, CISIS, f"{PROFILES}, segment MSH (MSH-21)", "906", R,
         "MSH-21 does not name the profile 2.1^CISIS_CDA_HL7_V2"),
    Rule("cisis.msh.profile-version", REP, CISIS, f"{PROFILES}, segment MSH (MSH-21.1)", "906", W,
         "MSH-21 names the profile with another version"),
    Rule("cisis.segment.missing", REP, CISIS, PROFILES, "906", R,
         "a required segment is missing (PID, ORC, OBR, TXA for MDM; PV1 in the LPS profile)"),
    Rule("cisis.action.code", REP, CISIS, f"{PROFILES}, segment ORC (ORC-1) and OBX-11", "906", R,
         "ORC-1 not NW/RO/CA, or document OBX-11 not F/C/D"),
    Rule("cisis.action.inconsistent", REP, CISIS, f"{PROFILES}, segment ORC", "906", R,
         "ORC-1, OBX-11 and the MDM event ask for different actions"),
    # ---------------------------------------------------------------- patient identity (INS)
    Rule("cisis.ins.oid", REP, CISIS, "Codes d'erreur (905); annexe INS", "905", R,
         "PID-3 INS with an assigning authority that is not an INS OID"),
    Rule("cisis.ins.absent", REP, CISIS, "Codes d'erreur (903)", "903", R,
         "PID-3 carries an INS, the document's recordTarget does not"),
    Rule("cisis.ins.mismatch", REP, CISIS, f"Codes d'erreur (904); {PROFILES}, PID-3", "904", R,
         "INS of PID-3 differs from the document's INS"),
    Rule("cisis.ins.incomplete", REP, CISIS, "Codes d'erreur (905)", "905", R,
         "INS traits incomplete in the document's recordTarget"),
    Rule("cisis.ins.traits-mismatch", REP, CISIS, "Codes d'erreur (904)", "904", R,
         "patient traits of PID differ from the document's"),
    Rule("cisis.ins.not-given", REP, CISIS, f"{PROFILES}, Les données concernant le patient", "906", W,
         "no INS in PID-3: the identity is not qualified"),
    Rule("cisis.ins.reliability", REP, CISIS, "annexe INS (PID-32)", "906", W,
         "PID-32 is not VALI while PID-3 carries an INS"),
    # ---------------------------------------------------------------- MetaDMPMSS flags
    Rule("cisis.flags.value", REP, CISIS, f"{PROFILES}, MetaDMPMSS (OBX-5, table 0136)", "906", R,
         "a flag is not Y or N, or is given twice with different values"),
    Rule("cisis.flags.required", REP, CISIS, f"{PROFILES}, Les métadonnées DMP/MSSanté", "906", R,
         "a required MetaDMPMSS flag is missing"),
    Rule("cisis.flags.unknown", REP, CISIS, "MetaDMPMSS", "906", W,
         "an unknown MetaDMPMSS code is ignored"),
    Rule("cisis.flags.form", REP, CISIS, f"{PROFILES}, Les métadonnées DMP/MSSanté", "906", W,
         "flag OBX-2 not CE/CWE, OBX-11 not F, or flags out of the guide's order"),
    # ---------------------------------------------------------------- documents
    Rule("cisis.document.missing", REP, CISIS, f"{PROFILES}, OBX (ED)", "906", R,
         "no document OBX (value type ED) in the message"),
    Rule("cisis.document.encoding", REP, CISIS, f"{PROFILES}, OBX-5 (ED)", "906", R,
         "document OBX-5 not an ED value, or its data not decodable (Base64, hexadecimal)"),
    Rule("cisis.document.not-cda", REP, CISIS, f"{PROFILES}, OBX-5 (ED)", "906", R,
         "the document is not well-formed XML, declares a DTD, or is not a CDA R2 ClinicalDocument"),
    Rule("cisis.document.no-id", REP, CISIS, "ClinicalDocument/id", "906", R,
         "the document has no ClinicalDocument/id"),
    Rule("cisis.document.media-type", REP, CISIS, f"{PROFILES}, OBX-5.2/5.3", "906", W,
         "document OBX-5.2/5.3 not TEXT and XML"),
    Rule("cisis.document.count", REP, CISIS, f"{PROFILES}, ORU (one or two documents)", "906", W,
         "more than two documents in an ORU"),
    Rule("cisis.encoding.tolerated", REP, CISIS, f"{PROFILES}, OBX-5 (Base64)", "906", W,
         "Base64 without its final padding or cut short, read tolerantly"),
    Rule("cisis.obx.ignored", REP, CISIS, f"{PROFILES}, OBX", "906", W,
         "an OBX that is neither a document, a flag nor a mail body is ignored"),
    # ---------------------------------------------------------------- copies of CDA metadata
    Rule("cisis.copy.document-id", REP, CISIS, f"{PROFILES}, TXA-12", "906", W,
         "TXA-12 differs from ClinicalDocument/id (the CDA's id is the one carried)"),
    Rule("cisis.copy.type-code", REP, CISIS, f"{PROFILES}, TXA-2, OBR-4.1 and OBX-3.1", "906", W,
         "TXA-2, OBR-4.1 or OBX-3.1 differs from ClinicalDocument/code (the CDA's code is carried)"),
    # ---------------------------------------------------------------- replacement and versions
    Rule("cisis.txa.document-id-missing", REP, CISIS, f"{PROFILES}, TXA-12", "906", R,
         "TXA-12 (unique document number) missing"),
    Rule("cisis.version.parent", REP, CISIS, f"Codes d'erreur (900); {PROFILES}, TXA-13", "900", R,
         "replacement without its parent id, or TXA-13 differs from the CDA relatedDocument RPLC"),
    Rule("cisis.version.number", REP, CISIS, "Codes d'erreur (900)", "900", R,
         "replacement whose versionNumber is below 2 or which replaces itself"),
    # ---------------------------------------------------------------- participants and MSSanté
    Rule("cisis.prt.recipient-address", REP, CISIS, f"{PROFILES}, PRT RCT (PRT-15.4)", "906", R,
         "PRT RCT without a mail address"),
    Rule("cisis.prt.sender-organisation", REP, CISIS, f"{PROFILES}, PRT SB (PRT-8.10)", "906", W,
         "PRT SB without an organisation identifier"),
    Rule("cisis.prt.role", REP, CISIS, f"{PROFILES}, PRT-4", "906", W,
         "PRT with a role other than SB, RCT or REPLY is ignored"),
    Rule("cisis.prt.patient-mailbox", REP, CISIS, f"{PROFILES}, Echange MSSanté Patient", "906", W,
         "several patient mailboxes, or a patient mailbox not built on the PID-3 INS"),
    Rule("cisis.mss.recipient-missing", REP, MSS, "DESTMSSANTEPS / DESTMSSANTEPAT and PRT RCT", "906", R,
         "an MSSanté destination flag without its recipient"),
    Rule("cisis.mss.recipient-ignored", REP, MSS, "DESTMSSANTEPS / DESTMSSANTEPAT and PRT RCT", "906", W,
         "recipients given while their destination flag is N: ignored"),
    Rule("cisis.mss.dmp-sender", REP, CISIS, f"{PROFILES}, PRT SB (DMP publication)", "906", R,
         "DESTDMP=Y without a PRT SB sender (needed for the VIHF token)"),
    Rule("cisis.mss.forbidden-combination", REP, MSS, "MASQUE_PS and INVISIBLE_PATIENT « Point d'attention »",
         "906", R, "MASQUE_PS=Y with DESTMSSANTEPS=Y, or INVISIBLE_PATIENT=Y with DESTMSSANTEPAT=Y"),
    Rule("cisis.mss.unlisted-combination", REP, MSS, "matrice des combinaisons", "906", W,
         "a flag combination the MSSanté matrix does not list"),
    # ---------------------------------------------------------------- LPS profile
    Rule("lps.pv1.class", REP, LPS, f"{PROFILES}, PV1-2", "906", W, "PV1-2 is not N"),
    Rule("lps.mail.missing", REP, LPS, f"{PROFILES}, groupe du courriel MSSanté", "906", R,
         "no OBX with the MSSanté mail"),
    Rule("lps.mail.count", REP, LPS, f"{PROFILES}, groupe du courriel MSSanté", "906", R,
         "more than one document or mail OBX"),
    Rule("lps.mail.form", REP, LPS, f"{PROFILES}, groupe du courriel MSSanté", "906", W,
         "mail OBX-3.1 (Message-ID) empty or OBX-11 not F"),
    Rule("lps.sender.missing", REP, LPS, f"{PROFILES}, segment PRT Expéditeur", "906", R,
         "PRT SB (mail sender) missing or without its address"),
    Rule("lps.masked", REP, LPS, f"{PROFILES}, MASQUE_PS", "906", W,
         "MASQUE_PS=Y: the document is masked to health professionals"),
    # ---------------------------------------------------------------- CDA validation
    Rule("cda.xsd", REP, CDA, "CDA.xsd (CI-SIS, Structuration minimale des documents de santé)", "906", R,
         "a document fails the CDA XSD"),
    Rule("cda.schematron", REP, CDA, "CI-SIS schematrons", "906", W,
         "a document fails the CI-SIS schematrons (checked before the ACK only when rejected)"),
    # ---------------------------------------------------------------- PACS wrap (CDA R2 N1)
    Rule("pacs.identity.unknown", PACS, CISIS, "Codes d'erreur (902)", "902", R,
         "the patient of the PACS report is not in the identity registry", relaxable=False),
    Rule("pacs.identity.not-qualified", PACS, CISIS, "Codes d'erreur (903)", "903", R,
         "the registry identity has no usable INS", relaxable=False),
    Rule("pacs.identity.ins-mismatch", PACS, CISIS, "Codes d'erreur (904)", "904", R,
         "the INS of the PACS report differs from the registry's", relaxable=False),
    Rule("pacs.wrap.failed", PACS, CISIS, "Codes d'erreur (906)", "906", R,
         "the PACS report cannot be wrapped into a CDA R2 N1", relaxable=False),
    # ---------------------------------------------------------------- teleradiology flows
    Rule("tlr.message-type", T, TLR, "Evènements déclenchants", "200", R,
         "not a teleradiology message type (ORM^O01, ORU^R01, OMI^O23)"),
    Rule("tlr.msh.fields", T, TLR, "Contraintes communes, Eléments de l'entête", "101", R,
         "a required MSH field missing, or MSH-9.3, MSH-11, MSH-17, MSH-18 not the guide's value"),
    Rule("tlr.msh.version", T, TLR, "Contraintes communes, Eléments de l'entête (MSH-12)", "203", R,
         "MSH-12 is not 2.5.1"),
    Rule("tlr.msh.profile", T, TLR, "Contraintes communes, Eléments de l'entête (MSH-21)", "103", R,
         "MSH-21 does not name 1.0^CISIS_TLR_HL7_V2"),
    Rule("tlr.order-control", T, TLR, "Evènements déclenchants; Profils de message", "103", R,
         "ORC missing, or ORC-1 not a flow of the message type"),
    Rule("tlr.patient", T, TLR, "Contraintes communes, Les données concernant le patient et sa venue",
         "101", R,
         "PID/PV1 missing or PID-3, PID-5, PV1-2, PV1-19 missing"),
    Rule("tlr.orc", T, TLR, "Flux 1 .. Flux 4, Segment ORC", "101", R,
         "an ORC field the flow requires is missing or not the guide's value"),
    Rule("tlr.obr", T, TLR, "Flux 1 .. Flux 4, Segment OBR; Table TLR_OBR_PROCEDURE", "101", R,
         "OBR missing, or an OBR field missing or not the guide's value"),
    Rule("tlr.obr.copy", T, TLR, "Flux 1 .. Flux 3, Segment OBR (OBR-2, OBR-16)", "207", R,
         "OBR-2 differs from ORC-2, or OBR-16 from ORC-12"),
    Rule("tlr.obx", T, TLR, "Groupe OBSERVATION; Table TLR_OBSERVATION; Utilisation du champ OBX-4",
         "103", R, "OBX-11, OBX-3.3 or OBX-4 (sub-id) not as the guide fixes them"),
    Rule("tlr.observations", T, TLR, "Flux 1, Flux 3, Flux 4, Groupes OBSERVATION", "100", R,
         "an observation the flow requires is missing, repeated or malformed"),
    Rule("tlr.flow4.segments", T, TLR, "Flux 4, Segments TQ1 and IPC", "100", R,
         "TQ1 or IPC missing in an ORDER group, or one of their fields"),
)

BY_ID: dict[str, Rule] = {r.id: r for r in RULES}
#: the blocks whose ``rules`` may name the rules of a step (a PACS channel also reads the wrapped
#: CI-SIS ORU with the report rules)
BLOCK_STEPS: dict[str, tuple[str, ...]] = {
    "reports": (STEP_REPORTS,),
    "pacs_reports": (STEP_PACS, STEP_REPORTS),
    "teleradiology": (STEP_TLR,),
}


def rule(rule_id: str) -> Rule:
    """The rule of ``rule_id``; ``KeyError`` for an id missing from the catalogue (a bug)."""
    return BY_ID[rule_id]


def severity(rule_id: str, overrides: Mapping[str, str] | None = None) -> str:
    """The severity a channel gives a rule: its override, else the catalogue's default."""
    r = BY_ID[rule_id]
    if overrides and rule_id in overrides:
        return overrides[rule_id]
    return r.default


def override_problem(block: str, rule_id: str, value: str) -> str | None:
    """Why ``rules: {rule_id: value}`` is not allowed in the configuration ``block``, or None."""
    r = BY_ID.get(rule_id)
    steps = BLOCK_STEPS.get(block, ())
    if r is None or r.step not in steps:
        known = sorted(x.id for x in RULES if x.step in steps)
        close = difflib.get_close_matches(rule_id, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else " (see minipfi inspect --rules)"
        return f"unknown rule {rule_id!r} for {block}{hint}"
    if value not in SEVERITIES:
        return f"rule {rule_id!r}: severity must be reject, warn or off"
    if value != "reject" and not r.relaxable:
        return f"rule {rule_id!r} cannot be relaxed: when it fails there is no document to deliver"
    return None


def catalogue() -> list[dict]:
    """The catalogue as plain data (``minipfi inspect --rules --json``)."""
    return [{"id": r.id, "step": r.step, "guide": r.guide, "section": r.section, "code": r.code,
             "default": r.default, "relaxable": r.relaxable, "summary": r.summary} for r in RULES]
