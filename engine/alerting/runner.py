"""The alert runner: every ``alerts.check_every`` it gathers a snapshot of the engine (store counts
and certificate files read in a thread, worker states on the reactor), lets the evaluator decide,
records each start and end as a store event (``alert_started`` / ``alert_ended``: the history
stays) and sends the notices through the rule's notifiers, each under its per-minute cap.

After a restart the alerts whose ``alert_started`` event has no ``alert_ended`` after it are taken
back as firing without a new notice: a start is notified once, even across restarts. The event
is written when the alert fires, before the notice is sent; a crash between the two loses that
notice rather than sending it twice (the alert still shows in ``/status`` and ends normally).
"""
from __future__ import annotations

import os
import shutil
import time
from collections import deque

from twisted.internet import defer, task, threads

from engine import logs
from engine.alerts.ratecap import RateCap
from engine.alerts.rules import STARTED, Evaluator, Notice
from engine.alerts.texts import iso, summary
from engine.connectors.certificates import ConfiguredCertificates

from .senders import make_sender, send_with_retry

log = logs.get("engine.alerting")

RECENT = 20  # notices kept for /status


class AlertRunner:
    def __init__(self, engine, reactor, clock=time.time):
        self.engine, self.reactor, self.clock = engine, reactor, clock
        self.evaluator = Evaluator()
        self.senders: dict = {}
        self.caps: dict[str, RateCap] = {}
        self.recent: deque[dict] = deque(maxlen=RECENT)
        self.certs = ConfiguredCertificates()
        self._loop: task.LoopingCall | None = None
        self._interval = None
        self._busy = False
        self._started = False
        self.configure(engine.config)

    # -- life ------------------------------------------------------------------------------------
    def configure(self, config) -> None:
        """At start and after each applied reload."""
        alerts = config.alerts
        self.evaluator.set_rules(alerts.rules)
        old, self.senders = self.senders, {}
        for name, cfg in alerts.notify.items():
            prev = old.pop(name, None)
            if prev is not None and prev.cfg != cfg:
                old[name], prev = prev, None
            self.senders[name] = prev or make_sender(name, cfg, self.reactor, config.engine.name)
            cap = self.caps.get(name)
            if cap is None or cap.per_minute != cfg.max_per_minute:
                self.caps[name] = RateCap(cfg.max_per_minute)
        for gone in old.values():
            if hasattr(gone, "close"):
                gone.close()
        for name, cfg in alerts.notify.items():
            env = getattr(cfg, "password_env", None) if getattr(cfg, "user", None) else getattr(cfg, "token_env", None)
            if env and env not in os.environ:  # said now, not at the first alert
                log.warning("alerts.secret_missing", notifier=name, variable=env)
        if self._started:
            self._schedule()

    def start(self) -> defer.Deferred:
        """Take back the open alerts, then check on the timer."""
        d = threads.deferToThread(self.engine.store.open_alerts)

        def restored(open_alerts):
            self.evaluator.restore(open_alerts)
            if open_alerts:
                log.info("alerts.restored", count=len(open_alerts))

        def unreadable(failure):
            log.error("alerts.restore_failed", error=logs.error_text(failure.value, 200))

        d.addCallbacks(restored, unreadable)

        def go(_):
            self._started = True
            self._schedule()

        return d.addCallback(go)

    def _schedule(self) -> None:
        interval = float(self.engine.config.alerts.check_every)
        wanted = bool(self.evaluator.rules)
        if self._loop is not None and (not wanted or interval != self._interval):
            self._loop.stop()
            self._loop = None
        if wanted and self._loop is None:
            self._loop = task.LoopingCall(self._tick)
            self._loop.clock = self.reactor
            self._interval = interval
            self._loop.start(interval, now=True)

    def stop(self) -> None:
        self._started = False
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    # -- one check ---------------------------------------------------------------------------------
    def _tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        d = threads.deferToThread(self._read)
        d.addCallback(self._evaluate)
        d.addErrback(lambda f: log.error("alerts.check_failed", error=logs.error_text(f.value, 200)))
        d.addBoth(self._done)

    def _done(self, _):
        self._busy = False

    def _read(self) -> tuple:
        """Off the reactor: store counts, certificate files, free space."""
        eng = self.engine
        try:
            stats = eng.store.stats()
        except Exception as exc:  # noqa: BLE001 - unknown this time: the alerts that need it wait
            log.warning("alerts.stats_unavailable", error=logs.error_text(exc, 120))
            stats = None
        try:
            usage = shutil.disk_usage(eng.data_dir)
            disk = {"free_bytes": usage.free, "total_bytes": usage.total}
        except OSError:
            disk = None
        return stats, self.certs.days_left(eng.config), disk

    def snapshot(self, stats, certificates, disk) -> dict:
        """The evaluator's plain snapshot (``engine.alerts.rules``)."""
        eng = self.engine
        dests = chans = None
        if stats is not None:
            dests, chans = {}, {}
            sd = stats.get("destinations", {})
            for name in sorted(set(eng.workers) | set(sd)):
                s, w = sd.get(name, {}), eng.workers.get(name)
                counters = dict(w.counters) if w else {}
                dests[name] = {
                    "consecutive_failures": getattr(w, "consecutive_failures", 0) if w else 0,
                    "queue_depth": s.get("queued", 0) + s.get("in_flight", 0),
                    "oldest_queued_age_s": s.get("oldest_queued_age_s"),
                    "errors": counters.get("error", 0) + counters.get("retry", 0),
                }
            chans = {n: {"rejected": c.get("rejected", 0)} for n, c in stats.get("channels", {}).items()}
        return {"destinations": dests, "channels": chans, "certificates": certificates, "disk": disk,
                "reload": eng.last_reload}

    def _evaluate(self, read) -> None:
        now = self.clock()
        notices = self.evaluator.evaluate(self.snapshot(*read), now)
        for notice in notices:
            self._record(notice)
        for name, cap in self.caps.items():
            held = cap.summary_due(now)
            if held and name in self.senders:
                self._send(name, summary(held, now, (name,)))
        for notice in notices:
            for name in notice.notify:
                if name not in self.senders:
                    continue
                if self.caps[name].admit(now):
                    self._send(name, notice)
                else:
                    self._remember(notice, name, "held back")

    def _record(self, notice: Notice) -> None:
        kind = "alert_started" if notice.state == STARTED else "alert_ended"
        (log.warning if notice.state == STARTED else log.info)(
            "alert." + notice.state, rule=notice.rule, kind=notice.kind, subject=notice.subject,
            since=iso(notice.since), value=notice.value)
        detail = {"rule": notice.rule, "kind": notice.kind, "subject": notice.subject,
                  "since": notice.since, "value": notice.value}
        d = threads.deferToThread(self.engine.store.add_event, kind, detail=detail)
        d.addErrback(lambda f: log.error("alert.not_recorded", rule=notice.rule, subject=notice.subject,
                                         error=logs.error_text(f.value, 200)))

    def _send(self, name: str, notice: Notice) -> None:
        entry = self._remember(notice, name, "sending")
        d = send_with_retry(self.senders[name], notice, self.reactor)
        d.addCallback(lambda ok: entry.update(result="sent" if ok else "failed"))

    def _remember(self, notice: Notice, notifier: str, result: str) -> dict:
        entry = {"at": iso(notice.at), "rule": notice.rule, "subject": notice.subject,
                 "state": notice.state, "notifier": notifier, "result": result}
        self.recent.append(entry)
        return entry

    # -- what /status and /metrics show --------------------------------------------------------------
    def active(self) -> list[dict]:
        return self.evaluator.active()

    def status(self) -> dict:
        return {"active": [dict(a, since=iso(a["since"])) for a in self.active()],
                "last_notices": list(reversed(self.recent))}

