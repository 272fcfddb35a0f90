"""Ensemble members: the ``Member`` protocol, the rule members and users' Python members.

A member maps a batch of rows to target positions in [-1, 1], one per row.
A row is one symbol's latest window: its feature rows (``core.features``) and,
for members that need them, the bars they were computed from. Learned members
(ONNX files run by ONNX Runtime, ``core.models.cache.OnnxModel``) read the
features; rule members run core's strategies on the bars and take the
position after the last bar.

A user adds a member without touching raytrade's code: a function
``fn(batch: MemberBatch) -> array-like [B]`` named by import path in settings
(``[[ensemble.python_members]] name = "mine", import_path = "pkg.mod:fn"``).

A member may raise, return NaN or hang: the ensemble calls each member with a
timeout and leaves a failing one out of that call. Members do not catch their
own errors for that reason.

Not here: fusion (``core.fusion``), timeouts and threads (``actors.ensemble``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

RULE_STRATEGIES = ("sma_crossover", "atr_breakout", "rsi_reversion")


@dataclass(frozen=True)
class MemberBatch:
    """What every member is given: ``B`` rows, each one symbol's latest window."""

    features: np.ndarray  # [B, L, F] float32: the last L feature rows of each symbol, all finite
    bars: tuple[Mapping[str, np.ndarray] | None, ...]  # per row: OHLCV arrays in time order, or None
    symbols: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.features.ndim != 3:
            raise ValueError(f"features must be [rows, window, features], got {self.features.shape}")
        if len(self.bars) != self.features.shape[0] or len(self.symbols) != self.features.shape[0]:
            raise ValueError("features, bars and symbols must have one entry per row")

    def __len__(self) -> int:
        return self.features.shape[0]


@runtime_checkable
class Member(Protocol):
    name: str
    version: str  # what the decision reports: "v3" for a registry model, "rule", "python"

    def predict(self, batch: MemberBatch) -> np.ndarray:
        """Target positions ``[B]`` in [-1, 1]; NaN for a row the member cannot answer."""
        ...


class RuleMember:
    """One of core's rule strategies with fixed parameters, as a member."""

    version = "rule"

    def __init__(self, name: str, strategy: str, params: Mapping[str, Any] | None = None):
        if strategy not in RULE_STRATEGIES:
            raise ValueError(f"unknown rule strategy {strategy!r}; use one of {', '.join(RULE_STRATEGIES)}")
        from core import strategies

        self.name = name
        self.strategy = strategy
        self.params = dict(params or {})
        self._fn: Callable[..., np.ndarray] = getattr(strategies, strategy)

    def predict(self, batch: MemberBatch) -> np.ndarray:
        out = np.full(len(batch), np.nan)
        for i, bars in enumerate(batch.bars):
            if bars is None or len(bars["close"]) == 0:
                continue
            out[i] = float(self._fn(bars, **self.params)[-1])
        return out


class PythonMember:
    """A user's function ``fn(batch) -> [B]``, named by ``module:function``."""

    version = "python"

    def __init__(self, name: str, import_path: str):
        mod_name, _, fn_name = import_path.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"member {name}: cannot import {mod_name!r} ({e}); is it installed on every node?") from None
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ValueError(f"member {name}: {mod_name} has no function {fn_name!r}")
        self.name, self.import_path, self._fn = name, import_path, fn

    def predict(self, batch: MemberBatch) -> np.ndarray:
        out = np.asarray(self._fn(batch), dtype=np.float64).reshape(-1)
        if out.shape[0] != len(batch):
            raise ValueError(f"returned {out.shape[0]} positions for {len(batch)} rows")
        return out


class OnnxMember:
    """A registry model version as a member (the session lives in the model cache)."""

    def __init__(self, name: str, version: int, model: Any):
        self.name, self.model_version, self.model = name, int(version), model
        self.version = f"v{int(version)}"

    @property
    def window(self) -> int:
        return int(self.model.window)

    def predict(self, batch: MemberBatch) -> np.ndarray:
        if batch.features.shape[1] < self.window:
            raise ValueError(f"needs {self.window} feature rows, the batch has {batch.features.shape[1]}")
        return self.model.run(batch.features)


def rule_members(specs: Sequence[Any]) -> list[RuleMember]:
    """Rule members from ``ensemble.rules`` settings."""
    return [RuleMember(s.name, s.strategy, s.params) for s in specs]
