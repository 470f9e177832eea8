"""Console sessions and login throttling, in memory and I/O-free (the clock is given).

A session id is 256 random bits (``secrets.token_urlsafe``) sent only as a cookie; it expires
after ``idle`` seconds without a request and ``max_age`` seconds after login, whichever comes
first (OWASP Session Management Cheat Sheet, "Session Expiration"). Each session has its own
CSRF token (OWASP CSRF Prevention Cheat Sheet, "Synchronizer Token Pattern"), compared in
constant time. Sessions live in the engine process: a restart logs everybody out.
"""
from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

MAX_SESSIONS = 1000  # a login flood must not grow the process without bound


@dataclass
class Session:
    id: str
    user: str
    role: str
    csrf: str
    created: float
    seen: float
    checked: float = 0.0  # when the account was last read from the store (role, active)
    #: the outcome of the last action, shown once by the next page: kept here, never in the URL,
    #: so that a crafted link cannot make the console display a text of its author's
    flash: str | None = None


class Sessions:
    def __init__(self, idle: float, max_age: float, clock):
        self.idle, self.max_age, self.clock = idle, max_age, clock
        self._by_id: dict[str, Session] = {}

    def open(self, user: str, role: str) -> Session:
        now = self.clock()
        self._expire(now)
        if len(self._by_id) >= MAX_SESSIONS:  # drop the least recently used
            del self._by_id[min(self._by_id.values(), key=lambda s: s.seen).id]
        s = Session(secrets.token_urlsafe(32), user, role, secrets.token_urlsafe(32), now, now, now)
        self._by_id[s.id] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        """The live session of this id, its idle timer restarted; None if unknown or expired."""
        if not sid:
            return None
        s = self._by_id.get(sid)
        now = self.clock()
        if s is None:
            return None
        if now - s.seen >= self.idle or now - s.created >= self.max_age:
            del self._by_id[sid]
            return None
        s.seen = now
        return s

    def close(self, sid: str | None) -> None:
        self._by_id.pop(sid or "", None)

    def close_user(self, user: str) -> None:
        """A user's role changed or the account was disabled: their sessions end now."""
        for sid in [s.id for s in self._by_id.values() if s.user == user]:
            del self._by_id[sid]

    def _expire(self, now: float) -> None:
        for sid in [s.id for s in self._by_id.values()
                    if now - s.seen >= self.idle or now - s.created >= self.max_age]:
            del self._by_id[sid]


def csrf_ok(session: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(session.csrf.encode(), token.encode())


@dataclass
class _Failures:
    times: list[float] = field(default_factory=list)
    locked_until: float = 0.0


class Throttle:
    """Failed logins per key (a user name, a client address). After ``max_failures`` within
    ``window`` each further failure locks the key for ``base_delay`` doubled per failure, up to
    ``max_delay`` (OWASP Authentication Cheat Sheet, "Login Throttling")."""

    MAX_KEYS = 10000

    def __init__(self, max_failures: int, window: float, base_delay: float, max_delay: float, clock,
                 *, address_max_failures: int | None = None):
        self.max_failures, self.window = max_failures, window
        # a client address is shared by everyone behind one proxy or SSH tunnel: it gets a higher
        # threshold than a user name, so one user's typos do not lock the others out
        self.address_max_failures = address_max_failures or max_failures
        self.base_delay, self.max_delay, self.clock = base_delay, max_delay, clock
        self._keys: dict[str, _Failures] = {}

    def wait(self, *keys: str) -> float:
        """Seconds before these keys may try again (0: now)."""
        now = self.clock()
        return max([0.0] + [f.locked_until - now for k in keys if (f := self._keys.get(k))])

    def failed(self, *keys: str) -> None:
        now = self.clock()
        if len(self._keys) >= self.MAX_KEYS:
            self._keys = {k: f for k, f in self._keys.items()
                          if f.locked_until > now or (f.times and now - f.times[-1] < self.window)}
        for k in keys:
            f = self._keys.setdefault(k, _Failures())
            f.times = [t for t in f.times if now - t < self.window] + [now]
            limit = self.address_max_failures if k.startswith("addr:") else self.max_failures
            over = len(f.times) - limit
            if over >= 0:
                f.locked_until = now + min(self.max_delay, self.base_delay * (2 ** over))

    def succeeded(self, *keys: str) -> None:
        for k in keys:
            self._keys.pop(k, None)
