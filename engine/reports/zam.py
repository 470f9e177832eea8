"""ZAM business acknowledgements (accusés métier) sent back to the creator of a report.

CI-SIS "Transmission de documents CDA en HL7 v2", profils-messages.md « Structure des messages
accusés métier HL7 » and « Contraintes à appliquer au message ZAM^Z01^ZAM_Z01 » (and Z02/Z03),
with the OBX-3 codes of the « AckMetierZAM » table (ack-metier-zam.md):

* ``ZAM^Z01^ZAM_Z01``: accusé de réception DMP, after the answer to ITI-41 (OBX ACK_RECEPTION_DMP);
* ``ZAM^Z02^ZAM_Z01``: accusé de réception MSSanté, from a DSN (OBX ACK_RECEPTION_MSS, then an
  OBX DESTINATAIRE_MSS naming the recipient's address);
* ``ZAM^Z03^ZAM_Z01``: accusé de lecture MSSanté, from an MDN (OBX ACK_LECTURE_MSS, then LECTEUR_MSS).

MSH: HL7 v2.6 (MSH-12 ``2.6``), MSH-17 ``FRA``, MSH-18 ``UNICODE UTF-8``, MSH-21
``2.1^CISIS_CDA_HL7_V2``; the receiving application and facility are the sender of the report
(its MSH-3/MSH-4), MSH-11 its processing id. The first OBX: OBX-2 ``CWE``, OBX-4 the MSH-10 of the
ORU/MDM that carried the document, OBX-5 ``Y`` or ``N`` in ``expandedYes-NoIndicator`` (HL7 table
0136), OBX-11 ``F``. ERR (required when OBX-5 is ``N``): ERR-3 ``207^Application
error^HL70357`` (the guide writes the code system ``messageErrorCondition``; the HL7 table is
0357), ERR-4 ``E``, ERR-5 ``code^label^DMP_ERROR_CODE`` (Z01), ``...^SMTPERRORCODE`` (Z02), HL7
table 0533 (Z03).

The segment grammar of ZAM_Z01 is a figure of the guide; this module writes MSH, the OBX of the
status, the optional second OBX (Z02/Z03) and ERR, in that order. No patient data: the
acknowledgement names the message, not the patient (the MSSanté address of a recipient is a
professional's or the patient's mailbox: it goes into the message only, never into logs).
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.hl7.escape import escape
from engine.hl7.msh import MSHInfo

VERSION = "2.6"
PROFILE = "2.1^CISIS_CDA_HL7_V2"
CHARSET = "UNICODE UTF-8"

#: event -> (OBX-3 of the status, its label, OBX-3 of the second OBX, its label, ERR-5 system)
EVENTS = {
    "Z01": ("ACK_RECEPTION_DMP", "Accusé de réception DMP", None, None, "DMP_ERROR_CODE"),
    "Z02": ("ACK_RECEPTION_MSS", "Accusé de réception MSSanté", "DESTINATAIRE_MSS",
            "Destinataire MSSanté", "SMTPERRORCODE"),
    "Z03": ("ACK_LECTURE_MSS", "Accusé de lecture", "LECTEUR_MSS",
            "Lecteur du courriel MSSanté", "HL70533"),
}


@dataclass(frozen=True)
class ZamFacts:
    """What happened, as the connector saw it: the event, success or not, the receiver's error
    code and label when it failed, and (Z02/Z03) the address the receipt is about."""

    event: str                    # Z01 | Z02 | Z03
    ok: bool
    error_code: str | None = None
    error_label: str | None = None
    address: str | None = None


def build_zam(facts: ZamFacts, original: MSHInfo, *, control_id: str, timestamp: str,
              sending_app: str, sending_facility: str) -> bytes:
    """The ZAM message (UTF-8 bytes, segments ended by ``\\r``) acknowledging ``original``."""
    try:
        status_code, status_label, second_code, second_label, err_system = EVENTS[facts.event]
    except KeyError:
        raise ValueError(f"unknown ZAM event {facts.event!r}") from None
    if not facts.ok and not facts.error_code:
        raise ValueError("a failed delivery's ZAM needs an error code")
    fs, enc = "|", "^~\\&"

    def esc(text: str) -> str:
        return escape(text, fs, enc)

    processing = original.processing_id or "P"
    msh = fs.join([
        "MSH", enc, esc(sending_app), esc(sending_facility),
        _reencoded(original.sending_app, original), _reencoded(original.sending_facility, original),
        timestamp, "", f"ZAM^{facts.event}^ZAM_Z01", esc(control_id), processing, VERSION,
        "", "", "", "", "FRA", CHARSET, "", "", PROFILE])
    segments = [msh]
    yes_no = "Y" if facts.ok else "N"
    segments.append(fs.join([
        "OBX", "1", "CWE", f"{status_code}^{esc(status_label)}^AckMetierZAM",
        _reencoded(original.control_id, original), f"{yes_no}^^expandedYes-NoIndicator",
        "", "", "", "", "", "F"]))
    if second_code is not None and facts.address:
        segments.append(fs.join([
            "OBX", "2", "ST", f"{second_code}^{esc(second_label or '')}^AckMetierZAM",
            _reencoded(original.control_id, original), esc(facts.address),
            "", "", "", "", "", "F"]))
    if not facts.ok:
        app = f"{esc(facts.error_code or '')}^{esc(facts.error_label or '')}^{err_system}"
        segments.append(fs.join(["ERR", "", "", "207^Application error^HL70357", "E", app]))
    return ("\r".join(segments) + "\r").encode("utf-8")


def _reencoded(raw_field: str, original: MSHInfo) -> str:
    """A field copied from the original message, rewritten with the standard delimiters (the
    ZAM always uses ``|^~\\&``; the original may not)."""
    if original.field_sep == "|" and original.encoding_chars[:4] == "^~\\&":
        return raw_field
    comp, rep, esc_ch, sub = (list(original.encoding_chars) + ["", "", "", ""])[:4]
    out = []
    for ch in raw_field:
        if ch == comp:
            out.append("^")
        elif sub and ch == sub:
            out.append("&")
        elif rep and ch == rep:
            out.append("~")
        elif esc_ch and ch == esc_ch:
            out.append("\\")
        elif ch in "|^~\\&":
            out.append(escape(ch))
        else:
            out.append(ch)
    return "".join(out)
