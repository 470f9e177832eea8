"""engine.router: filter matching, dedupe by destination, cache, channel_accepts codes."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.config import load_config, load_config_text
from engine.router import RouteTarget, Router, channel_accepts

ROOT = Path(__file__).resolve().parent.parent


def msh(code="ADT", trigger="A01", app="GAM", facility="HOSP", rapp="RIS", version="2.5", pid="P", **kw):
    """An MSHInfo-like object (raw fields, as engine.hl7.msh.MSHInfo exposes them)."""
    return SimpleNamespace(
        message_code=code, trigger=trigger, sending_app=app, sending_facility=facility,
        receiving_app=rapp, receiving_facility="", version=version, processing_id=pid,
        encoding_chars="^~\\&", **kw,
    )


CONFIG = """\
channels:
  in:
    type: mllp
    port: 2575
    accept:
      message_types: ["ADT^*", "ORM^O01", "ORU^R01"]
      versions: ["2.4", "2.5"]
      processing_ids: [P]
  other:
    type: mllp
    port: 2580
routes:
  - name: adt
    from: in
    filter: {message_types: ["ADT^*"]}
    transforms:
      - {value: RIS, type: set_field, field: MSH-5}
    to: [ris, archive]
  - name: adt-a0x-from-gam
    from: in
    filter:
      message_types: ["ADT^A0?"]
      sending_applications: [GAM]
    to: [archive, pacs]
  - name: orders-v25
    from: in
    filter:
      message_types: ["ORM^*"]
      versions: ["2.5"]
      sending_facilities: [HOSP]
      receiving_applications: [RIS]
    to: [pacs]
  - name: everything-from-other
    from: other
    to: [archive]
destinations:
  ris:
    type: mllp
    host: 127.0.0.1
    port: 2576
    queue: {ordering: key, ordering_key: PID-3.1, concurrency: 4}
  archive:
    type: mllp
    host: 127.0.0.1
    port: 2577
  pacs:
    type: mllp
    host: 127.0.0.1
    port: 2578
    queue: {ordering: none, concurrency: 2}
