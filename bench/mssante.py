#!/usr/bin/env python3
"""MSSanté benchmark: reports over MLLP in, mails accepted by the SMTP server out, end to end.

The corpus MDM (a ~240 KB CDA N1) with its flags set for the professional and the patient
(two mails per report, each with the CDA and an IHE_XDM.zip), sent over N MLLP connections to an
engine with the CI-SIS report step and an ``mssante`` destination; the mail rig's SMTP server
(STARTTLS, client certificate checked, DSN) accepts them. Measures reports/s at the MLLP side (ACK
after commit) and mails/s from the first report sent to the last mail accepted.

    python bench/mssante.py --connections 8 --reports 200
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from ingest import free_port, wait_port  # noqa: E402

SB, EB = b"\x0b", b"\x1c\x0d"


def main() -> int:
    from tests.mail_rig import SmtpRig
    from tests.mss_samples import BOTH_FLAGS, variant
    from tests.pki import make_pki

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--reports", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8, help="mails in flight (queue concurrency)")
    args = ap.parse_args()
    raw = variant(flags=BOTH_FLAGS, patient=True, control_id="BENCHCID")
    head, _, tail = raw.partition(b"BENCHCID")
    with tempfile.TemporaryDirectory(prefix="minipfi-bench-mss-") as td:
        pki = make_pki(Path(td) / "pki")
        rig = SmtpRig(pki)
        port, status_port = free_port(), free_port()
        cfg = Path(td) / "mss.yaml"
        cfg.write_text(textwrap.dedent(f"""
            engine:
              status: {{bind: 127.0.0.1, port: {status_port}}}
            channels:
              bench-in:
                type: mllp
                port: {port}
                framing: {{max_connections_per_peer: 256}}
                reports: {{enabled: true, validation: {{xsd: true, schematron: false}}}}
            routes:
              - {{name: reports, from: bench-in, to: [mss]}}
            destinations:
              mss:
                type: mssante
                mailbox: bal@pfi.bench.mssante.fr
                smtp: {{host: localhost, port: {rig.port}}}
                identity: {{cert: '{pki.client_cert}', key: '{pki.client_key}'}}
                ca: '{pki.ca}'
                xdm: {{organisation: bench, xds: {{source_id: "1.2.250.1.999.1"}}}}
                queue: {{ordering: document, concurrency: {args.concurrency}}}
        """))
        env = dict(os.environ)
        env.pop("MINIPFI_DB_URL", None)
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "--config", str(cfg), "--data-dir",
                                 str(Path(td) / "data")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=open(Path(td) / "engine.log", "w"))
        wait_port(port)
        try:
            per = -(-args.reports // args.connections)

            async def conn(c):
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
                for i in range(per):
                    writer.write(SB + head + f"B{c}x{i}".encode() + tail + EB)
                    data = await reader.readuntil(EB)
                    assert b"MSA|AA|" in data, data[:300]
                writer.close()

            t0 = time.perf_counter()
            asyncio.run(_gather([conn(c) for c in range(args.connections)]))
            t_ack = time.perf_counter() - t0
            want = 2 * per * args.connections
            rig.wait_for(want, timeout=600)
            t_mail = time.perf_counter() - t0
            bad = [m for m in rig.received[:20] if m.xdm_problems()]
            print(f"{per * args.connections} reports over {args.connections} connections: "
                  f"{per * args.connections / t_ack:.1f} reports/s ACKed; {want} mails accepted in "
                  f"{t_mail:.1f} s = {want / t_mail:.1f} mails/s end to end (concurrency {args.concurrency}; "
                  f"XDM problems in the first 20: {len(bad)})")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            rig.close()
    return 0


async def _gather(coros):
    await asyncio.gather(*coros)


if __name__ == "__main__":
    sys.exit(main())
