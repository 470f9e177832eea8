"""Built-in transforms: ``set_field``, ``copy_field``, ``remove_segments``, ``filter``.

They work on the decoded message text (see :mod:`engine.transforms`) and only rewrite what they
change: values are read with :class:`engine.hl7.message.Message` and written with
:func:`engine.hl7.fields.set_field` (split on the message's own delimiters, read from MSH-1/MSH-2,
and join back), so every other character, including the segment separators (CR, LF or CRLF), is
kept as is.

Field paths are those of :func:`engine.hl7.fields.parse_path`: ``PID-3`` (whole field, every
repetition), ``PID-3[2].1``, ``PID-3.4.2``, ``OBX[2]-5`` (segment occurrence), MSH numbering as
in the standard (MSH-1 and MSH-2 cannot be set).

* ``set_field {field, value}`` - ``value`` is plain data, escaped with the HL7 escape rules
  (``| ^ ~ \\ &`` and CR/LF become escape sequences), so it can never add a field, component,
  repetition or segment. Missing repetitions/components are padded. If the target segment is
  absent the message is left unchanged and a note says so (no segment is ever appended).
* ``copy_field {from, to}`` - copies the raw (still escaped) value of one path into another;
  absent source or target segment: unchanged, with a note.
* ``remove_segments {segments: [ZBE, ...]}`` - drops every segment with those ids (never MSH).
* ``filter {field, in: [...]}`` - keeps the message only when the value, unescaped with the
  message codec (:func:`engine.hl7.escape.unescape`), is in the list (an absent field reads as
  ""); otherwise the message is filtered out for this destination (payload None).

Notes name paths and segment ids, never field values (patient data).
"""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.hl7.fields import parse_path, set_field
from engine.hl7.message import Message
from engine.transforms import TransformContext, TransformError, message_of, register

__all__ = ["set_field_transform", "copy_field_transform", "remove_segments_transform", "filter_transform"]

_SEG_RE = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_SPLIT_RE = re.compile(r"(\r\n|\r|\n)")


# ---------------------------------------------------------------------------------------------
# Helpers: read with engine.hl7.message, write with engine.hl7.fields.set_field
# ---------------------------------------------------------------------------------------------


def _seg_id(seg: str) -> str:
    return seg[1:4] if seg.startswith("\ufeff") else seg[:3]


def _write(m: Message, text: str, path: str, raw_value: str, notes: list[str], name: str) -> str:
    """Set the raw (escaped) value; an absent target segment leaves the message unchanged."""
    fp = parse_path(path)
    if m.segment(fp.segment, fp.occurrence) is None:
        # engine.hl7.fields.set_field would append the segment at the end of the message, where
        # it may be structurally wrong: a transform only edits segments that exist.
        notes.append(f"{name}: segment {fp.segment} absent, {path} not set")
        return text
    try:
        return set_field(text, path, raw_value)
    except ValueError as exc:
        raise TransformError(f"{name}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Parameter models
# ---------------------------------------------------------------------------------------------


def _valid_path(v: str) -> str:
    parse_path(v)  # engine.hl7.fields: ValueError with a readable message
    return v


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SetFieldParams(_Params):
    field: str
    value: str

    @field_validator("field")
    @classmethod
    def _check(cls, v: str) -> str:
        fp = parse_path(v)
        if fp.segment == "MSH" and fp.field in (1, 2):
            raise ValueError("MSH-1 and MSH-2 (delimiters) cannot be set")
        return v


class CopyFieldParams(_Params):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)
    from_: str = Field(alias="from")
    to: str

    @field_validator("from_")
    @classmethod
    def _check_from(cls, v: str) -> str:
        return _valid_path(v)

    @field_validator("to")
    @classmethod
    def _check_to(cls, v: str) -> str:
        fp = parse_path(v)
        if fp.segment == "MSH" and fp.field in (1, 2):
            raise ValueError("MSH-1 and MSH-2 (delimiters) cannot be set")
        return v


class RemoveSegmentsParams(_Params):
    segments: Annotated[list[str], Field(min_length=1)]

    @field_validator("segments")
    @classmethod
    def _check(cls, v: list[str]) -> list[str]:
        for s in v:
            if not _SEG_RE.match(s):
                raise ValueError(f"invalid segment id {s!r} (three characters, e.g. 'ZBE')")
            if s == "MSH":
                raise ValueError("MSH cannot be removed")
        return v


class FilterParams(_Params):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)
    field: str
    in_: Annotated[list[str], Field(alias="in", min_length=1)]

    @field_validator("field")
    @classmethod
    def _check_field(cls, v: str) -> str:
        return _valid_path(v)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------


@register("set_field", SetFieldParams)
def set_field_transform(text: str, params: SetFieldParams, ctx: TransformContext, notes: list[str]) -> str:
    m = message_of(text, ctx)
    return _write(m, text, params.field, m.delims.escape(params.value), notes, "set_field")


@register("copy_field", CopyFieldParams)
def copy_field_transform(text: str, params: CopyFieldParams, ctx: TransformContext, notes: list[str]) -> str:
    m = message_of(text, ctx)
    value = m.get(params.from_)
    if value is None:
        notes.append(f"copy_field: {params.from_} absent, {params.to} not set")
        return text
    return _write(m, text, params.to, value, notes, "copy_field")


@register("remove_segments", RemoveSegmentsParams)
def remove_segments_transform(
    text: str, params: RemoveSegmentsParams, ctx: TransformContext, notes: list[str]
) -> str:
    drop = set(params.segments)
    parts = _SPLIT_RE.split(text)
    kept: list[str] = []
    removed = 0
    for i in range(0, len(parts), 2):
        seg = parts[i]
        sep = parts[i + 1] if i + 1 < len(parts) else ""
        if _seg_id(seg) in drop and seg[:3] != "MSH":
            removed += 1
            continue
        kept.append(seg)
        kept.append(sep)
    if not removed:
        return text
    notes.append(f"remove_segments: {removed} segment(s) removed")
    return "".join(kept)


@register("filter", FilterParams)
def filter_transform(text: str, params: FilterParams, ctx: TransformContext, notes: list[str]) -> str | None:
    value = message_of(text, ctx).value(params.field) or ""
    if value in params.in_:
        return text
    return None
