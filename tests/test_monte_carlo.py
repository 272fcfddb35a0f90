"""Monte Carlo against closed forms: the bootstrap keeps the mean, a GBM's log terminal wealth is
normal with known moments, resampled returns never take equity below zero."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray import cloudpickle

from core.strategies import get_strategy, model_strategy
from core.synthetic import generate_bars
from tune.monte_carlo import block_bootstrap, bootstrap_trades, gbm_closes, monte_carlo, path_stats
from tune.walk_forward import Costs

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trials run in workers that cannot import tests/


def test_block_bootstrap_keeps_order_inside_blocks():
    returns = np.arange(100) / 1000.0  # each value names its own position
    rng = np.random.default_rng(0)
    paths = block_bootstrap(returns, n_paths=50, horizon=95, block=10, rng=rng)
    assert paths.shape == (50, 95)
    pos = np.rint(paths * 1000).astype(int)
    blocks = pos[:, :90].reshape(50, 9, 10)
    assert (np.diff(blocks, axis=2) == 1).all()  # consecutive bars inside every block
    # Across block boundaries the order is broken somewhere (the draw is not the series itself).
    assert (np.diff(pos, axis=1) != 1).any()


def test_iid_bootstrap_keeps_the_mean_and_the_expected_terminal_wealth():
    rng = np.random.default_rng(1)
    returns = rng.normal(0.001, 0.02, 400)
    H, N = 250, 4000
    paths = block_bootstrap(returns, N, H, block=1, rng=np.random.default_rng(2))
    per_path_mean = paths.mean(axis=1)
    se = returns.std() / np.sqrt(H * N)
    assert abs(per_path_mean.mean() - returns.mean()) < 4 * se
    # Each draw is independent with E[1 + r*] = 1 + mean(r), so E[W_H] = (1 + mean r)^H exactly.
    wealth = np.prod(1 + paths, axis=1)
    assert abs(wealth.mean() - (1 + returns.mean()) ** H) < 4 * wealth.std() / np.sqrt(N)


def test_resampling_returns_keeps_equity_positive_where_pnl_would_not():
    # As currency on a 100 account, a few of these trades (-50, +30, -60, +80) in a row take it below
    # zero; as returns they compound and the account never goes under.
    trade_returns = np.array([-0.5, 0.3, -0.6, 0.8])
    draws = np.random.default_rng(3).integers(0, 4, size=(2000, 30))
    assert (np.cumsum(100 * trade_returns[draws], axis=1) < -100).any()
    r = bootstrap_trades(trade_returns, n_paths=2000, n_trades=30, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(r, trade_returns[draws])  # the same draws, resampled as returns
    equity = np.cumprod(1 + r, axis=1)
    assert (equity > 0).all()
    stats = path_stats(equity, periods_per_year=30, alpha=0.05, ruin=0.5)
    assert (stats["max_drawdown"] < 1).all() and stats["max_drawdown"].max() > 0.99
    assert stats["ruined"].mean() > 0.5
    # A short that lost more than the account is floored at -100%: ruin, equity exactly 0, drawdown exactly 1.
    r = bootstrap_trades(np.array([-1.5]), 1, 3, np.random.default_rng(0))
    equity = np.cumprod(1 + r, axis=1)
    stats = path_stats(equity, 30, 0.05, 0.5)
    assert equity[0, -1] == 0.0 and stats["max_drawdown"][0] == 1.0 and stats["ruined"][0]


def test_probabilities_of_loss_and_ruin_against_the_eight_paths_by_hand():
    """Trades of -50% or +50%, equally likely, three per path, ruin at half the cash. Of the 8 paths,
    5 touch 0.5 (every path that starts with a loss, and + - -) and 4 end below 1 (+ - -, - + -,
    - - +, - - -); E[terminal wealth] = 1.0^3."""
    from tune.monte_carlo import MethodResult

    N = 8000
    r = bootstrap_trades(np.array([-0.5, 0.5]), N, 3, np.random.default_rng(9))
    stats = path_stats(np.cumprod(1 + r, axis=1), periods_per_year=3, alpha=0.05, ruin=0.5)
    m = MethodResult("trades", stats, stats["ruined"], np.ones((1, 1)), np.zeros(1), "trade")
    assert abs(m.prob_ruin - 5 / 8) < 4 * np.sqrt(5 / 8 * 3 / 8 / N)
    assert abs(m.prob_loss - 4 / 8) < 4 * np.sqrt(0.25 / N)
    w = stats["terminal_wealth"]
    assert abs(w.mean() - 1.0) < 4 * w.std() / np.sqrt(N)


def gbm_frame(n: int, mu: float, sigma: float, seed: int) -> pd.DataFrame:
    close = gbm_closes(100.0, mu, sigma, 1, n, np.random.default_rng(seed))[0]
    open_ = np.concatenate([[close[0]], close[:-1]])
    return pd.DataFrame({"symbol": "GBM", "ts": pd.date_range("2020-01-01", periods=n, freq="D", tz="UTC"),
                         "open": open_, "high": np.maximum(open_, close), "low": np.minimum(open_, close),
                         "close": close, "volume": 1.0})


def test_gbm_terminal_wealth_and_the_bootstrap_mean_through_tune(ray_session, tmp_path):
    """Buy and hold on GBM paths, run through the engine inside Tune trials: log terminal wealth has
    mean (mu - sigma^2/2)(H-1) and variance sigma^2 (H-1); the i.i.d. block bootstrap's mean wealth is
    (1 + mean return)^H; the trade bootstrap is skipped, with the reason, since holding closes no trade."""
    mu, sigma, H, N = 0.0004, 0.01, 253, 2000
    hold = model_strategy("hold", lambda bars: np.ones(len(bars)))
    bars = gbm_frame(H, mu, sigma, seed=8)
    mc = monte_carlo(bars, hold, {}, n_paths=N, paths_per_trial=1000, block=1, generator="gbm", mu=mu, sigma=sigma,
                     costs=Costs(fill="close"), storage_path=str(tmp_path), name="gbm", seed=1)
    assert mc.skipped == {"trades": "the backtest closed 0 trade(s); the trade bootstrap needs at least 2"}
    assert set(mc.methods) == {"blocks", "synthetic"} and mc.n_trials == 4

    logw = np.log(mc.methods["synthetic"].stats["terminal_wealth"])
    steps = H - 1  # bought at bar 0's close, held to bar H-1's
    mean, var = (mu - sigma**2 / 2) * steps, sigma**2 * steps
    assert len(logw) == N
    assert abs(logw.mean() - mean) < 4 * np.sqrt(var / N)
    assert abs(logw.var(ddof=1) - var) < 4 * var * np.sqrt(2 / (N - 1))

    base_r = np.concatenate([[bars.close.iloc[0] / bars.close.iloc[0]], bars.close.to_numpy()[1:] / bars.close.to_numpy()[:-1]]) - 1
    w = mc.methods["blocks"].stats["terminal_wealth"]
    expected = np.prod(1 + np.full(H, np.mean(base_r)))
    assert abs(w.mean() - expected) < 4 * w.std() / np.sqrt(N)
    assert Path(mc.experiment_path).is_relative_to(tmp_path)
    assert len(list(Path(mc.experiment_path).glob("*/result.json"))) == 4


def test_a_rule_strategy_under_all_three_methods(ray_session, tmp_path):
    bars = generate_bars(["X"], 800, seed=2, interval="1D")
    mc = monte_carlo(bars, "sma_crossover", {"fast": 10, "slow": 30}, n_paths=120, paths_per_trial=60,
                     horizon=300, costs=Costs(commission=0.001), storage_path=str(tmp_path), name="rule", seed=3)
    assert mc.skipped == {} and mc.n_trials == 6
    n_closed = int((mc.base_metrics["n_trades"]))  # the open trade is not resampled
    for name, m in mc.methods.items():
        w = m.stats["terminal_wealth"]
        assert len(w) == 120 and (w > 0).all(), name
        assert ((m.stats["max_drawdown"] >= 0) & (m.stats["max_drawdown"] < 1)).all(), name
        assert m.prob_loss == np.mean(w < 1) and 0 <= m.prob_ruin <= 1
        assert (np.diff(m.fan, axis=0) >= 0).all() and np.allclose(m.fan[:, 0], 1.0), name  # p5 <= ... <= p95
        expected_steps = round(n_closed * 300 / 800) if name == "trades" else 300  # trades made in 300 bars
        assert m.fan_x[-1] == expected_steps, name
    # Paths differ between methods and seeds are per (method, chunk): the two chunks are not copies.
    w = mc.methods["blocks"].stats["terminal_wealth"]
    assert not np.array_equal(w[:60], w[60:])
    table = mc.table()
    assert list(table.method) == ["trades", "blocks", "synthetic"]
    assert (table.wealth_p5 <= table.wealth_p50).all() and (table.wealth_p50 <= table.wealth_p95).all()


def test_bad_monte_carlo_input_is_refused():
    bars = generate_bars(["X"], 300, seed=2, interval="1D")
    with pytest.raises(ValueError, match="methods"):
        monte_carlo(bars, "sma_crossover", {"fast": 10, "slow": 30}, methods=("jackknife",))
    with pytest.raises(ValueError, match="ruin"):
        monte_carlo(bars, "sma_crossover", {"fast": 10, "slow": 30}, ruin=1.5)


def _synthetic_inputs():
    from tune.monte_carlo import _inputs

    bars = generate_bars(["X"], 300, seed=12, interval="1D")
    inputs, _, _ = _inputs(bars, get_strategy("sma_crossover"), {"fast": 5, "slow": 20}, Costs(commission=0.001),
                           block=5, horizon=200, generator="gbm", mu=None, sigma=None, periods_per_year=252,
                           alpha=0.05)
    return inputs


def test_synthetic_paths_give_the_same_equity_on_the_torch_engine():
    """The branch a trial holding a GPU takes (torch, all paths at once), run here on the CPU: the same
    curves as the compiled engine. Without a GPU given by Ray, the compiled engine is chosen."""
    from tune.monte_carlo import engine_device, simulate

    inputs = _synthetic_inputs()
    compiled = simulate("synthetic", 32, np.random.default_rng(1), inputs=inputs)
    on_torch = simulate("synthetic", 32, np.random.default_rng(1), inputs={**inputs, "device": "cpu"})
    assert compiled.shape == (32, 200) and np.ptp(compiled[:, -1]) > 0
    np.testing.assert_allclose(on_torch, compiled, rtol=1e-9)
    assert engine_device() is None  # this process was given no GPU by Ray


def test_the_engine_follows_the_gpu_ray_gave_the_trial(monkeypatch):
    """CUDA only when Ray assigned this process a GPU and CUDA works; a request wins over both."""
    import ray
    import torch

    from tune.monte_carlo import engine_device

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_device() is None  # a GPU on the machine, but not this trial's
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    assert engine_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_device() is None  # assigned, but CUDA does not work here
    assert engine_device("cpu") == "cpu"


@pytest.mark.gpu
def test_synthetic_paths_on_cuda_match_the_compiled_engine():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from tune.monte_carlo import simulate

    inputs = _synthetic_inputs()
    compiled = simulate("synthetic", 256, np.random.default_rng(2), inputs=inputs)
    on_gpu = simulate("synthetic", 256, np.random.default_rng(2), inputs={**inputs, "device": "cuda"})
    np.testing.assert_allclose(on_gpu, compiled, rtol=1e-9)
