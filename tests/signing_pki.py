"""A throw-away organisation signing certificate (« cachet », RSA 2048) for the VIHF and XAdES
tests, generated with ``cryptography``: a CA, the signing certificate, its key as PEM (clear and
encrypted) and the pair as PKCS#12 (password-protected), like an IGC-Santé ORG certificate file.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

PASSWORD = "cachet-test"


@dataclass(frozen=True)
class SigningFiles:
    ca: x509.Certificate
    certificate: x509.Certificate
    pem_bundle: Path        # certificate + clear key in one PEM file
    cert_pem: Path
    encrypted_key_pem: Path  # key encrypted with PASSWORD
    p12: Path                # PKCS#12 protected by PASSWORD
    other_key_pem: Path      # a key that does not match the certificate


def _name(*pairs) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def make_signing_files(directory: Path) -> SigningFiles:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = _name((NameOID.COUNTRY_NAME, "FR"), (NameOID.ORGANIZATION_NAME, "mini-PFI tests"),
                    (NameOID.COMMON_NAME, "TEST AC ORGANISATIONS"))
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = _name((NameOID.COUNTRY_NAME, "FR"), (NameOID.STATE_OR_PROVINCE_NAME, "Paris (75)"),
                    (NameOID.ORGANIZATION_NAME, "CENTRE IMAGERIE TEST"),
                    (NameOID.ORGANIZATIONAL_UNIT_NAME, "499700367909006"),
                    (NameOID.COMMON_NAME, "PFI SIGN"))
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    clear = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    encrypted = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(PASSWORD.encode()))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    files = {
        "pem_bundle": cert.public_bytes(pem) + clear,
        "cert_pem": cert.public_bytes(pem) + ca.public_bytes(pem),
        "encrypted_key_pem": encrypted,
        "p12": pkcs12.serialize_key_and_certificates(
            b"cachet", key, cert, [ca], serialization.BestAvailableEncryption(PASSWORD.encode())),
        "other_key_pem": other,
    }
    paths = {}
    for name, data in files.items():
        path = d / {"p12": "cachet.p12"}.get(name, f"{name}.pem")
        path.write_bytes(data)
        path.chmod(0o600)
        paths[name] = path
    return SigningFiles(ca=ca, certificate=cert, **paths)
