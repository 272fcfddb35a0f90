"""CVaR-PPO: proximal policy optimisation of an episode's tail risk, on a batched torch env.

For: training a discrete-action policy (target positions, for trading) that
maximises the mean episode return, the CVaR of it, or the mean subject to a
CVaR floor; saving and resuming that training exactly; exporting the policy to
ONNX for the ensemble. It runs on any env with the ``BatchedEnv`` interface
(``core.rl.env.TradingEnv``, the oracle toys in ``core.rl.oracle_envs``).
Not for: scheduling, storage or Ray (the learner actor wraps this), nor
continuous actions.

Read top to bottom in the order the algorithm runs: settings, env interface,
agent, advantages (GAE and the CVaR terms), the PPO update, the training loop,
checkpoints, ONNX export.

Equations, with the names used in the code
------------------------------------------
PPO (Schulman et al. 2017, as in CleanRL's ``ppo.py``), per minibatch:

    ratio      = pi(a|s) / pi_old(a|s)
    pg_loss    = mean(max(-advantages * ratio, -advantages * clip(ratio, 1 - clip_coef, 1 + clip_coef)))
    v_loss     = 0.5 * mean((V(s) - returns)^2)           (optionally clipped around V_old)
    loss       = pg_loss - ent_coef * entropy + vf_coef * v_loss
    approx_kl  = mean((ratio - 1) - log(ratio))            (k3 estimator; stop when > target_kl)

GAE (Schulman et al. 2016), ``done_t`` meaning the episode ended at step t:

    delta_t    = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t)
    A_t        = delta_t + gamma * gae_lambda * (1 - done_t) * A_{t+1};   returns = A + V

The risk terms use R, an episode's undiscounted summed reward (for trading, its
log wealth ratio), and ``nu``, the empirical alpha-quantile (VaR) of the R of
the episodes that ended in the rollout (``core.rl.cvar``). With the
Rockafellar-Uryasev form ``CVaR_alpha(R) = max_nu nu - E[(nu - R)^+] / alpha``:

(a) ``risk_mode="cvar"`` maximises CVaR_alpha(R) (Tamar et al. 2015):
    ``grad CVaR = (1/alpha) E[(R - nu) 1{R <= nu} sum_t grad log pi(a_t|s_t)]``,
    so every step of an episode gets ``advantages_t = (R - nu) 1{R <= nu}``:
    only tail episodes carry the gradient. No critic is used for it (the critic
    still trains, on the plain returns, so the code path stays one). Steps of
    episodes that have not ended by the rollout's end have no R yet and are left
    out of the policy loss; a ``num_steps`` that is a multiple of the episode
    length loses none.

(b) ``risk_mode="mean_cvar"`` maximises E[R] subject to CVaR_alpha(R) >= beta via
    the Lagrangian ``E[R] + lambda_ (CVaR_alpha(R) - beta)``. At the maximising
    nu (envelope theorem) its policy gradient is that of
    ``E[R - (lambda_/alpha) (nu - R)^+]``: each episode's terminal reward gets
    the shaping ``-(lambda_/alpha) (nu - R)^+``, then GAE and PPO as usual (the
    critic sees the episode's return so far, on which the shaping depends).
    The multiplier follows projected dual ascent once per iteration, slower than
    the policy's many minibatch steps:
    ``lambda_ <- max(0, lambda_ + lambda_lr * (beta - CVaR_alpha))``.
    With alpha = 1 and lambda_ = 0 the shaping is zero: plain PPO on the same
    code path, the risk-neutral baseline (the default settings).

Soft risk (Greenberg et al. 2022): the level used at progress p (fraction of
``total_timesteps`` done) is ``alpha + (1 - alpha) * max(0, 1 - p / soft_risk_fraction)``,
annealing from 1 (the mean) to ``alpha``, so early training sees every episode
and not only the few in a narrow tail. The dual ascent uses the same level.

Scale: ``beta`` is in return units and ``lambda_lr`` in 1/return units, so a
trading run (returns ~0.01) needs a larger ``lambda_lr`` than the toys (~1).
Determinism: every random draw comes from seeded generators (policy init,
actions and minibatch order here; episode starts in the env), so the same
seeds on CPU give the same numbers, and a checkpoint holds their states.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import torch
from torch import nn

from core.rl.cvar import empirical_cvar

__all__ = [
    "CVaRPPOSettings",
    "BatchedEnv",
    "ActorCritic",
    "compute_gae",
    "episode_returns_per_step",
    "cvar_advantages",
    "shape_terminal_rewards",
    "soft_risk_alpha",
    "ppo_update",
    "TrainingState",
    "train",
    "save_checkpoint",
    "load_checkpoint",
    "export_onnx",
]


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CVaRPPOSettings:
    """Everything that decides a CVaR-PPO run besides the env. Defaults: plain PPO."""

    seed: int = 1
    """seeds policy initialisation, action sampling and minibatch order"""
    total_timesteps: int = 1_000_000
    """env steps (summed over copies) to train for"""
    learning_rate: float = 2.5e-4
    """Adam step size of actor and critic"""
    anneal_lr: bool = True
    """decay the step size linearly to 0 over training"""
    num_steps: int = 128
    """steps per env copy per rollout; a multiple of the episode length keeps every episode whole"""
    gamma: float = 1.0
    """discount; 1 because the objective is the undiscounted episode return (log wealth)"""
    gae_lambda: float = 0.95
    """GAE's bias-variance trade-off"""
    num_minibatches: int = 4
    """minibatches per epoch; minibatch_size = num_envs * num_steps / num_minibatches"""
    update_epochs: int = 4
    """passes over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch (over the steps that carry policy gradient)"""
    clip_coef: float = 0.2
    """PPO's ratio clip epsilon"""
    clip_vloss: bool = True
    """clip the value update around the old values, as PPO's paper code does"""
    ent_coef: float = 0.01
    """entropy bonus weight"""
    vf_coef: float = 0.5
    """value loss weight"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    target_kl: float | None = 0.02
    """stop the update early once a minibatch's approx_kl exceeds this; None never stops"""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """widths of the tanh MLP layers, the same for actor and critic"""
    risk_mode: Literal["mean_cvar", "cvar"] = "mean_cvar"
    """'mean_cvar': max E[R] s.t. CVaR_alpha(R) >= beta (Lagrangian); 'cvar': max CVaR_alpha(R)"""
    alpha: float = 1.0
    """CVaR level in (0, 1]: the fraction of worst episodes averaged; 1 is the mean"""
    soft_risk_fraction: float = 0.0
    """fraction of training over which the level anneals from 1 to alpha; 0 uses alpha throughout.
    Keep it short of the policy's convergence: CVaR is not concave in the policy, and a policy
    that has settled on the mean-optimal action can sit in a local CVaR optimum (see the bandit test)"""
    beta: float = 0.0
    """CVaR floor of the mean_cvar constraint, in episode-return units"""
    lambda_init: float = 0.0
    """starting Lagrange multiplier lambda_ (>= 0)"""
    lambda_lr: float = 0.0
    """dual ascent step of lambda_ per iteration; 0 keeps lambda_ fixed"""

    def __post_init__(self) -> None:
        if not (0.0 < self.alpha <= 1.0):
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.risk_mode not in ("mean_cvar", "cvar"):
            raise ValueError(f"risk_mode must be 'mean_cvar' or 'cvar', got {self.risk_mode!r}")
        if self.lambda_init < 0 or self.lambda_lr < 0:
            raise ValueError("lambda_init and lambda_lr must be >= 0")
        if not (0.0 <= self.soft_risk_fraction <= 1.0):
            raise ValueError("soft_risk_fraction must be in [0, 1]")
        if self.num_steps < 1 or self.num_minibatches < 1 or self.update_epochs < 1:
            raise ValueError("num_steps, num_minibatches and update_epochs must be >= 1")


