#!/usr/bin/env python3
"""Durable ingest benchmark: mini-PFI against python-hl7's asyncio MLLP server, in the same run.

Closed loop: N connections, each sends one message, waits for its ACK, checks MSA-2 equals the
MSH-10 it sent (unique per message), then sends the next. Reports msg/s and ACK latency p50/p99.
An open-loop mode (``--rate``) offers a fixed message rate and reports the ACK latency at that load.

The server under test runs in its own process pinned to CPU 0, the load generator on CPU 1
(server and load generator never compete for one core). mini-PFI runs at the engine's default log level (``info``: one JSON
event per stored message) with its logs going to a file, as a user runs it. mini-PFI runs with a route to a disabled destination, so each
message costs what a real one does at ingest (message row + one queue entry + the stored ACK, one
group commit) without delivery traffic. python-hl7's server stores nothing (not durable).

Paired measurement: this VM's speed drifts by 15-30 % from one minute to the next, so each round
starts every server, then cuts each closed-loop measurement into ``--slices`` slices run in turn
on every server (mini-PFI/SQLite, mini-PFI/PostgreSQL, python-hl7, again, ...): every server is
measured over the same minutes, and the ratio of a round compares like with like.

    python bench/ingest.py --connections 1,8,32 --backends sqlite,postgresql --peer
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SB, EB = b"\x0b", b"\x1c\x0d"
PG_URL = os.environ.get("MINIPFI_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

TEMPLATE = (
    "MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|20240306111154||ADT^A01^ADT_A01|{cid}|P|2.5^FRA^2.11|||||FRA|UNICODE UTF-8|FR||2.11^IHE_FRANCE-2.11-PAM\r"
    "EVN||20240306111154||||20240306111154\r"
    "PID|1||{ipp}^^^CHU-X&000897406&N^PI~279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS^^20101207||"
    "PAT-TROIS^DOMINIQUE^DOMINIQUE^^^^L||19790328|F|||28 Av de Breteuil^^PARIS^^75007^FRA^H~^^^^^^BDL^^63220|||||S||"
    "24000006^^^CHU-X&000897406&M^AN|||||||1|||||N||VALI|20240306111153\r"
    "PV1|1|I|^^^CHU-X&000897406&M^O^^||||||||||||||||000897406^^^CHU-X&000897406&M^VN^^20210409||||||||||||||||||||||||||||||||V\r"
    "ZBE|001^CHU-X^000897406|20240306110000||INSERT|N||Chir V^^^^^CHU-X&000897406&N^UF^^^6268|Chir V^^^^^CHU-X&000897406&N^UF^^^6268|HMS\r"
    "ZFA|ACTIF|20240306111154|||||||INO|20240306111154|IC|20240306111154\r"
)


# distinct patients (PID-3.1) among the messages sent: 1 = every message is the same patient
PATIENTS = 1


def ipp_of(cid: str) -> str:
    return "000003" if PATIENTS <= 1 else f"{zlib.crc32(cid.encode()) % PATIENTS:06d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msa(ack: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an ACK: the acknowledgment code and the control id it answers."""
    for seg in ack.replace(b"\n", b"\r").split(b"\r"):
        if seg.startswith(b"MSA"):
            parts = seg.split(b"|")
            return (parts[1].decode() if len(parts) > 1 else "",
                    parts[2].decode() if len(parts) > 2 else "")
    return "", ""


def msa2(ack: bytes) -> str:
    return msa(ack)[1]


