"""Parse an IHE PAM France 2.11 ADT into an :class:`IdentityEvent` (pure, no database).

Event families (IHE PAM France 2.11, trigger events of ITI-30 and ITI-31; Ségur imaging
requirement: "intégrer l'identité INS … en création, mise à jour et suppression, à partir d'un
flux IHE PAM"):

* ITI-30 identity feed: A28 create, A31 update -> ``upsert``; A29 (delete person) and A23
  (delete patient record) -> ``delete``; A40 merge (PID = surviving identity, MRG-1 = merged one)
  -> ``merge``; A47 change of identifier (PID-3 = new identifier, MRG-1 = old one) -> ``change_id``.
* ITI-31 movements carry the full PID, so they update the identity too -> ``upsert``.
* Anything else (A24/A37 links, A44/A45 account moves, non-ADT) -> ``passthrough``.

The message is read with :class:`engine.hl7.message.Message` (segments split on CR, LF or CRLF;
repetitions, components and sub-components with the separators of MSH-1/MSH-2); escapes are
decoded at the leaf by :func:`engine.hl7.escape.unescape` (HL7 v2.5 §2.7).
"""
from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

from engine.hl7.errors import HL7Error
from engine.hl7.message import Message, Segment

from .model import (
    INS_KIND_BY_OID,
    DmpConsent,
    Identifier,
    IdentityError,
    IdentityEvent,
    IdentityStatus,
    InsInfo,
    ObtainedVia,
    StrictTraits,
)

UPSERT_TRIGGERS = frozenset(
    {f"A{n:02d}" for n in range(1, 17)}  # A01..A16 movements (A09/A10 temporary leave)
    | {"A21", "A22", "A25", "A26", "A27", "A28", "A31", "A32", "A33", "A38",
       "A52", "A53", "A54", "A55", "Z99"}
)
DELETE_TRIGGERS = frozenset({"A29", "A23"})
MERGE_TRIGGERS = frozenset({"A40"})
CHANGE_ID_TRIGGERS = frozenset({"A47"})

# PID-32 statuses (RNIV 4 statuses, FR Core CodeSystem fr-core-cs-identity-status) and the
# attributes that can accompany them (table 0445, FR Core v2-0445): IHE PAM France 2.11, segment PID, PID-32.
RNIV_STATUSES = ("QUAL", "VALI", "RECUP", "PROV")
STATUS_ATTRIBUTES = frozenset({"DOUT", "FICT"})
LEGACY_0445 = frozenset({"VIDE", "DOUB", "DESA", "DPOT", "DOUA", "COLP", "COLV", "FILI", "CACH",
                         "ANOM", "IDVER", "RECD", "IDRA", "USUR", "HOMD", "HOMA", "INVA"})

_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?$")


class _Leaves:
    """Reads the leaves of one message: each repetition or field split once into components
    (a component's sub-components once too), each leaf unescaped (HL7 v2.5 §2.7) and stripped.
    ``at(parts, n)`` is the same value as ``Message.text(raw, n).strip()`` on the unsplit text,
    without its splits and calls per read (about 40 reads per ADT)."""

    __slots__ = ("cs", "ss", "esc", "delims", "charset")

    def __init__(self, m: Message):
        d = self.delims = m.delims
        self.cs, self.ss, self.esc, self.charset = d.component, d.subcomponent, d.escape_char, m.charset

    def comps(self, raw: str) -> list[str]:
        return raw.split(self.cs)

    def subs(self, parts: list[str], n: int) -> list[str]:
        """Sub-components of component ``n`` (1-based) of a split repetition."""
        return parts[n - 1].split(self.ss) if n <= len(parts) else [""]

    def at(self, parts: list[str], n: int) -> str:
        v = parts[n - 1] if n <= len(parts) else ""
        if self.esc in v:
            v = self.delims.unescape(v, self.charset)
        return v.strip()

    def first(self, raw: str) -> str:
        """Component 1 of a raw field or repetition."""
        i = raw.find(self.cs)
        v = raw if i < 0 else raw[:i]
        if self.esc in v:
            v = self.delims.unescape(v, self.charset)
        return v.strip()


def _field(seg: Segment | None, n: int) -> str:
    return seg.field(n) if seg is not None else ""


def parse_ts(raw: str) -> datetime | None:
    """HL7 v2.5 TS/DTM (YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]) to a naive datetime.

    With an offset the value is converted to UTC; without one it is kept as sent (sender local
    time). Returns None for an empty or unreadable value.
    """
    raw = raw.strip() if raw else ""
    if len(raw) == 14 and raw.isascii() and raw.isdigit():
        # YYYYMMDDHHMMSS, the usual form: read in one call (ISO 8601 basic format), with the
        # range checks of ``datetime()`` below
        try:
            return datetime.fromisoformat(f"{raw[:8]}T{raw[8:]}")
        except ValueError:
            return None
    m = _TS.match(raw) if raw else None
    if not m:
        return None
    y, mo, d, h, mi, s, frac, off = m.groups()
    try:
        dt = datetime(int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0), int(s or 0),
                      int((frac or "0").ljust(6, "0")[:6]))
        if off:
            sign = 1 if off[0] == "+" else -1
            # an offset of 24 hours or more (``-6111``) is unreadable: ``timezone`` refuses it
            delta = timedelta(hours=int(off[1:3]), minutes=int(off[3:5]))
            dt = (dt.replace(tzinfo=timezone(sign * delta))).astimezone(timezone.utc).replace(tzinfo=None)
    except (ValueError, OverflowError):
        return None
    return dt


