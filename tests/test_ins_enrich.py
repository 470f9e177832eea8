"""ins_enrich: INS and strict traits from the identity registry (fake lookup), CI-SIS 903/904/905.

The registry is faked with a callable that has the signature of the delivery worker's
``ctx.extras["identity_lookup"]`` and returns ``IdentityView.to_json()``-shaped dicts. Identities
are the public ANS test patient of the corpus (test OID .10) or invented (``SYNTH-…``).
"""
from __future__ import annotations

import copy
import re

import pytest

from engine.transforms import TransformContext, TransformError, build_chain, validate_specs
from engine.transforms.ins_enrich import INS_AUTHORITY_NAMES
from tests.conftest import CORPUS
from tests.test_identity_support import OID_NIA, OID_NIR, OID_TEST, SYNTH_NIR_F, SYNTH_NIR_M

MDM_DIR = CORPUS / "ans-hl7v2" / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1" / "MDM"
MDM_SMALL = MDM_DIR / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1.er7"
MDM_B64 = MDM_DIR / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1_Base64.er7"

CORPUS_INS = "279035121518989"
CORPUS_INS_REP = f"{CORPUS_INS}^^^ASIP-SANTE-INS-NIR&{OID_TEST}&ISO^INS^^20101207"
IPP_REP = "000003^^^CHU-X&000897406&N^PI"

PAT_TROIS = {
    "id": 1, "ipp": "000003", "ipp_authority": "CHU-X", "ipp_finess": "000897406",
    "ins": {"value": CORPUS_INS, "oid": OID_TEST, "kind": "NIR_TEST"}, "ins_rejected_reason": None,
    "birth_name": "PAT-TROIS", "first_given_name": "DOMINIQUE", "given_names": ["DOMINIQUE"],
    "used_name": None, "used_given_name": None, "birth_date": "1979-03-28", "sex": "F",
    "birth_place_cog": "63220", "status": "VALI", "status_raw": ["VALI"], "active": True,
    "merged_from": [], "identifiers": [], "history": [],
}

SYNTH = {
    "id": 2, "ipp": "900001", "ipp_authority": "CHU-X", "ipp_finess": "000897406",
    "ins": {"value": SYNTH_NIR_F, "oid": OID_NIR, "kind": "NIR"}, "ins_rejected_reason": None,
    "birth_name": "SYNTH-UN", "first_given_name": "ALEX", "given_names": ["ALEX", "CAMILLE"],
    "used_name": "SYNTH-USAGE", "used_given_name": "ALEX", "birth_date": "1985-07-12", "sex": "F",
    "birth_place_cog": "63220", "status": "QUAL", "status_raw": ["QUAL"], "active": True,
    "merged_from": [], "identifiers": [], "history": [],
}


class FakeRegistry:
    """``identity_lookup(ipp, authority=None, *, ins=None) -> dict | None``, recording calls."""

    def __init__(self, *identities: dict, ambiguous: bool = False):
        self.identities = [copy.deepcopy(i) for i in identities]
        self.calls: list[tuple] = []
        self.ambiguous = ambiguous

    def __call__(self, ipp, authority=None, *, ins=None):
        self.calls.append((ipp, authority, ins))
        if self.ambiguous:
            raise LookupError("2 identities match; give the assigning authority")
        for ident in self.identities:
            if ins is not None:
                if ident.get("ins") and ident["ins"]["value"] == ins:
                    return copy.deepcopy(ident)
            elif ident["ipp"] == ipp and (authority is None or ident["ipp_authority"] == authority):
                return copy.deepcopy(ident)
        return None


def ctx(lookup=None, codec="utf-8"):
    extras = {} if lookup is None else {"identity_lookup": lookup}
    return TransformContext(message_id=1, channel="in", destination="dmp", codec=codec, extras=extras)


def enrich(raw: bytes, lookup, codec="utf-8", **params):
    return build_chain([{"type": "ins_enrich", **params}])(raw, ctx(lookup, codec))


def segments(raw: bytes) -> list[bytes]:
    return raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")


def pid(raw: bytes) -> list[str]:
    seg = next(s for s in segments(raw) if s.startswith(b"PID|"))
    return seg.decode("utf-8").split("|")


