"""/metrics pieces without an engine process: the cheap histogram, certificate days left, a
store that does not answer, and the exposition's labels."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.config import load_config
from engine.histogram import Histogram
from engine.status.metrics import EngineCollector, registry_for, render
from tests.pki import make_pki


def test_histogram_is_cumulative_with_inf():
    h = Histogram((0.01, 0.1, 1.0))
    for v in (0.005, 0.01, 0.05, 0.5, 7.0):
        h.observe(v)
    buckets, total = h.snapshot()
    assert buckets == [("0.01", 2), ("0.1", 3), ("1.0", 4), ("+Inf", 5)]
    assert total == pytest.approx(7.565)


def test_certificate_days_left_and_store_down(tmp_path):
    pki = make_pki(tmp_path / "pki")
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"""
engine:
  console: {{enabled: true, port: 0, tls: {{cert: pki/server.pem, key: pki/server.key}}}}
channels:
  in:
    type: mllp
    port: 0
    tls: {{cert: pki/server.pem, key: pki/server.key, ca: pki/ca.pem}}
routes: [{{name: r, from: in, to: [out]}}]
destinations:
  out:
    type: mllp
    host: 127.0.0.1
    port: 1
    tls: {{cert: {pki.expired_cert}, key: {pki.expired_key}}}
""")
    cfg = load_config(routes)

    def down():
        raise OSError("store down")

    eng = SimpleNamespace(version="t", config=cfg, channels={}, workers={}, store=None,
                          last_reload={"result": "refused"})
    text = render(registry_for(EngineCollector(eng, down))).decode()
    lines = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and ln[0] != "#"}
    assert 360 < lines['minipfi_certificate_days_left{kind="channel",name="in",role="cert"}'] <= 366
    assert 'minipfi_certificate_days_left{kind="channel",name="in",role="ca"}' in lines
    assert 360 < lines['minipfi_certificate_days_left{kind="console",name="console",role="cert"}'] <= 366
    assert lines['minipfi_certificate_days_left{kind="destination",name="out",role="cert"}'] < 0
    assert lines["minipfi_store_up"] == 0
    assert lines["minipfi_config_last_reload_ok"] == 0
    assert lines['minipfi_info{version="t"}'] == 1
    assert str(tmp_path) not in text          # names and roles, not file paths


def test_certificate_owners_and_roles_are_distinct_labels():
    from engine.connectors.certificates import _owner

    places = {
        "channels.in.tls.cert": ("channel", "in", "cert"),
        "channels.in.tls.ca": ("channel", "in", "ca"),
        "destinations.dmp.tls.cert": ("destination", "dmp", "cert"),
        "destinations.dmp.signing.cert": ("destination", "dmp", "signing.cert"),
        "destinations.mss.identity.cert": ("destination", "mss", "identity.cert"),
        "engine.console.tls.cert": ("console", "console", "cert"),
        "alerts.notify.it-mail.client_cert": ("notifier", "it-mail", "client_cert"),
    }
    assert {p: _owner(p) for p in places} == places
    assert len(set(places.values())) == len(places)  # one metric series per certificate
