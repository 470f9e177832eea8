"""The signature document of a DMP submission: an XAdES signature over a Manifest of the submitted
documents (IHE ITI "Document Digital Signature" (DSG) style), signed with the organisation's key.

The DMP's example request carries it as a second document entry (« Signature01 », classCode
``urn:oid:1.3.6.1.4.1.19376.1.2.1.1.1``, typeCode E1762, formatCode
``http://www.w3.org/2000/09/xmldsig#``) linked by HasMember and by a ``signs`` association to the
submission set. Its shape is kept: ``ds:Signature`` whose Id is the entry's uniqueId (after an underscore, to be an xs:ID), a
SignatureProperty « purposeOfSignature » (1.2.840.10065.1.12.1.14, « Source »), a Manifest
« IHEManifest » with one Reference per document (``urn:oid:<uniqueId>`` and the digest of its exact
bytes) preceded by the submission set's (the example's placeholder digest ``AA==``: a submission
set has no octets of its own), and XAdES SignedProperties (signing time, signing certificate).

Differences from the example, on purpose: exclusive c14n and an explicit exc-c14n transform on each
reference (digests that do not depend on where the document is read), SHA-256 by default instead of
SHA-1, XAdES 1.3.2 instead of 1.1.1. signxml cannot build a Manifest signature, so this module
builds it with lxml's c14n and ``cryptography``; signxml's verifier checks it in the tests. The
purpose is text inside SignatureProperty, as in the example and IHE DSG, where the XML-DSig schema
wants an element: a verifier reads it without schema validation (signxml ``validate_schema=False``).
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib

from cryptography.hazmat.primitives import serialization
from lxml import etree

from engine.xds.signing import SigningIdentity

DS_NS = "http://www.w3.org/2000/09/xmldsig#"
XADES_NS = "http://uri.etsi.org/01903/v1.3.2#"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
MANIFEST_TYPE = "http://www.w3.org/2000/09/xmldsig#Manifest"
SIGNED_PROPERTIES_TYPE = "http://uri.etsi.org/01903#SignedProperties"
PURPOSE_SOURCE = "1.2.840.10065.1.12.1.14"
MANIFEST_ID = "IHEManifest"
SIGNED_PROPERTIES_ID = "S0-SignedProperties"

_DIGEST_URI = {"sha256": "http://www.w3.org/2001/04/xmlenc#sha256",
               "sha384": "http://www.w3.org/2001/04/xmldsig-more#sha384",
               "sha512": "http://www.w3.org/2001/04/xmlenc#sha512"}
_SIGNATURE_URI = {
    "rsa-sha256": "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
    "rsa-sha384": "http://www.w3.org/2001/04/xmldsig-more#rsa-sha384",
    "rsa-sha512": "http://www.w3.org/2001/04/xmldsig-more#rsa-sha512",
    "ecdsa-sha256": "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256",
    "ecdsa-sha384": "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384",
    "ecdsa-sha512": "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512",
}
_D = f"{{{DS_NS}}}"
_X = f"{{{XADES_NS}}}"


def _digest(data: bytes, name: str) -> str:
    return base64.b64encode(hashlib.new(name, data).digest()).decode("ascii")


def _c14n(el: etree._Element) -> bytes:
    return etree.tostring(el, method="c14n", exclusive=True, with_comments=False)


def _reference(parent, uri: str, digest_name: str, digest_value: str, *, type_: str | None = None,
               transform: bool = False) -> None:
    ref = etree.SubElement(parent, f"{_D}Reference", URI=uri)
    if type_:
        ref.set("Type", type_)
    if transform:
        transforms = etree.SubElement(ref, f"{_D}Transforms")
        etree.SubElement(transforms, f"{_D}Transform", Algorithm=EXC_C14N)
    etree.SubElement(ref, f"{_D}DigestMethod", Algorithm=_DIGEST_URI[digest_name])
    etree.SubElement(ref, f"{_D}DigestValue").text = digest_value


def build_signature_document(signer: SigningIdentity, *, signature_id: str,
                             submission_set_unique_id: str, documents: list[tuple[str, bytes]],
                             now: dt.datetime, algorithm: str = "rsa-sha256") -> bytes:
    """The serialized ``ds:Signature`` (UTF-8, with XML declaration) over ``documents``
    (``(uniqueId, exact bytes)``), whose own uniqueId is ``signature_id``."""
    digest_name = algorithm.partition("-")[2]
    # the example's Id is the bare uniqueId, which is no xs:ID (an OID starts with a digit):
    # a leading underscore makes it one
    xml_id = f"_{signature_id}"
    root = etree.Element(f"{_D}Signature", nsmap={None: DS_NS}, Id=xml_id)
    signed_info = etree.SubElement(root, f"{_D}SignedInfo")
    etree.SubElement(signed_info, f"{_D}CanonicalizationMethod", Algorithm=EXC_C14N)
    etree.SubElement(signed_info, f"{_D}SignatureMethod", Algorithm=_SIGNATURE_URI[algorithm])
    value = etree.SubElement(root, f"{_D}SignatureValue")
    key_info = etree.SubElement(root, f"{_D}KeyInfo")
    x509_data = etree.SubElement(key_info, f"{_D}X509Data")
    der = signer.certificate.public_bytes(serialization.Encoding.DER)
    etree.SubElement(x509_data, f"{_D}X509Certificate").text = base64.b64encode(der).decode("ascii")

    props = etree.SubElement(etree.SubElement(root, f"{_D}Object"), f"{_D}SignatureProperties")
    prop = etree.SubElement(props, f"{_D}SignatureProperty", Id="purposeOfSignature",
                            Target=f"#{xml_id}")
    prop.text = PURPOSE_SOURCE

    manifest = etree.SubElement(etree.SubElement(root, f"{_D}Object"), f"{_D}Manifest", Id=MANIFEST_ID)
    _reference(manifest, f"urn:oid:{submission_set_unique_id}", digest_name, "AA==")
    for unique_id, data in documents:
        _reference(manifest, f"urn:oid:{unique_id}", digest_name, _digest(data, digest_name))

    qualifying = etree.SubElement(etree.SubElement(root, f"{_D}Object"), f"{_X}QualifyingProperties",
                                  nsmap={"xades": XADES_NS}, Target=f"#{xml_id}")
    signed_props = etree.SubElement(qualifying, f"{_X}SignedProperties", Id=SIGNED_PROPERTIES_ID)
    ssp = etree.SubElement(signed_props, f"{_X}SignedSignatureProperties")
    etree.SubElement(ssp, f"{_X}SigningTime").text = (
        now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    cert = etree.SubElement(etree.SubElement(ssp, f"{_X}SigningCertificate"), f"{_X}Cert")
    cert_digest = etree.SubElement(cert, f"{_X}CertDigest")
    etree.SubElement(cert_digest, f"{_D}DigestMethod", Algorithm=_DIGEST_URI[digest_name])
    etree.SubElement(cert_digest, f"{_D}DigestValue").text = _digest(der, digest_name)
    issuer_serial = etree.SubElement(cert, f"{_X}IssuerSerial")
    etree.SubElement(issuer_serial, f"{_D}X509IssuerName").text = signer.certificate.issuer.rfc4514_string()
    etree.SubElement(issuer_serial, f"{_D}X509SerialNumber").text = str(signer.certificate.serial_number)
    policy = etree.SubElement(ssp, f"{_X}SignaturePolicyIdentifier")
    etree.SubElement(policy, f"{_X}SignaturePolicyImplied")

    _reference(signed_info, f"#{MANIFEST_ID}", digest_name, _digest(_c14n(manifest), digest_name),
               type_=MANIFEST_TYPE, transform=True)
    _reference(signed_info, f"#{SIGNED_PROPERTIES_ID}", digest_name,
               _digest(_c14n(signed_props), digest_name), type_=SIGNED_PROPERTIES_TYPE, transform=True)
    value.text = base64.b64encode(signer.sign(_c14n(signed_info), algorithm)).decode("ascii")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")
