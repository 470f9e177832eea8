"""Writes held back until the next read, then sent grouped (one ``executemany`` per statement).

The identity feed applies the ADTs of one group commit one after the other; on PostgreSQL every
statement is a round trip of the single writer, so the registry's writes (history rows, identity
updates, identifier rows) are held here and sent together. A read through :class:`HeldWrites`
first sends everything held, so every read sees every earlier write: reads are never reordered.

Held writes are sent sorted by the caller's ``rank`` (stable: the order of submission is kept
within a rank) and grouped by consecutive identical statements. The caller must only hold writes
that commute across ranks for the rows they touch (the identity registry: deletes, then new
identities, then identifier rows, then updates, then history rows, see
:func:`engine.store.identities.apply_events`); it allocates the keys of the rows it inserts
itself, so no held write returns anything. On PostgreSQL they are sent in one psycopg pipeline
(one wait for all their results instead of one per statement); when the writer already runs the
transaction in a pipeline, they are only queued there and go with the next read or the COMMIT.
A group is sent as one DBAPI ``executemany`` (on the DBAPI cursor, errors are the driver's) of
the statement compiled once, its parameters passed through the same type processors SQLAlchemy
would use, without its per-row handling (SQLite dates and date-times: their ``isoformat``, the
same text as SQLAlchemy's processor, see :func:`_sqlite_iso`).

On PostgreSQL, a group of several rows of a statement registered with :func:`bulk` is instead
ONE statement reading its rows from a JSON array (``json_to_recordset``): psycopg's
``executemany`` spends about 30 µs of Python per row (a Bind/Execute each, even in a pipeline),
which was the largest part of the identity feed's writes on PostgreSQL (80 µs per ADT, two rows
each: the identity's UPDATE and its history row).
"""
from __future__ import annotations

from datetime import date, datetime
from operator import itemgetter
from typing import Any, Callable

from sqlalchemy import JSON, BigInteger, Boolean, Date, DateTime, Integer, String, Text
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection

from .sql import json_text


# Per statement (the callers' statements are built once: a few hundred variants at most).
_DRIVER_FORMS: dict = {}
_BULK: dict = {}  # statement -> (table, [(column, bind name)], key column or None)
_BULK_SQL: dict = {}  # statement -> (SQL, [(column, bind name, kind)], key bind) on PostgreSQL
_BULK_TYPES = (String, Text, Integer, BigInteger, Boolean, DateTime, Date, JSON)


def bulk(stmt, table, binds: list[tuple[str, str]], key: str | None = None):
    """Register ``stmt`` (an INSERT into ``table``, or an UPDATE of one row of it by ``key``,
    whose values are the bind parameters ``binds``: ``[(column, bind name)]``, the key's first)
    for the one-statement form of a PostgreSQL group; returns ``stmt``."""
    if all(isinstance(table.c[col].type, _BULK_TYPES) for col, _b in binds):
        _BULK[stmt] = (table, list(binds), key)
    return stmt


