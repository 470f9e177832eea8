"""XSD validation of the DMP's XDS.b requests and answers, with the schemas shipped in the package.

What is checked (IHE ITI TF-2b §3.41, TF-3 §4.2; ITI-57: IHE ITI "XDS Metadata Update"):

* ITI-41: the SOAP 1.2 body holds one ``xdsb:ProvideAndRegisterDocumentSetRequest`` valid against
  ``IHEXDSB.xsd`` (with ebRIM / ebRS 3.0);
* ITI-57: the body holds one ``lcm:SubmitObjectsRequest`` valid against ``lcm.xsd``;
* answers: one ``rs:RegistryResponse`` valid against ``rs.xsd``;
* the envelope around them, in code (no SOAP / WS-Addressing XSD is shipped): SOAP 1.2 namespace,
  one Header with the WS-Addressing ``Action`` (the transaction's own) and ``MessageID``, one Body;
* what the XSD cannot say for ITI-41: each ``xdsb:Document`` names an ExtrinsicObject of the
  metadata and each ExtrinsicObject has its Document (ITI TF-2b §3.41.4.1.2).

A body sent as MTOM carries ``<xop:Include href="cid:…"/>`` where the XSD expects base64 content.
Validation runs on the XOP infoset (W3C XOP 1.0 §3.2): each ``xop:Include`` is replaced, in a copy,
by the base64 of its attachment when the attachments are given, by an empty (valid) value otherwise.

The compiled schema is built once per process (about 10 ms) and cached.
"""
from __future__ import annotations

import base64
import copy
import re
import threading
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from lxml import etree

RESOURCES = Path(__file__).with_name("resources")
SCHEMA_DIR = RESOURCES / "schema"

SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
WSA_NS = "http://www.w3.org/2005/08/addressing"
XDSB_NS = "urn:ihe:iti:xds-b:2007"
LCM_NS = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RIM_NS = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
RS_NS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
XOP_NS = "http://www.w3.org/2004/08/xop/include"

ITI41_ACTION = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
ITI41_RESPONSE_ACTION = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse"
ITI57_ACTION = "urn:ihe:iti:2010:UpdateDocumentSet"
ITI57_RESPONSE_ACTION = "urn:ihe:iti:2010:UpdateDocumentSetResponse"

# As redistributed, rim.xsd imports ../IHE/xcf.xsd (IHE Cross-Community Fetch), which is not in the
# set, and ExtrinsicObjectType refers to the optional xdsext:Document it declares: no XSD processor
# compiles that. The shipped files stay unchanged; rim.xsd is served to lxml through a resolver
# with that import and that minOccurs="0" particle removed, which is the OASIS ebRIM 3.0 type
# XDS.b metadata is defined against (an ExtrinsicObject of XDS carries no inline content).
_XCF_IMPORT = re.compile(r"<import\b[^>]*schemaLocation=\"\.\./IHE/xcf\.xsd\"[^>]*/>")
_XDSEXT_DOCUMENT = re.compile(r"<element\b[^>]*ref=\"xdsext:Document\"[^>]*/>")


class _RimWithoutXcf(etree.Resolver):
    """Serves ``rim.xsd`` without its dangling xcf.xsd import; every other file is read as is."""

    def resolve(self, system_url, public_id, context):
        if system_url and system_url.endswith("ebRS30/rim.xsd"):
            text = (SCHEMA_DIR / "ebRS30" / "rim.xsd").read_text(encoding="utf-8")
            text, imports = _XCF_IMPORT.subn("", text)
            text, refs = _XDSEXT_DOCUMENT.subn("", text)
            if imports != 1 or refs != 1:   # a newer rim.xsd: let the compiler say what is wrong
                return None
            text = re.sub(r"^<\?xml[^>]*\?>", "", text.lstrip())
            return self.resolve_string(text, context, base_url=(SCHEMA_DIR / "ebRS30" / "rim.xsd").as_uri())
        return None


def _parser() -> etree.XMLParser:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    parser.resolvers.add(_RimWithoutXcf())
    return parser


@lru_cache(maxsize=1)
def xds_schema() -> etree.XMLSchema:
    """IHEXDSB.xsd with everything it imports (rs, rim, lcm, query): covers ITI-41, ITI-57
    (``lcm:SubmitObjectsRequest``) and ``rs:RegistryResponse`` in one compiled schema."""
    path = SCHEMA_DIR / "IHE" / "IHEXDSB.xsd"
    doc = etree.parse(str(path), _parser())
    return etree.XMLSchema(doc)


