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
