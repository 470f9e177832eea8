"""ACK building (original/enhanced), accept-ACK matrix, control ids, read_ack, timing sanity."""
from __future__ import annotations

import threading
import time
import timeit
from dataclasses import replace
from pathlib import Path

import hl7
import pytest

from engine.hl7 import (TABLE_0357, AckError, ControlIdGenerator, HL7Error, accept_ack_wanted, ack_code,
                        ack_mode, build_ack, hl7_timestamp, is_ack, read_ack, read_msh)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ANS = SHARED / "corpus" / "ans-hl7v2"
ADMISSION = ANS / "SGL" / "admission.er7"
TS = "20240306111200+0100"


def _segs(ack: bytes) -> list[list[str]]:
    assert ack.endswith(b"\r") and b"\n" not in ack
    return [s.split("|") for s in ack.decode("latin-1").split("\r") if s]


def test_original_mode_aa_field_by_field():
    m = read_msh(ADMISSION.read_bytes())
    assert ack_mode(m) == "original"
    code = ack_code(m, "accept")
    assert code == "AA"
    ack = build_ack(m, code, control_id="PFI0001", timestamp=TS)
    segs = _segs(ack)
    assert [s[0] for s in segs] == ["MSH", "MSA"]
    msh = segs[0]
    assert msh[1] == "^~\\&"
    assert (msh[2], msh[3]) == ("DPI", "CHU-X")      # MSH-3/4 <- original MSH-5/6
    assert (msh[4], msh[5]) == ("GAM", "CHU-X")      # MSH-5/6 <- original MSH-3/4
    assert msh[6] == TS                              # MSH-7
    assert msh[8] == "ACK^A01^ACK"                   # MSH-9
    assert msh[9] == "PFI0001" != m.control_id       # MSH-10 new
    assert msh[10] == "D"                            # MSH-11 copied
    assert msh[11] == "2.5^FRA^2.11"                 # MSH-12 copied whole
    assert msh[17] == "UNICODE UTF-8"                # MSH-18 copied
    assert segs[1] == ["MSA", "AA", "3975"]
    # python-hl7 reads it too
    parsed = hl7.parse(ack.decode("ascii"))
    assert str(parsed.segment("MSA")[2]) == "3975"
    # our own reader
    info = read_ack(ack)
    assert (info.code, info.control_id, info.ack_of, info.text, info.errors) == ("AA", "PFI0001", "3975", "", [])
    ack_msh = read_msh(ack)
    assert is_ack(ack_msh) and not is_ack(m)
    assert ack_msh.message_type == "ACK^A01" and ack_msh.structure == "ACK"


def test_original_mode_ae_with_err_segments():
    m = read_msh(ADMISSION.read_bytes())
    errors = [
        AckError("101", "PID-3 is required | missing", location="PID^1^3"),
        AckError.from_error(HL7Error("203", "version 2.9 not supported", "MSH^1^12", severity="W")),
        AckError("207", "store unavailable"),
    ]
    ack = build_ack(m, ack_code(m, "error"), control_id="PFI0002", timestamp=TS, errors=errors,
                    text="rejected & logged")
    segs = _segs(ack)
    assert [s[0] for s in segs] == ["MSH", "MSA", "ERR", "ERR", "ERR"]
    assert segs[1] == ["MSA", "AE", "3975", "rejected \\T\\ logged"]
    e1, e2, e3 = segs[2:]
    assert e1[1] == ""                                         # ERR-1 unused in 2.5
    assert e1[2] == "PID^1^3"                                  # ERR-2 ERL
    assert e1[3] == "101^Required field missing^HL70357"      # ERR-3
    assert e1[4] == "E"                                        # ERR-4
    assert e1[8] == "PID-3 is required \\F\\ missing"          # ERR-8 escaped
    assert len(e1) == 9
    assert e2[2] == "MSH^1^12" and e2[3] == "203^Unsupported version id^HL70357" and e2[4] == "W"
    assert e3[2] == "" and e3[3] == "207^Application internal error^HL70357"
    info = read_ack(ack)
    assert info.code == "AE" and info.text == "rejected & logged"
    assert info.errors == [("101", "E", "PID-3 is required | missing"),
                           ("203", "W", "version 2.9 not supported"),
                           ("207", "E", "store unavailable")]


