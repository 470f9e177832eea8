"""One Twisted reactor for the whole test session, running in a daemon thread.

Tests drive real sockets with blocking clients from the test thread and run reactor-side code with
``call(fn, *args)`` (``blockingCallFromThread``: waits for a returned Deferred too). Also holds
small HL7/MLLP helpers shared by the ``test_mllp_*`` modules.
"""
from __future__ import annotations

import threading
import time

from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread

_lock = threading.Lock()
_thread: threading.Thread | None = None


def start() -> None:
    """Start the reactor thread once (idempotent)."""
    global _thread
    with _lock:
        if _thread is not None:
            return
        if reactor.running:
            _thread = threading.current_thread()  # someone else already runs it
            return
        _thread = threading.Thread(
            target=reactor.run, kwargs={"installSignalHandlers": False}, name="twisted-reactor", daemon=True
        )
        _thread.start()
    deadline = time.monotonic() + 10
    while not reactor.running and time.monotonic() < deadline:
        time.sleep(0.005)


def call(fn, *args, **kwargs):
    """Run ``fn`` in the reactor thread and return its (Deferred) result."""
    start()
    return blockingCallFromThread(reactor, fn, *args, **kwargs)


def reply_of(handle, *args):
    """``handle(*args)`` (a channel's ``handle``) with a ``PendingReply`` turned into a Deferred,
    for :func:`call`: the reply the protocol would write."""
    from twisted.internet import defer

    from mllp.protocol import PendingReply

    result = handle(*args)
    if type(result) is not PendingReply:
        return result
    d = defer.Deferred()
    result.then(lambda value, _arg: d.callback(value), lambda exc, _arg: d.errback(exc), None)
    return d


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` (evaluated in the reactor thread) until true or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if call(predicate):
            return True
        time.sleep(interval)
    return bool(call(predicate))


# -- HL7 helpers ------------------------------------------------------------------------------


def make_message(control_id: str, body: bytes = b"") -> bytes:
    """A small ADT^A01 with MSH-10 = control_id."""
    return (
        b"MSH|^~\\&|SND|FAC|RCV|FAC|20240101120000||ADT^A01^ADT_A01|"
        + control_id.encode()
        + b"|P|2.5\rEVN|A01|20240101120000\rPID|1||123^^^HOSP^PI||DOE^JOHN\r"
        + body
    )


def control_id_of(payload: bytes) -> str:
    fs = payload[3:4]
    return payload.split(b"\r", 1)[0].split(fs)[9].decode()


def ack_for(payload: bytes, code: str = "AA", control_id: str | None = None) -> bytes:
    """Minimal original-mode ACK whose MSA-2 is the message's MSH-10 (or ``control_id``)."""
    cid = control_id if control_id is not None else control_id_of(payload)
    return (
        b"MSH|^~\\&|RCV|FAC|SND|FAC|20240101120001||ACK^A01^ACK|A" + cid.encode() + b"|P|2.5\r"
        + b"MSA|" + code.encode() + b"|" + cid.encode() + b"\r"
    )


def listen_tcp(factory, tls_files=None, backlog: int = 128):
    """Listen on 127.0.0.1:0 (in the reactor thread); returns (port object, port number)."""
    from mllp.tls import listen

    port = call(listen, reactor, factory, 0, "127.0.0.1", tls_files, backlog=backlog)
    return port, port.getHost().port


def stop(port, factory=None) -> None:
    """Stop listening and close the factory's connections."""
    if factory is not None:
        call(factory.close_all)
    call(port.stopListening)
