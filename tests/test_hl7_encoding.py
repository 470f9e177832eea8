"""MSH-18 -> codec, strict decoding, cp1252 fallback, BOM."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.hl7 import HL7Error, codec_for, decode_message, read_msh, resolve_charset

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ADMISSION = SHARED / "corpus" / "ans-hl7v2" / "SGL" / "admission.er7"


def _msg(charset: str, body: str, codec: str) -> bytes:
    head = f"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5|||||FRA|{charset}\r".encode("ascii")
    return head + f"PID|1||{body}\r".encode(codec)


@pytest.mark.parametrize("value, codec, flagged", [
    ("UNICODE UTF-8", "utf-8", False),
    ("8859/1", "latin-1", False),
    ("8859/15", "iso8859-15", False),
    ("8859/2", "iso8859-2", False),
    ("8859/9", "iso8859-9", False),
    ("ASCII", "utf-8", False),
    ("", "utf-8", False),
    (None, "utf-8", False),
    ("ISO IR6", "ascii", False),
    ("UTF-8", "utf-8", True),
    ("utf8", "utf-8", True),
    ("ISO-8859-1", "latin-1", True),
    ("ISO_8859-15", "iso8859-15", True),
    ("ISO IR100", "latin-1", True),
    ("ISO_IR 100", "latin-1", True),
    ("windows-1252", "cp1252", True),
    ("CP1252", "cp1252", True),
    ("8859/15 ", "iso8859-15", False),
])
def test_codec_for(value, codec, flagged):
    assert codec_for(value) == codec
    c, flags = resolve_charset(value)
    assert c == codec
    assert any(f.startswith("alias:") for f in flags) is flagged


def test_default_can_be_changed():
    assert codec_for("", default="8859/1") == "latin-1"
    assert codec_for("ASCII", default="ASCII") == "ascii"
    assert codec_for(None, default="8859/15") == "iso8859-15"


@pytest.mark.parametrize("value", ["KLINGON", "UNICODE UTF-16", "UNICODE UTF-32", "UNICODE", "utf-16", "x" * 500])
def test_unknown_or_forbidden_charset_is_103(value):
    with pytest.raises(HL7Error) as ei:
        codec_for(value)
    assert ei.value.code == "103" and ei.value.location == "MSH^1^18"
    assert len(ei.value.text) < 200


def test_utf8_e_acute():
    raw = _msg("UNICODE UTF-8", "Andr\u00e9", "utf-8")
    d = decode_message(raw, read_msh(raw).charset)
    assert d.text.endswith("PID|1||Andr\u00e9\r") and d.codec == "utf-8" and d.flags == frozenset()


def test_corpus_utf8_file():
    raw = ADMISSION.read_bytes()
    d = decode_message(raw, read_msh(raw).charset)
    assert d.codec == "utf-8" and "PAT-TROIS" in d.text


def test_latin1():
    raw = _msg("8859/1", "Andr\u00e9 \u00e7a", "latin-1")
    d = decode_message(raw, "8859/1")
    assert "Andr\u00e9 \u00e7a" in d.text and d.codec == "latin-1" and not d.flags


def test_latin9_euro_and_oe():
    raw = _msg("8859/15", "\u0153uvre 10\u20ac", "iso8859-15")
    assert b"\xbduvre 10\xa4" in raw
    d = decode_message(raw, "8859/15")
    assert "\u0153uvre 10\u20ac" in d.text and d.codec == "iso8859-15" and not d.flags


def test_declared_latin1_with_cp1252_bytes_falls_back_with_flag():
    raw = _msg("8859/1", "\u0153uvre 10\u20ac \u00e9", "cp1252")
    assert b"\x9cuvre 10\x80 \xe9" in raw
    d = decode_message(raw, "8859/1")
    assert "\u0153uvre 10\u20ac \u00e9" in d.text
    assert d.codec == "cp1252" and "cp1252_fallback" in d.flags
    with pytest.raises(HL7Error) as ei:
        decode_message(raw, "8859/1", cp1252_fallback=False)
    assert ei.value.code == "102"


def test_invalid_utf8():
    raw = _msg("UNICODE UTF-8", "Andr\u00e9", "latin-1")  # lone 0xE9
    d = decode_message(raw, "UNICODE UTF-8")
    assert "Andr\u00e9" in d.text and "cp1252_fallback" in d.flags and d.codec == "cp1252"
    with pytest.raises(HL7Error) as ei:
        decode_message(raw, "UNICODE UTF-8", cp1252_fallback=False)
    assert ei.value.code == "102" and "offset" in ei.value.text
    # bytes undefined even in cp1252 (0x81) -> 102 even with the fallback
    with pytest.raises(HL7Error) as ei:
        decode_message(b"MSH|^~\\&|A\rPID|\x81\xff\r", "UNICODE UTF-8")
    assert ei.value.code == "102"


def test_bom_stripped_and_flagged():
    raw = b"\xef\xbb\xbf" + _msg("UNICODE UTF-8", "\u00e9", "utf-8")
    m = read_msh(raw)
    assert m.bom
    d = decode_message(raw, m.charset)
    assert d.text.startswith("MSH|") and "bom_stripped" in d.flags


def test_alias_flag_carried():
    raw = _msg("ISO IR100", "\u00e9", "latin-1")
    d = decode_message(raw, read_msh(raw).charset)
    assert d.flags == frozenset({"alias:ISO IR100"}) and "\u00e9" in d.text


def test_empty_msh18_uses_default():
    raw = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\rPID|1||\xc3\xa9\r"
    assert "\u00e9" in decode_message(raw, read_msh(raw).charset).text
    d = decode_message(raw, "", default="8859/1")
    assert "\u00c3\u00a9" in d.text and d.codec == "latin-1"


def test_message_codec_checks_bytes_without_decoding_ascii():
    from engine.hl7.encoding import message_codec

    assert message_codec(b"MSH|^~\\&|A\rPID|1\r", "8859/1") == ("latin-1", frozenset())
    assert message_codec("MSH|é".encode("utf-8"), "UNICODE UTF-8") == ("utf-8", frozenset())
    codec, flags = message_codec("Cœur".encode("cp1252"), "8859/1")
    assert codec == "cp1252" and "cp1252_fallback" in flags
    with pytest.raises(HL7Error) as e:
        message_codec(b"MSH|\xe9", "UNICODE UTF-8", cp1252_fallback=False)
    assert e.value.code == "102"