async def _conn_loop(port, prefix, deadline, lat, errors, rate_gap=None, nacks=None, sent=None,
                     stop=None):
    """One closed-loop sender until ``deadline`` (perf_counter) or until ``stop`` (an
    asyncio.Event) is set; ``sent`` (a dict) receives control id -> time.time() of each send."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    next_at = time.perf_counter()
    try:
        while time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
            if rate_gap:
                now = time.perf_counter()
                if now < next_at:
                    await asyncio.sleep(next_at - now)
                next_at += rate_gap
            cid = f"{prefix}{i}"
            i += 1
            t0 = time.perf_counter()
            if sent is not None:
                sent[cid] = time.time()
            writer.write(SB + TEMPLATE.format(cid=cid, ipp=ipp_of(cid)).encode() + EB)
            data = await reader.readuntil(EB)
            lat.append(time.perf_counter() - t0)
            code, answered = msa(data[data.find(SB) + 1 : -2])
            if answered != cid:
                errors.append(cid)
            elif code not in ("AA", "CA") and nacks is not None:
                nacks.append(cid)  # answered, but not accepted: not a durable message
    finally:
        writer.close()


async def _load(port, conns, seconds, rate=None, keep=None):
    lat, errors, nacks = [], [], []
    deadline = time.perf_counter() + seconds
    tag = f"B{int(time.time() * 1000) % 10**9}"
    gap = (conns / rate) if rate else None
    t0 = time.perf_counter()
    await asyncio.gather(*[_conn_loop(port, f"{tag}c{c}n", deadline, lat, errors, gap, nacks)
                           for c in range(conns)])
    elapsed = time.perf_counter() - t0
    if keep is not None:  # raw figures, for slices summed by _interleaved
        keep.append((elapsed, lat, len(errors), len(nacks)))
    return _figures(elapsed, lat, len(errors), len(nacks))


def _figures(elapsed, lat, errors, nacks) -> dict:
    lat = sorted(lat)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {"messages": len(lat), "msg_per_s": len(lat) / elapsed, "p50_ms": q(0.50), "p99_ms": q(0.99),
            "msa2_mismatches": errors, "not_accepted": nacks}


def run_load(port, conns, seconds, rate=None, keep=None):
    return asyncio.run(_load(port, conns, seconds, rate, keep))


def wait_port(port, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start")


def host_steal(since=None):
    """CPU time the hypervisor gave to others (``steal`` of /proc/stat): with ``since`` (an
    earlier reading), the share of the two cores' time stolen in between, in %; else a reading.
    A VM that is paused for tens of milliseconds puts every message of that moment into the p99."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0 if since is not None else None
    reading = (v[7] if len(v) > 7 else 0, sum(v))
    if since is None:
        return reading
    if not since or reading[1] <= since[1]:
        return 0.0
    return 100.0 * (reading[0] - since[0]) / (reading[1] - since[1])


DISABLED_SINK = """
            type: mllp
            host: 127.0.0.1
            port: 9
            enabled: false
"""


def start_minipfi(backend: str, tmp: Path, log_level: str = "info", *, label: str | None = None,
                  channel_extra: str = "", root: Path = ROOT, sink: str = DISABLED_SINK):
    """A fresh engine (own SQLite file or PostgreSQL schema) with one channel routed to one
    destination, disabled unless ``sink`` (its YAML body, indented 12 spaces) says otherwise;
    ``channel_extra`` is YAML added under the channel (indented 12 spaces), e.g. an
    ``identity_feed`` or ``reports`` block. Returns (process, port, cleanup)."""
    label = label or backend
    port, status_port = free_port(), free_port()
    # every load-generator connection comes from 127.0.0.1: one peer address (a tree of the
    # engine older than the per-peer cap does not know the setting)
    if root == ROOT or "max_connections_per_peer" in (root / "engine" / "config.py").read_text():
        channel_extra = "            framing: {max_connections_per_peer: 256}\n" + channel_extra
    cfg = tmp / f"{label}.yaml"
    cfg.write_text(textwrap.dedent(f"""
        engine:
          log_level: {log_level}
          environment: test
          status: {{bind: 127.0.0.1, port: {status_port}}}
        channels:
          bench-in:
            type: mllp
            port: {port}
{channel_extra}
        routes:
          - name: all
            from: bench-in
            to: [sink]
        destinations:
          sink:
{sink}
    """))
    env, cleanup = store_env(backend, label)
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "engine.cli", "run", "--config", str(cfg),
           "--data-dir", str(tmp / f"data-{label}")]
    if root != ROOT:  # another source tree of the engine (--compare-tree): its code, our venv
        env["PYTHONPATH"] = str(root)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / f"{label}.log", "w"))
    wait_port(port)
    wait_ready(status_port)
    return proc, port, cleanup


def _stat_cpu(path: str) -> float:
    """User + system CPU seconds in a ``/proc`` ``stat`` file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/<pid>/stat``)."""
    return _stat_cpu(f"/proc/{pid}/stat")


