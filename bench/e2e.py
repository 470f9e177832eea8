#!/usr/bin/env python3
"""End-to-end benchmark: ingest while delivering, ingest while the destination is down, backlog drain.

The engine runs as deployed (``minipfi run``, log level ``info``, pinned to CPU 0), one channel
routed to one MLLP destination; the load generator and the receiver (``bench/receiver.py``, an
asyncio receiver that ACKs without parsing, so that it is never the limit) share CPU 1.
Scenarios, each on a fresh engine and database:

``disabled``     the destination is ``enabled: false`` (what ``bench/ingest.py`` measures);
``unreachable``  the destination is enabled and nothing listens on its port: the queue grows;
``e2e``          the receiver is up: ingest msg/s, ACK p99, delivered msg/s (messages received
                 by the receiver during the measurement, over its length) and the latency from
                 the sender's write to the receiver's read (receipt -> delivered) p50 / p99;
``backlog``      ``--backlog`` messages are queued while nothing listens, then the receiver
                 comes up and the closed-loop senders keep sending: the drain rate of the
                 backlog and the senders' msg/s and ACK p99 meanwhile.

``--compare-tree DIR`` measures another source tree of the engine (e.g. a worktree of the
previous commit) in the same run, scenario by scenario, so that each ratio compares servers
measured within the same minutes of this shared machine.

    python bench/e2e.py --backends sqlite --connections 8 --seconds 5 --backlog 100000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ingest  # noqa: E402
from ingest import (  # noqa: E402
    ROOT,
    _conn_loop,
    _figures,
    _median,
    free_port,
    host_steal,
    run_load,
    start_minipfi,
    stop,
    wait_port,
)

SCENARIOS = ("disabled", "unreachable", "e2e", "backlog")


def sink_yaml(port: int, ordering: str) -> str:
    """An enabled MLLP destination on ``port``, retrying within a second (a peer that comes
    back is found quickly)."""
    order = ("ordering: key\n                ordering_key: PID-3.1\n                concurrency: 4"
             if ordering == "key" else "ordering: destination")
    return f"""
            type: mllp
            host: 127.0.0.1
            port: {port}
            enabled: true
            connect_timeout: 2s
            ack_timeout: 10s
            queue:
                retry: {{initial_delay: 500ms, max_delay: 1s, multiplier: 2.0, jitter: 0.2}}
                max_attempts: 0
                {order}
