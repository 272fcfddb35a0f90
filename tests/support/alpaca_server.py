"""A local Alpaca double: a real server on 127.0.0.1 that speaks Alpaca's protocols.

The real alpaca-py clients are pointed at it with their ``url_override``
arguments, so tests exercise the same code paths as production without the
internet:

* market-data websocket at ``/v2/iex``, ``/v2/sip``, ``/v2/delayed_sip`` and
  ``/v2/test`` (connected / auth / subscribe / bar frames, msgpack when the
  client sends ``Content-Type: application/msgpack`` as alpaca-py does, JSON
  otherwise; Alpaca's error codes 400-409 and its one-connection-per-key rule);
* historical bars ``GET /v2/stocks/bars`` (and ``/v2/stocks/bars/latest``)
  with time-range filtering and ``limit`` / ``page_token`` pagination;
* trading ``/v2/account``, ``/v2/clock``, ``/v2/orders`` (idempotent by
  ``client_order_id``, bracket orders), ``/v2/orders:by_client_order_id``,
  ``/v2/orders/{id}``, ``/v2/positions`` with fills at a configured price.

The market is scripted: the server is given ground-truth bars per symbol and
publishes them one timestamp at a time, every ``interval`` seconds (or on
``publish_next()``), to every subscribed connection. Market time moves on
whether or not anybody is connected, as it does for real: a client that is
cut off misses bars and must backfill them over REST.

Fault hooks (callable from the test thread): ``cut_connections()``,
``stall()`` / ``resume()``, ``reject_auth()``,
``set_insufficient_subscription()``, ``delay_order_responses()``,
``fail_requests()``; counters in ``stats()`` and a timestamped ``events()``
log prove what the clients did (for instance that a failing client does not
storm the server with reconnects).

Usage in a test::

    with AlpacaFakeServer(make_bars(["AAPL"], 30), interval=0.02) as srv:
        stream = StockDataStream(srv.key, srv.secret, url_override=srv.stream_url("iex"))
        hist = StockHistoricalDataClient(srv.key, srv.secret, url_override=srv.base_url)
        trading = TradingClient(srv.key, srv.secret, paper=True, url_override=srv.base_url)

Stand-alone: ``python tests/alpaca_server.py --port 8765`` (see ``--help``).

Everything binds 127.0.0.1 only, and every wait in here is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import json
import logging
import math
import random
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable, Mapping, Optional

import msgpack
from aiohttp import WSMsgType, web

log = logging.getLogger("alpaca_fake")

HOST = "127.0.0.1"  # the only address this server ever binds
UTC = timezone.utc

STREAM_FEEDS = ("iex", "sip", "delayed_sip", "test")
HIST_FEEDS = ("iex", "sip", "delayed_sip", "otc", "boats", "overnight")
# Channels of the v2 stock stream, in the order Alpaca lists them in acks.
STOCK_CHANNELS = (
    "trades", "quotes", "bars", "updatedBars", "dailyBars",
    "statuses", "lulds", "corrections", "cancelErrors",
)
OPEN_STATUSES = {
    "new", "partially_filled", "accepted", "pending_new", "held",
    "pending_cancel", "pending_replace", "accepted_for_bidding", "stopped",
    "suspended", "calculated",
}
NOT_AUTHORIZED = {"code": 40110000, "message": "request is not authorized"}
_TIMEFRAME_RE = re.compile(r"^([1-9][0-9]*)(Min|T|Hour|H|Day|D|Week|W|Month|M)$")


# --------------------------------------------------------------------------- bars


@dataclass(frozen=True)
class FakeBar:
    """One ground-truth bar, as the double stores and serves it."""

    symbol: str
    t: datetime  # tz-aware UTC, the bar's opening time
    o: float
    h: float
    l: float  # noqa: E741 - Alpaca's own field name
    c: float
    v: float
    n: int = 0
    vw: float = 0.0


def to_utc(ts: Any) -> datetime:
    """datetime (naive = UTC), RFC 3339 / ISO string, date, pandas Timestamp
    or epoch seconds -> tz-aware UTC datetime."""
    if hasattr(ts, "to_pydatetime"):
        ts = ts.to_pydatetime()
    if isinstance(ts, datetime):
        return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    if isinstance(ts, date):
        return datetime(ts.year, ts.month, ts.day, tzinfo=UTC)
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return datetime.fromtimestamp(ts, tz=UTC)
    if isinstance(ts, str):
        s = ts.strip()
        if s.endswith(("Z", "z")):
            s = s[:-1] + "+00:00"
        # Python 3.11 accepts at most microseconds; Alpaca may send nanoseconds.
        m = re.match(r"^(.*T\d\d:\d\d:\d\d)\.(\d+)(.*)$", s)
        if m:
            s = f"{m.group(1)}.{m.group(2)[:6].ljust(6, '0')}{m.group(3)}"
        return to_utc(datetime.fromisoformat(s))
    raise TypeError(f"cannot interpret {ts!r} as a timestamp")


def rfc3339(dt: datetime) -> str:
    """UTC RFC 3339 with a Z, as Alpaca writes it."""
    dt = dt.astimezone(UTC)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


_LONG_NAMES = {
    "timestamp": "t", "ts": "t", "time": "t", "open": "o", "high": "h",
    "low": "l", "close": "c", "volume": "v", "trade_count": "n", "vwap": "vw",
}


def _coerce_bar(symbol: str, item: Any) -> FakeBar:
    if isinstance(item, FakeBar):
        return item if item.symbol == symbol else FakeBar(symbol, *_bar_fields(item))
    if not isinstance(item, Mapping):
        # objects with attributes (alpaca Bar models, core bars, namedtuples)
        item = {k: getattr(item, k) for k in (*_LONG_NAMES, *"tohlcv", "n", "vw")
                if hasattr(item, k)}
    d = {_LONG_NAMES.get(k, k): v for k, v in item.items()}
    missing = [k for k in ("t", "o", "h", "l", "c", "v") if d.get(k) is None]
    if missing:
        raise ValueError(f"bar for {symbol} lacks {missing}: {item!r}")
    c = float(d["c"])
    return FakeBar(
        symbol=symbol, t=to_utc(d["t"]), o=float(d["o"]), h=float(d["h"]),
        l=float(d["l"]), c=c, v=d["v"], n=int(d.get("n") or 0),
        vw=float(d["vw"]) if d.get("vw") is not None else c,
    )


def _bar_fields(b: FakeBar) -> tuple:
    return (b.t, b.o, b.h, b.l, b.c, b.v, b.n, b.vw)


def normalise_bars(bars: Optional[Mapping[str, Iterable[Any]]]) -> dict[str, list[FakeBar]]:
    """Ground truth per symbol, sorted by time; rejects duplicate timestamps."""
    out: dict[str, list[FakeBar]] = {}
    for symbol, items in (bars or {}).items():
        seq = sorted((_coerce_bar(symbol, it) for it in items), key=lambda b: b.t)
        for a, b in zip(seq, seq[1:]):
            if a.t == b.t:
                raise ValueError(f"duplicate bar time {a.t} for {symbol}")
        out[symbol] = seq
    return out


def make_bars(
    symbols: Iterable[str],
    n: int,
    *,
    start: datetime = datetime(2024, 1, 2, 14, 30, tzinfo=UTC),
    step: timedelta = timedelta(minutes=1),
    seed: int = 0,
    price: float = 100.0,
) -> dict[str, list[FakeBar]]:
    """Deterministic, valid minute bars (a random walk) for tests and the CLI."""
    rng = random.Random(seed)
    out: dict[str, list[FakeBar]] = {}
    for k, sym in enumerate(symbols):
        p = price * (1 + 0.25 * k)
        seq = []
        for i in range(n):
            o = round(p, 2)
            c = round(max(0.01, o * math.exp(rng.gauss(0, 0.002))), 2)
            h = round(max(o, c) + rng.uniform(0, 0.05), 2)
            lo = round(max(0.01, min(o, c) - rng.uniform(0, 0.05)), 2)
            v = rng.randint(100, 10_000)
            vw = round((o + h + lo + c) / 4, 4)
            seq.append(FakeBar(sym, to_utc(start) + i * step, o, h, lo, c, v,
                               rng.randint(1, 200), vw))
            p = c
        out[sym] = seq
    return out


def _bar_json(b: FakeBar) -> dict:
    return {"t": rfc3339(b.t), "o": b.o, "h": b.h, "l": b.l, "c": b.c,
            "v": b.v, "n": b.n, "vw": b.vw}


def _bar_stream_msg(b: FakeBar, use_msgpack: bool) -> dict:
    t: Any = msgpack.Timestamp.from_datetime(b.t) if use_msgpack else rfc3339(b.t)
    return {"T": "b", "S": b.symbol, "o": b.o, "h": b.h, "l": b.l, "c": b.c,
            "v": b.v, "t": t, "n": b.n, "vw": b.vw}


# ------------------------------------------------------------------ helpers


def _dec(x: Any) -> Decimal:
    return x if isinstance(x, Decimal) else Decimal(str(x))


def _num(d: Decimal) -> str:
    """Decimal -> Alpaca's string number ("10", "101.25")."""
    if d == d.to_integral_value():
        return str(d.quantize(Decimal(1)))
    return format(d.normalize(), "f")


