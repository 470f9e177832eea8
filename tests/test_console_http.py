"""The console over real sockets, on a real engine running in the test's reactor thread (SQLite):
login, sessions and throttling, refusals before the body, CSRF and origin, roles, audit rows,
escaping, and patient data shown only to operators and admins."""
from __future__ import annotations

import socket
import textwrap
import time

import pytest

from engine.app import Engine
from engine.passwords import hash_password
from mllp.blocking import BlockingMLLPClient
from tests import console_rig as rig, reactor_thread
from tests.enginectl import free_port
from tests.peers import Receiver


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    ris = Receiver(policy=lambda m: "AE" if b"|BAD-" in m else "AA")
    port, console_port = free_port(), free_port()
    (tmp / "routes.yaml").write_text(textwrap.dedent(rig.config(port, free_port(), console_port, ris.port, throttle=(
        "login_throttle: {max_failures: 3, max_failures_per_address: 3, base_delay: 30s}"), alerts=rig.ALWAYS_FIRING)))
    eng = Engine(tmp / "routes.yaml", tmp / "data", reactor_thread.reactor)
    reactor_thread.call(eng.start)
    for name, pw in rig.PASSWORDS.items():
        eng.store.add_user(name, rig.ROLES[name], hash_password(pw))
    with BlockingMLLPClient("127.0.0.1", port) as c:
        for cid in ("OK-1", "BAD-1", "<script>alert(1)</script>"):
            c.send(rig.adt(cid, name="<script>x</script>" if cid.startswith("<") else rig.NAME))
    ids = {m.control_id: m.id for m in eng.store.list_messages(limit=10)}
    deadline = time.time() + 10
    while time.time() < deadline and [m.status for m in eng.store.list_messages(limit=10)].count("sent") < 2:
        time.sleep(0.05)
    yield eng, console_port, ids
    reactor_thread.call(eng.shutdown)
    ris.close()


@pytest.fixture
def clients(console):
    eng, port, _ids = console
    eng.console_site.resource.throttle._keys.clear()
    out = {}
    for name in rig.PASSWORDS:
        out[name] = rig.Client(port)
        r, _ = out[name].login(name)
        assert r.status == 303
    return out


def audits(eng, action, actor=None):
    return [a for a in eng.store.audit_list(action=action, actor=actor, limit=1000) if a.action == action]


