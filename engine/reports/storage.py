"""Where canonical submissions live: one row per report message, next to the message itself.

The ``submissions`` table holds patient data by nature (the submission carries the INS, the
traits and the documents): like ``messages.raw`` it is message content (docs/architecture.md,
PHI rule). ``wrapped`` holds the CI-SIS message built from a PACS report (the CDA R2 N1 inside),
which is what the destinations of that message receive.
"""
from __future__ import annotations

import sqlalchemy as sa

report_metadata = sa.MetaData()

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

submissions = sa.Table(
    "submissions",
    report_metadata,
    sa.Column("message_id", BigId, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # cisis (received as is) | pacs (wrapped here)
    sa.Column("action", sa.String(16)),
    sa.Column("documents", sa.Integer, nullable=False, server_default="0"),
    sa.Column("errors", sa.Integer, nullable=False, server_default="0"),
    sa.Column("submission", sa.Text, nullable=False),  # canonical submission JSON (PHI)
    sa.Column("validation", sa.Text),  # CDA XSD/schematron report JSON
    sa.Column("wrapped", sa.LargeBinary),  # PACS: the CI-SIS ORU^R01 carrying the N1 CDA
    sa.Column("doc_key", sa.String(255)),  # PACS: accession number (else order id) of the exam
    sa.Column("cda_header", sa.Text),  # PACS: read_header() of the generated CDA (replacements)
    sa.Column("created_at", sa.Float(precision=53), nullable=False),
    sa.Index("ix_submissions_doc_key", "doc_key", "message_id"),
)


def upgrade_ops(op) -> None:
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


def downgrade_ops(op) -> None:
    op.drop_table("submissions")


def load(conn, message_id: int) -> dict | None:
    row = conn.execute(sa.select(submissions).where(submissions.c.message_id == message_id)).mappings().first()
    return dict(row) if row is not None else None
