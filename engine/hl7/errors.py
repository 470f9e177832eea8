"""HL7 processing errors carrying an HL7 table 0357 code, for ERR-3 of the ACK.

``HL7Error.text`` is written by the engine and must never contain patient data: it may name
segments, fields, character sets, offsets and lengths, never field *values* outside MSH.
"""
from __future__ import annotations

__all__ = ["HL7Error", "TABLE_0357"]

#: HL7 v2.5 table 0357 "Message error condition codes".
TABLE_0357: dict[str, str] = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key",
    "206": "Application record locked",
    "207": "Application internal error",
}


class HL7Error(Exception):
    """An error to report in an ACK: ``code`` (table 0357), ``text``, ERR-2 ``location``, ERR-4 ``severity``."""

    __slots__ = ("code", "text", "location", "severity")

    def __init__(self, code: str, text: str, location: str | None = None, severity: str = "E") -> None:
        code = str(code)
        super().__init__(code, text, location, severity)
        self.code = code
        self.text = text
        self.location = location
        self.severity = severity

    def __str__(self) -> str:
        where = f" at {self.location}" if self.location else ""
        return f"HL7 {self.code} ({TABLE_0357.get(self.code, 'unknown code')}){where}: {self.text}"

    def __repr__(self) -> str:
        return f"HL7Error({self.code!r}, {self.text!r}, {self.location!r}, {self.severity!r})"
