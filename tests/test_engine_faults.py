"""Store faults and TLS at the engine level (real PostgreSQL behind a cuttable proxy, real TLS)."""
from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

from mllp.blocking import BlockingMLLPClient
from mllp.tls import TLSFiles, client_ssl_context
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver
from tests.pki import make_pki
from tests.tcpproxy import TCPProxy
from tests.test_engine_e2e import adt, config, err, msa


def _via_proxy(pg_url: str) -> tuple[str, TCPProxy]:
    parts = urlsplit(pg_url)
    host, port = parts.hostname, parts.port or 5432
    proxy = TCPProxy(host, port)
    netloc = parts.netloc.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
    return urlunsplit(parts._replace(netloc=netloc)), proxy


def test_store_unavailable_never_gets_aa_and_recovers(tmp_path, pg_url):
    url, proxy = _via_proxy(pg_url)
    receiver = Receiver()
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, receiver.port), db_url=url, status_port=status_port).start()
    try:
        with BlockingMLLPClient("127.0.0.1", port, timeout=15) as c:
            assert msa(c.send(adt("S-1")))[1] == "AA"
            proxy.cut()
            ack = c.send(adt("S-2"))
            assert msa(ack)[1] == "AR", ack
            assert err(ack)[3].startswith("207")
            assert eng.http("/ready")[0] == 503
            assert eng.http("/health")[0] == 200
            proxy.restore()
            deadline = time.time() + 20
            while True:
                ack = c.send(adt("S-2"))  # the sender resends; the store is back
                if msa(ack)[1] == "AA" or time.time() > deadline:
                    break
                time.sleep(0.2)
            assert msa(ack)[1] == "AA", ack
        receiver.wait_for(2)
        assert receiver.control_ids() == ["S-1", "S-2"]
        deadline = time.time() + 10
        while eng.http("/ready")[0] != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert eng.http("/ready")[0] == 200
    finally:
        proxy.restore()
        assert eng.stop() == 0
        receiver.close()
        proxy.close()


def test_mutual_tls_channel_with_cli_send(tmp_path):
    pki = make_pki(tmp_path / "pki")
    receiver = Receiver()
    port, status_port = free_port(), free_port()
    cfg = config(port, status_port, receiver.port).replace(
        f"port: {port}\n",
        f"port: {port}\n            tls: {{cert: {pki.server_cert}, key: {pki.server_key}, ca: {pki.ca}, "
        f"require_client_cert: true}}\n", 1)
    eng = EngineProcess(tmp_path, cfg, status_port=status_port).start()
    try:
        msg = tmp_path / "adt.hl7"
        msg.write_bytes(adt("TLS-1"))
        r = eng.cli("send", f"127.0.0.1:{port}", str(msg), "--tls-cert", str(pki.client_cert),
                    "--tls-key", str(pki.client_key), "--tls-ca", str(pki.ca), "--tls-server-name", "localhost")
        assert "MSA|AA|TLS-1" in r.stdout
        # no client certificate: refused
        r = eng.cli("send", f"127.0.0.1:{port}", str(msg), "--tls-ca", str(pki.ca),
                    "--tls-server-name", "localhost", "--timeout", "5", check=False)
        assert r.returncode != 0
        # a certificate from another CA: refused
        ctx = client_ssl_context(TLSFiles(cert=str(pki.rogue_cert), key=str(pki.rogue_key), ca=str(pki.ca)))
        try:
            with BlockingMLLPClient("127.0.0.1", port, ssl_context=ctx, server_hostname="localhost", timeout=5) as c:
                c.send(adt("TLS-2"))
            refused = False
        except Exception:  # noqa: BLE001 - handshake failure or reset
            refused = True
        assert refused
        receiver.wait_for(1)
        assert receiver.control_ids() == ["TLS-1"]
    finally:
        assert eng.stop() == 0
        receiver.close()


def test_disabled_destination_worker_claims_nothing_and_resumes_when_enabled():
    """A disabled destination's worker does no work per wake-up (the ingest path wakes it once
    per reactor turn), keeps one poll scheduled, and claims as soon as a reload enables it."""
    from types import SimpleNamespace

    from twisted.internet import task

    from engine.delivery import DestinationWorker

    clock = task.Clock()
    claims = []

    class Store:
        def __getattr__(self, name):  # any store access means the worker tried to claim
            claims.append(name)
            raise AssertionError(f"store.{name} used while disabled")

    queue = SimpleNamespace(ordering="destination", concurrency=1)
    cfg = SimpleNamespace(enabled=False, ack_timeout=5.0, connect_timeout=5.0, queue=queue)
    w = DestinationWorker("d", cfg, Store(), connector=None, reactor=clock)
    w.running = True
    w.wake()
    polls = [c for c in clock.getDelayedCalls() if c.active()]
    assert len(polls) == 1
    for _ in range(100):
        w.wake()
    assert [c for c in clock.getDelayedCalls() if c.active()] == polls
    assert claims == []
    # enabled by a reload: the next wake-up goes to the store
    w.cfg = SimpleNamespace(enabled=True, ack_timeout=5.0, connect_timeout=5.0, queue=queue)
    w.wake()
    assert claims
