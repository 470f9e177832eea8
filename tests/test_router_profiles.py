"""Route filter ``profiles`` (MSH-21): config validation, matching rules, cache key, sample routes."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.config import ConfigError, load_config, load_config_text
from engine.router import Router, profile_matches

ROOT = Path(__file__).resolve().parent.parent
TLR = "1.0^CISIS_TLR_HL7_V2"
CDA = "2.1^CISIS_CDA_HL7_V2"


def msh(code="ORU", trigger="R01", profile=None, app="APP", version="2.5.1"):
    kw = {} if profile is None else {"profile": profile}
    return SimpleNamespace(message_code=code, trigger=trigger, sending_app=app, sending_facility="F",
                           receiving_app="R", receiving_facility="", version=version, processing_id="P",
                           encoding_chars="^~\\&", **kw)


CONFIG = """\
channels:
  in: {type: mllp, port: 2575}
routes:
  - name: tlr
    from: in
    filter: {message_types: ["ORU^R01"], profiles: [CISIS_TLR_HL7_V2]}
    to: [ris]
  - name: reports
    from: in
    filter: {message_types: ["ORU^R01", "MDM^*"], profiles: [CISIS_CDA_HL7_V2, ""]}
    to: [reports]
destinations:
  ris: {type: mllp, host: 127.0.0.1, port: 2576}
  reports: {type: mllp, host: 127.0.0.1, port: 2578}
"""


@pytest.mark.parametrize("allowed,raw,expected", [
    (["CISIS_TLR_HL7_V2"], TLR, True),                      # second component (EI name in CI-SIS)
    (["1.0"], TLR, True),                                   # first component
    ([TLR], TLR, True),                                     # whole repetition
    (["CISIS_TLR_HL7_V2"], CDA, False),
    (["CISIS_TLR_HL7_V2"], "", False),
    ([""], "", True),                                       # "" = no MSH-21
    (["", "CISIS_CDA_HL7_V2"], CDA, True),
    ([""], CDA, False),
    (["CISIS_TLR_HL7_V2"], "X^Y~1.0^CISIS_TLR_HL7_V2", True),   # any repetition
    (["CISIS_CDA_HL7_V2"], "2.1^ CISIS_CDA_HL7_V2 ", True),     # blanks ignored
    (["CISIS"], TLR, False),                                # no substring match
    ([], "anything", True),                                 # empty list = any
    (["IHE_FRANCE-2.11-PAM"], "2.11^IHE_FRANCE-2.11-PAM", True),
])
def test_profile_matches(allowed, raw, expected):
    assert profile_matches(allowed, raw) is expected


def test_routes_by_profile_first_match_per_destination():
    r = Router(load_config_text(CONFIG))
    assert [t.destination for t in r.targets("in", msh(profile=TLR))] == ["ris"]
    assert [t.destination for t in r.targets("in", msh(profile=CDA))] == ["reports"]
    assert [t.destination for t in r.targets("in", msh(profile=""))] == ["reports"]
    assert [t.destination for t in r.targets("in", msh())] == ["reports"]      # object without .profile
    assert r.targets("in", msh(profile="9^OTHER")) == ()
    assert [t.destination for t in r.targets("in", msh("MDM", "T02", profile=CDA))] == ["reports"]


def test_cache_key_includes_profile():
    r = Router(load_config_text(CONFIG))
    a = r.targets("in", msh(profile=TLR))
    b = r.targets("in", msh(profile=CDA))
    assert a != b and r.targets("in", msh(profile=TLR)) is a
    assert r.cache_info()["size"] == 2


def test_custom_repetition_and_component_separators():
    m = msh(profile="1.0$CISIS_TLR_HL7_V2")
    m.encoding_chars = "$#\\&"
    r = Router(load_config_text(CONFIG))
    assert [t.destination for t in r.targets("in", m)] == ["ris"]


@pytest.mark.parametrize("bad", ['["A~B"]', '["A|B"]', "CISIS_TLR_HL7_V2", "[1]"])
def test_invalid_profiles_are_config_errors_with_line(bad):
    text = CONFIG.replace("profiles: [CISIS_TLR_HL7_V2]", f"profiles: {bad}")
    with pytest.raises(ConfigError) as ei:
        load_config_text(text)
    assert any(p.path.startswith("routes[0].filter.profiles") and p.line == 6 for p in ei.value.problems), \
        str(ei.value)


def test_default_is_no_profile_filter():
    cfg = load_config_text(CONFIG.replace(", profiles: [CISIS_TLR_HL7_V2]", ""))
    assert cfg.routes[0].filter.profiles == []
    assert [t.destination for t in Router(cfg).targets("in", msh(profile="9^OTHER"))] == ["ris"]


def test_sample_routes_teleradiology():
    """engine/routes.yaml: TLR flows 1, 2, 4 -> teleradiology through ins_enrich; flow 3 -> the RIS;
    CI-SIS reports (and ORU/MDM without MSH-21) -> reports-out; other orders as before."""
    from engine.hl7.msh import read_msh

    r = Router(load_config(ROOT / "engine" / "routes.yaml"))
    samples = ROOT / "samples" / "teleradiology"
    for name in ("flow1_orm_nw.hl7", "flow2_orm_ca.hl7", "flow4_omi_o23.hl7"):
        (t,) = r.targets("mllp-in", read_msh((samples / name).read_bytes()))
        assert (t.destination, t.route) == ("teleradiology", "tlr-requests-to-teleradiology")
        assert '"ins_enrich"' in t.transforms_json
    (t,) = r.targets("mllp-in", read_msh((samples / "flow3_oru_ok.hl7").read_bytes()))
    assert (t.destination, t.route, t.transforms_json) == ("ris-adt", "tlr-answers-to-ris", "[]")
    (t, d, dmp) = r.targets("mllp-in", msh("MDM", "T02", profile=CDA, app="SI-TLR"))
    assert (t.destination, t.route, t.transforms_json) == ("reports-out", "reports-out", "[]")
    assert (d.destination, d.route, d.transforms_json) == ("drimbox", "reports-to-drimbox", "[]")
    assert (dmp.destination, dmp.route) == ("dmp", "reports-to-dmp")
    (t,) = r.targets("mllp-in", read_msh((ROOT / "samples" / "orm_o01.hl7").read_bytes()))
    assert (t.destination, t.route, t.transforms_json) == ("teleradiology", "orders-to-teleradiology", "[]")
