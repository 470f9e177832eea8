"""engine.reports.teleradiology.check_tlr: the four teleradiology flows clean, and each rule broken."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from engine.reports.teleradiology import Problem, check_tlr

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "teleradiology"
FLOWS = {1: "flow1_orm_nw.hl7", 2: "flow2_orm_ca.hl7", 3: "flow3_oru_ok.hl7", 4: "flow4_omi_o23.hl7"}
PHI = ("PAT-TROIS", "DOMINIQUE", "279035121518989", "19790328", "000003")


def sample(flow: int) -> str:
    return (SAMPLES / FLOWS[flow]).read_bytes().decode("utf-8")


def seg_edit(text: str, seg: str, n: int, value: str, occurrence: int = 1) -> str:
    """Set field n of the occurrence-th ``seg`` segment (MSH numbering for MSH)."""
    lines = text.split("\r")
    k = 0
    for i, ln in enumerate(lines):
        if ln.startswith(seg + "|"):
            k += 1
            if k != occurrence:
                continue
            parts = ln.split("|")
            idx = n - 1 if seg == "MSH" else n
            parts.extend([""] * (idx + 1 - len(parts)))
            parts[idx] = value
            lines[i] = "|".join(parts)
            return "\r".join(lines)
    raise AssertionError(f"no {seg} #{occurrence}")


def drop(text: str, pred) -> str:
    return "\r".join(ln for ln in text.split("\r") if not pred(ln))


def check(text: str):
    return check_tlr(text.encode("utf-8"))


@pytest.mark.parametrize("flow", [1, 2, 3, 4])
def test_samples_are_clean(flow):
    r = check_tlr((SAMPLES / FLOWS[flow]).read_bytes())
    assert (r.flow, r.problems, r.ok) == (flow, [], True)
    assert (SAMPLES / FLOWS[flow]).read_bytes().count(b"\n") == 0   # segment separator \r


@pytest.mark.parametrize("flow", [1, 2, 3, 4])
def test_lf_and_8859_15_are_read(flow):
    text = sample(flow).replace("\r", "\n").replace("UNICODE UTF-8", "8859/15")
    r = check_tlr(text.encode("iso8859-15", "replace"), codec="iso8859-15")
    assert (r.flow, r.problems) == (flow, [])


def test_problem_is_a_plain_tuple():
    r = check(seg_edit(sample(1), "MSH", 17, "FR"))
    (p,) = r.problems
    code, location, text, rule = p
    assert isinstance(p, Problem) and (code, location, rule) == ("103", "MSH^1^17", "tlr.msh.fields")
    assert "st-contraintes.md" in text and "FRA" in text


def codes(r):
    return {(p.code, p.location) for p in r.problems}


# (flow, mutation, expected (code, location), guide file cited)
CASES = [
    # common constraints (st-contraintes.md)
    (1, lambda t: seg_edit(t, "MSH", 12, "2.5"), ("203", "MSH^1^12"), "st-contraintes.md"),
    (2, lambda t: seg_edit(t, "MSH", 21, ""), ("101", "MSH^1^21"), "st-contraintes.md"),
    (3, lambda t: seg_edit(t, "MSH", 21, "2.1^CISIS_CDA_HL7_V2"), ("103", "MSH^1^21"), "st-contraintes.md"),
    (4, lambda t: seg_edit(t, "MSH", 21, "2.0^CISIS_TLR_HL7_V2"), ("103", "MSH^1^21^1^1"), "st-contraintes.md"),
    (1, lambda t: seg_edit(t, "MSH", 18, "UTF-8"), ("103", "MSH^1^18"), "st-contraintes.md"),
    (1, lambda t: seg_edit(t, "MSH", 9, "ORM^O01"), ("101", "MSH^1^9^1^3"), "st-contraintes.md"),
    (3, lambda t: seg_edit(t, "MSH", 11, "X"), ("103", "MSH^1^11"), "st-contraintes.md"),
    (4, lambda t: seg_edit(t, "MSH", 6, ""), ("101", "MSH^1^6"), "st-contraintes.md"),
    (1, lambda t: drop(t, lambda ln: ln.startswith("PID")), ("100", "PID"), "st-contraintes.md"),
    (2, lambda t: seg_edit(t, "PID", 5, ""), ("101", "PID^1^5"), "st-contraintes.md"),
    (4, lambda t: drop(t, lambda ln: ln.startswith("PV1")), ("100", "PV1"), "st-contraintes.md"),
    (1, lambda t: seg_edit(t, "PV1", 2, ""), ("101", "PV1^1^2"), "st-contraintes.md"),
    (2, lambda t: seg_edit(t, "PV1", 19, ""), ("101", "PV1^1^19^1^1"), "st-contraintes.md"),
    # flow 1 (st_flux1.md)
    (1, lambda t: seg_edit(t, "ORC", 2, "CMD-1"), ("101", "ORC^1^2^1^3"), "st_flux1.md"),
    (1, lambda t: seg_edit(t, "ORC", 9, ""), ("101", "ORC^1^9"), "st_flux1.md"),
    (1, lambda t: seg_edit(t, "ORC", 12, ""), ("101", "ORC^1^12"), "st_flux1.md"),
    (1, lambda t: t.replace("1.2.250.1.71.4.2.1&ISO", "1.2.3&ISO", 1), ("103", "ORC^1^12^1^9^2"), "st_flux1.md"),
    (1, lambda t: seg_edit(t, "ORC", 17, "PLATEFORME_TLR^^TLR_TYPE_ORGANISATION"), ("103", "ORC^1^17^1^1"), "st_flux1.md"),
    (1, lambda t: seg_edit(t, "ORC", 21, "CENTRE"), ("101", "ORC^1^21^1^10"), "st_flux1.md"),
    (1, lambda t: seg_edit(t, "OBR", 2, "OTHER^RIS-X^1.2.250.1.999.1.1.3^ISO"), ("207", "OBR^1^2"), "st_flux1.md"),
    (1, lambda t: t.replace("TRANSMISSION_DEMANDE^", "REPONSE_DEMANDE^"), ("103", "OBR^1^4^1^1"), "table_obr.md"),
    (1, lambda t: t.replace("^TLR_OBR_PROCEDURE", "^L"), ("103", "OBR^1^4^1^3"), "table_obr.md"),
    (1, lambda t: seg_edit(t, "OBR", 13, ""), ("101", "OBR^1^13"), "st_flux1.md"),
    (1, lambda t: seg_edit(t, "OBR", 16, "899999999999^AUTRE^MEDECIN"), ("207", "OBR^1^16^1^1"), "st_flux1.md"),
    (1, lambda t: drop(t, lambda ln: "MODALITE_IMAGERIE" in ln), ("100", "OBX"), "Modalité"),
    (1, lambda t: drop(t, lambda ln: "REGION_ANATOMIQUE" in ln), ("100", "OBX"), "Localisation anatomique"),
    (1, lambda t: seg_edit(t, "OBX", 2, "ST", occurrence=1), ("102", "OBX^1^2"), "st_flux1.md"),
    (1, lambda t: seg_edit(t, "OBX", 11, "F", occurrence=2), ("103", "OBX^2^11"), "st_flux1.md"),
    (1, lambda t: seg_edit(t, "OBX", 4, "1.3", occurrence=2), ("103", "OBX^2^4"), "st_flux1.md"),
    (1, lambda t: t.replace("^TLR_OBSERVATION|1.1|", "^L|1.1|"), ("103", "OBX^2^3^1^3"), "table_obs.md"),
    # flow 2 (st_flux2.md)
    (2, lambda t: t.replace("ANNULATION_DEMANDE^", "TRANSMISSION_DEMANDE^"), ("103", "OBR^1^4^1^1"), "table_obr.md"),
    (2, lambda t: seg_edit(t, "ORC", 17, ""), ("101", "ORC^1^17^1^1"), "st_flux2.md"),
    (2, lambda t: drop(t, lambda ln: ln.startswith("OBR")), ("100", "ORC^1"), "st-profils.md"),
    # flow 3 (st_flux3.md)
    (3, lambda t: seg_edit(t, "ORC", 17, "STRUCTURE_IMAGERIE^^TLR_TYPE_ORGANISATION"), ("103", "ORC^1^17^1^1"), "st_flux3.md"),
    (3, lambda t: drop(t, lambda ln: ln.startswith("OBX")), ("100", "OBX"), "st_flux3.md"),
    (3, lambda t: seg_edit(t, "OBX", 2, "TX"), ("102", "OBX^1^2"), "st_flux3.md"),
    (3, lambda t: seg_edit(t, "OBX", 11, "O"), ("103", "OBX^1^11"), "st_flux3.md"),
    (3, lambda t: seg_edit(seg_edit(t, "OBX", 2, "ED"), "OBX", 5, "^TEXT^^Base64^@@not base64@@"),
     ("102", "OBX^1^5^1^5"), "st_flux3.md"),
    # flow 4 (st_flux4.md)
    (4, lambda t: drop(t, lambda ln: "URL_PARTIELLE_VIEWER" in ln), ("100", "ORC^1"), "URL de viewer DRIMbox"),
    (4, lambda t: seg_edit(t, "OBX", 2, "TX", occurrence=1), ("102", "OBX^1^2"), "URL de viewer DRIMbox"),
    (4, lambda t: t.replace("^TEXT^^Base64^", "^TEXT^^A^"), ("103", "OBX^1^5^1^4"), "URL de viewer DRIMbox"),
    (4, lambda t: re.sub(r"Base64\^[A-Za-z0-9+/=]+", "Base64^%%%", t), ("102", "OBX^1^5^1^5"), "URL de viewer DRIMbox"),
    (4, lambda t: drop(t, lambda ln: "CODE_ACTE_IMAGERIE" in ln), ("100", "ORC^1"), "Acte d'imagerie"),
    (4, lambda t: t.replace("24627-2^CT Thorax^LN", "24627-2^CT Thorax^SCT"), ("103", "OBX^2^5^1^3"), "Acte d'imagerie"),
    (4, lambda t: drop(t, lambda ln: ln.startswith("TQ1")), ("100", "ORC^1"), "TQ1"),
    (4, lambda t: seg_edit(t, "TQ1", 6, ""), ("101", "TQ1^1^6"), "TQ1"),
    (4, lambda t: seg_edit(t, "TQ1", 7, ""), ("101", "TQ1^1^7"), "TQ1"),
    (4, lambda t: drop(t, lambda ln: ln.startswith("IPC")), ("100", "ORC^1"), "IPC"),
    (4, lambda t: seg_edit(t, "IPC", 3, ""), ("101", "IPC^1^3^1^1"), "IPC"),
    (4, lambda t: t.replace("ACC-20260106-0001^RIS-X^1.2.250.1.999.1.1.4^ISO", "ACC-20260106-0001"),
     ("101", "IPC^1^1^1^3"), "IPC"),
    (4, lambda t: seg_edit(t, "OBX", 11, "O", occurrence=3), ("103", "OBX^3^11"), "st_flux4.md"),
    (4, lambda t: drop(t, lambda ln: "|1.2|LOT" in ln), ("207", "OBX^4^4"), "Produit administré"),
    (4, lambda t: t.replace("V09^Produits de diagnostic^ATC", "V08^Produits de contraste^ATC"),
     ("103", "OBX^4^5^1^1"), "Produit administré"),
    (4, lambda t: seg_edit(t, "OBX", 4, "", occurrence=5), ("101", "OBX^5^4"), "sub-id.md"),
    (4, lambda t: seg_edit(t, "ORC", 2, ""), ("101", "ORC^1^2"), "st_flux4.md"),
]


@pytest.mark.parametrize("flow,mutate,expected,cited", CASES,
                         ids=[f"flow{c[0]}-{c[2][0]}-{c[2][1]}" for c in CASES])
def test_broken_variant_gives_its_problem(flow, mutate, expected, cited):
    text = mutate(sample(flow))
    assert text != sample(flow)
    r = check(text)
    assert r.flow == flow
    assert expected in codes(r), r.problems
    p = next(p for p in r.problems if (p.code, p.location) == expected)
    assert cited in p.text, p.text
    for p in r.problems:
        assert not any(x in p.text for x in PHI), p.text


@pytest.mark.parametrize("flow,oc,code", [(1, "XO", "103"), (3, "CA", "103"), (4, "", "101")])
def test_order_control_decides_the_flow(flow, oc, code):
    r = check(seg_edit(sample(flow), "ORC", 1, oc))
    assert r.flow is None and (code, "ORC^1^1") in codes(r)
    assert "st_worklfow.md" in r.problems[0].text


def test_flow_from_orc1():
    assert check(seg_edit(sample(1), "ORC", 1, "CA")).flow == 2
    refused = seg_edit(sample(3), "ORC", 1, "OC")
    r = check(drop(refused, lambda ln: ln.startswith("OBX")))
    assert (r.flow, r.order_control, r.problems) == (3, "OC", [])    # refusal: protocol optional


def test_flow3_encapsulated_protocol_and_no_visit():
    pdf = base64.b64encode(b"%PDF-1.4 protocole").decode()
    text = seg_edit(seg_edit(sample(3), "OBX", 2, "ED"), "OBX", 5, "^TEXT^^Base64^" + pdf)
    text = drop(text, lambda ln: ln.startswith("PV1"))        # VISIT is optional in ORU_R01
    assert check(text).problems == []


def test_flow4_repeated_order_groups_each_checked():
    t = sample(4)
    lines = t.rstrip("\r").split("\r")
    order = lines[lines.index(next(x for x in lines if x.startswith("ORC"))):]
    second = [ln.replace("ACC-20260106-0001", "ACC-20260106-0002") for ln in order]
    r = check("\r".join(lines + second) + "\r")
    assert (r.flow, r.problems) == (4, [])
    broken = [ln for ln in second if "URL_PARTIELLE_VIEWER" not in ln]
    r = check("\r".join(lines + broken) + "\r")
    assert [(p.code, p.location) for p in r.problems] == [("100", "ORC^2")]


def test_not_a_teleradiology_message():
    adt = (ROOT / "samples" / "adt_a28.hl7").read_bytes()
    r = check_tlr(adt)
    assert r.flow is None and r.problems[0].code == "200" and not r.ok
    mdm = "MSH|^~\\&|A|B|C|D|2026||ORM^O02^ORM_O02|1|P|2.5.1\rPID|||1\r"
    assert check(mdm).problems[0].code == "201"
    assert check_tlr(b"").problems[0].code == "100"
    # the older (non-teleradiology) ORM sample is an ORM^O01 but breaks the guide's header rules
    r = check_tlr((ROOT / "samples" / "orm_o01.hl7").read_bytes())
    assert r.flow == 1 and ("203", "MSH^1^12") in codes(r) and ("101", "MSH^1^21") in codes(r)
