"""The JSON log lines: the hot-path event renders exactly what structlog renders."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re

import structlog

from engine import logs

KEYS = ("message_id", "channel", "control_id", "message_type", "destinations", "peer")


@contextlib.contextmanager
def configured(level: str):
    """Logs configured to a buffer for the test, then back to the process's previous state."""
    saved = (logs._sink, logs._level, logging.getLogger().handlers[:], logging.getLogger().level)
    buf = io.StringIO()
    logs.configure(level, buf)
    try:
        yield buf
    finally:
        logs.flush()
        structlog.reset_defaults()
        logs._sink, logs._level = saved[0], saved[1]
        logging.getLogger().handlers[:] = saved[2]
        logging.getLogger().setLevel(saved[3])


def _events(buf: io.StringIO) -> list[str]:
    logs.flush()
    return [line for line in buf.getvalue().split("\n") if '"message.stored"' in line]


def _without_timestamp(line: str) -> str:
    return re.sub(r'"timestamp":"[^"]*"', "", line)


def test_hot_event_line_equals_structlog_line():
    with configured("info") as buf:
        _hot_event_line_equals_structlog_line(buf)


def _hot_event_line_equals_structlog_line(buf):
    values = (42, "mllp-in", logs.safe('a"b\\c\x01é\u2028'), logs.safe("ADT^A01"), 2, "127.0.0.1:5")
    logs.get("engine.channel").info("message.stored", **dict(zip(KEYS, values)))
    logs.HotEvent("engine.channel", "message.stored", KEYS)(*values)
    a, b = _events(buf)
    assert _without_timestamp(a) == _without_timestamp(b)
    parsed = json.loads(b)
    assert parsed["control_id"] == 'a"b\\cé\u2028' and parsed["message_id"] == 42
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", parsed["timestamp"])
    assert list(parsed)[:7] == ["logger_name", *KEYS]


def test_hot_event_respects_the_level():
    event = logs.HotEvent("engine.channel", "message.stored", KEYS)
    with configured("warning") as buf:
        event(1, "c", "x", "ADT^A01", 0, "p")
        assert _events(buf) == []
    with configured("info") as buf:
        event(1, "c", "x", "ADT^A01", 0, "p")
        assert len(_events(buf)) == 1


def test_hot_event_with_percent_signs_in_names_and_values():
    with configured("info") as buf:
        logs.HotEvent("x%y", "message.stored", ("k%s", "n"))("v%d %s", 3)
        [line] = _events(buf)
    parsed = json.loads(line)
    assert parsed["logger_name"] == "x%y" and parsed["k%s"] == "v%d %s" and parsed["n"] == 3


def test_reactor_thread_check_follows_twisted():
    from twisted.python import threadable

    assert logs._in_reactor_thread() == threadable.isInIOThread()


def test_reactor_thread_lines_are_written_within_the_flush_interval(monkeypatch):
    """Lines logged in the reactor thread wait for one write (at most FLUSH_INTERVAL_S), or are
    written at once when FLUSH_MAX_LINES are buffered; order is kept."""
    scheduled = []

    class FakeReactor:
        def callLater(self, delay, fn):
            scheduled.append((delay, fn))

    import twisted.internet

    monkeypatch.setattr(logs, "_in_reactor_thread", lambda: True)
    monkeypatch.setattr(twisted.internet, "reactor", FakeReactor(), raising=False)
    event = logs.HotEvent("engine.channel", "message.stored", KEYS)
    with configured("info") as buf:
        event(1, "c", "x", "ADT^A01", 0, "p")
        event(2, "c", "x", "ADT^A01", 0, "p")
        def ids():
            return [json.loads(line)["message_id"] for line in buf.getvalue().split("\n")
                    if '"message.stored"' in line]

        assert ids() == [] and len(scheduled) == 1
        assert scheduled[0][0] == logs.FLUSH_INTERVAL_S
        scheduled[0][1]()  # the timer fires
        assert ids() == [1, 2]
        for i in range(logs.FLUSH_MAX_LINES):
            event(100 + i, "c", "x", "ADT^A01", 0, "p")
        assert ids()[-1] == 100 + logs.FLUSH_MAX_LINES - 1  # the full buffer went out at once
