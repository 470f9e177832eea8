"""A mail rig for the MSSanté connector, on real sockets with real TLS (tests, and by hand).

* :class:`SmtpRig`: an aiosmtpd submission server that requires STARTTLS (530 before it) and a
  client certificate from the given CA (TLS ``CERT_REQUIRED``: the handshake fails without one),
  advertises DSN (RFC 3461: takes RET/ENVID on MAIL and NOTIFY/ORCPT on RCPT and records them),
  answers each RCPT through an optional ``policy(address, n) -> reply or None``, and keeps every
  mail; :meth:`SmtpRig.mails` parses them, unzips the IHE_XDM.zip and checks it (METADATA.XML
  against the XDS.b schemas, hash and size of each file).
* :class:`ImapRig`: twisted.mail's IMAP4 server over TLS on loopback, one account with an
  in-memory INBOX into which tests drop mails (:func:`make_dsn`, :func:`make_mdn` build DSNs and
  MDNs shaped as RFC 3464 / RFC 8098 say).

By hand: ``python -m tests.mail_rig /tmp/rig`` starts both with a fresh PKI and prints the ports.
"""
from __future__ import annotations

import email
import io
import ssl
import threading
import time
import zipfile
from dataclasses import dataclass
from email import policy as email_policy
from email.message import EmailMessage

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from twisted.cred import checkers, credentials, portal
from twisted.internet import protocol, reactor
from twisted.mail import imap4
from twisted.mail.interfaces import IChallengeResponse
from zope.interface import implementer

from engine.xds.xdm import check_package
from mllp.tls import TLSFiles, server_context_factory
from tests.reactor_thread import call


# -- SMTP ------------------------------------------------------------------------------------
@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    rcpt_options: list[str]
    data: bytes
    peer_cert_cn: str | None

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.data, policy=email_policy.default)

    def attachments(self) -> dict[str, bytes]:
        return {p.get_filename(): p.get_payload(decode=True) for p in self.message.iter_attachments()}

    def xdm_problems(self) -> list[str] | None:
        package = self.attachments().get("IHE_XDM.zip")
        return None if package is None else check_package(package)

    def xdm_files(self) -> dict[str, bytes]:
        z = zipfile.ZipFile(io.BytesIO(self.attachments()["IHE_XDM.zip"]))
        return {n: z.read(n) for n in z.namelist()}


class _DsnSMTP(AioSMTP):
    """aiosmtpd with the DSN parameters taken (aiosmtpd refuses unknown ones with 555)."""

    async def smtp_MAIL(self, arg):
        arg, self._dsn_mail = _strip_params(arg, ("RET", "ENVID"))
        return await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        arg, params = _strip_params(arg, ("NOTIFY", "ORCPT"))
        self._dsn_rcpt = getattr(self, "_dsn_rcpt", []) + params
        return await super().smtp_RCPT(arg)


def _strip_params(arg, names):
    if not arg:
        return arg, []
    words = arg.split(" ")
    keep, taken = [], []
    for w in words:
        if w.split("=", 1)[0].upper() in names and "=" in w:
            taken.append(w)
        else:
            keep.append(w)
    return " ".join(keep), taken


class _Handler:
    def __init__(self, rig: "SmtpRig"):
        self.rig = rig

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if server._tls_protocol is not None or not server.require_starttls:
            responses.insert(len(responses) - 1, "250-DSN")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.rig.lock:
            self.rig.rcpt_count[address] = self.rig.rcpt_count.get(address, 0) + 1
            n = self.rig.rcpt_count[address]
        reply = self.rig.policy(address, n) if self.rig.policy else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        cn = None
        peer = (session.ssl or {}).get("peercert") if isinstance(session.ssl, dict) else None
        if peer:
            for rdn in peer.get("subject", ()):
                for k, v in rdn:
                    if k == "commonName":
                        cn = v
        got = Received(envelope.mail_from, list(envelope.rcpt_tos), getattr(server, "_dsn_mail", []),
                       getattr(server, "_dsn_rcpt", []), envelope.original_content or envelope.content,
                       cn)
        server._dsn_rcpt = []
        with self.rig.lock:
            self.rig.received.append(got)
        return "250 2.0.0 Message accepted for delivery"


