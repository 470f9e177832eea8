"""The teleradiology processing step without sockets: which messages it takes, the ACK it decides,
what it stores (a real store, SQLite and PostgreSQL), and its place among the channel's steps."""
from __future__ import annotations

import textwrap
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.channels.mllp import MLLPChannel
from engine.wiring import channel_steps as processing_steps
from engine.config import ConfigError, load_config_text
from engine.hl7.ack import ControlIdGenerator, read_ack
from engine.hl7.msh import read_msh
from engine.reports.processing import CisisReportStep, PacsReportStep
from engine.reports.teleradiology import check_tlr
from engine.reports.teleradiology_step import TeleradiologyStep, err_text
from engine.router import Router
from engine.store import Duplicate, Stored

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "teleradiology"
FLOWS = {1: "flow1_orm_nw.hl7", 2: "flow2_orm_ca.hl7", 3: "flow3_oru_ok.hl7", 4: "flow4_omi_o23.hl7"}
PHI = ("PAT-TROIS", "DOMINIQUE", "279035121518989", "19790328", "000003")
CDA_PROFILE = "2.1^CISIS_CDA_HL7_V2"


def config_text(tlr="{enabled: true}", reports="{enabled: false}"):
    return textwrap.dedent(f"""
        channels:
          in:
            type: mllp
            port: 2575
            teleradiology: {tlr}
            reports: {reports}
        routes:
          - {{name: tlr, from: in, filter: {{profiles: [CISIS_TLR_HL7_V2]}}, to: [out]}}
          - {{name: rest, from: in, to: [out]}}
        destinations:
          out: {{type: mllp, host: 127.0.0.1, port: 9}}
    """)


def sample(flow: int) -> bytes:
    return (SAMPLES / FLOWS[flow]).read_bytes()


def edit(raw: bytes, seg: str, n: int, value: str, cid: str | None = None) -> bytes:
    """Set field n of the first ``seg`` (MSH numbering for MSH); optionally a new MSH-10."""
    lines = raw.decode("utf-8").split("\r")
    for i, ln in enumerate(lines):
        if ln.startswith(seg + "|"):
            parts = ln.split("|")
            idx = n - 1 if seg == "MSH" else n
            parts.extend([""] * (idx + 1 - len(parts)))
            parts[idx] = value
            lines[i] = "|".join(parts)
            break
    else:
        raise AssertionError(f"no {seg}")
    out = "\r".join(lines).encode("utf-8")
    return edit(out, "MSH", 10, cid) if cid else out


# ----------------------------------------------------------------------------------- config


def test_config_block_defaults_and_unknown_keys():
    cfg = load_config_text(config_text("{}")).channel("in").teleradiology
    assert (cfg.enabled, cfg.message_types, cfg.profile, cfg.route_rejected) == (
        False, ["ORM^O01", "OMI^O23", "ORU^R01"], "CISIS_TLR_HL7_V2", False)
    with pytest.raises(ConfigError, match="teleradiology.route_rejectd"):
        load_config_text(config_text("{enabled: true, route_rejectd: true}"))
    with pytest.raises(ConfigError, match="teleradiology.message_types"):
        load_config_text(config_text("{enabled: true, message_types: []}"))


def test_disabled_block_adds_no_step():
    cfg = load_config_text(config_text("{enabled: false}"))
    assert processing_steps(cfg.channel("in"), cfg.engine) == []


def test_step_order_teleradiology_before_the_report_steps():
    cfg = load_config_text(textwrap.dedent("""
        channels:
          in:
            type: mllp
            port: 2575
            identity_feed: {enabled: true}
            teleradiology: {enabled: true}
            reports: {enabled: true}
            pacs_reports:
              enabled: true
              sending_applications: [SI-TLR, PACS]
              cda_wrap:
                organization: {id: "000897406", name: "Centre d'imagerie de test"}
                document_root_oid: "1.2.250.1.999.99.10"
                accession_root_oid: "1.2.250.1.999.99.4"
        routes: [{name: r, from: in, to: [out]}]
        destinations: {out: {type: mllp, host: 127.0.0.1, port: 9}}
    """))
    ch = MLLPChannel("in", cfg.channel("in"), cfg.engine, Router(cfg), None, ControlIdGenerator(),
                     steps_for=processing_steps)
    ch.store = object()  # steps are tried only when the channel has a store
    names = [type(s).__name__ for s in ch.steps]
    assert names == ["IdentityFeed", "TeleradiologyStep", "CisisReportStep", "PacsReportStep"]
    for flow in (1, 2, 3, 4):
        assert isinstance(ch._step_for(read_msh(sample(flow))), TeleradiologyStep)
    # flow 3 sent by an application the PACS block lists: still a teleradiology flow (first match)
    assert isinstance(ch._step_for(read_msh(sample(3))), TeleradiologyStep)
    assert PacsReportStep.applies(ch.steps[3], read_msh(sample(3)))
    # a CI-SIS report (CDA profile only) is the report step's
    mdm = edit(edit(sample(3), "MSH", 9, "MDM^T02^MDM_T02"), "MSH", 21, CDA_PROFILE)
    assert isinstance(ch._step_for(read_msh(mdm)), CisisReportStep)
    # both profiles: the teleradiology step, composed with the report step
    both = edit(sample(3), "MSH", 21, "1.0^CISIS_TLR_HL7_V2~" + CDA_PROFILE)
    step = ch._step_for(read_msh(both))
    assert isinstance(step, TeleradiologyStep) and isinstance(step.report_step, CisisReportStep)


