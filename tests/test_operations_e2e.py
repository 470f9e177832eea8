"""Hospital IT operations against the real engine process (real sockets, SQLite and PostgreSQL):
replay to chosen destinations without a second delivery, errors cleared by a successful replay or
marked handled, CLI search, the status endpoint's probes, JSON errors and headers, /metrics."""
from __future__ import annotations

import json
import re
import socket
import threading
import time

from mllp.blocking import BlockingMLLPClient
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver, control_id
from tests.test_dmp_e2e import wait
from tests.test_engine_e2e import PHI_CANARIES, adt, msa

TOKEN = "ops-t0ken"


def config(port, status_port, ris_port, archive_port):
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
          shutdown_grace: 5s
        channels:
          mllp-in:
            type: mllp
            port: {port}
            accept: {{message_types: ["ADT^*"], versions: ["2.5"]}}
        routes:
          - name: adt
            from: mllp-in
            filter: {{message_types: ["ADT^*"]}}
            to: [ris, archive]
        destinations:
          ris:
            type: mllp
            host: 127.0.0.1
            port: {ris_port}
            ack_timeout: 2s
            queue: {{on_ae: error, retry: {{initial_delay: 100ms, max_delay: 1s}}}}
          archive:
            type: mllp
            host: 127.0.0.1
            port: {archive_port}
            ack_timeout: 2s
    """


def raw_http(port, request: bytes) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def get(port, path, token=None, method="GET"):
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return raw_http(port, f"{method} {path} HTTP/1.0\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode())


def status(eng):
    code, _h, body = get(eng.status_port, "/status", TOKEN)
    assert code == 200, body
    return json.loads(body)


def test_operations(tmp_path, db_url):
    fixed = threading.Event()
    ris = Receiver(policy=lambda m: "AE" if b"|BAD-" in m and not fixed.is_set() else "AA")
    archive = Receiver()
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, ris.port, archive.port), db_url=db_url,
                        status_port=status_port, env={"MINIPFI_STATUS_TOKEN": TOKEN})
    eng.start()   # readiness is polled without the token: /ready is a probe
    try:
        with BlockingMLLPClient("127.0.0.1", port, timeout=10) as c:
            for cid in ("OK-1", "BAD-1"):
                assert msa(c.send(adt(cid)))[1] == "AA"
        archive.wait_for(2)
        st = wait(lambda: (s := status(eng))["destinations"]["ris"]["errored"] == 1 and s, what="ris error")
        ris_st = st["destinations"]["ris"]
        assert ris_st["last_error"].startswith("AE") and ris_st["last_error_at"].endswith("+00:00")

        # search
        def listed(*args):
            out = eng.cli("messages", "list", "--json", *args).stdout
            return [json.loads(line)["control_id"] for line in out.splitlines()]
        assert listed("--status", "error") == ["BAD-1"]
        assert listed("--status", "error", "--destination", "archive") == []
        assert listed("--destination", "archive", "--since", "1h") == ["BAD-1", "OK-1"]
        assert listed("--until", "2000-01-01") == []
        assert listed("--type", "ADT^A01", "--control-id", "OK-1") == ["OK-1"]
        shown = json.loads(eng.cli("messages", "show", "BAD-1", "--json").stdout)
        bad_id = shown["id"]
        assert {e["destination"]: e["status"] for e in shown["entries"]} == {"ris": "error", "archive": "sent"}

        # replay, default: only where it ended in error; the receiver that has it gets nothing more
        fixed.set()
        out = eng.cli("messages", "replay", str(bad_id)).stdout
        assert "ris: queued again" in out and "archive" not in out
        wait(lambda: [control_id(m) for m in ris.received].count("BAD-1") == 2, what="BAD-1 at ris again")
        st = wait(lambda: (s := status(eng))["destinations"]["ris"]["errored"] == 0 and s, what="error cleared")
        assert st["destinations"]["ris"]["resolved"] == 1 and st["destinations"]["ris"]["sent"] == 2
        # replay to a destination where an entry is live: none added
        replayed = json.loads(eng.cli("messages", "show", str(bad_id), "--json").stdout)["entries"]
        assert [e["replay_of"] for e in replayed if e["destination"] == "ris"][-1] is not None
        assert [control_id(m) for m in archive.received].count("BAD-1") == 1
        r = eng.cli("messages", "replay", str(bad_id), "--destination", "nowhere", check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "never routed to nowhere" in r.stderr

        # an operator marks an error handled
        fixed.clear()
        with BlockingMLLPClient("127.0.0.1", port, timeout=10) as c:
            assert msa(c.send(adt("BAD-2")))[1] == "AA"
        wait(lambda: status(eng)["destinations"]["ris"]["errored"] == 1, what="second error")
        bad2 = json.loads(eng.cli("messages", "show", "BAD-2", "--json").stdout)["id"]
        assert "1 error(s) at ris marked handled" in eng.cli("messages", "handled", str(bad2), "--destination", "ris").stdout
        assert status(eng)["destinations"]["ris"]["errored"] == 0
        assert listed("--status", "handled") == ["BAD-2"]

        # one-line errors
        for args in (("messages", "show", "abc"), ("messages", "replay", "abc")):
            r = eng.cli(*args, check=False)
            assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr

        # the status endpoint: probes without the token, the rest with it, JSON errors, no Server
        assert get(status_port, "/health")[0] == 200 and get(status_port, "/ready")[0] == 200
        for path in ("/status", "/metrics", "/nope"):
            code, headers, body = get(status_port, path)
            assert code == 401 and json.loads(body) == {"error": "Unauthorized"}
        code, headers, body = get(status_port, "/nope", TOKEN)
        assert code == 404 and json.loads(body) == {"error": "not found"}
        assert headers["content-type"] == "application/json" and "server" not in headers
        code, headers, body = get(status_port, "/status", TOKEN, method="DELETE")
        assert code == 405 and json.loads(body) == {"error": "method not allowed"}
        assert get(status_port, "/health", "wrong")[0] == 401

        # metrics
        code, headers, body = get(status_port, "/metrics", TOKEN)
        text = body.decode()
        assert code == 200 and headers["content-type"].startswith("text/plain") and "server" not in headers
        assert 'minipfi_channel_messages_total{channel="mllp-in",outcome="received"} 3.0' in text
        assert 'minipfi_channel_messages_total{channel="mllp-in",outcome="accepted"} 3.0' in text
        assert 'minipfi_messages_stored_total{ack_code="AA",channel="mllp-in",error_code="",status="routed"} 3.0' in text
        assert 'minipfi_ack_latency_seconds_count{channel="mllp-in"} 3.0' in text
        assert 'minipfi_ack_latency_seconds_bucket{channel="mllp-in",le="+Inf"} 3.0' in text
        assert 'minipfi_queue_entries{destination="ris",status="resolved"} 2.0' in text
        assert 'minipfi_queue_oldest_age_seconds{destination="ris"} 0.0' in text
        assert 'minipfi_deliveries_total{destination="ris",outcome="error"} 2.0' in text
        assert 'minipfi_deliveries_total{destination="archive",outcome="sent"} 3.0' in text
        assert "minipfi_store_commit_seconds_count" in text and "minipfi_store_up 1.0" in text
        if db_url is None:  # SQLite: the WAL's length and its checkpoints
            assert re.search(r"^minipfi_store_wal_frames \d+\.0$", text, re.M), text
            assert re.search(r"^minipfi_store_checkpoints_total \d+\.0$", text, re.M), text
            assert "minipfi_store_checkpoint_seconds_total" in text
            assert "minipfi_store_checkpoint_failures_total 0.0" in text
        else:
            assert "minipfi_store_wal_frames" not in text
        for canary in PHI_CANARIES + ("BAD-1", "OK-1"):   # no patient data, no message field
            assert canary not in text, canary
            assert canary not in json.dumps(status(eng))
    finally:
        assert eng.stop() == 0, eng.log_tail()
        ris.close()
        archive.close()