# --------------------------------------------------------------------------- env interface
class BatchedEnv(Protocol):
    """``num_envs`` copies stepped together. ``step`` returns (next obs, reward, done), one row
    per copy; a copy whose episode ended returns the first observation of its next one.
    ``state_dict``/``load_state_dict`` capture everything that decides future steps (for
    exact resumes); ``action_values``, if present, maps action index to target position."""

    num_envs: int
    obs_dim: int
    num_actions: int
    device: torch.device

    def reset(self) -> torch.Tensor: ...
    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------- agent
def _layer(n_in: int, n_out: int, std: float, generator: torch.Generator) -> nn.Linear:
    # Orthogonal init with CleanRL's gains: small policy head = near-uniform first policy.
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, std, generator=generator)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(n_in: int, hidden: tuple[int, ...], n_out: int, out_std: float, g: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [_layer(n_in, h, math.sqrt(2), g), nn.Tanh()]
        n_in = h
    layers.append(_layer(n_in, n_out, out_std, g))
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """Separate tanh MLPs. The actor sees the observation; the critic also sees the
    episode's return so far (cumulative P&L), because the CVaR shaping makes the
    value depend on it. ``action_values`` maps action index to target position."""

    def __init__(self, obs_dim: int, num_actions: int, hidden_sizes: tuple[int, ...] = (64, 64),
                 action_values: torch.Tensor | None = None, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.obs_dim, self.num_actions = obs_dim, num_actions
        self.critic = _mlp(obs_dim + 1, tuple(hidden_sizes), 1, 1.0, g)
        self.actor = _mlp(obs_dim, tuple(hidden_sizes), num_actions, 0.01, g)
        values = torch.arange(num_actions, dtype=torch.float32) if action_values is None else action_values
        self.register_buffer("action_values", values.detach().clone().float().cpu())

    def get_value(self, obs: torch.Tensor, cum_return: torch.Tensor) -> torch.Tensor:
        return self.critic(torch.cat([obs, cum_return[:, None]], dim=1)).squeeze(-1)

    def get_action_and_value(
        self, obs: torch.Tensor, cum_return: torch.Tensor, action: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(action, log pi(action|obs), entropy, value); samples the action when none is given."""
        logits = self.actor(obs)
        log_probs = torch.log_softmax(logits, dim=-1)
        if action is None:
            # multinomial with our generator, not Categorical.sample: the draw must be seeded.
            action = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
        logprob = log_probs.gather(1, action[:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return action, logprob, entropy, self.get_value(obs, cum_return)


# --------------------------------------------------------------------------- advantages
def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, next_value: torch.Tensor,
                gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) from ``[S, N]`` rollouts; ``dones[t]``: the episode ended at step t,
    so nothing is bootstrapped across it. ``next_value``: V of the observation after the last step."""
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(num_steps)):
        nextvalues = next_value if t == num_steps - 1 else values[t + 1]
        nextnonterminal = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


def episode_returns_per_step(return_after_step: torch.Tensor, dones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, has_ended): for each step of ``[S, N]`` rollouts, the return R of the episode it belongs
    to, and whether that episode ended within the rollout (else R is 0 and unknown).
    ``return_after_step[t]`` is the episode's running return including step t, which is R
    at the step that ends it; earlier rollouts' steps of the same episode are included in it."""
    episode_return = torch.zeros_like(return_after_step)
    has_ended = torch.zeros_like(dones)
    R = torch.zeros_like(return_after_step[0])
    ended = torch.zeros_like(dones[0])
    for t in reversed(range(dones.shape[0])):
        R = torch.where(dones[t], return_after_step[t], R)
        ended = ended | dones[t]
        episode_return[t], has_ended[t] = R, ended
    return episode_return, has_ended


def cvar_advantages(episode_return: torch.Tensor, has_ended: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """Pure-CVaR advantages ``(R - nu) 1{R <= nu}`` per step (0 where the episode has not ended)."""
    tail = has_ended & (episode_return <= nu)
    return torch.where(tail, episode_return - nu, torch.zeros_like(episode_return))


def shape_terminal_rewards(rewards: torch.Tensor, dones: torch.Tensor, return_after_step: torch.Tensor,
                           nu: torch.Tensor, lambda_: float, alpha: float) -> torch.Tensor:
    """``r_t - (lambda_/alpha) (nu - R)^+`` at steps that end an episode, ``r_t`` elsewhere."""
    shortfall = (nu - return_after_step).clamp(min=0.0)
    return rewards - dones.float() * (lambda_ / alpha) * shortfall


def soft_risk_alpha(alpha: float, progress: float, soft_risk_fraction: float) -> float:
    """The CVaR level at ``progress`` in [0, 1]: 1 at the start, ``alpha`` from ``soft_risk_fraction`` on."""
    if soft_risk_fraction <= 0.0:
        return alpha
    return alpha + (1.0 - alpha) * max(0.0, 1.0 - progress / soft_risk_fraction)


# --------------------------------------------------------------------------- PPO update
def ppo_update(policy: ActorCritic, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               settings: CVaRPPOSettings, minibatch_size: int, generator: torch.Generator) -> dict[str, float]:
    """Clipped-surrogate PPO epochs over one flattened rollout (equations in the module docstring).

    ``batch`` holds ``obs, cum_return, actions, logprobs, advantages, returns, values`` and
    ``pg_mask`` (1 where a step carries policy gradient). Stops early, before the optimizer
    step, once a minibatch's ``approx_kl`` exceeds ``settings.target_kl`` (as SB3 does), so
    the policy never moves on a minibatch already known to be too far.
    """
    batch_size = batch["actions"].shape[0]
    stats = dict(pg_loss=math.nan, v_loss=math.nan, entropy=math.nan, approx_kl=math.nan, epochs=0.0,
                 early_stop=0.0)
    clipfracs = []
    for epoch in range(settings.update_epochs):
        perm = torch.randperm(batch_size, generator=generator, device=batch["actions"].device)
        for start in range(0, batch_size, minibatch_size):
            mb = perm[start:start + minibatch_size]
            _, newlogprob, entropy, newvalue = policy.get_action_and_value(
                batch["obs"][mb], batch["cum_return"][mb], batch["actions"][mb])
            logratio = newlogprob - batch["logprobs"][mb]
            ratio = logratio.exp()
            with torch.no_grad():
                approx_kl = ((ratio - 1) - logratio).mean().item()
                clipfracs.append(((ratio - 1.0).abs() > settings.clip_coef).float().mean().item())
            stats["approx_kl"] = approx_kl
            if settings.target_kl is not None and approx_kl > settings.target_kl:
                stats["early_stop"] = 1.0
                break

            mask = batch["pg_mask"][mb]
            n_pg = mask.sum().clamp(min=1.0)
            advantages = batch["advantages"][mb]
            if settings.norm_adv:
                mean = (advantages * mask).sum() / n_pg
                std = (((advantages - mean) * mask).pow(2).sum() / n_pg).sqrt()
                advantages = (advantages - mean) / (std + 1e-8)
            pg_loss1 = -advantages * ratio
            pg_loss2 = -advantages * torch.clamp(ratio, 1 - settings.clip_coef, 1 + settings.clip_coef)
            pg_loss = (torch.max(pg_loss1, pg_loss2) * mask).sum() / n_pg

            returns, values = batch["returns"][mb], batch["values"][mb]
            if settings.clip_vloss:
                v_loss_unclipped = (newvalue - returns) ** 2
                v_clipped = values + torch.clamp(newvalue - values, -settings.clip_coef, settings.clip_coef)
                v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - returns) ** 2).mean()
            else:
                v_loss = 0.5 * ((newvalue - returns) ** 2).mean()

            entropy_loss = entropy.mean()
            loss = pg_loss - settings.ent_coef * entropy_loss + settings.vf_coef * v_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), settings.max_grad_norm)
            optimizer.step()
            stats.update(pg_loss=pg_loss.item(), v_loss=v_loss.item(), entropy=entropy_loss.item())
        if stats["early_stop"]:
            break
        stats["epochs"] = float(epoch + 1)
    stats["clipfrac"] = float(np.mean(clipfracs))
    return stats


