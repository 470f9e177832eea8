"""Held writes on PostgreSQL: a group of a registered statement sent as one statement reading
its rows from a JSON array writes exactly what ``executemany`` writes, and falls back to
``executemany`` where one statement could not (the same row updated twice, a JSON None, a
date-time with a time zone)."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from engine.store import held_writes
from engine.store.held_writes import HeldWrites, bulk
from engine.store.sql import json_text

meta = sa.MetaData()
things = sa.Table(
    "bulk_things", meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64)),
    sa.Column("at", sa.DateTime),
    sa.Column("day", sa.Date),
    sa.Column("flag", sa.Boolean),
    sa.Column("doc", sa.JSON),
)
_B = sa.bindparam
COLS = ("name", "at", "day", "flag", "doc")
INSERT = bulk(things.insert().values({c: _B(c, type_=things.c[c].type) for c in COLS}),
              things, [(c, c) for c in COLS])
UPDATE = bulk(things.update().where(things.c.id == _B("_id")).values(
    name=_B("v_name", type_=things.c.name.type), doc=_B("v_doc", type_=things.c.doc.type)),
    things, [("id", "_id"), ("name", "v_name"), ("doc", "v_doc")], key="id")
# the same statements, not registered: always executemany
INSERT_MANY = things.insert().values({c: _B(c, type_=things.c[c].type) for c in COLS})
UPDATE_MANY = things.update().where(things.c.id == _B("_id")).values(
    name=_B("v_name", type_=things.c.name.type), doc=_B("v_doc", type_=things.c.doc.type))

T0 = datetime(2026, 12, 3, 10, 11, 12, 345678)
ROWS = [
    {"name": "un", "at": T0, "day": date(2026, 12, 3), "flag": True,
     "doc": {"a": [1, "é"], "b": None, "date": "20261203"}},
    {"name": "deux \\ \"q\"", "at": T0.replace(microsecond=0), "day": None, "flag": False, "doc": {}},
    {"name": None, "at": None, "day": date(1900, 1, 1), "flag": None, "doc": [1, 2.5, "x"]},
]


@pytest.fixture
def pg(pg_url):
    eng = sa.create_engine(pg_url, json_serializer=json_text)
    meta.create_all(eng)
    yield eng
    eng.dispose()


def _table(eng) -> list:
    with eng.connect() as c:
        rows = c.execute(sa.select(things).order_by(things.c.id)).all()
        text = c.exec_driver_sql("SELECT doc::text FROM bulk_things ORDER BY id").scalars().all()
    return [tuple(r) for r in rows], text


def _apply(eng, stmt, params: list) -> None:
    with eng.begin() as conn:
        held = HeldWrites(conn, lambda _s: 0)
        for p in params:
            held.execute(stmt, p)
        held.flush()


def test_an_insert_group_is_one_statement_with_the_rows_of_executemany(pg, monkeypatch):
    sent = []
    real = held_writes._bulk_statement
    monkeypatch.setattr(held_writes, "_bulk_statement",
                        lambda *a: sent.append(a[0]) or real(*a))
    _apply(pg, INSERT, [dict(r) for r in ROWS])
    assert sent == [INSERT]
    bulk_rows = _table(pg)
    with pg.begin() as c:
        c.execute(things.delete())
        c.exec_driver_sql("ALTER SEQUENCE bulk_things_id_seq RESTART WITH 1")
    _apply(pg, INSERT_MANY, [dict(r) for r in ROWS])
    assert _table(pg) == bulk_rows
    assert [r[1] for r in bulk_rows[0]] == ["un", "deux \\ \"q\"", None]  # in order: ids follow


def test_an_update_group_updates_each_row(pg):
    _apply(pg, INSERT_MANY, [dict(r) for r in ROWS])
    _apply(pg, UPDATE, [{"_id": 1, "v_name": "one", "v_doc": {"n": 1}},
                        {"_id": 3, "v_name": "three", "v_doc": {"n": 3}}])
    rows, text = _table(pg)
    assert [(r[0], r[1], r[5]) for r in rows] == [(1, "one", {"n": 1}), (2, "deux \\ \"q\"", {}),
                                                  (3, "three", {"n": 3})]
    assert text == ['{"n": 1}', "{}", '{"n": 3}']  # the text json.dumps gives, as executemany's


@pytest.mark.parametrize("case", ["same_row_twice", "json_none", "aware_time"])
def test_groups_one_statement_cannot_write_go_row_by_row(pg, case, monkeypatch):
    _apply(pg, INSERT_MANY, [dict(r) for r in ROWS])
    used = []
    real = held_writes._bulk_statement
    monkeypatch.setattr(held_writes, "_bulk_statement", lambda *a: used.append(real(*a)) or used[-1])
    if case == "same_row_twice":  # one UPDATE ... FROM would apply only one of them
        _apply(pg, UPDATE, [{"_id": 1, "v_name": "first", "v_doc": {}},
                            {"_id": 1, "v_name": "second", "v_doc": {"n": 2}}])
        rows, _text = _table(pg)
        assert (rows[0][1], rows[0][5]) == ("second", {"n": 2})
    elif case == "json_none":  # SQLAlchemy writes JSON null, not SQL NULL
        _apply(pg, INSERT, [dict(ROWS[0], doc=None), dict(ROWS[1])])
        _rows, text = _table(pg)
        assert text[3:] == ["null", "{}"]
    else:
        aware = datetime(2026, 12, 3, 10, 0, tzinfo=timezone(timedelta(hours=1)))
        _apply(pg, INSERT, [dict(ROWS[0], at=aware), dict(ROWS[1])])
        assert len(_table(pg)[0]) == 5
    assert used == [None]
