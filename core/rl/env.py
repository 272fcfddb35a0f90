"""A batched single-asset trading environment in torch, for training the CVaR-PPO learner.

For: stepping many trading episodes at once as tensors, on CPU or GPU, over a
fixed history of per-bar features and prices. Not for: backtesting a strategy
for reporting (that is the backtest engine's job, with fills, order types and
a ledger), nor for live trading. It knows nothing of how features are made:
it takes the feature matrix, so ``core.features`` is imported only by
``TradingEnv.from_bars``.

Timing, which is where look-ahead bugs live. Row ``t`` of ``features`` may use
information up to and including bar ``t``'s close; ``log_returns[t] =
log(close[t] / close[t-1])`` is the return *of* bar ``t``. At decision time
``t`` the agent sees feature rows ``t-W+1 .. t`` and picks a target position
``p_t``, traded at close ``t`` and held to close ``t+1``. So the reward of that
step is

    reward_t = p_t * log_returns[t+1] - (commission + slippage) * |p_t - p_{t-1}|

with costs as fractions of the traded notional. ``p * log_return`` is the
log-return P&L convention: exact log-wealth growth for positions 0 and 1, a
first-order approximation (error O(p(1-p) r^2)) otherwise; the cost term is
the first-order form of ``log(1 - c |dp|)``.

An episode is a random window of ``episode_length`` (L) decisions starting flat;
its return ``R = sum of rewards`` is the episode's log wealth ratio
``log(final / initial wealth)``. The last position is marked to market, not
closed. All copies start and end together (aligned episodes), so a rollout of
a multiple of L steps holds whole episodes and the step counter needs no
device sync. Episodes reset automatically: the step that ends one returns
``done = True`` and the first observation of the next.

Observation, one flat float32 row per copy (``split_obs`` takes it apart):
the feature window (W rows of F, oldest first), the position held going into
the decision, the episode's log wealth so far, and the fraction of the
episode's decisions left (1 at the first, 1/L at the last).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["TradingEnv"]


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if hasattr(x, "to_numpy"):  # pandas
        x = x.to_numpy()
    try:
        return torch.from_numpy(np.array(x, dtype=np.float64))  # a copy: inputs may be read-only
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric: {e}") from None


class TradingEnv:
    """``num_envs`` copies of a single-asset episode over one price history.

    Args:
        features: ``[T, F]`` per-bar features (row ``t`` known at bar ``t``'s close).
        close: ``[T]`` close prices; give this or ``log_returns``.
        log_returns: ``[T]`` log returns, ``log_returns[t]`` from close ``t-1`` to ``t``
            (entry 0 is never used).
        window: W, feature rows in each observation.
        episode_length: L, decisions per episode.
        num_envs: copies stepped at once.
        positions: the action grid: action ``i`` means target position ``positions[i]``,
            each in [-1, 1]. Default short/flat/long.
        commission: fraction of traded notional paid as commission.
        slippage: fraction of traded notional lost to slippage.
        device: where the tensors live ("cpu", "cuda", ...).
        seed: seeds the generator that draws episode start bars.
    """

    def __init__(
        self,
        features: Any,
        *,
        close: Any = None,
        log_returns: Any = None,
        window: int = 32,
        episode_length: int = 256,
        num_envs: int = 64,
        positions: Sequence[float] = (-1.0, 0.0, 1.0),
        commission: float = 0.0,
        slippage: float = 0.0,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        feats = _as_tensor(features, "features")
        if feats.ndim != 2:
            raise ValueError(f"features must be [T, F], got shape {tuple(feats.shape)}")
        if not torch.isfinite(feats).all():
            raise ValueError("features contain NaN or inf; drop warm-up rows first")
        num_bars = feats.shape[0]
        if (close is None) == (log_returns is None):
            raise ValueError("give exactly one of close or log_returns")
        if close is not None:
            px = _as_tensor(close, "close")
            if px.shape != (num_bars,):
                raise ValueError(f"close must have shape ({num_bars},), got {tuple(px.shape)}")
            if not (torch.isfinite(px).all() and (px > 0).all()):
                raise ValueError("close prices must be finite and positive")
            lr = torch.zeros(num_bars, dtype=torch.float64)
            lr[1:] = torch.log(px[1:] / px[:-1])
        else:
            lr = _as_tensor(log_returns, "log_returns").clone()
            if lr.shape != (num_bars,):
                raise ValueError(f"log_returns must have shape ({num_bars},), got {tuple(lr.shape)}")
            lr[0] = 0.0  # never used; keeps a NaN placeholder from poisoning sums
            if not torch.isfinite(lr).all():
                raise ValueError("log_returns contain NaN or inf")
        if window < 1 or episode_length < 1 or num_envs < 1:
            raise ValueError("window, episode_length and num_envs must be >= 1")
        if num_bars < window + episode_length:
            raise ValueError(
                f"{num_bars} bars cannot hold a window of {window} plus an episode of "
                f"{episode_length} decisions and the bar after the last one; need >= "
                f"{window + episode_length}"
            )
        pos_grid = torch.as_tensor(list(positions), dtype=torch.float32)
        if pos_grid.ndim != 1 or pos_grid.numel() < 2 or (pos_grid.abs() > 1).any():
            raise ValueError(f"positions must be >= 2 values in [-1, 1], got {list(positions)}")
        if commission < 0 or slippage < 0:
            raise ValueError("commission and slippage are fractions >= 0")

        self.device = torch.device(device)
        self.num_envs = num_envs
        self.window = window
        self.episode_length = episode_length
        self.num_features = feats.shape[1]
        self.num_actions = pos_grid.numel()
        self.obs_dim = window * self.num_features + 3
        self.cost = float(commission) + float(slippage)
        self.features = feats.to(self.device, torch.float32)
        self.log_returns = lr.to(self.device, torch.float32)
        self.action_values = pos_grid.to(self.device)
        # Decision bars run from window-1 (a full window behind it) to T-2 (a bar after it).
        self._first_start = window - 1
        self._last_start = num_bars - 1 - episode_length
        self._offsets = torch.arange(-window + 1, 1, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._start = self._draw_starts()
        self._step = 0  # decisions taken in the current episodes, shared by all copies
        self._position = torch.zeros(num_envs, device=self.device)
        self._log_wealth = torch.zeros(num_envs, device=self.device)

    @classmethod
    def from_bars(cls, bars: Any, **kwargs: Any) -> "TradingEnv":
        """Build from one symbol's bars (a DataFrame with ``close``) via ``core.features``.

        Leading rows whose features are not yet finite (indicator warm-up) are
        dropped together with their prices, so rows stay aligned.
        """
        from core.features import compute_features  # lazy: the env works without that module

        if "symbol" in bars.columns and bars["symbol"].nunique() > 1:
            raise ValueError("from_bars takes one symbol's bars; split by symbol first")
        if "ts" in bars.columns and not bars["ts"].is_monotonic_increasing:
            raise ValueError("bars must be in increasing ts order")
        feats = np.asarray(compute_features(bars), dtype=np.float32)
        close = bars["close"].to_numpy(dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] != close.shape[0]:
            raise ValueError(f"compute_features gave shape {feats.shape} for {close.shape[0]} bars")
        finite = np.isfinite(feats).all(axis=1)
        if not finite.any():
            raise ValueError("no bar has finite features")
        first = int(np.argmax(finite))
        return cls(feats[first:], close=close[first:], **kwargs)

    def _draw_starts(self) -> torch.Tensor:
        return torch.randint(
            self._first_start, self._last_start + 1, (self.num_envs,),
            generator=self.generator, device=self.device,
        )

    def _observe(self) -> torch.Tensor:
        t = self._start + self._step
        window = self.features[t[:, None] + self._offsets]  # [N, W, F], rows t-W+1..t
        time_left = torch.full_like(self._position, (self.episode_length - self._step) / self.episode_length)
        return torch.cat(
            [window.reshape(self.num_envs, -1), self._position[:, None], self._log_wealth[:, None], time_left[:, None]],
            dim=1,
        )

    def reset(self) -> torch.Tensor:
        """Start fresh episodes in every copy; returns the first observations ``[N, obs_dim]``."""
        self._start = self._draw_starts()
        self._step = 0
        self._position.zero_()
        self._log_wealth.zero_()
        return self._observe()

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply action indices ``[N]``; returns (next obs, reward, done), each with N rows."""
        t = self._start + self._step
        target = self.action_values[actions]
        reward = target * self.log_returns[t + 1] - self.cost * (target - self._position).abs()
        self._position = target
        self._log_wealth = self._log_wealth + reward
        self._step += 1
        if self._step == self.episode_length:
            done = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
            self.reset()
        else:
            done = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return self._observe(), reward, done

    def split_obs(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(feature window ``[B, W, F]``, position, log wealth, time left) from flat observations."""
        n = self.window * self.num_features
        return obs[:, :n].reshape(-1, self.window, self.num_features), obs[:, n], obs[:, n + 1], obs[:, n + 2]

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides future steps, so a checkpoint resumes mid-stream exactly."""
        return {
            "start": self._start.cpu(),
            "step": self._step,
            "position": self._position.cpu(),
            "log_wealth": self._log_wealth.cpu(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["start"].shape != (self.num_envs,):
            raise ValueError("checkpoint was taken with a different num_envs")
        self._start = state["start"].to(self.device)
        self._step = int(state["step"])
        self._position = state["position"].to(self.device)
        self._log_wealth = state["log_wealth"].to(self.device)
        self.generator.set_state(state["generator"])
