"""Pause, resume and retry-now against the real engine process (SQLite and PostgreSQL): the CLI,
another process, pauses a destination and the running engine stops delivering within ~2 s
(nothing lost, /status and /metrics say so); resume delivers at once; "retry now" sends an entry
waiting for its next attempt; reloads are audited by the engine, the CLI's actions by the CLI."""
from __future__ import annotations

import getpass
from datetime import datetime
import json
import socket
import threading
import time

from engine.store import Store
from mllp.blocking import BlockingMLLPClient
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver
from tests.test_dmp_e2e import wait
from tests.test_engine_e2e import adt, msa
from tests.test_operations_e2e import TOKEN, get

ME = f"cli:{getpass.getuser()}"


def config(port, status_port, ris_port, syslog_port):
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
          shutdown_grace: 5s
          audit: {{syslog: {{host: 127.0.0.1, port: {syslog_port}, transport: udp}}}}
        channels:
          mllp-in: {{type: mllp, port: {port}}}
        routes:
          - {{name: adt, from: mllp-in, to: [ris]}}
        destinations:
          ris:
            type: mllp
            host: 127.0.0.1
            port: {ris_port}
            ack_timeout: 2s
            queue: {{retry: {{initial_delay: 60s, max_delay: 60s, jitter: 0}}}}
    """


def test_cli_pause_resume_retry_now_and_audit(tmp_path, db_url):
    refuse = threading.Event()
    ris = Receiver(policy=lambda m: "AR" if refuse.is_set() else "AA")
    port, status_port = free_port(), free_port()
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # the audit repository (syslog)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(5)
    eng = EngineProcess(tmp_path, config(port, status_port, ris.port, collector.getsockname()[1]), db_url=db_url,
                        status_port=status_port, env={"MINIPFI_STATUS_TOKEN": TOKEN})
    eng.start()
    cfg = ("--config", str(eng.config))
    store = Store(db_url or Store.default_url(eng.data_dir))  # the test reads what the engine wrote

    def send(cid):
        with BlockingMLLPClient("127.0.0.1", port, timeout=10) as c:
            assert msa(c.send(adt(cid)))[1] == "AA"

    def ris_status():
        code, _h, body = get(status_port, "/status", TOKEN)
        assert code == 200
        return json.loads(body)["destinations"]["ris"]

    try:
        send("P-1")
        ris.wait_for(1)
        # paused by another process: noticed within ~2 s, then nothing is delivered
        assert eng.cli("destinations", "pause", "ris", "--reason", "RIS upgrade", *cfg).stdout == \
            "destination ris paused\n"
        st = wait(lambda: (s := ris_status())["paused"] and s, timeout=5, what="pause noticed")
        # from the write (its time is paused_since) to the running engine applying it
        noticed = time.time() - datetime.fromisoformat(st["paused_since"]).timestamp()
        assert noticed < 2.0, noticed
        assert st["paused_by"] == ME and "reason" not in st
        for cid in ("P-2", "P-3"):
            send(cid)
        time.sleep(1.5)
        assert ris.control_ids() == ["P-1"]
        st = wait(lambda: (s := ris_status())["queued"] == 2 and s, what="two queued")
        _code, _h, metrics = get(status_port, "/metrics", TOKEN)
        assert 'minipfi_destination_paused{destination="ris"} 1.0' in metrics.decode()
        # resumed: delivered at once, in order
        eng.cli("destinations", "resume", "ris", *cfg)
        t0 = time.monotonic()
        ris.wait_for(3, timeout=10)
        resumed = time.monotonic() - t0
        assert ris.control_ids() == ["P-1", "P-2", "P-3"] and resumed < 2.0, resumed
        print(f"figures: pause noticed within {noticed:.2f} s of its write, delivery {resumed:.2f} s after "
              "the resume command returned")
        wait(lambda: not ris_status()["paused"], what="resume in /status")
        _code, _h, metrics = get(status_port, "/metrics", TOKEN)
        assert 'minipfi_destination_paused{destination="ris"} 0.0' in metrics.decode()

        # retry now: refused once (AR), the next attempt is a minute away; the operator asks now
        refuse.set()
        send("R-1")
        ris.wait_for(4)
        refuse.clear()
        wait(lambda: ris_status()["queued"] == 1, what="R-1 waiting for its retry")
        (mid,) = store.message_ids_by_control_id("R-1")
        assert eng.cli("messages", "retry", str(mid)).stdout == f"message {mid}: 1 entry due now\n"
        t0 = time.monotonic()
        ris.wait_for(5, timeout=10)
        assert ris.control_ids()[-1] == "R-1" and time.monotonic() - t0 < 2.0

        # reloads asked by `minipfi reload`: audited by the engine with the CLI's user, ok then refused
        eng.cli("reload")
        good = eng.config.read_text()
        eng.config.write_text(good + "\nnonsense: [\n")
        assert eng.cli("reload", check=False).returncode == 1
        eng.config.write_text(good)

        reloads = wait(lambda: (r := store.audit_list(action="config.reload")) and len(r) == 2 and r,
                       what="reload audit")
        assert [(r.actor, r.outcome, r.detail["result"]) for r in reloads] == [
            (ME, "refused", "refused"), (ME, "ok", "applied")]
        assert {r.source for r in reloads} == {"cli"}
        mine = [(r.action, r.target, r.outcome, r.source) for r in reversed(store.audit_list(actor=ME))]
        assert mine == [("destination.pause", "destination:ris", "ok", "cli"),
                        ("destination.resume", "destination:ris", "ok", "cli"),
                        ("message.retry", f"message:{mid}", "ok", "cli"),
                        ("config.reload", "config:routes.yaml", "ok", "cli"),
                        ("config.reload", "config:routes.yaml", "refused", "cli")]
        # exported to syslog: the engine's rows, and those of the CLI commands given the routes file
        msgids = []
        while len(msgids) < 5:
            frame = collector.recvfrom(65535)[0]
            assert frame.startswith((b"<85>1 ", b"<84>1 ")) and b" minipfi " in frame
            msgids.append(frame.split(b" ")[5].decode())
        assert msgids == ["engine.start", "destination.pause", "destination.resume", "config.reload",
                          "config.reload"]
    finally:
        assert eng.stop() == 0, eng.log_tail()
        ris.close()
        collector.close()
        store.dispose()
