"""Identity registry (IHE PAM France identity feed): current identity state, identifiers and an
append-only history.

SQLAlchemy Core tables in their own :data:`identity_metadata`, so that the store's metadata is
untouched. ``create_tables(engine)`` is for tests; in the engine the store's migration 0002
creates the same tables, written out with ``op.create_table`` so that it stays frozen when this
module changes.

Every function takes a :class:`sqlalchemy.engine.Connection`; the caller owns the transaction
(``with engine.begin() as conn: apply_event(conn, ...)``); the identity feed step calls it in
the writer op that stores the ADT. Parsing and rules are pure (:mod:`engine.identity.pamfr`,
:mod:`engine.identity.ins`); this module reads and writes the three tables, as the store's
module for them.

These tables hold patient data by design (PHI rule, ``docs/architecture.md``): nothing here logs.

Semantics:

* upsert (A28, A31, movements): PID is a full snapshot; ZFA/ZFD update consent / origin only
  when the segment is present. An event older than ``last_event_time`` (EVN-2, else MSH-7)
  never overwrites the state: it is recorded in history as ``ignored_older``.
* INS: stored only when :func:`engine.identity.ins.ins_decision` accepts it; otherwise the
  identity is kept without INS and the reason is written in history (and ``ins_rejected_reason``).
  One INS belongs to one active identity: an INS already held by another active identity is not
  taken (``INS-COLLISION``, potential duplicate for identity-vigilance).
* A29/A23: the identity is deactivated; identifiers and history are kept.
* A40: the MRG-1 identity is folded into PID-3's (``merged_into``, inactive, its INS released);
  lookups by the old IPP follow ``merged_into`` to the survivor. An unknown MRG-1 gets an inactive
  stub identity pointing to the survivor, so that the old IPP still resolves.
* A47: the MRG-1 identifier is replaced by PID-3's on the same identity; the old IPP no longer
  resolves. Refused (``rejected``) when the new IPP already belongs to another identity.
* Events for an IPP already merged into another identity are recorded as ``ignored_merged``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from engine.identity.ins import InsPolicy, check_identity, ins_decision
from engine.identity.model import Identifier, IdentityEvent, InsInfo, Violation

from .held_writes import HeldWrites, bulk
from .sql import json_reader, json_text

identity_metadata = sa.MetaData()

identities = sa.Table(
    "identities",
    identity_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("ipp", sa.String(64), nullable=False),
    sa.Column("ipp_authority", sa.String(128), nullable=False, server_default=""),
    sa.Column("ipp_finess", sa.String(32)),
    sa.Column("ins_value", sa.String(32)),
    sa.Column("ins_oid", sa.String(64)),
    sa.Column("ins_kind", sa.String(16)),
    sa.Column("ins_rejected_reason", sa.Text),
    sa.Column("birth_name", sa.String(256)),
    sa.Column("first_given_name", sa.String(256)),
    sa.Column("given_names", sa.String(512)),  # space-separated, as in XPN-3
    sa.Column("used_name", sa.String(256)),
    sa.Column("used_given_name", sa.String(256)),
    sa.Column("birth_date", sa.Date),
    sa.Column("birth_date_raw", sa.String(32)),
    sa.Column("sex", sa.String(8)),
    sa.Column("birth_place_cog", sa.String(16)),
    sa.Column("status_code", sa.String(16)),
    sa.Column("status_raw", sa.String(128)),  # PID-32 repetitions joined with "~"
    sa.Column("consent", sa.JSON),
    sa.Column("obtained_via", sa.String(16)),
    sa.Column("insi_query_date", sa.Date),
    sa.Column("zfd", sa.JSON),
    sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("merged_into", sa.Integer, sa.ForeignKey("identities.id"), nullable=True),
    sa.Column("last_event_time", sa.DateTime),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Index("ix_identities_merged_into", "merged_into"),
)

identity_identifiers = sa.Table(
    "identity_identifiers",
    identity_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("identity_id", sa.Integer, sa.ForeignKey("identities.id"), nullable=False),
    sa.Column("value", sa.String(64), nullable=False),
    sa.Column("authority", sa.String(128), nullable=False),  # IPP namespace, or the INS OID
    sa.Column("type", sa.String(16), nullable=False),  # PI, INS
    sa.UniqueConstraint("authority", "type", "value", name="uq_identity_identifiers_key"),
    # Lookups by value (IPP without authority, INS without OID) use this index: no scans.
    sa.Index("ix_identity_identifiers_value_type", "value", "type"),
    sa.Index("ix_identity_identifiers_identity", "identity_id"),
)

identity_history = sa.Table(
    "identity_history",
    identity_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("identity_id", sa.Integer, sa.ForeignKey("identities.id"), nullable=False),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("event_time", sa.DateTime),
    sa.Column("trigger", sa.String(8)),
    sa.Column("control_id", sa.String(199)),
    sa.Column("message_id", sa.Integer),  # messages.id of the source message (no FK: store-owned)
    sa.Column("action", sa.String(24), nullable=False),
    sa.Column("change", sa.JSON),  # {field: [before, after]}
    sa.Column("note", sa.Text),
    sa.Index("ix_identity_history_identity", "identity_id", "id"),
)

MAX_MERGE_HOPS = 32


def create_tables(engine: sa.engine.Engine) -> None:
    """Create the registry tables (tests; production uses the Alembic migration)."""
    identity_metadata.create_all(engine)


class AmbiguousIdentity(LookupError):
    """A lookup without authority matched several identities."""


@dataclass
class ApplyResult:
    identity_id: int | None
    action: str  # created, updated, unchanged, ignored_older, ignored_merged, deactivated,
    #              merged, id_changed, not_found, rejected, passthrough
    violations: list[Violation] = field(default_factory=list)
    ins_taken: bool = False
    note: str = ""


@dataclass
class IdentityView:
    id: int
    ipp: str
    ipp_authority: str
    ipp_finess: str | None
    ins_value: str | None
    ins_oid: str | None
    ins_kind: str | None
    ins_rejected_reason: str | None
    birth_name: str | None
    first_given_name: str | None
    given_names: list[str]
    used_name: str | None
    used_given_name: str | None
    birth_date: date | None
    birth_date_raw: str | None
    sex: str | None
    birth_place_cog: str | None
    status_code: str | None
    status_raw: list[str]
    consent: dict | None
    obtained_via: str | None
    insi_query_date: date | None
    active: bool
    merged_into: int | None
    last_event_time: datetime | None
    identifiers: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    merged_from: list[int] = field(default_factory=list)

    def __repr__(self) -> str:  # PHI: never print patient data by accident
        return f"<IdentityView id={self.id} (patient data masked)>"

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "ipp": self.ipp,
            "ipp_authority": self.ipp_authority,
            "ipp_finess": self.ipp_finess,
            "ins": ({"value": self.ins_value, "oid": self.ins_oid, "kind": self.ins_kind}
                    if self.ins_value else None),
            "ins_rejected_reason": self.ins_rejected_reason,
            "birth_name": self.birth_name,
            "first_given_name": self.first_given_name,
            "given_names": self.given_names,
            "used_name": self.used_name,
            "used_given_name": self.used_given_name,
            "birth_date": self.birth_date.isoformat() if self.birth_date else None,
            "sex": self.sex,
            "birth_place_cog": self.birth_place_cog,
            "status": self.status_code,
            "status_raw": self.status_raw,
            "consent": self.consent,
            "obtained_via": self.obtained_via,
            "insi_query_date": self.insi_query_date.isoformat() if self.insi_query_date else None,
            "active": self.active,
            "merged_from": self.merged_from,
            "last_event_time": _iso(self.last_event_time),
            "identifiers": self.identifiers,
            "history": self.history,
        }


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _iso(v: Any) -> Any:
    return v.isoformat() if isinstance(v, (date, datetime)) else v


def ipp_lookup_stmt(value: str, authority: str | None = None) -> sa.Select:
    """The indexed lookup of an IPP (identity_identifiers type PI)."""
    ii = identity_identifiers
    stmt = sa.select(ii.c.identity_id, ii.c.authority).where(ii.c.value == value, ii.c.type == "PI")
    if authority:
        stmt = stmt.where(ii.c.authority == authority)
    return stmt


def ins_lookup_stmt(value: str, oid: str | None = None) -> sa.Select:
    ii = identity_identifiers
    stmt = sa.select(ii.c.identity_id).where(ii.c.value == value, ii.c.type == "INS")
    if oid:
        stmt = stmt.where(ii.c.authority == oid)
    return stmt


# ------------------------------------------------------------------------------------------
# prebuilt statements (hot path)
# ------------------------------------------------------------------------------------------
# apply_event runs in the engine's single writer thread, once per ADT. Building a statement per
# call (``select(...)``, ``.values(**dict)``) costs SQLAlchemy far more than running it (about
# 0.5 ms per statement against 0.08 ms for a prebuilt one), so every statement of the hot path
# is built once here with ``sa.bindparam`` and executed as ``conn.execute(stmt, params)``.
# Statements whose column set depends on the event (ZFA / ZFD present or not) are built once per
# column set and kept in a small dict (at most a few dozen variants).

_ii = identity_identifiers
_idt = identities
_hist = identity_history
_B = sa.bindparam

_IPP_BY_AUTH = sa.select(_ii.c.identity_id).where(
    _ii.c.value == _B("value"), _ii.c.type == "PI", _ii.c.authority == _B("authority"))
_IPP_ANY_AUTH = sa.select(_ii.c.identity_id).where(_ii.c.value == _B("value"), _ii.c.type == "PI")
_ROW = sa.select(_idt).where(_idt.c.id == _B("id"))
_MERGED_INTO = sa.select(_idt.c.merged_into).where(_idt.c.id == _B("id"))
_INS_HOLDER = sa.select(_ii.c.id, _ii.c.identity_id).where(
    _ii.c.value == _B("value"), _ii.c.type == "INS", _ii.c.authority == _B("authority"))
_INS_OF_IDENTITY = sa.select(_ii.c.id, _ii.c.value, _ii.c.authority).where(
    _ii.c.identity_id == _B("identity_id"), _ii.c.type == "INS")
_DELETE_IDENTIFIER = _ii.delete().where(_ii.c.id == _B("id"))
_DELETE_INS_OF_IDENTITY = _ii.delete().where(_ii.c.identity_id == _B("identity_id"),
                                             _ii.c.type == "INS")
_DELETE_OTHER_INS = _ii.delete().where(_ii.c.identity_id == _B("identity_id"), _ii.c.type == "INS",
                                       _ii.c.id != _B("keep_id"))
_INSERT_IDENTIFIER = bulk(_ii.insert().values(identity_id=_B("identity_id"), value=_B("value"),
                                              authority=_B("authority"), type=_B("type")),
                          _ii, [(c, c) for c in ("identity_id", "value", "authority", "type")])
_HISTORY_COLS = ("identity_id", "at", "event_time", "trigger", "control_id", "message_id", "action",
                 "change", "note")
_INSERT_HISTORY = bulk(_hist.insert().values({c: _B(c, type_=_hist.c[c].type) for c in _HISTORY_COLS}),
                       _hist, [(c, c) for c in _HISTORY_COLS])
_CHANGE_IPP = _ii.update().where(
    _ii.c.identity_id == _B("of_identity"), _ii.c.type == "PI", _ii.c.value == _B("old_value"),
    _ii.c.authority == _B("old_authority")).values(value=_B("new_value"),
                                                   authority=_B("new_authority"))

# The upsert's one read: the identity holding the IPP (outer-joined from a one-row table, so that
# a row comes back even for a new IPP), the identifier row holding the event's INS and its
# identity's state, and how many INS identifiers the IPP's identity holds. Merges are followed
# (extra reads) only when ``merged_into`` is set.
_one = sa.select(sa.literal_column("1").label("one")).subquery("one")
_pi = _ii.alias("pi")
_insh = _ii.alias("insh")
_holder = _idt.alias("holder")
_cnt = _ii.alias("cnt")


def _n_ins(idt):
    """The number of INS identifiers of the identity ``idt`` (a correlated subquery)."""
    return (sa.select(sa.func.count()).select_from(_cnt)
            .where(_cnt.c.identity_id == idt.c.id, _cnt.c.type == "INS")
            .correlate(idt).scalar_subquery())


_N_INS = _n_ins(_idt)


def _upsert_lookup(with_authority: bool) -> sa.Select:
    pi_on = sa.and_(_pi.c.value == _B("value"), _pi.c.type == "PI")
    if with_authority:
        pi_on = sa.and_(pi_on, _pi.c.authority == _B("authority"))
    frm = (_one.outerjoin(_pi, pi_on)
           .outerjoin(_idt, _idt.c.id == _pi.c.identity_id)
           .outerjoin(_insh, sa.and_(_insh.c.value == _B("ins_value"), _insh.c.type == "INS",
                                     _insh.c.authority == _B("ins_oid")))
           .outerjoin(_holder, _holder.c.id == _insh.c.identity_id))
    return sa.select(
        _pi.c.identity_id.label("raw_id"), *_idt.c, _N_INS.label("n_ins"),
        _insh.c.id.label("ins_row_id"), _insh.c.identity_id.label("ins_holder_id"),
        _holder.c.active.label("ins_holder_active"),
        _holder.c.merged_into.label("ins_holder_merged_into"),
    ).select_from(frm)


_UPSERT_LOOKUP_BY_AUTH = _upsert_lookup(True)
_UPSERT_LOOKUP_ANY_AUTH = _upsert_lookup(False)

_ROW_KEYS = tuple(c.key for c in _idt.c)
_UPDATE_BY_KEYS: dict[tuple[str, ...], Any] = {}
_INSERT_BY_KEYS: dict[tuple[str, ...], Any] = {}


# Variants of the upsert's UPDATE (the columns whose value changed): at most this many, then
# every column of the snapshot is written (built once per column set).
MAX_UPDATE_VARIANTS = 256


def _changed(row, after: dict) -> dict:
    """The columns of ``after`` whose value differs from ``row`` (strictly: ``""`` against NULL
    is written), or all of them once :data:`MAX_UPDATE_VARIANTS` column sets are in use: an
    ADT usually changes a few columns (the movement's dates), and every column written costs
    its conversion and, for JSON, its serialisation."""
    upd = {k: v for k, v in after.items() if row[k] != v}
    return upd if len(_UPDATE_BY_KEYS) < MAX_UPDATE_VARIANTS else dict(after)


def _update_identity(conn: Connection, identity_id: int, values: dict) -> None:
    keys = tuple(values)
    stmt = _UPDATE_BY_KEYS.get(keys)
    if stmt is None:
        stmt = bulk(_idt.update().where(_idt.c.id == _B("_id")).values(
            {k: _B("v_" + k, type_=_idt.c[k].type) for k in keys}),
            _idt, [("id", "_id")] + [(k, "v_" + k) for k in keys], key="id")
        _UPDATE_BY_KEYS[keys] = stmt
    params = {"v_" + k: v for k, v in values.items()}
    params["_id"] = identity_id
    conn.execute(stmt, params)


def _insert_identity(conn: Connection, values: dict) -> int:
    """Insert an identity and return its id; through :class:`_RegistryWrites` the INSERT is held
    like any other write, with an id allocated beforehand (:class:`_IdentityIds`)."""
    new_id = None
    if type(conn) is _RegistryWrites:
        new_id = conn.ids.take()
        values = dict(values, id=new_id)
    keys = tuple(values)
    stmt = _INSERT_BY_KEYS.get(keys)
    if stmt is None:
        stmt = bulk(_idt.insert().values({k: _B("v_" + k, type_=_idt.c[k].type) for k in keys}),
                    _idt, [(k, "v_" + k) for k in keys])
        _INSERT_BY_KEYS[keys] = stmt
    params = {"v_" + k: v for k, v in values.items()}
    if new_id is not None:
        conn.execute(stmt, params)
        return new_id
    return conn.execute(stmt, params).inserted_primary_key[0]


# PostgreSQL: ids of new identities taken from the column's sequence this many at a time.
IDENTITY_ID_BLOCK = 64
_POOL_KEY = "minipfi_identity_ids"


class _IdentityIds:
    """Ids for new identities, allocated before their INSERT so that it is held and sent with the
    other writes (no RETURNING, no round trip of its own).

    PostgreSQL: blocks of :data:`IDENTITY_ID_BLOCK` from the ``identities.id`` sequence, kept with
    the DBAPI connection (``nextval`` never hands a value out twice, even across engines and
    restarts, nor takes it back on rollback: unused ids of a block are skipped, never reused).
    SQLite: ``max(id) + 1`` onward, read at the first new identity of the call: the caller's
    transaction holds the database's write lock, and :meth:`reset` is called before anything
    else inserts an identity (merge stubs) in the same transaction."""

    __slots__ = ("conn", "next")

    def __init__(self, conn: Connection):
        self.conn = conn
        self.next = None

    def reset(self) -> None:
        self.next = None

    def take(self) -> int:
        conn = self.conn
        if conn.dialect.name == "postgresql":
            pool = conn.connection.info.get(_POOL_KEY)
            if not pool:
                cur = conn.connection.driver_connection.cursor()
                cur.execute("SELECT nextval(pg_get_serial_sequence('identities', 'id')) "
                            "FROM generate_series(1, %s)", (IDENTITY_ID_BLOCK,))
                pool = conn.connection.info[_POOL_KEY] = [r[0] for r in cur.fetchall()][::-1]
            return pool.pop()
        if self.next is None:
            cur = conn.connection.driver_connection.cursor()
            cur.execute("SELECT max(id) FROM identities")
            self.next = (cur.fetchone()[0] or 0) + 1
        self.next += 1
        return self.next - 1


class _RegistryWrites(HeldWrites):
    """The registry's held writes, with the id allocator of their new identities."""

    __slots__ = ("ids",)

    def __init__(self, conn: Connection):
        super().__init__(conn, _write_rank)
        self.ids = _IdentityIds(conn)


def _raw_id(conn: Connection, ident: Identifier) -> int | None:
    """The identity holding this exact IPP (authority and value), merges not followed."""
    if ident.authority:
        return conn.execute(_IPP_BY_AUTH, {"value": ident.value,
                                           "authority": ident.authority}).scalar()
    return conn.execute(_IPP_ANY_AUTH, {"value": ident.value}).scalar()


def _row(conn: Connection, identity_id: int):
    return conn.execute(_ROW, {"id": identity_id}).mappings().one()


def _follow(conn: Connection, identity_id: int, merged_into: Any = ...) -> int:
    """The end of the merge chain from ``identity_id``; ``merged_into`` of the start when the
    caller already read it (saves a read)."""
    seen = {identity_id}
    current = identity_id
    for _ in range(MAX_MERGE_HOPS):
        if merged_into is not ...:
            nxt, merged_into = merged_into, ...
        else:
            nxt = conn.execute(_MERGED_INTO, {"id": current}).scalar()
        if nxt is None or nxt in seen:
            return current
        seen.add(nxt)
        current = nxt
    return current


def _history(conn: Connection, identity_id: int, event: IdentityEvent, action: str, *,
             message_id: int | None, now: datetime, change: dict | None = None,
             note: str = "") -> None:
    conn.execute(_INSERT_HISTORY, {
        "identity_id": identity_id, "at": now, "event_time": event.event_time,
        "trigger": event.trigger, "control_id": event.control_id or None,
        "message_id": message_id, "action": action, "change": change or {},
        "note": note or None})


def _state(event: IdentityEvent, ins: InsInfo | None, reason: str) -> dict:
    """Column values taken from the event (PID snapshot; ZFA/ZFD only when present); an empty
    text is stored as NULL (``or None``)."""
    t, st = event.traits, event.status
    if ins is not None:
        ins_value, ins_oid, ins_kind = ins.value, ins.oid, ins.kind
    else:
        ins_value = ins_oid = ins_kind = None
    s: dict[str, Any] = {
        "ipp_finess": event.ipp.finess or None,
        "ins_value": ins_value,
        "ins_oid": ins_oid,
        "ins_kind": ins_kind,
        "ins_rejected_reason": reason or None,
        "birth_name": t.birth_name or None,
        "first_given_name": t.first_given_name or None,
        "given_names": " ".join(t.given_names) or None,
        "used_name": t.used_name or None,
        "used_given_name": t.used_given_name or None,
        "birth_date": t.birth_date,
        "birth_date_raw": t.birth_date_raw or None,
        "sex": t.sex or None,
        "birth_place_cog": t.birth_place_cog or None,
        "status_code": st.code or None,
        "status_raw": "~".join(st.raw) or None,
    }
    if event.consent is not None:
        s["consent"] = event.consent.to_json()
    if event.zfd is not None:
        z = event.zfd
        s["obtained_via"] = z.mode or None
        s["insi_query_date"] = z.insi_query_date
        s["zfd"] = {"mode": z.mode, "insi_query_date": z.insi_query_date_raw,
                    "lunar_birth_date": z.lunar_birth_date, "sms_consent": z.sms_consent,
                    "corrected_birth_date": z.corrected_birth_date,
                    "id_document_type": z.id_document_type,
                    "id_document_expiry": z.id_document_expiry}
    return s


# Types whose values :func:`_iso` returns as they are (no date among them, not even a subclass):
# checked by ``type(v) in`` before calling it, since most values of a diff are texts or None.
_NOT_DATES = frozenset({str, type(None), bool, int, float, dict, list})
_EMPTY = ("", {}, [])  # read only: compared with, never changed
_NO_ROW: dict = {}  # a creation's "before" (read only)


def _diff(before: Any, after: dict) -> dict:
    """The history's change, ``{column: [before, after]}`` (dates as ISO text); a column going
    from NULL to an empty value is no change. Runs once per ADT (every column on a creation)."""
    out = {}
    get = before.get if before is not None else _NO_ROW.get
    not_dates = _NOT_DATES
    for k, v in after.items():
        old = get(k)
        if old != v and not (old is None and v in _EMPTY):
            out[k] = [old if type(old) in not_dates else _iso(old),
                      v if type(v) in not_dates else _iso(v)]
    return out


def _is_older(event: IdentityEvent, last: datetime | None) -> bool:
    return event.event_time is not None and last is not None and event.event_time < last


@dataclass
class _InsHolder:
    """The identifier row holding an INS and its identity's state (from one read)."""

    row_id: int
    identity_id: int
    active: bool
    merged_into: int | None


def _ins_holder(conn: Connection, ins: InsInfo) -> _InsHolder | None:
    holder = conn.execute(_INS_HOLDER, {"value": ins.value, "authority": ins.oid}).first()
    if holder is None:
        return None
    h = _row(conn, holder.identity_id)
    return _InsHolder(holder.id, holder.identity_id, h["active"], h["merged_into"])


def _claim_ins(conn: Connection, identity_id: int | None, ins: InsInfo, event: IdentityEvent,
               *, message_id: int | None, now: datetime,
               holder: _InsHolder | None | Any = ...) -> Violation | None:
    """Make sure no other active identity holds this INS. Returns a violation when one does.
    ``holder``: the holder when the caller already read it (``None``: nobody holds it)."""
    if holder is ...:
        holder = _ins_holder(conn, ins)
    if holder is None or holder.identity_id == identity_id:
        return None
    if holder.active and holder.merged_into is None:
        return Violation(f"PID-3[{ins.rep}].1", "INS-COLLISION",
                         "this INS already belongs to another active identity (potential "
                         "duplicate): INS not taken", "W", "205")
    # The holder is deactivated or merged: release its INS identifier (its state is kept).
    conn.execute(_DELETE_IDENTIFIER, {"id": holder.row_id})
    _history(conn, holder.identity_id, event, "ins_released", message_id=message_id, now=now,
             note="INS identifier released to another identity")
    return None


def _sync_ins_identifier(conn: Connection, identity_id: int, ins: InsInfo | None) -> None:
    rows = conn.execute(_INS_OF_IDENTITY, {"identity_id": identity_id}).all()
    keep = False
    for r in rows:
        if ins is not None and r.value == ins.value and r.authority == ins.oid:
            keep = True
        else:
            conn.execute(_DELETE_IDENTIFIER, {"id": r.id})
    if ins is not None and not keep:
        conn.execute(_INSERT_IDENTIFIER, {"identity_id": identity_id, "value": ins.value,
                                          "authority": ins.oid, "type": "INS"})


def _sync_ins_known(conn: Connection, identity_id: int, ins: InsInfo | None, n_ins: int,
                    holder: _InsHolder | None) -> None:
    """:func:`_sync_ins_identifier` when the lookup already told how many INS identifiers the
    identity holds (``n_ins``) and who held the event's INS before the claim (``holder``): no read,
    and no write at all in the usual case (same INS as before, or still no INS)."""
    if ins is None:
        if n_ins:
            conn.execute(_DELETE_INS_OF_IDENTITY, {"identity_id": identity_id})
        return
    if holder is not None and holder.identity_id == identity_id:
        if n_ins > 1:  # the INS is kept; any other INS identifier of this identity goes
            conn.execute(_DELETE_OTHER_INS, {"identity_id": identity_id, "keep_id": holder.row_id})
        return
    # Nobody held it, or its holder released it in _claim_ins: (re)attach it to this identity.
    if n_ins:
        conn.execute(_DELETE_INS_OF_IDENTITY, {"identity_id": identity_id})
    conn.execute(_INSERT_IDENTIFIER, {"identity_id": identity_id, "value": ins.value,
                                      "authority": ins.oid, "type": "INS"})


def _release_ins(conn: Connection, identity_id: int) -> None:
    conn.execute(_DELETE_INS_OF_IDENTITY, {"identity_id": identity_id})


@dataclass
class _Upsert:
    identity_id: int
    action: str
    change: dict
    ins_taken: bool
    note: str
    violations: list[Violation]


def _upsert(conn: Connection, event: IdentityEvent, identity_id: int | None,
            violations: list[Violation], policy: InsPolicy, *, message_id: int | None,
            now: datetime, looked_up: Any = None) -> _Upsert:
    """Create or update the identity from the event's PID (no history row written here).

    ``looked_up``: the row of the upsert lookup (:func:`_lookup_for_upsert`) when ``identity_id``
    is the IPP's own identity; it replaces the reads of the row, of the INS holder and of the
    identity's INS identifiers."""
    violations = list(violations)
    decision = ins_decision(event, policy, violations)
    ins, reason = decision.ins, decision.reason
    row = None
    if identity_id is not None:
        row = looked_up if looked_up is not None else _row(conn, identity_id)
        if _is_older(event, row["last_event_time"]):
            return _Upsert(identity_id, "ignored_older", {}, False,
                           "event older than the current state: not applied", violations)
    holder: Any = ...
    if looked_up is not None and event.ins is not None and ins is not None:
        holder = None
        if looked_up["ins_row_id"] is not None:
            holder = _InsHolder(looked_up["ins_row_id"], looked_up["ins_holder_id"],
                                looked_up["ins_holder_active"],
                                looked_up["ins_holder_merged_into"])
    if ins is not None:
        clash = _claim_ins(conn, identity_id, ins, event, message_id=message_id, now=now,
                           holder=holder)
        if clash is not None:
            violations.append(clash)
            reason = f"INS not taken: {clash.field} {clash.rule}"
            ins = None
    state = _state(event, ins, reason)
    if identity_id is None:
        values = dict(state, ipp=event.ipp.value, ipp_authority=event.ipp.authority, active=True,
                      last_event_time=event.event_time, created_at=now, updated_at=now)
        new_id = _insert_identity(conn, values)
        if ins is not None:
            # The IPP and the INS in one execute (executemany; a multi-row VALUES statement would
            # not be cacheable by SQLAlchemy and would be compiled on every call).
            conn.execute(_INSERT_IDENTIFIER, [
                {"identity_id": new_id, "value": event.ipp.value,
                 "authority": event.ipp.authority, "type": "PI"},
                {"identity_id": new_id, "value": ins.value, "authority": ins.oid, "type": "INS"}])
        else:
            conn.execute(_INSERT_IDENTIFIER, {"identity_id": new_id, "value": event.ipp.value,
                                              "authority": event.ipp.authority, "type": "PI"})
        return _Upsert(new_id, "created", _diff(None, dict(state, active=True)),
                       ins is not None, reason, violations)
    after = state
    if not row["active"]:
        after["active"] = True
    upd = _changed(row, after)
    change = _diff(row, upd)  # a column _changed left out is equal: never in the diff
    last = row["last_event_time"]
    upd["updated_at"] = now
    if event.event_time is not None and (last is None or event.event_time > last):
        upd["last_event_time"] = event.event_time
    _update_identity(conn, identity_id, upd)
    if looked_up is not None:  # holder was read by the lookup whenever ins is not None
        _sync_ins_known(conn, identity_id, ins, looked_up["n_ins"],
                        None if holder is ... else holder)
    else:
        _sync_ins_identifier(conn, identity_id, ins)
    action = "updated" if change else "unchanged"
    return _Upsert(identity_id, action, change, ins is not None, reason, violations)


def _lookup_for_upsert(conn: Connection, event: IdentityEvent):
    """One read: the IPP's identity row (``raw_id`` None when the IPP is new), the holder of the
    event's INS, and the number of INS identifiers of the IPP's identity."""
    ins = event.ins
    params = {"value": event.ipp.value, "ins_value": ins.value if ins else None,
              "ins_oid": ins.oid if ins else None}
    if event.ipp.authority:
        params["authority"] = event.ipp.authority
        return conn.execute(_UPSERT_LOOKUP_BY_AUTH, params).mappings().first()
    return conn.execute(_UPSERT_LOOKUP_ANY_AUTH, params).mappings().first()


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------

def apply_event(conn: Connection, event: IdentityEvent, *, message_id: int | None = None,
                policy: InsPolicy | None = None, now: datetime | None = None) -> ApplyResult:
    """Apply one parsed ADT to the registry inside the caller's transaction."""
    return apply_events(conn, [(event, message_id)], policy=policy, now=now)[0]


def apply_events(conn: Connection, events: list[tuple[IdentityEvent, int | None]], *,
                 policy: InsPolicy | None = None, now: datetime | None = None,
                 lookups: Lookups | None = None) -> list[ApplyResult]:
    """Apply parsed ADTs (with the id of their stored message) in order, inside the caller's
    transaction: the same outcome as :func:`apply_event` on each in turn, in fewer statements.

    The upserts' lookups are read in one query for the whole list; an upsert whose IPP, INS or
    identities an earlier event of the list touched reads again (after the writes so far), and
    so does every upsert after a deletion, merge or identifier change. The upserts' writes are
    held (:class:`engine.store.held_writes.HeldWrites`) and sent grouped before the next read
    and at the end: between two reads the upserts touch disjoint rows, so only the order within
    one event matters, and ranking deletes, new identities, identifier rows, updates, history
    keeps it (history ids stay in event order).

    ``lookups``: the batch read, sent earlier in the same transaction with nothing written to
    the registry since (:class:`Lookups`); used when it covers every upsert of the list."""
    policy = policy or InsPolicy()
    held = _RegistryWrites(conn)
    out: list[ApplyResult] = []
    upserts = [i for i, (ev, _mid) in enumerate(events)
               if ev.kind == "upsert" and ev.ipp is not None]
    prefetched = None  # (first event index covered, rows) or None: read again
    if lookups is not None and lookups.covers(events[i][0] for i in upserts):
        prefetched = (0, lookups.rows())
    touched: set = set()
    batch_now = now or _utcnow()  # the transaction's time, for every event of the list
    for i, (event, message_id) in enumerate(events):
        if event.kind == "passthrough" or event.ipp is None:
            out.append(ApplyResult(None, "passthrough"))
            continue
        violations = check_identity(event, policy)
        kw = dict(message_id=message_id, now=batch_now)
        if event.kind != "upsert":
            held.flush()
            held.ids.reset()  # a merge may insert a stub identity (SQLite: max(id) moves)
            out.append(_apply_other(conn, event, violations, policy, kw))
            prefetched = None  # a merge or an identifier change may touch any identity
            continue
        found = _prefetched(prefetched, event)
        if found is None or _touches(found, event, touched):
            prefetched = (i, _prefetch(held, [events[k][0] for k in upserts if k >= i]))
            touched.clear()
            found = _prefetched(prefetched, event)
            if found is None:  # several identities hold the IPP (no authority): read as one
                found = _lookup_for_upsert(held, event)
        r = _apply_upsert(held, event, found, violations, policy, kw)
        touched.update(_keys(found, event))
        touched.add(("id", r.identity_id))
        out.append(r)
    held.flush()
    return out


def _write_rank(stmt) -> int:
    if stmt.is_delete:
        return 0
    if stmt.is_insert:
        return {"identities": 1, "identity_identifiers": 2}.get(stmt.table.name, 4)
    return 3


# The upserts' lookups of a batch in one read: every PI and INS identifier row holding one of
# the IPP or INS values, with its identity and that identity's number of INS identifiers. Run on
# the DBAPI cursor (compiled once per dialect, SQLAlchemy's result processors applied here): it
# is the writer's one read per batch, and a plain cursor read is also safe inside the writer's
# psycopg pipeline (the fetch sends what is queued and waits for this result).
# The identity's columns but its timestamps (the upsert never reads them: two conversions less
# per row); of the rows found by INS only the holder's state is read (see Lookups.rows), so the
# INS rows come from a second SELECT of the same statement (UNION ALL) without the identity's
# other columns nor its count of INS identifiers: half the rows of a batch (SQLite: 76 against
# 128-166 us for the read of 7 ADTs).
_LOOKUP_KEYS = tuple(k for k in _ROW_KEYS if k not in ("created_at", "updated_at"))
_INS_HOLDER_KEYS = frozenset({"pf_row_id", "pf_value", "pf_authority", "pf_type", "id", "active",
                              "merged_into"})


def _pf_cols(pf) -> tuple:
    return (pf.c.id.label("pf_row_id"), pf.c.value.label("pf_value"),
            pf.c.authority.label("pf_authority"), pf.c.type.label("pf_type"))


def _identifier_rows(dialect_name: str, id_type: str):
    """(the identifier rows of ``id_type`` whose value is in the ``values`` parameter, as
    ``pf``; their identities; the FROM clause joining both; the WHERE clause or None). The list
    of values is one parameter: one statement whatever its length.

    SQLite: ``pf.value IN (SELECT value FROM json_each(:values))``, on the (value, type) index.
    PostgreSQL: one index probe per value, then one by primary key for its identity (LATERAL
    subqueries kept apart by ``OFFSET 0``). With ``pf.value = ANY(:values)`` and plain joins the
    planner chose, and psycopg's prepared statement got a generic plan that read every
    identifier of the type (through the unique (type, authority, value) index, filtering on the
    array) or hashed the whole registry: 1.1-1.9 ms per batch of 7 ADTs with 2,000 patients
    (``auto_explain``), the identity feed's costliest statement on the server, growing with the
    registry."""
    if dialect_name == "postgresql":
        values = sa.func.unnest(sa.cast(_B("values"), postgresql.ARRAY(sa.Text))
                                ).table_valued("value").render_derived(name="v")
        same_type = _ii.c.type == sa.literal_column(f"'{id_type}'")
        pf = (sa.select(_ii).where(_ii.c.value == values.c.value, same_type)
              .offset(sa.literal_column("0")).lateral("pf"))
        idt = (sa.select(_idt).where(_idt.c.id == pf.c.identity_id)
               .offset(sa.literal_column("0")).lateral("idt"))
        return pf, idt, values.join(pf, sa.true()).join(idt, sa.true()), None
    pf = _ii.alias("pf")
    where = sa.text(f"pf.value IN (SELECT value FROM json_each(:values)) AND pf.type = '{id_type}'")
    return pf, _idt, pf.join(_idt, _idt.c.id == pf.c.identity_id), where


def _prefetch_select(dialect_name: str):
    pf, idt, frm, where = _identifier_rows(dialect_name, "PI")
    pis = sa.select(*_pf_cols(pf), *(idt.c[k] for k in _LOOKUP_KEYS), _n_ins(idt).label("n_ins")
                    ).select_from(frm)
    if where is not None:
        pis = pis.where(where)
    pf, idt, frm, where = _identifier_rows(dialect_name, "INS")
    holders = sa.select(*_pf_cols(pf), *(idt.c[k] if k in _INS_HOLDER_KEYS else sa.null()
                                         for k in _LOOKUP_KEYS), sa.literal_column("0")
                        ).select_from(frm)
    if where is not None:
        holders = holders.where(where)
    return sa.union_all(pis, holders)


_PREFETCH_FORMS: dict = {}


def _result_processor(type_, dialect):
    """SQLAlchemy's result processor of ``type_``; for a JSON column read as text with the
    default ``json.loads``, :func:`engine.store.sql.json_reader` (same values, less per call)."""
    proc = type_.dialect_impl(dialect).result_processor(dialect, None)
    if (proc is not None and isinstance(type_, sa.JSON) and dialect._json_deserializer is None
            and type_.dialect_impl(dialect)._str_impl.result_processor(dialect, None) is None):
        return json_reader
    return proc


def _prefetch_form(dialect):
    """(SQL, parameters with ``values`` as None, [(key, result processor)]) of the batch read
    for ``dialect``."""
    form = _PREFETCH_FORMS.get(dialect.name)
    if form is None:
        c = _prefetch_select(dialect.name).compile(dialect=dialect)
        binds = {n: None if n == "values" else c.binds[n].effective_value for n in c.binds}
        params = [binds[n] for n in c.positiontup] if c.positional else binds
        cols = [(rc.keyname, _result_processor(rc.type, dialect)) for rc in c._result_columns]
        form = _PREFETCH_FORMS[dialect.name] = (c.string, params, cols)
    return form


class Lookups:
    """The batch read of :func:`apply_events`, sent now and read when first needed: the writer
    sends it before the transaction's messages insert (:meth:`engine.steps.identity_feed.
    IdentityFeed.read_ahead`), so that on PostgreSQL both share one round trip of its pipeline."""

    __slots__ = ("values", "_cur", "_cols", "_rows")

    def __init__(self, conn, events: list[IdentityEvent]):
        values = set()
        for ev in events:
            if ev.ipp is not None:
                values.add(ev.ipp.value)
            if ev.ins is not None:
                values.add(ev.ins.value)
        self.values = values
        self._rows = None
        if type(conn) is _RegistryWrites:
            conn.flush()
            conn = conn.conn
        sql, params, self._cols = _prefetch_form(conn.dialect)
        values = sorted(values)
        if type(params) is list:  # sqlite3: positional, the values as a JSON array (json_each)
            params = [json_text(values) if p is None else p for p in params]
        else:
            params = dict(params, values=values)
        self._cur = conn.connection.driver_connection.cursor()
        self._cur.execute(sql, params)
        if conn.dialect.name == "sqlite":  # no round trip to save: read at once
            self.rows()

    def covers(self, events) -> bool:
        return all(ev.ipp.value in self.values and (ev.ins is None or ev.ins.value in self.values)
                   for ev in events)

    def rows(self):
        """(identifier rows of the IPPs by value, of the INS by (value, OID)): an IPP's row as a
        dict of its columns, an INS's as the list [identifier row id, holder id, active,
        merged_into]: the only columns :func:`_prefetched` reads of it."""
        if self._rows is not None:
            return self._rows
        cols = self._cols
        pis: dict[str, list] = {}
        inss: dict[tuple, list] = {}
        keys = [k for k, _p in cols]
        procs = [(i, p) for i, (_k, p) in enumerate(cols) if p is not None]
        kind, value, authority, row_id, holder, active, merged = (
            keys.index(k) for k in ("pf_type", "pf_value", "pf_authority", "pf_row_id", "id",
                                    "active", "merged_into"))
        ins_procs = [(n, cols[i][1]) for n, i in enumerate((row_id, holder, active, merged))
                     if cols[i][1] is not None]  # SQLite: active (an integer read as a bool)
        for row in self._cur.fetchall():
            if row[kind] == "PI":
                if procs:
                    row = list(row)
                    for i, p in procs:
                        row[i] = p(row[i])
                r = dict(zip(keys, row))
                pis.setdefault(r["pf_value"], []).append(r)
            else:
                h = [row[row_id], row[holder], row[active], row[merged]]
                for n, p in ins_procs:
                    h[n] = p(h[n])
                inss[(row[value], row[authority])] = h
        self._cur = None
        self._rows = (pis, inss)
        return self._rows


def _prefetch(conn, events: list[IdentityEvent]):
    return Lookups(conn, events).rows()


def _prefetched(prefetched, event: IdentityEvent) -> dict | None:
    """What :func:`_lookup_for_upsert` would read, from the batch's read; None when not there
    (not read, or an IPP without authority held by several identities)."""
    if prefetched is None:
        return None
    pis, inss = prefetched[1]
    cands = pis.get(event.ipp.value, ())
    if event.ipp.authority:
        cands = [r for r in cands if r["pf_authority"] == event.ipp.authority]
    if len(cands) > 1:
        return None
    if cands:
        found = dict(cands[0])  # the row's identity columns (and its pf_* columns, unread)
        found["raw_id"] = found["id"]
    else:
        found = dict.fromkeys(_LOOKUP_KEYS)
        found["raw_id"], found["n_ins"] = None, 0
    h = inss.get((event.ins.value, event.ins.oid)) if event.ins is not None else None
    (found["ins_row_id"], found["ins_holder_id"], found["ins_holder_active"],
     found["ins_holder_merged_into"]) = h if h is not None else _NO_HOLDER
    return found


_NO_HOLDER = (None, None, None, None)


def _keys(found, event: IdentityEvent) -> list:
    keys = [("ipp", event.ipp.value), ("id", found["raw_id"]), ("id", found["ins_holder_id"])]
    if event.ins is not None:
        keys.append(("ins", event.ins.value))
    return keys


def _touches(found, event: IdentityEvent, touched: set) -> bool:
    """Whether an earlier event of the batch wrote what this lookup read."""
    return any(k in touched for k in _keys(found, event) if k[1] is not None)


def _apply_upsert(conn, event, found, violations, policy, kw) -> ApplyResult:
    raw_id = found["raw_id"]
    if raw_id is not None and found["merged_into"] is not None:
        survivor = _follow(conn, raw_id, found["merged_into"])
        if survivor != raw_id:
            note = "identifier merged into another identity: event not applied"
            _history(conn, raw_id, event, "ignored_merged", note=note, **kw)
            return ApplyResult(survivor, "ignored_merged", violations, False, note)
    u = _upsert(conn, event, raw_id, violations, policy, **kw, looked_up=found)
    _history(conn, u.identity_id, event, u.action, change=u.change, note=u.note, **kw)
    return ApplyResult(u.identity_id, u.action, u.violations, u.ins_taken, u.note)


def _apply_other(conn, event, violations, policy, kw) -> ApplyResult:
    """A deletion (A23/A29), a merge (A40) or an identifier change (A47), statement by statement."""
    now = kw["now"]
    if event.kind == "delete":
        raw_id = _raw_id(conn, event.ipp)
        if raw_id is None:
            return ApplyResult(None, "not_found", violations, False, "unknown identifier")
        row = _row(conn, raw_id)
        if _is_older(event, row["last_event_time"]):
            note = "event older than the current state: not applied"
            _history(conn, raw_id, event, "ignored_older", note=note, **kw)
            return ApplyResult(raw_id, "ignored_older", violations, False, note)
        change = {"active": [row["active"], False]} if row["active"] else {}
        upd: dict[str, Any] = dict(active=False, updated_at=now)
        if event.event_time is not None:
            upd["last_event_time"] = max(event.event_time, row["last_event_time"] or event.event_time)
        _update_identity(conn, raw_id, upd)
        note = "" if row["active"] else "already inactive"
        _history(conn, raw_id, event, "deactivated", change=change, note=note, **kw)
        return ApplyResult(raw_id, "deactivated", violations, False, note)

    if event.kind == "merge":
        return _apply_merge(conn, event, violations, policy, **kw)
    if event.kind == "change_id":
        return _apply_change_id(conn, event, violations, policy, **kw)
    return ApplyResult(None, "passthrough")


def _apply_merge(conn, event, violations, policy, *, message_id, now) -> ApplyResult:
    kw = dict(message_id=message_id, now=now)
    old = event.merge_from
    if (old.value, old.authority) == (event.ipp.value, event.ipp.authority):
        v = Violation("MRG-1", "MERGE-SAME", "MRG-1 names the surviving identifier", "E", "207")
        return ApplyResult(None, "rejected", violations + [v], False, v.text)
    merged_id = _raw_id(conn, old)
    survivor_raw = _raw_id(conn, event.ipp)
    if survivor_raw is not None and merged_id is not None and _follow(conn, survivor_raw) == merged_id:
        v = Violation("MRG-1", "MERGE-CYCLE",
                      "the surviving identity was itself merged into the MRG-1 one", "E", "207")
        _history(conn, merged_id, event, "rejected", note=v.text, **kw)
        return ApplyResult(merged_id, "rejected", violations + [v], False, v.text)
    if merged_id is not None:
        _release_ins(conn, merged_id)  # one INS per person: the survivor may take it
    if survivor_raw is not None and _follow(conn, survivor_raw) != survivor_raw:
        survivor_raw = _follow(conn, survivor_raw)
    u = _upsert(conn, event, survivor_raw, violations, policy, **kw)
    survivor = u.identity_id
    notes = [u.note] if u.note else []
    if merged_id is None:
        stub = _insert_identity(conn, dict(
            ipp=old.value, ipp_authority=old.authority, ipp_finess=old.finess or None, active=False,
            merged_into=survivor, last_event_time=event.event_time, created_at=now,
            updated_at=now))
        conn.execute(_INSERT_IDENTIFIER, {"identity_id": stub, "value": old.value,
                                          "authority": old.authority, "type": "PI"})
        _history(conn, stub, event, "merged", change={"merged_into": [None, survivor]},
                 note="identifier unknown before the merge: kept as an alias", **kw)
        merged_id = stub
    else:
        mrow = _row(conn, merged_id)
        _update_identity(conn, merged_id, dict(active=False, merged_into=survivor, updated_at=now))
        _history(conn, merged_id, event, "merged",
                 change={"merged_into": [mrow["merged_into"], survivor],
                         "active": [mrow["active"], False]},
                 note="folded into the surviving identity", **kw)
    change = dict(u.change, absorbed=[None, merged_id])
    if u.action == "ignored_older":
        notes.append("traits not updated (older event); merge applied")
    _history(conn, survivor, event, "merged", change=change, note="; ".join(notes), **kw)
    return ApplyResult(survivor, "merged", u.violations, u.ins_taken, "; ".join(notes))


def _apply_change_id(conn, event, violations, policy, *, message_id, now) -> ApplyResult:
    kw = dict(message_id=message_id, now=now)
    old, new = event.old_ipp, event.ipp
    old_id = _raw_id(conn, old)
    new_id = _raw_id(conn, new)
    if old_id is None:
        u = _upsert(conn, event, new_id, violations, policy, **kw)
        note = "; ".join(x for x in ("previous identifier unknown", u.note) if x)
        _history(conn, u.identity_id, event, u.action, change=u.change, note=note, **kw)
        return ApplyResult(u.identity_id, u.action, u.violations, u.ins_taken, note)
    if new_id is not None and new_id != old_id:
        v = Violation("PID-3", "A47-TARGET-IN-USE",
                      "the new identifier already belongs to another identity (use A40 to merge)",
                      "E", "205")
        _history(conn, old_id, event, "rejected", note=v.text, **kw)
        return ApplyResult(old_id, "rejected", violations + [v], False, v.text)
    row = _row(conn, old_id)
    if _is_older(event, row["last_event_time"]):
        note = "event older than the current state: not applied"
        _history(conn, old_id, event, "ignored_older", note=note, **kw)
        return ApplyResult(old_id, "ignored_older", violations, False, note)
    conn.execute(_CHANGE_IPP, {"of_identity": old_id, "old_value": old.value,
                               "old_authority": old.authority, "new_value": new.value,
                               "new_authority": new.authority})
    _update_identity(conn, old_id, dict(ipp=new.value, ipp_authority=new.authority))
    u = _upsert(conn, event, old_id, violations, policy, **kw)
    change = dict(u.change)
    if (row["ipp"], row["ipp_authority"]) != (new.value, new.authority):
        change["ipp"] = [row["ipp"], new.value]
        if row["ipp_authority"] != new.authority:
            change["ipp_authority"] = [row["ipp_authority"], new.authority]
    _history(conn, old_id, event, "id_changed", change=change, note=u.note, **kw)
    return ApplyResult(old_id, "id_changed", u.violations, u.ins_taken, u.note)


def find_identity(conn: Connection, *, ipp: str | None = None, ipp_authority: str | None = None,
                  ins: str | None = None, ins_oid: str | None = None) -> IdentityView | None:
    """The current identity for an IPP (optionally with its authority) or an INS, following
    merges. Raises :class:`AmbiguousIdentity` when an IPP without authority names several."""
    if ipp:
        rows = conn.execute(ipp_lookup_stmt(ipp, ipp_authority)).all()
    elif ins:
        rows = conn.execute(ins_lookup_stmt(ins, ins_oid)).all()
    else:
        raise ValueError("find_identity needs ipp or ins")
    ids = {_follow(conn, r.identity_id) for r in rows}
    if not ids:
        return None
    if len(ids) > 1:
        raise AmbiguousIdentity(f"{len(ids)} identities match; give the assigning authority")
    return _view(conn, ids.pop())


def _view(conn: Connection, identity_id: int) -> IdentityView:
    row = _row(conn, identity_id)
    # Identities folded into this one (transitively), for a complete audit trail.
    merged_from: list[int] = []
    frontier = [identity_id]
    for _ in range(MAX_MERGE_HOPS):
        if not frontier:
            break
        kids = conn.execute(sa.select(identities.c.id).where(
            identities.c.merged_into.in_(frontier))).scalars().all()
        kids = [k for k in kids if k not in merged_from and k != identity_id]
        merged_from += kids
        frontier = kids
    ii = identity_identifiers
    idents = conn.execute(sa.select(ii.c.value, ii.c.authority, ii.c.type, ii.c.identity_id)
                          .where(ii.c.identity_id.in_([identity_id] + merged_from))
                          .order_by(ii.c.id)).all()
    h = identity_history
    hist = conn.execute(sa.select(h).where(h.c.identity_id.in_([identity_id] + merged_from))
                        .order_by(h.c.id)).mappings().all()
    return IdentityView(
        id=row["id"], ipp=row["ipp"], ipp_authority=row["ipp_authority"],
        ipp_finess=row["ipp_finess"], ins_value=row["ins_value"], ins_oid=row["ins_oid"],
        ins_kind=row["ins_kind"], ins_rejected_reason=row["ins_rejected_reason"],
        birth_name=row["birth_name"], first_given_name=row["first_given_name"],
        given_names=(row["given_names"] or "").split(" ") if row["given_names"] else [],
        used_name=row["used_name"], used_given_name=row["used_given_name"],
        birth_date=row["birth_date"], birth_date_raw=row["birth_date_raw"], sex=row["sex"],
        birth_place_cog=row["birth_place_cog"], status_code=row["status_code"],
        status_raw=row["status_raw"].split("~") if row["status_raw"] else [],
        consent=row["consent"], obtained_via=row["obtained_via"],
        insi_query_date=row["insi_query_date"], active=bool(row["active"]),
        merged_into=row["merged_into"], last_event_time=row["last_event_time"],
        identifiers=[{"value": r.value, "authority": r.authority, "type": r.type,
                      "identity_id": r.identity_id} for r in idents],
        history=[{"identity_id": r["identity_id"], "at": _iso(r["at"]),
                  "event_time": _iso(r["event_time"]), "trigger": r["trigger"],
                  "control_id": r["control_id"], "message_id": r["message_id"],
                  "action": r["action"], "change": r["change"], "note": r["note"]}
                 for r in hist],
        merged_from=merged_from,
    )


def make_identity_lookup(store):
    """``lookup(ipp, authority=None, *, ins=None) -> dict | None`` (``IdentityView.to_json()``):
    registry reads for code outside the writer (transforms, report steps), one read each."""

    def lookup(ipp=None, authority=None, *, ins=None):
        def q(conn):
            if ins:
                view = find_identity(conn, ins=ins)
            else:
                view = find_identity(conn, ipp=ipp, ipp_authority=authority)
            return view.to_json() if view is not None else None

        return store.read(q)

    return lookup
