"""The alert evaluator: a plain snapshot of the engine and a time in, transitions out.

Per rule and per subject (a destination, a certificate and threshold, the data directory, the
configuration) a small state machine: *pending* while the condition holds for less than the
rule's ``for:``, *firing* once it has held that long (one ``started`` notice), *resolved* when it
stops holding (one ``ended`` notice). A condition that comes and goes within ``for:`` says
nothing. A section of the snapshot that could not be read (``None``) leaves the alerts that
depend on it as they are, so that a store hiccup does not end and restart them.

The snapshot (built by ``engine.alerting.runner``)::

    {"destinations": {name: {"consecutive_failures": int, "queue_depth": int,
                             "oldest_queued_age_s": float | None, "errors": int}},
     "channels": {name: {"rejected": int}},
     "certificates": {label: days_left},
     "disk": {"free_bytes": int, "total_bytes": int},
     "reload": {"seq": int, "result": "applied" | "refused" | "failed"}}

Rules are read by attribute (the models of ``alerts.rules`` in routes.yaml): ``name``, ``kind``,
``for_``, ``notify`` and the parameters of their kind. Values are counts, ages, days and
percentages: never message content.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

STARTED, ENDED = "started", "ended"


@dataclass(frozen=True)
class Notice:
    """One transition of one alert, to record and to send to the rule's notifiers."""

    rule: str
    kind: str
    subject: str
    state: str  # started | ended
    since: float  # when the condition began to hold (epoch seconds)
    value: Any
    at: float
    notify: tuple[str, ...]


@dataclass
class _Alert:
    kind: str
    since: float
    value: Any
    firing: bool = False


# -- conditions: (rule, snapshot, now, memory) -> {subject: value} where it holds, None: unknown --


def _selected(rule, destinations: dict) -> Iterable[tuple[str, dict]]:
    wanted = getattr(rule, "destinations", None) or None
    for name in sorted(destinations):
        if wanted is None or name in wanted:
            yield name, destinations[name]


def _destination_down(rule, snap, now, memory):
    dests = snap.get("destinations")
    if dests is None:
        return None
    return {name: d.get("consecutive_failures", 0) for name, d in _selected(rule, dests)
            if d.get("consecutive_failures", 0) >= rule.failures}


def _queue_age(rule, snap, now, memory):
    dests = snap.get("destinations")
    if dests is None:
        return None
    out = {}
    for name, d in _selected(rule, dests):
        age = d.get("oldest_queued_age_s")
        if age is not None and age > rule.older_than:
            out[name] = round(age)
    return out


def _queue_depth(rule, snap, now, memory):
    dests = snap.get("destinations")
    if dests is None:
        return None
    return {name: d.get("queue_depth", 0) for name, d in _selected(rule, dests)
            if d.get("queue_depth", 0) > rule.above}


def _increase(samples: deque, now: float, value: int, window: float) -> int:
    """Growth of a counter over the last ``window`` seconds from its samples (one kept at or
    before the start of the window as the baseline); a counter that went down restarts."""
    if samples and value < samples[-1][1]:
        samples.clear()
    samples.append((now, value))
    while len(samples) > 1 and samples[1][0] <= now - window:
        samples.popleft()
    return value - samples[0][1]


def _error_rate(rule, snap, now, memory):
    dests, chans = snap.get("destinations"), snap.get("channels")
    if dests is None or chans is None:
        return None
    counters = {f"destination:{n}": d.get("errors", 0) for n, d in dests.items()}
    counters.update({f"channel:{n}": c.get("rejected", 0) for n, c in chans.items()})
    out = {}
    for subject, value in sorted(counters.items()):
        grew = _increase(memory.setdefault(subject, deque()), now, value, rule.window)
        if grew > rule.above:
            out[subject] = grew
    for gone in set(memory) - set(counters):
        del memory[gone]
    return out


def _certificate_expiry(rule, snap, now, memory):
    certs = snap.get("certificates")
    if certs is None:
        return None
    return {f"{label}:{days}d": round(left, 1) for label, left in sorted(certs.items())
            for days in sorted(set(rule.days), reverse=True) if left <= days}


def _disk_space(rule, snap, now, memory):
    disk = snap.get("disk")
    if disk is None:
        return None
    free, total = disk["free_bytes"], disk["total_bytes"]
    if rule.below_percent is not None:
        pct = 100.0 * free / total if total else 0.0
        return {"data_dir": f"{pct:.1f}% free"} if pct < rule.below_percent else {}
    return {"data_dir": f"{free} bytes free"} if free < rule.below_bytes else {}


def _reload_refused(rule, snap, now, memory):
    last = snap.get("reload")
    if last is None or last.get("result") not in ("refused", "failed"):
        return {}
    return {"config": f"reload #{last.get('seq')} {last.get('result')}"}


CONDITIONS: dict[str, Callable] = {
    "destination_down": _destination_down,
    "queue_age": _queue_age,
    "queue_depth": _queue_depth,
    "error_rate": _error_rate,
    "certificate_expiry": _certificate_expiry,
    "disk_space": _disk_space,
    "reload_refused": _reload_refused,
}


@dataclass
class Evaluator:
    """The alerts of a set of rules; ``evaluate`` is called at every check with a fresh snapshot."""

    rules: list = field(default_factory=list)
    _alerts: dict[tuple[str, str], _Alert] = field(default_factory=dict)
    _memory: dict[str, dict] = field(default_factory=dict)

    def set_rules(self, rules) -> None:
        """New rules (a reload): alerts of rules that are gone end at the next evaluation, to nobody."""
        self.rules = list(rules)
        names = {r.name for r in self.rules}
        for gone in set(self._memory) - names:
            del self._memory[gone]

    def restore(self, open_alerts: Iterable[dict]) -> None:
        """Alerts whose start was notified before a restart: firing again without a new notice."""
        for a in open_alerts:
            self._alerts[(a["rule"], a["subject"])] = _Alert(a.get("kind", ""), float(a["since"]),
                                                             a.get("value"), firing=True)

    def evaluate(self, snapshot: dict, now: float) -> list[Notice]:
        notices: list[Notice] = []
        holding: set[tuple[str, str]] = set()
        unknown: set[str] = set()
        by_name = {r.name: r for r in self.rules}
        for rule in self.rules:
            found = CONDITIONS[rule.kind](rule, snapshot, now, self._memory.setdefault(rule.name, {}))
            if found is None:
                unknown.add(rule.name)
                continue
            for subject, value in found.items():
                key = (rule.name, subject)
                holding.add(key)
                alert = self._alerts.get(key)
                if alert is None:
                    alert = self._alerts[key] = _Alert(rule.kind, now, value)
                alert.value, alert.kind = value, rule.kind
                if not alert.firing and now - alert.since >= rule.for_:
                    alert.firing = True
                    notices.append(Notice(rule.name, rule.kind, subject, STARTED, alert.since, value, now,
                                          tuple(rule.notify)))
        for key, alert in list(self._alerts.items()):
            if key in holding or key[0] in unknown:
                continue
            del self._alerts[key]
            if alert.firing:
                rule = by_name.get(key[0])
                notices.append(Notice(key[0], alert.kind, key[1], ENDED, alert.since, alert.value, now,
                                      tuple(rule.notify) if rule else ()))
        return notices

    def active(self) -> list[dict]:
        """The firing alerts: rule, kind, subject, since, value."""
        return [{"rule": r, "kind": a.kind, "subject": s, "since": a.since, "value": a.value}
                for (r, s), a in sorted(self._alerts.items()) if a.firing]
