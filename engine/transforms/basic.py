"""Built-in transforms: ``set_field``, ``copy_field``, ``remove_segments``, ``filter``.

They work on the decoded message text (see :mod:`engine.transforms`) and only rewrite what they
change: field access is :mod:`engine.hl7.fields` (split on the message's own delimiters, read from
MSH-1/MSH-2, and join back), so every other character, including the segment separators (CR, LF
or CRLF), is kept as is.

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
* ``filter {field, in: [...]}`` - keeps the message only when the (unescaped) value is in the
  list (an absent field reads as ""); otherwise the message is filtered out for this destination
  (payload None).

Notes name paths and segment ids, never field values (patient data).
"""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.hl7.escape import escape, unescape
from engine.hl7.fields import FieldPath, get_field, parse_path, set_field, split_segments
from engine.transforms import TransformContext, TransformError, register

__all__ = ["set_field_transform", "copy_field_transform", "remove_segments_transform", "filter_transform"]

_SEG_RE = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_SPLIT_RE = re.compile(r"(\r\n|\r|\n)")


# ---------------------------------------------------------------------------------------------
# Field access (engine.hl7.fields) helpers
# ---------------------------------------------------------------------------------------------


def _delims(text: str) -> tuple[str, str]:
    start = 1 if text.startswith("\ufeff") else 0
    if text[start:start + 3] != "MSH" or len(text) < start + 8:
        raise TransformError("message does not start with an MSH segment")
    fs = text[start + 3]
    end = text.find(fs, start + 4)
    enc = text[start + 4:end] if end > 0 else ""
    if len(enc) < 4:
        raise TransformError("MSH-2 (encoding characters) is incomplete")
    return fs, enc


def _has_segment(text: str, fp: FieldPath, fs: str) -> bool:
    seen = 0
    for seg in split_segments(text):
        if seg.startswith("\ufeff"):
            seg = seg[1:]
        if seg[:3] == fp.segment and (len(seg) == 3 or seg[3] == fs):
            seen += 1
            if seen == fp.occurrence:
                return True
    return False


def _seg_id(seg: str) -> str:
    return seg[1:4] if seg.startswith("\ufeff") else seg[:3]


def _write(text: str, path: str, raw_value: str, notes: list[str], name: str) -> str:
    """Set the raw (escaped) value; an absent target segment leaves the message unchanged."""
    fs, _enc = _delims(text)
    fp = parse_path(path)
    if not _has_segment(text, fp, fs):
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
    fs, enc = _delims(text)
    return _write(text, params.field, escape(params.value, fs, enc), notes, "set_field")


@register("copy_field", CopyFieldParams)
def copy_field_transform(text: str, params: CopyFieldParams, ctx: TransformContext, notes: list[str]) -> str:
    _delims(text)
    value = get_field(text, params.from_)
    if value is None:
        notes.append(f"copy_field: {params.from_} absent, {params.to} not set")
        return text
    return _write(text, params.to, value, notes, "copy_field")


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
    fs, enc = _delims(text)
    raw = get_field(text, params.field)
    value = unescape(raw or "", fs, enc)
    if value in params.in_:
        return text
    return None
