"""One parsed HL7 v2 message for every reader off the ingest hot path.

Identity feed (IHE PAM France), CI-SIS report parsing, teleradiology checks, transforms and the
CDA wrap all read messages through :class:`Message`; the ingest hot path keeps its own split-based
readers (:mod:`engine.hl7.msh`, :func:`engine.hl7.fields.get_field`) and never builds one.

    m = Message.parse(raw, "utf-8")          # bytes (decoded here) or str
    m.delims.component                       # "^" (from MSH-1 / MSH-2)
    pid = m.segment("PID")                   # first PID, or None; m.segment("OBX", 2); m.all("OBX")
    pid.field(3)                             # raw field, every repetition ("" when absent)
    pid.repetitions(3)                       # ["123^^^X&1.2&ISO^PI", ...] ([] when empty)
    pid.component(5, 1, 1, rep=2)            # raw sub-component 1 of component 1 of repetition 2
    pid.value(5, 1)                          # the same, unescaped (HL7 v2.5 §2.7)
    m.get("PID-3[2].4.2"), m.value("OBX[2]-5")   # engine.hl7.fields.parse_path syntax; None if absent
    m.delims.component_of(rep, 4, 2)         # walk a repetition already in hand (raw)
    m.text(rep, 4, 2)                        # the same, unescaped

Numbering and splitting follow python-hl7 (``hl7.parse``): 1-based fields, repetitions,
components and sub-components; MSH-1 is the field separator and MSH-2 the encoding characters,
so ``m.segment("MSH").field(9)`` is MSH-9; segment occurrences are 1-based. Segments are split on
CR, LF or CRLF (some ANS example files use LF); blank lines, a leading BOM and MLLP framing bytes
are dropped. Values are raw (still escaped) unless read with ``value``: unescape at the point of
use with the one :func:`engine.hl7.escape.unescape`.

Why split-based and not python-hl7's tree: measured on the shared 2-core host (python-hl7 0.4.5,
CPython 3.11), ``hl7.parse`` takes 3.3-3.6 ms on the 286 KB CI-SIS ORU with a 212 KB Base64 OBX-5
(str.split of the same text: 0.65 ms) and 0.70 ms on an 800-byte PAM FR ADT^A01 (str.split:
2.5 µs; the whole PAM FR reading took 30-40 µs). At the identity feed's ~1,100 ADT/s (0.9 ms per
ADT) and the report step's ~77 msg/s (13 ms per message), the tree parse alone would bring them to
about 0.55x and 0.8x, past the 0.9x budget. So fields are split lazily, per segment,
on first access; ``tests/test_hl7_message.py`` checks the results against python-hl7 on the ANS
corpus. Text is the one representation: bytes are decoded once here with ``surrogateescape``, so
bytes invalid in the codec survive a round trip (``Message.encode``).

Pure: no I/O, no logging; error texts never quote field values.
"""
from __future__ import annotations

from typing import Iterator

from .errors import HL7Error
from .escape import escape, unescape
from .fields import parse_path

__all__ = ["Delimiters", "Message", "Segment"]

_DEFAULT_ENC = "^~\\&"


def _has_hex_escape(text: str, esc: str) -> bool:
    """Whether ``text`` holds ``esc`` followed by ``X`` or ``x`` (the start of a ``\\Xhh\\`` escape,
    HL7 v2.5 §2.7): the answer of ``f"{esc}X" in text or f"{esc}x" in text``, cheaper.

    Those two-character searches scan the text at about 1 ns a character (1.4 µs for an 800-byte
    ADT); one character is found by ``memchr``, much faster. So when the text holds the escape
    character once (in MSH-2: an ADT without escapes), two one-character searches answer."""
    i = text.find(esc)
    if i < 0:
        return False
    if text.find(esc, i + 1) < 0:
        return text.startswith(("X", "x"), i + 1)
    return f"{esc}X" in text or f"{esc}x" in text


