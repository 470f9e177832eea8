"""What every outbound connector returns, whatever the protocol behind it."""
from __future__ import annotations

from dataclasses import dataclass

ACCEPTED = "accepted"    # AA / CA / MLLP commit ACK: delivered
ERROR = "error"          # AE / CE: the receiver found an error in the content
REJECTED = "rejected"    # AR / CR: the receiver could not take it now (HL7 v2.5 §2.9.2.2)
TRANSIENT = "transient"  # no answer: connection refused, timeout, ACK for another message


@dataclass(frozen=True)
class Outcome:
    kind: str
    response: bytes | None = None
    detail: str = ""
