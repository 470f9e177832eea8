"""The store's SQL text shared by its parts: column lists, the PostgreSQL one-statement inserts,
row builders, and small helpers about database errors and times.
"""
from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from json import encoder as _json_encoder

import sqlalchemy as sa

# JSON columns: json.dumps's text (same encoder settings) without its per-call keyword
# handling; an identity update writes two or three. The store's engines serialise with it, and
# so do the PostgreSQL held writes that send rows as one JSON array: the same text either way.
_DEFAULTS = json.JSONEncoder()
_c_make_encoder = _json_encoder.c_make_encoder
_local = threading.local()


def _thread_encoder():
    """This thread's C encoder and its circular-reference markers, built once:
    ``JSONEncoder.encode`` builds both (and a closure) on every call. Per thread because the
    markers are state: a ``default`` that runs Python code may let another thread in while they
    are in use."""
    d = _DEFAULTS
    markers: dict = {}
    enc = _c_make_encoder(markers, d.default, _json_encoder.encode_basestring_ascii, d.indent,
                          d.key_separator, d.item_separator, d.sort_keys, d.skipkeys,
                          d.allow_nan)
    _local.enc = (enc, markers)
    return enc, markers


def _json_text(obj) -> str:
    """``json.dumps(obj)``'s text through this thread's encoder. After an error (circular
    structure, a value JSON cannot hold) the markers of the containers left open are cleared,
    or the next call would take their reused ids for a circular reference."""
    try:
        enc, markers = _local.enc
    except AttributeError:
        enc, markers = _thread_encoder()
    try:
        return "".join(enc(obj, 0))
    except BaseException:
        markers.clear()
        raise


# CPython without the C accelerator: the plain encoder (no shared state between calls).
json_text = _json_text if _c_make_encoder is not None else _DEFAULTS.encode

_scan_once = json.JSONDecoder().scan_once


def json_reader(text):
    """``json.loads(text)`` (None stays None) for JSON text written by :data:`json_text`: its
    C scanner called directly, without ``loads``' type and BOM checks and ``decode``'s two
    whitespace matches; anything else (bytes, surrounding whitespace, not one JSON value) goes
    through ``json.loads``, which also raises its errors."""
    if type(text) is not str:
        return None if text is None else json.loads(text)
    try:
        value, end = _scan_once(text, 0)
    except StopIteration:
        return json.loads(text)
    if end != len(text):
        return json.loads(text)
    return value


MSG_COLS = (
    "id, channel, received_at, sending_app, sending_facility, receiving_app, receiving_facility, "
    "message_type, control_id, version, charset, size, sha256, dedup_key, status, ack_code, ack, "
    "error_code, raw, flags"
)
ENTRY_COLS = (
    "message_id, destination, route, status, order_key, transforms, attempts, next_attempt_at, "
    "created_at, updated_at, target, doc_key, doc_id, action"
)
EVENT_COLS = "at, kind, channel, destination, message_id, entry_id, detail"
# Positions in a messages row as the writer builds it (column order of MSG_COLS): the hot path
# hands lists to executemany / one JSON array, so rows are positional there, by these names.
M_ID, M_RECEIVED_AT, M_SHA256, M_DEDUP_KEY, M_ACK, M_RAW = (
    [c.strip() for c in MSG_COLS.split(",")].index(n)
    for n in ("id", "received_at", "sha256", "dedup_key", "ack", "raw"))
# Positions in an events row (EVENT_COLS)
E_MESSAGE_ID, E_DETAIL = ([c.strip() for c in EVENT_COLS.split(",")].index(n) for n in ("message_id", "detail"))
ENTRY_KEYS = tuple(c.strip() for c in ENTRY_COLS.split(","))


def pg_json_insert(table: str, cols: str, types: str) -> str:
    """``INSERT … SELECT`` from ONE json parameter (an array of row arrays, bytea as hex): a
    constant, cached, server-side prepared statement whatever the batch size, and the client
    side is a single C-accelerated ``json.dumps`` (psycopg's Python-level array dumping cost
    more than the whole commit)."""
    exprs = []
    for i, t in enumerate(types.split()):
        if t == "bytea":
            exprs.append(f"decode(r->>{i}, 'hex')")
        else:
            exprs.append(f"(r->>{i})::{t}")
    return (f"INSERT INTO {table} ({cols}) SELECT {', '.join(exprs)} "
            "FROM jsonb_array_elements(%s::jsonb) AS r")


