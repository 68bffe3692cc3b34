"""A circuit breaker per pool: closed, open after too many server errors (or no live worker), half-open probes.

The router cannot see inside a worker; it sees what the workers publish: results on `autoglm.results`
(fed in with `record`) and cards in the registry (`mark_unavailable` when a pool has none).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from shared.settings import BreakerConfig

State = Literal["closed", "open", "half_open"]
Clock = Callable[[], float]
"""Monotonic seconds; injected so tests can move time."""


class CircuitBreaker:
    """One pool's breaker. `allow()` says whether a request may be sent to the pool now."""

    def __init__(self, config: BreakerConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.opened_at: float | None = None
        self.probe_sent_at: float | None = None
        self.outcomes: deque[tuple[float, bool]] = deque()  # (when, failed)
        self.reason = ""

    @property
    def state(self) -> State:
        """Closed, open, or half-open once `open_s` has passed since it opened."""
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self.opened_at >= self.config.open_s else "open"

    def allow(self) -> bool:
        """Closed: yes. Open: no. Half-open: one probe, then no until its result arrives (or open_s passes)."""
        state = self.state
        if state == "closed" or not self.config.enabled:
            return True
        if state == "open":
            return False
        now = self.clock()
        if self.probe_sent_at is not None and now - self.probe_sent_at < self.config.open_s:
            return False  # a probe is out; a lost probe is replaced after another open_s
        self.probe_sent_at = now
        return True

    def record(self, failed: bool) -> None:
        """Take in one result of the pool: a probe's result closes or reopens; otherwise count it."""
        now = self.clock()
        if self.opened_at is not None:
            if self.probe_sent_at is None:
                return  # results of work sent before it opened say nothing about the pool now
            if failed:
                self._open(now, "the half-open probe failed")
            else:
                self._close()
            return
        self.outcomes.append((now, failed))
        self._forget_before(now - self.config.window_s)
        failures = sum(failed for _, failed in self.outcomes)
        if len(self.outcomes) >= self.config.min_requests and failures / len(self.outcomes) >= self.config.error_rate:
            self._open(now, f"{failures} of the last {len(self.outcomes)} results failed")

    def mark_unavailable(self) -> None:
        """The pool has no live worker: open (or stay open) without waiting for errors."""
        if self.opened_at is None:
            self._open(self.clock(), "no live workers")

    def mark_available(self) -> None:
        """Live workers are back: a breaker opened only for their absence goes half-open at once (a probe next)."""
        if self.opened_at is not None and self.reason == "no live workers":
            self.opened_at = self.clock() - self.config.open_s

    def _open(self, now: float, reason: str) -> None:
        self.opened_at, self.probe_sent_at, self.reason = now, None, reason
        self.outcomes.clear()

    def _close(self) -> None:
        self.opened_at, self.probe_sent_at, self.reason = None, None, ""
        self.outcomes.clear()

    def _forget_before(self, cutoff: float) -> None:
        while self.outcomes and self.outcomes[0][0] < cutoff:
            self.outcomes.popleft()

    def describe(self) -> str:
        """The state and why, for explanations and logs."""
        return self.state if not self.reason else f"{self.state} ({self.reason})"
