"""``minipfi dmp-simulator``: its options and its main loop. Imports nothing heavy at load, so
that building the ``minipfi`` parser neither slows down nor installs a reactor."""
from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p) -> None:
    """Options of ``minipfi dmp-simulator``."""
    p.add_argument("--port", type=int, default=8443, help="HTTPS port (default 8443; 0 = any free port)")
    p.add_argument("--interface", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--cert", help="server certificate (PEM, chain after the leaf)")
    p.add_argument("--key", help="server private key (PEM, unencrypted)")
    p.add_argument("--client-ca", help="CA bundle that client certificates must chain to")
    p.add_argument("--signer-ca", help="CA bundle that VIHF signing certificates must chain to")
    p.add_argument("--signer-cert", help="or: the one certificate allowed to sign VIHFs")
    p.add_argument("--store-dir", help="write each accepted request here (summary.json + documents)")
    p.add_argument("--admin-port", type=int, help="admin endpoint port on 127.0.0.1 (plain HTTP)")
    p.add_argument("--keep", type=int, default=1000,
                   help="accepted/refused requests kept in memory for the admin endpoint (default 1000)")
    p.add_argument("--expected-to", default="", help="refuse requests whose wsa:To differs")
    p.add_argument("--make-pki", metavar="DIR",
                   help="generate a demo PKI in DIR (if absent) and use it for every file not given")


def run_from_args(args) -> int:
    """Run the simulator until interrupted (SIGINT / SIGTERM)."""
    from twisted.internet import reactor

    from engine import logs
    from engine.simulators.dmp import DMPSimulator

    logs.configure("info")
    if args.make_pki:
        from engine.simulators.demo_pki import make_demo_pki

        d = Path(args.make_pki)
        if not (d / "ca.pem").exists():
            make_demo_pki(d)
            print(f"demo PKI written to {d}", file=sys.stderr)
        args.cert = args.cert or str(d / "server.pem")
        args.key = args.key or str(d / "server.key")
        args.client_ca = args.client_ca or str(d / "ca.pem")
        if not (args.signer_ca or args.signer_cert):
            args.signer_ca = str(d / "ca.pem")
        print(f"engine side: client certificate {d / 'client.pem'} / {d / 'client.key'}, "
              f"CA bundle {d / 'ca.pem'}, VIHF signing certificate {d / 'signer.pem'} / {d / 'signer.key'}",
              file=sys.stderr)
    missing = [o for o, v in (("--cert", args.cert), ("--key", args.key), ("--client-ca", args.client_ca))
               if not v]
    if missing or not (args.signer_ca or args.signer_cert):
        print(f"minipfi dmp-simulator: missing {', '.join(missing) or '--signer-ca or --signer-cert'} "
              f"(or use --make-pki DIR)", file=sys.stderr)
        return 2
    sim = DMPSimulator(cert=args.cert, key=args.key, client_ca=args.client_ca, signer_ca=args.signer_ca,
                       signer_cert=args.signer_cert, store_dir=args.store_dir, expected_to=args.expected_to,
                       keep=args.keep)
    port = sim.start(args.port, args.interface)
    print(f"DMP simulator: https://{args.interface}:{port}/ (client certificate required)", file=sys.stderr)
    if args.admin_port is not None:
        admin = sim.start_admin(args.admin_port)
        print(f"admin: http://127.0.0.1:{admin}/behaviour, /accepted, /refused, /reset", file=sys.stderr)
    reactor.run()
    return 0
