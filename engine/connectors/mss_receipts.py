"""Delivery and read receipts of MSSanté mails, as they arrive in the application mailbox (pure).

* DSN, RFC 3464: ``multipart/report; report-type=delivery-status``, a ``message/delivery-status``
  part with the per-message fields (``Original-Envelope-Id``: the ENVID this engine gave the
  mail, RFC 3461 §4.4) and one block per recipient (``Final-Recipient``, ``Action``, ``Status``,
  ``Diagnostic-Code``), then the original mail or its headers (``Message-ID``). ``delivered``,
  ``relayed`` and ``expanded`` are successes, ``failed`` a failure, ``delayed`` not final
  (ignored). Becomes a ZAM^Z02 (CI-SIS "Transmission de documents CDA en HL7 v2", ack-metier-zam.md;
  ERR-5 in the SMTPERRORCODE table: the SMTP code of the Diagnostic-Code, else the status class).
* MDN, RFC 8098: ``multipart/report; report-type=disposition-notification``, the
  ``message/disposition-notification`` part with ``Original-Message-ID``, ``Final-Recipient``
  and ``Disposition``. The LPS profile of the CI-SIS (« Transmission au LPS d'un document CDA
  provenant d'un courriel MSSanté », struct-msg-mdn.md) writes a failure as
  ``...; processed/Error: code^libellé``. ``displayed``, ``processed`` and ``dispatched``
  without an error are successes; an error or ``deleted`` a failure. Becomes a ZAM^Z03 (ERR-5 in
  HL7 table 0533).

``key`` identifies a receipt for good (the receipt's own Message-ID, else its bytes, and the
recipient): the store records each key once, so a receipt read twice (a restart between storing
it and flagging it in the mailbox) is applied once.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import Message

from engine.connectors.smtp_codes import LABELS as SMTP_LABELS

DELIVERED = {"delivered", "relayed", "expanded"}
READ_OK = {"displayed", "processed", "dispatched"}
_SMTP_CODE = re.compile(r"\b([245]\d\d)\b")


@dataclass(frozen=True)
class Receipt:
    key: str                        # sha256 hex, unique per receipt and recipient
    event: str                      # Z02 (DSN) | Z03 (MDN)
    original_message_id: str        # the Message-ID of the mail it is about, with <>
    ok: bool
    address: str | None = None      # Final-Recipient (PHI for the patient: ZAM only)
    error_code: str | None = None
    error_label: str | None = None


def _fields(part: Message) -> dict[str, str]:
    return {k.lower(): str(v).strip() for k, v in part.items()}


def _address(value: str | None) -> str | None:
    """``rfc822; someone@example.org`` -> ``someone@example.org``."""
    if not value:
        return None
    return value.split(";", 1)[-1].strip().strip("<>") or None


def _bracketed(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if not value.startswith("<"):
        value = f"<{value}>"
    return value


def _status_blocks(part: Message) -> list[dict[str, str]]:
    """The header blocks of a message/delivery-status or message/disposition-notification part
    (the email package parses each block as a sub-message)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [_fields(p) for p in payload]
    text = payload if isinstance(payload, str) else ""
    blocks = []
    for chunk in re.split(r"\r?\n\r?\n", text):
        if chunk.strip():
            blocks.append(_fields(message_from_bytes(chunk.encode("utf-8", "replace"))))
    return blocks


def _original_headers(report: Message) -> dict[str, str]:
    for part in report.walk():
        ctype = part.get_content_type()
        if ctype == "text/rfc822-headers":
            return _fields(message_from_bytes(part.get_payload(decode=True) or b""))
        if ctype == "message/rfc822":
            inner = part.get_payload()
            if isinstance(inner, list) and inner:
                return _fields(inner[0])
    return {}


def _key(receipt_id: str | None, raw: bytes, recipient: str | None) -> str:
    base = receipt_id.encode("utf-8") if receipt_id else hashlib.sha256(raw).digest()
    return hashlib.sha256(base + b"\0" + (recipient or "").lower().encode("utf-8")).hexdigest()


def parse_receipt(raw: bytes) -> list[Receipt]:
    """The receipts a mail carries: empty when it is neither a DSN nor an MDN, or names no
    original mail."""
    msg = message_from_bytes(raw, policy=policy.compat32)
    if msg.get_content_type() != "multipart/report":
        return []
    report_type = (msg.get_param("report-type") or "").lower()
    own_id = (msg.get("Message-ID") or "").strip() or None
    parts = {p.get_content_type(): p for p in msg.walk()}
    if report_type == "delivery-status" and "message/delivery-status" in parts:
        return _dsn(msg, parts["message/delivery-status"], own_id, raw)
    if report_type == "disposition-notification" and "message/disposition-notification" in parts:
        return _mdn(parts["message/disposition-notification"], own_id, raw)
    return []


def _dsn(msg: Message, part: Message, own_id: str | None, raw: bytes) -> list[Receipt]:
    blocks = _status_blocks(part)
    if not blocks:
        return []
    per_message, recipients = blocks[0], blocks[1:]
    if "final-recipient" in per_message:   # no per-message block
        per_message, recipients = {}, blocks
    original = _bracketed(per_message.get("original-envelope-id")
                          or _original_headers(msg).get("message-id"))
    if original is None:
        return []
    out = []
    for block in recipients:
        action = block.get("action", "").lower()
        if action not in DELIVERED and action != "failed":
            continue   # delayed: a later DSN gives the result
        address = _address(block.get("final-recipient") or block.get("original-recipient"))
        ok = action in DELIVERED
        code = None
        if not ok:
            found = _SMTP_CODE.search(block.get("diagnostic-code", ""))
            status = block.get("status", "")
            code = found.group(1) if found else ("554" if status.startswith("5") else "451")
        out.append(Receipt(_key(own_id, raw, address), "Z02", original, ok, address, code,
                           SMTP_LABELS.get(code) if code else None))
    return out


def _mdn(part: Message, own_id: str | None, raw: bytes) -> list[Receipt]:
    fields: dict[str, str] = {}
    for block in _status_blocks(part):
        fields.update(block)
    original = _bracketed(fields.get("original-message-id"))
    disposition = fields.get("disposition", "")
    if original is None or not disposition:
        return []
    address = _address(fields.get("final-recipient") or fields.get("original-recipient"))
    _mode, _, rest = disposition.partition(";")
    kind, _, modifier = rest.strip().partition("/")
    kind = kind.strip().lower()
    code = label = None
    ok = kind in READ_OK and not modifier.strip()
    if modifier.strip():
        # LPS profile: « processed/Error: code^libellé » (struct-msg-mdn.md)
        text = modifier.split(":", 1)[1] if ":" in modifier else modifier
        code, _, label = text.strip().partition("^")
        code, label = code.strip() or "207", label.strip() or None
    elif not ok:
        code, label = "207", f"disposition {kind or 'unknown'}"
    return [Receipt(_key(own_id, raw, address), "Z03", original, ok, address, code, label)]
