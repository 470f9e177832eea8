"""The identity registry's batch lookup (``Lookups``: JSON columns read by ``json_reader``, INS
holders kept as four values, the looked-up values sent as ``json_text``) gives each upsert
what its own single read gives; the state row stores empty texts as NULL."""
from __future__ import annotations

import json
from datetime import date

import sqlalchemy as sa

from engine.identity import InsPolicy, parse_adt
from engine.store import identities as registry
from engine.store.identities import Lookups, apply_events
from engine.store.sql import json_reader
from tests.test_identity_registry import db  # noqa: F401 - the registry on both stores
from tests.test_identity_support import SYNTH_NIR_F, SYNTH_NIR_M, adt, corpus_files, make_nir

TEST_ENV = InsPolicy(environment="test")
NIR_X = make_nir("2850763220177")
NIR_Y = make_nir("2790363220188")

SEED = [p.read_bytes() for p in corpus_files()] + [
    adt("A28", ipp="810001", ins=SYNTH_NIR_F, evn="20240306100001"),
    adt("A28", ipp="810002", ins=SYNTH_NIR_M, sex="M", evn="20240306100002", zfa=None),
    adt("A28", ipp="810003", ins=None, status="PROV", zfd=None, evn="20240306100003"),
    adt("A28", ipp="810004", ins=NIR_X, used_name="SYNTH-USAGE", evn="20240306100004"),
    adt("A29", ipp="810004", ins=NIR_X, evn="20240306100005"),  # inactive holder of NIR_X
    adt("A28", ipp="810005", ins=NIR_Y, authority="CHU-Y", evn="20240306100006"),
    adt("A28", ipp="810005", ins=None, status="PROV", authority="CHU-Z", evn="20240306100007"),
]
# What later ADTs look up: known and new IPPs, INS held by an active, an inactive or no
# identity, by the same or another identity, an IPP without authority held twice.
PROBES = [p.read_bytes() for p in corpus_files()[:1]] + [
    adt("A31", ipp="810001", ins=SYNTH_NIR_F, evn="20240307100001"),
    adt("A31", ipp="810002", ins=SYNTH_NIR_F, sex="M", evn="20240307100002"),
    adt("A31", ipp="810003", ins=NIR_X, evn="20240307100003"),
    adt("A31", ipp="810004", ins=None, status="PROV", evn="20240307100004"),
    adt("A28", ipp="819999", ins=SYNTH_NIR_M, evn="20240307100005"),
    adt("A28", ipp="819998", ins=None, status="PROV", evn="20240307100006"),
    adt("A31", ipp="810005", ins=NIR_Y, authority="CHU-Y", evn="20240307100007"),
]


def _seed(engine):
    with engine.begin() as conn:
        apply_events(conn, [(parse_adt(raw), n) for n, raw in enumerate(SEED, start=1)],
                     policy=TEST_ENV, now=registry._utcnow())


def test_batch_lookup_gives_what_each_single_read_gives(db):
    _seed(db)
    events = [parse_adt(raw) for raw in PROBES]
    with db.connect() as conn:
        rows = Lookups(conn, events).rows()
        compared = 0
        for ev in events:
            found = registry._prefetched((0, rows), ev)
            single = registry._lookup_for_upsert(conn, ev)
            assert found is not None and single is not None
            keys = [k for k in single.keys() if k not in ("created_at", "updated_at")]
            assert len(keys) > 30
            for k in keys:
                assert found[k] == single[k], k
                assert type(found[k]) is type(single[k]), k
            compared += 1
            if single["consent"] is not None:
                assert isinstance(found["consent"], dict) and found["consent"]["dmp_status"]
            if ev.ins is not None and single["ins_holder_id"] is not None:
                assert isinstance(found["ins_holder_active"], bool)
        assert compared == len(PROBES)
        # the probes do reach the branches: JSON read, INS held (active, inactive), new IPP
        found = [registry._prefetched((0, rows), ev) for ev in events]
        assert any(f["zfd"] for f in found) and any(f["consent"] for f in found)
        assert {f["ins_holder_active"] for f in found} >= {True, False, None}
        assert any(f["raw_id"] is None for f in found)


