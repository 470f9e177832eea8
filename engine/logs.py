"""Structured JSON logs (structlog), one event per message stage.

The PHI rule (docs/architecture.md): log events carry internal ids, channel and destination
names, MSH-9/MSH-10 and technical error texts only. Never names, INS, birth dates or raw
segments. Values that come from the wire are passed through :func:`safe`, which drops control
characters, so a CR/LF inside a control id cannot forge a log line.

Engine events use structlog's native filtering logger (a few microseconds per event, which
matters at thousands of messages per second); stdlib records (Twisted, ``mllp``) are rendered
as the same JSON lines through a ``ProcessorFormatter``.

Cost on the hot path (one ``message.stored`` event per message at the default level ``info``):
a ``write`` system call per line cost about 35 µs on the benchmark VM, more than the rest of the
event. Lines logged in the reactor thread are therefore buffered and written together at most 20
ms later (or at once when 512 are waiting): one ``write`` per 20 ms instead of one per message
(a write per reactor turn, the former policy, was 7,175 writes of about 22 µs for 32,231
messages in a cProfile of the reactor thread at 8 connections: about 5 µs per message). Lines
from other threads, and every stdlib record (warnings, errors, Twisted), are written at once,
after whatever is buffered, so the order is kept. A SIGKILL can lose at most the last 20 ms of these lines (never a stored message: the store
is the record); shutdown and ``atexit`` flush them.
"""
from __future__ import annotations

import atexit
import json
import json.encoder
import logging
import sys
import threading
import time

import structlog

_CONTROL = {i: None for i in range(32)}
_CONTROL[127] = None


def error_text(exc: BaseException, limit: int = 200) -> str:
    """An exception as text safe for logs, status and ``last_error``.

    Database errors keep the driver's first line only: SQLAlchemy appends the SQL and its
    parameters, and PostgreSQL's DETAIL line quotes key values (an INS, an IPP), all of which may
    be patient data. Other exceptions keep their first line, control characters removed."""
    orig = getattr(exc, "orig", None)
    base = orig if isinstance(orig, BaseException) else exc
    text = str(base)
    first = text.splitlines()[0] if text else ""
    return safe(f"{type(base).__name__}: {first}" if first else type(base).__name__, limit)


def safe(value: object, limit: int = 64) -> str:
    """A wire value made safe for a log line: control characters removed, length capped."""
    text = str(value).translate(_CONTROL)
    return text if len(text) <= limit else text[:limit] + "…"


_encode = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":")).encode
_encode_str = json.encoder.encode_basestring  # what _encode does for a str, without the dispatch


def _dumps(obj, **kw) -> str:
    return _encode(obj)


_LEVEL_OF = {"warn": "warning", "exception": "error"}
_format_exc_info = structlog.processors.format_exc_info
_ts_cache = (0, "")


def _timestamp() -> str:
    """ISO 8601 UTC with microseconds, as structlog's ``TimeStamper(fmt="iso", utc=True)``
    writes it; the date-time part is formatted once per second."""
    global _ts_cache
    t = time.time()
    sec = int(t)
    cached = _ts_cache
    if cached[0] != sec:
        cached = _ts_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{int((t - sec) * 1e6):06d}Z"


def _render(logger, method_name: str, event_dict) -> str:
    """add_log_level + TimeStamper + format_exc_info + JSONRenderer in one processor (same
    keys, same order): a third of the cost of the four-processor chain per event."""
    if "exc_info" in event_dict:
        event_dict = _format_exc_info(logger, method_name, event_dict)
    event_dict["level"] = _LEVEL_OF.get(method_name, method_name)
    event_dict["timestamp"] = _timestamp()
    return _encode(event_dict)


FLUSH_INTERVAL_S = 0.02   # reactor-thread lines wait at most this long before their write ...
FLUSH_MAX_LINES = 512     # ... or until this many are buffered


