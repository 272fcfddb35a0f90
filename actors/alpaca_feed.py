"""The Alpaca feed: live bars from alpaca-py's stock data stream, history over REST.

One actor holds the stream for all symbols of a key (Alpaca allows one
websocket per key). alpaca-py's ``StockDataStream.run()`` blocks on its own
event loop, so it runs in a thread and hands bars to the actor through a
lock-protected list.

* **Reconnects**: alpaca-py reconnects a dropped socket with exponential
  backoff and re-subscribes; the stream's ``data_timeout`` also catches a
  socket that is open but silent. Bars published while the socket was down
  are not re-sent by Alpaca, so when a bar arrives more than one bar after the
  symbol's previous one, the gap is backfilled from the historical data client
  (through retry and the circuit breaker) and emitted, in order, before it.
* **Wrong keys**: alpaca-py only logs an auth failure and reconnects forever.
  This actor stops the stream at the first failure and reports one clear error
  ("check alpaca.api_key / alpaca.secret_key") in ``health()``; no retry storm.

The router treats this like any other source (``since``, ``health``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import ray

from actors.feeds import FeedBase, log
from cluster.settings import Settings
from core.resilience import Resilient

_STREAM_PATHS = {"iex": "wss://stream.data.alpaca.markets/v2/iex", "sip": "wss://stream.data.alpaca.markets/v2/sip"}


class AlpacaAuthError(RuntimeError):
    """Alpaca refused the keys; retrying cannot help."""


def _ts_ns(t: Any) -> int:
    if hasattr(t, "to_unix_nano"):  # msgpack.Timestamp (raw_data=True)
        return int(t.to_unix_nano())
    if isinstance(t, datetime):
        return int(pd.Timestamp(t).tz_convert("UTC").value) if t.tzinfo else int(pd.Timestamp(t, tz="UTC").value)
    return int(pd.Timestamp(t).value)


def bar_from_alpaca(raw: Any, symbol: str | None = None) -> dict[str, Any]:
    """A bar record from a raw stream message, a REST dict, or an alpaca-py Bar model."""
    if isinstance(raw, dict):
        sym = raw.get("S") or symbol
        return {"symbol": str(sym).upper(), "ts": _ts_ns(raw["t"]), "open": float(raw["o"]), "high": float(raw["h"]),
                "low": float(raw["l"]), "close": float(raw["c"]), "volume": float(raw["v"])}
    return {"symbol": raw.symbol.upper(), "ts": _ts_ns(raw.timestamp), "open": float(raw.open),
            "high": float(raw.high), "low": float(raw.low), "close": float(raw.close), "volume": float(raw.volume)}


def auth_stopping_stream_class():
    from alpaca.data.live import StockDataStream

    class _Stream(StockDataStream):
        """Stops at the first auth failure instead of reconnecting forever (alpaca-py 0.44 ``_auth``)."""

        auth_error: str | None = None

        async def _auth(self) -> None:
            try:
                await super()._auth()
            except ValueError as e:
                self.auth_error = str(e)
                await self.stop_ws()
                raise

    return _Stream


@ray.remote
class AlpacaFeedActor(FeedBase):
    kind = "alpaca"

    def __init__(self, name: str, symbols: list[str], settings: Settings):
        self._init_base(name, symbols, settings)
        a = settings.alpaca
        if not a.enabled:
            raise ValueError("the alpaca feed needs alpaca.api_key and alpaca.secret_key")
        self._key = a.api_key.get_secret_value()
        self._secret = a.secret_key.get_secret_value()
        self._inbox: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._last_ts: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        self._auth_failed: str | None = None
        self.backfilled = 0
        self.reconnects = 0
        self._rest = Resilient.from_settings(f"alpaca-data:{name}", settings.resilience)
        self._hist: Any = None

    # -- the stream thread ------------------------------------------------------------------
    def _start_stream(self) -> None:
        from alpaca.data.enums import DataFeed

        a = self.settings.alpaca
        cls = auth_stopping_stream_class()
        self._stream = cls(
            self._key, self._secret, raw_data=True, feed=DataFeed(a.feed),
            url_override=a.data_stream_url, data_timeout=a.stream_data_timeout_s,
        )

        async def on_bar(bar: Any) -> None:
            rec = bar_from_alpaca(bar)
            with self._lock:
                self._inbox.append(rec)

        self._stream.subscribe_bars(on_bar, *self.symbols)

        def run() -> None:
            try:
                self._stream.run()
            except Exception as e:  # noqa: BLE001 - reported in health
                self._last_error = f"stream stopped: {e.__class__.__name__}"
            if self._stream.auth_error:
                self._auth_failed = (
                    f"Alpaca refused the keys ({self._stream.auth_error}); check alpaca.api_key / alpaca.secret_key"
                )
                self._last_error = self._auth_failed
                log.error("feed %s: %s", self.name, self._auth_failed)

        self._thread = threading.Thread(target=run, name=f"alpaca-stream-{self.name}", daemon=True)
        self._thread.start()

    def _historical(self) -> Any:
        if self._hist is None:
            from alpaca.data.historical import StockHistoricalDataClient

            self._hist = StockHistoricalDataClient(self._key, self._secret, url_override=self.settings.alpaca.data_rest_url)
        return self._hist

    def _fetch_history(self, symbol: str, start_ns: int, end_ns: int) -> list[dict[str, Any]]:
        from alpaca.data.enums import DataFeed
        from alpaca.data.requests import StockBarsRequest
        from alpaca.data.timeframe import TimeFrame, TimeFrameUnit

        secs = self.settings.alpaca.bar_seconds
        tf = TimeFrame(secs // 60, TimeFrameUnit.Minute) if secs % 60 == 0 and secs < 3600 else TimeFrame.Minute
        req = StockBarsRequest(
            symbol_or_symbols=symbol, timeframe=tf, feed=DataFeed(self.settings.alpaca.feed),
            start=datetime.fromtimestamp(start_ns / 1e9, tz=timezone.utc),
            end=datetime.fromtimestamp(end_ns / 1e9, tz=timezone.utc),
        )
        resp = self._rest.call(self._historical().get_stock_bars, req)
        data = resp.data if hasattr(resp, "data") else resp
        out = [bar_from_alpaca(b) for b in data.get(symbol, [])]
        return [b for b in out if start_ns <= b["ts"] <= end_ns]

    async def history(self, symbol: str, start: Any, end: Any) -> list[dict[str, Any]]:
        """Bars of ``symbol`` between two times, from Alpaca's historical API."""
        t0, t1 = pd.Timestamp(start), pd.Timestamp(end)
        t0 = t0.tz_localize("UTC") if t0.tz is None else t0
        t1 = t1.tz_localize("UTC") if t1.tz is None else t1
        return await asyncio.to_thread(self._fetch_history, symbol.upper(), int(t0.value), int(t1.value))

    # -- the actor's loop ------------------------------------------------------------------
    async def _run(self) -> None:
        if self._thread is None:
            self._start_stream()
        step_ns = self.settings.alpaca.bar_seconds * 1_000_000_000
        while True:
            with self._lock:
                batch, self._inbox = self._inbox, []
            out: list[dict[str, Any]] = []
            for rec in sorted(batch, key=lambda r: r["ts"]):
                sym = rec["symbol"]
                last = self._last_ts.get(sym)
                if last is not None and rec["ts"] > last + step_ns:
                    # Missed while disconnected: backfill over REST before this bar.
                    try:
                        missing = await asyncio.to_thread(self._fetch_history, sym, last + 1, rec["ts"] - 1)
                    except Exception as e:  # noqa: BLE001 - counted; the router may fill from elsewhere
                        self._errors += 1
                        self._last_error = f"backfill failed: {e.__class__.__name__}: {e}"
                        missing = []
                    self.backfilled += len(missing)
                    out.extend(missing)
                if last is None or rec["ts"] > last:
                    self._last_ts[sym] = rec["ts"]
                out.append(rec)
            if out:
                df = pd.DataFrame.from_records(out)
                df["ts"] = pd.to_datetime(df["ts"], utc=True)
                df["source"] = self.name
                df["seq"] = 0
                self._emit(df)
            if self._auth_failed and not batch:
                await asyncio.sleep(0.5)
            else:
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        s = self._stream
        if s is not None and s._loop is not None and s._loop.is_running():
            async def stop_now() -> None:
                await s.stop_ws()
                await s.close()

            try:
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(stop_now(), s._loop))
            except RuntimeError:
                pass
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)

    async def health(self) -> dict[str, Any]:
        h = await FeedBase.health(self)
        h.update(
            auth_failed=self._auth_failed is not None,
            backfilled=self.backfilled,
            stream_running=self._thread is not None and self._thread.is_alive(),
            breaker=self._rest.breaker.snapshot(),
        )
        return h
