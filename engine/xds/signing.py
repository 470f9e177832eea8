"""The organisation's signing identity (IGC-Santé « cachet » / ORG certificate) and raw signatures.

The VIHF and the XAdES signature document are signed with the structure's signing certificate
(mapping.md « Mapping VIHF pour le DMP »: « Signature XML-DSIG avec le certificat de cachet de la
structure de soins »; Issuer = its DN). The connector reads the files (paths and password come from
its configuration, never from the builder's settings) with :func:`load_signing_identity`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import pkcs12

_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


class SigningIdentityError(ValueError):
    """The key or certificate cannot be read (the text names the file, never a secret)."""


@dataclass(frozen=True)
class SigningIdentity:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def subject_dn(self) -> str:
        """The certificate's subject DN, most specific first (« CN=…, OU=…, O=…, C=FR »), the form
        of the DMP example's Issuer."""
        return ", ".join(rdn.rfc4514_string() for rdn in reversed(self.certificate.subject.rdns))

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, data: bytes, algorithm: str) -> bytes:
        """XML-DSig SignatureValue bytes for ``algorithm`` (« rsa-sha256 », « ecdsa-sha256 »...):
        PKCS#1 v1.5 for RSA, r‖s of fixed length for ECDSA (RFC 4050 / XML-DSig 1.1 §6.4.3)."""
        family, _, digest = algorithm.partition("-")
        hash_alg = _HASHES[digest]()
        if family == "rsa" and isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(data, padding.PKCS1v15(), hash_alg)
        if family == "ecdsa" and isinstance(self.key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(hash_alg)))
            size = (self.key.curve.key_size + 7) // 8
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        raise SigningIdentityError(f"signature algorithm {algorithm} does not fit the signing key")


def _password(password: str | bytes | None) -> bytes | None:
    if password is None or isinstance(password, bytes):
        return password
    return password.encode("utf-8")


def load_signing_identity(path: str | Path, password: str | bytes | None = None,
                          key_path: str | Path | None = None) -> SigningIdentity:
    """Read a PKCS#12 file (``.p12``/``.pfx``, or any file that is not PEM) or PEM files: the
    certificate (and its chain) in ``path``, the private key in ``key_path`` or in ``path``."""
    path = Path(path)
    data = path.read_bytes()
    secret = _password(password)
    if b"-----BEGIN" not in data:
        try:
            key, cert, extra = pkcs12.load_key_and_certificates(data, secret)
        except ValueError as exc:
            raise SigningIdentityError(f"{path.name}: not a readable PKCS#12 file "
                                       "(or wrong password)") from exc
        if key is None or cert is None:
            raise SigningIdentityError(f"{path.name}: the PKCS#12 file lacks the key or the certificate")
        return _checked(key, cert, tuple(extra or ()), path)
    certs = x509.load_pem_x509_certificates(data) if b"CERTIFICATE-----" in data else []
    if not certs:
        raise SigningIdentityError(f"{path.name}: no PEM certificate")
    key_data = Path(key_path).read_bytes() if key_path else data
    try:
        key = serialization.load_pem_private_key(key_data, secret)
    except (ValueError, TypeError) as exc:
        raise SigningIdentityError(f"{Path(key_path or path).name}: no readable PEM private key "
                                   "(or wrong password)") from exc
    return _checked(key, certs[0], tuple(certs[1:]), path)


def _checked(key, cert: x509.Certificate, chain: tuple, path: Path) -> SigningIdentity:
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise SigningIdentityError(f"{path.name}: only RSA and EC signing keys are supported")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
            != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise SigningIdentityError(f"{path.name}: the private key does not match the certificate")
    return SigningIdentity(key=key, certificate=cert, chain=chain)
