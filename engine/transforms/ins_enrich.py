"""``ins_enrich``: put the patient's qualified INS and strict traits into the PID of messages that
leave the engine (ORM, ORU, MDM, OMI), from the identity registry fed by IHE PAM France.

Parameters (all optional)::

    transforms:
      - {type: ins_enrich, require_ins: true, strip_unqualified: true, check_traits: true,
         ipp_authority: null}

What it does, on the first PID segment only (every other segment, and every byte outside PID, is
left exactly as received):

1. **Find the patient.** The PID-3 repetition with CX-5 ``PI`` (the IPP) is looked up in the
   registry under its assigning authority (CX-4.1, else the CX-4.2 OID/FINESS, the key the feed
   stores, :attr:`engine.identity.model.Identifier.authority`). ``ipp_authority`` names the
   authority to use: PI repetitions of another authority are skipped, a PI repetition without
   CX-4 is looked up under it. Failing that (no PI repetition, or an IPP the registry does not
   know), the patient is looked up by the INS of PID-3 (CX-5 ``INS``). Lookups follow merges
   (A40): an old IPP resolves to the surviving identity. A deactivated identity (A29/A23) counts
   as unknown.
2. **Qualified identity** (the registry holds an INS, which the feed only stores for a qualified
   identity with complete strict traits, and PID-32 status ``QUAL``/``VALI`` without ``DOUT`` or
   ``FICT``, see :func:`engine.identity.ins.is_qualified`):

   * an INS repetition already in PID-3 must equal the registry's (value and OID, CX-4.2), else
     ``904``; when there is none, ``<INS>^^^<name>&<OID>&ISO^INS`` is appended to PID-3. The CX-4.1
     name per OID follows the ANS examples and the CI-SIS guide: ``ASIP-SANTE-INS-NIR`` for the
     NIR (.8) and the test NIR (.10, as in every ANS HL7 v2 example message, e.g. the PAM France
     admission and the CI-SIS « Transmission de documents CDA en HL7 v2 » MDM),
     ``ASIP-SANTE-INS-NIA`` for the NIA (.9, "INS-NIA", that guide's profils-messages),
     ``ASIP-SANTE-INS-NIR`` for the demo NIR (.11) [UNVERIFIED: no ANS example uses .11];
   * the strict traits are written from the registry (IHE PAM France 2.11, segment PID):
     PID-5 birth-name repetition (XPN-7 ``L``: XPN-1 birth name, XPN-2 first birth given name,
     XPN-3 the space-separated birth given names; the ``L`` repetition, or failing it the first
     repetition without XPN-7, is fixed and moved first; every other repetition, e.g. the ``D``
     used name, is kept as sent), PID-7 birth date
     (``YYYYMMDD``; a value with a time whose date part is right is kept), PID-8 sex, PID-11
     birth-place repetition (XAD-7 ``BDL``, XAD-9 INSEE COG code; added when absent), PID-32
     identity status (the registry's PID-32 repetitions). Only the components named are changed;
     a value already right is not rewritten.
   * ``check_traits`` (default true): the registry identity must carry every strict trait (birth
     name, first birth given name, given names list, birth date, sex M/F, birth place COG), else
     ``905``.
3. **No qualified INS** (unknown patient, or an identity whose INS the feed did not take):
   ``require_ins`` (default true) → ``903``; otherwise the message goes on, and with
   ``strip_unqualified`` (default true) every INS repetition is removed from PID-3 (the INS may
   only travel with a qualified identity: REF-INS [EXI SI 08]).

Errors: :class:`TransformError` whose message starts with the CI-SIS "Transmission de documents
CDA en HL7 v2" application error code (its error codes, table *applicationErrorCondition*):
``903`` "INS non présent", ``904`` "L'INS transmis ne correspond pas exactement à celui stocké",
``905`` "L'INS transmis n'est pas complet". Texts name fields and rules only, never patient data
(PHI rule, ``docs/architecture.md``); the delivery worker parks the queue entry in error with that
text.

Lookup: ``ctx.extras["identity_lookup"](ipp, authority=None, *, ins=None) -> dict | None`` (the
registry's ``IdentityView.to_json()``), provided by :mod:`engine.delivery`; it runs in the
delivery thread. Other message types pass unchanged (same bytes), with a note.
"""
from __future__ import annotations

