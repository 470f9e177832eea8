"""Blocking MLLP client (stdlib socket/ssl) for the CLI, tests and benchmarks.

It writes one frame and reads exactly one reply frame; bytes after that reply stay buffered for
the next ``recv_frame``. ``send_raw`` writes arbitrary bytes, for abuse tests.
"""
from __future__ import annotations

import socket
import ssl
from collections import deque
from typing import Optional

from mllp.framing import DEFAULT_MAX_FRAME_SIZE, Frame, FrameTooLarge, MLLPFramer, encode_frame

__all__ = ["BlockingMLLPClient"]


class BlockingMLLPClient:
    """One MLLP connection driven synchronously; usable as a context manager."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: Optional[ssl.SSLContext] = None,
        server_hostname: Optional[str] = None,
        timeout: Optional[float] = 30.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.timeout = timeout
        self.max_frame_size = max_frame_size
        self.sock: Optional[socket.socket] = None
        self._framer = MLLPFramer(max_frame_size)
        self._frames: deque[bytes] = deque()

    def connect(self) -> "BlockingMLLPClient":
        """Open the TCP (and TLS) connection; the TLS handshake completes here."""
        if self.sock is not None:
            return self
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname or self.host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._framer = MLLPFramer(self.max_frame_size)
        self._frames.clear()
        return self

    def send(self, payload: bytes) -> bytes:
        """Send one message and return the payload of the next reply frame."""
        self.send_raw(encode_frame(payload))
        return self.recv_frame()

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (no framing)."""
        if self.sock is None:
            self.connect()
        self.sock.sendall(data)

    def recv_frame(self) -> bytes:
        """Block until one complete frame arrives; ConnectionError if the peer closes first."""
        if self.sock is None:
            raise ConnectionError("not connected")
        while not self._frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by the peer")
            for ev in self._framer.feed(data):
                if type(ev) is Frame:
                    self._frames.append(ev.payload)
                elif type(ev) is FrameTooLarge:
                    raise ConnectionError(f"reply frame exceeds {self.max_frame_size} bytes")
        return self._frames.popleft()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "BlockingMLLPClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()
