"""An MLLP destination's TLS failures say what failed in the handshake, and the certificate
files a routes file names are checked before use (missing, unreadable, expired, key mismatch)."""
from __future__ import annotations

import datetime as dt
import os

import pytest

from mllp.client import ConnectionFailed, MLLPSender
from mllp.protocol import ListenerLimits, MLLPServerFactory
from mllp.tls import TLSFiles, client_creator, file_problems, not_after
from tests.pki import make_pki
from tests.reactor_thread import ack_for, call, listen_tcp, make_message, stop

pytestmark = [pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(pki):
    files = TLSFiles(cert=str(pki.server_cert), key=str(pki.server_key), ca=str(pki.ca), require_client_cert=True)
    factory = MLLPServerFactory(lambda payload, info: ack_for(payload), ListenerLimits(), "tls-fail")
    port_obj, port = listen_tcp(factory, tls_files=files)
    yield port
    stop(port_obj, factory)


def _failure(port, files, hostname="localhost") -> str:
    sender = call(lambda: MLLPSender("127.0.0.1", port, tls_creator=client_creator(files, hostname), ack_timeout=5))
    try:
        with pytest.raises(ConnectionFailed) as info:
            call(sender.send, make_message("F1"), "F1")
    finally:
        call(sender.close)
    return str(info.value)


def test_unknown_server_ca_is_named(pki, server):
    files = TLSFiles(cert=str(pki.client_cert), key=str(pki.client_key), ca=str(pki.rogue_ca))
    assert _failure(server, files) == ("TLS handshake failed: the server's certificate is not "
                                       "trusted by the configured CA bundle")


def test_name_mismatch_is_named(pki, server):
    files = TLSFiles(cert=str(pki.client_cert), key=str(pki.client_key), ca=str(pki.ca))
    assert _failure(server, files, hostname="wrong.example") == (
        "TLS handshake failed: the server's name does not match its certificate")


def test_client_certificate_refused_by_the_server_is_named(pki, server):
    for cert, key in ((pki.expired_cert, pki.expired_key), (pki.rogue_cert, pki.rogue_key), (None, None)):
        files = TLSFiles(cert=str(cert) if cert else None, key=str(key) if key else None, ca=str(pki.ca))
        text = _failure(server, files)
        assert text.startswith("TLS handshake failed"), text
        assert "connection lost" not in text


def test_a_good_exchange_still_works(pki, server):
    files = TLSFiles(cert=str(pki.client_cert), key=str(pki.client_key), ca=str(pki.ca))
    sender = call(lambda: MLLPSender("127.0.0.1", server, tls_creator=client_creator(files, "localhost")))
    msg = make_message("OK1")
    assert call(sender.send, msg, "OK1") == ack_for(msg)
    call(sender.close)


def test_file_problems(pki, tmp_path):
    good = TLSFiles(cert=str(pki.client_cert), key=str(pki.client_key), ca=str(pki.ca))
    assert file_problems(good) == []
    missing = TLSFiles(cert=str(tmp_path / "nope.pem"), key=str(pki.client_key), ca=str(tmp_path / "ca.pem"))
    probs = dict(file_problems(missing))
    assert "cannot read" in probs["cert"] and "No such file" in probs["cert"] and "cannot read" in probs["ca"]
    expired = dict(file_problems(TLSFiles(cert=str(pki.expired_cert), key=str(pki.expired_key))))
    assert "expired on" in expired["cert"]
    mismatch = dict(file_problems(TLSFiles(cert=str(pki.client_cert), key=str(pki.server_key))))
    assert "does not match" in mismatch["key"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    assert "not a PEM certificate" in dict(file_problems(TLSFiles(ca=str(garbage))))["ca"]
    assert "not an unencrypted PEM private key" in dict(
        file_problems(TLSFiles(cert=str(pki.client_cert), key=str(garbage))))["key"]
    unreadable = tmp_path / "unreadable.pem"
    unreadable.write_bytes(pki.client_cert.read_bytes())
    unreadable.chmod(0)
    if os.geteuid() != 0:  # root reads anything
        assert "Permission denied" in dict(file_problems(TLSFiles(ca=str(unreadable))))["ca"]
    # days left, as the metrics see them
    end = not_after(str(pki.client_cert))
    assert end is not None and end > dt.datetime.now(dt.timezone.utc)
    assert not_after(str(tmp_path / "nope.pem")) is None
