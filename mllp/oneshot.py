"""Send one message on a fresh connection and close it, without waiting for any answer.

For receivers that never acknowledge: the ANS reference DRIMbox reads the socket until the
sender closes it and answers nothing. Success means every byte was handed to the peer's TCP
stack and the connection closed cleanly (our FIN sent after the data, no reset); it does not
prove that the receiving application stored the message. That is the documented risk of this
mode: prefer a receiver that returns an ACK.
"""
from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol

from mllp.framing import encode_frame

__all__ = ["OneShotError", "send_and_close"]

MAX_UNSOLICITED = 65536  # bytes kept of whatever a receiver that should not answer sends anyway


class OneShotError(Exception):
    """The message could not be handed over (connect failure, reset, timeout)."""


class _OneShot(Protocol):
    def __init__(self, payload: bytes, done: Deferred) -> None:
        self.payload = payload
        self.done = done
        self.received = bytearray()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseConnection()  # after the buffered data is written

    def dataReceived(self, data: bytes) -> None:
        if len(self.received) < MAX_UNSOLICITED:
            self.received += data[:MAX_UNSOLICITED - len(self.received)]

    def connectionLost(self, reason=None) -> None:
        if self.done.called:
            return
        if reason is None or reason.check(ConnectionDone):
            self.done.callback(bytes(self.received))
        else:
            self.done.errback(OneShotError(f"connection lost before the message was handed over: "
                                           f"{reason.getErrorMessage()}"))


def send_and_close(reactor, host: str, port: int, payload: bytes, *, framed: bool = True,
                   tls_creator=None, timeout: float = 30.0) -> Deferred:
    """Fires with whatever the peer sent (usually b'') once the connection closed cleanly after
    the whole payload (MLLP-framed unless ``framed`` is False); fails with OneShotError."""
    data = encode_frame(payload) if framed else bytes(payload)
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if tls_creator is not None:
        endpoint = wrapClientTLS(tls_creator, endpoint)
    done: Deferred = Deferred()
    holder: dict = {}

    def on_timeout() -> None:
        if done.called:
            return
        proto = holder.get("proto")
        if proto is not None and proto.transport is not None:
            proto.transport.abortConnection()
        if not done.called:
            done.errback(OneShotError(f"not handed over within {timeout}s"))

    timer = reactor.callLater(timeout, on_timeout)

    def connected(proto):
        holder["proto"] = proto
        return proto

    def failed(failure):
        if not done.called:
            done.errback(OneShotError(f"cannot connect to {host}:{port}: {failure.getErrorMessage()}"))

    d = endpoint.connect(Factory.forProtocol(lambda: _OneShot(data, done)))
    d.addCallbacks(connected, failed)

    def stop_timer(result):
        if timer.active():
            timer.cancel()
        return result

    done.addBoth(stop_timer)
    return done
