"""The env and CVaR-PPO on a CUDA GPU: same arithmetic as on CPU, the same oracle answer, speed.

Run with ``-m gpu`` on a GPU machine; elsewhere these are skipped with the reason.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from core.rl.cvar_ppo import CVaRPPOSettings, train
from core.rl.env import TradingEnv
from core.rl.oracle_envs import RISKY, TwoArmBandit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none visible to torch"),
]


def _env(device: str, num_envs: int, num_bars: int = 40) -> TradingEnv:
    rng = np.random.default_rng(0)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, num_bars)))
    feats = rng.normal(size=(num_bars, 4)).astype(np.float32)
    # num_bars = window + episode_length: one possible start, so CPU and GPU draw the same episodes.
    return TradingEnv(feats, close=close, window=8, episode_length=num_bars - 8, num_envs=num_envs,
                      positions=(-1.0, -0.5, 0.0, 0.5, 1.0), commission=0.001, slippage=0.0005, device=device)


def test_env_on_gpu_matches_cpu_step_for_step():
    cpu, gpu = _env("cpu", 256), _env("cuda", 256)
    o_cpu, o_gpu = cpu.reset(), gpu.reset()
    g = torch.Generator().manual_seed(0)
    for _ in range(70):  # crosses two episode ends
        assert torch.allclose(o_cpu, o_gpu.cpu(), atol=1e-5)
        actions = torch.randint(0, 5, (256,), generator=g)
        o_cpu, r_cpu, d_cpu = cpu.step(actions)
        o_gpu, r_gpu, d_gpu = gpu.step(actions.cuda())
        assert torch.allclose(r_cpu, r_gpu.cpu(), atol=1e-6)
        assert torch.equal(d_cpu, d_gpu.cpu())


def test_cvar_ppo_on_gpu_finds_the_safe_arm():
    settings = CVaRPPOSettings(seed=1, total_timesteps=40 * 64 * 16, learning_rate=3e-3, num_steps=16,
                               risk_mode="cvar", alpha=0.1)
    _, policy = train(settings, TwoArmBandit(64, device="cuda", seed=0))
    with torch.no_grad():
        p_risky = torch.softmax(policy.actor(torch.ones(1, 1, device="cuda")), -1)[0, RISKY].item()
    assert p_risky < 0.05


def test_gpu_env_steps_at_least_a_million_per_second():
    env = _env("cuda", 65_536, num_bars=4096)
    env.reset()
    actions = torch.randint(0, 5, (65_536,), device="cuda")
    for _ in range(10):
        env.step(actions)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        env.step(actions)
    torch.cuda.synchronize()
    assert 65_536 * 200 / (time.perf_counter() - t0) > 1e6
