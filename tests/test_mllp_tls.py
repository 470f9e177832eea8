"""MLLP over TLS: mutual authentication, refused client certificates, TLS 1.2 minimum."""
from __future__ import annotations

import socket
import ssl
import threading

import pytest

from mllp.blocking import BlockingMLLPClient
from mllp.client import ConnectionFailed, MLLPSender
from mllp.protocol import ListenerLimits, MLLPServerFactory
from mllp.tls import TLSFiles, client_creator, client_ssl_context
from tests.pki import make_pki
from tests.reactor_thread import ack_for, call, listen_tcp, make_message, stop

pytestmark = [
    # Twisted's CertificateOptions hands pyOpenSSL objects to pyOpenSSL (not our code).
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning"),
    # The TLS 1.1 test builds a deliberately obsolete client.
    pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki):
    seen = []

    def handler(payload, info):
        seen.append(info)
        return ack_for(payload)

    files = TLSFiles(cert=str(pki.server_cert), key=str(pki.server_key), ca=str(pki.ca), require_client_cert=True)
    factory = MLLPServerFactory(handler, ListenerLimits(), "tls-test")
    port_obj, port = listen_tcp(factory, tls_files=files)
    yield port, seen
    stop(port_obj, factory)


def client_files(pki, cert=None, key=None, **kw) -> TLSFiles:
    return TLSFiles(cert=str(cert) if cert else None, key=str(key) if key else None, ca=str(pki.ca), **kw)


def assert_refused(port, ctx, seen):
    before = len(seen)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with BlockingMLLPClient("127.0.0.1", port, ssl_context=ctx, timeout=5) as c:
            # With TLS 1.3 the client may finish its side of the handshake before the server's
            # verdict arrives; the refusal then shows on the first read.
            c.send(make_message("REFUSED"))
    assert len(seen) == before, "handler must not see frames from a refused client"


def test_mutual_tls_with_required_client_cert_works(pki, tls_server):
    port, seen = tls_server
    ctx = client_ssl_context(client_files(pki, pki.client_cert, pki.client_key))
    with BlockingMLLPClient("127.0.0.1", port, ssl_context=ctx, server_hostname="localhost") as c:
        msg = make_message("T1")
        assert c.send(msg) == ack_for(msg)
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
    info = seen[-1]
    assert info.tls is True and info.peer_cn == "client.test"


def test_missing_client_cert_refused(pki, tls_server):
    port, seen = tls_server
    assert_refused(port, client_ssl_context(client_files(pki)), seen)


def test_expired_client_cert_refused(pki, tls_server):
    port, seen = tls_server
    assert_refused(port, client_ssl_context(client_files(pki, pki.expired_cert, pki.expired_key)), seen)


def test_client_cert_from_wrong_ca_refused(pki, tls_server):
    port, seen = tls_server
    assert_refused(port, client_ssl_context(client_files(pki, pki.rogue_cert, pki.rogue_key)), seen)


def _tls11_client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def _local_openssl_speaks_tls11(pki) -> bool:
    """Handshake TLS 1.1 against a permissive stdlib server, to tell a real refusal from a
    client that simply cannot speak TLS 1.1 on this OpenSSL build."""
    try:
        client_ctx = _tls11_client_context()
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1
        server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        server_ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    except (ssl.SSLError, ValueError):
        return False
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(5)

    def serve():
        try:
            conn, _ = lsock.accept()
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(lsock.getsockname(), timeout=5) as raw:
            with client_ctx.wrap_socket(raw) as s:
                return s.version() == "TLSv1.1"
    except OSError:
        return False
    finally:
        t.join(5)
        lsock.close()


def test_tls11_client_refused(pki, tls_server):
    if not _local_openssl_speaks_tls11(pki):
        pytest.skip("the local OpenSSL cannot negotiate TLS 1.1 at all, so a refusal proves nothing")
    port, seen = tls_server
    ctx = _tls11_client_context()
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            ctx.wrap_socket(raw)


def _tls_sender(port, files, hostname="localhost"):
    return call(lambda: MLLPSender("127.0.0.1", port, tls_creator=client_creator(files, hostname), ack_timeout=5))


def test_twisted_sender_mutual_tls(pki, tls_server):
    port, seen = tls_server
    sender = _tls_sender(port, client_files(pki, pki.client_cert, pki.client_key))
    msg = make_message("S1")
    assert call(sender.send, msg, "S1") == ack_for(msg)
    assert seen[-1].peer_cn == "client.test"
    call(sender.close)


def test_twisted_sender_hostname_checks(pki, tls_server):
    port, seen = tls_server
    files = client_files(pki, pki.client_cert, pki.client_key)
    # Name mismatch with hostname verification: refused.
    sender = _tls_sender(port, files, hostname="wrong.example")
    with pytest.raises(ConnectionFailed):
        call(sender.send, make_message("H1"), "H1")
    # Same name without hostname verification: the chain is still checked, so accepted...
    files_nohost = client_files(pki, pki.client_cert, pki.client_key, verify_hostname=False)
    sender = _tls_sender(port, files_nohost, hostname="wrong.example")
    assert call(sender.send, make_message("H2"), "H2") == ack_for(make_message("H2"))
    call(sender.close)
    # ...and a server chain from an untrusted CA is refused.
    rogue_trust = TLSFiles(cert=str(pki.client_cert), key=str(pki.client_key), ca=str(pki.rogue_ca), verify_hostname=False)
    sender = _tls_sender(port, rogue_trust, hostname="wrong.example")
    with pytest.raises(ConnectionFailed):
        call(sender.send, make_message("H3"), "H3")
