"""Sending alert notices: mail by ``smtplib`` in a thread (STARTTLS, TLS 1.2+, optional client
certificate, password from the environment), webhook by a Twisted HTTP(S) POST of JSON with a
bearer token from the environment. A failed send is tried again a few times with a growing
delay, then logged; it never raises into the engine."""
from __future__ import annotations

import json
import os
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from twisted.internet import defer, task, threads

from engine import logs
from engine.alerts.rules import Notice
from engine.alerts.texts import as_json, mail_body, mail_subject
from engine.connectors.https import HttpsClient, load_ca
from mllp.tls import TLSFiles, client_ssl_context

log = logs.get("engine.alerting")

RETRY_DELAYS_S = (1.0, 4.0, 15.0)  # after the first failure, the second, the third: then give up


class SendError(Exception):
    pass


class EmailSender:
    def __init__(self, name: str, cfg, reactor, engine_name: str):
        self.name, self.cfg, self.reactor, self.engine_name = name, cfg, reactor, engine_name

    def send(self, notice: Notice) -> defer.Deferred:
        return threads.deferToThread(self._send_blocking, self._message(notice))

    def _message(self, notice: Notice) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.cfg.sender
        msg["To"] = ", ".join(self.cfg.to)
        msg["Subject"] = mail_subject(notice, self.engine_name)
        msg["Date"] = formatdate(notice.at, usegmt=True)
        msg["Message-ID"] = make_msgid(domain="minipfi.invalid")
        msg.set_content(mail_body(notice, self.engine_name))
        return msg

    def _send_blocking(self, msg: EmailMessage) -> None:
        cfg = self.cfg
        password = None
        if cfg.user:
            password = os.environ.get(cfg.password_env or "")
            if password is None:
                raise SendError(f"environment variable {cfg.password_env} (SMTP password) is not set")
        with smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout) as smtp:
            smtp.ehlo()
            if cfg.starttls:
                ctx = client_ssl_context(TLSFiles(cert=cfg.client_cert, key=cfg.client_key, ca=cfg.ca_file))
                smtp.starttls(context=ctx)
                smtp.ehlo()
            if cfg.user:
                smtp.login(cfg.user, password)
            smtp.send_message(msg)


class WebhookSender:
    def __init__(self, name: str, cfg, reactor, engine_name: str):
        self.name, self.cfg, self.reactor, self.engine_name = name, cfg, reactor, engine_name
        cas = ()
        if cfg.url.startswith("https://"):
            ca = cfg.ca_file or ssl.get_default_verify_paths().cafile
            if not ca:
                raise SendError("no CA bundle to check the webhook's certificate: set ca_file")
            cas = load_ca(ca)
        self.client = HttpsClient(reactor, identity=None, ca=cas, connect_timeout=cfg.timeout,
                                  timeout=cfg.timeout, max_answer=64 * 1024)

    @defer.inlineCallbacks
    def send(self, notice: Notice):
        headers = {"Content-Type": "application/json"}
        if self.cfg.token_env:
            token = os.environ.get(self.cfg.token_env)
            if token is None:
                raise SendError(f"environment variable {self.cfg.token_env} (webhook token) is not set")
            headers["Authorization"] = f"Bearer {token}"
        body = json.dumps(as_json(notice, self.engine_name)).encode()
        answer = yield self.client.post(self.cfg.url, body, headers)
        if not 200 <= answer.code < 300:
            raise SendError(f"webhook answered HTTP {answer.code}")

    def close(self):
        return self.client.close()


class UnusableSender:
    """A notifier that could not be set up (its CA file unreadable, ...): every send fails with
    the reason, logged like any other failure; the engine runs on."""

    def __init__(self, name: str, cfg, reason: str):
        self.name, self.cfg, self.reason = name, cfg, reason

    def send(self, notice: Notice) -> defer.Deferred:
        return defer.fail(SendError(self.reason))


SENDERS = {"email": EmailSender, "webhook": WebhookSender}


def make_sender(name: str, cfg, reactor, engine_name: str):
    try:
        return SENDERS[cfg.type](name, cfg, reactor, engine_name)
    except Exception as exc:  # noqa: BLE001 - an alert notifier must not stop the engine
        reason = f"notifier cannot be set up: {logs.error_text(exc, 200)}"
        log.error("alerts.notifier_unusable", notifier=name, error=reason)
        return UnusableSender(name, cfg, reason)


@defer.inlineCallbacks
def send_with_retry(sender, notice: Notice, reactor, delays=RETRY_DELAYS_S):
    """True once sent, False after the last try failed (logged, never raised)."""
    for attempt in range(len(delays) + 1):
        try:
            yield sender.send(notice)
            log.info("alert.sent", notifier=sender.name, rule=notice.rule, subject=notice.subject,
                     state=notice.state, attempt=attempt + 1)
            return True
        except Exception as exc:  # noqa: BLE001 - a relay down must not stop the engine
            last = attempt == len(delays)
            log.warning("alert.send_failed", notifier=sender.name, rule=notice.rule, subject=notice.subject,
                        state=notice.state, attempt=attempt + 1, error=logs.error_text(exc, 200),
                        retry_in_s=None if last else delays[attempt])
            if last:
                return False
            yield task.deferLater(reactor, delays[attempt], lambda: None)
    return False
