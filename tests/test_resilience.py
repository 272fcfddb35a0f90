"""Retry with backoff and the circuit breaker, on a fake clock (no sleeping)."""

from __future__ import annotations

import pytest

from core.resilience import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpenError, Resilient, RetryPolicy


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(clock, attempts=3, failures=5):
    sleeps = []
    r = Resilient(
        "svc",
        RetryPolicy(attempts, 1.0, 2.0, 30.0),
        CircuitBreaker("svc", failures, 60.0, 300.0, clock=clock),
        non_retryable=(PermissionError,),
        sleep=sleeps.append,
    )
    return r, sleeps


def test_retries_with_exponential_backoff_then_succeeds():
    clock = Clock()
    r, sleeps = make(clock)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    assert r.call(flaky) == "ok"
    assert sleeps == [1.0, 2.0]
    assert r.breaker.state == CLOSED and r.breaker.failures == 0


def test_gives_up_after_attempts_with_last_error():
    r, sleeps = make(Clock())
    with pytest.raises(ConnectionError, match="down 3"):
        n = iter(range(1, 10))
        r.call(lambda: (_ for _ in ()).throw(ConnectionError(f"down {next(n)}")))
    assert sleeps == [1.0, 2.0]


def test_non_retryable_passes_through_once_without_tripping():
    r, sleeps = make(Clock(), failures=1)
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("bad key")

    with pytest.raises(PermissionError):
        r.call(denied)
    assert len(calls) == 1 and sleeps == [] and r.breaker.state == CLOSED


def test_breaker_opens_refuses_then_half_open_trial_and_recovery():
    clock = Clock()
    r, _ = make(clock, attempts=1, failures=5)

    def down():
        raise ConnectionError("down")

    for _ in range(5):
        with pytest.raises(ConnectionError):
            r.call(down)
    assert r.breaker.state == OPEN
    called = []
    with pytest.raises(CircuitOpenError, match="open"):
        r.call(lambda: called.append(1))
    assert called == []  # refused without touching the service
    clock.t += 59.9
    with pytest.raises(CircuitOpenError):
        r.call(lambda: 1)
    clock.t += 0.2
    assert r.breaker.snapshot()["state"] == HALF_OPEN
    assert r.call(lambda: "trial ok") == "trial ok"
    assert r.breaker.state == CLOSED and r.breaker.snapshot()["recovering"]
    # While recovering, one failure reopens it.
    with pytest.raises(ConnectionError):
        r.call(down)
    assert r.breaker.state == OPEN
    clock.t += 60
    r.call(lambda: 1)
    clock.t += 300  # a full recovery window without failure
    assert not r.breaker.snapshot()["recovering"]
    for _ in range(4):
        with pytest.raises(ConnectionError):
            r.call(down)
    assert r.breaker.state == CLOSED  # needs five again
    with pytest.raises(ConnectionError):
        r.call(down)
    assert r.breaker.state == OPEN


def test_failed_trial_reopens():
    clock = Clock()
    r, _ = make(clock, attempts=1, failures=1)
    with pytest.raises(ConnectionError):
        r.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    clock.t += 61
    with pytest.raises(ConnectionError):
        r.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    assert r.breaker.state == OPEN and r.breaker.times_opened == 2


def test_from_settings_uses_the_settings_numbers():
    from cluster.settings import load_settings

    s = load_settings(use_file=False, resilience={"retry_attempts": 4, "breaker_failures": 7})
    r = Resilient.from_settings("alpaca-test", s.resilience)
    assert r.policy.attempts == 4 and r.policy.delay(3) == 4.0
    assert r.breaker.failure_threshold == 7 and r.breaker.open_s == 60.0 and r.breaker.recovery_s == 300.0
