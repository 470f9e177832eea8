"""HL7 v2.5 acknowledgements (§2.9): build the ACK the engine returns, read the ACK a partner returns.

Content rules (HL7 v2.5 §2.9.2 "Acknowledgment messages", §2.14.1 MSH, §2.15 ERR):

* MSH-3/4 <- original MSH-5/6 (or ``sending_app``/``sending_facility`` when empty / no MSH),
  MSH-5/6 <- original MSH-3/4, MSH-7 the given timestamp, MSH-9 ``ACK^<trigger>^ACK`` (``ACK`` when
  the original has no trigger), MSH-10 a *new* control id, MSH-11.1 copied (default ``P``), MSH-12
  copied whole (default ``2.5``), MSH-18 copied when present;
* MSA-1 the code, MSA-2 the original MSH-10, MSA-3 optional text;
* one ERR per error: ERR-2 location (ERL components), ERR-3 ``code^<table 0357 text>^HL70357``,
  ERR-4 severity, ERR-5 application error code, ERR-7 diagnostic information (e.g. the id of
  the check that found the error), ERR-8 user message.

The original's delimiters are reused, so raw MSH fields are copied without re-escaping; texts the
engine writes are escaped. Segments end with ``\\r``. The bytes are encoded with the codec of
MSH-18, or ASCII when MSH-18 is empty or unknown; characters the codec cannot encode become
``\\Xhh..\\`` escapes (latin-1 byte when the code point is < 256, else its UTF-8 bytes).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from .encoding import codec_for
from .errors import HL7Error, TABLE_0357
from .escape import escape, unescape
from .msh import MSHInfo

__all__ = [
    "AckError", "AckInfo", "ControlIdGenerator", "ack_code", "ack_mode", "accept_ack_wanted",
    "build_ack", "hl7_timestamp", "is_ack", "read_ack",
]

_DEFAULT_ENC = "^~\\&"


@dataclass(frozen=True, slots=True)
class AckError:
    code: str
    text: str
    severity: str = "E"
    location: str | None = None
    # ERR-5 application error code, e.g. the CI-SIS "applicationErrorCondition" 900-906 that go
    # with ERR-3 207 (guide "Transmission de documents CDA en HL7 v2", error-codes.md)
    app_code: str | None = None
    app_text: str | None = None
    app_system: str = "applicationErrorCondition"
    # ERR-7 diagnostic information: for support staff, e.g. the id of the check (rule) that found it
    diagnostic: str | None = None

    @classmethod
    def from_error(cls, err: HL7Error) -> "AckError":
        return cls(err.code, err.text, err.severity, err.location)


# --------------------------------------------------------------------------- mode and codes

def ack_mode(msh: MSHInfo) -> str:
    """``"original"`` when MSH-15 and MSH-16 are both empty, else ``"enhanced"``."""
    return "enhanced" if (msh.accept_ack or msh.app_ack) else "original"


_CODES = {
    ("original", "accept"): "AA", ("original", "error"): "AE", ("original", "reject"): "AR",
    ("enhanced", "accept"): "CA", ("enhanced", "error"): "CE", ("enhanced", "reject"): "CR",
}


def ack_code(msh: MSHInfo | None, outcome: str) -> str:
    """AA/AE/AR (original mode, or no MSH) or CA/CE/CR (enhanced accept ACK) for accept/error/reject."""
    mode = "original" if msh is None or not (msh.accept_ack or msh.app_ack) else "enhanced"
    try:
        return _CODES[(mode, outcome)]
    except KeyError:
        raise ValueError(f"outcome must be 'accept', 'error' or 'reject', not {outcome!r}") from None


def accept_ack_wanted(msh: MSHInfo, outcome: str) -> bool:
    """Whether an (accept) ACK must be sent for this outcome.

    Original mode: always. Enhanced mode, by MSH-15: AL (or empty) always, NE never, ER only on
    error/reject, SU only on accept. An unknown MSH-15 value is treated as AL (answer rather than
    leave the sender waiting).
    """
    if outcome not in ("accept", "error", "reject"):
        raise ValueError(f"outcome must be 'accept', 'error' or 'reject', not {outcome!r}")
    if not (msh.accept_ack or msh.app_ack):
        return True
    mode = msh.accept_ack.strip().upper()
    if mode == "NE":
        return False
    if mode == "ER":
        return outcome != "accept"
    if mode == "SU":
        return outcome == "accept"
    return True


def is_ack(msh: MSHInfo) -> bool:
    """True when the message is itself an acknowledgement (never ACK an ACK)."""
    return msh.message_code.upper() == "ACK" or msh.structure.upper() == "ACK"


# --------------------------------------------------------------------------- control ids

class ControlIdGenerator:
    """Unique MSH-10 values for the ACKs (and messages) the engine emits.

    Format: ``prefix`` + 13 upper-case hex digits of a microsecond clock (UTC epoch) that is bumped
    by one when two calls fall within the same microsecond, i.e. a time-based counter. With the
    default prefix the value is 16 characters (e.g. ``PFI660E4D7BA40E6``; 13 digits last until the
    year 2112); prefix (at most 7 characters) + digits never exceed 20 characters (MSH-10 is ST 20
    in v2.5). Values sort in issue order. Values are strictly increasing within a process and
    do not repeat across restarts as long as the wall clock is not set back by more than the
    restart time and fewer than 1,000,000 ids per second are issued on average. Thread-safe.
    """

    _DIGITS = 13

    def __init__(self, prefix: str = "PFI") -> None:
        if len(prefix) > 20 - self._DIGITS:
            raise ValueError(f"control id prefix longer than {20 - self._DIGITS} characters")
        if not all(ch.isalnum() or ch in "-_." for ch in prefix):
            raise ValueError("control id prefix must be alphanumeric (or - _ .)")
        self.prefix = prefix
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> str:
        now = time.time_ns() // 1000
        with self._lock:
            last = self._last + 1
            value = now if now > last else last
            self._last = value
        return f"{self.prefix}{value:013X}"

    __next__ = next

    def __iter__(self):
        return self


def hl7_timestamp(t: float | None = None) -> str:
    """Local time as an HL7 DTM with seconds and UTC offset, e.g. ``20240306111154+0100``."""
    return time.strftime("%Y%m%d%H%M%S%z", time.localtime(t))


# --------------------------------------------------------------------------- build

def _loc_to_erl(location: str, fs: str, enc: str) -> str:
    """``"MSH^1^12"`` -> ERL components with the message's component separator; other text escaped."""
    parts = location.split("^")
    seg = parts[0]
    if (len(seg) == 3 and seg.isalnum() and seg.isupper() and len(parts) <= 6
            and all(p.isdigit() for p in parts[1:])):
        return enc[0].join(parts) if enc[0] != "^" else location
    return escape(location, fs, enc)


