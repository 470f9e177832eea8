"""What processing steps write, inside the writer op that stores their message: the verdict
(stored ACK, status, routed or not) and the canonical submission of a report message.
"""
from __future__ import annotations

import json
import time

import sqlalchemy as sa


from .schema import submissions



class StepWritesMixin:
    """Step writes of :class:`engine.store.Store`."""

    # -- processing steps' verdicts (inside a writer op's transaction) -----------------------
    def set_verdict(self, conn: sa.Connection, message_id: int, *, ack: bytes, ack_code: str,
                    status: str, error_code: str | None, unroute: bool) -> None:
        """A processing step decided the ACK of a message stored in this transaction: the ACK
        stored for duplicate replay, the status, and (rejected) no queue entries. On SQLite the
        writer's held duplicate keys carry the ACK too: the one of this transaction is replaced,
        so that a resend is answered with the step's ACK, not the AA computed in advance."""
        for entries in self._staged_keys.values():
            for i, (mid, sha, at, _ack) in enumerate(entries):
                if mid == message_id:
                    entries[i] = (mid, sha, at, ack)
        if unroute:
            conn.execute(sa.text("DELETE FROM queue_entries WHERE message_id = :id"), {"id": message_id})
        conn.execute(
            sa.text("UPDATE messages SET ack = :ack, ack_code = :code, status = :status, "
                    "error_code = :ec WHERE id = :id"),
            {"ack": ack, "code": ack_code, "status": status, "id": message_id, "ec": error_code})

    # -- canonical submissions of report messages -------------------------------------------
    @staticmethod
    def insert_submission(conn: sa.Connection, message_id: int, *, kind: str, action: str | None,
                          documents: int, errors: int, submission_json: str,
                          validation: dict | None = None, wrapped: bytes | None = None,
                          doc_key: str | None = None, cda_header: dict | None = None) -> None:
        """Inside a writer op: the canonical submission stored with its message."""
        conn.execute(submissions.insert().values(
            message_id=message_id, kind=kind, action=action, documents=documents, errors=errors,
            submission=submission_json, validation=json.dumps(validation) if validation else None,
            wrapped=wrapped, doc_key=doc_key,
            cda_header=json.dumps(cda_header, default=str) if cda_header else None,
            created_at=time.time()))

    def set_validation(self, message_id: int, validation: dict, callback) -> None:
        """Attach a (later) validation report to a stored submission, through the writer."""
        self.submit(lambda c: c.execute(submissions.update()
                                        .where(submissions.c.message_id == message_id)
                                        .values(validation=json.dumps(validation))), callback)
