"""The DMP simulator over real HTTPS on 127.0.0.1 (mutual TLS, certificates from cryptography).

Requests are built by tests/dmp_requests.py (lxml + signxml) so that every field can be broken;
one test sends a request built by the engine's own builder (engine.xds.envelope) when present.
"""
from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.request
from pathlib import Path

import pytest
from lxml import etree

from engine.simulators.demo_pki import make_demo_pki
from engine.simulators.dmp import DMPSimulator
from engine.xds.response import read_response
from tests import dmp_requests as R
from tests.pki import make_pki
from tests.reactor_thread import call

CORPUS = Path(__file__).resolve().parents[1] / "../shared/corpus/ans-hl7v2/Vague 2/Trans_Doc-CDA-HL7V2/TRANSMISSION_DOCS_CDA_EN_HL7V2_V2.1"
CDA_V1 = CORPUS / "MDM/Transmission initiale MDM/CR_Radio_CDAN1_v1.XML"
CDA_V2 = CORPUS / "MDM/Remplacement MDM/CR_Radio_CDAN1_v2.XML"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("dmp-pki")
    tls = make_pki(d / "tls")
    signing = make_demo_pki(d / "signing")            # its CA is the VIHF signer's trust anchor
    other = make_demo_pki(d / "other")                # a signer nobody trusts
    return tls, signing, other


@pytest.fixture(scope="module")
def signer(pki):
    _, signing, _ = pki
    return R.Signer(signing.signer_cert.read_bytes(), signing.signer_key.read_bytes())


@pytest.fixture(scope="module")
def sim(pki, tmp_path_factory):
    tls, signing, _ = pki
    store = tmp_path_factory.mktemp("dmp-store")
    s = DMPSimulator(cert=str(tls.server_cert), key=str(tls.server_key), client_ca=str(tls.ca),
                     signer_ca=str(signing.ca), store_dir=str(store), max_body=2 * 1024 * 1024)
    s.port = call(s.start)
    s.admin_port = call(s.start_admin)
    s.store = store
    yield s
    call(s.stop)


@pytest.fixture(autouse=True)
def _accept(sim):
    call(sim.set_behaviour)
    yield


def _ctx(tls, cert=None, key=None):
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def post(pki, sim, body: bytes, ct: str, *, cert="client", timeout: float = 10.0):
    tls = pki[0]
    c, k = {"client": (tls.client_cert, tls.client_key), "rogue": (tls.rogue_cert, tls.rogue_key),
            None: (None, None)}[cert]
    conn = http.client.HTTPSConnection("127.0.0.1", sim.port, context=_ctx(tls, c, k), timeout=timeout)
    try:
        conn.request("POST", "/si-dmp-server/v2/services/repository", body=body, headers={"Content-Type": ct})
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type", ""), resp.read()
    finally:
        conn.close()


def cda(path=CDA_V1) -> tuple[bytes, str, str, str]:
    content = path.read_bytes()
    pid, uid, conf = R.cda_facts(content)
    return content, pid, uid, conf


def send_doc(pki, sim, signer, doc: R.Doc, pid: str, **kw):
    body, ct, mid = R.iti41(signer, [doc], pid, **kw)
    status, rct, rbody = post(pki, sim, body, ct)
    return status, read_response(rbody, rct), mid


def _fresh(content: bytes, uid_suffix: str) -> bytes:
    """The corpus CDA under a new document id, so each test registers its own entry."""
    root = etree.fromstring(content)
    root.find("{urn:hl7-org:v3}id").set("root", "1.2.250.1.71.4.2.2.120456789." + uid_suffix)
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


_counter = iter(range(10**6))


def new_cda(path=CDA_V1):
    content = _fresh(path.read_bytes(), f"{time.time_ns()}{next(_counter)}")
    pid, uid, conf = R.cda_facts(content)
    return content, pid, uid, conf


# -------------------------------------------------------------------- accepted

