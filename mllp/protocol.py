"""Twisted MLLP listener: framing, limits, timeouts and replies in receive order.

The protocol knows nothing about HL7: it hands each frame payload to a ``FrameHandler`` and writes
back what the handler returns (the reply payload, unframed), or closes the connection when the
handler returns ``None``. Replies are written in receive order on each connection even when the
handler's Deferreds fire out of order, because MLLP senders match replies to messages by order.

Abuse (garbage, resync, oversize frames, slow or idle peers, too many connections) is counted in
``MLLPServerFactory.counters`` and reported through ``on_event(name, detail)``; details carry only
technical metadata (listener name, connection id, peer address, sizes), never payload bytes
(PHI rule). Nothing is logged per frame, to keep the hot path cheap.
"""
from __future__ import annotations

import itertools
import logging
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from mllp.direct import can_write_now, write_now
from mllp.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    Frame,
    FrameDiscarded,
    FrameTooLarge,
    GarbageSkipped,
    MLLPFramer,
    encode_frame,
)

__all__ = [
    "ListenerLimits",
    "ConnectionInfo",
    "FrameHandler",
    "PendingReply",
    "MLLPServerFactory",
    "MLLPServerProtocol",
]

log = logging.getLogger("mllp")

_conn_ids = itertools.count(1)

COUNTER_KEYS = (
    "frames",
    "garbage_bytes",
    "resyncs",
    "oversize_closes",
    "idle_closes",
    "frame_timeouts",
    "refused_over_cap",
    "refused_peer_cap",
    "handler_errors",
    "connections_total",
)


