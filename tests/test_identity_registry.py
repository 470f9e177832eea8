"""Identity registry on SQLite and PostgreSQL (store_url fixture): apply, lookups, history."""
from __future__ import annotations

from datetime import date

import pytest
import sqlalchemy as sa

from engine.identity import InsPolicy, parse_adt
from engine.store.identities import (
    AmbiguousIdentity,
    apply_event,
    create_tables,
    find_identity,
    identities,
    identity_history,
    identity_identifiers,
    identity_metadata,
    ins_lookup_stmt,
    ipp_lookup_stmt,
)
from tests.test_identity_support import (
    CORPUS_INS,
    OID_TEST,
    SGL,
    SYNTH_NIR_F,
    SYNTH_NIR_M,
    adt,
    corpus_files,
)
from tests.test_identity_pamfr import EXPECTED_CONSENT

TEST_ENV = InsPolicy(environment="test")
PROD = InsPolicy(environment="production")


@pytest.fixture
def db(store_url):
    eng = sa.create_engine(store_url)
    create_tables(eng)
    yield eng
    eng.dispose()


def apply(db, raw, message_id=None, policy=TEST_ENV):
    with db.begin() as conn:
        return apply_event(conn, parse_adt(raw), message_id=message_id, policy=policy)


def find(db, **kw):
    with db.connect() as conn:
        return find_identity(conn, **kw)


def test_corpus_feed_field_by_field(db):
    # SGL admission, SGL discharge, then the five consent variants, in event-time order.
    for n, path in enumerate(corpus_files(), start=1):
        res = apply(db, path.read_bytes(), message_id=100 + n)
        assert res.violations == [] and res.ins_taken
        assert res.action == ("created" if n == 1 else res.action)
        view = find(db, ipp="000003")
        expected = EXPECTED_CONSENT[path.name]
        if expected is not None:  # the discharge has no ZFA: consent kept from before
            assert view.consent["feeding_opposition"] == expected[0]
            assert view.consent["consultation_consent"] == expected[2]
            assert view.consent["feeding_opposed"] is expected[4]
            assert view.consent["consultation_consented"] is expected[5]
    j = find(db, ipp="000003", ipp_authority="CHU-X").to_json()
    assert j["ipp"] == "000003" and j["ipp_authority"] == "CHU-X"
    assert j["ipp_finess"] == "000897406"
    assert j["ins"] == {"value": CORPUS_INS, "oid": OID_TEST, "kind": "NIR_TEST"}
    assert j["birth_name"] == "PAT-TROIS"
    assert j["first_given_name"] == "DOMINIQUE"
    assert j["given_names"] == ["DOMINIQUE"]
    assert j["used_name"] is None
    assert j["birth_date"] == "1979-03-28"
    assert j["sex"] == "F"
    assert j["birth_place_cog"] == "63220"
    assert j["status"] == "VALI"
    assert j["consent"]["dmp_status"] == "ACTIF"
    assert (j["consent"]["feeding_opposition"], j["consent"]["consultation_consent"]) == ("NA", "NA")
    assert j["obtained_via"] == "INSI" and j["insi_query_date"] == "2021-12-01"
    assert j["active"] is True
    assert [h["message_id"] for h in j["history"]] == list(range(101, 108))
    assert [h["control_id"] for h in j["history"]] == [
        "3975", "3995", "3975", "3976", "3977", "3978", "3979"]
    assert j["history"][0]["action"] == "created"
    assert j["history"][0]["change"]["birth_name"] == [None, "PAT-TROIS"]
    assert j["history"][0]["event_time"] == "2024-03-06T11:11:54"
    assert {"at", "event_time", "trigger", "control_id", "action", "note"} <= set(j["history"][0])
    # Lookup by INS resolves to the same identity.
    assert find(db, ins=CORPUS_INS).id == j["id"]
    assert find(db, ins=CORPUS_INS, ins_oid=OID_TEST).id == j["id"]
    assert find(db, ipp="999999") is None
    assert find(db, ipp="000003", ipp_authority="OTHER") is None


def test_production_keeps_identity_without_test_ins(db):
    res = apply(db, (SGL / "admission.er7").read_bytes(), message_id=1, policy=PROD)
    assert res.action == "created" and not res.ins_taken
    assert [(v.field, v.rule, v.severity) for v in res.violations] == [
        ("PID-3[2].4.2", "INS-OID-ENVIRONMENT", "E")]
    view = find(db, ipp="000003")
    assert view.ins_value is None and view.birth_name == "PAT-TROIS"
    assert "INS-OID-ENVIRONMENT" in view.ins_rejected_reason
    assert "INS-OID-ENVIRONMENT" in view.history[0]["note"]
    assert find(db, ins=CORPUS_INS) is None


