"""Feed actors: one per market-data source, each emitting validated, numbered bars.

A ``FeedActor`` turns its source into bars of the schema in ``core.bars``,
numbers them (``seq``, increasing by one per bar this feed emits) and keeps the
most recent ones in a bounded buffer that consumers read with ``since(seq)``.
Sources:

* ``replay``: bars from the store, one timestamp (a bar per symbol) every
  ``bar_interval_s``, at the bars' own spacing divided by ``replay_speed``, or
  as fast as possible (``feeds.replay_pace``);
* ``synthetic``: ``core.synthetic.SyntheticMarket``, live.

Both begin at ``feeds.replay_start`` unless told where (``start``): after a
restart on an existing ledger, ``resume_start`` puts each symbol's replay just
after the last bar the ledger marked for it, because a paper broker ignores
every bar at or before that one (a replay from the store's beginning would
fill nothing for hours).

The feed does not choose between sources or fill gaps; the feed router does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from typing import Any

import pandas as pd
import ray

from actors.loop import LoopActor
from cluster.logs import configure_logging, get_logger
from cluster.settings import Settings
from core.bars import COLUMNS, normalise
from core.feedrouter import records_after
from core.store import BarStore
from core.synthetic import SyntheticMarket

log = get_logger("feeds")

BUFFER_BARS = 20_000
FAULTS = ("nan", "zero", "negative", "high_low", "spike", "duplicate", "out_of_order")


def bars_to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Bars as plain dicts (ts as int ns) - cheap to send between actors."""
    if len(df) == 0:
        return []
    out = df[list(COLUMNS)].copy()
    out["ts"] = out["ts"].astype("int64")
    return out.to_dict("records")


def records_to_bars(records: list[dict[str, Any]]) -> pd.DataFrame:
    if not records:
        from core.bars import empty_bars

        return empty_bars()
    df = pd.DataFrame.from_records(records)
    df["ts"] = pd.to_datetime(df["ts"], utc=True)
    return normalise(df)


class _Source:
    """Gives the next timestamp's bars, or None when exhausted."""

    def next_bars(self) -> pd.DataFrame | None:  # pragma: no cover - interface
        raise NotImplementedError

    def pause_s(self, settings: Settings, bars: pd.DataFrame, prev_ts: pd.Timestamp | None) -> float:
        return settings.feeds.bar_interval_s


def resume_start(settings: Settings, clock: dict[str, int]) -> dict[str, pd.Timestamp] | str | None:
    """Where the replay begins: per symbol, just after the ledger's last bar (``clock``, ns), never
    before ``feeds.replay_start``; with no clock, ``feeds.replay_start``.

    A symbol the ledger has not seen begins after the ledger's latest bar of any symbol,
    so every symbol replays from the same point in time.
    """
    floor = settings.feeds.replay_start
    if not clock:
        return floor
    latest = max(clock.values())
    out = {}
    for sym in settings.feeds.symbols:
        t = pd.Timestamp(clock.get(sym, latest) + 1, unit="ns", tz="UTC")
        out[sym] = t if floor is None else max(t, _utc(floor))
    return out


def warm_start(settings: Settings, store: BarStore) -> pd.Timestamp | None:
    """With no ``feeds.replay_start`` and nothing replayed yet: begin the replay (and the synthetic
    backup) after each symbol's first ``feeds.warm_bars`` stored bars, at one time for every symbol,
    so those bars are the history the live windows start with and the first decision has every
    member answering. None (the store's beginning) when a symbol has no more bars than that."""
    n = settings.feeds.warm_bars
    if settings.feeds.replay_start is not None or n == 0:
        return None
    starts = []
    for sym in settings.feeds.symbols:
        ts = store.read(sym)["ts"]
        if len(ts) <= n:
            return None
        starts.append(ts.iloc[n])
    return _utc(max(starts)) if starts else None


def _utc(t: Any) -> pd.Timestamp:
    t = pd.Timestamp(t)
    return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")


def _earliest(start: Any) -> Any:
    """One start for a source that cannot start each symbol on its own time."""
    return min(start.values()) if isinstance(start, dict) and start else start


