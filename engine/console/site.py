"""The console's HTTP layer: what is refused on headers, sessions as cookies, CSRF and origin
checks, security headers, page rendering (Jinja2, autoescaped). What each page reads and does is
in :mod:`engine.console.pages`.

Refused as soon as the headers are complete, the body never read (``engine.web``): a POST
without a live session cookie (except ``/login``), a POST body over ``MAX_FORM_BODY`` (the login
form over ``MAX_LOGIN_BODY``), without a length, or not ``application/x-www-form-urlencoded``
(no multipart parser runs), a body on a GET. Every page answers with a Content-Security-Policy
of ``default-src 'self'`` (no script, style or frame from elsewhere; the console has no
JavaScript), ``X-Frame-Options: DENY`` and ``Cache-Control: no-store`` (pages may hold patient
data). The session cookie is ``Secure; HttpOnly; SameSite=Strict; Path=/`` (OWASP Session
Management Cheat Sheet, "Cookies").
"""
from __future__ import annotations

import time
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from urllib.parse import urlsplit

import jinja2
from twisted.internet import defer, threads
from twisted.web import resource, server

from engine import logs, web
from engine.console.sessions import Sessions, Throttle, csrf_ok

log = logs.get("engine.console")

COOKIE = "minipfi_console"
MAX_LOGIN_BODY = 1024      # name and password: a few hundred bytes at most
MAX_FORM_BODY = 16 * 1024  # the largest action form (a replay naming destinations)
HEADER_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0
MAX_CONNECTIONS = 64
RECHECK_S = 10.0           # an open session reads its account again at most this often
OPEN_GET = ("/login", "/static/console.css")
FORM = b"application/x-www-form-urlencoded"
ROLES = ("viewer", "operator", "admin")  # each role may do what the ones before it may

HEADERS = (
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)


class Forbidden(Exception):
    """A page or action the session's role may not use (403)."""


class NotFound(Exception):
    pass


class Redirect(Exception):
    def __init__(self, location: str):
        super().__init__(location)
        self.location = location


def at_least(role: str, needed: str) -> bool:
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def session_id(request) -> str | None:
    """The session cookie of the request, read from the raw header (before the body)."""
    for header in request.requestHeaders.getRawHeaders(b"cookie") or []:
        try:
            jar = SimpleCookie(header.decode("latin-1"))
        except CookieError:
            continue
        if COOKIE in jar:
            return jar[COOKIE].value
    return None


class ConsoleSite(web.GuardedSite):
    log_name = "console"

    def __init__(self, root, sessions: Sessions, *, header_timeout: float = HEADER_TIMEOUT_S,
                 idle_timeout: float = IDLE_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS):
        super().__init__(root, header_timeout=header_timeout, idle_timeout=idle_timeout,
                         max_connections=max_connections)
        self.sessions = sessions

    def refusal(self, request, method, path, length):
        if method in (b"GET", b"HEAD"):
            return web.Refusal(413, b"Payload Too Large") if length else None
        if method != b"POST":
            return web.Refusal(405, b"Method Not Allowed", b"Allow: GET, HEAD, POST\r\n")
        if path != b"/login" and self.sessions.get(session_id(request)) is None:
            return web.Refusal(403, b"Forbidden")
        if length is None:
            return web.Refusal(411, b"Length Required")
        if length > (MAX_LOGIN_BODY if path == b"/login" else MAX_FORM_BODY):
            return web.Refusal(413, b"Payload Too Large")
        ctype = (request.requestHeaders.getRawHeaders(b"content-type") or [b""])[0]
        if ctype.split(b";", 1)[0].strip().lower() != FORM:
            return web.Refusal(415, b"Unsupported Media Type")
        return None


class Page:
    """One request as the page handlers see it: the session, the form, the audit source."""

    def __init__(self, request, session):
        self.request = request
        self.session = session

    @property
    def user(self) -> str:
        return self.session.user if self.session else ""

    @property
    def role(self) -> str:
        return self.session.role if self.session else ""

    @property
    def phi(self) -> bool:
        """May this user see patient data (raw messages, parsed segments, patient search)?"""
        return bool(self.session) and at_least(self.session.role, "operator")

    @property
    def source(self) -> str:
        addr = self.request.getClientAddress()
        return getattr(addr, "host", "") or ""

    def require(self, role: str) -> None:
        if not self.session or not at_least(self.session.role, role):
            raise Forbidden(role)

    def arg(self, name: str, default: str = "") -> str:
        values = self.request.args.get(name.encode()) or []
        return values[0].decode("utf-8", "replace").strip() if values else default

    def args(self, name: str) -> list[str]:
        return [v.decode("utf-8", "replace") for v in self.request.args.get(name.encode()) or []]


