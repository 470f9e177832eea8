"""DMP connector: a report's document into the patient's DMP (Mon Espace Santé) by IHE XDS.b
ITI-41 (Provide and Register Document Set-b), its deletion by ITI-57 (Update Document Set),
with a signed VIHF, over mutual TLS, deferred.

What it sends comes from the canonical submission the report channel stored (CI-SIS ORU^R01 /
MDM^T02/T10/T04 as received, or the CI-SIS message the PACS step built around its CDA R2 N1):
the raw HL7 is never parsed again here, and the CDA bytes travel unchanged (MTOM attachment).
The request is built by :mod:`engine.xds` (pure: metadata, VIHF, envelope, MTOM), in a thread
since it signs; it is posted with :class:`engine.connectors.https.HttpsClient`. zeep is not used
here: it cannot send MTOM (python-zeep issues #599, #674) and posts through requests/httpx, not
Twisted; the answer (a RegistryResponse or a SOAP fault) is read by :mod:`engine.xds.response`.

Who gets an entry (``targets``): a report whose DESTDMP flag is Y and whose patient has a
qualified INS (an INS OID in PID-3 and a qualified PID-32, see ``QUALIFIED_STATUSES``): CI-SIS "Transmission de documents CDA
en HL7 v2", meta-dmp-mss.md (DESTDMP) and the INS rules (only a qualified INS identifies the
patient's DMP). Anything else gets no DMP entry at all.

Outcomes (the answer is kept in the entry's ``response``):

=========================================== ===========================================
answer                                      outcome
=========================================== ===========================================
RegistryResponse ``Success``                accepted (ZAM^Z01 Y)
RegistryResponse ``Failure`` / ``Partial``  content error, not retried (ZAM^Z01 N with
                                            the first error code)
SOAP fault ``Sender`` (or with a DMP code)  content error (ZAM^Z01 N)
SOAP fault ``Receiver`` without a code,     transient: retried with backoff (HTTP
HTTP 5xx, no answer, TLS or connection      ``Retry-After`` honoured)
failure
HTTP 4xx that is not a SOAP fault           content error
=========================================== ===========================================

Nothing of the patient in ``detail``: codes and technical reasons only (the DMP's error texts,
which may quote the request, go to the ZAM and the stored response, never to logs or /status).
"""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field
from twisted.internet import defer, threads

from engine import logs
from engine.config import ConfigPath, DestinationBase, Duration, _Model
from engine.connectors.base import (
    ACCEPTED, ERROR, TRANSIENT, BusinessAck, Delivery, ErrorInfo, Outcome, StoredView,
)
from engine.connectors.https import (
    HttpsClient, HttpsFailure, IdentityError, load_ca, load_identity, password_from_env, validity_problem,
)
from engine.xds import envelope, response as xds_response
from engine.xds.settings import DmpRequestSettings, VihfSettings, XdsSettings
from engine.xds.signing import SigningIdentity

#: INS OIDs (NIR, NIA, and the test and demonstration NIRs the report channel accepts outside
#: production): IHE PAM France / "Référentiel INS"
INS_OIDS = ("1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.9", "1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.11")


class InvalidRequest(ValueError):
    """The built request fails the XDS XSDs (``validate_requests: true``)."""


class KeyFiles(_Model):
    """A certificate and its private key: ``cert`` a PEM certificate (its chain after it) with
    ``key`` a PEM key, or ``cert`` a PKCS#12 bundle (``.p12``/``.pfx``) holding both; relative
    paths are relative to the routes file. The password, if any, comes from the environment
    variable named by ``password_env``."""

    cert: Annotated[ConfigPath, Field(min_length=1)]
    key: ConfigPath | None = None
    password_env: str | None = None


class DmpTLSConfig(KeyFiles):
    """Mutual TLS: our authentication certificate and the CA bundle of the DMP's chain."""

    ca: Annotated[ConfigPath, Field(min_length=1)]


class DmpDestinationConfig(DestinationBase):
    type: Literal["dmp"]
    #: the DMP requirement SC.DMP/ALI/PROG.02: a report waits before it is sent, so that a
    #: correction or a deletion made meanwhile replaces it (10 minutes unless configured)
    hold: Duration = 600.0
    hold_required_in_production: ClassVar[bool] = True
    tls: DmpTLSConfig
    signing: KeyFiles            # the organisation's signing ("cachet") certificate for the VIHF
    vihf: VihfSettings
    xds: XdsSettings
    connect_timeout: Duration = 10.0
    timeout: Duration = 60.0     # the whole exchange: connection, request, answer
    validate_requests: bool = False  # check each request against the XDS XSDs before sending


def _identity(files: KeyFiles) -> SigningIdentity:
    return load_identity(files.cert, files.key, password_from_env(files.password_env))


def check_files(cfg: DmpDestinationConfig) -> list[tuple[str, str]]:
    """What ``minipfi check`` and ``run`` refuse: certificate files missing or unreadable, a key
    not matching its certificate, a certificate expired or not yet valid. (path, message)."""
    problems: list[tuple[str, str]] = []
    for where, files in (("tls", cfg.tls), ("signing", cfg.signing)):
        try:
            ident = _identity(files)
        except IdentityError as exc:
            problems.append((f"{where}.cert", str(exc)))
            continue
        bad = validity_problem(ident.certificate)
        if bad:
            problems.append((f"{where}.cert", f"certificate {bad}"))
    try:
        for cert in load_ca(cfg.tls.ca):
            bad = validity_problem(cert)
            if bad:
                problems.append(("tls.ca", f"a CA certificate is {bad}"))
    except IdentityError as exc:
        problems.append(("tls.ca", str(exc)))
    return problems


