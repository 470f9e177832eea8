"""IHE PAM France identity feed: pure parsing (:mod:`.pamfr`), INS rules (:mod:`.ins`), the
registry (:mod:`.registry`, SQLAlchemy Core) and its Alembic operations (:mod:`.migration`).

Issue 3. Parsing and rules never touch a database; the registry takes a caller-owned
``Connection``. Everything here handles patient data: never log these objects (PHI rule).
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
