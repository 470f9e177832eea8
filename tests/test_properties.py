"""Property tests of the parsers that read untrusted input: whatever the bytes, each target returns
its result or raises its documented error type, and nothing else.

Targets and their documented errors (module docstrings):

* ``mllp.framing.MLLPFramer.feed``: never raises;
* ``engine.hl7.msh.read_msh``: :class:`HL7Error`;
* ``engine.hl7.ack.build_ack`` (never raises for an MSH ``read_msh`` accepted) and ``read_ack``
  (:class:`HL7Error`); MSA-2 is the sender's MSH-10 bytes whatever MSH-18;
* ``engine.identity.pamfr.parse_adt``: :class:`IdentityError`;
* ``engine.reports.cisis.parse_report``: ``ValueError`` (no MSH at all);
* ``engine.cda.header.read_header``: ``etree.XMLSyntaxError`` or ``ValueError``;
  ``engine.cda.validation.CdaValidator.validate``: never raises (a report);
* ``engine.config.load_config_text``: :class:`ConfigError`.

The inputs are random bytes and mutations (bytes replaced, inserted, deleted, fields swapped for
random text) of valid messages from the ANS example sets. The same targets run for longer under
coverage-guided fuzzing (``make fuzz``, ``tests/fuzz/``).
"""
from __future__ import annotations

import base64
import dataclasses

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from engine.cda.header import read_header
from engine.cda.validation import CdaValidator
from engine.config import ConfigError, load_config_text
from engine.hl7.ack import AckError, build_ack, read_ack
from engine.hl7.errors import HL7Error
from engine.hl7.msh import read_msh
from engine.identity import IdentityError, parse_adt
from engine.reports.cisis import parse_report
from mllp.framing import EB, SB, Frame, FrameTooLarge, MLLPFramer, encode_frame
from tests.fuzz import seeds

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw, seed_list: list[bytes]):
    """A seed with a few random edits: bytes replaced, inserted or deleted, a field's text changed."""
    data = bytearray(draw(st.sampled_from(seed_list)))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["replace", "insert", "delete", "field"]))
        chunk = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
            [b"\x00", b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b"\xc3", b"\xff", b"<", b"&e;", b"=="]))
        if op == "replace":
            data[pos:pos + len(chunk)] = chunk
        elif op == "insert":
            data[pos:pos] = chunk
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            end = data.find(b"|", pos)
            end = len(data) if end < 0 else end
            data[pos:end] = draw(st.text(max_size=12)).encode("utf-8", "surrogatepass")
    return bytes(data)


def inputs(seed_list: list[bytes]):
    return st.binary(max_size=300) | mutated(seed_list)


# --------------------------------------------------------------------------- MLLP framer

@FAST
@given(payloads=st.lists(st.binary(max_size=60).map(lambda b: b.replace(bytes([SB]), b"").replace(bytes([EB]), b"")),
                         max_size=5),
       cuts=st.lists(st.integers(0, 400), max_size=6), lenient=st.booleans())
def test_framer_gives_back_each_payload_whatever_the_chunking(payloads, cuts, lenient):
    stream = b"".join(encode_frame(p) for p in payloads)
    framer = MLLPFramer(lenient_end=lenient)
    events = []
    last = 0
    for cut in sorted(c for c in cuts if c <= len(stream)) + [len(stream)]:
        events += framer.feed(stream[last:cut])
        last = cut
    assert [e.payload for e in events if isinstance(e, Frame)] == payloads


@FAST
@given(chunks=st.lists(st.binary(max_size=80) | st.sampled_from([b"\x0b", b"\x1c", b"\x1c\r", b"\r"]), max_size=12),
       size=st.integers(1, 64), lenient=st.booleans())
def test_framer_never_raises_and_respects_its_size_limit(chunks, size, lenient):
    framer = MLLPFramer(max_frame_size=size, lenient_end=lenient)
    for chunk in chunks:
        for event in framer.feed(chunk):
            if isinstance(event, Frame):
                assert len(event.payload) <= size
            if isinstance(event, FrameTooLarge):
                assert framer.dead
        assert framer.buffered <= size + 1


# --------------------------------------------------------------------------- read_msh, ACK

@FAST
@given(raw=inputs(seeds.HL7))
def test_read_msh_raises_only_hl7error(raw):
    try:
        read_msh(raw)
    except HL7Error:
        pass


CHARSETS = ["", "UNICODE UTF-8", "8859/1", "ASCII", "UNICODE UTF-8~8859/1", "8859/15", "UTF-16", "ISO-IR 87",
            "BOGUS", "UNICODE\x01UTF-8", "8859/1~UNICODE UTF-8"]


@FAST
@given(control_id=st.binary(min_size=1, max_size=20).filter(lambda b: not set(b) & set(b"|\r\n\x00")),
       charset=st.sampled_from(CHARSETS) | st.text(max_size=10).filter(lambda t: not set(t) & set("|\r\n\x00")),
       app=st.text(max_size=8).filter(lambda t: not set(t) & set("|\r\n\x00")),
       text=st.text(max_size=30), err_text=st.text(max_size=30),
       location=st.sampled_from([None, "MSH^1^10", "PID^1^3^1^1", "x^y"]),
       code=st.sampled_from(["AA", "AE", "AR", "CA", "CE", "CR"]))
