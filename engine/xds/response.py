"""Answers of ITI-41 (Provide and Register Document Set-b) and ITI-57 (Update Document Set).

Reading: :func:`read_response` turns the HTTP body of an answer (multipart/related MTOM, as the
DMP sends it, or a plain SOAP 1.2 envelope) into an :class:`XdsResponse`: the registry status
(IHE ITI TF-3 §4.2.4: Success, Failure, PartialSuccess), the ``RegistryErrorList``
(ebRS 3.0 ``RegistryError``: errorCode, codeContext, severity, location), or the SOAP 1.2 fault
(W3C SOAP 1.2 Part 1 §5.4: Code, Subcodes, Reason, Detail), and the WS-Addressing ``RelatesTo``.
Anything else raises :class:`ResponseError`, the one error of this module.

DMP error codes. The CI-SIS guide "Transmission de documents CDA en HL7 v2" (profils-messages,
ZAM^Z01 segment ERR, field ERR-5) carries them as ``code^label^DMP_ERROR_CODE``, with codes and
labels "de l'annexe A7-1 « Liste des codes d'erreurs » de la spécification « Service DMP intégré
aux LPS » v2.10.0"; that annex is not public. SOAP 1.2 puts an application's own fault code in
the innermost ``Subcode`` (Part 1 §5.4.1.3) and its details in ``Detail`` (§5.4.5), so the
reader takes the DMP code from a ``Detail`` child that names one (an element or attribute
``code``/``errorCode``, and ``label``/``message`` next to it), and otherwise from the innermost
``Subcode`` value; :func:`build_fault` writes it in both places.

Building: the DMP simulator answers with :func:`build_success` (shaped like the DMP's own answer
"response.xml" of the DMP/DRIMbox test data: multipart/related, ``Action`` …Response,
``RelatesTo`` = the request's ``MessageID``), :func:`build_error_list` and :func:`build_fault`.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Iterable, Optional

from lxml import etree

from engine.xds.mtom import MTOMError, build_related, parse_related

SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
WSA_NS = "http://www.w3.org/2005/08/addressing"
RS_NS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"

STATUS_URNS = {
    "Success": "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success",
    "Failure": "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure",
    # IHE ITI TF-3 §4.2.4.2: PartialSuccess is an IHE extension of the ebRS status list.
    "PartialSuccess": "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess",
}
_STATUS_BY_URN = {v: k for k, v in STATUS_URNS.items()}
SEVERITY_ERROR = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error"
SEVERITY_WARNING = "urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Warning"

ACTION_ITI41_RESPONSE = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-bResponse"
ACTION_ITI57_RESPONSE = "urn:ihe:iti:2010:UpdateDocumentSetResponse"
ACTION_FAULT = "http://www.w3.org/2005/08/addressing/soap/fault"

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                          huge_tree=False, remove_blank_text=False)


class ResponseError(ValueError):
    """The answer is not a readable ITI-41 / ITI-57 response (no envelope, no RegistryResponse
    nor Fault, unknown status, bad MIME packaging). The text names the problem, never a value."""


@dataclass(frozen=True)
class RegistryError:
    """One ``RegistryError`` of a ``RegistryErrorList`` (ebRS 3.0 §2.1.6)."""

    error_code: str
    code_context: str = ""
    severity: str = "Error"          # "Error" or "Warning" (the ebRS URN's last word)
    location: str = ""


@dataclass(frozen=True)
class SoapFault:
    """A SOAP 1.2 fault: ``code`` is Sender/Receiver/…, ``subcodes`` outermost first."""

    code: str
    subcodes: tuple[str, ...] = ()
    reason: str = ""
    dmp_code: str = ""
    dmp_label: str = ""


@dataclass(frozen=True)
class XdsResponse:
    """What an ITI-41 / ITI-57 answer said. ``status`` is None for a fault."""

    status: Optional[str] = None
    errors: tuple[RegistryError, ...] = ()
    fault: Optional[SoapFault] = None
    relates_to: str = ""
    action: str = ""
    message_id: str = ""

    @property
    def success(self) -> bool:
        return self.fault is None and self.status == "Success"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _local(tag) -> str:
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def _text(el) -> str:
    return "".join(el.itertext()).strip() if el is not None else ""


def _qname_value(el) -> str:
    """``soap:Sender`` -> ``Sender``; a QName value's local part, namespace dropped."""
    value = _text(el)
    return value.rpartition(":")[2] if value else ""


def parse_envelope(xml: bytes) -> etree._Element:
    """The SOAP 1.2 Envelope element of ``xml`` (safe parser: no entities, no network, no DTD)."""
    if b"<!DOCTYPE" in xml[:4096]:
        raise ResponseError("a SOAP message must not carry a DTD")
    try:
        root = etree.fromstring(xml.lstrip(), _PARSER)
    except etree.XMLSyntaxError as exc:
        raise ResponseError(f"the SOAP envelope is not well-formed XML (line {exc.lineno})") from None
    if root.tag != f"{{{SOAP12_NS}}}Envelope":
        raise ResponseError("the root element is not a SOAP 1.2 Envelope")
    return root


