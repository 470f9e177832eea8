"""Sends audit rows to a syslog collector from a thread of its own (never the reactor's).

``submit`` only appends to a bounded queue: the audited action never waits for the network and
never fails because of it. While the collector is unreachable the rows wait in that queue (the
oldest dropped past ``max_queue``, counted) and the thread tries again every ``RETRY_S``; a
burst of failures is logged once, and the recovery once, with what was dropped. The store keeps
every row whatever happens here. UDP: one message per datagram (RFC 5426). TCP: RFC 6587 octet
counting. TLS: RFC 5425 (octet counting over TLS 1.2+, the collector's certificate verified).
"""
from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections import deque

from engine import logs
from mllp.tls import TLSFiles, client_ssl_context

from .message import audit_message, octet_counted, syslog_message

log = logs.get("engine.atna")

RETRY_S = 5.0         # while failing, one new attempt this often
CONNECT_TIMEOUT_S = 5.0
UDP_MAX = 65000       # a bigger message would not fit in one datagram: cut (RFC 5426 3.2)


class SyslogSender:
    def __init__(self, host: str, port: int, transport: str = "udp", *, source_id: str = "mini-pfi",
                 ca_file: str | None = None, cert: str | None = None, key: str | None = None,
                 hostname: str | None = None, max_queue: int = 10000, retry_s: float = RETRY_S):
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"unknown syslog transport {transport!r}")
        self.host, self.port, self.transport = host, int(port), transport
        self.source_id = source_id
        self.hostname = hostname or socket.getfqdn()
        self.procid = str(os.getpid())
        self._ctx = client_ssl_context(TLSFiles(cert=cert, key=key, ca=ca_file)) if transport == "tls" else None
        self._queue: deque = deque()
        self._max = max_queue
        self.retry_s = retry_s
        self._cond = threading.Condition()
        self._stopping = False
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.dropped = 0
        self.failing = False
        self.config = None

    # -- the audit listener (any thread) ----------------------------------------------------------
    def submit(self, row) -> None:
        with self._cond:
            if len(self._queue) >= self._max:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(row)
            self._cond.notify()

    __call__ = submit

    def start(self) -> "SyslogSender":
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Send what is queued within ``timeout`` seconds, then close."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._close()

    # -- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                row = self._queue[0]
            try:
                self._send(self._frame(row))
            except Exception as exc:  # noqa: BLE001 - network, TLS, anything: never up the stack
                self._close()
                if not self.failing:
                    self.failing = True
                    log.error("audit.syslog_failed", transport=self.transport, host=self.host, port=self.port,
                              error=logs.error_text(exc))
                with self._cond:
                    if not self._stopping:
                        self._cond.wait(self.retry_s)
                    if self._stopping:
                        return  # the collector failed: what waits is not worth delaying the stop
                continue
            with self._cond:
                if self._queue and self._queue[0] is row:
                    self._queue.popleft()
            self.sent += 1
            if self.failing:
                self.failing = False
                log.info("audit.syslog_recovered", transport=self.transport, host=self.host,
                         port=self.port, dropped=self.dropped)

    def _frame(self, row) -> bytes:
        xml = audit_message(row, source_id=self.source_id, with_patient_ids=self.transport == "tls")
        msg = syslog_message(row, xml, hostname=self.hostname, procid=self.procid)
        if self.transport == "udp":
            return msg[:UDP_MAX]
        return octet_counted(msg)

    def _send(self, data: bytes) -> None:
        if self.transport == "udp":
            if self._sock is None:
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.sendto(data, (self.host, self.port))
            return
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
            if self._ctx is not None:
                try:
                    sock = self._ctx.wrap_socket(sock, server_hostname=self.host)
                except (ssl.SSLError, OSError):
                    sock.close()
                    raise
            self._sock = sock
        self._sock.sendall(data)

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def from_config(cfg, source_id: str) -> SyslogSender:
    """A sender for ``engine.audit.syslog`` (``engine.config.AuditSyslogConfig``)."""
    sender = SyslogSender(cfg.host, cfg.resolved_port, cfg.transport, source_id=source_id,
                          ca_file=cfg.ca_file, cert=cfg.cert, key=cfg.key)
    sender.config = cfg  # a reload that leaves it unchanged keeps this sender
    return sender
