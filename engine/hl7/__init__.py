"""HL7 v2 primitives: for the ingest hot path the MSH reader, ACK builder/reader, charsets, escapes and
one-field reads; for everything else the parsed :class:`Message` (:mod:`engine.hl7.message`).

Pure code: no sockets, no Twisted, no SQLAlchemy.
"""
from .ack import (AckError, AckInfo, ControlIdGenerator, accept_ack_wanted, ack_code, ack_mode, build_ack,
                  hl7_timestamp, is_ack, read_ack)
from .encoding import Decoded, codec_for, decode_message, resolve_charset
from .errors import TABLE_0357, HL7Error
from .escape import escape, unescape
from .fields import FieldPath, get_field, parse_path, set_field, split_segments
from .message import Delimiters, Message, Segment
from .msh import MSHInfo, read_msh

__all__ = [
    "AckError", "AckInfo", "ControlIdGenerator", "Decoded", "Delimiters", "FieldPath", "HL7Error", "MSHInfo",
    "Message", "Segment", "TABLE_0357",
    "accept_ack_wanted", "ack_code", "ack_mode", "build_ack", "codec_for", "decode_message", "escape",
    "get_field", "hl7_timestamp", "is_ack", "parse_path", "read_ack", "read_msh",
    "resolve_charset", "set_field", "split_segments", "unescape",
]
