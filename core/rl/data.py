"""The learner's data: each symbol's bars split in time, and one env over every symbol.

Each symbol's bars are split in time: the first ``1 - learner.holdout_fraction``
train the policy, the rest are never seen in training and are where it is judged.
Features come from ``core.features.compute_features`` (causal, finite memory), so a
held-out decision at bar ``t`` uses feature rows ``t - W + 1 .. t`` and nothing later.
A run pins its data (each symbol's last bar and row count, ``SymbolData.pin``), so a
run resumed after new bars reached the store trains on exactly the bars it started on.

``ls`` below is ``settings.learner`` (``cluster.settings.LearnerSettings``).

Not here: the env's own dynamics (``core.rl.env``), training (``core.rl.cvar_ppo``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.features import WARMUP, compute_features
from core.rl.env import TradingEnv
from core.store import BarStore


@dataclass(frozen=True)
class SymbolData:
    """One symbol's bars, its features over all of them, and where the held-out part starts."""

    symbol: str
    bars: pd.DataFrame
    features: np.ndarray  # [T, F], NaN in warm-up rows
    cut: int  # first held-out row

    @property
    def train_bars(self) -> pd.DataFrame:
        return self.bars.iloc[: self.cut].reset_index(drop=True)

    @property
    def heldout_bars(self) -> pd.DataFrame:
        return self.bars.iloc[self.cut :].reset_index(drop=True)

    def heldout_windows(self, window: int) -> np.ndarray:
        """``[T - cut, window, F]``: for each held-out bar t, feature rows t-window+1 .. t."""
        rows = np.arange(self.cut, len(self.bars))[:, None] + np.arange(-window + 1, 1)[None, :]
        return self.features[rows]

    def pin(self) -> dict[str, Any]:
        ts = self.bars["ts"]
        return {"first": str(ts.iloc[0]), "last": str(ts.iloc[-1]), "rows": len(self.bars),
                "heldout_first": str(ts.iloc[self.cut])}


def load_data(store: BarStore, symbols: list[str], ls: Any,
              pinned: dict[str, dict[str, Any]] | None = None) -> list[SymbolData]:
    """Each symbol's bars from the store, split into training and held-out parts.

    ``pinned`` (from a run's ``run.json``) fixes the last bar and the row count, so a
    resumed run reads the bars it started on; a store that no longer holds them is refused.
    """
    out = []
    need_train = WARMUP + ls.window + ls.episode_length + 1
    for sym in symbols:
        end = pd.Timestamp(pinned[sym]["last"]) if pinned else None
        bars = store.read(sym, end=end)
        if pinned and len(bars) != pinned[sym]["rows"]:
            raise ValueError(f"{sym}: the run was started on {pinned[sym]['rows']} bars up to {pinned[sym]['last']}; "
                             f"the store now has {len(bars)} there. Start a new run id.")
        if len(bars) == 0:
            raise ValueError(f"no bars of {sym} in the store; `raytrade data generate --symbols {sym}` writes some")
        cut = int(len(bars) * (1.0 - ls.holdout_fraction))
        if cut < need_train or len(bars) - cut < 2:
            raise ValueError(
                f"{sym}: {len(bars)} bars are too few: the training part ({1 - ls.holdout_fraction:.0%}) needs "
                f">= {need_train} (warm-up {WARMUP} + window {ls.window} + episode {ls.episode_length} + 1) and the "
                f"held-out part >= 2; need about {math.ceil(need_train / (1 - ls.holdout_fraction)) + 2} bars")
        out.append(SymbolData(sym, bars, compute_features(bars), cut))
    return out


# --------------------------------------------------------------------------- env over symbols
class MultiSymbolEnv:
    """One ``TradingEnv`` per symbol behind the ``BatchedEnv`` interface, so one policy
    learns from every symbol. ``num_envs`` copies are split as evenly as possible; every
    copy has the same episode length and starts together, so episodes stay aligned."""

    def __init__(self, envs: list[TradingEnv]) -> None:
        if not envs:
            raise ValueError("need at least one env")
        first = envs[0]
        for e in envs[1:]:
            if e.obs_dim != first.obs_dim or e.episode_length != first.episode_length or not torch.equal(
                e.action_values, first.action_values
            ):
                raise ValueError("every symbol's env must have the same window, features, episode length and actions")
        self.envs = envs
        self.sizes = [e.num_envs for e in envs]
        self.num_envs = sum(self.sizes)
        self.obs_dim, self.num_actions, self.device = first.obs_dim, first.num_actions, first.device
        self.action_values = first.action_values
        self.episode_length = first.episode_length

    @classmethod
    def from_data(cls, data: list[SymbolData], ls: Any, seed: int, device: str) -> "MultiSymbolEnv":
        if ls.num_envs < len(data):
            raise ValueError(f"learner.num_envs {ls.num_envs} must be at least the number of symbols, {len(data)}")
        base, extra = divmod(ls.num_envs, len(data))
        envs = []
        for i, d in enumerate(data):
            try:
                envs.append(TradingEnv.from_bars(
                    d.train_bars, window=ls.window, episode_length=ls.episode_length, num_envs=base + (i < extra),
                    positions=tuple(ls.positions), commission=ls.commission, slippage=ls.slippage, device=device,
                    seed=seed * 7919 + i))
            except ValueError as e:
                raise ValueError(f"{d.symbol}: {e}") from None
        return cls(envs)

    def reset(self) -> torch.Tensor:
        return torch.cat([e.reset() for e in self.envs])

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = [e.step(a) for e, a in zip(self.envs, torch.split(actions, self.sizes))]
        return tuple(torch.cat(x) for x in zip(*parts))  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        return {"envs": [e.state_dict() for e in self.envs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["envs"]) != len(self.envs):
            raise ValueError("checkpoint was taken with a different number of symbols")
        for e, s in zip(self.envs, state["envs"]):
            e.load_state_dict(s)