PG_INSERT = {
    "messages": pg_json_insert("messages", MSG_COLS, "int8 text float8 text text text text text "
                                "text text text int4 text text text text bytea text bytea text"),
    "queue_entries": pg_json_insert("queue_entries", ENTRY_COLS,
                                     "int8 text text text text text int4 float8 float8 float8 "
                                     "text text text text"),
    "events": pg_json_insert("events", EVENT_COLS, "float8 text text text int8 int8 text"),
}
# messages, their queue entries and events in ONE statement (one round trip); the foreign key
# check of queue_entries runs at the end of the statement and sees the new messages.
PG_INSERT_ALL = (
    "WITH m AS (" + PG_INSERT["messages"].replace("%s", "%(m)s") + "), "
    "v AS (" + PG_INSERT["events"].replace("%s", "%(v)s") + ") "
    + PG_INSERT["queue_entries"].replace("%s", "%(e)s")
)

# PostgreSQL hot path, ONE statement = one round trip, atomic by itself (autocommit): insert the
# batch's messages except those whose dedup key already exists within the window (those, and
# repeats of a key inside the batch, go to a second, complete pass), their entries, and return
# the ids actually inserted.
# The lookup is a correlated NOT EXISTS on (dedup_key, received_at): its plan is an index probe
# even as a generic prepared plan (an "= ANY($1)" lookup is not: it degraded to 190 ms).
PG_FAST = (
    "WITH m AS (" + PG_INSERT["messages"].replace("%s", "%(m)s")
    + " WHERE r->>13 IS NULL OR NOT EXISTS (SELECT 1 FROM messages x "
    "  WHERE x.dedup_key = r->>13 "
    "  AND x.received_at BETWEEN (r->>2)::float8 - %(w)s AND (r->>2)::float8 + %(w)s) "
    "  RETURNING id), "
    "e AS (" + PG_INSERT["queue_entries"].replace("%s", "%(e)s")
    + " WHERE (r->>0)::int8 IN (SELECT id FROM m)) "
    "SELECT id FROM m"
)

COMPLETE_KIND = {"sent": "sent", "error": "error", "queued": "retry", "filtered": "filtered"}

DB_LEVEL_NAMES = ("OperationalError", "InterfaceError")


def is_db_level(exc: BaseException) -> bool:
    """Connection/lock/IO level errors: the whole batch fails, the connection is dropped."""
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return True
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return type(exc).__name__ in DB_LEVEL_NAMES or any(
        c.__name__ in DB_LEVEL_NAMES for c in type(exc).__mro__
    )


def time_range(where: list[str], params: dict, column: str, since: float | None,
               until: float | None) -> None:
    """Add ``since <= column < until`` (either bound optional) to a filtered read."""
    if since is not None:
        where.append(f"{column} >= :since")
        params["since"] = float(since)
    if until is not None:
        where.append(f"{column} < :until")
        params["until"] = float(until)


def entry_row(mid, e, now: float) -> tuple:
    """The queue_entries row of one EntrySpec (column order of ``ENTRY_COLS``); a held
    destination's entry is first due ``hold`` seconds after reception."""
    due = now + e.hold if e.hold else now
    return (mid, e.destination, e.route, "queued", e.order_key, e.transforms, 0, due, now, now,
            e.target, e.doc_key, e.doc_id, e.action)


def ack_code_of(ack: bytes) -> str:
    """MSA-1 of an ACK built by the caller ('' if not found)."""
    i = ack.find(b"MSA")
    if i < 0 or len(ack) < i + 6:
        return ""
    sep = ack[i + 3:i + 4]
    return ack[i + 4:].split(sep, 1)[0].split(b"\r", 1)[0][:8].decode("ascii", "replace")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()
