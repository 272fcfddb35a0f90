"""The batched trading environment: reward arithmetic by hand, timing (no look-ahead), resets."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

from core.rl.env import TradingEnv

torch.set_num_threads(1)

SHORT, FLAT, LONG = 0, 1, 2


def _tiny_env(**kw) -> TradingEnv:
    # 5 bars, window 1, 4 decisions: the only possible episode starts at bar 0.
    feats = np.arange(5, dtype=np.float32)[:, None]
    return TradingEnv(feats, close=[100.0, 101.0, 99.0, 99.0, 102.0], window=1, episode_length=4,
                      num_envs=1, commission=0.001, slippage=0.0005, **kw)


def test_rewards_by_hand_on_a_tiny_price_series():
    env = _tiny_env()
    obs = env.reset()
    # [feature row 0, position 0, log wealth 0, all 4 decisions left]
    assert obs.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    c = 0.0015
    want = [
        math.log(101 / 100) - c * 1,  # flat -> long, bar 1 up 1%
        math.log(99 / 101),  # stay long, no cost
        -math.log(99 / 99) - c * 2,  # long -> short: two units traded, flat bar
        0.0 * math.log(102 / 99) - c * 1,  # short -> flat: the 102 rally is not earned
    ]
    assert want[0] == pytest.approx(0.008450331, abs=1e-9)
    assert want[1] == pytest.approx(-0.020000667, abs=1e-9)
    got, wealth = [], 0.0
    for k, (a, pos_after) in enumerate([(LONG, 1.0), (LONG, 1.0), (SHORT, -1.0), (FLAT, 0.0)]):
        obs, r, done = env.step(torch.tensor([a]))
        got.append(r.item())
        wealth += want[k]
        if k < 3:
            assert not done.item()
            assert obs[0].tolist() == pytest.approx([k + 1, pos_after, wealth, (3 - k) / 4], abs=1e-6)
    assert got == pytest.approx(want, abs=1e-6)
    # Episode return R = log(final / initial wealth) = sum of rewards = -0.01605...
    assert sum(got) == pytest.approx(-0.016050336, abs=1e-6)
    # The fourth step ends the episode and hands back the next episode's first observation.
    assert done.item()
    assert obs.tolist() == [[0.0, 0.0, 0.0, 1.0]]


def test_log_returns_input_gives_the_same_rewards_as_close():
    close = np.array([100.0, 101.0, 99.0, 99.0, 102.0])
    lr = np.r_[np.nan, np.log(close[1:] / close[:-1])]  # entry 0 is a placeholder
    a = _tiny_env()
    b = TradingEnv(np.arange(5, dtype=np.float32)[:, None], log_returns=lr, window=1, episode_length=4,
                   num_envs=1, commission=0.001, slippage=0.0005)
    for act in [LONG, SHORT, SHORT, FLAT]:
        ra = a.step(torch.tensor([act]))[1]
        rb = b.step(torch.tensor([act]))[1]
        assert ra.item() == rb.item()


def _tagged_env(seed=0, num_envs=64, **kw) -> tuple[TradingEnv, np.ndarray]:
    # Feature row t = [t, -t], so an observation says which bars it saw.
    num_bars = 200
    rng = np.random.default_rng(7)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, num_bars)))
    feats = np.stack([np.arange(num_bars), -np.arange(num_bars)], axis=1).astype(np.float32)
    env = TradingEnv(feats, close=close, window=3, episode_length=10, num_envs=num_envs,
                     positions=(-1.0, -0.5, 0.0, 0.5, 1.0), commission=0.002, slippage=0.001,
                     seed=seed, **kw)
    return env, close


def test_window_ends_at_the_decision_bar_and_reward_uses_the_next_bar():
    env, close = _tagged_env()
    obs = env.reset()
    g = torch.Generator().manual_seed(0)
    for _ in range(25):  # crosses two episode boundaries
        window, position, wealth, _ = env.split_obs(obs)
        t = window[:, -1, 0].long()
        # Rows t-2, t-1, t in order: nothing from the future.
        assert torch.equal(window[:, :, 0], (t[:, None] + torch.tensor([-2, -1, 0])).float())
        assert torch.equal(window[:, :, 1], -window[:, :, 0])
        actions = torch.randint(0, 5, (env.num_envs,), generator=g)
        target = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])[actions]
        obs, r, done = env.step(actions)
        lr_next = torch.from_numpy(np.log(close[t + 1] / close[t]))
        want = target.double() * lr_next - 0.003 * (target - position).abs().double()
        assert torch.allclose(r.double(), want, atol=1e-6)
        # Decision bars never need a bar past the end, and always have a full window behind.
        assert t.min() >= 2 and t.max() <= 198


def test_episodes_end_every_l_steps_flat_with_wealth_equal_to_summed_rewards():
    env, _ = _tagged_env(num_envs=8)
    obs = env.reset()
    total = torch.zeros(8)
    starts = []
    for k in range(30):
        window, position, wealth, time_left = env.split_obs(obs)
        if k % 10 == 0:
            assert torch.all(position == 0) and torch.all(wealth == 0) and torch.all(time_left == 1)
            starts.append(window[:, -1, 0].clone())
            total.zero_()
        else:
            # Consecutive bars within an episode; log wealth is the running sum of rewards.
            assert torch.equal(window[:, -1, 0], starts[-1] + k % 10)
            assert torch.allclose(wealth, total, atol=1e-6)
            assert torch.allclose(time_left, torch.full((8,), (10 - k % 10) / 10))
        obs, r, done = env.step(torch.full((8,), 4))  # always long
        total += r
        assert bool(done.all()) == (k % 10 == 9) and bool(done.any()) == (k % 10 == 9)
    # New episodes start at freshly drawn bars.
    assert not torch.equal(starts[0], starts[1])


def test_same_seed_same_episodes_and_state_dict_resumes_exactly():
    a, _ = _tagged_env(seed=5)
    b, _ = _tagged_env(seed=5)
    c, _ = _tagged_env(seed=6)
    oa, ob, oc = a.reset(), b.reset(), c.reset()
    assert torch.equal(oa, ob) and not torch.equal(oa, oc)
    acts = [torch.full((64,), i % 5) for i in range(37)]
    for x in acts[:13]:
        a.step(x)
    snapshot = a.state_dict()
    tail_a = [a.step(x) for x in acts[13:]]
    d, _ = _tagged_env(seed=99)
    d.load_state_dict(snapshot)
    tail_d = [d.step(x) for x in acts[13:]]
    for (o1, r1, d1), (o2, r2, d2) in zip(tail_a, tail_d):
        assert torch.equal(o1, o2) and torch.equal(r1, r2) and torch.equal(d1, d2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(features=np.full((50, 2), np.nan, np.float32)), "NaN"),
        (dict(close=np.r_[np.ones(49), -1.0]), "positive"),
        (dict(close=np.ones(49)), "shape"),
        (dict(log_returns=np.zeros(50)), "exactly one"),
        (dict(episode_length=48), "need >= 51"),
        (dict(positions=(0.0, 2.0)), "positions"),
        (dict(commission=-0.001), "commission"),
    ],
)
def test_rejects_bad_input_with_a_message_that_says_what(kwargs, match):
    base = dict(features=np.zeros((50, 2), np.float32), close=np.ones(50), window=3, episode_length=10)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TradingEnv(base.pop("features"), **base)


def test_from_bars_imports_features_lazily_and_drops_warm_up_rows(monkeypatch):
    def compute_features(bars):
        # A 2-bar moving average: row 0 is warm-up (NaN).
        c = bars["close"].to_numpy()
        ma = np.r_[np.nan, (c[1:] + c[:-1]) / 2]
        return np.stack([ma, c], axis=1)

    monkeypatch.setitem(sys.modules, "core.features", types.SimpleNamespace(compute_features=compute_features))
    close = 100 + np.arange(20.0)
    bars = pd.DataFrame({"symbol": "SPY", "ts": pd.date_range("2024-01-01", periods=20, freq="min", tz="UTC"),
                         "close": close})
    env = TradingEnv.from_bars(bars, window=2, episode_length=5, num_envs=4)
    assert env.features.shape == (19, 2)
    # Feature row 0 of the env is bar 1: the close column still matches its own price.
    assert env.features[0].tolist() == [100.5, 101.0]
    assert env.log_returns[1].item() == pytest.approx(math.log(102 / 101), abs=1e-7)
    with pytest.raises(ValueError, match="one symbol"):
        TradingEnv.from_bars(bars.assign(symbol=["A", "B"] * 10))
    with pytest.raises(ValueError, match="increasing ts"):
        TradingEnv.from_bars(bars.iloc[::-1])