def reactor_cpu_seconds(pid: int) -> float:
    """Of :func:`cpu_seconds`, the main thread's (the engine's reactor); the rest is the other
    threads' (the store writer's, mostly)."""
    return _stat_cpu(f"/proc/{pid}/task/{pid}/stat")


def store_env(backend: str, label: str):
    """(environment, cleanup) for an engine process on its own store: SQLite in its data
    directory, or a fresh PostgreSQL schema dropped by ``cleanup``."""
    env = dict(os.environ)
    cleanup = lambda: None  # noqa: E731
    if backend == "postgresql":
        import sqlalchemy as sa

        schema = f"bench_{os.getpid()}_{label.replace('-', '_')}"
        eng = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            c.exec_driver_sql(f"CREATE SCHEMA {schema}")
        env["MINIPFI_DB_URL"] = f"{PG_URL}?options=-csearch_path%3D{schema}"

        def cleanup():
            with eng.connect() as c:
                c.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            eng.dispose()
    else:
        env.pop("MINIPFI_DB_URL", None)
    return env, cleanup


def wait_ready(status_port: int, timeout: float = 30.0) -> None:
    end = time.time() + timeout
    while time.time() < end:  # the engine's /ready: store migrated, listeners up
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001
            time.sleep(0.1)


PEER_SERVER = r"""
import asyncio, sys, hl7
from hl7.mllp import start_hl7_server
async def handle(reader, writer):
    try:
        while not writer.is_closing():
            msg = await reader.readmessage()
            writer.writemessage(msg.create_ack())
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
async def main(port):
    async with await start_hl7_server(handle, "127.0.0.1", port, limit=1 << 20) as server:
        await server.serve_forever()
asyncio.run(main(int(sys.argv[1])))
"""


def start_peer(tmp: Path):
    port = free_port()
    script = tmp / "peer_server.py"
    script.write_text(PEER_SERVER)
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, str(script), str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "peer.log", "w"))
    wait_port(port)
    return proc, port


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", default="1,8,32")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--peer", action="store_true", help="also measure python-hl7's asyncio MLLP server")
    ap.add_argument("--rate", type=float, default=1000.0, help="open-loop rate for the latency check (0 = skip)")
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--compare-tree", action="append",
                    help="also measure the engine of this source tree on the same backends (same venv), e.g. a "
                         "worktree of the previous commit: before/after figures in the same rounds")
    ap.add_argument("--log-level", default="info", help="mini-PFI log level (default: info, the engine's default)")
    ap.add_argument("--keep-logs", help="copy the servers' log files into this directory")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds: every server measured again in each round (fresh process and "
                         "database); ratios are taken within a round, then the median")
    ap.add_argument("--slices", type=int, default=5,
                    help="each closed-loop measurement is cut into this many slices, run in turn "
                         "on every server (A B C A B C ...), so that all servers see the same "
                         "minutes of this shared VM; 1 = one block per server")
    args = ap.parse_args()
    os.sched_setaffinity(0, {1}) if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1 else None
    conns = [int(c) for c in args.connections.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="minipfi-bench-") as td:
        tmp = Path(td)
        servers = [("mini-pfi/" + b, b) for b in args.backends.split(",") if b]
        for tree in args.compare_tree or []:  # e.g. a worktree of the previous commit
            for b in args.backends.split(","):
                if b:
                    servers.append((f"mini-pfi/{b} @{Path(tree).name}", f"{b}@{Path(tree).resolve()}"))
        if args.peer:
            servers.append(("python-hl7 (not durable)", "peer"))
        for rnd in range(1, args.repeat + 1):
            if args.repeat > 1:
                print(f"-- round {rnd}/{args.repeat}", flush=True)
            results += _round(servers, tmp, conns, args, rnd)
        if args.keep_logs:
            import shutil

            Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
            for f in tmp.glob("*.log"):
                shutil.copy(f, Path(args.keep_logs) / f.name)
    _summary(results, args.repeat)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    bad = sum(r["msa2_mismatches"] + r["not_accepted"] for r in results)
    if bad:
        print(f"\nFAILED: {bad} ACKs answered another control id or did not accept the message",
              file=sys.stderr)
    return 1 if bad else 0


