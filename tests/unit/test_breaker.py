"""The per-pool circuit breaker, with a clock the test moves."""

from __future__ import annotations

from services.router.breaker import CircuitBreaker
from shared.settings import BreakerConfig


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: FakeClock, **options: float) -> CircuitBreaker:
    config = BreakerConfig(**{"error_rate": 0.5, "window_s": 30, "min_requests": 4, "open_s": 10, **options})
    return CircuitBreaker(config, clock)


def test_opens_when_the_error_rate_passes_the_bound_with_enough_results() -> None:
    clock = FakeClock()
    pool = breaker(clock)
    for failed in (True, True, False):
        pool.record(failed)
    assert pool.state == "closed" and pool.allow()  # 2 of 3: below min_requests
    pool.record(True)
    assert pool.state == "open" and not pool.allow()
    assert "3 of the last 4 results failed" in pool.describe()


def test_a_low_error_rate_keeps_it_closed() -> None:
    clock = FakeClock()
    pool = breaker(clock)
    for failed in (True, False, False, False, False, True, False, False):
        pool.record(failed)
    assert pool.state == "closed"


def test_old_results_leave_the_window() -> None:
    clock = FakeClock()
    pool = breaker(clock)
    for _ in range(3):
        pool.record(True)
    clock.now += 31
    pool.record(True)
    assert pool.state == "closed"  # the three old failures are forgotten: one result in the window


def test_half_open_lets_one_probe_through_and_its_success_closes_it() -> None:
    clock = FakeClock()
    pool = breaker(clock)
    for _ in range(4):
        pool.record(True)
    pool.record(False)  # a late result of work sent before it opened changes nothing
    clock.now += 9.9
    assert not pool.allow()
    clock.now += 0.1
    assert pool.state == "half_open"
    assert pool.allow() and not pool.allow()  # the probe, then nothing until its result
    pool.record(False)
    assert pool.state == "closed" and pool.allow()


def test_a_failed_probe_opens_it_again_for_another_period() -> None:
    clock = FakeClock()
    pool = breaker(clock)
    for _ in range(4):
        pool.record(True)
    clock.now += 10
    assert pool.allow()
    pool.record(True)
    assert pool.state == "open" and "probe failed" in pool.describe()
    clock.now += 10
    assert pool.state == "half_open"


def test_a_lost_probe_is_replaced_after_another_open_period() -> None:
    clock = FakeClock()
    pool = breaker(clock)
    for _ in range(4):
        pool.record(True)
    clock.now += 10
    assert pool.allow()
    clock.now += 9
    assert not pool.allow()
    clock.now += 1
    assert pool.allow()


def test_no_live_workers_opens_it_and_their_return_makes_it_half_open_at_once() -> None:
    clock = FakeClock()
    pool = breaker(clock)
    pool.mark_unavailable()
    assert pool.state == "open" and "no live workers" in pool.describe()
    pool.mark_available()
    assert pool.state == "half_open" and pool.allow() and not pool.allow()


def test_a_disabled_breaker_always_allows() -> None:
    clock = FakeClock()
    pool = CircuitBreaker(BreakerConfig(enabled=False, min_requests=1), clock)
    pool.record(True)
    assert pool.allow()
