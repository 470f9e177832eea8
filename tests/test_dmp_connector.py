"""The DMP connector without sockets: answer classification (the module's outcome table), who
gets a DMP entry, and what ``minipfi check`` refuses in a ``dmp`` destination."""
from __future__ import annotations

import datetime as dt
import textwrap

import pytest

from engine import wiring  # noqa: F401 - registers the dmp type
from engine.config import ConfigError, load_config_text
from engine.connectors.base import ACCEPTED, ERROR, TRANSIENT, StoredView
from engine.connectors.dmp import check_files, classify, dmp_targets
from engine.reports.submission import INS, Document, Recipients, Submission
from engine.simulators.demo_pki import issue, make_ca, make_demo_pki, write_cert, write_key
from engine.xds.response import RegistryError, build_error_list, build_fault, build_success


def answer(pair):
    body, ct = pair
    return body, {"content-type": ct}


def test_success_is_accepted_with_a_positive_z01():
    body, h = answer(build_success("urn:uuid:1"))
    o = classify(200, h, body)
    assert o.kind == ACCEPTED and o.response == body
    assert [(b.event, b.ok) for b in o.business_acks] == [("Z01", True)]


def test_registry_error_list_is_a_content_error_with_the_code_not_the_text():
    body, h = answer(build_error_list("urn:uuid:1", [RegistryError("XDSPatientIdDoesNotMatch", "INS 1234567890123 inconnu")]))
    o = classify(200, h, body)
    assert o.kind == ERROR and "XDSPatientIdDoesNotMatch" in o.detail
    assert "1234567890123" not in o.detail and "1234567890123" not in str(o.error)   # goes to logs
    (z,) = o.business_acks
    assert not z.ok and z.error.code == "XDSPatientIdDoesNotMatch"
    assert z.error.label == "INS 1234567890123 inconnu"     # the ZAM (message content) keeps it


def test_sender_fault_with_dmp_code_is_final_receiver_fault_is_retried():
    body, h = answer(build_fault("urn:uuid:1", code="Sender", dmp_code="DMP-42", dmp_label="refus"))
    o = classify(400, h, body)
    assert o.kind == ERROR and o.error.code == "DMP-42" and o.business_acks[0].error.label == "refus"
    body, h = answer(build_fault("urn:uuid:1", code="Receiver", reason="busy"))
    o = classify(500, dict(h, **{"retry-after": "30"}), body)
    assert o.kind == TRANSIENT and o.retry_after == 30.0 and not o.business_acks


def test_plain_http_errors():
    assert classify(503, {"retry-after": "7"}, b"").kind == TRANSIENT
    assert classify(503, {"retry-after": "7"}, b"").retry_after == 7.0
    assert classify(404, {"content-type": "text/html"}, b"<html/>").kind == ERROR
    assert classify(200, {"content-type": "text/html"}, b"<html/>").kind == TRANSIENT


def _stored(**kw):
    flags = dict(dmp=True)
    sub = Submission(message_type="MDM^T02", control_id="C1",
                     ins=kw.get("ins", INS(value="279035121518989", oid="1.2.250.1.213.1.4.10")),
                     identity_reliability=kw.get("reliability", "VALI"),
                     recipients=Recipients(dmp=kw.get("dmp", flags["dmp"])),
                     documents=[Document(sha256="0" * 64, size=1)])
    return StoredView(kind=kw.get("kind", "cisis"), submission=sub)


def test_targets_only_with_destdmp_and_a_qualified_ins():
    assert dmp_targets(None, _stored()) == ("",)
    assert dmp_targets(None, _stored(reliability="QUAL")) == ("",)
    assert dmp_targets(None, _stored(dmp=False)) == ()
    assert dmp_targets(None, _stored(reliability="PROV")) == ()
    assert dmp_targets(None, _stored(reliability=None)) == ()
    assert dmp_targets(None, _stored(ins=None)) == ()
    assert dmp_targets(None, _stored(ins=INS(value="1", oid="1.2.3"))) == ()
    assert dmp_targets(None, _stored(kind="pacs", reliability="VALI")) == ("",)
    assert dmp_targets(None, _stored(kind="pacs", reliability=None)) == ()
    assert dmp_targets(None, StoredView()) == ()