def test_ack_msa2_is_the_senders_msh10_and_the_ack_reads_back(control_id, charset, app, text, err_text,
                                                              location, code):
    msg = (b"MSH|^~\\&|" + app.encode("utf-8") + b"|FAC|PFI|CHU|20240101||ADT^A01^ADT_A01|" + control_id
           + b"|P|2.5||||||" + charset.encode("utf-8") + b"\rPID|1\r")
    try:
        msh = read_msh(msg)
    except HL7Error:
        return
    ack = build_ack(msh, code, control_id="PFI1", timestamp="20240101000000", text=text or None,
                    errors=[AckError("207", err_text, "E", location, app_code="906", app_text=err_text)])
    (msa,) = [s for s in ack.split(b"\r") if s.startswith(b"MSA")]
    assert msa.split(b"|")[2] == control_id
    info = read_ack(ack)
    assert info.code == code and info.control_id == "PFI1"
    assert len(info.errors) == 1 and info.errors[0][0] == "207"


@FAST
@given(raw=inputs(seeds.ACKS))
def test_read_ack_raises_only_hl7error(raw):
    try:
        read_ack(raw)
    except HL7Error:
        pass


@FAST
@given(raw=inputs(seeds.HL7))
def test_build_ack_answers_every_msh_read_msh_accepts(raw):
    try:
        msh = read_msh(raw)
    except HL7Error:
        return
    ack = build_ack(msh, "AE", control_id="PFI1", timestamp="20240101000000",
                    errors=[AckError("102", "bad", "E", "MSH^1^2")])
    read_ack(ack)
    (msa,) = [s for s in ack.split(b"\r") if s.startswith(b"MSA")]
    assert msa.split(msh.field_sep.encode("latin-1"))[2] == msh.control_id.encode("latin-1")


# --------------------------------------------------------------------------- PAM France, CI-SIS

def _strings(value):
    if isinstance(value, str):
        yield value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _strings(getattr(value, f.name))
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)


@FAST
@given(raw=inputs(seeds.ADT) | mutated(seeds.ADT).map(lambda b: b.replace(b"^", b"\\X00\\", 1)),
       codec=st.sampled_from(["utf-8", "latin-1", "ascii"]))
def test_parse_adt_raises_only_identity_error_and_never_keeps_a_nul(raw, codec):
    try:
        event = parse_adt(raw, codec)
    except IdentityError:
        return
    assert not any("\x00" in s for s in _strings(event))  # the registry's text columns refuse it


@SLOW
@given(raw=inputs(seeds.REPORTS), codec=st.sampled_from(["utf-8", "latin-1"]))
def test_parse_report_raises_only_value_error(raw, codec):
    try:
        sub = parse_report(raw, codec)
    except ValueError:
        return
    assert sub.errors or "\\u0000" not in sub.model_dump_json()  # a NUL is always an error


@SLOW
@given(cda=mutated(seeds.CDA))
def test_parse_report_with_a_broken_cda_never_raises(cda):
    msg = seeds.REPORTS[0]
    start = msg.index(b"^text^XML^Base64^") + len(b"^text^XML^Base64^")
    end = msg.index(b"|", start)
    sub = parse_report(msg[:start] + base64.b64encode(cda) + msg[end:])
    assert sub.control_id


# --------------------------------------------------------------------------- CDA

@SLOW
@given(cda=mutated(seeds.CDA) | st.binary(max_size=200))
def test_read_header_raises_only_its_errors(cda):
    try:
        read_header(cda)
    except (etree.XMLSyntaxError, ValueError):
        pass


@pytest.fixture(scope="module")
def validator(tmp_path_factory):
    return CdaValidator(cache_dir=tmp_path_factory.mktemp("cda-cache"))


@SLOW
@given(cda=mutated(seeds.CDA) | st.binary(max_size=200))
def test_validator_reports_and_never_raises(validator, cda):
    report = validator.validate(cda, schematron=False)
    assert report.valid in (True, False)
    assert report.valid or report.xsd_errors


# --------------------------------------------------------------------------- routes loader

_yaml_scalars = st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12) | st.sampled_from(
    ["10s", "5m", "20MB", "127.0.0.1", "mllp", "sqlite", "ADT^A01", "*", "-1s", "1e999", "nan"])
_yaml_values = st.recursive(_yaml_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=10) | st.sampled_from(
                                ["type", "port", "host", "to", "from", "filter", "queue", "tls", "bind"]),
                                inner, max_size=4), max_leaves=12)


@st.composite
def routes_documents(draw):
    base = yaml.safe_load(draw(st.sampled_from(seeds.ROUTES)).decode("utf-8"))
    for _ in range(draw(st.integers(1, 3))):
        node = base
        while isinstance(node, dict) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node, key=str)))
            if not isinstance(node[key], dict):
                break
            node = node[key]
        if isinstance(node, dict):
            node[draw(st.sampled_from(sorted(node, key=str) + ["extra"]))] = draw(_yaml_values)
    return yaml.safe_dump(base, allow_unicode=True)


@SLOW
@given(text=routes_documents() | mutated(seeds.ROUTES).map(lambda b: b.decode("utf-8", "replace")))
def test_routes_loader_raises_only_config_error(text):
    try:
        load_config_text(text)
    except ConfigError:
        pass
