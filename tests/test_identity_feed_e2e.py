"""Identity feed end to end (issue 3): the real engine process, real MLLP, SQLite and PostgreSQL.

* every ADT of the shared corpus (SGL, Consentement_DMP_PAMFR) is answered AA and lands in the
  registry, asserted field by field through ``minipfi identities show … --json``;
* each INS rule broken over MLLP is answered with an ERR naming the field and the rule, and the
  message is stored;
* A40 merge (lookup by the old IPP), out-of-order A31, A47 identifier change;
* the ``ins_enrich`` transform: an MDM of the CI-SIS "Transmission de documents CDA en HL7 v2"
  corpus whose PID-3 lacks the INS leaves the engine with it, after an A01 for the same IPP; the
  OBX carrying the CDA is byte-identical.

Synthetic identities are invented (``SYNTH-…``, NIRs built with a valid key); the only
real-looking identity is the ANS public test patient of the corpus (test INS OID .10).
"""
from __future__ import annotations

import json
import re
import time

import pytest

from mllp.blocking import BlockingMLLPClient
from tests.enginectl import EngineProcess, free_port
from tests.peers import Receiver
from tests.test_identity_support import (
    CONSENT,
    CORPUS,
    CORPUS_INS,
    OID_TEST,
    SGL,
    adt,
    corpus_files,
    make_nir,
)

MDM_B64 = (CORPUS / "Vague 2" / "Trans_Doc-CDA-HL7V2" / "TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1" / "MDM"
           / "Transmission initiale MDM" / "message_MDM_CR_Radio_INIT_N1_Base64.er7")
CORPUS_INS_REP = f"{CORPUS_INS}^^^ASIP-SANTE-INS-NIR&{OID_TEST}&ISO^INS^^20101207"
IPP_REP = "000003^^^CHU-X&000897406&N^PI"

# Synthetic NIRs (valid keys), female (first digit 2), born 1985-07 or 1979-03.
NIR_A = make_nir("2850763220101")
NIR_B = make_nir("2850763220102")
NIR_C = make_nir("2790363220103")
NIR_D = make_nir("2790363220104")
NIR_E = make_nir("2790363220105")

PHI_CANARIES = ("PAT-TROIS", CORPUS_INS, "19790328", "DOMINIQUE", "Breteuil", "SYNTH-", NIR_A, NIR_B, NIR_E)


def config(port: int, status_port: int, dest_port: int, *, environment: str = "test") -> str:
    return f"""
        engine:
          environment: {environment}
          status: {{bind: 127.0.0.1, port: {status_port}}}
          shutdown_grace: 5s
          duplicates: {{on_conflict: accept}}   # the ANS corpus reuses MSH-10 3975
        channels:
          mllp-in:
            type: mllp
            port: {port}
            accept:
              message_types: ["ADT^*", "MDM^T02", "MDM^T04", "MDM^T10", "ORU^R01", "ORM^O01", "OMI^O23"]
              versions: ["2.5", "2.5.1", "2.6"]
            identity_feed:
              enabled: true
        routes:
          - name: reports
            from: mllp-in
            filter: {{message_types: ["MDM^*", "ORU^R01", "ORM^O01", "OMI^O23"]}}
            transforms: [{{type: ins_enrich}}]
            to: [dmp]
        destinations:
          dmp:
            type: mllp
            host: 127.0.0.1
            port: {dest_port}
            ack_timeout: 5s
            connect_timeout: 1s
            queue:
              retry: {{initial_delay: 100ms, max_delay: 1s, multiplier: 2, jitter: 0.1}}
              ordering: destination
    """


