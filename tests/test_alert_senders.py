"""Alert senders on real sockets: the webhook over HTTPS checked against its CA file, with the
bearer token; mail over STARTTLS refused when the relay's certificate is not trusted; failures
tried again with backoff and then given up, never raised."""
from __future__ import annotations

import ssl

import pytest
from twisted.internet import defer, reactor

import engine.wiring  # noqa: F401 - registers the destination types
from engine.alerting.senders import SendError, make_sender, send_with_retry
from engine.alerts.rules import Notice
from engine.config import load_config_text
from tests.mail_rig import SmtpRig
from tests.peers import WebhookReceiver
from tests.pki import make_pki
from tests.reactor_thread import call

NOTICE = Notice("ris-down", "destination_down", "ris", "started", 1_790_000_000.0, 3, 1_790_000_005.0, ("n",))


def notifier(text: str):
    return load_config_text(f"alerts:\n  notify:\n    n: {text}\n").alerts.notify["n"]


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path / "pki")


@pytest.fixture
def https_hook(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    hook = WebhookReceiver(tls=ctx)
    yield hook.port, hook.posts
    hook.close()


def test_webhook_over_https_with_its_ca_and_token(pki, https_hook, monkeypatch):
    port, got = https_hook
    monkeypatch.setenv("HOOK_TOKEN", "t0ken")
    cfg = notifier(f'{{type: webhook, url: "https://localhost:{port}/a", token_env: HOOK_TOKEN, ca_file: "{pki.ca}"}}')
    sender = call(make_sender, "n", cfg, reactor, "pfi")
    call(sender.send, NOTICE)
    assert got == [("Bearer t0ken", {"alert": "ris-down", "kind": "destination_down", "state": "started",
                                     "subject": "ris", "since": "2026-09-21T14:13:20+00:00", "value": 3,
                                     "engine": "pfi", "at": "2026-09-21T14:13:25+00:00"})]
    # another CA: the handshake fails, nothing is posted
    other = notifier(f'{{type: webhook, url: "https://localhost:{port}/a", token_env: HOOK_TOKEN, ca_file: "{pki.rogue_ca}"}}')
    with pytest.raises(Exception):
        call(call(make_sender, "n", other, reactor, "pfi").send, NOTICE)
    assert len(got) == 1


def test_webhook_answer_ended_by_close_is_sent_once():
    """A plain 200 without Content-Length (python's http.server, many small receivers): its
    body ends with the connection; that is a success, not a failure to try three times more."""
    hook = WebhookReceiver(status=200)
    try:
        cfg = notifier(f'{{type: webhook, url: "http://127.0.0.1:{hook.port}/a"}}')
        sender = call(make_sender, "n", cfg, reactor, "pfi")
        assert call(send_with_retry, sender, NOTICE, reactor, (0.01, 0.01)) is True
        assert len(hook.bodies()) == 1
    finally:
        hook.close()


def test_mail_refused_when_the_relay_is_not_trusted(pki):
    rig = SmtpRig(pki)
    try:
        base = (f"{{type: email, host: 127.0.0.1, port: {rig.port}, client_cert: \"{pki.client_cert}\", "
                f"client_key: \"{pki.client_key}\", from: pfi@chu.test, to: [it@chu.test], timeout: 5s, ca_file: ")
        with pytest.raises(ssl.SSLError):
            call(call(make_sender, "n", notifier(base + f'"{pki.rogue_ca}"}}'), reactor, "pfi").send, NOTICE)
        assert rig.received == []
        call(call(make_sender, "n", notifier(base + f'"{pki.ca}"}}'), reactor, "pfi").send, NOTICE)
        (mail,) = rig.wait_for(1)
        assert mail.rcpt_tos == ["it@chu.test"] and "ris-down" in mail.message["Subject"]
    finally:
        rig.close()


class Flaky:
    name = "flaky"

    def __init__(self, failures: int):
        self.failures, self.calls = failures, 0

    def send(self, notice):
        self.calls += 1
        if self.calls <= self.failures:
            return defer.fail(SendError("relay down"))
        return defer.succeed(None)


@pytest.mark.parametrize("failures, sent, calls", [(0, True, 1), (2, True, 3), (5, False, 3)])
def test_retries_then_gives_up_without_raising(failures, sent, calls):
    sender = Flaky(failures)
    assert call(send_with_retry, sender, NOTICE, reactor, (0.01, 0.02)) is sent
    assert sender.calls == calls


def test_unusable_notifier_fails_its_sends_only(tmp_path):
    cfg = notifier(f'{{type: webhook, url: "https://localhost:1/a", ca_file: "{tmp_path / "missing.pem"}"}}')
    sender = call(make_sender, "n", cfg, reactor, "pfi")
    with pytest.raises(SendError, match="cannot be set up"):
        call(sender.send, NOTICE)