class _ReplaySource(_Source):
    """``start``: one time for every symbol, a time per symbol (a dict), or None for the store's beginning."""

    def __init__(self, store: BarStore, symbols: list[str], start: Any = None):
        starts = start if isinstance(start, dict) else {s: start for s in symbols}
        frames = [store.read(s, start=starts.get(s)) for s in symbols]
        frames = [f for f in frames if len(f)]
        self._groups: list[pd.DataFrame] = []
        self._i = 0
        if not frames:
            if not any(len(store.read(s)) for s in symbols):
                raise ValueError(
                    f"the store at {store.uri} has no bars for {', '.join(symbols)}; run `raytrade data generate` first"
                )
            # The ledger is already past the stored history: nothing to replay (the backup carries on).
            log.info("replay: no stored bars after %s; nothing to replay", _earliest(start))
            return
        df = pd.concat(frames, ignore_index=True).sort_values(["ts", "symbol"], kind="stable")
        self._groups = [g for _, g in df.groupby("ts", sort=True)]

    def next_bars(self) -> pd.DataFrame | None:
        if self._i >= len(self._groups):
            return None
        g = self._groups[self._i]
        self._i += 1
        return g

    def pause_s(self, settings: Settings, bars: pd.DataFrame, prev_ts: pd.Timestamp | None) -> float:
        pace = settings.feeds.replay_pace
        if pace == "fast":
            return 0.0
        if pace == "realtime" and prev_ts is not None:
            return max(0.0, (bars["ts"].iloc[0] - prev_ts).total_seconds() / settings.feeds.replay_speed)
        return settings.feeds.bar_interval_s


class _SyntheticSource(_Source):
    def __init__(self, symbols: list[str], seed: int, start: Any = None):
        # The market always begins at the generator's default start, so its bars
        # equal the history `data generate` wrote with the same seed; a later
        # start skips ahead along that same path.
        self._market = SyntheticMarket(symbols, seed=seed, source="synthetic")
        if start is not None:
            t0 = pd.Timestamp(start)
            t0 = t0.tz_localize("UTC") if t0.tz is None else t0
            n = max(0, int((t0 - self._market.start) / self._market.interval))
            if n:
                self._market.generate(n)

    def next_bars(self) -> pd.DataFrame | None:
        return self._market.next()