def parse_date8(raw: str) -> date | None:
    """A complete calendar date from the first 8 digits (YYYYMMDD) of a DT/TS, else None."""
    raw = (raw or "").strip()
    if len(raw) < 8 or not raw[:8].isdigit():
        return None
    try:
        if raw[:8].isascii():  # the usual case, in one call (ISO 8601 basic format)
            return date.fromisoformat(raw[:8])
        return date(int(raw[:4]), int(raw[4:6]), int(raw[6:8]))  # other Unicode digits
    except ValueError:
        return None


def _cx(r: _Leaves, rep: str, index: int) -> Identifier:
    c = r.comps(rep)
    hd = r.subs(c, 4)
    hd_type = r.at(hd, 3)
    universal = r.at(hd, 2)
    upper = hd_type.upper()
    return Identifier(
        value=r.at(c, 1),
        authority_name=r.at(hd, 1),
        authority_oid=universal if upper == "ISO" else "",
        id_type=r.at(c, 5),
        # PAM FR: HD-3 "M" = FINESS of the legal entity, "N" = FINESS of the site.
        finess=universal if upper in ("M", "N") else "",
        authority_type=hd_type,
        effective_date=r.at(c, 7),
        rep=index,
    )


def _traits(r: _Leaves, pid: Segment) -> StrictTraits:
    birth_name = first_given = used_name = used_given = ""
    given: tuple[str, ...] = ()
    name_rep = None
    for i, rep in enumerate(pid.repetitions(5), start=1):
        c = r.comps(rep)
        xpn7 = r.at(c, 7)
        # PAM FR 2.11 / INS: XPN-7 "L" = birth name (nom de naissance); XPN-2 first birth given
        # name; XPN-3 = the list of birth given names, space separated (IHE PAM France 2.11, PID-5).
        if xpn7 == "L" and name_rep is None:
            name_rep = i
            birth_name = r.at(r.subs(c, 1), 1)
            first_given = r.at(c, 2)
            given = tuple(p for p in r.at(c, 3).split(" ") if p)
        elif xpn7 == "D" and not used_name:
            # XPN-7 "D" = used name (nom utilisé), with the used given name in XPN-2.
            used_name = r.at(r.subs(c, 1), 1)
            used_given = r.at(c, 2)
    raw_birth = r.first(pid.field(7))
    cog, bp_rep = "", None
    for i, rep in enumerate(pid.repetitions(11), start=1):
        # PAM FR: birth place = the PID-11 repetition with XAD-7 "BDL", XAD-9 = INSEE COG code.
        c = r.comps(rep)
        if r.at(c, 7) == "BDL":
            cog, bp_rep = r.at(c, 9), i
            break
    return StrictTraits(
        birth_name=birth_name,
        first_given_name=first_given,
        given_names=given,
        used_name=used_name,
        used_given_name=used_given,
        birth_date=parse_date8(raw_birth) if len(raw_birth) >= 8 else None,
        birth_date_raw=raw_birth,
        sex=r.first(pid.field(8)),
        birth_place_cog=cog,
        name_rep=name_rep,
        birth_place_rep=bp_rep,
    )


def _status(r: _Leaves, pid: Segment) -> IdentityStatus:
    raw = tuple(v for v in map(r.first, pid.repetitions(32)) if v)
    upper = [v.upper() for v in raw]
    code = next((c for c in RNIV_STATUSES if c in upper), "")
    if not code:
        code = next((c for c in upper if c not in STATUS_ATTRIBUTES), "")
    attrs = frozenset(c for c in upper if c in STATUS_ATTRIBUTES)
    return IdentityStatus(code=code, attributes=attrs, raw=raw)


def _firsts(r: _Leaves, seg: Segment, wanted: tuple[int, ...]) -> dict[int, str]:
    """Component 1 of the fields ``wanted`` of ``seg`` (``""`` for fields not sent)."""
    f = seg.fields()
    n = len(f)
    first = r.first
    return {i: first(f[i]) if i < n else "" for i in wanted}


def _consent(r: _Leaves, m: Message) -> DmpConsent | None:
    zfa = m.segment("ZFA")
    if zfa is None:
        return None
    f = _firsts(r, zfa, (1, 2, 3, 9, 10, 11, 12))
    return DmpConsent(
        dmp_status=f[1], dmp_status_date=f[2], dmp_closing_date=f[3],
        feeding_opposition=f[9], feeding_opposition_date=f[10],
        consultation_consent=f[11], consultation_consent_date=f[12],
    )


