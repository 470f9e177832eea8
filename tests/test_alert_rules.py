"""The pure alert evaluator (engine.alerts): for:, flapping, one start and one end, many subjects,
the rate cap, each kind; and the alerts block of routes.yaml."""
from __future__ import annotations

import textwrap

import pytest

import engine.wiring  # noqa: F401 - registers the destination types
from engine.alerts.ratecap import RateCap
from engine.alerts.rules import ENDED, STARTED, Evaluator
from engine.alerts.texts import as_json, mail_body
from engine.config import ConfigError, load_config_text

HEAD = """
destinations:
  ris: {type: mllp, host: 127.0.0.1, port: 2600}
  pacs: {type: mllp, host: 127.0.0.1, port: 2601}
alerts:
  notify:
    it: {type: webhook, url: "http://127.0.0.1:9/hook", max_per_minute: 3}
  rules:
"""


def rules(*lines: str):
    text = HEAD + "".join(f"    - {line}\n" for line in lines)
    return load_config_text(text).alerts.rules


def dest(failures=0, depth=0, age=None, errors=0):
    return {"consecutive_failures": failures, "queue_depth": depth, "oldest_queued_age_s": age, "errors": errors}


def snap(**kw):
    base = {"destinations": {"ris": dest(), "pacs": dest()}, "channels": {"in": {"rejected": 0}},
            "certificates": {}, "disk": {"free_bytes": 50, "total_bytes": 100}, "reload": None}
    base.update(kw)
    return base


def states(notices):
    return [(n.rule, n.subject, n.state) for n in notices]


DOWN = '{name: down, kind: destination_down, for: 10s, notify: [it]}'


def test_fires_after_for_once_and_ends_once():
    ev = Evaluator(rules(DOWN))
    down = snap(destinations={"ris": dest(failures=2), "pacs": dest()})
    assert ev.evaluate(down, 100.0) == []          # pending
    assert ev.evaluate(down, 105.0) == []
    started = ev.evaluate(down, 110.0)
    assert states(started) == [("down", "ris", STARTED)]
    assert started[0].since == 100.0 and started[0].value == 2 and started[0].notify == ("it",)
    assert ev.evaluate(down, 200.0) == []          # still firing: nothing more
    assert [a["subject"] for a in ev.active()] == ["ris"]
    ended = ev.evaluate(snap(), 210.0)
    assert states(ended) == [("down", "ris", ENDED)]
    assert ev.evaluate(snap(), 220.0) == [] and ev.active() == []


