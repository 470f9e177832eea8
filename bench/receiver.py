#!/usr/bin/env python3
"""A fast ACKing MLLP receiver for the end-to-end benchmark (asyncio, no HL7 parser).

It stands for a RIS that answers AA as fast as it can, so that the receiver is never the limit
of a delivery measurement: it finds MSH-10 with one split of the first segment and answers a
fixed-shape ACK echoing it in MSA-2 (HL7 v2.5 §2.9: the sender checks MSA-2). It records the
arrival time (``time.time()``, the clock the load generator also reads) of every control id.

A control port answers one-line commands: ``count`` (messages received so far) and ``dump``
(every ``[control_id, arrival]`` since the previous dump, as JSON, then forgets them).

    python bench/receiver.py PORT CONTROL_PORT
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

SB, EB = b"\x0b", b"\x1c\x0d"


class Received:
    def __init__(self):
        self.count = 0
        self.arrivals: list = []


def ack_for(cid: bytes) -> bytes:
    return (SB + b"MSH|^~\\&|RCV|BENCH|PFI|BENCH|20260101000000||ACK|R" + cid + b"|P|2.5\rMSA|AA|"
            + cid + b"\r" + EB)


async def serve_mllp(reader, writer, got: Received):
    buf = b""
    now = time.time
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buf += data
            out = []
            while True:
                end = buf.find(EB)
                if end < 0:
                    break
                frame, buf = buf[:end], buf[end + 2:]
                start = frame.find(SB)
                msh = frame[start + 1:].split(b"\r", 1)[0]
                fields = msh.split(msh[3:4])
                cid = fields[9] if len(fields) > 9 else b""
                got.count += 1
                got.arrivals.append((cid.decode("latin-1"), now()))
                out.append(ack_for(cid))
            if out:
                writer.write(b"".join(out))
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def serve_control(reader, writer, got: Received):
    try:
        line = (await reader.readline()).strip()
        if line == b"dump":
            arrivals, got.arrivals = got.arrivals, []
            writer.write(json.dumps({"count": got.count, "arrivals": arrivals}).encode() + b"\n")
        else:
            writer.write(json.dumps({"count": got.count}).encode() + b"\n")
        await writer.drain()
    finally:
        writer.close()


async def main(port: int, control_port: int) -> None:
    got = Received()
    mllp = await asyncio.start_server(lambda r, w: serve_mllp(r, w, got), "127.0.0.1", port)
    ctl = await asyncio.start_server(lambda r, w: serve_control(r, w, got), "127.0.0.1", control_port)
    async with mllp, ctl:
        await asyncio.gather(mllp.serve_forever(), ctl.serve_forever())


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
