"""The status endpoint against slow, many and oddly-spelled clients (real sockets, in-process
site): a deadline for the headers, a connection cap, the Bearer scheme in any case."""
from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
from twisted.internet import reactor

from engine.status.http import StatusService, build_site
from tests import reactor_thread


@pytest.fixture
def site_port():
    service = StatusService(SimpleNamespace(version="test"))
    site = build_site(service, "s3cret", header_timeout=0.5, max_connections=3)
    port = reactor_thread.call(reactor.listenTCP, 0, site, interface="127.0.0.1")
    yield site, port.getHost().port
    reactor_thread.call(port.stopListening)


def get(port, auth: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth + b"\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER"])
def test_bearer_scheme_is_case_insensitive(site_port, scheme):
    _site, port = site_port
    assert get(port, scheme + b" s3cret").startswith(b"HTTP/1.1 200")
    assert get(port, scheme + b" wrong").startswith(b"HTTP/1.1 401")


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_headers_dribbled_slowly_are_cut_at_the_deadline(site_port):
    _site, port = site_port
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    t0 = time.monotonic()
    s.sendall(b"GET /health HTTP/1.1\r\n")
    closed = False
    while time.monotonic() - t0 < 3.0 and not closed:
        try:
            s.sendall(b"X")  # one header byte every 100 ms: activity, but never a complete request
        except OSError:
            closed = True
            break
        closed = closed_within(s, 0.1)
    s.close()
    assert closed and time.monotonic() - t0 < 2.0


def test_connections_beyond_the_cap_are_closed_on_arrival(site_port):
    site, port = site_port
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    deadline = time.monotonic() + 2
    while site.open_connections < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionResetError:
        pass  # aborted so fast that connect() itself saw the reset
    else:
        with extra:
            assert closed_within(extra, 2.0)
    for s in held:
        s.close()
    deadline = time.monotonic() + 2
    while site.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert site.open_connections == 0
    assert get(port, b"Bearer s3cret").startswith(b"HTTP/1.1 200")  # room again
