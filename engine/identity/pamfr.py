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
from operator import itemgetter
from typing import Callable

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
    _new_frozen,
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

_ZFA_READ = itemgetter(1, 2, 3, 9, 10, 11, 12)  # the ZFA fields of DmpConsent
_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,4}))?([+-]\d{4})?$")


class _Reader:
    """The separators of one message and its leaf readers. Each field or repetition read is split
    once, its leaves taken by index; a leaf is unescaped (HL7 v2.5 §2.7) and stripped, the value
    ``Message.text(raw, n).strip()`` would give, without that method's splits and calls per read
    (about 40 leaves per ADT, read in the store writer's thread)."""

    __slots__ = ("cs", "ss", "rs", "esc", "unescaped")

    def __init__(self, m: Message):
        d = m.delims
        self.cs, self.ss, self.rs, self.esc = d.component, d.subcomponent, d.repetition, d.escape_char
        charset = m.charset

        def unescaped(v: str) -> str:
            return d.unescape(v, charset).strip()

        self.unescaped = unescaped

    def leaf(self, text: str) -> Callable[[str], str]:
        """The leaf reader for values taken from ``text``: a plain strip when ``text`` holds no
        escape character (the usual segment), so most leaves cost one C call."""
        return self.unescaped if self.esc in text else str.strip


def _parts(raw: str, sep: str, n: int) -> list[str]:
    """At least ``n`` items: the first ``n`` parts of ``raw`` split on ``sep``, ``""`` for those not
    sent (a longer list ends with the unsplit rest, never read)."""
    p = raw.split(sep, n)
    if len(p) < n:
        p += [""] * (n - len(p))
    return p


def _fields(seg: Segment, n: int) -> list[str]:
    """Fields 0 to ``n`` - 1 of ``seg`` at least, ``""`` for those not sent (as ``Segment.field``)."""
    f = seg.fields()
    return f if len(f) >= n else f + [""] * (n - len(f))


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


def _cx(r: _Reader, leaf: Callable[[str], str], rep: str, index: int) -> tuple[Identifier, str]:
    """One CX repetition, and its CX-4.2 (HD universal id) whatever HD-3 says."""
    c = _parts(rep, r.cs, 7)
    hd = _parts(c[3], r.ss, 3)
    universal = leaf(hd[1])
    hd_type = leaf(hd[2])
    upper = hd_type.upper()
    return _new_frozen(Identifier, {
        "value": leaf(c[0]),
        "authority_name": leaf(hd[0]),
        "authority_oid": universal if upper == "ISO" else "",
        "id_type": leaf(c[4]),
        # PAM FR: HD-3 "M" = FINESS of the legal entity, "N" = FINESS of the site.
        "finess": universal if upper in ("M", "N") else "",
        "authority_type": hd_type,
        "effective_date": leaf(c[6]),
        "rep": index,
    }), universal


def _traits(r: _Reader, leaf: Callable[[str], str], pid: list[str]) -> StrictTraits:
    cs = r.cs
    birth_name = first_given = used_name = used_given = ""
    given: tuple[str, ...] = ()
    name_rep = None
    # An empty field splits into one empty repetition, which matches nothing below.
    for i, rep in enumerate(pid[5].split(r.rs), start=1):
        c = _parts(rep, cs, 7)
        xpn7 = leaf(c[6])
        # PAM FR 2.11 / INS: XPN-7 "L" = birth name (nom de naissance); XPN-2 first birth given
        # name; XPN-3 = the list of birth given names, space separated (IHE PAM France 2.11, PID-5).
        if xpn7 == "L" and name_rep is None:
            name_rep = i
            birth_name = leaf(c[0].split(r.ss, 1)[0])
            first_given = leaf(c[1])
            given = tuple(filter(None, leaf(c[2]).split(" ")))
        elif xpn7 == "D" and not used_name:
            # XPN-7 "D" = used name (nom utilisé), with the used given name in XPN-2.
            used_name = leaf(c[0].split(r.ss, 1)[0])
            used_given = leaf(c[1])
    raw_birth = leaf(pid[7].split(cs, 1)[0])
    cog, bp_rep = "", None
    for i, rep in enumerate(pid[11].split(r.rs), start=1):
        # PAM FR: birth place = the PID-11 repetition with XAD-7 "BDL", XAD-9 = INSEE COG code.
        c = _parts(rep, cs, 9)
        if leaf(c[6]) == "BDL":
            cog, bp_rep = leaf(c[8]), i
            break
    return _new_frozen(StrictTraits, {
        "birth_name": birth_name,
        "first_given_name": first_given,
        "given_names": given,
        "used_name": used_name,
        "used_given_name": used_given,
        "birth_date": parse_date8(raw_birth) if len(raw_birth) >= 8 else None,
        "birth_date_raw": raw_birth,
        "sex": leaf(pid[8].split(cs, 1)[0]),
        "birth_place_cog": cog,
        "name_rep": name_rep,
        "birth_place_rep": bp_rep,
    })


