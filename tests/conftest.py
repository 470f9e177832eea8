"""Shared fixtures: real SQLite and PostgreSQL stores, paths to ../shared.

PostgreSQL tests read ``MINIPFI_TEST_PG_URL`` (default the machine's local server). Each test gets
its own schema (``search_path`` set through the libpq ``options`` parameter) so that concurrent
runs never see each other's tables. Under ``CI=true`` an unreachable server fails the test instead
of skipping it.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

import engine.wiring  # noqa: F401 - registers the connector types (and their routes.yaml models)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "corpus"
SPECS = SHARED / "specs"

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_base_url() -> str:
    return os.environ.get("MINIPFI_TEST_PG_URL", DEFAULT_PG_URL)


def _pg_unreachable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL unreachable under CI=true: {reason}")
    pytest.skip(f"PostgreSQL unreachable: {reason}")


@pytest.fixture(autouse=True)
def _keep_sigpipe():
    """``engine.cli.main`` restores the default SIGPIPE action (a CLI piped into ``head`` ends
    quietly); tests that call it in-process must not leave pytest killable by a closed socket."""
    import signal

    old = signal.getsignal(signal.SIGPIPE)
    yield
    signal.signal(signal.SIGPIPE, old)


@contextmanager
def pg_schema_url():
    """A PostgreSQL URL whose search_path is a fresh schema, dropped on exit."""
    import sqlalchemy as sa

    base = _pg_base_url()
    schema = "t_" + uuid.uuid4().hex[:12]
    try:
        eng = sa.create_engine(base, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    except Exception as exc:  # noqa: BLE001 - any connection failure
        _pg_unreachable(str(exc).splitlines()[0])
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with eng.connect() as c:
            c.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        eng.dispose()


@pytest.fixture
def pg_url():
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    with pg_schema_url() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'minipfi.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """Run a test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'minipfi.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """For engine subprocess tests: None (the engine's embedded SQLite) or a PostgreSQL URL."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url):
    """A migrated, started store on SQLite and on PostgreSQL (``store_url``)."""
    from engine.store import Store

    s = Store(store_url)
    s.migrate()
    s.start()
    yield s
    s.stop()
    s.dispose()
