"""PostgreSQL: the identity feed's batch lookup probes the indexes for each value, whatever the
statistics (a registry not analyzed yet) and with the generic plan of a prepared statement
(psycopg prepares a statement after a few executions); it never scans the registry."""
from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from psycopg import sql as psql
from sqlalchemy.dialects import postgresql

from engine.store import identities as registry
from tests.test_identity_support import make_nir

PATIENTS = 2000


def _registry(eng) -> list[str]:
    """2,000 synthetic identities (IPP and INS each), autovacuum off: never analyzed."""
    now = datetime(2026, 12, 3)
    with eng.begin() as c:
        registry.identity_metadata.create_all(c, tables=[registry.identities, registry.identity_identifiers])
        for t in ("identities", "identity_identifiers"):
            c.exec_driver_sql(f"ALTER TABLE {t} SET (autovacuum_enabled = false)")
        ids, rows, values = [], [], []
        for p in range(1, PATIENTS + 1):
            ipp, nir = f"8{p:05d}", make_nir(f"2850763{p:06d}")
            rows.append({"id": p, "ipp": ipp, "ipp_authority": "CHU-X", "active": True,
                         "created_at": now, "updated_at": now})
            ids += [{"identity_id": p, "value": ipp, "authority": "CHU-X", "type": "PI"},
                    {"identity_id": p, "value": nir, "authority": "1.2.250.1.213.1.4.10", "type": "INS"}]
            if p % 250 == 0:
                values += [ipp, nir]
        c.execute(registry.identities.insert(), rows)
        c.execute(registry.identity_identifiers.insert(), ids)
    return values


def _scans(plan: list[str]) -> list[str]:
    return [line.strip().split("  (")[0] for line in plan if "Scan" in line]


def test_the_batch_lookup_probes_indexes_without_statistics_and_with_a_generic_plan(pg_url):
    eng = sa.create_engine(pg_url)
    try:
        values = _registry(eng)
        sql, params, _cols = registry._prefetch_form(postgresql.dialect())
        with eng.connect() as c:
            cur = c.connection.driver_connection.cursor()
            cur.execute(sql, dict(params, values=values))
            assert len(cur.fetchall()) == len(values)  # every IPP and INS found
            cur.execute("EXPLAIN " + sql, dict(params, values=values))
            custom = _scans([r[0] for r in cur.fetchall()])
            names = sorted({n for n in params if n.isidentifier()})  # values, type_1
            text = sql
            for i, n in enumerate(names, start=1):
                text = text.replace(f"%({n})s", f"${i}")
            assert "%(" not in text
            types = ", ".join("text[]" if n == "values" else "varchar" for n in names)
            cur.execute(f"PREPARE lookup ({types}) AS {text}")
            cur.execute("SET plan_cache_mode = force_generic_plan")
            args = psql.SQL(", ").join(psql.Literal(values if n == "values" else params[n])
                                       for n in names)  # EXPLAIN takes no bind parameters
            cur.execute(psql.SQL("EXPLAIN EXECUTE lookup ({})").format(args))
            generic = _scans([r[0] for r in cur.fetchall()])
        for plan in (custom, generic):
            assert plan and not [s for s in plan if "Seq Scan" in s], plan
            assert any("ix_identity_identifiers_value_type" in s for s in plan), plan
            assert any("identities_pkey" in s for s in plan), plan
    finally:
        eng.dispose()
