"""The CLI's refusals are one line and a non-zero status: no engine database in the data
directory (none is created), a busy port, a bad id; ``--help`` shows the defaults."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import build_parser, main
from tests.enginectl import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_store_commands_do_not_create_a_database(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MINIPFI_DB_URL", raising=False)
    empty = tmp_path / "nothing-here"
    for argv in (["messages", "list"], ["messages", "show", "1"], ["messages", "replay", "1"],
                 ["messages", "handled", "1", "--destination", "ris"], ["identities", "show", "IPP1"]):
        rc = main([*argv, "--data-dir", str(empty)])
        err = capsys.readouterr().err
        assert rc == 1, argv
        assert err.startswith("minipfi: no engine database at ") and err.count("\n") == 1, err
    assert not empty.exists()


def test_postgresql_without_engine_tables_is_refused(pg_url, capsys, monkeypatch):
    monkeypatch.setenv("MINIPFI_DB_URL", pg_url)
    assert main(["messages", "list"]) == 1
    assert "no messages table" in capsys.readouterr().err
    import sqlalchemy as sa

    eng = sa.create_engine(pg_url)
    with eng.connect() as c:
        assert not sa.inspect(c).has_table("alembic_version")   # nothing was created
    eng.dispose()


def test_bad_arguments_are_one_line(tmp_path, capsys, monkeypatch):
    from engine.store import Store

    monkeypatch.delenv("MINIPFI_DB_URL", raising=False)
    s = Store(Store.default_url(tmp_path))
    s.migrate()
    s.dispose()
    for argv, text in ((["messages", "show", "abc"], "no message with id or control id 'abc'"),
                       (["messages", "replay", "abc"], "not a message id: abc"),
                       (["messages", "replay", "42"], "unknown message id(s): [42]"),
                       (["messages", "list", "--since", "yesterday-ish"], "--since 'yesterday-ish'")):
        assert main([*argv, "--data-dir", str(tmp_path)]) == 1, argv
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1, err


def test_busy_port_is_one_line(tmp_path):
    port, status_port = free_port(), free_port()
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(f"engine: {{status: {{port: {status_port}}}}}\nchannels:\n  in: {{type: mllp, port: {port}}}\n"
                   "routes: []\ndestinations: {}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        r = subprocess.run([sys.executable, "-m", "engine.cli", "run", "--config", str(cfg), "--data-dir",
                            str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"minipfi: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, shown", [
    (["messages", "list"], "(default: 100)"),
    (["reload"], "(default: 30.0)"),
    (["send"], "(default: 30.0)"),
    (["run"], "(default: engine/routes.yaml)"),
])
def test_help_shows_defaults(argv, shown, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    assert shown in capsys.readouterr().out


def test_version_reads_the_sample_routes_file():
    """README: `minipfi version --config FILE`; the sample has transforms, which can only be
    checked once the plug-ins are registered (a fresh process: nothing imported them yet)."""
    out = subprocess.run([sys.executable, "-m", "engine.cli", "version", "--config",
                          str(ROOT / "engine" / "routes.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("minipfi ") and "CDA validation resources" in out.stdout
