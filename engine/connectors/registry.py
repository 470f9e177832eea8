"""Connector types: each registers its routes.yaml model, its factory and, optionally, how one
message expands into several delivery targets of one destination.

    register(ConnectorType("mllp", MLLPDestinationConfig, MLLPConnector))
    connector = build(cfg, reactor)          # by cfg.type
    expand(cfg, stored_view)                 # ('',) unless the type fans out

Registration happens in one place, :mod:`engine.wiring`; this module knows no connector.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from engine.config import Problem, register_destination_type, runtime_problems
from engine.connectors.base import NO_STORED_VIEW, StoredView, TargetsFn
from mllp.tls import TLSFiles, file_problems

SINGLE_TARGET = ("",)


@dataclass(frozen=True)
class ConnectorType:
    name: str
    config_model: type
    factory: Callable[[Any, Any], Any]       # (destination cfg, reactor) -> Connector
    targets: TargetsFn | None = None         # (cfg, StoredView) -> target names; None: one
    #: what ``minipfi check`` and ``run`` refuse beyond the model: files that cannot be used
    #: (missing, unreadable, expired certificates): (cfg) -> [(path under the destination, message)]
    check: Callable[[Any], list[tuple[str, str]]] | None = None


_TYPES: dict[str, ConnectorType] = {}


def register(ct: ConnectorType) -> None:
    existing = _TYPES.get(ct.name)
    if existing is not None and existing != ct:
        raise ValueError(f"connector type {ct.name!r} is already registered")
    _TYPES[ct.name] = ct
    register_destination_type(ct.config_model)


def connector_type(name: str) -> ConnectorType:
    try:
        return _TYPES[name]
    except KeyError:
        raise KeyError(f"no connector registered for destination type {name!r}") from None


def registered() -> list[str]:
    return sorted(_TYPES)


class DisabledConnector:
    """Stands for a disabled destination: its worker claims nothing, so this never sends, and
    the files a real connector opens (a DMP's certificates not issued yet) are left alone, as
    ``problems`` leaves them unchecked. A reload that enables the destination builds the real one."""

    kind = "disabled"
    needs_stored = False

    def __init__(self, cfg):
        self.cfg = cfg

    def send(self, delivery):
        raise RuntimeError(f"destination type {self.cfg.type} is disabled")

    def close(self):
        return None


def build(cfg, reactor):
    """A new connector for the destination ``cfg`` (its ``type`` picks the factory)."""
    ct = connector_type(cfg.type)
    if ct.check is not None and not getattr(cfg, "enabled", True):
        return DisabledConnector(cfg)
    return ct.factory(cfg, reactor)


def expand(cfg, stored: StoredView = NO_STORED_VIEW) -> tuple[str, ...]:
    """The delivery targets of one message for the destination ``cfg``: ``('',)`` for a single
    delivery, several names for a fan-out, ``()`` when the message has nothing for it."""
    fn = connector_type(cfg.type).targets
    if fn is None:
        return SINGLE_TARGET
    return tuple(dict.fromkeys(fn(cfg, stored)))


def problems(config) -> list[Problem]:
    """What ``run`` and ``reload`` refuse beyond the model, and ``minipfi check`` reports: the
    file problems of every enabled destination whose type checks its files and of every
    channel's server TLS (certificates missing, unreadable, expired, key not matching), and a
    status endpoint off loopback without its token."""
    out = list(runtime_problems(config))
    for name, ch in config.channels.items():
        tls = getattr(ch, "tls", None)
        if tls is not None:
            out.extend(Problem(f"channels.{name}.tls.{field}", None, msg)
                       for field, msg in file_problems(TLSFiles(cert=tls.cert, key=tls.key, ca=tls.ca)))
    for name, cfg in config.destinations.items():
        fn = connector_type(cfg.type).check
        if fn is None or not getattr(cfg, "enabled", True):
            continue
        out.extend(Problem(f"destinations.{name}.{path}", None, msg) for path, msg in fn(cfg))
    return out


def fans_out(cfg) -> bool:
    return connector_type(cfg.type).targets is not None
