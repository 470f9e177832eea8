"""Sans-I/O tests of mllp.framing (no sockets)."""
from __future__ import annotations

import time

from mllp.framing import (
    COMMIT_ACK,
    Frame,
    FrameDiscarded,
    FrameTooLarge,
    GarbageSkipped,
    MLLPFramer,
    encode_frame,
)

MSG = b"MSH|^~\\&|SND|FAC|RCV|FAC|20240101||ADT^A01|MSG1|P|2.5\rPID|1||123\r"


def frames(events):
    return [e.payload for e in events if isinstance(e, Frame)]


def test_encode_frame():
    assert encode_frame(b"abc") == b"\x0babc\x1c\x0d"
    assert encode_frame(COMMIT_ACK) == b"\x0b\x06\x1c\x0d"


def test_one_byte_per_feed_gives_one_frame():
    f = MLLPFramer()
    events = []
    for b in encode_frame(MSG):
        events += f.feed(bytes([b]))
    assert events == [Frame(MSG)]
    assert not f.in_frame and f.buffered == 0


def test_three_frames_in_one_feed_in_order():
    f = MLLPFramer()
    msgs = [MSG.replace(b"MSG1", b"MSG%d" % i) for i in range(3)]
    events = f.feed(b"".join(encode_frame(m) for m in msgs))
    assert events == [Frame(m) for m in msgs]


def test_partial_frame_buffered_across_feeds():
    f = MLLPFramer()
    data = encode_frame(MSG) + encode_frame(b"second")
    assert f.feed(data[:10]) == []
    assert f.in_frame and f.buffered == 9
    assert frames(f.feed(data[10:-3])) == [MSG]
    assert f.in_frame
    assert f.feed(data[-3:]) == [Frame(b"second")]


def test_garbage_before_start_block_counted():
    f = MLLPFramer()
    events = f.feed(b"junk\x00\n" + encode_frame(MSG) + b"\x00\x00" + encode_frame(b"x") + b"tail")
    assert events == [GarbageSkipped(6), Frame(MSG), GarbageSkipped(2), Frame(b"x"), GarbageSkipped(4)]


def test_garbage_across_feeds_one_event_per_feed():
    f = MLLPFramer()
    assert f.feed(b"abc") == [GarbageSkipped(3)]
    assert f.feed(b"de\x0bxy\x1c\x0d") == [GarbageSkipped(2), Frame(b"xy")]


def test_resync_on_new_start_block():
    f = MLLPFramer()
    assert f.feed(b"\x0bpartial") == []
    events = f.feed(b"-more\x0b" + MSG + b"\x1c\x0d")
    assert events == [FrameDiscarded(12, "resync"), Frame(MSG)]


def test_missing_trailing_cr_strict_gives_no_frame():
    f = MLLPFramer()
    assert f.feed(b"\x0b" + MSG + b"\x1c") == []
    assert f.in_frame
    # The next message's start block then resyncs: the unterminated frame is discarded.
    events = f.feed(b"\x0bnext\x1c\x0d")
    assert events == [FrameDiscarded(len(MSG) + 1, "resync"), Frame(b"next")]


def test_missing_trailing_cr_lenient_gives_frame():
    f = MLLPFramer(lenient_end=True)
    assert f.feed(b"\x0b" + MSG + b"\x1c") == [Frame(MSG)]
    assert not f.in_frame
    # A CR arriving later belongs to the end block: consumed silently, not garbage.
    assert f.feed(b"\x0d\x0bnext\x1c") == [Frame(b"next")]
    assert f.feed(b"\x0bthird\x1c\x0bfourth\x1c\x0d") == [Frame(b"third"), Frame(b"fourth")]


def test_eb_inside_payload_not_followed_by_cr_strict():
    f = MLLPFramer()
    payload = b"abc\x1cdef\x1c"
    assert f.feed(b"\x0b" + payload) == []  # trailing 0x1C: wait for the next byte
    assert f.feed(b"ghi\x1c\x0d") == [Frame(payload + b"ghi")]


def test_oversize_is_terminal():
    f = MLLPFramer(max_frame_size=100)
    assert f.feed(b"\x0b" + b"a" * 60) == []
    events = f.feed(b"b" * 60)
    assert events == [FrameTooLarge(120)]
    assert f.dead and not f.in_frame and f.buffered == 0
    assert f.feed(encode_frame(b"ok")) == []


def test_oversize_complete_frame_in_one_feed():
    f = MLLPFramer(max_frame_size=10)
    assert f.feed(encode_frame(b"small") + encode_frame(b"x" * 11)) == [Frame(b"small"), FrameTooLarge(11)]


def test_frame_exactly_max_size_accepted():
    f = MLLPFramer(max_frame_size=10)
    assert f.feed(encode_frame(b"x" * 10)) == [Frame(b"x" * 10)]


def test_reset_partial():
    f = MLLPFramer()
    f.feed(b"\x0bhalf a message")
    assert f.reset_partial() == 14
    assert not f.in_frame and f.buffered == 0
    assert f.feed(b"rest\x1c\x0d\x0bnew\x1c\x0d") == [GarbageSkipped(6), Frame(b"new")]


def test_200kb_frame_in_1kb_chunks_is_fast():
    payload = (b"OBX|1|TX|||" + b"x" * 200 + b"\r") * 950  # about 200 KB
    data = encode_frame(payload)
    f = MLLPFramer()
    t0 = time.perf_counter()
    for _ in range(20):
        events = []
        for i in range(0, len(data), 1024):
            events += f.feed(data[i : i + 1024])
        assert events == [Frame(payload)]
    per_frame = (time.perf_counter() - t0) / 20
    # Linear scanning costs well under a millisecond; rescanning from the start costs ~100x more.
    assert per_frame < 0.01, per_frame


def test_one_byte_per_feed_is_linear():
    data = encode_frame(b"y" * 50_000)
    f = MLLPFramer()
    t0 = time.perf_counter()
    n = 0
    for i in range(len(data)):
        n += len(f.feed(data[i : i + 1]))
    assert n == 1
    assert time.perf_counter() - t0 < 1.0