class HeldWrites:
    """A stand-in for a Connection: DML ``execute`` is held, anything else sends the held writes
    first and runs at once."""

    __slots__ = ("conn", "rank", "_held")

    def __init__(self, conn: Connection, rank: Callable[[Any], int]):
        self.conn = conn
        self.rank = rank
        self._held: list = []  # (rank, stmt, params)

    def execute(self, stmt, params=None):
        if not stmt.is_dml:
            self.flush()
            return self.conn.execute(stmt, params)
        rank = self.rank(stmt)
        held = self._held
        if type(params) is list:
            for p in params:
                held.append((rank, stmt, p))
        else:
            held.append((rank, stmt, params or {}))
        return None

    def flush(self) -> None:
        held = self._held
        if not held:
            return
        self._held = []
        held.sort(key=_rank_of)  # stable
        raw = self.conn.connection.driver_connection
        pipeline = getattr(raw, "pipeline", None)
        if pipeline is None or raw.pgconn.pipeline_status:  # sqlite3, or already in a pipeline
            self._send(held)
            return
        with pipeline():  # psycopg: sent together, one wait for all their results
            self._send(held)

    def _send(self, held: list) -> None:
        conn = self.conn
        cur = conn.connection.driver_connection.cursor()
        i, n = 0, len(held)
        while i < n:
            stmt = held[i][1]
            j = i + 1
            while j < n and held[j][1] is stmt:
                j += 1
            params = [h[2] for h in held[i:j]]
            if len(params) > 1 and stmt in _BULK and conn.dialect.name == "postgresql":
                one = _bulk_statement(stmt, params, conn.dialect)
                if one is not None:
                    cur.execute(*one)
                    i = j
                    continue
            key = (stmt, conn.dialect.name)
            form = _DRIVER_FORMS.get(key, ...)
            if form is ...:
                form = _DRIVER_FORMS[key] = _driver_form(stmt, conn.dialect)
            if form is None:
                conn.execute(stmt, params if len(params) > 1 else params[0])
            else:
                sql, binds, positional, values_of, procs = form
                if positional:
                    rows = [values_of(ps) for ps in params]
                    if procs:
                        for k, row in enumerate(rows):
                            row = rows[k] = list(row)
                            for x, proc in procs:
                                row[x] = proc(row[x])
                else:
                    rows = [{name: proc(ps[name]) if proc else ps[name] for name, proc in binds}
                            for ps in params]
                if len(rows) > 1:
                    cur.executemany(sql, rows)
                else:
                    cur.execute(sql, rows[0])
            i = j


def _driver_form(stmt, dialect):
    """``stmt`` compiled once for the driver: (SQL, [(bind name, processor)], positional, the
    positional values of a parameter dict, [(position, processor)]), so that a group is one
    DBAPI ``executemany`` without SQLAlchemy's per-row parameter handling (the same type
    processors, applied here: a row's values taken by one ``itemgetter``, then converted only
    where a column has a processor); None when a bind carries a value of its own."""
    c = stmt.compile(dialect=dialect, for_executemany=True)
    if c.escaped_bind_names or c.literal_execute_params or c.post_compile_params:
        return None
    if any(b.value is not None or b.callable is not None for b in c.binds.values()):
        return None
    names = list(c.positiontup) if c.positional else list(c.binds)
    binds = []
    for n in names:
        t = c.binds[n].type
        proc = t.dialect_impl(dialect).bind_processor(dialect)
        if proc is not None and isinstance(t, (DateTime, Date)):
            proc = _last_value_memo(_sqlite_iso(t.dialect_impl(dialect), proc))
        binds.append((n, proc))
    get = itemgetter(*names) if names else (lambda _ps: ())
    values_of = get if len(names) != 1 else (lambda ps: (get(ps),))
    procs = [(x, proc) for x, (_n, proc) in enumerate(binds) if proc is not None]
    return (c.string, binds, c.positional, values_of, procs)


def _bulk_sql(stmt, dialect):
    table, binds, key = _BULK[stmt]
    q = dialect.identifier_preparer.quote
    cols = ", ".join(f"{q(c)} {table.c[c].type.compile(dialect=dialect)}" for c, _b in binds)
    kinds = []
    for c, b in binds:
        t = table.c[c].type
        kinds.append((c, b, "json" if isinstance(t, JSON) else "time" if isinstance(t, (DateTime, Date)) else ""))
    if key is None:
        names = ", ".join(q(c) for c, _b in binds)
        sql = (f"INSERT INTO {q(table.name)} ({names}) SELECT {names} FROM ROWS FROM "
               f"(json_to_recordset(%s::json) AS ({cols})) WITH ORDINALITY AS r({names}, _n) "
               f"ORDER BY _n")  # the rows in order: serial ids (history) follow the events
    else:
        sets = ", ".join(f"{q(c)} = r.{q(c)}" for c, _b in binds if c != key)
        sql = (f"UPDATE {q(table.name)} AS t SET {sets} FROM json_to_recordset(%s::json) "
               f"AS r({cols}) WHERE t.{q(key)} = r.{q(key)}")
    key_bind = next((b for c, b in binds if c == key), None)
    form = _BULK_SQL[stmt] = (sql, kinds, key_bind)
    return form


