"""MSH-18 (HL7 table 0211) to Python codecs, and whole-message decoding with a cp1252 fallback.

Rules (HL7 v2.5 §2.16.9.18 MSH-18 and table 0211, alternate character sets):

* empty MSH-18 or ``ASCII`` → the channel default (``UNICODE UTF-8`` unless configured);
* table 0211 codes map without a flag; common non-standard spellings (``UTF-8``, ``ISO-8859-1``,
  ``ISO IR100`` (DICOM's name for Latin-1), ``windows-1252``, ``latin1`` …) map with an
  ``alias:<value>`` flag; anything else raises ``HL7Error("103")`` at ``MSH^1^18``;
* UTF-16/UTF-32 (``UNICODE UTF-16``…) are not allowed over MLLP: ``HL7Error("103")``;
* a UTF-8 BOM is stripped (flag ``bom_stripped``);
* strict decoding; a message declared 8859/1 or 8859/15 that carries bytes 0x80-0x9F (C1 controls,
  never valid HL7 data, in practice cp1252 ``€ œ Œ Ÿ …``) counts as a decoding failure. On failure:
  cp1252 with flag ``cp1252_fallback`` when allowed, else ``HL7Error("102")``.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from functools import lru_cache

from .errors import HL7Error

__all__ = ["Decoded", "codec_for", "resolve_charset", "decode_message", "message_codec"]

_LOC = "MSH^1^18"
_BOM = b"\xef\xbb\xbf"
_C1 = re.compile(rb"[\x80-\x9f]")

# Table 0211 codes (exact spelling) -> Python codec. "ASCII" is handled as "the default".
_TABLE_0211: dict[str, str] = {
    "UNICODE UTF-8": "utf-8",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "ISO IR6": "ascii",
    "ISO IR14": "shift_jis",      # JIS X 0201 (Roman + half-width katakana)
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
}
_NOT_ALLOWED = {"UNICODE", "UNICODE UTF-16", "UNICODE UTF-32", "UTF-16", "UTF-32", "UCS-2"}


def _norm(name: str) -> str:
    return "".join(ch for ch in name.upper() if ch not in " -_")


# Normalised spelling -> codec. Includes the normalised table codes themselves.
_ALIASES: dict[str, str] = {_norm(k): v for k, v in _TABLE_0211.items()}
_ALIASES.update({
    "UTF8": "utf-8",
    "UNICODEUTF8": "utf-8",
    "ASCII": "ascii", "USASCII": "ascii", "ISOIR6": "ascii",
    "ISO88591": "latin-1", "ISO8859/1": "latin-1", "LATIN1": "latin-1", "L1": "latin-1",
    "ISOIR100": "latin-1", "ISOLATIN1": "latin-1", "8859": "latin-1",
    "ISO885915": "iso8859-15", "ISO8859/15": "iso8859-15", "LATIN9": "iso8859-15", "LATIN0": "iso8859-15",
    "WINDOWS1252": "cp1252", "CP1252": "cp1252", "WIN1252": "cp1252",
})
for _n in range(2, 10):
    _ALIASES[f"ISO8859{_n}"] = f"iso8859-{_n}"
    _ALIASES[f"ISO8859/{_n}"] = f"iso8859-{_n}"
_ALIASES.update({"ISOIR101": "iso8859-2", "ISOIR109": "iso8859-3", "ISOIR110": "iso8859-4",
                 "ISOIR144": "iso8859-5", "ISOIR127": "iso8859-6", "ISOIR126": "iso8859-7",
                 "ISOIR138": "iso8859-8", "ISOIR148": "iso8859-9", "ISOIR203": "iso8859-15"})


def _short(value: str) -> str:
    value = value.strip()
    return value if len(value) <= 40 else value[:40] + "…"


def resolve_charset(msh18: str | None, default: str = "UNICODE UTF-8") -> tuple[str, frozenset[str]]:
    """``(python codec, flags)`` for an MSH-18 value; flags hold ``alias:<value>`` for non-table spellings."""
    if msh18 and len(msh18) > 64:  # never cache (or look up) absurd values
        raise HL7Error("103", f"unknown character set {_short(msh18)!r} in MSH-18 (table 0211)", _LOC)
    return _resolve(msh18 or "", default)


@lru_cache(maxsize=256)
def _resolve(msh18: str, default: str) -> tuple[str, frozenset[str]]:
    value = msh18.strip()
    if not value or value == "ASCII":
        if _norm(default) == "ASCII":
            return "ascii", frozenset()
        codec, flags = _resolve(default, "ASCII")
        return codec, flags
    codec = _TABLE_0211.get(value)
    if codec is not None:
        return codec, frozenset()
    if value.upper() in _NOT_ALLOWED or _norm(value) in {_norm(v) for v in _NOT_ALLOWED}:
        raise HL7Error("103", f"character set {_short(value)!r} (MSH-18) is not allowed over MLLP", _LOC)
    codec = _ALIASES.get(_norm(value))
    if codec is None:
        # Last resort: a Python codec name that is ASCII-compatible (flagged as alias).
        try:
            info = codecs.lookup(value)
        except (LookupError, ValueError):  # ValueError: a NUL byte in the name
            raise HL7Error("103", f"unknown character set {_short(value)!r} in MSH-18 (table 0211)", _LOC) from None
        if info.name.startswith(("utf-16", "utf-32")) or "MSH|".encode(info.name, "replace") != b"MSH|":
            raise HL7Error("103", f"character set {_short(value)!r} (MSH-18) is not ASCII-compatible", _LOC)
        codec = info.name
    if _norm(value) == "ASCII":
        return codec, frozenset()
    return codec, frozenset({f"alias:{value}"})


def codec_for(msh18: str | None, default: str = "UNICODE UTF-8") -> str:
    """Python codec name for an MSH-18 value (see :func:`resolve_charset`). Raises ``HL7Error("103")``."""
    return resolve_charset(msh18, default)[0]


@dataclass
class Decoded:
    text: str
    codec: str            # the codec actually used ("cp1252" after a fallback)
    flags: frozenset[str]  # "bom_stripped", "cp1252_fallback", "alias:<MSH-18 value>"


def message_codec(raw: bytes, msh18: str | None, *, default: str = "UNICODE UTF-8",
                  cp1252_fallback: bool = True) -> tuple[str, frozenset[str]]:
    """Codec and flags of a message, its bytes checked without keeping the text (hot path).

    Pure ASCII is valid in every charset of table 0211 that the engine accepts, so only messages
    with other bytes are decoded (and may fall back to cp1252 or raise ``HL7Error`` 102/103)."""
    if raw.isascii():
        codec, flags = resolve_charset(msh18, default)
        return codec, frozenset(flags)
    decoded = decode_message(raw, msh18, default=default, cp1252_fallback=cp1252_fallback)
    return decoded.codec, decoded.flags


def decode_message(raw: bytes, msh18: str | None, *, default: str = "UNICODE UTF-8",
                   cp1252_fallback: bool = True) -> Decoded:
    """Decode a whole message per MSH-18 (see module docstring). Raises ``HL7Error`` 102/103."""
    codec, flags = resolve_charset(msh18, default)
    flags = set(flags)
    if raw[:3] == _BOM:
        raw = raw[3:]
        flags.add("bom_stripped")
    error: str | None = None
    if codec in ("latin-1", "iso8859-15"):
        m = _C1.search(raw)
        if m is None:
            return Decoded(raw.decode(codec), codec, frozenset(flags))
        error = f"byte 0x{raw[m.start()]:02X} at offset {m.start()} is a C1 control in {codec}"
    else:
        try:
            return Decoded(raw.decode(codec), codec, frozenset(flags))
        except UnicodeDecodeError as exc:
            error = f"invalid {codec} byte sequence at offset {exc.start}"
    if cp1252_fallback and codec != "cp1252":
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError as exc:
            error += f"; cp1252 fallback failed at offset {exc.start}"
        else:
            flags.add("cp1252_fallback")
            return Decoded(text, "cp1252", frozenset(flags))
    raise HL7Error("102", f"message is not valid for its character set: {error}", _LOC)
