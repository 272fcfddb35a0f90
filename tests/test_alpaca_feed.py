"""The Alpaca feed actor: the real alpaca-py client against a local Alpaca server on 127.0.0.1.

A cut connection is reconnected by alpaca-py and the bars missed meanwhile
are backfilled over REST, so the consumer's sequence is complete; wrong keys
give one clear error and one connection attempt, not a retry storm.
"""

from __future__ import annotations

import time

import pytest
import ray

from cluster.runtime import actor_options
from cluster.settings import load_settings

from tests.support.alpaca_server import AlpacaFakeServer, make_bars

SYMS = ["AAPL", "MSFT"]


def _settings(tmp_path, srv, secret=None):
    return load_settings(
        use_file=False,
        store={"uri": str(tmp_path / "store")},
        alpaca={"api_key": srv.key, "secret_key": secret or srv.secret, "feed": "iex",
                "data_stream_url": srv.stream_url("iex"), "data_rest_url": srv.base_url, "bar_seconds": 60},
        resilience={"retry_base_delay_s": 0.05},
    )


def _truth(srv, sym):
    import pandas as pd

    return [(int(pd.Timestamp(b.t).value), b.c) for b in srv.ground_truth[sym]]


def test_cut_mid_stream_reconnects_and_backfills(ray_session, tmp_path):
    from actors.alpaca_feed import AlpacaFeedActor

    n = 40
    with AlpacaFakeServer(make_bars(SYMS, n, seed=3), interval=0.15) as srv:
        s = _settings(tmp_path, srv)
        feed = AlpacaFeedActor.options(**actor_options("feed", s, "feed:alpaca-cut", detached=False)).remote(
            "feed:alpaca-cut", SYMS, s
        )
        ray.get(feed.start.remote())
        got: list[dict] = []
        cut = False
        deadline = time.time() + 60
        while len(got) < n * len(SYMS) and time.time() < deadline:
            got += ray.get(feed.since.remote(got[-1]["seq"] if got else 0))
            if not cut and len(got) >= 16:
                srv.cut_connections(abrupt=True)
                cut = True
            time.sleep(0.05)
        stats = srv.stats()
        health = ray.get(feed.health.remote())
        ray.get(feed.stop.remote())
        ray.kill(feed)
    assert cut
    for sym in SYMS:
        seen = [(b["ts"], b["close"]) for b in got if b["symbol"] == sym]
        assert seen == _truth(srv, sym), sym
    assert stats["ws_connections"] >= 2  # it reconnected
    assert health["backfilled"] > 0  # and filled the gap over REST
    assert health["last_error"] is None


def test_wrong_keys_one_clear_error_no_retry_storm(ray_session, tmp_path):
    from actors.alpaca_feed import AlpacaFeedActor

    wrong = "definitely-not-the-secret"
    with AlpacaFakeServer(make_bars(SYMS, 10, seed=1), interval=0.1) as srv:
        s = _settings(tmp_path, srv, secret=wrong)
        feed = AlpacaFeedActor.options(**actor_options("feed", s, "feed:alpaca-badkey", detached=False)).remote(
            "feed:alpaca-badkey", SYMS, s
        )
        ray.get(feed.start.remote())
        deadline = time.time() + 20
        health = ray.get(feed.health.remote())
        while not health["auth_failed"] and time.time() < deadline:
            time.sleep(0.1)
            health = ray.get(feed.health.remote())
        time.sleep(2.5)  # longer than alpaca-py's first backoffs: nobody comes back
        stats = srv.stats()
        ray.kill(feed)
    assert health["auth_failed"]
    assert "check alpaca.api_key / alpaca.secret_key" in health["last_error"]
    assert wrong not in str(health) and srv.key not in str(health)
    assert stats["ws_connections"] == 1 and stats["auth_failures"] == 1
    assert health["emitted"] == 0


def test_router_over_alpaca_and_replay(ray_session, tmp_path):
    """Alpaca as the primary, a replay of the same bars as backup: the router fails over when Alpaca is cut off for good."""
    import pandas as pd

    from actors.alpaca_feed import AlpacaFeedActor
    from actors.feeds import FeedActor
    from actors.router import FeedRouter
    from core.store import BarStore

    n = 40
    bars = make_bars(SYMS, n, seed=5)
    with AlpacaFakeServer(bars, interval=0.15) as srv:
        s = load_settings(
            use_file=False, store={"uri": str(tmp_path / "store")},
            alpaca={"api_key": srv.key, "secret_key": srv.secret, "data_stream_url": srv.stream_url("iex"),
                    "data_rest_url": srv.base_url},
            feeds={"symbols": SYMS, "bar_interval_s": 0.15, "stall_intervals": 3},
        )
        rows = [{"symbol": sym, "ts": b.t, "open": b.o, "high": b.h, "low": b.l, "close": b.c, "volume": b.v,
                 "source": "x", "seq": i} for sym in SYMS for i, b in enumerate(srv.ground_truth[sym])]
        BarStore.from_settings(s.store).append(pd.DataFrame(rows))
        names = ["feed:rt-alpaca", "feed:rt-replay"]
        alp = AlpacaFeedActor.options(**actor_options("feed", s, names[0], detached=False)).remote(names[0], SYMS, s)
        rep = FeedActor.options(**actor_options("feed", s, names[1], detached=False)).remote(names[1], "replay", SYMS, s)
        router = FeedRouter.options(**actor_options("feed_router", s, "router:rt-alpaca", detached=False)).remote(
            "rt-alpaca", names, SYMS, s, False
        )
        ray.get([alp.start.remote(), rep.start.remote(), router.start.remote()])
        got: list[dict] = []
        deadline = time.time() + 60
        killed = False
        while len(got) < n * len(SYMS) and time.time() < deadline:
            got += ray.get(router.since.remote(got[-1]["seq"] if got else 0))
            if not killed and len(got) >= 20:
                ray.kill(alp, no_restart=True)
                killed = True
            time.sleep(0.05)
        h = ray.get(router.health.remote())
        for a in (rep, router):
            ray.kill(a)
    for sym in SYMS:
        seen = [(b["ts"], b["close"]) for b in got if b["symbol"] == sym]
        assert seen == _truth(srv, sym), sym
    assert any(e["kind"] == "failover" and e["from"] == names[0] for e in h["events"])
