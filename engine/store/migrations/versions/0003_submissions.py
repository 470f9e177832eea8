"""Canonical report submissions: one row per report message (the table lives in the store schema).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "submissions",
        sa.Column("message_id", BigId, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16)),
        sa.Column("documents", sa.Integer, nullable=False, server_default="0"),
        sa.Column("errors", sa.Integer, nullable=False, server_default="0"),
        sa.Column("submission", sa.Text, nullable=False),
        sa.Column("validation", sa.Text),
        sa.Column("wrapped", sa.LargeBinary),
        sa.Column("doc_key", sa.String(255)),
        sa.Column("cda_header", sa.Text),
        sa.Column("created_at", sa.Float(precision=53), nullable=False),
    )
    op.create_index("ix_submissions_doc_key", "submissions", ["doc_key", "message_id"])


def downgrade() -> None:
    op.drop_table("submissions")
