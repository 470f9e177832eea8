"""Throw-away PKI for TLS tests, generated with ``cryptography`` (EC P-256, fast).

``make_pki(directory)`` writes PEM files and returns their paths: a CA, a server certificate for
``localhost`` / ``127.0.0.1``, a valid client certificate, an expired client certificate (same CA),
and a "rogue" client certificate issued by another CA.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    expired_cert: Path
    expired_key: Path
    rogue_cert: Path
    rogue_key: Path
    rogue_ca: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mini-PFI tests"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca(cn: str, now: dt.datetime):
    key = _key()
    name = _name(cn)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(cn, ca_key, ca_cert, *, server: bool, not_before, not_after):
    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return path


def make_pki(directory: Path) -> PKI:
    """Generate the whole test PKI under ``directory`` (created if needed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    later = now + dt.timedelta(days=365)
    ca_key, ca = _ca("mini-PFI test CA", now)
    rogue_ca_key, rogue_ca = _ca("rogue test CA", now)
    server_key, server = _leaf("localhost", ca_key, ca, server=True, not_before=now - dt.timedelta(days=1), not_after=later)
    client_key, client = _leaf("client.test", ca_key, ca, server=False, not_before=now - dt.timedelta(days=1), not_after=later)
    expired_key, expired = _leaf(
        "expired.test", ca_key, ca, server=False,
        not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1),
    )
    rogue_key, rogue = _leaf(
        "rogue.test", rogue_ca_key, rogue_ca, server=False, not_before=now - dt.timedelta(days=1), not_after=later
    )
    return PKI(
        ca=_write_cert(d / "ca.pem", ca),
        server_cert=_write_cert(d / "server.pem", server),
        server_key=_write_key(d / "server.key", server_key),
        client_cert=_write_cert(d / "client.pem", client),
        client_key=_write_key(d / "client.key", client_key),
        expired_cert=_write_cert(d / "expired.pem", expired),
        expired_key=_write_key(d / "expired.key", expired_key),
        rogue_cert=_write_cert(d / "rogue.pem", rogue),
        rogue_key=_write_key(d / "rogue.key", rogue_key),
        rogue_ca=_write_cert(d / "rogue_ca.pem", rogue_ca),
    )


def write_pkcs12(pki: PKI, path: Path, password: bytes) -> Path:
    """The valid client identity of ``pki`` as a PKCS#12 bundle protected by ``password``."""
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(pki.client_cert.read_bytes())
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        b"client", key, cert, None, serialization.BestAvailableEncryption(password)))
    return path


def make_expiring(directory: Path, days: float, cn: str = "expiring.test") -> tuple[Path, Path]:
    """A client certificate (and its key) of a CA of its own, ending ``days`` from now."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, ca = _ca(f"{cn} CA", now)
    key, cert = _leaf(cn, ca_key, ca, server=False, not_before=now - dt.timedelta(days=1),
                      not_after=now + dt.timedelta(days=days))
    return _write_cert(d / f"{cn}.pem", cert), _write_key(d / f"{cn}.key", key)
