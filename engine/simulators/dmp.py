"""A DMP simulator: an ITI-41 / ITI-57 endpoint over mutual TLS, for tests and demonstrations.

The Twisted edge of the simulator; every rule lives in :mod:`engine.simulators.dmp_checks`.

* HTTPS, TLS 1.2+, a client certificate from the given CA REQUIRED at the handshake (so a
  client is authenticated before a byte of its request is read); bodies over ``max_body`` are
  refused with 413 without being kept.
* Each POST is unpacked (MTOM, :mod:`engine.xds.mtom`), checked, and answered like the DMP's
  "response.xml" (multipart/related, ``RelatesTo`` = the request's ``MessageID``), with a
  ``RegistryErrorList`` or a SOAP 1.2 fault when a rule fails (HTTP 200 for a registry answer;
  for a fault 400 when the sender is at fault, 500 otherwise, per SOAP 1.2 Part 2 §7.5.1.2).
* A request sent again after a lost answer (same uniqueId and bytes, same replacement, same
  deletion) is accepted and changes nothing: the connector's retries stay harmless.
* What it accepts is kept in memory (:attr:`DMPSimulator.accepted`) and, with ``store_dir``,
  written as one directory per request: ``summary.json`` and the document bytes.
* Behaviours (:meth:`DMPSimulator.set_behaviour`): answer a registry error list, a SOAP fault
  with a DMP code, an HTTP status (5xx), and/or wait ``delay`` seconds, for the next ``count``
  requests or until changed.
* An admin endpoint (plain HTTP, bound to 127.0.0.1 only) switches behaviour and lists what was
  accepted, for a simulator running in its own process (``minipfi dmp-simulator``):
  ``GET /behaviour``, ``PUT /behaviour`` (JSON, fields of :class:`Behaviour`), ``GET /accepted``,
  ``GET /refused``, ``POST /reset``.

Logs carry message ids, counts and codes, never metadata values (the PHI rule).
"""
from __future__ import annotations

import json
import re
import threading
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

from twisted.internet import defer, threads
from twisted.web import http, resource, server

from engine import logs
from engine.simulators.dmp_checks import (
    ITI41_ACTION, ITI57_ACTION, STATUS_APPROVED, CheckResult, KnownEntry, Refusal, Submission,
    VihfTrust, check_request,
)
from engine.xds.mtom import MTOMError, header_params, parse_related
from engine.xds.response import (
    ACTION_ITI41_RESPONSE, ACTION_ITI57_RESPONSE, RegistryError, build_error_list, build_fault,
    build_success,
)
from mllp.tls import TLSFiles, server_context_factory

log = logs.get("minipfi.dmp_simulator")

MODES = ("accept", "errors", "fault", "http")


@dataclass
class Behaviour:
    """How the simulator answers the next requests.

    ``mode``: ``accept`` (check, store, answer like the DMP), ``errors`` (a RegistryResponse
    with ``errors`` and ``status``), ``fault`` (a SOAP 1.2 fault ``fault_code`` carrying
    ``dmp_code`` / ``dmp_label``), ``http`` (an empty answer with ``http_status``).
    ``delay``: seconds before any answer. ``count``: how many requests this applies to before
    going back to ``accept`` without delay (None: until changed). In the forced modes the
    request is not checked nor stored.
    """

    mode: str = "accept"
    delay: float = 0.0
    count: Optional[int] = None
    errors: list[dict] = field(default_factory=list)   # RegistryError fields
    status: str = "Failure"
    fault_code: str = "Sender"
    dmp_code: str = ""
    dmp_label: str = ""
    http_status: Optional[int] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.delay < 0 or (self.count is not None and self.count < 1):
            raise ValueError("delay must be >= 0 and count >= 1")
        if self.mode == "http" and not (self.http_status and 100 <= self.http_status <= 599):
            raise ValueError("mode http needs http_status")
        if self.status not in ("Failure", "PartialSuccess"):
            raise ValueError("status must be Failure or PartialSuccess")
        self.errors = [asdict(e) if isinstance(e, RegistryError) else dict(e) for e in self.errors]
        for e in self.errors:
            RegistryError(**e)                       # field names checked

    @classmethod
    def from_json(cls, data: dict) -> "Behaviour":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown behaviour fields: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class Answer:
    code: int
    content_type: str
    body: bytes


