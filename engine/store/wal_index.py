"""How long a SQLite write-ahead log is and how much of it is checkpointed, read from the
database's WAL-index (its ``-shm`` file) without a database call.

SQLite documents the WAL-index of its unix and windows VFSes ("WAL-mode File Format",
https://www.sqlite.org/walformat.html, section 2.2 "The WAL-Index Header"): the file begins with
two copies of a 48-byte header in the machine's byte order, whose ``mxFrame`` (offset 16) is the
last valid frame of the WAL, then the checkpoint information, whose first field ``nBackfill``
(offset 96) counts the frames already copied into the database file. A writer restarts the WAL
at its first frame once a checkpoint has copied every frame, so ``mxFrame`` is also the WAL's
length in frames (pages) since the last restart. Its writers update the copies one after the
other: a reader that finds them different reads nothing (as SQLite's own readers retry).

The store writer counts every transaction this way (ingest, delivery's claims and outcomes,
retention), where an estimate of what each writes missed the ones it did not know about.

The file is read through ONE descriptor per file and process, never closed while the file is
in use: SQLite's unix VFS holds POSIX record locks on it, and POSIX releases every lock a
process holds on a file when the process closes any descriptor of that file (SQLite's own
source warns of this in os_unix.c, "posix advisory locks"). Opening and closing the file for
each read dropped the lock that tells other connections the WAL-index is in use; one of them
then rebuilt it under the others' feet (the engine died of SIGBUS in a test run). A descriptor
is closed only once its file was deleted and replaced (SQLite deletes the ``-shm`` when its
last connection closes): no lock of this process is left on a deleted file.
"""
from __future__ import annotations

import os
import struct
import sys
import threading
from dataclasses import dataclass

_HEADER = 48
_U32 = struct.Struct(("<" if sys.byteorder == "little" else ">") + "I")
_IS_INIT = 12
_MX_FRAME = 16
_N_BACKFILL = 2 * _HEADER
_READ = _N_BACKFILL + 4


@dataclass(frozen=True)
class WalState:
    frames: int  # mxFrame: frames in the WAL since its last restart
    backfilled: int  # nBackfill: of those, copied into the database file

    @property
    def pending(self) -> int:
        """Frames a checkpoint still has to copy."""
        return self.frames - self.backfilled


def parse(data: bytes) -> WalState | None:
    """The state in the first bytes of a WAL-index; None when it is not initialised, is being
    rewritten (the two header copies differ) or is inconsistent."""
    if len(data) < _READ or data[:_HEADER] != data[_HEADER:2 * _HEADER] or data[_IS_INIT] != 1:
        return None
    frames = _U32.unpack_from(data, _MX_FRAME)[0]
    backfilled = _U32.unpack_from(data, _N_BACKFILL)[0]
    if backfilled > frames:
        return None
    return WalState(frames, backfilled)


def shm_path(database: str | None) -> str | None:
    """The WAL-index of a SQLite database path or ``file:`` URI; None for an in-memory one."""
    if not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        database = database[5:].split("?", 1)[0]
        if not database or database == ":memory:":
            return None
    return database + "-shm"


_open: dict[str, tuple[int, int, int]] = {}  # path -> (descriptor, st_dev, st_ino)
_open_lock = threading.Lock()


def read(path: str | None) -> WalState | None:
    """The WAL-index at ``path`` now; None when there is none or it cannot be read."""
    if path is None:
        return None
    with _open_lock:
        fd = _kept(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            st = os.fstat(fd)
            _open[path] = (fd, st.st_dev, st.st_ino)
        try:
            return parse(os.pread(fd, _READ, 0))
        except OSError:
            return None


def release(path: str | None) -> None:
    """Close the descriptor kept for ``path`` if its file is gone or was replaced (a store's
    ``dispose``: SQLite deleted the ``-shm`` if that store held the last connection); else
    keep it, other connections of this process may hold locks on that file."""
    if path is None:
        return
    with _open_lock:
        _kept(path)


def _kept(path: str) -> int | None:
    """The descriptor kept for ``path`` if it is still the file at ``path``; else None, the
    descriptor of a deleted or replaced file closed (no lock of this process is left on it)."""
    known = _open.get(path)
    if known is None:
        return None
    fd, dev, ino = known
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            return fd
    except OSError:
        pass
    del _open[path]
    os.close(fd)
    return None
