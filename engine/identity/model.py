"""Pure data models of an IHE PAM France identity event (no I/O, no database).

Field sources (PAM FR = IHE PAM National Extension France 2.11, segment PID and the ZBE/ZFA/ZFD
segments; examples in the ANS "Jeux de données HL7 v2" published with it):

* PID-3 CX repetitions: IPP (CX-5 ``PI``, CX-4 = namespace & FINESS & ``M``/``N``) and the
  INS matricule (CX-5 ``INS``, CX-4 = ``ASIP-SANTE-INS-NIR&<OID>&ISO``, CX-7 effective date).
* PID-5 XPN-7 ``L`` = birth name (XPN-1), first birth given name (XPN-2), space-separated list of
  birth given names (XPN-3); XPN-7 ``D`` = used name.
* PID-7 birth date, PID-8 sex, PID-11 XAD-7 ``BDL`` / XAD-9 = INSEE COG code of the birth place.
* PID-32 identity reliability code (PROV/RECUP/VALI/QUAL, attributes DOUT/FICT, legacy table 0445).
* ZFA-1..3 DMP status, ZFA-9/10 information and opposition to feeding the DMP, ZFA-11/12 consent
  to consulting the DMP (ANS "Jeux de données", DMP consent examples in PAM France).
* ZFD-1 lunar birth date, ZFD-3 SMS consent, ZFD-4 corrected birth date flag, ZFD-5 how the
  identity was obtained, ZFD-6 INSi query date, ZFD-7/8 identity document type and expiry.

These objects hold patient data: they may be stored in the identity registry only (PHI rule of
``docs/architecture.md``), never logged. Their ``__repr__`` is therefore masked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

# OIDs of the INS matricule assigning authority (Interop'Santé FR Core, FRCorePatientINSProfile).
OID_INS_NIR = "1.2.250.1.213.1.4.8"
OID_INS_NIA = "1.2.250.1.213.1.4.9"
OID_INS_NIR_TEST = "1.2.250.1.213.1.4.10"
OID_INS_NIR_DEMO = "1.2.250.1.213.1.4.11"

INS_KIND_BY_OID: dict[str, str] = {
    OID_INS_NIR: "NIR",
    OID_INS_NIA: "NIA",
    OID_INS_NIR_TEST: "NIR_TEST",
    OID_INS_NIR_DEMO: "NIR_DEMO",
}

InsKind = Literal["NIR", "NIA", "NIR_TEST", "NIR_DEMO", "UNKNOWN"]
EventKind = Literal["upsert", "delete", "merge", "change_id", "passthrough"]
Severity = Literal["E", "W"]


_object_new, _object_setattr = object.__new__, object.__setattr__


def _new_frozen(cls, values: dict):
    """An instance of the frozen dataclass ``cls`` holding ``values``, without its ``__init__``.

    For the ADT reader, which builds eight of these per ADT in the store writer's thread: the
    generated ``__init__`` of a frozen dataclass sets each field through ``object.__setattr__``
    (about 2 µs for the 16 fields of :class:`IdentityEvent`, against 0.4 µs here). The caller
    passes every field, in declaration order (the tests compare the reader's objects with
    ``dataclasses.fields`` and with the same values through ``__init__``). The instance is as
    immutable, equal, hashable and masked as one built by ``__init__``: only construction differs."""
    obj = _object_new(cls)
    _object_setattr(obj, "__dict__", values)
    return obj


def _masked(cls):
    """Replace the dataclass repr: these objects carry patient data (PHI rule)."""

    def __repr__(self) -> str:  # noqa: N807
        return f"<{cls.__name__} (patient data masked)>"

    cls.__repr__ = __repr__
    return cls


@_masked
@dataclass(frozen=True)
class Identifier:
    """One PID-3 / MRG-1 CX repetition."""

    value: str
    authority_name: str = ""  # CX-4.1 (HD namespace id), e.g. CHU-X
    authority_oid: str = ""  # CX-4.2 when CX-4.3 is ISO
    id_type: str = ""  # CX-5: PI, INS, AN, ...
    finess: str = ""  # CX-4.2 when CX-4.3 is M (legal entity) or N (site), PAM FR
    authority_type: str = ""  # CX-4.3 (ISO, M, N)
    effective_date: str = ""  # CX-7 raw
    rep: int = 1  # 1-based repetition index in the source field

    @property
    def authority(self) -> str:
        """The key of the assigning authority used by the registry: namespace, else OID/FINESS."""
        return self.authority_name or self.authority_oid or self.finess


@_masked
@dataclass(frozen=True)
class InsInfo:
    value: str
    oid: str
    kind: InsKind
    effective_date: str = ""
    rep: int = 2  # repetition of PID-3 holding it, for error locations


@_masked
@dataclass(frozen=True)
class StrictTraits:
    birth_name: str = ""
    first_given_name: str = ""
    given_names: tuple[str, ...] = ()
    used_name: str = ""
    used_given_name: str = ""
    birth_date: date | None = None
    birth_date_raw: str = ""
    sex: str = ""
    birth_place_cog: str = ""
    name_rep: int | None = None  # repetition of PID-5 with XPN-7 = L
    birth_place_rep: int | None = None  # repetition of PID-11 with XAD-7 = BDL


@_masked
@dataclass(frozen=True)
class IdentityStatus:
    code: str = ""  # PROV / RECUP / VALI / QUAL, or a legacy table 0445 code
    attributes: frozenset[str] = frozenset()  # DOUT, FICT
    raw: tuple[str, ...] = ()  # every PID-32 repetition as sent


@_masked
@dataclass(frozen=True)
class DmpConsent:
    """ZFA segment (PAM FR 2.11). Values per the ANS DMP consent example messages:

    * ZFA-9 feeding the DMP: ``INO`` informed, no opposition; ``IO`` informed, opposes;
      ``NA`` information not collected. ZFA-10 its date.
    * ZFA-11 consulting the DMP: ``IC`` informed, consents; ``INC`` informed, does not consent;
      ``NA`` not collected. ZFA-12 its date.
    """

    dmp_status: str = ""  # ZFA-1 (ACTIF, ...)
    dmp_status_date: str = ""  # ZFA-2
    dmp_closing_date: str = ""  # ZFA-3
    feeding_opposition: str = ""  # ZFA-9
    feeding_opposition_date: str = ""  # ZFA-10
    consultation_consent: str = ""  # ZFA-11
    consultation_consent_date: str = ""  # ZFA-12

    @property
    def feeding_opposed(self) -> bool | None:
        return {"INO": False, "IO": True}.get(self.feeding_opposition)

    @property
    def consultation_consented(self) -> bool | None:
        return {"IC": True, "INC": False}.get(self.consultation_consent)

    def to_json(self) -> dict:
        return {
            "dmp_status": self.dmp_status,
            "dmp_status_date": self.dmp_status_date,
            "dmp_closing_date": self.dmp_closing_date,
            "feeding_opposition": self.feeding_opposition,
            "feeding_opposition_date": self.feeding_opposition_date,
            "feeding_opposed": self.feeding_opposed,
            "consultation_consent": self.consultation_consent,
            "consultation_consent_date": self.consultation_consent_date,
            "consultation_consented": self.consultation_consented,
        }


@_masked
@dataclass(frozen=True)
class ObtainedVia:
    """ZFD segment (PAM FR 2.11): how the identity was obtained and the INSi query date."""

    mode: str = ""  # ZFD-5: SM, CV, INSI, CB, RFID, ...
    insi_query_date: date | None = None  # ZFD-6
    insi_query_date_raw: str = ""
    lunar_birth_date: str = ""  # ZFD-1 raw (civil-status date that is not a calendar date)
    sms_consent: str = ""  # ZFD-3
    corrected_birth_date: str = ""  # ZFD-4 (Y/N)
    id_document_type: str = ""  # ZFD-7
    id_document_expiry: str = ""  # ZFD-8


@_masked
@dataclass(frozen=True)
class IdentityEvent:
    trigger: str
    kind: EventKind
    message_type: str = "ADT"
    event_time: datetime | None = None  # EVN-2, else MSH-7 (naive; UTC when an offset was sent)
    event_time_raw: str = ""
    control_id: str = ""  # MSH-10
    ipp: Identifier | None = None
    identifiers: tuple[Identifier, ...] = ()  # every PID-3 repetition
    ins: InsInfo | None = None
    ins_count: int = 0  # number of PID-3 repetitions with CX-5 = INS
    traits: StrictTraits = field(default_factory=StrictTraits)
    status: IdentityStatus = field(default_factory=IdentityStatus)
    consent: DmpConsent | None = None  # None when the message has no ZFA
    zfd: ObtainedVia | None = None  # None when the message has no ZFD
    merge_from: Identifier | None = None  # MRG-1 of A40 (the identity folded into PID-3's)
    old_ipp: Identifier | None = None  # MRG-1 of A47 (the identifier being replaced)


@dataclass(frozen=True)
class Violation:
    """A broken rule. ``text`` is technical wording only: never patient data."""

    field: str  # e.g. "PID-3[2].1"
    rule: str  # short rule id, e.g. "INS-NIR-KEY"
    text: str
    severity: Severity = "E"
    code: str = "207"  # HL7 table 0357 code for ERR-3
    blocks_ins: bool = True  # the INS is not taken when this rule is broken

    def to_json(self) -> dict:
        return {"field": self.field, "rule": self.rule, "text": self.text,
                "severity": self.severity, "code": self.code}


class IdentityError(Exception):
    """A structural problem: the ADT cannot be turned into an identity event.

    ``code`` is an HL7 v2.5 table 0357 code (100 segment sequence, 101 required field missing,
    102 data type error, 200/201 unsupported message/event). The text is technical only.
    """

    def __init__(self, code: str, field: str, rule: str, text: str):
        super().__init__(f"{code} {field} {rule}: {text}")
        self.code = code
        self.field = field
        self.rule = rule
        self.text = text