def _status(r: _Reader, leaf: Callable[[str], str], pid32: str) -> IdentityStatus:
    cs = r.cs
    raw = tuple(filter(None, [leaf(rep.split(cs, 1)[0]) for rep in pid32.split(r.rs)]))  # empty ones out
    upper = list(map(str.upper, raw))
    for code in RNIV_STATUSES:  # an RNIV status wins over any other code sent with it
        if code in upper:
            break
    else:
        code = next((c for c in upper if c not in STATUS_ATTRIBUTES), "")
    return _new_frozen(IdentityStatus, {
        "code": code, "attributes": STATUS_ATTRIBUTES.intersection(upper), "raw": raw,
    })


def _firsts(cs: str, leaf: Callable[[str], str], values: tuple[str, ...]) -> list[str]:
    """Component 1 of each of the raw fields ``values`` (most hold no component separator: no split)."""
    return [leaf(v.split(cs, 1)[0] if cs in v else v) for v in values]


def _consent(r: _Reader, m: Message) -> DmpConsent | None:
    zfa = m.segment("ZFA")
    if zfa is None:
        return None
    status, status_date, closing, feeding, feeding_date, consult, consult_date = \
        _firsts(r.cs, r.leaf(zfa.raw), _ZFA_READ(_fields(zfa, 13)))
    return _new_frozen(DmpConsent, {
        "dmp_status": status, "dmp_status_date": status_date, "dmp_closing_date": closing,
        "feeding_opposition": feeding, "feeding_opposition_date": feeding_date,
        "consultation_consent": consult, "consultation_consent_date": consult_date,
    })


def _zfd(r: _Reader, m: Message) -> ObtainedVia | None:
    zfd = m.segment("ZFD")
    if zfd is None:
        return None
    f, leaf = _fields(zfd, 9), r.leaf(zfd.raw)
    sms, corrected, mode, insi_raw, doc_type, doc_expiry = _firsts(r.cs, leaf, f[3:9])
    # ZFD-1 "date lunaire": kept raw; it may be sent as one date (YYYYMMDD) or as components
    # (day^month^year) [UNVERIFIED against the PAM FR PDF]; see ins.birth_date_has_zero_part.
    lunar_raw = leaf(f[1])
    return _new_frozen(ObtainedVia, {
        "mode": mode,
        "insi_query_date": parse_date8(insi_raw),
        "insi_query_date_raw": insi_raw,
        "lunar_birth_date": lunar_raw if lunar_raw.strip(r.cs) else "",
        "sms_consent": sms,
        "corrected_birth_date": corrected,
        "id_document_type": doc_type,
        "id_document_expiry": doc_expiry,
    })


def _mrg_identifier(r: _Reader, m: Message, trigger: str) -> Identifier:
    mrg = m.segment("MRG")
    if mrg is None:
        raise IdentityError("100", "MRG", "MRG-REQUIRED", f"{trigger} requires an MRG segment")
    leaf = r.leaf(mrg.raw)
    ids = [_cx(r, leaf, rep, i)[0] for i, rep in enumerate(mrg.repetitions(1), start=1)]
    ids = [i for i in ids if i.value]
    if not ids:
        raise IdentityError("101", "MRG-1", "MRG-IDENTIFIER", "MRG-1 has no identifier")
    return next((i for i in ids if i.id_type == "PI"), ids[0])


