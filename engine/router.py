"""Routing decided at ingest, from MSH only.

    router = Router(config)
    rejection = channel_accepts(config.channel("mllp-in"), msh)   # None or (code, text, location)
    targets = router.targets("mllp-in", msh)                        # tuple[RouteTarget, ...]

``targets`` returns one :class:`RouteTarget` per destination reached: every route whose ``from``
is the channel and whose filter matches, in route order, each route's ``to`` list in order.

**Dedupe by destination, first route wins.** When two matching routes reach the same
destination, only the target of the first route (in file order) is kept. Reasons: the store holds
one queue entry per (message, destination) and a destination must never receive the same message
twice (the receiver would see a duplicate MSH-10); ordering is per destination, so two entries for
one message would race each other; and "first match wins" is the rule integrators expect from a
routing table. A later route can still reach *other* destinations for the same message. Disabled
destinations (``enabled: false``) are still targeted: their entries wait in the queue until the
destination is enabled again (dropping them would lose messages silently).

The result is cached per (channel, MSH-9.1, MSH-9.2, MSH-3, MSH-4, MSH-5, MSH-12.1, MSH-21): a cache hit
is one tuple construction plus one dict lookup, and returns the identical tuple. The cache is
bounded (:data:`CACHE_SIZE` entries, cleared when full). A Router is built from one immutable
Config; a reload builds a new Router.

``stop: true`` on a route: when it matches, the channel's later routes are not tried (first
match wins from there; earlier matching routes keep their destinations). ``not:`` inside a filter
takes the same keys; a message matching every key given there is excluded from the route.

Filter semantics (``RouteFilter``): message_types are fnmatch patterns on ``CODE^TRIGGER``
(``"*"``, ``"ADT^*"``, ``"ADT^A0?"``); sending/receiving applications and sending facilities
match either the first component (namespace id) or the whole raw field; versions match MSH-12.1
exactly; profiles match MSH-21 (any repetition, whole, or its first or second component, e.g.
``CISIS_TLR_HL7_V2`` in ``1.0^CISIS_TLR_HL7_V2``; ``""`` matches an empty MSH-21); an empty list
matches anything.

``msh`` is an :class:`engine.hl7.msh.MSHInfo` (or any object with the same attributes: raw
``sending_app``, ``sending_facility``, ``receiving_app``, ``message_code``, ``trigger``,
``version``, ``processing_id`` and optionally ``encoding_chars`` and ``profile`` (MSH-21 raw;
missing = empty)).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

from engine.config import Config, Route

__all__ = ["CACHE_SIZE", "Rejection", "RouteTarget", "Router", "channel_accepts", "message_type_matches",
           "profile_matches"]

CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class RouteTarget:
    route: str
    destination: str
    transforms_json: str          # JSON list of the route's transform specs, keys sorted
    ordering: str                 # "destination" | "key" | "document" | "none"
    ordering_key: str | None      # field path when ordering == "key"
    hold: float = 0.0             # seconds before the first attempt (deferred destination)


# Architecture notes call it RouteMatch.
RouteMatch = RouteTarget


class Rejection(NamedTuple):
    """HL7Error-like: ERR-3 code (table 0357), plain English text, ERR-2 location."""

    code: str
    text: str
    location: str | None


def message_type_matches(patterns: list[str], code: str, trigger: str) -> bool:
    """fnmatch of ``CODE^TRIGGER`` against the patterns (``"*"`` matches everything)."""
    mt = f"{code}^{trigger}"
    for p in patterns:
        if p == "*" or fnmatchcase(mt, p):
            return True
    return False


def _comp_sep(msh: Any) -> str:
    enc = getattr(msh, "encoding_chars", None) or "^"
    return enc[0]


def _matches_app(allowed: list[str], raw: str, sep: str) -> bool:
    if not allowed:
        return True
    if raw in allowed:
        return True
    first = raw.split(sep, 1)[0]
    return first in allowed


def profile_matches(allowed: list[str], raw: str, comp_sep: str = "^", rep_sep: str = "~") -> bool:
    """True when ``allowed`` is empty, or when any repetition of the raw MSH-21 value, whole or by
    its first or second component (blanks stripped), is in ``allowed``; ``""`` in ``allowed``
    matches an empty MSH-21."""
    if not allowed:
        return True
    raw = (raw or "").strip()
    if not raw:
        return "" in allowed
    for rep in raw.split(rep_sep):
        comps = [c.strip() for c in rep.split(comp_sep)]
        whole = comp_sep.join(comps)
        if whole and whole in allowed:
            return True
        if comps[0] and comps[0] in allowed:
            return True
        if len(comps) > 1 and comps[1] and comps[1] in allowed:
            return True
    return False


def channel_accepts(channel_cfg: Any, msh: Any) -> Rejection | None:
    """None if the channel accepts this message, else ``Rejection(code, text, location)``.

    Checks, in order: message type (200 if the code is not accepted at all, 201 if the code is
    accepted but not this trigger), version (203, MSH-12), processing id (202, MSH-11).
    Texts name only MSH values (never patient data).
    """
    accept = channel_cfg.accept
    code = msh.message_code or ""
    trigger = msh.trigger or ""
    if not message_type_matches(accept.message_types, code, trigger):
        code_known = any(p == "*" or fnmatchcase(code, p.split("^", 1)[0]) for p in accept.message_types)
        if code_known:
            return Rejection("201", f"Unsupported event code {trigger or '(empty)'} for message type {code}", "MSH^1^9^1^2")
        return Rejection("200", f"Unsupported message type {code or '(empty)'}", "MSH^1^9^1^1")
    version = (msh.version or "").split(_comp_sep(msh), 1)[0]
    if version not in accept.versions:
        return Rejection("203", f"Unsupported version id {version or '(empty)'}", "MSH^1^12")
    pid = (msh.processing_id or "").split(_comp_sep(msh), 1)[0]
    if pid not in accept.processing_ids:
        return Rejection("202", f"Unsupported processing id {pid or '(empty)'}", "MSH^1^11")
    return None


class _CompiledRoute:
    __slots__ = ("route", "filter", "targets")

    def __init__(self, route: Route, config: Config):
        self.route = route
        self.filter = route.filter
        tj = json.dumps(route.transforms, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        targets = []
        for dest_name in route.to:
            dest = config.destinations.get(dest_name)
            queue = getattr(dest, "queue", None)
            ordering = queue.ordering if queue is not None else "destination"
            key = queue.ordering_key if queue is not None and ordering == "key" else None
            hold = float(getattr(dest, "hold", 0.0) or 0.0)
            targets.append(RouteTarget(route.name, dest_name, tj, ordering, key, hold))
        self.targets = tuple(targets)

    def matches(self, msh: Any, sep: str) -> bool:
        f = self.filter
        if not _filter_matches(f, msh, sep):
            return False
        return f.exclude is None or not _filter_matches(f.exclude, msh, sep)


def _filter_matches(f: Any, msh: Any, sep: str) -> bool:
    """Every key of a filter (or of its ``not:``) matches; an empty list matches anything."""
    if f.message_types and not message_type_matches(f.message_types, msh.message_code or "",
                                                    msh.trigger or ""):
        return False
    if f.versions and (msh.version or "").split(sep, 1)[0] not in f.versions:
        return False
    if not _matches_app(f.sending_applications, msh.sending_app or "", sep):
        return False
    if not _matches_app(f.sending_facilities, msh.sending_facility or "", sep):
        return False
    if not _matches_app(f.receiving_applications, msh.receiving_app or "", sep):
        return False
    if f.profiles:
        enc = getattr(msh, "encoding_chars", None) or "^~"
        rep = enc[1] if len(enc) > 1 else "~"
        if not profile_matches(f.profiles, getattr(msh, "profile", "") or "", sep, rep):
            return False
    return True


class Router:
    """Routes a message to its targets from its MSH; see the module docstring."""

    def __init__(self, config: Config, cache_size: int = CACHE_SIZE):
        self.config = config
        self._cache_size = cache_size
        self._cache: dict[tuple, tuple[RouteTarget, ...]] = {}
        self._by_channel: dict[str, tuple[_CompiledRoute, ...]] = {}
        for route in config.routes:
            self._by_channel.setdefault(route.source, ())
            self._by_channel[route.source] += (_CompiledRoute(route, config),)

    def targets(self, channel: str, msh: Any) -> tuple[RouteTarget, ...]:
        key = (channel, msh.message_code, msh.trigger, msh.sending_app, msh.sending_facility,
               msh.receiving_app, msh.version, getattr(msh, "profile", None))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        result = self._compute(channel, msh)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[key] = result
        return result

    destinations_for = targets  # name used in docs/architecture.md

    def _compute(self, channel: str, msh: Any) -> tuple[RouteTarget, ...]:
        sep = _comp_sep(msh)
        out: list[RouteTarget] = []
        seen: set[str] = set()
        for cr in self._by_channel.get(channel, ()):
            if not cr.matches(msh, sep):
                continue
            for t in cr.targets:
                if t.destination not in seen:
                    seen.add(t.destination)
                    out.append(t)
            if cr.route.stop:
                break
        return tuple(out)

    # Also reachable as a method: router.channel_accepts(channel_cfg, msh).
    channel_accepts = staticmethod(channel_accepts)

    def accepts(self, channel: str, msh: Any) -> Rejection | None:
        """:func:`channel_accepts` for the channel named ``channel``."""
        return channel_accepts(self.config.channel(channel), msh)

    def cache_info(self) -> dict[str, int]:
        return {"size": len(self._cache), "max": self._cache_size}
