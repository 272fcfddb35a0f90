"""Walk-forward: folds, a best parameter known by construction, and no look-ahead.

The Tune experiments here are tiny (a handful of folds, one trial each) and
share the session's Ray (``ray_session``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray import cloudpickle

from core.strategies import Strategy, get_strategy, grid_table, model_strategy
from core.synthetic import generate_bars
from tune.walk_forward import (
    Costs,
    in_sample,
    make_folds,
    out_of_sample,
    stitched,
    walk_forward,
)


def frame(close: np.ndarray, start: str = "2020-01-01") -> pd.DataFrame:
    """Bars whose open is the previous close: a next-open fill trades at the last close."""
    open_ = np.concatenate([[close[0]], close[:-1]])
    return pd.DataFrame({
        "symbol": "TEST", "ts": pd.date_range(start, periods=len(close), freq="D", tz="UTC"),
        "open": open_, "high": np.maximum(open_, close), "low": np.minimum(open_, close), "close": close,
        "volume": 1.0,
    })


def _momentum(bars, p):
    """direction * sign(close[t] - close[t - lookback]); flat until the lookback is filled."""
    close = np.asarray(bars["close"], dtype=np.float64)
    out = np.zeros((len(p["lookback"]), len(close)))
    for i, (k, d) in enumerate(zip(p["lookback"], p["direction"])):
        out[i, k:] = d * np.sign(close[k:] - close[:-k])
    return out


# Trials run in Ray workers, which cannot import this test module by name: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MOMENTUM = Strategy("momentum", _momentum, grid={"lookback": [1, 2, 4], "direction": [-1, 1]})


def test_rolling_and_anchored_folds():
    folds = make_folds(1000, train=300, test=200)
    assert [(f.train_start, f.train_end, f.test_start, f.test_end) for f in folds] == [
        (0, 300, 300, 500), (200, 500, 500, 700), (400, 700, 700, 900)]  # 900..1000 is no whole test window
    anchored = make_folds(1000, train=300, test=200, step=100, anchored=True)
    assert all(f.train_start == 0 for f in anchored)
    assert [f.test_start for f in anchored] == [300, 400, 500, 600, 700, 800]
    with pytest.raises(ValueError, match="step"):
        make_folds(1000, train=300, test=100, step=150)
    with pytest.raises(ValueError, match="no fold"):
        make_folds(100, train=80, test=30)


def test_model_strategies_join_through_the_resolver_the_caller_passes():
    with pytest.raises(KeyError, match="no model registry"):
        get_strategy("model:ppo@3")
    calls = []

    def resolve(name):
        calls.append(name)
        return model_strategy(name, lambda bars, scale: np.full(len(bars), scale), grid={"scale": [0.5, 1.0]})

    s = get_strategy("model:ppo@3", resolve)
    t = s.targets(frame(np.linspace(10, 11, 5)), grid_table(s.grid))
    np.testing.assert_array_equal(t, [[0.5] * 5, [1.0] * 5])
    assert calls == ["model:ppo@3"]
    with pytest.raises(KeyError, match="no model registry"):  # nothing was remembered
        get_strategy("model:ppo@3")
    with pytest.raises(KeyError, match="unknown strategy 'nope'"):
        get_strategy("nope", resolve)


def known_best_bars(seed: int = 11) -> pd.DataFrame:
    """500 bars of zigzag (each return the opposite sign of the last), then 500 of a 4-up/4-down cycle.

    In the zigzag, betting against the last bar's move (lookback 1, direction
    -1) is right on every bar; in the cycle, following it (lookback 1,
    direction +1) is right 6 bars in 8 and nothing else in the grid comes close.
    """
    rng = np.random.default_rng(seed)
    size = 0.01 * (1 + 0.5 * rng.random(1000))  # noise in the size, so no Sharpe is 0/0
    signs = np.concatenate([np.where(np.arange(500) % 2 == 0, 1.0, -1.0),
                            np.where(np.arange(500) % 8 < 4, 1.0, -1.0)])
    return frame(100 * np.cumprod(1 + signs * size))


def test_walk_forward_finds_the_parameter_known_by_construction(ray_session, tmp_path):
    bars = known_best_bars()
    wf = walk_forward(bars, MOMENTUM, train=200, test=100, storage_path=str(tmp_path), name="known-best")
    chosen = {row.fold: (row.param_lookback, row.param_direction) for row in wf.folds.itertuples()}
    # Folds trained wholly on the zigzag (train_end <= 500) and wholly on the cycle (train_start >= 500).
    for row in wf.folds.itertuples():
        if row.train_end <= 500:
            assert chosen[row.fold] == (1, -1), row
        if row.train_start >= 500:
            assert chosen[row.fold] == (1, 1), row
        if row.test_end <= 500 or (row.train_start >= 500):
            # The rule that held in-sample still holds out of sample: a gain, and an efficiency above 0.
            assert row.oos_total_return > 0.05 and row.efficiency > 0.2, row
    assert len(wf.folds) == 8 and wf.n_trials == 8
    # Every parameter set was searched in every fold (6 sets), and the chosen one is each fold's maximum.
    assert wf.is_objective.shape == (8, 6)
    np.testing.assert_allclose(wf.folds.is_objective, np.nanmax(wf.is_objective, axis=1))
    # The stitched curve covers every test bar once, from the first test bar to the end.
    assert wf.oos_index[0] == 200 and wf.oos_index[-1] == 999 and len(wf.oos_equity) == 800
    # Results are in Tune's storage, one result file per trial.
    exp = Path(wf.experiment_path)
    assert exp.is_relative_to(tmp_path)
    results = list(exp.glob("*/result.json"))
    assert len(results) == 8
    assert all(json.loads(r.read_text().splitlines()[-1])["param_sets"] == 6 for r in results)


def test_results_go_to_tune_storage_on_s3(ray_session, make_settings, s3_server):
    """``storage_path="s3://..."`` writes the experiment to a local S3-compatible server, through the
    store's endpoint and keys; the path reported names the bucket."""
    from minio import Minio

    mc = Minio(s3_server["endpoint"].split("://")[1], s3_server["access_key"], s3_server["secret_key"], secure=False)
    if not mc.bucket_exists("tune-results"):
        mc.make_bucket("tune-results")
    settings = make_settings(store={"uri": "s3://tune-results/store", "endpoint": s3_server["endpoint"],
                                    "access_key": s3_server["access_key"], "secret_key": s3_server["secret_key"]})
    bars = generate_bars(["X"], 500, seed=2, interval="1D")
    wf = walk_forward(bars, "sma_crossover", train=200, test=150, params={"fast": [5, 10], "slow": [30]},
                      storage_path="s3://tune-results/experiments", name="on-s3", settings=settings)
    assert wf.experiment_path == "s3://tune-results/experiments/on-s3"
    keys = [o.object_name for o in mc.list_objects("tune-results", prefix="experiments/on-s3/", recursive=True)]
    results = [k for k in keys if k.endswith("/result.json")]
    assert len(results) == wf.n_trials == len(wf.folds) == 2, keys
    last = json.loads(mc.get_object("tune-results", results[0]).read().decode().splitlines()[-1])
    assert last["param_sets"] == 2