def test_update_records_before_and_after(db):
    apply(db, adt("A28", evn="20240101100000", control="c1"), message_id=1)
    res = apply(db, adt("A31", evn="20240102100000", control="c2", used_name="SYNTH-EPOUX",
                        status="QUAL"), message_id=2)
    assert res.action == "updated"
    view = find(db, ipp="900001")
    assert view.used_name == "SYNTH-EPOUX" and view.status_code == "QUAL"
    last = view.history[-1]
    assert last["action"] == "updated" and last["message_id"] == 2 and last["trigger"] == "A31"
    assert last["change"]["used_name"] == [None, "SYNTH-EPOUX"]
    assert last["change"]["status_code"] == ["VALI", "QUAL"]
    assert "birth_name" not in last["change"]
    # Same content again: unchanged, still recorded.
    res = apply(db, adt("A31", evn="20240103100000", control="c3", used_name="SYNTH-EPOUX",
                        status="QUAL"), message_id=3)
    assert res.action == "unchanged"
    assert len(find(db, ipp="900001").history) == 3


def test_out_of_order_a31_is_ignored(db):
    apply(db, adt("A28", evn="20240105100000", birth_name="SYNTH-NOUVEAU"), message_id=1)
    res = apply(db, adt("A31", evn="20240104100000", birth_name="SYNTH-ANCIEN"), message_id=2)
    assert res.action == "ignored_older" and not res.ins_taken
    view = find(db, ipp="900001")
    assert view.birth_name == "SYNTH-NOUVEAU"
    assert str(view.last_event_time) == "2024-01-05 10:00:00"
    assert [h["action"] for h in view.history] == ["created", "ignored_older"]
    assert view.history[1]["message_id"] == 2
    # A newer one applies.
    assert apply(db, adt("A31", evn="20240106100000", birth_name="SYNTH-TROIS")).action == "updated"
    assert find(db, ipp="900001").birth_name == "SYNTH-TROIS"


def test_rejected_ins_drops_stored_ins_and_keeps_identity(db):
    apply(db, adt("A28", evn="20240101100000"))
    assert find(db, ipp="900001").ins_value == SYNTH_NIR_F
    res = apply(db, adt("A31", evn="20240102100000", dob="19850700"), message_id=9)
    assert res.action == "updated" and not res.ins_taken
    assert [v.rule for v in res.violations] == ["INS-RULE-11"]
    view = find(db, ipp="900001")
    assert view.ins_value is None and view.active
    assert "INS-RULE-11" in view.ins_rejected_reason
    assert view.history[-1]["change"]["ins_value"] == [SYNTH_NIR_F, None]
    assert find(db, ins=SYNTH_NIR_F) is None  # the INS identifier row is gone too


def test_a29_deactivates_and_keeps_history(db):
    apply(db, adt("A28", evn="20240101100000"), message_id=1)
    res = apply(db, adt("A29", evn="20240102100000"), message_id=2)
    assert res.action == "deactivated"
    view = find(db, ipp="900001")
    assert view.active is False and view.birth_name == "SYNTH-UN"
    assert [h["action"] for h in view.history] == ["created", "deactivated"]
    assert view.history[1]["change"] == {"active": [True, False]}
    # An older A31 does not resurrect it; a newer A28 does.
    assert apply(db, adt("A31", evn="20240101110000")).action == "ignored_older"
    assert find(db, ipp="900001").active is False
    res = apply(db, adt("A28", evn="20240103100000"))
    assert res.action == "updated" and find(db, ipp="900001").active is True
    # A23 on an unknown identifier.
    assert apply(db, adt("A23", ipp="900077")).action == "not_found"


