"""engine.config: the sample routes.yaml, error paths + lines, durations/sizes, retry delays."""
from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from engine.config import (
    Config,
    ConfigError,
    RetryPolicy,
    config_fingerprint,
    load_config,
    load_config_text,
)
from engine.durations import format_duration, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "engine" / "routes.yaml"
CONFIGS = Path(__file__).resolve().parent / "configs"


def problems_of(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as ei:
        load_config_text(textwrap.dedent(text))
    return [(p.path, p.line, p.message) for p in ei.value.problems]


def only_problem(text: str) -> tuple[str, int | None, str]:
    probs = problems_of(text)
    assert len(probs) == 1, probs
    return probs[0]


BASE = """\
channels:
  in:
    type: mllp
    port: 2575
routes:
  - name: all
    from: in
    to: [ris]
destinations:
  ris:
    type: mllp
    host: 127.0.0.1
    port: 2576
"""


# ---------------------------------------------------------------------------------------------
# valid files
# ---------------------------------------------------------------------------------------------


def test_sample_routes_yaml_loads():
    cfg = load_config(SAMPLE)
    ch = cfg.channel("mllp-in")
    assert (ch.type, ch.bind, ch.port) == ("mllp", "127.0.0.1", 2575)
    assert "ACK^*" not in ch.accept.message_types
    assert "ADT^*" in ch.accept.message_types and "ORM^O01" in ch.accept.message_types
    assert ch.accept.versions == ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6"]
    assert ch.framing.max_frame_size == 20 * 1024 * 1024
    assert ch.framing.idle_timeout == 600.0
    assert cfg.engine.status.bind == "127.0.0.1" and cfg.engine.status.port == 8575
    assert cfg.engine.duplicates.window == 7 * 86400
    assert set(cfg.destinations) == {"ris-adt", "teleradiology", "reports-out", "drimbox", "dmp"}
    assert cfg.destination("dmp").enabled is False and cfg.destination("dmp").hold == 600  # needs certificates
    drimbox = cfg.destination("drimbox")
    assert (drimbox.type, drimbox.port, drimbox.expect_ack, drimbox.queue.ordering) == (
        "drimbox", 2579, True, "document")
    ris = cfg.destination("ris-adt")
    assert (ris.host, ris.port) == ("127.0.0.1", 2576)
    assert ris.queue.ordering == "key" and ris.queue.ordering_key == "PID-3.1"
    assert cfg.destination("teleradiology").port == 2577
    assert cfg.destination("reports-out").port == 2578
    assert {r.source for r in cfg.routes} == {"mllp-in"}
    assert {d for r in cfg.routes for d in r.to} == set(cfg.destinations)


def test_minimal_defaults():
    cfg = load_config(CONFIGS / "minimal.yaml")
    assert cfg.engine.name == "mini-pfi"
    assert cfg.engine.environment == "test"
    assert cfg.engine.store_url is None
    assert cfg.engine.status.token_env == "MINIPFI_STATUS_TOKEN"
    assert cfg.engine.duplicates.on_conflict == "reject"
    assert cfg.engine.on_store_unavailable == "nak"
    assert cfg.engine.shutdown_grace == 10.0
    ch = cfg.channel("in")
    assert ch.tls is None
    assert (ch.ack.mode, ch.ack.after) == ("auto", "commit")
    assert ch.framing.frame_timeout == 30.0 and ch.framing.max_connections == 200
    assert ch.framing.lenient_end_block is False
    assert ch.encoding.default == "UNICODE UTF-8" and ch.encoding.cp1252_fallback is True
    assert ch.accept.message_types == ["*"]
    assert "2.8" in ch.accept.versions and ch.accept.processing_ids == ["P", "T", "D"]
    assert (ch.validation.hl7apy, ch.validation.on_error) == (False, "warn")
    r = cfg.routes[0]
    assert r.filter.message_types == ["*"] and r.filter.sending_applications == []
    assert r.transforms == []
    d = cfg.destination("out")
    assert d.keep_alive and d.enabled and d.connect_timeout == 10.0 and d.ack_timeout == 30.0
    q = d.queue
    assert (q.max_attempts, q.on_ae, q.on_ar, q.ordering, q.ordering_key, q.concurrency) == (
        20, "error", "retry", "destination", None, 1)
    assert (q.retry.initial_delay, q.retry.max_delay, q.retry.multiplier, q.retry.jitter) == (1.0, 300.0, 2.0, 0.2)
    with pytest.raises(KeyError):
        cfg.channel("nope")


def test_empty_text_is_an_empty_config():
    cfg = load_config_text("")
    assert isinstance(cfg, Config) and cfg.channels == {} and cfg.routes == []


def test_fingerprint_ignores_comments_and_spelled_out_defaults():
    a = load_config_text(BASE)
    b = load_config_text("# comment\n" + BASE.replace("    port: 2576\n", "    port: 2576\n    enabled: true\n"))
    c = load_config_text(BASE.replace("2576", "2577"))
    assert config_fingerprint(a) == config_fingerprint(b)
    assert config_fingerprint(a) != config_fingerprint(c)
    assert len(config_fingerprint(a)) == 64


def test_message_type_code_alone_means_all_triggers():
    cfg = load_config_text(BASE.replace("    port: 2575\n", "    port: 2575\n    accept: {message_types: [ORU]}\n"))
    assert cfg.channel("in").accept.message_types == ["ORU^*"]


def test_tls_blocks():
    text = BASE.replace(
        "    port: 2575\n",
        "    port: 2575\n    tls: {cert: s.pem, key: s.key, ca: ca.pem, require_client_cert: true}\n",
    ).replace("    port: 2576\n", "    port: 2576\n    tls: {ca: ca.pem}\n")
    cfg = load_config_text(text)
    assert cfg.channel("in").tls.require_client_cert is True
    assert cfg.destination("ris").tls.verify_hostname is True


# ---------------------------------------------------------------------------------------------
# errors: path + line
# ---------------------------------------------------------------------------------------------


def test_unknown_key_typo_from_file():
    with pytest.raises(ConfigError) as ei:
        load_config(CONFIGS / "typo_key.yaml")
    (p,) = ei.value.problems
    assert (p.path, p.line) == ("destinations.ris.queue.max_attemps", 15)
    assert "did you mean 'max_attempts'" in p.message
    assert str(ei.value).startswith(f"{CONFIGS / 'typo_key.yaml'}:15: destinations.ris.queue.max_attemps: unknown key")


def test_wrong_type_message_format():
    text = BASE.replace("    port: 2576\n", "    port: 2576\n    queue:\n      max_attempts: many\n")
    with pytest.raises(ConfigError) as ei:
        load_config_text(text)
    assert str(ei.value) == "routes.yaml:15: destinations.ris.queue.max_attempts: Input should be a valid integer"


def test_schema_errors_all_reported_with_lines():
    with pytest.raises(ConfigError) as ei:
        load_config(CONFIGS / "schema_errors.yaml")
    got = {(p.path, p.line) for p in ei.value.problems}
    assert got == {
        ("engine.shutdown_grace", 2),
        ("channels.in.port", 6),                # a string is not a port (strict types)
        ("destinations.ris.host", 12),          # missing: reported at the mapping that lacks it
    }
    msgs = {p.path: p.message for p in ei.value.problems}
    assert msgs["destinations.ris.host"] == "Field required"
    assert "invalid duration 'soon'" in msgs["engine.shutdown_grace"]
    assert len(str(ei.value).splitlines()) == 3


def test_missing_required_port():
    path, line, msg = only_problem("""\
        channels:
          in:
            type: mllp
            bind: 127.0.0.1
        """)
    assert (path, line, msg) == ("channels.in.port", 2, "Field required")


def test_bad_duration():
    path, line, msg = only_problem(BASE + "    connect_timeout: 10 sec\n")
    assert (path, line) == ("destinations.ris.connect_timeout", 14)
    assert "invalid duration" in msg


def test_bad_size():
    text = BASE.replace("    port: 2575\n", "    port: 2575\n    framing:\n      max_frame_size: 20 megs\n")
    path, line, msg = only_problem(text)
    assert (path, line) == ("channels.in.framing.max_frame_size", 6)
    assert "invalid size" in msg


def test_unknown_channel_type():
    path, line, msg = only_problem(BASE.replace("    type: mllp\n    port: 2575", "    type: mlp\n    port: 2575"))
    assert (path, line) == ("channels.in.type", 3)
    assert "unknown type 'mlp'" in msg


def test_missing_channel_type():
    path, line, msg = only_problem(BASE.replace("    type: mllp\n    port: 2575", "    port: 2575"))
    assert (path, line) == ("channels.in.type", 2)
    assert msg.startswith("Field required")


def test_bad_channel_name():
    path, line, msg = only_problem(BASE.replace("  in:\n", "  In Bound:\n").replace("from: in", "from: In Bound"))
    assert (path, line) == ("channels.In Bound", 2)
    assert "invalid name" in msg


def test_unquoted_version_is_explained():
    text = BASE.replace("    port: 2575\n", "    port: 2575\n    accept:\n      versions: [2.5, \"2.5.1\"]\n")
    path, line, msg = only_problem(text)
    assert (path, line) == ("channels.in.accept.versions[0]", 6)
    assert "quoted" in msg


def test_route_from_unknown_channel():
    path, line, msg = only_problem(BASE.replace("from: in", "from: inn"))
    assert (path, line) == ("routes[0].from", 7)
    assert msg == "unknown channel 'inn' (did you mean 'in'?)"


def test_route_to_unknown_destination():
    path, line, msg = only_problem(BASE.replace("to: [ris]", "to: [ris, pacs]"))
    assert (path, line) == ("routes[0].to[1]", 8)
    assert msg.startswith("unknown destination 'pacs'")


def test_route_to_empty_list():
    path, line, msg = only_problem(BASE.replace("to: [ris]", "to: []"))
    assert (path, line) == ("routes[0].to", 8)


def test_route_source_key_is_from_not_source():
    probs = problems_of(BASE.replace("from: in", "source: in"))
    assert [(p, line) for p, line, _ in probs] == [("routes[0].from", 6), ("routes[0].source", 7)]
    assert probs[0][2] == "Field required"
    assert probs[1][2] == "unknown key 'source' (allowed: name, from, filter, transforms, to, business_acks, stop)"


def test_crossref_errors_from_file():
    with pytest.raises(ConfigError) as ei:
        load_config(CONFIGS / "crossref_errors.yaml")
    got = [(p.path, p.line) for p in ei.value.problems]
    assert got == [
        ("channels.in3.port", 12),
        ("routes[0].from", 15),
        ("routes[0].to[1]", 16),
        ("routes[1].name", 17),
        ("routes[1].transforms[1].type", 21),
        ("destinations.ris.queue.ordering", 29),
    ]
    msgs = [p.message for p in ei.value.problems]
    assert "already bound by channel 'in2'" in msgs[0]
    assert "duplicate route name 'r1'" in msgs[3]
    assert "unknown transform type 'set_feild'" in msgs[4]
    assert "ordering: key requires ordering_key" in msgs[5]


def test_ordering_key_missing():
    path, line, msg = only_problem(BASE + "    queue:\n      ordering: key\n")
    assert (path, line) == ("destinations.ris.queue.ordering", 15)


def test_ordering_key_bad_path():
    path, line, msg = only_problem(BASE + "    queue:\n      ordering: key\n      ordering_key: PID3\n")
    assert (path, line) == ("destinations.ris.queue.ordering_key", 16)
    assert "invalid field path" in msg


@pytest.mark.parametrize("key", ["OBX[2]-5", "PID-3[2].4.2"])
def test_ordering_key_uses_the_one_field_path_syntax(key):
    cfg = load_config_text(textwrap.dedent(BASE + f"    queue:\n      ordering: key\n      ordering_key: {key}\n"))
    assert cfg.destinations["ris"].queue.ordering_key == key


@pytest.mark.parametrize("key", ["OBX[0]-5", "MSH-2.1", "PID-3.1.2.3"])
def test_ordering_key_rejected_by_parse_path(key):
    path, line, msg = only_problem(BASE + f"    queue:\n      ordering: key\n      ordering_key: {key}\n")
    assert path == "destinations.ris.queue.ordering_key" and "invalid field path" in msg


def test_bad_transform_type_and_params():
    text = BASE.replace(
        "    to: [ris]\n",
        "    transforms:\n"
        "      - type: set_field\n"
        "        field: MSH-5\n"
        "      - type: uppercase\n"
        "    to: [ris]\n",
    )
    probs = problems_of(text)
    assert [(p, line) for p, line, _ in probs] == [
        ("routes[0].transforms[0].value", 9),
        ("routes[0].transforms[1].type", 11),
    ]
    assert probs[1][2].startswith("unknown transform type 'uppercase' (known: ")


def test_status_non_loopback_requires_token_env():
    text = "engine:\n  status:\n    bind: 0.0.0.0\n    token_env: null\n"
    path, line, msg = only_problem(text)
    assert (path, line) == ("engine.status.token_env", 4)
    assert "not a loopback address" in msg
    # with the default token_env it is fine; loopback without a token is fine
    assert load_config_text("engine:\n  status:\n    bind: 0.0.0.0\n").engine.status.token_env
    assert load_config_text("engine:\n  status:\n    bind: ::1\n    token_env: null\n")


def test_require_client_cert_requires_ca():
    text = BASE.replace("    port: 2575\n", "    port: 2575\n    tls:\n      cert: a\n      key: b\n      require_client_cert: true\n")
    path, line, msg = only_problem(text)
    assert (path, line) == ("channels.in.tls.require_client_cert", 8)


def test_server_tls_needs_cert_and_key():
    text = BASE.replace("    port: 2575\n", "    port: 2575\n    tls:\n      cert: a\n")
    path, line, msg = only_problem(text)
    assert (path, line, msg) == ("channels.in.tls.key", 5, "Field required")


def test_enum_value_error():
    path, line, msg = only_problem(BASE + "    queue:\n      on_ae: ignore\n")
    assert (path, line) == ("destinations.ris.queue.on_ae", 15)
    assert "'error' or 'retry'" in msg


def test_concurrency_needs_key_or_none_ordering():
    path, line, _ = only_problem(BASE + "    queue:\n      concurrency: 4\n")
    assert (path, line) == ("destinations.ris.queue.concurrency", 15)
    assert load_config_text(BASE + "    queue:\n      ordering: none\n      concurrency: 4\n")


def test_duplicate_yaml_key():
    probs = problems_of(BASE + "    port: 2577\n")
    assert ("destinations.ris.port", 14, "duplicate key") in probs


def test_yaml_syntax_error_has_line():
    with pytest.raises(ConfigError) as ei:
        load_config_text("channels:\n  in:\n    type: [mllp\n    port: 1\n")
    (p,) = ei.value.problems
    assert p.line is not None and p.message.startswith("YAML syntax error")


@pytest.mark.parametrize("text", ["\x1c", "channels: {}\n\x00\n"])
def test_control_character_is_a_config_error(text):
    # found by fuzzing: the YAML reader's own error escaped the loader
    with pytest.raises(ConfigError) as ei:
        load_config_text(text)
    assert ei.value.problems[0].message.startswith("YAML error")


def test_top_level_must_be_mapping():
    with pytest.raises(ConfigError):
        load_config_text("- a\n- b\n")


def test_python_tags_are_refused():
    with pytest.raises(ConfigError):
        load_config_text("engine: !!python/object/apply:os.system ['true']\n")


def test_missing_file():
    with pytest.raises(ConfigError) as ei:
        load_config(CONFIGS / "does-not-exist.yaml")
    assert "cannot read configuration" in str(ei.value)


# ---------------------------------------------------------------------------------------------
# durations and sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,seconds",
    [(5, 5.0), (2.5, 2.5), ("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("2h", 7200.0), ("7d", 604800.0),
     ("30", 30.0), ("1.5m", 90.0), (" 10 s ", 10.0), ("10S", 10.0), (0, 0.0)],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "soon", "10 years", "-5s", -1, True, None, [1], "5w", "1e3s", float("inf")])
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    "value,size",
    [(1024, 1024), ("20MB", 20 * 1024 * 1024), ("512KB", 512 * 1024), ("1GB", 1024**3), ("100", 100),
     ("64B", 64), ("2mib", 2 * 1024 * 1024), ("1.5KB", 1536)],
)
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "20 megs", "-1", -1, True, None, "1TB", 1.5])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_format_duration():
    assert [format_duration(x) for x in (0.5, 10, 300, 7200, 604800, 1.25)] == ["500ms", "10s", "5m", "2h", "7d", "1.25s"]


