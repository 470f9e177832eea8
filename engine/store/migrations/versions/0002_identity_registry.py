"""Identity registry (IHE PAM France identity feed): identities, identity_identifiers, identity_history.

The tables are written out here, not derived from ``engine.store.identities.identity_metadata``,
so that this migration stays frozen when that module evolves; a test checks that both agree.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identities",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ipp", sa.String(64), nullable=False),
        sa.Column("ipp_authority", sa.String(128), nullable=False, server_default=""),
        sa.Column("ipp_finess", sa.String(32)),
        sa.Column("ins_value", sa.String(32)),
        sa.Column("ins_oid", sa.String(64)),
        sa.Column("ins_kind", sa.String(16)),
        sa.Column("ins_rejected_reason", sa.Text),
        sa.Column("birth_name", sa.String(256)),
        sa.Column("first_given_name", sa.String(256)),
        sa.Column("given_names", sa.String(512)),
        sa.Column("used_name", sa.String(256)),
        sa.Column("used_given_name", sa.String(256)),
        sa.Column("birth_date", sa.Date),
        sa.Column("birth_date_raw", sa.String(32)),
        sa.Column("sex", sa.String(8)),
        sa.Column("birth_place_cog", sa.String(16)),
        sa.Column("status_code", sa.String(16)),
        sa.Column("status_raw", sa.String(128)),
        sa.Column("consent", sa.JSON),
        sa.Column("obtained_via", sa.String(16)),
        sa.Column("insi_query_date", sa.Date),
        sa.Column("zfd", sa.JSON),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("merged_into", sa.Integer, sa.ForeignKey("identities.id"), nullable=True),
        sa.Column("last_event_time", sa.DateTime),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_identities_merged_into", "identities", ["merged_into"])
    op.create_table(
        "identity_identifiers",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("identity_id", sa.Integer, sa.ForeignKey("identities.id"), nullable=False),
        sa.Column("value", sa.String(64), nullable=False),
        sa.Column("authority", sa.String(128), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.UniqueConstraint("authority", "type", "value", name="uq_identity_identifiers_key"),
    )
    op.create_index("ix_identity_identifiers_value_type", "identity_identifiers",
                    ["value", "type"])
    op.create_index("ix_identity_identifiers_identity", "identity_identifiers", ["identity_id"])
    op.create_table(
        "identity_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("identity_id", sa.Integer, sa.ForeignKey("identities.id"), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("event_time", sa.DateTime),
        sa.Column("trigger", sa.String(8)),
        sa.Column("control_id", sa.String(199)),
        sa.Column("message_id", sa.Integer),
        sa.Column("action", sa.String(24), nullable=False),
        sa.Column("change", sa.JSON),
        sa.Column("note", sa.Text),
    )
    op.create_index("ix_identity_history_identity", "identity_history", ["identity_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_identity_history_identity", table_name="identity_history")
    op.drop_table("identity_history")
    op.drop_index("ix_identity_identifiers_identity", table_name="identity_identifiers")
    op.drop_index("ix_identity_identifiers_value_type", table_name="identity_identifiers")
    op.drop_table("identity_identifiers")
    op.drop_index("ix_identities_merged_into", table_name="identities")
    op.drop_table("identities")
