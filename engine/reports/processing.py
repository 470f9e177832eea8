"""Report channels: what happens to a report message between reception and its ACK.

* :class:`CisisReportStep`: an ORU^R01 / MDM^T02/T04/T10 following the CI-SIS guide
  "Transmission de documents CDA-R2 en HL7 v2" v2.1 (MSH-21 ``2.1^CISIS_CDA_HL7_V2``). It is
  parsed (:func:`engine.reports.cisis.parse_report`), its documents are validated against the CDA
  XSD, and the canonical submission is stored with the message in the same transaction. The
  message itself is relayed **unchanged**: its routes carry no transform, the destinations get
  the received bytes. Violations are answered AE with ERR-3 ``207`` and ERR-5 the guide's code
  (900-906, ``error-codes.md``: "La nature de l'erreur applicative est renseignée dans le champ
  ERR-5"); the message is stored and, by default, not routed. Whether a finding refuses the
  message (AE), is only warned about (AA, an ERR of severity ``W`` with ERR-3 207, the code in
  ERR-5 and the rule's id in ERR-7) or is ignored is decided per rule: the catalogue
  :mod:`engine.reports.rules` and the block's ``rules``.
* :class:`PacsReportStep`: an ORU^R01 from a PACS (PDF in OBX ED, or text) is wrapped into a CDA
  R2 N1 imaging report (:mod:`engine.transforms.cda_wrap`, identity from the registry). The
  CI-SIS ORU^R01 carrying it is stored with the submission; the message's destinations receive it
  through the ``wrapped_report`` transform.

Schematron validation (about 200 ms per document) runs before the ACK only when the channel
rejects invalid documents (rule ``cda.schematron`` set to reject); otherwise it runs after the
ACK in a thread and its report is attached to the stored submission.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

from engine import logs
from engine.steps import Answer, StepResult, finish
from engine.hl7.ack import AckError
from engine.hl7.fields import parse_path
from engine.store.identities import make_identity_lookup
from engine.reports.documents import document_refs
from engine.reports.error_codes import APP_ERRORS, E_OTHER
from engine.reports.rules import rule, severity
from engine.router import message_type_matches
from engine.store import Stored

log = logs.get("engine.reports")


def cda_validator():
    """The process's CDA validator: resources and cache folder set by the engine at start
    (:func:`engine.cda.validation.configure`); compiled once (the schematrons take about 12 s)."""
    from engine.cda.validation import shared_validator

    return shared_validator()


def _issue_error(issue) -> AckError:
    code = issue.code if issue.code in APP_ERRORS else E_OTHER
    return AckError(issue.hl7_code or "207", issue.text, "E", _location(issue.location),
                    app_code=code, app_text=APP_ERRORS[code], diagnostic=issue.rule)


def _issue_warning(issue) -> AckError:
    """A warned finding: ERR-4 ``W``, ERR-3 207 (application error, detailed in ERR-5), ERR-5 the
    guide's code, ERR-7 the rule's id; the message is accepted."""
    code = issue.code if issue.code in APP_ERRORS else E_OTHER
    return AckError("207", issue.text, "W", _location(issue.location), app_code=code,
                    app_text=APP_ERRORS[code], diagnostic=issue.rule)


def ack_errors(sub) -> list[AckError]:
    """The ERRs of a parsed submission: its errors (E) then its warnings (W)."""
    return [_issue_error(i) for i in sub.errors] + [_issue_warning(i) for i in sub.warnings]


def channel_rules(cfg) -> dict[str, str]:
    """The rule overrides of a ``reports`` / ``pacs_reports`` block: the older switches first
    (``validation.on_failure`` for the CDA XSD and schematrons, ``strict_mss_matrix``), then the
    block's ``rules``, which win."""
    out: dict[str, str] = {}
    on_failure = cfg.validation.on_failure
    if on_failure is not None:
        out["cda.xsd"] = out["cda.schematron"] = on_failure
    if getattr(cfg, "strict_mss_matrix", False):
        out["cisis.mss.unlisted-combination"] = "reject"
    out.update(cfg.rules)
    return out


def _location(loc: str | None) -> str | None:
    """A submission issue location as ERL ``SEG^occurrence[^field]``; ``None`` when unreadable.

    Locations are :func:`engine.hl7.fields.parse_path` paths (``PID-3.4``, ``OBX[3]-5``) or a bare
    segment (``PRT[3]``); the CI-SIS reader names an OBX by its set id (``OBX-2-5``), read here as
    its leading path ``OBX-2``, as before. Components are not part of this ERL."""
    if not loc:
        return None
    seg, _, rest = loc.partition("-")
    field = rest.split("-", 1)[0]
    field = field[:len(field) - len(field.lstrip("0123456789"))]  # "3.4" -> "3", "?" -> ""
    try:
        fp = parse_path(f"{seg}-{field or 1}")
    except ValueError:
        return None
    erl = [fp.segment, str(fp.occurrence)]
    return "^".join(erl + [field] if field else erl)