def _encode(text: str, codec: str, esc: str) -> bytes:
    try:
        return text.encode(codec)
    except UnicodeEncodeError:
        out = []
        for ch in text:
            try:
                out.append(ch.encode(codec))
            except UnicodeEncodeError:
                raw = bytes([ord(ch)]) if ord(ch) < 256 else ch.encode("utf-8", "surrogatepass")
                out.append(f"{esc}X{raw.hex().upper()}{esc}".encode("ascii"))
        return b"".join(out)


def _copied(msh: MSHInfo | None) -> tuple:
    """What the ACK takes from the original MSH: delimiters, MSH-5/6 (our side), MSH-3/4, MSH-9.2,
    MSH-11, MSH-12, MSH-18 repetitions and MSH-10; defaults when the MSH could not be read."""
    if msh is None:
        return "|", _DEFAULT_ENC, "", "", "", "", "", "P", "2.5", (), ""
    return (msh.field_sep, msh.encoding_chars, msh.receiving_app, msh.receiving_facility,
            msh.sending_app, msh.sending_facility, msh.trigger, msh.processing_id or "P",
            msh.version_raw or "2.5", msh.charsets, msh.control_id)


def build_ack(msh: MSHInfo | None, code: str, *, control_id: str, timestamp: str,
              errors: Sequence[AckError] = (), text: str | None = None,
              sending_app: str = "MINIPFI", sending_facility: str = "") -> bytes:
    """Build the ACK for ``msh`` (``None`` when the MSH could not be read). Returns bytes, ``\\r`` separated.

    The common case, an ACK that is pure ASCII, is built as one string (hot path); any other is
    built by :func:`_build_ack_exact`, which gives the values copied from the original back as
    the sender's bytes (MSA-2 is MSH-10 byte for byte, whatever the charset)."""
    fs, enc, app, fac, rapp, rfac, trigger, processing_id, version, charsets, ack_of = _copied(msh)
    if not app:
        app = escape(sending_app, fs, enc)
        if not fac:
            fac = escape(sending_facility, fs, enc)
    elif not fac:
        fac = escape(sending_facility, fs, enc)
    cs = enc[0]
    msh9 = f"ACK{cs}{trigger}{cs}ACK" if trigger else "ACK"
    tail = f"{fs}{fs}{fs}{fs}{fs}{fs}{enc[1].join(charsets)}" if charsets else ""
    head = (f"MSH{fs}{enc}{fs}{app}{fs}{fac}{fs}{rapp}{fs}{rfac}{fs}{timestamp}{fs}{fs}{msh9}{fs}"
            f"{control_id}{fs}{processing_id}{fs}{version}{tail}\r")
    if text:
        msa = f"MSA{fs}{code}{fs}{ack_of}{fs}{escape(text, fs, enc)}\r"
    else:
        msa = f"MSA{fs}{code}{fs}{ack_of}\r"
    out = head + msa
    if errors:
        out += "".join([_err_segment(err, fs, enc) for err in errors])
    if out.isascii():
        return out.encode("ascii")
    return _build_ack_exact(msh, code, control_id=control_id, timestamp=timestamp, errors=errors,
                            text=text, sending_app=sending_app, sending_facility=sending_facility)