@dataclass
class ListenerLimits:
    """Per-listener limits; a connection keeps the limits in force when it was accepted."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    lenient_end: bool = False
    idle_timeout: float = 600.0  # seconds without framed traffic (and no pending reply); 0 = none
    frame_timeout: float = 30.0  # seconds to finish a started frame; 0 = none
    max_connections: int = 200
    # one peer address (all its ports) may hold at most this many connections, so that one
    # client cannot take every slot of the listener from the others
    max_connections_per_peer: int = 16


@dataclass(frozen=True)
class ConnectionInfo:
    """What a handler may know about the connection a frame came from."""

    conn_id: int
    peer: str  # "host:port"
    tls: bool
    peer_cn: Optional[str]  # client certificate subject CN (mutual TLS), else None


class PendingReply:
    """A reply known later: what a handler returns instead of a Deferred on its hot path.

    One is made per message at thousands of messages per second; a Deferred (its callback
    chain, ``addCallbacks``, ``callback``) cost measurably more than this single hand-off. The
    handler calls :meth:`resolve` with the reply (bytes, or ``None`` to close) or :meth:`fail`
    with the exception, once; the protocol registers itself with :meth:`then`, before or after.
    """

    __slots__ = ("_on_value", "_on_error", "_arg", "_outcome")

    def __init__(self) -> None:
        self._on_value = None
        self._on_error = None
        self._arg = None
        self._outcome = None  # (True, value) or (False, exception) once settled

    def then(self, on_value, on_error, arg) -> None:
        outcome = self._outcome
        if outcome is not None:
            (on_value if outcome[0] else on_error)(outcome[1], arg)
            return
        self._on_value, self._on_error, self._arg = on_value, on_error, arg

    def resolve(self, value) -> None:
        on_value = self._on_value
        if on_value is None:
            self._outcome = (True, value)
            return
        self._on_value = self._on_error = None
        on_value(value, self._arg)

    def fail(self, exc: BaseException) -> None:
        on_error = self._on_error
        if on_error is None:
            self._outcome = (False, exc)
            return
        self._on_value = self._on_error = None
        on_error(exc, self._arg)


FrameHandler = Callable[[bytes, ConnectionInfo], Union[Deferred, PendingReply, bytes, None]]

# Markers for reply slots that are not (yet) bytes.
_PENDING = object()
_CLOSE = object()


def _where(exc: BaseException) -> str:
    """Location of an exception (file:line of the innermost frame) without its message (PHI)."""
    tb = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else None
    if not tb:
        return ""
    last = tb[-1]
    return f"{last.filename}:{last.lineno}"


class MLLPServerProtocol(Protocol):
    """One inbound MLLP connection; see the module docstring."""

    factory: "MLLPServerFactory"

    def __init__(self) -> None:
        self.conn_id = 0
        self.peer = ""
        self._framer: Optional[MLLPFramer] = None
        self._limits: Optional[ListenerLimits] = None
        self._info: Optional[ConnectionInfo] = None
        self._pending: deque = deque()  # reply slots [value] in receive order
        self._closing = False
        self._close_queued = False  # a reply slot will close the connection: ignore later frames
        self._lost = False
        self._last_activity = 0.0
        self._idle_call = None
        self._frame_call = None
        self._direct = False  # plain TCP transport: replies are sent at once (see _send)

    # -- connection lifecycle -------------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        limits = f.limits
        self._limits = limits
        self.conn_id = next(_conn_ids)
        try:
            addr = self.transport.getPeer()
            self.peer = f"{addr.host}:{addr.port}"
        except Exception:  # noqa: BLE001 - unusual transports (tests, UNIX sockets)
            self.peer = "?"
        self._framer = MLLPFramer(limits.max_frame_size, limits.lenient_end)
        t = self.transport
        self._direct = can_write_now(t)
        f._connection_made(self)
        self._last_activity = f.clock.seconds()
        if limits.idle_timeout > 0:
            self._idle_call = f.clock.callLater(limits.idle_timeout, self._idle_check)

    def connectionLost(self, reason=None) -> None:
        self._lost = True
        self._closing = True
        # Pending handler Deferreds keep running (the store commit must complete); their
        # results are simply not written.
        self._pending.clear()
        self._cancel_timers()
        self.factory._connection_lost(self)

    def _cancel_timers(self) -> None:
        for name in ("_idle_call", "_frame_call"):
            call = getattr(self, name)
            if call is not None:
                setattr(self, name, None)
                if call.active():
                    call.cancel()

    def close(self, abort: bool = False) -> None:
        """Stop reading frames and close (abort drops unsent data, for abusive peers)."""
        if self._closing:
            if abort and not self._lost:
                self.transport.abortConnection()
            return
        self._closing = True
        self._pending.clear()
        self._cancel_timers()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    # -- inbound bytes ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._close_queued:
            return
        f = self.factory
        framer = self._framer
        frames = 0
        for ev in framer.feed(data):
            if type(ev) is Frame:
                frames += 1
                self._handle_frame(ev.payload)
                if self._closing or self._close_queued:
                    break
            elif type(ev) is GarbageSkipped:
                f.counters["garbage_bytes"] += ev.count
                f._event("garbage", self, count=ev.count)
            elif type(ev) is FrameDiscarded:
                f.counters["resyncs"] += 1
                f._event("resync", self, size=ev.size, level=logging.WARNING)
            elif type(ev) is FrameTooLarge:
                f.counters["oversize_closes"] += 1
                f._event(
                    "oversize", self, size=ev.size, max=self._limits.max_frame_size, level=logging.WARNING
                )
                self.close(abort=True)
                break
        if frames:
            f.counters["frames"] += frames
        if frames or framer.in_frame:
            # only framed traffic is activity: stray bytes between frames do not keep a slot
            self._last_activity = f.clock.seconds()
        if self._closing or self._close_queued:
            return
        # In-frame timeout: runs only while a frame is partially received.
        timeout = self._limits.frame_timeout
        if timeout > 0:
            if framer.in_frame:
                if self._frame_call is None or frames:
                    if self._frame_call is not None and self._frame_call.active():
                        self._frame_call.cancel()
                    self._frame_call = f.clock.callLater(timeout, self._frame_timed_out)
            elif self._frame_call is not None:
                call, self._frame_call = self._frame_call, None
                if call.active():
                    call.cancel()

    def _connection_info(self) -> ConnectionInfo:
        # Built lazily: the TLS handshake (and so the peer certificate) is complete only once
        # application data arrives.
        info = self._info
        if info is None:
            transport = self.transport
            tls = isinstance(transport, TLSMemoryBIOProtocol) or bool(getattr(transport, "TLS", False))
            peer_cn = None
            if tls:
                from mllp.tls import peer_common_name

                peer_cn = peer_common_name(transport)
            info = self._info = ConnectionInfo(self.conn_id, self.peer, tls, peer_cn)
        return info

    def _handle_frame(self, payload: bytes) -> None:
        try:
            result = self.factory.handler(payload, self._info or self._connection_info())
        except Exception as exc:  # noqa: BLE001 - nothing may escape dataReceived
            self._handler_failed(exc)
            self._enqueue(_CLOSE)
            return
        if type(result) is PendingReply:
            slot = [_PENDING]
            self._pending.append(slot)
            result.then(self._resolved, self._failed, slot)
        elif isinstance(result, Deferred):
            slot = [_PENDING]
            self._pending.append(slot)
            result.addCallbacks(self._resolved, self._errback, callbackArgs=(slot,), errbackArgs=(slot,))
        else:
            self._enqueue(self._check_reply(result))

    def _check_reply(self, result: Any) -> Any:
        if result is None:
            return _CLOSE
        if isinstance(result, bytes):
            return result
        if isinstance(result, (bytearray, memoryview)):
            return bytes(result)
        self._handler_failed(TypeError(f"handler returned {type(result).__name__}, expected bytes or None"))
        return _CLOSE

    def _enqueue(self, value: Any) -> None:
        if value is _CLOSE:
            self._close_queued = True
        if self._pending:
            self._pending.append([value])
            return
        self._write_or_close(value)

    def _write_or_close(self, value: Any) -> None:
        if value is _CLOSE:
            self.close()
        elif value:  # b"" = no reply owed (enhanced mode, MSH-15 NE/ER/SU): write nothing
            self._send(encode_frame(value))

    def _send(self, data: bytes) -> None:
        """Write a reply: at once on a plain TCP transport (``mllp.direct``)."""
        if self._direct:
            write_now(self.transport, data)
        else:
            self.transport.write(data)

    def _resolved(self, result: Any, slot: list) -> None:
        if self._lost:
            if result is not None and not isinstance(result, (bytes, bytearray, memoryview)):
                self._check_reply(result)  # count and log the bad type even if nobody reads it
            return None
        slot[0] = self._check_reply(result)
        self._flush()
        return None

    def _failed(self, exc: BaseException, slot: list) -> None:
        self._errback(Failure(exc, type(exc), exc.__traceback__), slot)

    def _errback(self, failure, slot: list) -> None:
        self._handler_failed(failure.value, failure)
        if not self._lost:
            slot[0] = _CLOSE
            self._flush()
        return None  # consumed: logged and counted above

    def _flush(self) -> None:
        pending = self._pending
        while pending and pending[0][0] is not _PENDING:
            value = pending.popleft()[0]
            self._write_or_close(value)
            if self._closing:
                pending.clear()
                return
        if not pending:
            self._last_activity = self.factory.clock.seconds()

    def _handler_failed(self, exc: BaseException, failure=None) -> None:
        f = self.factory
        f.counters["handler_errors"] += 1
        where = _where(exc) if failure is None else ""
        if failure is not None:
            frames = failure.frames
            if frames:
                where = f"{frames[-1][1]}:{frames[-1][2]}"
        f._event("handler_error", self, error=type(exc).__name__, where=where, level=logging.ERROR)

    # -- timers -----------------------------------------------------------------------------

    def _idle_check(self) -> None:
        self._idle_call = None
        if self._closing:
            return
        f = self.factory
        timeout = self._limits.idle_timeout
        now = f.clock.seconds()
        remaining = self._last_activity + timeout - now
        if self._pending:
            remaining = timeout  # waiting on our own handler is not idleness
        if remaining > 0:
            self._idle_call = f.clock.callLater(remaining, self._idle_check)
            return
        f.counters["idle_closes"] += 1
        f._event("idle_close", self, idle_timeout=timeout)
        self.close()

    def _frame_timed_out(self) -> None:
        self._frame_call = None
        if self._closing:
            return
        f = self.factory
        size = self._framer.reset_partial()
        f.counters["frame_timeouts"] += 1
        f._event("frame_timeout", self, size=size, frame_timeout=self._limits.frame_timeout, level=logging.WARNING)
        self.close(abort=True)


class _RefusedProtocol(Protocol):
    """Accepted over the connection cap: aborted at once, before any TLS handshake work."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class MLLPServerFactory(ServerFactory):
    """Builds :class:`MLLPServerProtocol` for one listener and keeps its counters."""

    protocol = MLLPServerProtocol

    def __init__(
        self,
        handler: FrameHandler,
        limits: ListenerLimits,
        name: str,
        clock=None,
        on_event: Optional[Callable[[str, dict], None]] = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # noqa: N813
        self.handler = handler
        self.limits = limits
        self.name = name
        self.clock = clock
        self.on_event = on_event
        self.open_connections = 0
        self.counters: dict[str, int] = {k: 0 for k in COUNTER_KEYS}
        self._connections: set[MLLPServerProtocol] = set()
        self._per_peer: dict[str, int] = {}  # open connections per peer address

    def set_limits(self, limits: ListenerLimits) -> None:
        """Replace the limits (config reload); open connections keep the ones they started with."""
        self.limits = limits

    def buildProtocol(self, addr):
        if self.open_connections >= self.limits.max_connections:
            self.counters["refused_over_cap"] += 1
            peer = f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}"
            self._emit(
                "refused_over_cap",
                {"listener": self.name, "peer": peer, "max_connections": self.limits.max_connections},
                logging.WARNING,
            )
            p = _RefusedProtocol()
            p.factory = self
            return p
        host = getattr(addr, "host", None)
        if host is not None and self._per_peer.get(host, 0) >= self.limits.max_connections_per_peer:
            self.counters["refused_peer_cap"] += 1
            self._emit(
                "refused_peer_cap",
                {"listener": self.name, "peer": host,
                 "max_connections_per_peer": self.limits.max_connections_per_peer},
                logging.WARNING,
            )
            p = _RefusedProtocol()
            p.factory = self
            return p
        p = self.protocol()
        p.factory = self
        return p

    def close_all(self) -> None:
        """Close every open connection (shutdown); replies not yet written are dropped."""
        for p in list(self._connections):
            p.close()

    # -- internal -----------------------------------------------------------------------------

    def _connection_made(self, p: MLLPServerProtocol) -> None:
        self.open_connections += 1
        self.counters["connections_total"] += 1
        self._connections.add(p)
        host = p.peer.rsplit(":", 1)[0]
        self._per_peer[host] = self._per_peer.get(host, 0) + 1

    def _connection_lost(self, p: MLLPServerProtocol) -> None:
        if p in self._connections:
            self._connections.discard(p)
            self.open_connections -= 1
            host = p.peer.rsplit(":", 1)[0]
            left = self._per_peer.get(host, 1) - 1
            if left > 0:
                self._per_peer[host] = left
            else:
                self._per_peer.pop(host, None)

    def _event(self, name: str, p: MLLPServerProtocol, level: int = logging.DEBUG, **detail: Any) -> None:
        detail = {"listener": self.name, "conn_id": p.conn_id, "peer": p.peer, **detail}
        self._emit(name, detail, level)

    def _emit(self, name: str, detail: dict, level: int) -> None:
        if log.isEnabledFor(level):
            log.log(level, "mllp %s %s", name, detail)
        if self.on_event is not None:
            try:
                self.on_event(name, detail)
            except Exception:  # noqa: BLE001 - an observer must not break the listener
                log.exception("mllp on_event observer failed for %s", name)