@pytest.fixture
def start_engine(tmp_path):
    """``start_engine(db_url, environment="test") -> (engine, receiver)``; stopped at teardown,
    with the PHI rule checked on the engine's log."""
    started: list[tuple[EngineProcess, Receiver]] = []

    def start(db_url=None, environment="test"):
        receiver = Receiver()
        port, status_port = free_port(), free_port()
        tmp = tmp_path / f"e{len(started)}"
        tmp.mkdir()
        eng = EngineProcess(tmp, config(port, status_port, receiver.port, environment=environment),
                            db_url=db_url, status_port=status_port)
        eng.port = port
        eng.start()
        started.append((eng, receiver))
        return eng, receiver

    yield start
    for eng, receiver in started:
        rc = eng.stop()
        receiver.close()
        assert rc == 0, eng.log_tail()
        log = eng.log_text()
        for canary in PHI_CANARIES:
            assert canary not in log, f"patient data {canary!r} leaked into the engine log"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def cr(raw: bytes) -> bytes:
    """HL7 segment separators: the corpus files use LF."""
    return raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").rstrip(b"\r") + b"\r"


def send_all(eng, messages: list[bytes]) -> list[bytes]:
    with BlockingMLLPClient("127.0.0.1", eng.port, timeout=30) as client:
        return [client.send(m) for m in messages]


def seg(ack: bytes, name: bytes) -> list[str]:
    for s in ack.split(b"\r"):
        if s.startswith(name + b"|"):
            return s.decode("utf-8").split("|")
    raise AssertionError(f"no {name!r} in {ack!r}")


def errs(ack: bytes) -> list[list[str]]:
    return [s.decode("utf-8").split("|") for s in ack.split(b"\r") if s.startswith(b"ERR|")]


def ack_code(ack: bytes) -> str:
    return seg(ack, b"MSA")[1]


def show(eng, key: str) -> dict | None:
    r = eng.cli("identities", "show", key, "--json", check=False)
    if r.returncode == 1 and "no identity" in r.stderr:
        return None
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_rule_error(ack: bytes, location: str, rule: str, words: str, severity: str = "E") -> None:
    """ERR-2 names the field (segment^1^field^rep^comp), ERR-8 the rule and plain words."""
    found = [e for e in errs(ack) if (e[2] == location or e[2].startswith(location + "^")) and rule in e[8]]
    assert found, f"no ERR {location} {rule} in {ack!r}"
    assert words in found[0][8] and found[0][4] == severity


# ------------------------------------------------------------------------------------------
# corpus ADTs, field by field
# ------------------------------------------------------------------------------------------

# ZFA-9 (feeding the DMP) and ZFA-11 (consulting the DMP) per Consentement_DMP_PAMFR/readme.md,
# in the order corpus_files() returns the files (their EVN-2 dates are increasing).
EXPECTED_STEPS = [
    ("admission.er7", "INO", "IC"),   # SGL admission: reference ZFA of the SGL readme
    ("sortie.er7", None, None),       # no ZFA: consent unchanged
    ("ConsentementConsultation_NonOppositionAlimentation.er7", "INO", "IC"),
    ("NonConsentementConsultation_NonOppositionAlimentation.er7", "INO", "INC"),
    ("NonConsentementConsultation_OppositionAlimentation.er7", "IO", "INC"),
    ("NonRecueillieConsentementConsultation_NonOppositionAlimentation.er7", "INO", "NA"),
    ("NonRecueillieConsentementConsultation_NonRecueillieOppositionAlimentation.er7", "NA", "NA"),
]


