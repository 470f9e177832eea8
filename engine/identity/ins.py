"""INS (Identité Nationale de Santé) rules: pure functions, no database, no logging.

Each rule cites its source. Short names used below:

* ``REF-INS`` = ANS "Référentiel INS" and "Guide d'implémentation de l'identité INS dans les
  logiciels" (the INS implementation guide; its rule numbers are quoted by the Ségur imaging
  requirements, "exigences" EXI SI xx).
* ``PAMFR`` = IHE PAM National Extension France 2.11 (and the ANS example messages published
  with it).
* ``FRCORE`` = Interop'Santé FHIR FR Core: INS OIDs (``FRCorePatientINSProfile.fsh``) and identity
  statuses (``fr-core-cs-identity-status``, ``fr-core-vs-identity-reliability-ins-status``).
* ``INSEE-NIR`` = the INSEE NIR structure (https://www.insee.fr/en/metadonnees/definition/c1409,
  http://xml.insee.fr/schema/nir.html): 1 sex digit, 2 year, 2 month, 5 birth place (department
  + commune, ``2A``/``2B`` for Corsica), 3 order number, 2-digit key.
* ``SEGUR-IMG`` = the Ségur du numérique vague 2 imaging requirements (identity feed and INS).
* ``CDA-SCH`` = the CI-SIS CDA schematron that requires the strict traits when an INS root is
  present (CI-SIS "Modèles de contenus CDA", structurationMinimale, recordTarget).

Texts of :class:`Violation` never contain patient data (PHI rule, ``docs/architecture.md``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .model import (
    INS_KIND_BY_OID,
    OID_INS_NIR_DEMO,
    OID_INS_NIR_TEST,
    IdentityEvent,
    InsInfo,
    Violation,
)
from .pamfr import parse_date8


@dataclass(frozen=True)
class InsPolicy:
    """Configuration of the INS rules.

    * ``environment``: ``"production"`` accepts only the NIR (.8) and NIA (.9) OIDs; ``"test"``
      accepts the four INS OIDs (.8, .9, .10 test NIR, .11 demo NIR).
    * ``allow_test_ins``: lets a production engine accept .10/.11 (e.g. qualification platform).
    * ``vali_counts_as_qualified`` (default True): PID-32 ``VALI`` with an INS is taken as
      qualified, because every ANS PAM FR 2.11 example sends an INS with ``VALI``
      (``corpus/ans-hl7v2/SGL``, ``Vague 2/Consentement_DMP_PAMFR``), while FR Core/RNIV reserve
      "qualified" to ``QUAL``. Set False for senders on PAM FR versions with ``QUAL``.
    * ``rule11_answer``: severity of REF-INS rule 11 (00 day/month): ``"warning"`` (AA, INS not
      taken) or ``"error"`` (AE, INS not taken).
    * ``unqualified_ins_answer`` (default ``"error"``): severity of an INS sent with an identity
      that is not qualified (PID-32 ``PROV``, ``RECUP``, ... or attribute ``DOUT``/``FICT``):
      REF-INS [EXI SI 08] (an INS is used only with a qualified identity) makes it a rule break,
      answered AE; ``"warning"`` answers AA with an ERR of severity W. The INS is not taken
      either way.
    """

    environment: Literal["test", "production"] = "production"
    allow_test_ins: bool = False
    vali_counts_as_qualified: bool = True
    rule11_answer: Literal["warning", "error"] = "warning"
    unqualified_ins_answer: Literal["warning", "error"] = "error"


@dataclass(frozen=True)
class InsDecision:
    """What to do with the INS of an event: ``ins`` to store (or None) and why."""

    ins: InsInfo | None
    violations: tuple[Violation, ...] = field(default_factory=tuple)
    reason: str = ""  # technical text, set when an INS was sent but is not taken


# --------------------------------------------------------------------------------------------
# NIR / NIA format
# --------------------------------------------------------------------------------------------

#: MSSanté patient mailboxes are ``<INS>@patient.mssante.fr`` (CI-SIS « Transmission de documents
#: CDA en HL7 v2 », meta-dmp-mss: the patient's mailbox is derived from the INS)
PATIENT_MAIL_DOMAIN = "@patient.mssante.fr"


def patient_mail_address(ins_value: str) -> str:
    """The patient's MSSanté mailbox for an INS (the caller decides whether it may be used)."""
    return f"{ins_value}{PATIENT_MAIL_DOMAIN}"


