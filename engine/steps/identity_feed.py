"""IHE PAM France identity feed on an MLLP channel.

An ADT is applied to the identity registry in the same database transaction that stores the
message, so the registry and the message store never disagree, and the ACK can say which INS rule
the ADT broke: AE with one ERR per violated rule (field, rule, plain words) when a rule of
severity E is broken, AA with ERR severity W for warnings. A rejected ADT is stored (nothing lost)
and, by default, not routed onward; the registry keeps the identity without the refused INS
(see :mod:`engine.store.identities`), so it is never corrupted.

Sources: IHE PAM National Extension France 2.11 (events), Ségur vague 2 imagerie requirements
("intégrer l'identité INS … en création, mise à jour et suppression, à partir d'un flux IHE PAM"),
INS rules in :mod:`engine.identity.ins`.
"""
from __future__ import annotations

from engine import logs
from engine.hl7.ack import AckError
from engine.hl7.fields import parse_path
from engine.identity.ins import InsPolicy
from engine.identity.model import IdentityError, IdentityEvent
from engine.identity.pamfr import parse_adt
from engine.router import message_type_matches
from engine.steps import Answer, StepResult, finish
from engine.store import StepOp, Stored
from engine.store.identities import Lookups, apply_events

log = logs.get("engine.identity")


def err_location(field: str | None) -> str | None:
    """``PID-3[2].1`` -> ``PID^1^3^2^1`` (ERR-2 ERL: segment, sequence, field, repetition, component).

    ``field`` is an :func:`engine.hl7.fields.parse_path` path, or a segment id alone (``PID``: a
    missing segment, located by its id and sequence ``PID^1``); anything else has no location."""
    if not field:
        return None
    if len(field) == 3 and field.isalnum() and field.isupper():
        return f"{field}^1"
    try:
        fp = parse_path(field)
    except ValueError:
        return None
    parts = [fp.segment, str(fp.occurrence), str(fp.field), str(fp.repetition or 1)]
    if fp.component is not None:
        parts.append(str(fp.component))
        if fp.subcomponent is not None:
            parts.append(str(fp.subcomponent))
    return "^".join(parts)


class IdentityFeed:
    def __init__(self, cfg, environment: str):
        self.cfg = cfg
        allow_test = cfg.allow_test_ins if cfg.allow_test_ins is not None else environment == "test"
        self.policy = InsPolicy(environment=environment, allow_test_ins=allow_test,
                                vali_counts_as_qualified=cfg.vali_counts_as_qualified,
                                rule11_answer=cfg.rule11_answer,
                                unqualified_ins_answer=cfg.unqualified_ins_answer)

    def applies(self, msh) -> bool:
        return self.cfg.enabled and message_type_matches(self.cfg.message_types, msh.message_code, msh.trigger)

    name = "identity"
    prepare = None  # parsing happens in the writer op, next to the registry writes

    def make_op(self, store, record, prepared, codec: str, answer: Answer) -> StepOp:
        """The writer-thread op: store the message, apply the ADT, fix the stored ACK. The
        writer runs the ADTs of one transaction together (:meth:`apply_batch`)."""
        return StepOp(record, (store, record, codec, answer), self.apply_batch, self.read_ahead)

    @staticmethod
    def _parse(record, codec: str):
        """The ADT's event, or the exception that reading it raised."""
        try:
            return parse_adt(record.raw, codec)
        except Exception as exc:  # noqa: BLE001 - a reader defect is no store failure: stored, AE
            return exc

    def read_ahead(self, conn, items: list):
        """Before the messages are stored (the writer's ``StepOp.read``): the ADTs parsed and
        the registry lookups of the batch sent (:class:`engine.store.identities.Lookups`),
        sharing the messages insert's round trip on PostgreSQL. Duplicates (not known yet) are
        read too, never applied."""
        parsed = [self._parse(record, codec) for (_store, record, codec, _answer) in items]
        return parsed, Lookups(conn, [ev for ev in parsed if isinstance(ev, IdentityEvent)])

    def apply_batch(self, conn, items: list, ahead=None) -> list[StepResult]:
        """``[((store, record, codec, answer), IngestResult), ...]`` in the writer's transaction:
        the ADTs applied in order (:func:`engine.store.identities.apply_events`), one verdict
        each. ``ahead``: what :meth:`read_ahead` returned for these items."""
        out: list = [None] * len(items)
        errors_of: dict[int, list] = {}
        action_of: dict[int, str] = {}
        todo = []  # (index, event, message id)
        parsed, lookups = ahead if ahead is not None else (None, None)
        for k, ((_store, record, codec, _answer), result) in enumerate(items):
            if not isinstance(result, Stored):
                out[k] = StepResult(result)  # duplicate: the stored ACK is replayed, nothing re-applied
                continue
            event = parsed[k] if parsed is not None else self._parse(record, codec)
            if isinstance(event, IdentityError):
                err = event
                errors_of[k] = [AckError(err.code, f"{err.rule}: {err.text}" if getattr(err, "rule", None) else err.text,
                                         "E", err_location(getattr(err, "field", None)))]
                action_of[k] = "unparsable"
            elif isinstance(event, Exception):
                # the exception's type only: its text may quote a field value (patient data)
                log.error("identity.read_failed", message_id=result.message_id, error=type(event).__name__)
                errors_of[k] = [AckError("207", f"the identity feed could not read this message "
                                                f"({type(event).__name__}); it is stored, not applied")]
                action_of[k] = "unparsable"
            else:
                todo.append((k, event, result.message_id))
        applied = apply_events(conn, [(event, mid) for _k, event, mid in todo], policy=self.policy,
                               lookups=lookups)
        for (k, _event, _mid), a in zip(todo, applied):
            errors = [AckError(v.code, f"{v.rule}: {v.text}", v.severity, err_location(v.field))
                      for v in a.violations]
            if a.action == "rejected":
                errors.append(AckError("207", f"identity not applied: {a.note or 'rejected'}"))
            errors_of[k], action_of[k] = errors, a.action
        route_rejected = self.cfg.route_rejected
        for k, ((store, record, _codec, answer), result) in enumerate(items):
            if out[k] is None:
                out[k] = finish(store, conn, record, result, errors_of[k], answer,
                                route_rejected=route_rejected, action=action_of[k])
        return out
