"""INS rules (engine/identity/ins.py): one test group per rule, on the corpus and synthetic ADT."""
from __future__ import annotations

import pytest

from engine.identity import InsPolicy, check_identity, ins_decision, nir_key, parse_adt, usable_ins
from engine.identity.ins import birth_date_has_zero_part, nir_format_problem
from tests.test_identity_support import (
    CORPUS_INS,
    OID_DEMO,
    OID_NIA,
    OID_NIR,
    OID_TEST,
    SGL,
    SYNTH_NIR_F,
    SYNTH_NIR_M,
    adt,
    corpus_files,
    make_nir,
)

TEST_ENV = InsPolicy(environment="test")
PROD = InsPolicy(environment="production")


def rules(violations):
    return {(v.field, v.rule, v.severity) for v in violations}


def assert_no_phi(violations, *values):
    for v in violations:
        for value in values:
            assert value not in v.text


# --- NIR key and format ------------------------------------------------------------------

def test_corpus_ins_key_is_valid():
    assert nir_key(CORPUS_INS[:13]) == int(CORPUS_INS[13:]) == 89
    assert nir_format_problem(CORPUS_INS) is None


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_every_corpus_adt_passes_in_test_environment(path):
    ev = parse_adt(path.read_bytes())
    assert check_identity(ev, TEST_ENV) == []
    assert usable_ins(ev, TEST_ENV).value == CORPUS_INS


def test_mutated_key_fails():
    bad = CORPUS_INS[:13] + "88"
    assert nir_format_problem(bad)
    raw = (SGL / "admission.er7").read_bytes().replace(CORPUS_INS.encode(), bad.encode())
    ev = parse_adt(raw)
    vs = check_identity(ev, TEST_ENV)
    assert ("PID-3[2].1", "INS-FORMAT", "E") in rules(vs)
    d = ins_decision(ev, TEST_ENV)
    assert d.ins is None and "INS-FORMAT" in d.reason
    assert_no_phi(vs, bad, "PAT-TROIS")


def test_mutated_body_fails():
    bad = "1" + CORPUS_INS[1:]  # first digit changed, key kept
    assert nir_format_problem(bad) is not None


@pytest.mark.parametrize("value", [
    "253072A07300443",  # Corsica 2A (key computed with 19), python-stdnum doctest vector
    "253072B07300470",  # Corsica 2B (key computed with 18)
])
def test_corsica_vectors(value):
    assert nir_format_problem(value) is None
    assert nir_key(value[:13]) == int(value[13:])


def test_corsica_substitution():
    body = "185052A123456"
    assert nir_key(body) == 97 - int("1850519123456") % 97
    assert nir_key(body.replace("2A", "2B")) == 97 - int("1850518123456") % 97
    ev = parse_adt(adt(ins=make_nir(body), sex="M", cog="2A004"))
    assert check_identity(ev, TEST_ENV) == []
    # The same digits with 2A read as a plain number would give another key.
    wrong = body + f"{97 - int(body.replace('2A', '20')) % 97:02d}"
    assert nir_format_problem(wrong) is not None


@pytest.mark.parametrize("value", [
    "27903512151898",  # 14 characters
    "2790351215189890",  # 16 characters
    "2790351215X8989",  # letter outside the department
    "27903_121518989",
    "279032C21518989",  # 2C is not a Corsican department
])
def test_malformed_matricule(value):
    assert nir_format_problem(value) is not None
    ev = parse_adt(adt(ins=value))
    assert ("PID-3[2].1", "INS-FORMAT", "E") in rules(check_identity(ev, TEST_ENV))
    assert usable_ins(ev, TEST_ENV) is None


def test_nir_first_digit():
    # 7/8 = temporary numbers: a warning under a NIR OID, the INS is still taken.
    ev = parse_adt(adt(ins=make_nir("8850763220123"), oid=OID_NIR))
    vs = check_identity(ev, TEST_ENV)
    assert rules(vs) == {("PID-3[2].1", "INS-NIR-FIRST-DIGIT", "W")}
    assert usable_ins(ev, TEST_ENV) is not None
    # 5 is not a NIR first digit.
    ev = parse_adt(adt(ins=make_nir("5850763220123"), oid=OID_NIR))
    assert ("PID-3[2].1", "INS-FORMAT", "E") in rules(check_identity(ev, TEST_ENV))


def test_nia_format():
    ev = parse_adt(adt(ins=make_nir("8850799123123"), oid=OID_NIA, cog="99134"))
    assert ev.ins.kind == "NIA"
    assert check_identity(ev, PROD) == []
    ev = parse_adt(adt(ins=make_nir("8850799123123")[:-2] + "00", oid=OID_NIA, cog="99134"))
    assert ("PID-3[2].1", "INS-FORMAT", "E") in rules(check_identity(ev, PROD))
    ev = parse_adt(adt(ins=make_nir("9850799123123"), oid=OID_NIA, cog="99134"))
    assert ("PID-3[2].1", "INS-FORMAT", "E") in rules(check_identity(ev, PROD))


