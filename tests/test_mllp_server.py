"""MLLP listener tests over real sockets on 127.0.0.1 (reactor in a background thread)."""
from __future__ import annotations

import resource
import socket
import time

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from mllp.blocking import BlockingMLLPClient
from mllp.framing import encode_frame
from mllp.protocol import ListenerLimits, MLLPServerFactory
from tests.reactor_thread import ack_for, call, control_id_of, listen_tcp, make_message, stop, wait_for


class Server:
    """A listener on an ephemeral port with a recording handler."""

    def __init__(self, handler=None, **limits):
        self.events: list[tuple[str, dict]] = []
        self.handler = handler or (lambda payload, info: ack_for(payload))
        self.factory = MLLPServerFactory(
            lambda p, i: self.handler(p, i), ListenerLimits(**limits), "test", on_event=self._on_event
        )
        self.port_obj, self.port = listen_tcp(self.factory, backlog=1024)

    def _on_event(self, name, detail):
        self.events.append((name, detail))

    def client(self, **kw) -> BlockingMLLPClient:
        return BlockingMLLPClient("127.0.0.1", self.port, timeout=kw.pop("timeout", 5.0), **kw).connect()

    def counter(self, key):
        return call(lambda: self.factory.counters[key])

    def close(self):
        stop(self.port_obj, self.factory)


