"""SQLite: the duplicate-key index moves out of the messages table into ``dedup_index``.

On SQLite every commit rewrites each B-tree page it touches into the WAL (4 KiB a frame, two
``pwrite`` calls, a page to write back at the ``fdatasync``). ``ix_messages_dedup`` is ordered
by (MSH-3, MSH-4, MSH-10): N senders, each with its own control-id sequence, insert at N places,
so a commit of 8 messages from 8 senders wrote 8 leaves of it, about 40 % of the commit
(measured: 47.3 against 29.7 ``pwrite`` per commit without it). Since this migration the writer
keeps the keys of the latest messages in memory and writes them into ``dedup_index`` about every
512 messages, sorted, in the same transaction as that batch (``engine/store/store.py``,
"Duplicate keys on SQLite"); ``store_meta.dedup_merged_to`` is the last message id whose key is
in ``dedup_index``: the keys of later messages are read back from ``messages.dedup_key`` at start.

PostgreSQL logs row changes, not whole pages: nothing changes there (``ix_messages_dedup`` stays).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""
from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute("CREATE TABLE dedup_index (dedup_key VARCHAR(800) NOT NULL, received_at REAL NOT NULL, "
               "message_id INTEGER NOT NULL, PRIMARY KEY (dedup_key, received_at, message_id)) "
               "WITHOUT ROWID")
    op.execute("CREATE TABLE store_meta (name VARCHAR(64) NOT NULL PRIMARY KEY, value INTEGER NOT NULL)")
    op.execute("INSERT INTO dedup_index (dedup_key, received_at, message_id) "
               "SELECT dedup_key, received_at, id FROM messages WHERE dedup_key IS NOT NULL "
               "ORDER BY dedup_key, received_at, id")
    op.execute("INSERT INTO store_meta (name, value) "
               "SELECT 'dedup_merged_to', coalesce(max(id), 0) FROM messages")
    op.drop_index("ix_messages_dedup", table_name="messages")


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.create_index("ix_messages_dedup", "messages", ["dedup_key", "received_at"])
    op.execute("DROP TABLE store_meta")
    op.execute("DROP TABLE dedup_index")
