"""Registered models as strategies: a CVaR-PPO member from the registry, backtested and walked forward.

The oracle for the targets is the learner's own evaluation path
(``core.rl.evaluate.member_positions`` on the windows built by hand), so a
registered policy trades in a backtest exactly as its held-out evaluation
said it would.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.baselines import export_onnx, random_model
from core.features import FEATURE_NAMES, WARMUP, compute_features
from core.models.registry import ModelRegistry, UnknownModel
from core.rl.cvar_ppo import ActorCritic
from core.rl.evaluate import member_positions
from core.rl.export import export_member_onnx
from core.strategies import get_strategy, grid_table
from core.synthetic import generate_bars
from tune.models import connect_registry, parse_model_spec
from tune.walk_forward import (
    Costs,
    infer_periods_per_year,
    make_folds,
    out_of_sample,
    walk_forward,
)

W, F = 8, len(FEATURE_NAMES)


@pytest.fixture
def registered(make_settings):
    """Settings whose registry holds ``ppo`` v1: an untrained CVaR-PPO policy's member export (seeded)."""
    settings = make_settings()
    policy = ActorCritic(W * F + 3, 3, (16, 16), torch.tensor([-1.0, 0.0, 1.0]), seed=4)
    check = np.random.default_rng(1).normal(size=(20, W, F)).astype(np.float32)
    data, _ = export_member_onnx(policy, W, F, check)
    ModelRegistry(settings).register("ppo", data, "policy", {"algorithm": "cvar-ppo"})
    return settings, data


@pytest.fixture
def resolve(registered):
    """``model:`` names resolved through ``registered``'s registry."""
    settings, _ = registered
    return connect_registry(settings)


def one_symbol(n: int, seed: int = 3):
    return generate_bars(["X"], n, seed=seed).reset_index(drop=True)


def by_hand(data: bytes, bars) -> np.ndarray:
    """Target t: the member's position on feature rows t-W+1..t; 0 before the first whole window."""
    feats = compute_features(bars)
    first = WARMUP + W - 1
    out = np.zeros(len(bars))
    windows = np.stack([feats[t - W + 1:t + 1] for t in range(first, len(bars))])
    out[first:] = member_positions(data, windows)
    return out


def test_a_registered_policy_trades_as_its_evaluation_says(registered, resolve):
    _, data = registered
    bars = one_symbol(300)
    s = get_strategy("model:ppo@1", resolve)
    assert s.name == "model:ppo@1" and set(s.grid) == {"scale", "threshold"}
    want = by_hand(data, bars)
    assert np.any(want != 0) and np.all(want[:WARMUP + W - 1] == 0)
    np.testing.assert_array_equal(s.targets(bars, grid_table(s.grid))[0], want)
    # The knobs: half the position; and a gate above every |position| (all are 0 or 1) leaves it flat.
    # A gate at exactly 1 keeps the full positions (flat only below it, not at it).
    knobs = s.targets(bars, {"scale": np.array([0.5, 1.0, 1.0]), "threshold": np.array([0.0, 1.5, 1.0])})
    np.testing.assert_array_equal(knobs, [0.5 * want, np.zeros_like(want), want])
    # Target t reads bars <= t only: change everything after bar 200 and nothing before it moves.
    moved = bars.copy()
    moved.loc[201:, ["open", "high", "low", "close"]] *= 1.3
    after = s.targets(moved, grid_table(s.grid))[0]
    np.testing.assert_array_equal(after[:201], want[:201])
    assert not np.array_equal(after[201:], want[201:])
    # With no version the registry's default (no production yet: the newest) is taken.
    assert get_strategy("model:ppo", resolve).name == "model:ppo@1"


def test_names_versions_and_contracts_are_checked(registered, resolve, make_settings):
    settings, _ = registered
    with pytest.raises(UnknownModel, match="no version 7"):
        get_strategy("model:ppo@7", resolve)
    with pytest.raises(UnknownModel, match="no model named 'nope'"):
        get_strategy("model:nope@1", resolve)
    with pytest.raises(ValueError, match="no production version"):
        get_strategy("model:ppo@production", resolve)
    with pytest.raises(ValueError, match="model:NAME@VERSION"):
        parse_model_spec("model:two words")
    with pytest.raises(ValueError, match="number, production or candidate"):
        parse_model_spec("model:ppo@best")
    # An ONNX file that is not a member of this build (3 features, not F) is refused before any trial.
    three = random_model("mlp", n_features=3, window=W, seed=0)
    ModelRegistry(settings).register("narrow", export_onnx(three, W, 3), "forecasting")
    with pytest.raises(ValueError, match=f"takes 3 features, this build computes {F}"):
        get_strategy("model:narrow@1", resolve)
    ModelRegistry(settings).register("pickled", b"not onnx", "forecasting", kind="pt")
    with pytest.raises(ValueError, match="model:pickled@1 is a pt artefact; only ONNX members"):
        get_strategy("model:pickled@1", resolve)


