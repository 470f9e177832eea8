"""Twisted MLLP sender: one outstanding message per connection, ACK timeout closes the socket.

Rules (shared notes, "Sender (Source) rules"):

* one message in flight per connection; ``send()`` while busy queues the message (FIFO) and
  sends it once the previous exchange is finished;
* on ACK timeout the connection is aborted and the Deferred fails only once the socket is closed,
  so a late ACK can never be credited to the next message (Mirth #1441/#2070); the same happens on
  an MSA-2 mismatch, an oversize reply, or an unsolicited frame;
* when ``control_id`` is given, MSA-2 of the reply must equal it (MLLP R2 commit ACK/NAK blocks
  are returned as they are);
* a connection closed by the peer between messages is noticed and replaced on the next send;
  a connection lost while a reply is awaited fails that message (no automatic resend: the caller's
  retry policy decides, since the peer may already have stored it).
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol

from mllp.direct import can_write_now, write_now
from mllp.tls import describe_failure
from mllp.framing import (
    COMMIT_ACK,
    COMMIT_NAK,
    DEFAULT_MAX_FRAME_SIZE,
    Frame,
    FrameTooLarge,
    MLLPFramer,
    encode_frame,
)

__all__ = [
    "MLLPError",
    "AckTimeout",
    "AckMismatch",
    "ConnectionFailed",
    "MLLPSender",
    "read_msa2",
]

log = logging.getLogger("mllp")


class MLLPError(Exception):
    """Base class of the sender's failures."""


class AckTimeout(MLLPError):
    """No reply within ``ack_timeout``; the connection was closed before this was raised."""


class AckMismatch(MLLPError):
    """The reply's MSA-2 differs from the sent MSH-10 (``got`` is None when there is no MSA)."""

    def __init__(self, expected: str, got: Optional[str]) -> None:
        super().__init__(f"MSA-2 mismatch: expected {expected!r}, got {got!r}")
        self.expected = expected
        self.got = got


