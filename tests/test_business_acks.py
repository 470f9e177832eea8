"""ZAM business acknowledgements: the pure builder (CI-SIS profils-messages.md « Contraintes à
appliquer au message ZAM^Z01^ZAM_Z01 ») and their durable queueing with a delivery outcome."""
from __future__ import annotations

import pytest

from engine.connectors.base import ACCEPTED, ERROR, BusinessAck, Delivery, ErrorInfo, Outcome, StoredView
from engine.delivery import ZAM_CHANNEL, business_ack_follow_ups
from engine.hl7.message import Message
from engine.hl7.msh import read_msh
from engine.reports.submission import Acks, Submission
from engine.reports.zam import ZamFacts, build_zam
from engine.store.models import FollowUp

from tests.test_store import count, queue

ORIGINAL = (b"MSH|^~\\&|RIS-X|CHU-X|PFI|CHU-X|20240306111154||MDM^T02^MDM_T02|CR-0042|T|2.6|||||FRA|"
            b"UNICODE UTF-8|||2.1^CISIS_CDA_HL7_V2\rEVN||20240306111154\r")


def zam(facts, original=ORIGINAL):
    raw = build_zam(facts, read_msh(original), control_id="ZAM0001", timestamp="20240306111200+0100",
                    sending_app="mini-pfi", sending_facility="")
    return raw, Message.parse(raw, "utf-8")


def test_z01_success_fields():
    raw, msg = zam(ZamFacts("Z01", True))
    assert raw.endswith(b"\r") and b"\n" not in raw
    assert [s.name for s in msg] == ["MSH", "OBX"]
    msh = read_msh(raw)
    assert (msh.message_type, msh.structure, msh.version, msh.charset) == ("ZAM^Z01", "ZAM_Z01", "2.6", "UNICODE UTF-8")
    assert (msh.receiving_app, msh.receiving_facility) == ("RIS-X", "CHU-X")   # back to the creator
    assert (msh.sending_app, msh.control_id, msh.processing_id) == ("mini-pfi", "ZAM0001", "T")
    assert msh.profile == "2.1^CISIS_CDA_HL7_V2"
    obx = msg.segment("OBX")
    assert obx.value(2) == "CWE"
    assert obx.value(3, 1) == "ACK_RECEPTION_DMP" and obx.value(3, 3) == "AckMetierZAM"
    assert obx.value(4) == "CR-0042"               # the MSH-10 of the message that carried it
    assert obx.value(5, 1) == "Y" and obx.value(5, 3) == "expandedYes-NoIndicator"
    assert obx.value(11) == "F"


def test_z01_failure_carries_err_with_dmp_code():
    raw, msg = zam(ZamFacts("Z01", False, error_code="DMPInvalidData", error_label="Données invalides"))
    assert [s.name for s in msg] == ["MSH", "OBX", "ERR"]
    assert msg.value("OBX-5.1") == "N"
    err = msg.segment("ERR")
    assert err.value(3, 1) == "207"
    assert err.value(4) == "E"
    assert (err.value(5, 1), err.value(5, 2), err.value(5, 3)) == (
        "DMPInvalidData", "Données invalides", "DMP_ERROR_CODE")


def test_z02_names_the_recipient_and_escapes_it():
    raw, msg = zam(ZamFacts("Z02", True, address="dr.test|x@hopital.mssante.fr"))
    obx2 = list(msg)[2]
    assert obx2.value(3, 1) == "DESTINATAIRE_MSS"
    assert b"dr.test\\F\\x@hopital.mssante.fr" in raw


def test_failure_without_code_is_refused_and_unknown_event():
    with pytest.raises(ValueError):
        zam(ZamFacts("Z01", False))
    with pytest.raises(ValueError):
        zam(ZamFacts("Z09", True))


def test_other_delimiters_of_the_original_are_rewritten():
    original = ORIGINAL.replace(b"MSH|^~\\&|RIS-X|", b"MSH#$~\\&#RIS$X#").replace(b"|", b"#")
    raw, msg = zam(ZamFacts("Z01", True), original)
    assert msg.value("MSH-5.1") == "RIS" and msg.value("MSH-5.2") == "X"


def _delivery(reception=True, lecture=False):
    sub = Submission(message_type="MDM^T02", control_id="CR-0042", acks=Acks(reception=reception, lecture=lecture))
    return Delivery(entry_id=1, message_id=1, destination="dmp", target="", attempt=1, channel="in",
                    message_type="MDM^T02", control_id="CR-0042", charset="UNICODE UTF-8",
                    payload=ORIGINAL, original=ORIGINAL, stored=StoredView(kind="cisis", submission=sub))


def test_follow_ups_only_when_asked_and_routed():
    ok = Outcome(ACCEPTED, business_acks=(BusinessAck("Z01", True),))
    assert business_ack_follow_ups(ok, _delivery(), "r", None, engine_name="pfi") == []       # no destination
    assert business_ack_follow_ups(ok, _delivery(reception=False), "r", "ris", engine_name="pfi") == []
    assert business_ack_follow_ups(Outcome(ACCEPTED), _delivery(), "r", "ris", engine_name="pfi") == []
    (f,) = business_ack_follow_ups(ok, _delivery(), "r", "ris-acks", engine_name="pfi")
    assert (f.channel, f.destination, f.route, f.message_type) == (ZAM_CHANNEL, "ris-acks", "r", "ZAM^Z01")
    assert read_msh(f.raw).control_id == f.control_id
    bad = Outcome(ERROR, business_acks=(BusinessAck("Z01", False, ErrorInfo("E1", "DMP", "refus")),))
    (f,) = business_ack_follow_ups(bad, _delivery(), "r", "ris-acks", engine_name="pfi")
    assert b"ERR|||207^Application error^HL70357|E|E1^refus^DMP_ERROR_CODE" in f.raw
    z03 = Outcome(ACCEPTED, business_acks=(BusinessAck("Z03", True, address="x@y"),))
    assert business_ack_follow_ups(z03, _delivery(), "r", "ris", engine_name="pfi") == []
    assert len(business_ack_follow_ups(z03, _delivery(lecture=True), "r", "ris", engine_name="pfi")) == 1


def test_follow_up_is_stored_and_queued_with_the_completion(store):
    queue(store, 1)
    c = store.claim_due("ris", 1, "w", 30)[0]
    f = FollowUp(channel=ZAM_CHANNEL, destination="ris-acks", route="r1", raw=b"MSH|^~\\&|PFI||RIS||x||ZAM^Z01^ZAM_Z01|Z1|P|2.6\r",
                 message_type="ZAM^Z01", control_id="Z1", version="2.6", charset="UNICODE UTF-8")
    # a fenced completion writes nothing, follow-ups included
    assert store.complete(c.id, "other", status="sent", attempts=1, follow_ups=[f]) is False
    assert count(store, "SELECT count(*) FROM messages WHERE channel = :c", c=ZAM_CHANNEL) == 0
    assert store.complete(c.id, "w", status="sent", attempts=1, follow_ups=[f]) is True
    (z,) = store.claim_due("ris-acks", 5, "w", 30)
    assert (z.raw, z.control_id, z.route) == (f.raw, "Z1", "r1")
    assert count(store, "SELECT count(*) FROM events WHERE kind = 'generated'") == 1
