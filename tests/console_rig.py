"""Shared by the console tests: a routes file with a console, synthetic patient messages whose
patient data are canaries, and a small HTTP client that keeps the session cookie."""
from __future__ import annotations

import http.client
import re
import ssl
import time
from urllib.parse import urlencode

# synthetic patient data: must appear only on pages for operators and admins
NAME, GIVEN, INS, IPP, BIRTH = "CANARINOM", "ZOEPRENOM", "279035121518989", "IPP77331", "19790328"
CANARIES = (NAME, GIVEN, INS, IPP)
PASSWORDS = {"admin": "admin-pass-1", "op": "operator-pass-1", "viewer": "viewer-pass-1"}
ROLES = {"admin": "admin", "op": "operator", "viewer": "viewer"}


def config(port: int, status_port: int, console_port: int, ris_port: int, *, tls: str = "",
           throttle: str = "", alerts: str = "") -> str:
    return f"""
        engine:
          status: {{bind: 127.0.0.1, port: {status_port}}}
          console:
            enabled: true
            port: {console_port}
            {tls}
            {throttle}
          shutdown_grace: 2s
        channels:
          mllp-in:
            type: mllp
            port: {port}
        routes:
          - name: all
            from: mllp-in
            to: [ris]
        destinations:
          ris:
            type: mllp
            host: 127.0.0.1
            port: {ris_port}
            ack_timeout: 2s
            queue: {{on_ae: error, retry: {{initial_delay: 100ms, max_delay: 1s}}}}
        {alerts}
    """


#: an alert that fires at the first check (free space below 99.99 %), its notices to a closed port
ALWAYS_FIRING = """alerts:
          check_every: 200ms
          notify:
            hook: {type: webhook, url: "http://127.0.0.1:9/hook"}
          rules:
            - {name: disk-test, kind: disk_space, below_percent: 99.99, notify: [hook]}"""


def adt(cid: str, *, name: str = NAME) -> bytes:
    now = time.strftime("%Y%m%d%H%M%S")
    return (f"MSH|^~\\&|RIS-TEST|HOPITAL|PACS|HOPITAL|{now}||ADT^A01^ADT_A01|{cid}|P|2.5\r"
            f"EVN|A01|{now}\r"
            f"PID|1||{IPP}^^^HOP&1.2.250.1.71.4.2.7&ISO^PI~{INS}^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS"
            f"||{name}^{GIVEN}||{BIRTH}|F\r"
            "PV1|1|I\r").encode("utf-8")


class Client:
    """One browser-like user agent: a cookie jar of one cookie, the CSRF token of the last page."""

    def __init__(self, port: int, *, tls: bool = False):
        self.port, self.tls = port, tls
        self.cookie: str | None = None
        self.csrf = ""
        self.origin = f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    def _conn(self):
        if self.tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=ctx)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def request(self, method: str, path: str, form: dict | None = None, *, origin: str | None = "same",
                csrf: str | None = "same", headers: dict | None = None):
        h = dict(headers or {})
        if self.cookie:
            h["Cookie"] = self.cookie
        body = None
        if method == "POST":
            form = dict(form or {})
            if csrf == "same":
                csrf = self.csrf
            if csrf is not None:
                form.setdefault("csrf", csrf)
            body = urlencode(form, doseq=True).encode()
            h["Content-Type"] = "application/x-www-form-urlencoded"
            if origin == "same":
                origin = self.origin
            if origin is not None:
                h["Origin"] = origin
        c = self._conn()
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        text = r.read().decode("utf-8", "replace")
        c.close()
        for value in r.headers.get_all("Set-Cookie") or []:
            pair = value.split(";", 1)[0]
            self.cookie = None if pair.endswith("=") else pair
        m = re.search(r'name="csrf" value="([^"]+)"', text)
        if m:
            self.csrf = m.group(1)
        return r, text

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, form: dict | None = None, **kw):
        return self.request("POST", path, form, **kw)

    def login(self, name: str, password: str | None = None):
        r, text = self.post("/login", {"name": name, "password": password or PASSWORDS[name]}, csrf=None)
        if r.status == 303:
            self.get("/")  # the CSRF token of the session
        return r, text
