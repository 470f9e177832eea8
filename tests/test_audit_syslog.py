"""Audit rows exported as RFC 5424 syslog messages carrying DICOM PS3.15 A.5 audit messages (IHE
ATNA): real UDP, TCP (RFC 6587 octet counting) and TLS (RFC 5425) collectors on 127.0.0.1 parse
each frame and check the header fields and the XML; a collector that goes away never blocks or
fails the audited action, the failure is logged once and the queued rows go out when it is back."""
from __future__ import annotations

import re
import socket
import ssl
import threading
import time

import pytest
from lxml import etree

from engine.atna.message import BOM, audit_message, syslog_message
from engine.atna.sender import SyslogSender
from engine.config import AuditSyslogConfig
from engine.store import AuditRow
from tests.pki import make_pki

HEADER = re.compile(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-) (.*)\Z", re.S)
PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


def parse(frame: bytes) -> dict:
    """One RFC 5424 message: header fields, and the MSG parsed as XML."""
    m = HEADER.match(frame)
    assert m, frame[:200]
    pri, ts, host, app, procid, msgid, sd, msg = m.groups()
    assert msg.startswith(BOM)
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts), ts
    return {"pri": int(pri), "ts": ts.decode(), "host": host.decode(), "app": app.decode(),
            "procid": procid.decode(), "msgid": msgid.decode(), "sd": sd,
            "xml": etree.fromstring(msg[len(BOM):], PARSER)}


def row(action="destination.pause", outcome="ok", target="destination:ris", detail=None, i=1, source="cli"):
    return AuditRow(i, 1764770000.25 + i, "alice", action, target, outcome, detail, source)


class StreamCollector:
    """A TCP (or TLS) syslog collector reading RFC 6587 octet-counted frames."""

    def __init__(self, ctx: ssl.SSLContext | None = None, port: int = 0):
        self.frames: list[bytes] = []
        self.ctx = ctx
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
                if self.ctx is not None:
                    conn = self.ctx.wrap_socket(conn, server_side=True)
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        buf = b""
        try:
            while chunk := conn.recv(65536):
                buf += chunk
                while b" " in buf:
                    length, _, rest = buf.partition(b" ")
                    assert length.isdigit() and not length.startswith(b"0"), buf[:40]
                    if len(rest) < int(length):
                        break
                    self.frames.append(rest[:int(length)])
                    buf = rest[int(length):]
        except OSError:
            pass

    def wait(self, n, timeout=10.0):
        end = time.monotonic() + timeout
        while len(self.frames) < n and time.monotonic() < end:
            time.sleep(0.01)
        assert len(self.frames) >= n, f"{len(self.frames)} frames, expected {n}"
        return [parse(f) for f in self.frames]

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread: the port is free again
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def test_audit_message_and_syslog_header():
    r = row("search.patient", detail={"key": "279035121518989", "found": True}, target="identity")
    xml = etree.fromstring(audit_message(r, source_id="mini-pfi"), PARSER)
    ev = xml.find("EventIdentification")
    assert (ev.get("EventActionCode"), ev.get("EventOutcomeIndicator")) == ("E", "0")
    assert ev.get("EventDateTime") == "2025-12-03T13:53:21.250Z"
    assert ev.find("EventID").attrib == {"csd-code": "110112", "codeSystemName": "DCM", "originalText": "Query"}
    assert [c.tag for c in xml] == ["EventIdentification", "ActiveParticipant", "AuditSourceIdentification",
                                    "ParticipantObjectIdentification"]
    assert xml.find("ActiveParticipant").attrib == {"UserID": "alice", "UserIsRequestor": "true"}
    assert b"279035121518989" not in etree.tostring(xml)     # clear-text transports: no identifier
    with_ids = etree.fromstring(audit_message(r, source_id="x", with_patient_ids=True), PARSER)
    patient = with_ids.findall("ParticipantObjectIdentification")[-1]
    assert (patient.get("ParticipantObjectID"), patient.get("ParticipantObjectTypeCodeRole")) == ("279035121518989", "1")
    refused = etree.fromstring(audit_message(row("login.failed", "refused", None, source="10.1.2.3"),
                                             source_id="x"), PARSER)
    assert refused.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert refused.find("EventIdentification/EventTypeCode").get("originalText") == "Login"
    assert refused.find("ActiveParticipant").get("NetworkAccessPointID") == "10.1.2.3"
    unknown = etree.fromstring(audit_message(row("something.new"), source_id="x"), PARSER)
    assert unknown.find("EventIdentification/EventID").get("csd-code") == "110100"
    p = parse(syslog_message(row(outcome="failed"), b"<a/>", hostname="host one\n", procid="42"))
    assert (p["pri"], p["host"], p["app"], p["procid"], p["msgid"]) == (84, "hostone", "minipfi", "42",
                                                                      "destination.pause")


