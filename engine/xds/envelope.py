"""The DMP requests as bytes: SOAP 1.2 envelope, WS-Addressing, the VIHF in ``wsse:Security``, the
XDS metadata, and the documents as MTOM/XOP attachments (their bytes unchanged).

IHE ITI TF-2 Appendix V (Web Services for IHE Transactions: SOAP 1.2, WS-Addressing ``MessageID``,
``To``, ``Action`` with ``mustUnderstand``, ``ReplyTo`` anonymous), ITI TF-2b §3.41 (ITI-41
Provide and Register Document Set-b, MTOM), ITI-57 (Update Document Set, plain SOAP 1.2); the
shape of the DMP's example request (DMP/DRIMbox test data, « publication.xml »); the VIHF of the
transmission guide (mapping.md « Mapping VIHF pour le DMP »).

Pure: ``now`` and ``uuid_factory`` make the bytes reproducible (tests); the request holds PHI and
only its ids (never its body) may be logged.
"""
from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lxml import etree

from engine.xds import mtom
from engine.xds.metadata import (
    SubmissionMetadata, build_deletion_metadata, build_submission_metadata,
)
from engine.xds.schemas import (
    ITI41_ACTION, ITI57_ACTION, SOAP12_NS, WSA_NS, XDSB_NS, XOP_NS, validate_iti41, validate_iti57,
)
from engine.xds.settings import DmpRequestSettings
from engine.xds.signing import SigningIdentity
from engine.xds.vihf import build_vihf

WSSE_NS = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
ATTACHMENT_TYPE = "application/octet-stream"   # as the DMP example sends its parts


@dataclass(frozen=True)
class Request:
    """What the connector sends, and the ids it must remember (no patient data among them)."""

    body: bytes
    content_type: str
    action: str
    message_id: str
    to: str
    submission_set_unique_id: str
    submission_set_entry_uuid: str
    document_unique_ids: tuple[str, ...]
    document_entry_uuids: tuple[str, ...]
    replaced_entry_uuids: tuple[str | None, ...] = ()
    signature_unique_id: str | None = None
    signature_entry_uuid: str | None = None


def _envelope(to: str, action: str, message_id: str, assertion: etree._Element,
              body_child: etree._Element) -> etree._Element:
    env = etree.Element(f"{{{SOAP12_NS}}}Envelope", nsmap={"soap": SOAP12_NS, "wsa": WSA_NS})
    header = etree.SubElement(env, f"{{{SOAP12_NS}}}Header")
    must = {f"{{{SOAP12_NS}}}mustUnderstand": "true"}
    etree.SubElement(header, f"{{{WSA_NS}}}Action", must).text = action
    etree.SubElement(header, f"{{{WSA_NS}}}MessageID").text = message_id
    etree.SubElement(header, f"{{{WSA_NS}}}To", must).text = to
    reply = etree.SubElement(header, f"{{{WSA_NS}}}ReplyTo")
    etree.SubElement(reply, f"{{{WSA_NS}}}Address").text = ANONYMOUS
    security = etree.SubElement(header, f"{{{WSSE_NS}}}Security", nsmap={"wsse": WSSE_NS})
    security.append(assertion)
    etree.SubElement(env, f"{{{SOAP12_NS}}}Body").append(body_child)
    return env


def _ids(meta: SubmissionMetadata, **kw) -> dict:
    return dict(submission_set_unique_id=meta.submission_set_unique_id,
                submission_set_entry_uuid=meta.submission_set_entry_uuid,
                document_unique_ids=tuple(d.unique_id for d in meta.documents),
                document_entry_uuids=tuple(d.entry_uuid for d in meta.documents), **kw)


def registry_endpoint(settings: DmpRequestSettings) -> str:
    """wsa:To of ITI-57: the configured registry URL, or the repository URL's last segment
    replaced by « registry » (the DMP's services: …/services/repository, …/services/registry)."""
    if settings.xds.registry_endpoint:
        return settings.xds.registry_endpoint
    base, _, _ = settings.xds.endpoint.rstrip("/").rpartition("/")
    return f"{base}/registry"


