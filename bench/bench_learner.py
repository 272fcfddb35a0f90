"""Benchmark: raytrade's batched trading env and CVaR-PPO trainer against Stable-Baselines3's PPO.

Both sides run the same environment logic (``core.rl.env.TradingEnv``; SB3 gets a
gymnasium wrapper of ONE copy of it, the way an SB3 user would run it), the same
network sizes (tanh MLPs 64-64 for actor and critic), the same samples per
update, minibatch size and epochs, and no KL early stop, so both do the same
gradient work per sample; the difference measured is the batched rollout.
Everything runs in this one process, repeats interleaved across the cases, and
the medians of ``--repeats`` timed runs are printed with their ratios, by wall
clock and by this process's CPU time (the steadier figure on a shared machine).

Not a test: it asserts nothing and CI does not run it.

    python bench/bench_learner.py                  # CPU, about a minute
    python bench/bench_learner.py --device cuda    # our env and trainer on the GPU (SB3 stays on CPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from core.rl.cvar_ppo import CVaRPPOSettings, train  # noqa: E402
from core.rl.env import TradingEnv  # noqa: E402


def synthetic_market(num_bars: int, num_features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random-walk close and z-scored lagged log returns as features (causal: row t uses bars <= t)."""
    rng = np.random.default_rng(seed)
    log_returns = rng.normal(0.0, 0.01, num_bars)
    close = 100.0 * np.exp(np.cumsum(log_returns))
    feats = np.zeros((num_bars, num_features), np.float32)
    for k in range(num_features):
        feats[k:, k] = log_returns[: num_bars - k] / 0.01
    return feats, close


def make_env(args: argparse.Namespace, num_envs: int, device: str, seed: int = 0) -> TradingEnv:
    feats, close = synthetic_market(args.bars, args.features)
    return TradingEnv(feats, close=close, window=args.window, episode_length=args.episode_length,
                      num_envs=num_envs, commission=0.0005, slippage=0.0005, device=device, seed=seed)


def gym_env(args: argparse.Namespace):
    """One copy of the same env behind gymnasium's single-env interface, as SB3 wants it."""
    import gymnasium as gym

    class GymTradingEnv(gym.Env):
        def __init__(self) -> None:
            self.env = make_env(args, 1, "cpu")
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.env.obs_dim,), np.float32)
            self.action_space = gym.spaces.Discrete(self.env.num_actions)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return self.env.reset()[0].numpy(), {}

        def step(self, action):
            obs, reward, done = self.env.step(torch.as_tensor([int(action)]))
            return obs[0].numpy(), float(reward[0]), bool(done[0]), False, {}

    return GymTradingEnv()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def our_env_case(args, num_envs: int, device: str, steps: int):
    """(steps per call, call): ``steps`` batched steps of ``num_envs`` copies with random actions."""
    env = make_env(args, num_envs, device)
    env.reset()
    g = torch.Generator(device=device).manual_seed(0)
    actions = [torch.randint(0, env.num_actions, (num_envs,), generator=g, device=device) for _ in range(64)]
    for a in actions[:8]:  # warm-up (allocator, CUDA context)
        env.step(a)

    def run():
        for i in range(steps):
            env.step(actions[i % 64])

    return num_envs * steps, run


def sb3_env_case(args, steps: int):
    """(steps per call, call): SB3's DummyVecEnv over one gymnasium copy, random actions."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv([lambda: gym_env(args)])
    venv.reset()
    actions = np.random.default_rng(0).integers(0, 3, (steps, 1))

    def run():
        for i in range(steps):
            venv.step(actions[i])

    return steps, run


def ppo_settings(args, batch_size: int, iterations: int, **risk) -> CVaRPPOSettings:
    return CVaRPPOSettings(seed=1, total_timesteps=iterations * batch_size, learning_rate=3e-4,
                           num_steps=args.num_steps, num_minibatches=args.num_minibatches,
                           update_epochs=args.update_epochs, target_kl=None, hidden_sizes=(64, 64), **risk)


def our_training_case(args, device: str, **risk):
    """(steps per call, call): a fresh env and ``--iterations`` of rollout + update."""
    batch_size = args.num_envs * args.num_steps
    train(ppo_settings(args, batch_size, 1, **risk), make_env(args, args.num_envs, device))  # warm-up

    def run():
        train(ppo_settings(args, batch_size, args.iterations, **risk), make_env(args, args.num_envs, device))

    return args.iterations * batch_size, run


def sb3_training_case(args):
    """(steps per call, call): a fresh SB3 PPO with our sizes, ``--sb3-iterations`` of rollout + update."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    n_steps = args.num_envs * args.num_steps  # same samples per update as ours

    def make():
        return PPO("MlpPolicy", DummyVecEnv([lambda: gym_env(args)]), n_steps=n_steps,
                   batch_size=n_steps // args.num_minibatches, n_epochs=args.update_epochs, learning_rate=3e-4,
                   gamma=1.0, gae_lambda=0.95, clip_range=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5,
                   target_kl=None, device="cpu", seed=1, verbose=0,
                   policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=torch.nn.Tanh))

    def run():
        make().learn(total_timesteps=n_steps * args.sb3_iterations)

    return n_steps * args.sb3_iterations, run


