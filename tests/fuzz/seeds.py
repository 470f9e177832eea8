"""Seed inputs of the property tests and of ``make fuzz``: valid messages of the ANS example sets
(read from ../shared, never copied into the project), made small enough to mutate quickly."""
from __future__ import annotations

import base64
import re
from pathlib import Path

from tests.conftest import CORPUS, ROOT

_TRANS = CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1"
_MDM = _TRANS / "MDM" / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1_Base64.er7"
_B64_MARK = b"^text^XML^Base64^"


def _compact_cda(path: Path) -> bytes:
    """The CDA with its embedded PDF cut to a few bytes (the header, the part the parsers read, is kept)."""
    return re.sub(rb"(<text[^>]*>)(.*?)(</text>)", rb"\1SGVsbG8=\3", path.read_bytes(), flags=re.S)


def _with_cda(message: bytes, cda: bytes) -> bytes:
    start = message.index(_B64_MARK) + len(_B64_MARK)
    end = message.index(b"|", start)
    return message[:start] + base64.b64encode(cda) + message[end:]


def _adt_files() -> list[Path]:
    base = CORPUS / "ans-hl7v2"
    return sorted((base / "SGL").glob("*.er7")) + sorted((base / "Vague 2" / "Consentement_DMP_PAMFR").glob("*.er7"))


CDA: list[bytes] = [_compact_cda(CORPUS / "cda" / "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml")]
ADT: list[bytes] = [p.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r") for p in _adt_files()]
_MDM_TEXT = _MDM.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
# the full report, and the same segments around a bare CDA root (small: the HL7 side mutates fast)
REPORTS: list[bytes] = [_with_cda(_MDM_TEXT, CDA[0]), _with_cda(_MDM_TEXT, b'<ClinicalDocument xmlns="urn:hl7-org:v3"/>')]
ACKS: list[bytes] = [p.read_bytes() for p in sorted(_TRANS.glob("*/*/ack.er7"))] + [
    b"MSH|^~\\&|RIS|CHU|PFI|CHU|20240101||ACK^A01^ACK|A1|P|2.5\rMSA|AE|X1\r"
    b"ERR||PID^1^3^1^1|207^Application internal error^HL70357|E|906^bad^applicationErrorCondition||||text\r",
    b"MSH|^~\\&|RIS|CHU|PFI|CHU|20240101||ACK|A2|P|2.3\rMSA|AR|X2|refused\rERR|PID^1^3^1&207&Error&HL70357\r",
]
HL7: list[bytes] = ADT + [p.read_bytes() for p in sorted((ROOT / "samples").glob("*.hl7"))] + ACKS
ROUTES: list[bytes] = [(ROOT / "engine" / "routes.yaml").read_bytes()] + [
    p.read_bytes() for p in sorted((ROOT / "tests" / "configs").glob("*.yaml"))]