def test_every_corpus_adt_is_accepted_and_the_registry_holds_it_field_by_field(start_engine, db_url):
    files = corpus_files()
    assert [f.name for f in files] == [s[0] for s in EXPECTED_STEPS]
    assert {f.parent for f in files} == {SGL, CONSENT}
    eng, _ = start_engine(db_url)
    acks = send_all(eng, [f.read_bytes() for f in files])
    for f, ack in zip(files, acks):
        assert ack_code(ack) == "AA", (f.name, ack)
        assert not [e for e in errs(ack) if e[4] == "E"], (f.name, ack)

    ident = show(eng, "000003")
    assert ident["ipp"] == "000003" and ident["ipp_authority"] == "CHU-X" and ident["ipp_finess"] == "000897406"
    assert ident["ins"] == {"value": CORPUS_INS, "oid": OID_TEST, "kind": "NIR_TEST"}
    assert ident["ins_rejected_reason"] is None
    assert ident["birth_name"] == "PAT-TROIS"
    assert ident["first_given_name"] == "DOMINIQUE" and ident["given_names"] == ["DOMINIQUE"]
    assert ident["used_name"] is None
    assert ident["birth_date"] == "1979-03-28" and ident["sex"] == "F" and ident["birth_place_cog"] == "63220"
    assert ident["status"] == "VALI" and ident["status_raw"] == ["VALI"] and ident["active"] is True
    # ZFD of the Consentement_DMP_PAMFR files: ZFD|||Y|N|INSI|20211201
    assert ident["obtained_via"] == "INSI" and ident["insi_query_date"] == "2021-12-01"
    # last file: information not collected for either (ZFA|ACTIF|20240311111154|||||||NA||NA|)
    assert ident["consent"] == {
        "dmp_status": "ACTIF", "dmp_status_date": "20240311111154", "dmp_closing_date": "",
        "feeding_opposition": "NA", "feeding_opposition_date": "", "feeding_opposed": None,
        "consultation_consent": "NA", "consultation_consent_date": "", "consultation_consented": None,
    }
    assert ident["last_event_time"] == "2024-03-11T11:11:54"
    pairs = {(i["type"], i["value"], i["authority"]) for i in ident["identifiers"]}
    assert pairs == {("PI", "000003", "CHU-X"), ("INS", CORPUS_INS, OID_TEST)}

    # history: one row per ADT, in order, with its source message and the consent of each step
    hist = ident["history"]
    assert len(hist) == len(files) == 7
    assert [h["trigger"] for h in hist] == ["A01", "A03", "A01", "A01", "A01", "A01", "A01"]
    assert [h["control_id"] for h in hist] == ["3975", "3995", "3975", "3976", "3977", "3978", "3979"]
    assert hist[0]["action"] == "created" and hist[1]["action"] == "unchanged"
    assert all(h["action"] == "updated" for h in hist[2:])
    assert len({h["message_id"] for h in hist}) == 7  # 3975 twice, stored twice (on_conflict: accept)
    consent = None
    for (name, feeding, consult), h in zip(EXPECTED_STEPS, hist):
        change = h["change"].get("consent")
        if change is not None:
            consent = change[1]
        if feeding is not None:
            assert consent["feeding_opposition"] == feeding, name
            assert consent["consultation_consent"] == consult, name
    assert hist[4]["change"]["consent"][1]["feeding_opposed"] is True       # IO: opposes feeding
    assert hist[3]["change"]["consent"][1]["consultation_consented"] is False  # INC

    # the same identity by its INS
    assert show(eng, CORPUS_INS)["id"] == ident["id"]
    rows = eng.messages()
    assert len(rows) == 7 and {r["status"] for r in rows} == {"filtered"}  # ADTs: no route here


# ------------------------------------------------------------------------------------------
# INS rules over MLLP
# ------------------------------------------------------------------------------------------


