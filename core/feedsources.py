"""A feed router's sources: the quality gate on what each sends, each one's health, and which one is active.

``FeedSources`` holds one group's sources in priority order (index 0 first).
``ingest`` passes every bar a source sent through the quality gate
(``core.bars.bar_problem`` against that source's previous bars) and keeps the
accepted ones in the source's recent book; ``why_unhealthy`` says why a source
may not be active, or None; ``update_health`` fails over from an unhealthy
active source and fails back to a recovered higher-priority one. The gap fill
and the spike filter ask it what the other sources hold (``others_between``,
``others_behind``, ``second_opinion``). Time comes from an injected clock.

The rules:

* **Health.** A source is *healthy* when it is alive, not stalled (it sent a
  bar within ``stall_intervals`` bar intervals; before its first bar, within
  ``start_grace_intervals`` of the router's start, so a feed that is still
  starting is not a failover), its recent quality (the share
  of its last bars that passed the gate) is at least ``min_quality``, and it has
  sent no rejected bar within the last ``failback_intervals`` intervals.
* **Failover.** When the active source is not healthy, the highest-priority
  healthy source becomes active. Every switch is an event with time, from, to
  and reason.
* **Failback.** A higher-priority source that has been healthy for
  ``failback_intervals`` intervals becomes active again.
* **Quality gate.** Each bar passes ``core.bars.bar_problem`` (the rules of ``validate_bars``) against that
  source's previous bars (finite positive prices, high/low consistent, volume,
  ts increasing, no duplicate). A rejected bar counts against its source; from
  the active source it also means a bar consumers would miss, so the router
  fails over at once and takes that bar from the next source.

``RouterConfig`` (the router's numbers, these rules' and delivery's) is here
because both halves read it.

Not here: which bars are delivered, the spike filter and gap fill
(``core.feedrouter.RouterState``, which owns one ``FeedSources``), the bar
rules themselves (``core.bars``), polling the source actors (``actors.router``).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Callable

import numpy as np

from core.bars import bar_problem

RECENT_PER_SYMBOL = 4096


@dataclass
class RouterConfig:
    interval_s: float = 1.0
    stall_intervals: float = 2.0
    # Before a source's first bar (an actor starting, its store being read) it is
    # stalled only after this many intervals: the stall clock starts with its first bar.
    start_grace_intervals: float = 10.0
    failback_intervals: int = 5
    min_quality: float = 0.9
    quality_window: int = 50
    spike_sigmas: float = 8.0
    spike_min_history: int = 20
    spike_hold_intervals: float = 1.0
    confirm_tolerance: float = 1e-4
    window: int = 512
    buffer: int = 50_000

    @classmethod
    def from_settings(cls, feeds: Any) -> "RouterConfig":
        return cls(
            interval_s=feeds.bar_interval_s,
            stall_intervals=feeds.stall_intervals,
            start_grace_intervals=feeds.start_grace_intervals,
            failback_intervals=feeds.failback_intervals,
            min_quality=feeds.min_quality,
            spike_sigmas=feeds.spike_sigmas,
            window=feeds.window,
        )



@dataclass
class SourceHealth:
    name: str
    priority: int
    alive: bool = True
    created_at: float = 0.0
    last_bar_at: float | None = None
    received: int = 0
    rejected: int = 0
    errors: int = 0
    last_error: str | None = None
    last_reject: str | None = None
    bad_until: float = -math.inf
    healthy_since: float | None = None
    quality_window: deque = field(default_factory=lambda: deque(maxlen=50))
    transit_s: deque = field(default_factory=lambda: deque(maxlen=200))
    # symbol -> OrderedDict[ts_ns -> bar record], this source's accepted bars.
    recent: dict[str, OrderedDict] = field(default_factory=dict)
    last_ts: dict[str, int] = field(default_factory=dict)  # symbol -> ts ns of its last accepted bar

    def quality(self) -> float:
        return 1.0 if not self.quality_window else sum(self.quality_window) / len(self.quality_window)


@dataclass
class FailoverEvent:
    at: float
    from_source: str | None
    to_source: str | None
    reason: str
    kind: str  # failover | failback | spike_flagged | spike_rejected
    wall: float = field(default_factory=time.time)  # epoch seconds, for people and other processes

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "wall": self.wall, "from": self.from_source, "to": self.to_source,
                "reason": self.reason, "kind": self.kind}


class FeedSources:
    """Sources in priority order (index 0 first): their health, the active one, and every switch."""

    def __init__(self, sources: list[str], config: RouterConfig, clock: Callable[[], float]):
        if not sources:
            raise ValueError("a feed router needs at least one source")
        self.cfg = config
        self.clock = clock
        now = clock()
        self.sources: dict[str, SourceHealth] = {}
        for i, name in enumerate(sources):
            h = SourceHealth(name, i, created_at=now)
            h.quality_window = deque(maxlen=self.cfg.quality_window)
            self.sources[name] = h
        self.order = list(sources)
        self.active: str | None = sources[0]
        self.events: deque[FailoverEvent] = deque(maxlen=1000)

    # -- input --------------------------------------------------------------------
    def ingest(self, source: str, records: list[dict[str, Any]]) -> int:
        """Bars as sent by ``source`` (dicts with ts in ns). Returns how many were accepted."""
        h = self.sources[source]
        if not records:
            return 0
        now = self.clock()
        h.alive = True
        h.last_bar_at = now
        h.received += len(records)
        first_reason: str | None = None
        accepted = 0
        last_ts, recent, quality = h.last_ts, h.recent, h.quality_window
        passed = 0  # good bars since the last rejected one, not yet in the quality window
        for rec in records:
            sym = str(rec.get("symbol", "")).upper()
            problem = bar_problem(rec, last_ts.get(sym))
            if problem is not None:
                quality.extend(repeat(True, min(passed, quality.maxlen)))
                quality.append(False)
                passed = 0
                h.rejected += 1
                h.last_reject = problem
                first_reason = first_reason or problem
                continue
            passed += 1
            ts = int(rec["ts"])
            book = recent.get(sym)
            if book is None:
                book = recent[sym] = OrderedDict()
            # Records arrive freshly deserialised: label them in place, no copy.
            rec["symbol"], rec["ts"], rec["source"] = sym, ts, source
            book[ts] = rec
            if len(book) > RECENT_PER_SYMBOL:
                book.popitem(last=False)
            last_ts[sym] = ts
            accepted += 1
        quality.extend(repeat(True, min(passed, quality.maxlen)))
        emitted_at = records[-1].get("emitted_at")
        if emitted_at:
            h.transit_s.append(max(0.0, time.time() - float(emitted_at)))
        if first_reason is not None:
            h.bad_until = now + self.cfg.failback_intervals * self.cfg.interval_s
            h.healthy_since = None
        if first_reason is not None and source == self.active:
            # A rejected bar is one consumers would miss: take it from the next source now.
            # With no healthy alternative the source stays active and the bar is dropped.
            best = self.best_healthy(exclude=source)
            if best is not None:
                self.switch(best, f"quality: {first_reason}", "failover")
        return accepted

    def reject_spike(self, source: str) -> bool:
        """A spike of ``source`` that another source contradicted: it counts against the source,
        and the router fails over from it. False when there is no healthy source to go to."""
        h = self.sources[source]
        h.bad_until = self.clock() + self.cfg.failback_intervals * self.cfg.interval_s
        h.last_reject = "spike not confirmed by another source"
        h.quality_window.append(False)
        h.rejected += 1
        best = self.best_healthy(exclude=self.active)
        if best is None:
            return False
        self.switch(best, "quality: spike not confirmed", "failover")
        return True

    def mark_dead(self, source: str, reason: str) -> None:
        h = self.sources[source]
        if h.alive:
            h.alive = False
            h.last_error = reason
            h.errors += 1
            h.healthy_since = None
        if source == self.active:
            best = self.best_healthy(exclude=source)
            if best is not None:  # with nowhere to go, stay: a source that answers again resumes at once
                self.switch(best, f"dead: {reason}", "failover")

    def mark_error(self, source: str, reason: str) -> None:
        h = self.sources[source]
        h.errors += 1
        h.last_error = reason

    def mark_alive(self, source: str) -> None:
        h = self.sources[source]
        if not h.alive:
            h.alive = True
            h.last_error = None

    # -- health ---------------------------------------------------------------------
    def is_stalled(self, h: SourceHealth, now: float) -> bool:
        if h.last_bar_at is None:  # starting: the stall clock starts with its first bar, after a grace
            limit = max(self.cfg.stall_intervals, self.cfg.start_grace_intervals)
            return now - h.created_at > limit * self.cfg.interval_s
        return now - h.last_bar_at > self.cfg.stall_intervals * self.cfg.interval_s

    def why_unhealthy(self, name: str, now: float | None = None) -> str | None:
        now = self.clock() if now is None else now
        h = self.sources[name]
        if not h.alive:
            return f"dead: {h.last_error or 'actor gone'}"
        if self.is_stalled(h, now):
            if h.last_bar_at is None:
                return (f"stalled: no first bar in {now - h.created_at:.2f}s "
                        f"({max(self.cfg.stall_intervals, self.cfg.start_grace_intervals):g} intervals)")
            return f"stalled: no bar for {now - h.last_bar_at:.2f}s ({self.cfg.stall_intervals:g} intervals)"
        if len(h.quality_window) >= 10 and h.quality() < self.cfg.min_quality:
            return f"quality {h.quality():.2f} below {self.cfg.min_quality:.2f}"
        if now < h.bad_until:
            return f"quality: {h.last_reject}"
        return None

    def best_healthy(self, exclude: str | None = None) -> str | None:
        now = self.clock()
        for name in self.order:
            if name != exclude and self.why_unhealthy(name, now) is None:
                return name
        return None

    def switch(self, to: str | None, reason: str, kind: str) -> None:
        if to == self.active:
            return
        self.events.append(FailoverEvent(self.clock(), self.active, to, reason, kind))
        self.active = to

    def update_health(self) -> None:
        """Note who is healthy since when; fail over from an unhealthy active source, or back."""
        now = self.clock()
        for name in self.order:
            h = self.sources[name]
            if self.why_unhealthy(name, now) is None:
                if h.healthy_since is None:
                    h.healthy_since = now
            else:
                h.healthy_since = None
        if self.active is None or self.why_unhealthy(self.active, now) is not None:
            reason = "no source" if self.active is None else self.why_unhealthy(self.active, now)
            best = self.best_healthy()
            if best is not None and best != self.active:
                self.switch(best, reason or "unhealthy", "failover")
            return
        # Failback to a higher-priority source that has been well long enough.
        active_prio = self.sources[self.active].priority
        wait_s = self.cfg.failback_intervals * self.cfg.interval_s
        for name in self.order[:active_prio]:
            h = self.sources[name]
            if h.healthy_since is not None and now - h.healthy_since >= wait_s:
                self.switch(name, f"recovered: healthy for {now - h.healthy_since:.2f}s", "failback")
                break

    # -- what the other sources hold (gap fill and the spike filter) -----------------------
    def others_between(self, sym: str, after: int, before: int) -> dict[int, dict[str, Any]]:
        """The bars of ``sym`` strictly between ``after`` and ``before`` (ts ns) that the live
        sources other than the active one hold, by ts; a ts two hold comes from the higher priority."""
        found: dict[int, dict[str, Any]] = {}
        for name in self.order:
            if name == self.active or not self.sources[name].alive:
                continue
            for t, bar in self.sources[name].recent.get(sym, {}).items():
                if after < t < before and t not in found:
                    found[t] = bar
        return found

    def others_behind(self, sym: str, ts: int) -> bool:
        """Whether a live source other than the active one has not yet reached ``ts`` in ``sym``.

        Alive is enough: a source that is only slow (even past the stall limit
        on a loaded machine) may still bring the bar.
        """
        return any(
            n != self.active and self.sources[n].alive and self.sources[n].last_ts.get(sym, -1) < ts
            for n in self.order
        )

    def second_opinion(self, sym: str, bar: dict[str, Any], tolerance: float) -> tuple[str | None, bool]:
        """The first other source (in priority order) holding a bar of ``sym`` at ``bar``'s ts, and
        whether its close agrees with ``bar``'s within ``tolerance``; ``(None, False)`` when none holds one."""
        for name in self.order:
            if name == self.active:
                continue
            other = self.sources[name].recent.get(sym, {}).get(bar["ts"])
            if other is not None:
                return name, abs(other["close"] / bar["close"] - 1) <= tolerance
        return None, False

    def health(self, now: float) -> list[dict[str, Any]]:
        """Each source's state, in priority order, for ``RouterState.health``."""
        rows = []
        for name in self.order:
            h = self.sources[name]
            rows.append(
                {
                    "name": name,
                    "priority": h.priority,
                    "healthy": self.why_unhealthy(name, now) is None,
                    "why_unhealthy": self.why_unhealthy(name, now),
                    "alive": h.alive,
                    "seconds_since_last_bar": None if h.last_bar_at is None else round(now - h.last_bar_at, 3),
                    "received": h.received,
                    "rejected": h.rejected,
                    "quality": round(h.quality(), 4),
                    "errors": h.errors,
                    "last_error": h.last_error,
                    "transit_ms_p50": round(1000 * float(np.median(h.transit_s)), 3) if h.transit_s else None,
                }
            )
        return rows