import re
from pydantic import BaseModel, ConfigDict

from engine.hl7.message import Message
from engine.identity.model import OID_INS_NIA, OID_INS_NIR, OID_INS_NIR_DEMO, OID_INS_NIR_TEST
from engine.transforms import TransformContext, TransformError, message_of, register

__all__ = ["InsEnrichParams", "ins_enrich_transform", "INS_AUTHORITY_NAMES", "ENRICHED_TYPES"]

ENRICHED_TYPES = frozenset({"ORM", "ORU", "MDM", "OMI"})

# CX-4.1 (HD namespace id) of the INS repetition, per OID (see the module docstring for sources).
INS_AUTHORITY_NAMES: dict[str, str] = {
    OID_INS_NIR: "ASIP-SANTE-INS-NIR",
    OID_INS_NIA: "ASIP-SANTE-INS-NIA",
    OID_INS_NIR_TEST: "ASIP-SANTE-INS-NIR",
    OID_INS_NIR_DEMO: "ASIP-SANTE-INS-NIR",
}

_SPLIT_RE = re.compile(r"(\r\n|\r|\n)")
# FRCORE / REF-INS [EXI SI 08]: statuses under which the INS may be used (VALI: see
# engine.identity.ins.InsPolicy.vali_counts_as_qualified; the feed already refused the INS of an
# identity it does not take as qualified).
_QUALIFIED_STATUSES = frozenset({"QUAL", "VALI"})
_NEVER_QUALIFIED_ATTRS = frozenset({"DOUT", "FICT"})


class InsEnrichParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    require_ins: bool = True
    strip_unqualified: bool = True
    check_traits: bool = True
    ipp_authority: str | None = None


# ---------------------------------------------------------------------------------------------
# Component helpers: read with engine.hl7.message, rewrite by split and re-join (lossless for what
# is not changed)
# ---------------------------------------------------------------------------------------------


def _comp(m: Message, rep: str, n: int, sub: int | None = None) -> str:
    """Unescaped component ``n`` (1-based) of a repetition, or its sub-component ``sub``."""
    return m.text(rep, n, sub).strip()


def _set_comp(m: Message, rep: str, n: int, value: str, *, first_sub: bool = False) -> str:
    """Set component ``n`` to the escaped ``value`` (only its first sub-component when
    ``first_sub``), padding missing components. Unchanged text when the value is already right."""
    current = _comp(m, rep, n, 1 if first_sub else None)
    if current == value:
        return rep
    parts = rep.split(m.delims.component)
    while len(parts) < n:
        parts.append("")
    if first_sub:
        subs = parts[n - 1].split(m.delims.subcomponent)
        subs[0] = m.delims.escape(value)
        parts[n - 1] = m.delims.subcomponent.join(subs)
    else:
        parts[n - 1] = m.delims.escape(value)
    return m.delims.component.join(parts)


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------


def _qualified(ident: dict | None) -> bool:
    if not ident or not ident.get("active", True) or not ident.get("ins"):
        return False
    ins = ident["ins"]
    if not ins.get("value") or not ins.get("oid"):
        return False
    codes = {c.upper() for c in (ident.get("status_raw") or [])} | {(ident.get("status") or "").upper()}
    if codes & _NEVER_QUALIFIED_ATTRS:
        return False
    return (ident.get("status") or "").upper() in _QUALIFIED_STATUSES


def _missing_traits(ident: dict) -> list[str]:
    """Strict traits absent from a registry identity (REF-INS; CI-SIS CDA schematron)."""
    missing = []
    if not ident.get("birth_name"):
        missing.append("birth name (PID-5 XPN-1)")
    if not ident.get("first_given_name"):
        missing.append("first birth given name (PID-5 XPN-2)")
    if not ident.get("given_names"):
        missing.append("birth given names (PID-5 XPN-3)")
    if not ident.get("birth_date"):
        missing.append("birth date (PID-7)")
    if ident.get("sex") not in ("M", "F"):
        missing.append("sex M/F (PID-8)")
    if not ident.get("birth_place_cog"):
        missing.append("birth place COG (PID-11 BDL XAD-9)")
    return missing