def _err_segment(err: AckError, fs: str, enc: str) -> str:
    cs = enc[0]
    loc = _loc_to_erl(err.location, fs, enc) if err.location else ""
    name = escape(TABLE_0357.get(err.code, ""), fs, enc)
    app = ""
    if err.app_code:
        app = (f"{escape(err.app_code, fs, enc)}{cs}{escape(err.app_text or '', fs, enc)}"
               f"{cs}{escape(err.app_system, fs, enc)}")
    diag = escape(err.diagnostic, fs, enc) if err.diagnostic else ""
    return (f"ERR{fs}{fs}{loc}{fs}{escape(err.code, fs, enc)}{cs}{name}{cs}HL70357{fs}"
            f"{escape(err.severity or 'E', fs, enc)}{fs}{app}{fs}{fs}{diag}{fs}{escape(err.text, fs, enc)}\r")


def _build_ack_exact(msh: MSHInfo | None, code: str, *, control_id: str, timestamp: str,
                     errors: Sequence[AckError] = (), text: str | None = None,
                     sending_app: str = "MINIPFI", sending_facility: str = "") -> bytes:
    """:func:`build_ack` for an ACK that is not pure ASCII. Values copied from the original MSH
    (applications, facilities, MSH-9.2, MSH-10 into MSA-2, MSH-11, MSH-12, MSH-18) go back as the sender's bytes, whatever the charset: ``read_msh``
    holds them as latin-1 text, one character per byte, so they are written back with latin-1.
    Only what the engine writes (its application name, texts, codes) is encoded with the MSH-18
    codec."""
    fs, enc, app, fac, rapp, rfac, trigger, processing_id, version, charsets, ack_of = _copied(msh)
    codec = "ascii"
    msh18 = ""
    if charsets:
        msh18 = enc[1].join(charsets)
        try:
            codec = codec_for(charsets[0], "ASCII")
        except HL7Error:
            codec = "ascii"
    parts: list[bytes] = []

    def copied(value: str) -> None:  # the sender's bytes, back as they came
        parts.append(value.encode("latin-1", "replace"))

    def written(value: str) -> None:  # the engine's own text, in the message's charset
        parts.append(value.encode("ascii") if value.isascii() else _encode(value, codec, enc[2]))

    copied(f"MSH{fs}{enc}{fs}")
    if not app:
        written(escape(sending_app, fs, enc))
        copied(fs)
        written(escape(sending_facility, fs, enc) if not fac else "")
        if fac:
            copied(fac)
    else:
        copied(f"{app}{fs}")
        if fac:
            copied(fac)
        else:
            written(escape(sending_facility, fs, enc))
    cs = enc[0]
    copied(f"{fs}{rapp}{fs}{rfac}{fs}")
    written(f"{timestamp}{fs}{fs}ACK")
    if trigger:
        copied(f"{cs}{trigger}{cs}")
        written("ACK")
    copied(fs)
    written(control_id)
    copied(f"{fs}{processing_id}{fs}{version}")
    if charsets:
        copied(f"{fs}{fs}{fs}{fs}{fs}{fs}{msh18}")
    copied("\r")
    written(f"MSA{fs}{code}{fs}")
    copied(ack_of)
    if text:
        written(f"{fs}{escape(text, fs, enc)}")
    written("\r")
    for err in errors:
        written(_err_segment(err, fs, enc))
    return b"".join(parts)