def test_sex_coherence_warning():
    ev = parse_adt(adt(ins=SYNTH_NIR_M, sex="F"))
    vs = check_identity(ev, TEST_ENV)
    assert rules(vs) == {("PID-8", "INS-SEX-COHERENCE", "W")}
    assert usable_ins(ev, TEST_ENV) is not None


# --- OID and environment ------------------------------------------------------------------

@pytest.mark.parametrize("oid", [OID_TEST, OID_DEMO])
def test_production_refuses_test_and_demo_oids(oid):
    ev = parse_adt(adt(oid=oid))
    vs = check_identity(ev, PROD)
    assert rules(vs) == {("PID-3[2].4.2", "INS-OID-ENVIRONMENT", "E")}
    assert usable_ins(ev, PROD) is None
    allowed = InsPolicy(environment="production", allow_test_ins=True)
    assert check_identity(ev, allowed) == []
    assert usable_ins(ev, allowed) is not None


def test_corpus_refused_in_production():
    ev = parse_adt((SGL / "admission.er7").read_bytes())
    assert rules(check_identity(ev, PROD)) == {("PID-3[2].4.2", "INS-OID-ENVIRONMENT", "E")}


@pytest.mark.parametrize("oid,kind", [(OID_NIR, "NIR"), (OID_NIA, "NIA"), (OID_TEST, "NIR_TEST"),
                                      (OID_DEMO, "NIR_DEMO")])
def test_test_environment_accepts_the_four_oids(oid, kind):
    ev = parse_adt(adt(oid=oid))
    assert ev.ins.kind == kind
    assert check_identity(ev, TEST_ENV) == []


def test_production_accepts_nir_oid():
    assert check_identity(parse_adt(adt(oid=OID_NIR)), PROD) == []


@pytest.mark.parametrize("policy", [TEST_ENV, PROD])
def test_unknown_oid_refused(policy):
    ev = parse_adt(adt(oid="1.2.250.1.213.1.4.2"))  # the old INS-NIA OID of a stray FR Core file
    assert ("PID-3[2].4.2", "INS-OID", "E") in rules(check_identity(ev, policy))


# --- identity status ------------------------------------------------------------------------

def test_qual_is_qualified():
    ev = parse_adt(adt(status="QUAL"))
    assert check_identity(ev, InsPolicy(environment="test", vali_counts_as_qualified=False)) == []


def test_vali_flag():
    ev = parse_adt(adt(status="VALI"))
    assert usable_ins(ev, TEST_ENV) is not None  # default: VALI + INS accepted (PAM FR 2.11 examples)
    strict = InsPolicy(environment="test", vali_counts_as_qualified=False)
    assert rules(check_identity(ev, strict)) == {("PID-32", "INS-NOT-QUALIFIED", "E")}
    assert usable_ins(ev, strict) is None


@pytest.mark.parametrize("status", ["PROV", "RECUP", "VIDE", "DESA", ""])
def test_unqualified_status_with_ins(status):
    ev = parse_adt(adt(status=status))
    # Issue 3 item 3: a rule break, answered AE by default (unqualified_ins_answer="error").
    vs = check_identity(ev, TEST_ENV)
    assert rules(vs) == {("PID-32", "INS-NOT-QUALIFIED", "E")}
    d = ins_decision(ev, TEST_ENV)
    assert d.ins is None and "INS-NOT-QUALIFIED" in d.reason
    # Configured as a warning: AA + ERR severity W, the INS is still not taken.
    warn = InsPolicy(environment="test", unqualified_ins_answer="warning")
    assert rules(check_identity(ev, warn)) == {("PID-32", "INS-NOT-QUALIFIED", "W")}
    assert usable_ins(ev, warn) is None


@pytest.mark.parametrize("status,attr", [("VALI~DOUT", "DOUT"), ("QUAL~FICT", "FICT"),
                                         ("DOUT~QUAL", "DOUT")])
def test_doubtful_or_fictitious(status, attr):
    ev = parse_adt(adt(status=status))
    assert rules(check_identity(ev, TEST_ENV)) == {("PID-32", f"INS-STATUS-{attr}", "E")}
    assert usable_ins(ev, TEST_ENV) is None
    warn = InsPolicy(environment="test", unqualified_ins_answer="warning")
    assert rules(check_identity(ev, warn)) == {("PID-32", f"INS-STATUS-{attr}", "W")}
    assert usable_ins(ev, warn) is None


def test_qual_without_ins_warns():
    ev = parse_adt(adt(ins=None, status="QUAL"))
    assert rules(check_identity(ev, TEST_ENV)) == {("PID-32", "INS-QUAL-WITHOUT-INS", "W")}


def test_no_ins_no_trait_rules():
    ev = parse_adt(adt(ins=None, status="PROV", cog=None, given_list=""))
    assert check_identity(ev, TEST_ENV) == []


