"""Status endpoint for hospital IT: ``/health``, ``/ready``, ``/status`` (JSON), ``/metrics``
(Prometheus, see ``engine.status.metrics``).

Authentication happens on the request headers, before any body byte is read or parsed (lesson of
Mirth CVE-2023-43208, a pre-authentication deserialisation of the request body): a request without the bearer token is
answered 401 and its connection closed as soon as its headers are complete. ``/health`` and
``/ready`` answer without the token (orchestrator probes; they say nothing but up/ready), though
wrong credentials are refused there too; everything else needs it. Every error is a JSON object ``{"error": ...}``, and no ``Server``
header names the software or its version. The endpoints are
read-only GETs; any request body is refused. A token is required whenever one is configured, and
configuration refuses a non-loopback bind without one. The scheme ``Bearer`` is matched without
regard to case (RFC 7235 §2.1).

Slow or many clients: a connection must complete its request headers within
``HEADER_TIMEOUT_S`` (a client dribbling a byte at a time is closed, whatever Twisted's idle
timer says), an idle connection is closed after ``IDLE_TIMEOUT_S``, and at most
``MAX_CONNECTIONS`` are open at once (more are closed on arrival, logged once per burst).
"""
from __future__ import annotations

import hmac
import json
import time
from datetime import datetime, timezone

from twisted.internet import defer, threads
from twisted.web import resource, server

from engine import logs, web
from engine.connectors.certificates import ConfiguredCertificates
from engine.status.metrics import (CONTENT_TYPE_LATEST, EngineCollector, registry_for,
                                   render as render_metrics)

log = logs.get("engine.status")

MAX_BODY = 0  # read-only endpoints: no body accepted
HEADER_TIMEOUT_S = 10.0  # request line and headers complete within this, from the connection
IDLE_TIMEOUT_S = 30.0    # a keep-alive connection with nothing to do is closed after this
MAX_CONNECTIONS = 64     # status pollers are few; a flood must not exhaust the process


OPEN_PATHS = (b"/health", b"/ready")  # probes: answerable without the token


class StatusSite(web.GuardedSite):
    log_name = "status"

    def __init__(self, root, token: str | None, *, header_timeout: float = HEADER_TIMEOUT_S,
                 idle_timeout: float = IDLE_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS):
        super().__init__(root, header_timeout=header_timeout, idle_timeout=idle_timeout,
                         max_connections=max_connections)
        self.token = token.encode() if token else None

    def refusal(self, request, method, path, length):
        creds = request.requestHeaders.getRawHeaders(b"authorization") or []
        # a probe sends no credentials; wrong credentials are refused wherever they are sent
        if not (path in OPEN_PATHS and not creds) and not self.authorized(creds):
            return web.Refusal(401, b"Unauthorized", b"WWW-Authenticate: Bearer\r\n")
        if length is not None and length > MAX_BODY:
            return web.Refusal(413, b"Payload Too Large")
        return None

    def authorized(self, headers: list[bytes]) -> bool:
        if self.token is None:
            return True
        for value in headers:
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token):
                return True
        return False


_json_error = web.json_error


class _Root(resource.Resource):
    """The site's root: unknown paths and the root itself answer a JSON 404."""

    def getChild(self, path, request):
        return _NotFound()

    def render(self, request):
        return _json_error(request, 404, "not found")


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        return _json_error(request, 404, "not found")


class _ReadOnly(resource.Resource):
    """A read-only leaf answered later: ``answer()`` gives ``(code, content type, body)``."""

    isLeaf = True

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _json_error(request, 405, "method not allowed")
        if request.postpath not in ([], [b""]):
            return _json_error(request, 404, "not found")
        d = self.answer()

        def ok(result):
            code, content_type, body = result
            request.setResponseCode(code)
            request.setHeader(b"content-type", content_type)
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        def fail(failure):
            log.error("status.failed", path=request.path.decode("ascii", "replace")[:64],
                      error=logs.error_text(failure.value))
            request.write(_json_error(request, 500, "internal error"))
            request.finish()

        d.addCallbacks(ok, fail)
        return server.NOT_DONE_YET

    def answer(self) -> defer.Deferred:
        raise NotImplementedError


class _JSON(_ReadOnly):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def answer(self):
        d = defer.maybeDeferred(self.fn)
        return d.addCallback(lambda r: (r[0], b"application/json",
                                        json.dumps(r[1], default=str, indent=1).encode()))


class _Metrics(_ReadOnly):
    """``/metrics``: the Prometheus exposition, built in a thread (it reads the store)."""

    def __init__(self, registry):
        super().__init__()
        self.registry = registry

    def answer(self):
        d = threads.deferToThread(render_metrics, self.registry)
        return d.addCallback(lambda body: (200, CONTENT_TYPE_LATEST.encode(), body))


