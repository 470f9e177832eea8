"""One audit row as a DICOM PS3.15 A.5 audit message and as an RFC 5424 syslog message. Pure.

Event codes are those of DICOM PS3.16 (CID 400 Audit Event ID, CID 401-403 event types,
codeSystemName "DCM"). The outcome maps to EventOutcomeIndicator 0 (success), 4 (minor failure:
refused) and 8 (serious failure: failed). Participant objects name internal ids only; the
identifier a patient search used goes out only when ``with_patient_ids`` (the sender sets it for
TLS: a clear-text channel never carries it).
"""
from __future__ import annotations

from datetime import datetime, timezone

from lxml import etree

# action -> (EventID code, its text), (EventTypeCode code, its text) or None, EventActionCode
_APP = (("110100", "Application Activity"), None, "E")
_CONFIG = ("110113", "Security Alert")
EVENTS: dict[str, tuple] = {
    "login": (("110114", "User Authentication"), ("110122", "Login"), "E"),
    "login.failed": (("110114", "User Authentication"), ("110122", "Login"), "E"),
    "logout": (("110114", "User Authentication"), ("110123", "Logout"), "E"),
    "search.patient": (("110112", "Query"), None, "E"),
    "message.view": (("110110", "Patient Record"), None, "R"),
    "message.handled": (("110110", "Patient Record"), None, "U"),
    "message.replay": (("110106", "Export"), None, "R"),
    "message.retry": (("110106", "Export"), None, "R"),
    "export": (("110106", "Export"), None, "R"),
    "retention.prune": (("110110", "Patient Record"), None, "D"),
    "destination.pause": (_CONFIG, ("110128", "Network Configuration"), "U"),
    "destination.resume": (_CONFIG, ("110128", "Network Configuration"), "U"),
    "config.reload": (_CONFIG, ("110131", "Software Configuration"), "U"),
    "user.add": (_CONFIG, ("110137", "User Security Attributes Changed"), "C"),
    "user.change": (_CONFIG, ("110137", "User Security Attributes Changed"), "U"),
    "audit.view": (("110101", "Audit Log Used"), None, "R"),
    "engine.start": (("110100", "Application Activity"), ("110120", "Application Start"), "E"),
    "engine.stop": (("110100", "Application Activity"), ("110121", "Application Stop"), "E"),
}
OUTCOME_INDICATOR = {"ok": "0", "refused": "4", "failed": "8"}
FACILITY_AUTHPRIV = 10  # RFC 5424 table 1: security/authorization messages
SEVERITY = {"ok": 5, "refused": 4, "failed": 4}  # notice, warning
BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: a UTF-8 MSG starts with the BOM


def _code(parent, tag: str, code: str, text: str, system: str = "DCM") -> None:
    etree.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": text})


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit_message(row, *, source_id: str, with_patient_ids: bool = False) -> bytes:
    """The DICOM PS3.15 A.5.1 ``AuditMessage`` of an audit row (``engine.store.AuditRow``)."""
    event, event_type, action_code = EVENTS.get(row.action) or EVENTS.get(row.action.split(".")[0]) or _APP
    root = etree.Element("AuditMessage")
    ev = etree.SubElement(root, "EventIdentification", {
        "EventActionCode": action_code, "EventDateTime": _iso(row.at),
        "EventOutcomeIndicator": OUTCOME_INDICATOR.get(row.outcome, "8")})
    _code(ev, "EventID", *event)
    if event_type is not None:
        _code(ev, "EventTypeCode", *event_type)
    # the text of the action as the engine names it (RFC 3881 allows local codes)
    _code(ev, "EventTypeCode", row.action, row.action, "minipfi")
    who = {"UserID": row.actor, "UserIsRequestor": "true"}
    if row.source and row.source != "cli":
        who.update(NetworkAccessPointID=row.source, NetworkAccessPointTypeCode="2")  # 2: IP address
    etree.SubElement(root, "ActiveParticipant", who)
    src = etree.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    _code(src, "AuditSourceTypeCode", "4", "Application Server")
    if row.target:
        kind, _, ident = row.target.partition(":")
        obj = etree.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": ident or kind, "ParticipantObjectTypeCode": "2",  # system object
            "ParticipantObjectTypeCodeRole": "3" if kind == "message" else "4"})  # report / resource
        _code(obj, "ParticipantObjectIDTypeCode", kind, kind, "minipfi")
    key = (row.detail or {}).get("key") if row.action == "search.patient" else None
    if with_patient_ids and key:
        obj = etree.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": str(key), "ParticipantObjectTypeCode": "1",  # person
            "ParticipantObjectTypeCodeRole": "1"})  # patient
        _code(obj, "ParticipantObjectIDTypeCode", "2", "Patient Number", "RFC-3881")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def _header_field(value: str, most: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, at most ``most``, or NILVALUE."""
    out = "".join(c for c in value if 33 <= ord(c) <= 126)[:most]
    return out or "-"


def syslog_message(row, xml: bytes, *, hostname: str, app_name: str = "minipfi", procid: str = "-") -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM+XML`` (RFC 5424 section 6);
    MSGID is the audit action (the event type), structured data none."""
    pri = FACILITY_AUTHPRIV * 8 + SEVERITY.get(row.outcome, 4)
    head = (f"<{pri}>1 {_iso(row.at)} {_header_field(hostname, 255)} {_header_field(app_name, 48)} "
            f"{_header_field(procid, 128)} {_header_field(row.action, 32)} -")
    return head.encode("ascii") + b" " + BOM + xml


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 3.4.1 / RFC 5425 4.3: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message
