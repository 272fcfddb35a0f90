"""Toy batched environments whose risk-neutral and CVaR-optimal choices are known by hand.

For: testing that CVaR-PPO optimises the tail it claims to (the oracles in
``tests/test_cvar_ppo.py``). Not for: trading; they share only the batched-env
interface of ``core.rl.cvar_ppo.BatchedEnv`` with ``core.rl.env.TradingEnv``.

Arithmetic, with R an episode's summed reward:

``TwoArmBandit`` (one step). Arm 0 (risky) pays +2 w.p. 0.95 and -20 w.p. 0.05;
arm 1 (safe) pays +0.5. E[R] = 0.9 vs 0.5. For alpha >= 0.05,
CVaR_alpha(risky) = (0.05 * -20 + (alpha - 0.05) * 2) / alpha = 2 - 1.1 / alpha,
which equals 0.5 at alpha = 11/15: below that the safe arm is CVaR-optimal,
above it the risky one (CVaR_0.1: -9 vs 0.5).

``DelayedLossChoice`` (10 steps). The first action picks risky (0): +0.3 a step
and -15 at the last step w.p. 0.1; or safe (1): +0.1 a step. Later actions do
nothing. E[R] = 1.5 vs 1.0; CVaR_0.1 = 3 - 15 = -12 vs 1.0.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TwoArmBandit", "DelayedLossChoice"]

RISKY, SAFE = 0, 1


class _AlignedEpisodes:
    """Shared plumbing: N copies, one generator, episodes that start and end together."""

    num_actions = 2

    def __init__(self, num_envs: int, device: str | torch.device, seed: int) -> None:
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._step = 0

    def _uniform(self) -> torch.Tensor:
        return torch.rand(self.num_envs, generator=self.generator, device=self.device)


class TwoArmBandit(_AlignedEpisodes):
    """One-step episodes: arm 0 risky (+2, or -20 w.p. ``p_loss``), arm 1 safe (+0.5)."""

    obs_dim = 1

    def __init__(self, num_envs: int = 64, *, p_loss: float = 0.05, win: float = 2.0, loss: float = -20.0,
                 safe: float = 0.5, device: str | torch.device = "cpu", seed: int = 0) -> None:
        super().__init__(num_envs, device, seed)
        self.p_loss, self.win, self.loss, self.safe = p_loss, win, loss, safe

    def reset(self) -> torch.Tensor:
        return torch.ones(self.num_envs, 1, device=self.device)

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lost = self._uniform() < self.p_loss
        risky = torch.where(lost, self.loss, self.win)
        reward = torch.where(actions == RISKY, risky, torch.full_like(risky, self.safe))
        done = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        return self.reset(), reward, done

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class DelayedLossChoice(_AlignedEpisodes):
    """Choose once at step 0; the risky path's loss, if any, arrives at the last step.

    Observation: [fraction of steps left, chose risky, chose safe].
    """

    obs_dim = 3

    def __init__(self, num_envs: int = 64, *, horizon: int = 10, risky_step: float = 0.3, safe_step: float = 0.1,
                 loss: float = -15.0, p_loss: float = 0.1, device: str | torch.device = "cpu", seed: int = 0) -> None:
        super().__init__(num_envs, device, seed)
        self.horizon, self.risky_step, self.safe_step = horizon, risky_step, safe_step
        self.loss, self.p_loss = loss, p_loss
        self._choice = torch.full((num_envs,), -1, dtype=torch.long, device=self.device)

    def _observe(self) -> torch.Tensor:
        left = torch.full((self.num_envs,), (self.horizon - self._step) / self.horizon, device=self.device)
        return torch.stack([left, (self._choice == RISKY).float(), (self._choice == SAFE).float()], dim=1)

    def reset(self) -> torch.Tensor:
        self._step = 0
        self._choice.fill_(-1)
        return self._observe()

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._step == 0:
            self._choice = actions.clone()
        risky = self._choice == RISKY
        reward = torch.where(risky, self.risky_step, self.safe_step)
        self._step += 1
        last = self._step == self.horizon
        if last:
            lost = risky & (self._uniform() < self.p_loss)
            reward = reward + torch.where(lost, self.loss, 0.0)
            self.reset()
        done = torch.full((self.num_envs,), last, dtype=torch.bool, device=self.device)
        return self._observe(), reward, done

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "step": self._step, "choice": self._choice.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._step = int(state["step"])
        self._choice = state["choice"].to(self.device)
