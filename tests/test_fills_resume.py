"""Fills never stop silently: a SIGKILLed bar pump and a whole-system restart, on real Ray actors.

Each test starts the system's trading path the way ``raytrade.system`` does
(``start_feeds`` then ``start_accounts``: replay feed, router, risk manager,
paper broker, bar pump) in a namespace of its own, leaves an order pending,
kills, and waits (bounded) for that order's fill. The fill is known exactly:
the paper broker fills a market order at the open of the first bar after the
ledger's mark when it was placed (no slippage or commission here), and that
bar is in the generated history. "Within two bars" is measured from the
moment the new bar pump started (its ``health()["started_at"]``) to the fill's
own timestamp in the ledger.
"""

from __future__ import annotations

import os
import signal
import time

import pandas as pd
import pytest
import ray

from actors.accounts import ledger_clock, ledger_marks, start_accounts
from actors.broker import ledger_dir
from actors.feeds import _ReplaySource, resume_start
from actors.risk import open_account
from cluster.names import BAR_PUMP as PUMP_ACTOR
from cluster.settings import load_settings
from core.ledger import Ledger
from core.store import BarStore
from core.synthetic import generate_bars
from raytrade.system import start_feeds

SYMS = ["SPY", "QQQ"]
BAR_S = 1.0  # the embedded default's bar interval: "two bars" is 2 s
N_BARS = 600
WAIT_S = 30.0  # a stalled pump or a replay from the store's start gives no fill in this time


def _settings(tmp_path, namespace: str, **feeds) -> object:
    return load_settings(
        use_file=False,
        store={"uri": str(tmp_path / "store")},
        feeds={"symbols": SYMS, "sources": ["replay"], "bar_interval_s": BAR_S, **feeds},
        risk={"allowed_symbols": SYMS, "confidence_threshold": 0.0},
        broker={"ledger_dir": str(tmp_path / "ledger"), "slippage_bps": 0, "commission_per_share": 0,
                "commission_min": 0},
        ray={"namespace": namespace},
    )


def _history(settings) -> pd.DataFrame:
    bars = generate_bars(SYMS, N_BARS, seed=11)
    BarStore.from_settings(settings.store).append(bars)
    return bars


def _kill_namespace(namespace: str) -> None:
    """Ray's forced kill of every actor in ``namespace``: no cleanup runs, and Ray restarts none."""
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == namespace:
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=namespace), no_restart=True)
            except ValueError:
                pass


