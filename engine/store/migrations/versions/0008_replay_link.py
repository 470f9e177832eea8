"""A replayed queue entry names the entry it replays.

* ``replay_of``: id of the entry (same message, destination and target) this one was created to
  replay; NULL for entries created at ingest. An operator sees the chain of attempts, and when a
  replay reaches a final state the earlier entries still in ``error`` stop counting as current
  errors (status ``resolved``; the history stays in ``events``).

No index: the column is read by id chains of one message, found through ``ix_queue_message``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN on both databases (no table rebuild on SQLite)
    op.add_column("queue_entries", sa.Column("replay_of", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                                             nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("queue_entries") as b:
        b.drop_column("replay_of")
