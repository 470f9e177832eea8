"""``wrapped_report``: send the CI-SIS report message built at reception instead of the PACS ORU.

A PACS report is wrapped into a CDA R2 N1 once, when it is received (engine.reports.processing,
``pacs_reports`` on the channel), and stored with its canonical submission; every destination of
that message must get that same document (same ids), so this transform loads it rather than
wrapping again. The delivery worker gives it the stored view (``ctx.extras["stored"]``, loaded
on first use), never the store.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from engine.transforms import TransformContext, TransformError, register


class WrappedReportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@register("wrapped_report", WrappedReportParams, operates_on="bytes")
def wrapped_report(data: bytes, params: WrappedReportParams, ctx: TransformContext, notes: list[str]):
    stored = ctx.extras.get("stored")
    if stored is None:
        raise TransformError("wrapped_report: nothing stored with this message is available here")
    wrapped = stored().wrapped
    if wrapped is None:
        raise TransformError("wrapped_report: no wrapped report stored for this message")
    notes.append("wrapped_report: CI-SIS ORU^R01 with the CDA R2 N1 built at reception")
    return wrapped