"""


class ReceiverProcess:
    def __init__(self, tmp: Path, port: int | None = None):
        self.port = port or free_port()
        self.ctl = free_port()
        self.proc = subprocess.Popen(
            ["taskset", "-c", "1", sys.executable, str(ROOT / "bench" / "receiver.py"),
             str(self.port), str(self.ctl)],
            stdout=subprocess.DEVNULL, stderr=open(tmp / f"receiver-{self.port}.log", "w"))
        wait_port(self.ctl)

    def _ask(self, cmd: bytes) -> dict:
        with socket.create_connection(("127.0.0.1", self.ctl), timeout=30) as s:
            s.sendall(cmd + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    def count(self) -> int:
        return self._ask(b"count")["count"]

    def dump(self) -> list:
        return self._ask(b"dump")["arrivals"]

    def close(self) -> None:
        stop(self.proc)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process, from /proc."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_share(pid: int, before: dict, seconds: float) -> tuple[float, float]:
    """(main thread = the reactor, every other thread: store writer and thread pool) CPU over
    ``seconds``, in % of one core."""
    after = thread_cpu(pid)
    main = after.get(pid, 0.0) - before.get(pid, 0.0)
    rest = sum(v - before.get(t, 0.0) for t, v in after.items() if t != pid)
    return 100 * main / seconds, 100 * rest / seconds


def _q(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))] * 1000 if v else float("nan")


async def _senders(port, conns, seconds, tag, sent, stop_event=None):
    lat, errors, nacks = [], [], []
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*[_conn_loop(port, f"{tag}c{c}n", deadline, lat, errors, None, nacks, sent,
                                      stop_event) for c in range(conns)])
    return _figures(time.perf_counter() - t0, lat, len(errors), len(nacks))


def measure_e2e(port, receiver: ReceiverProcess, conns, seconds, drain_s, pid=None) -> dict:
    """Closed-loop senders for ``seconds``; then wait (at most ``drain_s``) until the receiver
    has everything, for the latency of the last messages. ``pid``: the engine's CPU over the
    senders' window alone (``cpu_window_pct``, % of one core, all threads)."""
    receiver.dump()
    sent: dict = {}
    cpu0 = thread_cpu(pid) if pid else None
    w0 = time.time()
    r = asyncio.run(_senders(port, conns, seconds, f"E{int(w0 * 1000) % 10**9}", sent))
    w1 = time.time()
    if cpu0 is not None:
        r["cpu_window_pct"] = sum(cpu_share(pid, cpu0, w1 - w0))
    arrivals = receiver.dump()
    end = time.time() + drain_s
    while len(arrivals) < len(sent) and time.time() < end:
        time.sleep(0.2)
        arrivals += receiver.dump()
    in_window = sum(1 for _cid, t in arrivals if w0 <= t <= w1)
    lats = [t - sent[cid] for cid, t in arrivals if cid in sent]
    r.update(delivered_per_s=in_window / (w1 - w0), e2e_p50_ms=_q(lats, 0.5), e2e_p99_ms=_q(lats, 0.99),
             undelivered=len(sent) - len({cid for cid, _t in arrivals if cid in sent}))
    return r


def fill_backlog(port, n: int) -> float:
    """Send ``n`` messages (16 closed-loop connections); returns msg/s."""
    async def go():
        sent: dict = {}
        stop_event = asyncio.Event()

        async def watch():
            while len(sent) < n:
                await asyncio.sleep(0.01)
            stop_event.set()

        t0 = time.perf_counter()
        w = asyncio.ensure_future(watch())
        await _senders(port, 16, 3600, "F", sent, stop_event)
        w.cancel()
        return len(sent) / (time.perf_counter() - t0), len(sent)

    rate, total = asyncio.run(go())
    return rate, total


def measure_backlog(port, receiver_port, tmp, conns, backlog, max_s) -> dict:
    """Fill ``backlog`` messages while nothing listens, start the receiver, keep ``conns``
    senders going until the backlog is delivered (or ``max_s``)."""
    fill_rate, filled = fill_backlog(port, backlog)
    receiver = ReceiverProcess(tmp, receiver_port)
    t_up = time.time()

    async def go():
        stop_event = asyncio.Event()
        sent: dict = {}
        state = {"backlog_done_at": None, "backlog_seen": 0}

        async def watch():
            loop = asyncio.get_running_loop()
            while time.time() - t_up < max_s:
                await asyncio.sleep(0.25)
                arrivals = await loop.run_in_executor(None, receiver.dump)
                for cid, t in arrivals:
                    if cid.startswith("Fc"):
                        state["backlog_seen"] += 1
                        state["last_backlog_at"] = t
                if state["backlog_seen"] >= filled:
                    state["backlog_done_at"] = state["last_backlog_at"]
                    break
            stop_event.set()

        w = asyncio.ensure_future(watch())
        r = await _senders(port, conns, max_s + 60, f"D{int(t_up) % 10**6}", sent, stop_event)
        await w
        return r, state

    r, state = asyncio.run(go())
    done = state["backlog_done_at"]
    r.update(backlog=filled, fill_per_s=fill_rate, backlog_delivered=state["backlog_seen"],
             drain_s=(done - t_up) if done else None,
             drain_per_s=(state["backlog_seen"] / ((done or time.time()) - t_up)))
    receiver.close()
    return r


