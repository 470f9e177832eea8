"""engine.transforms: registry, chain byte-exactness, the basic transforms."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from engine.hl7.escape import unescape
from engine.hl7.fields import get_field
from engine.transforms import (
    Chain,
    TransformContext,
    TransformError,
    build_chain,
    chain_from_json,
    register,
    registered,
    validate_specs,
)

ROOT = Path(__file__).resolve().parent.parent

MSG = (
    b"MSH|^~\\&|GAM|HOSP|RIS|IMG|20240315103000||ADT^A01^ADT_A01|C1|P|2.5|||||FRA|UNICODE UTF-8\r"
    b"EVN||20240315103000\r"
    b"PID|1||900000001^^^HOSP^PI~123^^^OTHER^PI||TEST^PATIENT||19800101|M\r"
    b"PV1|1|I|RADIO\r"
    b"ZBE|MVT-1^HOSP|20240315103000||INSERT|N\r"
    b"ZFA|1\r"
)


def ctx(codec="utf-8"):
    return TransformContext(message_id=1, channel="in", destination="ris", codec=codec)


def run(specs, raw=MSG, codec="utf-8"):
    return build_chain(specs)(raw, ctx(codec))


def segments(payload: bytes) -> list[bytes]:
    return [s for s in payload.split(b"\r") if s]


# ---------------------------------------------------------------------------------------------
# chain
# ---------------------------------------------------------------------------------------------


def test_empty_chain_returns_identical_bytes_object():
    raw = bytes(MSG)
    res = build_chain([])(raw, ctx())
    assert res.payload is raw and res.notes == []


def test_no_op_chain_returns_identical_bytes_object():
    raw = bytes(MSG)
    # setting a field to its current value, removing an absent segment, a passing filter
    specs = [
        {"type": "set_field", "field": "PV1-2", "value": "I"},
        {"type": "remove_segments", "segments": ["ZZZ"]},
        {"type": "filter", "field": "PV1-2", "in": ["I", "O"]},
    ]
    assert run(specs, raw).payload is raw


def test_untouched_bytes_survive_even_invalid_utf8_and_crlf():
    raw = MSG.replace(b"RADIO", b"RAD\xe9IO").replace(b"\r", b"\r\n")  # cp1252 byte in a UTF-8 message
    res = run([{"type": "set_field", "field": "MSH-5", "value": "PACS"}], raw)
    assert res.payload == raw.replace(b"|RIS|", b"|PACS|")


def test_chain_from_json_is_cached():
    js = '[{"field":"MSH-5","type":"set_field","value":"RIS"}]'
    assert chain_from_json(js) is chain_from_json(js)
    assert isinstance(chain_from_json(""), Chain) and len(chain_from_json("[]")) == 0


def test_build_chain_rejects_invalid_specs():
    with pytest.raises(ValueError, match="unknown transform type"):
        build_chain([{"type": "nope"}])


def test_validate_specs_problems():
    probs = validate_specs([
        {"type": "set_field", "field": "MSH-5", "value": "X"},
        {"type": "set_feild"},
        {"field": "MSH-5"},
        {"type": "filter", "field": "PV1-2", "in": ["I"], "extra": 1},
        {"type": "remove_segments", "segments": ["MSH"]},
        {"type": "set_field", "field": "MSH-2", "value": "x"},
        "oops",
    ])
    paths = [p.path for p in probs]
    assert paths == ["[1].type", "[2].type", "[3].extra", "[4].segments", "[5].field", "[6]"]
    assert validate_specs([]) == []
    assert {"set_field", "copy_field", "remove_segments", "filter"} <= set(registered())


def test_register_custom_bytes_transform_and_notes():
    class P(BaseModel):
        model_config = ConfigDict(extra="forbid")
        suffix: str

    @register("test_append_bytes", P, operates_on="bytes")
    def append(data: bytes, params: P, c, notes):
        notes.append("appended")
        return data + params.suffix.encode()

    res = run([{"type": "set_field", "field": "MSH-5", "value": "X"}, {"type": "test_append_bytes", "suffix": "ZZZ|1\r"}])
    assert res.payload.endswith(b"ZFA|1\rZZZ|1\r") and b"|X|IMG|" in res.payload
    assert res.notes == ["appended"]


def test_unencodable_value_raises_transform_error():
    with pytest.raises(TransformError):
        run([{"type": "set_field", "field": "MSH-5", "value": "RÉS"}], codec="ascii")


# ---------------------------------------------------------------------------------------------
# set_field
# ---------------------------------------------------------------------------------------------


def test_set_field_round_trip():
    res = run([{"type": "set_field", "field": "MSH-5", "value": "TELERADIO"}])
    assert res.payload == MSG.replace(b"|RIS|", b"|TELERADIO|")
    assert get_field(res.payload, "MSH-5") == "TELERADIO"


def test_set_field_component_and_padding():
    res = run([{"type": "set_field", "field": "PID-3[2].4", "value": "NEWAUTH"},
               {"type": "set_field", "field": "PV1-19.1", "value": "V42"}])
    assert get_field(res.payload, "PID-3[2].4") == "NEWAUTH"
    assert get_field(res.payload, "PID-3[1]") == "900000001^^^HOSP^PI"
    assert segments(res.payload)[3] == b"PV1|1|I|RADIO" + b"|" * 16 + b"V42"


def test_set_field_escapes_delimiters_and_cr():
    value = "A|B^C~D\\E&F\rPID|2||EVIL\nG"
    res = run([{"type": "set_field", "field": "PV1-3", "value": value}])
    segs = segments(res.payload)
    assert len(segs) == len(segments(MSG))  # no segment added
    assert [s[:3] for s in segs] == [s[:3] for s in segments(MSG)]
    raw = get_field(res.payload, "PV1-3")
    assert raw == "A\\F\\B\\S\\C\\R\\D\\E\\E\\T\\F\\X0D\\PID\\F\\2\\F\\\\F\\EVIL\\X0A\\G"
    assert unescape(raw) == value
    assert get_field(res.payload, "PV1-4") is None  # no field added either


def test_set_field_on_absent_segment_leaves_message_unchanged():
    raw = bytes(MSG)
    res = run([{"type": "set_field", "field": "OBR-4", "value": "X"}], raw)
    assert res.payload is raw
    assert res.notes == ["set_field: segment OBR absent, OBR-4 not set"]


def test_set_field_utf8_value():
    res = run([{"type": "set_field", "field": "PV1-3", "value": "RADIOLOGIE ÉTAGE 2"}])
    assert "RADIOLOGIE ÉTAGE 2".encode("utf-8") in res.payload


def test_set_field_encodes_with_message_codec():
    raw = MSG.replace(b"UNICODE UTF-8", b"8859/1")
    res = run([{"type": "set_field", "field": "PV1-3", "value": "ÉTAGE"}], raw, codec="latin-1")
    assert b"|\xc9TAGE" in res.payload


# ---------------------------------------------------------------------------------------------
# copy_field
# ---------------------------------------------------------------------------------------------


def test_copy_field():
    res = run([{"type": "copy_field", "from": "PID-3.1", "to": "PID-2.1"}])
    assert segments(res.payload)[2] == b"PID|1|900000001|900000001^^^HOSP^PI~123^^^OTHER^PI||TEST^PATIENT||19800101|M"
    # the rest is untouched
    assert res.payload.replace(b"PID|1|900000001|", b"PID|1||") == MSG


def test_copy_field_keeps_escapes_raw():
    raw = MSG.replace(b"TEST^PATIENT", b"O\\T\\BRIEN^PATIENT")
    res = run([{"type": "copy_field", "from": "PID-5.1", "to": "PV1-3"}], raw)
    assert get_field(res.payload, "PV1-3") == "O\\T\\BRIEN"


def test_copy_field_absent_source():
    raw = bytes(MSG)
    res = run([{"type": "copy_field", "from": "OBR-4", "to": "PV1-3"}], raw)
    assert res.payload is raw and res.notes == ["copy_field: OBR-4 absent, PV1-3 not set"]


# ---------------------------------------------------------------------------------------------
# remove_segments
# ---------------------------------------------------------------------------------------------


def test_remove_segments():
    res = run([{"type": "remove_segments", "segments": ["ZBE", "ZFA"]}])
    assert res.payload == MSG.replace(b"ZBE|MVT-1^HOSP|20240315103000||INSERT|N\rZFA|1\r", b"")
    assert res.notes == ["remove_segments: 2 segment(s) removed"]


def test_remove_segments_every_occurrence_and_lf_separators():
    raw = MSG.replace(b"\r", b"\n") + b"ZBE|2\n"
    res = run([{"type": "remove_segments", "segments": ["ZBE"]}], raw)
    assert b"ZBE" not in res.payload
    assert res.payload.startswith(b"MSH|") and res.payload.endswith(b"ZFA|1\n")


def test_remove_segments_refuses_msh():
    assert validate_specs([{"type": "remove_segments", "segments": ["MSH"]}])


# ---------------------------------------------------------------------------------------------
# filter
# ---------------------------------------------------------------------------------------------


def test_filter_keeps_matching():
    raw = bytes(MSG)
    assert run([{"type": "filter", "field": "PV1-2", "in": ["I", "O"]}], raw).payload is raw


def test_filter_drops_non_matching():
    res = run([{"type": "filter", "field": "PV1-2", "in": ["O"]},
               {"type": "set_field", "field": "MSH-5", "value": "NEVER"}])
    assert res.payload is None
    assert res.notes == ["filtered out by filter"]


def test_filter_absent_field_reads_empty():
    assert run([{"type": "filter", "field": "PV1-40", "in": ["X"]}]).payload is None
    assert run([{"type": "filter", "field": "PV1-40", "in": [""]}]).payload == MSG


def test_filter_compares_unescaped_value():
    raw = MSG.replace(b"PV1|1|I|RADIO", b"PV1|1|I|A\\T\\B")
    assert run([{"type": "filter", "field": "PV1-3", "in": ["A&B"]}], raw).payload == raw


@pytest.mark.parametrize("codec, hexed", [("utf-8", b"\\XC3A9\\"), ("latin-1", b"\\XE9\\")])
def test_filter_reads_hex_escapes_in_the_message_codec(codec, hexed):
    raw = MSG.replace(b"PV1|1|I|RADIO", b"PV1|1|I|CAF" + hexed)
    assert run([{"type": "filter", "field": "PV1-3", "in": ["CAF\u00c9"]}], raw, codec).payload is None
    assert run([{"type": "filter", "field": "PV1-3", "in": ["CAF\u00e9"]}], raw, codec).payload == raw


def test_sample_messages_pass_through_transforms():
    for name in ("adt_a28.hl7", "orm_o01.hl7"):
        raw = (ROOT / "samples" / name).read_bytes()
        assert raw.startswith(b"MSH|^~\\&|") and b"\n" not in raw
        res = run([{"type": "set_field", "field": "MSH-5", "value": "RIS2"}], raw)
        assert get_field(res.payload, "MSH-5") == "RIS2"
        assert res.payload.replace(b"|RIS2|", b"|RIS|", 1) == raw