# After a slice on a mini-PFI server, let it go idle long enough for its idle-time WAL
# checkpoint (store.CHECKPOINT_IDLE_S = 0.5 s) to run before the next server's slice, so that
# work never lands in another server's measurement.
SETTLE_S = 0.7


def _round(servers, tmp, conns, args, rnd) -> list[dict]:
    """One round: every server fresh (own process, own database), then for each connection
    count the closed-loop load in ``--slices`` slices taken in turn on every server; then the
    open-loop latency check on each mini-PFI server."""
    started = []  # (label, kind, proc, port, cleanup)
    out = []
    try:
        for label, kind in servers:
            if kind == "peer":
                proc, port = start_peer(tmp)
                cleanup = lambda: None  # noqa: E731
            else:
                backend, _, tree = kind.partition("@")
                proc, port, cleanup = start_minipfi(
                    backend, tmp, args.log_level, label=f"{backend}-{len(started)}-r{rnd}",
                    root=Path(tree) if tree else ROOT)
            started.append((label, kind, proc, port, cleanup))
            run_load(port, 4, args.warmup)
        slices = max(1, args.slices)
        for n in conns:
            raw = {label: [] for label, *_ in started}
            steal0 = host_steal()
            for _ in range(slices):
                for label, kind, _proc, port, _c in started:
                    run_load(port, n, args.seconds / slices, keep=raw[label])
                    if kind != "peer" and len(started) > 1:
                        time.sleep(SETTLE_S)
            steal = host_steal(steal0)
            for label, *_ in started:
                parts = raw[label]
                r = _figures(sum(p[0] for p in parts), [x for p in parts for x in p[1]],
                             sum(p[2] for p in parts), sum(p[3] for p in parts))
                r.update(server=label, connections=n, mode="closed-loop", round=rnd, slices=slices,
                         host_steal_pct=steal)
                out.append(r)
                print(f"{label:<28} {n:>3} conns  {r['msg_per_s']:>8.0f} msg/s  p50 {r['p50_ms']:.2f} ms  "
                      f"p99 {r['p99_ms']:.2f} ms  mismatches {r['msa2_mismatches']}  "
                      f"not accepted {r['not_accepted']}", flush=True)
            print(f"{'':<28} (host steal during these slices: {steal:.1f} %)", flush=True)
        if args.rate:
            for label, kind, _proc, port, _c in started:
                if kind == "peer":
                    continue
                steal0 = host_steal()
                r = run_load(port, 8, args.seconds, rate=args.rate)
                r.update(server=label, connections=8, mode=f"open-loop {args.rate:.0f} msg/s", round=rnd,
                         host_steal_pct=host_steal(steal0))
                out.append(r)
                print(f"{label:<28} offered {args.rate:.0f} msg/s: got {r['msg_per_s']:.0f} msg/s  "
                      f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                      f"(host steal {r['host_steal_pct']:.1f} %)", flush=True)
    finally:
        for _label, _kind, proc, _port, cleanup in started:
            stop(proc)
            cleanup()
    return out


def _median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _summary(results, rounds) -> None:
    """Ratios to python-hl7 computed within each round (same minutes, same machine state),
    then the median over the rounds, with every round's value."""
    peer = {(r["round"], r["connections"]): r["msg_per_s"] for r in results
            if r["server"].startswith("python-hl7")}
    if not peer:
        return
    print("\nratio to python-hl7's non-durable server (closed loop), within each round:")
    keys = sorted({(r["server"], r["connections"]) for r in results
                   if r["mode"] == "closed-loop" and not r["server"].startswith("python-hl7")})
    for server, n in keys:
        ratios = [r["msg_per_s"] / peer[(r["round"], n)] for r in results
                  if r["server"] == server and r["connections"] == n and r["mode"] == "closed-loop"
                  and (r["round"], n) in peer]
        rates = [r["msg_per_s"] for r in results
                 if r["server"] == server and r["connections"] == n and r["mode"] == "closed-loop"]
        if not ratios:
            continue
        if rounds > 1:
            print(f"  {server:<24} {n:>3} conns: median {_median(ratios):.1f}x "
                  f"[{' '.join(f'{x:.1f}' for x in ratios)}], median {_median(rates):,.0f} msg/s")
        else:
            print(f"  {server:<24} {n:>3} conns: {ratios[0]:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
