"""MSSanté connector: each report to its recipients by secure health mail, receipts read back.

One queue entry per mail (:mod:`engine.connectors.mssante_mail`: ``ps-1``, ``ps-2``, ...,
``patient``), built at delivery time from the canonical submission the report channel stored,
and handed to the organisation's MSSanté SMTP server:

* SMTP submission with STARTTLS required (or implicit TLS), TLS 1.2 minimum, the organisation's
  client certificate (PEM or PKCS#12, password from an environment variable), the server's
  certificate checked against a CA bundle and its name. ``smtplib`` in a thread (Twisted's SMTP
  client cannot pass the RFC 3461 parameters): the reactor never waits on the server.
* When the server offers DSN (RFC 3461): ``MAIL FROM ... RET=HDRS ENVID=<the mail's id>`` and
  ``RCPT TO ... NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;<address>`` when the report asked for
  a delivery receipt (ACK_RECEPTION), ``NOTIFY=FAILURE,DELAY`` otherwise.
* Outcomes: 250 after DATA = accepted (the mail's Message-ID is stored as the entry's response,
  to match receipts later); a 5xx reply (MAIL, RCPT or DATA) = content error for this target, with
  the code in the SMTPERRORCODE table and a ZAM^Z02 « N » when receipts were asked; a 4xx reply =
  refused, retried with backoff; no usable answer (connection refused, TLS failure, timeout) =
  transient, retried with backoff. Every failed attempt carries its ZAM^Z02 « N » (code 101/111
  when the server could not be reached): delivery sends it only when the outcome is final (a
  content error, or the last attempt). When the server does not offer DSN, no delivery receipt
  will ever come: the 250 itself gives the ZAM^Z02 « Y ». Sends run in the connector's own
  thread pool, one SMTP session per mail.

Receipts: :meth:`MssanteConnector.poll_receipts` reads the application mailbox over IMAP (TLS,
client certificate, password from the environment or SASL EXTERNAL), turns every DSN / MDN into
:class:`engine.connectors.mss_receipts.Receipt` and hands each to the delivery worker, which
records it and queues its ZAM in one transaction; only then is the mail flagged ``\\Seen``.
Mails that are not receipts are left unread for a person to see.

No patient data in details or logs: addresses, bodies and server texts (which may name the
recipient) never leave the mail and the stored response.
"""
from __future__ import annotations

import datetime as dt
import imaplib
import secrets
import smtplib
import socket
import ssl
import tempfile
import uuid
from typing import Annotated, Any, Callable, Literal

from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, Field, field_validator
from twisted.internet import defer, threads

from engine import logs
from engine.config import ConfigPath, DestinationBase, Duration, RemotePort
from engine.connectors.base import (
    ACCEPTED, ERROR, REJECTED, TRANSIENT, BusinessAck, Delivery, Outcome, StoredView,
)
from engine.connectors.https import (
    IdentityError, load_ca, load_identity, password_from_env, validity_problem,
)
from engine.connectors.mss_receipts import Receipt, parse_receipt
from engine.connectors.mssante_mail import DEFAULT_BODIES, MailSettings, build_mail, recipient_for, recipients
from engine.connectors.smtp_codes import smtp_error
from engine.xds.settings import XdsSettings
from engine.xds.xdm import XdmSender

log = logs.get("engine.connectors.mssante")

#: wsa:To is no part of an XDM package: the XDS settings get this placeholder
XDM_ENDPOINT = "urn:ihe:iti:xdm:2008"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MssIdentityConfig(_Model):
    """The organisation's certificate: PEM ``cert`` + ``key``, or a PKCS#12 ``cert`` (.p12/.pfx);
    the key's password in the environment variable ``password_env``."""

    cert: ConfigPath
    key: ConfigPath | None = None
    password_env: str | None = None


class MssSmtpConfig(_Model):
    host: Annotated[str, Field(min_length=1)]
    port: RemotePort = 587
    security: Literal["starttls", "tls"] = "starttls"
    connect_timeout: Duration = 10.0
    timeout: Duration = 60.0


class MssImapConfig(_Model):
    host: Annotated[str, Field(min_length=1)]
    port: RemotePort = 993
    security: Literal["tls", "starttls"] = "tls"
    user: str | None = None
    #: the password's environment variable; none: SASL EXTERNAL with the client certificate
    password_env: str | None = None
    folder: str = "INBOX"
    poll_interval: Duration = 60.0
    timeout: Duration = 30.0


