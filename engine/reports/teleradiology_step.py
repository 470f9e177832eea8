"""Teleradiology flows on an MLLP channel: the CI-SIS checks decide the ACK (``teleradiology`` block).

A message of the configured types (ORM^O01, OMI^O23, ORU^R01) whose MSH-21 names the profile
``CISIS_TLR_HL7_V2`` is checked with :func:`engine.reports.teleradiology.check_tlr` in a thread,
off the reactor, before the ACK (ANS, CI-SIS « Volet Téléradiologie », Volume 2 - Détail des
transactions: flows 1 to 4, common constraints, per-flow constraints). Then, in one transaction,
the message is stored and its ACK decided:

* a conforming flow is answered AA (the ACK precomputed by the channel) and routed;
* a flow that breaks the guide is answered AE with one ERR per finding: ERR-2 the location
  (ERL), ERR-3 the HL7 table 0357 code (100 segment, 101 required field, 102 data type, 103 value
  not allowed, 200/201/203 message type, event, version, 207 consistency between fields), ERR-4
  ``E``, ERR-7 the id of the check (:mod:`engine.reports.rules`), ERR-8 the rule in plain words
  with the guide's section. A channel may lower a check to a warning (ERR-4 ``W``, the message
  answered AA and routed) or switch it off, in the block's ``rules``. The guide's acknowledgement
  section (« Description des contraintes à appliquer sur l'acquittement », segment ERR) asks for
  ERR-2, ERR-3 from table 0357 and ERR-4 from table 0516, and defines no application error code:
  ERR-5 stays empty (unlike the 900-906 codes of the « Transmission de documents CDA-R2 en
  HL7 v2 » guide). Its example answers an unknown version with AE and ERR-3 ``203``, as here. The
  message is stored (nothing lost) and, unless ``route_rejected: true``, not routed. A resent
  message is answered with the stored ACK.

Which step takes a message (first match wins, ``engine.wiring.channel_steps``): this
step comes before the report steps. The guide's flows carry no report: the platform sends its
report as a separate « Transmission de documents CDA-R2 en HL7 v2 » message (MSH-21
``CISIS_CDA_HL7_V2``), which this step does not take. A message that names **both** profiles is
checked against both guides: when the channel's ``reports`` block is enabled and takes the
message, this step composes with :class:`engine.reports.processing.CisisReportStep` (its parsing,
CDA validation and stored submission), and the ACK lists the teleradiology ERRs then the report
ERRs. Such a message is rejected unless every block that found an error allows
``route_rejected``. (The two guides cannot both be met by one ORU^R01 anyway: HL7 2.5.1 versus
2.5 in MSH-12, ORC-1 OK/OC versus NW/RO/CA.)

No patient data in ERR texts, logs or status: check_tlr echoes only code values.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from engine import logs
from engine.steps import Answer, StepResult, finish
from engine.hl7.ack import AckError
from engine.hl7.msh import read_msh
from engine.reports.rules import severity
from engine.reports.teleradiology import Problem, check_tlr
from engine.router import message_type_matches, profile_matches
from engine.store import Stored

log = logs.get("engine.reports")

GUIDE = "CI-SIS Volet Téléradiologie"
# check_tlr's texts name the pages of the guide's source; the ACK names the published sections
# (Volume 2 - Détail des transactions, and the annexes « Utilisation du champ OBX-4 », « Table
# TLR_OBR_PROCEDURE », « Table TLR_OBSERVATION »). Order matters: longer keys first.
_SECTIONS = (
    ("st_worklfow.md, Evènements déclenchants", "Evènements déclenchants"),
    ("st_worklfow.md", "Evènements déclenchants"),
    ("st-contraintes.md", "Contraintes communes"),
    ("st-profils.md", "Profils de message"),
    ("st_flux1.md", "Flux 1"),
    ("st_flux2.md", "Flux 2"),
    ("st_flux3.md", "Flux 3"),
    ("st_flux4.md", "Flux 4"),
    ("table_obr.md", "Table TLR_OBR_PROCEDURE"),
    ("table_obs.md", "Table TLR_OBSERVATION"),
    ("sub-id.md", "Utilisation du champ OBX-4"),
)


def err_text(problem: Problem) -> str:
    """ERR-8 of one finding: the guide, its section and the rule (no patient data)."""
    text = problem.text
    for page, section in _SECTIONS:
        text = text.replace(page, section)
    return f"{GUIDE}, {text}"


def ack_errors(problems: list[Problem], rules: Mapping[str, str] | None = None) -> list[AckError]:
    """One ERR per finding: ERR-2 location, ERR-3 table 0357 code, ERR-4 E (rule rejected) or W
    (rule warned; the message is accepted), ERR-7 the rule's id, ERR-8 text; no ERR-5 (the guide
    defines no application error code). A rule set to ``off`` gives no ERR."""
    out = []
    for p in problems:
        level = severity(p.rule, rules) if p.rule else "reject"  # a finding without a rule refuses
        if level != "off":
            out.append(AckError(p.code, err_text(p), "E" if level == "reject" else "W",
                                p.location or None, diagnostic=p.rule))
    return out


@dataclass
class Prepared:
    errors: list[AckError] = field(default_factory=list)
    action: str = ""                # flow1 .. flow4, or "not_a_flow" (technical, logged)
    report: object | None = None    # engine.reports.processing.Prepared when composed

    # what the channel reads to fan a message out to delivery targets: the report's, if any
    @property
    def kind(self):
        return getattr(self.report, "kind", None)

    @property
    def submission(self):
        return getattr(self.report, "submission", None)

    @property
    def wrapped(self):
        return getattr(self.report, "wrapped", None)


class TeleradiologyStep:
    name = "teleradiology"

    def __init__(self, cfg, reports_cfg=None):
        self.cfg = cfg
        self.report_step = None
        if reports_cfg is not None and reports_cfg.enabled:
            from engine.reports.processing import CisisReportStep

            self.report_step = CisisReportStep(reports_cfg)
        # ids of stored messages that also got a report submission (written by the writer thread,
        # read once by after_commit in the reactor thread)
        self._with_report: set[int] = set()

    def applies(self, msh) -> bool:
        if not (self.cfg.enabled and message_type_matches(self.cfg.message_types, msh.message_code, msh.trigger)):
            return False
        enc = msh.encoding_chars or "^~"
        return profile_matches([self.cfg.profile], msh.profile or "", enc[0], enc[1] if len(enc) > 1 else "~")

    def prepare(self, raw: bytes, codec: str, store) -> Prepared:
        """In a thread: the guide's checks (and the report step's, when the message names both)."""
        try:
            check = check_tlr(raw, codec)
        except Exception as exc:  # noqa: BLE001 - a checker bug must not look like a store failure
            log.error("teleradiology.check_failed", error=type(exc).__name__)
            errors = [AckError("207", f"{GUIDE}: the message could not be checked (engine error); "
                                      "it was stored and not routed")]
            prepared = Prepared(errors, "check_failed")
        else:
            action = f"flow{check.flow}" if check.flow else "not_a_flow"
            prepared = Prepared(ack_errors(check.problems, self.cfg.rules), action)
        if self.report_step is not None and self.report_step.applies(read_msh(raw)):
            prepared.report = self.report_step.prepare(raw, codec, store)
        return prepared

    def make_op(self, store, record, prepared: Prepared, codec: str, answer: Answer):
        """The writer-thread op: store the message, rewrite its stored ACK from the findings."""
        if prepared.report is not None:
            return self._composed_op(store, record, prepared, codec, answer)
        route_rejected = self.cfg.route_rejected
        errors, action = prepared.errors, prepared.action

        def op(conn) -> StepResult:
            result = store.ingest_within(conn, [record])[0]
            if not isinstance(result, Stored):
                return StepResult(result)  # duplicate: the stored ACK is replayed
            return finish(store, conn, record, result, errors, answer, route_rejected=route_rejected,
                          action=action)

        return op

    def _composed_op(self, store, record, prepared: Prepared, codec: str, answer: Answer):
        """Both profiles: the report step's op (message + submission), with both sets of ERRs."""
        rep = prepared.report
        tlr_bad = any(e.severity == "E" for e in prepared.errors)
        rep_bad = any(e.severity == "E" for e in rep.errors)
        route = ((not tlr_bad or self.cfg.route_rejected)
                 and (not rep_bad or self.report_step.cfg.route_rejected))
        inner = self.report_step.make_op(store, record, replace(rep, errors=prepared.errors + rep.errors),
                                         codec, answer, route_rejected=route)
        composed = self._with_report

        def op(conn) -> StepResult:
            res = inner(conn)
            if isinstance(res.result, Stored):
                composed.add(res.result.message_id)
            return res

        return op

    def after_commit(self, message_id: int, store) -> None:
        """A composed message: the report step's after-ACK work (schematron in warn mode)."""
        if message_id in self._with_report:
            self._with_report.discard(message_id)
            self.report_step.after_commit(message_id, store)
