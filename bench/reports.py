#!/usr/bin/env python3
"""Report channel benchmark: an ORU^R01 carrying a ~200 KB CDA, over MLLP, durable.

Measures, in one run:
* closed-loop msg/s and ACK p50/p99 at N connections for the CI-SIS report step (parse, extract
  the CDA, CDA XSD validation, canonical submission stored with the message, before the ACK),
  against the same engine with the step disabled (plain durable ingest of the same bytes);
* the cost of the CI-SIS schematrons per document (in process, compiled validator).

    python bench/reports.py --connections 8 --seconds 10
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from ingest import start_minipfi  # noqa: E402
ORU = (ROOT.parent / "shared" / "corpus" / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2"
       / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1" / "ORU" / "Transmission initiale ORU"
       / "message_ORU_CR_Bio_INIT_N3_SEGUR.hl7")
SB, EB = b"\x0b", b"\x1c\x0d"


def template() -> tuple[bytes, bytes]:
    raw = ORU.read_bytes()
    head, sep, rest = raw.partition(b"|015|")
    assert sep, "MSH-10 015 expected in the corpus ORU"
    return head + b"|", b"|" + rest


async def _conn(port, prefix, deadline, lat, bad, head, tail):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    i = 0
    while time.perf_counter() < deadline:
        cid = f"{prefix}{i}".encode()
        i += 1
        t0 = time.perf_counter()
        writer.write(SB + head + cid + tail + EB)
        data = await reader.readuntil(EB)
        lat.append(time.perf_counter() - t0)
        if b"MSA|AA|" + cid not in data:
            bad.append(cid)
    writer.close()


def load(port, conns, seconds):
    head, tail = template()

    async def main():
        lat, bad = [], []
        deadline = time.perf_counter() + seconds
        t0 = time.perf_counter()
        tag = f"R{int(time.time() * 1000) % 10**8}c"
        await asyncio.gather(*[_conn(port, f"{tag}{c}n", deadline, lat, bad, head, tail) for c in range(conns)])
        el = time.perf_counter() - t0
        lat.sort()
        q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000  # noqa: E731
        return {"msg_per_s": len(lat) / el, "p50_ms": q(0.5), "p99_ms": q(0.99), "not_aa": len(bad), "n": len(lat)}

    return asyncio.run(main())


def start_engine(backend: str, tmp: Path, reports: bool):
    extra = ("            reports: {enabled: true, validation: {xsd: true, schematron: false}}" if reports else "")
    return start_minipfi(backend, tmp, label=f"reports-{backend}-{reports}", channel_extra=extra)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", default="8", help="comma-separated, e.g. 1,8,32")
    ap.add_argument("--backends", default="sqlite", help="comma-separated: sqlite,postgresql")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--schematron-docs", type=int, default=10)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity") and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    print(f"ORU {ORU.stat().st_size // 1024} KB, {args.seconds:.0f} s per measurement")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="minipfi-bench-reports-") as td:
        for backend in [b for b in args.backends.split(",") if b]:
            for conns in [int(c) for c in args.connections.split(",") if c]:
                rate = {}
                for reports in (False, True):
                    proc, port, cleanup = start_engine(backend, Path(td), reports)
                    try:
                        load(port, 2, 1.0)  # warm-up (also compiles the XSD once)
                        r = load(port, conns, args.seconds)
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(30)
                        cleanup()
                    rate[reports] = r["msg_per_s"]
                    label = "report step (parse+extract+XSD+submission)" if reports else "plain durable ingest"
                    print(f"{backend:<10} {conns:>2} conns  {label:<44} {r['msg_per_s']:7.1f} msg/s  "
                          f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  not AA: {r['not_aa']}", flush=True)
                ratios.append(f"  {backend:<10} {conns:>2} conns: {rate[True] / rate[False]:.2f}x")
    print("report step / plain ingest of the same bytes (same run):")
    print("\n".join(ratios))
    from engine.reports.cisis import parse_report
    from engine.reports.processing import cda_validator

    sub = parse_report(ORU.read_bytes(), "utf-8")
    cda = sub.documents[0].raw_bytes()
    v = cda_validator()
    t0 = time.perf_counter()
    v.validate(cda, schematron=True)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.schematron_docs):
        t0 = time.perf_counter()
        v.validate(cda, schematron=True)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(args.schematron_docs):
        v.validate(cda, schematron=False)
    xsd = (time.perf_counter() - t0) / args.schematron_docs
    print(f"CDA {len(cda) // 1024} KB: XSD {xsd * 1000:.1f} ms/doc; XSD+schematrons "
          f"{statistics.median(times) * 1000:.0f} ms/doc (median of {len(times)}; first call incl. "
          f"compilation {first:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
