"""CVaR-PPO against oracles: hand-computed advantages and shaping, toy envs whose
CVaR-optimal choice is known by hand, exact determinism and resume, ONNX parity."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from core.rl.cvar_ppo import (
    ActorCritic,
    CVaRPPOSettings,
    compute_gae,
    cvar_advantages,
    episode_returns_per_step,
    export_onnx,
    ppo_update,
    shape_terminal_rewards,
    soft_risk_alpha,
    train,
)
from core.rl.env import TradingEnv
from core.rl.oracle_envs import RISKY, DelayedLossChoice, TwoArmBandit

torch.set_num_threads(1)

T, F = True, False
# Tests of bookkeeping use deliberately small batches; the thin-tail warning is expected there.
small_batches = pytest.mark.filterwarnings("ignore:.*tail holds:UserWarning")


# --------------------------------------------------------------------------- hand-computed pieces
def test_gae_by_hand_with_an_episode_end_mid_rollout():
    rewards = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]])  # [step, env]
    values = torch.tensor([[0.5, 1.0], [1.0, 0.0], [2.0, 0.5]])
    dones = torch.tensor([[F, F], [F, T], [F, F]])
    next_value = torch.tensor([4.0, 2.0])
    advantages, returns = compute_gae(rewards, values, dones, next_value, gamma=0.9, gae_lambda=0.8)
    # env 0, no ends:   d2 = 3 + .9*4 - 2 = 4.6;  d1 = 0 + .9*2 - 1 = 0.8;  d0 = 1 + .9*1 - .5 = 1.4
    #                   A2 = 4.6, A1 = .8 + .72*4.6 = 4.112, A0 = 1.4 + .72*4.112 = 4.36064
    # env 1, ends at 1: d2 = -1 + .9*2 - .5 = .3; d1 = 1 - 0 = 1 (no bootstrap); d0 = 2 + .9*0 - 1 = 1
    #                   A2 = .3, A1 = 1 (nothing carried back across the end), A0 = 1 + .72*1 = 1.72
    want = torch.tensor([[4.36064, 1.72], [4.112, 1.0], [4.6, 0.3]])
    assert torch.allclose(advantages, want, atol=1e-5)
    assert torch.allclose(returns, want + values, atol=1e-5)


def test_gae_with_gamma_and_lambda_one_is_the_return_to_go_minus_value():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, 3, generator=g)
    values = torch.randn(6, 3, generator=g)
    dones = torch.zeros(6, 3, dtype=torch.bool)
    dones[2, 0] = dones[5, 1] = True
    advantages, _ = compute_gae(rewards, values, dones, torch.zeros(3), gamma=1.0, gae_lambda=1.0)
    to_go = torch.zeros(3)
    for t in reversed(range(6)):
        to_go = rewards[t] + to_go * (~dones[t]).float()
        assert torch.allclose(advantages[t], to_go - values[t], atol=1e-5)


def test_episode_return_per_step_by_hand():
    # env 0: an episode ends at step 1 (R = 3); the next one has not ended by the rollout's end.
    # env 1: episodes end at steps 0 (R = 5, begun in an earlier rollout) and 3 (R = 4).
    return_after_step = torch.tensor([[1.0, 5.0], [3.0, 1.0], [-1.0, 2.0], [-2.0, 4.0]])
    dones = torch.tensor([[F, T], [T, F], [F, F], [F, T]])
    R, has_ended = episode_returns_per_step(return_after_step, dones)
    assert R.tolist() == [[3.0, 5.0], [3.0, 4.0], [0.0, 4.0], [0.0, 4.0]]
    assert has_ended.tolist() == [[T, T], [T, T], [F, T], [F, T]]


def test_pure_cvar_advantages_only_in_the_tail():
    R = torch.tensor([-20.0, 2.0, 0.5, 2.0, -30.0])
    has_ended = torch.tensor([T, T, T, T, F])
    adv = cvar_advantages(R, has_ended, nu=torch.tensor(0.5))
    # R - nu for R <= nu; the atom at nu gets 0; an unfinished episode gets nothing.
    assert adv.tolist() == [-20.5, 0.0, 0.0, 0.0, 0.0]


def test_terminal_shaping_by_hand():
    rewards = torch.tensor([[0.3, 0.1, 0.3], [0.3, 0.1, 0.3]])
    dones = torch.tensor([[F, F, F], [T, T, T]])
    return_after_step = torch.tensor([[0.3, 0.1, 0.3], [-12.0, 1.0, 3.0]])
    shaped = shape_terminal_rewards(rewards, dones, return_after_step, torch.tensor(1.0), lambda_=2.0, alpha=0.1)
    # Only the end of an episode with R below nu pays: -(2 / 0.1) * (1 - (-12)) = -260.
    assert torch.allclose(shaped, torch.tensor([[0.3, 0.1, 0.3], [0.3 - 260.0, 0.1, 0.3]]))
    assert torch.equal(shape_terminal_rewards(rewards, dones, return_after_step, torch.tensor(1.0), 0.0, 0.1), rewards)


def test_soft_risk_schedule_anneals_from_one_to_alpha():
    assert soft_risk_alpha(0.1, 0.0, 0.5) == 1.0
    assert soft_risk_alpha(0.1, 0.25, 0.5) == pytest.approx(0.55)
    assert soft_risk_alpha(0.1, 0.5, 0.5) == pytest.approx(0.1)
    assert soft_risk_alpha(0.1, 0.9, 0.5) == pytest.approx(0.1)
    assert soft_risk_alpha(0.1, 0.0, 0.0) == 0.1


def _adam_steps(optimizer) -> int:
    return int(next(iter(optimizer.state.values()))["step"].item())


@pytest.mark.parametrize("target_kl,steps,early_stop", [(None, 16, 0.0), (0.0, 1, 1.0)])
def test_ppo_update_stops_before_stepping_on_a_minibatch_past_target_kl(target_kl, steps, early_stop):
    g = torch.Generator().manual_seed(0)
    policy = ActorCritic(obs_dim=5, num_actions=3, seed=0)
    obs, cum = torch.randn(256, 5, generator=g), torch.randn(256, generator=g)
    with torch.no_grad():
        actions, logprobs, _, values = policy.get_action_and_value(obs, cum, generator=g)
    batch = dict(obs=obs, cum_return=cum, actions=actions, logprobs=logprobs, values=values,
                 advantages=torch.randn(256, generator=g), returns=torch.randn(256, generator=g),
                 pg_mask=torch.ones(256))
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    settings = CVaRPPOSettings(update_epochs=4, num_minibatches=4, target_kl=target_kl)
    stats = ppo_update(policy, optimizer, batch, settings, minibatch_size=64, generator=g)
    # The first minibatch sees the unchanged policy (approx_kl = 0, not > 0): one step, then
    # the second minibatch's approx_kl > 0 stops the update before its step.
    assert _adam_steps(optimizer) == steps
    assert stats["early_stop"] == early_stop
    assert stats["epochs"] == (4.0 if target_kl is None else 0.0)
    assert stats["approx_kl"] > 0.0


@pytest.mark.parametrize("bad", [dict(alpha=0.0), dict(alpha=1.5), dict(risk_mode="var"), dict(lambda_lr=-1.0),
                                 dict(soft_risk_fraction=2.0)])
def test_settings_reject_nonsense(bad):
    with pytest.raises(ValueError):
        CVaRPPOSettings(**bad)


# --------------------------------------------------------------------------- oracles: bandit
def _bandit(iterations=40, **kw):
    settings = CVaRPPOSettings(seed=1, total_timesteps=iterations * 64 * 16, learning_rate=3e-3, num_steps=16, **kw)
    history, policy = train(settings, TwoArmBandit(64, seed=0))
    with torch.no_grad():
        p_risky = torch.softmax(policy.actor(torch.ones(1, 1)), -1)[0, RISKY].item()
    return history, p_risky


def test_plain_ppo_picks_the_risky_arm_for_its_higher_mean():
    # alpha = 1, lambda_ = 0: plain PPO. E[R] 0.9 (risky) vs 0.5 (safe).
    history, p_risky = _bandit()
    assert p_risky > 0.95
    assert all(r["lambda_"] == 0.0 for r in history)


def test_cvar_ppo_at_alpha_point_one_picks_the_safe_arm():
    # CVaR_0.1: -9 (risky) vs 0.5 (safe).
    history, p_risky = _bandit(risk_mode="cvar", alpha=0.1)
    assert p_risky < 0.05
    assert history[-1]["cvar"] == pytest.approx(0.5, abs=0.2)


@pytest.mark.parametrize("alpha,risky_wins", [(0.5, False), (0.95, True)])
def test_alpha_sweep_switches_arms_either_side_of_eleven_fifteenths(alpha, risky_wins):
    # CVaR_a(risky) = 2 - 1.1/a: -0.2 < 0.5 at a = 0.5, 0.842 > 0.5 at a = 0.95.
    _, p_risky = _bandit(risk_mode="cvar", alpha=alpha)
    assert (p_risky > 0.9) if risky_wins else (p_risky < 0.1)


def test_soft_risk_anneals_alpha_and_still_ends_in_the_tail_optimum():
    # A short anneal: CVaR_0.1 of a mix with p on the risky arm is 0.5 - 10.25 p for p < 0.947
    # but 4 p - 13 above it, so p = 1 is a local optimum; a long anneal that lets plain PPO
    # settle on the risky arm first would leave the policy there.
    history, p_risky = _bandit(risk_mode="cvar", alpha=0.1, soft_risk_fraction=0.1)
    alphas = [r["alpha"] for r in history]
    assert alphas[:5] == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1])
    assert all(a == pytest.approx(0.1) for a in alphas[4:])
    assert p_risky < 0.05


def test_mean_cvar_constraint_that_binds_pushes_off_the_risky_arm():
    # max E[R] s.t. CVaR_0.1 >= 0: mixing p of the risky arm has CVaR_0.1 = 0.5 - 10.25 p and
    # mean 0.5 + 0.4 p, so the optimum is p = 0.049: mostly safe, lambda_ > 0.
    history, p_risky = _bandit(alpha=0.1, beta=0.0, lambda_lr=0.05)
    assert p_risky < 0.2
    # Projected dual ascent, once per iteration: lambda_k = max(0, lambda_{k-1} + 0.05 (0 - CVaR_k)).
    lam = 0.0
    for r in history:
        lam = max(0.0, lam + 0.05 * (0.0 - r["cvar"]))
        assert r["lambda_"] == pytest.approx(lam, abs=1e-9)
    assert history[-1]["lambda_"] > 0.0
    late = [r["cvar"] for r in history[-10:]]
    assert np.mean(late) > -1.0  # near the floor, far above the risky arm's -9


def test_mean_cvar_constraint_that_is_slack_lets_lambda_fall_to_zero():
    # beta = -15 < -9: both arms are feasible, so the mean decides (risky) and lambda_ decays to 0.
    history, p_risky = _bandit(alpha=0.1, beta=-15.0, lambda_lr=0.05, lambda_init=1.0)
    assert p_risky > 0.9
    assert history[-1]["lambda_"] == 0.0


# --------------------------------------------------------------------------- oracles: delayed loss
def _delayed(iterations, **kw):
    settings = CVaRPPOSettings(seed=1, total_timesteps=iterations * 64 * 20, learning_rate=3e-3, num_steps=20, **kw)
    history, policy = train(settings, DelayedLossChoice(64, seed=1))
    with torch.no_grad():
        first_obs = torch.tensor([[1.0, 0.0, 0.0]])
        p_risky = torch.softmax(policy.actor(first_obs), -1)[0, RISKY].item()
    return history, p_risky


def test_delayed_loss_plain_ppo_takes_the_risky_path():
    # E[R] 1.5 (risky) vs 1.0 (safe): the loss comes 9 steps after the choice.
    _, p_risky = _delayed(100)
    assert p_risky > 0.8


def test_delayed_loss_cvar_ppo_takes_the_safe_path():
    # CVaR_0.1 -12 (risky) vs 1.0 (safe).
    history, p_risky = _delayed(60, risk_mode="cvar", alpha=0.1)
    assert p_risky < 0.05
    assert np.mean([r["cvar"] for r in history[-5:]]) > 0.0


def test_delayed_loss_mean_cvar_with_a_floor_takes_the_safe_path():
    _, p_risky = _delayed(60, alpha=0.1, beta=0.0, lambda_lr=0.05)
    assert p_risky < 0.2


@small_batches
def test_episodes_that_straddle_rollouts_count_once_with_their_whole_return():
    # 10-step episodes, 15-step rollouts: episodes end at global steps 9, 19, 29, ... so rollouts
    # alternately see one and two endings per copy; every R is a whole episode's: 1, 3 or -12.
    settings = CVaRPPOSettings(seed=2, total_timesteps=6 * 16 * 15, num_steps=15, risk_mode="cvar", alpha=0.5)
    history, _ = train(settings, DelayedLossChoice(16, seed=4))
    assert [r["episodes"] for r in history] == [16, 32, 16, 32, 16, 32]
    for r in history:
        assert min(abs(r["nu"] - v) for v in (1.0, 3.0, -12.0)) < 1e-5, r["nu"]
    assert any(abs(r["nu"] - 1.0) < 1e-5 for r in history)


def test_warns_when_the_tail_holds_too_few_episodes_to_estimate():
    settings = CVaRPPOSettings(total_timesteps=2 * 4 * 10, num_steps=10, risk_mode="cvar", alpha=0.1)
    with pytest.warns(UserWarning, match="tail holds 0.4"):
        train(settings, DelayedLossChoice(4, seed=0))


# --------------------------------------------------------------------------- trading env
def test_learns_to_go_long_in_a_steady_uptrend_despite_costs():
    # +0.1% every bar, 5 bp of costs: always long is optimal, R* = 64 * 0.001 - 0.0005 = 0.0635;
    # a uniformly random policy makes about -0.03.
    num_bars = 400
    close = 100 * np.exp(0.001 * np.arange(num_bars))
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(num_bars, 3)).astype(np.float32)  # uninformative features
    env = TradingEnv(feats, close=close, window=4, episode_length=64, num_envs=32, commission=0.0003,
                     slippage=0.0002, seed=0)
    settings = CVaRPPOSettings(seed=3, total_timesteps=50 * 32 * 64, learning_rate=3e-3, num_steps=64)
    history, policy = train(settings, env)
    assert history[0]["mean_return"] < 0.0
    assert history[-1]["mean_return"] > 0.85 * 0.0635
    obs = torch.cat([env.step(torch.full((32,), 2))[0] for _ in range(64)])  # states along a long episode
    with torch.no_grad():
        greedy = policy.actor(obs).argmax(1)
    assert (greedy == 2).float().mean().item() > 0.95


# --------------------------------------------------------------------------- determinism and resume
def _small_run_settings(**kw):
    return CVaRPPOSettings(seed=7, total_timesteps=6 * 16 * 20, learning_rate=1e-3, num_steps=20,
                           risk_mode="mean_cvar", alpha=0.2, beta=0.5, lambda_lr=0.1, soft_risk_fraction=0.5, **kw)


def _assert_same_run(a, b):
    (history_a, policy_a), (history_b, policy_b) = a, b
    assert len(history_a) == len(history_b)
    for ra, rb in zip(history_a, history_b):
        np.testing.assert_equal(ra, rb)  # exact, NaN == NaN
    for (na, ta), (nb, tb) in zip(policy_a.state_dict().items(), policy_b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na


@small_batches
def test_same_seed_gives_identical_numbers_and_another_seed_does_not():
    a = train(_small_run_settings(), DelayedLossChoice(16, seed=3))
    b = train(_small_run_settings(), DelayedLossChoice(16, seed=3))
    _assert_same_run(a, b)
    c = train(dataclasses.replace(_small_run_settings(), seed=8), DelayedLossChoice(16, seed=3))
    assert not torch.equal(a[1].actor[0].weight, c[1].actor[0].weight)
    # lambda_ moved, so the dual ascent actually ran in the compared runs.
    assert any(r["lambda_"] > 0 for r in a[0])


@small_batches
def test_checkpoint_resume_continues_with_identical_numbers(tmp_path):
    settings = _small_run_settings()
    uninterrupted = train(settings, DelayedLossChoice(16, seed=3))

    path = tmp_path / "ckpt.pt"
    history, _ = train(settings, DelayedLossChoice(16, seed=3), lambda r: r["iteration"] < 3,
                       checkpoint_path=path, checkpoint_every=100)
    assert [r["iteration"] for r in history] == [1, 2, 3]
    # A fresh env built with another seed: the checkpoint carries the env's state too.
    resumed = train(settings, DelayedLossChoice(16, seed=999), resume_from=path)
    assert [r["global_step"] for r in resumed[0]] == [320 * i for i in range(1, 7)]
    _assert_same_run(uninterrupted, resumed)


@small_batches
def test_resume_refuses_other_settings(tmp_path):
    path = tmp_path / "ckpt.pt"
    train(_small_run_settings(), DelayedLossChoice(16, seed=3), lambda r: False, checkpoint_path=path)
    with pytest.raises(ValueError, match="learning_rate"):
        train(dataclasses.replace(_small_run_settings(), learning_rate=0.5), DelayedLossChoice(16, seed=3),
              resume_from=path)


# --------------------------------------------------------------------------- ONNX
def test_onnx_export_matches_torch_with_a_dynamic_batch(tmp_path):
    import onnxruntime as ort

    policy = ActorCritic(obs_dim=35, num_actions=3, action_values=torch.tensor([-1.0, 0.0, 1.0]), seed=0)
    with torch.no_grad():  # move the head off its near-uniform init so argmax is not a coin toss
        policy.actor[-1].weight.mul_(100.0)
    path = tmp_path / "policy.onnx"
    max_diff = export_onnx(policy, path, obs_dim=35, metadata={"window": 4, "feature_spec_hash": "abc123"})
    assert max_diff < 1e-5
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta == {"obs_dim": "35", "action_values": "[-1.0, 0.0, 1.0]", "window": "4", "feature_spec_hash": "abc123"}
    assert [i.name for i in session.get_inputs()] == ["obs"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probs", "target_position"]
    g = torch.Generator().manual_seed(1)
    for rows in (1, 1000):
        obs = torch.randn(rows, 35, generator=g)
        logits, probs, position = session.run(None, {"obs": obs.numpy()})
        with torch.no_grad():
            want = policy.actor(obs)
        assert np.abs(logits - want.numpy()).max() < 1e-5
        assert np.allclose(probs.sum(1), 1.0, atol=1e-6)
        assert np.array_equal(position, np.array([-1.0, 0.0, 1.0], np.float32)[want.argmax(1).numpy()])
    with pytest.raises(ValueError, match="obs_dim"):
        export_onnx(policy, tmp_path / "bad.onnx", obs_dim=34)