def _wait(what: str, ok, timeout: float = WAIT_S, every: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = ok()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _pause_and_settle(feed, settings) -> None:
    """Stop the replay and wait until the broker's ledger has marked the last bar it emitted."""
    ray.get(feed.pause.remote(True))
    emitted = ray.get(feed.since.remote(0))
    last = {b["symbol"]: b["ts"] for b in emitted}
    _wait("the broker marks the last emitted bars", lambda: ledger_marks(_ledger(settings)) == last)


def _order(risk, settings, decision_id: str) -> dict:
    """BUY 1 SPY at the ledger's last close, through the risk manager; it must be approved and pending."""
    marks = ledger_marks(_ledger(settings))
    price = _close_at(settings, "SPY", marks["SPY"])
    out = ray.get(risk.submit.remote({
        "account": "default", "symbol": "SPY", "side": "BUY", "quantity": 1, "confidence": 0.9, "price": price,
        "stop_loss": round(price * 0.97, 2), "take_profit": round(price * 1.1, 2), "decision_id": decision_id,
    }))
    assert out["verdict"]["approved"] and out["order"]["status"] == "pending", out
    return out["order"]


_HISTORY: dict[str, pd.DataFrame] = {}


def _close_at(settings, sym: str, ts: int) -> float:
    bars = _HISTORY[settings.store.uri]
    row = bars[(bars.symbol == sym) & (bars.ts.astype("int64") == ts)]
    return float(row["close"].iloc[0])


def _next_bar(settings, sym: str, after_ts: int) -> pd.Series:
    bars = _HISTORY[settings.store.uri]
    later = bars[(bars.symbol == sym) & (bars.ts.astype("int64") > after_ts)].sort_values("ts")
    return later.iloc[0]


def _ledger(settings):
    return ledger_dir(settings, "default") / "ledger.sqlite"


def _filled(broker, cid: str):
    o = ray.get(broker.order.remote(cid))
    return o if o is not None and o["status"] == "filled" else None


def test_a_sigkilled_bar_pump_resumes_by_itself_and_fills_within_two_bars(ray_session, tmp_path):
    ns = "raytrade-test-fills-pump"
    s = _settings(tmp_path, ns)
    _HISTORY[s.store.uri] = _history(s)
    try:
        feeds, router = start_feeds(s)
        start_accounts(s)
        risk, broker = open_account(s, "default")
        pump = ray.get_actor(PUMP_ACTOR, namespace=ns)
        _wait("bars reach the broker", lambda: ray.get(broker.health.remote())["bars_seen"] >= 2)
        feed = feeds["feed:replay"]
        _pause_and_settle(feed, s)
        order = _order(risk, s, "before-kill")
        before = ray.get(pump.health.remote())
        assert before["running"] and before["forwarded"] > 0 and before["errors"] == 0, before

        os.kill(before["pid"], signal.SIGKILL)
        t_kill = time.time()
        ray.get(feed.pause.remote(False))
        # Only the broker is asked from here on: nothing may call the pump to wake it.
        fill = _wait("a fill after the pump was SIGKILLed", lambda: _filled(broker, "before-kill"))
        t_seen = time.time()

        after = ray.get(pump.health.remote())
        assert after["pid"] != before["pid"] and after["running"], after
        assert (before["restarts"], after["restarts"]) == (0, 1), (before, after)  # Ray restarted it, once
        assert after["forwarded"] > 0 and after["last_forward_at"] >= after["started_at"]
        assert after["fills"] >= 1 and after["seconds_since_forward"] < 10 * BAR_S
        # The exact bar: the first after the mark the order was placed on, at its open.
        bar = _next_bar(s, "SPY", order["after_ts"])
        assert fill["fill_ts"] == bar.ts.value and fill["fill_price"] == pytest.approx(bar.open, abs=0.005)
        took = fill["filled_at"] - after["started_at"]
        print(f"\npump SIGKILL -> restarted pump up {after['started_at'] - t_kill:.2f} s; first fill "
              f"{fill['filled_at'] - t_kill:.2f} s after the kill, {took:.2f} s after the restart "
              f"(seen by the test at {t_seen - t_kill:.2f} s)")
        assert took <= 2 * BAR_S, f"the fill came {took:.2f} s after the pump restarted"
    finally:
        _kill_namespace(ns)


@pytest.mark.slow  # tens of seconds on 2 cores: left out of a bare `pytest`, run by `make test`
def test_after_a_whole_system_kill_the_replay_resumes_from_the_ledgers_clock(ray_session, tmp_path):
    ns = "raytrade-test-fills-system"
    s1 = _settings(tmp_path, ns)
    history = _history(s1)
    _HISTORY[s1.store.uri] = history
    spy = history[history.symbol == "SPY"].sort_values("ts")
    # First run: from bar 300 of the 600 stored.
    s1 = _settings(tmp_path, ns, replay_start=str(spy.ts.iloc[300]))
    try:
        feeds, _ = start_feeds(s1)
        start_accounts(s1)
        risk, broker = open_account(s1, "default")
        _wait("bars reach the broker", lambda: ray.get(broker.health.remote())["bars_seen"] >= 4)
        _pause_and_settle(feeds["feed:replay"], s1)
        order = _order(risk, s1, "pending-at-kill")
    finally:
        _kill_namespace(ns)
    clock = ledger_clock(s1)
    assert clock["SPY"] >= spy.ts.iloc[301].value and order["after_ts"] == clock["SPY"], (clock, order)

    # Second run on the same ledger, configured to replay from the store's start: 300 bars behind.
    s2 = _settings(tmp_path, ns)
    assert s2.feeds.replay_start is None
    try:
        _, router = start_feeds(s2)
        start_accounts(s2)
        t_up = time.time()
        _, broker = open_account(s2, "default")
        pump = ray.get_actor(PUMP_ACTOR, namespace=ns)
        fill = _wait("a fill after the whole-system restart", lambda: _filled(broker, "pending-at-kill"))
        first = ray.get(router.since.remote(0))
        for sym in SYMS:
            ts = [b["ts"] for b in first if b["symbol"] == sym]
            assert ts and ts[0] == _next_bar(s2, sym, clock[sym]).ts.value, (sym, ts[:3], clock[sym])
        bar = _next_bar(s2, "SPY", clock["SPY"])
        assert fill["fill_ts"] == bar.ts.value and fill["fill_price"] == pytest.approx(bar.open, abs=0.005)
        took = fill["filled_at"] - ray.get(pump.health.remote())["started_at"]
        print(f"\nwhole-system restart: fill {took:.2f} s after the new pump started, "
              f"{fill['filled_at'] - t_up:+.2f} s from start_accounts' return")
        assert took <= 2 * BAR_S, f"the fill came {took:.2f} s after the restart"
    finally:
        _kill_namespace(ns)


# -- the parts, without Ray ---------------------------------------------------------------


def test_resume_start_is_just_after_each_symbols_mark_and_never_before_replay_start(tmp_path):
    s = _settings(tmp_path, "unused")
    assert resume_start(s, {}) is None
    t = pd.Timestamp("2024-01-02 15:00", tz="UTC")
    out = resume_start(s, {"SPY": t.value, "QQQ": t.value - 60_000_000_000})
    assert out == {"SPY": t + pd.Timedelta(1, "ns"), "QQQ": t - pd.Timedelta(60, "s") + pd.Timedelta(1, "ns")}
    only_spy = resume_start(s, {"SPY": t.value, "GONE": (t - pd.Timedelta(1, "D")).value})
    assert only_spy == {"SPY": t + pd.Timedelta(1, "ns"), "QQQ": t + pd.Timedelta(1, "ns")}  # the latest mark
    later = _settings(tmp_path, "unused", replay_start="2024-01-03")
    assert resume_start(later, {"SPY": t.value}) == {s: pd.Timestamp("2024-01-03", tz="UTC") for s in SYMS}


def test_replay_from_a_start_per_symbol_and_past_the_stored_history(tmp_path):
    s = _settings(tmp_path, "unused")
    bars = _history(s)
    store = BarStore.from_settings(s.store)
    spy = bars[bars.symbol == "SPY"].sort_values("ts")
    qqq = bars[bars.symbol == "QQQ"].sort_values("ts")
    src = _ReplaySource(store, SYMS, {"SPY": spy.ts.iloc[10] + pd.Timedelta(1, "ns"),
                                      "QQQ": qqq.ts.iloc[8] + pd.Timedelta(1, "ns")})
    first = [src.next_bars() for _ in range(3)]
    # QQQ from its bar 9, SPY from its bar 11: QQQ alone for two timestamps, then both.
    assert [sorted(g.symbol) for g in first] == [["QQQ"], ["QQQ"], ["QQQ", "SPY"]]
    assert first[0].ts.iloc[0] == qqq.ts.iloc[9] and first[2].ts.iloc[0] == spy.ts.iloc[11]
    done = _ReplaySource(store, SYMS, bars.ts.max() + pd.Timedelta(1, "ns"))
    assert done.next_bars() is None  # the ledger is past the history: nothing to replay, no error
    empty = BarStore.from_settings(_settings(tmp_path / "other", "unused").store)
    with pytest.raises(ValueError, match="no bars"):
        _ReplaySource(empty, SYMS, None)


def test_ledger_marks_read_only_and_missing(tmp_path):
    path = tmp_path / "a" / "ledger.sqlite"
    assert ledger_marks(path) == {} and not path.exists()  # never creates a ledger
    writer = Ledger(path, 1000.0)
    writer.mark("SPY", 100.0, 5)
    writer.mark("SPY", 101.0, 7)
    writer.mark("QQQ", 50.0, 6)
    assert ledger_marks(path) == {"SPY": 7, "QQQ": 6}  # while the writer holds it open (WAL)
    writer.mark("SPY", 102.0, 9)
    assert ledger_marks(path)["SPY"] == 9
    writer.close()


def test_a_first_start_replays_after_the_warm_bars_so_windows_start_full(tmp_path):
    from actors.feeds import warm_start

    s = load_settings(use_file=False, store={"uri": str(tmp_path / "store")}, feeds={"symbols": ["AAA", "BBB"]})
    store = BarStore.from_settings(s.store)
    store.append(generate_bars(["AAA"], 600, seed=1, start="2024-01-02 14:30"))
    store.append(generate_bars(["BBB"], 600, seed=2, start="2024-01-02 14:35"))  # starts 5 bars later
    start = warm_start(s, store)
    # One time for both: after BBB's first 256 bars (the later of the two), so each has at least 256 before it.
    assert start == store.read("BBB")["ts"].iloc[256]
    assert all((store.read(sym)["ts"] < start).sum() >= s.feeds.warm_bars for sym in ("AAA", "BBB"))
    assert warm_start(s.model_copy(update={"feeds": s.feeds.model_copy(update={"warm_bars": 600})}), store) is None
    assert warm_start(s.model_copy(update={"feeds": s.feeds.model_copy(update={"replay_start": "2024-01-02"})}),
                      store) is None