# --------------------------------------------------------------------------- training loop
@dataclass
class TrainingState:
    """Everything that, with the settings and the env's own state, decides the rest of a run."""

    policy: ActorCritic
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    """draws actions and minibatch order"""
    next_obs: torch.Tensor
    episode_return: torch.Tensor
    """each copy's running return of its current episode (the critic's cumulative P&L input)"""
    lambda_: float
    iteration: int = 0
    """iterations completed"""
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _new_state(settings: CVaRPPOSettings, env: BatchedEnv) -> TrainingState:
    policy = ActorCritic(env.obs_dim, env.num_actions, settings.hidden_sizes,
                         getattr(env, "action_values", None), seed=settings.seed).to(env.device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=settings.learning_rate, eps=1e-5)
    generator = torch.Generator(device=env.device).manual_seed(settings.seed + 1)
    next_obs = env.reset()
    return TrainingState(policy, optimizer, generator, next_obs,
                         torch.zeros(env.num_envs, device=env.device), settings.lambda_init)


def train(
    settings: CVaRPPOSettings,
    env: BatchedEnv,
    progress_callback: Callable[[dict[str, float]], bool | None] | None = None,
    *,
    resume_from: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 10,
) -> tuple[list[dict[str, float]], ActorCritic]:
    """Train on ``env``; returns (history, policy).

    ``history`` has one record per iteration: global_step, mean_return and cvar (at the target
    alpha) of the episodes that ended in that rollout, nu and alpha (the level used),
    lambda_ (after its update), approx_kl and the losses. ``progress_callback(record)`` is
    called after each iteration; returning False stops training there. With
    ``checkpoint_path`` a checkpoint is written every ``checkpoint_every`` iterations and
    when training stops; ``resume_from`` continues one exactly (same settings required).
    """
    num_envs = env.num_envs
    batch_size = num_envs * settings.num_steps
    minibatch_size = batch_size // settings.num_minibatches
    num_iterations = settings.total_timesteps // batch_size
    if minibatch_size < 1 or num_iterations < 1:
        raise ValueError(f"total_timesteps {settings.total_timesteps} must cover one batch of {batch_size} "
                         f"and num_minibatches {settings.num_minibatches} must not exceed it")
    if resume_from is not None:
        state = load_checkpoint(resume_from, env, settings)
    else:
        state = _new_state(settings, env)
    policy, device = state.policy, env.device

    obs = torch.zeros((settings.num_steps, num_envs, env.obs_dim), device=device)
    actions = torch.zeros((settings.num_steps, num_envs), dtype=torch.long, device=device)
    logprobs = torch.zeros((settings.num_steps, num_envs), device=device)
    rewards = torch.zeros((settings.num_steps, num_envs), device=device)
    dones = torch.zeros((settings.num_steps, num_envs), dtype=torch.bool, device=device)
    values = torch.zeros((settings.num_steps, num_envs), device=device)
    cum_return = torch.zeros((settings.num_steps, num_envs), device=device)
    return_after_step = torch.zeros((settings.num_steps, num_envs), device=device)

    warned_thin_tail = False
    while state.iteration < num_iterations:
        iteration = state.iteration + 1
        progress = (iteration - 1) / num_iterations
        if settings.anneal_lr:
            state.optimizer.param_groups[0]["lr"] = (1.0 - progress) * settings.learning_rate
        alpha = soft_risk_alpha(settings.alpha, progress, settings.soft_risk_fraction)

        # Rollout: num_steps decisions in every copy.
        with torch.no_grad():
            for step in range(settings.num_steps):
                obs[step] = state.next_obs
                cum_return[step] = state.episode_return
                action, logprob, _, value = policy.get_action_and_value(
                    state.next_obs, state.episode_return, generator=state.generator)
                actions[step], logprobs[step], values[step] = action, logprob, value
                state.next_obs, reward, done = env.step(action)
                rewards[step], dones[step] = reward, done
                running = state.episode_return + reward
                return_after_step[step] = running
                state.episode_return = torch.where(done, torch.zeros_like(running), running)
            state.global_step += batch_size
            next_value = policy.get_value(state.next_obs, state.episode_return)

            # The risk terms from the episodes that ended in this rollout.
            ended_returns = return_after_step[dones]
            have_episodes = ended_returns.numel() > 0
            if settings.alpha < 1.0 and ended_returns.numel() * settings.alpha < 10 and not warned_thin_tail:
                warned_thin_tail = True  # once per run: the estimate, not the code, is at fault
                warnings.warn(f"{ended_returns.numel()} episodes ended in the rollout, so the alpha={settings.alpha} "
                              f"tail holds {ended_returns.numel() * settings.alpha:.1f} of them; nu and CVaR will be "
                              "noisy. Raise num_envs or num_steps.", stacklevel=2)
            if have_episodes:
                cvar_alpha, nu = empirical_cvar(ended_returns, alpha)
                cvar_target = empirical_cvar(ended_returns, settings.alpha)[0].item()
            else:
                cvar_alpha, nu, cvar_target = torch.tensor(math.nan), torch.tensor(math.nan), math.nan

            if settings.risk_mode == "mean_cvar":
                shaped = rewards
                if have_episodes and state.lambda_ > 0.0:
                    shaped = shape_terminal_rewards(rewards, dones, return_after_step, nu, state.lambda_, alpha)
                advantages, returns = compute_gae(shaped, values, dones, next_value, settings.gamma,
                                                  settings.gae_lambda)
                pg_mask = torch.ones_like(rewards)
            else:
                _, returns = compute_gae(rewards, values, dones, next_value, settings.gamma, settings.gae_lambda)
                episode_return, has_ended = episode_returns_per_step(return_after_step, dones)
                advantages = cvar_advantages(episode_return, has_ended, nu) if have_episodes else torch.zeros_like(rewards)
                pg_mask = has_ended.float()

        batch = dict(obs=obs.reshape(-1, env.obs_dim), cum_return=cum_return.reshape(-1),
                     actions=actions.reshape(-1), logprobs=logprobs.reshape(-1), advantages=advantages.reshape(-1),
                     returns=returns.reshape(-1), values=values.reshape(-1), pg_mask=pg_mask.reshape(-1))
        stats = ppo_update(policy, state.optimizer, batch, settings, minibatch_size, state.generator)

        # Dual ascent on beta - CVaR, once per iteration: slower than the policy's minibatch steps.
        if settings.risk_mode == "mean_cvar" and settings.lambda_lr > 0.0 and have_episodes:
            state.lambda_ = max(0.0, state.lambda_ + settings.lambda_lr * (settings.beta - cvar_alpha.item()))

        record = dict(
            iteration=iteration, global_step=state.global_step,
            mean_return=ended_returns.mean().item() if have_episodes else math.nan,
            cvar=cvar_target, nu=nu.item(), alpha=alpha, lambda_=state.lambda_,
            episodes=int(ended_returns.numel()), **stats,
        )
        state.history.append(record)
        state.iteration = iteration
        stop = progress_callback is not None and progress_callback(record) is False
        finished = stop or state.iteration == num_iterations
        if checkpoint_path is not None and (finished or state.iteration % checkpoint_every == 0):
            save_checkpoint(checkpoint_path, state, env, settings)
        if stop:
            break
    return state.history, policy


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, state: TrainingState, env: BatchedEnv, settings: CVaRPPOSettings) -> None:
    """Write policy and optimizer state dicts, step counters, lambda_, the RNG states and the
    env's state, so that ``train(..., resume_from=path)`` continues with identical numbers.
    Written to a temporary file first, so a crash mid-write leaves the old checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": dataclasses.asdict(settings),
        "policy": state.policy.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "generator": state.generator.get_state(),
        "next_obs": state.next_obs.cpu(),
        "episode_return": state.episode_return.cpu(),
        "lambda_": state.lambda_,
        "iteration": state.iteration,
        "global_step": state.global_step,
        "history": copy.deepcopy(state.history),
        "env": env.state_dict(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, env: BatchedEnv, settings: CVaRPPOSettings | None = None) -> TrainingState:
    """Rebuild the training state from ``path`` and restore ``env`` to where it was.

    ``settings``, if given, must equal the checkpoint's: resuming under other settings
    would not be the run that was saved. Loads with ``weights_only=True`` (no pickled code).
    """
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    saved = payload["settings"]
    saved["hidden_sizes"] = tuple(saved["hidden_sizes"])
    saved_settings = CVaRPPOSettings(**saved)
    if settings is not None and settings != saved_settings:
        diff = {k: (v, getattr(settings, k)) for k, v in saved.items() if getattr(settings, k) != v}
        raise ValueError(f"settings differ from the checkpoint's (saved, given): {diff}")
    state = _new_state(saved_settings, env)
    state.policy.load_state_dict(payload["policy"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.generator.set_state(payload["generator"])
    env.load_state_dict(payload["env"])
    state.next_obs = payload["next_obs"].to(env.device)
    state.episode_return = payload["episode_return"].to(env.device)
    state.lambda_ = float(payload["lambda_"])
    state.iteration = int(payload["iteration"])
    state.global_step = int(payload["global_step"])
    state.history = list(payload["history"])
    return state


# --------------------------------------------------------------------------- ONNX export
class _ExportedPolicy(nn.Module):
    """What the ensemble runs: observation rows in; logits, probabilities and the greedy
    target position out."""

    def __init__(self, policy: ActorCritic) -> None:
        super().__init__()
        self.actor = copy.deepcopy(policy.actor).cpu().eval()
        self.register_buffer("action_values", policy.action_values.detach().cpu().clone())

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.actor(obs)
        return logits, torch.softmax(logits, dim=-1), self.action_values[logits.argmax(dim=-1)]


def export_onnx(policy: ActorCritic, path: str | Path, obs_dim: int, *, metadata: dict[str, Any] | None = None,
                parity_rows: int = 256, tolerance: float = 1e-5) -> float:
    """Export the actor to ONNX with a dynamic batch axis and check it against torch.

    Inputs: ``obs`` float32 ``[batch, obs_dim]``. Outputs: ``logits`` and ``probs``
    ``[batch, num_actions]``, ``target_position`` ``[batch]`` (the greedy action's value).
    The model's metadata holds ``obs_dim`` and ``action_values`` (JSON) plus ``metadata``
    (e.g. the feature spec hash and window the policy was trained on), so a loader can
    refuse a model fed the wrong inputs. The check runs ONNX Runtime on the CPU provider
    over random rows and raises if logits or probs differ from torch by ``tolerance`` or
    more, or any position differs. Returns the largest absolute difference seen.
    """
    import json

    import onnx
    import onnxruntime as ort

    if obs_dim != policy.obs_dim:
        raise ValueError(f"obs_dim {obs_dim} does not match the policy's {policy.obs_dim}")
    module = _ExportedPolicy(policy)
    example = torch.zeros(2, obs_dim)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript
        # (not a dependency); it is still the supported path for a plain MLP.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["obs"], output_names=["logits", "probs", "target_position"],
                          dynamic_axes={"obs": {0: "batch"}, "logits": {0: "batch"}, "probs": {0: "batch"},
                                        "target_position": {0: "batch"}})
    model = onnx.load(str(path))
    props = {"obs_dim": str(obs_dim), "action_values": json.dumps(policy.action_values.tolist())}
    props.update({str(k): str(v) for k, v in (metadata or {}).items()})
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(parity_rows, obs_dim, generator=g)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"obs": rows.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in module(rows)]
    max_diff = max(float(np.abs(got[i] - want[i]).max()) for i in (0, 1))
    if not max_diff < tolerance or not np.array_equal(got[2], want[2]):
        raise RuntimeError(f"ONNX export disagrees with torch: max abs diff {max_diff:.3g} "
                           f"(tolerance {tolerance}), positions equal: {np.array_equal(got[2], want[2])}")
    return max_diff
