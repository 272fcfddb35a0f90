"""The ingress's Prometheus metrics, buffered so a request never waits on them.

A request's counts and latency, decisions by action and risk refusals are
kept in plain counters here and handed to Ray's metrics agent by ``flush()``
every ``METRICS_FLUSH_S`` (``flush_forever``): recording a Ray metric costs
tens of microseconds, which a decision's answer need not wait for. Feed
failovers and broker errors are rare and go to Ray at once (``serve.health``
counts them).

Not here: the numbers ``/v1/status`` shows (the ingress keeps those), the
domain metrics of backtests (``core.metrics``).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque

from ray.util import metrics

from cluster.logs import get_logger

log = get_logger("serve")

# How often a replica hands its requests' counts and latencies to Ray's metrics.
METRICS_FLUSH_S = 1.0


def percentile(values: deque, q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class ServeMetrics:
    """Prometheus metrics through Ray's metrics agent; the per-request ones are buffered until ``flush``."""

    def __init__(self) -> None:
        self._requests: Counter = Counter()
        self._latencies: list[tuple[str, float]] = []
        self._decisions: Counter = Counter()
        self._rejections: Counter = Counter()

        self.requests = metrics.Counter("raytrade_requests", "HTTP requests", tag_keys=("route", "status"))
        self.latency = metrics.Histogram("raytrade_request_latency_ms", "request latency (ms)",
                                         boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=("route",))
        self.decisions = metrics.Counter("raytrade_decisions", "decisions by action", tag_keys=("action",))
        self.rejections = metrics.Counter("raytrade_risk_rejections", "orders the risk manager refused",
                                          tag_keys=("account",))
        self.failovers = metrics.Counter("raytrade_feed_failovers", "feed router switches", tag_keys=("kind",))
        self.broker_errors = metrics.Counter("raytrade_broker_errors", "broker errors seen by the risk manager",
                                             tag_keys=("account",))

    def request(self, route: str, status: int, ms: float) -> None:
        self._requests[(route, str(status))] += 1
        if len(self._latencies) < 100_000:  # bounded if flushes stall
            self._latencies.append((route, ms))

    def decision(self, action: str) -> None:
        self._decisions[action] += 1

    def rejection(self, account: str) -> None:
        self._rejections[account] += 1

    def flush(self) -> None:
        requests, self._requests = self._requests, Counter()
        latencies, self._latencies = self._latencies, []
        decisions, self._decisions = self._decisions, Counter()
        rejections, self._rejections = self._rejections, Counter()
        for (route, status), n in requests.items():
            self.requests.inc(n, tags={"route": route, "status": status})
        for route, ms in latencies:
            self.latency.observe(ms, tags={"route": route})
        for action, n in decisions.items():
            self.decisions.inc(n, tags={"action": action})
        for account, n in rejections.items():
            self.rejections.inc(n, tags={"account": account})

    async def flush_forever(self, every_s: float = METRICS_FLUSH_S) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - metrics must never take the endpoint down
                log.warning("metrics flush failed: %s", e)