class SmtpRig:
    def __init__(self, pki, *, port: int = 0, client_ca=None, policy=None, implicit_tls: bool = False,
                 plain: bool = False):
        """``implicit_tls``: TLS from the first byte (port 465 style) instead of STARTTLS;
        ``plain``: no TLS at all (to show that the connector refuses to send in clear)."""
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.rcpt_count: dict[str, int] = {}
        self.policy = policy
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        ctx.load_verify_locations(client_ca or pki.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        handler = _Handler(self)
        self.controller = Controller(
            handler, hostname="127.0.0.1", port=port or _free_port(), server_hostname="localhost",
            ready_timeout=10, ssl_context=ctx if implicit_tls else None)
        starttls = not (implicit_tls or plain)
        self.controller.factory = lambda: _DsnSMTP(handler, tls_context=ctx if starttls else None,
                                                   require_starttls=starttls, hostname="localhost")
        self.controller.start()
        self.port = self.controller.port

    def wait_for(self, n: int, timeout: float = 20.0) -> list[Received]:
        end = time.time() + timeout
        while time.time() < end:
            with self.lock:
                if len(self.received) >= n:
                    return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"expected {n} mails, got {len(self.received)}")

    def close(self):
        self.controller.stop()


def _free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- IMAP ------------------------------------------------------------------------------------
@implementer(imap4.IMessage, imap4.IMessageFile)
class _Message:
    def __init__(self, raw: bytes, uid: int):
        self.raw, self.uid = raw, uid
        self.flags: set[str] = set()
        self._parsed = email.message_from_bytes(raw)

    def open(self):
        return io.BytesIO(self.raw)

    def getUID(self):
        return self.uid

    def getFlags(self):
        return sorted(self.flags)

    def getInternalDate(self):
        return "Thu, 03 Dec 2026 10:00:00 +0000"

    def getHeaders(self, negate, *names):
        wanted = {n.lower() for n in names}
        return {k.lower(): v for k, v in self._parsed.items()
                if not names or ((k.lower() in wanted) != negate)}

    def getBodyFile(self):
        head, _, body = self.raw.partition(b"\r\n\r\n")
        return io.BytesIO(body)

    def getSize(self):
        return len(self.raw)

    def isMultipart(self):
        return False

    def getSubPart(self, part):
        raise IndexError(part)


@implementer(imap4.IMailbox)
class _Mailbox:
    def __init__(self):
        self.messages: list[_Message] = []
        self.next_uid = 1
        self.listeners = []

    def getUIDValidity(self):
        return 42

    def getUIDNext(self):
        return self.next_uid

    def getUID(self, message):
        return self.messages[message - 1].uid

    def getMessageCount(self):
        return len(self.messages)

    def getRecentCount(self):
        return 0

    def getUnseenCount(self):
        return sum(1 for m in self.messages if "\\Seen" not in m.flags)

    def isWriteable(self):
        return True

    def destroy(self):
        pass

    def getHierarchicalDelimiter(self):
        return "/"

    def getFlags(self):
        return ["\\Seen", "\\Deleted", "\\Answered", "\\Flagged"]

    def requestStatus(self, names):
        return imap4.statusRequestHelper(self, names)

    def addListener(self, listener):
        self.listeners.append(listener)

    def removeListener(self, listener):
        self.listeners.remove(listener)

    def addMessage(self, message, flags=(), date=None):
        raw = message.read() if hasattr(message, "read") else message
        self.add(raw, flags)
        from twisted.internet import defer

        return defer.succeed(None)

    def add(self, raw: bytes, flags=()) -> int:
        m = _Message(raw, self.next_uid)
        m.flags.update(flags)
        self.next_uid += 1
        self.messages.append(m)
        return m.uid

    def expunge(self):
        gone = [m.uid for m in self.messages if "\\Deleted" in m.flags]
        self.messages = [m for m in self.messages if "\\Deleted" not in m.flags]
        return gone

    def _select(self, messages, uid):
        if uid:
            messages.last = self.next_uid - 1 if self.messages else 1
            by_uid = {m.uid: (i, m) for i, m in enumerate(self.messages, start=1)}
            return [by_uid[u] for u in messages if u in by_uid]
        messages.last = len(self.messages) or 1
        return [(i, self.messages[i - 1]) for i in messages if 0 < i <= len(self.messages)]

    def fetch(self, messages, uid):
        return self._select(messages, uid)

    def store(self, messages, flags, mode, uid):
        out = {}
        for seq, m in self._select(messages, uid):
            if mode == 0:
                m.flags = set(flags)
            elif mode > 0:
                m.flags.update(flags)
            else:
                m.flags.difference_update(flags)
            out[seq] = m.getFlags()
        return out