class DMPSimulator:
    """The simulator. In tests: ``port = sim.start()``, ``sim.set_behaviour(...)``,
    ``sim.accepted``, ``yield sim.stop()``."""

    def __init__(self, *, cert: str, key: str, client_ca: str, signer_ca: Optional[str] = None,
                 signer_cert: Optional[str] = None, store_dir: Optional[str] = None,
                 expected_to: str = "", validate_schema: bool = True,
                 vihf_versions: tuple[str, ...] = ("4.0", "3.0"), max_body: int = 64 * 1024 * 1024,
                 keep: Optional[int] = None, reactor=None) -> None:
        """``keep``: how many accepted and refused requests stay in memory (None: all; a
        benchmark sets a bound, the documents' bytes being kept with them)."""
        if not (signer_ca or signer_cert):
            raise ValueError("the simulator needs signer_ca or signer_cert to verify VIHF signatures")
        self.tls = TLSFiles(cert=cert, key=key, ca=client_ca, require_client_cert=True)
        self.trust = VihfTrust(ca_pem=signer_ca, cert_pem=signer_cert, versions=frozenset(vihf_versions))
        self.store_dir = Path(store_dir) if store_dir else None
        self.expected_to = expected_to
        self.validate_schema = validate_schema
        self.max_body = max_body
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.accepted: deque[Submission] = deque(maxlen=keep)
        self.refused: deque[CheckResult] = deque(maxlen=keep)
        self.accepted_count = 0
        self.requests = 0
        self.known: dict[str, KnownEntry] = {}
        self._behaviour = Behaviour()
        self._lock = threading.Lock()
        self._ports: list = []
        self._seq = 0

    # ---------------------------------------------------------------- control
    @property
    def behaviour(self) -> Behaviour:
        return self._behaviour

    def set_behaviour(self, mode: str = "accept", **kwargs) -> Behaviour:
        """Switch behaviour (fields of :class:`Behaviour`); returns the new one."""
        self._behaviour = Behaviour(mode=mode, **kwargs)
        log.info("dmp_simulator.behaviour", mode=mode, count=self._behaviour.count,
                 delay=self._behaviour.delay)
        return self._behaviour

    def reset(self) -> None:
        """Forget every accepted entry and go back to ``accept``."""
        self.accepted.clear()
        self.refused.clear()
        self.known.clear()
        self.requests = 0
        self.accepted_count = 0
        self._behaviour = Behaviour()

    def _take_behaviour(self) -> Behaviour:
        b = self._behaviour
        if b.count is not None:
            b.count -= 1
            if b.count <= 0:
                self._behaviour = Behaviour()
        return b

    # ---------------------------------------------------------------- listening
    def start(self, port: int = 0, interface: str = "127.0.0.1") -> int:
        site = _Site(_Endpoint(self), self.max_body)
        p = self.reactor.listenSSL(port, site, server_context_factory(self.tls), interface=interface)
        self._ports.append(p)
        return p.getHost().port

    def start_admin(self, port: int = 0) -> int:
        """The admin endpoint, on 127.0.0.1 only (no TLS, no token: loopback is its guard)."""
        p = self.reactor.listenTCP(port, server.Site(_Admin(self)), interface="127.0.0.1")
        self._ports.append(p)
        return p.getHost().port

    def stop(self) -> defer.Deferred:
        ports, self._ports = self._ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    # ---------------------------------------------------------------- handling
    def handle(self, body: bytes, content_type: str) -> defer.Deferred:
        """The answer to one POST body (a Deferred firing with an :class:`Answer`)."""
        self.requests += 1
        b = self._take_behaviour()
        if b.mode == "accept":
            d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                          self._check, body, content_type)
            d.addCallback(self._commit)
        else:
            d = defer.succeed(self._forced(b, body, content_type))
        if b.delay:
            d.addCallback(lambda answer: _later(self.reactor, b.delay, answer))
        return d

    def _check(self, body: bytes, content_type: str) -> CheckResult:
        main, params = header_params(content_type or "")
        try:
            related = parse_related(body, content_type)
        except MTOMError as exc:
            return CheckResult("", "", refusals=(Refusal("XDSRepositoryError",
                                                         f"unreadable MTOM request: {exc}", fault_ns=_SOAP12),))
        with self._lock:
            known = dict(self.known)
        return check_request(related, trust=self.trust, known=known, mime_action=params.get("action", ""),
                             expected_to=self.expected_to, validate_schema=self.validate_schema)

    def _commit(self, result: CheckResult) -> Answer:
        """Apply an accepted request to the registry (in the reactor thread), or answer the refusal."""
        if result.accepted:
            conflict = self._conflict(result.submission)
            if conflict:
                result = CheckResult(result.message_id, result.action, refusals=(conflict,))
        if not result.accepted:
            self.refused.append(result)
            r = result.refusals[0]
            log.info("dmp_simulator.refused", message_id=logs.safe(result.message_id), code=r.code,
                     fault=r.is_fault)
            return _refusal_answer(result, r)
        sub = result.submission
        with self._lock:
            for doc in sub.documents:
                if doc.duplicate_of:
                    continue
                if doc.replaces:
                    old = self.known[doc.replaces]
                    self.known[doc.replaces] = replace(old, status=_DEPRECATED)
                self.known[doc.entry_uuid] = KnownEntry(doc.entry_uuid, doc.unique_id, doc.patient_id, doc.hash,
                                                        replaces=doc.replaces)
            for upd in sub.status_updates:
                self.known[upd["target"]] = replace(self.known[upd["target"]], status=upd["to"])
        self.accepted.append(sub)
        self.accepted_count += 1
        self._store(sub)
        log.info("dmp_simulator.accepted", message_id=logs.safe(sub.message_id),
                 action="ITI-41" if sub.action == ITI41_ACTION else "ITI-57",
                 documents=len(sub.documents), updates=len(sub.status_updates))
        action = ACTION_ITI41_RESPONSE if sub.action == ITI41_ACTION else ACTION_ITI57_RESPONSE
        body, ct = build_success(sub.message_id, action=action)
        return Answer(200, ct, body)

    def _conflict(self, sub: Submission) -> Optional[Refusal]:
        """A target changed between the check (in a thread) and now: refuse the later request."""
        with self._lock:
            for doc in sub.documents:
                if doc.replaces and not doc.duplicate_of and self.known.get(doc.replaces) is not None \
                        and self.known[doc.replaces].status != STATUS_APPROVED:
                    return Refusal("XDSUnresolvedReferenceException", "RPLC target was replaced meanwhile",
                                   doc.entry_id)
            for upd in sub.status_updates:
                if self.known[upd["target"]].status not in (upd["from"], upd["to"]):
                    return Refusal("XDSMetadataUpdateError", "the entry's status changed meanwhile")
        return None

    def _forced(self, b: Behaviour, body: bytes, content_type: str) -> Answer:
        relates_to, action = _peek_addressing(body, content_type)
        log.info("dmp_simulator.forced", mode=b.mode, message_id=logs.safe(relates_to))
        if b.mode == "http":
            return Answer(b.http_status, "text/plain; charset=utf-8", b"simulated HTTP error\n")
        if b.mode == "errors":
            errors = [RegistryError(**e) for e in b.errors] or [
                RegistryError("XDSRepositoryError", "simulated registry error")]
            resp_action = ACTION_ITI57_RESPONSE if action == ITI57_ACTION else ACTION_ITI41_RESPONSE
            out, ct = build_error_list(relates_to, errors, status=b.status, action=resp_action)
            return Answer(b.http_status or 200, ct, out)
        out, ct = build_fault(relates_to, code=b.fault_code, dmp_code=b.dmp_code, dmp_label=b.dmp_label,
                              reason=b.dmp_label or "simulated fault")
        return Answer(b.http_status or (400 if b.fault_code == "Sender" else 500), ct, out)

    # ---------------------------------------------------------------- store
    def _store(self, sub: Submission) -> None:
        if self.store_dir is None:
            return
        self._seq += 1
        safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", sub.message_id)[-60:] or "no-id"
        d = self.store_dir / f"{self._seq:06d}-{safe_id}"
        d.mkdir(parents=True, exist_ok=True)
        summary = sub.summary()
        for i, doc in enumerate(sub.documents):
            name = f"document-{i + 1}" + (".xml" if doc.mime_type.endswith("xml") else ".bin")
            (d / name).write_bytes(doc.content)
            summary["documents"][i]["file"] = name
        (d / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")

    def summaries(self) -> list[dict]:
        return [s.summary() for s in self.accepted]


_SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
_DEPRECATED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"


def _later(reactor, delay: float, value):
    d = defer.Deferred()
    reactor.callLater(delay, d.callback, value)
    return d


def _peek_addressing(body: bytes, content_type: str) -> tuple[str, str]:
    """(MessageID, Action) of a request, best effort, for forced answers."""
    try:
        root = parse_related(body, content_type).root
    except MTOMError:
        return "", ""
    mid = re.search(rb"<(?:\w+:)?MessageID\b[^>]*>\s*([^<\s]+)\s*<", root)
    act = re.search(rb"<(?:\w+:)?Action\b[^>]*>\s*([^<\s]+)\s*<", root)
    return (mid.group(1).decode("utf-8", "replace") if mid else "",
            act.group(1).decode("utf-8", "replace") if act else "")


def _refusal_answer(result: CheckResult, r: Refusal) -> Answer:
    relates_to = result.message_id
    if r.is_fault:
        code = "VersionMismatch" if r.code == "VersionMismatch" else "Sender"
        subcodes = [] if r.fault_ns == _SOAP12 else [(r.fault_ns, r.code)]
        body, ct = build_fault(relates_to, code=code, subcodes=subcodes, reason=r.context)
        return Answer(400 if code == "Sender" else 500, ct, body)
    action = ACTION_ITI57_RESPONSE if result.action == ITI57_ACTION else ACTION_ITI41_RESPONSE
    body, ct = build_error_list(relates_to, [RegistryError(r.code, r.context, "Error", r.location)], action=action)
    return Answer(200, ct, body)


# -------------------------------------------------------------------- Twisted web plumbing
class _LimitedRequest(server.Request):
    """Refuses a body larger than the site's ``max_body`` without keeping it in memory."""

    too_big = False

    def gotLength(self, length):
        if length is not None and length > self.channel.site.max_body:
            self.too_big = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.too_big:
            return
        if self.content.tell() + len(data) > self.channel.site.max_body:
            self.too_big = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)


