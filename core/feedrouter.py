"""The feed router's logic: delivery from the active source, the spike filter, gap fill.

This is the Ray-free heart of ``actors.router.FeedRouter``. The actor polls
its sources and hands what they sent to ``RouterState.ingest``; ``step()``
decides which source is active and delivers new bars. Time comes from an
injected clock, so the same code runs live and in tests with simulated time.

``step()`` applies the sources' rules first (health, failover, failback; the
quality gate ran at ``ingest``): they are ``core.feedsources.FeedSources``'s,
and listed there. Then these:

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

Every delivered bar goes one way, ``_deliver_run``, whose callers differ only
in its parameters; long runs of plain bars take its bulk form,
``_deliver_plain_arrays``, which is tested to give the same result to the
last bit. Both end in ``_commit``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from itertools import islice, takewhile
from typing import Any, Callable

import numpy as np

from core.feedsources import FailoverEvent, FeedSources, RouterConfig

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


class RouterState:
    """One group of symbols over its sources (``FeedSources``, in priority order, index 0 first)."""

    def __init__(
        self,
        sources: list[str],
        symbols: list[str],
        config: RouterConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        start_seq: int = 0,
        last_delivered: dict[str, int] | None = None,
    ):
        self.cfg = config or RouterConfig()
        self.clock = clock
        self.feeds = FeedSources(sources, self.cfg, clock)
        self.symbols = [s.upper() for s in symbols]
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

    # -- the sources (``FeedSources``) --------------------------------------------------
    @property
    def active(self) -> str | None:
        return self.feeds.active

    @property
    def events(self) -> deque[FailoverEvent]:
        return self.feeds.events

    def ingest(self, source: str, records: list[dict[str, Any]]) -> int:
        """Bars as sent by ``source`` (dicts with ts in ns). Returns how many were accepted."""
        return self.feeds.ingest(source, records)

    def mark_dead(self, source: str, reason: str) -> None:
        self.feeds.mark_dead(source, reason)

    def mark_error(self, source: str, reason: str) -> None:
        self.feeds.mark_error(source, reason)

    def mark_alive(self, source: str) -> None:
        self.feeds.mark_alive(source)

    # -- delivery ---------------------------------------------------------------------
    def step(self) -> list[dict[str, Any]]:
        """Evaluate health, switch if needed, and deliver what is new. Returns the delivered bars."""
        feeds = self.feeds
        feeds.update_health()
        if feeds.active is None:
            return []
        out: list[dict[str, Any]] = []
        src = feeds.sources[feeds.active]
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
                verdict = self._spike_check(sym, book[ts])
                if verdict == "hold":
                    break
                if verdict == "reject":
                    book.pop(ts, None)
                    if not feeds.reject_spike(feeds.active):
                        break
                    return out + self.step()
                self._deliver_run(sym, book, pending, i - 1, i, out, judge=False, flagged=(verdict == "flag"))
        return out

    def _deliver_plain(self, sym: str, book: OrderedDict, pending: list[int], start: int,
                       out: list[dict[str, Any]]) -> int:
        """Deliver ``pending[start:]`` (ts of ``book``'s bars) up to the first bar a rule applies to.

        Returns that bar's index in ``pending`` (``len(pending)`` when none):
        a bar with a gap before it (``_fill_gap``) or a possible spike
        (``_spike_check``). Every other bar is delivered by ``_deliver_run``:
        this is the router's per-bar cost. Long runs (a burst, a backfill) go
        through its bulk form, ``_deliver_plain_arrays``, in chunks; a few
        bars, and a symbol's first bars while its statistics fill, go through
        ``_deliver_run`` itself.
        """
        i, n = start, len(pending)
        while i < n:
            # A few bars by the loop first: it stops at once at a bar that needs a
            # rule (a held spike is tried again every step; a chunk ends at one).
            stop = min(n, i + LOOP_BARS)
            i = self._deliver_run(sym, book, pending, i, stop, out)
            if i < stop:
                return i
            if n - i >= ARRAY_MIN_BARS:  # 0 bars when the arrays do not cover the state yet
                i = self._deliver_plain_arrays(sym, book, pending, i, min(n, i + ARRAY_CHUNK_BARS), out)
        return i

    def _deliver_run(self, sym: str, book: dict[int, dict[str, Any]], keys: list[int], start: int, stop: int,
                     out: list[dict[str, Any]], judge: bool = True, flagged: bool = False) -> int:
        """Deliver the bars ``book[keys[start:stop]]``, in order; returns the index it stopped at.

        The one way a bar is delivered. Its callers differ only in the
        parameters: ``_deliver_plain`` passes the active source's pending bars
        with ``judge`` on, and the run stops at the first bar a rule applies to
        (a gap before it: ``_fill_gap``; a possible spike: ``_spike_check``);
        ``step`` passes that bar alone once it has been judged (``judge`` off,
        ``flagged`` for a spike no source confirmed); ``_fill_gap`` passes the
        bars the active source skipped, from the others (``judge`` off). A bar
        at or before the last delivered one is skipped (filled from another
        source meanwhile). The symbol's state sits in locals for the run, and
        ``_commit`` records it; ``_deliver_plain_arrays`` is the same in bulk.
        """
        stats = self._returns[sym]
        values, cap = stats.values, stats.values.maxlen
        total, total_sq = stats.total, stats.total_sq
        diffs = self._diffs[sym]
        n_total = self.total_delivered
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
            ts = keys[i]
            if last is not None and ts <= last:
                i += 1
                continue  # filled from another source meanwhile
            if judge and last is not None and spacing is not None and not ts - last <= 1.5 * spacing:
                break  # a gap before it: _fill_gap
            bar = book[ts]
            close = bar["close"]
            r = None
            if judge and prev_close is not None and m >= min_history and close > 0:
                r = log(close / prev_close)
                if m < 2:
                    sd = 0.0
                else:  # _RollingStats.std()
                    mean = total / m
                    var = total_sq / m - mean * mean
                    sd = sqrt(var if var > 0.0 else 0.0)
                if not (sd <= 0 or abs(r) <= sigmas * sd):
                    break  # a possible spike: _spike_check
            # What the bar teaches the rules: its log return (the spike filter's
            # statistics, _RollingStats.push), its close, its spacing.
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
            if prev_ts is not None and ts > prev_ts:
                diffs.append(ts - prev_ts)
                nd = len(diffs)
                # The median moves slowly: refresh it while it is young, then every 8th bar.
                if nd >= 3 and (nd < SPACING_DIFFS or n_total % 8 == 0):
                    spacing = float(sorted(diffs)[nd // 2])
            prev_ts = last = ts
            run.append(bar)
            n_total += 1
            i += 1
        if run:
            self._commit(sym, run, out, total, total_sq, prev_close, spacing, flagged)
        return i

    def _deliver_plain_arrays(self, sym: str, book: OrderedDict, pending: list[int], start: int, stop: int,
                              out: list[dict[str, Any]]) -> int:
        """``_deliver_run`` for ``pending[start:stop]`` in array operations, or ``start`` if it cannot.

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
        values.extend(r_list[:j])
        diffs.extend(d[:j].tolist())
        self._commit(sym, bars[:j], out, float(acc[2 * j]), float(acc_sq[2 * j]), closes_list[j - 1],
                     float(spacings[int(np.searchsorted(after, j - 1, side="right"))]))
        return start + j

    def _commit(self, sym: str, run: list[dict[str, Any]], out: list[dict[str, Any]], total: float,
                total_sq: float, last_close: float, spacing: float | None, flagged: bool = False) -> None:
        """Number a delivered run and record it: the spike filter's sums (its returns and the
        spacing's differences are already in their deques), the symbol's last bar, close and
        spacing, and the bars in the step's output, the delivered buffer and the symbol's window."""
        # The source's record becomes the delivered one (no copy on the hot path):
        # it already carries the symbol, ts, prices and the source's name.
        for seq, bar in enumerate(run, self.seq + 1):
            bar["seq"] = seq
        if flagged:
            for bar in run:
                bar["flagged"] = True
        self.seq += len(run)
        self.total_delivered += len(run)
        stats = self._returns[sym]
        stats.total, stats.total_sq = total, total_sq
        self._prev_ts[sym] = self.last_delivered[sym] = run[-1]["ts"]
        self._last_close[sym] = last_close
        if spacing is not None:
            self._spacing[sym] = spacing
        out.extend(run)
        self.delivered.extend(run)
        self.windows[sym].extend(run)

    def _note_bar(self, sym: str, close: float, ts: int) -> None:
        """What a stored bar replayed by ``seed_history`` teaches the rules (its log return, its
        close, its spacing), without delivering it: ``_deliver_run`` does the same for a delivered bar."""
        prev = self._last_close.get(sym)
        if prev is not None and prev > 0:
            stats = self._returns.get(sym)
            if stats is None:
                stats = self._returns[sym] = _RollingStats(RETURNS_WINDOW)
            stats.push(math.log(close / prev))
        self._last_close[sym] = close
        prev_ts = self._prev_ts.get(sym)
        self._prev_ts[sym] = ts
        if prev_ts is None or ts <= prev_ts:
            return
        d = self._diffs.get(sym)
        if d is None:
            d = self._diffs[sym] = deque(maxlen=SPACING_DIFFS)
        d.append(ts - prev_ts)
        if len(d) >= 3 and (len(d) < SPACING_DIFFS or self.total_delivered % 8 == 0):
            self._spacing[sym] = float(sorted(d)[len(d) // 2])

    def _fill_gap(self, sym: str, ts: int, out: list[dict[str, Any]]) -> str:
        """Before delivering ``ts``, deliver bars the active source skipped, from other sources.

        Returns ``hold`` when another healthy source has not yet reached ``ts``
        and might still have the missing bars (bounded by the hold time).
        """
        last = self.last_delivered.get(sym)
        spacing = self._spacing.get(sym)
        if last is None or spacing is None or ts - last <= 1.5 * spacing:
            return "ok"
        missing = self.feeds.others_between(sym, last, ts)
        if missing:
            self._deliver_run(sym, missing, sorted(missing), 0, len(missing), out, judge=False)
            return "ok"
        now = self.clock()
        key = (sym, ts, "gap")
        if self.feeds.others_behind(sym, ts):
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
        behind = self.feeds.others_behind(sym, ts)
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
        feeds = self.feeds
        other, agrees = feeds.second_opinion(sym, bar, self.cfg.confirm_tolerance)
        if other is not None:
            self._held_since.pop(key, None)
            if agrees:
                return "ok"
            self.spikes_rejected += 1
            feeds.events.append(FailoverEvent(self.clock(), feeds.active, other,
                                              f"spike in {sym} contradicted by {other}", "spike_rejected"))
            return "reject"
        now = self.clock()
        since = self._held_since.setdefault(key, now)
        if now - since < self._hold_limit_s(sym, bar["ts"], now):
            return "hold"
        self._held_since.pop(key, None)
        self.flagged += 1
        feeds.events.append(FailoverEvent(now, feeds.active, None, f"spike in {sym} unconfirmed; delivered flagged",
                                          "spike_flagged"))
        return "flag"

    def seed_history(self, bars: list[dict[str, Any]]) -> None:
        """Warm the spike filter and windows from stored bars (after a restart), delivering nothing."""
        for b in bars:
            sym = b["symbol"]
            self._note_bar(sym, b["close"], int(b["ts"]))
            w = self.windows.get(sym)
            if w is None:
                w = self.windows[sym] = deque(maxlen=self.cfg.window)
            w.append(b)

    # -- reading ----------------------------------------------------------------------
    def since(self, seq: int, limit: int = 10_000) -> list[dict[str, Any]]:
        return records_after(self.delivered, seq, limit)

    def window(self, symbol: str, n: int) -> list[dict[str, Any]]:
        w = self.windows.get(symbol.upper())
        if not w:
            return []
        return list(w)[-n:]

    def health(self) -> dict[str, Any]:
        events = self.feeds.events
        return {
            "active": self.feeds.active,
            "symbols": self.symbols,
            "seq": self.seq,
            "delivered": self.total_delivered,
            "flagged": self.flagged,
            "spikes_rejected": self.spikes_rejected,
            "failovers": sum(1 for e in events if e.kind == "failover"),
            "failbacks": sum(1 for e in events if e.kind == "failback"),
            "sources": self.feeds.health(self.clock()),
            "events": [e.as_dict() for e in list(events)[-50:]],
        }
