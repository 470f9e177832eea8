"""A real MLLP receiver for tests, in plain threads: records what it gets, answers per a policy.

It stands in for a RIS, a teleradiology platform or any HL7 peer on 127.0.0.1. The policy maps a
received message to the ACK code (AA, AE, AR) or to ``None`` (no answer: the sender times out).
"""
from __future__ import annotations

import socket
import threading
import time

from mllp.framing import Frame, MLLPFramer, encode_frame


def control_id(message: bytes) -> str:
    seg = message.replace(b"\n", b"\r").split(b"\r", 1)[0]
    fs = seg[3:4]
    fields = seg.split(fs)
    return fields[9].decode("latin-1") if len(fields) > 9 else ""


def simple_ack(message: bytes, code: str = "AA") -> bytes:
    cid = control_id(message)
    return (f"MSH|^~\\&|PEER|TEST|MINIPFI||{time.strftime('%Y%m%d%H%M%S')}||ACK|A{cid}|P|2.5\r"
            f"MSA|{code}|{cid}\r").encode()


class Receiver:
    def __init__(self, policy=None, port: int = 0):
        self.policy = policy or (lambda msg: "AA")
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        framer = MLLPFramer()
        try:
            while not self._stop:
                data = conn.recv(65536)
                if not data:
                    return
                for ev in framer.feed(data):
                    if not isinstance(ev, Frame):
                        continue
                    with self.lock:
                        self.received.append(ev.payload)
                    code = self.policy(ev.payload)
                    if code is None:
                        continue
                    conn.sendall(encode_frame(simple_ack(ev.payload, code)))
        except OSError:
            return
        finally:
            conn.close()

    def control_ids(self) -> list[str]:
        with self.lock:
            return [control_id(m) for m in self.received]

    def wait_for(self, n: int, timeout: float = 20.0) -> list[bytes]:
        end = time.time() + timeout
        while time.time() < end:
            with self.lock:
                if len(self.received) >= n:
                    return list(self.received)
            time.sleep(0.02)
        with self.lock:
            raise AssertionError(f"expected {n} messages, got {len(self.received)}")

    def close(self):
        self._stop = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass


class WebhookReceiver:
    """An HTTP(S) receiver of JSON POSTs (alert webhooks): keeps ``(Authorization, body)`` per
    request and answers ``status`` (204; 200 is sent HTTP/1.0 style, without a length: the body
    ends with the connection). ``tls``: a server ``ssl.SSLContext`` for HTTPS."""

    def __init__(self, tls=None, status: int = 204):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import json

        self.posts: list[tuple[str | None, dict]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with receiver.lock:
                    receiver.posts.append((self.headers.get("Authorization"), body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self, alert: str | None = None) -> list[dict]:
        with self.lock:
            return [b for _, b in self.posts if alert is None or b.get("alert") == alert]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
