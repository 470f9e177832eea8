#!/usr/bin/env python3
"""DMP end to end: CI-SIS MDM^T02 reports in over MLLP, out to the DMP simulator as ITI-41.

One run measures, on SQLite (or PostgreSQL with --backend), at N closed-loop connections:

* **ingest only**: the same reports into the same channel (CI-SIS report step, CDA XSD), the DMP
  destination disabled: the peer figure of the run;
* **end to end**: the DMP destination enabled (hold 0, ordering per document, concurrency 8,
  requests checked by the simulator: MTOM, XSDs, VIHF signature, hashes): ingest msg/s and ACK
  p99 while delivering, then reports/s from the first report received to the last one the
  simulator accepted, and the CPU seconds per report of the engine and of the simulator
  (``/proc/<pid>/stat``), which says where the time goes.

Each report is the corpus MDM^T02 (radiology CR, CDA R2 N1 with a PDF, 246 KB) with its own CDA
id (re-encoded in OBX-5, TXA-12 kept equal), so each one is a new DMP entry.

    python bench/dmp.py --connections 8 --reports 400
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from ingest import cpu_seconds, free_port, stop, store_env, wait_port, wait_ready  # noqa: E402

MDM = (ROOT.parent / "shared" / "corpus" / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2"
       / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1" / "MDM" / "Transmission initiale MDM"
       / "message_MDM_CR_Radio_INIT_N1_Base64.er7")
SB, EB = b"\x0b", b"\x1c\x0d"
CDA_ID_EXT = b"71024000081"


def variants(n: int, tag: str) -> list[tuple[str, bytes]]:
    """``n`` copies of the corpus MDM, each with its own MSH-10 and CDA id (OBX-5 re-encoded)."""
    raw = MDM.read_bytes()
    m = re.search(rb"(\^Base64\^)([A-Za-z0-9+/=]+)", raw)
    cda = base64.b64decode(m.group(2))
    assert cda.count(CDA_ID_EXT) >= 1 and raw.count(CDA_ID_EXT) == 1
    out = []
    for i in range(n):
        ext = f"{tag}{i:07d}".encode()
        doc = cda.replace(CDA_ID_EXT, ext, 1)
        msg = raw[:m.start(2)] + base64.b64encode(doc) + raw[m.end(2):]
        cid = f"{tag}{i}"
        msg = msg.replace(CDA_ID_EXT, ext, 1).replace(b"|015|", f"|{cid}|".encode(), 1)
        out.append((cid, msg))
    return out


def config(port, status_port, sim_port, pki: Path, enabled: bool, concurrency: int) -> str:
    return textwrap.dedent(f"""
        engine:
          environment: test
          status: {{bind: 127.0.0.1, port: {status_port}}}
        channels:
          bench-in:
            type: mllp
            port: {port}
            framing: {{max_connections_per_peer: 256}}
            reports: {{enabled: true, validation: {{xsd: true, schematron: false, on_failure: warn}}}}
        routes:
          - {{name: to-dmp, from: bench-in, to: [dmp]}}
        destinations:
          dmp:
            type: dmp
            enabled: {str(enabled).lower()}
            hold: 0s
            tls: {{cert: "{pki}/client.pem", key: "{pki}/client.key", ca: "{pki}/ca.pem"}}
            signing: {{cert: "{pki}/signer.pem", key: "{pki}/signer.key"}}
            vihf: {{secteur_activite: {{code: SA07, scheme: 1.2.250.1.71.4.2.4}}, lps_name: mini-PFI,
                    lps_version: "0.1", lps_homologation_id: BENCH, structure_id: "1000089740"}}
            xds: {{endpoint: "https://localhost:{sim_port}/si-dmp-server/v2/services/repository",
                   source_id: 1.2.250.1.999.99.1}}
            queue: {{ordering: document, concurrency: {concurrency}}}
    """)


def start_engine(tmp: Path, label: str, backend: str, cfg_text: str, port: int, status_port: int):
    cfg = tmp / f"{label}.yaml"
    cfg.write_text(cfg_text)
    env, cleanup = store_env(backend, f"dmp_{label.replace('-', '_')}")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(cfg), "--data-dir",
                             str(tmp / f"data-{label}")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / f"{label}.log", "w"))
    wait_port(port)
    wait_ready(status_port)
    return proc, cleanup


async def _send(port, batch, lat, bad, times):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    for cid, msg in batch:
        t0 = time.perf_counter()
        writer.write(SB + msg + EB)
        data = await reader.readuntil(EB)
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        times.append(t1)
        if b"MSA|AA|" + cid.encode() not in data:
            bad.append(cid)
    writer.close()


def send(port, messages, conns):
    async def main():
        lat, bad, times = [], [], []
        per = [messages[i::conns] for i in range(conns)]
        t0 = time.perf_counter()
        await asyncio.gather(*[_send(port, b, lat, bad, times) for b in per])
        return t0, time.perf_counter(), lat, bad

    return asyncio.run(main())


def pct(lat, p):
    lat = sorted(lat)
    return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")


def accepted(admin_port) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/health", timeout=5) as r:
        return int(json.loads(r.read())["accepted"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--reports", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8, help="DMP requests in flight (ordering: document)")
    ap.add_argument("--backend", default="sqlite", choices=["sqlite", "postgresql"])
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="minipfi-bench-dmp-") as td:
        tmp = Path(td)
        sim_port, admin_port = free_port(), free_port()
        sim = subprocess.Popen([sys.executable, "-m", "engine.cli", "dmp-simulator", "--make-pki", str(tmp / "pki"),
                                "--port", str(sim_port), "--admin-port", str(admin_port)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp / "sim.log", "w"))
        try:
            wait_port(admin_port)
            for label, enabled in (("ingest-only", False), ("end-to-end", True)):
                port, status_port = free_port(), free_port()
                proc, cleanup = start_engine(tmp, label, args.backend,
                                             config(port, status_port, sim_port, tmp / "pki", enabled,
                                                    args.concurrency), port, status_port)
                try:
                    send(port, variants(16, f"W{label[:1]}"), 4)            # warm-up
                    base = accepted(admin_port)
                    msgs = variants(args.reports, f"B{label[:1]}")
                    cpu_e, cpu_s = cpu_seconds(proc.pid), cpu_seconds(sim.pid)
                    t0, t1, lat, bad = send(port, msgs, args.connections)
                    r = {"reports": len(msgs), "ingest_per_s": round(len(msgs) / (t1 - t0), 1),
                         "ack_p50_ms": round(pct(lat, 0.5), 1), "ack_p99_ms": round(pct(lat, 0.99), 1),
                         "not_aa": len(bad)}
                    if enabled:
                        end = time.time() + 600
                        while accepted(admin_port) - base < len(msgs) and time.time() < end:
                            time.sleep(0.05)
                        done = time.perf_counter()
                        got = accepted(admin_port) - base
                        r.update(accepted=got, end_to_end_per_s=round(got / (done - t0), 1),
                                 engine_cpu_ms_per_report=round((cpu_seconds(proc.pid) - cpu_e) * 1000 / got, 1),
                                 simulator_cpu_ms_per_report=round((cpu_seconds(sim.pid) - cpu_s) * 1000 / got, 1))
                    else:
                        r["engine_cpu_ms_per_report"] = round((cpu_seconds(proc.pid) - cpu_e) * 1000 / len(msgs), 1)
                    results[label] = r
                    print(label, json.dumps(r), flush=True)
                finally:
                    stop(proc)
                    cleanup()
        finally:
            sim.terminate()
            sim.wait(10)
    e2e, ing = results["end-to-end"], results["ingest-only"]
    print(f"end to end {e2e['end_to_end_per_s']} reports/s = {e2e['end_to_end_per_s'] / ing['ingest_per_s']:.2f}x "
          f"the ingest-only figure of the same run ({ing['ingest_per_s']}/s); ingest while delivering "
          f"{e2e['ingest_per_s']}/s, ACK p99 {e2e['ack_p99_ms']} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