class MssXdmConfig(_Model):
    """IHE_XDM.zip: who README.TXT names, and the XDS settings of METADATA.XML (the ``xds``
    block of the DMP destination, without its endpoint)."""

    organisation: str
    application: str = "mini-PFI"
    xds: XdsSettings

    @field_validator("xds", mode="before")
    @classmethod
    def _xdm_defaults(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = {"endpoint": XDM_ENDPOINT, "sign_submission": False, **value}
        return value


class MssanteDestinationConfig(DestinationBase):
    type: Literal["mssante"]
    #: the application mailbox (BAL applicative): FROM, and where receipts come back
    mailbox: Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")]
    smtp: MssSmtpConfig
    identity: MssIdentityConfig | None = None
    ca: ConfigPath
    verify_hostname: bool = True
    imap: MssImapConfig | None = None
    xdm: MssXdmConfig | None = None
    #: X-MSS-NIL, the software's reference number (MSSanté client rules §3.8.3)
    software_id: str | None = None
    subject: str = "XDM/1.0/DDM"
    #: default bodies by action (initial, replace, delete) when the report gives none
    bodies: dict[Literal["initial", "replace", "delete"], str] = {}


def mssante_targets(cfg: MssanteDestinationConfig, stored: StoredView) -> tuple[str, ...]:
    """One target per mail the report asks for; none for a message without a submission."""
    if stored.submission is None:
        return ()
    return tuple(r.target for r in recipients(stored.submission))


def check_files(cfg: MssanteDestinationConfig) -> list[tuple[str, str]]:
    """Unusable certificate files, for ``minipfi check`` (and refused by ``run``)."""
    out = []
    try:
        for cert in load_ca(cfg.ca):
            if problem := validity_problem(cert):
                out.append(("ca", f"a CA certificate is {problem}"))
    except IdentityError as exc:
        out.append(("ca", str(exc)))
    if cfg.identity is not None:
        try:
            ident = load_identity(cfg.identity.cert, cfg.identity.key,
                                  password_from_env(cfg.identity.password_env))
            if problem := validity_problem(ident.certificate):
                out.append(("identity.cert", f"the client certificate is {problem}"))
        except IdentityError as exc:
            out.append(("identity", str(exc)))
    if cfg.imap is not None and cfg.imap.password_env:
        try:
            password_from_env(cfg.imap.password_env)
        except IdentityError as exc:
            out.append(("imap.password_env", str(exc).replace("(key password)", "(IMAP password)")))
    return out


def _xtext(value: str) -> str:
    """RFC 3461 §4 xtext: ``+`` and ``=``, controls and spaces as ``+XX``."""
    return "".join(f"+{ord(c):02X}" if c in "+=" or ord(c) <= 32 or ord(c) > 126 else c for c in value)


def _tls_hint(exc: BaseException) -> str:
    text = str(exc).lower()
    for needle, hint in (
            ("certificate required", "the server requires a client certificate"),
            ("certificate verify failed", "the server's certificate is not trusted by the CA bundle"),
            ("unknown ca", "the server does not trust our client certificate (unknown CA)"),
            ("bad certificate", "the server refused our client certificate"),
            ("certificate expired", "a certificate has expired"),
            ("wrong version number", "the server does not speak TLS on this port"),
            ("handshake failure", "no common TLS version or cipher (TLS 1.2 minimum)")):
        if needle in text:
            return f"TLS failed: {hint}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS failed: the server's certificate or name does not check"
    return "TLS failed"


class MssanteConnector:
    kind = "mssante"
    needs_stored = True

    def __init__(self, cfg: MssanteDestinationConfig, reactor):
        self.cfg = cfg
        self.reactor = reactor
        self.timeout = float(cfg.smtp.connect_timeout) + float(cfg.smtp.timeout)
        self.domain = cfg.mailbox.rsplit("@", 1)[1]
        self.settings = MailSettings(
            from_address=cfg.mailbox, software_id=cfg.software_id, subject=cfg.subject,
            bodies={**DEFAULT_BODIES, **cfg.bodies},
            xds=cfg.xdm.xds if cfg.xdm else None,
            xdm_sender=XdmSender(cfg.xdm.organisation, cfg.xdm.application) if cfg.xdm else XdmSender(""))
        self._ctx = self._build_context()
        self._pool = None
        self.receipt_poll_interval = float(cfg.imap.poll_interval) if cfg.imap else None
        self._not_receipts: set[tuple[str, bytes]] = set()

    # -- TLS -------------------------------------------------------------------------------------
    def _build_context(self) -> ssl.SSLContext:
        """One client context for every connection (SMTP and IMAP): TLS 1.2+, the CA bundle, the
        server's name checked, the organisation's certificate. ``load_cert_chain`` reads files
        only, so a PKCS#12 identity is rewritten for the moment of loading into a private
        temporary PEM whose key is encrypted with a random password held in memory."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.cfg.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.cfg.verify_hostname
        ident = self.cfg.identity
        if ident is None:
            return ctx
        loaded = load_identity(ident.cert, ident.key, password_from_env(ident.password_env))
        secret = secrets.token_bytes(32)
        with tempfile.NamedTemporaryFile(prefix="mss-identity-", suffix=".pem") as tmp:
            tmp.write(loaded.key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.BestAvailableEncryption(secret)))
            for cert in (loaded.certificate, *loaded.chain):
                tmp.write(cert.public_bytes(serialization.Encoding.PEM))
            tmp.flush()
            ctx.load_cert_chain(tmp.name, password=secret)
        return ctx

    def ssl_context(self) -> ssl.SSLContext:
        return self._ctx

    # -- sending ---------------------------------------------------------------------------------
    def send(self, delivery: Delivery):
        """In the connector's own thread pool (as many threads as the queue's concurrency): a
        slow SMTP server never starves the reactor's pool, which the store's calls use."""
        if self._pool is None:
            from twisted.python.threadpool import ThreadPool

            self._pool = ThreadPool(minthreads=0, maxthreads=max(1, self.cfg.queue.concurrency),
                                    name="mssante-smtp")
            self._pool.start()
        return threads.deferToThreadPool(self.reactor, self._pool, self.send_blocking, delivery)

    def send_blocking(self, delivery: Delivery) -> Outcome:
        sub = delivery.stored.submission
        if sub is None:
            return Outcome(ERROR, None, "no canonical submission stored for this message")
        recipient = recipient_for(sub, delivery.target)
        if recipient is None:
            return Outcome(ERROR, None, f"target {delivery.target!r} names no recipient of this report")
        message_id = f"<{uuid.uuid4().hex}.{delivery.entry_id}@{self.domain}>"
        try:
            mail = build_mail(sub, recipient, self.settings, message_id=message_id,
                              now=dt.datetime.now(dt.timezone.utc))
        except ValueError as exc:   # XDM metadata: the text names no patient data
            return Outcome(ERROR, None, f"mail not built: {logs.error_text(exc)}")
        return self._submit(mail)

    def _connect(self) -> smtplib.SMTP:
        c = self.cfg.smtp
        if c.security == "tls":
            smtp = smtplib.SMTP_SSL(c.host, c.port, timeout=float(c.connect_timeout),
                                    context=self.ssl_context())
        else:
            smtp = smtplib.SMTP(c.host, c.port, timeout=float(c.connect_timeout))
            smtp.ehlo(self.domain)
            if not smtp.has_extn("starttls"):
                smtp.close()
                raise _Refused(REJECTED, "the server does not offer STARTTLS: nothing is sent in clear")
            smtp.starttls(context=self.ssl_context())
        smtp.sock.settimeout(float(c.timeout))
        try:
            code, _ = smtp.ehlo(self.domain)
        except (smtplib.SMTPServerDisconnected, ConnectionResetError):
            # TLS 1.3: a server that refuses the client certificate closes the connection after
            # the handshake, at the first command
            smtp.close()
            why = ("it did not accept our client certificate" if self.cfg.identity
                   else "no client certificate configured: the server requires one")
            raise _Refused(TRANSIENT, f"TLS failed: the server closed the connection after the "
                                      f"handshake ({why})") from None
        if code != 250:
            smtp.close()
            raise _Refused(TRANSIENT, f"EHLO refused after TLS (SMTP {code})")
        return smtp

    def _submit(self, mail) -> Outcome:
        try:
            smtp = self._connect()
        except _Refused as r:
            return _failed(r.kind, r.detail, "111", mail)
        except ssl.SSLError as exc:
            return _failed(TRANSIENT, _tls_hint(exc), "111", mail)
        except smtplib.SMTPResponseException as exc:     # e.g. 421 in the greeting
            return _failed(TRANSIENT, f"SMTP {exc.smtp_code} on connection", str(exc.smtp_code), mail)
        except (ConnectionRefusedError, socket.gaierror) as exc:
            return _failed(TRANSIENT, "connection refused" if isinstance(exc, ConnectionRefusedError)
                           else "host name not found", "111", mail)
        except (OSError, smtplib.SMTPException) as exc:
            return _failed(TRANSIENT, _transport_detail(exc), "101", mail)
        step = "MAIL"
        try:
            dsn = smtp.has_extn("dsn")
            mail_opts = ["RET=HDRS", f"ENVID={_xtext(mail.message_id.strip('<>'))}"] if dsn else []
            rcpt_opts = [f"NOTIFY={mail.notify}", f"ORCPT=rfc822;{_xtext(mail.rcpt)}"] if dsn else []
            for step, call in (("MAIL", lambda: smtp.mail(mail.mail_from, mail_opts)),
                               ("RCPT", lambda: smtp.rcpt(mail.rcpt, rcpt_opts)),
                               ("DATA", lambda: smtp.data(mail.as_bytes()))):
                code, _reply = call()     # the reply text may name the recipient: never kept
                if not 200 <= code < 400:
                    return _refusal(step, code, mail)
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass
        except smtplib.SMTPResponseException as exc:     # DATA refused before the content
            return _refusal(step, exc.smtp_code, mail)
        except ssl.SSLError as exc:
            return _failed(TRANSIENT, _tls_hint(exc), "442", mail)
        except (OSError, smtplib.SMTPException) as exc:
            return _failed(TRANSIENT, _transport_detail(exc), "442", mail)
        finally:
            try:
                smtp.close()
            except OSError:
                pass
        response = f"Message-ID: {mail.message_id}\r\nSMTP: {code} DSN={'yes' if dsn else 'no'}\r\n"
        acks = () if dsn else (BusinessAck("Z02", True, None, mail.rcpt),)
        return Outcome(ACCEPTED, response.encode("ascii"),
                       f"accepted by the MSSanté server ({len(mail.attachments)} attachment(s))",
                       business_acks=acks)

    # -- receipts --------------------------------------------------------------------------------
    def poll_receipts(self, handle: Callable[[Receipt], object]) -> dict[str, int]:
        """One pass over the unread mails of the receipts folder (blocking: call it in a thread).
        ``handle`` records a receipt durably (it raises when it could not); the mail is flagged
        ``\\Seen`` only after every receipt in it was handled."""
        c = self.cfg.imap
        counts = {"receipts": 0, "other": 0}
        if c.security == "tls":
            im = imaplib.IMAP4_SSL(c.host, c.port, ssl_context=self.ssl_context(), timeout=float(c.timeout))
        else:
            im = imaplib.IMAP4(c.host, c.port, timeout=float(c.timeout))
            im.starttls(self.ssl_context())
        try:
            if c.password_env:
                im.login(c.user or self.cfg.mailbox, password_from_env(c.password_env).decode("utf-8"))
            else:
                im.authenticate("EXTERNAL", lambda _challenge: b"")
            typ, _ = im.select(c.folder)
            if typ != "OK":
                raise imaplib.IMAP4.error(f"cannot select folder {c.folder}")
            validity = (im.response("UIDVALIDITY")[1] or [b""])[0] or b""
            validity = validity.decode("ascii", "replace") if isinstance(validity, bytes) else str(validity)
            typ, data = im.uid("SEARCH", None, "UNSEEN")
            for uid in (data[0] or b"").split():
                if (validity, uid) in self._not_receipts:
                    continue
                typ, parts = im.uid("FETCH", uid, "(BODY.PEEK[])")
                raw = next((p[1] for p in parts if isinstance(p, tuple)), None)
                found = parse_receipt(raw) if raw else []
                if not found:
                    self._not_receipts.add((validity, uid))
                    counts["other"] += 1
                    continue
                for receipt in found:
                    handle(receipt)
                counts["receipts"] += len(found)
                im.uid("STORE", uid, "+FLAGS", "(\\Seen)")
        finally:
            try:
                im.logout()
            except (OSError, imaplib.IMAP4.error):
                pass
        return counts

    def close(self):
        pool, self._pool = self._pool, None
        if pool is not None:
            return threads.deferToThread(pool.stop)   # waits for the sends in progress
        return defer.succeed(None)


def _failed(kind: str, detail: str, code: str, mail) -> Outcome:
    """A failed attempt, with its SMTPERRORCODE and the ZAM^Z02 « N » it gives rise to if it is
    final (a content error, or the last attempt of a retried one: delivery ignores it on a retry)."""
    error = smtp_error(code)
    return Outcome(kind, None, detail, error=error,
                   business_acks=(BusinessAck("Z02", False, error, mail.rcpt),))


def _refusal(step: str, code: int, mail) -> Outcome:
    """The server's reply to MAIL, RCPT or DATA: 4xx refused (retry later), 5xx content error."""
    if 400 <= code < 500:
        return _failed(REJECTED, f"SMTP {code} on {step}: retry later", str(code), mail)
    return _failed(ERROR, f"SMTP {code} on {step}: refused", str(code), mail)


class _Refused(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _transport_detail(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "no answer within the timeout"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return "the server closed the connection"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    return f"connection failed ({type(exc).__name__})"

