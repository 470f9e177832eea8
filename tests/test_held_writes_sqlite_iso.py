"""The held writes bind SQLite dates and date-times by their ``isoformat`` text only where that
is exactly SQLAlchemy's DATE / DATETIME text; anything else goes through SQLAlchemy's
processor."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from engine.store.held_writes import _driver_form, _sqlite_iso
from engine.store.identities import _INSERT_HISTORY

DIALECT = sqlite.dialect()


class MyDateTime(datetime):
    pass


class MyDate(date):
    pass


def _spied(type_):
    """(``_sqlite_iso`` of the type's SQLite processor, the values that reached SQLAlchemy's
    processor after it was built, SQLAlchemy's processor)."""
    impl = type_.dialect_impl(DIALECT)
    real = impl.bind_processor(DIALECT)
    reached: list = []

    def spy(v):
        reached.append(v)
        return real(v)

    fast = _sqlite_iso(impl, spy)
    reached.clear()  # the samples it checked the processor with
    return fast, reached, real


NAIVE = [datetime(2026, 3, 1, 8, 0), datetime(2026, 3, 1, 8, 0, 0, 1),
         datetime(2026, 12, 31, 23, 59, 59, 999999), datetime(1, 1, 1), datetime(987, 6, 5, 4, 3, 2, 10)]
DATES = [date(2026, 3, 1), date(1, 1, 1), date(987, 6, 5), date(9999, 12, 31)]


def test_naive_datetimes_bound_by_isoformat_as_sqlalchemy_does():
    fast, reached, real = _spied(sa.DateTime())
    for v in NAIVE:
        assert fast(v) == real(v)
    assert reached == []  # none went through SQLAlchemy's processor
    assert real(datetime(2026, 3, 1, 8, 0)) == "2026-03-01 08:00:00.000000"


def test_dates_bound_by_isoformat_as_sqlalchemy_does():
    fast, reached, real = _spied(sa.Date())
    for v in DATES:
        assert fast(v) == real(v)
    assert reached == []
    assert real(date(987, 6, 5)) == "0987-06-05"


@pytest.mark.parametrize("value", [
    datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc),
    datetime(2026, 3, 1, 8, 0, 0, 5, tzinfo=timezone(timedelta(hours=2))),
    MyDateTime(2026, 3, 1, 8, 0, 0, 5), date(2026, 3, 1), MyDate(2026, 3, 1), None,
])
def test_datetime_column_falls_back_for_anything_else(value):
    fast, reached, real = _spied(sa.DateTime())
    assert fast(value) == real(value)
    assert reached == [value]


@pytest.mark.parametrize("value", [
    datetime(2026, 3, 1, 8, 0), datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc), MyDate(2026, 3, 1),
    None,
])
def test_date_column_falls_back_for_anything_else(value):
    fast, reached, real = _spied(sa.Date())
    assert fast(value) == real(value)
    assert reached == [value]


def test_errors_stay_sqlalchemys():
    for type_ in (sa.DateTime(), sa.Date()):
        fast, _reached, real = _spied(type_)
        with pytest.raises(TypeError) as ours:
            fast("2026-03-01")
        with pytest.raises(TypeError) as theirs:
            real("2026-03-01")
        assert str(ours.value) == str(theirs.value)


def test_other_storage_formats_keep_sqlalchemys_processor():
    for type_ in (sqlite.DATETIME(truncate_microseconds=True),
                  sqlite.DATETIME(storage_format="%(year)04d/%(month)02d/%(day)02d "
                                  "%(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d",
                                  regexp=r"(\d+)/(\d+)/(\d+) (\d+):(\d+):(\d+).(\d+)"),
                  sqlite.DATE(storage_format="%(day)02d.%(month)02d.%(year)04d",
                              regexp=r"(\d+)\.(\d+)\.(\d+)")):
        impl = type_.dialect_impl(DIALECT)
        proc = impl.bind_processor(DIALECT)
        assert _sqlite_iso(impl, proc) is proc


def test_driver_form_of_a_held_insert_binds_sqlalchemys_text():
    """The history INSERT's compiled form: its date-time columns give SQLAlchemy's text."""
    _sql, binds, _positional, values_of, procs = _driver_form(_INSERT_HISTORY, DIALECT)
    names = [n for n, _p in binds]
    for at in NAIVE:
        params = {"identity_id": 1, "at": at, "event_time": at.replace(microsecond=0),
                  "trigger": "A31", "control_id": "c", "message_id": 2, "action": "updated",
                  "change": {"x": [1, 2]}, "note": None}
        row = list(values_of(params))
        for x, proc in procs:
            row[x] = proc(row[x])
        got = dict(zip(names, row))
        dt = sa.DateTime().dialect_impl(DIALECT).bind_processor(DIALECT)
        assert got["at"] == dt(at) and got["event_time"] == dt(at.replace(microsecond=0))
        assert got["event_time"].endswith(".000000")
