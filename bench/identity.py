#!/usr/bin/env python3
"""Durable identity-feed throughput: ADT/s with the IHE PAM France feed, against plain
ingest of the same ADTs by the same engine, measured in the same run.

Closed loop, like ``bench/ingest.py`` (whose helpers this imports): N connections (default 8), each
sends one ADT^A01, waits for its ACK, checks MSA-1 = AA and MSA-2 = the MSH-10 it sent, then sends
the next. Every message has a unique MSH-10 and names a patient from a pool of synthetic patients
(default 2,000: distinct IPP, synthetic NIR with a valid key, test OID .10; connection c owns the
patients p with p mod N = c, so no two in-flight messages touch the same identity). The first
pass over the pool creates the identities, later ones update them (EVN-2 increases per message).

For each backend, two fresh engines (new SQLite file / new PostgreSQL schema) run in turn:

* ``plain``: ``identity_feed`` disabled: message row + queue entry + stored ACK, one group commit;
* ``identity``: ``identity_feed`` enabled: the same, plus parse, INS rules and the registry
  upsert with its history row, in the same transaction, before the ACK.

The engine is pinned to CPU 0, the load generator to CPU 1 (server and load generator on separate cores), with
its logs at ``info`` going to a file; the ADT route goes to a disabled destination (no delivery
traffic), as in ``bench/ingest.py``. Besides ADT/s, the engine process's CPU time (user + system,
``/proc``) per ADT over the measured window, and its reactor thread's share (the rest is the
store writer's, mostly): steadier than ADT/s on a shared host.

``--compare-tree DIR`` also measures the engine of another source tree (same venv), e.g. a
worktree of main: every round runs plain and identity of each tree in turn, so before and after
ratios come from the same minutes of the host.

    python bench/identity.py --backends sqlite,postgresql --connections 8 --patients 2000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest import EB, ROOT, SB, cpu_seconds, msa2, reactor_cpu_seconds, start_minipfi, stop  # noqa: E402

from engine.identity.ins import nir_key  # noqa: E402

OID_TEST = "1.2.250.1.213.1.4.10"

TEMPLATE = (
    "MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|{ts}||ADT^A01^ADT_A01|{cid}|P|2.5^FRA^2.11|||||FRA|UNICODE UTF-8|FR||"
    "2.11^IHE_FRANCE-2.11-PAM\r"
    "EVN||{ts}||||{ts}\r"
    "PID|1||{ipp}^^^CHU-X&000897406&N^PI~{nir}^^^ASIP-SANTE-INS-NIR&" + OID_TEST + "&ISO^INS^^20101207||"
    "SYNTH-BENCH^ALEX^ALEX CAMILLE^^^^L||19850712|F|||1 RUE DE TEST^^CLERMONT^^63000^FRA^H~^^^^^^BDL^^63220|||||S||"
    "{ipp}01^^^CHU-X&000897406&M^AN|||||||1|||||N||VALI|{ts}\r"
    "PV1|1|I|^^^CHU-X&000897406&M^O^^||||||||||||||||{ipp}01^^^CHU-X&000897406&M^VN||||||||||||||||||||||||||||||||V\r"
    "ZBE|{cid}^CHU-X^000897406|{ts}||INSERT|N||RADIO^^^^^CHU-X&000897406&N^UF^^^6268|"
    "RADIO^^^^^CHU-X&000897406&N^UF^^^6268|HMS\r"
    "ZFA|ACTIF|{ts}|||||||INO|{ts}|IC|{ts}\r"
    "ZFD|||Y|N|INSI|20211201||\r"
)


def patient(p: int) -> tuple[str, str]:
    """IPP and synthetic NIR (female, born 1985-07, department 63) of patient number ``p``."""
    body = f"2850763{p:06d}"
    return f"8{p:05d}", f"{body}{nir_key(body):02d}"


async def _conn_loop(port, conn_no, conns, patients, tag, deadline, lat, errors, clock):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    mine = [p for p in range(patients) if p % conns == conn_no]
    i = 0
    try:
        while time.perf_counter() < deadline:
            ipp, nir = patient(mine[i % len(mine)])
            cid = f"{tag}c{conn_no}n{i}"
            i += 1
            clock[0] += timedelta(seconds=1)  # EVN-2 increases: updates are never "older"
            ts = clock[0].strftime("%Y%m%d%H%M%S")
            msg = TEMPLATE.format(cid=cid, ipp=ipp, nir=nir, ts=ts).encode()
            t0 = time.perf_counter()
            writer.write(SB + msg + EB)
            data = await reader.readuntil(EB)
            lat.append(time.perf_counter() - t0)
            ack = data[data.find(SB) + 1:-2]
            if msa2(ack) != cid or b"MSA|AA|" not in ack:
                errors.append(cid)
    finally:
        writer.close()


async def _load(port, conns, seconds, patients, tag, clock):
    lat, errors = [], []
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*[_conn_loop(port, c, conns, patients, tag, deadline, lat, errors, clock)
                           for c in range(conns)])
    elapsed = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {"messages": len(lat), "adt_per_s": len(lat) / elapsed, "p50_ms": q(0.50), "p99_ms": q(0.99),
            "not_aa": len(errors)}


def run_load(port, conns, seconds, patients, tag, clock):
    return asyncio.run(_load(port, conns, seconds, patients, tag, clock))


def start_engine(backend: str, tmp: Path, identity: bool, log_level: str = "info", root: Path = ROOT,
                 label: str = ""):
    """A fresh engine (own SQLite file or PostgreSQL schema) of the source tree ``root``;
    returns (process, port, cleanup)."""
    label = f"{backend}-{'identity' if identity else 'plain'}{label}"
    feed = "            identity_feed: {enabled: true}" if identity else ""
    return start_minipfi(backend, tmp, log_level, label=label, channel_extra=feed, root=root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--patients", type=int, default=2000, help="synthetic patients (distinct IPPs)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--compare-tree", action="append", default=[],
                    help="also measure the engine of this source tree (same venv), in the same rounds")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (fresh engines each time)")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    trees = [("", ROOT)] + [(f"@{Path(t).name}", Path(t).resolve()) for t in args.compare_tree]
    results = []
    with tempfile.TemporaryDirectory(prefix="minipfi-bench-id-") as td:
        tmp = Path(td)
        for rnd in range(1, args.repeat + 1):
            for backend in [b for b in args.backends.split(",") if b]:
                for tree, root in trees:
                    for identity in (False, True):
                        label = f"{tree.replace('@', '-')}-r{rnd}"
                        proc, port, cleanup = start_engine(backend, tmp, identity, args.log_level,
                                                           root, label)
                        clock = [datetime(2024, 3, 6, 0, 0, 0)]
                        tag = f"I{int(time.time() * 1000) % 10**9}"
                        try:
                            run_load(port, 4, args.warmup, args.patients, tag + "w", clock)
                            cpu0, rcpu0 = cpu_seconds(proc.pid), reactor_cpu_seconds(proc.pid)
                            r = run_load(port, args.connections, args.seconds, args.patients, tag, clock)
                            cpu = cpu_seconds(proc.pid) - cpu0
                            rcpu = reactor_cpu_seconds(proc.pid) - rcpu0
                        finally:
                            stop(proc)
                            cleanup()
                        mode = "identity" if identity else "plain"
                        r.update(backend=backend, tree=tree, round=rnd, mode=mode,
                                 connections=args.connections, patients=args.patients,
                                 cpu_ms_per_adt=1000 * cpu / max(1, r["messages"]),
                                 reactor_cpu_ms_per_adt=1000 * rcpu / max(1, r["messages"]))
                        results.append(r)
                        print(f"{backend + tree:<22} {mode:<9} {args.connections:>3} conns  "
                              f"{r['adt_per_s']:>7.0f} ADT/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                              f"CPU {r['cpu_ms_per_adt']:.3f} ms/ADT (reactor {r['reactor_cpu_ms_per_adt']:.3f})  "
                              f"({r['messages']} ADT, "
                              f"not AA {r['not_aa']})", flush=True)
    print("\nidentity feed / plain ingest (same engine, same load):")
    for key in dict.fromkeys((r["round"], r["backend"], r["tree"]) for r in results):
        by = {r["mode"]: r for r in results if (r["round"], r["backend"], r["tree"]) == key}
        if "plain" in by and "identity" in by:
            i, p = by["identity"], by["plain"]
            print(f"  r{key[0]} {key[1] + key[2]:<22} {i['adt_per_s'] / p['adt_per_s']:.2f}x "
                  f"({i['adt_per_s']:.0f} vs {p['adt_per_s']:.0f} ADT/s); CPU per ADT "
                  f"{i['cpu_ms_per_adt']:.3f} vs {p['cpu_ms_per_adt']:.3f} ms "
                  f"({p['cpu_ms_per_adt'] / i['cpu_ms_per_adt']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["not_aa"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