def test_rule_violations_are_answered_with_field_and_rule_and_stored(start_engine, db_url):
    eng, _ = start_engine(db_url)
    bad_key = NIR_A[:13] + f"{(int(NIR_A[13:]) + 1) % 100:02d}"
    cases = [
        # (message, MSA, ERR-2 location, rule, plain words, ERR-4 severity)
        (adt(ipp="910001", ins=bad_key, control="R1"), "AE", "PID^1^3^2^1", "INS-FORMAT", "key", "E"),
        (adt(ipp="910002", ins=NIR_B, cog=None, control="R2"), "AE", "PID^1^11", "INS-STRICT-TRAITS",
         "birth place", "E"),
        (adt(ipp="910003", ins=NIR_C, dob="19790230", control="R3"), "AE", "PID^1^7", "BIRTH-DATE-INVALID",
         "valid calendar date", "E"),
        # REF-INS rule 11 (00 day), answered AE per identity_feed.rule11_answer (default error)
        (adt(ipp="910004", ins=NIR_D, dob="19790300", control="R4"), "AE", "PID^1^7", "INS-RULE-11",
         "rule 11", "E"),
        # an INS with the unqualified status PROV: a rule break (issue 3 item 3), answered AE per
        # identity_feed.unqualified_ins_answer (default error); the INS is not taken
        (adt(ipp="910005", ins=NIR_E, dob="19790312", status="PROV", control="R5"), "AE", "PID^1^32",
         "INS-NOT-QUALIFIED", "not qualified", "E"),
    ]
    acks = send_all(eng, [c[0] for c in cases])
    for (msg, code, loc, rule, words, sev), ack in zip(cases, acks):
        assert ack_code(ack) == code, (rule, ack)
        assert_rule_error(ack, loc, rule, words, sev)
        assert seg(ack, b"MSA")[2] == msg.split(b"|")[9].decode()
    # stored, nothing lost: the rejected ones with status "rejected"
    rows = {r["control_id"]: r for r in eng.messages()}
    rejected = ("R1", "R2", "R3", "R4", "R5")
    assert {c: rows[c]["status"] for c in rejected} == dict.fromkeys(rejected, "rejected")
    # the registry keeps the identity without the refused INS, with the reason
    rule11 = show(eng, "910004")
    assert rule11["ins"] is None and "INS-RULE-11" in rule11["ins_rejected_reason"]
    assert rule11["birth_name"] == "SYNTH-UN"
    prov = show(eng, "910005")
    assert prov["ins"] is None and prov["status"] == "PROV" and "INS-NOT-QUALIFIED" in prov["ins_rejected_reason"]
    assert show(eng, NIR_E) is None and show(eng, bad_key) is None


def test_production_engine_refuses_the_test_oid(start_engine):
    eng, _ = start_engine(None, environment="production")
    [ack] = send_all(eng, [(SGL / "admission.er7").read_bytes()])
    assert ack_code(ack) == "AE"
    assert_rule_error(ack, "PID^1^3^2^4^2", "INS-OID-ENVIRONMENT", "production", "E")
    [row] = eng.messages()
    assert row["control_id"] == "3975" and row["status"] == "rejected"
    ident = show(eng, "000003")
    assert ident["ins"] is None and "INS-OID-ENVIRONMENT" in ident["ins_rejected_reason"]
    assert ident["birth_name"] == "PAT-TROIS" and ident["status"] == "VALI"


# ------------------------------------------------------------------------------------------
# merge, out-of-order update, identifier change
# ------------------------------------------------------------------------------------------


def test_merge_out_of_order_update_and_identifier_change(start_engine, db_url):
    eng, _ = start_engine(db_url)
    t1, t2 = "20240301100000", "20240302100000"
    msgs = [
        # A40: 920001 (with INS A) is merged into 920002 (known without INS), which takes the INS
        adt("A28", ipp="920001", ins=NIR_A, birth_name="SYNTH-FUSION", evn=t1, control="M1"),
        adt("A28", ipp="920002", ins=None, birth_name="SYNTH-FUSION", status="PROV", evn=t1, control="M2"),
        adt("A40", ipp="920002", ins=NIR_A, birth_name="SYNTH-FUSION", evn=t2, mrg="920001", control="M3"),
        # out of order: the A31 recorded before the A28 arrives after it and must not win
        adt("A28", ipp="920010", ins=NIR_B, birth_name="SYNTH-RECENT", evn=t2, control="O1"),
        adt("A31", ipp="920010", ins=NIR_B, birth_name="SYNTH-ANCIEN", evn=t1, control="O2"),
        # A47: 920020 becomes 920021
        adt("A28", ipp="920020", ins=NIR_C, birth_name="SYNTH-CHANGE", evn=t1, control="C1"),
        adt("A47", ipp="920021", ins=NIR_C, birth_name="SYNTH-CHANGE", evn=t2, mrg="920020", control="C2"),
    ]
    for msg, ack in zip(msgs, send_all(eng, msgs)):
        assert ack_code(ack) == "AA", ack
        assert not [e for e in errs(ack) if e[4] == "E"], ack

    merged = show(eng, "920001")  # the old IPP resolves to the survivor
    assert merged["ipp"] == "920002" and merged["active"] is True
    assert merged["ins"]["value"] == NIR_A and merged["status"] == "VALI"
    assert len(merged["merged_from"]) == 1
    assert [h["action"] for h in merged["history"] if h["control_id"] == "M3"].count("merged") == 2
    assert show(eng, NIR_A)["id"] == merged["id"]

    ooo = show(eng, "920010")
    assert ooo["birth_name"] == "SYNTH-RECENT" and ooo["last_event_time"] == "2024-03-02T10:00:00"
    assert [h["action"] for h in ooo["history"]] == ["created", "ignored_older"]

    changed = show(eng, "920021")
    assert changed["ipp"] == "920021" and changed["ins"]["value"] == NIR_C
    assert changed["history"][-1]["action"] == "id_changed"
    assert changed["history"][-1]["change"]["ipp"] == ["920020", "920021"]
    assert show(eng, "920020") is None