def test_sample_routes_yaml_checks_the_teleradiology_flows():
    from engine.config import load_config

    cfg = load_config(ROOT / "engine" / "routes.yaml")
    ch = cfg.channel("mllp-in")
    assert ch.teleradiology.enabled and not ch.teleradiology.route_rejected
    steps = processing_steps(ch, cfg.engine)
    assert [type(s).__name__ for s in steps] == [
        "IdentityFeed", "TeleradiologyStep", "CisisReportStep", "PacsReportStep"]
    assert all(steps[1].applies(read_msh(sample(n))) for n in (1, 2, 3, 4))


# ----------------------------------------------------------------------------------- applies


def step(tlr="{enabled: true}", reports="{enabled: false}") -> TeleradiologyStep:
    cfg = load_config_text(config_text(tlr, reports))
    (s,) = processing_steps(cfg.channel("in"), cfg.engine)[:1]
    assert isinstance(s, TeleradiologyStep)
    return s


@pytest.mark.parametrize("flow", [1, 2, 3, 4])
def test_applies_to_the_four_flows(flow):
    assert step().applies(read_msh(sample(flow)))


@pytest.mark.parametrize("msh21,applies", [
    ("", False),                                        # no profile: not a teleradiology flow
    (CDA_PROFILE, False),                               # a CI-SIS report
    ("CISIS_TLR_HL7_V2", True),                         # the name alone
    ("2.0^CISIS_TLR_HL7_V2", True),                     # wrong version: taken, then answered 103
    (CDA_PROFILE + "~1.0^CISIS_TLR_HL7_V2", True),      # any repetition
    ("1.0^CISIS_TLR_HL7_V2_X", False),
])
def test_applies_by_msh21(msh21, applies):
    assert step().applies(read_msh(edit(sample(1), "MSH", 21, msh21))) is applies


def test_applies_only_to_the_configured_types():
    s = step("{enabled: true, message_types: [ORM^O01]}")
    assert s.applies(read_msh(sample(1))) and not s.applies(read_msh(sample(3)))
    assert not s.applies(read_msh(sample(4)))
    adt = (ROOT / "samples" / "adt_a28.hl7").read_bytes()
    assert not step().applies(read_msh(adt))


# ----------------------------------------------------------------------------------- ERR texts


def test_err_texts_name_the_published_guide_sections_without_patient_data():
    broken = edit(edit(edit(sample(4), "IPC", 3, ""), "PID", 5, ""), "MSH", 12, "2.5")
    problems = check_tlr(broken).problems
    assert len(problems) == 3
    for p in problems:
        t = err_text(p)
        assert t.startswith("CI-SIS Volet Téléradiologie, ") and ".md" not in t, t
        assert not any(x in t for x in PHI), t
    assert [err_text(p).split(":")[0] for p in problems] == [
        "CI-SIS Volet Téléradiologie, Contraintes communes, Eléments de l'entête",
        "CI-SIS Volet Téléradiologie, Contraintes communes, Les données concernant le patient et sa venue",
        "CI-SIS Volet Téléradiologie, Flux 4, Segment IPC"]
    oc = check_tlr(edit(sample(2), "ORC", 1, "XO")).problems[0]
    assert err_text(oc).startswith("CI-SIS Volet Téléradiologie, Evènements déclenchants: ORC-1 of ORM^O01")


# ----------------------------------------------------------------------------------- with a store


class _Batcher:
    def __init__(self):
        self.records = []

    def add_call(self, record, fn, *args):
        self.records.append(record)


