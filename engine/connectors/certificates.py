"""Every certificate routes.yaml names (channel server certificates, destination client
certificates, DMP and MSSanté identities, CA bundles, the alert mail's client certificate), by
its place in the file, with the days left before it expires: what ``certificate_expiry`` reads.
IGC-Santé certificates are renewed by a planned procedure, so the alert must come early."""
from __future__ import annotations

import datetime as dt
import time

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


def _end(path: str, password_env: str | None) -> dt.datetime | None:
    if path.lower().endswith(PKCS12_SUFFIXES):
        try:
            return load_identity(path, None, password_from_env(password_env)).certificate.not_valid_after_utc
        except (IdentityError, OSError, ValueError):
            return None
    return not_after(path)


class CertificateDays:
    """Days left per configured certificate, files read at most every :data:`CACHE_S`. Run off
    the reactor (it reads files)."""

    def __init__(self):
        self._cache: dict[str, tuple[float, dt.datetime | None]] = {}

    def days_left(self, config, now: dt.datetime | None = None) -> dict[str, float]:
        now = now or dt.datetime.now(dt.timezone.utc)
        out = {}
        for label, (path, password_env) in configured(config).items():
            hit = self._cache.get(path)
            if hit is None or time.monotonic() - hit[0] >= CACHE_S:
                hit = self._cache[path] = (time.monotonic(), _end(path, password_env))
            if hit[1] is not None:
                out[label] = (hit[1] - now).total_seconds() / 86400
        return out
