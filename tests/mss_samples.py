"""Report messages for the MSSanté tests: the ANS corpus MDM and variants of it whose flags and
PRT segments ask for the other mails (patient mailbox, Reply-To, receipts)."""
from __future__ import annotations

import re

from tests.conftest import CORPUS

MDM_DIR = (CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1"
           / "MDM")
INIT = (MDM_DIR / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1_Base64.er7").read_bytes()
REPLACE = (MDM_DIR / "Remplacement MDM" / "message_MDM_CR_Radio_RPLC_N1.er7").read_bytes()
DELETE = (MDM_DIR / "Suppression MDM" / "message_MDM_CR_Radio_DEL_N1.er7").read_bytes()

ORU = (MDM_DIR.parent / "ORU" / "Transmission initiale ORU" / "message_ORU_CR_Bio_INIT_N3_SEGUR.hl7").read_bytes()

INS = "279035121518989"          # the corpus test patient's INS
PS = "adam.hoda@test-ci-sis.mssante.fr"
PATIENT = f"{INS}@patient.mssante.fr"
REPLY = "secretariat.imagerie@test-ci-sis.mssante.fr"
PS2 = "second.medecin@test-ci-sis.mssante.fr"


def variant(raw: bytes = INIT, *, flags: dict[str, str] | None = None, patient: bool = False,
            reply: bool = False, fin: bool = False, second_ps: bool = False,
            control_id: str | None = None, drop_body: bool = False) -> bytes:
    """``raw`` with some MetaDMPMSS flags set (``{"DESTMSSANTEPAT": "Y"}``), a PRT RCT for the
    patient's mailbox, a PRT REPLY, an NTE « FIN » after DESTMSSANTEPAT, a second PS recipient,
    another MSH-10, or without the CORPSMAIL_PS OBX."""
    sep = b"\r" if b"\r" in raw else b"\n"   # the corpus files end segments with LF
    segs = raw.split(sep)
    out = []
    for s in segs:
        if flags and s.startswith(b"OBX|"):
            for name, value in flags.items():
                s = re.sub(rb"(\|" + name.encode() + rb"\^[^|]*\|\|)[YN](\^)", rb"\g<1>" + value.encode() + rb"\2", s)
        if drop_body and b"|CORPSMAIL_PS^" in s:
            continue
        if control_id and s.startswith(b"MSH|"):
            f = s.split(b"|")
            f[9] = control_id.encode()
            s = b"|".join(f)
        out.append(s)
        if s.startswith(b"PRT||UC||RCT^") and PS.encode() in s:
            if second_ps:
                out.append(b"PRT||UC||RCT^^participation|801234567898^Medecin^Second^^^^^^ASIP-SANTE- PS"
                           b"&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS||||||||||^NET^X.400^" + PS2.encode())
            if patient:
                out.append(b"PRT||UC||RCT^^participation|" + INS.encode() + b"^PAT-TROIS^DOMINIQUE^^^^^^"
                           b"ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^L^^^INS||||||||||^NET^X.400^"
                           + PATIENT.encode())
            if reply:
                out.append(b"PRT||UC||REPLY^^participation|||||||||||^NET^X.400^" + REPLY.encode())
        if fin and b"|DESTMSSANTEPAT^" in s:
            out.append(b"NTE|1|||FIN")
    return sep.join(out)


#: PS + patient (matrix row 1), receipts asked
BOTH_FLAGS = {"INVISIBLE_PATIENT": "N", "INVISIBLE_REP_LEGAUX": "N", "DESTMSSANTEPAT": "Y",
              "ACK_RECEPTION": "Y", "ACK_LECTURE_MSS": "Y"}
#: PS only (matrix row 2), receipts asked
PS_ONLY_FLAGS = {"INVISIBLE_REP_LEGAUX": "N", "ACK_RECEPTION": "Y", "ACK_LECTURE_MSS": "Y"}