def nir_key(body13: str) -> int:
    """Key of a 13-character NIR body: 97 - (body mod 97).

    INSEE-NIR: the key is the complement to 97 of the 13-digit number modulo 97; for Corsica the
    department ``2A`` is replaced by ``19`` and ``2B`` by ``18`` for the computation only.
    """
    body = body13.upper()
    dept = body[5:7]
    if dept == "2A":
        body = body[:5] + "19" + body[7:]
    elif dept == "2B":
        body = body[:5] + "18" + body[7:]
    return 97 - (int(body) % 97)


# INSEE-NIR first digit: 1 man, 2 woman; 3/4 = foreign-born person being registered (man/woman),
# 7/8 = temporary numbers (man/woman). Source: INSEE NIR description and
# fr.wikipedia "Numéro de sécurité sociale en France" [UNVERIFIED against a primary ANS text].
_NIR_FIRST_DIGITS = frozenset("12")
_SPECIAL_FIRST_DIGITS = frozenset("3478")


def nir_format_problem(value: str) -> str | None:
    """None when ``value`` has the NIR/NIA shape (15 characters, valid key), else a reason.

    REF-INS / FRCORE: the INS matricule is the NIR or the NIA, 13 characters + 2-digit key.
    INSEE-NIR: characters 6-7 are digits or ``2A``/``2B`` (Corsica); all others are digits.
    """
    v = value.strip().upper()
    if len(v) != 15:
        return "the INS matricule must be 15 characters (13 + 2-digit key)"
    if not (v[:5].isdigit() and v[7:].isdigit() and (v[5:7].isdigit() or v[5:7] in ("2A", "2B"))):
        return "the INS matricule must be digits, with 2A/2B allowed only as department (Corsica)"
    if nir_key(v[:13]) != int(v[13:]):
        return "the INS matricule key does not match 97 - (number mod 97)"
    return None


def check_ins_format(ins: InsInfo) -> list[Violation]:
    """NIR format and key (INSEE-NIR), first digit by kind; NIA: same structure and key.

    The NIA (numéro d'identification d'attente, OID .9) is allotted while the RNIPP registration
    is pending; it has the same 13 + 2 structure and key algorithm as the NIR (INSEE-NIR;
    REF-INS "matricule INS = NIR ou NIA"), and its first digit may be 1/2/3/4/7/8.
    """
    loc = f"PID-3[{ins.rep}].1"
    problem = nir_format_problem(ins.value)
    if problem:
        return [Violation(loc, "INS-FORMAT", problem, "E", "102")]
    first = ins.value[0]
    if ins.kind == "NIA":
        if first not in _NIR_FIRST_DIGITS | _SPECIAL_FIRST_DIGITS:
            return [Violation(loc, "INS-FORMAT", "the NIA first digit must be 1, 2, 3, 4, 7 or 8",
                              "E", "102")]
        return []
    if first in _NIR_FIRST_DIGITS:
        return []
    if first in _SPECIAL_FIRST_DIGITS:
        # A temporary / in-registration number sent under a NIR OID: accepted with a warning.
        return [Violation(loc, "INS-NIR-FIRST-DIGIT",
                          "NIR first digit 3/4/7/8 denotes a temporary registration number",
                          "W", "102", blocks_ins=False)]
    return [Violation(loc, "INS-FORMAT", "the NIR first digit must be 1 or 2 (3, 4, 7, 8 special)",
                      "E", "102")]


def check_sex_coherence(event: IdentityEvent) -> list[Violation]:
    """INSEE-NIR: first digit 1/3/7 = male, 2/4/8 = female; warn when PID-8 disagrees."""
    ins, sex = event.ins, event.traits.sex
    if ins is None or not ins.value or sex not in ("M", "F"):
        return []
    expected = {"1": "M", "3": "M", "7": "M", "2": "F", "4": "F", "8": "F"}.get(ins.value[0])
    if expected and expected != sex:
        return [Violation("PID-8", "INS-SEX-COHERENCE",
                          "sex does not match the first digit of the INS matricule", "W", "207",
                          blocks_ins=False)]
    return []


# --------------------------------------------------------------------------------------------
# OID and environment
# --------------------------------------------------------------------------------------------

TEST_OIDS = frozenset({OID_INS_NIR_TEST, OID_INS_NIR_DEMO})