class _Conn:
    peer = "127.0.0.1:1"


def run_step(store, raw: bytes, tlr="{enabled: true}", reports="{enabled: false}", codec="utf-8"):
    """What the channel does for a step, without the reactor: the record it builds, ``prepare``
    (here in the test thread), the writer op, the stored result."""
    cfg = load_config_text(config_text(tlr, reports))
    batcher = _Batcher()
    ch = MLLPChannel("in", cfg.channel("in"), cfg.engine, Router(cfg), batcher, ControlIdGenerator(),
                     steps_for=processing_steps)
    ch.handle(raw, _Conn())  # no store on the channel: the hot path hands over the record
    (record,) = batcher.records
    msh = read_msh(raw)
    s = ch.steps[0]
    assert s.applies(msh)
    prepared = s.prepare(raw, codec, store)
    op = s.make_op(store, record, prepared, codec, ch._answer_factory(msh, 1767700000.0))
    done, out = threading.Event(), []
    store.submit(op, lambda r: (out.append(r), done.set()))
    assert done.wait(30)
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0], record, s


def errs(ack: bytes) -> list[list[str]]:
    return [s.decode("utf-8").split("|") for s in ack.split(b"\r") if s.startswith(b"ERR")]


@pytest.mark.parametrize("flow", [1, 2, 3, 4])
def test_conforming_flow_keeps_the_aa_and_is_routed(store, flow):
    res, record, _ = run_step(store, sample(flow))
    assert isinstance(res.result, Stored) and res.ack is None and res.routed and res.violations == 0
    assert res.action == f"flow{flow}"
    m = store.get_message(res.result.message_id)
    assert (m.status, m.ack_code, m.error_code) == ("routed", "AA", None)
    assert m.ack == record.ack and read_ack(m.ack).code == "AA"
    assert [e.destination for e in m.entries] == ["out"]


# (flow, mutation, [(ERR-2, ERR-3)] expected in this order)
BROKEN = [
    (1, lambda r: edit(r, "MSH", 12, "2.5"), [("MSH^1^12", "203")]),   # the guide's own ACK example
    (1, lambda r: edit(edit(r, "OBR", 13, ""), "ORC", 12, ""),
     [("ORC^1^12", "101"), ("OBR^1^13", "101")]),
    (2, lambda r: edit(r, "ORC", 1, "XO"), [("ORC^1^1", "103")]),
    (3, lambda r: b"\r".join(s for s in r.split(b"\r") if not s.startswith(b"OBX")), [("OBX", "100")]),
    (4, lambda r: edit(r, "IPC", 3, ""), [("IPC^1^3^1^1", "101")]),
    (4, lambda r: edit(r, "OBR", 2, "OTHER^RIS-X^1.2.250.1.999.1.1.3^ISO"), [("OBR^1^2", "207")]),
]


@pytest.mark.parametrize("flow,mutate,expected", BROKEN, ids=[f"flow{b[0]}-{b[2][0][1]}" for b in BROKEN])
def test_broken_flow_is_answered_ae_stored_and_not_routed(store, flow, mutate, expected):
    raw = mutate(sample(flow))
    res, record, _ = run_step(store, raw)
    assert isinstance(res.result, Stored) and res.outcome == "error" and not res.routed
    ack = read_ack(res.ack)
    assert (ack.code, ack.ack_of) == ("AE", f"TLR-F{flow}-0001")
    rows = errs(res.ack)
    assert [(e[2], e[3].split("^")[0]) for e in rows] == expected
    for e in rows:
        assert e[3].endswith("^HL70357") and e[4] == "E"
        assert e[5] == ""                                # the guide defines no ERR-5 code
        assert e[8].startswith("CI-SIS Volet Téléradiologie, ")
    assert not any(x.encode() in res.ack for x in PHI)
    m = store.get_message(res.result.message_id)
    assert (m.status, m.ack_code, m.error_code, m.entries) == ("rejected", "AE", expected[0][1], [])
    assert m.ack == res.ack and m.raw == raw                # stored as received, with the AE


def test_8859_15_message_gets_its_ae_in_8859_15(store):
    text = edit(sample(2), "ORC", 1, "XO").decode("utf-8").replace("UNICODE UTF-8", "8859/15")
    res, _, _ = run_step(store, text.replace("\u2019", "'").encode("iso8859-15"), codec="iso8859-15")
    ack = res.ack.decode("iso8859-15")
    assert "|8859/15\r" in ack.split("\r")[0] + "\r" and "MSA|AE|TLR-F2-0001" in ack
    assert "ERR||ORC^1^1|103^" in ack and "CI-SIS Volet Téléradiologie, Evènements déclenchants" in ack