def _pid_span(raw: bytes) -> tuple[int, int]:
    m = re.search(rb"(?:^|[\r\n])(PID\|[^\r\n]*)", raw)
    return m.start(1), m.end(1)


def assert_same_outside_pid(before: bytes, after: bytes) -> None:
    """Every byte outside the PID segment is unchanged (same segments, same separators)."""
    (b0, b1), (a0, a1) = _pid_span(before), _pid_span(after)
    assert after[:a0] == before[:b0]
    assert after[a1:] == before[b1:]


def mdm_without_ins(path=MDM_SMALL) -> bytes:
    """The corpus MDM with its PID-3 INS repetition replaced by the IPP (PID-3 lacks the INS)."""
    raw = path.read_bytes()
    assert raw.count(CORPUS_INS_REP.encode()) == 1
    return raw.replace(CORPUS_INS_REP.encode(), IPP_REP.encode())


def synth_msg(msg_type="ORM^O01^ORM_O01", pid3="900001^^^CHU-X&000897406&N^PI", pid5="SYNTH-UN^ALEX^ALEX CAMILLE^^^^L",
              dob="19850712", sex="F", pid11="1 RUE DE TEST^^CLERMONT^^63000^FRA^H~^^^^^^BDL^^63220",
              status="QUAL", sep="\r") -> bytes:
    fields = ["PID", "1", "", pid3, "", pid5, "", dob, sex, "", "", pid11] + [""] * 20 + [status]
    segs = [
        f"MSH|^~\\&|RIS|CHU-X|PFI|CHU-X|20240401100000||{msg_type}|ORD1|P|2.5|||||FRA|UNICODE UTF-8",
        "|".join(fields),
        "PV1|1|O|RADIO",
        "ORC|NW|CMD-1",
        "OBR|1|CMD-1||IRM^IRM genou",
    ]
    return (sep.join(segs) + sep).encode("utf-8")


# ------------------------------------------------------------------------------------------
# qualified identity
# ------------------------------------------------------------------------------------------


def test_mdm_ipp_only_gets_the_ins_and_every_other_byte_is_identical():
    raw = mdm_without_ins(MDM_B64)
    reg = FakeRegistry(PAT_TROIS)
    res = enrich(raw, reg)
    assert pid(res.payload)[3] == (f"{IPP_REP}~{CORPUS_INS}^^^ASIP-SANTE-INS-NIR&{OID_TEST}&ISO^INS")
    assert_same_outside_pid(raw, res.payload)
    # the CDA (OBX-5, base64) is byte-identical
    obx = [s for s in segments(raw) if s.startswith(b"OBX|1|ED")]
    assert len(obx) == 1 and obx[0] in res.payload and len(obx[0]) > 300_000
    # and the PID is otherwise the same: only PID-3 changed (traits already right)
    before, after = pid(raw), pid(res.payload)
    assert [f for n, f in enumerate(after) if n != 3] == [f for n, f in enumerate(before) if n != 3]
    assert reg.calls == [("000003", "CHU-X", None)]
    assert "ins_enrich: INS added to PID-3" in res.notes


def test_corpus_mdm_with_the_right_ins_is_returned_as_the_same_bytes_object():
    raw = MDM_SMALL.read_bytes()
    reg = FakeRegistry(PAT_TROIS)
    res = enrich(raw, reg)
    assert res.payload is raw
    assert reg.calls == [(None, None, CORPUS_INS)]  # no PI repetition: found by the INS


@pytest.mark.parametrize("oid,name", [(OID_NIR, "ASIP-SANTE-INS-NIR"), (OID_NIA, "ASIP-SANTE-INS-NIA"),
                                      (OID_TEST, "ASIP-SANTE-INS-NIR")])
def test_ins_repetition_names_its_authority_per_oid(oid, name):
    ident = dict(SYNTH, ins={"value": SYNTH_NIR_F, "oid": oid, "kind": "X"})
    res = enrich(synth_msg(), FakeRegistry(ident))
    assert pid(res.payload)[3].split("~")[1] == f"{SYNTH_NIR_F}^^^{name}&{oid}&ISO^INS"
    assert INS_AUTHORITY_NAMES[oid] == name