@pytest.fixture
def server_factory():
    servers = []

    def make(handler=None, **limits):
        s = Server(handler, **limits)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def assert_closed_by_peer(sock: socket.socket, timeout: float = 3.0) -> None:
    """The peer closed: recv sees EOF or a reset before ``timeout``."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return
        except socket.timeout:
            break
        if not data:
            return
    pytest.fail("connection still open")


def raw_socket(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def test_one_byte_per_write_gets_one_ack(server_factory):
    srv = server_factory()
    msg = make_message("B1")
    with raw_socket(srv.port) as s:
        for b in encode_frame(msg):
            s.sendall(bytes([b]))
        c = BlockingMLLPClient("127.0.0.1", srv.port)
        c.sock = s  # read the reply with the blocking client's framer
        assert c.recv_frame() == ack_for(msg)
    assert srv.counter("frames") == 1


def test_three_frames_one_write_replies_in_order_even_if_handler_answers_reversed(server_factory):
    pending: list[tuple[Deferred, bytes]] = []

    def handler(payload, info):
        d = Deferred()
        pending.append((d, payload))
        if len(pending) == 3:
            # Answer the third first, then the second, then the first.
            for i, (dd, p) in enumerate(reversed(pending)):
                reactor.callLater(0.01 * (i + 1), dd.callback, ack_for(p))
        return d

    srv = server_factory(handler)
    msgs = [make_message(f"R{i}") for i in range(3)]
    with srv.client() as c:
        c.send_raw(b"".join(encode_frame(m) for m in msgs))
        replies = [c.recv_frame() for _ in range(3)]
    assert [control_id_of(r.replace(b"MSA|AA|", b"")) for r in replies] == ["AR0", "AR1", "AR2"]
    assert replies == [ack_for(m) for m in msgs]


def test_garbage_before_start_block_accepted(server_factory):
    srv = server_factory()
    msg = make_message("G1")
    with srv.client() as c:
        c.send_raw(b"login: hello\r\n" + encode_frame(msg))
        assert c.recv_frame() == ack_for(msg)
        assert c.send(make_message("G2")) == ack_for(make_message("G2"))
    assert srv.counter("garbage_bytes") == 14
    names = [n for n, _ in srv.events]
    assert "garbage" in names
    detail = dict(srv.events)["garbage"]
    assert detail["count"] == 14 and b"login" not in repr(detail).encode()


def test_oversize_frame_closes_connection(server_factory):
    srv = server_factory(max_frame_size=1000)
    with srv.client() as c:
        assert c.send(make_message("O1")) == ack_for(make_message("O1"))
        c.send_raw(encode_frame(b"x" * 5000))
        assert_closed_by_peer(c.sock)
    assert srv.counter("oversize_closes") == 1
    assert wait_for(lambda: srv.factory.open_connections == 0)
    assert any(n == "oversize" for n, _ in srv.events)


def test_idle_timeout_closes(server_factory):
    srv = server_factory(idle_timeout=0.3)
    with srv.client() as c:
        assert c.send(make_message("I1"))
        t0 = time.monotonic()
        assert_closed_by_peer(c.sock)
        assert time.monotonic() - t0 >= 0.2
    assert srv.counter("idle_closes") == 1


def test_activity_defers_idle_timeout(server_factory):
    srv = server_factory(idle_timeout=0.4)
    with srv.client() as c:
        for i in range(4):
            assert c.send(make_message(f"K{i}"))
            time.sleep(0.2)
    assert srv.counter("idle_closes") == 0


def test_slow_sender_in_frame_timeout_closes(server_factory):
    srv = server_factory(frame_timeout=0.5, idle_timeout=30)
    with srv.client() as c:
        c.send_raw(b"\x0bMSH|^~\\&|SLOW")
        time.sleep(0.2)
        c.send_raw(b"|more")  # activity, but the frame is still unfinished
        t0 = time.monotonic()
        assert_closed_by_peer(c.sock)
        assert time.monotonic() - t0 < 2
    assert srv.counter("frame_timeouts") == 1
    name, detail = [e for e in srv.events if e[0] == "frame_timeout"][0]
    assert detail["size"] == len(b"MSH|^~\\&|SLOW|more")


def assert_refused(port: int) -> None:
    """A connection the listener refuses: closed at once (or reset before connect() returns)."""
    try:
        s = raw_socket(port)
    except ConnectionResetError:
        return  # aborted so fast that connect() itself saw the reset
    with s:
        assert_closed_by_peer(s)


def test_max_connections_cap_enforced(server_factory):
    srv = server_factory(max_connections=2)
    c1, c2 = srv.client(), srv.client()
    try:
        assert wait_for(lambda: srv.factory.open_connections == 2)
        assert_refused(srv.port)
        assert wait_for(lambda: srv.factory.counters["refused_over_cap"] == 1)
        assert c1.send(make_message("C1")) == ack_for(make_message("C1"))
        assert c2.send(make_message("C2")) == ack_for(make_message("C2"))
    finally:
        c1.close()
        c2.close()
    assert wait_for(lambda: srv.factory.open_connections == 0)
    with srv.client() as c4:  # room again
        assert c4.send(make_message("C4")) == ack_for(make_message("C4"))


def test_one_peer_address_cannot_take_every_slot(server_factory):
    """The per-peer cap refuses a third connection from 127.0.0.1 while the listener still has
    room for other addresses (the listener cap is 10), and counts the refusal."""
    srv = server_factory(max_connections=10, max_connections_per_peer=2)
    c1, c2 = srv.client(), srv.client()
    try:
        assert wait_for(lambda: srv.factory.open_connections == 2)
        assert_refused(srv.port)
        assert wait_for(lambda: srv.factory.counters["refused_peer_cap"] == 1)
        assert srv.factory.counters["refused_over_cap"] == 0
        assert c1.send(make_message("P1")) == ack_for(make_message("P1"))
    finally:
        c1.close()
        c2.close()
    assert wait_for(lambda: srv.factory.open_connections == 0)
    with srv.client() as c4:  # the address has room again
        assert c4.send(make_message("P4")) == ack_for(make_message("P4"))


def test_stray_bytes_between_frames_do_not_keep_a_connection_alive(server_factory):
    srv = server_factory(idle_timeout=0.4)
    with srv.client() as c:
        t0 = time.monotonic()
        try:
            for _ in range(20):  # a byte outside any frame every 100 ms: not activity
                c.send_raw(b"x")
                time.sleep(0.1)
        except OSError:
            pass  # closed under us: what the test expects
        assert_closed_by_peer(c.sock)
        assert time.monotonic() - t0 < 1.5
    assert srv.counter("idle_closes") == 1


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_thousand_idle_connections_bounded_memory(server_factory):
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 200  # both ends live in this process
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"fd hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    srv = server_factory(max_connections=n + 10, max_connections_per_peer=n + 10)
    socks = []
    rss0 = _rss_kb()
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        assert wait_for(lambda: srv.factory.open_connections == n, timeout=20)
        growth_mb = (_rss_kb() - rss0) / 1024
        assert growth_mb < 100, growth_mb
        with srv.client() as c:  # still serving
            assert c.send(make_message("M1")) == ack_for(make_message("M1"))
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: srv.factory.open_connections == 0, timeout=20)


def test_handler_exception_closes_connection_server_keeps_serving(server_factory):
    def handler(payload, info):
        if b"|BOOM|" in payload:
            raise ValueError("secret patient DOE^JOHN")
        return ack_for(payload)

    srv = server_factory(handler)
    with srv.client() as other:
        with srv.client() as bad:
            bad.send_raw(encode_frame(make_message("BOOM")))
            assert_closed_by_peer(bad.sock)
        assert other.send(make_message("OK1")) == ack_for(make_message("OK1"))
    with srv.client() as again:
        assert again.send(make_message("OK2")) == ack_for(make_message("OK2"))
    assert srv.counter("handler_errors") == 1
    [(name, detail)] = [e for e in srv.events if e[0] == "handler_error"]
    assert detail["error"] == "ValueError"
    assert "DOE" not in repr(detail)


@pytest.mark.parametrize("kind", ["deferred", "pending_reply"])
def test_handler_failure_closes_after_earlier_replies(server_factory, kind):
    """The second reply fails (a Deferred's errback, or PendingReply.fail): the first reply is
    still written, in order, then the connection closes and the failure is counted."""
    from mllp.protocol import PendingReply

    calls = []

    def handler(payload, info):
        calls.append(payload)
        if kind == "deferred":
            d = Deferred()
            ok, fail = d.callback, d.errback
        else:
            d = PendingReply()
            ok, fail = d.resolve, d.fail
        if len(calls) == 2:
            reactor.callLater(0.01, fail, RuntimeError("store down"))
        else:
            reactor.callLater(0.05, ok, ack_for(payload))
        return d

    srv = server_factory(handler)
    m1, m2 = make_message("E1"), make_message("E2")
    with srv.client() as c:
        c.send_raw(encode_frame(m1) + encode_frame(m2))
        assert c.recv_frame() == ack_for(m1)  # written first, in order
        assert_closed_by_peer(c.sock)
    assert srv.counter("handler_errors") == 1
    [(name, detail)] = [e for e in srv.events if e[0] == "handler_error"]
    assert detail["error"] == "RuntimeError"


def test_handler_none_closes_without_reply(server_factory):
    srv = server_factory(lambda p, i: None)
    with srv.client() as c:
        c.send_raw(encode_frame(make_message("N1")))
        assert_closed_by_peer(c.sock)
    assert srv.counter("handler_errors") == 0


def test_connection_info_and_set_limits(server_factory):
    infos = []

    def handler(payload, info):
        infos.append(info)
        return ack_for(payload)

    srv = server_factory(handler, max_frame_size=100_000)
    with srv.client() as c:
        c.send(make_message("CI1"))
        local = c.sock.getsockname()
    assert infos[0].peer == f"127.0.0.1:{local[1]}"
    assert infos[0].tls is False and infos[0].peer_cn is None
    call(srv.factory.set_limits, ListenerLimits(max_frame_size=50))
    with srv.client() as c:
        c.send_raw(encode_frame(make_message("CI2")))
        assert_closed_by_peer(c.sock)
    assert srv.counter("oversize_closes") == 1


# --------------------------------------------------------------------------- PendingReply


def test_pending_reply_unit_order_of_settle_and_then():
    from mllp.protocol import PendingReply

    got = []
    early = PendingReply()
    early.resolve(b"R1")  # settled before the protocol registers
    early.then(lambda v, a: got.append(("v", v, a)), lambda e, a: got.append(("e", e, a)), "s1")
    late = PendingReply()
    late.then(lambda v, a: got.append(("v", v, a)), lambda e, a: got.append(("e", e, a)), "s2")
    assert got == [("v", b"R1", "s1")]
    err = RuntimeError("x")
    late.fail(err)
    assert got[-1] == ("e", err, "s2")
    closed = PendingReply()
    closed.resolve(None)  # None = close, passed through as a value
    closed.then(lambda v, a: got.append(("v", v, a)), lambda e, a: None, "s3")
    assert got[-1] == ("v", None, "s3")


def test_pending_replies_mixed_with_deferreds_keep_receive_order(server_factory):
    """Replies resolved out of order, some through PendingReply (the engine's hot path), one
    through a Deferred, one already resolved when returned: written in receive order."""
    from mllp.protocol import PendingReply

    made = []

    def handler(payload, info):
        n = len(made)
        if n == 1:
            d = Deferred()
            made.append((d.callback, payload))
            result = d
        else:
            p = PendingReply()
            made.append((p.resolve, payload))
            result = p
            if n == 3:
                p.resolve(ack_for(payload))  # already settled when the protocol sees it
        if len(made) == 4:
            for i, (settle, pl) in enumerate(reversed(made[:3])):
                reactor.callLater(0.01 * (i + 1), settle, ack_for(pl))
        return result

    srv = server_factory(handler)
    msgs = [make_message(f"P{i}") for i in range(4)]
    with srv.client() as c:
        c.send_raw(b"".join(encode_frame(m) for m in msgs))
        replies = [c.recv_frame() for _ in range(4)]
    assert replies == [ack_for(m) for m in msgs]
