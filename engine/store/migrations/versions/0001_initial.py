"""Initial schema: messages, queue_entries, events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.Float(precision=53)


def upgrade() -> None:
    op.create_table(
        "messages",
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
    )
    op.create_index("ix_messages_dedup", "messages", ["dedup_key", "received_at"])

    op.create_table(
        "queue_entries",
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
    )
    op.create_index("ix_queue_dest_status_key_id", "queue_entries",
                    ["destination", "status", "order_key", "id"])
    op.create_index("ix_queue_dest_status_next", "queue_entries",
                    ["destination", "status", "next_attempt_at"])
    op.create_index("ix_queue_message", "queue_entries", ["message_id"])

    op.create_table(
        "events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("at", Time, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("channel", sa.String(128), nullable=True),
        sa.Column("destination", sa.String(128), nullable=True),
        sa.Column("message_id", BigId, nullable=True),
        sa.Column("entry_id", BigId, nullable=True),
        sa.Column("detail", sa.Text, nullable=False, server_default="{}"),
    )
    op.create_index("ix_events_kind_channel", "events", ["kind", "channel"])
    op.create_index("ix_events_at", "events", ["at"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("queue_entries")
    op.drop_table("messages")