class _Site(server.Site):
    requestFactory = _LimitedRequest

    def __init__(self, root, max_body: int) -> None:
        super().__init__(root)
        self.max_body = max_body
        self.displayTracebacks = False

    def log(self, request):          # no access log: the simulator logs its own events
        pass


class _Endpoint(resource.Resource):
    isLeaf = True

    def __init__(self, sim: DMPSimulator) -> None:
        super().__init__()
        self.sim = sim

    def render_POST(self, request):
        transport = request.channel.transport
        peer_cert = getattr(transport, "getPeerCertificate", lambda: None)()
        if peer_cert is None:                       # belt and braces: the handshake requires one
            request.setResponseCode(http.FORBIDDEN)
            return b"client certificate required\n"
        if request.too_big:
            request.setResponseCode(http.REQUEST_ENTITY_TOO_LARGE)
            return b"request too large\n"
        body = request.content.read()
        content_type = (request.getHeader("content-type") or "")
        d = self.sim.handle(body, content_type)

        def write(answer: Answer):
            if request._disconnected:
                return
            request.setResponseCode(answer.code)
            request.setHeader("content-type", answer.content_type)
            request.write(answer.body)
            request.finish()

        def fail(f):
            log.error("dmp_simulator.error", error=logs.error_text(f.value))
            if not request._disconnected:
                request.setResponseCode(http.INTERNAL_SERVER_ERROR)
                request.finish()

        d.addCallback(write).addErrback(fail)
        return server.NOT_DONE_YET

    def render_GET(self, request):
        request.setResponseCode(http.NOT_ALLOWED)
        request.setHeader("allow", "POST")
        return b""