def test_corpus_report_is_accepted_stored_and_answered_like_the_dmp(pki, sim, signer):
    content, pid, uid, conf = cda()
    before = len(sim.accepted)
    status, r, mid = send_doc(pki, sim, signer, R.Doc(_fresh(content, "1001"), unique_id=uid.replace(
        "120456789.71024000081", "120456789.1001"), confidentiality=conf), pid)
    assert status == 200 and r.success and r.relates_to == mid
    assert len(sim.accepted) == before + 1
    sub = sim.accepted[-1]
    doc = sub.documents[0]
    assert sub.patient_id == pid == "279035121518989^^^&1.2.250.1.213.1.4.10&ISO^NH"
    assert (doc.confidentiality, doc.masks, doc.code("formatCode")) == ("N", frozenset(), "urn:ihe:iti:xds-sd:pdf:2008")
    stored = sorted(sim.store.iterdir())[-1]
    summary = json.loads((stored / "summary.json").read_text())
    assert summary["message_id"] == mid and summary["documents"][0]["hash"] == doc.hash
    assert (stored / summary["documents"][0]["file"]).read_bytes() == doc.content


def test_masks_are_kept(pki, sim, signer):
    content, pid, uid, conf = new_cda()
    status, r, _ = send_doc(pki, sim, signer, R.Doc(content, unique_id=uid, masks=("MASQUE_PS", "INVISIBLE_PATIENT")), pid)
    assert r.success
    assert sim.accepted[-1].documents[0].masks == {"MASQUE_PS", "INVISIBLE_PATIENT"}


# -------------------------------------------------------------------- TLS

def test_client_certificate_from_another_ca_is_refused_at_the_handshake(pki, sim):
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        post(pki, sim, b"x", "application/soap+xml", cert="rogue")


def test_no_client_certificate_is_refused_at_the_handshake(pki, sim):
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        post(pki, sim, b"x", "application/soap+xml", cert=None)