class _LineSink:
    """Where rendered lines go: buffered for up to 20 ms in the reactor thread, else written."""

    def __init__(self, stream):
        self.stream = stream
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def write_line(self, line: str) -> None:
        if _in_reactor_thread():
            with self._lock:
                lines = self._lines
                lines.append(line)
                if self._scheduled and len(lines) < FLUSH_MAX_LINES:
                    return
                first = not self._scheduled
                self._scheduled = True
            if not first:  # a full buffer: write it now (its timer finds nothing)
                self.flush()
                return
            try:
                from twisted.internet import reactor

                reactor.callLater(FLUSH_INTERVAL_S, self.flush)
            except Exception:  # noqa: BLE001 - no reactor: write now
                self.flush()
            return
        with self._lock:
            lines, self._lines = self._lines, []
            self._scheduled = False
            lines.append(line)
            self._write(lines)

    def flush(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
            self._scheduled = False
            if lines:
                self._write(lines)

    def _write(self, lines: list[str]) -> None:
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001 - a log stream error must not break the engine
            pass


def _no_reactor() -> bool:
    return False


def _io_thread_check():
    # twisted.python.threadable is a deprecation proxy module (slow attribute access): take the
    # function once. Before reactor.run() registers the I/O thread it compares with None: False.
    # Its ``isInIOThread`` builds ``current_thread()`` per call; read the module's ``ioThread``
    # straight from the function's globals and compare it with ``get_ident()`` (one line per
    # message goes through here).
    try:
        from twisted.python.threadable import isInIOThread

        module_globals = isInIOThread.__globals__
        get_ident = threading.get_ident

        def in_io_thread() -> bool:
            return module_globals["ioThread"] == get_ident()

        return in_io_thread
    except Exception:  # noqa: BLE001
        return _no_reactor


_in_reactor_thread = _io_thread_check()


class _SinkLogger:
    """structlog's final logger: every level method hands the rendered line to the sink."""

    __slots__ = ("_sink",)

    def __init__(self, sink: _LineSink):
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write_line(message)

    log = debug = info = warn = warning = error = err = critical = fatal = exception = failure = msg


class _SinkHandler(logging.StreamHandler):
    """stdlib records: written at once, after the lines buffered before them (order kept)."""

    def __init__(self, sink: _LineSink):
        super().__init__(sink.stream)
        self._sink = sink

    def emit(self, record) -> None:
        self._sink.flush()
        super().emit(record)


_sink: _LineSink | None = None
_level = logging.INFO


class HotEvent:
    """One info event of the per-message hot path, rendered without structlog's processor chain.

    ``HotEvent("engine.channel", "message.stored", ("message_id", ...))(5, ...)`` writes the same
    JSON line as ``get("engine.channel").info("message.stored", message_id=5, ...)`` (same keys,
    same order, same encoding) for about a fifth of its cost, which matters at thousands of
    messages per second (measured: the ``message.stored`` event was 18 % of the engine's Python
    time per message). Values are ints or strings already passed through :func:`safe`. Before
    :func:`configure` (tests, library use) it goes through the structlog logger."""

    __slots__ = ("_name", "_event", "_keys", "_format")

    def __init__(self, logger_name: str, event: str, keys: tuple[str, ...]):
        self._name = logger_name
        self._event = event
        self._keys = keys
        def literal(text: str) -> str:
            return text.replace("%", "%%")

        self._format = (literal('{"logger_name":' + _encode(logger_name))
                        + "".join(literal("," + _encode(k) + ":") + "%s" for k in keys)
                        + literal(',"event":' + _encode(event) + ',"level":"info","timestamp":"')
                        + '%s"}')

    def __call__(self, *values) -> None:
        sink = _sink
        if sink is None:
            get(self._name).info(self._event, **dict(zip(self._keys, values)))
            return
        if _level > logging.INFO:
            return
        sink.write_line(self._format % (
            *[_encode_str(v) if type(v) is str else str(v) if type(v) is int else _encode(v)
              for v in values],
            _timestamp()))


def flush() -> None:
    """Write the buffered lines now (shutdown, tests)."""
    if _sink is not None:
        _sink.flush()


def configure(level: str = "info", stream=None) -> None:
    """JSON lines on ``stream`` (stderr by default) for engine and library events."""
    global _sink, _level
    lvl = getattr(logging, level.upper(), logging.INFO)
    _level = lvl
    stream = stream or sys.stderr
    if _sink is not None:
        _sink.flush()
    sink = _sink = _LineSink(stream)
    atexit.register(sink.flush)
    renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    handler = _SinkHandler(sink)
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
        processors=[_render],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=lambda *_args: _SinkLogger(sink),
        cache_logger_on_first_use=True,
    )
    try:  # Twisted's own log events go to stdlib logging, hence to the same JSON stream
        from twisted.logger import STDLibLogObserver, globalLogBeginner

        globalLogBeginner.beginLoggingTo([STDLibLogObserver()], redirectStandardIO=False, discardBuffer=True)
    except Exception:  # noqa: BLE001 - already begun (tests) is fine
        pass


def get(name: str):
    return structlog.get_logger(logger_name=name)
