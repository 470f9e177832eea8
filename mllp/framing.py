"""Sans-I/O MLLP framer: bytes in, events out, no sockets and no Twisted.

A block is ``0x0B`` + payload + ``0x1C 0x0D`` (HL7 MLLP release 2). The framer is on the hot path
(thousands of small frames per second, and 200 KB report messages), so it keeps one ``bytearray``
per connection, searches the single byte ``0x1C`` from the last scanned position (never the
two-byte pair, never from the start again), and copies each payload exactly once.

Stream rules (see shared notes "MLLP correctness checklist"):

* bytes before a start block are skipped and reported as :class:`GarbageSkipped` (one event per
  run of garbage within one ``feed``);
* a start block inside an unterminated frame discards the partial frame (:class:`FrameDiscarded`,
  reason ``"resync"``) and starts a new frame;
* the end block is the pair ``0x1C 0x0D``; a lone ``0x1C`` stays in the payload, unless
  ``lenient_end`` is set, in which case ``0x1C`` alone ends the frame and a ``0x0D`` directly
  after it is consumed silently;
* a payload longer than ``max_frame_size`` yields :class:`FrameTooLarge`. That event is terminal:
  the framer drops its buffer and every later ``feed`` returns ``[]`` (the connection must be
  closed, since the stream position is lost).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

__all__ = [
    "SB",
    "EB",
    "CR",
    "COMMIT_ACK",
    "COMMIT_NAK",
    "Frame",
    "GarbageSkipped",
    "FrameDiscarded",
    "FrameTooLarge",
    "FramerEvent",
    "MLLPFramer",
    "encode_frame",
]

SB = 0x0B
EB = 0x1C
CR = 0x0D

#: MLLP release 2 commit acknowledgement / negative acknowledgement payloads.
COMMIT_ACK = b"\x06"
COMMIT_NAK = b"\x15"

_SB_BYTES = b"\x0b"
_END_BYTES = b"\x1c\x0d"

DEFAULT_MAX_FRAME_SIZE = 20 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete block; ``payload`` excludes the start and end blocks."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class GarbageSkipped:
    """``count`` bytes seen outside a frame (before a start block) were ignored."""

    count: int


@dataclass(frozen=True, slots=True)
class FrameDiscarded:
    """A partial frame of ``size`` payload bytes was dropped (``reason``: ``"resync"``)."""

    size: int
    reason: str


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """The current frame exceeded ``max_frame_size``; terminal, the framer is dead afterwards."""

    size: int


FramerEvent = Union[Frame, GarbageSkipped, FrameDiscarded, FrameTooLarge]


def encode_frame(payload: bytes) -> bytes:
    """Wrap ``payload`` in a start block and the ``0x1C 0x0D`` end block."""
    return _SB_BYTES + payload + _END_BYTES


class MLLPFramer:
    """Incremental MLLP decoder for one connection (see the module docstring for the rules)."""

    __slots__ = ("max_frame_size", "lenient_end", "_buf", "_scan", "_in_frame", "_skip_cr", "_dead")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, lenient_end: bool = False):
        if max_frame_size <= 0:
            raise ValueError("max_frame_size must be positive")
        self.max_frame_size = max_frame_size
        self.lenient_end = lenient_end
        # Payload bytes of the partial frame (start block already stripped); empty between frames.
        self._buf = bytearray()
        # Index in _buf up to which 0x1C / 0x0B have already been searched.
        self._scan = 0
        self._in_frame = False
        # Lenient mode: a frame ended on a 0x1C that was the last byte of a feed; a 0x0D at the
        # start of the next feed belongs to that end block.
        self._skip_cr = False
        self._dead = False

    @property
    def in_frame(self) -> bool:
        """True when a start block was seen and the frame is not finished yet."""
        return self._in_frame

    @property
    def buffered(self) -> int:
        """Bytes held for the partial frame."""
        return len(self._buf)

    @property
    def dead(self) -> bool:
        """True after :class:`FrameTooLarge`; ``feed`` then ignores its input."""
        return self._dead

    def reset_partial(self) -> int:
        """Drop a partial frame (in-frame timeout) and hunt for a start block again.

        Returns the number of payload bytes dropped (0 when no frame was in progress).
        """
        size = len(self._buf) if self._in_frame else 0
        self._buf = bytearray()
        self._scan = 0
        self._in_frame = False
        self._skip_cr = False
        return size

    def feed(self, data: bytes) -> list[FramerEvent]:
        """Consume ``data`` and return the events it completes, in stream order."""
        if self._dead or not data:
            return []
        events: list[FramerEvent] = []
        own = self._buf
        if own:
            own += data
            buf = own
            start = 0
            scan = self._scan
        else:
            # Fast path: nothing buffered, so work on the caller's bytes directly and copy each
            # payload once (slicing ``bytes`` yields ``bytes``).
            buf = data if isinstance(data, (bytes, bytearray)) else bytes(data)
            start = scan = 0
        n = len(buf)
        in_frame = self._in_frame
        pos = 0
        if self._skip_cr:
            self._skip_cr = False
            if not in_frame and buf[0] == CR:
                pos = 1
        max_size = self.max_frame_size
        lenient = self.lenient_end
        find = buf.find

        while True:
            if not in_frame:
                s = find(SB, pos)
                if s < 0:
                    if n > pos:
                        events.append(GarbageSkipped(n - pos))
                    break
                if s > pos:
                    events.append(GarbageSkipped(s - pos))
                start = scan = s + 1
                in_frame = True
            e = find(EB, scan)
            s = find(SB, scan, n if e < 0 else e)
            if s >= 0:
                events.append(FrameDiscarded(s - start, "resync"))
                start = scan = s + 1
                continue
            if e < 0:
                scan = n
                if n - start > max_size:
                    return self._too_large(events, n - start)
                break
            if e + 1 < n:
                if buf[e + 1] == CR:
                    end, pos = e, e + 2
                elif lenient:
                    end, pos = e, e + 1
                else:
                    scan = e + 1  # a lone 0x1C is payload in strict mode
                    continue
            elif lenient:
                end, pos = e, n
                self._skip_cr = True
            else:
                scan = e  # 0x1C is the last byte: wait for the next one
                if e - start > max_size:
                    return self._too_large(events, e - start)
                break
            if end - start > max_size:
                return self._too_large(events, end - start)
            payload = buf[start:end]
            if type(payload) is not bytes:
                payload = bytes(payload)
            events.append(Frame(payload))
            in_frame = False

        self._in_frame = in_frame
        if in_frame:
            if buf is own:
                if start:
                    del own[:start]
            else:
                self._buf = bytearray(memoryview(buf)[start:])
            self._scan = scan - start
        else:
            if buf is own:
                self._buf = bytearray()
            self._scan = 0
        return events

    def _too_large(self, events: list[FramerEvent], size: int) -> list[FramerEvent]:
        self._dead = True
        self._in_frame = False
        self._buf = bytearray()
        self._scan = 0
        events.append(FrameTooLarge(size))
        return events
