"""The reading layer (engine.hl7.message): numbering, splitting, and agreement with python-hl7."""
from __future__ import annotations

from pathlib import Path

import hl7
import pytest

from engine.hl7 import HL7Error, get_field
from engine.hl7.message import Delimiters, Message

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ANS = SHARED / "corpus" / "ans-hl7v2"
CORPUS = sorted(p for p in ANS.rglob("*") if p.suffix in (".er7", ".hl7"))
ADMISSION = ANS / "SGL" / "admission.er7"


def _pyhl7(raw: bytes) -> hl7.Message:
    text = raw.decode("utf-8").lstrip("\ufeff")
    return hl7.parse("\r".join(s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip()))


def test_corpus_is_there():
    assert len(CORPUS) >= 20


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_every_leaf_agrees_with_python_hl7(path):
    """Each sub-component read here is python-hl7's leaf at the same 1-based address."""
    raw = path.read_bytes()
    ours, theirs = Message.parse(raw, "utf-8"), _pyhl7(raw)
    assert [s.name for s in ours] == [str(s[0]) for s in theirs]
    checked = 0
    for seg in ours:
        for f in range(1, len(seg) + 1):
            if seg.name == "MSH" and f in (1, 2):
                assert seg.field(f) == theirs.extract_field("MSH", 1, f)
                continue
            for r, rep in enumerate(seg.repetitions(f), 1):
                for c, comp in enumerate(seg.delims.components(rep), 1):
                    for s, sub in enumerate(seg.delims.subcomponents(comp), 1):
                        assert seg.component(f, c, s, rep=r) == sub
                        if seg.delims.escape_char not in sub:  # python-hl7 unescapes its leaves
                            assert theirs.extract_field(seg.name, seg.occurrence, f, r, c, s) == sub
                            checked += 1
    assert checked > 10


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_get_agrees_with_the_hot_path_get_field(path):
    raw = path.read_bytes()
    m = Message.parse(raw, "utf-8")
    paths = ["MSH-1", "MSH-2", "MSH-9", "MSH-9.2", "MSH-21[2].1", "PID-3", "PID-3[2].4.2", "PID-5.1",
             "PID-99", "OBX[2]-3.1", "OBX[3]-5", "OBX[40]-1", "ZZZ-1", "PID-3.4.9", "PID-3[9].1"]
    for p in paths:
        assert m.get(p) == get_field(raw, p, encoding="utf-8"), p


def test_numbering_and_values():
    m = Message.parse(ADMISSION.read_bytes(), "utf-8")
    msh, pid = m.segment("MSH"), m.segment("PID")
    assert (msh.field(1), msh.field(2), msh.field(9)) == ("|", "^~\\&", "ADT^A01^ADT_A01")
    assert msh.component(9, 2) == "A01" and msh.component(2, 1) == "^~\\&"
    assert pid.repetitions(3)[1].startswith("279035121518989^")
    assert pid.component(3, 4, 2, rep=2) == "1.2.250.1.213.1.4.10"
    assert pid.component(3, 4, 9) == "" and pid.component(3, 1, rep=9) == "" and pid.field(99) == ""
    assert pid.repetitions(2) == []
    assert m.segment("ZBE", 2) is None and m.all("ZZZ") == [] and m.segment("NOPE") is None
    assert repr(pid) == "<Segment PID #1>"  # never the content


def test_occurrences_escapes_and_other_delimiters():
    text = "MSH#$%*@#A#B\rOBX#1#a*b$c\nOBX#2#x@y*F*z%r2\r\n\r\nZZZ\r"
    m = Message(text)
    assert m.delims.field == "#" and m.delims.component == "$" and m.delims.subcomponent == "@"
    assert [(s.name, s.occurrence, s.index) for s in m] == [("MSH", 1, 0), ("OBX", 1, 1), ("OBX", 2, 2), ("ZZZ", 1, 3)]
    assert m.get("OBX[2]-2") == "x@y*F*z%r2"
    assert m.get("OBX[2]-2.1.2") == "y*F*z" and m.value("OBX[2]-2.1.2") == "y#z"
    assert m.get("OBX[2]-2[2]") == "r2" and m.get("OBX[2]-2[3]") is None
    assert m.segment("OBX", 2).value(2, 1, 2) == "y#z"
    assert m.value("MSH-1") == "#" and m.value("MSH-2") == "$%*@"
    assert m.segment("ZZZ").field(1) == "" and len(m.segment("ZZZ")) == 0