@pytest.mark.parametrize("msg_type", ["ORM^O01^ORM_O01", "ORU^R01^ORU_R01", "OMI^O23^OMI_O23", "MDM^T02^MDM_T02"])
def test_strict_traits_are_set_from_the_registry(msg_type):
    raw = synth_msg(msg_type, pid5="OTHER^X~SYNTH-USAGE^ALEX^^^^^D", dob="", sex="U",
                    pid11="1 RUE DE TEST^^CLERMONT^^63000^FRA^H", status="PROV")
    res = enrich(raw, FakeRegistry(SYNTH))
    p = pid(res.payload)
    assert p[3] == f"900001^^^CHU-X&000897406&N^PI~{SYNTH_NIR_F}^^^ASIP-SANTE-INS-NIR&{OID_NIR}&ISO^INS"
    # L repetition first (XPN-1 birth name, XPN-2 first given name, XPN-3 list), D and others kept
    assert p[5] == "SYNTH-UN^ALEX^ALEX CAMILLE^^^^L~SYNTH-USAGE^ALEX^^^^^D"
    assert p[7] == "19850712" and p[8] == "F"
    assert p[11] == "1 RUE DE TEST^^CLERMONT^^63000^FRA^H~^^^^^^BDL^^63220"
    assert p[32] == "QUAL"
    assert_same_outside_pid(raw, res.payload)
    assert any("PID-5" in n and "PID-32" in n for n in res.notes)


def test_existing_l_repetition_components_are_fixed_in_place_and_extras_kept():
    raw = synth_msg(pid5="WRONG&PFX^ALEX^ALEX^^^^L^^^^^^XX~SYNTH-USAGE^ALEX^^^^^D",
                    pid11="^^^^^^BDL^^99999~1 RUE^^X^^63000^FRA^H", dob="198507121030")
    p = pid(enrich(raw, FakeRegistry(SYNTH)).payload)
    assert p[5] == "SYNTH-UN&PFX^ALEX^ALEX CAMILLE^^^^L^^^^^^XX~SYNTH-USAGE^ALEX^^^^^D"
    assert p[11] == "^^^^^^BDL^^63220~1 RUE^^X^^63000^FRA^H"
    assert p[7] == "198507121030"  # date part already right: the time is kept


def test_values_are_hl7_escaped():
    ident = dict(SYNTH, birth_name="SYNTH^DEUX&CO")
    p = pid(enrich(synth_msg(), FakeRegistry(ident)).payload)
    assert p[5].startswith("SYNTH\\S\\DEUX\\T\\CO^ALEX^")


def test_short_pid_is_padded_to_pid_32():
    raw = (b"MSH|^~\\&|RIS|CHU-X|PFI|CHU-X|20240401||ORU^R01^ORU_R01|R1|P|2.5\r"
           b"PID|1||900001^^^CHU-X^PI\rOBR|1\r")
    p = pid(enrich(raw, FakeRegistry(SYNTH)).payload)
    assert len(p) == 33 and p[32] == "QUAL" and p[7] == "19850712" and p[11] == "^^^^^^BDL^^63220"
    assert p[5] == "SYNTH-UN^ALEX^ALEX CAMILLE^^^^L"


def test_matching_existing_ins_is_kept_as_sent():
    rep = f"{SYNTH_NIR_F}^^^ASIP-SANTE-INS-NIR&{OID_NIR}&ISO^INS^^20200101"
    raw = synth_msg(pid3=f"900001^^^CHU-X&000897406&N^PI~{rep}")
    res = enrich(raw, FakeRegistry(SYNTH))
    assert res.payload is raw


# ------------------------------------------------------------------------------------------
# 903 / 904 / 905
# ------------------------------------------------------------------------------------------


def test_absent_identity_is_903_without_patient_data():
    with pytest.raises(TransformError) as exc:
        enrich(mdm_without_ins(), FakeRegistry())
    msg = str(exc.value)
    assert msg.startswith("903: ")
    for phi in ("000003", "PAT-TROIS", CORPUS_INS, "DOMINIQUE"):
        assert phi not in msg


