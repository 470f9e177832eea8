"""The catalogue of the report checks (engine.reports.rules): its data, and that the checks and it agree."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.hl7.errors import TABLE_0357
from engine.reports import rules
from engine.reports.error_codes import APP_ERRORS

ROOT = Path(__file__).resolve().parent.parent
CHECKERS = ["engine/reports/cisis.py", "engine/reports/teleradiology.py", "engine/reports/processing.py"]


def test_catalogue_data():
    ids = [r.id for r in rules.RULES]
    assert len(ids) == len(set(ids))
    for r in rules.RULES:
        assert re.fullmatch(r"(cisis|lps|cda|pacs|tlr)(\.[a-z0-9-]+)+", r.id), r.id
        assert r.default in ("reject", "warn") and r.step in (rules.STEP_REPORTS, rules.STEP_PACS, rules.STEP_TLR)
        assert r.guide and r.section and r.summary
        # the guide's code: applicationErrorCondition for the CI-SIS steps, table 0357 for teleradiology
        assert r.code in (TABLE_0357 if r.step == rules.STEP_TLR else APP_ERRORS), r.id
        assert r.relaxable or r.default == "reject"


def test_the_policy_of_the_defaults():
    """Refused: what prevents a correct delivery; warned: copies of the CDA's metadata."""
    default = {r.id: r.default for r in rules.RULES}
    for rid in ("cisis.ins.absent", "cisis.ins.mismatch", "cisis.ins.incomplete", "cisis.version.parent",
                "cisis.version.number", "cisis.document.missing", "cisis.document.not-cda", "cda.xsd",
                "cisis.mss.forbidden-combination", "cisis.action.inconsistent"):
        assert default[rid] == "reject", rid
    assert {r.code for r in rules.RULES if r.code in ("900", "902", "903", "904", "905")
            and r.default == "warn"} == set()
    assert [rid for rid in default if rid.startswith("cisis.copy.")] == ["cisis.copy.document-id",
                                                                         "cisis.copy.type-code"]
    assert {default[rid] for rid in default if rid.startswith("cisis.copy.")} == {"warn"}


def test_every_rule_the_checks_name_is_in_the_catalogue_and_every_rule_is_used():
    named: set[str] = set()
    for path in CHECKERS:
        named |= set(re.findall(r'"((?:cisis|lps|cda|pacs|tlr)\.[a-z0-9.-]+)"', (ROOT / path).read_text()))
    assert named <= set(rules.BY_ID)
    assert set(rules.BY_ID) <= named


def test_severity_and_overrides():
    assert rules.severity("cisis.copy.document-id") == "warn"
    assert rules.severity("cisis.copy.document-id", {"cisis.copy.document-id": "reject"}) == "reject"
    assert rules.severity("cda.xsd", {"cisis.copy.document-id": "off"}) == "reject"
    with pytest.raises(KeyError):
        rules.severity("no.such.rule")


@pytest.mark.parametrize("block, rule_id, level, problem", [
    ("reports", "cisis.copy.document-id", "reject", None),
    ("reports", "cda.xsd", "off", None),
    ("pacs_reports", "cisis.copy.type-code", "reject", None),   # the wrapped ORU is read with the report rules
    ("teleradiology", "tlr.obr.copy", "warn", None),
    ("reports", "tlr.obr.copy", "warn", "unknown rule 'tlr.obr.copy' for reports"),
    ("teleradiology", "cisis.copy.type-code", "warn", "unknown rule 'cisis.copy.type-code' for teleradiology"),
    ("reports", "cisis.copy.typecode", "warn", "did you mean 'cisis.copy.type-code'?"),
    ("pacs_reports", "pacs.wrap.failed", "warn", "cannot be relaxed"),
    ("pacs_reports", "pacs.wrap.failed", "reject", None),
    ("reports", "cda.xsd", "maybe", "severity must be reject, warn or off"),
])
def test_override_problem(block, rule_id, level, problem):
    got = rules.override_problem(block, rule_id, level)
    assert (got is None) if problem is None else (problem in got), got


def test_the_rule_id_goes_into_err_7():
    from engine.hl7.ack import AckError, build_ack

    ack = build_ack(None, "AA", control_id="1", timestamp="20260101000000", errors=[
        AckError("207", "TXA-12 differs from the CDA ClinicalDocument/id", "W", "TXA^1^12", app_code="906",
                 app_text="Erreur Autre", diagnostic="cisis.copy.document-id"),
        AckError("101", "no rule", "E")])
    errs = [s.split("|") for s in ack.decode().split("\r") if s.startswith("ERR")]
    assert [(e[3].split("^")[0], e[4], e[5].split("^")[0], e[7], e[8]) for e in errs] == [
        ("207", "W", "906", "cisis.copy.document-id", "TXA-12 differs from the CDA ClinicalDocument/id"),
        ("101", "E", "", "", "no rule")]
