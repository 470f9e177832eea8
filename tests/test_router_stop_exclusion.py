"""Routes with ``stop: true`` (first match wins from there) and exclusion filters (``not:``)."""
from __future__ import annotations

import pytest

from engine.config import ConfigError, load_config_text
from engine.router import Router
from tests.test_router import msh

CONFIG = """\
channels:
  in: {type: mllp, port: 2575}
routes:
  - name: urgent-lab
    from: in
    filter:
      message_types: ["ORU^R01"]
      sending_applications: [LAB]
    to: [urgent]
    stop: true
  - name: adt-but-not-updates
    from: in
    filter:
      message_types: ["ADT^*"]
      not:
        message_types: ["ADT^A08", "ADT^A31"]
    to: [ris]
  - name: all-but-test-system
    from: in
    filter:
      not: {sending_applications: [TESTSYS], sending_facilities: [LABO]}
    to: [archive]
    stop: true
  - name: never-after-stop
    from: in
    to: [pacs]
destinations:
  urgent: {type: mllp, host: 127.0.0.1, port: 2601}
  ris: {type: mllp, host: 127.0.0.1, port: 2602}
  archive: {type: mllp, host: 127.0.0.1, port: 2603}
  pacs: {type: mllp, host: 127.0.0.1, port: 2604}
"""


@pytest.fixture(scope="module")
def router():
    return Router(load_config_text(CONFIG))


def dests(router, **kw):
    return [t.destination for t in router.targets("in", msh(**kw))]


def test_stop_ends_the_search_at_the_first_matching_stop_route(router):
    assert dests(router, code="ORU", trigger="R01", app="LAB") == ["urgent"]
    # a route before the stop keeps its destinations; the stop route stops the rest
    assert dests(router, code="ADT", trigger="A01") == ["ris", "archive"]
    # the stop route did not match: the search goes on
    assert dests(router, code="ORU", trigger="R01", app="TESTSYS", facility="LABO") == ["pacs"]


def test_exclusion_by_message_type(router):
    assert dests(router, code="ADT", trigger="A08") == ["archive"]
    assert dests(router, code="ADT", trigger="A31") == ["archive"]
    assert dests(router, code="ADT", trigger="A04") == ["ris", "archive"]


def test_exclusion_needs_every_key_given(router):
    # TESTSYS from LABO is excluded; TESTSYS from elsewhere is not
    assert "archive" not in dests(router, code="ORM", trigger="O01", app="TESTSYS", facility="LABO")
    assert "archive" in dests(router, code="ORM", trigger="O01", app="TESTSYS", facility="HOSP")


def test_empty_exclusion_and_unknown_key_are_refused():
    bad = CONFIG.replace("not: {sending_applications: [TESTSYS], sending_facilities: [LABO]}", "not: {}")
    with pytest.raises(ConfigError, match="at least one key"):
        load_config_text(bad)
    bad = CONFIG.replace('not:\n        message_types: ["ADT^A08", "ADT^A31"]',
                         'not:\n        message_type: ["ADT^A08"]')
    with pytest.raises(ConfigError, match="message_type"):
        load_config_text(bad)
    with pytest.raises(ConfigError, match="stop"):
        load_config_text(CONFIG.replace("stop: true", "stop: yes-please", 1))