def test_absent_identity_not_required_strips_the_unverifiable_ins_or_passes():
    raw = synth_msg(pid3=f"900009^^^CHU-X^PI~{SYNTH_NIR_M}^^^ASIP-SANTE-INS-NIR&{OID_NIR}&ISO^INS")
    res = enrich(raw, FakeRegistry(), require_ins=False)
    assert pid(res.payload)[3] == "900009^^^CHU-X^PI"
    assert_same_outside_pid(raw, res.payload)
    res = enrich(raw, FakeRegistry(), require_ins=False, strip_unqualified=False)
    assert res.payload is raw
    plain = synth_msg(pid3="900009^^^CHU-X^PI")
    assert enrich(plain, FakeRegistry(), require_ins=False).payload is plain


UNQUALIFIED = dict(SYNTH, ins=None, status="PROV", status_raw=["PROV"],
                   ins_rejected_reason="INS not taken: PID-32 INS-NOT-QUALIFIED")


def test_unqualified_identity_is_903_when_required():
    with pytest.raises(TransformError, match=r"^903: .*no qualified INS"):
        enrich(synth_msg(), FakeRegistry(UNQUALIFIED))


def test_unqualified_identity_strip_removes_every_ins_repetition():
    ins_rep = f"{SYNTH_NIR_F}^^^ASIP-SANTE-INS-NIR&{OID_NIR}&ISO^INS"
    raw = synth_msg(pid3=f"{ins_rep}~900001^^^CHU-X&000897406&N^PI~{ins_rep}", status="PROV")
    res = enrich(raw, FakeRegistry(UNQUALIFIED), require_ins=False)
    assert pid(res.payload)[3] == "900001^^^CHU-X&000897406&N^PI"
    assert pid(res.payload)[5] == pid(raw)[5]  # unqualified: traits not rewritten
    assert_same_outside_pid(raw, res.payload)
    assert any("2 INS repetition(s) removed" in n for n in res.notes)
    kept = enrich(raw, FakeRegistry(UNQUALIFIED), require_ins=False, strip_unqualified=False)
    assert kept.payload is raw


@pytest.mark.parametrize("ident", [
    dict(SYNTH, status="VALI", status_raw=["VALI", "DOUT"]),
    dict(SYNTH, status="RECUP", status_raw=["RECUP"]),
    dict(SYNTH, active=False),
])
def test_doubtful_recovered_or_deactivated_identities_are_not_qualified(ident):
    with pytest.raises(TransformError, match=r"^903: "):
        enrich(synth_msg(), FakeRegistry(ident))


def test_ambiguous_ipp_is_903():
    with pytest.raises(TransformError, match=r"^903: "):
        enrich(synth_msg(pid3="900001^^^^PI"), FakeRegistry(SYNTH, ambiguous=True))


@pytest.mark.parametrize("rep,what", [
    (f"{SYNTH_NIR_M}^^^ASIP-SANTE-INS-NIR&{OID_NIR}&ISO^INS", "matricule"),
    (f"{SYNTH_NIR_F}^^^ASIP-SANTE-INS-NIR&{OID_TEST}&ISO^INS", "OID"),
])
def test_ins_not_matching_the_registry_is_904(rep, what):
    raw = synth_msg(pid3=f"900001^^^CHU-X&000897406&N^PI~{rep}")
    with pytest.raises(TransformError) as exc:
        enrich(raw, FakeRegistry(SYNTH))
    msg = str(exc.value)
    assert msg.startswith("904: INS in PID-3[2]") and what in msg
    assert SYNTH_NIR_M not in msg and SYNTH_NIR_F not in msg and "900001" not in msg


@pytest.mark.parametrize("field,value,named", [
    ("birth_place_cog", None, "birth place"), ("given_names", [], "given names"),
    ("birth_date", None, "birth date"), ("sex", "U", "sex"), ("birth_name", None, "birth name"),
    ("first_given_name", None, "first birth given name"),
])
def test_incomplete_traits_are_905(field, value, named):
    ident = dict(SYNTH, **{field: value})
    with pytest.raises(TransformError) as exc:
        enrich(synth_msg(), FakeRegistry(ident))
    assert str(exc.value).startswith("905: ") and named in str(exc.value)
    assert "SYNTH" not in str(exc.value)
    # check_traits: false lets it through with what the registry has
    res = enrich(synth_msg(), FakeRegistry(ident), check_traits=False)
    assert SYNTH_NIR_F in pid(res.payload)[3]


