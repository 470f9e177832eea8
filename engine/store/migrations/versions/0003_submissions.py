"""Canonical report submissions (issue 4).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""
from __future__ import annotations

from alembic import op

from engine.reports.storage import downgrade_ops, upgrade_ops

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_ops(op)


def downgrade() -> None:
    downgrade_ops(op)