class Delimiters:
    """The separators of one message (MSH-1 and MSH-2) and the splits they define."""

    __slots__ = ("field", "component", "repetition", "escape_char", "subcomponent", "truncation",
                 "encoding")

    def __init__(self, field: str = "|", encoding: str = _DEFAULT_ENC) -> None:
        if len(encoding) < 4:
            encoding = encoding + _DEFAULT_ENC[len(encoding):]
        self.field = field
        self.encoding = encoding[:5]
        self.component, self.repetition, self.escape_char, self.subcomponent = encoding[:4]
        self.truncation = encoding[4] if len(encoding) > 4 else ""   # HL7 v2.7 MSH-2 fifth character

    def repetitions(self, raw: str) -> list[str]:
        """Repetitions of a raw field; ``[]`` for an empty field (nothing sent)."""
        return raw.split(self.repetition) if raw else []

    def components(self, raw: str) -> list[str]:
        return raw.split(self.component)

    def subcomponents(self, raw: str) -> list[str]:
        return raw.split(self.subcomponent)

    def component_of(self, raw: str, n: int, sub: int | None = None) -> str:
        """Raw component ``n`` (and sub-component ``sub``) of one repetition; ``""`` when absent."""
        parts = raw.split(self.component, n)  # at most n splits: never more than needed
        v = parts[n - 1] if n <= len(parts) else ""
        if sub is not None:
            subs = v.split(self.subcomponent, sub)
            v = subs[sub - 1] if sub <= len(subs) else ""
        return v

    def unescape(self, raw: str, charset: str = "latin-1") -> str:
        if self.escape_char not in raw:
            return raw
        return unescape(raw, self.field, self.encoding, charset)

    def escape(self, text: str) -> str:
        return escape(text, self.field, self.encoding)


class Segment:
    """One segment; ``fields()[n]`` is field n (``[0]`` the segment id; MSH shifted to MSH-n)."""

    __slots__ = ("name", "occurrence", "index", "raw", "delims", "_fields", "_charset")

    def __init__(self, raw: str, name: str, occurrence: int, index: int, delims: Delimiters, charset: str):
        self.raw, self.name, self.occurrence, self.index = raw, name, occurrence, index
        self.delims, self._charset = delims, charset
        self._fields: list[str] | None = None

    def fields(self) -> list[str]:
        f = self._fields
        if f is None:
            f = self.raw.split(self.delims.field)
            if self.name == "MSH":
                f = [f[0], self.delims.field] + f[1:]
            self._fields = f
        return f

    def __len__(self) -> int:
        """Number of fields present (the highest field number sent)."""
        return len(self.fields()) - 1

    def field(self, n: int) -> str:
        f = self._fields
        if f is None:
            f = self.fields()
        return f[n] if 0 < n < len(f) else ""

    def repetitions(self, n: int) -> list[str]:
        return self.delims.repetitions(self.field(n))

    def component(self, n: int, comp: int = 1, sub: int | None = None, *, rep: int = 1) -> str:
        """Raw component of repetition ``rep`` of field ``n``; ``""`` when absent."""
        v = self.field(n)
        if self.name == "MSH" and n in (1, 2):
            return v
        reps = v.split(self.delims.repetition, rep)
        v = reps[rep - 1] if rep <= len(reps) else ""
        return self.delims.component_of(v, comp, sub)

    def value(self, n: int, comp: int | None = None, sub: int | None = None, *, rep: int = 1) -> str:
        """Unescaped: the whole field when ``comp`` is None, else one (sub-)component."""
        v = self.field(n) if comp is None else self.component(n, comp, sub, rep=rep)
        if self.name == "MSH" and n in (1, 2):
            return v
        return self.delims.unescape(v, self._charset)

    def __repr__(self) -> str:  # never the content: it is patient data
        return f"<Segment {self.name} #{self.occurrence}>"


