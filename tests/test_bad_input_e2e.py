"""Bad input over real MLLP, on SQLite and PostgreSQL: each case gets a clear, specific answer,
is stored, and gets the same answer when resent. Cases found by an outside probe of the running
engine; each test failed before its fix."""
from __future__ import annotations

import base64
import json

import pytest

from mllp.blocking import BlockingMLLPClient
from tests.conftest import CORPUS
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver

MDM = (CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1" / "MDM"
       / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1_Base64.er7").read_bytes()


def config(port, status_port, dest_port):
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
          duplicates: {{on_conflict: accept}}
        channels:
          mllp-in:
            type: mllp
            port: {port}
            identity_feed: {{enabled: true}}
            reports: {{enabled: true}}
        routes:
          - {{name: all, from: mllp-in, to: [out]}}
        destinations:
          out: {{type: mllp, host: 127.0.0.1, port: {dest_port}, ack_timeout: 2s}}
    """


@pytest.fixture
def eng(tmp_path, db_url):
    receiver = Receiver()
    port, status_port = free_port(), free_port()
    e = EngineProcess(tmp_path, config(port, status_port, receiver.port), db_url=db_url,
                      status_port=status_port)
    e.port = port
    e.start()
    yield e
    rc = e.stop()
    receiver.close()
    assert rc == 0, e.log_tail()
    assert "message.store_failed" not in e.log_text()
    assert "Traceback" not in e.log_text()


def exchange(eng, *messages) -> list[bytes]:
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=30) as c:
        return [c.send(m) for m in messages]


def msa(ack: bytes) -> list[bytes]:
    return next(s for s in ack.split(b"\r") if s.startswith(b"MSA")).split(b"|")


def errs(ack: bytes) -> list[list[bytes]]:
    return [s.split(b"|") for s in ack.split(b"\r") if s.startswith(b"ERR")]


def test_rejected_message_resent_gets_the_same_ae(eng):
    no_pid = (b"MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|20240306111154||ADT^A01^ADT_A01|RS-NOPID|P|2.5|||||FRA|"
              b"UNICODE UTF-8\rEVN||20240101\r")
    answers = exchange(eng, no_pid, no_pid, no_pid)
    assert [msa(a)[1] for a in answers] == [b"AE", b"AE", b"AE"]
    assert answers[1] == answers[0] and answers[2] == answers[0]  # the stored ACK, byte for byte


def test_cda_with_a_dtd_is_a_content_error(eng):
    text = MDM.replace(b"\n", b"\r")
    start = text.index(b"^text^XML^Base64^") + len(b"^text^XML^Base64^")
    end = text.index(b"|", start)
    cda = base64.b64decode(text[start:end])
    root = cda.index(b"<ClinicalDocument")
    cda = cda[:root] + b'<!DOCTYPE ClinicalDocument [<!ENTITY e "x">]>\n' + cda[root:]
    cda = cda.replace(b"<title>", b"<title>&e;", 1)
    bad = text[:start] + base64.b64encode(cda) + text[end:]
    (ack,) = exchange(eng, bad)
    assert msa(ack)[1] == b"AE", ack
    (err,) = errs(ack)[:1]
    assert err[3].startswith(b"207") and err[5].startswith(b"906"), err
    (row,) = eng.messages()
    assert row["status"] == "rejected"


def test_nul_byte_in_msh18_is_answered_and_stored(eng):
    msg = (b"MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|20240101||ADT^A01^ADT_A01|NUL18|P|2.5||||||UNICODE\x00UTF-8\r"
           b"PID|1||X^^^CHU-X&000897406&N^PI||ZZ^J||19800101|M\r")
    first, again = exchange(eng, msg, msg)
    assert msa(first)[1] == b"AE" and errs(first)[0][3].startswith(b"102"), first
    assert msa(again)[1] == b"AE"
    assert len(eng.messages()) == 2


@pytest.mark.parametrize("charset", [b"UNICODE UTF-8", b""])
def test_msa2_echoes_a_non_ascii_control_id_byte_for_byte(eng, charset):
    msg = (b"MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|20240101||ADT^A28^ADT_A05|CTL\xc3\xa9|P|2.5||||||" + charset
           + b"\rEVN||20240101\rPID|1||X1^^^CHU-X&000897406&N^PI||ZZ^J||19800101|M\r")
    (ack,) = exchange(eng, msg)
    assert msa(ack)[2] == b"CTL\xc3\xa9", ack


def test_bom_before_msh_is_accepted_and_kept(eng):
    msg = (b"\xef\xbb\xbfMSH|^~\\&|GAM|CHU-X|DPI|CHU-X|20240101||ADT^A28^ADT_A05|BOM1|P|2.5||||||"
           b"UNICODE UTF-8\rEVN||20240101\rPID|1||X2^^^CHU-X&000897406&N^PI||ZZ^J||19800101|M\r")
    (ack,) = exchange(eng, msg)
    assert msa(ack)[1] == b"AA", ack
    (row,) = eng.messages()
    shown = json.loads(eng.cli("messages", "show", str(row["id"]), "--json").stdout)
    assert shown["raw"].encode("latin-1") == msg


def test_inspect_json_answers_json_for_a_refused_message(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.hl7"
    bad.write_bytes(b"MSH|^~\\&&|A|B\rPID|1\r")  # MSH-2 with a repeated character
    out = subprocess.run([sys.executable, "-m", "engine.cli", "inspect", str(bad), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    doc = json.loads(out.stdout)  # one JSON object, not a text line
    assert doc["refused"] is True and doc["errors"][0]["code"] == "102"