def _cx_authority(m: Message, rep: str) -> str:
    """The registry key of a CX assigning authority: CX-4.1, else the CX-4.2 OID or FINESS."""
    return _comp(m, rep, 4, 1) or _comp(m, rep, 4, 2)


def _lookup(lookup, *args, **kw) -> dict | None:
    try:
        return lookup(*args, **kw)
    except LookupError:  # engine.store.identities.AmbiguousIdentity: several identities match
        return None


def _find(m: Message, reps: list[str], params: InsEnrichParams, lookup) -> tuple[dict | None, str]:
    """The registry identity of PID-3 (by IPP, then by INS) and how it was found."""
    for rep in reps:
        if _comp(m, rep, 5) != "PI" or not _comp(m, rep, 1):
            continue
        authority = _cx_authority(m, rep) or None
        if params.ipp_authority is not None:
            if authority is not None and authority != params.ipp_authority:
                continue
            authority = params.ipp_authority
        ident = _lookup(lookup, _comp(m, rep, 1), authority)
        if ident is not None:
            return ident, "IPP"
    for rep in reps:
        if _comp(m, rep, 5) == "INS" and _comp(m, rep, 1):
            ident = _lookup(lookup, None, ins=_comp(m, rep, 1))
            if ident is not None:
                return ident, "INS"
    return None, ""


def _pad(fields: list[str], n: int) -> None:
    while len(fields) <= n:
        fields.append("")


def _set_pid5(m: Message, raw: str, ident: dict) -> str:
    reps = raw.split(m.delims.repetition) if raw else []
    idx = next((i for i, r in enumerate(reps) if _comp(m, r, 7) == "L"), None)
    if idx is None:  # no birth-name repetition: an untyped one is taken as the name to fix
        idx = next((i for i, r in enumerate(reps) if not _comp(m, r, 7)), None)
    rep = reps[idx] if idx is not None else ""
    rep = _set_comp(m, rep, 1, ident.get("birth_name") or "", first_sub=True)
    rep = _set_comp(m, rep, 2, ident.get("first_given_name") or "")
    rep = _set_comp(m, rep, 3, " ".join(ident.get("given_names") or []))
    rep = _set_comp(m, rep, 7, "L")
    others = [r for i, r in enumerate(reps) if i != idx]
    return m.delims.repetition.join([rep] + others)


def _set_pid7(m: Message, raw: str, ident: dict) -> str:
    iso = ident.get("birth_date") or ""
    value = iso.replace("-", "")[:8]
    if not value or _comp(m, raw, 1)[:8] == value:
        return raw
    return _set_comp(m, raw, 1, value)


def _set_pid11(m: Message, raw: str, ident: dict) -> str:
    cog = ident.get("birth_place_cog") or ""
    if not cog:
        return raw
    reps = raw.split(m.delims.repetition) if raw else []
    for i, r in enumerate(reps):
        if _comp(m, r, 7) == "BDL":
            reps[i] = _set_comp(m, r, 9, cog)
            return m.delims.repetition.join(reps)
    bdl = _set_comp(m, _set_comp(m, "", 7, "BDL"), 9, cog)
    return m.delims.repetition.join(reps + [bdl]) if reps else bdl


def _set_pid32(m: Message, raw: str, ident: dict) -> str:
    wanted = [c for c in (ident.get("status_raw") or []) if c] or (
        [ident["status"]] if ident.get("status") else [])
    if not wanted:
        return raw
    current = [_comp(m, r, 1) for r in raw.split(m.delims.repetition)] if raw else []
    if current == wanted:
        return raw
    return m.delims.repetition.join(m.delims.escape(c) for c in wanted)


