"""Replay the inputs that once crashed a fuzz target (``make fuzz`` saves each distinct crash,
minimised, under ``tests/fuzz/crashers/<target>/``): each must now get its documented answer."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

CRASHERS = Path(__file__).resolve().parent / "fuzz" / "crashers"
CASES = sorted(p for p in CRASHERS.glob("*/*") if p.is_file() and p.name != "README.md")


def test_every_crasher_folder_names_a_target():
    assert {p.parent.name for p in CASES} <= set(TARGETS)


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_crasher_is_answered(path):
    TARGETS[path.parent.name](path.read_bytes())