def _read_fault(fault) -> SoapFault:
    ns = {"s": SOAP12_NS}
    code = _qname_value(fault.find("s:Code/s:Value", ns))
    subcodes, own = [], []
    node = fault.find("s:Code", ns)
    while node is not None:
        node = node.find("s:Subcode", ns)
        if node is not None:
            value = node.find("s:Value", ns)
            subcodes.append(_qname_value(value))
            prefix = _text(value).rpartition(":")[0] or None
            if value is not None and value.nsmap.get(prefix) not in _STANDARD_FAULT_NS:
                own.append(subcodes[-1])
    reason = _text(fault.find("s:Reason/s:Text", ns))
    dmp_code, dmp_label = _detail_code(fault.find("s:Detail", ns))
    if not dmp_code and own:
        dmp_code = own[-1]
    if not code:
        raise ResponseError("SOAP fault without Code/Value")
    return SoapFault(code=code, subcodes=tuple(subcodes), reason=reason,
                     dmp_code=dmp_code, dmp_label=dmp_label or (reason if dmp_code else ""))


# Subcodes defined by WS-Security 1.0 (§12), WS-Addressing 1.0 SOAP binding (§6) and SOAP
# itself are protocol codes, not a DMP code.
_STANDARD_FAULT_NS = frozenset({
    SOAP12_NS, WSA_NS,
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd",
})

_CODE_NAMES = ("code", "errorCode", "codeErreur")
_LABEL_NAMES = ("label", "message", "libelle", "errorMessage", "description")


def _detail_code(detail) -> tuple[str, str]:
    """(code, label) named by a Detail descendant, or ("", "")."""
    if detail is None:
        return "", ""
    for el in detail.iter():
        if not isinstance(el.tag, str):
            continue
        for name in _CODE_NAMES:
            if el.get(name):
                label = next((el.get(n) for n in _LABEL_NAMES if el.get(n)), "") or _text(el)
                return el.get(name).strip(), label
        if _local(el.tag) in _CODE_NAMES and _text(el):
            label = ""
            parent = el.getparent()
            for sib in (parent if parent is not None else ()):
                if isinstance(sib.tag, str) and _local(sib.tag) in _LABEL_NAMES:
                    label = _text(sib)
            return _text(el), label
    return "", ""


def _read_registry_response(rr) -> tuple[str, tuple[RegistryError, ...]]:
    urn = rr.get("status", "")
    status = _STATUS_BY_URN.get(urn)
    if status is None:
        raise ResponseError("RegistryResponse with an unknown status")
    errors = []
    for el in rr.iterfind(f"{{{RS_NS}}}RegistryErrorList/{{{RS_NS}}}RegistryError"):
        sev = el.get("severity", SEVERITY_ERROR)
        errors.append(RegistryError(
            error_code=el.get("errorCode", ""),
            code_context=el.get("codeContext", "") or _text(el),
            severity=sev.rpartition(":")[2] or "Error",
            location=el.get("location", ""),
        ))
    return status, tuple(errors)


def read_envelope(xml: bytes) -> XdsResponse:
    """Read an answer's SOAP envelope (already out of its MIME packaging)."""
    env = parse_envelope(xml)
    header = env.find(f"{{{SOAP12_NS}}}Header")
    body = env.find(f"{{{SOAP12_NS}}}Body")
    if body is None:
        raise ResponseError("SOAP envelope without a Body")

    def wsa(name: str) -> str:
        return _text(header.find(f"{{{WSA_NS}}}{name}")) if header is not None else ""

    common = dict(relates_to=wsa("RelatesTo"), action=wsa("Action"), message_id=wsa("MessageID"))
    children = [c for c in body if isinstance(c.tag, str)]
    if not children:
        raise ResponseError("empty SOAP Body")
    first = children[0]
    if first.tag == f"{{{SOAP12_NS}}}Fault":
        return XdsResponse(fault=_read_fault(first), **common)
    if first.tag == f"{{{RS_NS}}}RegistryResponse":
        status, errors = _read_registry_response(first)
        return XdsResponse(status=status, errors=errors, **common)
    raise ResponseError("SOAP Body holds neither a RegistryResponse nor a Fault")


def read_response(body: bytes, content_type: str) -> XdsResponse:
    """Read an ITI-41 / ITI-57 answer: ``body`` and the HTTP ``Content-Type`` header value.

    Raises :class:`ResponseError` when it is not one.
    """
    try:
        related = parse_related(body, content_type)
    except MTOMError as exc:
        raise ResponseError(f"unreadable MIME packaging: {exc}") from None
    return read_envelope(related.root)


# --------------------------------------------------------------------------------------------
# Building (the DMP simulator's answers)
# --------------------------------------------------------------------------------------------

