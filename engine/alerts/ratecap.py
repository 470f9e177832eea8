"""At most N notices a minute through one notifier: a burst of alerts (a network outage that
takes every destination down at once) sends N notices and then one summary of the rest."""
from __future__ import annotations

from collections import deque

WINDOW_S = 60.0


class RateCap:
    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._sent: deque[float] = deque()
        self.suppressed = 0

    def _prune(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - WINDOW_S:
            self._sent.popleft()

    def admit(self, now: float) -> bool:
        """True: send this notice now; False: it is counted for the next summary."""
        self._prune(now)
        if len(self._sent) < self.per_minute and not self.suppressed:
            self._sent.append(now)
            return True
        self.suppressed += 1
        return False

    def summary_due(self, now: float) -> int:
        """How many notices were held back, once the window has room for one summary (0: none)."""
        self._prune(now)
        if not self.suppressed or len(self._sent) >= self.per_minute:
            return 0
        n, self.suppressed = self.suppressed, 0
        self._sent.append(now)
        return n
