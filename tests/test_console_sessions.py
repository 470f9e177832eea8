"""Console sessions and the login throttle on a fake clock: idle and absolute expiry, CSRF
compare, lockouts that grow and end."""
from __future__ import annotations

from engine.console.sessions import Sessions, Throttle, csrf_ok


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_sessions_expire_when_idle_and_at_their_maximum_age():
    clock = Clock()
    s = Sessions(idle=60, max_age=300, clock=clock)
    a = s.open("op", "operator")
    assert len(a.id) >= 40 and a.id != a.csrf
    for _ in range(4):  # active every 50 s: kept until the absolute limit
        clock.t += 50
        assert s.get(a.id) is a
    clock.t += 50
    assert s.get(a.id) is a
    clock.t += 50  # 300 s after login
    assert s.get(a.id) is None
    b = s.open("op", "operator")
    clock.t += 61
    assert s.get(b.id) is None
    c = s.open("op", "operator")
    s.close_user("op")
    assert s.get(c.id) is None and s.get(None) is None and s.get("guess") is None


def test_csrf_token_compare():
    s = Sessions(60, 300, Clock()).open("op", "operator")
    assert csrf_ok(s, s.csrf)
    assert not csrf_ok(s, None) and not csrf_ok(s, "") and not csrf_ok(s, s.csrf[:-1] + "x")


def test_an_address_shared_by_several_users_has_its_own_higher_limit():
    clock = Clock()
    t = Throttle(max_failures=3, window=600, base_delay=10, max_delay=40, clock=clock, address_max_failures=6)
    for _ in range(3):
        t.failed("user:a", "addr:tunnel")
    assert t.wait("user:a") == 10 and t.wait("user:b", "addr:tunnel") == 0  # b, same address, may log in
    for _ in range(3):
        t.failed("user:c", "addr:tunnel")
    assert t.wait("user:b", "addr:tunnel") == 10  # the address itself is locked at its own limit


def test_lockout_grows_per_failure_and_ends():
    clock = Clock()
    t = Throttle(max_failures=3, window=600, base_delay=10, max_delay=40, clock=clock)
    for _ in range(2):
        t.failed("user:a", "addr:1")
    assert t.wait("user:a") == 0
    t.failed("user:a", "addr:1")
    assert t.wait("user:a") == 10 and t.wait("addr:1") == 10 and t.wait("user:b") == 0
    t.failed("user:a")
    assert t.wait("user:a") == 20
    t.failed("user:a")
    t.failed("user:a")
    assert t.wait("user:a") == 40  # capped
    clock.t += 41
    assert t.wait("user:a", "addr:1") == 0
    t.succeeded("user:a")
    t.failed("user:a")
    assert t.wait("user:a") == 0  # the count started again