def _rewrite_pid(m: Message, pid: str, params: InsEnrichParams, ctx: TransformContext,
                 notes: list[str]) -> str:
    lookup = ctx.extras.get("identity_lookup") if ctx.extras else None
    if lookup is None:
        raise TransformError("ins_enrich: no identity registry available to this destination")
    fields = pid.split(m.delims.field)
    _pad(fields, 3)
    reps = [r for r in fields[3].split(m.delims.repetition)] if fields[3] else []
    ident, found_by = _find(m, reps, params, lookup)
    if ident is not None and not ident.get("active", True):
        ident = None  # A29/A23: a deactivated identity is not used
    ins_reps = [i for i, r in enumerate(reps) if _comp(m, r, 5) == "INS"]

    if not _qualified(ident):
        why = "identity unknown to the registry" if ident is None else \
            "the registry identity has no qualified INS"
        if params.require_ins:
            raise TransformError(f"903: INS required but absent: {why} (PID-3)")
        if ins_reps and params.strip_unqualified:
            fields[3] = m.delims.repetition.join(r for i, r in enumerate(reps) if i not in ins_reps)
            notes.append(f"ins_enrich: {len(ins_reps)} INS repetition(s) removed from PID-3 ({why})")
            return m.delims.field.join(fields)
        notes.append(f"ins_enrich: PID not enriched ({why})")
        return pid

    ins = ident["ins"]
    for i in ins_reps:
        value, oid = _comp(m, reps[i], 1), _comp(m, reps[i], 4, 2)
        if value != ins["value"] or oid != ins["oid"]:
            part = "matricule" if value != ins["value"] else "assigning authority OID (CX-4.2)"
            raise TransformError(f"904: INS in PID-3[{i + 1}] does not match the registry identity "
                                 f"found by {found_by} ({part} differs)")
    if params.check_traits:
        missing = _missing_traits(ident)
        if missing:
            raise TransformError("905: strict traits incomplete in the registry identity: "
                                 + ", ".join(missing))
    if not ins_reps:
        name = INS_AUTHORITY_NAMES.get(ins["oid"], "ASIP-SANTE-INS-NIR")
        d = m.delims
        cs, ss = d.component, d.subcomponent
        new = f"{d.escape(ins['value'])}{cs}{cs}{cs}{d.escape(name)}{ss}{d.escape(ins['oid'])}{ss}ISO{cs}INS"
        fields[3] = m.delims.repetition.join(reps + [new])
        notes.append("ins_enrich: INS added to PID-3")

    _pad(fields, 11)
    before = list(fields)
    fields[5] = _set_pid5(m, fields[5], ident)
    fields[7] = _set_pid7(m, fields[7], ident)
    if ident.get("sex") and _comp(m, fields[8], 1) != ident["sex"]:
        fields[8] = m.delims.escape(ident["sex"])
    fields[11] = _set_pid11(m, fields[11], ident)
    if ident.get("status_raw") or ident.get("status"):
        _pad(fields, 32)
        fields[32] = _set_pid32(m, fields[32], ident)
    changed = [f"PID-{n}" for n in (5, 7, 8, 11, 32)
               if n < len(fields) and fields[n] != (before[n] if n < len(before) else "")]
    if changed:
        notes.append("ins_enrich: strict traits set in " + ", ".join(changed))
    out = m.delims.field.join(fields)
    if out.rstrip(m.delims.field) == pid.rstrip(m.delims.field):
        return pid  # nothing but trailing padding: keep the segment as sent
    return out


@register("ins_enrich", InsEnrichParams)
def ins_enrich_transform(text: str, params: InsEnrichParams, ctx: TransformContext,
                         notes: list[str]) -> str:
    m = message_of(text, ctx, "ins_enrich")
    parts = _SPLIT_RE.split(text)
    code = _comp(m, m.segment("MSH").field(9), 1)
    if code not in ENRICHED_TYPES:
        notes.append(f"ins_enrich: {code or 'unknown'} messages are not enriched")
        return text
    for i in range(0, len(parts), 2):
        seg = parts[i]
        if seg[:3] == "PID" and (len(seg) == 3 or seg[3] == m.delims.field):
            new = _rewrite_pid(m, seg, params, ctx, notes)
            if new == seg:
                return text
            parts[i] = new
            return "".join(parts)
    if params.require_ins:
        raise TransformError("903: INS required but the message has no PID segment")
    notes.append("ins_enrich: no PID segment")
    return text