def raw(port, data: bytes, *, read_timeout=3.0) -> tuple[bytes, float]:
    """Send bytes, read until the server closes; how long the server took to answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        t0 = time.monotonic()
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out, time.monotonic() - t0


def test_login_sets_a_strict_session_cookie_and_is_audited(console):
    eng, port, _ = console
    eng.console_site.resource.throttle._keys.clear()
    c = rig.Client(port)
    r, _ = c.post("/login", {"name": "op", "password": rig.PASSWORDS["op"]}, csrf=None)
    assert r.status == 303 and r.headers["Location"] == "/"
    cookie = r.headers["Set-Cookie"]
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"secure", "httponly", "samesite", "path"} <= attrs
    assert "SameSite=Strict" in cookie and "Path=/" in cookie
    assert len(cookie.split(";")[0].split("=", 1)[1]) >= 40  # 256 random bits, URL-safe base64
    r, text = c.get("/")
    assert r.status == 200 and "op (operator)" in text
    assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Cache-Control"] == "no-store"
    assert "Server" not in r.headers
    assert audits(eng, "login", "op")


def test_failed_logins_are_audited_without_the_password_and_throttled(console):
    eng, port, _ = console
    throttle = eng.console_site.resource.throttle
    throttle._keys.clear()
    c = rig.Client(port)
    for _ in range(3):
        r, text = c.post("/login", {"name": "viewer", "password": "wrong-Secret-9"}, csrf=None)
        assert r.status == 401 and "Wrong user name or password" in text
    # locked: even the right password is refused now, without checking it
    r, text = c.post("/login", {"name": "viewer", "password": rig.PASSWORDS["viewer"]}, csrf=None)
    assert r.status == 429 and c.cookie is None
    failed = audits(eng, "login.failed", "viewer")
    assert len(failed) >= 4 and {a.detail["reason"] for a in failed} == {"bad credentials", "throttled"}
    assert all("wrong-Secret-9" not in str(a.detail) and rig.PASSWORDS["viewer"] not in str(a.detail)
               for a in failed)
    r, _ = rig.Client(port).post("/login", {"name": "nobody", "password": "x"}, csrf=None)
    assert r.status == 429  # the client address is locked too
    throttle._keys.clear()
    r, _ = c.login("viewer")
    assert r.status == 303


def test_unauthenticated_requests(console):
    _eng, port, ids = console
    r, _ = rig.Client(port).get(f"/messages/{ids['OK-1']}")
    assert r.status == 303 and r.headers["Location"] == "/login"
    # a POST without a session is answered on its headers: the announced body is never awaited
    out, took = raw(port, (f"POST /messages/{ids['BAD-1']}/replay HTTP/1.1\r\nHost: x\r\n"
                           "Content-Type: application/x-www-form-urlencoded\r\n"
                           "Content-Length: 10000000\r\n\r\n").encode())
    assert out.startswith(b"HTTP/1.1 403") and b'{"error": "Forbidden"}' in out and took < 2
    assert b"server:" not in out.lower()
    # the login form's body is capped small
    out, _ = raw(port, b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                       b"Content-Length: 5000\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413")
    out, _ = raw(port, b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                       b"Content-Length: 10\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 415")
    out, _ = raw(port, b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 411")


def test_csrf_and_origin_are_checked_and_nothing_is_done(console, clients):
    eng, port, ids = console
    op = clients["op"]
    mid = ids["BAD-1"]
    before = len(eng.store.get_message(mid).entries)
    for kw in ({"csrf": None}, {"csrf": "forged-token"}, {"origin": "https://evil.example"}, {"origin": None}):
        r, _ = op.post(f"/messages/{mid}/replay", {"destination": "ris"}, **kw)
        assert r.status == 403, kw
    r, _ = op.post("/destinations/ris/pause", csrf="nope")
    assert r.status == 403
    assert len(eng.store.get_message(mid).entries) == before
    assert not audits(eng, "message.replay") and not eng.store.paused_destinations()


def test_viewer_sees_no_patient_data_and_cannot_act(console, clients):
    eng, port, ids = console
    viewer, op = clients["viewer"], clients["op"]
    mid = ids["BAD-1"]
    pages = ["/", "/messages", f"/messages?control_id=BAD-1"] + [f"/messages/{i}" for i in ids.values()]
    for path in pages:
        r, text = viewer.get(path)
        assert r.status == 200, path
        for canary in rig.CANARIES:
            assert canary not in text, (path, canary)
    r, text = viewer.get(f"/messages/{mid}")
    assert 'action="/messages/' not in text and "BAD-1" in text and "error" in text
    before = len(eng.store.get_message(mid).entries)
    r, _ = viewer.post(f"/messages/{mid}/replay", {"destination": "ris"})
    assert r.status == 403
    r, _ = viewer.post("/destinations/ris/pause")
    assert r.status == 403
    r, _ = viewer.get(f"/messages?patient_kind=ins&patient_value={rig.INS}")
    assert r.status == 403
    assert len(eng.store.get_message(mid).entries) == before
    for path in ("/admin/users", "/admin/audit"):
        assert viewer.get(path)[0].status == 403 and op.get(path)[0].status == 403
    assert not audits(eng, "message.view", "viewer")
    # the operator sees the patient data, and the view is audited
    r, text = op.get(f"/messages/{mid}")
    assert r.status == 200 and rig.NAME in text and rig.INS in text
    assert any(a.target == f"message:{mid}" for a in audits(eng, "message.view", "op"))


def test_patient_search_is_audited_with_kind_and_value(console, clients):
    eng, _port, ids = console
    op = clients["op"]
    for kind, value in (("ins", rig.INS), ("ipp", rig.IPP)):
        r, text = op.get(f"/messages?patient_kind={kind}&patient_value={value}")
        assert r.status == 200 and f'href="/messages/{ids["OK-1"]}"' in text
        assert any(a.detail["kind"] == kind and a.detail["value"] == value
                   for a in audits(eng, "search.patient", "op"))
    r, text = op.get("/messages?patient_kind=ins&patient_value=999999999999999")
    assert f'href="/messages/{ids["OK-1"]}"' not in text


def test_markup_in_a_message_is_escaped(console, clients):
    _eng, _port, ids = console
    mid = ids["<script>alert(1)</script>"]
    for path in ("/messages", f"/messages/{mid}"):
        r, text = clients["op"].get(path)
        assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_actions_are_done_and_audited(console, clients):
    eng, _port, ids = console
    op, admin = clients["op"], clients["admin"]
    mid = ids["BAD-1"]
    r, _ = op.post("/destinations/ris/pause")
    assert r.status == 303 and "ris" in eng.store.paused_destinations()
    r, text = op.get("/")
    assert "paused" in text
    r, _ = op.post("/destinations/ris/resume")
    assert r.status == 303 and not eng.store.paused_destinations()
    r, _ = op.post(f"/messages/{mid}/replay", {"destination": "ris"})
    assert r.status == 303 and r.headers["Location"] == f"/messages/{mid}"
    replays = [e for e in eng.store.get_message(mid).entries if e.replay_of]
    assert replays
    # the outcome is shown once, from the session; a text in the URL is never shown
    assert "replay queued to ris" in op.get(f"/messages/{mid}")[1]
    assert "replay queued to ris" not in op.get(f"/messages/{mid}")[1]
    assert "Call 01 23" not in op.get(f"/messages/{mid}?done=Call+01+23+45+67+89")[1]
    r, _ = op.post(f"/messages/{mid}/retry", {"destination": "ris"})
    assert r.status == 303
    deadline = time.time() + 10
    while time.time() < deadline and eng.store.get_message(mid).entries[-1].status != "error":
        time.sleep(0.05)
    before = len(audits(eng, "message.handled", "op"))
    r, _ = op.post(f"/messages/{mid}/handled", {"destination": "nowhere"})
    assert r.status == 404
    refused = audits(eng, "message.handled", "op")
    assert len(refused) == before + 1 and refused[0].outcome == "refused"
    r, _ = op.post(f"/messages/{mid}/handled", {"destination": "ris"})
    assert r.status == 303
    assert all(e.status != "error" for e in eng.store.get_message(mid).entries)
    assert op.post("/admin/reload")[0].status == 403
    r, _ = admin.post("/admin/reload")
    assert r.status == 303
    for action in ("destination.pause", "destination.resume", "message.replay", "message.retry",
                   "message.handled"):
        assert audits(eng, action, "op"), action
    deadline = time.time() + 5  # the engine writes its reload audit row after answering
    while time.time() < deadline and not audits(eng, "config.reload", "admin"):
        time.sleep(0.05)
    assert audits(eng, "config.reload", "admin")
    r, text = admin.get("/admin/audit?action=message")
    assert r.status == 200 and "message.replay" in text and "login" not in text.split("<tbody>")[1]
    # reading the trail (it names the patient identifiers searched) is audited, as by the CLI
    seen = audits(eng, "audit.view", "admin")
    assert seen and seen[0].detail["action"] == "message" and seen[0].detail["rows"] >= 5
    r, text = admin.get("/admin/users")
    assert r.status == 200 and "viewer" in text and "$argon2" not in text


def test_logout_ends_the_session(console, clients):
    eng, _port, _ = console
    op = clients["op"]
    cookie = op.cookie
    r, _ = op.post("/logout")
    assert r.status == 303 and r.headers["Location"] == "/login"
    op.cookie = cookie  # an old cookie is worth nothing now
    assert op.get("/")[0].status == 303
    assert audits(eng, "logout", "op")


def test_console_is_off_by_default_and_needs_tls_off_loopback(tmp_path):
    from engine.config import ConfigError, load_config

    routes = tmp_path / "routes.yaml"
    routes.write_text("engine: {}\n")
    assert load_config(routes).engine.console.enabled is False
    routes.write_text("engine:\n  console: {enabled: true, bind: 0.0.0.0}\n")
    with pytest.raises(ConfigError, match="tls"):
        load_config(routes)
    routes.write_text("engine:\n  console: {enabled: true, bind: 0.0.0.0, tls: {cert: c.pem, key: c.key}}\n")
    assert load_config(routes).engine.console.tls.cert == str(tmp_path / "c.pem")
    routes.write_text("engine:\n  status: {port: 9000}\n  console: {enabled: true, port: 9000}\n")
    with pytest.raises(ConfigError, match="already used by engine.status"):
        load_config(routes)


def test_a_disabled_account_or_a_new_role_applies_to_open_sessions(console, clients):
    eng, _port, ids = console
    viewer, op = clients["viewer"], clients["op"]
    sessions = eng.console_site.resource.sessions
    try:
        eng.store.set_user("viewer", active=False)
        eng.store.set_user("op", role="viewer")
        for s in list(sessions._by_id.values()):
            s.checked = 0.0  # as if RECHECK_S had passed
        assert viewer.get("/")[0].status == 303  # logged out
        r, text = op.get(f"/messages/{ids['BAD-1']}")
        assert r.status == 200 and rig.NAME not in text and "op (viewer)" in text
    finally:
        eng.store.set_user("viewer", active=True)
        eng.store.set_user("op", role="operator")


def test_report_findings_for_everyone_the_submission_for_operators_only():
    import json
    from types import SimpleNamespace

    from engine.console.pages import _message_view

    entry = SimpleNamespace(id=7, destination="dmp", target="", status="error", attempts=1, created_at=1.0,
                            updated_at=2.0, next_attempt_at=0.0, last_error="refused", replay_of=None,
                            response=b"MSA|AE")
    m = SimpleNamespace(entries=[entry], raw=rig.adt("R-1"), ack=b"MSA|AA|R-1", charset="UNICODE UTF-8")
    finding = {"code": "903", "rule": "cisis.cda.schematron", "location": "OBX[1]-5", "text": "CDA refused"}
    sub = {"kind": "cisis", "errors": 1, "validation": "{}",
           "submission": json.dumps({"patient": {"ins": rig.INS, "name": rig.NAME}, "errors": [finding]})}
    viewer = _message_view(m, sub, phi=False)
    assert viewer["findings"] == [{"level": "error", **finding}]
    assert viewer["submission"] is None and viewer["raw"] is None and viewer["segments"] is None
    assert viewer["targets"][0]["entries"][0]["response"] is None and viewer["errored"] == ["dmp"]
    assert rig.INS not in json.dumps(viewer, default=str)
    op = _message_view(m, sub, phi=True)
    assert rig.INS in op["submission"] and rig.NAME in op["raw"]
    assert ("PID", ) == op["segments"][2][:1] and op["targets"][0]["entries"][0]["response"] == "MSA|AE"
    from engine.console.site import ConsoleResource

    env = ConsoleResource(None, None, None, secure=False).env
    meta = dict(id=9, control_id="R-1", received_at=1.0, channel="reports", message_type="ORU^R01", version="2.5",
                sending_app="RIS", sending_facility="H", receiving_app="PFI", receiving_facility="H", size=1,
                sha256="0" * 64, status="routed", ack_code="AA", error_code=None)
    page = env.get_template("message.html").render(user="v", role="viewer", csrf="", phi=False, admin=False,
                                                   operator=False, m=SimpleNamespace(**vars(m), **meta),
                                                   v=viewer, flash="")
    assert "cisis.cda.schematron" in page and "OBX[1]-5" in page and rig.INS not in page


def test_store_reads_of_the_console(store):
    """SQLite and PostgreSQL: the message list by ids and sending application, raw messages of a
    time range by id (the patient search's input)."""
    from dataclasses import replace

    from tests.test_store import ingest, rec

    t0 = time.time() - 100
    records = [rec("K1", received_at=t0), replace(rec("K2", received_at=t0 + 10), sending_app="RIS^1.2.3^ISO"),
               rec("K3", body=f"PID|1||{rig.IPP}^^^H^PI", received_at=t0 + 20)]
    ids = [r.message_id for r in ingest(store, records)]
    assert [m.control_id for m in store.list_messages(ids=[ids[0], ids[2]])] == ["K3", "K1"]
    assert store.list_messages(ids=[]) == []
    assert [m.control_id for m in store.list_messages(sending_app="RIS")] == ["K2"]
    got = store.raw_between(t0 + 5, t0 + 30)
    assert [i for i, _raw, _cs in got] == ids[1:] and got[1][2] == "UTF-8"
    assert store.raw_between(t0, t0 + 30, after_id=ids[0], limit=1)[0][0] == ids[1]
    from engine.console.patient_search import matches

    assert [i for i, raw, cs in got if matches(raw, cs, "ipp", rig.IPP)] == [ids[2]]
    assert not [i for i, raw, cs in got if matches(raw, cs, "ins", rig.IPP)]


def test_status_gives_last_received_last_sent_and_peer_state(console):
    eng, _port, _ids = console
    code, body = reactor_thread.call(eng.status_service.status)
    assert code == 200
    assert body["channels"]["mllp-in"]["last_received_at"].startswith(time.strftime("%Y-%m-%d", time.gmtime()))
    ris = body["destinations"]["ris"]
    assert ris["last_sent_at"] is not None and ris["peer_down"] is False


def test_a_disabled_destination_is_not_shown_running(console, clients):
    """enabled: false in routes.yaml: /status says so and the dashboard does not say 'running'."""
    eng, _port, _ids = console
    w = eng.workers["ris"]
    enabled_cfg = w.cfg
    try:
        w.cfg = enabled_cfg.model_copy(update={"enabled": False})
        _code, body = reactor_thread.call(eng.status_service.status)
        assert body["destinations"]["ris"]["enabled"] is False
        page = clients["viewer"].get("/")[1]
        row = page.split('data-destination="ris"', 1)[1].split("</tr>", 1)[0]
        assert "disabled" in row and "running" not in row
    finally:
        w.cfg = enabled_cfg
    assert reactor_thread.call(eng.status_service.status)[1]["destinations"]["ris"]["enabled"] is True


def test_dashboard_shows_the_firing_alerts(console, clients):
    deadline = time.time() + 5
    while True:
        _r, page = clients["viewer"].get("/")
        if "disk-test" in page or time.time() > deadline:
            break
        time.sleep(0.2)
    assert 'id="alerts"' in page and "disk-test" in page and "disk_space" in page


def test_message_page_shows_responses_by_line_and_says_when_the_payload_was_pruned():
    """An ACK's segments end with CR: a browser shows them on one line unless split. A message
    whose payload retention emptied is not "a message that could not be split"."""
    from types import SimpleNamespace

    from engine.console.pages import _message_view
    from engine.console.site import ConsoleResource

    entry = SimpleNamespace(id=7, destination="ris", target="", status="error", attempts=1, created_at=1.0,
                            updated_at=2.0, next_attempt_at=0.0, last_error="AE", replay_of=None,
                            response=b"MSH|^~\\&|RIS\rMSA|AE|R-1\r")
    m = SimpleNamespace(entries=[entry], raw=b"", ack=b"MSA|AA|R-1", charset="UNICODE UTF-8",
                        flags="payload_pruned")
    view = _message_view(m, None, phi=True)
    assert view["targets"][0]["entries"][0]["response"] == "MSH|^~\\&|RIS\nMSA|AE|R-1\n"
    assert view["pruned"] is True
    meta = dict(id=9, control_id="R-1", received_at=1.0, channel="in", message_type="ADT^A01", version="2.5",
                sending_app="GAM", sending_facility="H", receiving_app="PFI", receiving_facility="H", size=1,
                sha256="0" * 64, status="routed", ack_code="AA", error_code=None)
    page = ConsoleResource(None, None, None, secure=False).env.get_template("message.html").render(
        user="o", role="operator", csrf="t", phi=True, admin=False, operator=True,
        m=SimpleNamespace(**vars(m), **meta), v=view, flash="")
    assert "could not be split" not in page and "removed by retention" in page
    held = SimpleNamespace(**{**vars(entry), "status": "queued", "attempts": 0, "next_attempt_at": 9e9})
    retrying = SimpleNamespace(**{**vars(entry), "destination": "pacs", "status": "queued", "attempts": 2})
    m.entries = [held, retrying]
    assert _message_view(m, None, phi=False)["waiting"] == ["pacs"]  # no "retry now" for a hold


def test_an_id_beyond_the_integer_range_is_not_found(console, clients):
    """A typo'd or forged id longer than a 64-bit integer: 404, not an overflow in the store (500)."""
    op = clients["op"]
    assert op.get("/messages/99999999999999999999999")[0].status == 404
    assert op.post("/messages/99999999999999999999999/retry", {"destination": "ris"})[0].status == 404
    assert op.get("/messages/1")[0].status in (200, 404)


def test_a_refused_reload_says_why_on_the_admin_dashboard(console, clients):
    """The admin pressed "Reload": a refusal must say what is wrong in the file, not only 'refused'."""
    eng, _port, _ids = console
    good = eng.config_path.read_text()
    try:
        eng.config_path.write_text(good + "\nbogus_block: 1\n")
        assert clients["admin"].post("/admin/reload")[0].status == 303
        assert reactor_thread.wait_for(lambda: (eng.last_reload or {}).get("result") == "refused", timeout=5)
        page = clients["admin"].get("/")[1]
        assert "refused" in page and "bogus_block" in page
    finally:
        eng.config_path.write_text(good)
        assert reactor_thread.call(eng.reload) is True