# --- strict traits ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(birth_name=""), "PID-5[1].1"),
    (dict(first_given=""), "PID-5[1].2"),
    (dict(given_list=""), "PID-5[1].3"),
    (dict(dob=""), "PID-7"),
    (dict(sex="U"), "PID-8"),
    (dict(sex=""), "PID-8"),
    (dict(cog=None), "PID-11"),
    (dict(cog=""), "PID-11[2].9"),
])
def test_missing_strict_traits(kwargs, field):
    ev = parse_adt(adt(**kwargs))
    vs = check_identity(ev, TEST_ENV)
    assert (field, "INS-STRICT-TRAITS", "E") in rules(vs)
    assert usable_ins(ev, TEST_ENV) is None
    assert_no_phi(vs, SYNTH_NIR_F, "SYNTH-UN", "ALEX", "19850712")


def test_no_birth_name_repetition():
    raw = adt().replace(b"^^^^L", b"^^^^D")
    vs = check_identity(parse_adt(raw), TEST_ENV)
    assert ("PID-5", "INS-STRICT-TRAITS", "E") in rules(vs)


def test_born_abroad_country_code():
    ev = parse_adt(adt(cog="99134"))  # INSEE country code (Spain)
    assert check_identity(ev, TEST_ENV) == []


@pytest.mark.parametrize("cog", ["6322", "ABCDE", "632201"])
def test_bad_birth_place_code(cog):
    vs = check_identity(parse_adt(adt(cog=cog)), TEST_ENV)
    assert ("PID-11[2].9", "INS-BIRTH-PLACE", "E") in rules(vs)


def test_given_list_must_start_with_first_given_name():
    vs = check_identity(parse_adt(adt(given_list="CAMILLE ALEX")), TEST_ENV)
    assert rules(vs) == {("PID-5[1].3", "INS-STRICT-TRAITS", "W")}


# --- birth date -------------------------------------------------------------------------------

@pytest.mark.parametrize("dob", ["19790230", "19791301", "19790332", "1979", "197903", "ABCDEFGH"])
def test_impossible_birth_date(dob):
    ev = parse_adt(adt(dob=dob))
    assert ev.traits.birth_date is None and ev.traits.birth_date_raw == dob
    vs = check_identity(ev, TEST_ENV)
    assert ("PID-7", "BIRTH-DATE-INVALID", "E") in rules(vs)
    assert usable_ins(ev, TEST_ENV) is None
    # Without an INS the date is still reported, and nothing else.
    assert rules(check_identity(parse_adt(adt(dob=dob, ins=None, status="PROV")), TEST_ENV)) == {
        ("PID-7", "BIRTH-DATE-INVALID", "E")}


def test_birth_date_with_time_is_fine():
    ev = parse_adt(adt(dob="198507121030"))
    assert check_identity(ev, TEST_ENV) == []


# --- rule 11: 00 day or month ---------------------------------------------------------------

@pytest.mark.parametrize("dob", ["19850700", "19850012", "19850000"])
def test_rule_11_warning_by_default(dob):
    ev = parse_adt(adt(dob=dob))
    vs = check_identity(ev, TEST_ENV)
    assert rules(vs) == {("PID-7", "INS-RULE-11", "W")}  # and no BIRTH-DATE-INVALID
    d = ins_decision(ev, TEST_ENV)
    assert d.ins is None and "INS-RULE-11" in d.reason


def test_rule_11_error_when_configured():
    policy = InsPolicy(environment="test", rule11_answer="error")
    vs = check_identity(parse_adt(adt(dob="19850700")), policy)
    assert rules(vs) == {("PID-7", "INS-RULE-11", "E")}


def test_rule_11_from_zfd_lunar_date():
    ev = parse_adt(adt(zfd="ZFD|19850700||Y|Y|INSI|20211201||"))
    assert rules(check_identity(ev, TEST_ENV)) == {("ZFD-1", "INS-RULE-11", "W")}
    ev = parse_adt(adt(zfd="ZFD|00^07^1985||Y|Y|INSI|20211201||"))
    assert rules(check_identity(ev, TEST_ENV)) == {("ZFD-1", "INS-RULE-11", "W")}


def test_rule_11_without_ins_is_an_invalid_date():
    vs = check_identity(parse_adt(adt(dob="19850700", ins=None, status="PROV")), TEST_ENV)
    assert rules(vs) == {("PID-7", "BIRTH-DATE-INVALID", "E")}


def test_zero_part_detection():
    assert birth_date_has_zero_part("19850700")
    assert birth_date_has_zero_part("19850012")
    assert not birth_date_has_zero_part("19850712")
    assert not birth_date_has_zero_part("")


# --- misc -------------------------------------------------------------------------------------

def test_two_ins_repetitions_warn():
    raw = adt().replace(b"^INS^^20101207", b"^INS^^20101207~" + SYNTH_NIR_M.encode()
                        + b"^^^ASIP-SANTE-INS-NIR&" + OID_TEST.encode() + b"&ISO^INS", 1)
    ev = parse_adt(raw)
    assert ev.ins_count == 2 and ev.ins.value == SYNTH_NIR_F
    assert rules(check_identity(ev, TEST_ENV)) == {("PID-3", "INS-SINGLE", "W")}


def test_passthrough_has_no_rules():
    ev = parse_adt(adt("A44"))
    assert check_identity(ev, TEST_ENV) == [] and usable_ins(ev, TEST_ENV) is None