def test_udp_export_from_the_store_listener(store):
    coll = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    coll.bind(("127.0.0.1", 0))
    coll.settimeout(10)
    sender = SyslogSender("127.0.0.1", coll.getsockname()[1], "udp", source_id="chu-x", hostname="pfi.chu-x.fr").start()
    store.add_audit_listener(sender.submit)
    try:
        store.audit("alice", "login", source="10.0.0.7")
        store.audit("cli:root", "destination.pause", target="destination:ris", detail={"reason": "upgrade"}, source="cli")
        got = [parse(coll.recvfrom(65535)[0]) for _ in range(2)]
    finally:
        sender.stop()
        coll.close()
    assert [(g["pri"], g["host"], g["app"], g["msgid"]) for g in got] == [
        (85, "pfi.chu-x.fr", "minipfi", "login"), (85, "pfi.chu-x.fr", "minipfi", "destination.pause")]
    assert got[0]["procid"].isdigit()
    pause = got[1]["xml"]
    assert pause.find("AuditSourceIdentification").get("AuditSourceID") == "chu-x"
    assert pause.find("EventIdentification/EventTypeCode").get("originalText") == "Network Configuration"
    obj = pause.find("ParticipantObjectIdentification")
    assert obj.get("ParticipantObjectID") == "ris"
    assert got[0]["xml"].find("ActiveParticipant").get("NetworkAccessPointID") == "10.0.0.7"


def test_tcp_octet_counting_and_a_collector_that_goes_away(caplog):
    coll = StreamCollector()
    port = coll.port
    sender = SyslogSender("127.0.0.1", port, "tcp", hostname="h", retry_s=0.2).start()
    try:
        for i in range(3):
            sender.submit(row(i=i))
        got = coll.wait(3)
        assert [g["msgid"] for g in got] == ["destination.pause"] * 3
        assert [g["xml"].find("EventIdentification").get("EventDateTime") for g in got] == [
            "2025-12-03T13:53:20.250Z", "2025-12-03T13:53:21.250Z", "2025-12-03T13:53:22.250Z"]
        coll.close()
        time.sleep(0.1)
        # the collector is gone: submitting never blocks nor raises, whatever the count
        t0 = time.monotonic()
        for i in range(3, 50):
            sender.submit(row("config.reload", i=i))
        assert time.monotonic() - t0 < 0.1
        end = time.monotonic() + 10
        while not sender.failing and time.monotonic() < end:
            sender.submit(row("config.reload", i=99))
            time.sleep(0.05)
        assert sender.failing
        # it comes back on the same port: the rows that waited go out
        coll = StreamCollector(port=port)
        got = coll.wait(40, timeout=15)
        assert not sender.failing and got[-1]["msgid"] == "config.reload"
    finally:
        sender.stop()
        coll.close()


def test_tls_rfc5425_verified_collector(tmp_path):
    pki = make_pki(tmp_path / "pki")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    coll = StreamCollector(ctx)
    cfg = AuditSyslogConfig(host="127.0.0.1", port=coll.port, transport="tls", ca_file=str(pki.ca))
    from engine.atna.sender import from_config

    sender = from_config(cfg, "mini-pfi").start()
    try:
        sender.submit(row("search.patient", target="identity", detail={"key": "1234567"}))
        (got,) = coll.wait(1)
        assert got["msgid"] == "search.patient"
        # over TLS the identifier searched for goes to the audit repository
        ids = [o.get("ParticipantObjectID") for o in got["xml"].findall("ParticipantObjectIdentification")]
        assert ids == ["identity", "1234567"]
    finally:
        sender.stop()
        coll.close()
    # a collector whose certificate another CA signed is never sent anything
    rogue = StreamCollector(ctx)
    bad = SyslogSender("127.0.0.1", rogue.port, "tls", ca_file=str(pki.rogue_ca)).start()
    try:
        bad.submit(row())
        end = time.monotonic() + 10
        while not bad.failing and time.monotonic() < end:
            time.sleep(0.02)
        assert bad.failing and rogue.frames == [] and bad.sent == 0
    finally:
        bad.stop()
        rogue.close()


def test_config_defaults_and_refusals():
    assert AuditSyslogConfig(host="c").resolved_port == 514
    assert AuditSyslogConfig(host="c", transport="tcp").resolved_port == 601
    with pytest.raises(ValueError, match="tls needs ca_file"):
        AuditSyslogConfig(host="c", transport="tls")
    with pytest.raises(ValueError, match="for transport tls only"):
        AuditSyslogConfig(host="c", transport="udp", ca_file="/etc/ssl/ca.pem")
