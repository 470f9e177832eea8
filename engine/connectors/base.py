"""The connector contract: what delivery hands to an outbound connector and what it gets back.

Every outbound connector (MLLP, DRIMbox, DMP, MSSanté, ...) implements :class:`Connector`: it
receives one :class:`Delivery` (one queue entry: one target of one destination) and answers one
:class:`Outcome`. Outcome classes are generic, whatever the protocol:

============== =============================================== =====================================
kind           meaning                                         MLLP (HL7 v2.5 §2.9.2.2)
============== =============================================== =====================================
``accepted``   delivered                                       AA / CA / MLLP commit ACK
``error``      the receiver refused the content: retrying      AE / CE (policy ``on_ae``)
               the same bytes will not help
``rejected``   the receiver cannot take it now: retry later    AR / CR (policy ``on_ar``)
``transient``  no usable answer (connection refused, timeout,  no ACK, unreadable ACK
               TLS failure): retry with backoff
============== =============================================== =====================================

The queue policies ``on_ae`` / ``on_ar`` keep their MLLP names and apply to ``error`` and
``rejected`` of every connector. ``retry_after`` lets a receiver say when to come back (an HTTP
``Retry-After``, an SMTP 4xx), ``error`` carries a structured code (code, code system, label)
for the operator besides the short technical ``detail``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

ACCEPTED = "accepted"
ERROR = "error"          # content error
REJECTED = "rejected"    # refused, retry later
TRANSIENT = "transient"  # no answer
CONTENT_ERROR, REFUSED = ERROR, REJECTED  # the generic names


@dataclass(frozen=True)
class ErrorInfo:
    """A receiver's error as a code in a code system, e.g. ("904", "CI-SIS error-codes",
    "INS ne correspondant pas") or ("XDSRegistryError", "urn:ihe:iti", "...")."""

    code: str
    system: str = ""
    label: str = ""

    def __str__(self) -> str:
        head = f"{self.system} {self.code}".strip()
        return f"{head}: {self.label}" if self.label else head


@dataclass(frozen=True)
class BusinessAck:
    """A business fact the creator of a report may have asked to hear about (CI-SIS ZAM
    acknowledgements): ``Z01`` the DMP registered the document (or refused it), ``Z02`` an
    MSSanté mail reached the recipient's server, ``Z03`` it was read. ``address``: the MSSanté
    recipient or reader (Z02/Z03). Delivery turns it into a ZAM message queued, in the same
    transaction as the outcome, to the route's ``business_acks`` destination."""

    event: str                       # Z01 | Z02 | Z03
    ok: bool
    error: ErrorInfo | None = None
    address: str | None = None


@dataclass(frozen=True)
class Outcome:
    kind: str
    response: bytes | None = None
    detail: str = ""                 # technical, no patient data: goes to logs and /status
    retry_after: float | None = None  # seconds, when the receiver said when to come back
    error: ErrorInfo | None = None
    #: business acknowledgements this final outcome gives rise to (ignored on a retry)
    business_acks: tuple[BusinessAck, ...] = ()


@dataclass(frozen=True)
class StoredView:
    """Read-only view of what the channel stored for the message, beyond its bytes: for report
    messages the canonical submission (documents, flags, recipients, identity, action) and, for
    a PACS report, the CI-SIS message built around its CDA R2 N1."""

    kind: str | None = None            # 'cisis' | 'pacs' | None (no submission)
    submission: Any = None             # engine.reports.submission.Submission
    wrapped: bytes | None = None
    validation: dict | None = None


NO_STORED_VIEW = StoredView()


@dataclass(frozen=True)
class Delivery:
    """One queue entry to deliver: ids and attempt number, the payload after transforms, and
    what the channel stored (loaded only for connectors that say ``needs_stored``)."""

    entry_id: int
    message_id: int
    destination: str
    target: str
    attempt: int                     # 1 for the first attempt
    channel: str
    message_type: str
    control_id: str                  # MSH-10 as received (stored column)
    charset: str                     # MSH-18 as received (stored column)
    payload: bytes                   # after the route's transforms
    original: bytes                  # as received
    action: str | None = None        # initial | replace | delete (document messages)
    stored: StoredView = field(default=NO_STORED_VIEW)

    @property
    def transformed(self) -> bool:
        return self.payload is not self.original


class Connector(Protocol):
    """An outbound connector. ``timeout`` is the longest one ``send`` may take (connection and
    answer): the lease of an entry in flight follows from it. ``needs_stored``: the delivery
    worker loads the StoredView before calling ``send``."""

    kind: str
    timeout: float
    needs_stored: bool

    def send(self, delivery: Delivery) -> "Deferred[Outcome]": ...

    def close(self) -> "Deferred | None": ...


TargetsFn = Callable[[Any, StoredView], "list[str] | tuple[str, ...]"]