def _envelope(action: str, relates_to: str, body_child: etree._Element,
              message_id: Optional[str] = None) -> bytes:
    env = etree.Element(f"{{{SOAP12_NS}}}Envelope", nsmap={"soap": SOAP12_NS})
    header = etree.SubElement(env, f"{{{SOAP12_NS}}}Header")
    for name, value in (("Action", action),
                        ("MessageID", message_id or f"urn:uuid:{uuid.uuid4()}"),
                        ("RelatesTo", relates_to)):
        if value:
            etree.SubElement(header, f"{{{WSA_NS}}}{name}", nsmap={None: WSA_NS}).text = value
    etree.SubElement(env, f"{{{SOAP12_NS}}}Body").append(body_child)
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")


def _registry_response(status: str, errors: Iterable[RegistryError] = ()) -> etree._Element:
    if status not in STATUS_URNS:
        raise ValueError(f"unknown registry status {status!r}")
    rr = etree.Element(f"{{{RS_NS}}}RegistryResponse", nsmap={"rs": RS_NS},
                       status=STATUS_URNS[status])
    errors = list(errors)
    if errors:
        lst = etree.SubElement(rr, f"{{{RS_NS}}}RegistryErrorList")
        for e in errors:
            attrs = {"errorCode": e.error_code, "codeContext": e.code_context,
                     "severity": SEVERITY_WARNING if e.severity == "Warning" else SEVERITY_ERROR}
            if e.location:
                attrs["location"] = e.location
            etree.SubElement(lst, f"{{{RS_NS}}}RegistryError", attrs)
    return rr


def _multipart(envelope: bytes, action: str) -> tuple[bytes, str]:
    return build_related(envelope, [], action=action, boundary=f"uuid:{uuid.uuid4()}",
                         root_id="root.message@minipfi")


def build_success(relates_to: str, *, action: str = ACTION_ITI41_RESPONSE,
                  message_id: Optional[str] = None) -> tuple[bytes, str]:
    """(body, Content-Type) of a Success answer, multipart/related like the DMP's."""
    env = _envelope(action, relates_to, _registry_response("Success"), message_id)
    return _multipart(env, action)


def build_error_list(relates_to: str, errors: Iterable[RegistryError], *,
                     status: str = "Failure", action: str = ACTION_ITI41_RESPONSE,
                     message_id: Optional[str] = None) -> tuple[bytes, str]:
    """(body, Content-Type) of a RegistryResponse carrying a RegistryErrorList."""
    env = _envelope(action, relates_to, _registry_response(status, errors), message_id)
    return _multipart(env, action)


def build_fault(relates_to: str, *, code: str = "Sender", subcodes: Iterable[tuple[str, str]] = (),
                reason: str = "", dmp_code: str = "", dmp_label: str = "",
                message_id: Optional[str] = None) -> tuple[bytes, str]:
    """(body, Content-Type) of a SOAP 1.2 fault (plain ``application/soap+xml``).

    ``subcodes`` are (namespace, local name) pairs, outermost first; a ``dmp_code`` becomes the
    innermost Subcode and a ``Detail`` child ``<error code=… label=…/>``.
    """
    if code not in ("Sender", "Receiver", "VersionMismatch", "MustUnderstand", "DataEncodingUnknown"):
        raise ValueError(f"not a SOAP 1.2 fault code: {code!r}")
    fault = etree.Element(f"{{{SOAP12_NS}}}Fault", nsmap={"soap": SOAP12_NS})
    node = etree.SubElement(fault, f"{{{SOAP12_NS}}}Code")
    etree.SubElement(node, f"{{{SOAP12_NS}}}Value").text = f"soap:{code}"
    chain = list(subcodes)
    if dmp_code:
        chain.append((DMP_FAULT_NS, dmp_code))
    for i, (ns, local) in enumerate(chain):
        node = etree.SubElement(node, f"{{{SOAP12_NS}}}Subcode")
        prefix = f"c{i}"
        value = etree.SubElement(node, f"{{{SOAP12_NS}}}Value", nsmap={prefix: ns})
        value.text = f"{prefix}:{local}"
    text = etree.SubElement(etree.SubElement(fault, f"{{{SOAP12_NS}}}Reason"), f"{{{SOAP12_NS}}}Text")
    text.set("{http://www.w3.org/XML/1998/namespace}lang", "fr")
    text.text = reason or dmp_label or code
    if dmp_code:
        detail = etree.SubElement(fault, f"{{{SOAP12_NS}}}Detail")
        etree.SubElement(detail, f"{{{DMP_FAULT_NS}}}error", nsmap={"dmp": DMP_FAULT_NS},
                         code=dmp_code, label=dmp_label)
    env = _envelope(ACTION_FAULT, relates_to, fault, message_id)
    return env, "application/soap+xml; charset=UTF-8"


# Namespace of the simulator's own Detail element; the reader does not depend on it.
DMP_FAULT_NS = "urn:minipfi:dmp-simulator:fault"

__all__ = [
    "ResponseError", "RegistryError", "SoapFault", "XdsResponse", "read_response", "read_envelope",
    "parse_envelope", "build_success", "build_error_list", "build_fault", "STATUS_URNS",
    "ACTION_ITI41_RESPONSE", "ACTION_ITI57_RESPONSE", "SEVERITY_ERROR", "SEVERITY_WARNING",
]
