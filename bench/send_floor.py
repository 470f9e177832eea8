#!/usr/bin/env python3
"""The floor of one MLLP delivery in Python: CPU per send-and-ACK round trip of a bare sender.

A loop with nothing of the engine in it (no store, no reactor, no Deferred, no log line) sends
a small ORM^O01 framed by MLLP on one connection and reads its ACK, against ``bench/receiver.py``
(the end-to-end benchmark's receiver), the sender on CPU 0 and the receiver on CPU 1 as in
``bench/e2e.py``. Two ways of waiting for the ACK: a blocking ``recv``, and ``epoll`` then
``recv`` as a reactor does. What it prints (CPU per round trip, user and system, from
``getrusage``) is a lower bound of the CPU the engine spends per delivered message on its core:
the end-to-end target "delivered >= 0.8x the disabled-destination ingest ``D``" needs the
engine's delivery CPU per message ``d <= 1 / (0.8 D) - i`` on one core (``i``: its CPU per
ingested message), 68-92 us on the benchmark VM, of which this floor alone takes a third to a
half (docs/benchmarks.md, "the floor of one send").

    python bench/send_floor.py --messages 30000 --rounds 2
"""
from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import ROOT, free_port, stop, wait_port  # noqa: E402

BODY = (b"MSH|^~\\&|RIS|SITE|PFI|SITE|20260101000000||ORM^O01|F%08d|P|2.5\r"
        b"PID|1||IPP000001^^^SITE^PI||SYNTHETIQUE^TEST\rORC|NW|1\rOBR|1|1||CT^Scanner\r")


def round_trips(sock: socket.socket, mode: str, n: int) -> dict:
    """``n`` round trips on ``sock``; CPU (user, system) and wall time per round trip."""
    sock.setblocking(mode == "blocking")
    poller = select.epoll()
    poller.register(sock.fileno(), select.EPOLLIN)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(n):
        sock.send(b"\x0b" + BODY % i + b"\x1c\r")
        if mode == "epoll":
            poller.poll(-1)
        reply = sock.recv(65536)
        if not reply.endswith(b"\x1c\r") or (b"F%08d" % i) not in reply:
            raise SystemExit(f"unexpected reply to message {i}: {reply[:80]!r}")
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    poller.close()
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return {"mode": mode, "round_trips_per_s": n / wall, "cpu_us": (user + system) / n * 1e6,
            "user_us": user / n * 1e6, "system_us": system / n * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=30_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    port, ctl = free_port(), free_port()
    pin = os.cpu_count() > 1
    receiver = subprocess.Popen((["taskset", "-c", "1"] if pin else [])
                                + [sys.executable, str(ROOT / "bench" / "receiver.py"), str(port), str(ctl)],
                                stdout=subprocess.DEVNULL)
    try:
        wait_port(ctl)
        if pin:
            os.sched_setaffinity(0, {0})
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            round_trips(sock, "blocking", 2_000)  # warm-up
            for _ in range(args.rounds):
                for mode in ("blocking", "epoll"):
                    r = round_trips(sock, mode, args.messages)
                    print(f"{r['mode']:<9} {r['round_trips_per_s']:>7.0f} round trips/s  CPU "
                          f"{r['cpu_us']:.1f} us per round trip (user {r['user_us']:.1f}, "
                          f"system {r['system_us']:.1f})", flush=True)
    finally:
        stop(receiver)
    return 0


if __name__ == "__main__":
    sys.exit(main())
