"""The held writes' date/time conversion remembered for its last value only (by identity)."""
from datetime import datetime

from engine.store.held_writes import _last_value_memo


def test_memo_converts_each_new_value_and_reuses_the_last():
    calls = []

    def proc(v):
        calls.append(v)
        return None if v is None else v.isoformat()

    memo = _last_value_memo(proc)
    a, b = datetime(2026, 12, 3, 17, 0), datetime(2026, 12, 3, 17, 1)
    assert memo(a) == a.isoformat() and memo(a) == a.isoformat()
    assert memo(b) == b.isoformat()
    assert memo(None) is None and memo(None) is None
    assert memo(a) == a.isoformat()
    assert calls == [a, b, None, None, a]
