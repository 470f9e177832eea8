"""TLS for MLLP: TLS 1.2 minimum, optional mutual authentication (IHE ITI-19 style).

Three flavours share one :class:`TLSFiles` description:

* :func:`server_context_factory` for Twisted listeners (``listen``);
* :func:`client_creator` for the Twisted sender (``MLLPSender(tls_creator=...)``);
* :func:`client_ssl_context` (stdlib ``ssl``) for :class:`mllp.blocking.BlockingMLLPClient`.

PEM files are read with ``cryptography``; a CA file may hold a bundle of several certificates, and
a certificate file may carry its intermediate chain after the leaf.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import defer, error as terror, ssl as tssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

__all__ = [
    "TLSFiles",
    "server_context_factory",
    "client_creator",
    "client_ssl_context",
    "listen",
    "peer_common_name",
    "describe_failure",
    "validity_problem",
    "file_problems",
]


@dataclass(frozen=True)
class TLSFiles:
    """Paths of PEM files and the verification policy of one TLS endpoint."""

    cert: Optional[str] = None
    key: Optional[str] = None
    ca: Optional[str] = None
    require_client_cert: bool = False
    verify_hostname: bool = True


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _load_certs(path: str) -> list[x509.Certificate]:
    certs = x509.load_pem_x509_certificates(_read(path))
    if not certs:
        raise ValueError(f"no certificate in {path}")
    return certs


def _openssl_certs(path: str) -> list[crypto.X509]:
    return [crypto.X509.from_cryptography(c) for c in _load_certs(path)]


def _openssl_key(path: str) -> crypto.PKey:
    key = serialization.load_pem_private_key(_read(path), password=None)
    return crypto.PKey.from_cryptography_key(key)


def _trust_root(ca_path: str):
    return tssl.trustRootFromCertificates([tssl.Certificate(c) for c in _openssl_certs(ca_path)])


def _identity_kwargs(files: TLSFiles) -> dict:
    """privateKey / certificate / extraCertChain for CertificateOptions, or {} when none."""
    if not files.cert and not files.key:
        return {}
    if not (files.cert and files.key):
        raise ValueError("TLS certificate and key must be given together")
    chain = _openssl_certs(files.cert)
    kwargs = {"privateKey": _openssl_key(files.key), "certificate": chain[0]}
    if len(chain) > 1:
        kwargs["extraCertChain"] = chain[1:]
    return kwargs


def server_context_factory(files: TLSFiles) -> tssl.CertificateOptions:
    """Server options: our certificate, TLS 1.2+, and client verification against ``files.ca``.

    With a CA and ``require_client_cert`` the handshake fails without a valid client certificate;
    with a CA but no requirement, a client certificate is verified when offered.
    """
    ident = _identity_kwargs(files)
    if not ident:
        raise ValueError("a TLS listener needs a certificate and a key")
    kwargs = dict(ident, raiseMinimumTo=tssl.TLSVersion.TLSv1_2)
    if files.ca:
        if files.require_client_cert:
            # trustRoot implies verify=True and requireCertificate=True in Twisted.
            kwargs["trustRoot"] = _trust_root(files.ca)
        else:
            kwargs.update(verify=True, caCerts=_openssl_certs(files.ca), requireCertificate=False)
    elif files.require_client_cert:
        raise ValueError("require_client_cert needs a CA bundle to verify clients against")
    return tssl.CertificateOptions(**kwargs)


@implementer(IOpenSSLClientConnectionCreator)
class _ChainOnlyClientCreator:
    """Client creator that verifies the server chain but not its name (``verify_hostname=False``).

    The chain is still checked by OpenSSL (VERIFY_PEER against the configured CA), so only a
    certificate issued by the trusted CA is accepted; this is meant for partners whose
    certificates do not carry the address we connect to.
    """

    def __init__(self, options: tssl.CertificateOptions, hostname: str) -> None:
        self._ctx = options.getContext()
        self._sni: Optional[bytes] = None
        try:
            ipaddress.ip_address(hostname)
        except ValueError:
            if hostname:
                self._sni = hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol):
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        if self._sni:
            conn.set_tlsext_host_name(self._sni)
        conn.set_connect_state()
        return conn


def client_creator(files: TLSFiles, hostname: str):
    """Connection creator for the Twisted sender: verify the server, present our cert if any.

    Trust comes from ``files.ca`` (else the platform store). ``verify_hostname=False`` keeps chain
    verification and skips only the name check.
    """
    ident = _identity_kwargs(files)
    if files.verify_hostname:
        trust = _trust_root(files.ca) if files.ca else tssl.platformTrust()
        client_cert = None
        if ident:
            client_cert = tssl.PrivateCertificate.fromCertificateAndKeyPair(
                tssl.Certificate(ident["certificate"]), tssl.KeyPair(ident["privateKey"])
            )
        extra = {"raiseMinimumTo": tssl.TLSVersion.TLSv1_2}
        if "extraCertChain" in ident:
            extra["extraCertChain"] = ident["extraCertChain"]
        return tssl.optionsForClientTLS(
            hostname, trustRoot=trust, clientCertificate=client_cert, extraCertificateOptions=extra
        )
    trust = _trust_root(files.ca) if files.ca else tssl.platformTrust()
    options = tssl.CertificateOptions(trustRoot=trust, raiseMinimumTo=tssl.TLSVersion.TLSv1_2, **ident)
    return _ChainOnlyClientCreator(options, hostname)


def client_ssl_context(files: TLSFiles) -> ssl.SSLContext:
    """Stdlib client context (blocking client, CLI, benchmarks): TLS 1.2+, server verified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.ca:
        ctx.load_verify_locations(cafile=files.ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = files.verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if files.cert or files.key:
        if not (files.cert and files.key):
            raise ValueError("TLS certificate and key must be given together")
        ctx.load_cert_chain(files.cert, files.key)
    return ctx


def listen(reactor, factory, port: int, bind: str = "", tls_files: Optional[TLSFiles] = None, *, backlog: int = 128):
    """Listen with plain TCP, or TLS when ``tls_files`` is given; returns the IListeningPort."""
    if tls_files is None:
        return reactor.listenTCP(port, factory, backlog=backlog, interface=bind)
    return reactor.listenSSL(port, factory, server_context_factory(tls_files), backlog=backlog, interface=bind)


def peer_common_name(transport) -> Optional[str]:
    """Subject CN of the peer's certificate on a TLS transport, else None."""
    getter = getattr(transport, "getPeerCertificate", None)
    if getter is None:
        return None
    try:
        cert = getter()
    except Exception:  # noqa: BLE001 - no handshake yet, or not TLS
        return None
    if cert is None:
        return None
    if isinstance(cert, crypto.X509):
        cert = cert.to_cryptography()
    try:
        attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except Exception:  # noqa: BLE001
        return None
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def validity_problem(cert: x509.Certificate, now: dt.datetime | None = None) -> str | None:
    """'expired on ...' / 'not valid before ...' or None."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > now:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    return None


_TLS_HINTS = (
    ("certificate verify failed", "the server's certificate is not trusted by the configured CA bundle"),
    ("unknown ca", "the server does not trust our client certificate (unknown CA)"),
    ("certificate expired", "a certificate has expired"),
    ("bad certificate", "the server refused our client certificate"),
    ("certificate required", "the server requires a client certificate"),
    ("handshake failure", "no common TLS version or cipher (TLS 1.2 minimum)"),
    ("wrong version number", "the server does not speak TLS on this port"),
)


def describe_failure(exc: BaseException) -> str:
    """A short technical reason for a failed exchange, naming the TLS problem when there is one."""
    reasons = [exc]
    if getattr(exc, "reasons", None):  # ResponseFailed, RequestTransmissionFailed, ...
        reasons = [getattr(f, "value", f) for f in exc.reasons]
    for r in reasons:
        if isinstance(r, defer.TimeoutError) or isinstance(r, defer.CancelledError):
            return "no answer within the timeout"
        if isinstance(r, terror.ConnectionRefusedError):
            return "connection refused"
        if isinstance(r, (terror.TimeoutError, terror.TCPTimedOutError)):
            return "connection timed out"
        if isinstance(r, terror.DNSLookupError):
            return "host name not found"
        if isinstance(r, SSL.Error):
            text = str(r).lower()
            for needle, hint in _TLS_HINTS:
                if needle in text:
                    return f"TLS handshake failed: {hint}"
            return "TLS handshake failed"
        if "VerificationError" in type(r).__name__:  # service_identity: name check
            return "TLS handshake failed: the server's name does not match its certificate"
        if isinstance(r, terror.ConnectionLost) or isinstance(r, terror.ConnectionDone):
            return "connection closed before the answer"
    if isinstance(exc, defer.TimeoutError):
        return "no answer within the timeout"
    return f"connection failed ({type(reasons[0]).__name__})"


def file_problems(files: TLSFiles, now: dt.datetime | None = None) -> list[tuple[str, str]]:
    """What would make these files unusable, as ``(field, message)`` with field ``cert``, ``key``
    or ``ca``: missing or unreadable, not PEM, an expired (or not yet valid) certificate, a key
    that does not match its certificate. ``minipfi check`` reports them; ``run`` refuses them."""
    out: list[tuple[str, str]] = []
    leaf = None
    for field, path in (("cert", files.cert), ("ca", files.ca)):
        if not path:
            continue
        try:
            certs = _load_certs(path)
        except OSError as exc:
            out.append((field, f"cannot read {path}: {exc.strerror or exc}"))
            continue
        except ValueError:
            out.append((field, f"{path}: not a PEM certificate"))
            continue
        if field == "cert":
            leaf = certs[0]
        for cert in certs[:1] if field == "cert" else certs:
            bad = validity_problem(cert, now)
            if bad:
                out.append((field, f"{path}: certificate {cert.subject.rfc4514_string()} {bad}"))
    if files.key:
        try:
            key = serialization.load_pem_private_key(_read(files.key), password=None)
        except OSError as exc:
            out.append(("key", f"cannot read {files.key}: {exc.strerror or exc}"))
        except (ValueError, TypeError):
            out.append(("key", f"{files.key}: not an unencrypted PEM private key"))
        else:
            if leaf is not None and key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
                    leaf.public_key().public_bytes(serialization.Encoding.DER,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo):
                out.append(("key", f"{files.key}: the key does not match the certificate {files.cert}"))
    return out


def not_after(path: str) -> dt.datetime | None:
    """End of validity of the first certificate in a PEM file, or None when it cannot be read."""
    try:
        return _load_certs(path)[0].not_valid_after_utc
    except (OSError, ValueError):
        return None
