"""Registry of named, pure message transforms, run at delivery time.

A route's ``transforms:`` list is a list of specs ``{type: <name>, **params}``. The router stores
it with each queue entry (JSON); delivery rebuilds the chain with :func:`build_chain` (or the
cached :func:`chain_from_json`) and calls it::

    chain = build_chain([{"type": "set_field", "field": "MSH-5", "value": "RIS"}])
    result = chain(raw, TransformContext(message_id=1, channel="mllp-in", destination="ris", codec="utf-8"))
    result.payload   # bytes to send, or None: filtered out for this destination
    result.notes     # short technical notes (no patient data)

Writing a transform::

    class MyParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        field: str

    @register("my_transform", MyParams)
    def my_transform(text: str, params: MyParams, ctx: TransformContext, notes: list[str]) -> str | None:
        ...   # return the new text, the same text (unchanged), or None to filter the message out

Text transforms (the default, ``operates_on="text"``) receive the message decoded with
``ctx.codec`` using ``surrogateescape``, so bytes invalid in that codec survive the round trip
unchanged; consecutive text transforms share one decode and one encode. ``operates_on="bytes"``
transforms receive and return ``bytes``.

Byte-exactness: when no transform changed anything (or the chain is empty) the chain returns
**the same bytes object** it was given. Transforms must never touch bytes they do not mean to
change (the basic ones split and re-join on delimiters, which is lossless).

Errors: a transform raises :class:`TransformError` (message without patient data) when it
cannot run (for instance a value that the message codec cannot encode).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Literal, NamedTuple

from pydantic import BaseModel, ValidationError

from engine.hl7.errors import HL7Error
from engine.hl7.message import Message

__all__ = [
    "Chain",
    "SpecProblem",
    "TransformContext",
    "TransformError",
    "TransformResult",
    "build_chain",
    "chain_from_json",
    "message_of",
    "register",
    "registered",
    "validate_specs",
]


class TransformError(Exception):
    """A transform could not be applied. The message must not contain patient data."""


@dataclass
class TransformContext:
    message_id: Any = None
    channel: str = ""
    destination: str = ""
    codec: str = "utf-8"          # Python codec of the message (from MSH-18)
    extras: dict[str, Any] = field(default_factory=dict)   # later: identity registry, ...


@dataclass
class TransformResult:
    payload: bytes | None          # None = filtered out for this destination
    notes: list[str] = field(default_factory=list)


class SpecProblem(NamedTuple):
    """A problem in a transform spec list. ``path`` is relative to the list: ``[1].field``."""

    path: str
    message: str


TransformFn = Callable[..., Any]


@dataclass(frozen=True)
class _Registered:
    name: str
    params_model: type[BaseModel]
    fn: TransformFn
    operates_on: Literal["text", "bytes"]


_REGISTRY: dict[str, _Registered] = {}


def register(name: str, params_model: type[BaseModel], *, operates_on: Literal["text", "bytes"] = "text"):
    """Decorator registering ``fn(data, params, ctx, notes) -> data | None`` under ``name``."""

    def deco(fn: TransformFn) -> TransformFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"transform {name!r} is already registered")
        _REGISTRY[name] = _Registered(name, params_model, fn, operates_on)
        return fn

    return deco


def registered() -> list[str]:
    """Names of the registered transforms, sorted."""
    return sorted(_REGISTRY)


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def validate_specs(specs: Any) -> list[SpecProblem]:
    """Check a list of transform specs; return the problems (empty list = valid)."""
    if not isinstance(specs, list):
        return [SpecProblem("", "transforms must be a list")]
    problems: list[SpecProblem] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            problems.append(SpecProblem(f"[{i}]", "a transform must be a mapping with a 'type' key"))
            continue
        name = spec.get("type")
        if name is None:
            problems.append(SpecProblem(f"[{i}].type", "Field required"))
            continue
        reg = _REGISTRY.get(name) if isinstance(name, str) else None
        if reg is None:
            problems.append(
                SpecProblem(f"[{i}].type", f"unknown transform type {name!r} (known: {', '.join(registered())})")
            )
            continue
        params = {k: v for k, v in spec.items() if k != "type"}
        try:
            reg.params_model.model_validate(params)
        except ValidationError as exc:
            for err in exc.errors():
                msg = err.get("msg", "invalid value")
                if err.get("type") == "extra_forbidden":
                    msg = f"unknown parameter for transform {name!r}"
                elif err.get("type") == "value_error":
                    msg = msg.removeprefix("Value error, ")
                problems.append(SpecProblem(f"[{i}]{_fmt_loc(tuple(err.get('loc', ())))}", msg))
    return problems


class Chain:
    """A validated, ready-to-run list of transforms. Callable: ``chain(raw, ctx)``."""

    __slots__ = ("steps",)

    def __init__(self, steps: list[tuple[_Registered, BaseModel]]):
        self.steps = tuple(steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __call__(self, raw: bytes, ctx: TransformContext) -> TransformResult:
        notes: list[str] = []
        if not self.steps:
            return TransformResult(raw, notes)
        codec = ctx.codec or "utf-8"
        data_bytes: bytes | None = raw   # current value when in bytes form
        text: str | None = None          # current value when in text form
        orig_text: str | None = None     # decoded text of data_bytes, to detect "no change"
        for reg, params in self.steps:
            if reg.operates_on == "text":
                if text is None:
                    text = _decode(data_bytes, codec)
                    orig_text = text
                out = reg.fn(text, params, ctx, notes)
                if out is None:
                    notes.append(f"filtered out by {reg.name}")
                    return TransformResult(None, notes)
                text = out
            else:
                if text is not None:
                    if text != orig_text:
                        data_bytes = _encode(text, codec, reg.name)
                    text = orig_text = None
                out = reg.fn(data_bytes, params, ctx, notes)
                if out is None:
                    notes.append(f"filtered out by {reg.name}")
                    return TransformResult(None, notes)
                data_bytes = out
        if text is not None and text != orig_text:
            data_bytes = _encode(text, codec, "chain")
        if data_bytes == raw:
            data_bytes = raw  # unchanged: hand back the very object received
        return TransformResult(data_bytes, notes)


def message_of(text: str, ctx: TransformContext, who: str = "") -> Message:
    """``text`` read with :class:`engine.hl7.message.Message` (escapes decoded with ``ctx.codec``).

    :class:`TransformError` (prefixed with ``who``) when there is no MSH or MSH-2 is incomplete."""
    prefix = f"{who}: " if who else ""
    try:
        m = Message(text, ctx.codec)
    except HL7Error:
        raise TransformError(f"{prefix}message does not start with an MSH segment") from None
    if len(m.segment("MSH").field(2)) < 4:
        raise TransformError(f"{prefix}MSH-2 (encoding characters) is incomplete")
    return m


def _decode(data: bytes, codec: str) -> str:
    try:
        return data.decode(codec, "surrogateescape")
    except LookupError:
        raise TransformError(f"unknown codec {codec!r}") from None


def _encode(text: str, codec: str, where: str) -> bytes:
    try:
        return text.encode(codec, "surrogateescape")
    except UnicodeEncodeError:
        raise TransformError(f"{where}: result contains characters that codec {codec!r} cannot encode") from None
    except LookupError:
        raise TransformError(f"unknown codec {codec!r}") from None


def build_chain(specs: list[dict]) -> Chain:
    """Build a :class:`Chain` from specs; raises ``ValueError`` if any spec is invalid."""
    problems = validate_specs(specs)
    if problems:
        raise ValueError("invalid transforms: " + "; ".join(f"{p.path}: {p.message}" for p in problems))
    steps = []
    for spec in specs:
        reg = _REGISTRY[spec["type"]]
        params = reg.params_model.model_validate({k: v for k, v in spec.items() if k != "type"})
        steps.append((reg, params))
    return Chain(steps)


@lru_cache(maxsize=1024)
def chain_from_json(transforms_json: str) -> Chain:
    """Cached :func:`build_chain` of a JSON list (``RouteTarget.transforms_json``)."""
    return build_chain(json.loads(transforms_json) if transforms_json else [])