def _kind(msg_type: str, trigger: str) -> str:
    """The event family of a trigger (see the module docstring)."""
    if msg_type != "ADT":
        return "passthrough"
    if trigger in UPSERT_TRIGGERS:
        return "upsert"
    if trigger in DELETE_TRIGGERS:
        return "delete"
    if trigger in MERGE_TRIGGERS:
        return "merge"
    if trigger in CHANGE_ID_TRIGGERS:
        return "change_id"
    return "passthrough"


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
    r = _Reader(m)
    cs = r.cs
    msh_seg = m.segment("MSH")
    msh = _fields(msh_seg, 11) if msh_seg is not None else [""] * 11
    msh_leaf = r.leaf(msh[7] + msh[9] + msh[10])  # not MSH-2, which holds the escape character
    msh9 = _parts(msh[9], cs, 2)
    msg_type = msh_leaf(msh9[0])
    trigger = msh_leaf(msh9[1])
    control_id = msh_leaf(msh[10].split(cs, 1)[0])
    evn = m.segment("EVN")
    # Event ordering time: EVN-2 (recorded date/time), else MSH-7 (HL7 v2.5 chapter 3, segment EVN).
    ts_raw = r.unescaped(evn.field(2).split(cs, 1)[0]) if evn is not None else ""
    ts_raw = ts_raw or msh_leaf(msh[7].split(cs, 1)[0])
    event_time = parse_ts(ts_raw)

    kind = _kind(msg_type, trigger)
    if kind == "passthrough":
        return IdentityEvent(kind=kind, trigger=trigger, message_type=msg_type, control_id=control_id,
                             event_time=event_time, event_time_raw=ts_raw)
    pid_seg = m.segment("PID")
    if pid_seg is None:
        raise IdentityError("100", "PID", "PID-REQUIRED", f"ADT^{trigger} has no PID segment")
    pid = _fields(pid_seg, 33)
    leaf = r.leaf(pid_seg.raw)
    identifiers: list[Identifier] = []
    ipp = ins = None
    ins_count = 0
    for i, rep in enumerate(pid_seg.delims.repetitions(pid[3]), start=1):
        cx, universal = _cx(r, leaf, rep, i)
        identifiers.append(cx)
        # PAM FR: the IPP is the (first) PID-3 repetition with CX-5 = PI.
        if ipp is None and cx.id_type == "PI" and cx.value:
            ipp = cx
        # PAM FR / CI-SIS: the INS matricule is the PID-3 repetition with CX-5 = INS; its OID is
        # CX-4.2 (HD universal id), whatever HD-3 says.
        if cx.id_type == "INS" and cx.value:
            ins_count += 1
            if ins is None:
                ins = _new_frozen(InsInfo, {
                    "value": cx.value, "oid": universal, "kind": INS_KIND_BY_OID.get(universal, "UNKNOWN"),
                    "effective_date": cx.effective_date, "rep": i,
                })
    if ipp is None:
        raise IdentityError("101", "PID-3", "IPP-REQUIRED", "PID-3 has no identifier of type PI")

    merge_from = old_ipp = None
    if kind == "merge":
        merge_from = _mrg_identifier(r, m, trigger)
    elif kind == "change_id":
        old_ipp = _mrg_identifier(r, m, trigger)

    return _new_frozen(IdentityEvent, {
        "trigger": trigger,
        "kind": kind,
        "message_type": msg_type,
        "event_time": event_time,
        "event_time_raw": ts_raw,
        "control_id": control_id,
        "ipp": ipp,
        "identifiers": tuple(identifiers),
        "ins": ins,
        "ins_count": ins_count,
        "traits": _traits(r, leaf, pid),
        "status": _status(r, leaf, pid[32]),
        "consent": _consent(r, m),
        "zfd": _zfd(r, m),
        "merge_from": merge_from,
        "old_ipp": old_ipp,
    })
