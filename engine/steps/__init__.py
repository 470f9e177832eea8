"""Processing steps whose outcome decides the ACK: their contract here; the identity feed in
:mod:`engine.steps.identity_feed` (report steps live with the report parsing, in ``engine.reports``).

Steps are plug-ins of the inbound channel, wired in ``engine.wiring``; this module is what they
share: the result type and :func:`finish`, which records the verdict through the store.

A step runs in two parts. ``prepare`` (optional, in a thread: parsing, validation, registry reads)
computes what the step needs without writing. ``make_op`` returns a writer-thread op (or a
``StepOp``, which the writer batches with the other ADTs of its commit) that stores the message
and writes the step's own rows **in the same transaction**, so the message, its
side effects and the ACK that is stored for duplicate replay always agree. The message is stored
whatever the outcome (nothing lost); a step that finds errors answers AE with one ERR each and,
unless configured otherwise, removes the message's queue entries (not routed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from engine.hl7.ack import AckError


@dataclass
class StepResult:
    result: object  # Stored | Duplicate
    ack: bytes | None = None  # the final ACK when it differs from the precomputed AA
    action: str | None = None
    violations: int = 0
    outcome: str = "accept"  # accept | error (AE)
    routed: bool = True  # False: queue entries removed (rejected message)


Answer = Callable[[str, list[AckError]], tuple[bytes, str]]


def finish(store, conn, record, result, errors: list[AckError], answer: Answer, *,
           route_rejected: bool = False, action: str | None = None) -> StepResult:
    """Rewrite the stored ACK (and status) of a just-stored message from the step's findings."""
    if not errors:
        return StepResult(result, None, action, 0)
    mid = result.message_id
    outcome = "error" if any(e.severity == "E" for e in errors) else "accept"
    ack, code = answer(outcome, errors)
    status, routed = record.status, True
    if outcome == "error" and not route_rejected:
        status, routed = "rejected", False
    first_error = next((e for e in errors if e.severity == "E"), None)
    store.set_verdict(conn, mid, ack=ack, ack_code=code, status=status, unroute=not routed,
                      error_code=(first_error.app_code or first_error.code) if first_error else None)
    return StepResult(result, ack, action, len(errors), outcome, routed)
