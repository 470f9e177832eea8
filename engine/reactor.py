"""The engine's reactor: Twisted's epoll reactor without the per-event log context.

Twisted's ``EPollReactor.doPoll`` wraps every I/O event in ``log.callWithLogger`` (the
selectable's ``logPrefix()``, a copy of the log context dict, a context push and pop), which
only sets the ``system`` field of legacy ``twisted.python.log`` messages. The engine logs
through structlog and never reads that field, and on the ingest hot path (one read event per
message) this wrapping was a fifth of the reactor thread's Python time (py-spy, 8 connections).
This reactor dispatches each event straight to ``_doReadOrWrite``, which already turns a failing
``doRead``/``doWrite`` into a closed connection; anything else a handler raises is logged and
the loop goes on, as with ``callWithLogger``.

Delivery connections can be *expedited*: one outstanding message per MLLP connection makes a
FIFO destination deliver at most one message per reactor turn, and with 32 ingest connections a
turn dispatches several ingest messages (measured: ingest 6,600 msg/s, one FIFO delivering
1,500). An expedited socket (the MLLP sender's, a plain TCP connection) is also watched by a
second epoll set, polled without waiting after each event of the turn: a reply that arrived
meanwhile is read at once, and the next message sent, instead of waiting for the next turn.
That poll runs only while an expedited connection awaits a reply (``awaiting_reply``): an idle
open connection to a destination costs the ingest path nothing.

Installed by ``minipfi run`` before anything imports ``twisted.internet.reactor``.
"""
from __future__ import annotations

import errno
import select

from twisted.internet import epollreactor, main
from twisted.python import log


class EngineReactor(epollreactor.EPollReactor):
    def __init__(self):
        super().__init__()
        self._after_io: list = []
        self._expedite_poller = select.epoll()
        self._expedited: dict = {}  # fd -> selectable
        self._awaiting: set = set()  # expedited selectables waiting for a reply: polled only then

    def expedite(self, selectable) -> None:
        """Also read ``selectable`` (a TCP connection: ``fileno()``) in the middle of a turn."""
        fd = selectable.fileno()
        try:
            self._expedite_poller.register(fd, select.EPOLLIN)
        except OSError:
            return  # closed meanwhile, or already registered
        self._expedited[fd] = selectable

    def awaiting_reply(self, selectable, waiting: bool) -> None:
        """An expedited connection waits for a reply (or not any more): the mid-turn poll runs
        only while one does, so idle open connections cost ingest nothing."""
        if waiting:
            self._awaiting.add(selectable)
        else:
            self._awaiting.discard(selectable)

    def unexpedite(self, selectable) -> None:
        self._awaiting.discard(selectable)
        for fd, sel in list(self._expedited.items()):
            if sel is selectable:
                del self._expedited[fd]
                try:
                    self._expedite_poller.unregister(fd)
                except OSError:
                    pass  # the closed socket left the set by itself

    def _expedite(self, dispatch, selectables) -> None:
        try:
            ready = self._expedite_poller.poll(0)
        except OSError:
            return
        for fd, event in ready:
            selectable = self._expedited.get(fd)
            if selectable is None or selectables.get(fd) is not selectable:
                continue  # gone, or the number now belongs to another socket
            try:
                dispatch(selectable, fd, event)
            except Exception:  # noqa: BLE001
                log.err(None, "reactor: I/O event handler failed")

    def call_after_io(self, fn) -> None:
        """Run ``fn()`` once, at the end of this iteration's I/O dispatch (after every event
        of the poll), or of the next one if called outside it; the poll then does not block.

        What ``callLater(0, fn)`` does, without a timer: the ingest path used one per reactor
        turn (the group-commit flush) and one per commit (waking the delivery workers), each a
        DelayedCall pushed on and popped off Twisted's timer heap, whose comparisons are
        Python-level calls."""
        self._after_io.append(fn)

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1  # wait indefinitely
        if self._after_io:
            timeout = 0  # work is due at the end of this dispatch: do not sleep first
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        dispatch = self._doReadOrWrite
        selectables = self._selectables
        expedited, awaiting = self._expedited, self._awaiting
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except Exception:  # noqa: BLE001 - one handler must not stop the reactor
                log.err(None, "reactor: I/O event handler failed")
            if awaiting and fd not in expedited:
                self._expedite(dispatch, selectables)
        while self._after_io:
            hooks, self._after_io = self._after_io, []
            for fn in hooks:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - as a failing callLater: logged, loop goes on
                    log.err(None, "reactor: after-I/O call failed")

    doIteration = doPoll


def install() -> EngineReactor:
    """Install :class:`EngineReactor` as the global reactor (before anything imports it)."""
    reactor = EngineReactor()
    main.installReactor(reactor)
    return reactor