#: PID-32 statuses with which the INS may identify the patient's DMP: QUAL (identité qualifiée)
#: and VALI, as the identity feed counts it by default (``vali_counts_as_qualified``: the ANS
#: IHE PAM France 2.11 and CI-SIS examples send VALI with the INS)
QUALIFIED_STATUSES = ("QUAL", "VALI")


def ins_is_qualified(stored: StoredView) -> bool:
    """An INS OID and value in PID-3 and a qualified PID-32 (for a PACS report, the message the
    PACS step built writes the registry status that allowed the INS into PID-32)."""
    sub = stored.submission
    ins = getattr(sub, "ins", None)
    if ins is None or ins.oid not in INS_OIDS or not ins.value:
        return False
    return (getattr(sub, "identity_reliability", None) or "").upper() in QUALIFIED_STATUSES


def dmp_targets(cfg, stored: StoredView) -> tuple[str, ...]:
    """One entry when the report goes to the DMP (DESTDMP=Y, qualified INS), none otherwise."""
    sub = stored.submission
    if sub is None or stored.kind not in ("cisis", "pacs") or not sub.ok:
        return ()
    if not sub.recipients.dmp or not ins_is_qualified(stored) or not sub.documents:
        return ()
    return ("",)


class DmpConnector:
    kind = "dmp"
    needs_stored = True

    def __init__(self, cfg: DmpDestinationConfig, reactor):
        self.cfg = cfg
        self.reactor = reactor
        self.timeout = float(cfg.connect_timeout) + float(cfg.timeout)
        self.signer = _identity(cfg.signing)
        tls = _identity(cfg.tls)
        self.client = HttpsClient(reactor, identity=tls, ca=load_ca(cfg.tls.ca),
                                  connect_timeout=float(cfg.connect_timeout), timeout=float(cfg.timeout))

    # -- building (in a thread: signing and serialising cost milliseconds) -------------------
    def build(self, delivery: Delivery, now: dt.datetime | None = None) -> "envelope.Request":
        sub = delivery.stored.submission
        now = now or dt.datetime.now(dt.timezone.utc)
        settings = DmpRequestSettings(vihf=self.cfg.vihf, xds=self.cfg.xds)
        if delivery.action == "delete":
            request = envelope.build_iti57_delete(sub, settings, self.signer, now=now)
        else:
            request = envelope.build_iti41(sub, settings, self.signer, now=now)
        if self.cfg.validate_requests:
            problems = envelope.validate_request(request)
            if problems:
                raise InvalidRequest(f"{len(problems)} XDS schema problem(s), first: {problems[0][:200]}")
        return request

    @defer.inlineCallbacks
    def send(self, delivery: Delivery):
        if delivery.stored.submission is None:
            return Outcome(ERROR, None, "no canonical submission stored with the message")
        try:
            request = yield threads.deferToThread(self.build, delivery)
        except Exception as exc:  # noqa: BLE001 - a request we cannot build will not build later
            return Outcome(ERROR, None, f"request not built: {logs.error_text(exc)}")
        url = request.to
        started = time.monotonic()
        try:
            answer = yield self.client.post(url, request.body, {
                "Content-Type": request.content_type,
                "SOAPAction": f'"{request.action}"',
            })
        except HttpsFailure as exc:
            return Outcome(TRANSIENT, None, str(exc))
        outcome = classify(answer.code, answer.headers, answer.body)
        logs.get("engine.connectors.dmp").debug(
            "dmp.answer", entry_id=delivery.entry_id, http_status=answer.code, kind=outcome.kind,
            elapsed_ms=round((time.monotonic() - started) * 1000, 1))
        return outcome

    def close(self):
        return self.client.close()


def _retry_after(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def classify(code: int, headers: dict[str, str], body: bytes) -> Outcome:
    """Map an HTTP answer of the DMP to an Outcome (module docstring's table)."""
    content_type = headers.get("content-type", "")
    try:
        result = xds_response.read_response(body, content_type)
    except xds_response.ResponseError as exc:
        if code >= 500:
            return Outcome(TRANSIENT, body, f"HTTP {code}", retry_after=_retry_after(headers))
        if code >= 400:
            return Outcome(ERROR, body, f"HTTP {code}, no SOAP answer")
        return Outcome(TRANSIENT, body, f"HTTP {code}, unreadable answer ({type(exc).__name__})")
    fault = result.fault
    if fault is not None:
        if fault.dmp_code or fault.code == "Sender":
            code_text = fault.dmp_code or (fault.subcodes[-1] if fault.subcodes else fault.code)
            label = fault.dmp_label or fault.reason
            return Outcome(ERROR, body, f"SOAP fault {logs.safe(code_text, 64)}",
                           error=ErrorInfo(code_text, "DMP_ERROR_CODE"),
                           business_acks=(BusinessAck("Z01", False, ErrorInfo(code_text, "DMP_ERROR_CODE", label)),))
        return Outcome(TRANSIENT, body, f"SOAP fault {logs.safe(fault.code, 64)} (HTTP {code})",
                       retry_after=_retry_after(headers))
    if code >= 500:
        return Outcome(TRANSIENT, body, f"HTTP {code}", retry_after=_retry_after(headers))
    if result.success:
        return Outcome(ACCEPTED, body, "Success", business_acks=(BusinessAck("Z01", True),))
    errors = [e for e in result.errors if e.severity != "Warning"] or list(result.errors)
    first = errors[0] if errors else None
    codes = ",".join(logs.safe(e.error_code, 64) for e in errors) or "no error code"
    error = ErrorInfo(first.error_code if first else "XDSRegistryError", "DMP_ERROR_CODE")
    label = first.code_context if first else ""
    return Outcome(ERROR, body, f"{result.status or 'Failure'}: {codes}", error=error,
                   business_acks=(BusinessAck("Z01", False, ErrorInfo(error.code, error.system, label)),))
