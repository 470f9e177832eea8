"""engine.xds.response: reading ITI-41 / ITI-57 answers and building the simulator's answers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.xds import schemas
from engine.xds.response import (
    ACTION_ITI41_RESPONSE, ACTION_ITI57_RESPONSE, RegistryError, ResponseError, build_error_list,
    build_fault, build_success, parse_envelope, read_envelope, read_response,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "../shared/specs/dmp-drimbox/JeuxDeDonnees/exemples/XDS/response.xml"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"


def test_reads_the_dmp_example_answer():
    # The example lost the line breaks of its MIME headers: read its envelope part.
    raw = EXAMPLE.read_bytes()
    env = re.search(rb"<soap:Envelope.*</soap:Envelope>", raw, re.S).group(0)
    r = read_envelope(env)
    assert r.success and r.status == "Success" and r.errors == () and r.fault is None
    assert r.relates_to == "urn:uuid:a6ba8f7f-b214-4a2d-96f1-54293d537ce3"
    assert r.action == ACTION_ITI41_RESPONSE


def test_success_is_multipart_like_the_dmp_and_valid():
    body, ct = build_success("urn:uuid:1234", message_id="urn:uuid:abcd")
    assert ct.startswith("multipart/related;") and 'type="application/xop+xml"' in ct
    r = read_response(body, ct)
    assert (r.status, r.relates_to, r.message_id, r.action) == ("Success", "urn:uuid:1234", "urn:uuid:abcd",
                                                                ACTION_ITI41_RESPONSE)
    env = parse_envelope(re.search(rb"<\?xml.*</soap:Envelope>", body, re.S).group(0))
    assert schemas.validate_registry_response(env) == []


def test_error_list_round_trip_and_schema():
    errors = [RegistryError("XDSRepositoryMetadataError", "hash differs", "Error", "Doc01"),
              RegistryError("XDSExtraMetadataNotSaved", "ignored slot", "Warning", "")]
    body, ct = build_error_list("urn:uuid:9", errors, status="PartialSuccess", action=ACTION_ITI57_RESPONSE)
    r = read_response(body, ct)
    assert not r.success and r.status == "PartialSuccess" and r.errors == tuple(errors)
    env = parse_envelope(re.search(rb"<\?xml.*</soap:Envelope>", body, re.S).group(0))
    assert schemas.validate_registry_response(env, ACTION_ITI57_RESPONSE) == []


def test_fault_with_a_dmp_code():
    body, ct = build_fault("urn:uuid:7", code="Sender", dmp_code="DMP_CODE_X", dmp_label="Libellé de l'erreur")
    assert ct.startswith("application/soap+xml")
    r = read_response(body, ct)
    assert r.status is None and not r.success and r.relates_to == "urn:uuid:7"
    assert r.fault.code == "Sender" and r.fault.subcodes == ("DMP_CODE_X",)
    assert (r.fault.dmp_code, r.fault.dmp_label) == ("DMP_CODE_X", "Libellé de l'erreur")


def test_ws_security_subcode_is_not_taken_for_a_dmp_code():
    body, ct = build_fault("urn:uuid:8", subcodes=[(WSSE, "FailedCheck")], reason="bad signature")
    f = read_response(body, ct).fault
    assert f.subcodes == ("FailedCheck",) and f.dmp_code == "" and f.reason == "bad signature"


def test_dmp_code_from_an_own_subcode_or_a_detail_element():
    env = b"""<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><s:Fault>
      <s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value xmlns:d="urn:dmp">d:DMP_ERR_9</s:Value></s:Subcode></s:Code>
      <s:Reason><s:Text xml:lang="fr">Erreur interne</s:Text></s:Reason></s:Fault></s:Body></s:Envelope>"""
    f = read_envelope(env).fault
    assert (f.code, f.dmp_code, f.dmp_label) == ("Receiver", "DMP_ERR_9", "Erreur interne")
    env = b"""<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><s:Fault>
      <s:Code><s:Value>s:Sender</s:Value></s:Code><s:Reason><s:Text>x</s:Text></s:Reason>
      <s:Detail><e:erreur xmlns:e="urn:x"><e:code>42</e:code><e:message>Patient inconnu</e:message></e:erreur></s:Detail>
      </s:Fault></s:Body></s:Envelope>"""
    f = read_envelope(env).fault
    assert (f.dmp_code, f.dmp_label) == ("42", "Patient inconnu")


@pytest.mark.parametrize("body, ct, why", [
    (b"", "application/soap+xml", "not well-formed"),
    (b"<a/>", "application/soap+xml", "not a SOAP 1.2 Envelope"),
    (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body/></s:Envelope>',
     "text/xml", "not a SOAP 1.2 Envelope"),
    (b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body/></s:Envelope>',
     "application/soap+xml", "empty SOAP Body"),
    (b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><x/></s:Body></s:Envelope>',
     "application/soap+xml", "neither a RegistryResponse nor a Fault"),
    (b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body><r:RegistryResponse '
     b'xmlns:r="urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0" status="Done"/></s:Body></s:Envelope>',
     "application/soap+xml", "unknown status"),
    (b"--b\r\nno headers", 'multipart/related; boundary="b"', "MIME"),
    (b"{}", "application/json", "MIME"),
    (b'<!DOCTYPE x [<!ENTITY e "boom">]><s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"/>',
     "application/soap+xml", "DTD"),
])
def test_unreadable_answers_raise_one_error_type(body, ct, why):
    with pytest.raises(ResponseError, match=why):
        read_response(body, ct)


def _answers():
    yield build_success("urn:uuid:1")
    yield build_error_list("urn:uuid:2", [RegistryError("XDSRegistryError", "x", "Error", "l")])
    yield build_fault("urn:uuid:3", dmp_code="C", dmp_label="L")


def test_mangled_answers_give_a_result_or_response_error():
    """Property: whatever the bytes, the reader returns a result or raises ResponseError."""
    from hypothesis import given, settings, strategies as st

    answers = list(_answers())

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.sampled_from(range(len(answers))), st.integers(0, 10_000), st.binary(max_size=8),
           st.integers(0, 40))
    def check(which, pos, insert, cut):
        body, ct = answers[which]
        pos %= len(body) + 1
        mangled = body[:pos] + insert + body[pos + cut:]
        try:
            read_response(mangled, ct)
        except ResponseError:
            pass

    check()