def _perturb_after(bars: pd.DataFrame, cut: int, seed: int = 5) -> pd.DataFrame:
    """The same bars before ``cut``; from ``cut`` on, every price scaled by a different random walk."""
    out = bars.copy()
    rng = np.random.default_rng(seed)
    scale = np.exp(np.cumsum(rng.normal(0, 0.03, len(bars) - cut)))
    for c in ("open", "high", "low", "close"):
        out.loc[cut:, c] = out.loc[cut:, c].to_numpy() * scale
    return out


@pytest.mark.slow  # tens of seconds on 2 cores: left out of a bare `pytest`, run by `make test`
def test_no_look_ahead_through_tune(ray_session, tmp_path):
    """Changing every bar after fold 1's end moves nothing of folds 0 and 1, and does move fold 2."""
    bars = generate_bars(["X"], 1200, seed=4, interval="1D")
    params = {"fast": [5, 10, 20], "slow": [30, 60]}
    kw = dict(train=400, test=200, params=params, costs=Costs(commission=0.001), storage_path=str(tmp_path))
    a = walk_forward(bars, "sma_crossover", name="a", **kw)
    cut = int(a.folds.test_end[1])
    b = walk_forward(_perturb_after(bars, cut), "sma_crossover", name="b", **kw)
    keep = ["param_fast", "param_slow", "is_objective", "is_total_return", "oos_total_return", "oos_sharpe",
            "oos_max_drawdown", "oos_trades", "efficiency"]
    pd.testing.assert_frame_equal(a.folds.loc[:1, keep], b.folds.loc[:1, keep])
    before = a.oos_index < cut
    np.testing.assert_array_equal(a.oos_equity[before], b.oos_equity[before])
    # The perturbation is not a no-op: what comes after the cut does change.
    assert not np.array_equal(a.oos_equity[~before], b.oos_equity[~before])
    assert not a.folds.loc[2:, keep].equals(b.folds.loc[2:, keep])


