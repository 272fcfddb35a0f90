"""The Alpaca broker against the local Alpaca server (tests/support/alpaca_server.py) on 127.0.0.1.

alpaca-py's real TradingClient talks to a real HTTP server: bracket orders,
client order ids, a response lost to a timeout after the order was accepted
(the retry finds it by client order id and never places it twice), and wrong
keys (one clear error, no secret in it, no retry storm).
"""

from __future__ import annotations

import time

import pytest

from core.risk import sign_order
from tests.support.alpaca_server import AlpacaFakeServer, make_bars

KEY = b"k" * 32


def signed(cid, side, qty, sym="AAPL", **kw):
    order = {"client_order_id": cid, "account": "alp", "symbol": sym, "side": side, "qty": float(qty), **kw}
    return order, sign_order(KEY, order, 60)


@pytest.fixture
def server():
    with AlpacaFakeServer(make_bars(["AAPL"], 5), interval=None, autostart="manual",
                          fill_prices={"AAPL": 100.0}) as srv:
        yield srv


def make_broker(make_settings, tmp_path, srv, secret=None, ledger="ledgers"):
    from actors.broker import AlpacaAccount

    s = make_settings(
        alpaca={"api_key": srv.key, "secret_key": secret or srv.secret, "trading_url": srv.base_url},
        broker={"ledger_dir": str(tmp_path / ledger), "http_timeout_s": 0.5},
        resilience={"retry_attempts": 3, "retry_base_delay_s": 0.05, "retry_max_delay_s": 0.2},
        accounts={"alp": {"kind": "alpaca"}},
    )
    return AlpacaAccount("alp", s, KEY)


def test_bracket_order_with_client_order_id_and_fills_in_the_ledger(server, make_settings, tmp_path):
    b = make_broker(make_settings, tmp_path, server)
    assert b.paper
    o = b.place(*signed("dec-1", "BUY", 10, stop_loss=95.0, take_profit=110.0, members={"sma": 1.0}))
    assert (o["client_order_id"], o["status"], o["fill_price"], o["order_class"]) == ("dec-1", "filled", 100.0, "bracket")
    assert [(leg["type"], leg["limit_price"] or leg["stop_price"]) for leg in o["legs"]] == [("limit", 110.0), ("stop", 95.0)]
    assert b.positions()[0]["qty"] == 10 and b.account()["equity"] == 100_000
    # the take-profit leg fills when the price gets there; the ledger learns of it on refresh
    server.set_price("AAPL", 110.0)
    b.orders(10)
    a = b.analytics(1)
    assert (a["trades"], a["total_pnl"], a["pnl_by_member"]) == (1, 100.0, {"sma": 100.0})
    assert server.stats()["orders_created"] == 1


def test_timeout_after_accept_is_found_by_client_order_id_not_placed_twice(server, make_settings, tmp_path):
    b = make_broker(make_settings, tmp_path, server)
    server.delay_order_responses(3.0)  # booked at once, answered after the client's 0.5 s timeout
    t0 = time.monotonic()
    o = b.place(*signed("slow-1", "BUY", 7))
    assert time.monotonic() - t0 < 2.5  # found by lookup, not by waiting out the response
    assert o["client_order_id"] == "slow-1" and o["status"] == "filled"
    assert server.stats()["orders_created"] == 1 and b.submit_attempts == 1
    assert server.stats()["rest_requests"].get("GET /v2/orders:by_client_order_id", 0) >= 1
    # a caller retrying the same decision gets the same order
    assert b.place(*signed("slow-1", "BUY", 7))["broker_order_id"] == o["broker_order_id"]
    # a broker that lost its ledger (a fresh one) is told "duplicate" by Alpaca and finds the order
    fresh = make_broker(make_settings, tmp_path, server, ledger="other")
    assert fresh.place(*signed("slow-1", "BUY", 7))["broker_order_id"] == o["broker_order_id"]
    s = server.stats()
    assert s["orders_created"] == 1 and s["orders_duplicate"] == 1
    assert [x["client_order_id"] for x in server.orders()] == ["slow-1"]


def test_rejected_order_is_one_clear_error_without_retries(server, make_settings, tmp_path):
    from actors.broker import OrderRejected

    b = make_broker(make_settings, tmp_path, server)
    with pytest.raises(OrderRejected, match="insufficient buying power"):
        b.place(*signed("big", "BUY", 5000))
    assert server.stats()["rest_requests"]["POST /v2/orders"] == 1


def test_server_errors_are_retried_behind_the_breaker(server, make_settings, tmp_path):
    b = make_broker(make_settings, tmp_path, server)
    server.fail_requests(500, count=1, path_prefix="/v2/orders", method="POST")
    o = b.place(*signed("retry-1", "BUY", 1))
    assert o["status"] == "filled" and server.stats()["orders_created"] == 1
    assert b.rest.breaker.snapshot()["total_failures"] == 1


def test_wrong_keys_one_clear_error_and_no_secret(server, make_settings, tmp_path):
    from actors.broker import AlpacaAuthError

    wrong = "wrong-secret-value-123"
    b = make_broker(make_settings, tmp_path, server, secret=wrong)
    with pytest.raises(AlpacaAuthError) as e:
        b.place(*signed("k-1", "BUY", 1))
    msg = str(e.value)
    assert "check alpaca.api_key / alpaca.secret_key" in msg and "HTTP 401" in msg
    assert wrong not in msg and server.secret not in msg
    with pytest.raises(AlpacaAuthError):
        b.account()  # remembered: no second round of requests
    assert server.stats()["rest_auth_failures"] == 1
    assert wrong not in str(b.health()) and b.health()["ok"] is False


def test_alpaca_broker_actor_via_risk_manager(ray_session, server, make_settings, tmp_path):
    """The whole path on Ray: risk manager judges and signs, Alpaca broker places, over HTTP."""
    import ray

    from actors.risk import open_account

    s = make_settings(
        alpaca={"api_key": server.key, "secret_key": server.secret, "trading_url": server.base_url},
        broker={"ledger_dir": str(tmp_path / "ledgers"), "http_timeout_s": 2.0},
        accounts={"alp": {"kind": "alpaca"}},
    )
    risk, broker = open_account(s, "alp", detached=False)
    try:
        req = {"account": "alp", "symbol": "AAPL", "side": "BUY", "target_position": 1.0, "confidence": 0.8,
               "price": 100.0, "atr": 10.0, "decision_id": "live-1"}
        out = ray.get(risk.submit.remote(req))
        assert out["verdict"]["quantity"] == 40 and out["order"]["status"] == "filled", out
        assert ray.get(risk.submit.remote(req))["order"]["broker_order_id"] == out["order"]["broker_order_id"]
        assert server.stats()["orders_created"] == 1
        legs = {leg["type"]: leg for leg in out["order"]["legs"]}
        assert legs["stop"]["stop_price"] == 80.0 and legs["limit"]["limit_price"] == 140.0
        assert ray.get(risk.state.remote())["positions"]["AAPL"]["qty"] == 40
    finally:
        ray.kill(risk, no_restart=True)
        ray.kill(broker, no_restart=True)
