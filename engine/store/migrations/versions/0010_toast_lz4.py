"""PostgreSQL: the large payload columns compressed with lz4 instead of pglz.

A 286 KB report message (a CI-SIS ORU^R01 carrying a CDA in Base64) cost about 5.3 ms of the
server's time to insert with PostgreSQL's default TOAST compression (pglz) against 1.4 ms with
lz4, for a smaller result (11.7 against 15.0 MB for 100 such messages) and a faster read: plain
durable ingest of that message ran at 87-96 msg/s on PostgreSQL against 400-450 on SQLite.
Only values written from now on are compressed with lz4 (PostgreSQL keeps each value's method).

lz4 needs PostgreSQL 14 or newer built with lz4 (Debian's and the PGDG packages are); on a
server without it the columns keep pglz and the engine works as before. SQLite: nothing to do.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""
from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

COLUMNS = (("messages", "raw"), ("queue_entries", "payload"), ("queue_entries", "response"),
           ("submissions", "submission"), ("submissions", "wrapped"))


def _set(method: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    try:
        with bind.begin_nested():  # a refusal must not abort the migration's transaction
            for table, column in COLUMNS:
                bind.execute(sa.text(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}"))
    except sa.exc.DBAPIError as exc:
        log.warning("TOAST compression %s not available on this server, columns unchanged (%s)",
                    method, str(exc.orig).splitlines()[0])


def upgrade() -> None:
    _set("lz4")


def downgrade() -> None:
    _set("pglz")