def test_json_columns_of_the_batch_read(db):
    cols = dict(registry._prefetch_form(db.dialect)[2])
    if db.dialect.name == "sqlite":  # text from the database: json_reader
        assert cols["consent"] is json_reader and cols["zfd"] is json_reader
        sa_proc = sa.JSON().dialect_impl(db.dialect).result_processor(db.dialect, None)
        for text in ('{"a": [1, null, "\\u00e9"], "b": 1.5}', "{}", "null", ' {"a": 1}', None):
            assert cols["consent"](text) == sa_proc(text)
    else:  # psycopg decodes JSON itself
        assert cols["consent"] is None and cols["zfd"] is None


def test_looked_up_values_are_one_json_array(db):
    if db.dialect.name != "sqlite":
        return
    _seed(db)
    events = [parse_adt(raw) for raw in PROBES]
    sent = []
    with db.connect() as conn:
        raw = conn.connection.driver_connection
        raw.set_trace_callback(sent.append)
        try:
            Lookups(conn, events)
        finally:
            raw.set_trace_callback(None)
    values = sorted({ev.ipp.value for ev in events} | {ev.ins.value for ev in events if ev.ins})
    assert len(sent) == 1 and "'" + json.dumps(values) + "'" in sent[0]


def test_state_stores_empty_texts_as_null():
    ev = parse_adt(adt("A28", ipp="810009", ins=None, status="PROV", used_name=None, cog=None,
                       zfa=None, zfd="ZFD|||Y|N||||"))
    s = registry._state(ev, None, "")
    for k in ("ins_value", "ins_oid", "ins_kind", "ins_rejected_reason", "used_name",
              "birth_place_cog", "obtained_via"):
        assert s[k] is None, k
    assert s["birth_name"] == "SYNTH-UN" and s["given_names"] == "ALEX CAMILLE"
    ev = parse_adt(adt("A28", ipp="810010", ins=SYNTH_NIR_F))
    s = registry._state(ev, ev.ins, "why")
    assert (s["ins_value"], s["ins_oid"], s["ins_kind"], s["ins_rejected_reason"]) == (
        ev.ins.value, ev.ins.oid, ev.ins.kind, "why")


def _diff_reference(before, after: dict) -> dict:
    """The history's change as written before :func:`registry._diff` skipped ``_iso`` by type."""
    out = {}
    for k, v in after.items():
        old = before.get(k) if before is not None else None
        if old != v and not (old is None and v in ("", {}, [])):
            out[k] = [registry._iso(old), registry._iso(v)]
    return out


class _Day(date):
    """A date subclass: still a date for the history (its ISO text)."""


def test_diff_gives_the_change_the_plain_loop_gives():
    from datetime import datetime
    values = [None, "", "x", "0", 0, 1, True, False, 1.5, {}, {"a": 1}, [], ["a"],
              date(2024, 3, 6), _Day(2024, 3, 7), datetime(2024, 3, 6, 10, 0, 5, 120)]
    keys = [f"c{n}" for n in range(len(values))]
    after = dict(zip(keys, values))
    assert registry._diff(None, after) == _diff_reference(None, after)
    for shift in range(1, len(values)):
        before = dict(zip(keys, values[shift:] + values[:shift]))
        got = registry._diff(before, after)
        assert got == _diff_reference(before, after)
        assert [type(x) for pair in got.values() for x in pair] == \
            [type(x) for pair in _diff_reference(before, after).values() for x in pair]
    # every date of the change is text
    got = registry._diff({"d": None, "t": date(2020, 1, 1)}, {"d": _Day(2024, 3, 7), "t": None})
    assert got == {"d": [None, "2024-03-07"], "t": ["2020-01-01", None]}