class _Admin(resource.Resource):
    isLeaf = True

    def __init__(self, sim: DMPSimulator) -> None:
        super().__init__()
        self.sim = sim

    def _json(self, request, obj, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader("content-type", "application/json")
        return json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")

    def render_GET(self, request):
        path = request.path.rstrip(b"/")
        if path == b"/behaviour":
            return self._json(request, asdict(self.sim.behaviour))
        if path == b"/accepted":
            return self._json(request, self.sim.summaries())
        if path == b"/refused":
            return self._json(request, [{"message_id": r.message_id, "refusals": [asdict(x) for x in r.refusals]}
                                        for r in self.sim.refused])
        if path == b"/health":
            return self._json(request, {"requests": self.sim.requests, "accepted": self.sim.accepted_count,
                                        "refused": len(self.sim.refused)})
        return self._json(request, {"error": "not found"}, 404)

    def render_PUT(self, request):
        if request.path.rstrip(b"/") != b"/behaviour":
            return self._json(request, {"error": "not found"}, 404)
        try:
            data = json.loads(request.content.read() or b"{}")
            if not isinstance(data, dict):
                raise ValueError("a JSON object is expected")
            b = self.sim.set_behaviour(**data) if data else self.sim.set_behaviour()
        except (ValueError, TypeError) as exc:
            return self._json(request, {"error": str(exc)}, 400)
        return self._json(request, asdict(b))

    def render_POST(self, request):
        path = request.path.rstrip(b"/")
        if path == b"/reset":
            self.sim.reset()
            return self._json(request, {"reset": True})
        if path == b"/behaviour":
            return self.render_PUT(request)
        return self._json(request, {"error": "not found"}, 404)