def measure(cases: dict[str, tuple[int, object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU-time) steps/s per case. Repeats are interleaved across cases so a
    neighbour's load on a shared machine falls on all of them alike."""
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, (steps, run) in cases.items():
            _sync()
            w0, c0 = time.perf_counter(), time.process_time()
            run()
            _sync()
            wall[name].append(steps / (time.perf_counter() - w0))
            cpu[name].append(steps / max(time.process_time() - c0, 1e-9))
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in cases}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="where our env and trainer run (cpu, cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for both sides")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure; medians are printed")
    p.add_argument("--bars", type=int, default=20_000)
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--episode-length", type=int, default=64)
    p.add_argument("--num-envs", type=int, default=128, help="our env copies while training")
    p.add_argument("--num-steps", type=int, default=64, help="our steps per copy per rollout")
    p.add_argument("--num-minibatches", type=int, default=4)
    p.add_argument("--update-epochs", type=int, default=4)
    p.add_argument("--iterations", type=int, default=5, help="our training iterations per timed run")
    p.add_argument("--sb3-iterations", type=int, default=1, help="SB3 rollout+update cycles per timed run")
    p.add_argument("--env-steps", type=int, default=2000, help="steps per timed run of our env")
    p.add_argument("--sb3-env-steps", type=int, default=20_000, help="steps per timed run of SB3's vec env")
    p.add_argument("--big-envs", type=int, default=0, help="copies for the large-batch env figure "
                   "(default 4096 on CPU, 262144 on CUDA)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no CUDA GPU")
    big = args.big_envs or (262_144 if device.startswith("cuda") else 4096)
    import stable_baselines3

    print(f"torch {torch.__version__}, stable-baselines3 {stable_baselines3.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else "")
          + f", {args.threads} CPU thread(s), medians of {args.repeats}")
    print(f"env: {args.bars} bars, window {args.window} x {args.features} features (obs {args.window * args.features + 3}),"
          f" episodes of {args.episode_length}; PPO: {args.num_envs * args.num_steps} samples/update, "
          f"{args.num_minibatches} minibatches x {args.update_epochs} epochs, MLP 64-64 tanh")

    env_cases = {
        f"env steps/s, ours ({args.num_envs} copies)": our_env_case(args, args.num_envs, device, args.env_steps),
        f"env steps/s, ours ({big} copies)": our_env_case(args, big, device,
                                                          max(50, args.env_steps * args.num_envs // big)),
        "env steps/s, SB3 DummyVecEnv (1 copy)": sb3_env_case(args, args.sb3_env_steps),
    }
    train_cases = {
        f"train steps/s, ours plain PPO ({args.num_envs} copies)": our_training_case(args, device),
        f"train steps/s, ours CVaR_0.1-PPO ({args.num_envs} copies)": our_training_case(
            args, device, risk_mode="cvar", alpha=0.1),
        "train steps/s, SB3 PPO (1 copy)": sb3_training_case(args),
    }
    results = {**measure(env_cases, args.repeats), **measure(train_cases, args.repeats)}
    sb3_env = results["env steps/s, SB3 DummyVecEnv (1 copy)"]
    sb3_train = results["train steps/s, SB3 PPO (1 copy)"]
    width = max(len(k) for k in results)
    print(f"{'':<{width}}  {'wall':>12}  {'vs SB3':>7}  {'CPU time':>12}  {'vs SB3':>7}")
    for name, (w, c) in results.items():
        base = sb3_env if name.startswith("env") else sb3_train
        print(f"{name:<{width}}  {w:>12,.0f}  {w / base[0]:>6.1f}x  {c:>12,.0f}  {c / base[1]:>6.1f}x")
    ours = results[next(iter(train_cases))]
    ratio = min(ours[0] / sb3_train[0], ours[1] / sb3_train[1])  # the less flattering of the two clocks
    print(f"training speed-up over SB3: {ours[0] / sb3_train[0]:.1f}x wall, {ours[1] / sb3_train[1]:.1f}x CPU time "
          f"(target >= 10x: {'met' if ratio >= 10 else 'NOT met'})")
    if device.startswith("cuda"):
        best = max(w for k, (w, _) in results.items() if k.startswith("env steps/s, ours"))
        print(f"GPU env steps/s: {best:,.0f} (target >= 1M: {'met' if best >= 1e6 else 'NOT met'})")


if __name__ == "__main__":
    main()
