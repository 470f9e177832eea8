"""SQLAlchemy Core tables of the store (the Alembic migration ``0001_initial`` creates exactly these).

Times are stored as **float seconds since the Unix epoch (UTC)** in every column (``received_at``,
``next_attempt_at``, ``created_at``, ``updated_at``, ``lease_until``, ``events.at``): cheap to
compare and index, identical on SQLite and PostgreSQL, no time zone ambiguity. The API takes and
returns the same floats (``time.time()``); ``list_messages`` renders ISO 8601 UTC strings.

On SQLite, migration 0005 replaces ``ix_messages_dedup`` with the tables ``dedup_index``
(dedup_key, received_at, message_id; WITHOUT ROWID) and ``store_meta`` (name, value), written by
the store writer only (``engine/store/store.py``, "Duplicate keys on SQLite"); they are not
declared here because PostgreSQL does not have them.

Migration 0009 adds the operations tables, read and written only by their store parts:
``users`` (``accounts``), ``audit_log`` (``audit``, append-only), ``destination_controls`` and
``control_changes`` (``controls``).

PHI rule: only ``messages.raw``, ``queue_entries.payload`` and ``queue_entries.response`` hold
message content. ``order_key`` is whatever hash the caller computed; ``events.detail`` and
``last_error`` carry technical text only.
"""
from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.Float(precision=53)  # DOUBLE PRECISION on PostgreSQL, REAL on SQLite

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("channel", sa.String(128), nullable=False),
    sa.Column("received_at", Time, nullable=False),
    sa.Column("sending_app", sa.String(255), nullable=False, server_default=""),
    sa.Column("sending_facility", sa.String(255), nullable=False, server_default=""),
    sa.Column("receiving_app", sa.String(255), nullable=False, server_default=""),
    sa.Column("receiving_facility", sa.String(255), nullable=False, server_default=""),
    sa.Column("message_type", sa.String(64), nullable=False, server_default=""),
    sa.Column("control_id", sa.String(255), nullable=False, server_default=""),
    sa.Column("version", sa.String(32), nullable=False, server_default=""),
    sa.Column("charset", sa.String(64), nullable=False, server_default=""),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("dedup_key", sa.String(800), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("ack_code", sa.String(8), nullable=False, server_default=""),
    sa.Column("ack", sa.LargeBinary, nullable=False),
    sa.Column("error_code", sa.String(16), nullable=True),
    sa.Column("raw", sa.LargeBinary, nullable=False),
    sa.Column("flags", sa.String(255), nullable=True),
    sa.Index("ix_messages_dedup", "dedup_key", "received_at"),
)

queue_entries = sa.Table(
    "queue_entries",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("message_id", BigId, sa.ForeignKey("messages.id"), nullable=False),
    sa.Column("destination", sa.String(128), nullable=False),
    sa.Column("route", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("order_key", sa.String(128), nullable=False, server_default=""),
    sa.Column("transforms", sa.Text, nullable=False, server_default="[]"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", Time, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Column("lease_until", Time, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("response", sa.LargeBinary, nullable=True),
    sa.Column("payload", sa.LargeBinary, nullable=True),
    # migration 0006: one entry per delivery target of a destination (one message may become
    # several deliveries of one destination, e.g. one mail per recipient group), the document
    # it carries (hashed ids: ordering, cancellation by a deletion) and the document action
    sa.Column("target", sa.String(128), nullable=False, server_default=""),
    sa.Column("doc_key", sa.String(64), nullable=True),
    sa.Column("doc_id", sa.String(64), nullable=True),
    sa.Column("action", sa.String(16), nullable=True),
    # migration 0008: the entry this one replays (same message, destination and target)
    sa.Column("replay_of", BigId, nullable=True),
    sa.Index("ix_queue_dest_status_key_id", "destination", "status", "order_key", "id"),
    sa.Index("ix_queue_message", "message_id"),
    # partial: messages without a document (most of the traffic) touch no page of these
    sa.Index("ix_queue_doc", "destination", "doc_key", sqlite_where=sa.text("doc_key IS NOT NULL"),
             postgresql_where=sa.text("doc_key IS NOT NULL")),
    sa.Index("ix_queue_doc_id", "doc_id", sqlite_where=sa.text("doc_id IS NOT NULL"),
             postgresql_where=sa.text("doc_id IS NOT NULL")),
)

# The canonical submission of a report message, next to the message (migration 0003). It holds
# patient data by nature (INS, traits, documents): like messages.raw it is message content.
# ``wrapped`` holds the CI-SIS message built from a PACS report (the CDA R2 N1 inside), which is
# what the destinations of that message receive.
submissions = sa.Table(
    "submissions",
    metadata,
    sa.Column("message_id", BigId, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # cisis (received as is) | pacs (wrapped here)
    sa.Column("action", sa.String(16)),
    sa.Column("documents", sa.Integer, nullable=False, server_default="0"),
    sa.Column("errors", sa.Integer, nullable=False, server_default="0"),
    sa.Column("submission", sa.Text, nullable=False),  # canonical submission JSON (PHI)
    sa.Column("validation", sa.Text),  # CDA XSD/schematron report JSON
    sa.Column("wrapped", sa.LargeBinary),  # PACS: the CI-SIS ORU^R01 carrying the N1 CDA
    sa.Column("doc_key", sa.String(255)),  # PACS: accession number (else order id) of the exam
    sa.Column("cda_header", sa.Text),  # PACS: read_header() of the generated CDA (replacements)
    sa.Column("created_at", Time, nullable=False),
    sa.Index("ix_submissions_doc_key", "doc_key", "message_id"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("at", Time, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("channel", sa.String(128), nullable=True),
    sa.Column("destination", sa.String(128), nullable=True),
    sa.Column("message_id", BigId, nullable=True),
    sa.Column("entry_id", BigId, nullable=True),
    sa.Column("detail", sa.Text, nullable=False, server_default="{}"),
    sa.Index("ix_events_kind_channel", "kind", "channel"),
    sa.Index("ix_events_at", "at"),
)