class FeedBase(LoopActor):
    """What every feed actor shares: numbering, the buffer, ``since``, health, chaos hooks."""

    kind = "base"

    def _init_base(self, name: str, symbols: list[str], settings: Settings) -> None:
        # Settings travel pickled (secrets intact, in memory only); a JSON dump would redact them.
        self.settings = settings
        configure_logging(self.settings)
        self.name, self.symbols = name, [s.upper() for s in symbols]
        self._buffer: deque[dict[str, Any]] = deque(maxlen=BUFFER_BARS)
        self._seq = 0
        self._task: asyncio.Task | None = None
        self._last_bar_at: float | None = None
        self._emitted = 0
        self._errors = 0
        self._last_error: str | None = None
        self._exhausted = False
        self._paused = False
        # A new id per process: the router re-reads a restarted feed from its start.
        self.incarnation = uuid.uuid4().hex
        self._faults: list[str] = []
        self._previous: dict[str, dict[str, Any]] = {}
        self._held: dict[str, Any] | None = None

    def _emit(self, bars: pd.DataFrame) -> None:
        # Normalise and number; judging quality is the router's job, so bad
        # bars go out as they came and count against this source there.
        bars = normalise(bars, source=self.name)
        now = time.time()
        records = bars_to_records(bars)
        records = self._apply_fault(records)
        for rec in records:
            self._seq += 1
            rec["seq"] = self._seq
            rec["emitted_at"] = now
            self._buffer.append(rec)
        self._emitted += len(records)
        self._last_bar_at = now

    def _apply_fault(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self._faults or not records:
            if records:
                self._previous = {r["symbol"]: dict(r) for r in records}
            return records
        kind = self._faults.pop(0)
        sym = records[0]["symbol"]
        out = [dict(r) for r in records]
        victim = out[0]
        if kind == "nan":
            victim["close"] = float("nan")
        elif kind == "zero":
            victim["low"] = 0.0
        elif kind == "negative":
            victim["open"] = -abs(victim["open"])
        elif kind == "high_low":
            victim["high"], victim["low"] = victim["low"] * 0.99, victim["high"] * 1.01
        elif kind == "spike":
            victim["close"] *= 1.5
            victim["high"] = max(victim["high"], victim["close"])
        elif kind == "duplicate" and sym in self._previous:
            out[0] = dict(self._previous[sym])
        elif kind == "out_of_order":
            # Hold this bar back and send it after the next one.
            self._held = out.pop(0)
            self._faults.insert(0, "_release")
        elif kind == "_release" and self._held is not None:
            out.append(self._held)
            self._held = None
        self._previous = {r["symbol"]: dict(r) for r in records}
        return out

    async def inject_fault(self, kind: str) -> None:
        """Chaos testing: corrupt the next emitted bar (nan, zero, negative,
        high_low, spike, duplicate, out_of_order). Watch the router fail over."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; use one of {', '.join(FAULTS)}")
        self._faults.append(kind)

    async def since(self, seq: int, limit: int = 10_000) -> list[dict[str, Any]]:
        """Bars with ``seq`` greater than the given one, oldest first."""
        self._ensure_running()
        return records_after(self._buffer, seq, limit)

    async def since_with_incarnation(self, seq: int, limit: int = 10_000) -> tuple[list[dict[str, Any]], str]:
        return await self.since(seq, limit), self.incarnation

    async def pause(self, paused: bool = True) -> None:
        """Stop emitting without dying (a stall), or resume."""
        self._paused = paused

    async def health(self) -> dict[str, Any]:
        self._ensure_running()
        now = time.time()
        return {
            "name": self.name,
            "kind": self.kind,
            "symbols": self.symbols,
            "last_seq": self._seq,
            "emitted": self._emitted,
            "faults_pending": list(self._faults),
            "errors": self._errors,
            "last_error": self._last_error,
            "seconds_since_last_bar": None if self._last_bar_at is None else now - self._last_bar_at,
            "exhausted": self._exhausted,
            "paused": self._paused,
            "running": self._task is not None and not self._task.done(),
            "incarnation": self.incarnation,
        }


@ray.remote
class FeedActor(FeedBase):
    """A replay or synthetic source. Read with ``since(seq)``; ``health()`` for status."""

    def __init__(self, name: str, kind: str, symbols: list[str], settings: Settings, start: Any = None):
        self._init_base(name, symbols, settings)
        self.kind = kind
        start = start if start is not None else settings.feeds.replay_start
        if kind == "replay":
            store = BarStore.from_settings(self.settings.store, self.settings.resilience)
            self._source: _Source = _ReplaySource(store, self.symbols, start)
        elif kind == "synthetic":
            # One market for all symbols: from the earliest start, so no symbol misses a bar
            # (the router ignores the ones it already delivered).
            self._source = _SyntheticSource(self.symbols, self.settings.feeds.seed, _earliest(start))
        else:
            raise ValueError(f"unknown feed kind {kind!r}; use replay or synthetic (alpaca has its own actor)")

    async def _run(self) -> None:
        prev_ts: pd.Timestamp | None = None
        while True:
            if self._paused:
                await asyncio.sleep(0.05)
                continue
            try:
                bars = self._source.next_bars()
            except Exception as e:  # noqa: BLE001 - a source error is counted, not fatal
                self._errors += 1
                self._last_error = str(e)
                log.warning("feed %s: source error: %s", self.name, e)
                await asyncio.sleep(self.settings.feeds.bar_interval_s)
                continue
            if bars is None:
                self._exhausted = True
                log.info("feed %s: source exhausted after %d bars", self.name, self._emitted)
                return
            self._emit(bars)
            pause = self._source.pause_s(self.settings, bars, prev_ts)
            prev_ts = bars["ts"].iloc[0]
            await asyncio.sleep(pause)