def dmp_yaml(pki, environment="test", hold="0s", signer_cert=None):
    return textwrap.dedent(f"""
        engine: {{environment: {environment}}}
        channels:
          in: {{type: mllp, port: 0}}
        routes:
          - {{name: r, from: in, to: [dmp], business_acks: back}}
        destinations:
          back: {{type: mllp, host: 127.0.0.1, port: 2576}}
          dmp:
            type: dmp
            hold: {hold}
            tls: {{cert: "{pki.client_cert}", key: "{pki.client_key}", ca: "{pki.ca}"}}
            signing: {{cert: "{signer_cert or pki.signer_cert}", key: "{pki.signer_key}"}}
            vihf: {{secteur_activite: {{code: SA07, scheme: 1.2.250.1.71.4.2.4}}, lps_name: x,
                    lps_version: "1", lps_homologation_id: H}}
            xds: {{endpoint: "https://localhost:1/r", source_id: 1.2.3}}
    """)


def test_check_files_and_production_hold(tmp_path):
    pki = make_demo_pki(tmp_path / "pki")
    cfg = load_config_text(dmp_yaml(pki))
    assert cfg.destinations["dmp"].hold == 0 and check_files(cfg.destinations["dmp"]) == []
    assert load_config_text(dmp_yaml(pki, hold=None).replace("    hold: None\n", "")).destinations["dmp"].hold == 600
    with pytest.raises(ConfigError, match="hold: 0 is allowed only outside production"):
        load_config_text(dmp_yaml(pki, environment="production"))
    # an expired signing certificate, a missing file, a key of another certificate
    ca_key, ca = make_ca()
    key, cert = issue(ca_key, ca, "expired", kind="signer", days=-1)
    expired = write_cert(tmp_path / "expired.pem", cert)
    bad = check_files(load_config_text(dmp_yaml(pki, signer_cert=expired)).destinations["dmp"])
    assert [p for p, _ in bad] == ["signing.cert"]
    assert "does not match" in bad[0][1] or "expired" in bad[0][1]
    write_key(tmp_path / "expired.key", key)
    cfg = load_config_text(dmp_yaml(pki, signer_cert=expired).replace(str(pki.signer_key), str(tmp_path / "expired.key")))
    assert check_files(cfg.destinations["dmp"]) == [("signing.cert", f"certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")]
    missing = load_config_text(dmp_yaml(pki, signer_cert=tmp_path / "nope.pem")).destinations["dmp"]
    assert "No such file" in check_files(missing)[0][1]
    with pytest.raises(ConfigError, match="business_acks must name an mllp destination"):
        load_config_text(dmp_yaml(pki).replace("business_acks: back", "business_acks: dmp"))
    assert dt.datetime.now(dt.timezone.utc) > cert.not_valid_after_utc


def test_sample_routes_start_without_the_disabled_dmp_certificates(tmp_path):
    """`make run` on a fresh checkout: the sample's DMP is disabled and its certificate files
    do not exist; building every destination's connector must not open them."""
    from pathlib import Path

    from engine.config import load_config
    from engine.connectors.registry import build

    sample = Path(__file__).resolve().parent.parent / "engine" / "routes.yaml"
    (tmp_path / "routes.yaml").write_bytes(sample.read_bytes())
    cfg = load_config(tmp_path / "routes.yaml")
    assert cfg.destinations["dmp"].enabled is False
    assert not (tmp_path / "certs").exists()
    for name, dest in cfg.destinations.items():
        assert build(dest, reactor=None) is not None, name