def test_flapping_within_for_says_nothing():
    ev = Evaluator(rules(DOWN))
    down = snap(destinations={"ris": dest(failures=1), "pacs": dest()})
    out = []
    for t in range(0, 100, 3):  # 6 s down, 3 s up, again and again: never 10 s in a row
        out += ev.evaluate(down if (t // 3) % 3 != 2 else snap(), float(t))
    assert out == [] and ev.active() == []


def test_many_subjects_one_notice_each_per_transition():
    ev = Evaluator(rules('{name: down, kind: destination_down, notify: [it]}'))
    many = {f"d{i:02}": dest(failures=3) for i in range(40)}
    started = ev.evaluate(snap(destinations=many), 1.0)
    assert sorted(n.subject for n in started) == sorted(many) and {n.state for n in started} == {STARTED}
    assert ev.evaluate(snap(destinations=many), 2.0) == []
    ended = ev.evaluate(snap(destinations={k: dest() for k in many}), 3.0)
    assert len(ended) == 40 and {n.state for n in ended} == {ENDED}


def test_destinations_filter_and_failures_threshold():
    ev = Evaluator(rules('{name: d, kind: destination_down, destinations: [pacs], failures: 3, notify: [it]}'))
    assert ev.evaluate(snap(destinations={"ris": dest(failures=9), "pacs": dest(failures=2)}), 1.0) == []
    assert states(ev.evaluate(snap(destinations={"ris": dest(failures=9), "pacs": dest(failures=3)}), 2.0)) == [
        ("d", "pacs", STARTED)]


def test_queue_age_and_depth():
    ev = Evaluator(rules('{name: age, kind: queue_age, older_than: 10m, notify: [it]}',
                         '{name: depth, kind: queue_depth, above: 100, notify: [it]}'))
    s = snap(destinations={"ris": dest(depth=101, age=599.0), "pacs": dest(depth=100, age=601.0)})
    assert sorted(states(ev.evaluate(s, 1.0))) == [("age", "pacs", STARTED), ("depth", "ris", STARTED)]


def test_error_rate_counts_within_the_window_only():
    ev = Evaluator(rules('{name: err, kind: error_rate, above: 5, window: 60s, notify: [it]}'))

    def at(errors, rejected):
        return snap(destinations={"ris": dest(errors=errors), "pacs": dest()}, channels={"in": {"rejected": rejected}})

    assert ev.evaluate(at(1000, 1000), 0.0) == []  # history before the engine looked: not a rate
    assert ev.evaluate(at(1003, 1000), 30.0) == []
    out = ev.evaluate(at(1006, 1007), 50.0)
    assert sorted(states(out)) == [("err", "channel:in", STARTED), ("err", "destination:ris", STARTED)]
    assert {n.subject: n.value for n in out} == {"destination:ris": 6, "channel:in": 7}
    # a minute later with no new error the window holds nothing: both end
    assert sorted(states(ev.evaluate(at(1006, 1007), 115.0))) == [
        ("err", "channel:in", ENDED), ("err", "destination:ris", ENDED)]


def test_certificate_expiry_default_thresholds_each_its_own_alert():
    ev = Evaluator(rules('{name: certs, kind: certificate_expiry, notify: [it]}'))
    c = "destinations.dmp.tls.cert"
    assert ev.evaluate(snap(certificates={c: 61.0}), 1.0) == []
    assert states(ev.evaluate(snap(certificates={c: 59.5}), 2.0)) == [("certs", f"{c}:60d", STARTED)]
    assert states(ev.evaluate(snap(certificates={c: 14.0}), 3.0)) == [("certs", f"{c}:15d", STARTED)]
    assert sorted(states(ev.evaluate(snap(certificates={c: 700.0}), 4.0))) == [  # renewed
        ("certs", f"{c}:15d", ENDED), ("certs", f"{c}:60d", ENDED)]


def test_disk_space_percent_and_bytes():
    ev = Evaluator(rules('{name: pct, kind: disk_space, below_percent: 10, notify: [it]}',
                         '{name: abs, kind: disk_space, below_bytes: 1KB, notify: [it]}'))
    assert ev.evaluate(snap(disk={"free_bytes": 2000, "total_bytes": 10000}), 1.0) == []
    out = ev.evaluate(snap(disk={"free_bytes": 900, "total_bytes": 10000}), 2.0)
    assert sorted(states(out)) == [("abs", "data_dir", STARTED), ("pct", "data_dir", STARTED)]


def test_reload_refused_until_an_applied_reload():
    ev = Evaluator(rules('{name: reload, kind: reload_refused, notify: [it]}'))
    assert ev.evaluate(snap(reload={"seq": 1, "result": "applied"}), 1.0) == []
    out = ev.evaluate(snap(reload={"seq": 2, "result": "refused"}), 2.0)
    assert states(out) == [("reload", "config", STARTED)] and out[0].value == "reload #2 refused"
    assert states(ev.evaluate(snap(reload={"seq": 3, "result": "applied"}), 3.0)) == [("reload", "config", ENDED)]


def test_unreadable_section_keeps_alerts_as_they_are():
    ev = Evaluator(rules('{name: depth, kind: queue_depth, above: 1, notify: [it]}'))
    assert len(ev.evaluate(snap(destinations={"ris": dest(depth=5)}), 1.0)) == 1
    assert ev.evaluate(snap(destinations=None), 2.0) == []  # store down this time: no end, no restart
    assert ev.evaluate(snap(destinations={"ris": dest(depth=5)}), 3.0) == []


def test_restored_alert_is_not_started_again_and_ends_once():
    ev = Evaluator(rules(DOWN))
    ev.restore([{"rule": "down", "kind": "destination_down", "subject": "ris", "since": 50.0, "value": 4}])
    down = snap(destinations={"ris": dest(failures=5), "pacs": dest()})
    assert ev.evaluate(down, 100.0) == []
    assert ev.active()[0]["since"] == 50.0
    assert states(ev.evaluate(snap(), 101.0)) == [("down", "ris", ENDED)]


def test_rule_removed_by_reload_ends_its_alerts_to_nobody():
    ev = Evaluator(rules(DOWN))
    down = snap(destinations={"ris": dest(failures=5), "pacs": dest()})
    ev.evaluate(down, 0.0)
    ev.evaluate(down, 10.0)
    ev.set_rules([])
    out = ev.evaluate(down, 11.0)
    assert states(out) == [("down", "ris", ENDED)] and out[0].notify == ()


def test_rate_cap_then_one_summary():
    cap = RateCap(3)
    assert [cap.admit(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert cap.admit(10.0) is False and cap.summary_due(30.0) == 0   # window still full
    assert cap.summary_due(60.5) == 3                                  # one summary for the three
    assert cap.summary_due(61.0) == 0
    assert cap.admit(61.0) is True


def test_notice_texts_carry_no_content_but_what_they_name():
    ev = Evaluator(rules('{name: down, kind: destination_down, notify: [it]}'))
    (n,) = ev.evaluate(snap(destinations={"ris": dest(failures=2)}), 1_790_000_000.0)
    body = mail_body(n, "pfi-chu")
    assert "Alerte déclenchée" in body and "Alert started" in body and "ris" in body
    assert as_json(n, "pfi-chu") == {"alert": "down", "kind": "destination_down", "state": "started",
                                     "subject": "ris", "since": "2026-09-21T14:13:20+00:00", "value": 2,
                                     "engine": "pfi-chu", "at": "2026-09-21T14:13:20+00:00"}


@pytest.mark.parametrize("rule, where, message", [
    ('{name: a, kind: destination_down, notify: [it, pager]}', "alerts.rules[0].notify[1]",
     "unknown notifier 'pager'"),
    ('{name: a, kind: destination_down, destinations: [rsi], notify: [it]}', "alerts.rules[0].destinations[0]",
     "unknown destination 'rsi' (did you mean 'ris'?)"),
    ('{name: a, kind: disk_space, notify: [it]}', "alerts.rules[0]", "give one of below_percent or below_bytes"),
    ('{name: a, kind: nope, notify: [it]}', "alerts.rules[0].kind", "unknown kind 'nope'"),
])
def test_config_problems_name_their_place(rule, where, message):
    with pytest.raises(ConfigError) as exc:
        rules(rule)
    (p,) = exc.value.problems
    assert p.path == where and message in p.message and p.line == 9


def test_notifier_security_rules():
    def notifier(text):
        return load_config_text(textwrap.dedent(f"""
            alerts:
              notify:
                n: {text}
            """))

    with pytest.raises(ConfigError, match="https:// off loopback"):
        notifier('{type: webhook, url: "http://10.1.2.3/hook"}')
    with pytest.raises(ConfigError, match="only for a relay on loopback"):
        notifier("{type: email, host: smtp.chu.fr, starttls: false, from: a@chu.fr, to: [b@chu.fr]}")
    with pytest.raises(ConfigError, match="password_env"):
        notifier("{type: email, host: smtp.chu.fr, user: pfi, from: a@chu.fr, to: [b@chu.fr]}")
    cfg = notifier("{type: email, host: smtp.chu.fr, from: a@chu.fr, to: [b@chu.fr]}")
    assert cfg.alerts.notify["n"].starttls is True and cfg.alerts.notify["n"].port == 587


def test_documented_examples_are_valid(tmp_path):
    """The notifiers and rules of docs/alerts.md and README.md load (destinations they name added)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    dests = "destinations:\n" + "".join(f"  {d}: {{type: mllp, host: 127.0.0.1, port: 2600}}\n" for d in ("ris", "dmp"))
    doc = re.findall(r"```yaml\n(.*?)```", (root / "docs" / "alerts.md").read_text(), re.S)
    for name in ("smtp-ca.pem", "pfi.pem", "pfi.key", "supervision-ca.pem"):
        (tmp_path / "certs").mkdir(exist_ok=True)
        (tmp_path / "certs" / name).write_text("")
    cfg = load_config_text(dests + doc[0] + doc[1], base_dir=tmp_path)
    assert len(cfg.alerts.rules) == 7 and set(cfg.alerts.notify) == {"it-mail", "supervision"}
    readme = (root / "README.md").read_text().split("## Alerts", 1)[1]
    cfg = load_config_text(dests + re.search(r"```yaml\n(.*?)```", readme, re.S).group(1))
    assert {r.kind for r in cfg.alerts.rules} == {
        "destination_down", "queue_age", "queue_depth", "error_rate", "certificate_expiry", "disk_space",
        "reload_refused"}
