"""IHE PAM France identity feed, the pure part: ADT parsing (:mod:`.pamfr`), the data model
(:mod:`.model`) and the INS rules (:mod:`.ins`). The registry that stores identities is the
store's (:mod:`engine.store.identities`); the step that applies ADTs is
:mod:`engine.steps.identity_feed`.

Parsing and rules never touch a database. Everything here handles patient data: never log these objects (PHI rule).
"""
from .ins import InsDecision, InsPolicy, check_identity, ins_decision, nir_key, usable_ins
from .model import (
    DmpConsent,
    Identifier,
    IdentityError,
    IdentityEvent,
    IdentityStatus,
    InsInfo,
    ObtainedVia,
    StrictTraits,
    Violation,
)
from .pamfr import parse_adt

__all__ = [
    "DmpConsent", "Identifier", "IdentityError", "IdentityEvent", "IdentityStatus", "InsDecision",
    "InsInfo", "InsPolicy", "ObtainedVia", "StrictTraits", "Violation", "check_identity",
    "ins_decision", "nir_key", "parse_adt", "usable_ins",
]
