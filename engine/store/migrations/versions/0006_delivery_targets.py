"""Queue entries per delivery target, with the document they carry.

* ``target``: one message may become several deliveries of one destination (one mail per
  recipient group, ...), each with its own state, attempts and response; '' for the single
  target of most destinations.
* ``doc_key`` / ``doc_id``: truncated SHA-256 of the document's chain key (CDA setId, or the id
  of the first version) and of the document id itself. Entries of one document are delivered in
  order; a deletion cancels the entries of its document that were not sent yet.
* ``action``: initial / replace / delete (CI-SIS "Transmission de documents CDA en HL7 v2").

The two indexes are partial (NOT NULL): messages without a document, most of the traffic, write
no page of them (on SQLite each touched index page is a WAL frame per commit).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queue_entries") as b:
        b.add_column(sa.Column("target", sa.String(128), nullable=False, server_default=""))
        b.add_column(sa.Column("doc_key", sa.String(64), nullable=True))
        b.add_column(sa.Column("doc_id", sa.String(64), nullable=True))
        b.add_column(sa.Column("action", sa.String(16), nullable=True))
    op.create_index("ix_queue_doc", "queue_entries", ["destination", "doc_key"],
                    sqlite_where=sa.text("doc_key IS NOT NULL"),
                    postgresql_where=sa.text("doc_key IS NOT NULL"))
    op.create_index("ix_queue_doc_id", "queue_entries", ["doc_id"],
                    sqlite_where=sa.text("doc_id IS NOT NULL"),
                    postgresql_where=sa.text("doc_id IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_queue_doc_id", table_name="queue_entries")
    op.drop_index("ix_queue_doc", table_name="queue_entries")
    with op.batch_alter_table("queue_entries") as b:
        b.drop_column("action")
        b.drop_column("doc_id")
        b.drop_column("doc_key")
        b.drop_column("target")
