"""``minipfi check`` opens the certificate files of channels and destinations (paths relative to
the routes file) and refuses what ``run`` would refuse."""
from __future__ import annotations

import shutil

import pytest

from engine.cli import main
from engine.config import load_config
from tests.pki import make_pki

ROUTES = """\
engine:
  status: {bind: "%(bind)s"}
channels:
  in:
    type: mllp
    port: 0
    tls: {cert: certs/server.pem, key: certs/server.key, ca: certs/ca.pem, require_client_cert: true}
routes:
  - {name: r, from: in, to: [out, box]}
destinations:
  out:
    type: mllp
    host: 127.0.0.1
    port: 2999
    tls: {cert: %(client_cert)s, key: %(client_key)s, ca: certs/ca.pem}
  box:
    type: drimbox
    host: 127.0.0.1
    port: 2998
    tls: {ca: certs/ca.pem}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def write(tmp_path, pki, bind="127.0.0.1", client_cert="certs/client.pem", client_key="certs/client.key"):
    certs = tmp_path / "site" / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    for p in (pki.ca, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key,
              pki.expired_cert, pki.expired_key):
        shutil.copy(p, certs / p.name)
    f = tmp_path / "site" / "routes.yaml"
    f.write_text(ROUTES % {"bind": bind, "client_cert": client_cert, "client_key": client_key})
    return f


def check(f, capsys):
    rc = main(["check", str(f)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_relative_paths_resolve_against_the_routes_file(tmp_path, pki, capsys, monkeypatch):
    f = write(tmp_path, pki)
    monkeypatch.chdir(tmp_path)          # not the routes file's folder
    cfg = load_config(f)
    assert cfg.channels["in"].tls.cert == str(f.parent / "certs" / "server.pem")
    assert cfg.destinations["out"].tls.ca == str(f.parent / "certs" / "ca.pem")
    rc, text = check(f, capsys)
    assert rc == 0 and "OK" in text, text


def test_missing_expired_and_mismatched_files_are_refused(tmp_path, pki, capsys):
    f = write(tmp_path, pki, client_cert="certs/expired.pem", client_key="certs/client.key")
    (f.parent / "certs" / "server.key").unlink()
    rc, text = check(f, capsys)
    assert rc == 1
    assert "channels.in.tls.key: cannot read" in text and "No such file" in text
    assert "destinations.out.tls.cert:" in text and "expired on" in text
    assert "destinations.out.tls.key:" in text and "does not match" in text
    f = write(tmp_path, pki)
    (f.parent / "certs" / "ca.pem").write_text("garbage")
    rc, text = check(f, capsys)
    assert rc == 1
    for where in ("channels.in.tls.ca", "destinations.out.tls.ca", "destinations.box.tls.ca"):
        assert f"{where}: " in text and "not a PEM certificate" in text


def test_status_off_loopback_needs_its_token_set(tmp_path, pki, capsys, monkeypatch):
    f = write(tmp_path, pki, bind="0.0.0.0")
    monkeypatch.delenv("MINIPFI_STATUS_TOKEN", raising=False)
    rc, text = check(f, capsys)
    assert rc == 1 and "engine.status.token_env: status is bound to 0.0.0.0" in text
    monkeypatch.setenv("MINIPFI_STATUS_TOKEN", "t0ken")
    assert check(f, capsys)[0] == 0