# ---------------------------------------------------------------------------------------------
# retry policy
# ---------------------------------------------------------------------------------------------


def test_retry_delay_exponential_without_jitter():
    p = RetryPolicy(initial_delay=1, max_delay=60, multiplier=2.0, jitter=0)
    rng = random.Random(1)
    assert [p.delay(n, rng) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert p.delay(0, rng) == 1  # attempt < 1 treated as 1
    assert p.delay(10_000, rng) == 60  # no overflow


def test_retry_delay_jitter_bounded_and_capped():
    p = RetryPolicy(initial_delay=1, max_delay=300, multiplier=2.0, jitter=0.2)
    rng = random.Random(42)
    for attempt in range(1, 30):
        base = min(2 ** (attempt - 1), 300)
        seen = [p.delay(attempt, rng) for _ in range(50)]
        assert all(base * 0.8 - 1e-9 <= d <= min(base * 1.2, 300) + 1e-9 for d in seen), attempt
        assert all(d <= 300 for d in seen)
    # jitter actually varies the delays
    assert len({p.delay(3, rng) for _ in range(20)}) > 1


def test_retry_delay_deterministic_with_seeded_rng():
    p = RetryPolicy()
    assert [p.delay(n, random.Random(7)) for n in range(1, 5)] == [p.delay(n, random.Random(7)) for n in range(1, 5)]


def test_retry_policy_validation():
    path, line, msg = only_problem(BASE + "    queue:\n      retry: {initial_delay: 10m, max_delay: 1m}\n")
    assert (path, line) == ("destinations.ris.queue.retry", 15)
    assert "max_delay" in msg
    path, line, msg = only_problem(BASE + "    queue:\n      retry:\n        jitter: 1.5\n")
    assert (path, line) == ("destinations.ris.queue.retry.jitter", 16)


# ---------------------------------------------------------------------------------------------
# report rules: per-block overrides checked against the catalogue
# ---------------------------------------------------------------------------------------------

RULES_BASE = BASE.replace("    port: 2575\n", """    port: 2575
    reports:
      enabled: true
      rules:
        cisis.copy.document-id: reject
        cda.schematron: off
    teleradiology:
      enabled: true
      rules: {tlr.obr.copy: warn}
""")


def test_report_rules_load():
    ch = load_config_text(RULES_BASE).channel("in")
    # a bare `off` (a YAML 1.1 boolean) is the severity off
    assert ch.reports.rules == {"cisis.copy.document-id": "reject", "cda.schematron": "off"}
    assert ch.teleradiology.rules == {"tlr.obr.copy": "warn"}
    assert ch.pacs_reports.rules == {}


@pytest.mark.parametrize("line, replacement, expected", [
    ("        cisis.copy.document-id: reject\n", "        cisis.copy.documentid: reject\n",
     ("channels.in.reports.rules.cisis.copy.documentid", 8,
      "unknown rule 'cisis.copy.documentid' for reports (did you mean 'cisis.copy.document-id'?)")),
    # a teleradiology rule has no meaning in the reports block
    ("        cisis.copy.document-id: reject\n", "        tlr.obr.copy: reject\n",
     ("channels.in.reports.rules.tlr.obr.copy", 8, "unknown rule 'tlr.obr.copy' for reports (see minipfi inspect --rules)")),
])
def test_unknown_report_rule_is_an_error_with_its_line(line, replacement, expected):
    assert only_problem(RULES_BASE.replace(line, replacement)) == expected


def test_report_rule_severity_is_checked():
    path, line, message = only_problem(RULES_BASE.replace("cisis.copy.document-id: reject", "cisis.copy.document-id: maybe"))
    assert (path, line) == ("channels.in.reports.rules.cisis.copy.document-id", 8)
    assert "'reject', 'warn' or 'off'" in message


def test_a_rule_with_nothing_to_deliver_cannot_be_relaxed():
    text = BASE.replace("    port: 2575\n", """    port: 2575
    pacs_reports:
      enabled: true
      rules: {pacs.identity.unknown: warn, cisis.copy.document-id: reject}
""")
    path, line, message = only_problem(text)
    assert (path, line) == ("channels.in.pacs_reports.rules.pacs.identity.unknown", 7)
    assert "cannot be relaxed" in message
