"""ERR-2 (ERL) locations built from field paths: the identity feed's and the report channels'."""
from __future__ import annotations

import pytest

from engine.steps.identity_feed import err_location
from engine.reports.processing import _location


@pytest.mark.parametrize("field, erl", [
    ("PID-3[2].1", "PID^1^3^2^1"),
    ("PID-3[2].4.2", "PID^1^3^2^4^2"),
    ("PID-11", "PID^1^11^1"),
    ("PID-5.1", "PID^1^5^1^1"),
    ("MSH-18", "MSH^1^18^1"),
    ("PID", "PID^1"),  # a missing segment, as the report channels locate it
    ("MRG", "MRG^1"),
    ("PID-", None),
    ("pid-3", None),
    ("", None),
    (None, None),
])
def test_identity_err_location(field, erl):
    assert err_location(field) == erl


@pytest.mark.parametrize("loc, erl", [
    ("MSH-9", "MSH^1^9"),
    ("MSH-9.2", "MSH^1^9"),
    ("PID-3.4", "PID^1^3"),
    ("PID", "PID^1"),
    ("PRT[3]", "PRT^3"),
    ("PRT-15", "PRT^1^15"),
    ("OBX-2-5", "OBX^1^2"),        # CI-SIS locations name an OBX by its set id: OBX-<set id>-<field>
    ("OBX-1-5.5", "OBX^1^1"),
    ("OBX-?-11", "OBX^1"),
    ("OBX", "OBX^1"),
    ("ORC-1", "ORC^1^1"),
    ("", None),
    (None, None),
    ("garbage", None),
])
def test_report_location(loc, erl):
    assert _location(loc) == erl