class ConsoleResource(resource.Resource):
    """The whole console as one leaf: ``pages.route`` maps (method, path parts) to a handler."""

    isLeaf = True

    def __init__(self, pages, sessions: Sessions, throttle: Throttle, *, secure: bool):
        super().__init__()
        self.pages = pages
        self.sessions = sessions
        self.throttle = throttle
        self.secure = secure
        self.env = jinja2.Environment(loader=jinja2.PackageLoader("engine.console", "templates"),
                                      autoescape=True, undefined=jinja2.StrictUndefined)
        self.env.filters["when"] = _when
        self.css = resources.files("engine.console").joinpath("static/console.css").read_bytes()

    def render(self, request):
        for name, value in HEADERS:
            request.setHeader(name, value)
        if self.secure:
            request.setHeader(b"strict-transport-security", b"max-age=31536000")
        path = request.path.decode("utf-8", "replace")
        if path == "/static/console.css" and request.method in (b"GET", b"HEAD"):
            request.setHeader(b"content-type", b"text/css; charset=utf-8")
            request.setHeader(b"cache-control", b"max-age=3600")
            return self.css
        session = self.sessions.get(session_id(request))
        page = Page(request, session)
        d = self._recheck(page) if session is not None else defer.succeed(None)
        d.addCallback(lambda _: self._dispatch(page, request.method, path))
        d.addCallbacks(lambda body: self._finish(request, body), lambda f: self._failed(request, page, f))
        return server.NOT_DONE_YET

    @defer.inlineCallbacks
    def _recheck(self, page: Page):
        """A disabled account or a changed role applies within ``RECHECK_S`` to open sessions
        (an admin may change them with the CLI, in another process)."""
        s = page.session
        now = self.sessions.clock()
        if now - s.checked < RECHECK_S:
            return
        user = yield threads.deferToThread(self.pages.store.user, s.user)
        s.checked = now
        if user is None or not user.active:
            self.sessions.close(s.id)
            page.session = None
        else:
            s.role = user.role

    def _dispatch(self, page: Page, method: bytes, path: str):
        if method == b"POST":
            if not self._same_origin(page.request):
                raise Forbidden("origin")
            if path != "/login" and (page.session is None or not csrf_ok(page.session, page.arg("csrf"))):
                raise Forbidden("csrf")
        elif page.session is None and path not in OPEN_GET:
            raise Redirect("/login")
        handler, params = self.pages.route(method.decode(), path)
        if handler is None:
            raise NotFound(path)
        return handler(page, *params)

    def _same_origin(self, request) -> bool:
        """The browser says where the form came from (Origin, else Referer): it must be this
        site (OWASP CSRF Prevention Cheat Sheet, "Verifying Origin With Standard Headers")."""
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        own = ("https" if request.isSecure() else "http") + "://" + host
        origin = request.getHeader(b"origin")
        if origin is not None:
            return origin.decode("latin-1") == own
        referer = request.getHeader(b"referer")
        if referer is None:
            return False
        r = urlsplit(referer.decode("latin-1"))
        return f"{r.scheme}://{r.netloc}" == own

    def template(self, name: str, page: Page, status: int = 200, **ctx) -> tuple[int, bytes]:
        s = page.session
        body = self.env.get_template(name).render(
            user=s.user if s else None, role=s.role if s else None, csrf=s.csrf if s else "",
            phi=page.phi, admin=bool(s) and at_least(s.role, "admin"),
            operator=bool(s) and at_least(s.role, "operator"), **ctx)
        return status, body.encode("utf-8")

    def _finish(self, request, result) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        if isinstance(result, Redirect):
            return self._finish_redirect(request, result.location)
        code, body = result
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.write(body)
        request.finish()

    def _finish_redirect(self, request, location: str) -> None:
        request.setResponseCode(303)
        request.setHeader(b"location", location.encode("utf-8"))
        request.finish()

    def _failed(self, request, page: Page, failure) -> None:
        if getattr(request, "_disconnected", False) or request.finished:
            return
        exc = failure.value
        if isinstance(exc, Redirect):
            return self._finish_redirect(request, exc.location)
        if isinstance(exc, Forbidden):
            code, text = 403, "You may not do this."
        elif isinstance(exc, NotFound):
            code, text = 404, "Not found."
        else:
            log.error("console.failed", path=request.path.decode("ascii", "replace")[:64],
                      error=logs.error_text(exc))
            code, text = 500, "Internal error (see the engine log)."
        try:
            result = self.template("error.html", page, code, code=code, text=text)
        except Exception as err:  # noqa: BLE001 - the error page itself failed: plain text
            log.error("console.error_page_failed", error=logs.error_text(err))
            result = (code, text.encode())
        self._finish(request, result)

    def set_session_cookie(self, request, sid: str, max_age: int) -> None:
        request.setHeader(b"set-cookie", (
            f"{COOKIE}={sid}; Max-Age={max_age}; Path=/; Secure; HttpOnly; SameSite=Strict").encode())

    def clear_session_cookie(self, request) -> None:
        request.setHeader(b"set-cookie", f"{COOKIE}=; Max-Age=0; Path=/; Secure; HttpOnly; SameSite=Strict".encode())


def _when(value) -> str:
    """An epoch or ISO time as ``YYYY-MM-DD HH:MM:SS`` UTC."""
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value))
    text = str(value)
    return text[:19].replace("T", " ")