def test_walk_forward_over_a_registered_policy_through_tune(ray_session, registered, resolve, tmp_path):
    _, data = registered
    bars = one_symbol(460)
    wf = walk_forward(bars, "model:ppo@1", train=150, test=100, params={"scale": [0.5, 1.0]},
                      storage_path=str(tmp_path), name="ppo-wf", resolver=resolve)
    assert wf.strategy == "model:ppo@1" and len(wf.folds) == 3
    # Each fold's out-of-sample figures are those of the scale it chose, run by hand; the other
    # scale would have given different ones, so the choice is what the numbers show.
    strategy, ppy = get_strategy("model:ppo@1", resolve), infer_periods_per_year(bars)
    for fold, row in zip(make_folds(len(bars), 150, 100), wf.folds.to_dict("records")):
        runs = {scale: out_of_sample(bars, strategy, {"scale": scale, "threshold": 0.0}, fold, Costs(), ppy)
                for scale in (0.5, 1.0)}
        chosen, other = runs[row["param_scale"]], runs[1.5 - row["param_scale"]]
        assert row["oos_total_return"] == pytest.approx(chosen["metrics"]["total_return"], rel=1e-12, abs=1e-15)
        assert chosen["metrics"]["total_return"] != other["metrics"]["total_return"]
    # The stitched curve holds the member's own positions (their sign) through every test window.
    want = by_hand(data, bars)
    held = wf.oos_units[1:]
    assert np.all(np.sign(held) == np.sign(want[wf.oos_index[:-1]]))


def test_cli_backtests_a_registered_policy(registered, tmp_path, monkeypatch, capsys):
    from raytrade.cli import main

    settings, data = registered
    monkeypatch.setenv("RAYTRADE_STORE__URI", settings.store.uri)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "generate", "--symbols", "X", "--bars", "300", "--interval", "1D"]) == 0
    capsys.readouterr()
    assert main(["backtest", "run", "--symbol", "X", "--strategy", "model:ppo@1", "--params", "scale=0.5",
                 "--out", str(tmp_path / "rep"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["strategy"] == "model:ppo@1" and summary["params"] == {"scale": 0.5, "threshold": 0.0}
    assert "warnings" not in summary  # v1 records no training bars
    assert main(["backtest", "run", "--symbol", "X", "--strategy", "model:ppo@9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ppo has no version 9" in err
    # A version trained on these very bars still backtests, and says the result is in-sample.
    ModelRegistry(settings).register("ppo", data, "policy", {
        "training_data": {"X": {"first": "2000-01-01", "last": "2100-01-01"}}})
    assert main(["backtest", "run", "--symbol", "X", "--strategy", "model:ppo@2", "--out", str(tmp_path / "r2"),
                 "--json"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["warnings"] == [
        "300 of 300 bars of X fall in model:ppo@2's training data (2000-01-01 to 2100-01-01): results over them "
        "are in-sample, not a test of the model"]
    assert "warning: 300 of 300 bars" in out.err


def test_a_baseline_records_its_training_bars_up_to_the_held_out_ones():
    """The range ends at the label bar of the last training window, before the held-out windows."""
    from core.baselines import direction_windows, train_direction_model

    bars = one_symbol(400)
    result = train_direction_model({"X": bars}, "mlp", window=W, epochs=1, holdout=0.25, seed=0)
    _, _, ends = direction_windows(bars, W)
    cut = int(len(ends) * 0.75)
    (row,) = result.metadata["training_data"]
    assert row == {"symbol": "X", "first": str(bars.ts.iloc[0]), "last": str(bars.ts.iloc[ends[cut - 1] + 1])}
    assert bars.ts.iloc[ends[cut - 1] + 1] < bars.ts.iloc[-1]


def test_training_ranges_in_both_spellings_and_the_in_sample_count():
    from tune.models import in_sample_warning, training_ranges
    from core.strategies import model_strategy

    baseline = {"training_data": [{"symbol": "spy", "first": "2024-01-02", "last": "2024-01-05"}]}
    learner = {"training_data": {"SPY": {"first": "2024-01-02", "last": "2024-01-05"}},
               "heldout_data": {"SPY": {"first": "2024-01-06", "last": "2024-01-09"}}}
    assert training_ranges(baseline) == training_ranges(learner) == {"SPY": ("2024-01-02", "2024-01-05")}
    assert training_ranges({}) == {}
    bars = generate_bars(["SPY"], 10, seed=1, interval="1D", start="2024-01-01")
    s = model_strategy("model:m@1", lambda b: np.zeros(len(b)), trained_on=training_ranges(learner))
    # Daily bars from Jan 1: Jan 2, 3, 4 and 5 are training bars.
    assert in_sample_warning(s, "SPY", bars).startswith("4 of 10 bars of SPY fall in model:m@1's training data")
    assert in_sample_warning(s, "QQQ", bars) is None
    assert in_sample_warning(model_strategy("model:m@2", lambda b: np.zeros(len(b))), "SPY", bars) is None
