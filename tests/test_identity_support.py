"""Helpers for the identity tests: corpus paths and synthetic PAM FR ADT messages.

The synthetic identities are invented (names like ``SYNTH-…``); the only real-looking identity is
the ANS test patient "PAT-TROIS DOMINIQUE" of the public corpus (test INS OID .10).
"""
from __future__ import annotations

from pathlib import Path

from engine.identity.ins import nir_key

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "ans-hl7v2"
SGL = CORPUS / "SGL"
CONSENT = CORPUS / "Vague 2" / "Consentement_DMP_PAMFR"

OID_NIR = "1.2.250.1.213.1.4.8"
OID_NIA = "1.2.250.1.213.1.4.9"
OID_TEST = "1.2.250.1.213.1.4.10"
OID_DEMO = "1.2.250.1.213.1.4.11"

CORPUS_INS = "279035121518989"


def corpus_files() -> list[Path]:
    return sorted(SGL.glob("*.er7")) + sorted(CONSENT.glob("*.er7"))


def make_nir(body13: str) -> str:
    """A synthetic NIR with its correct key."""
    return f"{body13}{nir_key(body13):02d}"


# A synthetic female NIR (born 1985-07, department 63, commune 220) and a male one.
SYNTH_NIR_F = make_nir("2850763220123")
SYNTH_NIR_M = make_nir("1850775056042")


def _pid(fields: dict[int, str]) -> str:
    parts = ["PID"] + [""] * max(fields)
    for n, v in fields.items():
        parts[n] = v
    return "|".join(parts)


def adt(trigger: str = "A28", *, ipp: str = "900001", authority: str = "CHU-X",
        ins: str | None = SYNTH_NIR_F, oid: str = OID_TEST, birth_name: str = "SYNTH-UN",
        first_given: str = "ALEX", given_list: str = "ALEX CAMILLE", used_name: str | None = None,
        dob: str = "19850712", sex: str = "F", cog: str | None = "63220",
        status: str = "VALI", evn: str = "20240306111154", control: str = "1",
        mrg: str | None = None, zfa: str | None = "ZFA|ACTIF|20240306111154|||||||INO|20240306111154|IC|20240306111154",
        zfd: str | None = "ZFD|||Y|N|INSI|20211201||", sep: str = "\r") -> bytes:
    """Build a synthetic PAM FR 2.11 ADT (same layout as the ANS corpus examples)."""
    structure = {"A28": "ADT_A05", "A31": "ADT_A05", "A01": "ADT_A01", "A40": "ADT_A39",
                 "A47": "ADT_A30", "A29": "ADT_A21", "A23": "ADT_A21"}.get(trigger, "ADT_A01")
    pid3 = f"{ipp}^^^{authority}&000897406&N^PI"
    if ins is not None:
        pid3 += f"~{ins}^^^ASIP-SANTE-INS-NIR&{oid}&ISO^INS^^20101207"
    pid5 = f"{birth_name}^{first_given}^{given_list}^^^^L"
    if used_name:
        pid5 += f"~{used_name}^{first_given}^^^^^D"
    pid11 = "1 RUE DE TEST^^CLERMONT^^63000^FRA^H"
    if cog is not None:
        pid11 += f"~^^^^^^BDL^^{cog}"
    segs = [
        f"MSH|^~\\&|GAM|CHU-X|DPI|CHU-X|{evn}||ADT^{trigger}^{structure}|{control}|D|2.5^FRA^2.11"
        "|||||FRA|UNICODE UTF-8|FR||2.11^IHE_FRANCE-2.11-PAM",
        f"EVN||{evn}||||{evn}",
        _pid({1: "1", 3: pid3, 5: pid5, 7: dob, 8: sex, 11: pid11, 16: "S", 25: "1", 30: "N",
              32: status, 33: evn}),
    ]
    if mrg is not None:
        segs.append(f"MRG|{mrg}^^^{authority}&000897406&N^PI")
    if trigger not in ("A28", "A31", "A29", "A23", "A40", "A47"):
        segs.append("PV1|1|I|^^^CHU-X&000897406&M^O^^")
    if zfa:
        segs.append(zfa)
    if zfd:
        segs.append(zfd)
    return (sep.join(segs) + sep).encode("utf-8")
