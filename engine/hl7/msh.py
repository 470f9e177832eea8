"""Split-based MSH reader: the ingest hot path.

Only the first segment is looked at (up to the first CR or LF); the rest of the message is never
scanned or decoded here. The segment is decoded as latin-1, which is lossless and ASCII-compatible
with every character set MLLP allows (MSH-1..MSH-21 are ASCII in practice). Field values are
returned *raw*: still escaped, components kept.

``read_msh`` returns an :class:`MSHInfo` or raises :class:`HL7Error`; it never raises anything else
for any ``bytes`` input, and runs in time linear in the input size.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import HL7Error

__all__ = ["MSHInfo", "read_msh"]

_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class MSHInfo:
    """What routing, dedup and ACK building need from MSH (raw, escaped field text)."""

    field_sep: str = "|"
    encoding_chars: str = "^~\\&"
    sending_app: str = ""          # MSH-3 raw, e.g. "GAM" or "APP^1.2.3^ISO"
    sending_facility: str = ""     # MSH-4 raw
    receiving_app: str = ""        # MSH-5 raw
    receiving_facility: str = ""   # MSH-6 raw
    timestamp: str = ""            # MSH-7 raw
    message_code: str = ""         # MSH-9.1
    trigger: str = ""              # MSH-9.2
    structure: str = ""            # MSH-9.3
    control_id: str = ""           # MSH-10
    processing_id: str = ""        # MSH-11.1
    version: str = ""              # MSH-12.1, e.g. "2.5"
    version_raw: str = ""          # MSH-12 whole, e.g. "2.5^FRA^2.11"
    accept_ack: str = ""           # MSH-15
    app_ack: str = ""              # MSH-16
    charset: str = ""              # MSH-18, first repetition
    charsets: tuple[str, ...] = ()  # MSH-18, all repetitions
    profile: str = ""              # MSH-21 raw
    segment_sep: str = "\r"        # "\r", "\n" or "\r\n", as found after MSH
    bom: bool = False              # a UTF-8 BOM preceded MSH (and was skipped)

    @property
    def message_type(self) -> str:
        """``"ADT^A01"`` (code^trigger, always with ``^``), or just the code when there is no trigger."""
        if self.trigger:
            return f"{self.message_code}^{self.trigger}"
        return self.message_code


def _bad_delims(text: str, location: str) -> HL7Error:
    return HL7Error("102", text, location)


_VALID_DELIMS: set[tuple[str, str]] = {("|", "^~\\&"), ("|", "^~\\&#")}
_PAD = [""] * 21


def _bad_char(ch: str) -> bool:
    # printable ASCII only (HL7 v2.5 §2.5.4 "Message delimiters"): a byte above 0x7E may be part of
    # a multi-byte character of the message's charset, and the ACK could not write it back
    return ch.isalnum() or ch <= " " or ch > "~"


def _check_delims(fs: str, enc: str) -> None:
    if _bad_char(fs):
        raise _bad_delims("MSH-1 field separator must be a printable non-alphanumeric ASCII character", "MSH^1^1")
    n_enc = len(enc)
    if n_enc != 4 and n_enc != 5:
        if n_enc == 0:
            raise HL7Error("101", "MSH-2 (encoding characters) missing", "MSH^1^2")
        raise _bad_delims(f"MSH-2 must hold 4 encoding characters (or 5 with v2.7 truncation), got {n_enc}",
                          "MSH^1^2")
    if len(set(enc)) != n_enc:
        raise _bad_delims("MSH-2 encoding characters must all be different", "MSH^1^2")
    for ch in enc:
        if _bad_char(ch):
            raise _bad_delims("MSH-2 encoding characters must be printable non-alphanumeric ASCII characters", "MSH^1^2")
    # (fs cannot appear in enc: enc was split on it.)
    if len(_VALID_DELIMS) < 256:
        _VALID_DELIMS.add((fs, enc))


def read_msh(raw: bytes) -> MSHInfo:
    """Read the MSH segment of ``raw`` (one HL7 v2 message, bytes). Raises :class:`HL7Error`."""
    if not isinstance(raw, bytes):
        if isinstance(raw, (bytearray, memoryview)):
            raw = bytes(raw)
        elif isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogatepass")
        else:
            raise HL7Error("102", "message is not bytes", None)
    bom = False
    start = 0
    if raw.startswith(_BOM):
        bom = True
        start = 3
    if raw.startswith((b"\r", b"\n"), start):
        # Tolerate blank lines before MSH (files, sloppy senders).
        start = len(raw) - len(raw[start:].lstrip(b"\r\n"))
    if not raw.startswith(b"MSH", start):
        if len(raw) <= start:
            raise HL7Error("100", "empty message: MSH segment expected", "MSH^1")
        raise HL7Error("100", "first segment is not MSH", "MSH^1")

    # End of MSH: the first CR or LF. Search LF only up to the CR (linear, C speed).
    cr = raw.find(b"\r", start)
    if cr < 0:
        lf = raw.find(b"\n", start)
        if lf < 0:
            end, sep = len(raw), "\r"
        else:
            end, sep = lf, "\n"
    else:
        lf = raw.find(b"\n", start, cr)
        if lf >= 0:
            end, sep = lf, "\n"
        else:
            end = cr
            sep = "\r\n" if raw[cr + 1:cr + 2] == b"\n" else "\r"

    if raw.find(b"\x00", start, end) >= 0:
        # a NUL is no character of any HL7 charset; refused here, it never reaches the store's
        # text columns (PostgreSQL refuses it there) or a codec lookup
        raise HL7Error("102", "MSH contains a NUL byte", "MSH^1")
    seg = raw[start:end].decode("latin-1")
    if len(seg) < 4:
        raise HL7Error("101", "MSH-1 (field separator) missing", "MSH^1^1")
    fs = seg[3]
    f = seg.split(fs)
    enc = f[1]
    if (fs, enc) not in _VALID_DELIMS:
        _check_delims(fs, enc)
    nf = len(f)
    if nf < 21:
        f.extend(_PAD[nf:])
    # f[k] is MSH-(k+1) for k >= 1.
    msh9 = f[8]
    if not msh9:
        raise HL7Error("101", "MSH-9 (message type) missing", "MSH^1^9")
    cs = enc[0]
    if cs in msh9:
        parts = msh9.split(cs)
        code = parts[0]
        trigger = parts[1] if len(parts) > 1 else ""
        structure = parts[2] if len(parts) > 2 else ""
    else:
        code, trigger, structure = msh9, "", ""
    rs = enc[1]
    if rs in code:  # MSH-9 does not repeat; use the first repetition of a sloppy sender
        code = code.split(rs, 1)[0]
    if not code:
        raise HL7Error("101", "MSH-9.1 (message code) missing", "MSH^1^9^1^1")
    control_id = f[9]
    if not control_id:
        raise HL7Error("101", "MSH-10 (message control id) missing", "MSH^1^10")
    msh11 = f[10]
    processing_id = msh11.split(cs, 1)[0] if cs in msh11 else msh11
    version_raw = f[11]
    version = version_raw.split(cs, 1)[0] if cs in version_raw else version_raw
    if not version:
        raise HL7Error("101", "MSH-12 (version id) missing", "MSH^1^12")
    if f[17]:
        msh18 = f[17]
        charsets = tuple(msh18.split(rs)) if rs in msh18 else (msh18,)
        charset = charsets[0]
    else:
        charsets, charset = (), ""
    return MSHInfo(
        fs, enc,
        f[2],
        f[3],
        f[4],
        f[5],
        f[6],
        code, trigger, structure, control_id, processing_id, version, version_raw,
        f[14],
        f[15],
        charset, charsets,
        f[20],
        sep, bom,
    )
