"""The running engine: wires store, channels, router, delivery workers and the status endpoint.

Start order matters for "no message lost": migrate the store, start its writer, re-queue entries
left in flight by a crash, and only then open listeners and start workers (readiness stays false
until recovery is done). Reload (SIGHUP or ``minipfi reload``) validates the new routes file first;
an invalid one is refused and the running one kept. A valid one applies without dropping
established connections: listeners whose address is unchanged keep running, handlers and limits
are swapped in place. Already routed messages keep their queue entries. SIGTERM stops accepting,
lets in-flight sends finish within ``shutdown_grace``, releases the rest, flushes the writer and
exits 0.

Operator controls (pause, resume, retry now) are rows of the store: the engine reads them at start,
polls a change counter every ``CONTROLS_POLL_S`` to notice those made by another process (the
CLI), and applies at once those made through its own methods (the console). Every reload is
audited (``config.reload``), and so are the engine's start and stop. With ``engine.audit.syslog``
each audit row also goes to a syslog collector (``engine.atna``), from a thread of its own.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from twisted.internet import defer, task, threads

from engine import __version__, console, logs, wiring  # noqa: F401 - wiring registers the plug-ins
from engine.alerting.runner import AlertRunner
from engine.atna.sender import from_config as syslog_sender
from engine.channels.mllp import MLLPChannel
from engine.config import ConfigError, Problem, config_fingerprint, load_config
from engine.connectors.registry import build as make_connector, problems as connector_problems
from engine.delivery import DestinationWorker, worker_owner
from engine.hl7.ack import ControlIdGenerator
from engine.ingest import IngestBatcher
from engine.router import Router
from engine.status.http import StatusService, build_site
from engine.store import Store, UnknownMessage
from mllp.protocol import ListenerLimits, MLLPServerFactory
from mllp.tls import TLSFiles, listen

log = logs.get("engine.app")

PID_FILE = "minipfi.pid"
RELOAD_FILE = "reload.json"  # the last reload's outcome, read by `minipfi reload` (it waits for it)
#: who asks for the next reload: written by `minipfi reload` before its SIGHUP (a signal does not
#: say who sent it), read and removed by the engine; trusted as far as the data directory is
RELOAD_REQUEST_FILE = "reload-request.json"
RELOAD_REQUEST_MAX_AGE_S = 60.0
ERROR_TEXT_MAX = 300  # characters of an error text in a log event
CONTROLS_POLL_S = 1.0  # a pause, resume or retry-now made by another process applies within this
RELOAD_OUTCOME = {"applied": "ok", "refused": "refused", "failed": "failed"}  # audit outcomes


def resolve_store_url(config, data_dir: Path) -> str:
    """MINIPFI_DB_URL overrides routes.yaml, which overrides the embedded SQLite file."""
    return os.environ.get("MINIPFI_DB_URL") or config.engine.store_url or Store.default_url(data_dir)


def _limits(cfg) -> ListenerLimits:
    f = cfg.framing
    return ListenerLimits(max_frame_size=int(f.max_frame_size), lenient_end=f.lenient_end_block,
                          idle_timeout=float(f.idle_timeout), frame_timeout=float(f.frame_timeout),
                          max_connections=f.max_connections,
                          max_connections_per_peer=f.max_connections_per_peer)


def _tls_files(tls) -> TLSFiles | None:
    if tls is None:
        return None
    return TLSFiles(cert=str(tls.cert), key=str(tls.key), ca=str(tls.ca) if tls.ca else None,
                    require_client_cert=tls.require_client_cert)


@dataclass
class RunningChannel:
    cfg: object
    handler: MLLPChannel
    factory: MLLPServerFactory
    port: object
    listening_on: str


class Engine:
    version = __version__

    def __init__(self, config_path: str | Path, data_dir: str | Path, reactor=None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config_path = Path(config_path)
        self.data_dir = Path(data_dir)
        self.config = load_config(self.config_path)
        self.config_fingerprint = config_fingerprint(self.config)
        # the last reload: {"seq", "at", "result": applied | refused | failed, "reason", "fingerprint"}
        self.last_reload: dict | None = None
        self.router = Router(self.config)
        self.channels: dict[str, RunningChannel] = {}
        self.workers: dict[str, DestinationWorker] = {}
        self.recovery_done = False
        self.stopping = False
        self.started_at = time.time()
        self.ack_ids = ControlIdGenerator("PFI")
        self.owner = worker_owner()
        self.store: Store | None = None
        self.status_port = None
        self.alerts: AlertRunner | None = None
        self.retention = None  # engine.retention.prune.RetentionThread once started
        self.console_port = None
        self.paused: dict[str, dict] = {}  # destination -> {by, at, reason} (engine.store.controls)
        self._controls_seq = 0
        self._controls_loop: task.LoopingCall | None = None
        self.audit_sender = None  # engine.atna.sender.SyslogSender while engine.audit.syslog is set

    # -- start ----------------------------------------------------------------------------------
    def start(self) -> None:
        bad = connector_problems(self.config)
        if bad:
            raise ConfigError(bad, source=str(self.config_path))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cda_resources = self._configure_cda_validation()
        eng = self.config.engine
        url = resolve_store_url(self.config, self.data_dir)
        self.store = Store(url, dedup_window_seconds=float(eng.duplicates.window))
        self.store.migrate()
        self.store.start()
        self.store.add_audit_listener(self._export_audit)
        self._configure_audit_export(self.config)
        self.store.audit("engine", "engine.start", detail={"version": self.version, "pid": os.getpid()})
        self.batcher = IngestBatcher(self.store, self.reactor)
        self._start_status()
        self._start_console()
        recovered = self.store.recover_in_flight()
        self.recovery_done = True
        log.info("engine.recovered", in_flight_requeued=recovered, store=self.store.dialect)
        self._controls_seq = self.store.controls_version()
        self.paused = self.store.paused_destinations()
        for name, cfg in self.config.destinations.items():
            self._start_worker(name, cfg)
        self._controls_loop = task.LoopingCall(self._poll_controls)
        self._controls_loop.clock = self.reactor
        self._controls_loop.start(CONTROLS_POLL_S, now=False)
        for name, cfg in self.config.channels.items():
            self._start_channel(name, cfg)
        self._start_alerts()
        self._start_retention()
        self._write_pid()
        log.info("engine.started", version=self.version, channels=sorted(self.channels),
                 destinations=sorted(self.workers), data_dir=str(self.data_dir))

    def _start_retention(self) -> None:
        """Pruning in its own thread; its writer ops go through the reactor (see Pruner)."""
        from engine.retention.prune import Pruner, RetentionThread

        submit = lambda op, cb, **kw: self.reactor.callFromThread(self.store.submit, op, cb, **kw)  # noqa: E731
        self.retention = RetentionThread(Pruner(self.store, lambda: self.config, submit=submit))
        self.retention.start()

    def _configure_cda_validation(self) -> dict:
        """CDA validation resources: ``engine.cda_resources`` or the packaged ones; what is generated
        from them is cached under the data directory. Read at start (a change needs a restart)."""
        from engine.cda import resources, validation

        folder = resources.configured_folder(self.config.engine.cda_resources, self.config_path)
        try:
            info = validation.configure(folder, self.data_dir / "cache" / "cda")
        except resources.ResourcesError as err:
            raise ConfigError([Problem("engine.cda_resources", None, str(err))], str(self.config_path)) from None
        log.info("cda.resources", **info)
        return info

    def _start_status(self) -> None:
        st = self.config.engine.status
        token = os.environ.get(st.token_env) if st.token_env else None
        if not _is_loopback(st.bind) and not token:
            raise ConfigError([Problem("engine.status.token_env", None,
                                       f"status is bound to {st.bind}: set the bearer token in ${st.token_env}")])
        self.status_service = StatusService(self)
        site = build_site(self.status_service, token)
        self.status_port = self.reactor.listenTCP(st.port, site, interface=st.bind)
        log.info("status.listening", bind=st.bind, port=self.status_port.getHost().port, token=bool(token))

    def _start_alerts(self) -> None:
        self.alerts = AlertRunner(self, self.reactor)
        self.alerts.start().addErrback(
            lambda f: log.error("alerts.start_failed", error=logs.error_text(f.value, ERROR_TEXT_MAX)))

    def _start_console(self) -> None:
        """The web console (``engine.console``), on the StatusService's counts; TLS when configured
        (configuration refuses a non-loopback bind without it)."""
        con = self.config.engine.console
        if not con.enabled:
            return
        site = console.build_site(self, self.status_service, con)
        tls = TLSFiles(cert=str(con.tls.cert), key=str(con.tls.key)) if con.tls else None
        self.console_site = site
        self.console_port = listen(self.reactor, site, con.port, con.bind, tls)
        log.info("console.listening", bind=con.bind, port=self.console_port.getHost().port, tls=tls is not None)

    def _start_channel(self, name, cfg) -> None:
        handler = MLLPChannel(name, cfg, self.config.engine, self.router, self.batcher, self.ack_ids,
                              on_stored=self._wake_destinations, steps_for=wiring.channel_steps)
        handler.store = self.store
        factory = MLLPServerFactory(handler.handle, _limits(cfg), name, on_event=self._framing_event(name))
        port = listen(self.reactor, factory, cfg.port, cfg.bind, _tls_files(cfg.tls))
        host = port.getHost()
        self.channels[name] = RunningChannel(cfg, handler, factory, port, f"{host.host}:{host.port}")
        log.info("channel.listening", channel=name, bind=host.host, port=host.port, tls=cfg.tls is not None)

    def _framing_event(self, channel):
        def on_event(kind: str, detail: dict) -> None:
            log.warning("mllp." + kind, channel=channel, **{k: v for k, v in detail.items() if k != "payload"})

        return on_event

    def _start_worker(self, name, cfg) -> None:
        connector = make_connector(cfg, self.reactor)
        worker = DestinationWorker(name, cfg, self.store, connector, self.reactor, owner=self.owner,
                                   business_acks_for=self._business_acks_for,
                                   on_follow_ups=self._wake_destinations,
                                   engine_name=self.config.engine.name)
        self.workers[name] = worker
        worker.paused = name in self.paused
        worker.start()
        if worker.paused:
            log.info("destination.paused", destination=name, by=self.paused[name]["by"])

    def _business_acks_for(self, route_name: str) -> str | None:
        """The destination of the business acknowledgements of a route, as configured now."""
        for route in self.config.routes:
            if route.name == route_name:
                return route.business_acks
        return None

    def _wake_destinations(self, names) -> None:
        for n in names:
            w = self.workers.get(n)
            if w is not None:
                w.wake()

    # -- operator controls ------------------------------------------------------------------------
    def _poll_controls(self):
        """Notice a pause, resume or retry-now made by another process (one primary-key read
        per poll; the paused set only when the counter moved)."""
        store, seen = self.store, self._controls_seq

        def read():
            seq = store.controls_version()
            return seq, (store.paused_destinations() if seq != seen else None)

        def got(result):
            seq, paused = result
            if paused is not None and not self.stopping:
                self._controls_seq = seq
                self._apply_controls(paused)

        def failed(f):
            log.error("controls.poll_failed", error=logs.error_text(f.value, ERROR_TEXT_MAX))

        return threads.deferToThread(read).addCallbacks(got, failed)

    def _apply_controls(self, paused: dict[str, dict]) -> None:
        """Pause and resume workers as the store says; the others look again for due entries
        (the change may have been a retry-now)."""
        self.paused = paused
        for name, w in self.workers.items():
            now_paused = name in paused
            if now_paused != w.paused:
                log.info("destination.paused" if now_paused else "destination.resumed", destination=name,
                         by=paused[name]["by"] if now_paused else None)
                w.set_paused(now_paused)
            elif not now_paused:
                w.recheck()

    def _configure_audit_export(self, config) -> None:
        """Start (or replace, at a reload that changed it) the syslog export of audit rows."""
        cfg = config.engine.audit.syslog
        old = self.audit_sender
        if old is not None and cfg == getattr(old, "config", None):
            return
        self.audit_sender = None
        if old is not None:
            old.stop(0.5)
        if cfg is not None:
            self.audit_sender = syslog_sender(cfg, config.engine.name).start()
            log.info("audit.syslog", transport=cfg.transport, host=cfg.host, port=cfg.resolved_port)

    def _export_audit(self, row) -> None:
        sender = self.audit_sender
        if sender is not None:
            sender.submit(row)

    def _audit(self, actor: str, action: str, **kw) -> defer.Deferred:
        """One audit row, written off the reactor."""
        return threads.deferToThread(self.store.audit, actor, action, **kw)

    @defer.inlineCallbacks
    def pause_destination(self, name: str, by: str, reason: str | None = None, *, source: str | None = None):
        """Pause a configured destination now (store, audit, worker); fires with False when it
        was paused already. An unknown name is refused (audited) with :class:`ValueError`."""
        changed = yield self._control(name, by, source, "destination.pause", lambda: self.store.pause_destination(
            name, by=by, reason=reason), {"reason": reason})
        self.paused = {**self.paused, name: {"by": by, "at": time.time(), "reason": reason}} \
            if changed else self.paused
        self.workers[name].set_paused(True)
        return changed

    @defer.inlineCallbacks
    def resume_destination(self, name: str, by: str, *, source: str | None = None):
        """Resume a destination now; fires with False when it was not paused."""
        changed = yield self._control(name, by, source, "destination.resume",
                                      lambda: self.store.resume_destination(name, by=by), {})
        self.paused = {k: v for k, v in self.paused.items() if k != name}
        self.workers[name].set_paused(False)
        return changed

    @defer.inlineCallbacks
    def _control(self, name, by, source, action, write, detail):
        target = f"destination:{name}"
        if name not in self.workers:
            yield self._audit(by, action, target=target, outcome="refused", source=source,
                              detail={**detail, "error": "unknown destination"})
            raise ValueError(f"unknown destination {name!r}")
        changed = yield threads.deferToThread(write)
        yield self._audit(by, action, target=target, source=source, detail={**detail, "changed": changed})
        return changed

    @defer.inlineCallbacks
    def retry_now(self, message_id: int, destination: str | None, by: str, *, source: str | None = None):
        """Make the waiting entries of a message (at ``destination`` if named) due now and send
        them at once; fires with how many. Unknown message: audited, then :class:`UnknownMessage`."""
        target = f"message:{int(message_id)}"
        detail = {"destination": destination}
        try:
            n = yield threads.deferToThread(self.store.retry_now, message_id, destination)
        except UnknownMessage:
            yield self._audit(by, "message.retry", target=target, outcome="refused", source=source,
                              detail={**detail, "error": "unknown message"})
            raise
        yield self._audit(by, "message.retry", target=target, source=source, detail={**detail, "entries": n})
        if n:
            for name, w in self.workers.items():
                if destination in (None, name) and not w.paused:
                    w.recheck()
        return n

    def _write_pid(self) -> None:
        (self.data_dir / PID_FILE).write_text(str(os.getpid()))

    # -- reload ---------------------------------------------------------------------------------
    def _reload_on_signal(self) -> bool:
        """SIGHUP: reload, audited with the requester ``minipfi reload`` named in its request file
        (fresh and readable), else as the engine's own."""
        actor, source = "engine", None
        path = self.data_dir / RELOAD_REQUEST_FILE
        try:
            req = json.loads(path.read_text())
            path.unlink()
            if (isinstance(req, dict) and isinstance(req.get("actor"), str)
                    and time.time() - float(req.get("at", 0)) < RELOAD_REQUEST_MAX_AGE_S):
                actor, source = req["actor"][:64], "cli"
        except (OSError, ValueError, TypeError):
            pass
        return self.reload(actor, source)

    def reload(self, actor: str = "engine", source: str | None = None) -> bool:
        """Apply the routes file again if it is valid; the outcome goes to ``/status``, to
        ``<data-dir>/reload.json``, which ``minipfi reload`` waits for, and to the audit trail
        (``actor``: who asked; "engine" for a bare SIGHUP)."""
        try:
            new = load_config(self.config_path)
        except ConfigError as err:
            return self._reloaded("refused", str(err), actor, source)
        except Exception as exc:  # noqa: BLE001 - unreadable file and the like
            return self._reloaded("refused", logs.safe(exc, ERROR_TEXT_MAX), actor, source)
        bad = connector_problems(new)
        if bad:
            return self._reloaded("refused", str(ConfigError(bad, source=str(self.config_path))), actor, source)
        try:
            self._apply(new)
        except Exception as exc:  # noqa: BLE001 - e.g. a new port already in use: keep what runs
            return self._reloaded("failed", logs.error_text(exc, ERROR_TEXT_MAX), actor, source)
        return self._reloaded("applied", None, actor, source)

    def _reloaded(self, result: str, reason: str | None, actor: str = "engine", source: str | None = None) -> bool:
        seq = (self.last_reload or {}).get("seq", _reload_seq(self.data_dir)) + 1
        self.last_reload = {"seq": seq, "at": datetime.now(timezone.utc).isoformat(), "result": result,
                            "reason": reason, "fingerprint": self.config_fingerprint}
        if result == "applied":
            log.info("config.reloaded", fingerprint=self.config_fingerprint)
        elif result == "refused":
            log.error("config.reload_refused", path=str(self.config_path), problems=reason)
        else:
            log.error("config.reload_failed", error=reason)
        try:
            tmp = self.data_dir / (RELOAD_FILE + ".tmp")
            tmp.write_text(json.dumps(self.last_reload))
            os.replace(tmp, self.data_dir / RELOAD_FILE)
        except OSError as exc:
            log.error("config.reload_not_recorded", error=logs.error_text(exc, ERROR_TEXT_MAX))
        if self.store is not None:
            detail = {"result": result, "fingerprint": self.config_fingerprint, "seq": seq}
            if reason:
                detail["reason"] = reason[:ERROR_TEXT_MAX]
            self._audit(actor, "config.reload", target=f"config:{self.config_path.name}", source=source,
                        outcome=RELOAD_OUTCOME[result], detail=detail).addErrback(
                lambda f: log.error("audit.failed", action="config.reload", error=logs.error_text(f.value)))
        return result == "applied"

    def _apply(self, new) -> None:
        router = Router(new)
        # channels: keep listeners whose address and TLS are unchanged (connections stay up)
        for name in list(self.channels):
            if name not in new.channels:
                ch = self.channels.pop(name)
                ch.port.stopListening()  # established connections finish on their own
                log.info("channel.removed", channel=name)
        for name, cfg in new.channels.items():
            ch = self.channels.get(name)
            if ch is None:
                self._start_channel(name, cfg)
                continue
            if (cfg.bind, cfg.port, cfg.tls) != (ch.cfg.bind, ch.cfg.port, ch.cfg.tls):
                ch.port.stopListening()
                port = listen(self.reactor, ch.factory, cfg.port, cfg.bind, _tls_files(cfg.tls))
                host = port.getHost()
                ch.port, ch.listening_on = port, f"{host.host}:{host.port}"
            ch.factory.set_limits(_limits(cfg))
            ch.handler.reconfigure(cfg, new.engine, router)
            ch.cfg = cfg
        for name in list(self.workers):
            if name not in new.destinations:
                w = self.workers.pop(name)
                w.stop(self.config.engine.shutdown_grace)
                log.info("destination.removed", destination=name, note="its queued entries stay queued")
        for name, cfg in new.destinations.items():
            w = self.workers.get(name)
            if w is None:
                self._start_worker(name, cfg)
            elif cfg != w.cfg:
                w.reconfigure(cfg, make_connector(cfg, self.reactor))
        self._configure_audit_export(new)
        self.config, self.router = new, router
        self.config_fingerprint = config_fingerprint(new)
        if self.alerts is not None:
            self.alerts.configure(new)
        self.batcher  # unchanged: the store URL and data directory are fixed for the process life

    # -- stop -----------------------------------------------------------------------------------
    @defer.inlineCallbacks
    def shutdown(self):
        if self.stopping:
            return
        self.stopping = True
        log.info("engine.stopping")
        if self.alerts is not None:
            self.alerts.stop()
        if self._controls_loop is not None and self._controls_loop.running:
            self._controls_loop.stop()
        for ch in self.channels.values():
            yield defer.maybeDeferred(ch.port.stopListening)
        grace = float(self.config.engine.shutdown_grace)
        yield defer.DeferredList([w.stop(grace) for w in self.workers.values()])
        # let replies for frames already being committed go out, then close connections
        for ch in self.channels.values():
            ch.factory.close_all()
        if self.status_port is not None:
            yield defer.maybeDeferred(self.status_port.stopListening)
        if self.console_port is not None:
            yield defer.maybeDeferred(self.console_port.stopListening)
        if self.retention is not None:  # its ops need the reactor: join off it
            yield threads.deferToThread(self.retention.stop, grace)
        try:
            yield threads.deferToThread(self.store.audit, "engine", "engine.stop", detail={"pid": os.getpid()})
        except Exception as exc:  # noqa: BLE001 - the store may be what failed
            log.error("audit.failed", action="engine.stop", error=logs.error_text(exc))
        if self.audit_sender is not None:
            self.audit_sender.stop(min(grace, 2.0))
        self.store.stop(timeout=grace)
        self.store.dispose()
        try:
            (self.data_dir / PID_FILE).unlink()
        except FileNotFoundError:
            pass
        log.info("engine.stopped")

    def abort_start(self) -> None:
        """``start`` failed part-way (a port in use, ...): close what it opened so that the
        process can exit with its one-line error."""
        if self.alerts is not None:
            self.alerts.stop()
        for ch in self.channels.values():
            ch.port.stopListening()
        if self.status_port is not None:
            self.status_port.stopListening()
        if self.console_port is not None:
            self.console_port.stopListening()
        if self._controls_loop is not None and self._controls_loop.running:
            self._controls_loop.stop()
        if self.audit_sender is not None:
            self.audit_sender.stop(0.5)
        for w in self.workers.values():
            w.running = False
        if self.store is not None:
            try:
                self.store.stop(timeout=1.0)
            finally:
                self.store.dispose()

    def install_signal_handlers(self) -> None:
        def on_term(signum, frame):
            self.reactor.callFromThread(self._stop_and_exit)

        def on_hup(signum, frame):
            self.reactor.callFromThread(self._reload_on_signal)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)

    def _stop_and_exit(self):
        d = self.shutdown()
        d.addErrback(lambda f: log.error("engine.stop_failed", error=logs.error_text(f.value, ERROR_TEXT_MAX)))
        d.addBoth(lambda _: self.reactor.stop())


def _reload_seq(data_dir: Path) -> int:
    """The sequence number of the last reload recorded in the data directory (0: none)."""
    try:
        return int(json.loads((Path(data_dir) / RELOAD_FILE).read_text()).get("seq", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def run(config_path, data_dir) -> int:
    """``minipfi run``: blocks until SIGTERM/SIGINT; returns the exit code."""
    from twisted.internet import reactor

    cfg = load_config(config_path)  # raises ConfigError with readable problems
    logs.configure(cfg.engine.log_level)
    engine = Engine(config_path, data_dir, reactor)
    try:
        engine.start()
    except BaseException:
        engine.abort_start()
        raise
    engine.install_signal_handlers()
    reactor.run(installSignalHandlers=False)
    return 0