def test_a_model_that_peeks_at_its_whole_input_still_cannot_see_past_the_fold():
    """A 'model' that compares each close with the mean of every close it is given (look-ahead
    within its input): the fold code hands it only bars up to the fold's end."""
    peeker = model_strategy("peeker", lambda bars, scale: scale * np.sign(bars["close"] - bars["close"].mean()),
                            grid={"scale": [0.5, 1.0]})
    bars = generate_bars(["X"], 900, seed=9, interval="1D")
    folds = make_folds(900, train=300, test=200)
    costs = Costs(commission=0.001)
    cut = folds[0].test_end
    moved = _perturb_after(bars, cut)
    table = grid_table(peeker.grid)
    for fold in folds[:1]:
        a = in_sample(bars, peeker, table, fold, costs, "sharpe", 252)
        b = in_sample(moved, peeker, table, fold, costs, "sharpe", 252)
        np.testing.assert_array_equal(a["objective"], b["objective"])
        oa = out_of_sample(bars, peeker, {"scale": 1.0}, fold, costs, 252)
        ob = out_of_sample(moved, peeker, {"scale": 1.0}, fold, costs, 252)
        np.testing.assert_array_equal(oa["equity"], ob["equity"])
    chosen = [{"scale": 1.0}] * len(folds)
    ea, _, idx = stitched(bars, peeker, chosen, folds, costs)
    eb, _, _ = stitched(moved, peeker, chosen, folds, costs)
    np.testing.assert_array_equal(ea[idx < cut], eb[idx < cut])
    # Given the whole series, the same model's targets before the cut do move: the slicing is what protects.
    whole_a = peeker.targets(bars, {"scale": np.array([1.0])})[0][:cut]
    whole_b = peeker.targets(moved, {"scale": np.array([1.0])})[0][:cut]
    assert not np.array_equal(whole_a, whole_b)


def test_bad_walk_forward_input_is_refused_before_any_trial():
    bars = known_best_bars()
    with pytest.raises(ValueError, match="objective"):
        walk_forward(bars, MOMENTUM, train=200, test=100, objective="profit")
    with pytest.raises(ValueError, match="no fold"):
        walk_forward(bars, MOMENTUM, train=900, test=200)
    with pytest.raises(ValueError, match="search"):
        walk_forward(bars, MOMENTUM, train=200, test=100, search="bayes")


def test_cvar_ratio_is_the_mean_return_over_the_expected_shortfall():
    """The objective, by hand: mean per-bar return / -CVaR(5%) of the in-sample returns, per set."""
    from core.engine import backtest_batch
    from core.metrics import cvar
    from tune.walk_forward import objective_values

    bars = generate_bars(["X"], 400, seed=8, interval="1D")
    table = {"fast": np.array([5, 10, 20]), "slow": np.array([30, 30, 60])}
    res = backtest_batch(bars, get_strategy("sma_crossover").targets(bars, table), commission=0.001)
    r = res.returns
    want = r.mean(axis=1) / -cvar(r, 0.05)
    np.testing.assert_allclose(objective_values(res.metrics, "cvar_ratio", 252), want, rtol=1e-9)
    # Edge cases: no tail loss and a gain is +inf; never traded (no volatility) is NaN.
    flat = {"sharpe": np.array([np.nan, 1.0]), "volatility": np.array([0.0, 0.1]), "cvar": np.array([0.0, 0.0])}
    got = objective_values(flat, "cvar_ratio", 252)
    assert np.isnan(got[0]) and np.isposinf(got[1])


def test_random_search_samples_tune_domains_and_picks_each_folds_best(ray_session, tmp_path):
    from ray import tune

    from tune.walk_forward import sample_table

    space = {"fast": tune.randint(2, 30), "slow": tune.choice([40, 80, 120])}
    table = sample_table(space, 25, seed=3, valid=get_strategy("sma_crossover").valid)
    assert 0 < len(table["fast"]) <= 25 and np.all((table["fast"] >= 2) & (table["fast"] < 30))
    assert set(table["slow"]) <= {40, 80, 120} and np.all(table["fast"] < table["slow"])
    again = sample_table(space, 25, seed=3, valid=get_strategy("sma_crossover").valid)
    assert all(np.array_equal(table[k], again[k]) for k in table)  # a seed repeats its draw
    bars = generate_bars(["X"], 900, seed=6, interval="1D")
    wf = walk_forward(bars, "sma_crossover", train=300, test=200, params=space, search="random", num_samples=25,
                      seed=3, objective="cvar_ratio", costs=Costs(commission=0.001), storage_path=str(tmp_path),
                      name="random")
    assert all(np.array_equal(wf.table[k], table[k]) for k in table)  # the same draw was searched
    assert wf.is_objective.shape == (3, len(table["fast"]))
    # Each fold ran the set with the highest in-sample CVaR ratio, checked against in_sample by hand.
    folds = make_folds(len(bars), 300, 200)
    for k, fold in enumerate(folds):
        by_hand = in_sample(bars, get_strategy("sma_crossover"), table, fold, Costs(commission=0.001), "cvar_ratio",
                            252)["objective"]
        np.testing.assert_array_equal(wf.is_objective[k], by_hand)
        best = int(np.nanargmax(by_hand))
        assert (wf.folds.param_fast[k], wf.folds.param_slow[k]) == (table["fast"][best], table["slow"][best])