def test_tls_1_1_is_refused(pki, sim):
    tls = pki[0]
    ctx = _ctx(tls, tls.client_cert, tls.client_key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    conn = http.client.HTTPSConnection("127.0.0.1", sim.port, context=ctx, timeout=5)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        conn.request("POST", "/", body=b"x")


def test_a_body_over_the_limit_is_refused(pki, sim):
    status, _, _ = post(pki, sim, b"x" * (3 * 1024 * 1024), "multipart/related; boundary=x")
    assert status == 413


# -------------------------------------------------------------------- VIHF

def _fault(pki, sim, body, ct):
    status, rct, rbody = post(pki, sim, body, ct)
    r = read_response(rbody, rct)
    assert r.fault is not None, r
    return status, r


def test_request_without_vihf_is_refused(pki, sim, signer):
    content, pid, uid, _ = new_cda()
    body, ct, mid = R.iti41(signer, [R.Doc(content, unique_id=uid)], pid, assertion=None)
    status, r = _fault(pki, sim, body, ct)
    assert status == 400 and r.fault.code == "Sender" and r.fault.subcodes == ("InvalidSecurity",)
    assert r.relates_to == mid and sim.refused[-1].message_id == mid


def test_broken_vihf_signature_is_refused(pki, sim, signer):
    content, pid, uid, _ = new_cda()

    def tamper(a):   # change a signed attribute after signing
        for v in a.iter("{urn:oasis:names:tc:SAML:2.0:assertion}AttributeValue"):
            if v.text == "mini-PFI":
                v.text = "someone else"
    a = R.vihf(signer, pid, tamper=tamper)
    body, ct, _ = R.iti41(signer, [R.Doc(content, unique_id=uid)], pid, assertion=a)
    _, r = _fault(pki, sim, body, ct)
    assert r.fault.subcodes == ("FailedCheck",)


def test_vihf_signed_by_an_untrusted_certificate_is_refused(pki, sim):
    _, _, other = pki
    rogue = R.Signer(other.signer_cert.read_bytes(), other.signer_key.read_bytes())
    content, pid, uid, _ = new_cda()
    body, ct, _ = R.iti41(rogue, [R.Doc(content, unique_id=uid)], pid, assertion=R.vihf(rogue, pid))
    _, r = _fault(pki, sim, body, ct)
    assert r.fault.subcodes[0] in ("FailedAuthentication", "FailedCheck")


@pytest.mark.parametrize("missing", ["LPS_Nom", "Identifiant_Structure", "urn:oasis:names:tc:xacml:2.0:subject:role",
                                     "urn:oasis:names:tc:xacml:2.0:resource:resource-id"])
def test_vihf_without_a_required_attribute_is_refused(pki, sim, signer, missing):
    content, pid, uid, _ = new_cda()
    body, ct, _ = R.iti41(signer, [R.Doc(content, unique_id=uid)], pid, assertion=R.vihf(signer, pid, drop=(missing,)))
    _, r = _fault(pki, sim, body, ct)
    assert r.fault.subcodes == ("InvalidSecurityToken",) and missing in r.fault.reason


@pytest.mark.parametrize("name, value", [("Secteur_Activite", "SA07"), ("VIHF_Version", "2.0"),
                                         ("Authentification_Mode", "DIRECTE"), ("Ressource_URN", "urn:other")])
def test_vihf_with_a_wrong_value_is_refused(pki, sim, signer, name, value):
    content, pid, uid, _ = new_cda()
    a = R.vihf(signer, pid, overrides={name: value})
    body, ct, _ = R.iti41(signer, [R.Doc(content, unique_id=uid)], pid, assertion=a)
    _, r = _fault(pki, sim, body, ct)
    assert r.fault.subcodes == ("InvalidSecurityToken",) and name in r.fault.reason


def test_vihf_for_another_patient_is_refused(pki, sim, signer):
    content, pid, uid, _ = new_cda()
    other = "248000000000040^^^&1.2.250.1.213.1.4.10&ISO^NH"
    body, ct, _ = R.iti41(signer, [R.Doc(content, unique_id=uid)], pid, assertion=R.vihf(signer, other))
    _, rct, rbody = post(pki, sim, body, ct)
    assert read_response(rbody, rct).errors[0].error_code == "XDSPatientIdDoesNotMatch"


# -------------------------------------------------------------------- WS-Addressing

def test_action_without_must_understand_is_refused(pki, sim, signer):
    content, pid, uid, _ = new_cda()
    body, ct, _ = R.iti41(signer, [R.Doc(content, unique_id=uid)], pid, must_understand=False)
    _, r = _fault(pki, sim, body, ct)
    assert r.fault.subcodes == ("InvalidAddressingHeader",)


# -------------------------------------------------------------------- metadata

def _registry_error(pki, sim, signer, doc, pid, **kw):
    status, r, mid = send_doc(pki, sim, signer, doc, pid, **kw)
    assert status == 200 and r.status == "Failure" and r.relates_to == mid, r
    return r.errors[0]


def test_wrong_hash_is_refused(pki, sim, signer):
    content, pid, uid, _ = new_cda()
    doc = R.Doc(content, unique_id=uid, hash="0" * 40)
    e = _registry_error(pki, sim, signer, doc, pid)
    assert (e.error_code, e.location) == ("XDSRepositoryMetadataError", doc.entry_uuid) and "hash" in e.code_context


def test_wrong_size_is_refused(pki, sim, signer):
    content, pid, uid, _ = new_cda()
    e = _registry_error(pki, sim, signer, R.Doc(content, unique_id=uid, size=len(content) + 1), pid)
    assert e.error_code == "XDSRepositoryMetadataError" and "size" in e.code_context


def test_patient_id_must_be_a_qualified_ins(pki, sim, signer):
    content, pid, uid, _ = new_cda()
    ipp = "12345^^^&1.2.250.1.999.1&ISO^PI"
    e = _registry_error(pki, sim, signer, R.Doc(content, unique_id=uid), ipp, assertion=R.vihf(signer, ipp))
    assert e.error_code == "XDSRegistryMetadataError" and "INS" in e.code_context


def test_bad_ins_key_is_refused(pki, sim, signer):
    content, pid, uid, _ = new_cda()
    bad = pid.replace("279035121518989", "279035121518988")
    e = _registry_error(pki, sim, signer, R.Doc(content, unique_id=uid), bad, assertion=R.vihf(signer, bad))
    assert e.error_code == "XDSRegistryMetadataError" and "key" in e.code_context


@pytest.mark.parametrize("doc_kw, words", [
    ({"format_code": "urn:ihe:iti:xds-sd:text:2008"}, "formatCode"),
    ({"confidentiality": "R"}, "CDA's confidentialityCode"),
    ({"masks": ("MASQUE_PS", "MASQUE_PS")}, "twice"),
    ({"masks": ("SECRET",)}, "JDV_J08"),
    ({"legal_authenticator": ""}, "legalAuthenticator"),
])
def test_metadata_rules(pki, sim, signer, doc_kw, words):
    content, pid, uid, _ = new_cda()
    e = _registry_error(pki, sim, signer, R.Doc(content, unique_id=uid, **doc_kw), pid)
    assert e.error_code == "XDSRegistryMetadataError" and words in e.code_context


def test_unique_id_must_be_the_cda_id(pki, sim, signer):
    content, pid, uid, _ = new_cda()
    e = _registry_error(pki, sim, signer, R.Doc(content, unique_id=uid + ".9"), pid)
    assert "uniqueId" in e.code_context


def test_schema_invalid_metadata_is_refused(pki, sim, signer):
    content, pid, uid, _ = new_cda()

    def mutate(req):
        eo = req.find(".//{urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0}ExtrinsicObject")
        etree.SubElement(eo, "{urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0}Nonsense")
    e = _registry_error(pki, sim, signer, R.Doc(content, unique_id=uid), pid, mutate=mutate)
    assert e.error_code == "XDSRepositoryMetadataError" and "schemas" in e.code_context


# -------------------------------------------------------------------- replacement and deletion

def test_replacement_needs_an_entry_accepted_before(pki, sim, signer):
    content, pid, uid, _ = new_cda()
    e = _registry_error(pki, sim, signer, R.Doc(content, unique_id=uid, replaces="urn:uuid:00000000-0000-0000-0000-000000000001"), pid)
    assert e.error_code == "XDSUnresolvedReferenceException"

    first = R.Doc(content, unique_id=uid)
    assert send_doc(pki, sim, signer, first, pid)[1].success
    v2, _, uid2, _ = new_cda(CDA_V2)
    status, r, _ = send_doc(pki, sim, signer, R.Doc(v2, unique_id=uid2, replaces=first.entry_uuid), pid)
    assert r.success and sim.accepted[-1].documents[0].replaces == first.entry_uuid
    # the same replacement again is accepted as a re-send; it stores nothing new
    second = R.Doc(v2, unique_id=uid2, replaces=first.entry_uuid)
    status, r, _ = send_doc(pki, sim, signer, second, pid)
    assert r.success and sim.accepted[-1].documents[0].duplicate_of
    assert second.entry_uuid not in sim.known
    # the replaced entry is deprecated: replacing it again is refused
    v3, _, uid3, _ = new_cda(CDA_V2)
    e = _registry_error(pki, sim, signer, R.Doc(v3, unique_id=uid3, replaces=first.entry_uuid), pid)
    assert e.error_code == "XDSUnresolvedReferenceException"


def test_same_unique_id_with_other_bytes_is_refused_same_bytes_accepted(pki, sim, signer):
    content, pid, uid, _ = new_cda()
    assert send_doc(pki, sim, signer, R.Doc(content, unique_id=uid), pid)[1].success
    assert send_doc(pki, sim, signer, R.Doc(content, unique_id=uid), pid)[1].success      # re-send
    other = content.replace(b"Radio de hanche", b"Radio du genou")
    e = _registry_error(pki, sim, signer, R.Doc(other, unique_id=uid), pid)
    assert e.error_code == "XDSNonIdenticalHash"


def test_deletion_targets_a_known_document(pki, sim, signer):
    content, pid, uid, _ = new_cda()
    doc = R.Doc(content, unique_id=uid)
    assert send_doc(pki, sim, signer, doc, pid)[1].success
    body, ct, mid = R.iti57_delete(signer, doc.entry_uuid, pid)
    status, rct, rbody = post(pki, sim, body, ct)
    r = read_response(rbody, rct)
    assert r.success and r.relates_to == mid and r.action == "urn:ihe:iti:2010:UpdateDocumentSetResponse"
    assert sim.accepted[-1].status_updates[0]["target"] == doc.entry_uuid
    # the same deletion again (a re-send after a lost answer) changes nothing and is accepted
    body, ct, _ = R.iti57_delete(signer, doc.entry_uuid, pid)
    assert read_response(*reversed(post(pki, sim, body, ct)[1:])).success
    update = sim.accepted[-1].status_updates[0]
    assert update["from"] == update["to"] == "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"
    # a deleted entry cannot be replaced; an unknown entry cannot be deleted
    v2, _, uid2, _ = new_cda(CDA_V2)
    e = _registry_error(pki, sim, signer, R.Doc(v2, unique_id=uid2, replaces=doc.entry_uuid), pid)
    assert e.error_code == "XDSUnresolvedReferenceException"
    body, ct, _ = R.iti57_delete(signer, "urn:uuid:00000000-0000-0000-0000-000000000002", pid)
    r = read_response(*reversed(post(pki, sim, body, ct)[1:]))
    assert r.status == "Failure" and r.errors[0].error_code == "XDSUnresolvedReferenceException"


# -------------------------------------------------------------------- behaviours

def _any_request(signer):
    content, pid, uid, _ = new_cda()
    return R.iti41(signer, [R.Doc(content, unique_id=uid)], pid)


def test_error_list_behaviour_for_a_count(pki, sim, signer):
    call(sim.set_behaviour, "errors", count=1,
         errors=[{"error_code": "XDSRegistryBusy", "code_context": "busy", "severity": "Error", "location": ""}])
    body, ct, mid = _any_request(signer)
    r = read_response(*reversed(post(pki, sim, body, ct)[1:]))
    assert r.status == "Failure" and r.errors[0].error_code == "XDSRegistryBusy" and r.relates_to == mid
    body, ct, _ = _any_request(signer)
    assert read_response(*reversed(post(pki, sim, body, ct)[1:])).success      # back to accept


def test_fault_behaviour_carries_the_dmp_code(pki, sim, signer):
    call(sim.set_behaviour, "fault", dmp_code="DMP_CODE_TEST", dmp_label="Erreur simulée")
    before = len(sim.accepted)
    for _ in range(2):
        body, ct, mid = _any_request(signer)
        status, rct, rbody = post(pki, sim, body, ct)
        r = read_response(rbody, rct)
        assert status == 400 and r.relates_to == mid
        assert (r.fault.dmp_code, r.fault.dmp_label) == ("DMP_CODE_TEST", "Erreur simulée")
    assert len(sim.accepted) == before


def test_http_5xx_behaviour(pki, sim, signer):
    call(sim.set_behaviour, "http", http_status=503, count=2)
    body, ct, _ = _any_request(signer)
    assert [post(pki, sim, body, ct)[0] for _ in range(3)] == [503, 503, 200]


def test_slow_behaviour(pki, sim, signer):
    call(sim.set_behaviour, "accept", delay=0.6, count=1)
    body, ct, _ = _any_request(signer)
    t0 = time.monotonic()
    status, rct, rbody = post(pki, sim, body, ct)
    assert time.monotonic() - t0 >= 0.6 and read_response(rbody, rct).success
    with pytest.raises(TimeoutError):
        call(sim.set_behaviour, "accept", delay=1.0, count=1)
        post(pki, sim, *_any_request(signer)[:2], timeout=0.3)


def test_admin_endpoint_switches_behaviour_and_lists_accepted(pki, sim, signer):
    base = f"http://127.0.0.1:{sim.admin_port}"
    req = urllib.request.Request(base + "/behaviour", method="PUT",
                                 data=json.dumps({"mode": "http", "http_status": 502, "count": 1}).encode())
    assert json.loads(urllib.request.urlopen(req, timeout=5).read())["http_status"] == 502
    body, ct, _ = _any_request(signer)
    assert post(pki, sim, body, ct)[0] == 502
    assert post(pki, sim, body, ct)[0] == 200
    accepted = json.loads(urllib.request.urlopen(base + "/accepted", timeout=5).read())
    assert len(accepted) == len(sim.accepted) and accepted[-1]["documents"][0]["hash"]
    bad = urllib.request.Request(base + "/behaviour", method="PUT", data=b'{"mode": "explode"}')
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(bad, timeout=5)
    assert exc.value.code == 400
    assert call(lambda: sim._ports[-1].getHost().host) == "127.0.0.1"


# -------------------------------------------------------------------- the engine's own builder

def _built(kind: str, folder: str, name: str, pki, *, delete: bool = False):
    import datetime as dt

    from engine.hl7.encoding import codec_for
    from engine.hl7.msh import read_msh
    from engine.reports.cisis import parse_report
    from engine.xds.envelope import build_iti41, build_iti57_delete
    from engine.xds.settings import DmpRequestSettings, VihfSettings, XdsSettings
    from engine.xds.signing import load_signing_identity

    _, signing, _ = pki
    raw = (CORPUS / kind / folder / name).read_bytes()
    sub = parse_report(raw, codec_for(read_msh(raw).charset))
    settings = DmpRequestSettings(
        vihf=VihfSettings(lps_name="mini-PFI", lps_version="1.0", lps_homologation_id="TEST-0001",
                          structure_id="1120456789", secteur_activite={"code": "SA07", "scheme": "1.2.250.1.71.4.2.4"}),
        xds=XdsSettings(endpoint="https://localhost/si-dmp-server/v2/services/repository",
                        source_id="1.2.250.1.999.1"))
    signer = load_signing_identity(signing.signer_cert, key_path=signing.signer_key)
    build = build_iti57_delete if delete else build_iti41
    return sub, build(sub, settings, signer, now=dt.datetime.now(dt.timezone.utc))


def _send_built(pki, sim, req):
    status, rct, rbody = post(pki, sim, req.body, req.content_type)
    r = read_response(rbody, rct)
    assert r.relates_to == req.message_id
    return status, r


def test_mdm_chain_built_by_the_engine_is_accepted(pki, sim):
    """Corpus MDM T02 -> T10 -> T04 (CDA R2 N1), built by engine.xds.envelope, all accepted."""
    import hashlib

    call(sim.reset)
    sub, req = _built("MDM", "Transmission initiale MDM", "message_MDM_CR_Radio_INIT_N1_Base64.er7", pki)
    status, r = _send_built(pki, sim, req)
    assert status == 200 and r.success, sim.refused[-1:]
    accepted = sim.accepted[-1]
    report = next(d for d in accepted.documents if not d.is_signature)
    cda_bytes = sub.documents[0].raw_bytes()
    assert report.content == cda_bytes and report.hash == hashlib.sha1(cda_bytes).hexdigest()
    assert report.entry_uuid == req.document_entry_uuids[0]
    assert report.code("formatCode") == "urn:ihe:iti:xds-sd:pdf:2008"
    assert any(d.is_signature for d in accepted.documents) == bool(req.signature_entry_uuid)

    _, req2 = _built("MDM", "Remplacement MDM", "message_MDM_CR_Radio_RPLC_N1.er7", pki)
    status, r = _send_built(pki, sim, req2)
    assert r.success, sim.refused[-1:]
    assert next(d for d in sim.accepted[-1].documents if not d.is_signature).replaces == report.entry_uuid

    _, req3 = _built("MDM", "Suppression MDM", "message_MDM_CR_Radio_DEL_N1.er7", pki, delete=True)
    status, r = _send_built(pki, sim, req3)
    assert r.success and r.action == "urn:ihe:iti:2010:UpdateDocumentSetResponse", sim.refused[-1:]
    update = sim.accepted[-1].status_updates[0]
    assert update["to"] == "urn:asip:ci-sis:2010:StatusType:Deleted"
    assert update["target"] == req2.document_entry_uuids[0]


def test_oru_replacement_of_a_document_never_sent_is_refused(pki, sim):
    """The corpus ORU T02 message carries document 1.2.250.1.213.1.1.9 while its replacement
    names 1.2.250.1.213.1.1.12 as parent: the simulator accepts the first and refuses the RPLC."""
    call(sim.reset)
    _, req = _built("ORU", "Transmission initiale ORU", "message_ORU_CR_Bio_INIT_N3_SEGUR.hl7", pki)
    assert _send_built(pki, sim, req)[1].success, sim.refused[-1:]
    _, req2 = _built("ORU", "Remplacement ORU", "message_ORU_CR_Bio_RPLC_N3_SEGUR.hl7", pki)
    status, r = _send_built(pki, sim, req2)
    assert status == 200 and r.status == "Failure"
    assert r.errors[0].error_code == "XDSUnresolvedReferenceException"
    assert r.errors[0].location == req2.document_entry_uuids[0]


# -------------------------------------------------------------------- pinned signer, command line

def test_pinned_signer_certificate(pki, signer):
    from engine.simulators.dmp_checks import VihfTrust, check_request
    from engine.xds.mtom import parse_related

    _, signing, other = pki
    content, pid, uid, _ = new_cda()
    body, ct, _ = R.iti41(signer, [R.Doc(content, unique_id=uid)], pid)
    pinned = VihfTrust(cert_pem=str(signing.signer_cert))
    assert check_request(parse_related(body, ct), trust=pinned, known={}).accepted
    wrong = VihfTrust(cert_pem=str(other.signer_cert))
    res = check_request(parse_related(body, ct), trust=wrong, known={})
    assert not res.accepted and res.refusals[0].fault_ns and res.refusals[0].code in ("FailedCheck", "FailedAuthentication")


def test_command_line_simulator_with_a_demo_pki(tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "dmp-simulator", "--make-pki", str(tmp_path / "pki"), "--port", "0",
         "--admin-port", "0", "--store-dir", str(tmp_path / "store")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        ports = {}
        deadline = time.monotonic() + 30
        while len(ports) < 2 and time.monotonic() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"(https|http)://127\.0\.0\.1:(\d+)/", line)
            if m:
                ports[m.group(1)] = int(m.group(2))
        assert len(ports) == 2, "the simulator did not print its ports"
        d = tmp_path / "pki"
        signer = R.Signer((d / "signer.pem").read_bytes(), (d / "signer.key").read_bytes())
        content, pid, uid, _ = new_cda()
        body, ct, mid = R.iti41(signer, [R.Doc(content, unique_id=uid)], pid)
        ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        ctx.load_cert_chain(str(d / "client.pem"), str(d / "client.key"))
        conn = http.client.HTTPSConnection("localhost", ports["https"], context=ctx, timeout=10)
        conn.request("POST", "/", body=body, headers={"Content-Type": ct})
        resp = conn.getresponse()
        r = read_response(resp.read(), resp.getheader("content-type"))
        assert r.success and r.relates_to == mid
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/health", timeout=5).read())
        assert health["accepted"] == 1
        assert len(list((tmp_path / "store").iterdir())) == 1
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


@pytest.mark.parametrize("body, ct", [
    (b"garbage", "multipart/related; boundary=zz"),
    (b"garbage", "application/json"),
    (b"<not-xml", "application/soap+xml"),
    (b'<!DOCTYPE e [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]><e>&b;</e>', "application/soap+xml"),
    (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body/></s:Envelope>', "text/xml"),
])
def test_unreadable_requests_get_a_sender_fault(pki, sim, body, ct):
    before = len(sim.accepted)
    status, rct, rbody = post(pki, sim, body, ct)
    r = read_response(rbody, rct)
    assert status in (400, 500) and r.fault is not None and r.fault.code in ("Sender", "VersionMismatch")
    assert len(sim.accepted) == before
