"""``routes.yaml``: pydantic v2 models and a loader whose errors name the YAML path and line.

    cfg = load_config("routes.yaml")          # or load_config_text(text, source="routes.yaml")
    cfg.channel("mllp-in").port

Every model forbids unknown keys, so a typo is an error, not a silently ignored setting. All
problems found are reported at once in a :class:`ConfigError`::

    routes.yaml:23: destinations.ris.queue.max_attempts: Input should be a valid integer

How lines are found: the YAML is *composed* (node tree) with PyYAML's ``SafeLoader``; every
mapping key and sequence item is recorded as ``path tuple -> line``. Pydantic's error ``loc``
tuples are then mapped onto those paths (skipping the discriminator tags pydantic inserts for
tagged unions). A missing key is reported at the line of the mapping that should hold it.

Validation has two phases: the pydantic schema, then (only when the schema passed) the
cross-reference checks: route ``from`` names a channel, every ``to`` names a destination, route
names are unique, no two channels bind the same address and port, transform specs are valid
(type registered, parameters valid), ``ordering: key`` has an ``ordering_key``.

Adding a destination type: its connector module defines a model deriving from
:class:`DestinationBase` with ``type: Literal["newtype"]``, and the connector registry
(``engine.connectors.registry``, called from the wiring module ``engine.wiring``) registers it
here with :func:`register_destination_type`: this module knows no connector. Channel types are
a tagged union too (``CHANNEL_TYPES``).

Durations are stored as float seconds, sizes as int bytes (see :mod:`engine.durations`). TLS
paths are kept as written (relative paths are resolved by the caller). ``store_url`` is kept as
written; the ``MINIPFI_DB_URL`` override is applied by the caller.

Pure: imports pydantic and PyYAML only. What it cannot know by itself is given to it by the
wiring module (``engine.wiring``): the destination types of the connectors
(:func:`register_destination_type`), the validator of transform specs
(:func:`set_transform_validator`) and the check of report rule ids (:func:`set_rule_checker`).
"""
from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import math
import random
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.durations import parse_duration, parse_size
from engine.hl7.fields import parse_path

__all__ = [
    "AcceptConfig",
    "AckConfig",
    "AlertsConfig",
    "ChannelConfig",
    "ClientTLSConfig",
    "Config",
    "ConfigError",
    "DestinationConfig",
    "DuplicatesConfig",
    "EncodingConfig",
    "EngineConfig",
    "FramingConfig",
    "DestinationBase",
    "MLLPChannelConfig",
    "Problem",
    "QueueConfig",
    "RetryPolicy",
    "Route",
    "RouteFilter",
    "ServerTLSConfig",
    "StatusConfig",
    "ValidationConfig",
    "config_fingerprint",
    "destination_types",
    "register_destination_type",
    "set_rule_checker",
    "set_transform_validator",
    "is_loopback",
    "load_config",
    "load_config_text",
]

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One configuration problem. ``path`` like ``destinations.ris.queue.max_attempts`` or
    ``routes[2].to[0]``; ``line`` is 1-based (None when unknown)."""

    path: str
    line: int | None
    message: str


class ConfigError(Exception):
    """The configuration is invalid. ``problems`` lists every problem found; ``str()`` gives one
    ``source:line: path: message`` per line."""

    def __init__(self, problems: list[Problem], source: str = "routes.yaml"):
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = []
        for p in self.problems:
            where = self.source if p.line is None else f"{self.source}:{p.line}"
            lines.append(f"{where}: {p.path}: {p.message}" if p.path else f"{where}: {p.message}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds (float). Accepts numbers or "500ms", "10s", "5m", "2h", "7d"."""

Size = Annotated[int, BeforeValidator(parse_size)]
"""Bytes (int). Accepts ints or "512KB", "20MB"."""

NAME_RE = r"^[a-z0-9][a-z0-9_-]*$"
Name = Annotated[str, Field(pattern=NAME_RE, max_length=64)]
"""Channel and destination names: lowercase letters, digits, '_' and '-'."""

SEGMENT_RE = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_MESSAGE_TYPE_RE = re.compile(r"^(\*|[A-Z0-9*?]{1,3}(\^[A-Z0-9*?_]{1,7})?)$")

Port = Annotated[int, Field(ge=0, le=65535)]  # 0 = ephemeral (tests)
RemotePort = Annotated[int, Field(ge=1, le=65535)]


def _check_field_path(value: str) -> str:
    parse_path(value)  # the one field-path syntax; ValueError "invalid field path ...: expected ..."
    return value


FieldPath = Annotated[str, BeforeValidator(lambda v: _check_field_path(v) if isinstance(v, str) else v)]


