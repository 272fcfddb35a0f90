"""Regime detection and fusion against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.features import FEATURE_NAMES
from core.fusion import MultiplicativeWeights, RegimeWeights, fuse, normal_cvar, outcome_loss
from core.regime import RegimeThresholds, detect_regime, regime_scores
from core.synthetic import SyntheticMarket

F = len(FEATURE_NAMES)
IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}


def row(vol: float, ret20: float) -> np.ndarray:
    r = np.zeros(F, dtype=np.float32)
    r[IDX["volatility_20"]] = vol
    r[IDX["log_return_20"]] = ret20
    return r


# Hand-built rows whose regime is known: sigma * sqrt(20) is one standard
# deviation of a 20-bar random walk.
TREND = row(0.004, 2.0 * 0.004 * math.sqrt(20))  # t = 2.0 >= 1.5
RANGE = row(0.004, 0.5 * 0.004 * math.sqrt(20))  # t = 0.5
VOLATILE = row(0.02, 3.0 * 0.02 * math.sqrt(20))  # vol >= 0.008 wins over the trend
WARMING = np.full(F, np.nan, dtype=np.float32)


def test_regime_of_hand_built_rows():
    feats = np.stack([TREND, RANGE, VOLATILE, WARMING, row(0.004, -2.0 * 0.004 * math.sqrt(20))])
    assert list(detect_regime(feats, FEATURE_NAMES)) == ["trending", "ranging", "volatile", "unknown", "trending"]
    vol, t = regime_scores(feats[:3], FEATURE_NAMES)
    np.testing.assert_allclose(t, [2.0, 0.5, 3.0], rtol=1e-5)
    # The thresholds are the boundary: t = 2.0 is ranging when a trend needs 2.5.
    assert detect_regime(feats[:1], FEATURE_NAMES, RegimeThresholds(trend_min=2.5))[0] == "ranging"


def test_regime_detector_finds_the_synthetic_markets_hidden_regimes():
    df = SyntheticMarket(["A", "B"], seed=1).generate(3000, with_regime=True)
    from core.features import compute_features

    hits = {"volatile": [], "trend_in_trend": [], "trend_in_range": []}
    for _, g in df.groupby("symbol"):
        lab = detect_regime(compute_features(g), FEATURE_NAMES)
        true = g["regime"].to_numpy()
        ok = lab != "unknown"
        hits["volatile"].append(np.mean(lab[ok & (true == "volatile")] == "volatile"))
        hits["trend_in_trend"].append(np.mean(lab[ok & (true == "trending")] == "trending"))
        hits["trend_in_range"].append(np.mean(lab[ok & (true == "ranging")] == "trending"))
    assert np.mean(hits["volatile"]) > 0.8
    # The synthetic drift is weak per bar, but a trend label is still far likelier in a trend.
    assert np.mean(hits["trend_in_trend"]) > 3 * np.mean(hits["trend_in_range"])


def test_fusion_weights_follow_the_regime():
    members = ["trend_follower", "reverter"]
    w = RegimeWeights(regime_multipliers={"trending": {"trend_follower": 3.0}, "ranging": {"reverter": 3.0}})
    feats = np.stack([TREND, RANGE, WARMING])
    regimes = detect_regime(feats, FEATURE_NAMES)
    pos = np.array([[1.0, -1.0]] * 3)
    trend, rng, unknown = fuse(pos, members, regimes, w)
    # Trending: weights 3:1, mean (3 - 1)/4 = 0.5; weighted variance (3*0.25 + 1*2.25)/4 = 0.75.
    assert trend.weights == pytest.approx({"trend_follower": 0.75, "reverter": 0.25})
    agreement = 1 - math.sqrt(0.75)
    assert trend.agreement == pytest.approx(agreement)
    assert trend.position == pytest.approx(0.5 * agreement)
    assert trend.confidence == pytest.approx(agreement)
    assert trend.contributions == pytest.approx({"trend_follower": 0.75, "reverter": -0.25})
    # Ranging: the mirror image.
    assert rng.weights == pytest.approx({"trend_follower": 0.25, "reverter": 0.75})
    assert rng.position == pytest.approx(-0.5 * agreement)
    # Unknown regime (warm-up): base weights, the two cancel, no position.
    assert unknown.regime == "unknown" and unknown.position == pytest.approx(0.0)
    assert unknown.agreement == pytest.approx(0.0)


def test_failed_member_lowers_confidence_and_all_failed_is_hold():
    members = ["a", "b", "c"]
    w = RegimeWeights()
    pos = np.array([[0.6, 0.6, np.nan], [np.nan, np.nan, np.nan], [0.6, 3.0, 0.6]])
    reasons = [{"c": "timeout: no answer within 0.25s"}, {"a": "ValueError: boom", "b": "timeout: x"}, {}]
    one, none, bad = fuse(pos, members, ["ranging"] * 3, w, failures=reasons)
    assert one.coverage == pytest.approx(2 / 3) and one.agreement == pytest.approx(1.0)
    assert one.position == pytest.approx(0.6) and one.confidence == pytest.approx(2 / 3)
    assert one.failed == {"c": "timeout: no answer within 0.25s"} and not one.hold
    assert none.hold and none.position == 0.0 and none.confidence == 0.0
    assert "a: ValueError: boom" in none.reason and "b: timeout: x" in none.reason and "c: returned nan" in none.reason
    # A value outside [-1, 1] is a broken member, not a strong opinion.
    assert "outside [-1, 1]" in bad.failed["b"] and bad.position == pytest.approx(0.6)


def test_tail_risk_shrinks_position_and_confidence():
    pos = np.array([[1.0, 1.0], [1.0, 1.0]])
    calm, wild = fuse(pos, ["a", "b"], ["ranging"] * 2, RegimeWeights(), np.array([0.01, 0.04]), max_tail_risk=0.02)
    assert calm.position == pytest.approx(1.0) and calm.confidence == pytest.approx(1.0)
    assert wild.position == pytest.approx(0.5) and wild.confidence == pytest.approx(0.5)


def test_normal_cvar_matches_the_closed_form():
    # E[-X | X < -1.645 sigma] for X ~ N(0, sigma^2) = sigma * phi(1.6449) / 0.05 = 2.0627 sigma.
    assert float(normal_cvar(1.0)) == pytest.approx(2.062713, rel=1e-5)
    assert float(normal_cvar(0.01, 0.99)) == pytest.approx(0.01 * 2.665214, rel=1e-5)


def test_multiplicative_weights_oracle():
    mw = MultiplicativeWeights(eta=0.1, floor=0.01)
    for _ in range(10):
        mw.update("trending", {"good": float(outcome_loss(1.0, 0.01)), "bad": float(outcome_loss(-1.0, 0.01))})
    assert mw.multiplier("trending", "good") == pytest.approx(1.0)
    assert mw.multiplier("trending", "bad") == pytest.approx(math.exp(-1.0))
    assert mw.multiplier("ranging", "bad") == 1.0  # regimes learn separately
    for _ in range(100):
        mw.update("trending", {"good": 0.0, "bad": 1.0})
    assert mw.multiplier("trending", "bad") == pytest.approx(0.01)  # the floor: it can earn weight back
    w = RegimeWeights(base={"good": 2.0}, adaptive=mw)
    assert w.weight("trending", "good") == pytest.approx(2.0) and w.weight("trending", "bad") == pytest.approx(0.01)
    assert w.weight("unknown", "bad") == 1.0


def test_outcome_loss():
    assert outcome_loss(1.0, 0.02) == 0.0 and outcome_loss(-1.0, 0.02) == 1.0
    assert outcome_loss(0.0, 0.02) == 0.5 and outcome_loss(0.5, -0.01) == pytest.approx(0.75)