def test_broken_flow_routed_when_route_rejected(store):
    raw = edit(sample(4), "IPC", 3, "")
    res, _, _ = run_step(store, raw, "{enabled: true, route_rejected: true}")
    assert res.outcome == "error" and res.routed and read_ack(res.ack).code == "AE"
    m = store.get_message(res.result.message_id)
    assert (m.status, m.ack_code, m.error_code) == ("routed", "AE", "101")
    assert [e.destination for e in m.entries] == ["out"]


def test_resent_message_gets_the_stored_ack(store):
    raw = edit(sample(1), "ORC", 12, "")
    first, _, _ = run_step(store, raw)
    again, _, _ = run_step(store, raw)
    assert isinstance(again.result, Duplicate) and again.result.same_content
    assert again.result.ack == first.ack and again.ack is None
    with store.engine.connect() as c:
        assert c.execute(sa.text("SELECT COUNT(*) FROM messages")).scalar() == 1


def test_checker_failure_is_a_stored_ae_not_a_store_failure(store, monkeypatch):
    import engine.reports.teleradiology_step as mod

    def boom(raw, codec="utf-8"):
        raise RuntimeError("PAT-TROIS")          # an exception text is never echoed

    monkeypatch.setattr(mod, "check_tlr", boom)
    res, _, _ = run_step(store, sample(1))
    assert res.outcome == "error" and not res.routed and res.action == "check_failed"
    assert [e[3].split("^")[0] for e in errs(res.ack)] == ["207"] and b"PAT-TROIS" not in res.ack


# ----------------------------------------------------------------------------------- both profiles


def both(raw: bytes) -> bytes:
    return edit(raw, "MSH", 21, "1.0^CISIS_TLR_HL7_V2~" + CDA_PROFILE)


REPORTS = "{enabled: true, validation: {xsd: false}}"


def test_both_profiles_get_both_guides_checks_and_the_submission(store):
    raw = both(sample(3))
    assert check_tlr(raw).ok                    # a clean flow 3 for the teleradiology guide...
    res, _, s = run_step(store, raw, reports=REPORTS)
    assert s.report_step is not None
    rows = errs(res.ack)
    # ...but not a report of the CDA transmission guide: its findings, each with ERR-5 (900-906),
    # starting with the version (ORU^R01 in 2.5 there, 2.5.1 here)
    assert rows and all(e[5].split("^")[0] in {"900", "901", "902", "903", "904", "905", "906"}
                        for e in rows), rows
    assert (rows[0][2], rows[0][3].split("^")[0]) == ("MSH^1^12", "203")
    assert read_ack(res.ack).code == "AE" and not res.routed
    with store.engine.connect() as c:
        kind = c.execute(sa.text("SELECT kind FROM submissions WHERE message_id = :m"),
                         {"m": res.result.message_id}).scalar()
    assert kind == "cisis"
    # a teleradiology finding comes first, then the report's
    res, _, _ = run_step(store, edit(both(sample(3)), "ORC", 17, "", cid="TLR-F3-0002"), reports=REPORTS)
    rows = errs(res.ack)
    assert [(e[2], e[3].split("^")[0], e[5]) for e in rows[:2]] == [
        ("ORC^1^17^1^1", "101", ""), ("ORC^1^17^1^3", "101", "")]
    assert (rows[2][2], rows[2][3].split("^")[0]) == ("MSH^1^12", "203") and rows[2][5].startswith("906^")


@pytest.mark.parametrize("tlr_rr,rep_rr,routed", [(True, True, True), (True, False, False), (False, True, False)])
def test_both_profiles_routed_only_when_every_block_that_failed_allows_it(store, tlr_rr, rep_rr, routed):
    raw = edit(both(sample(3)), "ORC", 17, "")     # errors for both guides
    res, _, _ = run_step(store, raw, f"{{enabled: true, route_rejected: {str(tlr_rr).lower()}}}",
                         f"{{enabled: true, validation: {{xsd: false}}, route_rejected: {str(rep_rr).lower()}}}")
    assert res.outcome == "error" and res.routed is routed
    m = store.get_message(res.result.message_id)
    assert (m.status == "rejected") is (not routed) and bool(m.entries) is routed


def test_without_reports_block_both_profiles_get_the_teleradiology_checks_only(store):
    res, _, s = run_step(store, both(sample(3)))
    assert s.report_step is None and res.ack is None and res.routed
