"""Prometheus metrics of the running engine (``/metrics`` of the status endpoint).

Read at scrape time from what the engine already keeps (channel and delivery counters since
start, the ACK latency and commit-time histograms, the store's counts), so ingest pays nothing
more for them. Labels carry only channel and destination names, statuses, HL7 codes,
certificate roles and alert rules and subjects (names from routes.yaml): never a message field,
never patient data.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import fields

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from engine.connectors.certificates import ConfiguredCertificates

__all__ = ["CONTENT_TYPE_LATEST", "EngineCollector", "registry_for", "render"]


class EngineCollector:
    """One collector for one engine; ``stats`` returns the store counts (``Store.stats``)."""

    def __init__(self, engine, stats):
        self.engine = engine
        self.stats = stats
        self.certs = ConfiguredCertificates()

    def describe(self):
        return []  # registering must not scrape the engine

    def collect(self):
        eng = self.engine
        info = GaugeMetricFamily("minipfi_info", "Engine version", labels=["version"])
        info.add_metric([eng.version], 1)
        yield info
        yield from self._channels(eng)
        try:
            stats = self.stats()
        except Exception:  # noqa: BLE001 - the store is down: say so, keep the rest
            stats = None
        up = GaugeMetricFamily("minipfi_store_up", "1 when the store answered this scrape")
        up.add_metric([], 0 if stats is None else 1)
        yield up
        if stats is not None:
            yield from self._store_counts(stats)
        yield from self._deliveries(eng)
        store = eng.store
        if store is not None:
            yield _histogram("minipfi_store_commit_seconds", "Duration of the writer's transactions",
                             [], [([], store.commit_time)])
            yield from _checkpoints(store.checkpoint_stats())
        yield self._certificates(eng)
        yield _alerts(eng)
        reload_ok = GaugeMetricFamily("minipfi_config_last_reload_ok",
                                      "1 when the last reload was applied, 0 when refused or failed")
        last = getattr(eng, "last_reload", None)
        if isinstance(last, dict):
            reload_ok.add_metric([], 1 if last.get("result") == "applied" else 0)
        yield reload_ok

    def _channels(self, eng):
        received = CounterMetricFamily(
            "minipfi_channel_messages", "Frames handled by a channel since start, by outcome",
            labels=["channel", "outcome"])
        latency = []
        for name, ch in sorted(eng.channels.items()):
            handler = ch.handler
            if handler is None:
                continue
            counters = handler.counters
            for f in fields(counters):
                value = getattr(counters, f.name)
                if isinstance(value, int):
                    received.add_metric([name, f.name], value)
            latency.append(([name], handler.ack_latency))
        yield received
        yield _histogram("minipfi_ack_latency_seconds",
                         "From a frame's reception to its acknowledgement (after the commit)",
                         ["channel"], latency)

    @staticmethod
    def _store_counts(stats):
        stored = CounterMetricFamily(
            "minipfi_messages_stored", "Stored messages by channel, status, MSA-1 and ERR-3 code",
            labels=["channel", "status", "ack_code", "error_code"])
        for row in stats.get("messages_by_code", []):
            stored.add_metric([row["channel"], row["status"], row["ack_code"], row["error_code"]], row["count"])
        yield stored
        depth = GaugeMetricFamily("minipfi_queue_entries", "Queue entries by destination and status",
                                  labels=["destination", "status"])
        oldest = GaugeMetricFamily("minipfi_queue_oldest_age_seconds",
                                   "Age of the oldest queued entry of a destination (0 when none)",
                                   labels=["destination"])
        for name, d in sorted(stats.get("destinations", {}).items()):
            for status in ("queued", "in_flight", "error", "sent", "filtered", "cancelled", "resolved"):
                depth.add_metric([name, status], d.get(status, 0))
            oldest.add_metric([name], d.get("oldest_queued_age_s") or 0.0)
        yield depth
        yield oldest

    @staticmethod
    def _deliveries(eng):
        outcomes = CounterMetricFamily("minipfi_deliveries", "Delivery attempts since start by outcome",
                                       labels=["destination", "outcome"])
        paused = GaugeMetricFamily("minipfi_destination_paused",
                                   "1 while an operator has paused the destination", labels=["destination"])
        for name, w in sorted(eng.workers.items()):
            for outcome, n in sorted(dict(w.counters).items()):
                outcomes.add_metric([name, outcome], n)
            paused.add_metric([name], 1 if getattr(w, "paused", False) else 0)
        yield outcomes
        yield paused

    def _certificates(self, eng):
        days = GaugeMetricFamily("minipfi_certificate_days_left",
                                 "Days until a configured certificate expires (negative: expired)",
                                 labels=["kind", "name", "role"])
        now = dt.datetime.now(dt.timezone.utc)
        for e in self.certs.expiries(eng.config):
            days.add_metric([e.kind, e.name, e.role], round((e.not_after - now).total_seconds() / 86400, 2))
        return days


def _alerts(eng):
    active = GaugeMetricFamily("minipfi_alert_active", "1 per firing alert (rule, subject)",
                               labels=["rule", "subject"])
    runner = getattr(eng, "alerts", None)
    for a in runner.active() if runner is not None else ():
        active.add_metric([a["rule"], a["subject"]], 1)
    return active


def _histogram(name, doc, labels, series):
    h = HistogramMetricFamily(name, doc, labels=labels)
    for values, hist in series:
        buckets, total = hist.snapshot()
        h.add_metric(values, buckets, total)
    return h


def registry_for(collector: EngineCollector) -> CollectorRegistry:
    """A registry of its own (not the process-wide default): one engine, one exposition."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of one scrape (run it off the reactor: it reads the store)."""
    return generate_latest(registry)


def _checkpoints(stats):
    """SQLite: the WAL's length and the writer's checkpoints since start (engine.store.writer)."""
    if stats is None:
        return
    if stats["wal_frames"] is not None:
        frames = GaugeMetricFamily("minipfi_store_wal_frames",
                                   "SQLite: pages in the write-ahead log since its last restart")
        frames.add_metric([], stats["wal_frames"])
        yield frames
    runs = CounterMetricFamily("minipfi_store_checkpoints", "SQLite: checkpoints run since start")
    runs.add_metric([], stats["checkpoints"])
    yield runs
    took = CounterMetricFamily("minipfi_store_checkpoint_seconds",
                               "SQLite: time the writer spent in checkpoints since start")
    took.add_metric([], stats["seconds"])
    yield took
    failed = CounterMetricFamily("minipfi_store_checkpoint_failures",
                                 "SQLite: checkpoints that failed since start (see the logs)")
    failed.add_metric([], stats["failed"])
    yield failed
