"""DRIMbox connector end to end: the CI-SIS report message reaches the DRIMbox source byte for
byte, over MLLP with an ACK (plain and mutual TLS), and over a raw connection closed after the
message for a receiver that never answers (the ANS reference DRIMbox reads until the sender
closes)."""
from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from mllp.blocking import BlockingMLLPClient
from mllp.framing import encode_frame
from tests.conftest import CORPUS
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver
from tests.pki import make_pki

REPORT = (CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1"
          / "MDM" / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1_Base64.er7").read_bytes()


class RawReceiver:
    """Reads each connection until the sender closes it, answers nothing (like the ANS reference
    DRIMbox); optionally over TLS with a client certificate required."""

    def __init__(self, tls: ssl.SSLContext | None = None, port: int = 0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.tls = tls
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        data = bytearray()
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            while chunk := conn.recv(65536):
                data += chunk
        except OSError:
            return
        finally:
            conn.close()
        with self.lock:
            self.received.append(bytes(data))

    def wait_for(self, n, timeout=20.0):
        end = time.time() + timeout
        while time.time() < end:
            with self.lock:
                if len(self.received) >= n:
                    return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"expected {n} connections, got {len(self.received)}")

    def close(self):
        self.sock.close()


def config(port, status_port, dest: str) -> str:
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
        channels:
          mllp-in:
            type: mllp
            port: {port}
            reports: {{enabled: true}}
        routes:
          - {{name: reports, from: mllp-in, filter: {{message_types: ["MDM^*", "ORU^R01"]}}, to: [drimbox]}}
        destinations:
          drimbox:
            type: drimbox
            host: 127.0.0.1
            {dest}
            connect_timeout: 3s
            ack_timeout: 5s
            queue: {{retry: {{initial_delay: 200ms, max_delay: 1s}}}}
    """


def run(tmp_path, dest):
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, dest), status_port=status_port)
    eng.port = port
    eng.start()
    return eng


def wait_status(eng, key: str, n: int, timeout: float = 10.0) -> dict:
    """The drimbox destination's /status counters once ``key`` reached ``n`` (or the timeout)."""
    deadline = time.time() + timeout
    while True:
        st = eng.status()["destinations"]["drimbox"]
        if st[key] == n or time.time() > deadline:
            return st
        time.sleep(0.1)


def send(eng, raw=REPORT):
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=30) as c:
        ack = c.send(raw)
    assert b"MSA|AA|" in ack, ack


def test_report_reaches_an_acking_drimbox_byte_for_byte(tmp_path):
    receiver = Receiver()
    eng = run(tmp_path, f"port: {receiver.port}")
    try:
        send(eng)
        assert receiver.wait_for(1) == [REPORT]
        assert wait_status(eng, "sent", 1)["sent"] == 1
    finally:
        assert eng.stop() == 0
        receiver.close()


def test_drimbox_refusing_with_ae_parks_the_entry(tmp_path):
    receiver = Receiver(policy=lambda m: "AE")
    eng = run(tmp_path, f"port: {receiver.port}")
    try:
        send(eng)
        receiver.wait_for(1)
        st = wait_status(eng, "errored", 1)
        assert st["errored"] == 1 and "AE" in st["last_error"]
        time.sleep(0.6)
        assert len(receiver.received) == 1  # a content error is not retried
    finally:
        assert eng.stop() == 0
        receiver.close()


@pytest.mark.parametrize("framing", ["mllp", "none"])
def test_report_reaches_a_raw_drimbox_that_never_answers(tmp_path, framing):
    receiver = RawReceiver()
    eng = run(tmp_path, f"port: {receiver.port}\n            expect_ack: false\n            framing: {framing}")
    try:
        send(eng)
        (got,) = receiver.wait_for(1)
        assert got == (encode_frame(REPORT) if framing == "mllp" else REPORT)
        assert wait_status(eng, "sent", 1)["sent"] == 1
    finally:
        assert eng.stop() == 0
        receiver.close()


def test_raw_drimbox_down_keeps_the_report_queued_then_delivers(tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there yet
    eng = run(tmp_path, f"port: {port}\n            expect_ack: false")
    try:
        send(eng)
        time.sleep(1.5)
        st = eng.status()["destinations"]["drimbox"]
        assert st["sent"] == 0 and st["queue_depth"] == 1, st
        assert "cannot connect" in (st["last_error"] or ""), st
        receiver = RawReceiver(port=port)
        assert receiver.wait_for(1, timeout=20) == [encode_frame(REPORT)]
        receiver.close()
    finally:
        assert eng.stop() == 0


def test_drimbox_over_mutual_tls_without_ack(tmp_path):
    pki = make_pki(tmp_path / "pki")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.load_verify_locations(pki.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    receiver = RawReceiver(tls=ctx)
    tls = (f"tls: {{ca: '{pki.ca}', cert: '{pki.client_cert}', key: '{pki.client_key}'}}")
    eng = run(tmp_path, f"port: {receiver.port}\n            expect_ack: false\n            {tls}")
    try:
        send(eng)
        assert receiver.wait_for(1) == [encode_frame(REPORT)]
    finally:
        assert eng.stop() == 0
        receiver.close()
