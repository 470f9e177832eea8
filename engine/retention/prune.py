"""Pruning: what each channel's retention limits make due, deleted in small batches through the
store's writer (each batch one writer op: it shares the group commit of ingest, so SQLite never
has a second writer waiting on its lock and ingest never waits for a whole run).

A run: for each channel policy, messages, then payloads, then final delivery entries, then
events; then the identity registry. With ``archive_dir`` a run first writes everything it will
delete into one ``prune-<UTC time>-<pid>.tar.gz`` (the export layout, ``docs/export.md``),
fsynced, and only then deletes; a row that became needed in between (an operator replayed its
message) is kept and counted as ``kept``. A run handles at most ``RUN_BATCHES`` batches per
kind and channel; the rest waits for the next run. One audit row ``retention.prune`` (actor
``engine``) and one log event with counts per table (no patient data) per run that removed
anything.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine import logs
from engine.store.retention import utc_naive

from .bundle import Bundle, archive_name

log = logs.get("engine.retention")

RUN_BATCHES = 100  # batches per kind and channel in one run (bounds an archive file)
ARCHIVE_PAGE = 200
TICK = 1.0
# Messages per writer op: a message costs its rows in four tables and its raw bytes' pages; 100
# keep the commit an op shares with ingest a few milliseconds longer at most (SQLite, measured
# in-process: 200 messages 15-22 ms, 500 messages 32-50 ms per op and COMMIT).
OP_MESSAGES = 100
# After each batch the run sleeps as long as the batch took: the pruning thread shares the
# interpreter with the reactor, and building an archive is Python work (JSON, gzip). Measured
# with 4 MLLP senders on SQLite, batch 500, archive on: without pacing ingest fell from about
# 1,250 to 440 msg/s while runs went on.
PACE = 1.0


@dataclass(frozen=True)
class Policy:
    messages: float | None
    payloads: float | None
    deliveries: float | None

    def any(self) -> bool:
        return any(v is not None for v in (self.messages, self.payloads, self.deliveries))


def policies(config) -> list[tuple[tuple, Policy]]:
    """``(scope, policy)`` per channel with its own ``retention``, then the default for every
    other channel (including the engine's own pseudo-channels); scopes without a limit dropped."""
    r = config.engine.retention
    default = Policy(r.messages, r.payloads, r.deliveries)
    out, named = [], []
    for name, ch in config.channels.items():
        lim = getattr(ch, "retention", None)
        if lim is None:
            continue
        named.append(name)
        out.append((((name,), ()), Policy(
            *(getattr(lim, f) if getattr(lim, f) is not None else getattr(default, f)
              for f in ("messages", "payloads", "deliveries")))))
    out.append((((), tuple(named)), default))
    return [(s, p) for s, p in out if p.any()]


class Pruner:
    """One run at a time; ``submit(op, callback, background=True)`` hands writer ops to the
    store (the engine passes them through the reactor thread, which owns the writer's submit
    counters). They are background jobs: no ACK waits for them, so a prune op that deletes
    thousands of rows never shares a transaction with ingest (``WriterMixin._take_jobs``)."""

    def __init__(self, store, config_fn: Callable[[], object], *,
                 submit: Callable | None = None):
        self.store = store
        self.config_fn = config_fn
        self.submit = submit or store.submit
        self.payload_marks: dict[tuple, int] = {}
        self.runs = 0
        self.stopping = threading.Event()  # set: the run ends after the op under way

    def _write(self, op):
        done = threading.Event()
        box: list = []

        def callback(value):
            box.append(value)
            done.set()

        self.submit(op, callback, background=True)
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def run(self, now: float | None = None) -> dict | None:
        """One run; returns the audit detail (None when no limit is configured)."""
        cfg = self.config_fn()
        r = cfg.engine.retention
        scopes = policies(cfg)
        if not scopes and r.identities is None:
            return None
        now = time.time() if now is None else now
        t0 = time.monotonic()
        run = _Run(self, r, now)
        try:
            for scope, pol in scopes:
                run.scope(scope, pol, window=float(cfg.engine.duplicates.window))
            if r.identities is not None:
                run.identities(now - r.identities)
            detail = run.finish()
        except BaseException as exc:
            run.abandon()
            if run.counts:  # what committed before the failure is still accounted for
                self._record(run.detail(logs.error_text(exc, 300)), t0)
            raise
        self.runs += 1
        return self._record(detail, t0)

    def _record(self, detail: dict, t0: float) -> dict:
        detail["seconds"] = round(time.monotonic() - t0, 3)
        counts = detail["counts"]
        if any(counts.values()) or detail.get("archive"):
            failed = detail.get("error") is not None
            self.store.audit("engine", "retention.prune", detail=detail, source="retention",
                             outcome="failed" if failed else "ok")
            log.info("retention.pruned", archive=detail.get("archive"), kept=detail["kept"],
                     seconds=detail["seconds"], failed=failed, **counts)
        return detail


class _Run:
    """The state of one run: counts, the archive being written, deletions waiting for it."""

    def __init__(self, pruner: Pruner, r, now: float):
        self.p = pruner
        self.store = pruner.store
        self.batch = int(r.batch)
        self.now = now
        self.counts: Counter = Counter()
        self.kept = 0
        self.taken: set[int] = set()  # message ids handled in this run
        self.plan: list[Callable] = []
        self.bundle = None
        self.archive = None
        self.written = None  # the archive's name once it is on disk
        if r.archive_dir:
            folder = Path(r.archive_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.archive = folder / archive_name(folder, time.time())
            self.bundle = Bundle(self.archive, kind="archive", time_range={"run_at": now}, archive=True)

    # -- the op of a batch: at once, or after the archive is on disk --------------------------
    def _do(self, op) -> None:
        if self.bundle is None:
            self._apply(self.p._write(op))
        else:
            self.plan.append(op)

    def _apply(self, res: dict) -> None:
        self.kept += len(res.pop("kept", []))
        self.counts.update({k: v for k, v in res.items() if v})

    def scope(self, scope, pol: Policy, *, window: float) -> None:
        st = self.store
        if pol.messages is not None:
            cut = self.now - max(pol.messages, window)  # a resend within the window stays a duplicate
            self._messages(scope, cut, payloads=False)
        if pol.payloads is not None:
            self._messages(scope, self.now - pol.payloads, payloads=True)
        if pol.deliveries is not None or pol.messages is not None:
            cut = self.now - (pol.deliveries if pol.deliveries is not None else max(pol.messages, window))
            if pol.deliveries is not None:
                self._sweep("queue_entries", "created_at", cut,
                            lambda a, hi: st.due_entries(scope, cut, after=a, hi=hi, limit=self.batch, now=self.now),
                            lambda row: self.bundle.entry(row | {"pruned": "entry"}),
                            lambda c, ids: st.delete_entries_within(c, ids, self.now))
            self._sweep("events", "at", cut,
                        lambda a, hi: st.due_events(scope, cut, after=a, hi=hi, limit=self.batch),
                        lambda row: self.bundle.line("events", row), st.delete_events_within)

    def _sweep(self, table: str, time_col: str, cut: float, due, archive, delete) -> None:
        """Batches of ``table`` rows due before ``cut``: archived, then deleted by a writer op."""
        st = self.store
        hi = st.read(lambda c: st.id_bound(c, table, time_col, cut, keep_newest=True))
        after = 0
        for _ in range(RUN_BATCHES):
            if self.p.stopping.is_set():
                break
            t0 = time.monotonic()
            ids, after = due(after, hi)
            if ids:
                if self.bundle is not None:
                    for row in st.rows_by_id(table, ids):
                        archive(row)
                self._do(lambda c, ids=ids: delete(c, ids))
                self._pace(t0)
            if after >= hi:
                break

    def _messages(self, scope, cut: float, *, payloads: bool) -> None:
        st = self.store
        hi = st.read(lambda c: st.id_bound(c, "messages", "received_at", cut, keep_newest=not payloads))
        after = self.p.payload_marks.get(scope, 0) if payloads else 0
        first_kept = None
        for _ in range(RUN_BATCHES):
            if self.p.stopping.is_set():
                return
            t0 = time.monotonic()
            ids, cursor, kept = st.due_messages(scope, cut, after=after, hi=hi, limit=self.batch,
                                                payloads=payloads, now=self.now)
            if kept is not None and first_kept is None:
                first_kept = kept
            ids = [i for i in ids if i not in self.taken]
            if ids:
                self.taken.update(ids)
                if self.bundle is not None:
                    self._archive_messages(ids, "payload" if payloads else "message")
                fn = st.prune_payloads_within if payloads else st.delete_messages_within
                for k in range(0, len(ids), OP_MESSAGES):
                    self._do(lambda c, part=ids[k:k + OP_MESSAGES], fn=fn: fn(c, part, self.now))
                self._pace(t0)
            after = cursor
            if after >= hi:
                break
        if payloads:
            # the next run starts after what is done, but not after a message still needed
            self.p.payload_marks[scope] = after if first_kept is None else min(after, first_kept - 1)

    def _archive_messages(self, ids: list[int], what: str) -> None:
        st, b = self.store, self.bundle
        for k in range(0, len(ids), ARCHIVE_PAGE):
            chunk = ids[k:k + ARCHIVE_PAGE]
            for row in st.iter_messages(ids=chunk):
                b.message(row | {"pruned": what})
            for row in st.rows_of_messages("queue_entries", chunk):
                b.entry(row | {"pruned": what})
            for row in st.rows_of_messages("submissions", chunk):
                b.submission(row | {"pruned": what})
            if what == "message":
                for row in st.rows_of_messages("mail_receipts", chunk):
                    b.line("mail_receipts", row)

    def identities(self, cut_ts: float) -> None:
        st = self.store
        cut = utc_naive(cut_ts)
        seen: set = set()
        for _ in range(RUN_BATCHES):
            if self.p.stopping.is_set():
                break
            hist, idents = st.due_identities(cut, limit=self.batch)
            hist = [h for h in hist if ("h", h) not in seen]
            idents = [i for i in idents if ("i", i) not in seen]
            if not hist and not idents:
                break
            seen.update(("h", h) for h in hist)
            seen.update(("i", i) for i in idents)
            if self.bundle is not None:
                for row in st.rows_by_id("identity_history", hist):
                    self.bundle.line("identity_history", row)
                for row in st.rows_by_id("identities", idents):
                    self.bundle.line("identities", row)
                for row in st.rows_by_id("identity_identifiers", idents, "identity_id"):
                    self.bundle.line("identity_identifiers", row)
                for row in st.rows_by_id("identity_history", idents, "identity_id"):
                    if ("h", row["id"]) not in seen:
                        self.bundle.line("identity_history", row)
            self._do(lambda c, h=hist, i=idents: st.delete_identities_within(c, h, i))
            if self.bundle is None:
                continue
            # with an archive, deletions wait: the next selection would find the same rows
            break

    # -- end --------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """With an archive: close it (on disk, fsynced), then delete what it holds. A stop asked
        meanwhile does not interrupt the deletions (the archive would hold rows still stored);
        it only drops the pacing."""
        name = None
        if self.bundle is not None:
            if self.plan and not self.p.stopping.is_set():
                self.bundle.close()
                name = self.written = self.archive.name
                self.bundle = None
                for op in self.plan:
                    t0 = time.monotonic()
                    try:
                        self._apply(self.p._write(op))
                    except Exception as exc:  # noqa: BLE001 - the next run finds the rest
                        return self.detail(logs.error_text(exc, 300), name)
                    self._pace(t0)
            else:
                self.abandon()
        return self.detail(None, name)

    def detail(self, error: str | None, archive: str | None = None) -> dict:
        out = {"counts": dict(sorted(self.counts.items())), "kept": self.kept,
               "archive": archive or self.written}
        if error is not None:
            out["error"] = error
        return out

    def _pace(self, t0: float) -> None:
        """Sleep as long as the batch took (see PACE); at once when asked to stop."""
        self.p.stopping.wait(min(1.0, PACE * (time.monotonic() - t0)))

    def abandon(self) -> None:
        if self.bundle is not None:
            self.bundle.abandon()
            self.bundle = None


class RetentionThread:
    """Runs the pruner every ``engine.retention.interval`` in a thread of its own (archive
    writing and reads stay off the reactor)."""

    def __init__(self, pruner: Pruner):
        self.pruner = pruner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the run under way after its current op (off the reactor: its ops need it)."""
        self.pruner.stopping.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        last = time.monotonic()
        # ticks of at most a second: a reload's new interval applies without a restart
        while not self._stop.wait(min(TICK, float(self.pruner.config_fn().engine.retention.interval))):
            if time.monotonic() - last < float(self.pruner.config_fn().engine.retention.interval):
                continue
            last = time.monotonic()
            try:
                self.pruner.run()
            except Exception as exc:  # noqa: BLE001 - the next run tries again
                log.error("retention.failed", error=logs.error_text(exc, 300), pid=os.getpid())
