"""What each console page reads and does. Store reads and password checks run in threads,
never on the reactor. Roles: a viewer sees counts, message metadata and delivery outcomes; an
operator also sees patient data (raw message, parsed segments, canonical submission, patient
search: each such view or search is audited) and acts (replay, retry, pause, handled); an admin
also reloads the routes file and reads the user list and the audit log.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from urllib.parse import urlencode

from twisted.internet import defer, threads

from engine import logs
from engine.console.patient_search import KINDS, codec, matches
from engine.console.site import Forbidden, NotFound, Redirect
from engine.hl7.message import Message

log = logs.get("engine.console")

PAGE_SIZE = 100
PATIENT_SEARCH_MAX_DAYS = 31      # a search by IPP/INS/accession reads the messages of the range
PATIENT_SEARCH_MAX_SCAN = 50000   # ... at most this many, newest range first
PATIENT_SEARCH_MAX_HITS = 500
STATUSES = ("error", "queued", "sent", "handled", "cancelled", "rejected", "filtered", "conflict")
FIELD_MAX = 128                   # search inputs are short identifiers
AUDIT_PAGE = 200

#: message ids: at most 18 digits, within a 64-bit integer column (a longer one is not found)
def _done(page, mid: int, text: str) -> "Redirect":
    """Back to the message's page, with the action's outcome shown there once."""
    page.session.flash = text[:200]
    return Redirect(f"/messages/{mid}")


_ROUTES = [
    ("GET", r"/login", "login_form"),
    ("POST", r"/login", "login"),
    ("POST", r"/logout", "logout"),
    ("GET", r"/", "dashboard"),
    ("GET", r"/messages", "messages"),
    ("GET", r"/messages/(\d{1,18})", "message"),
    ("POST", r"/messages/(\d{1,18})/replay", "replay"),
    ("POST", r"/messages/(\d{1,18})/retry", "retry"),
    ("POST", r"/messages/(\d{1,18})/handled", "handled"),
    ("POST", r"/destinations/([^/]+)/(pause|resume)", "pause"),
    ("POST", r"/admin/reload", "reload"),
    ("GET", r"/admin/users", "users"),
    ("GET", r"/admin/audit", "audit_page"),
]


class Pages:
    def __init__(self, engine, status, verify, hash_password, needs_rehash, *, session_max_age: float):
        self.engine = engine
        self.status = status            # the StatusService of /status: the dashboard's counts
        self.verify = verify            # (hash, password) -> bool, argon2: run in a thread
        self.hash_password = hash_password
        self.needs_rehash = needs_rehash
        self.session_max_age = session_max_age
        self.web = None                 # the ConsoleResource (templates, sessions, cookies)
        self._dummy_hash: str | None = None
        self._routes = [(m, re.compile(p + r"\Z"), getattr(self, n)) for m, p, n in _ROUTES]

    def route(self, method: str, path: str):
        if method == "HEAD":
            method = "GET"
        for m, rx, fn in self._routes:
            hit = rx.match(path)
            if hit and m == method:
                return fn, hit.groups()
        return None, ()

    @property
    def store(self):
        return self.engine.store

    def audit(self, page, action: str, *, target=None, outcome: str = "ok", detail=None, actor=None):
        """Write one audit row (in a thread); a failure to audit is logged, never shown."""
        d = threads.deferToThread(self.store.audit, actor or page.user, action, target=target,
                                  outcome=outcome, detail=detail, source=page.source)
        d.addErrback(lambda f: log.error("console.audit_failed", action=action, error=logs.error_text(f.value)))
        return d

    # -- login ----------------------------------------------------------------------------------
    def login_form(self, page):
        if page.session is not None:
            return Redirect("/")
        return self.web.template("login.html", page, error=None)

    @defer.inlineCallbacks
    def login(self, page):
        name = page.arg("name")[:FIELD_MAX]
        password = page.arg("password")
        keys = ("user:" + name.lower(), "addr:" + page.source)
        throttle = self.web.throttle
        wait = throttle.wait(*keys)
        if wait > 0:
            yield self.audit(page, "login.failed", actor=name, outcome="refused",
                             detail={"reason": "throttled"})
            return self.web.template("login.html", page, 429,
                                     error=f"Too many failed attempts: try again in {int(wait) + 1} s.")
        user = yield threads.deferToThread(self.store.user, name) if name else defer.succeed(None)
        usable = user is not None and user.active
        ok = yield threads.deferToThread(self._check, user.password_hash if usable else None, password)
        if not (ok and usable):
            throttle.failed(*keys)
            yield self.audit(page, "login.failed", actor=name, outcome="refused",
                             detail={"reason": "bad credentials"})
            return self.web.template("login.html", page, 401, error="Wrong user name or password.")
        throttle.succeeded(*keys)
        if self.needs_rehash(user.password_hash):
            yield threads.deferToThread(self.store.set_user, user.name,
                                        password_hash=self.hash_password(password))
        self.web.sessions.close(page.session.id if page.session else None)
        session = self.web.sessions.open(user.name, user.role)
        self.web.set_session_cookie(page.request, session.id, int(self.session_max_age))
        yield self.audit(page, "login", actor=user.name, detail={"role": user.role})
        return Redirect("/")

    def _check(self, password_hash: str | None, password: str) -> bool:
        """argon2 verify; an unknown user costs the same (a hash of a random password)."""
        if password_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = self.hash_password("unknown user: no password matches this")
            self.verify(self._dummy_hash, password + "\x00")
            return False
        try:
            return bool(self.verify(password_hash, password))
        except Exception:  # noqa: BLE001 - a malformed stored hash is a failed login
            return False

    @defer.inlineCallbacks
    def logout(self, page):
        self.web.sessions.close(page.session.id)
        self.web.clear_session_cookie(page.request)
        yield self.audit(page, "logout")
        return Redirect("/login")

    # -- dashboard ------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def dashboard(self, page):
        _code, st = yield self.status.status()
        certs = yield self.status.certificates()
        now = dt.datetime.now(dt.timezone.utc)
        cert_rows = [{"kind": c.kind, "name": c.name, "role": c.role, "not_after": c.not_after.strftime("%Y-%m-%d"),
                      "days": int((c.not_after - now).total_seconds() // 86400)} for c in certs]
        return self.web.template("dashboard.html", page, st=st, certs=cert_rows,
                                 last_reload=st.get("config", {}).get("last_reload"))

    # -- messages -------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def messages(self, page):
        today = dt.datetime.now(dt.timezone.utc).date()
        q = {k: page.arg(k)[:FIELD_MAX] for k in ("from", "to", "status", "channel", "destination",
                                                  "type", "control_id", "sending_app", "patient_kind",
                                                  "patient_value")}
        try:
            start = dt.date.fromisoformat(q["from"]) if q["from"] else today
            end = dt.date.fromisoformat(q["to"]) if q["to"] else start if q["from"] else today
        except ValueError:
            start = end = today
        q["from"], q["to"] = start.isoformat(), end.isoformat()
        since, until = _midnight(start), _midnight(end + dt.timedelta(days=1))
        offset = _offset(page)
        notes = []
        ids = None
        kind, value = q["patient_kind"], q["patient_value"]
        if value:
            page.require("operator")  # patient identifiers are patient data
            if kind not in KINDS:
                raise NotFound(kind)
            if (end - start).days + 1 > PATIENT_SEARCH_MAX_DAYS:
                start = end - dt.timedelta(days=PATIENT_SEARCH_MAX_DAYS - 1)
                since = _midnight(start)
                q["from"] = start.isoformat()
                notes.append(f"A search by {kind} covers at most {PATIENT_SEARCH_MAX_DAYS} days: from {q['from']}.")
            yield self.audit(page, "search.patient", detail={"kind": kind, "value": value,
                                                               "from": q["from"], "to": q["to"]})
            ids, complete = yield threads.deferToThread(self._patient_ids, kind, value, since, until)
            if not complete:
                notes.append(f"Only the first {PATIENT_SEARCH_MAX_SCAN} messages of the range were searched.")
        rows = yield threads.deferToThread(
            self.store.list_messages, limit=PAGE_SIZE + 1, offset=offset, since=since, until=until,
            status=q["status"] or None, channel=q["channel"] or None,
            destination=q["destination"] or None, message_type=q["type"] or None,
            control_id=q["control_id"] or None, sending_app=q["sending_app"] or None, ids=ids)
        cfg = self.engine.config
        return self.web.template(
            "messages.html", page, q=q, rows=rows[:PAGE_SIZE], more=len(rows) > PAGE_SIZE,
            offset=offset, page_size=PAGE_SIZE, statuses=STATUSES, notes=notes,
            channels=sorted(cfg.channels), destinations=sorted(cfg.destinations),
            kinds=KINDS, query=_query_without_offset(q))

    def _patient_ids(self, kind: str, value: str, since: float, until: float):
        hits: list[int] = []
        after, scanned = 0, 0
        while scanned < PATIENT_SEARCH_MAX_SCAN and len(hits) < PATIENT_SEARCH_MAX_HITS:
            batch = self.store.raw_between(since, until, after_id=after, limit=500)
            if not batch:
                return hits, True
            for mid, raw, charset in batch:
                if matches(raw, charset, kind, value):
                    hits.append(mid)
            scanned += len(batch)
            after = batch[-1][0]
        return hits, False

    @defer.inlineCallbacks
    def message(self, page, mid):
        mid = int(mid)
        m = yield threads.deferToThread(self.store.get_message, mid)
        if m is None:
            raise NotFound(mid)
        sub = yield threads.deferToThread(self.store.submission_row, mid)
        view = _message_view(m, sub, phi=page.phi)
        if page.phi:
            yield self.audit(page, "message.view", target=f"message:{mid}",
                             detail={"control_id": m.control_id, "channel": m.channel})
        flash, page.session.flash = page.session.flash, None
        return self.web.template("message.html", page, m=m, v=view, flash=flash)

    # -- actions --------------------------------------------------------------------------------
    # each action ends on the message's page, its outcome shown once from the session (_done)
    @defer.inlineCallbacks
    def replay(self, page, mid):
        page.require("operator")
        mid = int(mid)
        dests = [d for d in page.args("destination") if d]
        report: list = []
        try:
            yield threads.deferToThread(self.store.replay, [mid], dests or None, report=report)
        except ValueError as err:  # UnknownMessage is a KeyError: 404 below
            yield self.audit(page, "message.replay", target=f"message:{mid}", outcome="refused",
                             detail={"destinations": dests, "reason": str(err)[:200]})
            return _done(page, mid, f"not replayed: {err}")
        except KeyError:
            raise NotFound(mid) from None
        queued = [[t.destination, t.target, t.entry_id] for t in report if t.entry_id is not None]
        skipped = [[t.destination, t.target, t.skipped] for t in report if t.skipped]
        yield self.audit(page, "message.replay", target=f"message:{mid}",
                         detail={"destinations": dests, "queued": queued, "skipped": skipped})
        self._wake([d for d, _t, _e in queued])
        text = (f"replay queued to {', '.join(sorted({d for d, _t, _e in queued}))}" if queued
                else "nothing replayed") + (f"; skipped: {', '.join(f'{d} ({why})' for d, _t, why in skipped)}"
                                             if skipped else "")
        return _done(page, mid, text)

    def _wake(self, names) -> None:
        for n in set(names):
            w = self.engine.workers.get(n)
            if w is not None:
                w.wake()

    @defer.inlineCallbacks
    def retry(self, page, mid):
        page.require("operator")
        mid, dest = int(mid), page.arg("destination") or None
        try:
            n = yield self.engine.retry_now(mid, dest, page.user, source=page.source)
        except KeyError:  # UnknownMessage (audited by the engine)
            raise NotFound(mid) from None
        return _done(page, mid, f"retry now: {n or 0} entr{'y' if n == 1 else 'ies'}")

    @defer.inlineCallbacks
    def handled(self, page, mid):
        page.require("operator")
        mid, dest = int(mid), page.arg("destination")
        if not dest:
            raise NotFound("destination")
        try:
            n = yield threads.deferToThread(self.store.mark_handled, mid, dest)
        except KeyError:
            raise NotFound(mid) from None
        if n == 0 and dest not in self.engine.config.destinations:
            yield self.audit(page, "message.handled", target=f"message:{mid}", outcome="refused",
                             detail={"destination": dest[:FIELD_MAX], "reason": "unknown destination"})
            raise NotFound(dest)
        yield self.audit(page, "message.handled", target=f"message:{mid}", detail={"destination": dest, "entries": n})
        return _done(page, mid, f"{n} error(s) at {dest} marked handled")

    @defer.inlineCallbacks
    def pause(self, page, name, verb):
        page.require("operator")
        if name not in self.engine.config.destinations:
            raise NotFound(name)
        if verb == "pause":
            yield self.engine.pause_destination(name, page.user, page.arg("reason")[:200] or None,
                                                source=page.source)
        else:
            yield self.engine.resume_destination(name, page.user, source=page.source)
        return Redirect("/")

    def reload(self, page):
        page.require("admin")
        self.engine.reload(page.user, page.source)  # audited by the engine
        return Redirect("/")

    @defer.inlineCallbacks
    def users(self, page):
        page.require("admin")
        rows = yield threads.deferToThread(self.store.list_users)
        return self.web.template("users.html", page, users=rows)

    @defer.inlineCallbacks
    def audit_page(self, page):
        page.require("admin")
        q = {k: page.arg(k)[:FIELD_MAX] for k in ("from", "to", "actor", "action")}
        since = until = None
        try:
            if q["from"]:
                since = _midnight(dt.date.fromisoformat(q["from"]))
            if q["to"]:
                until = _midnight(dt.date.fromisoformat(q["to"]) + dt.timedelta(days=1))
        except ValueError:
            since = until = None
        offset = _offset(page)
        rows = yield threads.deferToThread(self.store.audit_list, since=since, until=until,
                                           actor=q["actor"] or None, action=q["action"] or None,
                                           limit=AUDIT_PAGE + 1, offset=offset)
        # reading the trail is itself audited (DICOM "Audit Log Used"), as `minipfi audit list`
        yield self.audit(page, "audit.view", detail={**{k: v for k, v in q.items() if v},
                                                     "offset": offset, "rows": len(rows[:AUDIT_PAGE])})
        return self.web.template("audit.html", page, rows=rows[:AUDIT_PAGE], more=len(rows) > AUDIT_PAGE,
                                 offset=offset, page_size=AUDIT_PAGE, q=q, query=_query_without_offset(q),
                                 detail=_detail_text)


def _midnight(day: dt.date) -> float:
    """Epoch seconds of 00:00 UTC on ``day`` (the console's dates are UTC, as stored)."""
    return dt.datetime.combine(day, dt.time(), dt.timezone.utc).timestamp()


def _offset(page) -> int:
    try:
        return max(0, int(page.arg("offset") or 0))
    except ValueError:
        return 0


def _query_without_offset(q: dict) -> str:
    return urlencode({k: v for k, v in q.items() if v})


def _detail_text(detail) -> str:
    if detail is None:
        return ""
    if isinstance(detail, str):
        return detail
    return json.dumps(detail, ensure_ascii=False, sort_keys=True)


def _message_view(m, sub: dict | None, *, phi: bool) -> dict:
    """What the message page shows; patient data (raw, segments, response, submission) only
    when ``phi``."""
    chains: dict[tuple[str, str], list] = {}
    for e in m.entries:
        chains.setdefault((e.destination, e.target), []).append(e)
    targets = []
    for (dest, target), entries in chains.items():
        latest = entries[-1]
        targets.append({
            "destination": dest, "target": target, "status": latest.status,
            "entries": [{"id": e.id, "status": e.status, "attempts": e.attempts, "created": e.created_at,
                         "updated": e.updated_at, "next": e.next_attempt_at if e.status == "queued" else None,
                         "error": e.last_error, "replay_of": e.replay_of,
                         "response": _text(e.response, m.charset).replace("\r", "\n")
                         if phi and e.response else None}
                        for e in entries]})
    destinations = sorted({d for d, _t in chains})
    errored = sorted({d for (d, _t), es in chains.items() if es[-1].status == "error"})
    # retry now: entries waiting for a retry, not those held for deferred delivery (not tried yet)
    waiting = sorted({d for (d, _t), es in chains.items() if es[-1].status == "queued" and es[-1].attempts})
    findings, submission, validation = [], None, None
    if sub is not None:
        try:
            canonical = json.loads(sub["submission"]) if sub.get("submission") else {}
        except ValueError:
            canonical = {}
        # rule, code, location and text: written by the engine, no patient data (see engine.reports)
        findings = [{"level": label, "code": i.get("code"), "rule": i.get("rule"),
                     "location": i.get("location"), "text": i.get("text")}
                    for label, key in (("error", "errors"), ("warning", "warnings"))
                    for i in (canonical.get(key) or []) if isinstance(i, dict)]
        if phi:
            submission = json.dumps(canonical, indent=1, ensure_ascii=False)
            validation = sub.get("validation")
    view = {"targets": targets, "destinations": destinations, "errored": errored, "waiting": waiting,
            "findings": findings, "submission_kind": sub["kind"] if sub else None,
            "submission_errors": sub["errors"] if sub else None,
            "submission": submission, "validation": validation, "raw": None, "segments": None, "ack": None,
            "pruned": "payload_pruned" in (getattr(m, "flags", None) or "")}  # by retention
    if phi:
        view["ack"] = _text(m.ack, m.charset).replace("\r", "\n")
    if phi and not view["pruned"]:
        view["raw"] = _text(m.raw, m.charset).replace("\r", "\n")
        try:
            msg = Message.parse(m.raw, codec(m.charset))
            view["segments"] = [(seg.name, [seg.field(i) for i in range(1, len(seg) + 1)]) for seg in msg]
        except Exception:  # noqa: BLE001 - a message the reader cannot split: the raw text stays
            view["segments"] = None
    return view


def _text(raw: bytes | None, charset: str) -> str:
    if raw is None:
        return ""
    return bytes(raw).decode(codec(charset), "replace")