def _version_str(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(
            f"HL7 version {value!r} must be a quoted string, e.g. \"2.5\" "
            "(unquoted, YAML reads it as a number)"
        )
    return value


VersionStr = Annotated[str, BeforeValidator(_version_str), Field(min_length=1)]


def _message_type_pattern(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if not _MESSAGE_TYPE_RE.match(value):
        raise ValueError(
            f"invalid message type pattern {value!r}: expected '*', 'CODE', 'CODE^*' or "
            "'CODE^TRIGGER' (e.g. 'ADT^A01', 'ADT^*')"
        )
    if "^" not in value and value != "*":
        value = value + "^*"  # "ADT" means every ADT event
    return value


MessageTypePattern = Annotated[str, BeforeValidator(_message_type_pattern)]


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    """A relative file path is relative to the routes file (``base_dir`` of the validation
    context, given by :func:`load_config`), not to the directory the engine was started from."""
    base = (info.context or {}).get("base_dir")
    if base is None or not isinstance(value, str) or not value:
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else Path(base) / p)


#: a file named in routes.yaml (certificates, keys, CA bundles): resolved against the file's folder
ConfigPath = Annotated[str, AfterValidator(_resolve_path)]

DEFAULT_VERSIONS = ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8"]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------------------------
# engine
# --------------------------------------------------------------------------------------------


class StatusConfig(_Model):
    bind: str = "127.0.0.1"
    port: Port = 8575
    token_env: str | None = "MINIPFI_STATUS_TOKEN"

    @field_validator("token_env")
    @classmethod
    def _token_when_exposed(cls, v: str | None, info: ValidationInfo) -> str | None:
        bind = info.data.get("bind", "127.0.0.1")
        if not v and not is_loopback(bind):
            raise ValueError(
                f"status bind {bind!r} is not a loopback address: token_env is required "
                "(name of the environment variable holding the bearer token)"
            )
        return v


class ConsoleTLSConfig(_Model):
    cert: ConfigPath
    key: ConfigPath


class ConsoleThrottleConfig(_Model):
    """Failed logins per user name and per client address: after ``max_failures`` within
    ``window`` (``max_failures_per_address`` for an address, which several users may share behind
    a proxy or an SSH tunnel), each further failure locks that name (or address) out for
    ``base_delay``, doubled at each failure up to ``max_delay``."""

    max_failures: Annotated[int, Field(ge=1)] = 5
    max_failures_per_address: Annotated[int, Field(ge=1)] = 20
    window: Duration = 900.0
    base_delay: Duration = 30.0
    max_delay: Duration = 900.0


class ConsoleConfig(_Model):
    """The web console for hospital IT (``engine.console``); users: ``minipfi users add``."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: Port = 8576
    tls: ConsoleTLSConfig | None = None
    session_idle_timeout: Duration = 900.0
    session_max_age: Duration = 8 * 3600.0
    login_throttle: ConsoleThrottleConfig = ConsoleThrottleConfig()

    @model_validator(mode="after")
    def _tls_when_exposed(self):
        if self.enabled and self.tls is None and not is_loopback(self.bind):
            raise ValueError(f"console bind {self.bind!r} is not a loopback address: tls (cert, key) is required")
        return self


class DuplicatesConfig(_Model):
    window: Duration = 7 * 86400.0
    on_conflict: Literal["reject", "accept"] = "reject"


class RetentionLimits(_Model):
    """How long a channel's data is kept (None: for ever). See docs/export.md, "Retention"."""

    messages: Duration | None = None     # the message row and all that hangs on it
    payloads: Duration | None = None     # raw bytes, sent payloads, responses, submission content
    deliveries: Duration | None = None   # final queue entries and events (delivery history)


class RetentionConfig(RetentionLimits):
    """``engine.retention``: the default limits of every channel, and how pruning runs."""

    interval: Duration = 600.0
    batch: int = Field(500, ge=1, le=10000)
    archive_dir: ConfigPath | None = None   # compressed archive of what a run deletes
    identities: Duration | None = None      # identity registry rows no kept message names


SYSLOG_PORTS = {"udp": 514, "tcp": 601, "tls": 6514}  # RFC 5426, RFC 6587 (IANA), RFC 5425


class AuditSyslogConfig(_Model):
    """Where audit rows go as RFC 5424 syslog messages (IHE ATNA: DICOM PS3.15 A.5 audit message
    XML). TLS (RFC 5425) is verified against ``ca_file``; ``cert``/``key`` for mutual TLS."""

    host: str
    port: RemotePort | None = None  # default by transport: 514 udp, 601 tcp, 6514 tls
    transport: Literal["udp", "tcp", "tls"] = "udp"
    ca_file: ConfigPath | None = None
    cert: ConfigPath | None = None
    key: ConfigPath | None = None

    @model_validator(mode="after")
    def _tls_files(self) -> "AuditSyslogConfig":
        if self.transport == "tls" and not self.ca_file:
            raise ValueError("transport tls needs ca_file (the CA the collector's certificate is checked against)")
        if self.transport != "tls" and (self.ca_file or self.cert or self.key):
            raise ValueError("ca_file, cert and key are for transport tls only")
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key must be given together")
        return self

    @property
    def resolved_port(self) -> int:
        return self.port or SYSLOG_PORTS[self.transport]


class AuditConfig(_Model):
    syslog: AuditSyslogConfig | None = None  # no export when absent (the store keeps every row)


class EngineConfig(_Model):
    name: str = "mini-pfi"
    environment: Literal["test", "production"] = "test"
    store_url: str | None = None
    status: StatusConfig = StatusConfig()
    console: ConsoleConfig = ConsoleConfig()
    duplicates: DuplicatesConfig = DuplicatesConfig()
    audit: AuditConfig = AuditConfig()
    on_store_unavailable: Literal["nak", "close"] = "nak"
    shutdown_grace: Duration = 10.0
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    #: folder of CDA validation resources (CDA XSD, CI-SIS schematrons, value sets) with the layout
    #: of the ANS release, e.g. a newer official one; relative to the routes file; None: packaged
    cda_resources: str | None = None
    retention: RetentionConfig = RetentionConfig()


# --------------------------------------------------------------------------------------------
# channels
# --------------------------------------------------------------------------------------------


class ServerTLSConfig(_Model):
    cert: ConfigPath
    key: ConfigPath
    ca: ConfigPath | None = None
    require_client_cert: bool = False

    @field_validator("require_client_cert")
    @classmethod
    def _ca_for_client_certs(cls, v: bool, info: ValidationInfo) -> bool:
        if v and not info.data.get("ca"):
            raise ValueError("require_client_cert: true requires ca (the CA bundle client certificates are checked against)")
        return v


class AckConfig(_Model):
    mode: Literal["auto", "mllp_commit"] = "auto"
    after: Literal["commit"] = "commit"


class FramingConfig(_Model):
    max_frame_size: Size = 20 * 1024 * 1024
    lenient_end_block: bool = False
    idle_timeout: Duration = 600.0
    frame_timeout: Duration = 30.0
    max_connections: Annotated[int, Field(ge=1)] = 200
    max_connections_per_peer: Annotated[int, Field(ge=1)] = 16  # per peer address


class EncodingConfig(_Model):
    default: str = "UNICODE UTF-8"
    cp1252_fallback: bool = True


class AcceptConfig(_Model):
    message_types: list[MessageTypePattern] = Field(default_factory=lambda: ["*"], min_length=1)
    versions: list[VersionStr] = Field(default_factory=lambda: list(DEFAULT_VERSIONS), min_length=1)
    processing_ids: list[Literal["P", "T", "D"]] = Field(default_factory=lambda: ["P", "T", "D"], min_length=1)


class ValidationConfig(_Model):
    hl7apy: bool = False
    on_error: Literal["warn", "reject"] = "warn"


class IdentityFeedConfig(_Model):
    """IHE PAM France identity feed on a channel: ADTs update the identity registry in
    the same transaction as the message, and the ACK reports the INS rules they break."""

    enabled: bool = False
    message_types: list[MessageTypePattern] = Field(default_factory=lambda: ["ADT^*"], min_length=1)
    # None: follow engine.environment (test accepts the test/demo INS OIDs .10/.11, production not)
    allow_test_ins: bool | None = None
    vali_counts_as_qualified: bool = True  # ANS PAM FR 2.11 examples send VALI with an INS
    rule11_answer: Literal["warning", "error"] = "error"  # REF-INS rule 11: 00 as birth day/month
    # INS with an unqualified identity (PID-32 PROV/RECUP/..., DOUT/FICT): AE (error) or AA + W;
    # the INS is not taken either way (Référentiel INS, [EXI SI 08]: INS with a qualified identity only)
    unqualified_ins_answer: Literal["warning", "error"] = "error"
    route_rejected: bool = False  # an ADT answered AE is stored; route it onward anyway?


class CdaValidationConfig(_Model):
    """Official CDA validation of the documents a report message carries: the CDA XSD
    before the ACK (about 1 ms per document), the CI-SIS schematrons (about 200 ms per document)
    before the ACK only when failures are rejected, else after it, the result attached to the
    stored submission."""

    xsd: bool = True
    schematron: bool = False
    # None: the rules ``cda.xsd`` (reject) and ``cda.schematron`` (warn) keep their defaults;
    # warn / reject sets both (a block's ``rules`` still wins)
    on_failure: Literal["warn", "reject"] | None = None


def _rule_severity(value: Any) -> Any:
    """YAML 1.1 reads a bare ``off`` as false: take it as the severity ``off``."""
    return "off" if value is False else value


#: ``rules:`` of a report block: rule id (``minipfi inspect --rules``) -> severity
RuleOverrides = dict[str, Annotated[Literal["reject", "warn", "off"], BeforeValidator(_rule_severity)]]


class ReportsConfig(_Model):
    """CI-SIS "Transmission de documents CDA en HL7 v2" report messages (ORU^R01, MDM^T02/T04/T10
    with MSH-21 naming the profile): parsed and checked before the ACK (AE + ERR 207 with the
    guide's 900-906 code in ERR-5), the canonical submission stored with the message."""

    enabled: bool = False
    message_types: list[MessageTypePattern] = Field(
        default_factory=lambda: ["ORU^R01", "MDM^T02", "MDM^T04", "MDM^T10"], min_length=1)
    profile: str = "CISIS_CDA_HL7_V2"
    strict_mss_matrix: bool = False
    validation: CdaValidationConfig = CdaValidationConfig()
    route_rejected: bool = False
    rules: RuleOverrides = Field(default_factory=dict)


_transform_validator: Callable[[Any], list] | None = None


def set_transform_validator(fn: Callable[[Any], list]) -> None:
    """Given by the wiring module: ``fn(specs) -> [problem]`` (each with ``path`` and
    ``message``), the transform registry's check of a route's ``transforms:`` list."""
    global _transform_validator
    _transform_validator = fn


def validate_transform_specs(specs: Any) -> list:
    if _transform_validator is None:
        raise RuntimeError("transform specs cannot be checked: import engine.wiring first")
    return _transform_validator(specs)


_rule_checker: Callable[[str, str, str], str | None] | None = None


def set_rule_checker(fn: Callable[[str, str, str], str | None]) -> None:
    """Given by the wiring module: ``fn(block, rule_id, severity) -> problem or None``, the report
    rule catalogue's check of a block's ``rules:`` (unknown ids, rules that cannot be relaxed)."""
    global _rule_checker
    _rule_checker = fn


class TeleradiologyConfig(_Model):
    """CI-SIS "Volet Téléradiologie" flows (ORM^O01 NW/CA, ORU^R01 OK/OC, OMI^O23 SR with MSH-21
    naming the profile) checked before the ACK (``engine.reports.teleradiology.check_tlr``): a flow
    that breaks the guide gets AE with one ERR per finding (ERR-2 location, ERR-3 table 0357 code)."""

    enabled: bool = False
    message_types: list[MessageTypePattern] = Field(
        default_factory=lambda: ["ORM^O01", "OMI^O23", "ORU^R01"], min_length=1)
    profile: Annotated[str, Field(min_length=1)] = "CISIS_TLR_HL7_V2"
    route_rejected: bool = False
    rules: RuleOverrides = Field(default_factory=dict)


class PacsReportsConfig(_Model):
    """Report messages from a PACS (ORU^R01 with a PDF in OBX ED, or TX/FT text) wrapped into a
    CDA R2 N1 "compte rendu d'imagerie" at reception; the destinations of such a message receive
    the CI-SIS ORU^R01 carrying that CDA (transform ``wrapped_report``)."""

    enabled: bool = False
    message_types: list[MessageTypePattern] = Field(default_factory=lambda: ["ORU^R01"], min_length=1)
    sending_applications: list[str] = Field(default_factory=list)  # MSH-3 of the PACS; [] = any
    cda_wrap: dict[str, Any] = Field(default_factory=dict)  # parameters of the cda_wrap transform
    validation: CdaValidationConfig = CdaValidationConfig()
    route_rejected: bool = False
    rules: RuleOverrides = Field(default_factory=dict)

    @field_validator("cda_wrap")
    @classmethod
    def _cda_wrap_params(cls, v):
        problems = validate_transform_specs([{"type": "cda_wrap", **v}])
        if problems:
            raise ValueError("; ".join(f"{p.path.removeprefix('[0]').lstrip('.') or 'cda_wrap'}: {p.message}"
                                       for p in problems))
        return v


class MLLPChannelConfig(_Model):
    type: Literal["mllp"]
    bind: str = "127.0.0.1"
    port: Port
    tls: ServerTLSConfig | None = None
    ack: AckConfig = AckConfig()
    framing: FramingConfig = FramingConfig()
    encoding: EncodingConfig = EncodingConfig()
    accept: AcceptConfig = AcceptConfig()
    validation: ValidationConfig = ValidationConfig()
    identity_feed: IdentityFeedConfig = IdentityFeedConfig()
    reports: ReportsConfig = ReportsConfig()
    pacs_reports: PacsReportsConfig = PacsReportsConfig()
    teleradiology: TeleradiologyConfig = TeleradiologyConfig()
    retention: RetentionLimits | None = None


CHANNEL_TYPES: tuple[type[_Model], ...] = (MLLPChannelConfig,)
ChannelConfig = Annotated[Union[CHANNEL_TYPES], Field(discriminator="type")]  # type: ignore[valid-type]


# --------------------------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------------------------


def _check_profiles(value: Any) -> Any:
    if isinstance(value, list):
        for v in value:
            if isinstance(v, str) and ("~" in v or "|" in v):
                raise ValueError(
                    f"invalid message profile {v!r}: give one MSH-21 repetition, its first component or its "
                    "identifier (e.g. 'CISIS_TLR_HL7_V2'); '~' and '|' are not allowed"
                )
    return value


class _FilterKeys(_Model):
    message_types: list[MessageTypePattern] = Field(default_factory=lambda: ["*"], min_length=1)
    sending_applications: list[str] = Field(default_factory=list)
    sending_facilities: list[str] = Field(default_factory=list)
    receiving_applications: list[str] = Field(default_factory=list)
    versions: list[VersionStr] = Field(default_factory=list)
    profiles: Annotated[list[str], BeforeValidator(_check_profiles)] = Field(default_factory=list)


class ExclusionFilter(_FilterKeys):
    """``not:`` of a route filter, with the same keys: a message is excluded when it matches
    every key given here (an empty list, or a key left out, says nothing)."""

    message_types: list[MessageTypePattern] = Field(default_factory=list)

    @model_validator(mode="after")
    def _says_something(self) -> "ExclusionFilter":
        if not any(getattr(self, k) for k in type(self).model_fields):
            raise ValueError("not: give at least one key (message_types, sending_applications, ...)")
        return self


class RouteFilter(_FilterKeys):
    """Empty lists match anything. Applications/facilities match MSH-3/4/5 first component
    (namespace id) or the whole field.

    ``profiles`` (MSH-21, message profile identifier, type EI, repeating): the route matches when
    any MSH-21 repetition, taken whole (``"1.0^CISIS_TLR_HL7_V2"``), or its first component, or its
    second component is in the list. The French CI-SIS guides put the profile *version* in the first
    component and its *name* in the second (``2.1^CISIS_CDA_HL7_V2``, ``1.0^CISIS_TLR_HL7_V2``), so
    list the name: ``profiles: [CISIS_TLR_HL7_V2]``. Blanks around components are ignored. The
    empty string ``""`` in the list matches a message with an empty MSH-21 (no profile declared).

    ``not`` (an :class:`ExclusionFilter`, same keys): the route does not match a message that
    matches it, e.g. ``message_types: ["ADT^*"]`` with ``not: {message_types: ["ADT^A08"]}``.
    """

    exclude: ExclusionFilter | None = Field(default=None, alias="not")


class Route(_Model):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    source: str = Field(alias="from")
    filter: RouteFilter = RouteFilter()
    transforms: list[dict[str, Any]] = Field(default_factory=list)
    to: list[str] = Field(min_length=1)
    # The destination (an MLLP one) that carries the business acknowledgements of this route's
    # deliveries back to the creator of the report: ZAM^Z01 after the DMP's answer, ZAM^Z02/Z03
    # after MSSanté receipts, when the report asked for them (CI-SIS "Transmission de documents
    # CDA en HL7 v2", profils-messages.md « Structure des messages accusés métier HL7 »).
    business_acks: str | None = None
    # true: when this route matches, the routes after it (same channel) are not tried: first
    # match wins from here on (earlier matching routes still deliver)
    stop: bool = False


# --------------------------------------------------------------------------------------------
# destinations
# --------------------------------------------------------------------------------------------


class ClientTLSConfig(_Model):
    cert: ConfigPath | None = None
    key: ConfigPath | None = None
    ca: ConfigPath | None = None
    verify_hostname: bool = True

    @model_validator(mode="after")
    def _cert_and_key(self) -> "ClientTLSConfig":
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key must be given together (client certificate)")
        return self


class RetryPolicy(_Model):
    initial_delay: Duration = 1.0
    max_delay: Duration = 300.0
    multiplier: Annotated[float, Field(ge=1.0)] = 2.0
    jitter: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2

    @model_validator(mode="after")
    def _order(self) -> "RetryPolicy":
        if self.max_delay < self.initial_delay:
            raise ValueError("max_delay must be greater than or equal to initial_delay")
        return self

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before the next try after ``attempt`` failed attempts (1 = first).

        ``initial_delay * multiplier ** (attempt - 1)``, capped at ``max_delay``, then multiplied
        by a uniform factor in ``[1 - jitter, 1 + jitter]`` and capped again (never above
        ``max_delay``, never negative).
        """
        n = max(attempt, 1) - 1
        base = self.initial_delay
        if base <= 0:
            return 0.0
        if n > 0 and self.multiplier > 1.0:
            # compare in log space so that huge attempt counts never overflow
            if n * math.log(self.multiplier) >= math.log(self.max_delay / base):
                base = self.max_delay
            else:
                base = min(base * self.multiplier**n, self.max_delay)
        if self.jitter:
            base *= 1.0 + rng.uniform(-self.jitter, self.jitter)
        return max(0.0, min(base, self.max_delay))


class QueueConfig(_Model):
    retry: RetryPolicy = RetryPolicy()
    max_attempts: Annotated[int, Field(ge=0)] = 20  # 0 = unlimited
    # The MLLP names of the two outcome policies of every connector (engine.connectors.base):
    # on_ae for a content error (AE/CE, a 4xx refusal, ...), on_ar for a refusal to retry later.
    on_ae: Literal["error", "retry"] = "error"
    on_ar: Literal["error", "retry"] = "retry"
    # destination: one FIFO; key: FIFO per ordering_key (e.g. PID-3.1); document: FIFO per
    # document (CDA setId chain; messages without a document share one FIFO); none: same as
    # destination for ordering, kept for compatibility. Entries of one document are delivered in
    # order whatever the mode: a document is one patient's, and its entries share the FIFO.
    ordering: Literal["destination", "key", "document", "none"] = "destination"
    ordering_key: FieldPath | None = None
    concurrency: Annotated[int, Field(ge=1, le=256)] = 1

    @property
    def on_content_error(self) -> str:
        return self.on_ae

    @property
    def on_refused(self) -> str:
        return self.on_ar


class DestinationBase(_Model):
    """What every destination has, whatever its connector: the queue and its policies.

    ``hold`` defers the first attempt of every entry (the DMP requirement SC.DMP/ALI/PROG.02: a
    report is not sent at validation time, so that a correction or a deletion made within the
    delay replaces it before anything left)."""

    enabled: bool = True
    hold: Duration = 0.0
    queue: QueueConfig = QueueConfig()


class _NoDestinationType(_Model):
    type: Literal["(no connector type registered)"]


_DESTINATION_TYPES: dict[str, type[_Model]] = {}


def register_destination_type(model: type[_Model]) -> None:
    """Add a destination ``type:`` (its pydantic model, with ``type: Literal["name"]``); called
    by the connector registry, so that config knows no connector. Rebuilds :class:`Config`."""
    (tag,) = typing.get_args(model.model_fields["type"].annotation)
    _DESTINATION_TYPES[tag] = model
    global DestinationConfig
    DestinationConfig = _destination_union()
    # the same class, its destinations field retyped: isinstance and imports keep working
    Config.model_fields["destinations"].annotation = dict[Name, DestinationConfig]
    Config.model_rebuild(force=True)


def destination_types() -> list[str]:
    return sorted(_DESTINATION_TYPES)


def _destination_union():
    members = tuple(_DESTINATION_TYPES.values()) or (_NoDestinationType,)
    return Annotated[Union[members], Field(discriminator="type")]  # type: ignore[valid-type]


DestinationConfig = _destination_union()



# --------------------------------------------------------------------------------------------
# alerts
# --------------------------------------------------------------------------------------------


def _loopback_url(url: str) -> bool:
    from urllib.parse import urlsplit

    return is_loopback(urlsplit(url).hostname or "")


class _NotifierBase(_Model):
    #: at most this many notices a minute through this notifier; the overflow is summarised
    max_per_minute: Annotated[int, Field(ge=1, le=1000)] = 10
    timeout: Duration = 10.0


class EmailNotifierConfig(_NotifierBase):
    """Alert mails over SMTP with STARTTLS (TLS 1.2+); the password only from the environment."""

    type: Literal["email"]
    host: Annotated[str, Field(min_length=1)]
    port: RemotePort = 587
    starttls: bool = True  # false only for a relay on loopback (tests)
    ca_file: ConfigPath | None = None
    client_cert: ConfigPath | None = None
    client_key: ConfigPath | None = None
    sender: Annotated[str, Field(min_length=3)] = Field(alias="from")
    to: list[Annotated[str, Field(min_length=3)]] = Field(min_length=1)
    user: str | None = None
    password_env: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> "EmailNotifierConfig":
        if not self.starttls and not is_loopback(self.host):
            raise ValueError(f"starttls: false is allowed only for a relay on loopback ({self.host!r} is not)")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("client_cert and client_key must be given together")
        if self.user and not self.password_env:
            raise ValueError("user requires password_env (the environment variable holding the password)")
        return self


class WebhookNotifierConfig(_NotifierBase):
    """Alert notices POSTed as JSON, with a bearer token from the environment."""

    type: Literal["webhook"]
    url: Annotated[str, Field(pattern=r"^https?://[^/\s]+")]
    token_env: str | None = None
    ca_file: ConfigPath | None = None

    @model_validator(mode="after")
    def _https_off_loopback(self) -> "WebhookNotifierConfig":
        if self.url.startswith("http://") and not _loopback_url(self.url):
            raise ValueError(f"url must be https:// off loopback (got {self.url!r})")
        return self


NotifierConfig = Annotated[Union[EmailNotifierConfig, WebhookNotifierConfig], Field(discriminator="type")]


class _AlertRuleBase(_Model):
    name: Name
    #: the condition must hold this long before the alert fires (flapping within it says nothing)
    for_: Duration = Field(default=0.0, alias="for")
    notify: list[str] = Field(min_length=1)


class DestinationDownRule(_AlertRuleBase):
    """A destination whose deliveries fail (peer unreachable, refused, in error) ``failures``
    times in a row."""

    kind: Literal["destination_down"]
    destinations: list[str] = Field(default_factory=list)  # [] = all
    failures: Annotated[int, Field(ge=1)] = 1


class QueueAgeRule(_AlertRuleBase):
    kind: Literal["queue_age"]
    older_than: Duration
    destinations: list[str] = Field(default_factory=list)


class QueueDepthRule(_AlertRuleBase):
    kind: Literal["queue_depth"]
    above: Annotated[int, Field(ge=0)]
    destinations: list[str] = Field(default_factory=list)


class ErrorRateRule(_AlertRuleBase):
    """Delivery errors (final errors and failed attempts) of a destination, or messages a
    channel rejected, within ``window``: more than ``above``."""

    kind: Literal["error_rate"]
    above: Annotated[int, Field(ge=0)]
    window: Duration = 300.0


class CertificateExpiryRule(_AlertRuleBase):
    """Every configured certificate; each threshold (days before the end of validity) its own alert."""

    kind: Literal["certificate_expiry"]
    days: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [60, 15], min_length=1)


class DiskSpaceRule(_AlertRuleBase):
    """Free space of the data directory below ``below_percent`` or ``below_bytes``."""

    kind: Literal["disk_space"]
    below_percent: Annotated[float, Field(gt=0, lt=100)] | None = None
    below_bytes: Size | None = None

    @model_validator(mode="after")
    def _one_threshold(self) -> "DiskSpaceRule":
        if (self.below_percent is None) == (self.below_bytes is None):
            raise ValueError("give one of below_percent or below_bytes")
        return self


class ReloadRefusedRule(_AlertRuleBase):
    """The last reload was refused (invalid routes file) or failed: the old configuration runs."""

    kind: Literal["reload_refused"]


AlertRuleConfig = Annotated[Union[DestinationDownRule, QueueAgeRule, QueueDepthRule, ErrorRateRule,
                                  CertificateExpiryRule, DiskSpaceRule, ReloadRefusedRule],
                            Field(discriminator="kind")]


class AlertsConfig(_Model):
    """``alerts:``: named notifiers and rules evaluated every ``check_every`` (engine.alerts)."""

    check_every: Duration = 5.0
    notify: dict[Name, NotifierConfig] = Field(default_factory=dict)
    rules: list[AlertRuleConfig] = Field(default_factory=list)


def _alert_problems(cfg: "Config", add) -> None:
    """Rule names unique, notifier and destination names known."""
    seen: dict[str, int] = {}
    for i, rule in enumerate(cfg.alerts.rules):
        if rule.name in seen:
            add(("alerts", "rules", i, "name"), f"duplicate rule name {rule.name!r} (first used by alerts.rules[{seen[rule.name]}])")
        seen.setdefault(rule.name, i)
        for j, n in enumerate(rule.notify):
            if n not in cfg.alerts.notify:
                add(("alerts", "rules", i, "notify", j), _unknown("notifier", n, cfg.alerts.notify))
        for j, d in enumerate(getattr(rule, "destinations", ())):
            if d not in cfg.destinations:
                add(("alerts", "rules", i, "destinations", j), _unknown("destination", d, cfg.destinations))


# --------------------------------------------------------------------------------------------
# root
# --------------------------------------------------------------------------------------------


class Config(_Model):
    engine: EngineConfig = EngineConfig()
    channels: dict[Name, ChannelConfig] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    destinations: dict[Name, DestinationConfig] = Field(default_factory=dict)
    alerts: AlertsConfig = AlertsConfig()

    def channel(self, name: str):
        """The channel named ``name`` (KeyError if none)."""
        return self.channels[name]

    def destination(self, name: str):
        """The destination named ``name`` (KeyError if none)."""
        return self.destinations[name]


def runtime_problems(config, environ=None) -> list[Problem]:
    """What ``run`` refuses although the file is valid: a status endpoint off loopback whose
    token variable is not set in the environment."""
    import os

    env = os.environ if environ is None else environ
    st = config.engine.status
    if not is_loopback(st.bind) and not (st.token_env and env.get(st.token_env)):
        return [Problem("engine.status.token_env", None,
                        f"status is bound to {st.bind}: set the bearer token in ${st.token_env}")]
    return []


def config_fingerprint(config) -> str:
    """SHA-256 hex digest of the canonical JSON of the validated configuration (defaults
    included, keys sorted): equal for two files that only differ by comments, layout or
    spelled-out defaults."""
    data = config.model_dump(mode="json", by_alias=True)
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading: YAML with lines
# --------------------------------------------------------------------------------------------

PathT = tuple[Union[str, int], ...]


class _Lines:
    """Line numbers of every mapping key and sequence item, by path tuple."""

    def __init__(self) -> None:
        self.lines: dict[PathT, int] = {(): 1}
        self.types: dict[PathT, str] = {}  # value of the 'type' (or 'kind') key of mappings, by mapping path
        self.duplicates: list[Problem] = []

    def walk(self, node: yaml.Node, path: PathT) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = key_node.value
                kpath = path + (key,)
                line = key_node.start_mark.line + 1
                if key in seen:
                    self.duplicates.append(Problem(_fmt_path(kpath), line, "duplicate key"))
                    continue
                seen.add(key)
                self.lines[kpath] = line
                if key in ("type", "kind") and isinstance(value_node, yaml.ScalarNode):  # union tags
                    self.types[path] = value_node.value
                self.walk(value_node, kpath)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                ipath = path + (i,)
                self.lines[ipath] = item.start_mark.line + 1
                self.walk(item, ipath)

    def line(self, path: PathT) -> int | None:
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)


def _fmt_path(path: PathT) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _compose(text: str, source: str) -> tuple[Any, _Lines]:
    lines = _Lines()
    try:
        # the reader checks the characters when it is created: a control character is a YAML error
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:
        raise ConfigError([Problem("", None, f"YAML error: {exc}")], source) from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        msg = "YAML syntax error: " + " ".join(x for x in (exc.context, exc.problem) if x)
        raise ConfigError([Problem("", mark.line + 1 if mark else None, msg)], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem("", None, f"YAML error: {exc}")], source) from None
    finally:
        loader.dispose()
    if node is not None:
        lines.walk(node, ())
    return data, lines


# --------------------------------------------------------------------------------------------
# Mapping pydantic errors to paths and lines
# --------------------------------------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _step_type(tp: Any, elem: Any) -> Any:
    """Type reached from ``tp`` following one pydantic loc element (None if unknown)."""
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [_unwrap(a) for a in typing.get_args(tp) if a is not type(None)]
        for m in members:
            if isinstance(m, type) and issubclass(m, BaseModel):
                t = m.model_fields.get("type")
                if t is not None and elem in typing.get_args(t.annotation):
                    return m  # discriminator tag
        if len(members) == 1:
            return _step_type(members[0], elem)
        return None
    if origin is dict:
        return typing.get_args(tp)[1]
    if origin is list:
        return typing.get_args(tp)[0]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        t = tp.model_fields.get("type")
        if t is not None and elem in typing.get_args(t.annotation):
            return tp  # discriminator tag of a one-member tagged union
        for fname, finfo in tp.model_fields.items():
            if elem == (finfo.alias or fname):
                return finfo.annotation
    return None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    tp: Any = Config
    for elem in loc:
        tp = _step_type(tp, elem)
        if tp is None:
            return None
    tp = _unwrap(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [_unwrap(a) for a in typing.get_args(tp) if a is not type(None)]
        tp = members[0] if len(members) == 1 else None
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _loc_to_path(loc: tuple, lines: _Lines) -> tuple[PathT, bool]:
    """Map a pydantic loc onto the YAML path. Returns (path, exists)."""
    cur: PathT = ()
    for i, elem in enumerate(loc):
        if elem == "[key]":
            continue
        cand = cur + (elem,)
        if cand in lines.lines:
            cur = cand
            continue
        if lines.types.get(cur) == elem:
            continue  # discriminator tag inserted by pydantic
        if i == len(loc) - 1 and isinstance(elem, str):
            return cand, False  # missing key
        # unknown element (union member name, ...): skip
    return cur, True


def _problem_from_error(err: dict, lines: _Lines) -> Problem:
    loc = tuple(err.get("loc", ()))
    etype = err.get("type", "")
    msg = err.get("msg", "invalid value")
    path, exists = _loc_to_path(loc, lines)
    if etype in ("union_tag_invalid", "union_tag_not_found"):
        ctx = err.get("ctx") or {}
        tag = str(ctx.get("discriminator", "'type'")).strip("'")  # type, or kind (alert rules)
        path = path + (tag,)
        if etype == "union_tag_not_found":
            msg = f"Field required (one of: {ctx.get('expected_tags', '')})"
        else:
            msg = f"unknown {tag} {ctx.get('tag')!r} (expected one of: {ctx.get('expected_tags', '')})"
    elif etype == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        model = _model_at(loc[:-1])
        msg = f"unknown key {key!r}"
        if model is not None:
            allowed = _allowed_keys(model)
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
            else:
                msg += f" (allowed: {', '.join(allowed)})"
    elif etype == "missing":
        msg = "Field required"
    elif etype == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif etype == "string_pattern_mismatch" and loc and loc[-1] == "[key]":
        msg = f"invalid name {loc[-2]!r}: use lowercase letters, digits, '_' and '-', starting with a letter or digit"
    if not exists:
        line = lines.line(path[:-1])
    else:
        line = lines.line(path)
    return Problem(_fmt_path(path), line, msg)


# --------------------------------------------------------------------------------------------
# Cross-reference checks
# --------------------------------------------------------------------------------------------


def _cross_checks(cfg: Config, lines: _Lines) -> list[Problem]:
    problems: list[Problem] = []

    def add(path: PathT, message: str) -> None:
        problems.append(Problem(_fmt_path(path), lines.line(path), message))

    # channels: unique bind address + port (port 0 = ephemeral, never conflicts)
    binds: dict[tuple[str, int], str] = {}
    for name, ch in cfg.channels.items():
        port = getattr(ch, "port", None)
        if port is None or port == 0:
            continue
        bind = getattr(ch, "bind", "")
        wildcard = bind in ("0.0.0.0", "::", "")
        for (obind, oport), oname in binds.items():
            owild = obind in ("0.0.0.0", "::", "")
            if oport == port and (obind == bind or wildcard or owild):
                add(("channels", name, "port"), f"channel {name!r} binds {bind}:{port}, already bound by channel {oname!r}")
                break
        else:
            binds[(bind, port)] = name
        if port == cfg.engine.status.port and (bind == cfg.engine.status.bind or wildcard):
            add(("channels", name, "port"), f"channel {name!r} binds {bind}:{port}, already used by engine.status")
        con = cfg.engine.console
        if con.enabled and port == con.port and (bind == con.bind or wildcard):
            add(("channels", name, "port"), f"channel {name!r} binds {bind}:{port}, already used by engine.console")

    con, st = cfg.engine.console, cfg.engine.status
    if con.enabled and con.port and con.port == st.port and (con.bind == st.bind or "0.0.0.0" in (con.bind, st.bind)):
        add(("engine", "console", "port"), f"engine.console binds {con.bind}:{con.port}, already used by engine.status")

    # report rules: every id must be in the catalogue, for the step of its block
    for name, ch in cfg.channels.items():
        for block in ("reports", "pacs_reports", "teleradiology"):
            rules = getattr(getattr(ch, block, None), "rules", None) or {}
            if rules and _rule_checker is None:
                raise RuntimeError("report rules cannot be checked: import engine.wiring first")
            for rule_id, level in rules.items():
                problem = _rule_checker(block, rule_id, level)
                if problem:
                    add(("channels", name, block, "rules", rule_id), problem)

    # routes
    seen_routes: dict[str, int] = {}
    for i, route in enumerate(cfg.routes):
        if route.name in seen_routes:
            add(("routes", i, "name"), f"duplicate route name {route.name!r} (first used by routes[{seen_routes[route.name]}])")
        else:
            seen_routes[route.name] = i
        if route.source not in cfg.channels:
            add(("routes", i, "from"), _unknown("channel", route.source, cfg.channels))
        for j, dest in enumerate(route.to):
            if dest not in cfg.destinations:
                add(("routes", i, "to", j), _unknown("destination", dest, cfg.destinations))
        if route.transforms:
            problems.extend(_transform_problems(route.transforms, ("routes", i, "transforms"), lines))
        if route.business_acks is not None:
            acks = cfg.destinations.get(route.business_acks)
            if acks is None:
                add(("routes", i, "business_acks"), _unknown("destination", route.business_acks, cfg.destinations))
            elif getattr(acks, "type", None) != "mllp":
                add(("routes", i, "business_acks"),
                    f"business_acks must name an mllp destination ({route.business_acks!r} is {acks.type!r}): "
                    "ZAM acknowledgements go back to the report's creator over MLLP")

    # destinations
    for name, dest in cfg.destinations.items():
        q = getattr(dest, "queue", None)
        if q is None:
            continue
        qpath: PathT = ("destinations", name, "queue")
        if q.ordering == "key" and not q.ordering_key:
            add(qpath + ("ordering",), "ordering: key requires ordering_key (a field path such as 'PID-3.1')")
        if q.ordering != "key" and q.ordering_key:
            add(qpath + ("ordering_key",), f"ordering_key is only used with ordering: key (ordering is {q.ordering!r})")
        if (cfg.engine.environment == "production" and getattr(type(dest), "hold_required_in_production", False)
                and not dest.hold):
            add(("destinations", name, "hold"), "hold: 0 is allowed only outside production (the DMP's "
                "deferred sending, SC.DMP/ALI/PROG.02: a report waits so that a correction or a "
                "deletion can replace it before it leaves)")
        if q.ordering == "destination" and q.concurrency > 1:
            add(qpath + ("concurrency",), "concurrency > 1 requires ordering: key or none (ordering: destination is one FIFO)")
    _alert_problems(cfg, add)
    return problems


def _unknown(kind: str, name: str, known: dict) -> str:
    msg = f"unknown {kind} {name!r}"
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if close:
        return msg + f" (did you mean {close[0]!r}?)"
    return msg + (f" (defined: {', '.join(known)})" if known else f" (no {kind}s defined)")


_SPEC_PATH_RE = re.compile(r"\[(\d+)\]|\.?([^.\[]+)")


def _transform_problems(specs: list[dict], base: PathT, lines: _Lines) -> list[Problem]:
    out = []
    for sp in validate_transform_specs(specs):
        rel: list[str | int] = []
        for m in _SPEC_PATH_RE.finditer(sp.path):
            rel.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
        path = base + tuple(rel)
        line = lines.line(path)
        out.append(Problem(_fmt_path(path), line, sp.message))
    return out


# --------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------


def load_config_text(text: str, source: str = "routes.yaml", base_dir: str | Path | None = None) -> Config:
    """Parse and validate ``text``; raise :class:`ConfigError` listing every problem. Relative
    file paths (:data:`ConfigPath`) resolve against ``base_dir`` when given."""
    data, lines = _compose(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("", 1, "the top level must be a mapping (engine, channels, routes, destinations)")], source)
    problems = list(lines.duplicates)
    try:
        cfg = Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems.extend(_problem_from_error(e, lines) for e in exc.errors())
        problems.sort(key=lambda p: (p.line or 0))
        raise ConfigError(problems, source) from None
    problems.extend(_cross_checks(cfg, lines))
    if problems:
        problems.sort(key=lambda p: (p.line or 0))
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate the YAML file at ``path``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem("", None, f"cannot read configuration: {exc.strerror or exc}")], str(p)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem("", None, f"configuration is not valid UTF-8: {exc.reason}")], str(p)) from None
    return load_config_text(text, source=str(p), base_dir=p.resolve().parent)
