"""Drop ix_queue_dest_status_next: no query needs it, and every ingest commit paid for it.

Claims and ``next_due_at`` find the queue heads through ``ix_queue_dest_status_key_id``
(destination, status, order_key, id) and read ``next_attempt_at`` from the head rows; the
status counts group by (destination, status), which the same index serves. On SQLite each
index of ``queue_entries`` costs about one more 4 KiB WAL frame per commit (two ``pwrite``
calls and a page to write back at the ``fdatasync``): measured on the ingest benchmark, 8
connections, see docs/benchmarks.md.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""
from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_queue_dest_status_next", table_name="queue_entries")


def downgrade() -> None:
    op.create_index("ix_queue_dest_status_next", "queue_entries",
                    ["destination", "status", "next_attempt_at"])