# --------------------------------------------------------------------------- read

@dataclass
class AckInfo:
    code: str                     # MSA-1, upper case
    control_id: str               # MSH-10 of the ACK
    ack_of: str                   # MSA-2
    text: str                     # MSA-3, unescaped
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (code, severity, text)


def _split_segments(text: str) -> list[str]:
    return [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s]


def read_ack(payload: bytes) -> AckInfo:
    """Read a partner's ACK. Lenient on MSH (only MSH-1/2/10 are used); ``HL7Error("100")`` without MSA.

    Error codes come from ERR-3.1 (v2.5) or ERR-1.4.1 (v2.3 ELD); the text from ERR-8, else ERR-3.2,
    else ERR-1.4.2; severity from ERR-4 (default ``E``).
    """
    if isinstance(payload, (bytearray, memoryview)):
        payload = bytes(payload)
    if isinstance(payload, bytes):
        if payload[:3] == b"\xef\xbb\xbf":
            payload = payload[3:]
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            text = payload.decode("latin-1")
    else:
        text = str(payload)
    segs = _split_segments(text)
    if not segs or not segs[0].startswith("MSH") or len(segs[0]) < 8:
        raise HL7Error("100", "acknowledgement does not start with an MSH segment", "MSH^1")
    head = segs[0]
    fs = head[3]
    f = head.split(fs)
    enc = f[1] if len(f) > 1 and 4 <= len(f[1]) <= 5 else _DEFAULT_ENC
    cs, sub = enc[0], enc[3]
    control_id = f[9] if len(f) > 9 else ""
    msa = None
    errors: list[tuple[str, str, str]] = []
    for seg in segs[1:]:
        sid = seg[:3]
        if sid == "MSA" and msa is None:
            msa = seg.split(fs)
        elif sid == "ERR":
            e = seg.split(fs)
            err3 = e[3].split(cs) if len(e) > 3 and e[3] else []
            code = err3[0] if err3 else ""
            etext = err3[1] if len(err3) > 1 else ""
            if not code and len(e) > 1 and e[1]:
                eld = e[1].split(enc[1])[0].split(cs)
                if len(eld) > 3:
                    ce = eld[3].split(sub)
                    code = ce[0]
                    etext = etext or (ce[1] if len(ce) > 1 else "")
            sev = e[4] if len(e) > 4 and e[4] else "E"
            if len(e) > 8 and e[8]:
                etext = e[8]
            errors.append((unescape(code, fs, enc), unescape(sev, fs, enc), unescape(etext, fs, enc)))
    if msa is None:
        raise HL7Error("100", "acknowledgement has no MSA segment", "MSA")
    code = msa[1].strip().upper() if len(msa) > 1 else ""
    if not code:
        raise HL7Error("101", "MSA-1 (acknowledgment code) missing", "MSA^1^1")
    ack_of = msa[2] if len(msa) > 2 else ""
    mtext = unescape(msa[3], fs, enc) if len(msa) > 3 else ""
    return AckInfo(code, control_id, ack_of, mtext, errors)