@dataclass
class Prepared:
    submission: object  # engine.reports.submission.Submission
    errors: list[AckError] = field(default_factory=list)
    validation: dict | None = None
    wrapped: bytes | None = None
    doc_key: str | None = None
    cda_header: dict | None = None
    documents: list[bytes] = field(default_factory=list)
    kind: str | None = None


def _schematron_before_ack(cfg, rules: dict[str, str]) -> bool:
    """The schematrons (about 200 ms a document) run before the ACK only when their rule rejects;
    otherwise after it, their report attached to the stored submission (no ERR in the ACK)."""
    return cfg.validation.schematron and severity("cda.schematron", rules) == "reject"


def _validate(docs: list[bytes], cfg, rules: dict[str, str], sub) -> dict | None:
    """XSD (and schematron when it decides the ACK) of each XML document; a finding per failing
    document under the rule ``cda.xsd`` / ``cda.schematron``, added to the submission's errors
    or warnings as the rule's severity says (off: none)."""
    vcfg = cfg.validation
    if not (vcfg.xsd or vcfg.schematron) or not docs:
        return None
    from engine.reports.submission import Issue

    schematron_now = _schematron_before_ack(cfg, rules)
    v = cda_validator()
    reports = []
    for i, doc in enumerate(docs):
        if not vcfg.xsd and not schematron_now:
            break
        rep = v.validate(doc, schematron=schematron_now)
        d = _report_dict(rep)
        reports.append(d)
        n_x, n_s = len(d["xsd_errors"]), len(d["schematron_failures"])
        for rule_id, n, what in (("cda.xsd", n_x, "XSD errors"),
                                 ("cda.schematron", n_s, "schematron failures")):
            level = severity(rule_id, rules)
            if n and level != "off":
                issue = Issue(code=rule(rule_id).code, text=f"document {i + 1}: CDA validation failed "
                              f"({n} {what})", hl7_code="207", rule=rule_id)
                (sub.errors if level == "reject" else sub.warnings).append(issue)
    return {"documents": reports, "schematron": "done" if schematron_now else
            ("pending" if vcfg.schematron else "off")}


def _report_dict(rep) -> dict:
    return {"valid": rep.valid, "xsd_errors": list(rep.xsd_errors)[:50],
            "schematron_failures": list(rep.schematron_failures)[:50],
            "timings": dict(getattr(rep, "timings", {}) or {})}


#: the reader's findings that say a document is no CDA at all: its XSD check would only repeat them
_UNREADABLE_DOCUMENT = ("cisis.document.not-cda", "cisis.document.encoding")


def _xml_documents(sub) -> list[bytes]:
    unreadable = {i.location for i in sub.errors if getattr(i, "rule", None) in _UNREADABLE_DOCUMENT}
    out = []
    for d in sub.documents:
        if f"OBX-{d.obx_set_id}-5" in unreadable:
            continue  # already refused, once, by the reader
        if (d.media_type or "").endswith("xml"):
            try:
                out.append(d.raw_bytes())
            except Exception:  # noqa: BLE001 - unreadable document already reported by the parser
                pass
    return out


class _ReportStepBase:
    cfg = None

    def make_op(self, store, record, prepared: Prepared, codec: str, answer: Answer, *,
                route_rejected: bool | None = None):
        """``route_rejected``: None follows the block's setting (given by a composing step)."""
        cfg = self.cfg
        kind = self.kind
        if route_rejected is None:
            route_rejected = cfg.route_rejected

        def op(conn) -> StepResult:
            sub = prepared.submission
            refs = document_refs(sub, prepared.doc_key) if sub is not None else None
            if refs is not None and record.entries:
                key = store.document_chain_key(conn, list(refs.earlier)) or refs.own_key
                record.entries = [replace(e, doc_key=key, doc_id=refs.doc_id, action=refs.action,
                                          order_key=key if e.by_document else e.order_key)
                                  for e in record.entries]
            result = store.ingest_within(conn, [record])[0]
            if not isinstance(result, Stored):
                return StepResult(result)
            refusals = sum(1 for e in prepared.errors if e.severity == "E")  # warnings are not errors
            store.insert_submission(
                conn, result.message_id, kind=kind, action=getattr(sub, "action", None),
                documents=len(getattr(sub, "documents", []) or []), errors=refusals,
                submission_json=sub.model_dump_json() if sub is not None else "{}",
                validation=prepared.validation, wrapped=prepared.wrapped, doc_key=prepared.doc_key,
                cda_header=prepared.cda_header)
            step = finish(store, conn, record, result, prepared.errors, answer,
                          route_rejected=route_rejected, action=getattr(sub, "action", None) or kind)
            if refs is not None and refs.action == "delete" and step.routed:
                store.cancel_for_deletion(conn, result.message_id)
            return step

        return op

    def after_commit(self, message_id: int, store) -> None:
        """Schematron after the ACK (warn mode): attach the report to the stored submission."""
        if not self.cfg.validation.schematron or _schematron_before_ack(self.cfg, self.rules):
            return
        from twisted.internet import threads

        def run():
            row = store.submission_row(message_id)
            if row is None:
                return
            from engine.reports.submission import Submission

            sub = Submission.model_validate_json(row["submission"])
            v = cda_validator()
            reports = [_report_dict(v.validate(doc, schematron=True)) for doc in _xml_documents(sub)]
            validation = {"documents": reports, "schematron": "done"}
            done = threading.Event()
            store.set_validation(message_id, validation, lambda _r: done.set())
            done.wait(30)
            bad = sum(1 for r in reports if not r["valid"])
            log.info("report.validated", message_id=message_id, documents=len(reports), invalid=bad)

        d = threads.deferToThread(run)
        d.addErrback(lambda f: log.error("report.validation_failed", message_id=message_id,
                                         error=logs.error_text(f.value)))