def _bulk_statement(stmt, params: list, dialect) -> tuple[str, tuple[str]] | None:
    """(SQL, (the group's rows as one JSON array,)): the group in one statement; or None when
    that statement would not write exactly what ``executemany`` writes: an UPDATE of the same
    row twice (one statement updates it once), a JSON column's None (written as JSON ``null``
    by SQLAlchemy, SQL NULL here), a date-time with a time zone."""
    sql, kinds, key_bind = _BULK_SQL.get(stmt) or _bulk_sql(stmt, dialect)
    if key_bind is not None and len({ps[key_bind] for ps in params}) < len(params):
        return None
    rows = []
    for ps in params:
        row = {}
        for col, b, kind in kinds:
            v = ps[b]
            if kind == "time" and v is not None:
                if type(v) is datetime and v.tzinfo is not None:
                    return None
                v = v.isoformat()
            elif kind == "json" and v is None:
                return None
            row[col] = v
        rows.append(row)
    return sql, (json_text(rows),)


# SQLAlchemy's SQLite DATETIME and DATE store ``"%(year)04d-%(month)02d-%(day)02d
# %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d"`` and ``"%(year)04d-%(month)02d-%(day)02d"``
# (SQLAlchemy documentation, SQLite dialect, "DATETIME" and "DATE"): for a naive ``datetime``
# exactly ``isoformat(" ", "microseconds")``, for a ``date`` exactly ``isoformat()``.
_SQLITE_DATETIME_FORMAT = sqlite.DATETIME._storage_format
_SQLITE_DATE_FORMAT = sqlite.DATE._storage_format


def _sqlite_iso(impl, proc):
    """``proc`` (the bind processor of ``impl``) with the usual values converted by their C
    ``isoformat``: the same text without the dict and ``%`` formatting of SQLAlchemy's processor.
    Only for SQLite's DATETIME / DATE with their default storage format whose processor gives
    that text for sample values, and only for a naive ``datetime`` (a DATETIME) or a plain
    ``date`` (a DATE); anything else (time zone, subclass, a date in a DATETIME, None) goes to
    ``proc``."""
    if isinstance(impl, sqlite.DATETIME) and impl._storage_format == _SQLITE_DATETIME_FORMAT:
        if all(proc(v) == v.isoformat(" ", "microseconds") for v in _DATETIME_SAMPLES):
            def datetime_iso(value, _datetime=datetime):
                if type(value) is _datetime and value.tzinfo is None:
                    return value.isoformat(" ", "microseconds")
                return proc(value)
            return datetime_iso
    elif isinstance(impl, sqlite.DATE) and impl._storage_format == _SQLITE_DATE_FORMAT:
        if all(proc(v) == v.isoformat() for v in _DATE_SAMPLES):
            def date_iso(value, _date=date):
                if type(value) is _date:
                    return value.isoformat()
                return proc(value)
            return date_iso
    return proc


_DATETIME_SAMPLES = (datetime(2026, 3, 1, 8, 0), datetime(987, 12, 31, 23, 59, 58, 5))
_DATE_SAMPLES = (date(2026, 3, 1), date(987, 12, 31))


def _last_value_memo(proc):
    """``proc`` remembering its last value (by identity): a batch's ADTs share one clock reading
    (``updated_at``, the history's ``at``), converted once instead of once per row. Only for
    dates and times: immutable, so the same object always converts to the same value."""
    last = [(None, None)]  # one (value, converted) pair, replaced whole: no torn read

    def memo(value):
        seen, out = last[0]
        if value is seen and value is not None:
            return out
        out = proc(value)
        last[0] = (value, out)
        return out

    return memo


def _rank_of(h) -> int:
    return h[0]