class _Account(imap4.MemoryAccount):
    def __init__(self, name, inbox):
        super().__init__(name)
        self.mailboxes["INBOX"] = inbox

    def _emptyMailbox(self, name, id):
        return _Mailbox()


@implementer(portal.IRealm)
class _Realm:
    def __init__(self, account):
        self.account = account

    def requestAvatar(self, avatar_id, mind, *interfaces):
        return imap4.IAccount, self.account, lambda: None


class ICertificateSubject(credentials.ICredentials):
    """SASL EXTERNAL (RFC 4422 appendix A): the identity is the TLS client certificate's."""


@implementer(IChallengeResponse, ICertificateSubject)
class _External:
    def __init__(self, transport):
        self.transport = transport

    def getChallenge(self):
        return b""

    def setResponse(self, response):
        self.authzid = response

    def moreChallenges(self):
        return False


@implementer(checkers.ICredentialsChecker)
class _CertificateChecker:
    """Accepts a client whose certificate (verified by the TLS layer against the CA) has the
    expected common name."""

    credentialInterfaces = (ICertificateSubject,)

    def __init__(self, user: str, common_name: str):
        self.user, self.common_name = user, common_name

    def requestAvatarId(self, creds):
        from twisted.cred.error import UnauthorizedLogin
        from twisted.internet import defer

        cert = creds.transport.getPeerCertificate()
        from cryptography.x509.oid import NameOID

        names = cert.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME) if cert else []
        cn = names[0].value if names else None
        if cn != self.common_name:
            return defer.fail(UnauthorizedLogin("no acceptable client certificate"))
        return defer.succeed(self.user.encode())


class _ServerFactory(protocol.Factory):
    def __init__(self, portal_, external: bool, starttls_options=None):
        self.portal, self.external, self.starttls_options = portal_, external, starttls_options

    def buildProtocol(self, addr):
        p = imap4.IMAP4Server(contextFactory=self.starttls_options)
        p.portal = self.portal
        p.factory = self
        if self.external:
            p.challengers = {**p.challengers, b"EXTERNAL": lambda: _External(p.transport)}
        return p