def test_bom_framing_and_bytes_round_trip():
    raw = b"\x0b\xef\xbb\xbfMSH|^~\\&|A\rPID|1||X\xff^^^Y\r\x1c\r"
    m = Message.parse(raw, "utf-8")
    assert [s.name for s in m] == ["MSH", "PID"]
    assert m.encode(m.segment("PID").component(3, 1)) == b"X\xff"   # invalid utf-8 kept as bytes
    assert m.value("PID-3.4") == "Y"


def test_hex_escape_uses_the_message_charset():
    m = Message("MSH|^~\\&|A\rNTE|1||caf\\XC3A9\\", "utf-8")
    assert m.value("NTE-3") == "caf\u00e9"
    assert Message("MSH|^~\\&|A\rNTE|1||caf\\XE9\\", "latin-1").value("NTE-3") == "caf\u00e9"


@pytest.mark.parametrize("text", ["", "\r\n", "PID|1", "MSH|^~", "EVN|x\rMSH|^~\\&|A"])
def test_not_a_message(text):
    with pytest.raises(HL7Error) as e:
        Message(text)
    assert e.value.code == "100" and "MSH" in e.value.text


def test_delimiters():
    d = Delimiters("|", "^~\\&#")
    assert d.truncation == "#" and d.encoding == "^~\\&#"
    assert Delimiters("|", "^~").encoding == "^~\\&"          # incomplete MSH-2: defaults fill in
    assert d.repetitions("") == [] and d.repetitions("a~b") == ["a", "b"]
    assert d.component_of("a^b&c^d", 2, 2) == "c" and d.component_of("a", 3) == "" and d.component_of("a^b", 2, 3) == ""
    assert d.unescape(d.escape("a|b^c#")) == "a|b^c#"


def test_text_of_a_repetition_in_hand():
    m = Message("MSH|^~\\&|A", "utf-8")
    assert m.text("a^b\\T\\c&d", 2) == "b&c&d" and m.text("a^b\\T\\c&d", 2, 2) == "d"
    assert m.text("a^b", 3) == "" and m.text("a^b", 2, 2) == "" and m.text("\\XC3A9\\", 1) == "\u00e9"


def test_lf_file_bom_and_crlf():
    """Moved from the former parse_full (python-hl7) tests: same file, same answers."""
    m = Message.parse(ADMISSION.read_bytes(), "utf-8")
    assert m.segment("MSH").field(10) == "3975"
    assert m.segment("PID").component(5, 1) == "PAT-TROIS"
    assert len(m.segments) == 6
    m = Message.parse(b"\xef\xbb\xbf" + ADMISSION.read_bytes().replace(b"\n", b"\r\n"), "utf-8")
    assert len(m.segments) == 6
    with pytest.raises(HL7Error):
        Message.parse(b"not hl7 at all", "utf-8")
    with pytest.raises(HL7Error) as ei:
        Message.parse(ADMISSION.read_bytes(), "no-such-codec")
    assert ei.value.code == "103"


@pytest.mark.parametrize("text, field", [
    ("MSH|^~\\&|A|B|C|D|1||ADT^A01|X|P|2.5\rPID|1||9^^^H^PI||ZZ\x00^AL\r", "PID-5"),
    ("MSH|^~\\&|A|B|C|D|1||ADT^A01|X|P|2.5\rPID|1||9^^^H^PI||ZZ\\X00\\^AL\r", "PID-5"),
    ("MSH|^~\\&|A|B|C|D|1||ADT^A01|X|P|2.5\rPID|1||9^^^H^PI||ZZ\\X4100\\^AL\r", "PID-5"),
    ("MSH|^~\\&|A|B|C|D|1||ADT^A01|X|P|2.5\rPID|1||9^^^H^PI||ZZ\\X41\\^AL\r", None),
    ("MSH|^~\\&|A|B|C|D|1||ADT^A01|X|P|2.5\rPID|1||9^^^H^PI||ZZ\\x00\\^AL\r", "PID-5"),
    ("MSH|^~#&|A|B|C|D|1||ADT^A01|X|P|2.5\rPID|1||9^^^H^PI||ZZ#X00#^AL\r", "PID-5"),
    ("MSH|^~|A|B|C|D|1||ADT^A01|X|P|2.5\rPID|1||9^^^H^PI||ZZ\\X00\\^AL\r", "PID-5"),  # "\\" by default
    ("MSH|^~\\X|A|B|C|D|1||ADT^A01|X|P|2.5\rPID|1||9^^^H^PI||ZZ^AL\r", None),  # MSH-2's own "\\X"
    ("MSH|^~\\&|A|B|C|D|1||ADT^A01|X|P|2.5\rPID|1||9^^^H^PI||ZZ^AL\r", None),
])
def test_nul_field_names_the_field_holding_a_nul(text, field):
    assert Message(text, "utf-8").nul_field() == field
