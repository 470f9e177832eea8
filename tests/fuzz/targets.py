"""Fuzz targets: one function per parser that reads untrusted input. Each takes the fuzzer's bytes,
calls its target and lets through only the target's documented error type; anything else (or a
broken property) escapes as an exception, which the fuzzer records as a crash.

The same functions replay the saved crashers in the normal suite (``tests/test_fuzz_crashers.py``).
"""
from __future__ import annotations

import tempfile
from functools import lru_cache
from typing import Callable

from lxml import etree

from engine.cda.header import read_header
from engine.config import ConfigError, load_config_text
from engine.hl7.ack import AckError, build_ack, read_ack
from engine.hl7.errors import HL7Error
from engine.hl7.msh import read_msh
from engine.identity import IdentityError, parse_adt
from engine.reports.cisis import parse_report
from mllp.framing import Frame, FrameTooLarge, MLLPFramer


def framer(data: bytes) -> None:
    """The first byte picks the size limit, lenient mode and chunk length; the rest is the stream."""
    if not data:
        return
    knob, stream = data[0], data[1:1025]  # small chunks are slow to feed: bounded stream
    f = MLLPFramer(max_frame_size=1 + (knob & 0x1F) * 32, lenient_end=bool(knob & 0x20))
    step = (3, 29, 257, len(stream) or 1)[knob >> 6]
    for i in range(0, len(stream), step):
        for event in f.feed(stream[i:i + step]):
            if isinstance(event, Frame) and len(event.payload) > f.max_frame_size:
                raise AssertionError("frame larger than max_frame_size")
            if isinstance(event, FrameTooLarge) and not f.dead:
                raise AssertionError("FrameTooLarge without the framer dead")


def msh(data: bytes) -> None:
    try:
        read_msh(data)
    except HL7Error:
        pass


def ack(data: bytes) -> None:
    """Build the ACK of any message ``read_msh`` accepts: MSA-2 is its MSH-10 bytes, and ``read_ack``
    reads it back."""
    try:
        info = read_msh(data)
    except HL7Error:
        return
    text = data[-40:].decode("utf-8", "replace")  # engine-written text with whatever characters
    out = build_ack(info, "AE", control_id="PFI1", timestamp="20240101000000", text=text,
                    errors=[AckError("207", text, "E", "PID^1^3", app_code="906", app_text=text)])
    fs = info.field_sep.encode("latin-1")
    msa = next(s for s in out.split(b"\r") if s.startswith(b"MSA"))
    if msa.split(fs)[2] != info.control_id.encode("latin-1"):
        raise AssertionError("MSA-2 is not the sender's MSH-10")
    if read_ack(out).code != "AE":
        raise AssertionError("read_ack does not read the ACK's MSA-1")


def ack_reader(data: bytes) -> None:
    try:
        read_ack(data)
    except HL7Error:
        pass


def pamfr(data: bytes) -> None:
    try:
        parse_adt(data, "utf-8")
    except IdentityError:
        pass


def cisis(data: bytes) -> None:
    try:
        parse_report(data, "utf-8")
    except ValueError:
        pass


def cda_header(data: bytes) -> None:
    try:
        read_header(data)
    except (etree.XMLSyntaxError, ValueError):
        pass


@lru_cache(maxsize=1)
def _validator():
    from engine.cda.validation import CdaValidator

    return CdaValidator(cache_dir=tempfile.mkdtemp(prefix="minipfi-fuzz-cda-"))


def cda_validation(data: bytes) -> None:
    report = _validator().validate(data, schematron=False)
    if not report.valid and not report.xsd_errors:
        raise AssertionError("invalid document without a reason")


def routes(data: bytes) -> None:
    try:
        load_config_text(data.decode("utf-8", "replace"))
    except ConfigError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "framer": framer, "msh": msh, "ack": ack, "ack_reader": ack_reader, "pamfr": pamfr,
    "cisis": cisis, "cda_header": cda_header, "cda_validation": cda_validation, "routes": routes,
}


def seeds_for(name: str) -> list[bytes]:
    from tests.fuzz import seeds
    from mllp.framing import encode_frame

    return {
        "framer": [b"\x05" + b"".join(encode_frame(m) for m in seeds.HL7[:3]), b"\xc0\x0bMSH|\x1c\r"],
        "msh": seeds.HL7, "ack": seeds.HL7, "ack_reader": seeds.ACKS, "pamfr": seeds.ADT,
        "cisis": seeds.REPORTS, "cda_header": seeds.CDA, "cda_validation": seeds.CDA, "routes": seeds.ROUTES,
    }[name]
