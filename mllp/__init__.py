"""MLLP transport for mini-PFI: sans-I/O framing, Twisted server and sender, blocking client, TLS.

Nothing here knows about HL7 beyond the MSA-2 check of the sender, and nothing imports ``engine``.
Submodules are imported explicitly (``from mllp.protocol import MLLPServerFactory``) so that the
stdlib-only framer can be used without loading Twisted.
"""
from mllp.framing import (  # noqa: F401
    COMMIT_ACK,
    COMMIT_NAK,
    CR,
    EB,
    SB,
    Frame,
    FrameDiscarded,
    FrameTooLarge,
    GarbageSkipped,
    MLLPFramer,
    encode_frame,
)
