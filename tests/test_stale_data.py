"""Stale data never trades (issue 19's guard): with every feed stopped, decisions HOLD and say why.

On the session's running system (``trading_app``: bars every 0.2 s, so the
stale limit is ``serve.min_stale_s``, 5 s): both feeds are paused, and past
the limit an executed decision and the signal route are HOLD with the bar's
age as the reason, no order is placed, and one alert is raised for the
episode. Once the feeds resume, decisions are made on fresh bars again.
"""

from __future__ import annotations

import time

import httpx
import ray

from cluster import names
from core.decision import stale_limit_s
from tests.test_serve_app import wait_for_200


def _feeds(settings):
    return [ray.get_actor(names.feed(s), namespace=settings.ray.namespace) for s in settings.feeds.sources]


def test_decisions_on_stale_bars_hold_with_the_reason_and_place_nothing(trading_app):
    settings, keys = trading_app["settings"], trading_app["keys"]
    limit = stale_limit_s(settings.serve.max_bar_age, settings.feeds.bar_interval_s, settings.serve.min_stale_s)
    client = httpx.Client(base_url=trading_app["url"], timeout=60)
    read, trade = {"X-API-Key": keys["read"]}, {"X-API-Key": keys["trade"]}
    wait_for_200(lambda: client.get("/v1/signal/SPY", headers=read))
    feeds = _feeds(settings)
    try:
        ray.get([f.pause.remote(True) for f in feeds], timeout=30)
        time.sleep(limit + 1.5)
        orders_before = len(client.get("/v1/orders", headers=read).json()["orders"])
        decisions = []
        for _ in range(3):  # bounded: three executed decisions and a signal, all on the stale bar
            r = client.post("/v1/decisions", headers=trade, json={"symbol": "SPY", "execute": True})
            assert r.status_code == 200, r.text
            decisions.append(r.json())
        sig = client.get("/v1/signal/SPY", headers=read).json()
        for d in [*decisions, sig]:
            assert d["action"] == "HOLD" and not d["executed"] and d["order"] is None
            assert d["reason"].startswith("stale data: last bar ") and d["reason"].endswith(" s ago")
            age = float(d["reason"].split("last bar ")[1].split(" s")[0])
            assert age > limit
        assert len(client.get("/v1/orders", headers=read).json()["orders"]) == orders_before
        alerts = client.get("/health/alerts", headers=read, params={"limit": 200}).json()["alerts"]
        stale = [a for a in alerts if "stale data: SPY" in a["message"]]
        assert len(stale) == 1, stale  # one alert for the episode, not one per decision
    finally:
        ray.get([f.pause.remote(False) for f in feeds], timeout=30)
    deadline = time.time() + 60
    while time.time() < deadline:  # bounded: fresh bars bring decisions back
        d = client.post("/v1/decisions", headers=trade, json={"symbol": "SPY", "execute": False}).json()
        if not (d.get("reason") or "").startswith("stale data"):
            break
        time.sleep(0.5)
    assert not (d.get("reason") or "").startswith("stale data"), d
    client.close()