def check_oid(ins: InsInfo, policy: InsPolicy) -> list[Violation]:
    """FRCORE OIDs: .8 NIR, .9 NIA (production), .10 test NIR, .11 demo NIR.

    Référentiel INS (test and demonstration NIR OIDs are for test platforms only): a production
    engine refuses the test OID .10 (and the demo .11) unless ``allow_test_ins``; the test environment accepts all four.
    """
    loc = f"PID-3[{ins.rep}].4.2"
    if ins.oid not in INS_KIND_BY_OID:
        return [Violation(loc, "INS-OID", "the INS assigning authority OID is not an INS OID",
                          "E", "103")]
    if policy.environment == "production" and ins.oid in TEST_OIDS and not policy.allow_test_ins:
        return [Violation(loc, "INS-OID-ENVIRONMENT",
                          "test or demo INS OID refused by a production engine", "E", "103")]
    return []


# --------------------------------------------------------------------------------------------
# Identity status (PID-32)
# --------------------------------------------------------------------------------------------

def is_qualified(event: IdentityEvent, policy: InsPolicy) -> bool:
    """FRCORE / REF-INS [EXI SI 08]: only the "identité qualifiée" (QUAL) status allows the INS
    to reference health data. PAMFR 2.11 examples send VALI with an INS: accepted as qualified
    when ``policy.vali_counts_as_qualified``. Attributes DOUT (doubtful) and FICT (fictitious)
    (table 0445) make an identity never qualified.
    """
    st = event.status
    if st.attributes & {"DOUT", "FICT"}:
        return False
    if st.code == "QUAL":
        return True
    return st.code == "VALI" and event.ins is not None and policy.vali_counts_as_qualified


def check_status(event: IdentityEvent, policy: InsPolicy) -> list[Violation]:
    """Status rules for an event that carries an INS (FRCORE, REF-INS [EXI SI 08]). Severity
    per ``policy.unqualified_ins_answer`` (E by default, REF-INS [EXI SI 08]); the INS is never taken."""
    st = event.status
    if event.ins is None:
        if st.code == "QUAL":
            # FRCORE: QUAL = INS retrieved by INSi and identity checked: an INS is expected.
            return [Violation("PID-32", "INS-QUAL-WITHOUT-INS",
                              "qualified status without an INS in PID-3", "W", "207",
                              blocks_ins=False)]
        return []
    out: list[Violation] = []
    sev = "E" if policy.unqualified_ins_answer == "error" else "W"
    for attr in sorted(st.attributes & {"DOUT", "FICT"}):
        word = "doubtful" if attr == "DOUT" else "fictitious"
        out.append(Violation("PID-32", f"INS-STATUS-{attr}",
                             f"identity flagged {word} ({attr}): INS not usable", sev, "207"))
    if out:
        return out
    if not is_qualified(event, policy):
        code = st.code or "empty"
        out.append(Violation("PID-32", "INS-NOT-QUALIFIED",
                             f"identity status {code} is not qualified: INS not usable",
                             sev, "207"))
    return out


# --------------------------------------------------------------------------------------------
# Strict traits and birth date
# --------------------------------------------------------------------------------------------

def birth_date_has_zero_part(raw: str) -> bool:
    """True when a date has ``00`` as day or month (YYYYMMDD or day^month^year components)."""
    raw = (raw or "").strip()
    if "^" in raw:
        parts = raw.split("^")
        return any(p.strip() == "00" for p in parts[:2])
    if len(raw) >= 8 and raw[:8].isdigit():
        return raw[4:6] == "00" or raw[6:8] == "00"
    return False


def check_rule11(event: IdentityEvent, policy: InsPolicy) -> list[Violation]:
    """REF-INS rule 11 as quoted in SEGUR-IMG: "an INS whose birth date carries 00 as day or
    month must not be taken" (keep the identity without the INS, record why; answer with a
    warning or AE per configuration). Checked on PID-7 and on ZFD-1 (PAMFR "date lunaire",
    the civil-status date that is not a calendar date).
    """
    if event.ins is None:
        return []
    sev = "E" if policy.rule11_answer == "error" else "W"
    if birth_date_has_zero_part(event.traits.birth_date_raw):
        loc = "PID-7"
    elif event.zfd is not None and birth_date_has_zero_part(event.zfd.lunar_birth_date):
        loc = "ZFD-1"
    else:
        return []
    return [Violation(loc, "INS-RULE-11",
                      "birth date with 00 as day or month: INS not taken (INS guide rule 11)",
                      sev, "102")]


