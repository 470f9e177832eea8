"""The one field-path syntax (``parse_path``), the ingest hot path's one-field read (``get_field``,
the ordering key) and the transforms' in-place write (``set_field``).

Everything else off the hot path reads whole messages with :class:`engine.hl7.message.Message`,
which answers paths exactly as ``get_field`` does.

Paths (``parse_path``)::

    PID-3          field 3 (all repetitions, raw)
    PID-3.1        component 1 of the first repetition
    PID-3[2].1     component 1 of repetition 2 (1-based)
    PID-3.4.2      sub-component 2 of component 4
    OBX[2]-5       field 5 of the second OBX segment (segment occurrence, 1-based)
    MSH-9.2        MSH numbering: MSH-1 is the field separator, MSH-2 the encoding characters

Values are raw (still escaped) text: use :func:`engine.hl7.escape.unescape` at the point of use.
``get_field`` on ``bytes`` decodes the segment it reads with ``encoding`` (default latin-1, lossless:
``value.encode("latin-1").decode(real_codec)`` recovers the text); on ``str`` it works on the text.
Delimiters come from the message's MSH (defaults ``|^~\\&`` when the first segment is not MSH).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["FieldPath", "parse_path", "split_segments", "get_field", "set_field"]

_PATH_RE = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<segrep>\d+)\])?"
    r"-(?P<field>\d+)(?:\[(?P<rep>\d+)\])?"
    r"(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?$"
)


@dataclass(frozen=True, slots=True)
class FieldPath:
    segment: str
    field: int
    repetition: int | None = None    # None: the whole field (get: all repetitions raw; set: replace all)
    component: int | None = None
    subcomponent: int | None = None
    occurrence: int = 1               # which occurrence of the segment (1-based)

    def __str__(self) -> str:
        s = self.segment + (f"[{self.occurrence}]" if self.occurrence != 1 else "") + f"-{self.field}"
        if self.repetition is not None:
            s += f"[{self.repetition}]"
        if self.component is not None:
            s += f".{self.component}"
            if self.subcomponent is not None:
                s += f".{self.subcomponent}"
        return s


@lru_cache(maxsize=1024)
def parse_path(path: str) -> FieldPath:
    """Validate and parse a field path; ``ValueError`` with a readable message when it is bad."""
    if not isinstance(path, str):
        raise ValueError(f"field path must be a string like 'PID-3.1', not {type(path).__name__}")
    p = path.strip()
    m = _PATH_RE.match(p)
    if m is None:
        raise ValueError(
            f"invalid field path {path!r}: expected SEG-field[.component[.subcomponent]] with an "
            "optional [repetition] after the field and [occurrence] after the segment, "
            "e.g. 'PID-3', 'PID-3[2].1', 'PID-3.4.2', 'OBX[2]-5' (segment id: 3 upper-case letters/digits)")
    seg = m["seg"]
    nums = {k: (int(m[k]) if m[k] is not None else None) for k in ("segrep", "field", "rep", "comp", "sub")}
    for k, label in (("segrep", "segment occurrence"), ("field", "field number"), ("rep", "repetition"),
                     ("comp", "component"), ("sub", "sub-component")):
        if nums[k] is not None and nums[k] < 1:
            raise ValueError(f"invalid field path {path!r}: {label} numbers start at 1")
    if seg == "MSH" and nums["field"] in (1, 2) and (nums["rep"] or nums["comp"]):
        raise ValueError(f"invalid field path {path!r}: MSH-1 and MSH-2 have no repetitions or components")
    return FieldPath(seg, nums["field"], nums["rep"], nums["comp"], nums["sub"], nums["segrep"] or 1)


def _detect_sep(data):
    """Segment separator of ``data`` (str or bytes): the first CR/LF found."""
    cr, lf = ("\r", "\n") if isinstance(data, str) else (b"\r", b"\n")
    i = data.find(cr)
    j = data.find(lf, 0, i) if i >= 0 else data.find(lf)
    if j >= 0:
        return lf
    if i >= 0:
        return cr + lf if data[i + 1:i + 2] == lf else cr
    return cr


def split_segments(raw):
    """Segments of a message (bytes or str); accepts CR, LF and CRLF; drops empty segments."""
    if isinstance(raw, (bytearray, memoryview)):
        raw = bytes(raw)
    cr, lf = ("\r", "\n") if isinstance(raw, str) else (b"\r", b"\n")
    sep = _detect_sep(raw)
    if sep == lf:
        parts = [s.rstrip(cr) for s in raw.split(lf)]
    else:
        parts = [s.strip(lf) for s in raw.split(cr)]
    return [s for s in parts if s]


def _delims(first_segment: str) -> tuple[str, str]:
    if first_segment.startswith("MSH") and len(first_segment) >= 8:
        fs = first_segment[3]
        enc = first_segment[4:].split(fs, 1)[0]
        if 4 <= len(enc) <= 5:
            return fs, enc
    return "|", "^~\\&"


def _pick(parts: list[str], index: int) -> str | None:
    return parts[index - 1] if index <= len(parts) else None


def get_field(raw, path: str, *, encoding: str = "latin-1") -> str | None:
    """Raw text at ``path`` in the first matching segment (or the n-th with ``SEG[n]``).

    ``None`` when the segment, field, repetition, component or sub-component is absent; ``""``
    when present but empty. The path is validated by :func:`parse_path` (``ValueError``).
    """
    fp = parse_path(path)
    segs = split_segments(raw)
    if not segs:
        return None
    if not isinstance(segs[0], str):
        segs0 = segs[0].decode(encoding, "replace")
    else:
        segs0 = segs[0]
    fs, enc = _delims(segs0)
    if isinstance(segs[0], str):
        target, fs_t = fp.segment, fs
    else:
        target, fs_t = fp.segment.encode("ascii"), fs.encode(encoding, "replace")
    seen = 0
    seg = None
    for s in segs:
        if s[:3] == target and (len(s) == 3 or s[3:4] == fs_t):
            seen += 1
            if seen == fp.occurrence:
                seg = s
                break
    if seg is None:
        return None
    if not isinstance(seg, str):
        seg = seg.decode(encoding, "replace")
    parts = seg.split(fs)
    if fp.segment == "MSH":
        if fp.field == 1:
            return fs
        value = _pick(parts, fp.field)  # parts[1] is MSH-2
        if fp.field == 2:
            return value
    else:
        value = parts[fp.field] if fp.field < len(parts) else None
    if value is None:
        return None
    if fp.repetition is None and fp.component is None:
        return value
    reps = value.split(enc[1])
    value = _pick(reps, fp.repetition or 1)
    if value is None or fp.component is None:
        return value
    value = _pick(value.split(enc[0]), fp.component)
    if value is None or fp.subcomponent is None:
        return value
    return _pick(value.split(enc[3]), fp.subcomponent)


def _set_in(parts: list[str], index: int, value: str) -> list[str]:
    """Set 1-based ``index`` in ``parts``, padding with empty strings."""
    if index > len(parts):
        parts.extend([""] * (index - len(parts)))
    parts[index - 1] = value
    return parts


def set_field(text: str, path: str, value: str) -> str:
    """Return ``text`` with the element at ``path`` set to ``value`` (already-escaped HL7 text).

    Missing fields, repetitions, components and sub-components are created empty. A missing
    segment is appended when its occurrence is the next one (``ValueError`` otherwise). Setting
    ``MSH-1``/``MSH-2`` is refused (the delimiters would change). The segment separator of the
    message is kept.
    """
    if not isinstance(text, str):
        raise TypeError("set_field works on str; decode the message first")
    fp = parse_path(path)
    if fp.segment == "MSH" and fp.field in (1, 2):
        raise ValueError("set_field cannot change MSH-1/MSH-2 (the message delimiters)")
    sep = _detect_sep(text)
    lines = text.split(sep)
    fs, enc = _delims(lines[0] if lines else "")
    seen = 0
    idx = None
    for k, s in enumerate(lines):
        if s[:3] == fp.segment and (len(s) == 3 or s[3] == fs):
            seen += 1
            if seen == fp.occurrence:
                idx = k
                break
    if idx is None:
        if seen + 1 != fp.occurrence:
            raise ValueError(f"cannot set {fp}: only {seen} {fp.segment} segment(s) in the message")
        # Append after the last non-empty segment, keeping a trailing separator if there was one.
        trailing = 0
        while len(lines) > trailing and lines[len(lines) - 1 - trailing] == "":
            trailing += 1
        idx = len(lines) - trailing
        lines.insert(idx, fp.segment)
    parts = lines[idx].split(fs)
    # MSH: parts[1] is MSH-2, so MSH-n is parts[n-1]; other segments: field n is parts[n].
    pos = fp.field - 1 if fp.segment == "MSH" else fp.field
    if pos >= len(parts):
        parts.extend([""] * (pos + 1 - len(parts)))
    if fp.repetition is None and fp.component is None:
        parts[pos] = value
    else:
        reps = parts[pos].split(enc[1])
        r = fp.repetition or 1
        _set_in(reps, r, reps[r - 1] if r <= len(reps) else "")
        if fp.component is None:
            reps[r - 1] = value
        else:
            comps = reps[r - 1].split(enc[0])
            if fp.subcomponent is None:
                _set_in(comps, fp.component, value)
            else:
                c = comps[fp.component - 1] if fp.component <= len(comps) else ""
                subs = _set_in(c.split(enc[3]), fp.subcomponent, value)
                _set_in(comps, fp.component, enc[3].join(subs))
            reps[r - 1] = enc[0].join(comps)
        parts[pos] = enc[1].join(reps)
    lines[idx] = fs.join(parts)
    return sep.join(lines)
