"""The engine's reactor: Twisted's epoll reactor without the per-event log context.

Twisted's ``EPollReactor.doPoll`` wraps every I/O event in ``log.callWithLogger`` (the
selectable's ``logPrefix()``, a copy of the log context dict, a context push and pop), which
only sets the ``system`` field of legacy ``twisted.python.log`` messages. The engine logs
through structlog and never reads that field, and on the ingest hot path (one read event per
message) this wrapping was a fifth of the reactor thread's Python time (py-spy, 8 connections).
This reactor dispatches each event straight to ``_doReadOrWrite``, which already turns a failing
``doRead``/``doWrite`` into a closed connection; anything else a handler raises is logged and
the loop goes on, as with ``callWithLogger``.

Installed by ``minipfi run`` before anything imports ``twisted.internet.reactor``.
"""
from __future__ import annotations

import errno

from twisted.internet import epollreactor, main
from twisted.python import log


class EngineReactor(epollreactor.EPollReactor):
    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1  # wait indefinitely
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        dispatch = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except Exception:  # noqa: BLE001 - one handler must not stop the reactor
                log.err(None, "reactor: I/O event handler failed")

    doIteration = doPoll


def install() -> EngineReactor:
    """Install :class:`EngineReactor` as the global reactor (before anything imports it)."""
    reactor = EngineReactor()
    main.installReactor(reactor)
    return reactor