def test_a40_merge_then_lookup_by_old_ipp(db):
    apply(db, adt("A28", ipp="900001", evn="20240101100000"), message_id=1)
    # A duplicate created for the same person: the INS is already held -> not taken.
    res = apply(db, adt("A28", ipp="900002", evn="20240101110000"), message_id=2)
    assert res.action == "created" and not res.ins_taken
    assert [(v.rule, v.severity) for v in res.violations] == [("INS-COLLISION", "W")]
    # A40: 900002 survives, 900001 is folded into it.
    res = apply(db, adt("A40", ipp="900002", mrg="900001", evn="20240102100000"), message_id=3)
    assert res.action == "merged" and res.ins_taken
    survivor = find(db, ipp="900002")
    assert res.identity_id == survivor.id
    via_old = find(db, ipp="900001")
    assert via_old.id == survivor.id and via_old.ipp == "900002"
    assert find(db, ins=SYNTH_NIR_F).id == survivor.id
    assert survivor.active is True and survivor.ins_value == SYNTH_NIR_F
    assert len(survivor.merged_from) == 1
    with db.connect() as conn:
        old = conn.execute(sa.select(identities).where(identities.c.ipp == "900001")).mappings().one()
    assert old["active"] is False and old["merged_into"] == survivor.id
    actions = [(h["identity_id"], h["action"], h["message_id"]) for h in survivor.history]
    assert (old["id"], "merged", 3) in actions and (survivor.id, "merged", 3) in actions
    assert (old["id"], "created", 1) in actions
    # A late A31 for the merged IPP does not touch anything.
    res = apply(db, adt("A31", ipp="900001", evn="20240103100000", birth_name="SYNTH-X"))
    assert res.action == "ignored_merged"
    assert find(db, ipp="900002").birth_name == "SYNTH-UN"


def test_a40_with_unknown_mrg_keeps_alias(db):
    apply(db, adt("A28", ipp="900002", evn="20240101100000"))
    res = apply(db, adt("A40", ipp="900002", mrg="900055", evn="20240102100000"), message_id=7)
    assert res.action == "merged"
    assert find(db, ipp="900055").id == find(db, ipp="900002").id


def test_a40_chain_resolves(db):
    apply(db, adt("A28", ipp="900001", ins=None, status="PROV", evn="20240101100000"))
    apply(db, adt("A28", ipp="900002", ins=None, status="PROV", evn="20240101100000"))
    apply(db, adt("A28", ipp="900003", ins=None, status="PROV", evn="20240101100000"))
    apply(db, adt("A40", ipp="900002", mrg="900001", ins=None, status="PROV", evn="20240102100000"))
    apply(db, adt("A40", ipp="900003", mrg="900002", ins=None, status="PROV", evn="20240103100000"))
    target = find(db, ipp="900003")
    assert find(db, ipp="900001").id == target.id == find(db, ipp="900002").id
    assert len(target.merged_from) == 2
    # Merging back (cycle) is refused.
    res = apply(db, adt("A40", ipp="900001", mrg="900003", ins=None, status="PROV",
                        evn="20240104100000"))
    assert res.action == "rejected"
    assert [v.rule for v in res.violations][-1] == "MERGE-CYCLE"
    assert find(db, ipp="900001").id == find(db, ipp="900003").id


def test_a47_changes_the_identifier(db):
    apply(db, adt("A28", ipp="900001", evn="20240101100000"), message_id=1)
    before = find(db, ipp="900001")
    res = apply(db, adt("A47", ipp="900009", mrg="900001", evn="20240102100000"), message_id=2)
    assert res.action == "id_changed" and res.identity_id == before.id
    view = find(db, ipp="900009")
    assert view.id == before.id and view.ipp == "900009"
    assert find(db, ipp="900001") is None
    assert view.ins_value == SYNTH_NIR_F
    last = view.history[-1]
    assert last["action"] == "id_changed" and last["message_id"] == 2
    assert last["change"]["ipp"] == ["900001", "900009"]


def test_a47_target_in_use_is_rejected(db):
    apply(db, adt("A28", ipp="900001", evn="20240101100000"))
    apply(db, adt("A28", ipp="900009", ins=SYNTH_NIR_M, sex="M", evn="20240101100000"))
    res = apply(db, adt("A47", ipp="900009", mrg="900001", evn="20240102100000"))
    assert res.action == "rejected"
    assert ("A47-TARGET-IN-USE", "E") in [(v.rule, v.severity) for v in res.violations]
    assert find(db, ipp="900001").ipp == "900001"
    assert find(db, ipp="900009").ins_value == SYNTH_NIR_M


def test_a47_unknown_old_identifier_creates(db):
    res = apply(db, adt("A47", ipp="900009", mrg="900001"))
    assert res.action == "created" and "previous identifier unknown" in res.note
    assert find(db, ipp="900009") is not None


def test_ambiguous_ipp_without_authority(db):
    apply(db, adt("A28", ipp="900001", authority="CHU-X", ins=None, status="PROV"))
    apply(db, adt("A28", ipp="900001", authority="CHU-Y", ins=None, status="PROV"))
    with pytest.raises(AmbiguousIdentity):
        find(db, ipp="900001")
    assert find(db, ipp="900001", ipp_authority="CHU-Y").ipp_authority == "CHU-Y"


def test_passthrough_writes_nothing(db):
    res = apply(db, adt("A44"))
    assert (res.action, res.identity_id) == ("passthrough", None)
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(identities)).scalar() == 0


