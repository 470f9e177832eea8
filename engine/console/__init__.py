"""The web console for hospital IT: dashboard, message browser and actions, served by the engine
(``engine.console`` in routes.yaml). ``build_site`` wires the pages, the sessions and the login
throttle onto a guarded site (:mod:`engine.web`)."""
from __future__ import annotations

import time

from engine.console.pages import Pages
from engine.console.sessions import Sessions, Throttle
from engine.console.site import ConsoleResource, ConsoleSite


def build_site(engine, status, cfg, *, clock=time.time, **limits) -> ConsoleSite:
    """The console of a running ``engine``; ``status`` is the StatusService behind ``/status``,
    ``cfg`` the ``engine.console`` block."""
    from engine import passwords

    sessions = Sessions(float(cfg.session_idle_timeout), float(cfg.session_max_age), clock)
    t = cfg.login_throttle
    throttle = Throttle(t.max_failures, float(t.window), float(t.base_delay), float(t.max_delay), clock,
                        address_max_failures=t.max_failures_per_address)
    pages = Pages(engine, status, passwords.verify_password, passwords.hash_password, passwords.needs_rehash,
                  session_max_age=float(cfg.session_max_age))
    root = ConsoleResource(pages, sessions, throttle, secure=cfg.tls is not None)
    pages.web = root
    return ConsoleSite(root, sessions, **limits)
