"""Queue entries built by the MLLP channel: one list per route-target set without an ordering
key (reused from message to message), a fresh per-message key hash with ``ordering: key``."""
from __future__ import annotations

import textwrap
from contextlib import contextmanager

from engine.channels.mllp import MLLPChannel
from engine.config import load_config_text
from engine.hl7.ack import ControlIdGenerator
from engine.router import Router

CONFIG = textwrap.dedent("""
    channels:
      in: {type: mllp, port: 2575}
    routes:
      - {name: adt, from: in, to: [fifo, per_patient]}
    destinations:
      fifo: {type: mllp, host: 127.0.0.1, port: 9}
      per_patient:
        type: mllp
        host: 127.0.0.1
        port: 10
        queue: {ordering: key, ordering_key: PID-3.1}
""")


class Batcher:
    def __init__(self):
        self.records = []

    def add_call(self, record, fn, *args):
        self.records.append(record)

    def later(self, fn):
        pass


class Conn:
    peer = "127.0.0.1:1"


def adt(cid: str, ipp: str) -> bytes:
    return (f"MSH|^~\\&|GAM|CHU|PFI|CHU|20240101120000||ADT^A01^ADT_A01|{cid}|P|2.5\r"
            f"PID|1||{ipp}^^^CHU^PI||DOE^JOHN\r").encode()


def channel(config_text=CONFIG):
    cfg = load_config_text(config_text)
    batcher = Batcher()
    ch = MLLPChannel("in", cfg.channels["in"], cfg.engine, Router(cfg), batcher, ControlIdGenerator())
    return ch, batcher, cfg


@contextmanager
def channel_with_step(sqlite_url, step, config_text=CONFIG):
    """A channel on a real SQLite store and ingest batcher, its only processing step ``step``."""
    from twisted.internet import reactor

    from engine.ingest import IngestBatcher
    from engine.store import Store
    from tests import reactor_thread

    store = Store(sqlite_url)
    store.migrate()
    store.start()
    try:
        cfg = load_config_text(config_text)
        batcher = reactor_thread.call(IngestBatcher, store, reactor)
        ch = MLLPChannel("in", cfg.channels["in"], cfg.engine, Router(cfg), batcher, ControlIdGenerator(),
                         steps_for=lambda _c, _e: [step(cfg) if callable(step) else step])
        ch.store = store
        yield ch, store
    finally:
        store.stop()
        store.dispose()


def assert_ae_207_and_stored(ch, store, cid: str, says: bytes):
    """Send one ADT: AE with ERR-3 207 whose text ``says``, the message stored as rejected."""
    from tests import reactor_thread

    ack = reactor_thread.call(reactor_thread.reply_of, ch.handle, adt(cid, "IPP-A"), Conn())
    segs = ack.split(b"\r")
    assert segs[1].startswith(b"MSA|AE|" + cid.encode()), ack
    err = next(s for s in segs if s.startswith(b"ERR")).split(b"|")
    assert err[3].startswith(b"207") and says in err[8], err
    (row,) = store.list_messages()
    assert row.status == "rejected" and ch.counters.store_failures == 0
    return row


def test_fifo_entries_are_shared_and_keyed_entries_are_per_message():
    ch, batcher, _ = channel()
    for cid, ipp in (("1", "IPP-A"), ("2", "IPP-B"), ("3", "IPP-A")):
        ch.handle(adt(cid, ipp), Conn())
    entries = [{e.destination: e for e in r.entries} for r in batcher.records]
    # a per-patient key: the same for the same patient, another for another patient
    keys = [e["per_patient"].order_key for e in entries]
    assert keys[0] and keys[0] == keys[2] and keys[1] != keys[0]
    assert all(e["fifo"].order_key == "" for e in entries)


def test_fifo_only_route_reuses_one_entry_list_until_reload():
    text = CONFIG.replace("to: [fifo, per_patient]", "to: [fifo]")
    ch, batcher, cfg = channel(text)
    ch.handle(adt("1", "IPP-A"), Conn())
    ch.handle(adt("2", "IPP-B"), Conn())
    first, second = batcher.records
    assert first.entries is second.entries
    assert [(e.destination, e.route, e.order_key) for e in first.entries] == [("fifo", "adt", "")]
    # a reload (new router, new targets) builds new entries
    new = load_config_text(text.replace("name: adt", "name: adt2"))
    ch.reconfigure(new.channels["in"], new.engine, Router(new))
    ch.handle(adt("3", "IPP-C"), Conn())
    assert [e.route for e in batcher.records[2].entries] == ["adt2"]


def test_a_step_that_cannot_process_a_message_answers_ae_and_stores_it(sqlite_url):
    """A processing step whose ``prepare`` raises (a bug, an input it did not foresee) is a
    content answer, AE 207 with the message stored as rejected, never a false "store
    unavailable" AR that makes the sender resend forever."""
    class Crashing:
        name = "crashing"

        def applies(self, msh):
            return True

        def prepare(self, raw, codec, store):
            raise RuntimeError("unforeseen input")

        def make_op(self, *args):
            raise AssertionError("never reached")

    with channel_with_step(sqlite_url, Crashing()) as (ch, store):
        row = assert_ae_207_and_stored(ch, store, "C1", b"crashing step")
        assert store.get_message(row.id).entries == []  # not routed


def test_an_identity_feed_reader_failure_answers_ae_and_stores_it(sqlite_url, monkeypatch):
    """The identity feed reads the ADT in the writer's transaction: a reader that raises (a bug, an
    input it did not foresee) must not roll the message back and pass for a store failure."""
    import engine.steps.identity_feed as identity_feed

    def crashing(raw, codec):
        raise RuntimeError("unforeseen input")

    monkeypatch.setattr(identity_feed, "parse_adt", crashing)
    text = CONFIG.replace("port: 2575}", "port: 2575, identity_feed: {enabled: true}}")
    feed = lambda cfg: identity_feed.IdentityFeed(cfg.channels["in"].identity_feed, "test")  # noqa: E731
    with channel_with_step(sqlite_url, feed, text) as (ch, store):
        assert_ae_207_and_stored(ch, store, "C2", b"RuntimeError")


def test_an_identity_feed_adt_is_answered_aa_then_ar_207_once_the_store_is_gone(sqlite_url):
    """The identity feed's per-message path (a writer op answered without a Deferred): AA once
    committed; with the store writer stopped, AR 207 "store unavailable" and a store failure
    counted, never a positive ACK nor a hang."""
    import engine.steps.identity_feed as identity_feed
    from tests import reactor_thread

    text = CONFIG.replace("port: 2575}", "port: 2575, identity_feed: {enabled: true}}")
    feed = lambda cfg: identity_feed.IdentityFeed(cfg.channels["in"].identity_feed, "test")  # noqa: E731
    with channel_with_step(sqlite_url, feed, text) as (ch, store):
        ack = reactor_thread.call(reactor_thread.reply_of, ch.handle, adt("C3", "IPP-A"), Conn())
        assert ack.split(b"\r")[1].startswith(b"MSA|AA|C3"), ack
        assert ch.counters.accepted == 1 and ch.counters.store_failures == 0
        store.stop()
        ack = reactor_thread.call(reactor_thread.reply_of, ch.handle, adt("C4", "IPP-B"), Conn())
        segs = ack.split(b"\r")
        assert segs[1].startswith(b"MSA|AR|C4"), ack
        err = next(s for s in segs if s.startswith(b"ERR")).split(b"|")
        assert err[3].startswith(b"207") and b"unavailable" in err[8], err
        assert ch.counters.store_failures == 1 and len(store.list_messages()) == 1