# ------------------------------------------------------------------------------------------
# ins_enrich end to end
# ------------------------------------------------------------------------------------------


def mdm_without_ins(control: str = "015", ipp_rep: str = IPP_REP) -> bytes:
    """The corpus MDM (CDA N1 in base64) whose PID-3 carries the IPP instead of the INS."""
    raw = cr(MDM_B64.read_bytes())
    assert raw.count(CORPUS_INS_REP.encode()) == 1
    raw = raw.replace(CORPUS_INS_REP.encode(), ipp_rep.encode())
    return raw.replace(b"|MDM^T02^MDM_T02|015|", f"|MDM^T02^MDM_T02|{control}|".encode(), 1)


def pid_span(raw: bytes) -> tuple[int, int]:
    m = re.search(rb"\rPID\|[^\r]*", raw)
    return m.start() + 1, m.end()


def test_mdm_without_ins_is_enriched_from_the_previous_a01(start_engine, db_url):
    eng, receiver = start_engine(db_url)
    mdm = mdm_without_ins()
    unknown = mdm_without_ins("016", "000099^^^CHU-X&000897406&N^PI")
    acks = send_all(eng, [(SGL / "admission.er7").read_bytes(), mdm, unknown])
    assert [ack_code(a) for a in acks] == ["AA", "AA", "AA"]

    [got] = receiver.wait_for(1, timeout=20)
    pid = got[pid_span(got)[0]:pid_span(got)[1]].decode("utf-8").split("|")
    assert pid[3] == f"{IPP_REP}~{CORPUS_INS}^^^ASIP-SANTE-INS-NIR&{OID_TEST}&ISO^INS"
    assert pid[5] == "PAT-TROIS^DOMINIQUE^DOMINIQUE^^^^L" and pid[7] == "19790328" and pid[8] == "F"
    assert pid[11].endswith("~^^^^^^BDL^^63220") and pid[32] == "VALI"
    # everything outside PID is byte-identical; the CDA (OBX-5, base64) in particular
    (s0, s1), (g0, g1) = pid_span(mdm), pid_span(got)
    assert got[:g0] == mdm[:s0] and got[g1:] == mdm[s1:]
    obx = next(s for s in mdm.split(b"\r") if s.startswith(b"OBX|1|ED|"))
    assert len(obx) > 300_000 and obx in got.split(b"\r")

    # the MDM for an unknown patient is not sent: its queue entry is in error with the 903 code
    deadline = time.time() + 20
    while time.time() < deadline:
        rows = {r["control_id"]: r for r in eng.messages()}
        if rows.get("016", {}).get("status") == "error":
            break
        time.sleep(0.2)
    assert rows["016"]["status"] == "error" and rows["015"]["status"] == "sent"
    detail = eng.cli("messages", "show", str(rows["016"]["id"]), "--json").stdout
    assert "903: INS required but absent" in detail
    assert len(receiver.received) == 1
