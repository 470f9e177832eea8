"""``minipfi export``: every stored datum of a time range, in the documented layout
(``engine.retention.bundle``, docs/export.md), streamed page by page (no table read whole)."""
from __future__ import annotations

from pathlib import Path

from .bundle import Bundle, _iso

PAGE = 200


class ExportError(Exception):
    """A refusal reported on one line."""


def export(store, target: Path, *, since: float | None = None, until: float | None = None,
           channels: list[str] | None = None) -> dict:
    """Write the messages received in [since, until) (of ``channels``), their deliveries,
    submissions, receipts, the events of the range and the identity registry into ``target``
    (absent or empty); returns the manifest."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target}: the export folder must be absent or empty")
    b = Bundle(target, kind="export", time_range={
        "since": since, "until": until, "since_iso": _iso(since), "until_iso": _iso(until),
        "channels": list(channels) if channels else None})
    chunk: list[int] = []

    def flush():
        for row in store.rows_of_messages("queue_entries", chunk):
            b.entry(row)
        for row in store.rows_of_messages("submissions", chunk):
            b.submission(row)
        for row in store.rows_of_messages("mail_receipts", chunk):
            b.line("mail_receipts", row)
        chunk.clear()

    for row in store.iter_messages(since=since, until=until, channels=channels):
        b.message(row)
        chunk.append(row["id"])
        if len(chunk) >= PAGE:
            flush()
    if chunk:
        flush()
    for row in store.iter_table("events", since=since, until=until, channels=channels):
        b.line("events", row)
    for table in ("identities", "identity_identifiers", "identity_history"):
        for row in store.iter_table(table):
            b.line(table, row)
    return b.close()
