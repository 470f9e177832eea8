"""Identity registry (issue 3): identities, identity_identifiers, identity_history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""
from __future__ import annotations

from alembic import op

from engine.identity.migration import downgrade_ops, upgrade_ops

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_ops(op)


def downgrade() -> None:
    downgrade_ops(op)