class StatusService:
    """Builds the JSON documents from the running engine (in-memory counters + store aggregates)."""

    # /status answers from store aggregates at most this old; a slower aggregate is kept
    # STATS_COST_FACTOR times as long as it took, so that however often the status is polled,
    # computing it takes at most about 1/STATS_COST_FACTOR of a core.
    STATS_MAX_AGE_S = 1.0
    STATS_COST_FACTOR = 20

    def __init__(self, engine):
        self.engine = engine
        self._cache = (0.0, None)
        self._stats_ttl = self.STATS_MAX_AGE_S
        self.certs = ConfiguredCertificates()

    def certificates(self) -> defer.Deferred:
        """The configured certificates' expiries (:class:`Expiry`, read in a thread)."""
        return threads.deferToThread(self.certs.expiries, self.engine.config)

    def health(self):
        return 200, {"status": "alive", "version": self.engine.version}

    @defer.inlineCallbacks
    def ready(self):
        eng = self.engine
        store_ok = yield threads.deferToThread(eng.store.ping)
        ready = bool(store_ok and eng.recovery_done and eng.store.writer_healthy and not eng.stopping)
        body = {"ready": ready, "store": bool(store_ok), "writer_healthy": bool(eng.store.writer_healthy),
                "recovery_done": eng.recovery_done, "stopping": eng.stopping}
        return (200 if ready else 503), body

    @defer.inlineCallbacks
    def status(self):
        eng = self.engine
        now = time.monotonic()
        at, stats = self._cache
        if stats is None or now - at > self._stats_ttl:
            try:
                stats = yield threads.deferToThread(eng.store.stats)
                done = time.monotonic()
                self._cache = (done, stats)
                self._stats_ttl = max(self.STATS_MAX_AGE_S, self.STATS_COST_FACTOR * (done - now))
            except Exception as exc:  # noqa: BLE001
                stats = {"channels": {}, "destinations": {}, "error": f"store unavailable: {logs.error_text(exc, 120)}"}
        body = {
            "engine": eng.config.engine.name,
            "version": eng.version,
            "uptime_s": round(time.time() - eng.started_at, 1),
            "ready": bool(eng.recovery_done and eng.store.writer_healthy and not eng.stopping),
            "config": {"path": str(eng.config_path), "fingerprint": eng.config_fingerprint,
                       "last_reload": eng.last_reload},
            # CDA validation resources in use: {"version": ..., "source": "packaged" | folder}
            "cda_resources": getattr(eng, "cda_resources", None),
            "channels": {},
            "destinations": {},
            # firing alerts and the last notices sent (engine.alerting)
            "alerts": eng.alerts.status() if getattr(eng, "alerts", None) is not None else None,
            # age of the store counts below (see STATS_COST_FACTOR)
            "counts_age_s": round(max(0.0, time.monotonic() - self._cache[0]), 1),
        }
        if "error" in stats:
            body["store_error"] = stats["error"]
        for name, ch in eng.channels.items():
            s = stats.get("channels", {}).get(name, {})
            body["channels"][name] = {
                "type": ch.cfg.type,
                "listening": ch.listening_on,
                "open_connections": ch.factory.open_connections if ch.factory else 0,
                "received": s.get("received", 0),
                "filtered": s.get("filtered", 0),
                "rejected": s.get("rejected", 0),
                "duplicates": s.get("duplicates", 0),
                "conflicts": s.get("conflicts", 0),
                "since_start": vars(ch.handler.counters) if ch.handler else {},
                "last_received_at": _iso(ch.handler.last_received_at) if ch.handler and ch.handler.last_received_at else None,
                "framing": dict(ch.factory.counters) if ch.factory else {},
            }
        names = set(eng.workers) | set(stats.get("destinations", {}))
        for name in sorted(names):
            s = stats.get("destinations", {}).get(name, {})
            w = eng.workers.get(name)
            body["destinations"][name] = {
                "configured": w is not None,
                # enabled: false in routes.yaml: nothing is sent, entries wait
                "enabled": bool(getattr(w.cfg, "enabled", True)) if w else None,
                "queued": s.get("queued", 0),
                "in_flight": s.get("in_flight", 0),
                "sent": s.get("sent", 0),
                "errored": s.get("error", 0),
                "filtered": s.get("filtered", 0),
                "cancelled": s.get("cancelled", 0),
                # errors resolved by a later delivery or marked handled (no longer counted above)
                "resolved": s.get("resolved", 0),
                "queue_depth": s.get("queued", 0) + s.get("in_flight", 0),
                "oldest_queued_age_s": s.get("oldest_queued_age_s"),
                "last_error": w.last_error if w else None,
                "last_error_at": _iso(w.last_error_at) if w and w.last_error_at else None,
                "last_sent_at": _iso(w.last_sent_at) if w and w.last_sent_at else None,
                "peer_down": w.peer_down if w else None,
                # an operator's pause (who and since when; the reason is in the audit trail)
                "paused": bool(w and w.paused),
            }
            p = getattr(eng, "paused", {}).get(name)
            if p is not None and w is not None and w.paused:
                body["destinations"][name].update(paused_by=p["by"], paused_since=_iso(p["at"]))
        return 200, body


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat()


def build_site(service: StatusService, token: str | None, **limits) -> StatusSite:
    root = _Root()
    root.putChild(b"health", _JSON(service.health))
    root.putChild(b"ready", _JSON(service.ready))
    root.putChild(b"status", _JSON(service.status))
    if getattr(service.engine, "channels", None) is not None:  # a running engine (not a bare probe)
        registry = registry_for(EngineCollector(service.engine, lambda: service.engine.store.stats()))
        root.putChild(b"metrics", _Metrics(registry))
    return StatusSite(root, token, **limits)
