"""Operations: local user accounts, the audit trail, destination pause.

* ``users``: one row per local account of the console and the CLI: unique ``name``, ``role``
  (viewer < operator < admin), an argon2id ``password_hash`` (never the password), ``active``
  (an account is disabled, never deleted, so that its audit rows keep naming someone).
* ``audit_log``: who did what, when, to what, with which outcome (ASTM E2147 / IHE ATNA: the
  user, the event, the object, the outcome). Append-only: the store has no UPDATE or DELETE of
  it (retention excepted). ``detail`` is JSON; a search by patient identifier keeps the
  identifier there, because accountability needs it; ``target`` carries internal ids only.
  Indexed by time: it is read newest first, by period.
* ``destination_controls``: one row per destination an operator paused or resumed; a paused
  destination claims nothing (its entries stay queued).
* ``control_changes``: one row, a counter raised by every pause, resume and "retry now": a
  running engine polls it (one primary-key read) to notice what another process (the CLI) did.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.Float(precision=53)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("at", Time, nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("source", sa.String(255), nullable=True),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_table(
        "destination_controls",
        sa.Column("destination", sa.String(128), primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("changed_by", sa.String(255), nullable=False),
        sa.Column("changed_at", Time, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
    )
    op.create_table(
        "control_changes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    op.execute("INSERT INTO control_changes (id, seq) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("control_changes")
    op.drop_table("destination_controls")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("users")
