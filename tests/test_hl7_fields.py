"""Split-based field access (get_field/set_field/parse_path) and split_segments."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.hl7 import FieldPath, get_field, parse_path, set_field, split_segments

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ANS = SHARED / "corpus" / "ans-hl7v2"
ADMISSION = ANS / "SGL" / "admission.er7"
MDM = ANS / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1" / "MDM" / \
    "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1.er7"


@pytest.mark.parametrize("sep", [b"\r", b"\n", b"\r\n"])
def test_split_segments(sep):
    raw = sep.join([b"MSH|^~\\&|A", b"PID|1", b"PV1|1"]) + sep
    assert split_segments(raw) == [b"MSH|^~\\&|A", b"PID|1", b"PV1|1"]
    assert split_segments(raw.decode()) == ["MSH|^~\\&|A", "PID|1", "PV1|1"]
    assert split_segments(b"") == []


@pytest.mark.parametrize("path, expected", [
    ("MSH-1", "|"),
    ("MSH-2", "^~\\&"),
    ("MSH-3", "GAM"),
    ("MSH-9", "ADT^A01^ADT_A01"),
    ("MSH-9.2", "A01"),
    ("MSH-12.1", "2.5"),
    ("MSH-12.3", "2.11"),
    ("PID-1", "1"),
    ("PID-2", ""),
    ("PID-3", "000003^^^CHU-X&000897406&N^PI~279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS^^20101207"),
    ("PID-3.1", "000003"),
    ("PID-3[1].1", "000003"),
    ("PID-3[2].1", "279035121518989"),
    ("PID-3[2].5", "INS"),
    ("PID-3.4.2", "000897406"),
    ("PID-3[2].4.3", "ISO"),
    ("PID-3.4.4", None),
    ("PID-3[3].1", None),
    ("PID-5.1", "PAT-TROIS"),
    ("PID-3.99", None),
    ("PID-99", None),
    ("ZZZ-1", None),
    ("ZBE-4", "INSERT"),
    ("ZBE[2]-4", None),
])
def test_get_field_admission(path, expected):
    raw = ADMISSION.read_bytes()
    assert get_field(raw, path) == expected
    assert get_field(raw.decode("utf-8"), path) == expected
    assert get_field(raw.replace(b"\n", b"\r"), path) == expected


def test_get_field_segment_occurrence_and_encoding():
    raw = MDM.read_bytes()
    assert get_field(raw, "OBX-1") == "1"
    assert get_field(raw, "OBX[2]-3.1") == "MASQUE_PS"
    assert get_field(raw, "OBX[10]-3.2", encoding="utf-8") == "Accus\u00e9 de r\u00e9ception"
    assert get_field(raw, "OBX[10]-3.2").encode("latin-1").decode("utf-8") == "Accus\u00e9 de r\u00e9ception"


def test_get_field_other_delimiters():
    raw = b"MSH#$%*@#A#B#C#D#2024##ADT$A01#77#P#2.5\rPID#1##X$Y%Z$Q@R\r"
    assert get_field(raw, "MSH-9.2") == "A01"
    assert get_field(raw, "PID-3[2].2.2") == "R"
    assert get_field(raw, "MSH-1") == "#"


@pytest.mark.parametrize("path, fp", [
    ("PID-3", FieldPath("PID", 3)),
    ("PID-3.1", FieldPath("PID", 3, None, 1)),
    ("PID-3[2].1", FieldPath("PID", 3, 2, 1)),
    ("PID-3.4.2", FieldPath("PID", 3, None, 4, 2)),
    ("OBX[2]-5", FieldPath("OBX", 5, occurrence=2)),
    ("ZB1-10", FieldPath("ZB1", 10)),
    (" MSH-9.2 ", FieldPath("MSH", 9, None, 2)),
])
def test_parse_path(path, fp):
    assert parse_path(path) == fp
    assert parse_path(str(fp)) == fp


@pytest.mark.parametrize("bad", ["PID", "pid-3", "PID-0", "PID-3.0", "PID-3..1", "PID-3[0]", "PI-3", "PID-3.1.2.3",
                                 "PID-x", "MSH-2.1", "MSH-1[2]", "", "PID-3.", "PID-3[2", 42])
def test_parse_path_errors_are_readable(bad):
    with pytest.raises(ValueError) as ei:
        parse_path(bad)
    assert "path" in str(ei.value)


def test_set_field():
    text = ADMISSION.read_bytes().decode("utf-8")
    out = set_field(text, "PID-8", "M")
    assert get_field(out, "PID-8") == "M"
    assert out.count("\n") == text.count("\n") and "\r" not in out   # LF separators kept
    out = set_field(text, "PID-3[2].1", "1234567890123")
    assert get_field(out, "PID-3[2].1") == "1234567890123"
    assert get_field(out, "PID-3[2].5") == "INS" and get_field(out, "PID-3[1].1") == "000003"
    out = set_field(text, "PID-3.4.2", "999")
    assert get_field(out, "PID-3.4") == "CHU-X&999&N"
    out = set_field(text, "PID-3[4].2.3", "S")                       # creates reps, comps, subs
    assert get_field(out, "PID-3[3]") == "" and get_field(out, "PID-3[4]") == "^&&S"
    out = set_field(text, "EVN-20", "X")                              # extends the segment
    assert get_field(out, "EVN-20") == "X" and get_field(out, "EVN-19") == ""
    out = set_field(text, "MSH-10", "NEW1")
    assert get_field(out, "MSH-10") == "NEW1" and get_field(out, "MSH-9") == "ADT^A01^ADT_A01"
    out = set_field(text, "PID-5", "DOE^JOHN")
    assert get_field(out, "PID-5.2") == "JOHN"
    out = set_field(text, "ZZZ-2", "v")                               # new segment appended
    assert split_segments(out)[-1] == "ZZZ||v"
    with pytest.raises(ValueError):
        set_field(text, "ZZZ[2]-1", "v")
    with pytest.raises(ValueError):
        set_field(text, "MSH-1", "#")
    with pytest.raises(ValueError):
        set_field(text, "PID-", "x")
    # unchanged parts round-trip byte for byte
    assert set_field(text, "PID-8", get_field(text, "PID-8")) == text


def test_set_field_cr_message_with_trailing_separator():
    text = "MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\rPID|1\r"
    out = set_field(text, "PV1-2", "I")
    assert out == "MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\rPID|1\rPV1||I\r"
