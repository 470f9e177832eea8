"""HTTP building blocks shared by the engine's web sites (the status endpoint, the console).

Authentication happens on the request headers, before any body byte is read or parsed (lesson of
Mirth CVE-2023-43208, a pre-authentication deserialisation of the request body): a site decides in
``refusal(request, method, path, length)`` whether a request may go on once its headers are
complete; a refused one is answered at once and its connection closed, its body never read.
Errors are JSON objects ``{"error": ...}`` and no ``Server`` header names the software.

Slow or many clients: a connection must complete its request headers within ``header_timeout``
(a client dribbling a byte at a time is closed, whatever Twisted's idle timer says), an idle
connection is closed after ``idle_timeout``, and at most ``max_connections`` are open at once
(more are closed on arrival, logged once per burst).
"""
from __future__ import annotations

import json

from twisted.web import http, server

from engine import logs

log = logs.get("engine.web")


class Refusal(tuple):
    """``(code, phrase, extra header lines)`` answered before the body is read."""

    def __new__(cls, code: int, phrase: bytes, extra: bytes = b""):
        return super().__new__(cls, (code, phrase, extra))


class GuardedChannel(http.HTTPChannel):
    """An HTTP connection with a deadline for its headers and a place in the site's count."""

    def connectionMade(self):
        super().connectionMade()
        site = self.site
        if site.open_connections >= site.max_connections:
            if not site.refusing:
                site.refusing = True
                log.warning(site.log_name + ".connections_capped", limit=site.max_connections)
            self._counted = False
            self.transport.abortConnection()
            return
        site.refusing = False
        site.open_connections += 1
        self._counted = True
        self._header_deadline = self.callLater(site.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self):
        self._header_deadline = None
        self.transport.abortConnection()

    def headers_complete(self):
        call = getattr(self, "_header_deadline", None)
        if call is not None and call.active():
            call.cancel()
        self._header_deadline = None

    def connectionLost(self, reason):
        self.headers_complete()
        if getattr(self, "_counted", False):
            self._counted = False
            self.site.open_connections -= 1
        super().connectionLost(reason)


class GuardedRequest(server.Request):
    """Asks its site about the request once the headers are complete; no ``Server`` header."""

    def gotLength(self, length):
        self.channel.headers_complete()
        ch = self.channel
        path = (getattr(ch, "_path", None) or b"").split(b"?", 1)[0]
        refusal = ch.site.refusal(self, getattr(ch, "_command", b"") or b"", path, length)
        if refusal is not None:
            self.refuse(*refusal)
            return
        super().gotLength(length)

    def refuse(self, code: int, phrase: bytes, extra: bytes = b"") -> None:
        body = json.dumps({"error": phrase.decode()}).encode()
        self.channel.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n%s"
            % (code, phrase, len(body), extra, body)
        )
        self.channel.transport.loseConnection()
        self.channel._refused = True

    def setHeader(self, name, value):
        if name.lower() == b"server":  # no software name or version for scanners
            return
        super().setHeader(name, value)

    def handleContentChunk(self, data):
        if getattr(self.channel, "_refused", False):
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if getattr(self.channel, "_refused", False):
            return
        super().requestReceived(command, path, version)


class GuardedSite(server.Site):
    """A site of guarded requests; subclasses say what they refuse on headers (``refusal``)."""

    requestFactory = GuardedRequest
    protocol = GuardedChannel
    log_name = "web"

    def __init__(self, root, *, header_timeout: float, idle_timeout: float, max_connections: int):
        super().__init__(root, timeout=idle_timeout)
        self.displayTracebacks = False
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.open_connections = 0
        self.refusing = False

    def refusal(self, request, method: bytes, path: bytes, length: int | None) -> Refusal | None:
        raise NotImplementedError

    def log(self, request):  # access log without query strings or bodies
        pass


def json_error(request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps({"error": text}).encode()