class Message:
    """Segments of one message with its delimiters; see the module docstring."""

    __slots__ = ("delims", "segments", "charset", "_by_name", "_cs", "_ss", "_esc", "_maybe_nul")

    def __init__(self, text: str, charset: str = "latin-1") -> None:
        """``charset``: the Python codec of the message, used to decode ``\\Xhh\\`` escapes."""
        text = text.lstrip("\x0b").rstrip("\x1c\r\n")
        if text.startswith("\ufeff"):
            text = text[1:]
        if "\n" not in text:
            lines = text.split("\r")
        elif "\r" not in text:
            lines = text.split("\n")
        else:  # CRLF or mixed: two copies of the text, so only when needed
            lines = text.replace("\r\n", "\r").replace("\n", "\r").split("\r")
        lines = [s for s in lines if s and not s.isspace()]  # as s.strip(), without a copy
        first = lines[0] if lines else ""
        if not first.startswith("MSH") or len(first) < 8:
            raise HL7Error("100", "message does not start with an MSH segment", "MSH^1")
        fs = first[3]
        d = self.delims = Delimiters(fs, first[4:].split(fs, 1)[0])
        self._cs, self._ss, self._esc = d.component, d.subcomponent, d.escape_char  # for ``text``
        esc = self._esc
        self._maybe_nul = "\x00" in text or _has_hex_escape(text, esc)  # for ``nul_field``
        self.charset = charset
        self.segments: list[Segment] = []
        self._by_name: dict[str, list[Segment]] = {}
        for i, s in enumerate(lines):
            end = s.find(fs)
            name = (s[:end] if end >= 0 else s).strip()
            same = self._by_name.setdefault(name, [])
            seg = Segment(s, name, len(same) + 1, i, self.delims, charset)
            same.append(seg)
            self.segments.append(seg)

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview | str, codec: str = "utf-8") -> Message:
        """Decode ``raw`` with ``codec`` (``surrogateescape``: lossless) and split it."""
        if isinstance(raw, str):
            return cls(raw, codec)
        try:
            text = bytes(raw).decode(codec, "surrogateescape")
        except LookupError:
            raise HL7Error("103", f"unknown codec {codec!r}") from None
        return cls(text, codec)

    def encode(self, text: str) -> bytes:
        """Back to the bytes of the message codec (inverse of ``parse`` for any text read here).

        A character the codec cannot write (a U+FFFD from a bad ``\\X..\\`` escape) becomes ``?``."""
        try:
            return text.encode(self.charset, "surrogateescape")
        except UnicodeEncodeError:
            out = bytearray()
            for ch in text:
                try:
                    out += ch.encode(self.charset, "surrogateescape")
                except UnicodeEncodeError:
                    out += b"?"
            return bytes(out)

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def all(self, name: str) -> list[Segment]:
        return self._by_name.get(name, [])

    def segment(self, name: str, occurrence: int = 1) -> Segment | None:
        same = self._by_name.get(name)
        return same[occurrence - 1] if same and occurrence <= len(same) else None

    def text(self, raw: str, n: int, sub: int | None = None) -> str:
        """Component ``n`` (and sub-component ``sub``) of a repetition in hand, unescaped."""
        parts = raw.split(self._cs, n)
        v = parts[n - 1] if n <= len(parts) else ""
        if sub is not None:
            subs = v.split(self._ss, sub)
            v = subs[sub - 1] if sub <= len(subs) else ""
        if self._esc not in v:
            return v
        return unescape(v, self.delims.field, self.delims.encoding, self.charset)

    def nul_field(self) -> str | None:
        """The first field holding a NUL, as sent or as a ``\\X00\\`` escape (``"PID-5"``), else None.

        A NUL is no character of any HL7 character set, and no text column of the store can hold
        one (PostgreSQL refuses it): readers that keep field values refuse such a message, naming
        the field. Cheap when there is none: the fields are looked at only when the text holds a
        NUL or a hexadecimal escape."""
        if not self._maybe_nul:
            return None
        esc = self._esc
        fs, enc = self.delims.field, self.delims.encoding
        for seg in self.segments:
            for n, value in enumerate(seg.fields()[1:], start=1):
                if "\x00" in value or (esc in value and "\x00" in unescape(value, fs, enc, self.charset)):
                    return f"{seg.name}-{n}" if seg.name.isalnum() else f"segment {seg.index + 1}"
        return None

    def get(self, path: str) -> str | None:
        """Raw text at a :func:`engine.hl7.fields.parse_path` path; ``None`` when absent.

        Same answers as :func:`engine.hl7.fields.get_field`: ``PID-3`` is the whole field,
        ``PID-3.1`` component 1 of the first repetition, ``PID-3.4`` a component with its
        sub-components; ``""`` when present but empty.
        """
        fp = parse_path(path)
        seg = self.segment(fp.segment, fp.occurrence)
        if seg is None:
            return None
        f = seg.fields()
        if fp.field >= len(f):
            return None
        v = f[fp.field]
        if (fp.segment == "MSH" and fp.field in (1, 2)) or (fp.repetition is None and fp.component is None):
            return v
        d = self.delims
        for part, sep in ((fp.repetition or 1, d.repetition), (fp.component, d.component),
                          (fp.subcomponent, d.subcomponent)):
            if part is None:
                break
            items = v.split(sep)
            if part > len(items):
                return None
            v = items[part - 1]
        return v

    def value(self, path: str) -> str | None:
        """``get`` unescaped (MSH-1/MSH-2 as they are)."""
        v = self.get(path)
        fp = parse_path(path)
        if v is None or (fp.segment == "MSH" and fp.field in (1, 2)):
            return v
        return self.delims.unescape(v, self.charset)