def _xop_infoset(element: etree._Element, attachments: Mapping[str, bytes] | None,
                 errors: list[str]) -> etree._Element:
    """A copy of ``element`` where each xop:Include is replaced by its attachment in base64."""
    element = copy.deepcopy(element)
    for include in element.iter(f"{{{XOP_NS}}}Include"):
        parent = include.getparent()
        href = include.get("href", "")
        cid = href[4:] if href.startswith("cid:") else href
        data = b""
        if attachments is not None:
            if cid in attachments:
                data = attachments[cid]
            else:
                errors.append(f"xop:Include {href!r}: no such attachment")
        parent.remove(include)
        parent.text = (parent.text or "") + base64.b64encode(data).decode("ascii")
    return element


_VALIDATING = threading.Lock()   # one XMLSchema, one error_log: a validation at a time


def _schema_errors(element: etree._Element) -> list[str]:
    schema = xds_schema()
    with _VALIDATING:
        if schema.validate(element):
            return []
        return [f"line {e.line}: {e.message}" for e in schema.error_log]


def _body_child(envelope: etree._Element, action: str, errors: list[str]) -> etree._Element | None:
    """The single child of the SOAP 1.2 Body, after checking the envelope's structure."""
    if envelope.tag != f"{{{SOAP12_NS}}}Envelope":
        errors.append(f"root is {envelope.tag}, not a SOAP 1.2 Envelope")
        return None
    headers = envelope.findall(f"{{{SOAP12_NS}}}Header")
    bodies = envelope.findall(f"{{{SOAP12_NS}}}Body")
    if len(headers) != 1 or len(bodies) != 1:
        errors.append("the Envelope needs one Header and one Body")
        return None
    header = headers[0]
    found = header.findtext(f"{{{WSA_NS}}}Action")
    if found is None or found.strip() != action:
        errors.append(f"wsa:Action is {found!r}, expected {action!r}")
    if not (header.findtext(f"{{{WSA_NS}}}MessageID") or "").strip():
        errors.append("wsa:MessageID missing")
    children = [c for c in bodies[0] if isinstance(c.tag, str)]
    if len(children) != 1:
        errors.append(f"the Body holds {len(children)} elements, expected 1")
        return None
    return children[0]


def _validate(root: etree._Element, action: str, expected: str,
              attachments: Mapping[str, bytes] | None) -> list[str]:
    errors: list[str] = []
    element = root
    if root.tag == f"{{{SOAP12_NS}}}Envelope":
        element = _body_child(root, action, errors)
        if element is None:
            return errors
    if element.tag != expected:
        return errors + [f"body element is {element.tag}, expected {expected}"]
    if expected == f"{{{XDSB_NS}}}ProvideAndRegisterDocumentSetRequest":
        errors += _document_links(element)
    element = _xop_infoset(element, attachments, errors)
    return errors + _schema_errors(element)


def _document_links(request: etree._Element) -> list[str]:
    entries = {e.get("id") for e in request.iter(f"{{{RIM_NS}}}ExtrinsicObject")}
    documents = [d.get("id") for d in request.findall(f"{{{XDSB_NS}}}Document")]
    errors = [f"xdsb:Document {d!r} names no ExtrinsicObject" for d in documents if d not in entries]
    errors += [f"ExtrinsicObject {e!r} has no xdsb:Document" for e in sorted(entries - set(documents), key=str)]
    if len(set(documents)) != len(documents):
        errors.append("two xdsb:Document elements with the same id")
    return errors


def validate_iti41(root: etree._Element, attachments: Mapping[str, bytes] | None = None) -> list[str]:
    """Errors of an ITI-41 request (SOAP 1.2 Envelope, or the bare request element); empty when
    valid. ``attachments``: the MTOM parts by Content-ID, to check every xop:Include resolves."""
    return _validate(root, ITI41_ACTION, f"{{{XDSB_NS}}}ProvideAndRegisterDocumentSetRequest", attachments)


def validate_iti57(root: etree._Element) -> list[str]:
    """Errors of an ITI-57 Update Document Set request (Envelope or bare SubmitObjectsRequest)."""
    return _validate(root, ITI57_ACTION, f"{{{LCM_NS}}}SubmitObjectsRequest", None)


def validate_registry_response(root: etree._Element, action: str = ITI41_RESPONSE_ACTION) -> list[str]:
    """Errors of an answer (Envelope with ``action``, or a bare ``rs:RegistryResponse``)."""
    return _validate(root, action, f"{{{RS_NS}}}RegistryResponse", None)
