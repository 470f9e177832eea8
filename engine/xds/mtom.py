"""MTOM/XOP packaging of SOAP 1.2 messages (W3C XOP 1.0, SOAP MTOM), pure bytes in and out.

IHE ITI TF-2 (Appendix V, "Web Services for IHE Transactions") carries the documents of
ITI-41 as MTOM attachments: a ``multipart/related; type="application/xop+xml"`` body whose root
part is the SOAP envelope (``application/xop+xml; type="application/soap+xml"``) and whose other
parts are referenced from it by ``<xop:Include href="cid:..."/>``. The DMP's example request and
answer ("publication.xml" and "response.xml" of the DMP/DRIMbox test data) have that shape.

zeep reads MTOM answers but cannot send MTOM (python-zeep issues #599 and #674), and the
connector sends through Twisted, not requests: this module builds the body itself, and parses
it back for the DMP simulator and for the connector's response reader.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

XOP_NS = "http://www.w3.org/2004/08/xop/include"
SOAP12_TYPE = "application/soap+xml"


class MTOMError(ValueError):
    """The body is not a readable multipart/related (XOP) message."""


@dataclass(frozen=True)
class Part:
    content_id: str          # without the angle brackets
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Related:
    root: bytes                               # the SOAP envelope, bytes as sent
    parts: dict[str, Part] = field(default_factory=dict)   # by Content-ID (no brackets)
    root_content_type: str = ""


def new_boundary() -> str:
    return "MIMEBoundary_" + uuid.uuid4().hex


def build_related(envelope: bytes, attachments: list[Part], *, action: str,
                  boundary: str | None = None, root_id: str = "root.message@minipfi") -> tuple[bytes, str]:
    """The multipart/related body and its Content-Type header value.

    ``envelope`` is the serialised SOAP 1.2 envelope whose ``xop:Include`` elements name the
    attachments by ``cid:``. Attachments are written as binary parts (``Content-Transfer-Encoding:
    binary``), so the document bytes travel unchanged.
    """
    boundary = boundary or new_boundary()
    crlf = b"\r\n"
    out = [b"--" + boundary.encode("ascii"), crlf,
           (f'Content-Type: application/xop+xml; charset=UTF-8; type="{SOAP12_TYPE}"; '
            f'action="{action}"').encode("ascii"), crlf,
           b"Content-Transfer-Encoding: binary", crlf,
           f"Content-ID: <{root_id}>".encode("ascii"), crlf, crlf,
           envelope, crlf]
    for part in attachments:
        out += [b"--" + boundary.encode("ascii"), crlf,
                f"Content-Type: {part.content_type}".encode("ascii"), crlf,
                b"Content-Transfer-Encoding: binary", crlf,
                f"Content-ID: <{part.content_id}>".encode("ascii"), crlf, crlf,
                part.data, crlf]
    out += [b"--" + boundary.encode("ascii") + b"--", crlf]
    content_type = (f'multipart/related; type="application/xop+xml"; boundary="{boundary}"; '
                    f'start="<{root_id}>"; start-info="{SOAP12_TYPE}"; action="{action}"')
    return b"".join(out), content_type


_PARAM = re.compile(r';\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """``'multipart/related; boundary="x"; type=...'`` -> ("multipart/related", {...})."""
    main, _, rest = value.partition(";")
    params = {}
    for m in _PARAM.finditer(";" + rest):
        v = m.group(2).strip()
        if len(v) >= 2 and v[0] == v[-1] == '"':
            v = v[1:-1]
        params[m.group(1).lower()] = v
    return main.strip().lower(), params


def _split_headers(block: bytes) -> tuple[dict[str, str], bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = block.find(sep)
        if i >= 0:
            head, body = block[:i], block[i + len(sep):]
            break
    else:
        raise MTOMError("MIME part without a header/body separator")
    headers: dict[str, str] = {}
    for line in re.split(rb"\r?\n", head):
        if not line.strip():
            continue
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise MTOMError("malformed MIME part header")
        headers[name.strip().lower()] = value.strip()
    return headers, body


def parse_related(body: bytes, content_type: str) -> Related:
    """Split a multipart/related body into its root part and attachments.

    A plain ``application/soap+xml`` (or ``text/xml``) body is accepted too: some servers answer
    without MTOM. Raises :class:`MTOMError` when the body cannot be read.
    """
    main, params = header_params(content_type or "")
    if main in (SOAP12_TYPE, "text/xml", "application/xml"):
        return Related(root=body.strip(), root_content_type=main)
    if main != "multipart/related":
        raise MTOMError(f"unexpected content type {main or '(none)'}")
    boundary = params.get("boundary")
    if not boundary:
        raise MTOMError("multipart/related without a boundary")
    delim = b"--" + boundary.encode("latin-1")
    chunks = body.split(delim)
    if len(chunks) < 3:
        raise MTOMError("multipart/related with no part")
    parts: list[tuple[dict[str, str], bytes]] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk.lstrip(b"\n")
        if chunk.endswith(b"\r\n"):
            chunk = chunk[:-2]
        elif chunk.endswith(b"\n"):
            chunk = chunk[:-1]
        parts.append(_split_headers(chunk))
    if not parts:
        raise MTOMError("multipart/related with no part")
    start = params.get("start", "").strip("<>")
    root_index = 0
    if start:
        for i, (h, _) in enumerate(parts):
            if h.get("content-id", "").strip("<>") == start:
                root_index = i
                break
        else:
            raise MTOMError("the start part named in the content type is missing")
    by_id: dict[str, Part] = {}
    for i, (h, data) in enumerate(parts):
        if i == root_index:
            continue
        cid = h.get("content-id", "").strip("<>")
        if not cid:
            raise MTOMError("attachment without a Content-ID")
        if cid in by_id:
            raise MTOMError("two attachments with the same Content-ID")
        by_id[cid] = Part(cid, h.get("content-type", "application/octet-stream"), data)
    root_headers, root = parts[root_index]
    return Related(root=root.strip(), parts=by_id,
                   root_content_type=header_params(root_headers.get("content-type", ""))[0])


def cid_of(href: str) -> str:
    """``cid:abc%40x`` -> ``abc@x`` (RFC 2392: the cid URL is URL-encoded)."""
    from urllib.parse import unquote

    if not href.startswith("cid:"):
        raise MTOMError("xop:Include href is not a cid: URL")
    return unquote(href[4:])
