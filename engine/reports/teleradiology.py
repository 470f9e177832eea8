"""Checks of the CI-SIS "Téléradiologie" HL7 v2.5.1 flows (volet Téléradiologie, ANS).

Guide: ANS, CI-SIS « Volet Téléradiologie », Volume 2 - Détail des transactions, and its annexes.
Each rule below cites the guide's page (the short names in brackets, which the findings' texts
also use) and section:

* [st-contraintes] « Contraintes communes à l'ensemble des messages »: MSH (MSH-9, MSH-12
  ``2.5.1``, MSH-17 ``FRA``, MSH-18 ``UNICODE UTF-8`` or ``8859/15``, MSH-21
  ``1.0^CISIS_TLR_HL7_V2``), PID-3/PID-5, PV1-2, PV1-19 (required when PV1-2 is E, I, O or R);
* [st-profils] « Profils de message »: message structures (required segments per flow);
* [st_worklfow] « Evènements déclenchants »: flow 1 ORM^O01 ORC-1 ``NW``, flow 2 ORM^O01 ORC-1
  ``CA``, flow 3 ORU^R01 ORC-1 ``OK``/``OC``, flow 4 OMI^O23 ORC-1 ``SR``;
* [st_flux1] .. [st_flux4] « Flux 1 » .. « Flux 4 »: ORC / OBR / TQ1 / IPC / OBX constraints per
  flow;
* annexes [table_obr] « Table TLR_OBR_PROCEDURE » (OBR-4 codes), [table_obs] « Table
  TLR_OBSERVATION » (OBX-3 codes), [sub-id] « Utilisation du champ OBX-4 » (OBX-4 ``n.m`` when
  several OBX share an OBX-3).

    result = check_tlr(raw)               # raw bytes of one message, CR, LF or CRLF separated
    result.flow                           # 1, 2, 3, 4 or None (not a teleradiology flow)
    result.problems                       # [Problem(code, location, text), ...]; [] = conforms
    result.ok

``code`` is an HL7 table 0357 condition code (ERR-3): 100 segment missing / out of sequence,
101 required field missing, 102 data type error, 103 value not in the guide's table/fixed value,
200/201 message type/event, 203 version, 207 other rule of the guide (consistency between fields).
``rule`` is the id of the check in the catalogue (:mod:`engine.reports.rules`), by which a
channel decides whether the finding refuses the message, is only warned about, or is ignored.
``location`` is an ERR-2 (ERL) string ``SEG^occurrence^field[^repetition^component]``, e.g.
``ORC^1^1`` or ``MSH^1^21^1^2``. ``text`` names the guide's page (``st_flux1.md`` …) and
section; it never quotes patient data (only code values such as ORC-1 or OBR-4.1 are echoed).
The channel step (:mod:`engine.reports.teleradiology_step`) writes these texts into ERR-8 with
the published section names instead of the page names.

Pure: no I/O, reads with engine.hl7.message. Only rules the guide states clearly are checked;
value sets held outside the guide (JDV_*, table 0203) are not.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.hl7.errors import HL7Error
from engine.hl7.message import Message, Segment

__all__ = [
    "PROFILE_ID",
    "PROFILE_VERSION",
    "Problem",
    "TlrCheck",
    "check_tlr",
    "flow_of",
]

PROFILE_ID = "CISIS_TLR_HL7_V2"      # st-contraintes.md, MSH-21.2
PROFILE_VERSION = "1.0"              # st-contraintes.md, MSH-21.1
VERSION = "2.5.1"                    # st-contraintes.md, MSH-12
CHARSETS = ("UNICODE UTF-8", "8859/15")   # st-contraintes.md, MSH-18
PS_OID = "1.2.250.1.71.4.2.1"        # st_flux1.md, ORC-12.9.2 (OID de gestion de personnes)

# st-contraintes.md, MSH-9; st_worklfow.md, "Evènements déclenchants"
STRUCTURES = {("ORM", "O01"): "ORM_O01", ("ORU", "R01"): "ORU_R01", ("OMI", "O23"): "OMI_O23"}
ORC1_FLOW = {("ORM", "NW"): 1, ("ORM", "CA"): 2, ("ORU", "OK"): 3, ("ORU", "OC"): 3, ("OMI", "SR"): 4}
# table_obr.md: OBR-4.1 per flow, coding system TLR_OBR_PROCEDURE
OBR4 = {1: "TRANSMISSION_DEMANDE", 2: "ANNULATION_DEMANDE", 3: "REPONSE_DEMANDE", 4: "COMPLEMENT_POST_ACTE"}
OBR_SYSTEM = "TLR_OBR_PROCEDURE"
OBS_SYSTEM = "TLR_OBSERVATION"
FLOW_FILE = {1: "st_flux1.md", 2: "st_flux2.md", 3: "st_flux3.md", 4: "st_flux4.md"}
# OBX-11 fixed by the guide for every observation of the flow (flow 1: "O"; flows 3 and 4: "F")
OBX11 = {1: "O", 3: "F", 4: "F"}


class Problem(NamedTuple):
    code: str          # HL7 table 0357
    location: str      # ERL: SEG^occurrence^field[^rep^component]
    text: str          # plain text, with the guide file and section; no patient data
    rule: str = ""     # the id of the check in the catalogue (engine.reports.rules)


@dataclass
class TlrCheck:
    flow: int | None
    problems: list[Problem] = field(default_factory=list)
    message_type: str = ""     # "ORM^O01"
    order_control: str = ""    # ORC-1 of the first ORC

    @property
    def ok(self) -> bool:
        return self.flow is not None and not self.problems


# --------------------------------------------------------------------------------------------
# reading (engine.hl7.message) and ERR-2 locations
# --------------------------------------------------------------------------------------------


def _c(seg: Segment, n: int, comp: int, sub: int | None = None) -> str:
    """Component ``comp`` (and sub-component) of the first repetition of field n, raw, stripped."""
    return seg.component(n, comp, sub).strip()


def _loc(seg: Segment, n: int, comp: int | None = None, sub: int | None = None) -> str:
    s = f"{seg.name}^{seg.occurrence}^{n}"
    if comp is not None:
        s += f"^1^{comp}"
        if sub is not None:
            s += f"^{sub}"
    return s


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


class _Ctx:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.rule = "tlr.message-type"  # the rule of the check running (set by each check)

    def add(self, code: str, location: str, text: str, rule: str | None = None) -> None:
        self.problems.append(Problem(code, location, text, rule or self.rule))

    def required(self, seg: Segment, n: int, comp: int | None, where: str, what: str, sub: int | None = None) -> bool:
        v = _c(seg, n, comp, sub) if comp is not None else seg.field(n).strip()
        if not v:
            name = f"{seg.name}-{n}" + (f".{comp}" if comp is not None else "") + (f".{sub}" if sub else "")
            self.add("101", _loc(seg, n, comp, sub), f"{where}: {name} ({what}) is required")
            return False
        return True

    def fixed(self, seg: Segment, n: int, comp: int | None, expected: str | tuple[str, ...], where: str,
              what: str) -> bool:
        v = _c(seg, n, comp) if comp is not None else _c(seg, n, 1)
        allowed = (expected,) if isinstance(expected, str) else expected
        name = f"{seg.name}-{n}" + (f".{comp}" if comp is not None else "")
        if not v:
            self.add("101", _loc(seg, n, comp), f"{where}: {name} ({what}) is required: {' or '.join(allowed)}")
            return False
        if v not in allowed:
            self.add("103", _loc(seg, n, comp),
                     f"{where}: {name} ({what}) must be {' or '.join(allowed)}, got {_code(v)}")
            return False
        return True


def _code(v: str) -> str:
    """A code value safe to echo (codes only; long or odd values are not repeated)."""
    return repr(v) if re.fullmatch(r"[A-Za-z0-9_./ -]{1,40}", v) else "another value"


def _check_msh(msh: Segment, ctx: _Ctx) -> None:
    where = "st-contraintes.md, Eléments de l'entête"
    ctx.rule = "tlr.msh.fields"
    for n, what in ((3, "sending application"), (4, "sending facility"), (5, "receiving application"),
                    (6, "receiving facility"), (7, "message date/time"), (10, "message control id")):
        ctx.required(msh, n, None, where, what)
    code, trig, struct = _c(msh, 9, 1), _c(msh, 9, 2), _c(msh, 9, 3)
    exp = STRUCTURES.get((code, trig))
    if exp and struct != exp:
        ctx.add("101" if not struct else "103", _loc(msh, 9, 3),
                f"{where}: MSH-9 must be {code}^{trig}^{exp} (message structure in MSH-9.3)")
    ctx.fixed(msh, 11, None, ("P", "T", "D"), where, "processing id")
    v = _c(msh, 12, 1)
    if v != VERSION:
        ctx.add("203", _loc(msh, 12),
                f"{where}: MSH-12 (version) must be {VERSION}, got {_code(v) if v else 'nothing'}",
                "tlr.msh.version")
    ctx.fixed(msh, 17, None, "FRA", where, "country code")
    v = msh.field(18).split(msh.delims.repetition, 1)[0].strip()
    if not v:
        ctx.add("101", _loc(msh, 18), f"{where}: MSH-18 (character set) is required: {' or '.join(CHARSETS)}")
    elif v not in CHARSETS:
        ctx.add("103", _loc(msh, 18), f"{where}: MSH-18 (character set) must be {' or '.join(CHARSETS)}, got {_code(v)}")
    reps = msh.repetitions(21)
    ctx.rule = "tlr.msh.profile"
    if not reps:
        ctx.add("101", _loc(msh, 21), f"{where}: MSH-21 (message profile) is required: {PROFILE_VERSION}^{PROFILE_ID}")
        return
    for i, rep in enumerate(reps, 1):
        comps = [c.strip() for c in rep.split(msh.delims.component)]
        if len(comps) > 1 and comps[1] == PROFILE_ID:
            if comps[0] != PROFILE_VERSION:
                ctx.add("103", f"MSH^1^21^{i}^1",
                        f"{where}: MSH-21.1 (profile version) must be {PROFILE_VERSION} for {PROFILE_ID}")
            return
    ctx.add("103", "MSH^1^21", f"{where}: MSH-21 must name the profile {PROFILE_VERSION}^{PROFILE_ID}")


def _check_patient(segs: list[Segment], flow: int, ctx: _Ctx) -> None:
    where = "st-contraintes.md, Les données concernant le patient et sa venue"
    ctx.rule = "tlr.patient"
    pid = next((s for s in segs if s.name == "PID"), None)
    if pid is None:
        ctx.add("100", "PID", f"{where}: segment PID is required")
    else:
        ctx.required(pid, 3, None, where, "patient identifiers")
        ctx.required(pid, 5, None, where, "patient name")
    pv1 = next((s for s in segs if s.name == "PV1"), None)
    if pv1 is None:
        if flow != 3:   # st-profils.md: PATIENT_VISIT R in flows 1, 2, 4; VISIT optional in flow 3
            ctx.add("100", "PV1", f"{where} / st-profils.md flux {flow}: segment PV1 is required")
        return
    if ctx.required(pv1, 2, None, where, "patient class"):
        if _c(pv1, 2, 1) in ("E", "I", "O", "R"):
            ctx.required(pv1, 19, 1, where, "visit number, required when PV1-2 is E, I, O or R")


def _orders(segs: list[Segment]) -> list[list[Segment]]:
    """ORDER groups: each starts at an ORC and runs to the next ORC."""
    groups: list[list[Segment]] = []
    for s in segs:
        if s.name == "ORC":
            groups.append([s])
        elif groups:
            groups[-1].append(s)
    return groups


def _check_xcn_ps(seg: Segment, n: int, where: str, what: str, ctx: _Ctx) -> None:
    """ORC-12 (st_flux1.md, ORC-12 components) - PS_IdNat, names, assigning authority, type."""
    if not seg.field(n).strip():
        ctx.add("101", _loc(seg, n), f"{where}: {seg.name}-{n} ({what}) is required")
        return
    ctx.required(seg, n, 1, where, "professional identifier (PS_IdNat)")
    ctx.required(seg, n, 2, where, "family name")
    ctx.required(seg, n, 3, where, "given name")
    v = _c(seg, n, 9, 2)
    if not v:
        ctx.add("101", _loc(seg, n, 9, 2), f"{where}: {seg.name}-{n}.9.2 (assigning authority OID) is required: {PS_OID}")
    elif v != PS_OID:
        ctx.add("103", _loc(seg, n, 9, 2), f"{where}: {seg.name}-{n}.9.2 (assigning authority OID) must be {PS_OID}")
    v = _c(seg, n, 9, 3)
    if v != "ISO":
        ctx.add("101" if not v else "103", _loc(seg, n, 9, 3), f"{where}: {seg.name}-{n}.9.3 must be ISO")
    ctx.required(seg, n, 13, where, "identifier type code (table 0203)")


def _check_orc(orc: Segment, flow: int, ctx: _Ctx) -> None:
    doc = FLOW_FILE[flow]
    where = f"{doc}, Segment ORC"
    ctx.rule = "tlr.orc"
    expected = {1: "NW", 2: "CA", 3: ("OK", "OC"), 4: "SR"}[flow]
    ctx.fixed(orc, 1, None, expected, where, "order control")
    if ctx.required(orc, 2, None, where, "placer order number"):
        ctx.required(orc, 2, 1, where, "order placer number")
        ctx.required(orc, 2, 3, where, "universal id of the assigning authority")
        ctx.required(orc, 2, 4, where, "universal id type")
    if flow == 4:
        return
    if flow in (1, 2):
        ctx.required(orc, 9, None, where, "date/time of transaction")
    _check_xcn_ps(orc, 12, where, "ordering provider", ctx)
    org = "PLATEFORME_TLR" if flow == 3 else "STRUCTURE_IMAGERIE"
    ctx.fixed(orc, 17, 1, org, where, "entering organization type")
    ctx.fixed(orc, 17, 3, "TLR_TYPE_ORGANISATION", where, "entering organization coding system")
    if ctx.required(orc, 21, None, where, "ordering facility"):
        ctx.required(orc, 21, 1, where, "organization name")
        ctx.required(orc, 21, 6, where, "assigning authority")
        ctx.required(orc, 21, 7, where, "identifier type code")
        ctx.required(orc, 21, 10, where, "organization identifier (Struct_IdNat)")


def _check_obr(obr: Segment, orc: Segment, flow: int, ctx: _Ctx) -> None:
    doc = FLOW_FILE[flow]
    where = f"{doc}, Segment OBR"
    ctx.rule = "tlr.obr"
    if ctx.required(obr, 2, None, where, "placer order number") and orc.field(2).strip():
        if _c(obr, 2, 1) != _c(orc, 2, 1) or _c(obr, 2, 3) != _c(orc, 2, 3):
            ctx.add("207", _loc(obr, 2), f"{where}: OBR-2 (placer order number) must be identical to ORC-2",
                    "tlr.obr.copy")
    ctx.fixed(obr, 4, 1, OBR4[flow], f"{where} / table_obr.md", "universal service identifier")
    ctx.fixed(obr, 4, 3, OBR_SYSTEM, f"{where} / table_obr.md", "coding system")
    if flow == 1:
        ctx.required(obr, 13, None, where, "relevant clinical information")
    if flow in (1, 2, 3):
        if ctx.required(obr, 16, None, where, "ordering provider") and _c(orc, 12, 1):
            if _c(obr, 16, 1) != _c(orc, 12, 1):
                ctx.add("207", _loc(obr, 16, 1),
                        f"{where}: OBR-16 (ordering provider) must be identical to ORC-12", "tlr.obr.copy")


def _obx_code(s: Segment) -> str:
    return _c(s, 3, 1)


def _check_obx_common(obxs: list[Segment], flow: int, ctx: _Ctx) -> None:
    doc = FLOW_FILE[flow]
    ctx.rule = "tlr.obx"
    if flow in OBX11:
        for s in obxs:
            ctx.fixed(s, 11, None, OBX11[flow], f"{doc}, Groupe OBSERVATION", "observation result status")
    local = ("REGION_ANATOMIQUE", "PROTOCOLE_IMAGERIE", "URL_PARTIELLE_VIEWER", "PRODUIT_ADMINISTRE",
             "APPAREIL_IMAGERIE", "MODALITE_IMAGERIE", "CODE_ACTE_IMAGERIE")
    for s in obxs:
        if _obx_code(s) in local and _c(s, 3, 3) != OBS_SYSTEM:
            ctx.add("103", _loc(s, 3, 3), f"{doc} / table_obs.md: OBX-3.3 of {_obx_code(s)} must be {OBS_SYSTEM}")
    # sub-id.md: OBX-4 required when several OBX share the same OBX-3 in the message
    by_code: dict[str, list[Segment]] = {}
    for s in obxs:
        by_code.setdefault(_obx_code(s), []).append(s)
    for code, group in by_code.items():
        if code and len(group) > 1:
            for s in group:
                if not s.field(4).strip():
                    ctx.add("101", _loc(s, 4), f"sub-id.md: OBX-4 (sub-id n.m) is required when several OBX share "
                                             f"OBX-3 {_code(code)}")


def _value_type(s: Segment, expected: str, where: str, ctx: _Ctx) -> bool:
    v = _c(s, 2, 1)
    if v != expected:
        ctx.add("102" if v else "101", _loc(s, 2),
                f"{where}: OBX-2 (value type) of {_obx_code(s)} must be {expected}")
        return False
    return True


def _subs(obxs: list[Segment], code: str) -> list[tuple[str, str, Segment]]:
    out = []
    for s in obxs:
        if _obx_code(s) == code:
            n, _, m = s.field(4).strip().partition(".")
            out.append((n, m, s))
    return out


def _check_region(obxs: list[Segment], flow: int, required: bool, ctx: _Ctx) -> None:
    """st_flux1.md, Groupes OBSERVATION - Localisation anatomique (flow 4: optional, same rules)."""
    where = f"{FLOW_FILE[flow]}, Groupes OBSERVATION - Localisation anatomique"
    regions = _subs(obxs, "REGION_ANATOMIQUE")
    if required and not any(m == "1" for _, m, _ in regions):
        ctx.add("100", "OBX", f"{where}: an OBX REGION_ANATOMIQUE with OBX-4 n.1 (main location) is required")
    for n, m, s in regions:
        _value_type(s, "CE", where, ctx)
        if m not in ("1", "2"):
            ctx.add("103", _loc(s, 4), f"{where}: OBX-4 of REGION_ANATOMIQUE must be n.1 (location) or n.2 (precision)")
        if _c(s, 5, 3) and _c(s, 5, 3) != "SCT":
            ctx.add("103", _loc(s, 5, 3), f"{where}: OBX-5.3 of REGION_ANATOMIQUE must be SCT")
    mains = {n for n, m, _ in regions if m == "1"}
    for n, m, s in regions:
        if m == "2" and n not in mains:
            ctx.add("207", _loc(s, 4), f"{where}: a topographic precision (n.2) needs its main location (n.1)")


def _check_modality(obxs: list[Segment], flow: int, required: bool, ctx: _Ctx) -> None:
    where = f"{FLOW_FILE[flow]}, Groupe OBSERVATION - Modalité d'imagerie"
    mods = [s for s in obxs if _obx_code(s) == "MODALITE_IMAGERIE"]
    if required and not mods:
        ctx.add("100", "OBX", f"{where}: an OBX MODALITE_IMAGERIE is required")
    if len(mods) > 1:
        ctx.add("207", _loc(mods[1], 3), f"{where}: MODALITE_IMAGERIE appears more than once (cardinality 1..1)")
    for s in mods:
        _value_type(s, "CE", where, ctx)
        ctx.required(s, 5, 1, where, "modality code")


def _check_flow1(obxs: list[Segment], ctx: _Ctx) -> None:
    ctx.rule = "tlr.observations"
    _check_modality(obxs, 1, True, ctx)
    _check_region(obxs, 1, True, ctx)


def _check_flow3(orc: Segment, obxs: list[Segment], ctx: _Ctx) -> None:
    where = "st_flux3.md, Groupe OBSERVATION - Protocole d'imagerie"
    ctx.rule = "tlr.observations"
    protos = [s for s in obxs if _obx_code(s) == "PROTOCOLE_IMAGERIE"]
    if _c(orc, 1, 1) == "OK" and not protos:
        ctx.add("100", "OBX", f"{where}: an accepted request (ORC-1 OK) requires an OBX PROTOCOLE_IMAGERIE")
    for s in protos:
        vt = _c(s, 2, 1)
        if vt == "FT":
            ctx.required(s, 5, None, where, "imaging protocol")
        elif vt == "ED":
            _check_ed(s, where, ctx)
        else:
            ctx.add("102" if vt else "101", _loc(s, 2), f"{where}: OBX-2 of PROTOCOLE_IMAGERIE must be FT or ED")


def _check_ed(s: Segment, where: str, ctx: _Ctx) -> None:
    code = _obx_code(s)
    if _c(s, 5, 2) != "TEXT":
        ctx.add("101" if not _c(s, 5, 2) else "103", _loc(s, 5, 2), f"{where}: OBX-5.2 of {code} must be TEXT")
    if _c(s, 5, 4) != "Base64":
        ctx.add("101" if not _c(s, 5, 4) else "103", _loc(s, 5, 4), f"{where}: OBX-5.4 of {code} must be Base64")
    data = _c(s, 5, 5)
    if not data:
        ctx.add("101", _loc(s, 5, 5), f"{where}: OBX-5.5 (data) of {code} is required")
        return
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        ctx.add("102", _loc(s, 5, 5), f"{where}: OBX-5.5 of {code} is not valid Base64")


def _check_flow4_order(group: list[Segment], ctx: _Ctx) -> None:
    orc = group[0]
    obxs = [s for s in group if s.name == "OBX"]
    tq1s = [s for s in group if s.name == "TQ1"]
    where = "st_flux4.md, Segment TQ1"
    ctx.rule = "tlr.flow4.segments"
    if not tq1s:
        ctx.add("100", f"ORC^{orc.occurrence}", f"{where}: a TQ1 segment is required in each ORDER group")
    for t in tq1s[:1]:
        ctx.required(t, 6, None, where, "service duration: image retention in days")
        ctx.required(t, 7, None, where, "start date/time of the imaging exam")
    ipcs = [s for s in group if s.name == "IPC"]
    where = "st_flux4.md, Segment IPC"
    if not ipcs:
        ctx.add("100", f"ORC^{orc.occurrence}", f"{where}: an IPC segment is required in each ORDER group")
    for ipc in ipcs:
        ctx.required(ipc, 1, 1, where, "accession number")
        ctx.required(ipc, 1, 3, where, "accession number assigning authority")
        ctx.fixed(ipc, 1, 4, "ISO", where, "universal id type")
        ctx.required(ipc, 2, 1, where, "requested procedure id")
        ctx.required(ipc, 2, 3, where, "requested procedure code system OID")
        ctx.fixed(ipc, 2, 4, "ISO", where, "universal id type")
        ctx.required(ipc, 3, 1, where, "Study Instance UID")
        ctx.required(ipc, 4, 1, where, "scheduled procedure step id")
        ctx.required(ipc, 4, 3, where, "scheduled procedure step code system OID")
        ctx.fixed(ipc, 4, 4, "ISO", where, "universal id type")
    where = "st_flux4.md, Groupe OBSERVATION - URL de viewer DRIMbox"
    ctx.rule = "tlr.observations"
    urls = [s for s in obxs if _obx_code(s) == "URL_PARTIELLE_VIEWER"]
    if not urls:
        ctx.add("100", f"ORC^{orc.occurrence}", f"{where}: an OBX URL_PARTIELLE_VIEWER is required in each ORDER group")
    elif len(urls) > 1:
        ctx.add("207", _loc(urls[1], 3), f"{where}: URL_PARTIELLE_VIEWER appears more than once in an ORDER group")
    for s in urls:
        if _value_type(s, "ED", where, ctx):
            _check_ed(s, where, ctx)
    where = "st_flux4.md, Groupe OBSERVATION - Acte d'imagerie"
    acts = [s for s in obxs if _obx_code(s) == "CODE_ACTE_IMAGERIE"]
    if not acts:
        ctx.add("100", f"ORC^{orc.occurrence}", f"{where}: an OBX CODE_ACTE_IMAGERIE is required in each ORDER group")
    elif len(acts) > 1:
        ctx.add("207", _loc(acts[1], 3), f"{where}: CODE_ACTE_IMAGERIE appears more than once in an ORDER group")
    for s in acts:
        _value_type(s, "CE", where, ctx)
        ctx.required(s, 5, 1, where, "imaging act code")
        if _c(s, 5, 3) != "LN":
            ctx.add("101" if not _c(s, 5, 3) else "103", _loc(s, 5, 3), f"{where}: OBX-5.3 of CODE_ACTE_IMAGERIE must be LN")
    _check_modality(obxs, 4, False, ctx)
    _check_region(obxs, 4, False, ctx)
    # Produit administré: type (n.1) and lot number (n.2) go together
    where = "st_flux4.md, Groupes OBSERVATION - Produit administré"
    prods = _subs(obxs, "PRODUIT_ADMINISTRE")
    by_n: dict[str, set[str]] = {}
    for n, m, s in prods:
        by_n.setdefault(n, set()).add(m)
        if m == "1":
            if _c(s, 5, 1) not in ("V09", "V10"):
                ctx.add("103", _loc(s, 5, 1), f"{where}: OBX-5.1 of the product type (n.1) must be ATC level 2 V09 or V10")
            if _c(s, 5, 3) != "ATC":
                ctx.add("103", _loc(s, 5, 3), f"{where}: OBX-5.3 of the product type (n.1) must be ATC")
        if m not in ("1", "2", "3"):
            ctx.add("103", _loc(s, 4), f"{where}: OBX-4 of PRODUIT_ADMINISTRE must be n.1 (type), n.2 (lot) or n.3 (quantity)")
    for n, ms in by_n.items():
        if ("1" in ms) != ("2" in ms):
            first = next(s for nn, _, s in prods if nn == n)
            ctx.add("207", _loc(first, 4), f"{where}: product type (n.1) and lot number (n.2) must be given together")


def flow_of(message_code: str, trigger: str, order_control: str) -> int | None:
    """Teleradiology flow number from MSH-9 and ORC-1 (st_worklfow.md), or None."""
    if (message_code, trigger) not in STRUCTURES:
        return None
    return ORC1_FLOW.get((message_code, order_control))


def check_tlr(raw: bytes, codec: str = "utf-8") -> TlrCheck:
    """Check one message against the teleradiology guide; see the module docstring."""
    text = raw.decode(codec, "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    try:
        segs = Message(text, codec).segments
    except HL7Error:
        return TlrCheck(None, [Problem("100", "MSH^1", "st-contraintes.md: the message must start with MSH",
                                       "tlr.message-type")])
    msh = segs[0]
    ctx = _Ctx()
    code, trig = _c(msh, 9, 1), _c(msh, 9, 2)
    mt = f"{code}^{trig}"
    orcs = [s for s in segs if s.name == "ORC"]
    oc = _c(orcs[0], 1, 1) if orcs else ""
    result = TlrCheck(None, ctx.problems, mt, oc)
    if (code, trig) not in STRUCTURES:
        known = {c for c, _ in STRUCTURES}
        ctx.add("201" if code in known else "200", "MSH^1^9",
                f"st_worklfow.md: {_code(mt)} is not a teleradiology message (ORM^O01, ORU^R01, OMI^O23)")
        return result
    _check_msh(msh, ctx)
    where = f"st-profils.md / st_worklfow.md ({mt})"
    ctx.rule = "tlr.order-control"
    if not orcs:
        ctx.add("100", "ORC", f"{where}: segment ORC is required")
        return result
    flow = flow_of(code, trig, oc)
    if flow is None:
        allowed = {"ORM": "NW (flow 1) or CA (flow 2)", "ORU": "OK or OC (flow 3)", "OMI": "SR (flow 4)"}[code]
        ctx.add("103" if oc else "101", "ORC^1^1",
                f"st_worklfow.md, Evènements déclenchants: ORC-1 of {mt} must be {allowed}, got {_code(oc) if oc else 'nothing'}")
        return result
    result.flow = flow
    _check_patient(segs, flow, ctx)
    # st-profils.md: the ORDER group repeats (flow 4: one group per imaging exam); each is checked
    for group in _orders(segs):
        orc = group[0]
        _check_orc(orc, flow, ctx)
        obr = next((s for s in group if s.name == "OBR"), None)
        if obr is None:
            ctx.add("100", f"ORC^{orc.occurrence}",
                    f"st-profils.md flux {flow}: an OBR segment is required after each ORC", "tlr.obr")
        else:
            _check_obr(obr, orc, flow, ctx)
        obxs = [s for s in group if s.name == "OBX"]
        if flow == 1:
            _check_flow1(obxs, ctx)
        elif flow == 3:
            _check_flow3(orc, obxs, ctx)
        elif flow == 4:
            _check_flow4_order(group, ctx)
        # OBX-11 fixed values and the OBX-4 sub-id rule, per ORDER group (flow 4 repeats the group,
        # one per exam, each with its own URL_PARTIELLE_VIEWER and CODE_ACTE_IMAGERIE)
        _check_obx_common(obxs, flow, ctx)
    return result