class ImapRig:
    """IMAP4 over TLS (implicit, port 993 style) on 127.0.0.1 with one user; ``inbox`` holds
    the mails (touch it only through :meth:`drop` and :meth:`flags`, which run in the reactor)."""

    def __init__(self, pki, user: str, password: str, *, port: int = 0, client_cn: str | None = None,
                 starttls: bool = False):
        """``client_cn``: also accept SASL EXTERNAL from a client certificate (issued by the
        PKI's CA) with this common name; ``starttls``: plain port 143 style, STARTTLS required
        before LOGIN (Twisted refuses LOGIN before it)."""
        self.inbox = _Mailbox()
        checker = checkers.InMemoryUsernamePasswordDatabaseDontUse(**{user: password.encode()})
        found = [checker] + ([_CertificateChecker(user, client_cn)] if client_cn else [])
        self.portal = portal.Portal(_Realm(_Account(user, self.inbox)), found)
        opts = server_context_factory(TLSFiles(cert=str(pki.server_cert), key=str(pki.server_key),
                                               ca=str(pki.ca) if client_cn else None))
        if starttls:
            self.listening = call(reactor.listenTCP, port, _ServerFactory(self.portal, bool(client_cn), opts),
                                  interface="127.0.0.1")
        else:
            self.listening = call(reactor.listenSSL, port, _ServerFactory(self.portal, bool(client_cn)), opts,
                                  interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def drop(self, raw: bytes) -> int:
        return call(self.inbox.add, raw)

    def flags(self) -> list[list[str]]:
        return call(lambda: [m.getFlags() for m in self.inbox.messages])

    def close(self):
        call(self.listening.stopListening)


def make_dsn(original_id: str, recipient: str, *, action: str = "delivered", status: str = "2.0.0",
             diagnostic: str | None = None, envid: bool = True, receipt_id: str | None = None,
             to: str = "bal@pfi.test.mssante.fr") -> bytes:
    """A DSN (RFC 3464) about the mail ``original_id``: a text part, the message/delivery-status
    part (ENVID in Original-Envelope-Id when ``envid``) and the original headers."""
    boundary = "dsn-boundary-1"
    per_message = "Reporting-MTA: dns; mx.test.mssante.fr\r\n"
    if envid:
        per_message += f"Original-Envelope-Id: {original_id.strip('<>')}\r\n"
    per_rcpt = (f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n"
                + (f"Diagnostic-Code: smtp; {diagnostic}\r\n" if diagnostic else ""))
    return (f"From: MAILER-DAEMON@mx.test.mssante.fr\r\nTo: {to}\r\n"
            f"Subject: Delivery Status Notification\r\n"
            f"Message-ID: {receipt_id or '<dsn-' + original_id.strip('<>') + '>'}\r\n"
            "MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nThis is a delivery status notification.\r\n"
            f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n{per_message}\r\n{per_rcpt}\r\n"
            f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: {original_id}\r\n"
            f"Subject: XDM/1.0/DDM\r\n\r\n--{boundary}--\r\n").encode("utf-8")


def make_mdn(original_id: str, recipient: str, *, disposition: str =
             "manual-action/MDN-sent-manually; displayed", receipt_id: str | None = None,
             to: str = "bal@pfi.test.mssante.fr") -> bytes:
    """An MDN (RFC 8098; the CI-SIS LPS profile's struct-msg-mdn.md fields)."""
    boundary = "mdn-boundary-1"
    return (f"From: {recipient}\r\nTo: {to}\r\nSubject: XDM/1.0/DDM+\r\n"
            f"Message-ID: {receipt_id or '<mdn-' + original_id.strip('<>') + '>'}\r\n"
            "MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=disposition-notification; boundary="{boundary}"\r\n\r\n'
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nLe message a été lu.\r\n"
            f"--{boundary}\r\nContent-Type: message/disposition-notification\r\n\r\n"
            f"Original-Recipient: rfc822;{recipient}\r\nFinal-Recipient: rfc822; {recipient}\r\n"
            f"Original-Message-ID: {original_id}\r\nDisposition: {disposition}\r\n\r\n"
            f"--{boundary}--\r\n").encode("utf-8")


if __name__ == "__main__":  # pragma: no cover - the rig by hand
    import sys
    from pathlib import Path

    from tests.pki import make_pki

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mss-rig")
    pki = make_pki(folder)
    smtp = SmtpRig(pki)
    imap = ImapRig(pki, "bal@pfi.test.mssante.fr", "secret")
    print(f"SMTP (STARTTLS, client certificate) 127.0.0.1:{smtp.port}; IMAP (TLS) 127.0.0.1:{imap.port}")
    print(f"CA {pki.ca}; client cert {pki.client_cert} key {pki.client_key}; IMAP password 'secret'")
    try:
        while True:
            time.sleep(5)
            print(f"{len(smtp.received)} mail(s) received")
    except KeyboardInterrupt:
        smtp.close()
        imap.close()
