"""The store's JSON text: ``json_text`` writes what ``json.dumps`` writes through one C encoder
per thread, and still works after an encoding error; ``json_reader`` reads what ``json.loads``
reads."""
from __future__ import annotations

import json
import threading

import pytest

from engine.store import sql
from engine.store.sql import json_reader, json_text

VALUES = [
    {}, [], "", "é\u2603\U0001F600\x00\"\\/\n", 0, -1, 10**30, 1.5, 1e300, float("nan"),
    float("inf"), -float("inf"), True, False, None,
    {"a": [1, "x", None], "b": {"c": 2.25, "d": []}, 3: "int key", None: "none key"},
    ["PI", "INS", ("tuple", 1)], {"dmp_status": "ACTIF", "feeding_opposed": False},
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_same_text_as_json_dumps(value):
    assert json_text(value) == json.dumps(value)


def test_an_error_leaves_no_markers_behind():
    """The C encoder leaves the containers it was in marked when it fails; an encoder kept
    between calls must forget them, or the same containers are later seen as circular."""
    inner = [object()]
    outer = [inner, {"k": inner}]
    with pytest.raises(TypeError):
        json_text(outer)
    inner.clear()
    assert json_text(outer) == json.dumps(outer) == '[[], {"k": []}]'

    loop: list = [1]
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        json_text(loop)
    loop.pop()
    assert json_text(loop) == "[1]"
    assert json_text({"after": [loop]}) == '{"after": [[1]]}'


def test_one_encoder_per_thread():
    """A mapping whose ``items`` runs Python code lets another thread in while the first one's
    markers hold the list being written: with a shared encoder the second thread would see that
    list as a circular reference."""
    entered, release = threading.Event(), threading.Event()

    class Slow(dict):
        calls = 0

        def items(self):
            Slow.calls += 1
            if Slow.calls == 1:
                entered.set()
                release.wait(5)
            return super().items()

    shared = [Slow(a=1)]
    out: dict = {}

    def first():
        out["first"] = json_text(shared)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert entered.wait(5)
        out["second"] = json_text(shared)  # this thread, while the first is inside ``shared``
    finally:
        release.set()
        t.join(5)
    assert out == {"first": '[{"a": 1}]', "second": '[{"a": 1}]'}

    encoders = []
    for _ in range(2):
        th = threading.Thread(target=lambda: (json_text([1]), encoders.append(sql._local.enc[0])))
        th.start()
        th.join(5)
    json_text([1])
    assert len({id(e) for e in encoders + [sql._local.enc[0]]}) == 3
    assert sql._local.enc[0] is sql._local.enc[0]  # kept: not rebuilt per call


@pytest.mark.parametrize("text", [
    '{}', '[]', '""', '"\\u00e9\\ud83d\\ude00"', '0', '-1', '1e400', '1.5', 'NaN', 'Infinity',
    'true', 'null', '{"a": [1, "x", null], "b": {"c": 2.25}}', '{"a": 1, "a": 2}',
    ' {"a": 1} ', '\n[1]\t', b'{"bytes": 1}', bytearray(b'[2]'),
])
def test_reader_reads_what_json_loads_reads(text):
    got, want = json_reader(text), json.loads(text)
    assert json.dumps(got) == json.dumps(want) and type(got) is type(want)


def test_reader_keeps_none_and_the_errors_of_json_loads():
    assert json_reader(None) is None
    for bad in ("", "{", "1 2", '{"a": 1}x', "\ufeff{}", "[1,]", '"\x01"'):
        with pytest.raises(json.JSONDecodeError) as ours:
            json_reader(bad)
        with pytest.raises(json.JSONDecodeError) as theirs:
            json.loads(bad)
        assert (ours.value.msg, ours.value.pos) == (theirs.value.msg, theirs.value.pos)
