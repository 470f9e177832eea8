"""Every certificate routes.yaml names (channel server certificates, destination client
certificates, DMP and MSSanté identities, CA bundles, the console's and the alert mail's
certificates), by its place in the file, with its expiry date: one list for ``/metrics``, the
console and the ``certificate_expiry`` alert. IGC-Santé certificates are renewed by a planned
procedure, so their dates must be visible early."""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

from pydantic import BaseModel

from engine.connectors.https import IdentityError, load_identity, password_from_env
from mllp.tls import not_after

CERT_FIELDS = ("cert", "client_cert", "ca", "ca_file")
PKCS12_SUFFIXES = (".p12", ".pfx")
CACHE_S = 300.0  # a file is read again at most this often (a renewal shows up within it)


def configured(config) -> dict[str, tuple[str, str | None]]:
    """``{"destinations.dmp.tls.cert": (path, password_env)}`` for every certificate field set."""
    out: dict[str, tuple[str, str | None]] = {}

    def walk(obj, where: str) -> None:
        if isinstance(obj, BaseModel):
            for fname, finfo in type(obj).model_fields.items():
                value = getattr(obj, fname)
                label = f"{where}.{finfo.alias or fname}" if where else (finfo.alias or fname)
                if fname in CERT_FIELDS and isinstance(value, str) and value:
                    out[label] = (value, getattr(obj, "password_env", None))
                else:
                    walk(value, label)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{where}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{where}[{i}]")

    walk(config, "")
    return out


@dataclass(frozen=True)
class Expiry:
    """One configured certificate: its place in routes.yaml, who it belongs to (``kind``:
    channel, destination, console, notifier...; ``name``), its ``role`` there (``cert``, ``ca``
    for a TLS block, else the path below the owner, e.g. ``signing.cert``) and its end date."""
    place: str
    kind: str
    name: str
    role: str
    not_after: dt.datetime


def _owner(place: str) -> tuple[str, str, str]:
    parts = place.split(".")
    if parts[0] in ("channels", "destinations") and len(parts) > 2:
        kind, name, rest = parts[0][:-1], parts[1], parts[2:]
    elif parts[0] == "engine" and len(parts) > 2:
        kind = name = parts[1]
        rest = parts[2:]
    elif parts[0] == "alerts" and len(parts) > 3:
        kind, name, rest = "notifier", parts[2], parts[3:]
    else:
        kind = name = parts[0]
        rest = parts[1:]
    role = ".".join(rest)
    return kind, name, role[4:] if role.startswith("tls.") else role


def _end(path: str, password_env: str | None) -> dt.datetime | None:
    if path.lower().endswith(PKCS12_SUFFIXES):
        try:
            return load_identity(path, None, password_from_env(password_env)).certificate.not_valid_after_utc
        except (IdentityError, OSError, ValueError):
            return None
    return not_after(path)


class ConfiguredCertificates:
    """The expiry of every configured certificate, each file read at most every
    :data:`CACHE_S`. Run off the reactor (it reads files)."""

    def __init__(self):
        self._cache: dict[str, tuple[float, dt.datetime | None]] = {}

    def expiries(self, config) -> list[Expiry]:
        out = []
        for place, (path, password_env) in configured(config).items():
            hit = self._cache.get(path)
            if hit is None or time.monotonic() - hit[0] >= CACHE_S:
                hit = self._cache[path] = (time.monotonic(), _end(path, password_env))
            if hit[1] is not None:
                out.append(Expiry(place, *_owner(place), hit[1]))
        return out

    def days_left(self, config, now: dt.datetime | None = None) -> dict[str, float]:
        """``{place: days}`` (negative: expired), what the ``certificate_expiry`` alert reads."""
        now = now or dt.datetime.now(dt.timezone.utc)
        return {e.place: (e.not_after - now).total_seconds() / 86400 for e in self.expiries(config)}