def test_caller_owns_the_transaction(db):
    with db.connect() as conn:
        trans = conn.begin()
        apply_event(conn, parse_adt(adt("A28")), message_id=1, policy=TEST_ENV)
        trans.rollback()
    assert find(db, ipp="900001") is None


def test_unique_identifier_key(db):
    apply(db, adt("A28"))
    with pytest.raises(sa.exc.IntegrityError):
        with db.begin() as conn:
            idt = conn.execute(sa.select(identities.c.id)).scalar()
            conn.execute(identity_identifiers.insert().values(
                identity_id=idt, value="900001", authority="CHU-X", type="PI"))


# --- indexes -------------------------------------------------------------------------------

def _sqlite_plan(conn, stmt) -> str:
    sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    return " | ".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))


def test_sqlite_lookups_use_indexes(sqlite_url):
    eng = sa.create_engine(sqlite_url)
    identity_metadata.create_all(eng)
    with eng.connect() as conn:
        for stmt in (ipp_lookup_stmt("000003"), ipp_lookup_stmt("000003", "CHU-X"),
                     ins_lookup_stmt(CORPUS_INS), ins_lookup_stmt(CORPUS_INS, OID_TEST)):
            plan = _sqlite_plan(conn, stmt)
            assert "USING" in plan and "INDEX" in plan, plan
            assert "SCAN identity_identifiers" not in plan, plan
        plan = _sqlite_plan(conn, sa.select(identity_history).where(
            identity_history.c.identity_id == 1).order_by(identity_history.c.id))
        assert "ix_identity_history_identity" in plan, plan
    eng.dispose()


def test_postgresql_lookups_can_use_indexes(pg_url):
    eng = sa.create_engine(pg_url)
    identity_metadata.create_all(eng)
    with eng.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")
        for stmt in (ipp_lookup_stmt("000003"), ins_lookup_stmt(CORPUS_INS, OID_TEST)):
            sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))
            assert "Index" in plan and "Seq Scan" not in plan, plan
    eng.dispose()


# --- migration -----------------------------------------------------------------------------

def test_migration_matches_metadata(store_url):
    import importlib.util

    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    from tests.conftest import ROOT

    path = ROOT / "engine" / "store" / "migrations" / "versions" / "0002_identity_registry.py"
    spec = importlib.util.spec_from_file_location("migration_0002", path)
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)

    eng = sa.create_engine(store_url)
    with eng.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        migration.upgrade()
    insp = sa.inspect(eng)
    for table in identity_metadata.sorted_tables:
        cols = {c["name"]: c for c in insp.get_columns(table.name)}
        assert set(cols) == {c.name for c in table.columns}, table.name
        for c in table.columns:
            assert cols[c.name]["nullable"] == c.nullable, (table.name, c.name)
        assert {i["name"] for i in insp.get_indexes(table.name)} >= {i.name for i in table.indexes}
    uniques = {u["name"] for u in insp.get_unique_constraints("identity_identifiers")}
    assert "uq_identity_identifiers_key" in uniques
    # The migrated schema works with the registry code.
    with eng.begin() as conn:
        assert apply_event(conn, parse_adt(adt()), message_id=1, policy=TEST_ENV).action == "created"
    with eng.begin() as conn, Operations.context(MigrationContext.configure(conn)):
        migration.downgrade()
    assert not set(sa.inspect(eng).get_table_names()) & {"identities", "identity_identifiers",
                                                         "identity_history"}
    eng.dispose()


def test_birth_date_type_roundtrip(db):
    apply(db, adt("A28"))
    assert find(db, ipp="900001").birth_date == date(1985, 7, 12)


@pytest.mark.parametrize("kwargs,rule", [
    (dict(ins=SYNTH_NIR_F[:13] + "00"), "INS-FORMAT"),
    (dict(status="RECUP"), "INS-NOT-QUALIFIED"),
    (dict(status="VALI~FICT"), "INS-STATUS-FICT"),
    (dict(cog=None), "INS-STRICT-TRAITS"),
    (dict(dob="19850230"), "BIRTH-DATE-INVALID"),
])
def test_rule_breaks_keep_identity_without_ins(db, kwargs, rule):
    res = apply(db, adt("A28", **kwargs), message_id=5)
    assert res.action == "created" and not res.ins_taken
    assert rule in [v.rule for v in res.violations]
    view = find(db, ipp="900001")
    assert view.ins_value is None and view.birth_name == "SYNTH-UN"
    assert rule in view.history[0]["note"] and view.history[0]["message_id"] == 5
    with db.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(identity_identifiers)
                         .where(identity_identifiers.c.type == "INS")).scalar()
    assert n == 0
