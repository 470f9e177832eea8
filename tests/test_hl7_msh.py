"""read_msh: the corpus, delimiter/required-field errors, the nHapi crash corpus, garbage, fuzz."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from engine.hl7 import HL7Error, MSHInfo, read_msh

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ANS = SHARED / "corpus" / "ans-hl7v2"
CORPUS_FILES = sorted(ANS.rglob("*.er7"))
ADMISSION = ANS / "SGL" / "admission.er7"


def test_corpus_is_there():
    assert len(CORPUS_FILES) >= 10
    assert ADMISSION.exists()


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: str(p.relative_to(ANS)))
def test_read_msh_on_corpus(path):
    raw = path.read_bytes()
    m = read_msh(raw)
    assert m.message_code and m.trigger and m.control_id and m.version
    assert m.field_sep == "|" and m.encoding_chars == "^~\\&"
    assert m.segment_sep in ("\r", "\n", "\r\n")
    if b"\r" not in raw:
        assert m.segment_sep == "\n"
    assert m.version.startswith("2.")
    assert "|" not in m.message_type


def test_admission_fields():
    m = read_msh(ADMISSION.read_bytes())
    assert m == MSHInfo(
        field_sep="|", encoding_chars="^~\\&", sending_app="GAM", sending_facility="CHU-X",
        receiving_app="DPI", receiving_facility="CHU-X", timestamp="20240306111154",
        message_code="ADT", trigger="A01", structure="ADT_A01", control_id="3975", processing_id="D",
        version="2.5", version_raw="2.5^FRA^2.11", accept_ack="", app_ack="", charset="UNICODE UTF-8",
        charsets=("UNICODE UTF-8",), profile="2.11^IHE_FRANCE-2.11-PAM", segment_sep="\n", bom=False,
    )
    assert m.message_type == "ADT^A01"


def test_separators_and_bom():
    base = ADMISSION.read_bytes()
    cr = base.replace(b"\n", b"\r")
    crlf = base.replace(b"\n", b"\r\n")
    assert read_msh(cr).segment_sep == "\r"
    assert read_msh(crlf).segment_sep == "\r\n"
    assert read_msh(crlf).profile == "2.11^IHE_FRANCE-2.11-PAM"
    m = read_msh(b"\xef\xbb\xbf" + cr)
    assert m.bom is True and m.control_id == "3975"
    # single segment, no terminator
    m = read_msh(b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|X1|P|2.3")
    assert (m.message_type, m.control_id, m.version, m.segment_sep) == ("ADT^A08", "X1", "2.3", "\r")
    # blank lines before MSH are tolerated
    assert read_msh(b"\r\n" + cr).control_id == "3975"


def test_components_kept_and_optional_fields():
    raw = (b"MSH|^~\\&|APP^1.2.3^ISO|FAC^4.5^ISO|R|RF|20240101||ORU^R01|C9|P^T|2.5.1|||AL|NE||"
           b"8859/15~UNICODE UTF-8|||PROF^X\rPID|1\r")
    m = read_msh(raw)
    assert m.sending_app == "APP^1.2.3^ISO" and m.sending_facility == "FAC^4.5^ISO"
    assert m.structure == "" and m.message_type == "ORU^R01"
    assert m.processing_id == "P" and m.version == "2.5.1" and m.version_raw == "2.5.1"
    assert (m.accept_ack, m.app_ack) == ("AL", "NE")
    assert m.charset == "8859/15" and m.charsets == ("8859/15", "UNICODE UTF-8")
    assert m.profile == "PROF^X"


def test_other_delimiters_and_v27_truncation_char():
    m = read_msh(b"MSH#$%*@#A#B#C#D#2024##ADT$A01$ADT_A01#77#P#2.5\r")
    assert m.field_sep == "#" and m.encoding_chars == "$%*@"
    assert (m.message_code, m.trigger, m.structure) == ("ADT", "A01", "ADT_A01")
    m = read_msh(b"MSH|^~\\&#|A|B|C|D|2024||ADT^A01|77|P|2.7\r")
    assert m.encoding_chars == "^~\\&#" and m.version == "2.7"


def test_message_type_without_trigger():
    m = read_msh(b"MSH|^~\\&|A|B|C|D|2024||ACK|77|P|2.3\rMSA|AA|1\r")
    assert m.message_type == "ACK" and m.trigger == ""


def test_missing_processing_id_tolerated():
    m = read_msh(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|77||2.5\r")
    assert m.processing_id == ""


def _err(raw):
    with pytest.raises(HL7Error) as ei:
        read_msh(raw)
    e = ei.value
    assert e.text and e.severity == "E"
    return e.code, e.location


@pytest.mark.parametrize("raw, code, location", [
    (b"", "100", "MSH^1"),
    (b"\xef\xbb\xbf", "100", "MSH^1"),
    (b"\r\n\r\n", "100", "MSH^1"),
    (b"PID|1||123\rMSH|^~\\&|A\r", "100", "MSH^1"),
    (b"MSH", "101", "MSH^1^1"),
    (b"MSH\r", "101", "MSH^1^1"),
    (b"MSH|", "101", "MSH^1^2"),
    (b"MSH||A|B", "101", "MSH^1^2"),
    (b"MSHA^~\\&A", "102", "MSH^1^1"),
    (b"MSH ^~\\& ", "102", "MSH^1^1"),
    (b"MSH|^~|A|B|C|D|2024||ADT^A01|1|P|2.5", "102", "MSH^1^2"),
    (b"MSH|^~\\|A|B|C|D|2024||ADT^A01|1|P|2.5", "102", "MSH^1^2"),
    (b"MSH|^~\\&#$|A|B", "102", "MSH^1^2"),
    (b"MSH|^^\\&|A|B|C|D|2024||ADT^A01|1|P|2.5", "102", "MSH^1^2"),
    (b"MSH|^~a&|A|B|C|D|2024||ADT^A01|1|P|2.5", "102", "MSH^1^2"),
    (b"MSH|^~\\&|A|B|C|D|2024|||1|P|2.5\r", "101", "MSH^1^9"),
    (b"MSH|^~\\&|A|B|C|D|2024||^A01|1|P|2.5\r", "101", "MSH^1^9^1^1"),
    (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01||P|2.5\r", "101", "MSH^1^10"),
    (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|\r", "101", "MSH^1^12"),
    (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|^FRA\r", "101", "MSH^1^12"),
    (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P", "101", "MSH^1^12"),
    (b"MSH|^~\\&|A|B|C|D|2024||ADT^A01", "101", "MSH^1^10"),
])
def test_bad_msh(raw, code, location):
    assert _err(raw) == (code, location)


@pytest.mark.parametrize("raw, code", [
    # nHapi / fuzzing crash corpus
    (b"MSHH0\r", "102"),
    (b"MSH|0|||||||||||0", "102"),
    (b"MSH|^|||||||^A|||2.2\r^AA", "102"),
    (b"MSH|0|||||||00|||2.7", "102"),
    (b"MSH", "101"),
    (b"MSH|||||||||||||||||||||||||", "101"),
    (b"MSH|^~\\&||||||||||||||||||||", "101"),
    (b"\x00\x00\x00", "100"),
    (b"MSH\x00^~\\&", "102"),
    (b"MSH|^~\\&\r\r\r", "101"),
])
def test_crash_corpus(raw, code):
    assert _err(raw)[0] == code


def test_ten_megabytes_of_garbage_is_linear():
    rnd = random.Random(1234)
    garbage = rnd.randbytes(10 * 1024 * 1024)
    cases = [
        garbage,
        b"MSH" + garbage,
        b"MSH|^~\\&|" + garbage.replace(b"\r", b"x").replace(b"\n", b"y"),  # no segment end at all
        b"MSH|^~\\&|A|B|C|D|E||ADT^A01|1|P|2.5|" + b"|" * (10 * 1024 * 1024),
        b"\n" * (10 * 1024 * 1024),
    ]
    for raw in cases:
        t0 = time.perf_counter()
        try:
            result = read_msh(raw)
        except HL7Error:
            pass
        else:
            assert isinstance(result, MSHInfo)
        assert time.perf_counter() - t0 < 2.0


def test_fuzz_never_raises_anything_else():
    rnd = random.Random(int(os.environ.get("HL7_FUZZ_SEED", "42")))
    base = ADMISSION.read_bytes()[:300]
    alphabet = b"|^~\\&\r\nMSH0A \x00\xff#"
    for _ in range(3000):
        data = bytearray(base[: rnd.randrange(0, len(base))])
        for _ in range(rnd.randrange(1, 8)):
            op = rnd.randrange(3)
            pos = rnd.randrange(0, len(data) + 1)
            if op == 0 and data:
                del data[min(pos, len(data) - 1)]
            elif op == 1:
                data.insert(pos, rnd.choice(alphabet))
            elif data:
                data[min(pos, len(data) - 1)] = rnd.randrange(256)
        try:
            m = read_msh(bytes(data))
        except HL7Error as e:
            assert e.code in {"100", "101", "102"}
        else:
            assert m.message_code and m.control_id and m.version


def test_non_bytes_inputs():
    assert read_msh(bytearray(ADMISSION.read_bytes())).control_id == "3975"
    assert read_msh(memoryview(ADMISSION.read_bytes())).control_id == "3975"
    with pytest.raises(HL7Error):
        read_msh(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"MSH|^~\xb4&|A|B|C|D|1||ADT^A01|X|P|2.5\r",   # escape char 0xB4
                                 b"MSH\xa6^~\\&\xa6A\xa6B\xa6C\xa6D\xa61\xa6\xa6ADT^A01\xa6X\xa6P\xa62.5\r"])
def test_non_ascii_delimiters_are_refused(raw):
    # found by fuzzing: the ACK builder could not write a non-ASCII escape character back
    with pytest.raises(HL7Error) as e:
        read_msh(raw)
    assert e.value.code == "102"
