"""The Alpaca double, exercised through the real alpaca-py clients.

These tests pin down two things at once: that tests/support/alpaca_server.py speaks
Alpaca's protocols well enough for alpaca-py (StockDataStream,
StockHistoricalDataClient, TradingClient) to work against it unchanged, and
how alpaca-py itself behaves on the failures our feed and broker actors must
survive (auth failure, connection limit, cut, stall, a slow order response).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import logging
import math
import threading
import time
from datetime import timedelta

import msgpack
import pytest
import requests
from alpaca.common.exceptions import APIError
from alpaca.data.enums import DataFeed
from alpaca.data.historical import StockHistoricalDataClient
from alpaca.data.live import StockDataStream
from alpaca.data.requests import StockBarsRequest
from alpaca.data.timeframe import TimeFrame
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderClass, OrderSide, OrderStatus, QueryOrderStatus, TimeInForce
from alpaca.trading.requests import (
    GetOrdersRequest,
    LimitOrderRequest,
    MarketOrderRequest,
    StopLossRequest,
    TakeProfitRequest,
)

from tests.support.alpaca_server import AlpacaFakeServer, FakeBar, make_bars

WS_LOGGER = "alpaca.data.live.websocket"


# ----------------------------------------------------------------- helpers


def _key(b) -> tuple:
    """Comparable content of an alpaca-py Bar or one of ours."""
    if isinstance(b, FakeBar):
        return (b.symbol, b.t, b.o, b.h, b.l, b.c, float(b.v), float(b.n), b.vw)
    return (b.symbol, b.timestamp, b.open, b.high, b.low, b.close, b.volume,
            b.trade_count, b.vwap)


class StreamRunner:
    """Runs the blocking ``StockDataStream.run()`` in a thread, and stops it
    within a bound.

    alpaca-py's public ``stop()`` only sets a flag that ``_consume`` checks
    between ``recv()`` calls, which wait up to 5 s when no data comes; so
    ``fast_stop`` also closes the socket (``stream.close()`` on the stream's own
    loop), which wakes ``recv()`` at once. ``stop_ws()`` must come first: it
    is what keeps the closed socket from being treated as a drop to reconnect.
    """

    def __init__(self, stream: StockDataStream):
        self.stream = stream
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="alpaca-stream", daemon=True)

    def _run(self) -> None:
        try:
            self.stream.run()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.error = e

    def start(self) -> "StreamRunner":
        self.thread.start()
        deadline = time.monotonic() + 5
        while self.stream._loop is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.stream._loop is not None, "stream loop did not start"
        return self

    def fast_stop(self, timeout: float = 5.0) -> float:
        t0 = time.monotonic()
        loop = self.stream._loop
        if self.thread.is_alive() and loop is not None and loop.is_running():
            async def stop_now() -> None:
                await self.stream.stop_ws()
                await self.stream.close()
            try:
                asyncio.run_coroutine_threadsafe(stop_now(), loop).result(timeout)
            except RuntimeError:
                pass  # the loop finished meanwhile
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream thread did not stop"
        return time.monotonic() - t0


def _collecting_stream(srv: AlpacaFakeServer, *symbols: str, feed: str = "iex",
                       **kwargs) -> tuple[StockDataStream, list]:
    got: list = []
    stream = StockDataStream(srv.key, kwargs.pop("secret", srv.secret),
                             feed=DataFeed(feed) if feed in ("iex", "sip") else DataFeed.IEX,
                             url_override=srv.stream_url(feed), **kwargs)

    async def on_bar(bar) -> None:
        got.append(bar)

    stream.subscribe_bars(on_bar, *symbols)
    return stream, got


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def _trading(srv: AlpacaFakeServer, **kw) -> TradingClient:
    return TradingClient(kw.pop("api_key", srv.key), kw.pop("secret_key", srv.secret),
                         paper=True, url_override=srv.base_url, **kw)


def _hist(srv: AlpacaFakeServer, **kw) -> StockHistoricalDataClient:
    return StockHistoricalDataClient(kw.pop("api_key", srv.key), kw.pop("secret_key", srv.secret),
                                     url_override=srv.base_url, **kw)


# ------------------------------------------------------------- the stream


def test_stream_delivers_scripted_bars_in_order_over_msgpack():
    truth = make_bars(["AAPL", "MSFT"], 25, seed=1)
    with AlpacaFakeServer(truth, interval=0.01) as srv:
        stream, got = _collecting_stream(srv, "AAPL", "MSFT")
        runner = StreamRunner(stream).start()
        srv.wait_published(timeout=10)
        _wait(lambda: len(got) == 50, 5, "all 50 bars")
        # alpaca-py's own stop(): returns at once, but run() only ends when
        # _consume next wakes -- up to 5 s on an idle stream.
        t0 = time.monotonic()
        stream.stop()
        runner.thread.join(8)
        stop_latency = time.monotonic() - t0
        assert not runner.thread.is_alive() and runner.error is None
        s = srv.stats()
    for sym in ("AAPL", "MSFT"):
        assert [_key(b) for b in got if b.symbol == sym] == [_key(b) for b in truth[sym]]
    # globally in time order too (one frame per timestamp, symbols sorted)
    assert [b.timestamp for b in got] == sorted(b.timestamp for b in got)
    assert got[0].timestamp.tzinfo is not None
    assert s["ws_connections"] == 1 and s["auth_attempts"] == 1 and s["bars_sent"] == 50
    assert [e[2]["encoding"] for e in srv.events("ws_connect")] == ["msgpack"]
    assert stop_latency < 7.0


def test_stream_raw_data_hands_over_msgpack_timestamps():
    truth = make_bars(["SPY"], 3, seed=2)
    with AlpacaFakeServer(truth, interval=0.01) as srv:
        stream, got = _collecting_stream(srv, "SPY", raw_data=True)
        runner = StreamRunner(stream).start()
        _wait(lambda: len(got) == 3, 5, "3 raw bars")
        runner.fast_stop()
    first = got[0]
    assert first["T"] == "b" and first["S"] == "SPY"
    # raw mode skips _cast: "t" stays a msgpack Timestamp, as Alpaca sends it
    assert isinstance(first["t"], msgpack.Timestamp)
    assert first["t"].to_datetime() == truth["SPY"][0].t
    assert set(first) == {"T", "S", "o", "h", "l", "c", "v", "t", "n", "vw"}


def test_wrong_keys_give_one_clear_error_per_attempt_and_backoff_not_a_storm(caplog):
    """alpaca-py never gives up on an auth failure: it logs the error and
    reconnects forever, with exponential backoff (equal jitter: 0.5-1 s, 1-2 s,
    2-4 s, ... capped at 15-30 s). It does not storm, but the feed actor must
    stop it (see the next test)."""
    caplog.set_level(logging.ERROR, logger=WS_LOGGER)
    with AlpacaFakeServer(make_bars(["AAPL"], 5), interval=0.05) as srv:
        stream, got = _collecting_stream(srv, "AAPL", secret="wrong-secret")
        runner = StreamRunner(stream).start()
        window = 4.0
        time.sleep(window)
        took = runner.fast_stop()
        s = srv.stats()
        conns = [e[0] for e in srv.events("ws_connect")]
    assert got == []
    assert s["auth_successes"] == 0
    assert 2 <= s["ws_connections"] <= 4, s  # 1 per backoff step, not a storm
    assert s["auth_failures"] == s["auth_attempts"] == s["ws_connections"]
    gaps = [b - a for a, b in zip(conns, conns[1:])]
    for k, gap in enumerate(gaps):  # k-th retry waits at least 2**k / 2 s
        assert gap >= 0.5 * 2 ** k - 0.05, gaps
    errors = [r for r in caplog.records if r.name == WS_LOGGER and "auth failed" in r.getMessage()]
    assert len(errors) == len(conns)
    assert took < 2.0  # a stop during backoff is immediate (stop_ws sets the event)


# The recipe lives in the feed actor (alpaca-py only logs auth failures, so the
# actor's stream stops at the first one); this test holds it to that.
def test_auth_failure_recipe_stops_after_one_attempt():
    with AlpacaFakeServer(make_bars(["AAPL"], 5)) as srv:
        srv.reject_auth()
        from actors.alpaca_feed import auth_stopping_stream_class

        stream = auth_stopping_stream_class()(srv.key, srv.secret, url_override=srv.stream_url("iex"))

        async def on_bar(bar) -> None:
            pass

        stream.subscribe_bars(on_bar, "AAPL")
        runner = StreamRunner(stream).start()
        runner.thread.join(5)  # run() returns by itself
        assert not runner.thread.is_alive() and runner.error is None
        time.sleep(1.2)  # longer than the first backoff: nobody comes back
        s = srv.stats()
    assert stream.auth_error == "auth failed"
    assert s["ws_connections"] == 1 and s["auth_failures"] == 1


def test_insufficient_subscription_makes_alpaca_py_stop_by_itself():
    with AlpacaFakeServer(make_bars(["AAPL"], 5)) as srv:
        srv.set_insufficient_subscription("sip")
        stream, _ = _collecting_stream(srv, "AAPL", feed="sip")
        runner = StreamRunner(stream).start()
        runner.thread.join(5)
        assert not runner.thread.is_alive() and runner.error is None
        s = srv.stats()
    assert s["ws_connections"] == 1 and s["insufficient_subscription_rejections"] == 1


def test_second_connection_with_same_key_gets_406_until_the_first_leaves():
    with AlpacaFakeServer(make_bars(["AAPL"], 5), autostart="manual") as srv:
        a, _ = _collecting_stream(srv, "AAPL")
        ra = StreamRunner(a).start()
        srv.wait_subscribed(1, timeout=5)
        b, _ = _collecting_stream(srv, "AAPL")
        rb = StreamRunner(b).start()
        srv.wait_for(lambda s: s["connection_limit_rejections"] >= 1, timeout=5)
        assert srv.stats()["ws_authenticated"] == 1
        ra.fast_stop()
        # b retries with backoff and gets the freed slot
        srv.wait_for(lambda s: s["auth_successes"] == 2 and s["ws_authenticated"] == 1, timeout=6)
        rb.fast_stop()
        limit_events = srv.events("conn_limit")
    assert limit_events and all(e[2]["feed"] == "iex" for e in limit_events)


@pytest.mark.parametrize("abrupt", [False, True], ids=["close-frame", "tcp-abort"])
def test_cut_mid_stream_client_reconnects_and_rest_backfills_the_gap(abrupt):
    truth = make_bars(["AAPL"], 40, seed=3)
    with AlpacaFakeServer(truth, interval=0.04) as srv:
        stream, got = _collecting_stream(srv, "AAPL")
        runner = StreamRunner(stream).start()
        _wait(lambda: len(got) >= 8, 5, "8 bars before the cut")
        assert srv.cut_connections(abrupt=abrupt) == 1
        srv.wait_for(lambda s: s["auth_successes"] == 2, timeout=5)  # it came back by itself
        srv.wait_published(timeout=10)
        time.sleep(0.1)
        runner.fast_stop()
        s = srv.stats()
        seen = [b.timestamp for b in got]
        assert seen == sorted(set(seen))  # in order, no duplicates
        missing = [b for b in truth["AAPL"] if b.t not in set(seen)]
        assert missing, "market time goes on during a reconnect; some bars must be missed"
        backfill = _hist(srv).get_stock_bars(StockBarsRequest(
            symbol_or_symbols="AAPL", timeframe=TimeFrame.Minute,
            start=missing[0].t, end=missing[-1].t)).data["AAPL"]
    merged = {b.timestamp: b for b in backfill} | {b.timestamp: b for b in got}
    assert [_key(merged[t]) for t in sorted(merged)] == [_key(b) for b in truth["AAPL"]]
    assert s["cuts"] == 1 and s["ws_connections"] == 2


def test_stall_is_only_noticed_with_data_timeout():
    """A stalled server still answers pings, so alpaca-py only notices when
    ``data_timeout`` is set: then it reconnects after that much silence."""
    truth = make_bars(["AAPL"], 200, seed=4)
    with AlpacaFakeServer(truth, interval=0.02) as srv:
        stream, got = _collecting_stream(srv, "AAPL", data_timeout=0.5)
        runner = StreamRunner(stream).start()
        _wait(lambda: len(got) >= 5, 5, "5 bars")
        srv.stall()
        t_stall = time.monotonic()
        srv.wait_for(lambda s: s["ws_connections"] >= 2 and s["ws_authenticated"] == 1, timeout=5)
        reconnect_after = time.monotonic() - t_stall
        n_before = len(got)
        srv.resume()
        _wait(lambda: len(got) >= n_before + 5, 5, "bars after resume")
        runner.fast_stop()
        s = srv.stats()
    assert reconnect_after >= 0.5
    assert s["bars_dropped_stalled"] > 0
    seen = [b.timestamp for b in got]
    assert seen == sorted(set(seen))


def test_json_encoding_for_clients_that_do_not_ask_for_msgpack():
    """alpaca-py always asks for msgpack; this one check uses the plain
    `websockets` client to cover the JSON side of the protocol."""
    from websockets.sync.client import connect

    truth = make_bars(["AAPL"], 2, seed=5)
    with AlpacaFakeServer(truth, autostart="manual", auth_timeout=0.3) as srv:
        with connect(srv.stream_url("iex"), open_timeout=5, close_timeout=2) as ws:
            assert json.loads(ws.recv(timeout=5)) == [{"T": "success", "msg": "connected"}]
            ws.send(json.dumps({"action": "subscribe", "bars": ["AAPL"]}))
            assert json.loads(ws.recv(timeout=5))[0]["code"] == 401  # not authenticated
            ws.send(json.dumps({"action": "auth", "key": srv.key, "secret": srv.secret}))
            time.sleep(0.4)  # past auth_timeout: an authenticated socket is not timed out
            assert json.loads(ws.recv(timeout=5)) == [{"T": "success", "msg": "authenticated"}]
            ws.send(json.dumps({"action": "subscribe", "bars": ["AAPL"]}))
            ack = json.loads(ws.recv(timeout=5))[0]
            assert ack["T"] == "subscription" and ack["bars"] == ["AAPL"]
            srv.publish_next()
            bar = json.loads(ws.recv(timeout=5))[0]
        with connect(srv.stream_url("test"), open_timeout=5, close_timeout=2) as idle:
            idle.recv(timeout=5)  # connected; then never authenticates
            timeout_err = json.loads(idle.recv(timeout=5))[0]
    assert bar["t"] == "2024-01-02T14:30:00Z" and bar["c"] == truth["AAPL"][0].c
    assert (timeout_err["code"], timeout_err["msg"]) == (404, "auth timeout")


# ------------------------------------------------------ historical bars


def test_historical_bars_paginate_to_the_ground_truth():
    truth = make_bars(["AAPL", "MSFT", "SPY"], 40, seed=6)
    with AlpacaFakeServer(truth, max_page_size=7) as srv:
        start = truth["AAPL"][5].t
        end = truth["AAPL"][30].t
        req = StockBarsRequest(symbol_or_symbols=["AAPL", "MSFT", "SPY"],
                               timeframe=TimeFrame.Minute, start=start, end=end,
                               feed=DataFeed.IEX)
        barset = _hist(srv).get_stock_bars(req)
        pages = srv.stats()["rest_requests"]["GET /v2/stocks/bars"]
        raw = _hist(srv, raw_data=True).get_stock_bars(req)
        limited = _hist(srv).get_stock_bars(StockBarsRequest(
            symbol_or_symbols=["AAPL", "MSFT"], timeframe=TimeFrame.Minute, limit=45))
        queries = [e[2]["query"] for e in srv.events("rest")][:2]
    expected = {s: [b for b in seq if start <= b.t <= end] for s, seq in truth.items()}
    for s in expected:
        assert [_key(b) for b in barset.data[s]] == [_key(b) for b in expected[s]]
    n = sum(len(v) for v in expected.values())  # 3 * 26, both ends inclusive
    assert n == 78 and pages == math.ceil(n / 7)
    assert raw["MSFT"][0]["t"] == "2024-01-02T14:35:00Z" and len(raw["SPY"]) == 26
    # limit counts across symbols, in (symbol, time) order, as Alpaca's does
    assert len(limited.data["AAPL"]) == 40 and len(limited.data["MSFT"]) == 5
    # what alpaca-py actually sent
    q = queries[0]
    assert q["symbols"] == "AAPL,MSFT,SPY" and q["timeframe"] == "1Min" and q["feed"] == "iex"
    assert q["start"] == "2024-01-02T14:35:00+00:00" and q["limit"] == "10000"
    assert "page_token" not in q and "page_token" in queries[1]


def test_historical_serves_only_published_bars_when_asked():
    truth = make_bars(["AAPL"], 10, seed=7)
    with AlpacaFakeServer(truth, autostart="manual", rest_visibility="published") as srv:
        srv.publish_next(4)
        bars = _hist(srv).get_stock_bars(StockBarsRequest(
            symbol_or_symbols="AAPL", timeframe=TimeFrame.Minute)).data["AAPL"]
    assert [_key(b) for b in bars] == [_key(b) for b in truth["AAPL"][:4]]


def test_bad_keys_get_alpacas_401_on_rest():
    with AlpacaFakeServer(make_bars(["AAPL"], 3)) as srv:
        with pytest.raises(APIError) as hist_err:
            _hist(srv, secret_key="nope").get_stock_bars(StockBarsRequest(
                symbol_or_symbols="AAPL", timeframe=TimeFrame.Minute))
        with pytest.raises(APIError) as trade_err:
            _trading(srv, api_key="nobody").get_account()
        srv.reject_auth()  # revoked credentials
        with pytest.raises(APIError) as revoked:
            _trading(srv).get_account()
        assert srv.stats()["rest_auth_failures"] == 3
    for e in (hist_err.value, trade_err.value, revoked.value):
        assert e.status_code == 401
        assert e.code == 40110000 and e.message == "request is not authorized"


# --------------------------------------------------------------- trading


def test_market_orders_fill_at_the_configured_price_and_make_positions():
    with AlpacaFakeServer(fill_prices={"AAPL": 150.0}, cash=10_000) as srv:
        tc = _trading(srv)
        acct = tc.get_account()
        assert acct.status == "ACTIVE" and float(acct.cash) == 10_000
        assert float(acct.buying_power) == 10_000 and float(acct.equity) == 10_000

        o = tc.submit_order(MarketOrderRequest(symbol="AAPL", qty=10, side=OrderSide.BUY,
                                               time_in_force=TimeInForce.DAY,
                                               client_order_id="rt-0001"))
        assert o.status == OrderStatus.FILLED and o.client_order_id == "rt-0001"
        assert float(o.filled_avg_price) == 150 and float(o.filled_qty) == 10

        with pytest.raises(APIError) as dup:
            tc.submit_order(MarketOrderRequest(symbol="AAPL", qty=10, side=OrderSide.BUY,
                                               time_in_force=TimeInForce.DAY,
                                               client_order_id="rt-0001"))
        assert dup.value.status_code == 422
        assert dup.value.message == "client_order_id must be unique"

        assert tc.get_order_by_client_id("rt-0001").id == o.id
        assert tc.get_order_by_id(o.id).client_order_id == "rt-0001"

        srv.set_price("AAPL", 160.0)
        tc.submit_order(MarketOrderRequest(symbol="AAPL", qty=4, side=OrderSide.SELL,
                                           time_in_force=TimeInForce.DAY))
        (pos,) = tc.get_all_positions()
        assert pos.symbol == "AAPL" and float(pos.qty) == 6 and pos.side == "long"
        assert float(pos.avg_entry_price) == 150 and float(pos.market_value) == 960
        assert float(pos.unrealized_pl) == 60
        assert float(tc.get_open_position("AAPL").qty) == 6
        acct = tc.get_account()
        assert float(acct.cash) == 10_000 - 1500 + 640
        assert float(acct.equity) == float(acct.cash) + 960

        with pytest.raises(APIError) as no_bp:
            tc.submit_order(MarketOrderRequest(symbol="AAPL", qty=1000, side=OrderSide.BUY,
                                               time_in_force=TimeInForce.DAY))
        assert no_bp.value.status_code == 403 and no_bp.value.code == 40310000
        with pytest.raises(APIError) as no_qty:
            tc.submit_order(MarketOrderRequest(symbol="AAPL", qty=7, side=OrderSide.SELL,
                                               time_in_force=TimeInForce.DAY))
        assert no_qty.value.status_code == 403
        s = srv.stats()
    assert s["orders_created"] == 2 and s["orders_duplicate"] == 1 and s["orders_rejected"] == 3


def test_limit_orders_rest_open_and_cancel():
    with AlpacaFakeServer(fill_prices={"MSFT": 400.0}) as srv:
        tc = _trading(srv)
        o = tc.submit_order(LimitOrderRequest(symbol="MSFT", qty=2, side=OrderSide.BUY,
                                              time_in_force=TimeInForce.GTC, limit_price=390.0,
                                              client_order_id="rt-limit"))
        assert o.status == OrderStatus.NEW and float(o.limit_price) == 390
        assert [x.id for x in tc.get_orders()] == [o.id]  # default: open orders
        assert float(tc.get_account().buying_power) == 100_000 - 780  # reserved
        tc.cancel_order_by_id(o.id)
        assert tc.get_order_by_id(o.id).status == OrderStatus.CANCELED
        assert tc.get_orders() == []
        closed = tc.get_orders(GetOrdersRequest(status=QueryOrderStatus.CLOSED))
        assert [x.client_order_id for x in closed] == ["rt-limit"]
        with pytest.raises(APIError) as again:
            tc.cancel_order_by_id(o.id)
        assert again.value.status_code == 422
        # a limit that becomes marketable fills when the price gets there
        o2 = tc.submit_order(LimitOrderRequest(symbol="MSFT", qty=1, side=OrderSide.BUY,
                                               time_in_force=TimeInForce.DAY, limit_price=395.0))
        srv.set_price("MSFT", 394.0)
        o2 = tc.get_order_by_id(o2.id)
        assert o2.status == OrderStatus.FILLED and float(o2.filled_avg_price) == 394


def test_bracket_orders_are_recorded_and_their_exit_legs_work():
    with AlpacaFakeServer(fill_prices={"AAPL": 100.0}) as srv:
        tc = _trading(srv)
        o = tc.submit_order(MarketOrderRequest(
            symbol="AAPL", qty=10, side=OrderSide.BUY, time_in_force=TimeInForce.GTC,
            order_class=OrderClass.BRACKET, client_order_id="rt-bracket",
            take_profit=TakeProfitRequest(limit_price=110.0),
            stop_loss=StopLossRequest(stop_price=95.0)))
        assert o.order_class == OrderClass.BRACKET and o.status == OrderStatus.FILLED
        tp, sl = o.legs
        assert (tp.side, tp.type, float(tp.limit_price)) == (OrderSide.SELL, "limit", 110)
        assert (sl.side, sl.type, float(sl.stop_price)) == (OrderSide.SELL, "stop", 95)
        assert (tp.status, sl.status) == (OrderStatus.NEW, OrderStatus.HELD)
        assert tc.get_order_by_client_id("rt-bracket").legs[0].id == tp.id
        srv.set_price("AAPL", 111.0)  # take profit
        assert tc.get_order_by_id(tp.id).status == OrderStatus.FILLED
        assert tc.get_order_by_id(sl.id).status == OrderStatus.CANCELED
        assert tc.get_all_positions() == []
        assert float(tc.get_account().cash) == 100_000 + 110
        with pytest.raises(APIError) as bad:  # take profit below the stop
            tc.submit_order(MarketOrderRequest(
                symbol="AAPL", qty=1, side=OrderSide.BUY, time_in_force=TimeInForce.GTC,
                order_class=OrderClass.BRACKET, take_profit=TakeProfitRequest(limit_price=90.0),
                stop_loss=StopLossRequest(stop_price=95.0)))
        assert bad.value.status_code == 422


def test_a_response_lost_to_a_timeout_is_found_by_client_order_id_not_placed_twice():
    """alpaca-py sets no HTTP timeout; a caller that wants one has to put it on
    the client's requests session. When the answer to POST /v2/orders is late,
    the order may well exist: look it up by client_order_id before retrying."""
    with AlpacaFakeServer(fill_prices={"AAPL": 50.0}) as srv:
        tc = _trading(srv)
        tc._session.request = functools.partial(tc._session.request, timeout=0.5)
        srv.delay_order_responses(3.0)
        req = MarketOrderRequest(symbol="AAPL", qty=3, side=OrderSide.BUY,
                                 time_in_force=TimeInForce.DAY, client_order_id="rt-slow")
        t0 = time.monotonic()
        with pytest.raises(requests.exceptions.Timeout):
            tc.submit_order(req)
        assert time.monotonic() - t0 < 2.0
        found = tc.get_order_by_client_id("rt-slow")
        assert found.status == OrderStatus.FILLED
        with pytest.raises(APIError) as dup:  # a blind retry is refused, not doubled
            tc.submit_order(req)
        assert dup.value.status_code == 422
        assert float(tc.get_open_position("AAPL").qty) == 3
        assert srv.stats()["orders_created"] == 1
        with pytest.raises(APIError) as missing:
            tc.get_order_by_client_id("rt-never-sent")
        assert missing.value.status_code == 404


def test_injected_http_errors_reach_the_client_and_place_nothing():
    with AlpacaFakeServer(fill_prices={"AAPL": 50.0}) as srv:
        tc = _trading(srv)
        srv.fail_requests(500, count=1, path_prefix="/v2/orders", method="POST")
        req = MarketOrderRequest(symbol="AAPL", qty=1, side=OrderSide.BUY,
                                 time_in_force=TimeInForce.DAY, client_order_id="rt-500")
        with pytest.raises(APIError) as err:
            tc.submit_order(req)
        assert err.value.status_code == 500
        assert srv.stats()["orders_created"] == 0
        assert tc.submit_order(req).status == OrderStatus.FILLED


# -------------------------------------------------------------------- CLI


def test_command_line_entry_point_serves_and_stops_on_sigterm():
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "alpaca_server.py")
    proc = subprocess.Popen(
        [sys.executable, script, "--port", "0", "--symbols", "AAPL", "--n-bars", "3",
         "--max-seconds", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(15)
        assert line and line[0], "the server printed no address"
        info = json.loads(line[0])
        assert info["base_url"].startswith("http://127.0.0.1:")
        tc = TradingClient("test-key", "test-secret", paper=True, url_override=info["base_url"])
        assert tc.get_account().status == "ACTIVE"
        bars = StockHistoricalDataClient("test-key", "test-secret", url_override=info["base_url"]
                                         ).get_stock_bars(StockBarsRequest(
                                             symbol_or_symbols="AAPL", timeframe=TimeFrame.Minute))
        assert len(bars.data["AAPL"]) == 3
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
