"""The ``minipfi`` command. Nothing imports this module; it imports everything it needs lazily,
so that ``minipfi check`` or ``minipfi version`` start fast."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

DEFAULT_CONFIG = "engine/routes.yaml"


def _data_dir(args) -> Path:
    return Path(getattr(args, "data_dir", None) or os.environ.get("MINIPFI_DATA_DIR") or "data")


class CLIError(Exception):
    """A refusal the command reports on one line (``minipfi: ...``), exit status 1."""


def _store(args):
    """Open the engine's store: MINIPFI_DB_URL, else routes.yaml's store_url, else the SQLite file
    of the data directory. A store command never creates a database: when there is no engine
    database there (wrong --data-dir, engine never started) it says so (:class:`CLIError`)."""
    import sqlalchemy as sa

    from engine.store import Store

    url = os.environ.get("MINIPFI_DB_URL")
    config = None
    if getattr(args, "config", None):
        from engine import wiring  # noqa: F401 - destination types, before reading the file
        from engine.config import load_config

        config = load_config(args.config)
        url = url or config.engine.store_url
    url = url or Store.default_url(_data_dir(args))
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:" \
            and not Path(u.database).is_file():
        raise CLIError(f"no engine database at {u.database} (give --data-dir, MINIPFI_DATA_DIR or "
                       "MINIPFI_DB_URL of a store the engine has run on)")
    store = Store(url)
    try:
        if not sa.inspect(store.engine).has_table("messages"):
            raise CLIError(f"no engine database at {u.render_as_string(hide_password=True)} "
                           "(no messages table: the engine has never run on it)")
        store.migrate()
    except BaseException:
        store.dispose()
        raise
    if config is not None and config.engine.audit.syslog is not None:
        _export_audit(store, config)
    return store


def _export_audit(store, config) -> None:
    """The audit rows this command writes also go to the routes file's syslog collector, sent
    before the process exits (at most 2 s more when the collector does not answer)."""
    import atexit

    from engine.atna.sender import from_config

    sender = from_config(config.engine.audit.syslog, config.engine.name).start()
    store.add_audit_listener(sender.submit)
    atexit.register(sender.stop, 2.0)


# -- the audit trail of the CLI's own actions (actor 'cli:<os user>', source 'cli') --------------
def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no login name in this environment
        return f"cli:uid{os.getuid()}"


@contextmanager
def _audited(store, action: str, what: str | None = None, /, **detail):
    """Audit the block as ``action`` on ``what``: ``ok`` when it ends, ``refused`` (with the reason, then
    a one-line :class:`CLIError`) when it raises a refusal. The block may add to the detail."""
    from engine.store import UnknownMessage

    try:
        yield detail
    except (CLIError, ValueError, UnknownMessage) as err:
        why = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        store.audit(_actor(), action, target=what, outcome="refused", detail={**detail, "error": why},
                    source="cli")
        raise CLIError(why) from None
    store.audit(_actor(), action, target=what, detail=detail or None, source="cli")


def cmd_run(args) -> int:
    if "twisted.internet.reactor" not in sys.modules:  # first: before anything imports it
        from engine.reactor import install

        install()
    from engine.app import run

    return run(args.config, _data_dir(args))  # a refused configuration: exit 2 (see main)


def cmd_check(args) -> int:
    from engine import wiring  # noqa: F401 - destination types, before reading the file
    from engine.config import ConfigError, load_config

    try:
        cfg = load_config(args.file)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 1
    except OSError as err:
        print(f"{args.file}: {err.strerror}", file=sys.stderr)
        return 1
    from engine.connectors.registry import problems

    bad = problems(cfg)
    if bad:
        print(str(ConfigError(bad, source=str(args.file))), file=sys.stderr)
        return 1
    print(f"{args.file}: OK ({len(cfg.channels)} channels, {len(cfg.routes)} routes, "
          f"{len(cfg.destinations)} destinations)")
    return 0


def cmd_send(args) -> int:
    from engine.hl7.ack import read_ack
    from mllp.blocking import BlockingMLLPClient
    from mllp.tls import TLSFiles, client_ssl_context

    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        print("minipfi send: address must be HOST:PORT", file=sys.stderr)
        return 2
    ctx = None
    if args.tls_ca or args.tls_cert:
        ctx = client_ssl_context(TLSFiles(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca))
    failures = 0
    with BlockingMLLPClient(host, int(port), ssl_context=ctx, timeout=args.timeout,
                            server_hostname=args.tls_server_name or host) as client:
        for name in args.files:
            payload = Path(name).read_bytes()
            for message in _split_messages(payload):
                reply = client.send(message)
                printable = reply.replace(b"\r", b"\n").decode("utf-8", "replace").rstrip("\n")
                print(f"# {name}\n{printable}\n")
                try:
                    code = read_ack(reply).code
                except Exception:  # noqa: BLE001 - commit ACK or unreadable reply
                    code = "CA" if reply == b"\x06" else "??"
                if code not in ("AA", "CA"):
                    failures += 1
    return 1 if failures else 0


def _split_messages(payload: bytes) -> list[bytes]:
    """A file may hold one message or several (each starting with MSH); trailing blank lines go."""
    text = payload.strip(b"\r\n\x0b\x1c ")
    starts = [0]
    for sep in (b"\rMSH|", b"\nMSH|"):
        i = text.find(sep)
        while i != -1:
            starts.append(i + 1)
            i = text.find(sep, i + 1)
    starts = sorted(set(starts))
    parts = [text[a:b].rstrip(b"\r\n") for a, b in zip(starts, starts[1:] + [len(text)])]
    return [p + b"\r" for p in parts if p]


def cmd_messages(args) -> int:
    store = _store(args)
    try:
        return {"list": _messages_list, "show": _messages_show, "replay": _messages_replay,
                "handled": _messages_handled, "retry": _messages_retry}[args.action](store, args)
    finally:
        store.dispose()


def _messages_list(store, args) -> int:
    rows = store.list_messages(limit=args.limit, offset=args.offset, channel=args.channel,
                               status=args.status, destination=args.destination,
                               message_type=args.type, control_id=args.control_id,
                               since=_when(args.since, "--since"), until=_when(args.until, "--until"))
    for r in rows:
        d = _row_dict(r)
        if args.json:
            print(json.dumps(d, default=str))
        else:
            print(f"{d['id']:>8}  {d['received_at']}  {d['channel']:<12} {d['message_type']:<10} "
                  f"{d['control_id']:<22} {d['status']}")
    return 0


def _when(value: str | None, option: str) -> float | None:
    """``--since``/``--until``: ISO 8601 date or date-time (no zone: local time), or a duration
    back from now (``90m``, ``2h``, ``7d``)."""
    if value is None:
        return None
    import time
    from datetime import datetime

    from engine.durations import parse_duration

    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        pass
    try:
        return time.time() - parse_duration(value)
    except (ValueError, TypeError):
        raise CLIError(f"{option} {value!r}: give an ISO 8601 date or date-time "
                       "(2026-12-03, 2026-12-03T08:00) or a duration back from now (90m, 2h, 7d)") from None


def _message_ids(store, args) -> list[int]:
    """The messages ``show`` names: ids (digits), else MSH-10 control ids; ``--control-id``
    treats every argument as a control id (numeric ones included)."""
    ids: list[int] = []
    for key in args.ids:
        found = []
        if key.isdigit() and not args.control_id and store.get_message(int(key)) is not None:
            found = [int(key)]
        if not found:
            found = store.message_ids_by_control_id(key)
        if not found:
            raise CLIError(f"no message with id or control id {key!r}")
        ids.extend(found)
    return list(dict.fromkeys(ids))


def _messages_show(store, args) -> int:
    for mid in _message_ids(store, args):
        m = store.get_message(mid)
        store.audit(_actor(), "message.view", target=f"message:{mid}", source="cli")
        d = _row_dict(m)
        sub = _submission_of(store, mid)
        if sub is not None:
            d["submission"] = sub
        receipts = store.mail_receipts(mid)
        if receipts:
            d["receipts"] = receipts   # mail receipts (DSN, MDN): no patient data
        raw = d.pop("raw", b"")
        ack = d.pop("ack", b"")
        if args.json:
            d["raw"] = raw.decode("latin-1") if isinstance(raw, bytes) else raw
            d["ack"] = ack.decode("latin-1") if isinstance(ack, bytes) else ack
            print(json.dumps(d, default=_json_default, indent=1))
        else:
            for k, v in d.items():
                if k != "entries":
                    print(f"{k}: {v}")
            for e in d.get("entries", []):
                print(f"entry: {json.dumps(e, default=_json_default)}")
            for line in _finding_lines(sub):
                print(line)
            print("--- raw ---")
            print(raw.replace(b"\r", b"\n").decode("utf-8", "replace"))
            print("--- ack ---")
            print(ack.replace(b"\r", b"\n").decode("utf-8", "replace"))
    return 0


def _ids(values) -> list[int]:
    bad = [v for v in values if not v.isdigit()]
    if bad:
        raise CLIError(f"not a message id: {', '.join(bad)} (ids are numbers; `messages list "
                       "--control-id CID` finds one by MSH-10)")
    return [int(v) for v in values]


def _messages_replay(store, args) -> int:
    report: list = []
    with _audited(store, "message.replay", "message:" + ",".join(args.ids),
                  destinations=args.destination or None) as detail:
        counts = store.replay(_ids(args.ids), args.destination or None, report=report)
        detail["entries"] = sum(counts.values())
    if not report:
        which = ", ".join(args.destination) if args.destination else "in error"
        print(f"nothing to replay: no delivery {which} for message(s) {', '.join(args.ids)}")
        return 0
    for t in report:
        where = t.destination + (f" [{t.target}]" if t.target else "")
        if t.entry_id is not None:
            print(f"message {t.message_id}: {where}: queued again as entry {t.entry_id} "
                  f"(replays entry {t.replay_of})")
        else:
            print(f"message {t.message_id}: {where}: not queued again ({t.skipped})")
    return 0


def _messages_handled(store, args) -> int:
    total = 0
    for mid in _ids(args.ids):
        with _audited(store, "message.handled", f"message:{mid}", destination=args.destination,
                      target=args.target) as detail:
            n = detail["entries"] = store.mark_handled(mid, args.destination, args.target)
        total += n
        print(f"message {mid}: {n} error(s) at {args.destination} marked handled")
    return 0 if total else 1


def _messages_retry(store, args) -> int:
    """Entries of the message waiting for a later attempt become due now (the running engine
    notices within a second or so)."""
    (mid,) = _ids([args.id])
    with _audited(store, "message.retry", f"message:{mid}", destination=args.destination) as detail:
        n = detail["entries"] = store.retry_now(mid, args.destination)
    where = f" at {args.destination}" if args.destination else ""
    print(f"message {mid}: {n} entr{'y' if n == 1 else 'ies'}{where} due now")
    return 0 if n else 1


# -- users, audit trail, destination controls -------------------------------------------------
PASSWORD_MIN = 12  # characters: a local account's password (ANSSI and OWASP advise length)


def _password(args, required: bool) -> str | None:
    """The password from ``--password-file``, the variable ``--password-env`` names, or a
    prompt (twice); never from the command line."""
    if args.password_file:
        pw = Path(args.password_file).read_text(encoding="utf-8").rstrip("\r\n")
    elif args.password_env:
        pw = os.environ.get(args.password_env)
        if pw is None:
            raise CLIError(f"--password-env: ${args.password_env} is not set")
    elif required:
        import getpass

        pw = getpass.getpass("password: ")
        if getpass.getpass("again: ") != pw:
            raise CLIError("the two passwords differ")
    else:
        return None
    if len(pw) < PASSWORD_MIN:
        raise CLIError(f"a password needs at least {PASSWORD_MIN} characters")
    return pw


def cmd_users(args) -> int:
    from engine.passwords import hash_password

    store = _store(args)
    try:
        if args.action == "list":
            for u in store.list_users():
                d = {"name": u.name, "role": u.role, "active": u.active, "created_at": _iso(u.created_at)}
                print(json.dumps(d) if args.json else
                      f"{u.name:<24} {u.role:<9} {'active' if u.active else 'disabled':<9} {d['created_at']}")
            return 0
        target = f"user:{args.name}"
        if args.action == "add":
            with _audited(store, "user.add", target, role=args.role):
                store.add_user(args.name, args.role, hash_password(_password(args, True)))
            print(f"user {args.name} added ({args.role})")
            return 0
        active = False if args.disable else True if args.enable else None
        with _audited(store, "user.change", target, role=args.role, active=active) as detail:
            pw = _password(args, False)
            detail["password"] = pw is not None
            if args.role is None and active is None and pw is None:
                raise CLIError("nothing to change (give --role, --disable, --enable or a password option)")
            if not store.set_user(args.name, role=args.role, active=active,
                                  password_hash=None if pw is None else hash_password(pw)):
                raise CLIError(f"no user {args.name!r}")
        print(f"user {args.name} changed")
        return 0
    finally:
        store.dispose()


def _iso(epoch: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def cmd_audit(args) -> int:
    store = _store(args)
    try:
        rows = store.audit_list(since=_when(args.since, "--since"), until=_when(args.until, "--until"),
                                actor=args.actor, action=args.action_name, limit=args.limit,
                                offset=args.offset)
        for r in rows:
            d = {"id": r.id, "at": _iso(r.at), "actor": r.actor, "action": r.action, "target": r.target,
                 "outcome": r.outcome, "source": r.source, "detail": r.detail}
            print(json.dumps(d, ensure_ascii=False) if args.json else
                  f"{r.id:>7}  {d['at']}  {r.actor:<20} {r.action:<20} {r.outcome:<8} {r.target or '-':<24} "
                  f"{r.source or '-'}  {json.dumps(r.detail, ensure_ascii=False) if r.detail else ''}".rstrip())
        # reading the trail is itself audited (DICOM "Audit Log Used")
        filters = {k: v for k, v in (("since", args.since), ("until", args.until), ("actor", args.actor),
                                     ("action", args.action_name)) if v is not None}
        store.audit(_actor(), "audit.view", detail={**filters, "rows": len(rows)}, source="cli")
        return 0
    finally:
        store.dispose()


def cmd_destinations(args) -> int:
    store = _store(args)
    try:
        paused = store.paused_destinations()
        counts = store.stats().get("destinations", {})
        known = set(counts) | set(paused)
        if getattr(args, "config", None):
            from engine import wiring  # noqa: F401 - destination types, before reading the file
            from engine.config import load_config

            known |= set(load_config(args.config).destinations)
        if args.action == "list":
            for name in sorted(known):
                c, p = counts.get(name, {}), paused.get(name)
                state = f"paused since {_iso(p['at'])} by {p['by']}" if p else "active"
                why = f" ({p['reason']})" if p and p["reason"] else ""
                print(f"{name:<20} queued {c.get('queued', 0):>6}  in flight {c.get('in_flight', 0):>4}  "
                      f"errors {c.get('error', 0):>5}  {state}{why}")
            return 0
        target = f"destination:{args.name}"
        action = f"destination.{args.action}"
        with _audited(store, action, target, **({"reason": args.reason} if args.action == "pause" else {})) as d:
            if args.name not in known:
                raise CLIError(f"unknown destination {args.name!r} (no queue entries; give --config "
                               "to name the configured ones)")
            if args.action == "pause":
                d["changed"] = store.pause_destination(args.name, by=_actor(), reason=args.reason)
            else:
                d["changed"] = store.resume_destination(args.name, by=_actor())
        done = "paused" if args.action == "pause" else "resumed"
        print(f"destination {args.name} {done}" if d["changed"] else f"destination {args.name} was already {done}")
        return 0
    finally:
        store.dispose()


def _submission_of(store, message_id: int) -> dict | None:
    """The canonical submission stored with a report message, if any."""
    row = store.submission_row(message_id)
    if row is None:
        return None
    out = {"kind": row["kind"], "action": row["action"], "errors": row["errors"],
           "submission": json.loads(row["submission"]),
           "validation": json.loads(row["validation"]) if row["validation"] else None}
    if row["wrapped"] is not None:
        out["wrapped"] = bytes(row["wrapped"]).decode("utf-8", "replace")
    return out


def _finding_lines(sub: dict | None) -> list[str]:
    """The errors and warnings stored with a report's submission, one line each (rule, code,
    location, text: texts the engine wrote, no patient data)."""
    if not sub:
        return []
    canonical = sub.get("submission") or {}
    return [f"{label}: {i.get('code')} [{i.get('rule') or '-'}] {i.get('location') or '-'}: {i.get('text')}"
            for label, key in (("error", "errors"), ("warning", "warnings"))
            for i in canonical.get(key) or []]


def _row_dict(row) -> dict:
    if hasattr(row, "_asdict"):
        d = row._asdict()
    elif hasattr(row, "__dataclass_fields__"):
        from dataclasses import asdict

        d = asdict(row)
    else:
        d = dict(row)
    for k, v in list(d.items()):
        if hasattr(v, "isoformat"):
            d[k] = v.isoformat()
    return d


def _json_default(v):
    if isinstance(v, bytes):
        return v.decode("latin-1")
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return str(v)


def cmd_identities(args) -> int:
    """``identities show KEY``: KEY is an IPP (optionally AUTHORITY:IPP) or a 15-character INS."""
    from engine.store.identities import AmbiguousIdentity, find_identity

    store = _store(args)
    try:
        key = args.key
        authority = None
        if ":" in key:
            authority, key = key.split(":", 1)

        def lookup(conn):
            view = None
            if len(key) == 15 and key[:1].isdigit() and authority is None:
                view = find_identity(conn, ins=key)
            if view is None:
                view = find_identity(conn, ipp=key, ipp_authority=authority)
            return view.to_json() if view is not None else None

        # a search by patient identifier: accountability needs the identifier, so it is kept in
        # the audit row's detail (read by administrators only), never in its target
        with _audited(store, "search.patient", "identity", key=args.key) as detail:
            try:
                found = store.read(lookup)
            except AmbiguousIdentity as err:
                detail["found"] = "ambiguous"
                print(f"minipfi: {err} (give AUTHORITY:IPP)", file=sys.stderr)
                return 1
            detail["found"] = found is not None
        if found is None:
            print(f"minipfi: no identity for {args.key}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(found, default=_json_default, ensure_ascii=False, indent=1))
            return 0
        ins = found.get("ins") or {}
        print(f"IPP        {found.get('ipp')} ({found.get('ipp_authority')})")
        print(f"INS        {ins.get('value') or '-'} {ins.get('oid') or ''}")
        print(f"status     {found.get('status')}   active: {found.get('active')}")
        print(f"birth name {found.get('birth_name')}   used name: {found.get('used_name') or '-'}")
        print(f"given      {found.get('first_given_name')}  ({' '.join(found.get('given_names') or [])})")
        print(f"born       {found.get('birth_date')}  sex {found.get('sex')}  COG {found.get('birth_place_cog')}")
        print(f"consent    {json.dumps(found.get('consent'), ensure_ascii=False)}")
        print("history:")
        for h in found.get("history", []):
            print(f"  {h.get('at')}  {h.get('trigger') or '':<4} {h.get('action'):<14} msg {h.get('message_id')}  "
                  f"{h.get('note') or ''}")
        return 0
    finally:
        store.dispose()


def cmd_inspect(args) -> int:
    """Parse a report message file and print its canonical submission (no store, no network);
    ``--rules``: the catalogue of the report checks instead."""
    from engine.hl7.encoding import codec_for
    from engine.hl7.errors import HL7Error
    from engine.hl7.msh import read_msh
    from engine.reports.cisis import parse_report

    if args.rules:
        return _print_rules(args)
    if not args.file:
        print("minipfi inspect: give a message file, or --rules", file=sys.stderr)
        return 2
    overrides = {}
    for item in args.rule or []:
        rule_id, _, level = item.partition("=")
        overrides[rule_id] = level
    try:
        raw = Path(args.file).read_bytes()
    except OSError as exc:
        return _inspect_refused(args, "file", f"cannot read {args.file}: {exc.strerror or exc}")
    try:
        msh = read_msh(raw)
        codec = codec_for(msh.charset)
    except HL7Error as err:
        return _inspect_refused(args, err.code, err.text, err.location)
    from engine.reports.rules import override_problem

    bad = [p for p in (override_problem("reports", k, v) for k, v in overrides.items()) if p]
    if bad:
        return _inspect_refused(args, "rule", "; ".join(bad))
    sub = parse_report(raw, codec, strict_mss_matrix=args.strict_mss_matrix, rules=overrides)
    doc = sub.to_inspect_json()
    if args.json:
        print(json.dumps(doc, ensure_ascii=False, indent=1, default=str))
    else:
        ins = doc.get("ins") or {}
        print(f"{doc['message_type']}  control id {doc['control_id']}  action {doc['action']}")
        print(f"INS        {ins.get('value') or '-'} {ins.get('oid') or ''}")
        flags = doc.get("flags") or {}
        print("flags      " + " ".join(f"{k}={'Y' if v else 'N'}" for k, v in flags.items()))
        r = doc.get("recipients") or {}
        print(f"recipients DMP={r.get('dmp')} MSS PS={r.get('mss_ps')} patient={r.get('mss_patient')} "
              f"reply-to={r.get('reply_to')}")
        for d in doc.get("documents", []):
            print(f"document   {d.get('id')}  {d.get('type_code')}  {d.get('level')}  sha256 {d.get('sha256')}")
        for e in doc.get("errors", []):
            print(f"ERROR {e['code']} [{e['rule']}] {e['location'] or '-'}: {e['text']}")
        for w in doc.get("warnings", []):
            print(f"WARNING {w['code']} [{w['rule']}] {w['location'] or '-'}: {w['text']}")
    return 1 if doc.get("errors") else 0


def _print_rules(args) -> int:
    """The catalogue of the report checks: id, step, default, code, guide and section."""
    from engine.reports.rules import catalogue

    rows = catalogue()
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
        return 0
    for r in rows:
        fixed = "" if r["relaxable"] else "  (cannot be relaxed)"
        print(f"{r['id']:<34} {r['default']:<6} {r['code']:<4} {r['step']:<13} {r['summary']}{fixed}")
        print(f"{'':<34} {r['guide']}, {r['section']}")
    return 0


def _inspect_refused(args, code: str, text: str, location: str | None = None) -> int:
    """A message ``inspect`` cannot read: with ``--json`` one JSON object too (scripts rely on
    it), else one line on stderr. Exit 1 either way."""
    if args.json:
        print(json.dumps({"refused": True, "errors": [{"code": code, "text": text, "location": location}]},
                         ensure_ascii=False))
    else:
        print(f"minipfi inspect: {code} {text}", file=sys.stderr)
    return 1


def cmd_cda(args) -> int:
    """``cda validate FILE``: CDA XSD and CI-SIS schematrons (structurationMinimale, IHE), from
    ``--resources`` or the packaged resources; generated stylesheets cached under the data directory."""
    from engine.cda import validation
    from engine.cda.resources import ResourcesError

    try:
        validation.configure(args.resources, _data_dir(args) / "cache" / "cda")
    except ResourcesError as err:
        print(f"minipfi cda validate: {err}", file=sys.stderr)
        return 2
    rep = validation.shared_validator().validate(Path(args.file).read_bytes(), schematron=not args.xsd_only)
    doc = rep.to_json()
    if args.json:
        print(json.dumps(doc, ensure_ascii=False, indent=1, default=str))
    else:
        print(f"{args.file}: {'VALID' if rep.valid else 'INVALID'}")
        for e in doc["xsd_errors"]:
            print(f"  XSD line {e.get('line')}: {e.get('message')}")
        for f in doc["schematron_failures"]:
            print(f"  schematron {f.get('id')}: {f.get('text')} ({f.get('location')})")
        for w in doc.get("schematron_warnings", []):
            print(f"  warning {w.get('id')}: {w.get('text')}")
    return 0 if rep.valid else 1


def cmd_reload(args) -> int:
    """SIGHUP to the running engine, then wait for its verdict (``<data-dir>/reload.json``):
    exit 0 when applied, 1 when refused or failed (the reason printed), 2 without an answer."""
    import time

    from engine.app import PID_FILE, RELOAD_FILE, RELOAD_REQUEST_FILE, _reload_seq

    data_dir = _data_dir(args)
    pid_file = data_dir / PID_FILE
    before = _reload_seq(data_dir)
    try:
        pid = int(pid_file.read_text().strip())
        # who asks: the engine audits the reload with this actor (a signal does not say)
        tmp = data_dir / (RELOAD_REQUEST_FILE + ".tmp")
        tmp.write_text(json.dumps({"actor": _actor(), "at": time.time()}))
        tmp.replace(data_dir / RELOAD_REQUEST_FILE)
        os.kill(pid, signal.SIGHUP)
    except FileNotFoundError:
        print(f"minipfi reload: no running engine ({pid_file} not found)", file=sys.stderr)
        return 1
    except (ValueError, ProcessLookupError):
        print(f"minipfi reload: stale pid file {pid_file}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if _reload_seq(data_dir) > before:
            try:
                outcome = json.loads((data_dir / RELOAD_FILE).read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            if outcome.get("result") == "applied":
                print(f"reload applied at {outcome.get('at')} (pid {pid}, fingerprint {outcome.get('fingerprint')})")
                return 0
            print(f"minipfi reload: {outcome.get('result')} at {outcome.get('at')}; the running "
                  f"configuration is kept\n{outcome.get('reason')}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"minipfi reload: no answer from the engine (pid {pid}) within {args.timeout:g}s", file=sys.stderr)
    return 2


def cmd_export(args) -> int:
    """Portability export (docs/export.md); audited ``export`` by ``cli:<os user>``, refusals too."""
    from engine.retention.export import ExportError, export

    since, until = _when(args.since, "--since"), _when(args.until, "--until")
    store = _store(args)
    try:
        target = str(Path(args.dir).resolve())
        with _audited(store, "export", target, since=since, until=until, channels=args.channel) as detail:
            try:
                manifest = export(store, Path(args.dir), since=since, until=until, channels=args.channel)
            except ExportError as err:
                raise CLIError(str(err)) from None
            counts = detail["counts"] = manifest["counts"]
    finally:
        store.dispose()
    print(f"{args.dir}: {counts['messages']} messages, {counts['entries']} delivery entries, "
          f"{counts['events']} events, {counts['submissions']} submissions, "
          f"{counts['identities']} identities ({len(manifest['files'])} files, manifest.json)")
    return 0


def cmd_version(args) -> int:
    """The engine's version and the CDA validation resources' (those ``--config`` names, else packaged)."""
    from engine import __version__
    from engine.cda.resources import ResourcesError, configured_folder, open_resources

    folder = None
    if args.config:
        from engine import wiring  # noqa: F401 - destination and transform types, before reading the file
        from engine.config import ConfigError, load_config

        try:
            folder = configured_folder(load_config(args.config).engine.cda_resources, args.config)
        except ConfigError as err:
            print(str(err), file=sys.stderr)
            return 2
    try:
        resources = open_resources(folder).info()
    except ResourcesError as err:
        resources = {"version": None, "source": str(folder), "error": str(err)}
    if args.json:
        print(json.dumps({"minipfi": __version__, "cda_resources": resources}, ensure_ascii=False))
    else:
        print(f"minipfi {__version__}")
        print(f"CDA validation resources: {resources['version']} ({resources['source']})")
    return 0 if "error" not in resources else 1


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except the empty ones (None, False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _format_all(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:  # noqa: SLF001 - argparse offers no public walk of sub-commands
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sp in action.choices.values():
                sp.formatter_class = _DefaultsFormatter
                _format_all(sp)


def cmd_dmp_simulator(args) -> int:
    from engine.simulators.dmp_cli import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    fmt = _DefaultsFormatter
    p = argparse.ArgumentParser(prog="minipfi", description="mini-PFI HL7 v2 / IHE integration engine",
                                formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    def data_opts(sp):
        sp.add_argument("--data-dir", help="data directory (default $MINIPFI_DATA_DIR or ./data)")

    def store_opts(sp):
        data_opts(sp)
        sp.add_argument("--config", help="routes file whose engine.store_url to use")

    r = sub.add_parser("run", help="run the engine")
    r.add_argument("--config", default=DEFAULT_CONFIG, help="routes file")
    data_opts(r)
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("check", help="validate a routes file")
    c.add_argument("file")
    c.set_defaults(fn=cmd_check)

    s = sub.add_parser("send", help="send HL7 files over MLLP and print each ACK")
    s.add_argument("address", help="HOST:PORT")
    s.add_argument("files", nargs="+")
    s.add_argument("--tls-cert", help="client certificate (PEM), for mutual TLS")
    s.add_argument("--tls-key", help="its private key (PEM)")
    s.add_argument("--tls-ca", help="CA bundle the server is checked against (TLS)")
    s.add_argument("--tls-server-name", help="name checked in the server's certificate (default: HOST)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")
    s.set_defaults(fn=cmd_send)

    m = sub.add_parser("messages", help="stored messages", formatter_class=fmt)
    msub = m.add_subparsers(dest="action", required=True)
    ml = msub.add_parser("list", help="stored messages, newest first, filtered", formatter_class=fmt)
    ml.add_argument("--json", action="store_true", help="one JSON object per line")
    ml.add_argument("--limit", type=int, default=100, help="at most this many messages")
    ml.add_argument("--offset", type=int, default=0, help="skip this many (newest first)")
    ml.add_argument("--channel", help="only this channel")
    ml.add_argument("--status", choices=["sent", "queued", "error", "handled", "cancelled", "filtered", "rejected", "conflict"],
                    help="only messages in this state (with --destination: their state there)")
    ml.add_argument("--destination", help="only messages routed to this destination")
    ml.add_argument("--type", help="message type: CODE^TRIGGER (ORU^R01) or CODE (ADT)")
    ml.add_argument("--control-id", help="MSH-10")
    ml.add_argument("--since", help="received at or after: ISO date or date-time (local time), or a "
                                    "duration back from now (2h, 7d)")
    ml.add_argument("--until", help="received before (same forms as --since)")
    ms = msub.add_parser("show", help="one message with its deliveries, by id or by MSH-10", formatter_class=fmt)
    ms.add_argument("ids", nargs="+", metavar="ID_OR_CONTROL_ID",
                    help="message id (digits) or MSH-10 control id")
    ms.add_argument("--control-id", action="store_true", help="every argument is an MSH-10 (numeric ones too)")
    ms.add_argument("--json", action="store_true", help="one JSON document per message")
    mr = msub.add_parser("replay", help="queue messages again to destinations (default: those where "
                                        "they ended in error)", formatter_class=fmt)
    mr.add_argument("ids", nargs="+", metavar="ID")
    mr.add_argument("--destination", action="append", metavar="NAME",
                    help="replay to this destination (repeatable; default: every destination in error)")
    mh = msub.add_parser("handled", help="mark the errors of a message at a destination as handled "
                                         "(they leave the current counts)", formatter_class=fmt)
    mh.add_argument("ids", nargs="+", metavar="ID")
    mh.add_argument("--destination", required=True, metavar="NAME")
    mh.add_argument("--target", help="only this delivery target of the destination")
    mt = msub.add_parser("retry", help="retry now: the message's entries waiting for a later attempt "
                                       "become due at once", formatter_class=fmt)
    mt.add_argument("id", metavar="ID")
    mt.add_argument("--destination", metavar="NAME", help="only at this destination")
    for sp in (ml, ms, mr, mh, mt):
        store_opts(sp)
    m.set_defaults(fn=cmd_messages)

    def password_opts(sp):
        sp.add_argument("--password-file", metavar="F", help="read the password from this file (first line)")
        sp.add_argument("--password-env", metavar="VAR", help="read the password from this environment variable")

    from engine.store.accounts import ROLES

    us = sub.add_parser("users", help="local accounts of the console (roles: " + ", ".join(ROLES) + ")")
    usub = us.add_subparsers(dest="action", required=True)
    ua = usub.add_parser("add", help="add an account (password prompted unless a password option is given)")
    ua.add_argument("name")
    ua.add_argument("--role", required=True, choices=ROLES)
    password_opts(ua)
    ul = usub.add_parser("list", help="accounts, their role and state (never a hash)")
    ul.add_argument("--json", action="store_true")
    ust = usub.add_parser("set", help="change an account's role, state or password")
    ust.add_argument("name")
    ust.add_argument("--role", choices=ROLES)
    st = ust.add_mutually_exclusive_group()
    st.add_argument("--disable", action="store_true", help="refuse its logins (the account stays, for the audit trail)")
    st.add_argument("--enable", action="store_true")
    password_opts(ust)
    for sp in (ua, ul, ust):
        store_opts(sp)
    us.set_defaults(fn=cmd_users)

    au = sub.add_parser("audit", help="the audit trail (who did what, when)")
    ausub = au.add_subparsers(dest="action", required=True)
    al = ausub.add_parser("list", help="audit rows, newest first", formatter_class=fmt)
    al.add_argument("--since", help="at or after: ISO date or date-time (local time), or a duration back (2h, 7d)")
    al.add_argument("--until", help="before (same forms as --since)")
    al.add_argument("--actor", help="a user name, or cli:<os user>, or engine")
    al.add_argument("--action", dest="action_name", metavar="ACTION",
                    help="an action and its dotted children (login also finds login.failed)")
    al.add_argument("--limit", type=int, default=100)
    al.add_argument("--offset", type=int, default=0)
    al.add_argument("--json", action="store_true", help="one JSON object per line")
    store_opts(al)
    au.set_defaults(fn=cmd_audit)

    de = sub.add_parser("destinations", help="destinations: state, pause, resume")
    dsub = de.add_subparsers(dest="action", required=True)
    dl = dsub.add_parser("list", help="each destination's queue and whether it is paused")
    dp = dsub.add_parser("pause", help="stop delivering to a destination (its messages stay queued)")
    dp.add_argument("name")
    dp.add_argument("--reason", help="shown to the other operators")
    dr = dsub.add_parser("resume", help="deliver again, at once")
    dr.add_argument("name")
    for sp in (dl, dp, dr):
        store_opts(sp)
    de.set_defaults(fn=cmd_destinations)

    ids = sub.add_parser("identities", help="the identity registry (IHE PAM France feed)")
    isub = ids.add_subparsers(dest="action", required=True)
    ish = isub.add_parser("show", help="current identity, status and history for an IPP or an INS")
    ish.add_argument("key", help="IPP, AUTHORITY:IPP, or INS")
    ish.add_argument("--json", action="store_true")
    data_opts(ish)
    ish.add_argument("--config", help="routes file whose engine.store_url to use")
    ids.set_defaults(fn=cmd_identities)

    ins_p = sub.add_parser("inspect", help="parse a report message file, print its canonical submission")
    ins_p.add_argument("file", nargs="?")
    ins_p.add_argument("--json", action="store_true")
    ins_p.add_argument("--strict-mss-matrix", action="store_true",
                       help="combinations absent from the MSSanté matrix are errors, not warnings")
    ins_p.add_argument("--rules", action="store_true",
                       help="list the catalogue of the report checks (id, default severity, code, guide)")
    ins_p.add_argument("--rule", action="append", metavar="ID=SEVERITY",
                       help="read the file with this rule set to reject, warn or off (repeatable)")
    ins_p.set_defaults(fn=cmd_inspect)

    cda = sub.add_parser("cda", help="CDA documents")
    csub = cda.add_subparsers(dest="action", required=True)
    cv = csub.add_parser("validate", help="CDA XSD and CI-SIS schematrons")
    cv.add_argument("file")
    cv.add_argument("--json", action="store_true")
    cv.add_argument("--xsd-only", action="store_true")
    cv.add_argument("--resources", metavar="DIR",
                    help="CDA XSD + CI-SIS schematrons folder (layout of the ANS release; default: packaged)")
    data_opts(cv)
    cda.set_defaults(fn=cmd_cda)

    rl = sub.add_parser("reload", help="ask the running engine to reload its routes file and wait for the result")
    data_opts(rl)
    rl.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the engine's answer")
    rl.set_defaults(fn=cmd_reload)

    from engine.simulators.dmp_cli import add_arguments as dmp_simulator_arguments

    dsim = sub.add_parser("dmp-simulator", help="a DMP (ITI-41 / ITI-57) simulator for tests and demos")
    dmp_simulator_arguments(dsim)
    dsim.set_defaults(fn=cmd_dmp_simulator)

    ex = sub.add_parser("export", help="export stored data (messages, deliveries, documents, identities) "
                                       "into an empty folder (docs/export.md)", formatter_class=fmt)
    ex.add_argument("dir", metavar="DIR", help="target folder (absent or empty)")
    ex.add_argument("--since", help="received at or after: ISO date or date-time (local time), or a "
                                    "duration back from now")
    ex.add_argument("--until", help="received before (same forms as --since)")
    ex.add_argument("--channel", action="append", metavar="NAME", help="only this channel (repeatable)")
    data_opts(ex)
    ex.add_argument("--config", help="routes file whose engine.store_url to use")
    ex.set_defaults(fn=cmd_export)

    v = sub.add_parser("version")
    v.add_argument("--config", help="routes file whose engine.cda_resources to report")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_version)
    _format_all(p)
    return p


def main(argv=None) -> int:
    """Run one command. Refusals and failures end with one line on stderr (``minipfi: ...``) and
    a non-zero status, never a traceback (``MINIPFI_DEBUG=1`` shows it for a bug report)."""
    args = build_parser().parse_args(argv)
    if args.command != "run" and hasattr(signal, "SIGPIPE"):
        # `minipfi messages list | head`: end quietly; the engine itself keeps SIGPIPE ignored
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the operator
        if os.environ.get("MINIPFI_DEBUG"):
            raise
        print(f"minipfi: {_one_line(exc)}", file=sys.stderr)
        return 2 if _is_config_error(exc) else 1


def _is_config_error(exc: BaseException) -> bool:
    from engine.config import ConfigError

    return isinstance(exc, ConfigError)


def _one_line(exc: BaseException) -> str:
    """What went wrong, without a traceback and without data the error may quote (database
    errors keep the driver's first line only: see ``engine.logs.error_text``)."""
    from twisted.internet.error import CannotListenError

    from engine import logs

    if isinstance(exc, CLIError):
        return str(exc)
    if _is_config_error(exc):
        return f"invalid configuration\n{exc}"
    if isinstance(exc, CannotListenError):
        why = getattr(exc.socketError, "strerror", None) or str(exc.socketError)
        return f"cannot listen on {exc.interface or '*'}:{exc.port}: {why}"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return logs.error_text(exc, 300)


if __name__ == "__main__":
    sys.exit(main())
