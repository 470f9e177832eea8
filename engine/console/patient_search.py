"""Which stored messages name a patient identifier: the console's search by IPP, INS or
accession number. Patient identifiers are message content, never columns (docs/architecture.md,
"Patient data"), so the search reads the raw messages of a bounded date range. Pure.

* IPP: a PID-3 repetition whose identifier type (CX-5) is ``PI`` (IHE PAM France, PID-3).
* INS: a PID-3 repetition whose CX-5 is ``INS`` or whose assigning authority (CX-4.2) is one of
  the INS OIDs (ANS "Guide d'implémentation de l'identité INS", 1.2.250.1.213.1.4.8/9/10/11).
* accession number: OBR-18 and IPC-1 (IHE RAD TF-2, the accession number), OBR-3, ORC-3 (the
  filler order number, which some RIS use as accession), first component.
"""
from __future__ import annotations

from engine.hl7.encoding import codec_for
from engine.hl7.errors import HL7Error
from engine.hl7.message import Message
from engine.identity.model import INS_KIND_BY_OID

KINDS = ("ipp", "ins", "accession")
_ACCESSION_FIELDS = (("OBR", 18), ("IPC", 1), ("OBR", 3), ("ORC", 3))


def codec(charset: str | None) -> str:
    """The Python codec of a stored MSH-18 value; latin-1 (never fails) when unknown."""
    try:
        return codec_for(charset or None)
    except HL7Error:
        return "latin-1"


def matches(raw: bytes, charset: str, kind: str, value: str) -> bool:
    """True if this message carries ``value`` as an identifier of ``kind``."""
    value = value.strip()
    if not value or (value.isascii() and value.encode("ascii") not in raw):
        return False  # most messages are ruled out without parsing
    m = Message.parse(raw, codec(charset))
    if kind == "accession":
        return any(m.delims.component_of(rep, 1) == value
                   for name, n in _ACCESSION_FIELDS for seg in m.all(name) for rep in seg.repetitions(n))
    for pid in m.all("PID"):
        for rep in pid.repetitions(3):
            if m.delims.component_of(rep, 1) != value:
                continue
            id_type = m.delims.component_of(rep, 5)
            if kind == "ipp" and id_type == "PI":
                return True
            if kind == "ins" and (id_type == "INS" or m.delims.component_of(rep, 4, 2) in INS_KIND_BY_OID):
                return True
    return False
