"""The feed router's logic: source health, failover and failback, the quality gate, gap fill.

This is the Ray-free heart of ``actors.router.FeedRouter``. The actor polls
its sources and hands what they sent to ``RouterState.ingest``; ``step()``
decides which source is active and delivers new bars. Time comes from an
injected clock, so the same code runs live and in tests with simulated time.

The rules, in the order ``step()`` applies them:

* **Health.** A source is *healthy* when it is alive, not stalled (it sent a
  bar within ``stall_intervals`` bar intervals), its recent quality (the share
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
* **Spikes.** A delivered bar whose log return exceeds ``spike_sigmas``
  rolling standard deviations is held until another source confirms it (the
  same close within ``confirm_tolerance``). Contradicted: the bar is rejected
  and counts as a fault of its source. Unconfirmed after ``spike_hold_intervals``:
  it is delivered and flagged.
* **Delivery and gap fill.** For each symbol the router delivers, from the
  active source, the bars after the last one delivered, in time order. Each
  source's recent bars are kept, so after a switch the bars consumers missed
  come from the new source (a live source backfills its own outages over
  REST, so its recent bars have no holes). A consumer therefore sees each
  (symbol, ts) once, in order.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from itertools import islice, repeat, takewhile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from core.bars import bar_problem

RECENT_PER_SYMBOL = 4096
RETURNS_WINDOW = 200  # log returns behind the spike filter's standard deviation
SPACING_DIFFS = 20  # ts differences behind a symbol's median bar spacing
# Plain bars go through a loop, a few at a time, and long runs of them (a burst,
# a backfill) through array operations in chunks; a bar that needs a rule ends a
# chunk, and the work on the rest of it is lost, so chunks stay short.
LOOP_BARS = 8
ARRAY_MIN_BARS = 64
ARRAY_CHUNK_BARS = 512


def records_after(buffer: deque, seq: int, limit: int = 10_000) -> list[dict[str, Any]]:
    """The records of ``buffer`` (numbered by a contiguous ``seq``) after ``seq``, oldest first.

    Walks back from the newest end in C (``islice``): a deque's middle is slow
    to index, and the records wanted are always the newest ones.
    """
    if not buffer or buffer[-1]["seq"] <= seq:
        return []
    n = min(len(buffer), buffer[-1]["seq"] - seq)
    out = list(islice(reversed(buffer), n))
    out.reverse()
    return out[:limit]


class _RollingStats:
    """Mean and standard deviation over the last ``n`` values, O(1) per value."""

    def __init__(self, n: int):
        self.values: deque[float] = deque(maxlen=n)
        self.total = 0.0
        self.total_sq = 0.0

    @property
    def n(self) -> int:
        return len(self.values)

    def push(self, x: float) -> None:
        if len(self.values) == self.values.maxlen:
            old = self.values[0]
            self.total -= old
            self.total_sq -= old * old
        self.values.append(x)
        self.total += x
        self.total_sq += x * x

    def std(self) -> float:
        n = len(self.values)
        if n < 2:
            return 0.0
        mean = self.total / n
        return math.sqrt(max(0.0, self.total_sq / n - mean * mean))


@dataclass
class RouterConfig:
    interval_s: float = 1.0
    stall_intervals: float = 2.0
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


class RouterState:
    """Sources in priority order (index 0 first) for one group of symbols."""

    def __init__(
        self,
        sources: list[str],
        symbols: list[str],
        config: RouterConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        start_seq: int = 0,
        last_delivered: dict[str, int] | None = None,
    ):
        if not sources:
            raise ValueError("a feed router needs at least one source")
        self.cfg = config or RouterConfig()
        self.clock = clock
        now = clock()
        self.symbols = [s.upper() for s in symbols]
        self.sources: dict[str, SourceHealth] = {}
        for i, name in enumerate(sources):
            h = SourceHealth(name, i, created_at=now)
            h.quality_window = deque(maxlen=self.cfg.quality_window)
            self.sources[name] = h
        self.order = list(sources)
        self.active: str | None = sources[0]
        self.events: deque[FailoverEvent] = deque(maxlen=1000)
        self.seq = start_seq
        self.delivered: deque[dict[str, Any]] = deque(maxlen=self.cfg.buffer)
        self.windows: dict[str, deque] = {s: deque(maxlen=self.cfg.window) for s in self.symbols}
        self.last_delivered: dict[str, int] = dict(last_delivered or {})
        self._returns: dict[str, _RollingStats] = {s: _RollingStats(RETURNS_WINDOW) for s in self.symbols}
        self._diffs: dict[str, deque] = {s: deque(maxlen=SPACING_DIFFS) for s in self.symbols}
        self._spacing: dict[str, float] = {}
        self._last_close: dict[str, float] = {}
        self._held_since: dict[tuple, float] = {}
        self._prev_ts: dict[str, int] = {}

        self.flagged = 0
        self.spikes_rejected = 0
        self.total_delivered = 0

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
            best = self._best_healthy(exclude=source)
            if best is not None:
                self._switch(best, f"quality: {first_reason}", "failover")
        return accepted

    def mark_dead(self, source: str, reason: str) -> None:
        h = self.sources[source]
        if h.alive:
            h.alive = False
            h.last_error = reason
            h.errors += 1
            h.healthy_since = None
        if source == self.active:
            best = self._best_healthy(exclude=source)
            if best is not None:  # with nowhere to go, stay: a source that answers again resumes at once
                self._switch(best, f"dead: {reason}", "failover")

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
        since = h.last_bar_at if h.last_bar_at is not None else h.created_at
        return now - since > self.cfg.stall_intervals * self.cfg.interval_s

    def why_unhealthy(self, name: str, now: float | None = None) -> str | None:
        now = self.clock() if now is None else now
        h = self.sources[name]
        if not h.alive:
            return f"dead: {h.last_error or 'actor gone'}"
        if self.is_stalled(h, now):
            since = h.last_bar_at if h.last_bar_at is not None else h.created_at
            return f"stalled: no bar for {now - since:.2f}s ({self.cfg.stall_intervals:g} intervals)"
        if len(h.quality_window) >= 10 and h.quality() < self.cfg.min_quality:
            return f"quality {h.quality():.2f} below {self.cfg.min_quality:.2f}"
        if now < h.bad_until:
            return f"quality: {h.last_reject}"
        return None

    def _best_healthy(self, exclude: str | None = None) -> str | None:
        now = self.clock()
        for name in self.order:
            if name != exclude and self.why_unhealthy(name, now) is None:
                return name
        return None

    def _switch(self, to: str | None, reason: str, kind: str) -> None:
        if to == self.active:
            return
        self.events.append(FailoverEvent(self.clock(), self.active, to, reason, kind))
        self.active = to

    def _update_health(self) -> None:
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
            best = self._best_healthy()
            if best is not None and best != self.active:
                self._switch(best, reason or "unhealthy", "failover")
            return
        # Failback to a higher-priority source that has been well long enough.
        active_prio = self.sources[self.active].priority
        for name in self.order[:active_prio]:
            h = self.sources[name]
            if h.healthy_since is not None and now - h.healthy_since >= self.cfg.failback_intervals * self.cfg.interval_s:
                self._switch(name, f"recovered: healthy for {now - h.healthy_since:.2f}s", "failback")
                break

    # -- delivery ---------------------------------------------------------------------
    def step(self) -> list[dict[str, Any]]:
        """Evaluate health, switch if needed, and deliver what is new. Returns the delivered bars."""
        self._update_health()
        if self.active is None:
            return []
        out: list[dict[str, Any]] = []
        src = self.sources[self.active]
        for sym in self.symbols:
            book = src.recent.get(sym)
            if not book:
                continue
            last = self.last_delivered.get(sym)
            # Books are in time order (the gate refuses anything else): walk back to
            # the last delivered bar (in C: a held spike has this walk repeated every step).
            pending = list(reversed(book) if last is None else takewhile(last.__lt__, reversed(book)))
            if not pending:
                continue
            pending.reverse()
            i = 0
            while True:
                # The plain bars go in one run; a bar that needs a rule (a gap before
                # it, a spike candidate) stops the run and is judged here.
                i = self._deliver_plain(sym, book, pending, i, out)
                if i == len(pending):
                    break
                ts = pending[i]
                i += 1
                if self.last_delivered.get(sym) is not None and ts <= self.last_delivered[sym]:
                    continue  # filled from another source meanwhile
                gap = self._fill_gap(sym, ts, out)
                if gap == "hold":
                    break
                bar = book[ts]
                verdict = self._spike_check(sym, bar)
                if verdict == "hold":
                    break
                if verdict == "reject":
                    book.pop(ts, None)
                    src.bad_until = self.clock() + self.cfg.failback_intervals * self.cfg.interval_s
                    src.last_reject = "spike not confirmed by another source"
                    src.quality_window.append(False)
                    src.rejected += 1
                    best = self._best_healthy(exclude=self.active)
                    if best is None:
                        break
                    self._switch(best, "quality: spike not confirmed", "failover")
                    return out + self.step()
                out.append(self._deliver(sym, bar, flagged=(verdict == "flag")))
        return out

    def _deliver_plain(self, sym: str, book: OrderedDict, pending: list[int], start: int,
                       out: list[dict[str, Any]]) -> int:
        """Deliver ``pending[start:]`` (ts of ``book``'s bars) up to the first bar a rule applies to.

        Returns that bar's index in ``pending`` (``len(pending)`` when none):
        a bar with a gap before it (``_fill_gap``) or a possible spike
        (``_spike_check``). Every other bar is delivered exactly as
        ``_deliver`` would, one after another: this is the router's per-bar
        cost. Long runs (a burst, a backfill) go through array operations in
        chunks; a few bars, and a symbol's first bars while its statistics
        fill, go through a loop.
        """
        i, n = start, len(pending)
        while i < n:
            # A few bars by the loop first: it stops at once at a bar that needs a
            # rule (a held spike is tried again every step; a chunk ends at one).
            stop = min(n, i + LOOP_BARS)
            i = self._deliver_plain_loop(sym, book, pending, i, stop, out)
            if i < stop:
                return i
            if n - i >= ARRAY_MIN_BARS:  # 0 bars when the arrays do not cover the state yet
                i = self._deliver_plain_arrays(sym, book, pending, i, min(n, i + ARRAY_CHUNK_BARS), out)
        return i

    def _deliver_plain_loop(self, sym: str, book: OrderedDict, pending: list[int], start: int, stop: int,
                            out: list[dict[str, Any]]) -> int:
        """``_deliver_plain`` for ``pending[start:stop]``, bar by bar, the symbol's state in locals."""
        stats = self._returns[sym]
        values, cap = stats.values, stats.values.maxlen
        total, total_sq = stats.total, stats.total_sq
        diffs = self._diffs[sym]
        seq, n_total = self.seq, self.total_delivered
        last = self.last_delivered.get(sym)
        prev_close = self._last_close.get(sym)
        prev_ts = self._prev_ts.get(sym)
        spacing = self._spacing.get(sym)
        min_history, sigmas = self.cfg.spike_min_history, self.cfg.spike_sigmas
        m = len(values)
        log, sqrt = math.log, math.sqrt
        run: list[dict[str, Any]] = []
        i = start
        while i < stop:
            ts = pending[i]
            if last is not None and ts <= last:
                i += 1
                continue  # filled from another source meanwhile
            if last is not None and spacing is not None and not ts - last <= 1.5 * spacing:
                break  # a gap before it: _fill_gap
            bar = book[ts]
            close = bar["close"]
            r = None
            if prev_close is not None and m >= min_history and close > 0:
                r = log(close / prev_close)
                if m < 2:
                    sd = 0.0
                else:  # _RollingStats.std()
                    mean = total / m
                    var = total_sq / m - mean * mean
                    sd = sqrt(var if var > 0.0 else 0.0)
                if not (sd <= 0 or abs(r) <= sigmas * sd):
                    break  # a possible spike: _spike_check
            # What _deliver does.
            seq += 1
            bar["seq"] = seq
            if prev_close is not None and prev_close > 0:
                x = r if r is not None else log(close / prev_close)
                if m == cap:
                    old = values[0]
                    total -= old
                    total_sq -= old * old
                else:
                    m += 1
                values.append(x)
                total += x
                total_sq += x * x
            prev_close = close
            if prev_ts is not None and ts > prev_ts:  # what _note_spacing does
                diffs.append(ts - prev_ts)
                nd = len(diffs)
                if nd >= 3 and (nd < SPACING_DIFFS or n_total % 8 == 0):
                    spacing = float(sorted(diffs)[nd // 2])
            prev_ts = last = ts
            run.append(bar)
            n_total += 1
            i += 1
        if run:
            self._append_run(sym, run, out)
            stats.total, stats.total_sq = total, total_sq
            self.seq, self.total_delivered = seq, n_total
            self.last_delivered[sym] = last
            self._last_close[sym] = prev_close
            self._prev_ts[sym] = prev_ts
            if spacing is not None:
                self._spacing[sym] = spacing
        return i

    def _deliver_plain_arrays(self, sym: str, book: OrderedDict, pending: list[int], start: int, stop: int,
                              out: list[dict[str, Any]]) -> int:
        """``_deliver_plain`` for ``pending[start:stop]`` in array operations, or ``start`` if it cannot.

        It can once the symbol's statistics are full (``RETURNS_WINDOW``
        returns, ``SPACING_DIFFS`` differences), so that every bar pops one
        return and one difference, and when the bars are plain numbers. The
        result is the loop's to the last bit: the same IEEE operations in the
        same order. Each return is ``math.log`` of the same quotient; the
        running sums are one sequential ``add.accumulate`` over the pops
        (negated) and pushes interleaved, as ``total -= old; total += x``;
        the spacing is the same median, refreshed at the same bars.
        """
        stats = self._returns[sym]
        values, diffs = stats.values, self._diffs[sym]
        cap = values.maxlen
        last = self.last_delivered.get(sym)
        prev_close = self._last_close.get(sym)
        spacing = self._spacing.get(sym)
        if (len(values) != cap or len(diffs) != diffs.maxlen or last is None or self._prev_ts.get(sym) != last
                or spacing is None or type(prev_close) is not float or not prev_close > 0):
            return start
        ts_list = pending[start:stop]  # ints: ingest made them so
        n = len(ts_list)
        bars = [book[t] for t in ts_list]
        closes_list = [b["close"] for b in bars]
        if set(map(type, closes_list)) != {float}:
            return start
        try:
            ts = np.fromiter(ts_list, np.int64, n)
            d = np.diff(ts, prepend=last)  # ts - the previous bar's ts: the gap rule's and the spacing's
            all_d = np.concatenate([np.fromiter(diffs, np.int64, len(diffs)), d])
        except OverflowError:
            return start  # beyond int64 (a wrapped difference is negative, refused below)
        closes = np.fromiter(closes_list, np.float64, n)
        if not (d > 0).all() or d.max() >= 2**53 or not (closes > 0).all():
            return start  # a bar at or before the last delivered, a gap too wide for exact floats
        prev = np.empty(n)
        prev[0] = prev_close
        prev[1:] = closes[:-1]
        # math.log, not np.log: numpy's SIMD log differs from it in the last bit for some values.
        r_list = list(map(math.log, (closes / prev).tolist()))
        r = np.fromiter(r_list, np.float64, n)
        # Running sums before each bar's push: total - old + x, in that order, bar after bar.
        olds = np.concatenate([np.fromiter(values, float, cap), r])[:n]
        acc = np.empty(2 * n + 1)
        acc[0], acc[1::2], acc[2::2] = stats.total, -olds, r
        np.add.accumulate(acc, out=acc)
        acc_sq = np.empty(2 * n + 1)
        acc_sq[0], acc_sq[1::2], acc_sq[2::2] = stats.total_sq, -(olds * olds), r * r
        np.add.accumulate(acc_sq, out=acc_sq)
        # The spacing each bar is judged with: refreshed after the bars that find
        # total_delivered % 8 == 0 (the median of the last SPACING_DIFFS differences).
        after = np.arange((-self.total_delivered) % 8, n, 8)
        medians = np.sort(np.lib.stride_tricks.sliding_window_view(all_d, len(diffs))[after + 1], axis=1)
        medians = medians[:, len(diffs) // 2].astype(np.float64)
        which = np.zeros(n, dtype=np.int64)
        inside = after + 1 < n
        which[after[inside] + 1] = np.arange(1, inside.sum() + 1)
        spacings = np.concatenate([[spacing], medians])
        rule = ~(d <= 1.5 * spacings[np.maximum.accumulate(which)])  # a gap before the bar
        if cap >= max(2, self.cfg.spike_min_history):  # a possible spike
            mean = acc[0:-1:2] / cap
            var = acc_sq[0:-1:2] / cap - mean * mean
            sd = np.sqrt(np.where(var > 0.0, var, 0.0))
            rule |= ~((sd <= 0) | (np.abs(r) <= self.cfg.spike_sigmas * sd))
        j = int(rule.argmax()) if rule.any() else n
        if j == 0:
            return start
        run = bars[:j]
        for seq, bar in enumerate(run, self.seq + 1):
            bar["seq"] = seq
        values.extend(r_list[:j])
        stats.total, stats.total_sq = float(acc[2 * j]), float(acc_sq[2 * j])
        diffs.extend(d[:j].tolist())
        self._spacing[sym] = float(spacings[int(np.searchsorted(after, j - 1, side="right"))])
        self._last_close[sym] = closes_list[j - 1]
        self._prev_ts[sym] = self.last_delivered[sym] = ts_list[j - 1]
        self.seq += j
        self.total_delivered += j
        self._append_run(sym, run, out)
        return start + j

    def _append_run(self, sym: str, run: list[dict[str, Any]], out: list[dict[str, Any]]) -> None:
        """Hand delivered bars (numbered, the statistics already updated) to the step's output, the
        delivered buffer and the symbol's window."""
        out.extend(run)
        self.delivered.extend(run)
        self.windows[sym].extend(run)

    def _note_bar(self, sym: str, close: float, ts: int) -> None:
        """What a delivered (or replayed) bar teaches the rules: its log return (the spike filter's
        statistics), its close, and its spacing. ``_deliver_plain_*`` do the same in bulk."""
        prev = self._last_close.get(sym)
        if prev is not None and prev > 0:
            self._stats(sym).push(math.log(close / prev))
        self._last_close[sym] = close
        self._note_spacing(sym, ts)

    def _note_spacing(self, sym: str, ts: int) -> None:
        prev = self._prev_ts.get(sym)
        self._prev_ts[sym] = ts
        if prev is None or ts <= prev:
            return
        d = self._diffs.get(sym)
        if d is None:
            d = self._diffs[sym] = deque(maxlen=SPACING_DIFFS)
        d.append(ts - prev)
        # The median moves slowly: refresh it while it is young, then every 8th bar.
        if len(d) >= 3 and (len(d) < SPACING_DIFFS or self.total_delivered % 8 == 0):
            self._spacing[sym] = float(sorted(d)[len(d) // 2])

    def _spacing_ns(self, sym: str) -> float | None:
        return self._spacing.get(sym)

    def _fill_gap(self, sym: str, ts: int, out: list[dict[str, Any]]) -> str:
        """Before delivering ``ts``, deliver bars the active source skipped, from other sources.

        Returns ``hold`` when another healthy source has not yet reached ``ts``
        and might still have the missing bars (bounded by the hold time).
        """
        last = self.last_delivered.get(sym)
        spacing = self._spacing_ns(sym)
        if last is None or spacing is None or ts - last <= 1.5 * spacing:
            return "ok"
        missing: dict[int, dict[str, Any]] = {}
        for name in self.order:
            if name == self.active or not self.sources[name].alive:
                continue
            for t, bar in self.sources[name].recent.get(sym, {}).items():
                if last < t < ts and t not in missing:
                    missing[t] = bar
        for t in sorted(missing):
            out.append(self._deliver(sym, missing[t]))
        if missing:
            return "ok"
        now = self.clock()
        key = (sym, ts, "gap")
        behind = [
            n for n in self.order
            if n != self.active and self.sources[n].alive and self.sources[n].last_ts.get(sym, -1) < ts
        ]
        if behind:
            since = self._held_since.setdefault(key, now)
            if now - since < self._hold_limit_s(sym, ts, now):
                return "hold"
        self._held_since.pop(key, None)
        return "ok"  # every source skips it: a real gap in the market

    def _hold_limit_s(self, sym: str, ts: int, now: float) -> float:
        """How long a bar may wait for another source to confirm it or fill before it.

        While another live source has not yet reached ``ts`` it is only
        behind (a loaded machine, a slower vendor), so wait up to the stall
        limit; once none is behind, ``spike_hold_intervals``.
        """
        # Alive is enough: a source that is only slow (even past the stall
        # limit on a loaded machine) may still bring the bar.
        behind = any(
            n != self.active and self.sources[n].alive and self.sources[n].last_ts.get(sym, -1) < ts
            for n in self.order
        )
        k = max(self.cfg.spike_hold_intervals, self.cfg.stall_intervals) if behind else self.cfg.spike_hold_intervals
        return k * self.cfg.interval_s

    def _spike_check(self, sym: str, bar: dict[str, Any]) -> str:
        prev = self._last_close.get(sym)
        stats = self._returns[sym]
        if prev is None or stats.n < self.cfg.spike_min_history or not bar["close"] > 0:
            return "ok"
        r = math.log(bar["close"] / prev)
        sd = stats.std()
        if sd <= 0 or abs(r) <= self.cfg.spike_sigmas * sd:
            return "ok"
        key = (sym, bar["ts"])
        # Look for another source's bar at the same (symbol, ts).
        for name in self.order:
            if name == self.active:
                continue
            other = self.sources[name].recent.get(sym, {}).get(bar["ts"])
            if other is None:
                continue
            if abs(other["close"] / bar["close"] - 1) <= self.cfg.confirm_tolerance:
                self._held_since.pop(key, None)
                return "ok"
            self._held_since.pop(key, None)
            self.spikes_rejected += 1
            self.events.append(FailoverEvent(self.clock(), self.active, name, f"spike in {sym} contradicted by {name}", "spike_rejected"))
            return "reject"
        now = self.clock()
        since = self._held_since.setdefault(key, now)
        if now - since < self._hold_limit_s(sym, bar["ts"], now):
            return "hold"
        self._held_since.pop(key, None)
        self.flagged += 1
        self.events.append(FailoverEvent(now, self.active, None, f"spike in {sym} unconfirmed; delivered flagged", "spike_flagged"))
        return "flag"

    def _deliver(self, sym: str, bar: dict[str, Any], flagged: bool = False) -> dict[str, Any]:
        self.seq += 1
        # The source's record becomes the delivered one (no copy on the hot path):
        # it already carries the symbol, ts, prices and the source's name.
        rec = bar
        rec["seq"] = self.seq
        if flagged:
            rec["flagged"] = True
        self._note_bar(sym, rec["close"], rec["ts"])
        self.last_delivered[sym] = rec["ts"]
        self.delivered.append(rec)
        self._window(sym).append(rec)
        self.total_delivered += 1
        return rec

    def _stats(self, sym: str) -> _RollingStats:
        st = self._returns.get(sym)
        if st is None:
            st = self._returns[sym] = _RollingStats(RETURNS_WINDOW)
        return st

    def _window(self, sym: str) -> deque:
        w = self.windows.get(sym)
        if w is None:
            w = self.windows[sym] = deque(maxlen=self.cfg.window)
        return w

    def seed_history(self, bars: list[dict[str, Any]]) -> None:
        """Warm the spike filter and windows from stored bars (after a restart), delivering nothing."""
        for b in bars:
            sym = b["symbol"]
            self._note_bar(sym, b["close"], int(b["ts"]))
            self._window(sym).append(b)

    # -- reading ----------------------------------------------------------------------
    def since(self, seq: int, limit: int = 10_000) -> list[dict[str, Any]]:
        return records_after(self.delivered, seq, limit)

    def window(self, symbol: str, n: int) -> list[dict[str, Any]]:
        w = self.windows.get(symbol.upper())
        if not w:
            return []
        return list(w)[-n:]

    def health(self) -> dict[str, Any]:
        now = self.clock()
        sources = []
        for name in self.order:
            h = self.sources[name]
            sources.append(
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
        return {
            "active": self.active,
            "symbols": self.symbols,
            "seq": self.seq,
            "delivered": self.total_delivered,
            "flagged": self.flagged,
            "spikes_rejected": self.spikes_rejected,
            "failovers": sum(1 for e in self.events if e.kind == "failover"),
            "failbacks": sum(1 for e in self.events if e.kind == "failback"),
            "sources": sources,
            "events": [e.as_dict() for e in list(self.events)[-50:]],
        }