class WalPeak:
    """The largest size the engine's SQLite WAL file reached (sampled every 0.1 s): the disk
    the WAL takes while delivery and ingest write."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.1):
            for f in self.data_dir.glob("*-wal"):
                try:
                    self.peak = max(self.peak, f.stat().st_size)
                except OSError:
                    pass

    def close(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def run_scenario(scenario, kind, label, tmp, args, rnd) -> dict:
    backend, _, tree = kind.partition("@")
    root = Path(tree) if tree else ROOT
    receiver = None
    rport = free_port()
    if scenario == "disabled":
        sink = None
    else:
        sink = sink_yaml(rport, args.ordering)
    extra = {} if sink is None else {"sink": sink}
    engine_label = f"{scenario}-{backend}-{rnd}-{len(label)}"
    proc, port, cleanup = start_minipfi(backend, tmp, args.log_level, label=engine_label,
                                        root=root, **extra)
    wal = WalPeak(tmp / f"data-{engine_label}") if backend == "sqlite" else None
    try:
        if scenario == "e2e":
            receiver = ReceiverProcess(tmp, rport)
        run_load(port, 4, args.warmup)
        if scenario == "e2e":
            time.sleep(1.0)  # let the warm-up's messages go out
        steal0 = host_steal()
        load0 = os.getloadavg()[0]
        cpu0, t0 = thread_cpu(proc.pid), time.time()
        if scenario in ("disabled", "unreachable"):
            r = run_load(port, args.connections, args.seconds)
        elif scenario == "e2e":
            r = measure_e2e(port, receiver, args.connections, args.seconds, args.drain_wait, proc.pid)
        else:
            r = measure_backlog(port, rport, tmp, args.connections, args.backlog, args.backlog_max_s)
        reactor_pct, others_pct = cpu_share(proc.pid, cpu0, time.time() - t0)
        r.update(scenario=scenario, server=label, round=rnd, connections=args.connections,
                 host_steal_pct=host_steal(steal0), loadavg=load0, cpu_reactor_pct=reactor_pct,
                 cpu_other_threads_pct=others_pct, wal_peak_mb=wal.close() if wal else None)
        return r
    finally:
        if wal is not None:
            wal.close()
        if receiver is not None:
            receiver.close()
        stop(proc)
        cleanup()


def describe(r) -> str:
    s = (f"{r['scenario']:<12} {r['server']:<34} ingest {r['msg_per_s']:>7.0f} msg/s  "
         f"ACK p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms")
    if r["scenario"] == "e2e":
        s += (f"  delivered {r['delivered_per_s']:>7.0f} msg/s  receipt->delivered p50 "
              f"{r['e2e_p50_ms']:.1f} p99 {r['e2e_p99_ms']:.1f} ms  undelivered {r['undelivered']}")
    if r["scenario"] == "backlog":
        drain = f"{r['drain_s']:.1f} s" if r["drain_s"] else "NOT DRAINED"
        s += (f"  backlog {r['backlog']} (filled at {r['fill_per_s']:.0f} msg/s) drained in {drain}: "
              f"{r['drain_per_s']:.0f} msg/s ({r['backlog_delivered']} delivered)")
    if r.get("wal_peak_mb") is not None:
        s += f"  WAL peak {r['wal_peak_mb']:.0f} MB"
    s += (f"  [CPU reactor {r['cpu_reactor_pct']:.0f} %, writer+pool {r['cpu_other_threads_pct']:.0f} %;"
          f" load {r['loadavg']:.1f}, steal {r['host_steal_pct']:.1f} %]")
    bad = r["msa2_mismatches"] + r["not_accepted"]
    if bad:
        s += f"  BAD ACKS {bad}"
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="sqlite")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--backlog", type=int, default=100_000, help="queued messages of the backlog scenario")
    ap.add_argument("--backlog-max-s", type=float, default=300.0, help="give up draining after this long")
    ap.add_argument("--drain-wait", type=float, default=30.0,
                    help="e2e: wait at most this long after the senders stop for the last deliveries")
    ap.add_argument("--ordering", choices=("destination", "key"), default="destination")
    ap.add_argument("--patients", type=int, default=1,
                    help="distinct patients (PID-3.1) among the messages: with --ordering key, "
                         "the keys the lanes can take in parallel")
    ap.add_argument("--compare-tree", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--keep-logs", help="copy the engines' and receivers' logs into this directory")
    ap.add_argument("--json")
    args = ap.parse_args()
    ingest.PATIENTS = args.patients
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    servers = []
    for b in args.backends.split(","):
        servers.append((f"mini-pfi/{b}", b))
        for tree in args.compare_tree:
            servers.append((f"mini-pfi/{b} @{Path(tree).name}", f"{b}@{Path(tree).resolve()}"))
    results = []
    with tempfile.TemporaryDirectory(prefix="minipfi-e2e-") as td:
        tmp = Path(td)
        for rnd in range(1, args.repeat + 1):
            for scenario in args.scenarios.split(","):
                for label, kind in servers:
                    r = run_scenario(scenario, kind, label, tmp, args, rnd)
                    print(describe(r), flush=True)
                    results.append(r)
        if args.keep_logs:
            import shutil

            Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
            for f in tmp.glob("*.log"):
                shutil.copy(f, Path(args.keep_logs) / f.name)
    _summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["msa2_mismatches"] or r["not_accepted"] for r in results) else 0


def _cpu_bound(results, server, e2e_rounds) -> str:
    """The engine's CPU per ingested message ``i`` (disabled scenario: CPU share / msg/s) and per
    delivered message ``d`` (e2e, over the senders' window: what the CPU share leaves after
    ``i`` per ingested message, per delivered message). On one core, in steady state (delivered
    <= ingested), the engine delivers at most ``1 / (i + d)`` msg/s: as a ratio to the disabled
    ingest ``D``, at most ``1 / ((i + d) D)``."""
    idle = [r for r in results if r["server"] == server and r["scenario"] == "disabled"]
    if not idle or not all("cpu_window_pct" in r for r in e2e_rounds):
        return "CPU per message: n/a"
    i = _median([(r["cpu_reactor_pct"] + r["cpu_other_threads_pct"]) / 100 / r["msg_per_s"] for r in idle])
    d = _median([max(0.0, r["cpu_window_pct"] / 100 - r["msg_per_s"] * i) / r["delivered_per_s"]
                 for r in e2e_rounds if r["delivered_per_s"]])
    disabled = _median([r["msg_per_s"] for r in idle])
    return (f"CPU per message ingested {i * 1e6:.0f} us, delivered {d * 1e6:.0f} us "
            f"(one core delivers at most {1 / (i + d):.0f} msg/s = {1 / ((i + d) * disabled):.2f}x)")


def _summary(results) -> None:
    """Per server: each scenario's ingest as a ratio to the disabled-destination ingest of the
    same round, and delivered / disabled ingest for e2e (medians over the rounds)."""
    print("\nratios to the disabled-destination ingest of the same round and server:")
    base = {(r["server"], r["round"]): r["msg_per_s"] for r in results if r["scenario"] == "disabled"}
    for server in dict.fromkeys(r["server"] for r in results):
        parts = []
        for scenario in SCENARIOS[1:]:
            rs = [r for r in results if r["server"] == server and r["scenario"] == scenario
                  and (server, r["round"]) in base]
            if not rs:
                continue
            ing = _median([r["msg_per_s"] / base[(server, r["round"])] for r in rs])
            parts.append(f"{scenario} ingest {ing:.2f}x")
            if scenario == "e2e":
                parts.append(f"e2e delivered {_median([r['delivered_per_s'] / base[(server, r['round'])] for r in rs]):.2f}x")
                parts.append(_cpu_bound(results, server, rs))
            if scenario == "backlog":
                parts.append(f"drain {_median([r['drain_per_s'] for r in rs]):.0f} msg/s")
        print(f"  {server:<34} " + ", ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
