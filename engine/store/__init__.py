"""Durable store of mini-PFI: tables, Alembic migrations, group-commit writer, claims, stats.

See ``engine.store.store`` for the design (writer thread, SQLite/PostgreSQL settings) and
``engine.store.schema`` for the tables. Times are float epoch seconds (UTC) throughout.
"""
from .accounts import ROLES, UserRow
from .audit import AuditRow
from .models import (
    ClaimedEntry,
    ClaimedWindows,
    Completion,
    Duplicate,
    EntryRow,
    EntrySpec,
    IngestRecord,
    IngestResult,
    MessageRow,
    MessageSummary,
    ReplayedTarget,
    StepOp,
    Stored,
    UnknownMessage,
)
from .store import Store

__all__ = [
    "ROLES",
    "AuditRow",
    "UserRow",
    "ClaimedEntry",
    "ClaimedWindows",
    "Completion",
    "Duplicate",
    "EntryRow",
    "EntrySpec",
    "IngestRecord",
    "IngestResult",
    "MessageRow",
    "MessageSummary",
    "ReplayedTarget",
    "StepOp",
    "Store",
    "Stored",
    "UnknownMessage",
]