def test_enhanced_mode_codes_and_fields():
    raw = (b"MSH|^~\\&|LAB^1.2.250.1^ISO|LABFAC|EHR||20240101120000||ORU^R01^ORU_R01|MSG00042|P|2.5|||AL|NE||"
           b"8859/1\rPID|1\r")
    m = read_msh(raw)
    assert ack_mode(m) == "enhanced"
    assert [ack_code(m, o) for o in ("accept", "error", "reject")] == ["CA", "CE", "CR"]
    ack = build_ack(m, "CA", control_id="PFI0003", timestamp=TS, sending_facility="MINIFAC")
    msh, msa = _segs(ack)
    assert msh[2] == "EHR" and msh[3] == "MINIFAC"          # empty MSH-6 -> sending_facility arg
    assert msh[4] == "LAB^1.2.250.1^ISO" and msh[5] == "LABFAC"
    assert msh[8] == "ACK^R01^ACK" and msh[9] == "PFI0003" and msh[10] == "P" and msh[11] == "2.5"
    assert msh[17] == "8859/1"
    assert msa == ["MSA", "CA", "MSG00042"]


def test_no_msh_and_no_trigger_defaults():
    ack = build_ack(None, ack_code(None, "reject"), control_id="PFI0004", timestamp=TS,
                    errors=[AckError("100", "first segment is not MSH", location="MSH^1")])
    msh, msa, err = _segs(ack)
    assert msh[1] == "^~\\&" and msh[2] == "MINIPFI" and msh[3] == ""
    assert msh[4] == "" and msh[8] == "ACK" and msh[10] == "P" and msh[11] == "2.5"
    assert len(msh) == 12                                   # no MSH-18
    assert msa == ["MSA", "AR", ""]
    assert err[2] == "MSH^1" and err[3] == "100^Segment sequence error^HL70357"
    m = read_msh(b"MSH|^~\\&|A|B|||2024||QRY|Q1||2.3\r")
    msh, msa = _segs(build_ack(m, "AA", control_id="X", timestamp=TS, sending_app="ENG", sending_facility="F"))
    assert msh[2:6] == ["ENG", "F", "A", "B"]
    assert msh[8] == "ACK" and msh[10] == "P" and msh[11] == "2.3"


def test_other_delimiters_are_reused():
    m = read_msh(b"MSH#$%*@#A#B#C#D#2024##ADT$A01$ADT_A01#77#P#2.5\r")
    ack = build_ack(m, "AE", control_id="PFI1", timestamp=TS,
                    errors=[AckError("102", "bad # and $ here", location="PID^1^7")])
    segs = [s.split("#") for s in ack.decode().split("\r") if s]
    assert segs[0][:12] == ["MSH", "$%*@", "C", "D", "A", "B", TS, "", "ACK$A01$ACK", "PFI1", "P", "2.5"]
    assert segs[1] == ["MSA", "AE", "77"]
    assert segs[2][2] == "PID$1$7"
    assert segs[2][3] == "102$Data type error$HL70357"
    assert segs[2][8] == "bad *F* and *S* here"
    info = read_ack(ack)
    assert info.ack_of == "77" and info.errors == [("102", "E", "bad # and $ here")]


def test_injection_cannot_add_segment_or_field():
    m = read_msh(ADMISSION.read_bytes())
    ack = build_ack(m, "AE", control_id="PFI1", timestamp=TS, text="x\rMSA|AA|999\nEVIL",
                    errors=[AckError("207", "y\r\nERR|", location="not an ERL|x")])
    segs = _segs(ack)
    assert [s[0] for s in segs] == ["MSH", "MSA", "ERR"]
    assert len(segs[1]) == 4 and len(segs[2]) == 9
    assert segs[2][2] == "not an ERL\\F\\x"
    assert read_ack(ack).text == "x\rMSA|AA|999\nEVIL"


