"""Plain data classes exchanged with the store (no SQLAlchemy, no Twisted).

All times are float seconds since the Unix epoch (UTC), see ``engine.store.schema``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union


@dataclass(slots=True)
class EntrySpec:
    destination: str
    route: str
    order_key: str = ""          # '' = FIFO per destination; else a hash computed by the caller
    transforms: str = "[]"       # JSON snapshot of the route's transform list
    target: str = ""             # one delivery target of the destination ('' = the only one)
    hold: float = 0.0            # seconds before the first attempt (deferred delivery)
    doc_key: str | None = None   # hashed chain key of the document carried (ordering, cancels)
    doc_id: str | None = None    # hashed id of the document itself (finds its chain later)
    action: str | None = None    # initial | replace | delete (document messages)
    by_document: bool = False    # ordering: document: order_key becomes doc_key once known


@dataclass(slots=True)
class IngestRecord:
    channel: str
    raw: bytes
    received_at: float           # epoch seconds UTC (time.time())
    sending_app: str
    sending_facility: str
    receiving_app: str
    receiving_facility: str
    message_type: str
    control_id: str
    version: str
    charset: str
    status: str                  # 'routed' | 'filtered' | 'rejected'
    ack: bytes
    ack_code: str
    error_code: str | None = None
    flags: str | None = None
    entries: list[EntrySpec] = field(default_factory=list)
    dedup: bool = True
    conflict_ack: Callable[[], bytes] | None = None


@dataclass(slots=True)
class FollowUp:
    """A message the engine writes itself because of a delivery outcome (a ZAM business
    acknowledgement), stored and queued to ``destination`` in the transaction that records the
    outcome: either both are durable or neither. ``channel`` is a pseudo-channel (with a ``:``,
    which no configured channel name may contain), e.g. ``engine:zam``."""

    channel: str
    destination: str
    route: str
    raw: bytes
    message_type: str
    control_id: str
    version: str
    charset: str
    sending_app: str = ""
    sending_facility: str = ""
    receiving_app: str = ""
    receiving_facility: str = ""


@dataclass(slots=True)
class Stored:
    message_id: int


@dataclass(slots=True)
class Duplicate:
    original_id: int
    ack: bytes
    same_content: bool
    message_id: int | None


IngestResult = Union[Stored, Duplicate]


@dataclass(slots=True)
class StepOp:
    """A writer op of an ACK-deciding step (``Store.submit``) that the writer can batch: its
    ``record`` is stored with the other records of the transaction (one duplicate lookup, one
    insert), then ``run(conn, [(item, IngestResult), ...])`` does the step's work for every
    consecutive StepOp of the transaction sharing the same ``run``, in submit order, and returns
    one result per pair. If ``run`` raises, the writer retries each job alone, as for any op.

    ``read``, when set: ``read(conn, [item, ...])`` for the transaction's first group of StepOps
    sharing ``run``, before the records are stored; ``run`` of that group is then called with
    its result as a third argument. For reads that need nothing the insert writes: on PostgreSQL
    they share the insert's round trip (the writer's pipeline)."""

    record: IngestRecord
    item: Any
    run: Callable[..., list]
    read: Callable[[Any, list], Any] | None = None


@dataclass(slots=True)
class ClaimedEntry:
    id: int
    message_id: int
    destination: str
    route: str
    order_key: str
    transforms: str
    attempts: int
    raw: bytes
    control_id: str
    message_type: str
    channel: str
    target: str = ""
    charset: str = ""
    doc_key: str | None = None
    action: str | None = None


@dataclass(slots=True)
class Completion:
    """The outcome of one claimed entry, recorded by ``Store.complete_within`` (fenced by the
    claim's owner). ``status``: sent | error | filtered | queued (retry at ``next_attempt_at``)
    | released (back to the queue untried, attempts unchanged: the rest of a window behind a
    failure, or a worker stopping). ``extra(conn)`` writes rows that must commit with the
    outcome and only if it is recorded (e.g. follow-up messages the outcome asks for)."""

    entry_id: int
    status: str
    attempts: int
    next_attempt_at: float | None = None
    last_error: str | None = None
    response: bytes | None = None
    payload: bytes | None = None
    follow_ups: tuple = ()           # FollowUp messages stored and queued with the outcome
    extra: Callable[[Any], None] | None = None


@dataclass(slots=True)
class ClaimedWindows:
    """What one claim took: per ordering key, its due head entries in order (one lane each);
    ``cursor`` is the last key visited (the next claim starts after it, round robin);
    ``next_due`` the earliest due time seen among heads not yet due, when nothing was due."""

    lanes: list[list[ClaimedEntry]]
    cursor: str | None
    next_due: float | None


@dataclass(slots=True)
class EntryRow:
    id: int
    message_id: int
    destination: str
    route: str
    status: str
    order_key: str
    transforms: str
    attempts: int
    next_attempt_at: float
    created_at: float
    updated_at: float
    lease_owner: str | None
    lease_until: float | None
    last_error: str | None
    response: bytes | None
    payload: bytes | None
    target: str = ""
    doc_key: str | None = None
    action: str | None = None
    replay_of: int | None = None


@dataclass(slots=True)
class MessageRow:
    id: int
    channel: str
    received_at: float
    sending_app: str
    sending_facility: str
    receiving_app: str
    receiving_facility: str
    message_type: str
    control_id: str
    version: str
    charset: str
    size: int
    sha256: str
    dedup_key: str | None
    status: str
    ack_code: str
    ack: bytes
    error_code: str | None
    raw: bytes
    flags: str | None
    entries: list[EntryRow] = field(default_factory=list)


@dataclass(slots=True)
class MessageSummary:
    id: int
    channel: str
    control_id: str
    message_type: str
    received_at: str             # ISO 8601 UTC
    status: str                  # aggregate, see Store.list_messages
    sending_app: str
    sending_facility: str
    size: int


@dataclass(slots=True)
class ReplayedTarget:
    """One delivery target a replay considered: the new entry, or why none was added."""

    message_id: int
    destination: str
    target: str
    replay_of: int                 # the latest entry of the target when the replay was asked
    entry_id: int | None = None    # the new entry
    skipped: str | None = None     # why no entry was added (a live one exists)


class UnknownMessage(KeyError):
    """``replay`` (or another call) named a message id that does not exist."""
