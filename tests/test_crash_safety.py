"""Crash safety: SIGKILL the engine several times during a 5,000-message run.

Senders retransmit (same MSH-10) whenever no ACK comes back, as a real HL7 sender does. Afterwards
every message that was answered AA is stored exactly once and reached the destination at least
once; resends of messages committed before the kill are counted as duplicates, not stored twice.
Runs on SQLite and on PostgreSQL.
"""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from mllp.blocking import BlockingMLLPClient
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver
from tests.test_engine_e2e import adt, config, msa

TOTAL = 5000
SENDERS = 4
KILLS = 4


def _sender(port, ids, acked, stop):
    client = None
    for cid in ids:
        msg = adt(cid)
        while not stop.is_set():
            try:
                if client is None:
                    client = BlockingMLLPClient("127.0.0.1", port, timeout=3)
                    client.connect()
                ack = client.send(msg)
                if msa(ack)[1] == "AA" and msa(ack)[2] == cid:
                    acked.append(cid)
                    break
            except Exception:  # noqa: BLE001 - no ACK: reconnect and retransmit the same message
                if client is not None:
                    try:
                        client.close()
                    except Exception:  # noqa: BLE001
                        pass
                client = None
                time.sleep(0.05)
    if client is not None:
        client.close()


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_sigkill_loses_no_acked_message(tmp_path, request, db):
    db_url = request.getfixturevalue("pg_url") if db == "postgresql" else None
    receiver = Receiver()
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, receiver.port), db_url=db_url, status_port=status_port)
    eng.start()
    acked: list[str] = []
    stop = threading.Event()
    all_ids = [f"K{i:05d}" for i in range(TOTAL)]
    threads = [threading.Thread(target=_sender, args=(port, all_ids[s::SENDERS], acked, stop), daemon=True)
               for s in range(SENDERS)]
    for t in threads:
        t.start()
    try:
        kills = 0
        while kills < KILLS and any(t.is_alive() for t in threads):
            target = len(acked) + TOTAL // (KILLS + 2)
            deadline = time.time() + 60
            while len(acked) < target and time.time() < deadline and any(t.is_alive() for t in threads):
                time.sleep(0.01)
            eng.kill()
            kills += 1
            time.sleep(0.2)
            eng.start()
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads), "senders did not finish"
        assert kills == KILLS
        assert sorted(acked) == sorted(set(acked)) and len(acked) == TOTAL

        rows = eng.messages()
        counts = Counter(r["control_id"] for r in rows)
        missing = [c for c in all_ids if counts[c] == 0]
        doubled = [c for c, n in counts.items() if n > 1]
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
        assert not doubled, f"{len(doubled)} messages stored twice, e.g. {doubled[:5]}"

        receiver.wait_for(TOTAL, timeout=120)
        deadline = time.time() + 120
        while time.time() < deadline:
            got = set(receiver.control_ids())
            if got >= set(all_ids):
                break
            time.sleep(0.2)
        lost = set(all_ids) - set(receiver.control_ids())
        assert not lost, f"{len(lost)} messages never reached the destination, e.g. {sorted(lost)[:5]}"
        st = eng.status()
        dups = st["channels"]["mllp-in"]["duplicates"]
        delivered_twice = sum(1 for n in Counter(receiver.control_ids()).values() if n > 1)
        print(f"\n{db}: {TOTAL} messages, {kills} SIGKILLs, {dups} duplicate resends answered from the store, "
              f"{delivered_twice} delivered more than once (at-least-once window)")
    finally:
        stop.set()
        rc = eng.stop()
        receiver.close()
    assert rc == 0, eng.log_tail()