def build_iti41(submission: Any, settings: DmpRequestSettings, signer: SigningIdentity, *,
                now: dt.datetime, message_id: str | None = None,
                uuid_factory: Callable[[], uuid.UUID] = uuid.uuid4, patient_class: str | None = None,
                replaced_entry_uuids: Mapping[str, str] | None = None) -> Request:
    """ITI-41 Provide and Register Document Set-b for a publication or a replacement.

    ``submission``: the canonical submission (``ins``, ``action``, ``flags``, ``recipients.sender``,
    ``documents`` with ``raw_bytes()``), read by attribute. Raises ``MetadataError`` /
    ``VihfError`` (texts without patient data) when the message cannot go to the DMP."""
    message_id = message_id or f"urn:uuid:{uuid_factory()}"
    meta = build_submission_metadata(submission, settings.xds, signer, now=now,
                                     uuid_factory=uuid_factory, patient_class=patient_class,
                                     replaced_entry_uuids=replaced_entry_uuids)
    assertion = build_vihf(submission, settings.vihf, signer, now=now,
                           assertion_id=f"_{uuid_factory()}")
    tag = uuid_factory().hex
    request = etree.Element(f"{{{XDSB_NS}}}ProvideAndRegisterDocumentSetRequest",
                            nsmap={"xdsb": XDSB_NS, "xop": XOP_NS})
    request.append(meta.request)
    parts = []
    for n, (entry_uuid, data) in enumerate(meta.attachments, start=1):
        cid = f"doc{n}.{tag}@minipfi"
        doc = etree.SubElement(request, f"{{{XDSB_NS}}}Document", id=entry_uuid)
        etree.SubElement(doc, f"{{{XOP_NS}}}Include", href=f"cid:{cid}")
        parts.append(mtom.Part(cid, ATTACHMENT_TYPE, data))
    env = _envelope(settings.xds.endpoint, ITI41_ACTION, message_id, assertion, request)
    body, content_type = mtom.build_related(
        etree.tostring(env, xml_declaration=True, encoding="UTF-8"), parts, action=ITI41_ACTION,
        boundary=f"MIMEBoundary_{tag}", root_id=f"root.{tag}@minipfi")
    return Request(body=body, content_type=content_type, action=ITI41_ACTION,
                   message_id=message_id, to=settings.xds.endpoint,
                   **_ids(meta, replaced_entry_uuids=tuple(d.replaces_entry_uuid for d in meta.documents),
                          signature_unique_id=meta.signature.unique_id if meta.signature else None,
                          signature_entry_uuid=meta.signature.entry_uuid if meta.signature else None))


def build_iti57_delete(submission: Any, settings: DmpRequestSettings, signer: SigningIdentity, *,
                       now: dt.datetime, message_id: str | None = None,
                       uuid_factory: Callable[[], uuid.UUID] = uuid.uuid4,
                       patient_class: str | None = None,
                       entry_uuids: Mapping[str, str] | None = None) -> Request:
    """ITI-57 Update Document Set that deletes the documents of a deletion message (plain SOAP
    1.2: no attachment). ``entry_uuids``: document uniqueId -> entryUUID in the DMP, if known."""
    message_id = message_id or f"urn:uuid:{uuid_factory()}"
    meta = build_deletion_metadata(submission, settings.xds, now=now, uuid_factory=uuid_factory,
                                   patient_class=patient_class, entry_uuids=entry_uuids)
    assertion = build_vihf(submission, settings.vihf, signer, now=now,
                           assertion_id=f"_{uuid_factory()}")
    to = registry_endpoint(settings)
    env = _envelope(to, ITI57_ACTION, message_id, assertion, meta.request)
    body = etree.tostring(env, xml_declaration=True, encoding="UTF-8")
    content_type = f'{mtom.SOAP12_TYPE}; charset=UTF-8; action="{ITI57_ACTION}"'
    return Request(body=body, content_type=content_type, action=ITI57_ACTION,
                   message_id=message_id, to=to, **_ids(meta))


def validate_request(request: Request) -> list[str]:
    """The XSD and envelope errors of a built request, read back from its bytes as the DMP reads
    them (empty when valid): for a check before sending, at run time or in tests."""
    related = mtom.parse_related(request.body, request.content_type)
    root = etree.fromstring(related.root, etree.XMLParser(resolve_entities=False, no_network=True,
                                                          load_dtd=False, huge_tree=True))
    if request.action == ITI57_ACTION:
        return validate_iti57(root)
    return validate_iti41(root, {cid: part.data for cid, part in related.parts.items()})
