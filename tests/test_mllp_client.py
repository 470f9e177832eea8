"""MLLPSender tests against a real MLLP listener on 127.0.0.1."""
from __future__ import annotations

import socket
import time

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

from mllp.client import AckMismatch, AckTimeout, ConnectionFailed, MLLPSender, read_msa2
from mllp.framing import COMMIT_ACK
from mllp.protocol import ListenerLimits, MLLPServerFactory
from tests.reactor_thread import ack_for, call, listen_tcp, make_message, stop, wait_for


@pytest.fixture
def listener():
    made = []

    def make(handler, **limits):
        factory = MLLPServerFactory(handler, ListenerLimits(**limits), "peer")
        port_obj, port = listen_tcp(factory)
        made.append((port_obj, factory))
        return factory, port

    yield make
    for port_obj, factory in made:
        stop(port_obj, factory)


def make_sender(port, **kw):
    return call(lambda: MLLPSender("127.0.0.1", port, **kw))


def send(sender, payload, control_id=None):
    return call(sender.send, payload, control_id)


def test_read_msa2():
    assert read_msa2(b"MSH|^~\\&|A\rMSA|AA|X1\r") == "X1"
    assert read_msa2(b"MSH#^~\\&#A\nMSA#AE#X2#oops\n") == "X2"
    assert read_msa2(b"MSH|^~\\&|A\rPID|1\r") is None
    assert read_msa2(b"garbage") is None


def test_keep_alive_reuses_one_connection_and_checks_msa2(listener):
    factory, port = listener(lambda p, i: ack_for(p))
    sender = make_sender(port)
    for i in range(3):
        m = make_message(f"K{i}")
        assert send(sender, m, f"K{i}") == ack_for(m)
    assert factory.counters["connections_total"] == 1
    call(sender.close)


def test_queued_sends_are_fifo_one_outstanding(listener):
    in_flight = []
    max_seen = []

    def handler(payload, info):
        in_flight.append(payload)
        max_seen.append(len(in_flight))
        d = Deferred()

        def done():
            in_flight.remove(payload)
            d.callback(ack_for(payload))

        reactor.callLater(0.01, done)
        return d

    factory, port = listener(handler)
    sender = make_sender(port)
    msgs = [make_message(f"Q{i}") for i in range(5)]

    def send_all():
        return DeferredList([sender.send(m, f"Q{i}") for i, m in enumerate(msgs)], consumeErrors=True)

    results = call(send_all)
    assert [r for ok, r in results] == [ack_for(m) for m in msgs]
    assert max(max_seen) == 1
    call(sender.close)


def test_msa2_mismatch_raises_and_closes(listener):
    factory, port = listener(lambda p, i: ack_for(p, control_id="SOMEONE-ELSE"))
    sender = make_sender(port)
    with pytest.raises(AckMismatch) as ei:
        send(sender, make_message("M1"), "M1")
    assert ei.value.expected == "M1" and ei.value.got == "SOMEONE-ELSE"
    assert wait_for(lambda: factory.open_connections == 0)
    assert call(lambda: sender.connected) is False


def test_commit_ack_returned_as_is(listener):
    factory, port = listener(lambda p, i: COMMIT_ACK)
    sender = make_sender(port)
    assert send(sender, make_message("C1"), "C1") == COMMIT_ACK
    call(sender.close)


def test_each_message_gets_its_whole_ack_timeout(listener):
    """The sender keeps one timer, not one per message: a message sent while the timer of an
    earlier one is pending must still get the whole timeout, counted from its own send."""
    def handler(payload, info):
        d = Deferred()
        delay = {b"|FIRST|": 0.25, b"|SECOND|": 0.3, b"|THIRD|": 1.0}
        wait = next((v for k, v in delay.items() if k in payload), 0.0)
        reactor.callLater(wait, d.callback, ack_for(payload))
        return d

    factory, port = listener(handler)
    sender = make_sender(port, ack_timeout=0.4)
    assert send(sender, make_message("WARM"), "WARM")
    t0 = time.monotonic()
    first = make_message("FIRST")
    assert send(sender, first, "FIRST") == ack_for(first)   # 0.25 s of its 0.4 s
    second = make_message("SECOND")
    assert send(sender, second, "SECOND") == ack_for(second)  # ends after the first deadline
    assert time.monotonic() - t0 > 0.5
    t1 = time.monotonic()
    with pytest.raises(AckTimeout):
        send(sender, make_message("THIRD"), "THIRD")
    assert 0.35 <= time.monotonic() - t1 < 0.8
    call(sender.close)


def test_ack_timeout_closes_socket_before_failing_and_late_ack_is_never_credited(listener):
    def handler(payload, info):
        d = Deferred()
        delay = 0.6 if b"|SLOW|" in payload else 0.0
        reactor.callLater(delay, d.callback, ack_for(payload))
        return d

    factory, port = listener(handler)
    sender = make_sender(port, ack_timeout=0.3)
    slow, fast = make_message("SLOW"), make_message("FAST")
    observed = {}
    assert send(sender, make_message("WARM"), "WARM")  # connection established and idle

    def first():
        d = sender.send(slow, "SLOW")
        transport = sender._proto.transport if sender._proto else None

        def check(failure):
            # At the moment the caller learns about the timeout, the socket is already closed.
            observed["disconnected"] = transport.disconnected
            observed["connected"] = sender.connected
            return failure

        return d.addErrback(check)

    t0 = time.monotonic()
    with pytest.raises(AckTimeout):
        call(first)
    assert 0.25 <= time.monotonic() - t0 < 0.6
    assert observed == {"disconnected": True, "connected": False}
    # Next message without the MSA-2 check: it must still get its own reply, never the late one.
    assert send(sender, fast) == ack_for(fast)
    time.sleep(0.5)  # the slow reply is now produced, on the dead connection
    assert send(sender, make_message("AFTER")) == ack_for(make_message("AFTER"))
    assert factory.counters["connections_total"] == 2
    call(sender.close)


def test_connect_per_message(listener):
    factory, port = listener(lambda p, i: ack_for(p))
    sender = make_sender(port, keep_alive=False)
    for i in range(3):
        m = make_message(f"P{i}")
        assert send(sender, m, f"P{i}") == ack_for(m)
        assert call(lambda: sender.connected) is False
    assert factory.counters["connections_total"] == 3
    assert wait_for(lambda: factory.open_connections == 0)


def test_reconnect_after_peer_closed(listener):
    factory, port = listener(lambda p, i: ack_for(p), idle_timeout=0.2)
    sender = make_sender(port)
    assert send(sender, make_message("A1"), "A1") == ack_for(make_message("A1"))
    assert wait_for(lambda: factory.counters["idle_closes"] == 1)
    assert wait_for(lambda: not sender.connected)
    assert send(sender, make_message("A2"), "A2") == ack_for(make_message("A2"))
    assert factory.counters["connections_total"] == 2
    call(sender.close)


def test_connection_refused_raises_connection_failed():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    sender = make_sender(port, connect_timeout=2)
    with pytest.raises(ConnectionFailed):
        send(sender, make_message("X1"), "X1")


def test_peer_closing_without_reply_fails_message(listener):
    factory, port = listener(lambda p, i: None)
    sender = make_sender(port, ack_timeout=5)
    with pytest.raises(ConnectionFailed) as ei:
        send(sender, make_message("N1"), "N1")
    assert ei.value.sent is True
