"""HTTPS with a client certificate, through Twisted: what the SOAP connectors (DMP) post with.

zeep runs on requests/httpx, not Twisted, and cannot send MTOM (python-zeep issues #599, #674),
so the connector builds its body itself and posts it here with ``twisted.web.client.Agent``:

* mutual TLS, TLS 1.2 minimum (the DMP's "Guide d'intégration DMP" asks for an authentication
  certificate of the organisation, presented at the TLS handshake);
* the client identity from PEM files or a PKCS#12 bundle (read by
  :func:`engine.xds.signing.load_signing_identity`, the one loader of keys and certificates), its
  password from an environment variable (never from routes.yaml);
* the server verified against a given CA bundle (the DMP's chain), name checked;
* one deadline for the whole exchange (connect, send, answer), a cap on the answer's size.

Failures are raised as :class:`HttpsFailure` with a short technical reason that names what failed
(connection refused, TLS handshake: certificate unknown / expired / bad name, timeout) and never
any content.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from twisted.internet import defer, ssl as tssl
from twisted.web.client import Agent, HTTPConnectionPool, PartialDownloadError, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from engine.xds.signing import SigningIdentity, SigningIdentityError, load_signing_identity
from mllp.tls import describe_failure, validity_problem  # noqa: F401 - shared with the MLLP connectors

MAX_ANSWER = 20 * 1024 * 1024


class HttpsFailure(Exception):
    """No usable HTTP answer (connection, TLS, timeout, oversized answer); ``str`` is technical."""


class IdentityError(ValueError):
    """A certificate, key or CA bundle cannot be used (missing, unreadable, wrong password, key of
    another certificate), or the variable naming a key password is not set."""


def password_from_env(name: str | None) -> bytes | None:
    """The password held by the environment variable ``name`` (None when no name is given)."""
    if not name:
        return None
    value = os.environ.get(name)
    if value is None:
        raise IdentityError(f"environment variable {name} (key password) is not set")
    return value.encode("utf-8")


def load_identity(cert: str | Path, key: str | Path | None = None, password: bytes | None = None) -> SigningIdentity:
    """A client identity (PEM certificate + key, or a PKCS#12 bundle) through the one loader of
    keys and certificates; every failure as :class:`IdentityError` (its text names the file)."""
    try:
        return load_signing_identity(cert, password, key)
    except SigningIdentityError as exc:
        raise IdentityError(str(exc)) from None
    except OSError as exc:
        raise IdentityError(f"cannot read {exc.filename or cert}: {exc.strerror}") from None


def load_ca(path: str | Path) -> tuple[x509.Certificate, ...]:
    try:
        certs = tuple(x509.load_pem_x509_certificates(Path(path).read_bytes()))
    except OSError as exc:
        raise IdentityError(f"cannot read CA bundle {path}: {exc.strerror}") from None
    except ValueError:
        raise IdentityError(f"{path}: not a PEM certificate bundle") from None
    if not certs:
        raise IdentityError(f"{path}: no certificate in the CA bundle")
    return certs


@implementer(IPolicyForHTTPS)
class _MutualTLSPolicy:
    def __init__(self, identity: SigningIdentity | None, ca: tuple[x509.Certificate, ...]):
        from OpenSSL import crypto

        self._trust = tssl.trustRootFromCertificates(
            [tssl.Certificate(crypto.X509.from_cryptography(c)) for c in ca])
        self._client = None
        self._extra = []
        if identity is not None:
            self._client = tssl.PrivateCertificate.fromCertificateAndKeyPair(
                tssl.Certificate(crypto.X509.from_cryptography(identity.certificate)),
                tssl.KeyPair(crypto.PKey.from_cryptography_key(identity.key)))
            self._extra = [crypto.X509.from_cryptography(c) for c in identity.chain]

    def creatorForNetloc(self, hostname: bytes, port: int):
        extra = {"raiseMinimumTo": tssl.TLSVersion.TLSv1_2}
        if self._extra:
            extra["extraCertChain"] = self._extra
        return tssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust,
                                        clientCertificate=self._client, extraCertificateOptions=extra)


@dataclass(frozen=True)
class Answer:
    code: int
    headers: dict[str, str]   # lower-case names, last value
    body: bytes


class HttpsClient:
    """POSTs over one persistent connection pool; ``post`` fires with an :class:`Answer` or fails
    with :class:`HttpsFailure`."""

    def __init__(self, reactor, *, identity: SigningIdentity | None, ca: tuple[x509.Certificate, ...],
                 connect_timeout: float = 10.0, timeout: float = 60.0, max_answer: int = MAX_ANSWER):
        self.reactor = reactor
        self.timeout = timeout
        self.max_answer = max_answer
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 2
        self.pool.retryAutomatically = False   # a POST is not idempotent: never resent silently
        self.agent = Agent(reactor, contextFactory=_MutualTLSPolicy(identity, ca),
                           connectTimeout=connect_timeout, pool=self.pool)

    @defer.inlineCallbacks
    def post(self, url: str, body: bytes, headers: dict[str, str]):
        from twisted.web.client import FileBodyProducer
        from io import BytesIO

        hdrs = Headers({k.encode("ascii"): [v.encode("ascii")] for k, v in headers.items()})
        d = self.agent.request(b"POST", url.encode("ascii"), hdrs, FileBodyProducer(BytesIO(body)))
        timed_out = []

        def on_timeout(result, timeout):
            timed_out.append(True)
            return result

        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=on_timeout)
        try:
            response = yield d
            if isinstance(response.length, int) and response.length > self.max_answer:
                response.deliverBody(_Discard())
                raise HttpsFailure(f"answer too large ({response.length} bytes)")
            rb = readBody(response)
            rb.addTimeout(self.timeout, self.reactor)
            try:
                data = yield rb
            except PartialDownloadError as exc:
                if isinstance(response.length, int):
                    raise  # fewer bytes than its Content-Length: truncated
                data = exc.response  # no length given: the close ends the body (RFC 9112, 6.3)
        except HttpsFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - every transport failure becomes one reason
            if timed_out:
                raise HttpsFailure(f"no answer within {self.timeout:g} s") from None
            raise HttpsFailure(describe_failure(exc)) from None
        if len(data) > self.max_answer:
            raise HttpsFailure(f"answer too large ({len(data)} bytes)")
        out = {}
        for name, values in response.headers.getAllRawHeaders():
            out[name.decode("latin-1").lower()] = values[-1].decode("latin-1")
        return Answer(response.code, out, data)

    def close(self):
        return self.pool.closeCachedConnections()


class _Discard:
    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass

    def makeConnection(self, transport):
        transport.stopProducing()
