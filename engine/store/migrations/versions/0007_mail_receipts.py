"""Receipts of sent mails (MSSanté delivery and read receipts, DSN and MDN).

One row per receipt and recipient, recorded in the transaction that queues its business
acknowledgement (ZAM^Z02 / ZAM^Z03): ``receipt_key`` (a SHA-256 of the receipt's own Message-ID
and the recipient) is unique, so a receipt read again after a restart is applied once. No patient
data: the entry it belongs to, the event, success, the error code and the ZAM message written.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.Float(precision=53)


def upgrade() -> None:
    op.create_table(
        "mail_receipts",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("receipt_key", sa.String(64), nullable=False, unique=True),
        sa.Column("entry_id", BigId, nullable=False),
        sa.Column("message_id", BigId, nullable=False),
        sa.Column("event", sa.String(8), nullable=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("error_code", sa.String(32), nullable=True),
        sa.Column("zam_message_id", BigId, nullable=True),
        sa.Column("received_at", Time, nullable=False),
    )
    op.create_index("ix_mail_receipts_message", "mail_receipts", ["message_id"])


def downgrade() -> None:
    op.drop_index("ix_mail_receipts_message", table_name="mail_receipts")
    op.drop_table("mail_receipts")
