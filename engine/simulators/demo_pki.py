"""A throw-away PKI for demonstrations of the DMP simulator, generated with ``cryptography``.

``make_demo_pki(directory)`` writes, in PEM: a CA; a server certificate for ``localhost`` and
``127.0.0.1`` (the simulator); a client certificate (the engine's mutual-TLS identity); a VIHF
signing certificate (RSA 2048, KeyUsage digitalSignature + nonRepudiation: the organisation's
"certificat de cachet" of the CI-SIS VIHF mapping, whose subject DN becomes the Issuer).
Nothing here is fit for production: the keys are unencrypted and the CA signs anything.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class DemoPKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    signer_cert: Path
    signer_key: Path


def _name(cn: str, ou: str = "") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "FR"),
             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mini-PFI demo")]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _usage(*, sign_certs: bool = False, non_repudiation: bool = False, key_encipherment: bool = False):
    return x509.KeyUsage(
        digital_signature=True, content_commitment=non_repudiation, key_encipherment=key_encipherment,
        data_encipherment=False, key_agreement=False, key_cert_sign=sign_certs, crl_sign=sign_certs,
        encipher_only=False, decipher_only=False,
    )


def make_ca(cn: str = "mini-PFI demo CA", days: int = 3650):
    """(key, certificate) of a self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(sign_certs=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca_key, ca_cert, cn: str, *, kind: str, ou: str = "", days: int = 365):
    """(key, certificate) issued by the CA; ``kind`` is "server", "client" or "signer"."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "signer" \
        else ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_name(cn, ou)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if kind == "signer":
        builder = builder.add_extension(_usage(non_repudiation=True), critical=True)
    else:
        eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        builder = builder.add_extension(_usage(), critical=True)
    if kind == "server":
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_key(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def make_demo_pki(directory) -> DemoPKI:
    """Write the demo PKI under ``directory`` (created if needed) and return the paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca = make_ca()
    server_key, server = issue(ca_key, ca, "localhost", kind="server")
    client_key, client = issue(ca_key, ca, "mini-PFI engine", kind="client")
    signer_key, signer = issue(ca_key, ca, "mini-PFI DMP SIGN", kind="signer", ou="DEMO-STRUCTURE")
    return DemoPKI(
        ca=write_cert(d / "ca.pem", ca),
        server_cert=write_cert(d / "server.pem", server), server_key=write_key(d / "server.key", server_key),
        client_cert=write_cert(d / "client.pem", client), client_key=write_key(d / "client.key", client_key),
        signer_cert=write_cert(d / "signer.pem", signer), signer_key=write_key(d / "signer.key", signer_key),
    )
