"""The engine's reactor (engine/reactor.py) in a child process: installed by ``minipfi run``,
serves connections, and a handler that raises only costs its own connection."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import sys
    from engine.reactor import EngineReactor, install
    reactor = install()
    from twisted.internet import reactor as global_reactor
    assert global_reactor is reactor and isinstance(reactor, EngineReactor)
    from twisted.internet import protocol

    class Echo(protocol.Protocol):
        def dataReceived(self, data):
            if data.startswith(b"boom"):
                raise RuntimeError("handler bug")
            self.transport.write(b"echo:" + data)

    f = protocol.Factory.forProtocol(Echo)
    port = reactor.listenTCP(0, f, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.callLater(20, reactor.stop)
    reactor.run()
""")


def _roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        chunks = []
        while True:
            try:
                data = s.recv(100)
            except socket.timeout:
                break
            if not data:
                break
            chunks.append(data)
            if payload in b"".join(chunks):
                break
        return b"".join(chunks)


def test_engine_reactor_serves_and_survives_a_failing_handler():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        assert _roundtrip(port, b"hello") == b"echo:hello"
        # a handler that raises: Twisted closes that connection (no reply) ...
        assert _roundtrip(port, b"boom") == b""
        # ... and the reactor goes on serving the others
        for i in range(20):
            assert _roundtrip(port, b"m%d" % i) == b"echo:m%d" % i
        assert proc.poll() is None
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "handler bug" in err  # the failure was logged, not swallowed


def test_minipfi_run_installs_the_engine_reactor(tmp_path):
    cfg = tmp_path / "routes.yaml"
    cfg.write_text(textwrap.dedent("""
        engine:
          status: {bind: 127.0.0.1, port: 0}
        channels: {}
        routes: []
        destinations: {}
    """))
    code = ("import sys, engine.cli as c, engine.app as a\n"
            "a.run = lambda *x: print(type(__import__('twisted.internet.reactor', fromlist=['x'])).__name__) or 0\n"
            "sys.exit(c.main(['run', '--config', sys.argv[1], '--data-dir', sys.argv[2]]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(cfg), str(tmp_path / "d")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "EngineReactor"


AFTER_IO_CHILD = textwrap.dedent("""
    import time
    from engine.reactor import install
    reactor = install()
    from twisted.internet import protocol

    order = []
    t0 = time.monotonic()

    def stop_soon():
        print(" ".join(order), round(time.monotonic() - t0, 3), flush=True)
        reactor.stop()

    class P(protocol.Protocol):
        def dataReceived(self, data):
            order.append("data")
            reactor.call_after_io(lambda: order.append("after"))
            reactor.call_after_io(lambda: reactor.call_after_io(lambda: order.append("nested")))

        def connectionLost(self, reason):
            reactor.call_after_io(stop_soon)

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(P), interface="127.0.0.1")
    # a hook scheduled from a timer, with nothing else to do for 30 s: must not wait for I/O
    reactor.callLater(0.05, lambda: reactor.call_after_io(lambda: order.append("idle")))
    reactor.callLater(0.3, lambda: print(port.getHost().port, flush=True))
    reactor.callLater(30, reactor.stop)
    reactor.run()
""")


def test_call_after_io_runs_after_the_dispatch_and_never_waits_for_io():
    proc = subprocess.Popen([sys.executable, "-c", AFTER_IO_CHILD], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"x")
        line = proc.stdout.readline().split()
        assert line[:-1] == ["idle", "data", "after", "nested"]
        assert float(line[-1]) < 10  # stopped by the after-I/O hook, not by the 30 s timer
    finally:
        proc.kill()
        proc.communicate(timeout=10)


class _Reader:
    """A minimal readable selectable on one end of a socket pair."""

    def __init__(self, sock, name, log, on_read=None):
        self.sock, self.name, self.log, self.on_read = sock, name, log, on_read

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        self.log.append((self.name, self.sock.recv(100)))
        if self.on_read is not None:
            self.on_read()

    def logPrefix(self):
        return self.name

    def connectionLost(self, reason):
        pass


def test_an_expedited_socket_is_read_in_the_middle_of_the_turn():
    """A reply that arrives while the turn dispatches other events is read in the same turn (a
    delivery connection: one message outstanding, so each turn waited for costs a message);
    without ``expedite``, or while the connection awaits no reply (idle: no poll of its own on
    the ingest path), it waits for the next poll."""
    from engine.reactor import EngineReactor

    for expedite, awaiting in ((True, True), (False, False), (True, False)):
        r = EngineReactor()
        log = []
        a, a_peer = socket.socketpair()
        b, b_peer = socket.socketpair()
        try:
            ingest = _Reader(a, "ingest", log, on_read=lambda: b_peer.send(b"ACK"))
            delivery = _Reader(b, "delivery", log)
            r.addReader(ingest)
            r.addReader(delivery)
            if expedite:
                r.expedite(delivery)
                r.awaiting_reply(delivery, awaiting)
            a_peer.send(b"MSG")
            r.doPoll(0)  # only the ingest socket was ready when the turn polled
            if expedite and awaiting:
                assert log == [("ingest", b"MSG"), ("delivery", b"ACK")]
            else:
                assert log == [("ingest", b"MSG")]
                r.doPoll(0)
                assert log == [("ingest", b"MSG"), ("delivery", b"ACK")]
            r.unexpedite(delivery)
            assert not r._expedited and not r._awaiting
        finally:
            r.removeAll()
            for s in (a, a_peer, b, b_peer):
                s.close()
