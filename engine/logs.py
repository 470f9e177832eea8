"""Structured JSON logs (structlog), one event per message stage.

The PHI rule (docs/architecture.md): log events carry internal ids, channel and destination
names, MSH-9/MSH-10 and technical error texts only. Never names, INS, birth dates or raw
segments. Values that come from the wire are passed through :func:`safe`, which drops control
characters, so a CR/LF inside a control id cannot forge a log line.

Engine events use structlog's native filtering logger (a few microseconds per event, which
matters at thousands of messages per second); stdlib records (Twisted, ``mllp``) are rendered
as the same JSON lines through a ``ProcessorFormatter``.
"""
from __future__ import annotations

import json
import logging
import sys

import structlog

_CONTROL = {i: None for i in range(32)}
_CONTROL[127] = None


def safe(value: object, limit: int = 64) -> str:
    """A wire value made safe for a log line: control characters removed, length capped."""
    text = str(value).translate(_CONTROL)
    return text if len(text) <= limit else text[:limit] + "…"


def _dumps(obj, **kw) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str, separators=(",", ":"))


def configure(level: str = "info", stream=None) -> None:
    """JSON lines on ``stream`` (stderr by default) for engine and library events."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    stream = stream or sys.stderr
    renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, timestamper],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    structlog.configure(
        processors=[structlog.processors.add_log_level, timestamper, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    try:  # Twisted's own log events go to stdlib logging, hence to the same JSON stream
        from twisted.logger import STDLibLogObserver, globalLogBeginner

        globalLogBeginner.beginLoggingTo([STDLibLogObserver()], redirectStandardIO=False, discardBuffer=True)
    except Exception:  # noqa: BLE001 - already begun (tests) is fine
        pass


def get(name: str):
    return structlog.get_logger(logger_name=name)
