"""The SMTPERRORCODE table: ERR-5 of ZAM^Z02 when an MSSanté mail did not reach its recipient.

CI-SIS "Transmission de documents CDA en HL7 v2" v2.1, error-codes.md « Table SMTPERRORCODE »
(codes and labels as the guide gives them; 101 and 111 are the guide's own codes for a server
that cannot be reached or refuses the connection).
"""
from __future__ import annotations

from engine.connectors.base import ErrorInfo

SYSTEM = "SMTPERRORCODE"

LABELS = {
    "101": "Le serveur n'arrive pas à se connecter.",
    "111": "Connexion refusée ou impossibilité d'ouvrir un flux SMTP.",
    "251": "Le compte du destinataire n'est pas sur le serveur actuel. L'envoi sera donc relayé à un autre serveur.",
    "252": "Le serveur ne peut pas vérifier l'utilisateur. Il confirme cependant qu'il essaiera de transmettre le message malgré tout",
    "420": "« Problème de connexion de temporisation » : il y a eu des problèmes pendant le transfert du message.",
    "421": "Le service est indisponible en raison d'un problème de connexion.",
    "422": "La boîte aux lettres du destinataire a dépassé sa limite de stockage.",
    "431": "Espace insuffisant sur le disque, ou état de mémoire insuffisante en raison d'une surcharge de fichiers.",
    "432": "Mot de passe de transition nécessaire",
    "441": "Le serveur du destinataire ne répond pas",
    "442": "La connexion a été interrompue pendant la transmission",
    "450": "Action non effectuée : boîte-aux-lettres non disponible [Ex., bloquée par un autre utilisateur]",
    "451": "Action arrêtée : erreur de traitement",
    "452": "Action non effectuée : manque de ressources système.",
    "500": "Erreur de syntaxe, commande non reconnue [y compris des erreurs de type « ligne de commande trop longue »]",
    "501": "Erreur de syntaxe dans des paramètres ou arguments de commande",
    "502": "Commande non implémentée",
    "503": "Mauvaise séquence de commandes",
    "504": "Paramètre de commande non implémenté",
    "510": "Mauvaise adresse courriel",
    "512": "Ce code indique une erreur DNS. Le serveur hôte du nom de domaine du destinataire est introuvable.",
    "513": "Le type d'adresse est incorrect. Souvent un problème lié à une faute d'orthographe. Dans de rares cas, il peut être lié à un problème d'authentification.",
    "523": "La taille totale de votre mailing dépasse les limites du serveur destinataire.",
    "530": "L'authentification est requise. Vous devez authentifier votre compte de messagerie avant d'envoyer un e-mail",
    "541": "L'adresse du destinataire a rejeté votre message. Dans la plupart des cas, c'est une erreur causée par un filtre anti-spam.",
    "550": "Action non effectuée : boîte aux lettres non disponible (ex. : boîte-aux-lettres non trouvée, pas d'accès).",
    "551": "Un relais peut être interrompu car votre adresse et celle du destinataire ne sont pas hébergées localement par le serveur.",
    "552": "Action abandonnée - Allocation de stockage dépassée. La boîte aux lettres du destinataire a dépassé ses limites.",
    "553": "La commande a été abandonnée car le nom de la boîte aux lettres n'est pas valide.",
    "554": "Cela signifie que l'envoi a échoué. Ce code indique une erreur permanente et le serveur n'essaiera pas d'envoyer le message à nouveau.",
}


def smtp_error(code: int | str) -> ErrorInfo:
    """The ERR-5 of a failed delivery: the reply code, with the guide's label when listed (a code
    the table does not list keeps the code with no label: the server's own text may name the
    recipient, so it is never copied)."""
    code = str(code)
    return ErrorInfo(code, SYSTEM, LABELS.get(code, ""))
