"""The application error codes of the report channels: one table for the whole engine.

CI-SIS "Transmission de documents CDA en HL7 v2", section "Codes d'erreur" (table
applicationErrorCondition): the code goes into ERR-5 of the acknowledgement, paired with an
HL7 table 0357 code in ERR-3 (``engine.hl7.errors.TABLE_0357``). The labels are the guide's.
"""
from __future__ import annotations

E_VERSION = "900"          # version du document incorrecte (remplacement, suppression)
E_AUTHOR = "901"           # auteur non autorisé à remplacer ou supprimer un document
E_UNKNOWN_PATIENT = "902"  # identifiant patient inconnu
E_INS_ABSENT = "903"       # INS non présent dans le document
E_INS_MISMATCH = "904"     # INS ne correspondant pas
E_INS_INCOMPLETE = "905"   # INS non complet (traits stricts)
E_OTHER = "906"            # erreur « Autre »

APP_ERRORS: dict[str, str] = {
    E_VERSION: "Version du document incorrecte",
    E_AUTHOR: "Auteur non autorisé à remplacer ou supprimer un document",
    E_UNKNOWN_PATIENT: "Identifiant patient inconnu",
    E_INS_ABSENT: "INS non présent dans le document",
    E_INS_MISMATCH: "INS ne correspondant pas",
    E_INS_INCOMPLETE: "INS non complet",
    E_OTHER: "Erreur Autre",
}