def check_birth_date(event: IdentityEvent, policy: InsPolicy) -> list[Violation]:
    """HL7 v2.5 PID-7 (TS) must be a real calendar date (HL7 v2.5 §2.A.74 TS/DTM; SEGUR-IMG: the
    birth date is a strict trait). A 00 day/month is reported by :func:`check_rule11` instead when an INS is present.
    """
    t = event.traits
    raw = t.birth_date_raw
    if not raw:
        return []  # absence is covered by check_strict_traits when an INS is present
    if event.ins is not None and birth_date_has_zero_part(raw):
        return []
    if parse_date8(raw) is None:
        return [Violation("PID-7", "BIRTH-DATE-INVALID",
                          "birth date is not a valid calendar date (YYYYMMDD)", "E", "102")]
    return []


def _is_cog(code: str) -> bool:
    """INSEE COG: 5 characters, department (2 digits or 2A/2B) + commune; 99xxx = country."""
    c = code.upper()
    return len(c) == 5 and (c.isdigit() or (c[:2] in ("2A", "2B") and c[2:].isdigit()))


def check_strict_traits(event: IdentityEvent) -> list[Violation]:
    """REF-INS: the INS goes with the strict traits (birth name, birth given names, first birth
    given name, birth date, sex, birth place INSEE code; for a person born abroad, the INSEE
    country code 99xxx). CDA-SCH requires the same when an INS root is present. Missing trait
    with an INS -> error, INS not taken (the TRANSCDA 905 "INS incomplete" situation).
    """
    if event.ins is None:
        return []
    t = event.traits
    name_loc = f"PID-5[{t.name_rep}]" if t.name_rep else "PID-5"
    bp_loc = f"PID-11[{t.birth_place_rep}].9" if t.birth_place_rep else "PID-11"
    out: list[Violation] = []

    def missing(loc: str, what: str) -> None:
        out.append(Violation(loc, "INS-STRICT-TRAITS",
                             f"{what} is required with an INS", "E", "101"))

    if not t.name_rep:
        missing("PID-5", "a birth name repetition (XPN-7 L)")
    else:
        if not t.birth_name:
            missing(f"{name_loc}.1", "the birth name")
        if not t.first_given_name:
            missing(f"{name_loc}.2", "the first birth given name")
        if not t.given_names:
            missing(f"{name_loc}.3", "the list of birth given names")
        elif t.first_given_name and t.given_names[0] != t.first_given_name.split(" ")[0]:
            out.append(Violation(f"{name_loc}.3", "INS-STRICT-TRAITS",
                                 "the given names list does not start with the first given name",
                                 "W", "207", blocks_ins=False))
    if not t.birth_date_raw:
        missing("PID-7", "the birth date")
    if t.sex not in ("M", "F"):
        # INSi returns M or F; U/empty cannot go with an INS.
        missing("PID-8", "the sex (M or F)")
    if not t.birth_place_cog:
        missing(bp_loc, "the birth place INSEE code (XAD-7 BDL, XAD-9)")
    elif not _is_cog(t.birth_place_cog):
        out.append(Violation(bp_loc, "INS-BIRTH-PLACE",
                             "birth place must be a 5-character INSEE COG code (99xxx abroad)",
                             "E", "102"))
    return out


# --------------------------------------------------------------------------------------------
# Whole-event check
# --------------------------------------------------------------------------------------------

def check_identity(event: IdentityEvent, policy: InsPolicy) -> list[Violation]:
    """All rules for one event, in field order. Passthrough events have no rules."""
    if event.kind == "passthrough" or event.ipp is None:
        return []
    out: list[Violation] = []
    if event.ins is not None:
        if event.ins_count > 1:
            out.append(Violation("PID-3", "INS-SINGLE", "more than one INS repetition in PID-3; "
                                 "the first is used", "W", "207", blocks_ins=False))
        out += check_ins_format(event.ins)
        out += check_oid(event.ins, policy)
    out += check_birth_date(event, policy)
    out += check_rule11(event, policy)
    out += check_sex_coherence(event)
    out += check_strict_traits(event)
    out += check_status(event, policy)
    return out


def ins_decision(event: IdentityEvent, policy: InsPolicy,
                 violations: list[Violation] | None = None) -> InsDecision:
    """The INS to store (or None) with the violations and the reason it was not taken."""
    vs = tuple(check_identity(event, policy) if violations is None else violations)
    if event.ins is None:
        return InsDecision(None, vs, "")
    blocking = [v for v in vs if v.blocks_ins]
    if blocking:
        reason = "; ".join(f"{v.field} {v.rule}" for v in blocking)
        return InsDecision(None, vs, f"INS not taken: {reason}")
    return InsDecision(event.ins, vs, "")


def usable_ins(event: IdentityEvent, policy: InsPolicy) -> InsInfo | None:
    """The INS to store for this event, or None (see :func:`ins_decision` for the reason)."""
    return ins_decision(event, policy).ins