def _zfd(r: _Leaves, m: Message) -> ObtainedVia | None:
    zfd = m.segment("ZFD")
    if zfd is None:
        return None
    f = _firsts(r, zfd, (3, 4, 5, 6, 7, 8))
    # ZFD-1 "date lunaire": kept raw; it may be sent as one date (YYYYMMDD) or as components
    # (day^month^year) [UNVERIFIED against the PAM FR PDF]; see ins.birth_date_has_zero_part.
    lunar_raw = zfd.value(1).strip()
    insi_raw = f[6]
    return ObtainedVia(
        mode=f[5],
        insi_query_date=parse_date8(insi_raw),
        insi_query_date_raw=insi_raw,
        lunar_birth_date=lunar_raw if lunar_raw.strip(m.delims.component) else "",
        sms_consent=f[3],
        corrected_birth_date=f[4],
        id_document_type=f[7],
        id_document_expiry=f[8],
    )


def _mrg_identifier(r: _Leaves, m: Message, trigger: str) -> Identifier:
    mrg = m.segment("MRG")
    if mrg is None:
        raise IdentityError("100", "MRG", "MRG-REQUIRED", f"{trigger} requires an MRG segment")
    reps = mrg.repetitions(1)
    ids = [_cx(r, rep, i) for i, rep in enumerate(reps, start=1)]
    ids = [i for i in ids if i.value]
    if not ids:
        raise IdentityError("101", "MRG-1", "MRG-IDENTIFIER", "MRG-1 has no identifier")
    return next((i for i in ids if i.id_type == "PI"), ids[0])


def parse_adt(raw: bytes | str, codec: str = "utf-8") -> IdentityEvent:
    """Read one ADT. Raises :class:`IdentityError` for structural problems (no PID, no IPP) and for a
    NUL in any field (``102``, the field named)."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode(codec)
        except (UnicodeDecodeError, LookupError) as exc:
            raise IdentityError("102", "MSH-18", "CHARSET", f"message not decodable as {codec}") from exc
    else:
        text = raw
    try:
        m = Message(text, codec)
    except HL7Error:
        raise IdentityError("100", "MSH", "MSH-FIRST", "message does not start with MSH") from None
    where = m.nul_field()  # the registry's text columns cannot hold a NUL
    if where is not None:
        raise IdentityError("102", where, "NUL", f"{where} contains a NUL character")
    r = _Leaves(m)
    msh = m.segment("MSH")
    msh9 = r.comps(_field(msh, 9))
    msg_type = r.at(msh9, 1)
    trigger = r.at(msh9, 2)
    control_id = r.first(_field(msh, 10))
    evn = m.segment("EVN")
    # Event ordering time: EVN-2 (recorded date/time), else MSH-7 (HL7 v2.5 chapter 3, segment EVN).
    ts_raw = r.first(_field(evn, 2)) or r.first(_field(msh, 7))
    common = dict(trigger=trigger, message_type=msg_type, control_id=control_id,
                  event_time=parse_ts(ts_raw), event_time_raw=ts_raw)

    if msg_type != "ADT":
        return IdentityEvent(kind="passthrough", **common)
    if trigger in UPSERT_TRIGGERS:
        kind = "upsert"
    elif trigger in DELETE_TRIGGERS:
        kind = "delete"
    elif trigger in MERGE_TRIGGERS:
        kind = "merge"
    elif trigger in CHANGE_ID_TRIGGERS:
        kind = "change_id"
    else:
        return IdentityEvent(kind="passthrough", **common)

    pid = m.segment("PID")
    if pid is None:
        raise IdentityError("100", "PID", "PID-REQUIRED", f"ADT^{trigger} has no PID segment")
    pid3 = pid.repetitions(3)
    identifiers = tuple(_cx(r, rep, i) for i, rep in enumerate(pid3, start=1))
    # PAM FR: the IPP is the PID-3 repetition with CX-5 = PI.
    ipp = next((i for i in identifiers if i.id_type == "PI" and i.value), None)
    if ipp is None:
        raise IdentityError("101", "PID-3", "IPP-REQUIRED", "PID-3 has no identifier of type PI")
    # PAM FR / CI-SIS: the INS matricule is the PID-3 repetition with CX-5 = INS.
    ins_ids = [i for i in identifiers if i.id_type == "INS" and i.value]
    ins = None
    if ins_ids:
        first = ins_ids[0]
        # The OID is CX-4.2 (HD universal id), whatever HD-3 says.
        oid = r.at(r.subs(r.comps(pid3[first.rep - 1]), 4), 2)
        ins = InsInfo(value=first.value, oid=oid, kind=INS_KIND_BY_OID.get(oid, "UNKNOWN"),
                      effective_date=first.effective_date, rep=first.rep)

    merge_from = old_ipp = None
    if kind == "merge":
        merge_from = _mrg_identifier(r, m, trigger)
    elif kind == "change_id":
        old_ipp = _mrg_identifier(r, m, trigger)

    return IdentityEvent(
        kind=kind,
        ipp=ipp,
        identifiers=identifiers,
        ins=ins,
        ins_count=len(ins_ids),
        traits=_traits(r, pid),
        status=_status(r, pid),
        consent=_consent(r, m),
        zfd=_zfd(r, m),
        merge_from=merge_from,
        old_ipp=old_ipp,
        **common,
    )
