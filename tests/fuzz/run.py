"""Coverage-guided fuzzing of one target with atheris (libFuzzer) for a set time.

    python -m tests.fuzz.run TARGET [--seconds 60] [--crashers tests/fuzz/crashers]

The engine's modules are instrumented for coverage; the ANS example messages (``seeds.py``) and
the target's saved crashers seed the corpus. An exception the target does not document is not
fatal here: the run records it by signature (exception type and the engine frame it came from),
minimises the first input of each new signature and saves it as
``crashers/<target>/<signature hash>`` (kept under version control, replayed by
``tests/test_fuzz_crashers.py``), then keeps fuzzing. At the end one JSON line gives the inputs
tried and the distinct crashes; ``--stats FILE`` appends it to FILE as well.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent


def signature(exc: BaseException) -> str:
    """Exception type + the innermost frame in the project's code (not in a library)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/engine/" in f.filename or "/mllp/" in f.filename or "/tests/fuzz/" in f.filename]
    where = ours[-1] if ours else frames[-1]
    return f"{type(exc).__name__} at {Path(where.filename).name}:{where.lineno} ({where.name})"


def minimise(target, data: bytes, sig: str, budget: float = 20.0) -> bytes:
    """Delta debugging (remove chunks while the same signature reproduces), bounded in time."""
    def same(candidate: bytes) -> bool:
        try:
            target(candidate)
        except Exception as exc:  # noqa: BLE001 - any crash is compared by signature
            return signature(exc) == sig
        return False

    end = time.monotonic() + budget
    chunk = max(1, len(data) // 2)
    while chunk >= 1 and time.monotonic() < end:
        i, shrunk = 0, False
        while i < len(data) and time.monotonic() < end:
            candidate = data[:i] + data[i + chunk:]
            if same(candidate):
                data, shrunk = candidate, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    return data


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--crashers", type=Path, default=HERE / "crashers")
    ap.add_argument("--stats", type=Path)
    args, libfuzzer_args = ap.parse_known_args(argv[1:])

    with atheris.instrument_imports(include=["engine", "mllp"]):
        from tests.fuzz.targets import TARGETS, seeds_for
    target = TARGETS[args.target]
    out_dir = args.crashers / args.target
    corpus = Path(tempfile.mkdtemp(prefix=f"minipfi-fuzz-{args.target}-"))
    for i, seed in enumerate(seeds_for(args.target)):
        (corpus / f"seed-{i}").write_bytes(seed)
    if out_dir.is_dir():
        for p in sorted(out_dir.iterdir()):
            (corpus / f"crasher-{p.name}").write_bytes(p.read_bytes())
    state = {"inputs": 0, "crashes": {}, "start": time.monotonic()}
    deadline = state["start"] + args.seconds

    def finish() -> None:
        line = json.dumps({"target": args.target, "seconds": round(time.monotonic() - state["start"]),
                           "inputs": state["inputs"], "distinct_crashes": len(state["crashes"]),
                           "crashes": sorted(state["crashes"])})
        print(line, flush=True)
        if args.stats:
            with args.stats.open("a") as f:
                f.write(line + "\n")
        os._exit(0)

    def one_input(data: bytes) -> None:
        state["inputs"] += 1
        try:
            target(data)
        except Exception as exc:  # noqa: BLE001 - recorded, then fuzzing goes on
            sig = signature(exc)
            if sig not in state["crashes"]:
                small = minimise(target, data, sig)
                name = hashlib.sha256(sig.encode()).hexdigest()[:16]
                (out_dir / name).write_bytes(small)
                state["crashes"][sig] = name
                print(f"NEW CRASH {sig} -> {out_dir / name} ({len(small)} bytes)", flush=True)
        if time.monotonic() > deadline:
            finish()

    # an input that runs 20 s is a hang: libFuzzer stops and leaves it as timeout-* in the crashers
    out_dir.mkdir(parents=True, exist_ok=True)
    atheris.Setup([argv[0], *libfuzzer_args, "-rss_limit_mb=3072", "-timeout=20",
                   f"-artifact_prefix={out_dir}/", f"-max_total_time={int(args.seconds) + 30}", str(corpus)],
                  one_input)
    atheris.Fuzz()
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