"""


@pytest.fixture(scope="module")
def router():
    return Router(load_config_text(CONFIG))


def dests(targets):
    return [(t.route, t.destination) for t in targets]


def test_type_wildcard_and_target_fields(router):
    t = router.targets("in", msh("ADT", "A28", app="OTHER"))
    assert dests(t) == [("adt", "ris"), ("adt", "archive")]
    ris = t[0]
    assert isinstance(ris, RouteTarget)
    assert (ris.ordering, ris.ordering_key) == ("key", "PID-3.1")
    assert (t[1].ordering, t[1].ordering_key) == ("destination", None)
    assert json.loads(ris.transforms_json) == [{"type": "set_field", "field": "MSH-5", "value": "RIS"}]
    assert ris.transforms_json == '[{"field":"MSH-5","type":"set_field","value":"RIS"}]'  # keys sorted


def test_dedupe_by_destination_first_route_wins(router):
    t = router.targets("in", msh("ADT", "A01", app="GAM"))
    # archive reached by 'adt' and 'adt-a0x-from-gam': kept once, from the first route
    assert dests(t) == [("adt", "ris"), ("adt", "archive"), ("adt-a0x-from-gam", "pacs")]


def test_trigger_pattern_does_not_match(router):
    assert dests(router.targets("in", msh("ADT", "A28", app="GAM"))) == [("adt", "ris"), ("adt", "archive")]


def test_sending_app_first_component_or_whole_field(router):
    assert "pacs" in [t.destination for t in router.targets("in", msh("ADT", "A04", app="GAM^1.2.250.1^ISO"))]
    assert "pacs" not in [t.destination for t in router.targets("in", msh("ADT", "A04", app="GAMX"))]
    assert "pacs" not in [t.destination for t in router.targets("in", msh("ADT", "A04", app=""))]


def test_whole_field_match():
    cfg = load_config_text(CONFIG.replace("sending_applications: [GAM]", 'sending_applications: ["GAM^1.2.3^ISO"]'))
    r = Router(cfg)
    assert "pacs" in [t.destination for t in r.targets("in", msh("ADT", "A04", app="GAM^1.2.3^ISO"))]
    assert "pacs" not in [t.destination for t in r.targets("in", msh("ADT", "A04", app="GAM"))]


def test_version_facility_receiving_app_filters(router):
    assert dests(router.targets("in", msh("ORM", "O01", version="2.5"))) == [("orders-v25", "pacs")]
    assert router.targets("in", msh("ORM", "O01", version="2.4")) == ()
    assert router.targets("in", msh("ORM", "O01", facility="ELSEWHERE")) == ()
    assert router.targets("in", msh("ORM", "O01", facility="HOSP^1.2.3^ISO")) != ()
    assert router.targets("in", msh("ORM", "O01", rapp="LAB")) == ()


def test_no_match_and_unknown_channel(router):
    assert router.targets("in", msh("ORU", "R01")) == ()
    assert router.targets("nope", msh()) == ()


def test_routes_are_per_channel(router):
    assert dests(router.targets("other", msh("ORU", "R01"))) == [("everything-from-other", "archive")]


def test_cache_hit_returns_identical_result():
    r = Router(load_config_text(CONFIG))
    a = r.targets("in", msh("ADT", "A01"))
    b = r.targets("in", msh("ADT", "A01"))
    assert a is b
    assert r.cache_info()["size"] == 1
    # another key
    assert r.targets("in", msh("ADT", "A01", app="X")) is not a


def test_cache_is_bounded():
    r = Router(load_config_text(CONFIG), cache_size=10)
    for i in range(25):
        r.targets("in", msh("ADT", "A01", app=f"APP{i}"))
        assert r.cache_info()["size"] <= 10


def test_cache_hit_is_fast():
    r = Router(load_config_text(CONFIG))
    m = msh("ADT", "A01")
    r.targets("in", m)
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        r.targets("in", m)
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 20e-6, per_call  # ~0.3 µs typically; generous bound for slow CI


def test_sample_routes_yaml_routing():
    cfg = load_config(ROOT / "engine" / "routes.yaml")
    r = Router(cfg)
    assert [t.destination for t in r.targets("mllp-in", msh("ADT", "A28"))] == ["ris-adt"]
    assert r.targets("mllp-in", msh("ADT", "A28"))[0].ordering_key == "PID-3.1"
    assert [t.destination for t in r.targets("mllp-in", msh("ORM", "O01"))] == ["teleradiology"]
    assert [t.destination for t in r.targets("mllp-in", msh("OMI", "O23"))] == ["teleradiology"]
    assert [t.destination for t in r.targets("mllp-in", msh("ORU", "R01"))] == ["reports-out"]
    assert [t.destination for t in r.targets("mllp-in", msh("MDM", "T02"))] == ["reports-out"]
    assert r.targets("mllp-in", msh("ACK", "")) == ()


def test_sample_messages_route_with_real_msh_reader():
    read_msh = pytest.importorskip("engine.hl7.msh").read_msh
    cfg = load_config(ROOT / "engine" / "routes.yaml")
    r = Router(cfg)
    ch = cfg.channel("mllp-in")
    a28 = read_msh((ROOT / "samples" / "adt_a28.hl7").read_bytes())
    orm = read_msh((ROOT / "samples" / "orm_o01.hl7").read_bytes())
    assert channel_accepts(ch, a28) is None and channel_accepts(ch, orm) is None
    assert [t.destination for t in r.targets("mllp-in", a28)] == ["ris-adt"]
    assert [t.destination for t in r.targets("mllp-in", orm)] == ["teleradiology"]


# ---------------------------------------------------------------------------------------------
# channel_accepts
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel():
    return load_config_text(CONFIG).channel("in")


def test_accepts_ok(channel, router):
    assert channel_accepts(channel, msh("ADT", "A40")) is None
    assert router.channel_accepts(channel, msh("ADT", "A40")) is None
    assert router.accepts("in", msh("MDM", "T02")).code == "200"
    assert channel_accepts(channel, msh("ORU", "R01", version="2.4")) is None


def test_accepts_200_unsupported_message_type(channel):
    rej = channel_accepts(channel, msh("MDM", "T02"))
    assert rej.code == "200"
    assert rej == ("200", "Unsupported message type MDM", "MSH^1^9^1^1")


def test_accepts_201_unsupported_event(channel):
    rej = channel_accepts(channel, msh("ORM", "O02"))
    code, text, location = rej
    assert code == "201" and location == "MSH^1^9^1^2"
    assert "O02" in text and "ORM" in text


def test_accepts_203_version(channel):
    assert channel_accepts(channel, msh("ADT", "A01", version="2.3")) == (
        "203", "Unsupported version id 2.3", "MSH^1^12")


def test_accepts_202_processing_id(channel):
    rej = channel_accepts(channel, msh("ADT", "A01", pid="T"))
    assert (rej.code, rej.location) == ("202", "MSH^1^11")
    assert channel_accepts(channel, msh("ADT", "A01", pid="")).code == "202"


def test_accepts_defaults_accept_everything():
    ch = load_config_text("channels:\n  c:\n    type: mllp\n    port: 1\n").channel("c")
    assert channel_accepts(ch, msh("ZZZ", "Z99", version="2.8", pid="D")) is None
    assert channel_accepts(ch, msh("ADT", "A01", version="2.2")).code == "203"


def test_sample_channel_refuses_ack():
    ch = load_config(ROOT / "engine" / "routes.yaml").channel("mllp-in")
    assert channel_accepts(ch, msh("ACK", "")).code == "200"
    assert channel_accepts(ch, msh("MDM", "T01")).code == "201"
    assert channel_accepts(ch, msh("ADT", "Z80")) is None