class ConnectionFailed(MLLPError):
    """Could not connect (refused, timeout, TLS failure), or the connection was lost before the reply.

    ``sent`` is True when the payload had been written, i.e. the peer may have received it.
    """

    def __init__(self, message: str, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


def read_msa2(reply: bytes) -> Optional[str]:
    """MSA-2 of an HL7 v2 reply with a minimal split, or None when there is no MSH/MSA."""
    if len(reply) < 4 or not reply.startswith(b"MSH"):
        return None
    fs = reply[3:4]
    msa = b"MSA" + fs
    for seg in reply.replace(b"\n", b"\r").split(b"\r"):
        if seg.startswith(msa):
            fields = seg.split(fs)
            return fields[2].decode("latin-1") if len(fields) > 2 else ""
    return None


def _fail(d: Deferred, exc: Exception) -> None:
    if not d.called:  # the caller may have cancelled it
        d.errback(exc)


def _lost_reason(reason) -> str:
    """Why the connection went away: the TLS handshake's failure when that is what happened
    (unknown CA, expired certificate, name mismatch, client certificate refused), else the
    generic text."""
    value = getattr(reason, "value", None)
    if value is not None:
        text = describe_failure(value)
        if text.startswith("TLS handshake failed"):
            return text
    return "connection lost before the reply"


class _Outstanding:
    __slots__ = ("payload", "control_id", "d", "proto", "deadline")

    def __init__(self, payload: bytes, control_id: Optional[str], d: Deferred) -> None:
        self.payload = payload
        self.control_id = control_id
        self.d = d
        self.proto: Optional[_SenderProtocol] = None
        self.deadline = 0.0  # reactor time by which its reply must have come


class _SenderProtocol(Protocol):
    direct = False  # plain TCP: messages are written at once (mllp.direct)

    def connectionMade(self) -> None:
        self.direct = can_write_now(self.transport)
        # a reactor that can read this connection in the middle of its turn (the engine's):
        # one message outstanding per connection, so each turn waited for costs a message
        expedite = getattr(self.sender.reactor, "expedite", None)
        if self.direct and expedite is not None:
            expedite(self.transport)
            self.awaiting = self.sender.reactor.awaiting_reply
        # one message, then wait for its reply: never hold a frame's last segment back for
        # the peer's TCP acknowledgement (Nagle), which the reply itself would carry
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass

    def __init__(self, sender: "MLLPSender") -> None:
        self.sender = sender
        self.framer = MLLPFramer(sender.max_frame_size)
        self.gone = False  # detached from the sender: its bytes are ignored
        self.fail_exc: Optional[Exception] = None  # reported when the connection is lost
        self.lost = Deferred()
        self.awaiting = None  # the reactor's awaiting_reply, for an expedited connection

    def dataReceived(self, data: bytes) -> None:
        if self.gone:
            return
        frames = []
        too_large = False
        for ev in self.framer.feed(data):
            if type(ev) is Frame:
                frames.append(ev.payload)
            elif type(ev) is FrameTooLarge:
                too_large = True
        if frames or too_large:
            self.sender._on_frames(self, frames, too_large)

    def connectionLost(self, reason=None) -> None:
        unexpedite = getattr(self.sender.reactor, "unexpedite", None)
        if unexpedite is not None:
            unexpedite(self.transport)
        self.sender._connection_lost(self, reason)
        d, self.lost = self.lost, None
        if d is not None:
            d.callback(None)


class _SenderFactory(Factory):
    def __init__(self, sender: "MLLPSender") -> None:
        self.sender = sender

    def buildProtocol(self, addr):
        return _SenderProtocol(self.sender)


class MLLPSender:
    """Send HL7 payloads to one MLLP peer and return each reply payload (see module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        reactor=None,
        tls_creator=None,
        keep_alive: bool = True,
        connect_timeout: float = 10,
        ack_timeout: float = 30,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.host = host
        self.port = port
        self.reactor = reactor
        self.keep_alive = keep_alive
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.max_frame_size = max_frame_size
        endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
        if tls_creator is not None:
            endpoint = wrapClientTLS(tls_creator, endpoint)
        self._endpoint = endpoint
        self._factory = _SenderFactory(self)
        self._queue: deque[_Outstanding] = deque()
        self._current: Optional[_Outstanding] = None
        self._proto: Optional[_SenderProtocol] = None
        self._connecting: Optional[Deferred] = None
        # One timer per sender, not one per message (a DelayedCall made and cancelled per
        # message was a measurable part of delivery's cost in the reactor): it fires at the
        # earliest deadline it may find, and either times the message out or waits again
        # until the deadline of the message then outstanding.
        self._timer = None

    @property
    def idle(self) -> bool:
        """True when no message is outstanding or queued."""
        return self._current is None and not self._queue

    @property
    def connected(self) -> bool:
        """True when an idle or busy connection is open."""
        return self._proto is not None

    def send(self, payload: bytes, control_id: Optional[str] = None) -> Deferred:
        """Queue ``payload``; the Deferred fires with the reply payload or an MLLPError."""
        d = Deferred()
        self._queue.append(_Outstanding(bytes(payload), control_id, d))
        self._pump()
        return d

    def close(self) -> Deferred:
        """Close the connection and fail queued messages; later sends connect again."""
        queued, self._queue = self._queue, deque()
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        proto = self._proto
        waiting = succeed(None)
        if proto is not None:
            self._detach(proto)
            if proto.lost is not None:
                waiting = Deferred()
                proto.lost.addBoth(lambda _: waiting.callback(None))
            proto.fail_exc = ConnectionFailed("sender closed", sent=True)
            proto.transport.abortConnection()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for msg in queued:
            _fail(msg.d, MLLPError("sender closed"))
        return waiting

    # -- internal ---------------------------------------------------------------------------

    def _pump(self) -> None:
        if self._current is not None or not self._queue:
            return
        proto = self._proto
        if proto is None:
            if self._connecting is None:
                d = self._connecting = self._endpoint.connect(self._factory)
                d.addCallbacks(self._connected, self._connect_failed, callbackArgs=(d,), errbackArgs=(d,))
            return
        msg = self._queue.popleft()
        msg.proto = proto
        self._current = msg
        msg.deadline = self.reactor.seconds() + self.ack_timeout
        if self._timer is None:
            self._timer = self.reactor.callLater(self.ack_timeout, self._check_deadline)
        if proto.awaiting is not None:
            proto.awaiting(proto.transport, True)
        if proto.direct:
            write_now(proto.transport, encode_frame(msg.payload))
        else:
            proto.transport.write(encode_frame(msg.payload))

    def _connected(self, proto: _SenderProtocol, d: Deferred) -> None:
        if self._connecting is not d:  # close() cancelled this attempt meanwhile
            proto.gone = True
            proto.transport.abortConnection()
            return
        self._connecting = None
        if proto.lost is None:  # closed by the peer before we got it: do not loop reconnecting
            if self._current is None and self._queue:
                _fail(self._queue.popleft().d, ConnectionFailed("connection closed by the peer on connect"))
            self._pump()
            return
        self._proto = proto
        self._pump()

    def _connect_failed(self, failure, d: Deferred) -> None:
        if self._connecting is not d:
            return None
        self._connecting = None
        if self._queue:
            msg = self._queue.popleft()
            _fail(msg.d, ConnectionFailed(f"cannot connect to {self.host}:{self.port}: {failure.getErrorMessage()}"))
        self._pump()
        return None

    def _detach(self, proto: _SenderProtocol) -> None:
        proto.gone = True
        if self._proto is proto:
            self._proto = None

    def _abort(self, proto: _SenderProtocol, exc: Optional[Exception]) -> None:
        """Close the socket now; the outstanding message fails with ``exc`` once it is closed."""
        self._detach(proto)
        if proto.fail_exc is None:
            proto.fail_exc = exc
        proto.transport.abortConnection()

    def _check_deadline(self) -> None:
        self._timer = None
        msg = self._current
        if msg is None:
            return  # nothing outstanding: the next send sets the timer again
        wait = msg.deadline - self.reactor.seconds()
        if wait > 0:
            self._timer = self.reactor.callLater(wait, self._check_deadline)
            return
        self._ack_timed_out(msg)

    def _ack_timed_out(self, msg: _Outstanding) -> None:
        if self._current is msg:
            log.warning("mllp ack timeout peer=%s:%s after %ss; closing", self.host, self.port, self.ack_timeout)
            self._abort(msg.proto, AckTimeout(f"no reply within {self.ack_timeout}s"))

    def _on_frames(self, proto: _SenderProtocol, frames: list, too_large: bool) -> None:
        msg = self._current
        if msg is None or msg.proto is not proto:
            log.warning("mllp unsolicited frame from %s:%s; closing", self.host, self.port)
            self._abort(proto, None)
            return
        if not frames:
            self._abort(proto, MLLPError(f"reply exceeds max_frame_size {self.max_frame_size}"))
            return
        reply = frames[0]
        if msg.control_id is not None and reply != COMMIT_ACK and reply != COMMIT_NAK:
            got = read_msa2(reply)
            if got != msg.control_id:
                self._abort(proto, AckMismatch(msg.control_id, got))
                return
        self._current = None
        if proto.awaiting is not None:
            proto.awaiting(proto.transport, False)
        if len(frames) > 1 or too_large:
            log.warning("mllp extra data after the reply from %s:%s; closing", self.host, self.port)
            self._abort(proto, None)
        elif not self.keep_alive:
            self._detach(proto)
            proto.transport.loseConnection()
        if not msg.d.called:  # the caller may have cancelled it
            msg.d.callback(reply)
        self._pump()

    def _connection_lost(self, proto: _SenderProtocol, reason=None) -> None:
        self._detach(proto)
        msg = self._current
        if msg is not None and msg.proto is proto:
            self._current = None
            exc = proto.fail_exc or ConnectionFailed(_lost_reason(reason), sent=True)
            _fail(msg.d, exc)
        self._pump()
