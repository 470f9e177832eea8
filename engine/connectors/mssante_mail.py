"""The MSSanté mail of a report: who gets one, and the mail itself (pure, no I/O).

Sources: CI-SIS "Transmission de documents CDA en HL7 v2" v2.1, mapping-mss.md (FROM, Reply-To,
TO, X-MSS-MES, body), meta-dmp-mss.md and regles-gestion-mssante.md (who gets a mail),
profils-messages.md (CORPSMAIL_PS / CORPSMAIL_PATIENT: « A défaut, dans le cadre d'une
suppression ou d'un remplacement de document, le GESTIONNAIRE renseigne un corps de mail par
défaut »); the MSSanté client rules (« Référentiel #2 Clients de messagerie sécurisée de santé »
v1.0.1 §3.8.1-3.8.3, rules ECO.2.2.8 and ECO.2.4.1-3) for the X-MSS headers, ECO.2.3.1 for
``Return-Receipt-To``; RFC 8098 for ``Disposition-Notification-To`` (read receipt, MDN).

Recipients: one mail per recipient, each its own delivery target (``ps-1``, ``ps-2``, ...
in PRT RCT order, and ``patient``), so that a failure for one address retries or parks only that
one. The targets never hold an address: the patient's mailbox is ``<INS>@patient.mssante.fr``.

PHI: the mail carries the document, the INS and the bodies; it goes to the SMTP server and to
``queue_entries`` (payload) only, never to logs.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from engine.identity.ins import patient_mail_address
from engine.xds.settings import XdsSettings
from engine.xds.xdm import ZIP_NAME, XdmSender, build_xdm

PATIENT_TARGET = "patient"
PS_TARGET_PREFIX = "ps-"

#: default bodies by action (profils-messages.md: a default for replacements and deletions; one
#: for a first transmission too, when the creator gave none)
DEFAULT_BODIES = {
    "initial": "Veuillez trouver ci-joint un document vous concernant.",
    "replace": "Veuillez trouver ci-joint une nouvelle version d'un document qui vous a été "
               "transmis précédemment ; elle remplace la version précédente.",
    "delete": "Un document qui vous a été transmis précédemment a été supprimé par son auteur : "
              "veuillez ne plus en tenir compte.",
}


@dataclass(frozen=True)
class Recipient:
    target: str
    address: str
    patient: bool


#: PID-32 codes of a qualified identity (IHE PAM France): « QUAL », and « VALI » with an INS, as
#: the engine's INS rules take it (engine.identity.ins, ``vali_counts_as_qualified``)
QUALIFIED = ("QUAL", "VALI")


def ins_is_qualified(sub: Any) -> bool:
    """A qualified INS: present, with PID-32 in :data:`QUALIFIED`."""
    return sub.ins is not None and (sub.identity_reliability or "").upper() in QUALIFIED


def patient_mailbox(sub: Any) -> str | None:
    """The patient's MSSanté mailbox when the report may go there: DESTMSSANTEPAT=Y, never with
    INVISIBLE_PATIENT=Y, nor with INVISIBLE_REP_LEGAUX=Y alongside the professionals (the only
    matrix row allowing it is the patient-only one, regles-gestion-mssante.md), and only to
    ``<INS>@patient.mssante.fr`` of a qualified INS (meta-dmp-mss.md)."""
    f = sub.flags
    if not f.get("DESTMSSANTEPAT") or f.get("INVISIBLE_PATIENT"):
        return None
    if f.get("INVISIBLE_REP_LEGAUX") and f.get("DESTMSSANTEPS"):
        return None
    if not ins_is_qualified(sub):
        return None
    return patient_mail_address(sub.ins.value)


def recipients(sub: Any) -> list[Recipient]:
    """Every mail a report asks for: the PRT RCT professionals when DESTMSSANTEPS=Y, the patient
    per :func:`patient_mailbox`."""
    out = []
    if sub.flags.get("DESTMSSANTEPS"):
        for n, address in enumerate(sub.recipients.mss_ps, start=1):
            out.append(Recipient(f"{PS_TARGET_PREFIX}{n}", address, False))
    box = patient_mailbox(sub)
    if box is not None:
        out.append(Recipient(PATIENT_TARGET, box, True))
    return out


def recipient_for(sub: Any, target: str) -> Recipient | None:
    for r in recipients(sub):
        if r.target == target:
            return r
    return None


@dataclass(frozen=True)
class MailSettings:
    from_address: str
    #: X-MSS-NIL, the software reference number (MSSanté client rules §3.8.3); None: not sent
    software_id: str | None = None
    subject: str = "XDM/1.0/DDM"
    bodies: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_BODIES))
    #: the XDS settings of METADATA.XML; None: no IHE_XDM.zip
    xds: XdsSettings | None = None
    xdm_sender: XdmSender = XdmSender("")


@dataclass(frozen=True)
class Mail:
    message: EmailMessage
    message_id: str          # with its angle brackets
    mail_from: str
    rcpt: str
    #: RFC 3461 NOTIFY of the RCPT command, when the server offers DSN
    notify: str
    attachments: tuple[str, ...]

    def as_bytes(self) -> bytes:
        """CRLF line ends (RFC 5322): smtplib sends bytes as given."""
        return self.message.as_bytes(policy=email_policy.SMTP)


def body_for(sub: Any, recipient: Recipient, settings: MailSettings) -> str:
    name = "CORPSMAIL_PATIENT" if recipient.patient else "CORPSMAIL_PS"
    given = (sub.mail_bodies or {}).get(name)
    if given and given.strip():
        return given
    return settings.bodies.get(sub.action or "initial") or DEFAULT_BODIES[sub.action or "initial"]


def build_mail(sub: Any, recipient: Recipient, settings: MailSettings, *, message_id: str,
               now: dt.datetime) -> Mail:
    """The mail of one recipient. Raises ``engine.xds`` errors when the XDM cannot be built."""
    msg = EmailMessage()
    msg["From"] = settings.from_address
    msg["To"] = recipient.address
    if sub.recipients.reply_to:
        msg["Reply-To"] = sub.recipients.reply_to                        # PRT REPLY PRT-15.4
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id
    titles = [d.title for d in sub.documents if d.title]
    action = sub.action or "initial"
    prefix = {"replace": "Remplacement ", "delete": "Suppression "}.get(action, "")
    title = " ".join((titles[0] if titles else "document").split())    # one line, whatever the CDA
    msg["Subject"] = f"{settings.subject}+{prefix}{title}"
    attach = action != "delete" and bool(sub.documents)
    # MSSanté client rules §3.8.1: X-MSS-CODECDA, the type codes of the attached CDA documents
    codes = [d.type_code for d in sub.documents if d.type_code]
    if attach and codes:
        msg["X-MSS-CODECDA"] = ",".join(dict.fromkeys(codes))
    xdm = attach and settings.xds is not None and ins_is_qualified(sub)
    # §3.8.2: X-MSS-INS « O » when a qualified INS is in the XDM metadata
    msg["X-MSS-INS"] = "O" if xdm else "N"
    if settings.software_id:
        msg["X-MSS-NIL"] = settings.software_id                           # §3.8.3, every mail
    if recipient.patient and sub.recipients.patient_no_reply:
        msg["X-MSS-MES"] = "FIN"                                          # mapping-mss.md, NTE-4
    if sub.acks.reception:
        msg["Return-Receipt-To"] = settings.from_address                  # ECO.2.3.1
    if sub.acks.lecture:
        msg["Disposition-Notification-To"] = settings.from_address        # RFC 8098 §2.1
    msg.set_content(body_for(sub, recipient, settings), charset="utf-8")
    names = []
    if attach:
        for n, doc in enumerate(sub.documents, start=1):
            name = f"CDA_{n}.xml" if len(sub.documents) > 1 else "CDA.xml"
            maintype, _, subtype = (doc.media_type or "text/xml").partition("/")
            msg.add_attachment(doc.raw_bytes(), maintype=maintype or "text", subtype=subtype or "xml",
                               filename=name)
            names.append(name)
        if xdm:
            package = build_xdm(sub, settings.xds, settings.xdm_sender, now=now)
            msg.add_attachment(package, maintype="application", subtype="zip", filename=ZIP_NAME)
            names.append(ZIP_NAME)
    notify = "SUCCESS,FAILURE,DELAY" if sub.acks.reception else "FAILURE,DELAY"
    return Mail(msg, message_id, settings.from_address, recipient.address, notify, tuple(names))