# ------------------------------------------------------------------------------------------
# lookup, message types, byte exactness
# ------------------------------------------------------------------------------------------


def test_ipp_authority_param_selects_and_completes_the_pi_repetition():
    reg = FakeRegistry(SYNTH)
    raw = synth_msg(pid3="777^^^OTHER-HOSP^PI~900001^^^^PI")
    res = enrich(raw, reg, ipp_authority="CHU-X")
    assert reg.calls == [("900001", "CHU-X", None)]  # OTHER-HOSP skipped, bare PI under CHU-X
    assert SYNTH_NIR_F in pid(res.payload)[3]


def test_unknown_ipp_falls_back_to_the_ins_lookup():
    reg = FakeRegistry(SYNTH)
    rep = f"{SYNTH_NIR_F}^^^ASIP-SANTE-INS-NIR&{OID_NIR}&ISO^INS"
    raw = synth_msg(pid3=f"123456^^^CHU-X^PI~{rep}")
    res = enrich(raw, reg)
    assert reg.calls == [("123456", "CHU-X", None), (None, None, SYNTH_NIR_F)]
    assert res.payload is raw


def test_oid_authority_is_used_when_cx4_1_is_empty():
    reg = FakeRegistry(dict(SYNTH, ipp_authority="1.2.250.1.999"))
    enrich(synth_msg(pid3="900001^^^&1.2.250.1.999&ISO^PI"), reg)
    assert reg.calls[0] == ("900001", "1.2.250.1.999", None)


@pytest.mark.parametrize("mt", ["ADT^A01^ADT_A01", "ACK^A01^ACK", "SIU^S12^SIU_S12"])
def test_other_message_types_pass_untouched_without_lookup(mt):
    raw = synth_msg(mt, pid3="000001^^^X^PI")
    reg = FakeRegistry()
    res = enrich(raw, reg)
    assert res.payload is raw and reg.calls == []


@pytest.mark.parametrize("sep", ["\n", "\r\n"])
def test_lf_and_crlf_separators_and_invalid_bytes_outside_pid_survive(sep):
    raw = synth_msg(sep=sep, pid5="SYNTH-UN^ALEX^^^^^L")
    raw = raw.replace(b"IRM genou", b"IRM genou \xe9\xff caf\xc3\xa9")  # invalid UTF-8 + valid UTF-8
    res = enrich(raw, FakeRegistry(SYNTH))
    assert pid(res.payload)[5] == "SYNTH-UN^ALEX^ALEX CAMILLE^^^^L"
    before, after = raw.split(sep.encode()), res.payload.split(sep.encode())
    assert len(before) == len(after)
    for b, a in zip(before, after):
        if not b.startswith(b"PID|"):
            assert a == b


def test_latin1_message_codec():
    raw = synth_msg().replace(b"UNICODE UTF-8", b"8859/1").replace(b"IRM genou", b"IRM \xe9paule")
    res = enrich(raw, FakeRegistry(SYNTH), codec="latin-1")
    assert b"IRM \xe9paule" in res.payload and SYNTH_NIR_F.encode() in res.payload


def test_no_pid_segment():
    raw = b"MSH|^~\\&|RIS|CHU-X|PFI|CHU-X|20240401||ORU^R01^ORU_R01|R1|P|2.5\rOBR|1\r"
    with pytest.raises(TransformError, match=r"^903: "):
        enrich(raw, FakeRegistry())
    assert enrich(raw, FakeRegistry(), require_ins=False).payload is raw


def test_without_a_registry_the_transform_fails_loudly():
    with pytest.raises(TransformError, match="no identity registry"):
        build_chain([{"type": "ins_enrich"}])(synth_msg(), TransformContext())


def test_params_are_validated():
    assert validate_specs([{"type": "ins_enrich"}]) == []
    assert validate_specs([{"type": "ins_enrich", "require_ins": False, "strip_unqualified": False,
                            "check_traits": False, "ipp_authority": "CHU-X"}]) == []
    problems = validate_specs([{"type": "ins_enrich", "require_ins": "yes", "bogus": 1}])
    assert {p.path for p in problems} == {"[0].require_ins", "[0].bogus"}
