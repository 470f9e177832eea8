"""End to end: the real engine process, real MLLP sockets, a real receiver, SQLite and PostgreSQL."""
from __future__ import annotations

import json
import re
import socket
import time

import pytest

from mllp.blocking import BlockingMLLPClient
from tests.conftest import CORPUS
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver, control_id

ADMISSION = CORPUS / "ans-hl7v2" / "SGL" / "admission.er7"
PHI_CANARIES = ("PAT-TROIS", "279035121518989", "19790328", "DOMINIQUE", "Breteuil")


def config(port, status_port, dest_port, *, on_ae="error", on_ar="retry", extra_engine="", ordering="destination",
           max_attempts=20, initial_delay="100ms"):
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
          shutdown_grace: 5s
          {extra_engine}
        channels:
          mllp-in:
            type: mllp
            port: {port}
            accept:
              message_types: ["ADT^*", "ORM^O01", "ORU^R01"]
              versions: ["2.3", "2.4", "2.5", "2.5.1", "2.6"]
        routes:
          - name: adt
            from: mllp-in
            filter: {{message_types: ["ADT^*"]}}
            to: [ris]
        destinations:
          ris:
            type: mllp
            host: 127.0.0.1
            port: {dest_port}
            ack_timeout: 2s
            connect_timeout: 1s
            queue:
              retry: {{initial_delay: {initial_delay}, max_delay: 1s, multiplier: 2, jitter: 0.1}}
              max_attempts: {max_attempts}
              on_ae: {on_ae}
              on_ar: {on_ar}
              ordering: {ordering}
    """


def adt(cid: str, trigger: str = "A01", version: str = "2.5", extra_msh: str = "") -> bytes:
    base = ADMISSION.read_bytes().replace(b"\n", b"\r")
    text = base.decode("utf-8")
    text = re.sub(r"\|ADT\^A01\^ADT_A01\|3975\|D\|2\.5\^FRA\^2\.11\|",
                  f"|ADT^{trigger}^ADT_A01|{cid}|P|{version}^FRA^2.11|", text, count=1)
    return text.encode("utf-8")


def msa(ack: bytes) -> list[str]:
    for seg in ack.split(b"\r"):
        if seg.startswith(b"MSA"):
            return seg.decode().split("|")
    raise AssertionError(f"no MSA in {ack!r}")


def err(ack: bytes) -> list[str]:
    for seg in ack.split(b"\r"):
        if seg.startswith(b"ERR"):
            return seg.decode().split("|")
    raise AssertionError(f"no ERR in {ack!r}")


@pytest.fixture
def rig(tmp_path, db_url):
    """An engine whose ADT route goes to a live receiver."""
    receiver = Receiver()
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, receiver.port), db_url=db_url, status_port=status_port)
    eng.port = port
    eng.start()
    yield eng, receiver
    rc = eng.stop()
    receiver.close()
    assert rc == 0, eng.log_tail()
    log = eng.log_text()
    for canary in PHI_CANARIES:
        assert canary not in log, f"patient data {canary!r} leaked into the logs"


def test_corpus_adt_gets_aa_is_listed_counted_and_delivered_byte_for_byte(rig):
    eng, receiver = rig
    r = eng.cli("send", f"127.0.0.1:{eng.port}", str(ADMISSION))
    assert "MSA|AA|3975" in r.stdout
    rows = eng.messages()
    assert len(rows) == 1
    row = rows[0]
    for key in ("id", "channel", "control_id", "message_type", "received_at", "status"):
        assert key in row
    assert row["channel"] == "mllp-in" and row["control_id"] == "3975" and row["message_type"] == "ADT^A01"
    got = receiver.wait_for(1)
    assert got[0] == ADMISSION.read_bytes().strip(b"\r\n") + b"\r"
    deadline = time.time() + 10
    while time.time() < deadline:
        st = eng.status()
        if st["destinations"]["ris"]["sent"] == 1:
            break
        time.sleep(0.1)
    assert st["channels"]["mllp-in"]["received"] == 1
    assert st["destinations"]["ris"]["sent"] == 1
    assert eng.messages()[0]["status"] == "sent"


def test_duplicate_gets_the_stored_ack_byte_for_byte_and_is_not_routed_again(rig):
    eng, receiver = rig
    msg = adt("DUP-1")
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=10) as c:
        first = c.send(msg)
        second = c.send(msg)
        conflict = c.send(msg.replace(b"PAT-TROIS", b"PAT-QUATRE"))
    assert msa(first)[1] == "AA"
    assert second == first
    assert msa(conflict)[1] == "AE" and err(conflict)[3].startswith("205")
    receiver.wait_for(1)
    time.sleep(0.5)
    assert receiver.control_ids() == ["DUP-1"]
    st = eng.status()["channels"]["mllp-in"]
    assert st["duplicates"] == 1 and st["conflicts"] == 1


@pytest.mark.parametrize(
    "payload, code, err3",
    [
        (b"PID|1||123\rPV1|1|I\r", "AE", "100"),
        (b"MSH|^~|GAM|CHU-X|DPI|CHU-X|20240306111154||ADT^A01|X1|P|2.5\r", "AE", "102"),
        (b"MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|20240306111154||ADT^A01|X2|P|9.9\rEVN||1\r", "AR", "203"),
        (b"MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|20240306111154||SIU^S12|X3|P|2.5\r", "AR", "200"),
        (b"MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|20240306111154||ORU^R30|X4|P|2.5\r", "AR", "201"),
        (b"MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|20240306111154||ADT^A01|X5|Q|2.5\r", "AR", "202"),
        (b"MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|20240306111154|||X6|P|2.5\r", "AE", "101"),
    ],
    ids=["no-msh", "bad-msh2", "version", "type", "event", "processing-id", "no-msh9"],
)
def test_bad_input_gets_a_specific_nak_and_is_stored(tmp_path, payload, code, err3):
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, free_port()), status_port=status_port).start()
    try:
        with BlockingMLLPClient("127.0.0.1", port, timeout=10) as c:
            ack = c.send(payload)
            assert msa(ack)[1] == code, ack
            e = err(ack)
            assert e[3].startswith(err3), ack
            assert e[4] == "E" and len(e) > 8 and e[8], ack  # severity and a readable ERR-8
            ok = c.send(adt("AFTER-BAD"))  # the connection still works
            assert msa(ok)[1] == "AA"
        rows = eng.messages()
        assert {r["status"] for r in rows} >= {"rejected"}
        assert eng.status()["channels"]["mllp-in"]["rejected"] == 1
    finally:
        assert eng.stop() == 0


def test_enhanced_mode_answers_ca(tmp_path):
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, free_port()), status_port=status_port).start()
    try:
        msg = adt("ENH-1").replace(b"|||||FRA|UNICODE UTF-8|", b"|||AL|NE|FRA|UNICODE UTF-8|", 1)
        with BlockingMLLPClient("127.0.0.1", port, timeout=10) as c:
            ack = c.send(msg)
        assert msa(ack)[1] == "CA"
        fields = ack.split(b"\r")[0].split(b"|")
        assert fields[8] == b"ACK^A01^ACK" and fields[9] != b"ENH-1" and fields[11].startswith(b"2.5")
        assert fields[2] == b"DPI" and fields[4] == b"GAM"  # sender and receiver swapped
    finally:
        assert eng.stop() == 0


def test_destination_down_queues_then_delivers_in_order(tmp_path, db_url):
    dest_port = free_port()
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, dest_port), db_url=db_url, status_port=status_port).start()
    receiver = None
    try:
        with BlockingMLLPClient("127.0.0.1", port, timeout=10) as c:
            for i in range(20):
                assert msa(c.send(adt(f"Q-{i:03d}")))[1] == "AA"
        time.sleep(1.0)
        st = eng.status()["destinations"]["ris"]
        assert st["queue_depth"] == 20 and st["sent"] == 0 and st["oldest_queued_age_s"] > 0
        receiver = Receiver(port=dest_port)
        receiver.wait_for(20, timeout=30)
        ids = receiver.control_ids()
        assert ids[:20] == [f"Q-{i:03d}" for i in range(20)], ids
    finally:
        assert eng.stop() == 0
        if receiver:
            receiver.close()


def test_ae_goes_to_error_without_retry_and_ar_retries(tmp_path):
    seen = {}

    def policy(message):
        cid = control_id(message)
        seen[cid] = seen.get(cid, 0) + 1
        if cid.startswith("AE-"):
            return "AE"
        if cid.startswith("AR-") and seen[cid] < 3:
            return "AR"
        return "AA"

    receiver = Receiver(policy)
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, receiver.port, ordering="none"),
                        status_port=status_port).start()
    try:
        with BlockingMLLPClient("127.0.0.1", port, timeout=10) as c:
            c.send(adt("AE-1"))
            c.send(adt("AR-1"))
        deadline = time.time() + 20
        while time.time() < deadline:
            st = eng.status()["destinations"]["ris"]
            if st["sent"] == 1 and st["errored"] == 1:
                break
            time.sleep(0.1)
        assert st["sent"] == 1 and st["errored"] == 1, st
        time.sleep(1.0)
        assert seen["AE-1"] == 1  # AE: no endless retry
        assert seen["AR-1"] == 3  # AR: retried with backoff until accepted
        ae_row = next(r for r in eng.messages() if r["control_id"] == "AE-1")
        assert ae_row["status"] == "error"
        shown = json.loads(eng.cli("messages", "show", str(ae_row["id"]), "--json").stdout)
        assert shown["entries"][0]["last_error"].startswith("AE")
    finally:
        assert eng.stop() == 0
        receiver.close()


def test_reload_keeps_connections_and_refuses_an_invalid_file(tmp_path):
    receiver = Receiver()
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, receiver.port), status_port=status_port).start()
    try:
        with BlockingMLLPClient("127.0.0.1", port, timeout=10) as c:
            assert msa(c.send(adt("R-1")))[1] == "AA"
            good = eng.config.read_text()
            eng.config.write_text(good + "\n  oops: [\n")
            refused = eng.cli("reload", "--data-dir", str(eng.data_dir), check=False)
            assert refused.returncode == 1 and "refused" in refused.stderr, refused.stderr
            assert "config.reload_refused" in eng.log_text()
            last = eng.status()["config"]["last_reload"]
            assert last["result"] == "refused" and last["at"] and "routes.yaml" in last["reason"]
            assert msa(c.send(adt("R-2")))[1] == "AA"  # old config still in force
            # a valid change: ORM now routed too, to the same receiver
            eng.config.write_text(good.replace('message_types: ["ADT^*"]}', 'message_types: ["ADT^*", "ORM^*"]}'))
            applied = eng.cli("reload", "--data-dir", str(eng.data_dir))
            assert applied.returncode == 0 and "reload applied" in applied.stdout
            assert "config.reloaded" in eng.log_text()
            assert eng.status()["config"]["last_reload"]["result"] == "applied"
            orm = adt("R-3").replace(b"ADT^A01^ADT_A01", b"ORM^O01^ORM_O01")
            assert msa(c.send(orm))[1] == "AA"  # same socket: the connection survived the reload
        receiver.wait_for(3)
        assert receiver.control_ids() == ["R-1", "R-2", "R-3"]
    finally:
        assert eng.stop() == 0
        receiver.close()


def test_check_reports_file_line_and_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("channels:\n  in:\n    type: mllp\n    port: notaport\nroutes: []\ndestinations: {}\n")
    eng = EngineProcess(tmp_path, "engine: {}\n")
    r = eng.cli("check", str(bad), check=False)
    assert r.returncode != 0
    assert "4" in r.stderr and "channels.in.port" in r.stderr
    r = eng.cli("check", "engine/routes.yaml")
    assert "OK" in r.stdout


def test_status_token_is_checked_before_the_body(tmp_path):
    port, status_port = free_port(), free_port()
    eng = EngineProcess(tmp_path, config(port, status_port, free_port()), status_port=status_port,
                        env={"MINIPFI_STATUS_TOKEN": "s3cret-token"})
    eng.start(wait_ready=False)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if eng.http("/ready", token="s3cret-token")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        assert eng.http("/status")[0] == 401
        assert eng.http("/status", token="wrong")[0] == 401
        code, body = eng.http("/status", token="s3cret-token")
        assert code == 200 and "mllp-in" in body["channels"]
        # a request announcing a 1 GB body is refused on its headers, before any body byte is sent
        with socket.create_connection(("127.0.0.1", status_port), timeout=5) as s:
            s.sendall(b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 401")
    finally:
        assert eng.stop() == 0