def _now() -> datetime:
    return datetime.now(UTC)


def _asset_id(symbol: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"alpaca-fake/asset/{symbol}"))


class _ApiError(Exception):
    def __init__(self, status: int, message: str, code: Optional[int] = None, **extra: Any):
        super().__init__(message)
        self.status = status
        self.body = {"code": code if code is not None else status * 100000,
                     "message": message, **extra}


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


class _Conn:
    """One market-data websocket connection."""

    _ids = 0

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, feed: str):
        _Conn._ids += 1
        self.id = _Conn._ids
        self.ws = ws
        self.transport = request.transport
        self.feed = feed
        self.use_msgpack = "msgpack" in request.headers.get("Content-Type", "").lower()
        self.key: Optional[str] = None
        self.authenticated = False
        self.subs: dict[str, set[str]] = {c: set() for c in STOCK_CHANNELS}
        self.send_lock = asyncio.Lock()

    def wants(self, channel: str, symbol: str) -> bool:
        s = self.subs[channel]
        return symbol in s or "*" in s


# ------------------------------------------------------------------- server


class AlpacaFakeServer:
    """Alpaca's market-data stream, historical bars and trading API on 127.0.0.1.

    Runs its own asyncio loop in a daemon thread; use it as a context manager
    (or ``start()`` / ``stop()``). ``port=0`` picks a free port; read
    ``.port`` / ``.base_url`` / ``.stream_url(feed)`` after start.

    Args:
        bars: ground truth, ``{symbol: [bar, ...]}``; a bar is a ``FakeBar``, a
            mapping with Alpaca's short keys (t o h l c v n vw) or long names
            (timestamp/open/high/low/close/volume/trade_count/vwap), or an object
            with those attributes.
        key, secret: the one valid credential pair; ``keys`` adds more
            ``{key: secret}`` pairs.
        interval: seconds between published timestamps; ``None`` publishes only
            on ``publish_next()``.
        autostart: ``"on_subscribe"`` (clock starts at the first bar
            subscription), ``"immediate"`` (starts with the server) or
            ``"manual"`` (``start_clock()``).
        max_page_size: largest page the historical endpoint returns (Alpaca's is
            10000; set it small to force pagination).
        rest_visibility: ``"all"`` serves every ground-truth bar over REST,
            ``"published"`` only bars whose time the clock has reached.
        connection_limit: websocket connections per key per endpoint (Alpaca: 1).
        auth_timeout: seconds a websocket may stay unauthenticated (Alpaca: 10).
        cash: the account's starting cash.
        fill_prices: fixed fill price per symbol (see ``set_price``); otherwise
            the last published close, else the first bar's open, else
            ``default_price``.
        shorting_enabled: allow sells beyond the position (a cash account by
            default: no).
    """

    def __init__(
        self,
        bars: Optional[Mapping[str, Iterable[Any]]] = None,
        *,
        key: str = "test-key",
        secret: str = "test-secret",
        keys: Optional[Mapping[str, str]] = None,
        interval: Optional[float] = 0.05,
        autostart: str = "on_subscribe",
        port: int = 0,
        max_page_size: int = 10_000,
        rest_visibility: str = "all",
        connection_limit: int = 1,
        auth_timeout: float = 10.0,
        cash: float = 100_000.0,
        fill_prices: Optional[Mapping[str, float]] = None,
        default_price: float = 100.0,
        shorting_enabled: bool = False,
    ) -> None:
        if autostart not in ("on_subscribe", "immediate", "manual"):
            raise ValueError(f"autostart must be on_subscribe, immediate or manual, not {autostart!r}")
        if rest_visibility not in ("all", "published"):
            raise ValueError("rest_visibility must be 'all' or 'published'")
        if interval is not None and interval <= 0:
            raise ValueError("interval must be positive or None")
        self.key = key
        self.secret = secret
        self._keys = {key: secret, **dict(keys or {})}
        self.interval = interval
        self.autostart = autostart
        self._port_req = port
        self.port: Optional[int] = None
        self.max_page_size = max(1, min(int(max_page_size), 10_000))
        self.rest_visibility = rest_visibility
        self.connection_limit = connection_limit
        self.auth_timeout = auth_timeout
        self.default_price = Decimal(str(default_price))
        self.shorting_enabled = shorting_enabled

        self._lock = threading.RLock()
        self._set_bars_locked(bars)
        # clock & faults
        self._clock_started = autostart == "immediate"
        self._paused = False
        self._stalled = False
        self._reject_auth = False
        self._insufficient: set[str] = set()
        self._order_delays: list[float] = []
        self._http_faults: list[dict] = []
        # connections
        self._conns: dict[int, _Conn] = {}
        # counters / events
        self._t0 = time.monotonic()
        self._stats: dict[str, Any] = {}
        self._events: collections.deque = collections.deque(maxlen=100_000)  # bounded
        self.reset_counters()
        # trading state
        self._initial_cash = Decimal(str(cash))
        self._cash = self._initial_cash
        self._orders: dict[str, dict] = {}      # id -> order record
        self._by_client_id: dict[str, str] = {}  # client_order_id -> id
        self._order_seq: list[str] = []          # ids in submission order
        self._positions: dict[str, dict] = {}   # symbol -> {"qty", "cost"}
        self._price_override = {s: Decimal(str(p)) for s, p in (fill_prices or {}).items()}
        self._last_close: dict[str, Decimal] = {}
        self._account_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "alpaca-fake/account"))
        self._created_at = _now()
        # loop plumbing
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._start_error: Optional[BaseException] = None
        self._runner: Optional[web.AppRunner] = None
        self._closing: Optional[asyncio.Event] = None
        self._wake: Optional[asyncio.Event] = None
        self._pusher: Optional[asyncio.Task] = None

    # ----------------------------------------------------------- lifecycle

    def __enter__(self) -> "AlpacaFakeServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> "AlpacaFakeServer":
        if self._thread is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._thread_main, name="alpaca-fake", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"alpaca fake server did not start within {timeout}s")
        if self._start_error is not None:
            raise RuntimeError("alpaca fake server failed to start") from self._start_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._ashutdown(), loop).result(timeout)
            except Exception:  # noqa: BLE001 - best effort, then stop the loop anyway
                log.exception("alpaca fake: shutdown")
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("alpaca fake server thread did not stop")
        self._thread = None

    def _thread_main(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._astart())
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._start_error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=2))
            finally:
                loop.close()

    async def _astart(self) -> None:
        self._closing = asyncio.Event()
        self._wake = asyncio.Event()
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        for feed in STREAM_FEEDS:
            r.add_get(f"/v2/{feed}", self._ws_handler)
        r.add_get("/v2/stocks/bars", self._h_bars)
        r.add_get("/v2/stocks/bars/latest", self._h_latest_bars)
        r.add_get("/v2/account", self._h_account)
        r.add_get("/v2/clock", self._h_clock)
        r.add_post("/v2/orders", self._h_post_order)
        r.add_get("/v2/orders", self._h_list_orders)
        r.add_delete("/v2/orders", self._h_cancel_all)
        r.add_get("/v2/orders:by_client_order_id", self._h_order_by_client_id)
        r.add_get("/v2/orders/{order_id}", self._h_get_order)
        r.add_delete("/v2/orders/{order_id}", self._h_cancel_order)
        r.add_get("/v2/positions", self._h_positions)
        r.add_get("/v2/positions/{symbol}", self._h_position)
        r.add_delete("/v2/positions/{symbol}", self._h_close_position)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self._port_req)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._pusher = asyncio.create_task(self._push_loop())

    async def _ashutdown(self) -> None:
        assert self._closing is not None
        self._closing.set()
        if self._pusher:
            self._pusher.cancel()
        await self._close_conns(code=1001, message=b"server shutting down", abrupt=False)
        if self._runner:
            await asyncio.wait_for(self._runner.cleanup(), timeout=5)

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the server loop from the test thread."""
        if self._loop is None or not self._loop.is_running():
            coro.close()
            raise RuntimeError("server is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------ addresses

    @property
    def base_url(self) -> str:
        """For ``url_override`` of StockHistoricalDataClient and TradingClient."""
        return f"http://{HOST}:{self.port}"

    def stream_url(self, feed: str = "iex") -> str:
        """For ``url_override`` of StockDataStream (it is the full URL)."""
        if feed not in STREAM_FEEDS:
            raise ValueError(f"feed must be one of {STREAM_FEEDS}")
        return f"ws://{HOST}:{self.port}/v2/{feed}"

    def client_kwargs(self) -> dict:
        """``api_key``/``secret_key`` for any alpaca-py client."""
        return {"api_key": self.key, "secret_key": self.secret}

    # ------------------------------------------------------------- counters

    def reset_counters(self) -> None:
        with self._lock:
            self._stats = {
                "ws_connections": 0, "ws_connections_by_feed": {}, "ws_active": 0,
                "auth_attempts": 0, "auth_successes": 0, "auth_failures": 0,
                "connection_limit_rejections": 0, "insufficient_subscription_rejections": 0,
                "subscribe_messages": 0, "unsubscribe_messages": 0,
                "bars_published": 0, "bars_sent": 0, "bars_dropped_stalled": 0,
                "frames_sent": 0, "cuts": 0,
                "rest_requests": {}, "rest_auth_failures": 0,
                "orders_created": 0, "orders_rejected": 0, "orders_duplicate": 0,
                "fills": 0,
            }
            self._events.clear()

    def stats(self) -> dict:
        """A snapshot of the counters (safe to read from any thread)."""
        with self._lock:
            s = json.loads(json.dumps(self._stats))
            s["ws_active"] = len(self._conns)
            s["ws_authenticated"] = sum(1 for c in self._conns.values() if c.authenticated)
            s["cursor"] = self._cursor
            s["timeline_len"] = len(self._timeline)
            return s

    def events(self, kind: Optional[str] = None) -> list[tuple[float, str, dict]]:
        """``(seconds since start, kind, detail)`` records: ws_connect, auth_ok,
        auth_fail, conn_limit, subscribe, publish, cut, ws_close, rest, order."""
        with self._lock:
            return [e for e in self._events if kind is None or e[1] == kind]

    def _event(self, kind: str, **detail: Any) -> None:
        with self._lock:
            self._events.append((time.monotonic() - self._t0, kind, detail))

    def _bump(self, name: str, by: int = 1) -> None:
        with self._lock:
            self._stats[name] += by

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 10.0,
                 poll: float = 0.01) -> dict:
        """Poll ``predicate(stats())`` until true; returns the stats or raises
        TimeoutError with the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if predicate(s):
                return s
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout}s; stats={s}")
            time.sleep(poll)

    # ------------------------------------------------------ scripted market

    def _set_bars_locked(self, bars: Optional[Mapping[str, Iterable[Any]]]) -> None:
        with self._lock:
            self._bars = normalise_bars(bars)
            by_ts: dict[datetime, list[FakeBar]] = {}
            for seq in self._bars.values():
                for b in seq:
                    by_ts.setdefault(b.t, []).append(b)
            self._timeline = sorted(by_ts)
            self._by_ts = {t: sorted(v, key=lambda b: b.symbol) for t, v in by_ts.items()}
            self._cursor = 0

    def set_bars(self, bars: Mapping[str, Iterable[Any]]) -> None:
        """Replace the ground truth and rewind the clock to its start."""
        self._set_bars_locked(bars)

    @property
    def ground_truth(self) -> dict[str, list[FakeBar]]:
        with self._lock:
            return {s: list(v) for s, v in self._bars.items()}

    def published(self) -> dict[str, list[FakeBar]]:
        """Bars whose time the clock has reached (sent or, when stalled, dropped)."""
        with self._lock:
            out: dict[str, list[FakeBar]] = {}
            for t in self._timeline[: self._cursor]:
                for b in self._by_ts[t]:
                    out.setdefault(b.symbol, []).append(b)
            return out

    def start_clock(self) -> None:
        with self._lock:
            self._clock_started = True
        self._poke()

    def pause(self) -> None:
        """Freeze market time (nothing is published until ``resume()``)."""
        with self._lock:
            self._paused = True

    def stall(self) -> None:
        """Keep connections open but send nothing; market time goes on, so bars
        published meanwhile are lost to the stream (but served over REST)."""
        with self._lock:
            self._stalled = True
        self._event("stall")

    def resume(self) -> None:
        """Undo ``pause()`` and ``stall()``."""
        with self._lock:
            self._paused = False
            self._stalled = False
        self._event("resume")
        self._poke()

    def publish_next(self, n: int = 1, timeout: float = 10.0) -> int:
        """Publish the next ``n`` timestamps now (works in any mode); returns how
        many were published."""
        return self._call(self._publish(n), timeout)

    def wait_published(self, n: Optional[int] = None, timeout: float = 10.0) -> dict:
        """Wait until ``n`` timestamps (default: all) have been published."""
        with self._lock:
            target = len(self._timeline) if n is None else n
        return self.wait_for(lambda s: s["cursor"] >= target, timeout)

    def wait_subscribed(self, n: int = 1, timeout: float = 10.0) -> dict:
        """Wait until ``n`` connections are authenticated and have subscribed."""
        def ok(_s: dict) -> bool:
            with self._lock:
                return sum(1 for c in self._conns.values()
                           if c.authenticated and any(c.subs.values())) >= n
        return self.wait_for(ok, timeout)

    def _poke(self) -> None:
        if self._loop is not None and self._wake is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _push_loop(self) -> None:
        assert self._closing is not None and self._wake is not None
        while not self._closing.is_set():
            with self._lock:
                running = (self._clock_started and not self._paused
                           and self.interval is not None
                           and self._cursor < len(self._timeline))
                delay = self.interval if running else 0.5
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
                continue  # state changed: re-evaluate before publishing
            except asyncio.TimeoutError:
                pass
            if running:
                try:
                    await self._publish(1)
                except Exception:  # noqa: BLE001 - a send error must not kill the clock
                    log.exception("alpaca fake: publish")

    async def _publish(self, n: int) -> int:
        done = 0
        for _ in range(n):
            with self._lock:
                if self._cursor >= len(self._timeline):
                    break
                ts = self._timeline[self._cursor]
                bars = self._by_ts[ts]
                self._cursor += 1
                stalled = self._stalled
                self._stats["bars_published"] += len(bars)
                for b in bars:
                    self._last_close[b.symbol] = Decimal(str(b.c))
                targets = [c for c in self._conns.values() if c.authenticated]
            self._event("publish", t=rfc3339(ts), n=len(bars), stalled=stalled)
            for b in bars:
                self._on_price(b.symbol)
            done += 1
            if stalled:
                self._bump("bars_dropped_stalled", len(bars))
                continue
            sends = []
            for conn in targets:
                sel = [b for b in bars if conn.wants("bars", b.symbol)]
                if sel:
                    sends.append(self._send(conn, [_bar_stream_msg(b, conn.use_msgpack) for b in sel],
                                            count_bars=len(sel)))
            if sends:
                await asyncio.gather(*sends)
        return done

    # --------------------------------------------------------------- faults

    def cut_connections(self, abrupt: bool = False, timeout: float = 10.0) -> int:
        """Drop every market-data connection now. ``abrupt`` aborts the TCP
        connection without a close frame; otherwise a 1011 close is sent.
        Returns how many were cut."""
        return self._call(self._close_conns(code=1011, message=b"cut by test", abrupt=abrupt,
                                            count_as_cut=True), timeout)

    def reject_auth(self, flag: bool = True) -> None:
        """Revoke the credentials: stream auth answers 402, REST answers 401."""
        with self._lock:
            self._reject_auth = flag

    def set_insufficient_subscription(self, feed: str = "sip", flag: bool = True) -> None:
        """Auth on this stream feed answers 409 insufficient subscription."""
        with self._lock:
            (self._insufficient.add if flag else self._insufficient.discard)(feed)

    def delay_order_responses(self, seconds: float, count: int = 1) -> None:
        """The next ``count`` POST /v2/orders are accepted and recorded at once,
        but their response is held for ``seconds`` (past a client's timeout)."""
        with self._lock:
            self._order_delays.extend([float(seconds)] * count)

    def fail_requests(self, status: int, count: int = 1, path_prefix: str = "/v2/",
                      method: Optional[str] = None, body: Optional[dict] = None) -> None:
        """The next ``count`` REST requests under ``path_prefix`` (and ``method``)
        answer ``status`` with ``body`` before doing anything. Note alpaca-py
        itself retries 429 and 504 three times, 3 s apart."""
        with self._lock:
            self._http_faults.append({
                "status": status, "count": count, "prefix": path_prefix,
                "method": method.upper() if method else None,
                "body": body or {"code": status * 100000, "message": f"injected {status}"},
            })

    # ---------------------------------------------------------- websockets

    async def _send(self, conn: _Conn, msgs: list[dict], count_bars: int = 0) -> bool:
        data: Any
        if conn.use_msgpack:
            data = msgpack.packb(msgs, datetime=False)
        else:
            data = json.dumps(msgs, separators=(",", ":"))
        try:
            async with conn.send_lock:
                if conn.ws.closed:
                    return False
                coro = conn.ws.send_bytes(data) if conn.use_msgpack else conn.ws.send_str(data)
                await asyncio.wait_for(coro, timeout=5)
        except (ConnectionError, RuntimeError, asyncio.TimeoutError) as e:
            log.debug("alpaca fake: send to conn %s failed: %s", conn.id, e)
            return False
        with self._lock:
            self._stats["frames_sent"] += 1
            self._stats["bars_sent"] += count_bars
        return True

    async def _close_conns(self, code: int, message: bytes, abrupt: bool,
                           count_as_cut: bool = False) -> int:
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()  # free their slots now (connection limit)
            if count_as_cut:
                self._stats["cuts"] += 1
        if count_as_cut:
            self._event("cut", n=len(conns), abrupt=abrupt)

        async def close_one(c: _Conn) -> None:
            if abrupt and c.transport is not None:
                c.transport.abort()
                return
            try:
                await asyncio.wait_for(c.ws.close(code=code, message=message), timeout=2)
            except Exception:  # noqa: BLE001 - a peer that won't close gets aborted
                if c.transport is not None:
                    c.transport.abort()

        await asyncio.gather(*(close_one(c) for c in conns))
        return len(conns)

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        feed = request.path.rsplit("/", 1)[-1]
        ws = web.WebSocketResponse(autoping=True, compress=False, max_msg_size=1 << 20)
        await ws.prepare(request)
        conn = _Conn(ws, request, feed)
        with self._lock:
            self._conns[conn.id] = conn
            self._stats["ws_connections"] += 1
            byf = self._stats["ws_connections_by_feed"]
            byf[feed] = byf.get(feed, 0) + 1
        self._event("ws_connect", conn=conn.id, feed=feed,
                    encoding="msgpack" if conn.use_msgpack else "json")
        assert self._closing is not None
        loop = asyncio.get_running_loop()
        try:
            await self._send(conn, [{"T": "success", "msg": "connected"}])
            deadline = loop.time() + self.auth_timeout
            while not self._closing.is_set() and not ws.closed:
                if conn.authenticated:
                    wait = 1.0
                else:
                    wait = deadline - loop.time()
                    if wait <= 0:
                        await self._send(conn, [{"T": "error", "code": 404, "msg": "auth timeout"}])
                        break
                    wait = min(wait, 1.0)
                try:
                    msg = await ws.receive(timeout=wait)
                except asyncio.TimeoutError:
                    continue
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                                WSMsgType.ERROR):
                    break
                try:
                    if msg.type == WSMsgType.BINARY:
                        payload = msgpack.unpackb(msg.data)
                    elif msg.type == WSMsgType.TEXT:
                        payload = json.loads(msg.data)
                    else:
                        continue
                except Exception:  # noqa: BLE001 - Alpaca answers bad frames with 400
                    await self._send(conn, [{"T": "error", "code": 400, "msg": "invalid syntax"}])
                    continue
                items = payload if isinstance(payload, list) else [payload]
                keep = True
                for item in items:
                    keep = await self._ws_message(conn, item)
                    if not keep:
                        break
                if not keep:
                    break
        finally:
            with self._lock:
                self._conns.pop(conn.id, None)
            self._event("ws_close", conn=conn.id)
            if not ws.closed:
                try:
                    await asyncio.wait_for(ws.close(), timeout=2)
                except Exception:  # noqa: BLE001
                    if conn.transport is not None:
                        conn.transport.abort()
        return ws

    async def _ws_message(self, conn: _Conn, item: Any) -> bool:
        """Handle one client message; False closes the connection."""
        if not isinstance(item, dict):
            await self._send(conn, [{"T": "error", "code": 400, "msg": "invalid syntax"}])
            return True
        action = item.get("action")
        if action == "auth":
            return await self._ws_auth(conn, item)
        if action in ("subscribe", "unsubscribe"):
            if not conn.authenticated:
                await self._send(conn, [{"T": "error", "code": 401, "msg": "not authenticated"}])
                return True
            for ch in STOCK_CHANNELS:
                syms = item.get(ch)
                if syms is None:
                    continue
                if not isinstance(syms, list) or not all(isinstance(s, str) for s in syms):
                    await self._send(conn, [{"T": "error", "code": 400, "msg": "invalid syntax"}])
                    return True
                with self._lock:
                    if action == "subscribe":
                        conn.subs[ch].update(syms)
                    else:
                        conn.subs[ch].difference_update(syms)
            with self._lock:
                # Alpaca subscribes corrections and cancel errors with trades.
                conn.subs["corrections"] = set(conn.subs["trades"])
                conn.subs["cancelErrors"] = set(conn.subs["trades"])
                self._stats["subscribe_messages" if action == "subscribe"
                            else "unsubscribe_messages"] += 1
                ack = {"T": "subscription", **{ch: sorted(conn.subs[ch]) for ch in STOCK_CHANNELS}}
                start = (action == "subscribe" and self.autostart == "on_subscribe"
                         and not self._clock_started and bool(conn.subs["bars"]))
                if start:
                    self._clock_started = True
            self._event(action, conn=conn.id, bars=ack["bars"])
            await self._send(conn, [ack])
            if start:
                self._wake.set()  # type: ignore[union-attr]
            return True
        await self._send(conn, [{"T": "error", "code": 400, "msg": "invalid syntax"}])
        return True

    async def _ws_auth(self, conn: _Conn, item: dict) -> bool:
        key, secret = item.get("key"), item.get("secret")
        with self._lock:
            self._stats["auth_attempts"] += 1
            if conn.authenticated:
                reply = {"T": "error", "code": 403, "msg": "already authenticated"}
                verdict = "again"
            elif self._reject_auth or not isinstance(key, str) or self._keys.get(key) != secret:
                self._stats["auth_failures"] += 1
                reply = {"T": "error", "code": 402, "msg": "auth failed"}
                verdict = "fail"
            elif conn.feed in self._insufficient:
                self._stats["insufficient_subscription_rejections"] += 1
                reply = {"T": "error", "code": 409, "msg": "insufficient subscription"}
                verdict = "insufficient"
            elif sum(1 for c in self._conns.values()
                     if c.authenticated and c.key == key and c.feed == conn.feed
                     ) >= self.connection_limit:
                self._stats["connection_limit_rejections"] += 1
                reply = {"T": "error", "code": 406, "msg": "connection limit exceeded"}
                verdict = "limit"
            else:
                self._stats["auth_successes"] += 1
                conn.key, conn.authenticated = key, True
                reply = {"T": "success", "msg": "authenticated"}
                verdict = "ok"
        self._event({"ok": "auth_ok", "fail": "auth_fail", "limit": "conn_limit",
                     "insufficient": "insufficient", "again": "auth_again"}[verdict],
                    conn=conn.id, feed=conn.feed)
        await self._send(conn, [reply])
        return verdict in ("ok", "again")

    # -------------------------------------------------------------- REST

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        path = request.path
        if request.method == "GET" and path in {f"/v2/{f}" for f in STREAM_FEEDS}:
            return await handler(request)  # websockets authenticate with a message
        route = f"{request.method} {path}"
        with self._lock:
            rr = self._stats["rest_requests"]
            rr[route] = rr.get(route, 0) + 1
            fault = None
            for f in self._http_faults:
                if f["count"] > 0 and path.startswith(f["prefix"]) and \
                        (f["method"] is None or f["method"] == request.method):
                    f["count"] -= 1
                    fault = f
                    break
            self._http_faults = [f for f in self._http_faults if f["count"] > 0]
        self._event("rest", route=route, query=dict(request.query))
        if fault is not None:
            return _json(fault["body"], fault["status"])
        if not self._rest_authorized(request):
            self._bump("rest_auth_failures")
            return _json(NOT_AUTHORIZED, 401)
        try:
            return await handler(request)
        except _ApiError as e:
            return _json(e.body, e.status)
        except web.HTTPException:
            raise
        except Exception as e:  # noqa: BLE001 - a bug in the double shows as a 500
            log.exception("alpaca fake: %s", route)
            return _json({"code": 50000000, "message": f"internal error: {e}"}, 500)

    def _rest_authorized(self, request: web.Request) -> bool:
        h = request.headers
        key, secret = h.get("APCA-API-KEY-ID"), h.get("APCA-API-SECRET-KEY")
        auth = h.get("Authorization", "")
        if key is None and auth.startswith("Basic "):
            try:
                key, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
        with self._lock:
            return (not self._reject_auth and key is not None
                    and self._keys.get(key) == secret)

    # ---------------------------------------------------- historical bars

    def _visible(self) -> dict[str, list[FakeBar]]:
        with self._lock:
            if self.rest_visibility == "all":
                return self._bars
            return self.published()

    @staticmethod
    def _param_time(q: Mapping[str, str], name: str) -> Optional[datetime]:
        v = q.get(name)
        if v is None or v == "":
            return None
        try:
            return to_utc(v)
        except (TypeError, ValueError):
            raise _ApiError(400, f"invalid {name}: {v}", 40010000) from None

    async def _h_bars(self, request: web.Request) -> web.Response:
        q = request.query
        symbols = [s for s in q.get("symbols", "").split(",") if s]
        if not symbols:
            raise _ApiError(400, "missing symbols", 40010000)
        tf = q.get("timeframe", "")
        if not _TIMEFRAME_RE.match(tf):
            raise _ApiError(400, f"invalid timeframe: {tf!r}", 40010000)
        start, end = self._param_time(q, "start"), self._param_time(q, "end")
        try:
            limit = int(q.get("limit", 1000))
        except ValueError:
            raise _ApiError(400, "invalid limit", 40010000) from None
        if not 1 <= limit <= 10_000:
            raise _ApiError(400, "invalid limit: must be between 1 and 10000", 40010000)
        feed = q.get("feed")
        if feed is not None and feed not in HIST_FEEDS:
            raise _ApiError(400, f"invalid feed: {feed}", 40010000)
        desc = q.get("sort", "asc") == "desc"
        # Flatten in the order Alpaca pages: by symbol, then by time.
        data = self._visible()
        items: list[FakeBar] = []
        for sym in sorted(set(symbols)):
            seq = [b for b in data.get(sym, [])
                   if (start is None or b.t >= start) and (end is None or b.t <= end)]
            items.extend(reversed(seq) if desc else seq)
        pos = 0
        token = q.get("page_token")
        if token:
            try:
                sym, iso = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
                after = (sym, to_utc(iso))
            except Exception:  # noqa: BLE001
                raise _ApiError(400, "invalid page_token", 40010000) from None
            pos = next((i + 1 for i, b in enumerate(items) if (b.symbol, b.t) == after), None)
            if pos is None:
                raise _ApiError(400, "invalid page_token", 40010000)
        page = items[pos: pos + min(limit, self.max_page_size)]
        more = pos + len(page) < len(items)
        out: dict[str, list[dict]] = {}
        for b in page:
            out.setdefault(b.symbol, []).append(_bar_json(b))
        next_token = None
        if more and page:
            last = page[-1]
            next_token = base64.urlsafe_b64encode(
                f"{last.symbol}|{rfc3339(last.t)}".encode()).decode()
        return _json({"bars": out, "next_page_token": next_token})

    async def _h_latest_bars(self, request: web.Request) -> web.Response:
        symbols = [s for s in request.query.get("symbols", "").split(",") if s]
        if not symbols:
            raise _ApiError(400, "missing symbols", 40010000)
        pub = self.published()
        return _json({"bars": {s: _bar_json(pub[s][-1]) for s in symbols if pub.get(s)}})

    # ------------------------------------------------------------ trading

    def _price(self, symbol: str) -> Decimal:
        with self._lock:
            if symbol in self._price_override:
                return self._price_override[symbol]
            if symbol in self._last_close:
                return self._last_close[symbol]
            seq = self._bars.get(symbol)
            if seq:
                return Decimal(str(seq[0].o))
            return self.default_price

    def set_price(self, symbol: str, price: Optional[float]) -> None:
        """Fix the fill/mark price of ``symbol`` (``None`` goes back to the last
        published close); open orders are re-evaluated against it."""
        with self._lock:
            if price is None:
                self._price_override.pop(symbol, None)
            else:
                self._price_override[symbol] = Decimal(str(price))
        self._on_price(symbol)

    def orders(self) -> list[dict]:
        """Every order (legs included) as Alpaca would return it, oldest first."""
        with self._lock:
            return [self._order_json(self._orders[i], nested=False) for i in self._order_seq]

    def positions(self) -> dict[str, dict]:
        with self._lock:
            return {s: dict(p) for s, p in self._positions.items() if p["qty"] != 0}

    def account(self) -> dict:
        with self._lock:
            return self._account_json()

    def _account_json(self) -> dict:
        long_mv = short_mv = Decimal(0)
        for sym, p in self._positions.items():
            mv = p["qty"] * self._price(sym)
            if mv >= 0:
                long_mv += mv
            else:
                short_mv += mv
        equity = self._cash + long_mv + short_mv
        reserved = sum((o["qty"] * (o["limit_price"] or self._price(o["symbol"]))
                        for o in self._orders.values()
                        if o["status"] in OPEN_STATUSES and o["side"] == "buy"
                        and o["parent"] is None), Decimal(0))
        bp = max(Decimal(0), self._cash - reserved)
        z = "0"
        return {
            "id": self._account_id, "account_number": "PA3FAKE00001", "status": "ACTIVE",
            "crypto_status": "ACTIVE", "currency": "USD",
            "buying_power": _num(bp), "regt_buying_power": _num(bp),
            "daytrading_buying_power": z, "effective_buying_power": _num(bp),
            "non_marginable_buying_power": _num(bp), "options_buying_power": _num(bp),
            "bod_dtbp": z, "cash": _num(self._cash), "accrued_fees": z,
            "pending_transfer_out": z, "pending_transfer_in": z,
            "portfolio_value": _num(equity), "pattern_day_trader": False,
            "trading_blocked": False, "transfers_blocked": False, "account_blocked": False,
            "created_at": rfc3339(self._created_at), "trade_suspended_by_user": False,
            "multiplier": "1", "shorting_enabled": self.shorting_enabled,
            "equity": _num(equity), "last_equity": _num(self._initial_cash),
            "long_market_value": _num(long_mv), "short_market_value": _num(short_mv),
            "position_market_value": _num(long_mv - short_mv),
            "initial_margin": z, "maintenance_margin": z, "last_maintenance_margin": z,
            "sma": z, "daytrade_count": 0, "balance_asof": _now().date().isoformat(),
            "crypto_tier": 0, "options_approved_level": 0, "options_trading_level": 0,
            "intraday_adjustments": z, "pending_reg_taf_fees": z,
        }

    async def _h_account(self, request: web.Request) -> web.Response:
        return _json(self.account())

    async def _h_clock(self, request: web.Request) -> web.Response:
        now = _now()
        return _json({"timestamp": now.isoformat(), "is_open": True,
                      "next_open": (now + timedelta(days=1)).isoformat(),
                      "next_close": (now + timedelta(hours=1)).isoformat()})

    def _order_json(self, o: dict, nested: bool = True) -> dict:
        def ts(x: Optional[datetime]) -> Optional[str]:
            return rfc3339(x) if x else None
        legs = None
        if nested and o["legs"]:
            legs = [self._order_json(self._orders[i], nested=False) for i in o["legs"]]
        return {
            "id": o["id"], "client_order_id": o["client_order_id"],
            "created_at": ts(o["created_at"]), "updated_at": ts(o["updated_at"]),
            "submitted_at": ts(o["submitted_at"]), "filled_at": ts(o["filled_at"]),
            "expired_at": None, "canceled_at": ts(o["canceled_at"]), "failed_at": None,
            "replaced_at": None, "replaced_by": None, "replaces": None,
            "asset_id": _asset_id(o["symbol"]), "symbol": o["symbol"],
            "asset_class": "us_equity", "notional": _num(o["notional"]) if o["notional"] else None,
            "qty": _num(o["qty"]), "filled_qty": _num(o["filled_qty"]),
            "filled_avg_price": _num(o["filled_avg_price"]) if o["filled_avg_price"] is not None else None,
            "order_class": o["order_class"], "order_type": o["type"], "type": o["type"],
            "side": o["side"], "position_intent": o["position_intent"],
            "time_in_force": o["time_in_force"],
            "limit_price": _num(o["limit_price"]) if o["limit_price"] is not None else None,
            "stop_price": _num(o["stop_price"]) if o["stop_price"] is not None else None,
            "status": o["status"], "extended_hours": o["extended_hours"], "legs": legs,
            "trail_percent": None, "trail_price": None, "hwm": None,
            "subtag": None, "source": None, "expires_at": None,
        }

    @staticmethod
    def _dec_field(body: dict, name: str, required: bool = False,
                   positive: bool = True) -> Optional[Decimal]:
        v = body.get(name)
        if v is None or v == "":
            if required:
                raise _ApiError(422, f"{name} is required", 40010001)
            return None
        try:
            d = Decimal(str(v))
        except InvalidOperation:
            raise _ApiError(422, f"invalid {name}", 40010001) from None
        if not d.is_finite() or (positive and d <= 0):
            raise _ApiError(422, f"{name} must be > 0", 40010001)
        return d

    async def _h_post_order(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001
            raise _ApiError(400, "request body format is invalid", 40010000) from None
        if not isinstance(body, dict):
            raise _ApiError(400, "request body format is invalid", 40010000)
        with self._lock:
            try:
                order = self._create_order(body)
            except _ApiError:
                self._stats["orders_rejected"] += 1
                raise
            reply = self._order_json(order)
            delay = self._order_delays.pop(0) if self._order_delays else 0.0
        self._event("order", id=order["id"], client_order_id=order["client_order_id"],
                    status=order["status"], delayed=delay)
        if delay > 0:
            assert self._closing is not None
            try:  # hold the answer; the order is already on the books
                await asyncio.wait_for(self._closing.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
        return _json(reply)

    def _create_order(self, body: dict) -> dict:
        """Validate, book and (when marketable) fill an order. Holds the lock."""
        symbol = body.get("symbol")
        if not isinstance(symbol, str) or not symbol:
            raise _ApiError(422, "symbol is required", 40010001)
        side = body.get("side")
        if side not in ("buy", "sell"):
            raise _ApiError(422, "side must be buy or sell", 40010001)
        otype = body.get("type") or body.get("order_type")
        if otype not in ("market", "limit", "stop", "stop_limit"):
            raise _ApiError(422, f"unsupported order type: {otype}", 40010001)
        tif = body.get("time_in_force")
        if tif not in ("day", "gtc", "opg", "cls", "ioc", "fok"):
            raise _ApiError(422, "invalid time_in_force", 40010001)
        qty = self._dec_field(body, "qty")
        notional = self._dec_field(body, "notional")
        if qty is not None and notional is not None:
            raise _ApiError(422, "qty and notional cannot both be set", 40010001)
        if qty is None and notional is None:
            raise _ApiError(422, "qty or notional is required", 40010001)
        if notional is not None and otype != "market":
            raise _ApiError(422, "notional orders must be market orders", 40010001)
        limit_price = self._dec_field(body, "limit_price", required=otype in ("limit", "stop_limit"))
        stop_price = self._dec_field(body, "stop_price", required=otype in ("stop", "stop_limit"))
        order_class = body.get("order_class") or "simple"
        if order_class not in ("simple", "bracket", "oto", "oco"):
            raise _ApiError(422, f"unsupported order class: {order_class}", 40010001)
        tp = body.get("take_profit") or {}
        sl = body.get("stop_loss") or {}
        tp_price = self._dec_field(tp, "limit_price") if tp else None
        sl_stop = self._dec_field(sl, "stop_price") if sl else None
        sl_limit = self._dec_field(sl, "limit_price") if sl else None
        if order_class == "bracket":
            if tp_price is None or sl_stop is None:
                raise _ApiError(422, "bracket orders require take_profit.limit_price and "
                                     "stop_loss.stop_price", 40010001)
            if (side == "buy" and tp_price <= sl_stop) or (side == "sell" and tp_price >= sl_stop):
                raise _ApiError(422, "take_profit.limit_price must be on the profit side of "
                                     "stop_loss.stop_price", 42210000)
        elif order_class == "oto" and tp_price is None and sl_stop is None:
            raise _ApiError(422, "oto orders require take_profit or stop_loss", 40010001)
        cid = body.get("client_order_id")
        if cid is not None and (not isinstance(cid, str) or not cid or len(cid) > 128):
            raise _ApiError(422, "client_order_id must be a string of at most 128 characters",
                            40010001)
        if cid is not None and cid in self._by_client_id:
            self._stats["orders_duplicate"] += 1
            raise _ApiError(422, "client_order_id must be unique", 40010001)
        price = self._price(symbol)
        if notional is not None:
            qty = (notional / price).quantize(Decimal("0.000000001"))
        assert qty is not None
        if side == "buy":
            cost = qty * (limit_price if limit_price is not None and otype == "limit" else price)
            bp = Decimal(self._account_json()["buying_power"])
            if cost > bp:
                raise _ApiError(403, "insufficient buying power", 40310000,
                                buying_power=_num(bp), cost_basis=_num(cost))
        elif not self.shorting_enabled:
            held = self._positions.get(symbol, {}).get("qty", Decimal(0))
            pending = sum((o["qty"] for o in self._orders.values()
                           if o["symbol"] == symbol and o["side"] == "sell"
                           and o["parent"] is None and o["status"] in OPEN_STATUSES), Decimal(0))
            avail = held - pending
            if qty > avail:
                raise _ApiError(403, f"insufficient qty available for order (requested: "
                                     f"{_num(qty)}, available: {_num(max(avail, Decimal(0)))})",
                                40310000, symbol=symbol, available=_num(max(avail, Decimal(0))))
        held_qty = self._positions.get(symbol, {}).get("qty", Decimal(0))
        intent = ("buy_to_open" if held_qty >= 0 else "buy_to_close") if side == "buy" else \
            ("sell_to_close" if held_qty > 0 else "sell_to_open")
        order = self._book(symbol=symbol, side=side, type=otype, qty=qty, notional=notional,
                           time_in_force=tif, limit_price=limit_price, stop_price=stop_price,
                           order_class=order_class, client_order_id=cid,
                           extended_hours=bool(body.get("extended_hours", False)),
                           position_intent=body.get("position_intent") or intent)
        exit_side = "sell" if side == "buy" else "buy"
        legs = []
        if order_class in ("bracket", "oto", "oco") and tp_price is not None:
            legs.append(self._book(symbol=symbol, side=exit_side, type="limit", qty=qty,
                                   time_in_force=tif, limit_price=tp_price, parent=order["id"],
                                   order_class=order_class, status="held"))
        if order_class in ("bracket", "oto", "oco") and sl_stop is not None:
            legs.append(self._book(symbol=symbol, side=exit_side,
                                   type="stop_limit" if sl_limit is not None else "stop",
                                   qty=qty, time_in_force=tif, stop_price=sl_stop,
                                   limit_price=sl_limit, parent=order["id"],
                                   order_class=order_class, status="held"))
        order["legs"] = [leg["id"] for leg in legs]
        self._stats["orders_created"] += 1
        self._try_fill(order, price)
        return order

    def _book(self, *, symbol: str, side: str, type: str, qty: Decimal, time_in_force: str,
              order_class: str, notional: Optional[Decimal] = None,
              limit_price: Optional[Decimal] = None, stop_price: Optional[Decimal] = None,
              client_order_id: Optional[str] = None, parent: Optional[str] = None,
              status: str = "new", extended_hours: bool = False,
              position_intent: Optional[str] = None) -> dict:
        oid = str(uuid.uuid4())
        cid = client_order_id or str(uuid.uuid4())
        now = _now()
        o = {
            "id": oid, "client_order_id": cid, "symbol": symbol, "side": side, "type": type,
            "qty": qty, "notional": notional, "time_in_force": time_in_force,
            "limit_price": limit_price, "stop_price": stop_price, "order_class": order_class,
            "status": status, "filled_qty": Decimal(0), "filled_avg_price": None,
            "created_at": now, "updated_at": now, "submitted_at": now, "filled_at": None,
            "canceled_at": None, "legs": [], "parent": parent,
            "extended_hours": extended_hours, "position_intent": position_intent,
        }
        self._orders[oid] = o
        self._by_client_id[cid] = oid
        self._order_seq.append(oid)
        return o

    def _marketable(self, o: dict, price: Decimal) -> bool:
        buy = o["side"] == "buy"
        if o["type"] == "market":
            return True
        if o["type"] == "limit":
            return price <= o["limit_price"] if buy else price >= o["limit_price"]
        triggered = price >= o["stop_price"] if buy else price <= o["stop_price"]
        if o["type"] == "stop" or not triggered:
            return triggered
        return price <= o["limit_price"] if buy else price >= o["limit_price"]  # stop_limit

    def _try_fill(self, o: dict, price: Decimal) -> bool:
        """Fill ``o`` completely at ``price`` if it is marketable. Holds the lock."""
        if o["status"] not in ("new", "accepted") or not self._marketable(o, price):
            return False
        now = _now()
        o.update(status="filled", filled_qty=o["qty"], filled_avg_price=price,
                 filled_at=now, updated_at=now)
        self._stats["fills"] += 1
        self._apply_fill(o["symbol"], o["side"], o["qty"], price)
        if o["legs"]:  # the entry filled: its exit legs go live
            for i, leg_id in enumerate(o["legs"]):
                leg = self._orders[leg_id]
                if leg["status"] == "held":
                    leg["status"] = "new" if i == 0 else "held"
                    leg["updated_at"] = now
        parent = self._orders.get(o["parent"]) if o["parent"] else None
        if parent is not None:  # one exit leg filled: cancel its siblings (OCO)
            for sib_id in parent["legs"]:
                sib = self._orders[sib_id]
                if sib_id != o["id"] and sib["status"] in OPEN_STATUSES:
                    sib.update(status="canceled", canceled_at=now, updated_at=now)
        return True

    def _apply_fill(self, symbol: str, side: str, qty: Decimal, price: Decimal) -> None:
        signed = qty if side == "buy" else -qty
        self._cash -= signed * price
        p = self._positions.setdefault(symbol, {"qty": Decimal(0), "cost": Decimal(0)})
        q0 = p["qty"]
        q1 = q0 + signed
        if q0 == 0 or (q0 > 0) == (signed > 0):
            p["cost"] += signed * price  # opening or adding
        elif (q1 > 0) == (q0 > 0) or q1 == 0:
            p["cost"] = p["cost"] * q1 / q0  # reducing: keep the average entry
        else:
            p["cost"] = q1 * price  # flipped through zero: the rest opens at price
        p["qty"] = q1
        if q1 == 0:
            p["cost"] = Decimal(0)

    def _on_price(self, symbol: str) -> None:
        """Re-evaluate open orders of ``symbol`` against its current price."""
        with self._lock:
            price = self._price(symbol)
            for oid in list(self._order_seq):
                o = self._orders[oid]
                if o["symbol"] != symbol or o["status"] not in OPEN_STATUSES:
                    continue
                parent = self._orders.get(o["parent"]) if o["parent"] else None
                if parent is not None:
                    if parent["status"] != "filled" or o["status"] not in ("new", "held"):
                        continue
                    if o["status"] == "held":  # the stop leg of a live bracket
                        o["status"] = "new"
                        if not self._try_fill(o, price):
                            o["status"] = "held"
                        continue
                self._try_fill(o, price)

    def _find_order(self, order_id: str) -> dict:
        o = self._orders.get(order_id)
        if o is None:
            raise _ApiError(404, "order not found", 40410000)
        return o

    async def _h_get_order(self, request: web.Request) -> web.Response:
        with self._lock:
            return _json(self._order_json(self._find_order(request.match_info["order_id"])))

    async def _h_order_by_client_id(self, request: web.Request) -> web.Response:
        cid = request.query.get("client_order_id")
        if not cid:
            raise _ApiError(422, "client_order_id is required", 40010001)
        with self._lock:
            oid = self._by_client_id.get(cid)
            if oid is None:
                raise _ApiError(404, "order not found", 40410000)
            return _json(self._order_json(self._orders[oid]))

    async def _h_list_orders(self, request: web.Request) -> web.Response:
        q = request.query
        status = q.get("status", "open")
        if status not in ("open", "closed", "all"):
            raise _ApiError(422, "invalid status", 40010001)
        try:
            limit = int(q.get("limit", 50))
        except ValueError:
            raise _ApiError(422, "invalid limit", 40010001) from None
        limit = max(1, min(limit, 500))
        nested = q.get("nested", "false").lower() == "true"
        symbols = {s for s in q.get("symbols", "").split(",") if s}
        side = q.get("side")
        after, until = self._param_time(q, "after"), self._param_time(q, "until")
        with self._lock:
            out = []
            for oid in self._order_seq:
                o = self._orders[oid]
                if nested and o["parent"] is not None:
                    continue  # shown inside its parent
                is_open = o["status"] in OPEN_STATUSES
                if (status == "open" and not is_open) or (status == "closed" and is_open):
                    continue
                if symbols and o["symbol"] not in symbols:
                    continue
                if side and o["side"] != side:
                    continue
                if after and o["submitted_at"] <= after:
                    continue
                if until and o["submitted_at"] >= until:
                    continue
                out.append(self._order_json(o, nested=nested))
        if q.get("direction", "desc") == "desc":
            out.reverse()
        return _json(out[:limit])

    def _cancel(self, o: dict) -> None:
        now = _now()
        o.update(status="canceled", canceled_at=now, updated_at=now)
        for leg_id in o["legs"]:
            leg = self._orders[leg_id]
            if leg["status"] in OPEN_STATUSES:
                leg.update(status="canceled", canceled_at=now, updated_at=now)

    async def _h_cancel_order(self, request: web.Request) -> web.Response:
        with self._lock:
            o = self._find_order(request.match_info["order_id"])
            if o["status"] not in OPEN_STATUSES:
                raise _ApiError(422, f'order is already in "{o["status"]}" state', 42210000)
            self._cancel(o)
        self._event("cancel", id=o["id"])
        return web.Response(status=204)

    async def _h_cancel_all(self, request: web.Request) -> web.Response:
        with self._lock:
            out = []
            for oid in self._order_seq:
                o = self._orders[oid]
                if o["parent"] is None and o["status"] in OPEN_STATUSES:
                    self._cancel(o)
                    out.append({"id": oid, "status": 200, "body": self._order_json(o)})
        return _json(out, 207)

    def _position_json(self, symbol: str, p: dict) -> dict:
        price = self._price(symbol)
        qty, cost = p["qty"], p["cost"]
        mv = qty * price
        pl = mv - cost
        plpc = (pl / abs(cost)) if cost else Decimal(0)
        avg = (cost / qty) if qty else Decimal(0)
        return {
            "asset_id": _asset_id(symbol), "symbol": symbol, "exchange": "NASDAQ",
            "asset_class": "us_equity", "asset_marginable": True,
            "qty": _num(qty), "qty_available": _num(qty),
            "avg_entry_price": _num(avg.quantize(Decimal("0.0001"))),
            "side": "long" if qty > 0 else "short", "market_value": _num(mv),
            "cost_basis": _num(cost), "unrealized_pl": _num(pl),
            "unrealized_plpc": _num(plpc.quantize(Decimal("0.0000001"))),
            "unrealized_intraday_pl": _num(pl),
            "unrealized_intraday_plpc": _num(plpc.quantize(Decimal("0.0000001"))),
            "current_price": _num(price), "lastday_price": _num(price), "change_today": "0",
        }

    async def _h_positions(self, request: web.Request) -> web.Response:
        with self._lock:
            return _json([self._position_json(s, p)
                          for s, p in sorted(self._positions.items()) if p["qty"] != 0])

    async def _h_position(self, request: web.Request) -> web.Response:
        sym = request.match_info["symbol"]
        with self._lock:
            p = self._positions.get(sym)
            if not p or p["qty"] == 0:
                raise _ApiError(404, "position does not exist", 40410000)
            return _json(self._position_json(sym, p))

    async def _h_close_position(self, request: web.Request) -> web.Response:
        sym = request.match_info["symbol"]
        with self._lock:
            p = self._positions.get(sym)
            if not p or p["qty"] == 0:
                raise _ApiError(404, "position does not exist", 40410000)
            qty = abs(p["qty"])
            side = "sell" if p["qty"] > 0 else "buy"
            pct = request.query.get("percentage")
            if request.query.get("qty"):
                qty = min(qty, Decimal(request.query["qty"]))
            elif pct:
                qty = (qty * Decimal(pct) / 100).quantize(Decimal("0.000000001"))
            shorting = self.shorting_enabled
            self.shorting_enabled = True  # closing never needs shorting rights
            try:
                o = self._create_order({"symbol": sym, "side": side, "type": "market",
                                        "time_in_force": "day", "qty": str(qty)})
            finally:
                self.shorting_enabled = shorting
            return _json(self._order_json(o))


# ---------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Local Alpaca double on 127.0.0.1 "
                                             "(market-data stream, historical bars, trading).")
    ap.add_argument("--port", type=int, default=0, help="TCP port (0 picks a free one)")
    ap.add_argument("--key", default="test-key")
    ap.add_argument("--secret", default="test-secret")
    ap.add_argument("--bars-json", help="ground truth: JSON {symbol: [{t,o,h,l,c,v,n,vw}, ...]}")
    ap.add_argument("--symbols", default="AAPL,MSFT", help="synthetic symbols when no --bars-json")
    ap.add_argument("--n-bars", type=int, default=390, help="synthetic bars per symbol")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between bars")
    ap.add_argument("--autostart", default="on_subscribe",
                    choices=("on_subscribe", "immediate", "manual"))
    ap.add_argument("--page-size", type=int, default=10_000)
    ap.add_argument("--cash", type=float, default=100_000.0)
    ap.add_argument("--max-seconds", type=float, default=3600.0,
                    help="stop by itself after this long (bounded by design)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.bars_json:
        with open(args.bars_json) as f:
            bars: Mapping[str, Iterable[Any]] = json.load(f)
    else:
        bars = make_bars([s for s in args.symbols.split(",") if s], args.n_bars, seed=args.seed)
    srv = AlpacaFakeServer(bars, key=args.key, secret=args.secret, interval=args.interval,
                           autostart=args.autostart, port=args.port,
                           max_page_size=args.page_size, cash=args.cash)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    with srv:
        print(json.dumps({"base_url": srv.base_url,
                          "stream_urls": {f: srv.stream_url(f) for f in STREAM_FEEDS},
                          "key": srv.key}), flush=True)
        done.wait(args.max_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
