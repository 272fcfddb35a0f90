"""Retry with exponential backoff, and a circuit breaker, for calls to the outside.

Every call raytrade makes to something it does not own (Alpaca, the store)
goes through ``Resilient.call`` (or ``acall`` for coroutines). The numbers come
from ``cluster.settings.ResilienceSettings``; this module takes them as plain
arguments so it stays free of settings and Ray.

The breaker has three states:

* ``closed``: calls pass; ``failure_threshold`` consecutive failures open it.
* ``open``: calls are refused at once with ``CircuitOpenError`` for
  ``open_s`` seconds, so a dead service is not hammered.
* ``half_open``: one trial call passes. Success closes the breaker, failure
  opens it again.

After a trial succeeds the breaker is closed but *recovering* for
``recovery_s`` seconds: a single failure in that time reopens it, because one
good call does not prove the service is well. Once ``recovery_s`` passes with
no failure it is fully recovered and needs ``failure_threshold`` failures again.

Errors that retrying cannot fix (bad credentials, a rejected order, a user's
mistake) are given as ``non_retryable`` and pass straight through without
counting against the breaker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitOpenError(RuntimeError):
    """The breaker is open: the service failed repeatedly and is being left alone."""

    def __init__(self, name: str, retry_in_s: float):
        super().__init__(f"circuit '{name}' is open after repeated failures; next trial in {retry_in_s:.1f}s")
        self.name = name
        self.retry_in_s = retry_in_s


@dataclass
class RetryPolicy:
    attempts: int = 3
    base_delay_s: float = 1.0
    multiplier: float = 2.0
    max_delay_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1 = the first retry)."""
        return min(self.max_delay_s, self.base_delay_s * self.multiplier ** (attempt - 1))


@dataclass
class CircuitBreaker:
    name: str
    failure_threshold: int = 5
    open_s: float = 60.0
    recovery_s: float = 300.0
    clock: Callable[[], float] = time.monotonic
    state: str = CLOSED
    failures: int = 0
    opened_at: float | None = None
    recovering_until: float | None = None
    total_failures: int = 0
    total_calls: int = 0
    times_opened: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _trial_in_flight: bool = False

    def _refresh(self) -> None:
        now = self.clock()
        if self.state == OPEN and self.opened_at is not None and now - self.opened_at >= self.open_s:
            self.state = HALF_OPEN
            self._trial_in_flight = False
        if self.recovering_until is not None and now >= self.recovering_until:
            self.recovering_until = None

    def before_call(self) -> None:
        with self._lock:
            self._refresh()
            self.total_calls += 1
            if self.state == OPEN:
                assert self.opened_at is not None
                raise CircuitOpenError(self.name, self.open_s - (self.clock() - self.opened_at))
            if self.state == HALF_OPEN:
                if self._trial_in_flight:
                    raise CircuitOpenError(self.name, 0.0)
                self._trial_in_flight = True

    def on_success(self) -> None:
        with self._lock:
            if self.state == HALF_OPEN:
                self.state = CLOSED
                self.recovering_until = self.clock() + self.recovery_s
                self._trial_in_flight = False
            self.failures = 0

    def on_failure(self) -> None:
        with self._lock:
            self._refresh()
            self.total_failures += 1
            self.failures += 1
            reopen = (
                self.state == HALF_OPEN
                or self.failures >= self.failure_threshold
                or self.recovering_until is not None
            )
            if reopen and self.state != OPEN:
                self.state = OPEN
                self.opened_at = self.clock()
                self.recovering_until = None
                self._trial_in_flight = False
                self.times_opened += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._refresh()
            return {
                "name": self.name,
                "state": self.state,
                "consecutive_failures": self.failures,
                "recovering": self.recovering_until is not None,
                "total_calls": self.total_calls,
                "total_failures": self.total_failures,
                "times_opened": self.times_opened,
            }


class Resilient:
    """A retry policy and a breaker around calls to one outside service."""

    def __init__(
        self,
        name: str,
        policy: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        non_retryable: tuple[type[BaseException], ...] = (),
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.name = name
        self.policy = policy or RetryPolicy()
        self.breaker = breaker or CircuitBreaker(name)
        self.non_retryable = non_retryable
        self._sleep = sleep
        _REGISTRY[name] = self

    @classmethod
    def from_settings(cls, name: str, settings: Any, **kw: Any) -> "Resilient":
        """Build from a ``ResilienceSettings`` (duck-typed to keep core free of cluster/)."""
        r = settings
        return cls(
            name,
            RetryPolicy(r.retry_attempts, r.retry_base_delay_s, r.retry_multiplier, r.retry_max_delay_s),
            CircuitBreaker(name, r.breaker_failures, r.breaker_open_s, r.breaker_recovery_s),
            **kw,
        )

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        last: BaseException | None = None
        for attempt in range(1, self.policy.attempts + 1):
            self.breaker.before_call()
            try:
                result = fn(*args, **kwargs)
            except self.non_retryable:
                self.breaker.on_success()  # the service answered; the caller was wrong
                raise
            except Exception as e:  # noqa: BLE001 - any other failure is the service's
                last = e
                self.breaker.on_failure()
                if attempt < self.policy.attempts:
                    self._sleep(self.policy.delay(attempt))
                continue
            self.breaker.on_success()
            return result
        assert last is not None
        raise last

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        last: BaseException | None = None
        for attempt in range(1, self.policy.attempts + 1):
            self.breaker.before_call()
            try:
                result = await fn(*args, **kwargs)
            except self.non_retryable:
                self.breaker.on_success()
                raise
            except Exception as e:  # noqa: BLE001
                last = e
                self.breaker.on_failure()
                if attempt < self.policy.attempts:
                    await asyncio.sleep(self.policy.delay(attempt))
                continue
            self.breaker.on_success()
            return result
        assert last is not None
        raise last


# Breakers of this process, by name, so status can show them.
_REGISTRY: dict[str, Resilient] = {}


def breaker_states() -> list[dict[str, Any]]:
    return [r.breaker.snapshot() for r in _REGISTRY.values()]