def test_output_encoding_follows_msh18():
    base = b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5|||||FRA|%s\rPID|1\r"
    err = [AckError("102", "caract\u00e8re \u0153uvre \u20ac")]
    ack = build_ack(read_msh(base % b"8859/15"), "AE", control_id="1", timestamp=TS, errors=err)
    assert "caract\u00e8re \u0153uvre \u20ac".encode("iso8859-15") in ack
    ack = build_ack(read_msh(base % b"UNICODE UTF-8"), "AE", control_id="1", timestamp=TS, errors=err)
    assert "caract\u00e8re \u0153uvre \u20ac".encode("utf-8") in ack
    # latin-1 cannot hold oe or euro: HL7 hex escapes (UTF-8 bytes of code points >= 256)
    ack = build_ack(read_msh(base % b"8859/1"), "AE", control_id="1", timestamp=TS, errors=err)
    assert b"caract\xe8re \\XC593\\uvre \\XE282AC\\" in ack
    # no MSH-18 -> ASCII with escapes (latin-1 byte for code points < 256)
    ack = build_ack(read_msh(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\r"), "AE", control_id="1",
                    timestamp=TS, errors=err)
    assert b"caract\\XE8\\re \\XC593\\uvre" in ack
    ack.decode("ascii")
    # unknown MSH-18 -> ASCII, MSH-18 still copied
    ack = build_ack(read_msh(base % b"KLINGON"), "AE", control_id="1", timestamp=TS, errors=err)
    assert b"|KLINGON\r" in ack and b"\\XE8\\" in ack


@pytest.mark.parametrize("msh15, msh16, expected", [
    # (accept, error, reject)
    ("", "", (True, True, True)),          # original mode: always
    ("AL", "", (True, True, True)),
    ("NE", "", (False, False, False)),
    ("ER", "", (False, True, True)),
    ("SU", "", (True, False, False)),
    ("", "AL", (True, True, True)),        # enhanced with empty MSH-15 = AL
    ("NE", "AL", (False, False, False)),
    ("er", "NE", (False, True, True)),
    ("XX", "", (True, True, True)),        # unknown -> answer
])
def test_accept_ack_wanted_matrix(msh15, msh16, expected):
    m = replace(read_msh(ADMISSION.read_bytes()), accept_ack=msh15, app_ack=msh16)
    assert tuple(accept_ack_wanted(m, o) for o in ("accept", "error", "reject")) == expected


def test_bad_outcome():
    m = read_msh(ADMISSION.read_bytes())
    with pytest.raises(ValueError):
        ack_code(m, "ok")
    with pytest.raises(ValueError):
        accept_ack_wanted(m, "ok")


def test_control_id_generator_unique_threadsafe_and_short():
    g = ControlIdGenerator()
    seen: list[str] = []
    lock = threading.Lock()

    def work():
        local = [g.next() for _ in range(5000)]
        with lock:
            seen.extend(local)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == len(seen) == 20000
    assert all(len(c) <= 20 and c.startswith("PFI") for c in seen)
    # a new generator ("restart") never goes back below the previous one's values: a burst may
    # run the counter ahead of the microsecond clock by up to one id per µs (20,000 ids: 20 ms),
    # and a real restart takes far longer than that, which the sleep stands for
    time.sleep(0.1)
    later = ControlIdGenerator().next()
    assert later > max(seen)
    assert len(ControlIdGenerator("ABCDEFG").next()) == 20
    with pytest.raises(ValueError):
        ControlIdGenerator("ABCDEFGH")
    with pytest.raises(ValueError):
        ControlIdGenerator("A|B")


def test_hl7_timestamp_shape():
    ts = hl7_timestamp(0)
    assert len(ts) == 19 and ts[:14].isdigit() and ts[14] in "+-"


def test_read_ack_corpus_and_v23_err():
    for path in sorted(ANS.rglob("ack.er7")):
        info = read_ack(path.read_bytes())
        assert info.code == "AA" and info.ack_of == "015" and info.control_id == "016"
    info = read_ack(b"MSH|^~\\&|A|B|C|D|2024||ACK|9|P|2.3\rMSA|AE|5|bad\rERR|PID^1^3^101&Required field missing\r")
    assert info.errors == [("101", "E", "Required field missing")]
    with pytest.raises(HL7Error) as ei:
        read_ack(b"MSH|^~\\&|A|B|C|D|2024||ACK|9|P|2.3\r")
    assert ei.value.code == "100"
    with pytest.raises(HL7Error):
        read_ack(b"garbage")
    with pytest.raises(HL7Error) as ei:
        read_ack(b"MSH|^~\\&|A|B|C|D|2024||ACK|9|P|2.3\rMSA||5\r")
    assert ei.value.code == "101"


def test_table_0357():
    for code in ("100", "101", "102", "103", "200", "201", "202", "203", "204", "205", "206", "207"):
        assert TABLE_0357[code]
    e = HL7Error("101", "MSH-9 missing", "MSH^1^9")
    assert (e.code, e.text, e.location, e.severity) == ("101", "MSH-9 missing", "MSH^1^9", "E")
    assert "Required field missing" in str(e)


def test_timing_sanity():
    raw = ADMISSION.read_bytes().replace(b"\n", b"\r")
    assert 700 <= len(raw) <= 900
    gen = ControlIdGenerator()

    def hot():
        m = read_msh(raw)
        return build_ack(m, ack_code(m, "accept"), control_id=gen.next(), timestamp=TS)

    n = 20000
    best = min(timeit.repeat(hot, number=n, repeat=3)) / n * 1e6
    print(f"\nread_msh + ControlIdGenerator.next + build_ack: {best:.2f} us per message ({len(raw)} bytes)")
    assert best < 100  # loose: CI machines vary; the target is < 15 us
