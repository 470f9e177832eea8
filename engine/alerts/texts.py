"""What an alert notice says: a short mail (French, then English) and the webhook's JSON.
Only the rule, its kind, the subject (a destination, a certificate's place in routes.yaml, the
data directory), the time and a value (a count, an age, days): no message content, no patient."""
from __future__ import annotations

from datetime import datetime, timezone

from .rules import STARTED, Notice

SUMMARY = "suppressed"  # the state of a summary of notices held back by the rate cap

_KIND_FR = {
    "destination_down": "destination en échec",
    "queue_age": "file d'attente ancienne",
    "queue_depth": "file d'attente trop longue",
    "error_rate": "taux d'erreurs",
    "certificate_expiry": "certificat proche de l'expiration",
    "disk_space": "espace disque faible",
    "reload_refused": "rechargement de configuration refusé",
}


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def as_json(notice: Notice, engine: str) -> dict:
    """The webhook's body: ``{"alert", "state", "subject", "since", "value", "engine"}`` (+ ``kind``, ``at``)."""
    return {"alert": notice.rule, "kind": notice.kind, "state": notice.state, "subject": notice.subject,
            "since": iso(notice.since), "value": notice.value, "engine": engine, "at": iso(notice.at)}


def summary(count: int, at: float, notify: tuple[str, ...] = ()) -> Notice:
    """The notice that stands for ``count`` notices the rate cap held back."""
    return Notice("(rate cap)", "summary", f"{count} notices", SUMMARY, at, count, at, notify)


def mail_subject(notice: Notice, engine: str) -> str:
    if notice.state == SUMMARY:
        return f"[{engine}] {notice.value} alertes non envoyées / alert notices held back"
    word = "DÉBUT / STARTED" if notice.state == STARTED else "FIN / ENDED"
    return f"[{engine}] {word}: {notice.rule} ({notice.subject})"


def mail_body(notice: Notice, engine: str) -> str:
    if notice.state == SUMMARY:
        return (f"Moteur {engine}: {notice.value} notifications d'alerte n'ont pas été envoyées "
                f"(plafond par minute atteint). Voir /status.\n\n"
                f"Engine {engine}: {notice.value} alert notices were held back (per-minute cap "
                f"reached). See /status.\n")
    fr_state = "déclenchée" if notice.state == STARTED else "terminée"
    en_state = "started" if notice.state == STARTED else "ended"
    return (f"Alerte {fr_state} sur le moteur {engine}\n"
            f"  règle : {notice.rule} ({_KIND_FR.get(notice.kind, notice.kind)})\n"
            f"  sujet : {notice.subject}\n"
            f"  depuis : {iso(notice.since)}\n"
            f"  valeur : {notice.value}\n\n"
            f"Alert {en_state} on engine {engine}\n"
            f"  rule: {notice.rule} ({notice.kind})\n"
            f"  subject: {notice.subject}\n"
            f"  since: {iso(notice.since)}\n"
            f"  value: {notice.value}\n")