class CisisReportStep(_ReportStepBase):
    name = "report"
    kind = "cisis"

    def __init__(self, cfg):
        self.cfg = cfg
        self.rules = channel_rules(cfg)

    def applies(self, msh) -> bool:
        return (message_type_matches(self.cfg.message_types, msh.message_code, msh.trigger)
                and self.cfg.profile in (msh.profile or ""))

    def prepare(self, raw: bytes, codec: str, store) -> Prepared:
        from engine.reports.cisis import parse_report

        sub = parse_report(raw, codec, rules=self.rules)
        validation = _validate(_xml_documents(sub), self.cfg, self.rules, sub)
        return Prepared(sub, ack_errors(sub), validation, kind=self.kind)


_WRAP_RULES = {  # cda_wrap failure -> the catalogue's rule (its applicationErrorCondition code)
    "missing_identity": "pacs.identity.unknown",
    "identity_not_qualified": "pacs.identity.not-qualified",
    "ins_mismatch": "pacs.identity.ins-mismatch",
}


def _wrap_error(rule_id: str, text: str, location: str | None = None) -> AckError:
    """A PACS report that could not be wrapped: always refused (nothing to deliver)."""
    code = rule(rule_id).code
    return AckError("207", text, app_code=code, app_text=APP_ERRORS[code], diagnostic=rule_id,
                    location=location)


class PacsReportStep(_ReportStepBase):
    name = "pacs_report"
    kind = "pacs"

    def __init__(self, cfg):
        from engine.transforms.cda_wrap import CdaWrapParams

        self.cfg = cfg
        self.rules = channel_rules(cfg)
        self.params = CdaWrapParams.model_validate(cfg.cda_wrap)  # once, not per message

    def applies(self, msh) -> bool:
        if (not message_type_matches(self.cfg.message_types, msh.message_code, msh.trigger)
                or "CISIS_CDA_HL7_V2" in (msh.profile or "")):
            return False
        apps = self.cfg.sending_applications
        return not apps or msh.sending_app in apps or msh.sending_app.split("^")[0] in apps

    def prepare(self, raw: bytes, codec: str, store) -> Prepared:
        from engine.reports.cisis import parse_report
        from engine.transforms import TransformError
        from engine.transforms.cda_wrap import CdaWrapError, build_cisis_oru, wrap_pacs_report

        lookup = make_identity_lookup(store)
        try:
            res = wrap_pacs_report(raw, codec, self.params, lookup, previous=_previous_lookup(store))
        except CdaWrapError as exc:
            rule_id = _WRAP_RULES.get(exc.code, "pacs.wrap.failed")
            return Prepared(None, [_wrap_error(rule_id, f"PACS report not wrapped ({exc.code}): {exc.text}",
                                               location=_location(exc.field))])
        except TransformError as exc:
            return Prepared(None, [_wrap_error("pacs.wrap.failed", f"PACS report not wrapped: {exc}")])
        wrapped = build_cisis_oru(raw, codec, res, self.params)
        sub = parse_report(wrapped, "utf-8", rules=self.rules)
        validation = _validate([res.cda], self.cfg, self.rules, sub)
        keys = res.keys or {}
        doc_key = keys.get("accession_number") or keys.get("order_id")
        return Prepared(sub, ack_errors(sub), validation, wrapped=wrapped,
                        doc_key=str(doc_key) if doc_key else None, cda_header=res.header,
                        kind=self.kind)


def _previous_lookup(store):
    """The header of the latest CDA wrapped for the same exam (replacement: same setId, version+1)."""
    def previous(keys: dict):
        key = keys.get("accession_number") or keys.get("order_id")
        if not key:
            return None
        return store.latest_pacs_header(str(key))

    return previous
